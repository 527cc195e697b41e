/*
 * libdcp over MPI: the host-callbacks communicator wired to MPI collectives.
 *
 * Each rank holds an FSDP-style shard (rows split over all ranks, uneven and empty shards
 * allowed) of a small model, saves one checkpoint collectively, then loads it back under a
 * different layout (2-D HSDP when the world size is even, else fully replicated) and checks
 * every element; then saves a series under a checkpoint manager and resumes from it past an
 * unfinished newest step. Run with:  mpirun -np 4 ./mpi_save_load /tmp/ckpt
 */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dcp.h"

#define CHECK(call)                                                                      \
    do {                                                                                 \
        dcp_status s_ = (call);                                                          \
        if (s_ != DCP_OK) {                                                              \
            fprintf(stderr, "rank %d: %s failed: %s: %s\n", rank, #call,                 \
                    dcp_status_name(s_), dcp_last_error());                              \
            MPI_Abort(MPI_COMM_WORLD, 1);                                                \
        }                                                                                \
    } while (0)

/* MPI has no timeouts; a production adapter might use MPI_Iallgather and poll. */
static int32_t mpi_allgather(void *user, const void *send, void *recv, size_t len, uint64_t timeout_ms) {
    (void)timeout_ms;
    return MPI_Allgather(send, (int)len, MPI_BYTE, recv, (int)len, MPI_BYTE, *(MPI_Comm *)user) == MPI_SUCCESS ? 0 : 1;
}
static int32_t mpi_broadcast(void *user, void *buf, size_t len, int32_t root, uint64_t timeout_ms) {
    (void)timeout_ms;
    return MPI_Bcast(buf, (int)len, MPI_BYTE, root, *(MPI_Comm *)user) == MPI_SUCCESS ? 0 : 1;
}
static int32_t mpi_barrier(void *user, uint64_t timeout_ms) {
    (void)timeout_ms;
    return MPI_Barrier(*(MPI_Comm *)user) == MPI_SUCCESS ? 0 : 1;
}

/* The global value of element i of parameter p: every rank can compute it. */
static float value(int p, int64_t i) { return (float)(p * 1000) + (float)i * 0.5f; }

/* torch.chunk's split of `size` rows into `n`: start and count of chunk k. */
static void chunk(int64_t size, int64_t n, int64_t k, int64_t *start, int64_t *count) {
    int64_t full = (size + n - 1) / n;
    *start = full * k < size ? full * k : size;
    int64_t end = full * (k + 1) < size ? full * (k + 1) : size;
    *count = end > *start ? end - *start : 0;
}

enum { NPARAMS = 4 };
static const char *names[NPARAMS] = {"model.net1.weight", "model.net1.bias", "model.net2.weight", "model.net2.bias"};
static const int64_t shapes[NPARAMS][2] = {{10, 5}, {10, 1}, {3, 10}, {3, 1}};
static const int ndims[NPARAMS] = {2, 1, 2, 1};

