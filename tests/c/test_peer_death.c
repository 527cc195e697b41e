/*
 * A peer that dies or freezes during a collective, seen from a C program that keeps the default
 * SIGPIPE disposition (writing to a socket whose peer is gone must not kill the training
 * process): the survivor gets DCP_ERROR_COMM or DCP_ERROR_TIMEOUT naming the rank, in time.
 *
 *   usage: test_peer_death SCRATCH_DIR
 *
 * Builds with: gcc -std=c11 -Wall -Wextra -Werror -pedantic
 */
#define _POSIX_C_SOURCE 200809L

#include "dcp.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int g_failures = 0, g_checks = 0;

#define CHECK(cond, ...)                                          \
    do {                                                          \
        g_checks++;                                               \
        if (!(cond)) {                                            \
            g_failures++;                                         \
            fprintf(stderr, "%s:%d: FAIL: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                         \
            fprintf(stderr, "\n");                                \
        }                                                         \
    } while (0)

static uint16_t free_port(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t n = sizeof a;
    uint16_t port = 0;
    if (s >= 0 && bind(s, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(s, (struct sockaddr *)&a, &n) == 0)
        port = ntohs(a.sin_port);
    if (s >= 0) close(s);
    return port;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

enum { N = 1 << 20 };
static float g_w[N];
static const int64_t g_shape[1] = {N};

static dcp_state *state(void) {
    dcp_state *st = NULL;
    dcp_state_new(&st);
    dcp_state_add_tensor(st, "w", DCP_FLOAT32, 1, g_shape, NULL, g_w, sizeof g_w);
    return st;
}

/*
 * Two ranks: this process is `me`, a forked child the other. The child joins, then does
 * `child_action` (0: exit at once; 1: stop itself with SIGSTOP before the collective). This
 * process then runs `op` (0: save, 1: load) and must fail naming the child's rank.
 */
static void scenario(const char *dir, int me, int child_action, int op, int want_status, double max_s) {
    uint16_t port = free_port();
    int other = 1 - me;
    pid_t pid = fork();
    if (pid == 0) {
        dcp_context *c = NULL;
        if (dcp_context_new_tcp(other, 2, "127.0.0.1", port, 5000, &c) != DCP_OK) _exit(3);
        if (child_action == 1) raise(SIGSTOP);
        _exit(0);
    }
    dcp_context *c = NULL;
    int s = dcp_context_new_tcp(me, 2, "127.0.0.1", port, 1000, &c);
    CHECK(s == DCP_OK, "rendezvous: %s", dcp_last_error());
    if (s != DCP_OK) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        return;
    }
    if (child_action == 0) {
        waitpid(pid, NULL, 0);
        nanosleep(&(struct timespec){0, 50000000}, NULL);
    } else {
        int st;
        waitpid(pid, &st, WUNTRACED); /* stopped */
    }
    dcp_state *st = state();
    double t0 = now();
    s = op == 0 ? dcp_save(c, st, dir, NULL) : dcp_load(c, st, dir, NULL);
    double dt = now() - t0;
    char who[32];
    snprintf(who, sizeof who, "rank %d", other);
    const char *msg = dcp_last_error();
    printf("rank %d, %s, peer %s: %s in %.1f s: %s\n", me, op == 0 ? "save" : "load", child_action == 0 ? "exited" : "stopped",
           dcp_status_name(s), dt, msg);
    CHECK(s == want_status, "got %s, expected %s", dcp_status_name(s), dcp_status_name(want_status));
    CHECK(strstr(msg, who) != NULL, "the message does not name %s: %s", who, msg);
    CHECK(dt < max_s, "took %.1f s (limit %.1f s)", dt, max_s);
    /* The context stays usable as an object: later calls fail cleanly, free works. */
    s = dcp_context_barrier(c);
    CHECK(s == DCP_ERROR_COMM || s == DCP_ERROR_TIMEOUT, "barrier after the failure: %s", dcp_status_name(s));
    dcp_state_free(st);
    dcp_context_free(c);
    if (child_action == 1) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SCRATCH_DIR\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    mkdir(argv[1], 0755);
    char ckpt[4096], a[4200], b[4200];
    snprintf(ckpt, sizeof ckpt, "%s/ckpt", argv[1]);
    snprintf(a, sizeof a, "%s/a", argv[1]);
    snprintf(b, sizeof b, "%s/b", argv[1]);
    for (int i = 0; i < N; i++) g_w[i] = (float)i;
    {
        dcp_context *c = NULL;
        dcp_context_new_local(&c);
        dcp_state *st = state();
        CHECK(dcp_save(c, st, ckpt, NULL) == DCP_OK, "%s", dcp_last_error());
        dcp_state_free(st);
        dcp_context_free(c);
    }
    /* SIGPIPE keeps its default action in this process. */
    signal(SIGPIPE, SIG_DFL);
    /* Rank 1 saves after rank 0 exited: its writes hit a closed socket (EPIPE, no SIGPIPE). */
    scenario(a, 1, 0, 0, DCP_ERROR_COMM, 3.0);
    /* Rank 0 saves after rank 1 exited. */
    scenario(b, 0, 0, 0, DCP_ERROR_COMM, 3.0);
    /* Rank 0 loads while rank 1 is frozen: a timeout (1 s) naming rank 1. */
    scenario(ckpt, 0, 1, 1, DCP_ERROR_TIMEOUT, 3.0);
    /* Rank 1 loads while rank 0 is frozen: rank 1 waits longer than rank 0 would, then fails. */
    scenario(ckpt, 1, 1, 1, DCP_ERROR_TIMEOUT, 5.0);
    printf("test_peer_death: %d checks, %d failed\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
