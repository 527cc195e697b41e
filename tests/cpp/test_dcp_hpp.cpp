// include/dcp.hpp alone (no LibTorch): C++17, -Wall -Wextra -Werror -pedantic, included twice.
// RAII handles, exceptions with status and message, options, inspection, and a host
// communicator (two threads as two ranks) for sync and async saves and for a failing collective.
//
//   usage: test_dcp_hpp SCRATCH_DIR
#include "dcp.hpp"
#include "dcp.hpp"

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

static std::atomic<int> failures{0}, checks{0};
#define CHECK(cond)                                                                                \
    do {                                                                                           \
        ++checks;                                                                                  \
        if (!(cond)) {                                                                             \
            ++failures;                                                                            \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);          \
        }                                                                                          \
    } while (0)

/** Runs `f`, expecting a dcp::Error with `status` whose message contains `needle`. */
template <class F> static void expect_error(dcp_status status, const char *needle, F &&f, int line) {
    ++checks;
    try {
        f();
        ++failures;
        std::fprintf(stderr, "line %d: no exception (wanted %s)\n", line, dcp::status_name(status));
    } catch (const dcp::Error &e) {
        if (e.status() != status || std::string(e.what()).find(needle) == std::string::npos) {
            ++failures;
            std::fprintf(stderr, "line %d: got %s \"%s\", wanted %s containing \"%s\"\n", line, e.status_name(), e.what(),
                         dcp::status_name(status), needle);
        }
    }
}
#define EXPECT_ERROR(status, needle, ...) expect_error(status, needle, [&] { __VA_ARGS__; }, __LINE__)

static std::string dir;

static void test_round_trip() {
    dcp::Context ctx = dcp::Context::local();
    CHECK(ctx.rank() == 0 && ctx.world_size() == 1);
    std::vector<float> w(6), t(6);
    std::iota(w.begin(), w.end(), 1.0f);
    std::iota(t.begin(), t.end(), 10.0f);
    dcp::State st;
    st.add_tensor("model.w", DCP_FLOAT32, {2, 3}, w.data(), w.size() * sizeof(float))
        .add_tensor("model.t", DCP_FLOAT32, {3, 2}, t.data(), t.size() * sizeof(float), {1, 3}) // transposed view
        .add_int("train.step", 42)
        .add_double("lr", 1e-3)
        .add_bytes("blob", std::string("a\0b", 3))
        .add_literal("betas", "(0.9, 0.999)")
        .set_path("model.w", {"model", "w"});
    CHECK(st.size() == 6);
    CHECK(st.value_kind("train.step") == DCP_VALUE_INT);
    dcp::save(ctx, st, dir + "/rt");
    EXPECT_ERROR(DCP_ERROR_ALREADY_EXISTS, "already exists", dcp::save(ctx, st, dir + "/rt"));
    dcp::save(ctx, st, dir + "/rt", dcp::SaveOptions().set_overwrite(true).set_threads(2).set_direct_io(false));

    std::vector<float> w2(6, 0), t2(6, 0);
    dcp::State ld;
    ld.add_tensor("model.w", DCP_FLOAT32, {2, 3}, w2.data(), w2.size() * sizeof(float))
        .add_tensor("model.t", DCP_FLOAT32, {3, 2}, t2.data(), t2.size() * sizeof(float), {1, 3})
        .add_int("train.step", 0)
        .add_double("lr", 0)
        .add_bytes("blob", "")
        .add_literal("betas", "None")
        .add_int("not.there", 0);
    EXPECT_ERROR(DCP_ERROR_NOT_FOUND, "not.there", dcp::load(ctx, ld, dir + "/rt"));
    // Structured fields: the key of a load failure, the file of an open failure.
    try {
        dcp::load(ctx, ld, dir + "/rt");
        CHECK(!"a strict load of a missing key fails");
    } catch (const dcp::Error &e) {
        CHECK(e.key() == "not.there" && e.file().empty() && e.offset() == -1);
    }
    try {
        dcp::Checkpoint missing(dir + "/does-not-exist");
        CHECK(!"opening a directory without .metadata fails");
    } catch (const dcp::Error &e) {
        CHECK(e.key().empty() && e.file() == ".metadata");
    }
    dcp::load(ctx, ld, dir + "/rt", dcp::LoadOptions().set_strict(false).set_threads(2).set_verify(true));
    CHECK(w2 == w && t2 == t);
    CHECK(ld.get_int("train.step") == 42);
    CHECK(ld.get_double("lr") == 1e-3);
    dcp_value_kind kind = DCP_VALUE_PICKLE;
    CHECK(ld.get_bytes("blob", &kind) == std::string("a\0b", 3) && kind == DCP_VALUE_BYTES);
    CHECK(ld.get_literal("betas") == "(0.9, 0.999)");
    CHECK(ld.loaded("model.w") && !ld.loaded("not.there"));
    CHECK(ld.missing_keys() == std::vector<std::string>{"not.there"});

    // Inspection.
    dcp::Checkpoint ck(dir + "/rt");
    CHECK(ck.num_keys() == 6);
    CHECK(dcp::Checkpoint(dcp::Context::local(), dir + "/rt").num_keys() == 6);
    auto idx = ck.find("model.t");
    CHECK(idx.has_value() && !ck.find("nope").has_value());
    dcp::KeyInfo info = ck.key(*idx);
    CHECK(info.fqn == "model.t" && info.kind == DCP_KEY_TENSOR && info.dtype == DCP_FLOAT32);
    CHECK((info.shape == std::vector<int64_t>{3, 2}) && info.num_chunks == 1);
    dcp::ChunkInfo c = ck.chunk(*idx, 0);
    CHECK((c.offsets == std::vector<int64_t>{0, 0}) && (c.sizes == std::vector<int64_t>{3, 2}));
    float box[2] = {0, 0};
    ck.read_tensor("model.w", box, sizeof box, {1, 1}, {1, 2}); // row 1, columns 1..2
    CHECK(box[0] == w[4] && box[1] == w[5]);
    std::vector<float> whole(6);
    ck.read_tensor("model.w", whole.data(), whole.size() * sizeof(float));
    CHECK(whole == w);
    CHECK(ck.read_int("train.step") == 42 && ck.read_double("lr") == 1e-3);
    CHECK(ck.read_literal("betas") == "(0.9, 0.999)" && ck.read_bytes("blob") == std::string("a\0b", 3));
    CHECK(ck.keys().size() == 6);

    // Moves leave empty, destructible handles.
    dcp::Checkpoint ck2 = std::move(ck);
    CHECK(ck2.num_keys() == 6 && ck.get() == nullptr);
    dcp::State st2 = std::move(st);
    CHECK(st2.size() == 6 && st.get() == nullptr);
    // Move assignment frees what the target held and takes the source's handle.
    dcp::State st3;
    dcp_state *raw = st2.get();
    st3 = std::move(st2);
    CHECK(st3.get() == raw && st2.get() == nullptr && st3.size() == 6);
    dcp::Context ctx2 = dcp::Context::local();
    ctx2 = std::move(ctx);
    CHECK(ctx.get() == nullptr && ctx2.rank() == 0);
}