int main(int argc, char **argv) {
    int rank = 0, world = 1;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    if (argc < 2) {
        if (rank == 0) fprintf(stderr, "usage: %s CHECKPOINT_DIR\n", argv[0]);
        MPI_Finalize();
        return 2;
    }
    MPI_Comm comm = MPI_COMM_WORLD;
    dcp_context *ctx = NULL;
    CHECK(dcp_context_new_callbacks(rank, world, mpi_allgather, mpi_broadcast, mpi_barrier, &comm, 60000, &ctx));

    /* Save: rows of every parameter sharded over a 1-D mesh of all ranks (FSDP). */
    int64_t mesh1_shape[1] = {world};
    dcp_mesh *fsdp = NULL;
    CHECK(dcp_mesh_new(ctx, 1, mesh1_shape, NULL, NULL, &fsdp));
    dcp_state *state = NULL;
    CHECK(dcp_state_new(&state));
    float *shards[NPARAMS];
    for (int p = 0; p < NPARAMS; p++) {
        int64_t start, rows, cols = shapes[p][1];
        chunk(shapes[p][0], world, rank, &start, &rows);
        shards[p] = malloc(sizeof(float) * (size_t)(rows * cols + 1));
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = 0; c < cols; c++) shards[p][r * cols + c] = value(p, (start + r) * cols + c);
        int64_t local[2] = {rows, cols};
        int32_t placement[1] = {DCP_SHARD(0)};
        CHECK(dcp_state_add_tensor_sharded(state, names[p], DCP_FLOAT32, ndims[p], local, NULL, shards[p],
                                           sizeof(float) * (uint64_t)(rows * cols), shapes[p], fsdp, placement));
    }
    CHECK(dcp_state_add_int(state, "train.step", 1234));
    dcp_save_options *opts = NULL;
    CHECK(dcp_save_options_new(&opts));
    CHECK(dcp_save_options_set_overwrite(opts, true));
    CHECK(dcp_save(ctx, state, argv[1], opts));
    dcp_save_options_free(opts);
    dcp_state_free(state);

    /* Load under another layout: HSDP on a 2 x world/2 mesh (replicate x shard), or replicated. */
    dcp_mesh *mesh = NULL;
    int hsdp = world % 2 == 0 && world > 1;
    int64_t mesh2_shape[2] = {2, world / 2};
    if (hsdp)
        CHECK(dcp_mesh_new(ctx, 2, mesh2_shape, NULL, NULL, &mesh));
    else
        CHECK(dcp_mesh_new(ctx, 1, mesh1_shape, NULL, NULL, &mesh));
    CHECK(dcp_state_new(&state));
    float *loaded[NPARAMS];
    int64_t lstart[NPARAMS], lrows[NPARAMS];
    for (int p = 0; p < NPARAMS; p++) {
        int64_t cols = shapes[p][1];
        if (hsdp)
            chunk(shapes[p][0], world / 2, rank % (world / 2), &lstart[p], &lrows[p]);
        else
            lstart[p] = 0, lrows[p] = shapes[p][0];
        loaded[p] = malloc(sizeof(float) * (size_t)(lrows[p] * cols + 1));
        for (int64_t i = 0; i < lrows[p] * cols; i++) loaded[p][i] = NAN;
        int64_t local[2] = {lrows[p], cols};
        int32_t placement[2] = {DCP_REPLICATE, DCP_SHARD(0)};
        int32_t replicated[1] = {DCP_REPLICATE};
        int32_t *pl = hsdp ? placement : replicated;
        CHECK(dcp_state_add_tensor_sharded(state, names[p], DCP_FLOAT32, ndims[p], local, NULL, loaded[p],
                                           sizeof(float) * (uint64_t)(lrows[p] * cols), shapes[p], mesh, pl));
    }
    CHECK(dcp_state_add_int(state, "train.step", 0));
    CHECK(dcp_load(ctx, state, argv[1], NULL));

    long bad = 0;
    for (int p = 0; p < NPARAMS; p++) {
        int64_t cols = shapes[p][1];
        for (int64_t r = 0; r < lrows[p]; r++)
            for (int64_t c = 0; c < cols; c++)
                if (loaded[p][r * cols + c] != value(p, (lstart[p] + r) * cols + c)) bad++;
    }
    int64_t step = 0;
    CHECK(dcp_state_get_int(state, "train.step", &step));
    if (step != 1234) bad++;
    /* A series under a checkpoint manager (PATH-series-WORLD): steps 1-3 of this layout, keep the
       last 2; the newest loses its .metadata on rank 0; every rank agrees to resume from step
       2, skipping 3, and loads it back exactly. */
    char root[4096];
    snprintf(root, sizeof root, "%s-series-%d", argv[1], world);
    dcp_manager_policy *policy = NULL;
    CHECK(dcp_manager_policy_new(&policy));
    CHECK(dcp_manager_policy_set_keep_last(policy, 2));
    dcp_manager *series = NULL;
    CHECK(dcp_manager_open(ctx, root, policy, &series));
    for (uint64_t s = 1; s <= 3; s++) CHECK(dcp_manager_save(series, s, state));
    if (rank == 0) {
        char md[8192];
        snprintf(md, sizeof md, "%s/step-00000003/.metadata", root);
        if (remove(md) != 0) bad++;
    }
    MPI_Barrier(comm);
    for (int p = 0; p < NPARAMS; p++)
        for (int64_t i = 0; i < lrows[p] * shapes[p][1]; i++) loaded[p][i] = NAN;
    int64_t resumed = -1;
    size_t skipped = 0;
    CHECK(dcp_manager_load_latest(series, state, NULL, &resumed));
    CHECK(dcp_manager_skipped_count(series, &skipped));
    if (resumed != 2 || skipped != 1) bad++;
    for (int p = 0; p < NPARAMS; p++) {
        int64_t cols = shapes[p][1];
        for (int64_t r = 0; r < lrows[p]; r++)
            for (int64_t c = 0; c < cols; c++)
                if (loaded[p][r * cols + c] != value(p, (lstart[p] + r) * cols + c)) bad++;
    }
    CHECK(dcp_manager_finish(series));
    dcp_manager_free(series);
    dcp_manager_policy_free(policy);

    long total_bad = 0;
    MPI_Reduce(&bad, &total_bad, 1, MPI_LONG, MPI_SUM, 0, comm);
    if (rank == 0)
        printf("mpi_save_load: %d ranks saved FSDP shards, loaded as %s, then a managed series resumed from step %lld "
               "past an unfinished step: %s\n",
               world, hsdp ? "2-D HSDP" : "replicated", (long long)resumed, total_bad == 0 ? "all values match" : "MISMATCH");

    for (int p = 0; p < NPARAMS; p++) free(shards[p]), free(loaded[p]);
    dcp_state_free(state);
    dcp_mesh_free(mesh);
    dcp_mesh_free(fsdp);
    dcp_context_free(ctx);
    MPI_Bcast(&total_bad, 1, MPI_LONG, 0, comm);
    MPI_Finalize();
    return total_bad == 0 ? 0 : 1;
}
