/*
 * libdcp example: save a small training state, load it back, and look inside the checkpoint.
 *
 * The state is that of a two-layer MLP trained with Adam, under the keys torch's
 * distributed checkpoint (DCP) would use, so torch.distributed.checkpoint can read the result:
 *
 *   model.net1.weight, model.net1.bias, model.net2.weight, model.net2.bias      float32
 *   optimizer.state.<param>.exp_avg / .exp_avg_sq                              float32
 *   optimizer.state.<param>.step                                               0-d float32
 *   optimizer.param_groups.0.lr                                                a Python float
 *   train.step                                                                 a Python int
 *   train.losses                                                               Python bytes
 *
 *   usage: save_load CHECKPOINT_DIR
 *
 * Build (after cargo build --release), from the repository root:
 *   cc -std=c11 -Iinclude examples/save_load.c -Ltarget/release -ldcp \
 *      -Wl,-rpath,"$PWD/target/release" -o save_load
 * (scripts/c-tests.sh builds and runs it.)
 */
#include "dcp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Every libdcp call returns a dcp_status; on failure dcp_last_error() says what went wrong. */
#define TRY(call)                                                                    \
    do {                                                                             \
        dcp_status s_ = (call);                                                      \
        if (s_ != DCP_OK) {                                                          \
            fprintf(stderr, "%s:%d: %s failed with %s: %s\n", __FILE__, __LINE__,    \
                    #call, dcp_status_name(s_), dcp_last_error());                   \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

/* One parameter of the model and its Adam state. */
typedef struct {
    const char *name; /* the module's parameter name, e.g. "net1.weight" */
    int32_t ndim;
    int64_t shape[2];
    float *value, *exp_avg, *exp_avg_sq;
    float step; /* torch keeps Adam's step as a 0-d float32 tensor */
} param;

enum { NPARAMS = 4 };

static size_t numel(const param *p) {
    return (size_t)p->shape[0] * (p->ndim == 2 ? (size_t)p->shape[1] : 1);
}

/* net1 = Linear(8 -> 16), net2 = Linear(16 -> 4). */
static void make_params(param p[NPARAMS]) {
    const param shapes[NPARAMS] = {
        {"net1.weight", 2, {16, 8}, 0, 0, 0, 0}, {"net1.bias", 1, {16, 0}, 0, 0, 0, 0},
        {"net2.weight", 2, {4, 16}, 0, 0, 0, 0}, {"net2.bias", 1, {4, 0}, 0, 0, 0, 0},
    };
    for (int i = 0; i < NPARAMS; i++) {
        p[i] = shapes[i];
        size_t n = numel(&p[i]);
        p[i].value = calloc(n, sizeof(float));
        p[i].exp_avg = calloc(n, sizeof(float));
        p[i].exp_avg_sq = calloc(n, sizeof(float));
        if (!p[i].value || !p[i].exp_avg || !p[i].exp_avg_sq) exit(1);
    }
}

static void free_params(param p[NPARAMS]) {
    for (int i = 0; i < NPARAMS; i++) {
        free(p[i].value);
        free(p[i].exp_avg);
        free(p[i].exp_avg_sq);
    }
}

/* Registers one float32 tensor: the parameter ("model.<name>", slot NULL) or one of its Adam
   slots ("optimizer.state.<name>.<slot>"). The key's nesting in the state dict is given
   explicitly, because the parameter name itself contains a '.'. */
static void add_f32(dcp_state *st, const param *p, const char *slot, float *data, int32_t ndim) {
    char key[128];
    const char *path[4] = {"optimizer", "state", p->name, slot};
    if (slot) {
        snprintf(key, sizeof key, "optimizer.state.%s.%s", p->name, slot);
    } else {
        snprintf(key, sizeof key, "model.%s", p->name);
        path[0] = "model";
        path[1] = p->name;
    }
    size_t nbytes = (ndim ? numel(p) : 1) * sizeof(float);
    TRY(dcp_state_add_tensor(st, key, DCP_FLOAT32, ndim, p->shape, NULL, data, nbytes));
    TRY(dcp_state_set_path(st, key, slot ? 4 : 2, path, NULL));
}

/* Registers the whole training state. The tensors stay in our buffers (libdcp borrows them:
   save reads them, load writes them); scalars and bytes are copied into the state. */
static dcp_state *register_state(param p[NPARAMS], double lr, int64_t step, const float *losses,
                                 size_t nlosses) {
    dcp_state *st = NULL;
    TRY(dcp_state_new(&st));
    for (int i = 0; i < NPARAMS; i++) {
        add_f32(st, &p[i], NULL, p[i].value, p[i].ndim);
        add_f32(st, &p[i], "exp_avg", p[i].exp_avg, p[i].ndim);
        add_f32(st, &p[i], "exp_avg_sq", p[i].exp_avg_sq, p[i].ndim);
        add_f32(st, &p[i], "step", &p[i].step, 0); /* 0-d */
    }
    TRY(dcp_state_add_double(st, "optimizer.param_groups.0.lr", lr));
    TRY(dcp_state_add_int(st, "train.step", step));
    TRY(dcp_state_add_bytes(st, "train.losses", losses, nlosses * sizeof(float)));
    return st;
}

static const char *dtype_name(int32_t dtype) {
    static const char *const names[] = {
        "?",     "float32", "float64", "float16",   "bfloat16",   "float8_e4m3fn",
        "float8_e5m2", "int64", "int32", "int16", "int8", "uint8",
        "bool",  "complex64", "complex128", "uint16", "uint32", "uint64",
    }; /* indexed by dcp_dtype */
    return dtype >= 1 && dtype <= 17 ? names[dtype] : "?";
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CHECKPOINT_DIR\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    dcp_context *ctx = NULL;
    TRY(dcp_context_new_local(&ctx)); /* a job of one process */

    /* ---- 1. The state after some training, saved. ---- */
    param trained[NPARAMS];
    make_params(trained);
    for (int i = 0; i < NPARAMS; i++) {
        for (size_t k = 0; k < numel(&trained[i]); k++) {
            trained[i].value[k] = 0.01f * (float)k - 0.5f * (float)i;
            trained[i].exp_avg[k] = 1e-3f * (float)(k % 7);
            trained[i].exp_avg_sq[k] = 1e-6f * (float)(k % 5);
        }
        trained[i].step = 100.0f;
    }
    const float losses[5] = {2.30f, 1.71f, 1.12f, 0.86f, 0.74f};
    dcp_state *saved = register_state(trained, 1e-3, 100, losses, 5);

    dcp_save_options *opts = NULL;
    TRY(dcp_save_options_new(&opts));
    TRY(dcp_save_options_set_overwrite(opts, true)); /* replace an earlier run's checkpoint */
    TRY(dcp_save(ctx, saved, dir, opts));
    dcp_save_options_free(opts);

    /* ---- 2. Load it into fresh buffers: same keys, same dtypes and shapes. ---- */
    param fresh[NPARAMS];
    make_params(fresh);
    for (int i = 0; i < NPARAMS; i++) {
        size_t nb = numel(&fresh[i]) * sizeof(float);
        memset(fresh[i].value, 0xff, nb); /* garbage, so that the check below means something */
        memset(fresh[i].exp_avg, 0xff, nb);
        memset(fresh[i].exp_avg_sq, 0xff, nb);
        fresh[i].step = -1.0f;
    }
    dcp_state *loaded = register_state(fresh, 0.0, 0, NULL, 0);
    TRY(dcp_load(ctx, loaded, dir, NULL)); /* strict: every key must be in the checkpoint */

    /* Tensors were written into our buffers; scalars and bytes are read from the state. */
    int bad = 0;
    for (int i = 0; i < NPARAMS; i++) {
        size_t nb = numel(&trained[i]) * sizeof(float);
        bad += memcmp(trained[i].value, fresh[i].value, nb) != 0;
        bad += memcmp(trained[i].exp_avg, fresh[i].exp_avg, nb) != 0;
        bad += memcmp(trained[i].exp_avg_sq, fresh[i].exp_avg_sq, nb) != 0;
        bad += trained[i].step != fresh[i].step;
    }
    double lr = 0;
    int64_t step = 0;
    TRY(dcp_state_get_double(loaded, "optimizer.param_groups.0.lr", &lr));
    TRY(dcp_state_get_int(loaded, "train.step", &step));
    bad += lr != 1e-3 || step != 100;
    float got_losses[5];
    size_t len = 0;
    TRY(dcp_state_get_bytes(loaded, "train.losses", got_losses, sizeof got_losses, &len, NULL));
    bad += len != sizeof losses || memcmp(got_losses, losses, sizeof losses) != 0;
    if (bad) {
        fprintf(stderr, "%d values differ after loading %s\n", bad, dir);
        return 1;
    }

    /* ---- 3. Inspect the checkpoint without registering anything. ---- */
    dcp_checkpoint *ckpt = NULL;
    TRY(dcp_checkpoint_open(dir, &ckpt));
    size_t nkeys = 0;
    TRY(dcp_checkpoint_num_keys(ckpt, &nkeys));
    printf("%s holds %zu keys:\n", dir, nkeys);
    for (size_t i = 0; i < nkeys; i++) {
        dcp_key_info k;
        TRY(dcp_checkpoint_key(ckpt, i, &k));
        if (k.kind == DCP_KEY_TENSOR) {
            printf("  %-40s %-8s [", k.fqn, dtype_name(k.dtype));
            for (int d = 0; d < k.ndim; d++) printf(d ? ", %lld" : "%lld", (long long)k.shape[d]);
            printf("]\n");
        } else {
            printf("  %-40s object\n", k.fqn);
        }
    }
    double lr_on_disk = 0;
    TRY(dcp_checkpoint_read_double(ckpt, "optimizer.param_groups.0.lr", &lr_on_disk));
    dcp_checkpoint_free(ckpt);

    printf("saved, loaded and verified %zu keys (lr %g, step %lld, %zu losses) with libdcp %s\n",
           nkeys, lr_on_disk, (long long)step, len / sizeof(float), dcp_version());

    dcp_state_free(saved);
    dcp_state_free(loaded);
    free_params(trained);
    free_params(fresh);
    dcp_context_free(ctx);
    return 0;
}