// Typed values (no literal parsing in C++), the storage option and the broadcast load option.
static void test_typed_values_and_options() {
    dcp::Context ctx = dcp::Context::local();
    ctx.set_storage_option("aws_region", "us-east-1");
    dcp::State st;
    st.add_literal("amsgrad", "True")
        .add_literal("betas", "(0.8, 0.95)")
        .add_literal("params", "['net1.weight', 'net1.bias']")
        .add_literal("empty", "[]")
        .add_int("step", 3);
    CHECK(st.get_bool("amsgrad") == true);
    CHECK((st.get_doubles("betas") == std::vector<double>{0.8, 0.95}));
    CHECK((st.get_strings("params") == std::vector<std::string>{"net1.weight", "net1.bias"}));
    CHECK(st.get_doubles("empty").empty() && st.get_strings("empty").empty());
    EXPECT_ERROR(DCP_ERROR_MISMATCH, "step", st.get_bool("step"));
    EXPECT_ERROR(DCP_ERROR_MISMATCH, "betas", st.get_strings("betas"));
    EXPECT_ERROR(DCP_ERROR_MISMATCH, "params", st.get_doubles("params"));
    dcp::save(ctx, st, dir + "/typed");

    dcp::State ld;
    for (const char *k : {"amsgrad", "betas", "params", "empty", "step"}) ld.add_literal(k, "None");
    dcp::load(ctx, ld, dir + "/typed", dcp::LoadOptions().set_broadcast(false));
    CHECK(ld.get_bool("amsgrad") && ld.get_doubles("betas") == (std::vector<double>{0.8, 0.95}));
    CHECK((ld.get_strings("params") == std::vector<std::string>{"net1.weight", "net1.bias"}));

    dcp::Checkpoint ck(dir + "/typed");
    CHECK(ck.value_kind("step") == DCP_VALUE_INT && ck.value_kind("params") == DCP_VALUE_PICKLE);
    CHECK(ck.read_bool("amsgrad") && ck.read_doubles("betas") == (std::vector<double>{0.8, 0.95}));
    CHECK((ck.read_strings("params") == std::vector<std::string>{"net1.weight", "net1.bias"}));
    EXPECT_ERROR(DCP_ERROR_MISMATCH, "amsgrad", ck.read_doubles("amsgrad"));

    // An unknown storage option fails at the next save, naming the key.
    dcp::Context bad = dcp::Context::local();
    bad.set_storage_option("no_such_option", "1");
    EXPECT_ERROR(DCP_ERROR_INVALID_ARGUMENT, "no_such_option", dcp::save(bad, st, "s3://bucket/x"));
}

static void test_errors() {
    dcp::Context ctx = dcp::Context::local();
    dcp::State st;
    EXPECT_ERROR(DCP_ERROR_NOT_FOUND, "", dcp::load(ctx, st, dir + "/does-not-exist"));
    float x = 0;
    EXPECT_ERROR(DCP_ERROR_INVALID_ARGUMENT, "", st.add_tensor("x", 99, {1}, &x, 4));
    EXPECT_ERROR(DCP_ERROR_INVALID_ARGUMENT, "", st.add_tensor("x", DCP_FLOAT32, {2}, &x, 4)); // buffer too small
    EXPECT_ERROR(DCP_ERROR_INVALID_ARGUMENT, "strides", st.add_tensor("x", DCP_FLOAT32, {1}, &x, 4, {1, 1}));
    EXPECT_ERROR(DCP_ERROR_NOT_FOUND, "", dcp::Checkpoint(dir + "/does-not-exist"));
    dcp::Future f;
    CHECK(!f.valid());
    EXPECT_ERROR(DCP_ERROR_NULL_ARGUMENT, "no async save", f.wait());
    bool thrown = false;
    try {
        dcp::load(ctx, st, dir + "/does-not-exist");
    } catch (const std::runtime_error &e) { // dcp::Error is a std::runtime_error
        thrown = true;
        CHECK(std::strlen(e.what()) > 0);
    }
    CHECK(thrown);
    CHECK(dcp::version() == dcp_version() && dcp::dtype_size(DCP_BFLOAT16) == 2 && dcp::dtype_size(DCP_COMPLEX128) == 16);
    CHECK(dcp::Shard(1) == DCP_SHARD(1) && dcp::StridedShard(0) == DCP_STRIDED_SHARD(0) && dcp::Replicate == DCP_REPLICATE);
}

/** Ranks as threads of one process: collectives through shared memory. */
struct Hub {
    explicit Hub(int n) : world(n), slots(static_cast<size_t>(n)) {}
    void barrier(std::chrono::milliseconds timeout) {
        std::unique_lock<std::mutex> lock(m);
        uint64_t gen = generation;
        if (++arrived == world) {
            arrived = 0;
            ++generation;
            cv.notify_all();
            return;
        }
        if (!cv.wait_for(lock, timeout, [&] { return generation != gen; })) throw std::runtime_error("hub barrier timed out");
    }
    int world;
    std::mutex m;
    std::condition_variable cv;
    int arrived = 0;
    uint64_t generation = 0;
    std::vector<std::vector<unsigned char>> slots;
};

class HubComm : public dcp::Communicator {
public:
    HubComm(Hub &hub, int rank, bool fail = false) : hub_(hub), rank_(rank), fail_(fail) {}
    int32_t rank() const override { return rank_; }
    int32_t world_size() const override { return hub_.world; }
    void allgather(const void *send, void *recv, size_t len, std::chrono::milliseconds timeout) override {
        if (fail_) throw std::runtime_error("boom: rank " + std::to_string(rank_) + " cannot all-gather");
        ++calls;
        auto &slot = hub_.slots[static_cast<size_t>(rank_)];
        slot.assign(static_cast<const unsigned char *>(send), static_cast<const unsigned char *>(send) + len);
        hub_.barrier(timeout);
        for (int r = 0; r < hub_.world; ++r)
            std::memcpy(static_cast<unsigned char *>(recv) + static_cast<size_t>(r) * len, hub_.slots[static_cast<size_t>(r)].data(), len);
        hub_.barrier(timeout);
    }
    void broadcast(void *buf, size_t len, int32_t root, std::chrono::milliseconds timeout) override {
        ++calls;
        if (rank_ == root) hub_.slots[0].assign(static_cast<unsigned char *>(buf), static_cast<unsigned char *>(buf) + len);
        hub_.barrier(timeout);
        if (rank_ != root) std::memcpy(buf, hub_.slots[0].data(), len);
        hub_.barrier(timeout);
    }
    std::atomic<int> calls{0};

private:
    Hub &hub_;
    int rank_;
    bool fail_;
};

static void test_communicator() {
    // Two ranks save the two row-halves of a 4 x 3 tensor (Shard(0) over a 1-D mesh), once
    // synchronously and once in the background; one process loads the whole tensor.
    std::vector<float> full(12);
    std::iota(full.begin(), full.end(), 0.5f);
    Hub hub(2);
    std::vector<std::string> errors(2);
    std::vector<int> calls(2);
    auto rank_main = [&](int rank) {
        try {
            auto comm = std::make_shared<HubComm>(hub, rank);
            dcp::Context ctx = dcp::Context::from_communicator(comm, std::chrono::seconds(30));
            CHECK(ctx.rank() == rank && ctx.world_size() == 2 && ctx.communicator() == comm);
            dcp::Mesh mesh(ctx, {2}, {}, {"dp"});
            CHECK(mesh.rank() == rank && (mesh.coordinates() == std::vector<int64_t>{rank}));
            std::vector<float> mine(full.begin() + rank * 6, full.begin() + rank * 6 + 6);
            dcp::State st;
            st.add_tensor_sharded("w", DCP_FLOAT32, {2, 3}, mine.data(), mine.size() * 4, {4, 3}, mesh, {dcp::Shard(0)});
            st.add_int("step", 7);
            dcp::save(ctx, st, dir + "/hub-sync");
            dcp::Future fut = dcp::save_async(ctx, st, dir + "/hub-async");
            std::fill(mine.begin(), mine.end(), -1.0f); // staged: the checkpoint keeps the old values
            fut.wait();
            CHECK(fut.done());
            // Zero-stall options with host tensors: nothing is left to order after the call.
            dcp::Future z = dcp::save_async(ctx, st, dir + "/hub-zero-stall",
                                            dcp::SaveOptions().set_stream_ordered(true).set_device_snapshot(1 << 20));
            z.stream_wait(nullptr);
            z.wait_staged();
            dcp_staging_report r = z.staging_report();
            CHECK(r.copied_bytes == mine.size() * 4 && r.stream_ordered_bytes == 0 && r.device_snapshot_bytes == 0);
            z.wait();
            CHECK(ctx.device_snapshot_bytes() == 0);
            ctx.release_device_snapshots();
            ctx.barrier();
            calls[static_cast<size_t>(rank)] = comm->calls;
        } catch (const std::exception &e) {
            errors[static_cast<size_t>(rank)] = e.what();
        }
    };
    std::thread t1(rank_main, 1);
    rank_main(0);
    t1.join();
    CHECK(errors[0].empty() && errors[1].empty());
    if (!errors[0].empty() || !errors[1].empty()) std::fprintf(stderr, "rank errors: %s | %s\n", errors[0].c_str(), errors[1].c_str());
    CHECK(calls[0] > 0 && calls[1] > 0);
    for (const char *name : {"/hub-sync", "/hub-async"}) {
        dcp::Context ctx = dcp::Context::local();
        std::vector<float> got(12, 0);
        dcp::State st;
        st.add_tensor("w", DCP_FLOAT32, {4, 3}, got.data(), got.size() * 4).add_int("step", 0);
        dcp::load(ctx, st, dir + name);
        CHECK(got == full && st.get_int("step") == 7);
        CHECK(dcp::Checkpoint(dir + name).key(0).num_chunks == 2 || dcp::Checkpoint(dir + name).key(1).num_chunks == 2);
    }

    // A failing host collective: the error names the communicator's message on both ranks.
    Hub hub2(2);
    std::vector<std::string> msgs(2);
    std::vector<dcp_status> sts(2, DCP_OK);
    auto failing = [&](int rank) {
        auto comm = std::make_shared<HubComm>(hub2, rank, /*fail=*/rank == 1);
        dcp::Context ctx = dcp::Context::from_communicator(comm, std::chrono::milliseconds(2000));
        float x = 1;
        dcp::State st;
        st.add_tensor("x" + std::to_string(rank), DCP_FLOAT32, {1}, &x, 4);
        try {
            dcp::save(ctx, st, dir + "/hub-fail");
        } catch (const dcp::Error &e) {
            sts[static_cast<size_t>(rank)] = e.status();
            msgs[static_cast<size_t>(rank)] = e.what();
        }
    };
    std::thread t2(failing, 1);
    failing(0);
    t2.join();
    CHECK(sts[1] == DCP_ERROR_COMM && msgs[1].find("boom: rank 1") != std::string::npos);
    CHECK(sts[0] != DCP_OK); // rank 0's collective times out waiting for rank 1
    std::printf("  failing collective: rank 1: %s\n  rank 0: %s\n", msgs[1].c_str(), msgs[0].c_str());
}

int main(int argc, char **argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: test_dcp_hpp SCRATCH_DIR\n");
        return 2;
    }
    dir = argv[1];
    try {
        test_round_trip();
        test_typed_values_and_options();
        test_errors();
        test_communicator();
    } catch (const std::exception &e) {
        std::fprintf(stderr, "unexpected exception: %s\n", e.what());
        return 1;
    }
    std::printf("test_dcp_hpp: %d checks, %d failed\n", checks.load(), failures.load());
    return failures ? 1 : 0;
}
