/*
 * libdcp for C++: a header-only C++17 layer over the C API of include/dcp.h.
 *
 * - RAII handles: dcp::Context, dcp::State, dcp::Mesh, dcp::Future, dcp::Checkpoint (move-only;
 *   the destructor frees the C object; all built on detail::Handle).
 * - Every function of dcp.h has a counterpart here (tests/header.rs checks it). dcp::SaveOptions and dcp::LoadOptions are plain values.
 * - Errors are exceptions: every failing call throws dcp::Error (a std::runtime_error) whose
 *   what() is the library's message (key, file, offset) and whose status() is the dcp_status.
 * - dcp::Communicator: derive from it to plug the host's collectives (a c10d ProcessGroup, MPI)
 *   into a context; include/dcp_c10d.hpp does it for c10d.
 *
 * Nothing here needs LibTorch (include/dcp_torch.hpp adds at::Tensor, torch::nn::Module and
 * torch::optim support). Link with -ldcp.
 *
 *   dcp::Context ctx = dcp::Context::local();
 *   dcp::State st;
 *   st.add_tensor("model.w", DCP_FLOAT32, {16, 8}, weights.data(), weights.size() * 4);
 *   st.add_int("train.step", 100);
 *   dcp::save(ctx, st, "/ckpt/step-100");
 *   dcp::load(ctx, st, "/ckpt/step-100");   // into the registered buffers, in place
 *   int64_t step = st.get_int("train.step");
 */
#ifndef DCP_HPP
#define DCP_HPP

#include "dcp.h"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace dcp {

/** A failed libdcp call: what() is the library's message, status() the dcp_status. */
class Error : public std::runtime_error {
public:
    Error(dcp_status status, const std::string &message, std::string key = {}, std::string file = {},
          int64_t offset = -1)
        : std::runtime_error(message), status_(status), key_(std::move(key)), file_(std::move(file)),
          offset_(offset) {}
    dcp_status status() const noexcept { return status_; }
    /** The status's name, e.g. "DCP_ERROR_MISMATCH". */
    const char *status_name() const noexcept { return dcp_status_name(static_cast<int32_t>(status_)); }
    /** The key the failed call was working on ("" when not about one key). */
    const std::string &key() const noexcept { return key_; }
    /** The file it was reading or writing ("" when not about one file). */
    const std::string &file() const noexcept { return file_; }
    /** The byte offset in file() where the problem is, or -1 when not known. */
    int64_t offset() const noexcept { return offset_; }

private:
    dcp_status status_;
    std::string key_;
    std::string file_;
    int64_t offset_;
};

namespace detail {

inline std::string last_error_message(dcp_status s) {
    std::string msg = dcp_last_error();
    if (msg.empty()) msg = dcp_status_name(static_cast<int32_t>(s));
    return msg;
}

/** The thread's last libdcp error as a dcp::Error, with `message` as its text. */
inline Error last_error(dcp_status s, const std::string &message) {
    return Error(s, message, dcp_last_error_key(), dcp_last_error_file(), dcp_last_error_offset());
}

/** Throws dcp::Error with the thread's last libdcp message when `s` is not DCP_OK. */
inline void check(dcp_status s) {
    if (s != DCP_OK) throw last_error(s, last_error_message(s));
}

inline const int64_t *dims_or_null(const std::vector<int64_t> &v) { return v.empty() ? nullptr : v.data(); }

/**
 * A value copied out with a size query first: `copy(buf, cap, &len, &kind)` is a call of
 * dcp_state_get_bytes or dcp_checkpoint_read_bytes for one key.
 */
template <class F> std::string fetch_bytes(F copy, dcp_value_kind *kind) {
    size_t n = 0;
    int32_t k = 0;
    dcp_status s = copy(nullptr, 0, &n, &k);
    if (s != DCP_OK && s != DCP_ERROR_BUFFER_TOO_SMALL) check(s);
    std::string out(n, '\0');
    if (n) check(copy(&out[0], n, &n, &k));
    if (kind) *kind = static_cast<dcp_value_kind>(k);
    return out;
}

/** Like fetch_bytes for literal text: `copy(buf, cap, &len)` (dcp_*_literal; `cap` counts the NUL). */
template <class F> std::string fetch_literal(F copy) {
    size_t n = 0;
    dcp_status s = copy(nullptr, 0, &n);
    if (s != DCP_OK && s != DCP_ERROR_BUFFER_TOO_SMALL) check(s);
    std::string out(n + 1, '\0');
    check(copy(&out[0], out.size(), &n));
    out.resize(n);
    return out;
}

/** A list of numbers with a size query first: `copy(buf, cap, &len)` (dcp_*_doubles). */
template <class F> std::vector<double> fetch_doubles(F copy) {
    size_t n = 0;
    dcp_status s = copy(nullptr, 0, &n);
    if (s != DCP_OK && s != DCP_ERROR_BUFFER_TOO_SMALL) check(s);
    std::vector<double> out(n);
    if (n) check(copy(out.data(), n, &n));
    return out;
}

/** A list of strings with a size query first: `copy(buf, cap, &len, &count)` (dcp_*_strings,
    each string followed by a NUL). */
template <class F> std::vector<std::string> fetch_strings(F copy) {
    size_t n = 0, count = 0;
    dcp_status s = copy(nullptr, 0, &n, &count);
    if (s != DCP_OK && s != DCP_ERROR_BUFFER_TOO_SMALL) check(s);
    std::string packed(n, '\0');
    if (n) check(copy(&packed[0], n, &n, &count));
    std::vector<std::string> out;
    out.reserve(count);
    for (size_t at = 0; at < n;) {
        size_t end = packed.find('\0', at);
        out.push_back(packed.substr(at, end - at));
        at = end + 1;
    }
    return out;
}

/**
 * Owns one C object and frees it with `Free` (which accepts NULL): the move-only core of every
 * handle class here (Context, Mesh, State, Future, Checkpoint, the option handles), so that
 * their moves are the defaults.
 */
template <class T, void (*Free)(T *)> class Handle {
public:
    Handle() noexcept = default;
    explicit Handle(T *p) noexcept : p_(p) {}
    Handle(Handle &&o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
    /** Frees the object held before taking `o`'s. */
    Handle &operator=(Handle &&o) noexcept {
        if (this != &o) {
            reset();
            p_ = std::exchange(o.p_, nullptr);
        }
        return *this;
    }
    Handle(const Handle &) = delete;
    Handle &operator=(const Handle &) = delete;
    ~Handle() { reset(); }

    void reset() noexcept {
        if (p_) Free(p_);
        p_ = nullptr;
    }
    T *get() const noexcept { return p_; }
    /** For the C constructors' out-parameter: frees the current object first. */
    T **out() noexcept {
        reset();
        return &p_;
    }
    explicit operator bool() const noexcept { return p_ != nullptr; }

private:
    T *p_ = nullptr;
};

} // namespace detail

/** The library version, e.g. "0.1.0". */
inline std::string version() { return dcp_version(); }

/** Whether CUDA is usable in this process (a driver and a device). */
inline bool cuda_available() { return dcp_cuda_available(); }

/** A static name for a status value ("DCP_OK", "DCP_ERROR_IO", ...). */
inline const char *status_name(dcp_status s) { return dcp_status_name(static_cast<int32_t>(s)); }

/** Size in bytes of one element of a dcp_dtype (0 for unknown values). */
inline size_t dtype_size(int32_t dtype) {
    switch (dtype) {
    case DCP_FLOAT64: case DCP_INT64: case DCP_UINT64: case DCP_COMPLEX64: return 8;
    case DCP_COMPLEX128: return 16;
    case DCP_FLOAT32: case DCP_INT32: case DCP_UINT32: return 4;
    case DCP_FLOAT16: case DCP_BFLOAT16: case DCP_INT16: case DCP_UINT16: return 2;
    case DCP_FLOAT8_E4M3FN: case DCP_FLOAT8_E5M2: case DCP_INT8: case DCP_UINT8: case DCP_BOOL: return 1;
    default: return 0;
    }
}

// ------------------------------------------------------------------------------------------------
// Placements (one per mesh dimension) for State::add_tensor_sharded.
// ------------------------------------------------------------------------------------------------

/** Every rank along the mesh dimension holds the same data (written once). */
constexpr int32_t Replicate = DCP_REPLICATE;
/** Tensor dim `d` split over the mesh dimension like torch.chunk (uneven and empty shards allowed). */
constexpr int32_t Shard(int32_t d) { return d; }
/** Tensor dim `d` sharded after the plain shards of later mesh dims (torch's _StridedShard). */
constexpr int32_t StridedShard(int32_t d) { return -2 - d; }

// ------------------------------------------------------------------------------------------------
// Communicator: the host's collectives, for Context::from_communicator.
// ------------------------------------------------------------------------------------------------

/**
 * The host's own collectives. libdcp calls them from the thread that calls save/load, and for
 * an async save also from its background thread (to commit): an implementation must allow
 * that. Every method gets the call's timeout and should honour it (libdcp cannot interrupt a
 * host collective). Throw any std::exception on failure: the message is kept (error()) and
 * added to the dcp::Error that the failing save or load throws.
 */
class Communicator {
public:
    virtual ~Communicator() = default;
    virtual int32_t rank() const = 0;
    virtual int32_t world_size() const = 0;
    /** Every rank contributes `len` bytes of `send`; `recv` gets `world_size * len` bytes in rank order. */
    virtual void allgather(const void *send, void *recv, size_t len, std::chrono::milliseconds timeout) = 0;
    /** The `len` bytes of `buf` on rank `root` are copied into `buf` on every rank. */
    virtual void broadcast(void *buf, size_t len, int32_t root, std::chrono::milliseconds timeout) = 0;
    /** Returns when every rank has called it. The default is an all-gather of one byte. */
    virtual void barrier(std::chrono::milliseconds timeout) {
        unsigned char one = 0;
        std::vector<unsigned char> all(static_cast<size_t>(world_size()));
        allgather(&one, all.data(), 1, timeout);
    }

    /** The message of the last failed collective ("" if none). Thread-safe. */
    std::string error() const {
        std::lock_guard<std::mutex> lock(error_mutex_);
        return error_;
    }
    void clear_error() {
        std::lock_guard<std::mutex> lock(error_mutex_);
        error_.clear();
    }

    // Trampolines handed to dcp_context_new_callbacks; exceptions never cross into libdcp.
    static int32_t allgather_cb(void *self, const void *send, void *recv, size_t len, uint64_t timeout_ms) noexcept {
        auto *c = static_cast<Communicator *>(self);
        return c->guarded("allgather", [&] { c->allgather(send, recv, len, std::chrono::milliseconds(timeout_ms)); });
    }
    static int32_t broadcast_cb(void *self, void *buf, size_t len, int32_t root, uint64_t timeout_ms) noexcept {
        auto *c = static_cast<Communicator *>(self);
        return c->guarded("broadcast", [&] { c->broadcast(buf, len, root, std::chrono::milliseconds(timeout_ms)); });
    }
    static int32_t barrier_cb(void *self, uint64_t timeout_ms) noexcept {
        auto *c = static_cast<Communicator *>(self);
        return c->guarded("barrier", [&] { c->barrier(std::chrono::milliseconds(timeout_ms)); });
    }

private:
    template <class F> int32_t guarded(const char *what, F &&f) noexcept {
        try {
            f();
            return 0;
        } catch (const std::exception &e) {
            set_error(std::string(what) + ": " + e.what());
        } catch (...) {
            set_error(std::string(what) + ": unknown exception");
        }
        return 1;
    }
    void set_error(std::string msg) noexcept {
        try {
            std::lock_guard<std::mutex> lock(error_mutex_);
            error_ = std::move(msg);
        } catch (...) {
        }
    }

    mutable std::mutex error_mutex_;
    std::string error_;
};

namespace detail {
/**
 * Throws dcp::Error for the failed status `s`, adding the host communicator's message (if
 * any) to the thread's last libdcp message; `clear` then resets the communicator's message.
 */
[[noreturn]] inline void throw_status(dcp_status s, const std::shared_ptr<Communicator> &comm, bool clear) {
    std::string msg = last_error_message(s);
    if (comm) {
        std::string extra = comm->error();
        if (!extra.empty()) {
            msg += " (host communicator: " + extra + ")";
            if (clear) comm->clear_error();
        }
    }
    throw last_error(s, msg);
}
} // namespace detail

// ------------------------------------------------------------------------------------------------
// Context
// ------------------------------------------------------------------------------------------------

/** The job's communicator and caches: one per process (per job). Move-only. */
class Context {
public:
    /** One process, rank 0 of 1; no communication. */
    static Context local() {
        dcp_context *c = nullptr;
        detail::check(dcp_context_new_local(&c));
        return Context(c);
    }
    /** libdcp's built-in TCP rendezvous (collective: returns once all ranks are connected). */
    static Context tcp(int32_t rank, int32_t world_size, const std::string &master_addr, uint16_t port,
                       std::chrono::milliseconds timeout = std::chrono::minutes(10)) {
        dcp_context *c = nullptr;
        detail::check(dcp_context_new_tcp(rank, world_size, master_addr.c_str(), port, to_ms(timeout), &c));
        return Context(c);
    }
    /** torchrun's RANK / WORLD_SIZE / MASTER_ADDR and DCP_MASTER_PORT (else MASTER_PORT + 1); local without them. */
    static Context from_env(std::chrono::milliseconds timeout = std::chrono::minutes(10)) {
        dcp_context *c = nullptr;
        detail::check(dcp_context_new_from_env(to_ms(timeout), &c));
        return Context(c);
    }
    /** The host's collectives as C callbacks (see dcp_context_new_callbacks); `keep_alive`
        is held by the context (e.g. the object `user_data` points to). */
    static Context callbacks(int32_t rank, int32_t world_size, dcp_allgather_fn allgather, dcp_broadcast_fn broadcast,
                             dcp_barrier_fn barrier, void *user_data, std::chrono::milliseconds timeout,
                             std::shared_ptr<void> keep_alive = nullptr) {
        dcp_context *c = nullptr;
        detail::check(dcp_context_new_callbacks(rank, world_size, allgather, broadcast, barrier, user_data,
                                                to_ms(timeout), &c));
        Context ctx(c);
        ctx.keep_alive_ = std::move(keep_alive);
        return ctx;
    }
    /** The host's collectives as a dcp::Communicator, owned (shared) by the context. */
    static Context from_communicator(std::shared_ptr<Communicator> comm,
                                     std::chrono::milliseconds timeout = std::chrono::minutes(10)) {
        if (!comm) throw Error(DCP_ERROR_NULL_ARGUMENT, "Context::from_communicator: null communicator");
        dcp_context *c = nullptr;
        detail::check(dcp_context_new_callbacks(comm->rank(), comm->world_size(), &Communicator::allgather_cb,
                                                &Communicator::broadcast_cb, &Communicator::barrier_cb, comm.get(),
                                                to_ms(timeout), &c));
        Context ctx(c);
        ctx.comm_ = std::move(comm);
        return ctx;
    }

    // The handle is the first member, so a move assignment frees the old context before the
    // communicator it may still call is released.
    Context(Context &&) noexcept = default;
    Context &operator=(Context &&) noexcept = default;
    /** Waits for an async save in flight, then frees the context (before its communicator). */
    ~Context() { h_.reset(); }

    int32_t rank() const {
        int32_t r = 0;
        check(dcp_context_rank(get(), &r, nullptr));
        return r;
    }
    int32_t world_size() const {
        int32_t w = 0;
        check(dcp_context_rank(get(), nullptr, &w));
        return w;
    }
    /** Collective. */
    void barrier() { check(dcp_context_barrier(get())); }
    /** Limits the pinned host memory of the staging pool (bytes). */
    void set_staging_budget(uint64_t bytes) { check(dcp_context_set_staging_budget(get(), bytes)); }
    /** {pinned, ordinary} bytes the staging pool holds. */
    std::pair<uint64_t, uint64_t> staging_bytes() const {
        uint64_t p = 0, h = 0;
        check(dcp_context_staging_bytes(get(), &p, &h));
        return {p, h};
    }
    /** Device memory kept for snapshot saves (bytes). */
    uint64_t device_snapshot_bytes() const {
        uint64_t n = 0;
        check(dcp_context_device_snapshot_bytes(get(), &n));
        return n;
    }
    /** Frees the device memory kept for snapshot saves. */
    void release_device_snapshots() { check(dcp_context_release_device_snapshots(get())); }
    /** A storage option over the environment's, e.g. {"aws_endpoint", "http://127.0.0.1:8333"}
        for s3:// locations (see dcp_context_set_storage_option); unknown keys fail at the next
        save or load. */
    Context &set_storage_option(const std::string &key, const std::string &value) {
        check(dcp_context_set_storage_option(get(), key.c_str(), value.c_str()));
        return *this;
    }
    /** The communicator given to from_communicator (nullptr otherwise). */
    const std::shared_ptr<Communicator> &communicator() const noexcept { return comm_; }

    /** Like detail::check, adding the communicator's own message to communication failures. */
    void check(dcp_status s) const {
        if (s != DCP_OK) detail::throw_status(s, comm_, /*clear=*/true);
    }

    dcp_context *get() const noexcept { return h_.get(); }

private:
    explicit Context(dcp_context *h) : h_(h) {}
    static uint64_t to_ms(std::chrono::milliseconds t) { return t.count() < 0 ? 0 : static_cast<uint64_t>(t.count()); }

    detail::Handle<dcp_context, dcp_context_free> h_;
    std::shared_ptr<Communicator> comm_;
    std::shared_ptr<void> keep_alive_;
};

// ------------------------------------------------------------------------------------------------
// Mesh
// ------------------------------------------------------------------------------------------------

/** An n-D array of global ranks (row-major), bound to the context's rank. Move-only. */
class Mesh {
public:
    /** `ranks` empty: 0, 1, 2, ...; `dim_names` empty or one per dimension. Not collective. */
    Mesh(const Context &ctx, std::vector<int64_t> shape, std::vector<int32_t> ranks = {},
         std::vector<std::string> dim_names = {})
        : shape_(std::move(shape)), ranks_(std::move(ranks)), rank_(ctx.rank()) {
        std::vector<const char *> names;
        for (const auto &n : dim_names) names.push_back(n.c_str());
        if (!dim_names.empty() && dim_names.size() != shape_.size())
            throw Error(DCP_ERROR_INVALID_ARGUMENT, "Mesh: " + std::to_string(dim_names.size()) +
                                                        " dim names for a mesh of " + std::to_string(shape_.size()) +
                                                        " dimensions");
        detail::check(dcp_mesh_new(ctx.get(), static_cast<int32_t>(shape_.size()), detail::dims_or_null(shape_),
                                   ranks_.empty() ? nullptr : ranks_.data(), names.empty() ? nullptr : names.data(),
                                   h_.out()));
        if (ranks_.empty()) {
            int64_t n = 1;
            for (int64_t s : shape_) n *= s;
            for (int64_t i = 0; i < n; ++i) ranks_.push_back(static_cast<int32_t>(i));
        }
    }

    size_t ndim() const noexcept { return shape_.size(); }
    const std::vector<int64_t> &shape() const noexcept { return shape_; }
    const std::vector<int32_t> &ranks() const noexcept { return ranks_; }
    /** The context's rank (which need not be in the mesh). */
    int32_t rank() const noexcept { return rank_; }
    /** This rank's coordinates in the mesh; empty if the rank is not in it. */
    std::vector<int64_t> coordinates() const {
        for (size_t i = 0; i < ranks_.size(); ++i) {
            if (ranks_[i] != rank_) continue;
            std::vector<int64_t> c(shape_.size());
            int64_t rest = static_cast<int64_t>(i);
            for (size_t d = shape_.size(); d-- > 0;) {
                c[d] = rest % shape_[d];
                rest /= shape_[d];
            }
            return c;
        }
        return {};
    }
    dcp_mesh *get() const noexcept { return h_.get(); }

private:
    detail::Handle<dcp_mesh, dcp_mesh_free> h_;
    std::vector<int64_t> shape_;
    std::vector<int32_t> ranks_;
    int32_t rank_ = 0;
};

// ------------------------------------------------------------------------------------------------
// State
// ------------------------------------------------------------------------------------------------

/**
 * What one rank registers: tensors (borrowed memory that must outlive the state) and values
 * (copied). Move-only; not thread-safe.
 */
class State {
public:
    State() { detail::check(dcp_state_new(h_.out())); }

    /** A whole tensor; `strides` in elements (empty: contiguous); `nbytes` covers every element. */
    State &add_tensor(const std::string &fqn, int32_t dtype, const std::vector<int64_t> &sizes, void *data,
                      uint64_t nbytes, const std::vector<int64_t> &strides = {}) {
        check_ndim(fqn, sizes, strides);
        detail::check(dcp_state_add_tensor(get(), fqn.c_str(), dtype, static_cast<int32_t>(sizes.size()),
                                           detail::dims_or_null(sizes), detail::dims_or_null(strides), data, nbytes));
        return *this;
    }
    /** One piece of a global tensor, at `offsets` of `global_shape`. */
    State &add_tensor_chunk(const std::string &fqn, int32_t dtype, const std::vector<int64_t> &sizes, void *data,
                            uint64_t nbytes, const std::vector<int64_t> &global_shape,
                            const std::vector<int64_t> &offsets, const std::vector<int64_t> &strides = {}) {
        check_ndim(fqn, sizes, strides);
        if (global_shape.size() != sizes.size() || offsets.size() != sizes.size())
            throw Error(DCP_ERROR_INVALID_ARGUMENT, "add_tensor_chunk \"" + fqn + "\": sizes, global_shape and offsets differ in length");
        detail::check(dcp_state_add_tensor_chunk(get(), fqn.c_str(), dtype, static_cast<int32_t>(sizes.size()),
                                                 detail::dims_or_null(sizes), detail::dims_or_null(strides), data,
                                                 nbytes, detail::dims_or_null(global_shape),
                                                 detail::dims_or_null(offsets)));
        return *this;
    }
    /** This rank's shard of a tensor of `global_shape` laid out over `mesh` by `placements`
        (one per mesh dimension: dcp::Replicate, dcp::Shard(d), dcp::StridedShard(d)). */
    State &add_tensor_sharded(const std::string &fqn, int32_t dtype, const std::vector<int64_t> &sizes, void *data,
                              uint64_t nbytes, const std::vector<int64_t> &global_shape, const Mesh &mesh,
                              const std::vector<int32_t> &placements, const std::vector<int64_t> &strides = {}) {
        check_ndim(fqn, sizes, strides);
        if (global_shape.size() != sizes.size())
            throw Error(DCP_ERROR_INVALID_ARGUMENT, "add_tensor_sharded \"" + fqn + "\": sizes and global_shape differ in length");
        if (placements.size() != mesh.ndim())
            throw Error(DCP_ERROR_INVALID_ARGUMENT, "add_tensor_sharded \"" + fqn + "\": " +
                                                        std::to_string(placements.size()) + " placements for a mesh of " +
                                                        std::to_string(mesh.ndim()) + " dimensions");
        detail::check(dcp_state_add_tensor_sharded(get(), fqn.c_str(), dtype, static_cast<int32_t>(sizes.size()),
                                                   detail::dims_or_null(sizes), detail::dims_or_null(strides), data,
                                                   nbytes, detail::dims_or_null(global_shape), mesh.get(),
                                                   placements.data()));
        return *this;
    }
    /** Marks `fqn`'s memory as CUDA memory of `device`; copies are queued on `stream` (a cudaStream_t; null: none). */
    State &set_cuda(const std::string &fqn, int32_t device, void *stream) {
        detail::check(dcp_state_set_cuda(get(), fqn.c_str(), device, stream));
        return *this;
    }
    State &add_bytes(const std::string &fqn, const void *data, size_t len) {
        detail::check(dcp_state_add_bytes(get(), fqn.c_str(), len ? data : nullptr, len));
        return *this;
    }
    State &add_bytes(const std::string &fqn, const std::string &data) { return add_bytes(fqn, data.data(), data.size()); }
    State &add_int(const std::string &fqn, int64_t v) {
        detail::check(dcp_state_add_int(get(), fqn.c_str(), v));
        return *this;
    }
    State &add_double(const std::string &fqn, double v) {
        detail::check(dcp_state_add_double(get(), fqn.c_str(), v));
        return *this;
    }
    /** A Python value in literal syntax: "(0.9, 0.999)", "None", "True", "['a', 'b']". */
    State &add_literal(const std::string &fqn, const std::string &literal) {
        detail::check(dcp_state_add_literal(get(), fqn.c_str(), literal.c_str()));
        return *this;
    }
    State &add_pickle(const std::string &fqn, const void *pickle, size_t len) {
        detail::check(dcp_state_add_pickle(get(), fqn.c_str(), pickle, len));
        return *this;
    }
    /** The key's path in the nested state dict (torch's planner_data), e.g.
        {"optimizer", "state", "net1.weight", "exp_avg"}; `is_index` marks list indices. */
    State &set_path(const std::string &fqn, const std::vector<std::string> &parts, const std::vector<bool> &is_index = {}) {
        if (!is_index.empty() && is_index.size() != parts.size())
            throw Error(DCP_ERROR_INVALID_ARGUMENT, "set_path \"" + fqn + "\": is_index and parts differ in length");
        std::vector<const char *> p;
        for (const auto &s : parts) p.push_back(s.c_str());
        std::vector<uint8_t> idx;
        for (bool b : is_index) idx.push_back(b ? 1 : 0);
        detail::check(dcp_state_set_path(get(), fqn.c_str(), p.size(), p.empty() ? nullptr : p.data(),
                                         idx.empty() ? nullptr : idx.data()));
        return *this;
    }

    /** The dcp_value_kind of a non-tensor entry. */
    dcp_value_kind value_kind(const std::string &fqn) const {
        int32_t k = 0;
        detail::check(dcp_state_value_kind(get(), fqn.c_str(), &k));
        return static_cast<dcp_value_kind>(k);
    }
    int64_t get_int(const std::string &fqn) const {
        int64_t v = 0;
        detail::check(dcp_state_get_int(get(), fqn.c_str(), &v));
        return v;
    }
    double get_double(const std::string &fqn) const {
        double v = 0;
        detail::check(dcp_state_get_double(get(), fqn.c_str(), &v));
        return v;
    }
    /** A Python bool (ints do not convert). */
    bool get_bool(const std::string &fqn) const {
        bool v = false;
        detail::check(dcp_state_get_bool(get(), fqn.c_str(), &v));
        return v;
    }
    /** A list or tuple of numbers, e.g. Adam's betas. */
    std::vector<double> get_doubles(const std::string &fqn) const {
        return detail::fetch_doubles(
            [&](double *buf, size_t cap, size_t *n) { return dcp_state_get_doubles(get(), fqn.c_str(), buf, cap, n); });
    }
    /** A list or tuple of strings, e.g. a param group's params. */
    std::vector<std::string> get_strings(const std::string &fqn) const {
        return detail::fetch_strings([&](char *buf, size_t cap, size_t *n, size_t *count) {
            return dcp_state_get_strings(get(), fqn.c_str(), buf, cap, n, count);
        });
    }
    /** Raw bytes of a bytes value; the pickle of any other value. */
    std::string get_bytes(const std::string &fqn, dcp_value_kind *kind = nullptr) const {
        return detail::fetch_bytes(
            [&](void *buf, size_t cap, size_t *n, int32_t *k) { return dcp_state_get_bytes(get(), fqn.c_str(), buf, cap, n, k); }, kind);
    }
    /** The value as Python literal text ("(0.9, 0.999)", "False", "None"). */
    std::string get_literal(const std::string &fqn) const {
        return detail::fetch_literal(
            [&](char *buf, size_t cap, size_t *n) { return dcp_state_get_literal(get(), fqn.c_str(), buf, cap, n); });
    }
    /** Whether the last load filled this entry. */
    bool loaded(const std::string &fqn) const {
        bool b = false;
        detail::check(dcp_state_loaded(get(), fqn.c_str(), &b));
        return b;
    }
    /** Registered keys the last (partial) load did not find. */
    std::vector<std::string> missing_keys() const {
        size_t n = 0;
        detail::check(dcp_state_num_missing(get(), &n));
        std::vector<std::string> out;
        for (size_t i = 0; i < n; ++i) {
            const char *k = nullptr;
            detail::check(dcp_state_missing_key(get(), i, &k));
            out.emplace_back(k);
        }
        return out;
    }
    /** Number of registered entries. */
    size_t size() const {
        size_t n = 0;
        detail::check(dcp_state_len(get(), &n));
        return n;
    }

    dcp_state *get() const noexcept { return h_.get(); }

private:
    static void check_ndim(const std::string &fqn, const std::vector<int64_t> &sizes, const std::vector<int64_t> &strides) {
        if (!strides.empty() && strides.size() != sizes.size())
            throw Error(DCP_ERROR_INVALID_ARGUMENT, "tensor \"" + fqn + "\": " + std::to_string(strides.size()) +
                                                        " strides for " + std::to_string(sizes.size()) + " dimensions");
    }
    detail::Handle<dcp_state, dcp_state_free> h_;
};

// ------------------------------------------------------------------------------------------------
// Options (plain values; a C handle is made for each call)
// ------------------------------------------------------------------------------------------------

namespace detail {
using SaveOptionsHandle = Handle<dcp_save_options, dcp_save_options_free>;
using LoadOptionsHandle = Handle<dcp_load_options, dcp_load_options_free>;
} // namespace detail

/** Options of save / save_async. Defaults: no overwrite, library's thread count, O_DIRECT, wait if busy. */
struct SaveOptions {
    bool overwrite = false;
    std::optional<uint32_t> threads;
    std::optional<bool> direct_io;
    bool wait_if_busy = true;
    /** See dcp_save_options_set_stream_ordered: call Future::stream_wait before changing the tensors. */
    bool stream_ordered = false;
    /** See dcp_save_options_set_device_snapshot (bytes per device; 0: no snapshot). */
    uint64_t device_snapshot_bytes = 0;

    SaveOptions &set_overwrite(bool v) { overwrite = v; return *this; }
    SaveOptions &set_stream_ordered(bool v) { stream_ordered = v; return *this; }
    SaveOptions &set_device_snapshot(uint64_t bytes) { device_snapshot_bytes = bytes; return *this; }
    SaveOptions &set_threads(uint32_t v) { threads = v; return *this; }
    SaveOptions &set_direct_io(bool v) { direct_io = v; return *this; }
    SaveOptions &set_wait_if_busy(bool v) { wait_if_busy = v; return *this; }

    detail::SaveOptionsHandle handle() const {
        detail::SaveOptionsHandle h;
        detail::check(dcp_save_options_new(h.out()));
        dcp_save_options *o = h.get();
        detail::check(dcp_save_options_set_overwrite(o, overwrite));
        if (threads) detail::check(dcp_save_options_set_threads(o, *threads));
        if (direct_io) detail::check(dcp_save_options_set_direct_io(o, *direct_io));
        detail::check(dcp_save_options_set_wait_if_busy(o, wait_if_busy));
        detail::check(dcp_save_options_set_stream_ordered(o, stream_ordered));
        detail::check(dcp_save_options_set_device_snapshot(o, device_snapshot_bytes));
        return h;
    }
};

/** Options of load. Defaults: strict, CRC-32 verified, library's thread count, direct I/O AUTO,
    replicated boxes read once and broadcast over NCCL where possible. */
struct LoadOptions {
    bool strict = true;
    bool verify = true;
    std::optional<uint32_t> threads;
    std::optional<dcp_direct_io> direct_io;
    /** See dcp_load_options_set_broadcast; unset: the library's default (on). */
    std::optional<bool> broadcast;

    LoadOptions &set_strict(bool v) { strict = v; return *this; }
    LoadOptions &set_verify(bool v) { verify = v; return *this; }
    LoadOptions &set_threads(uint32_t v) { threads = v; return *this; }
    LoadOptions &set_direct_io(dcp_direct_io v) { direct_io = v; return *this; }
    LoadOptions &set_broadcast(bool v) { broadcast = v; return *this; }

    detail::LoadOptionsHandle handle() const {
        detail::LoadOptionsHandle h;
        detail::check(dcp_load_options_new(h.out()));
        dcp_load_options *o = h.get();
        detail::check(dcp_load_options_set_strict(o, strict));
        detail::check(dcp_load_options_set_verify(o, verify));
        if (threads) detail::check(dcp_load_options_set_threads(o, *threads));
        if (direct_io) detail::check(dcp_load_options_set_direct_io(o, static_cast<int32_t>(*direct_io)));
        if (broadcast) detail::check(dcp_load_options_set_broadcast(o, *broadcast));
        return h;
    }
};

// ------------------------------------------------------------------------------------------------
// Save, load, async save
// ------------------------------------------------------------------------------------------------

/** An async save in flight. Destroying it does not cancel or wait for the save (the context
    waits before its next collective). Move-only. */
class Future {
public:
    Future() = default;
    explicit Future(dcp_future *h, std::shared_ptr<void> keep_alive = nullptr,
                    std::shared_ptr<Communicator> comm = nullptr)
        : h_(h), keep_alive_(std::move(keep_alive)), comm_(std::move(comm)) {}
    Future(Future &&) noexcept = default;
    Future &operator=(Future &&) noexcept = default;
    /** Frees the handle before releasing what it keeps alive. */
    ~Future() { h_.reset(); }

    bool valid() const noexcept { return static_cast<bool>(h_); }
    /** Blocks until the save has committed; throws dcp::Error if it failed. */
    void wait() const {
        require();
        dcp_status s = dcp_future_wait(get());
        if (s != DCP_OK) detail::throw_status(s, comm_, /*clear=*/false);
    }
    /** Makes CUDA stream `stream` (a cudaStream_t; nullptr: the legacy default stream) wait on
        the GPU for the staging copies reading the caller's tensors (stream-ordered saves: call
        it before changing them, and before wait()/done()). See dcp_future_stream_wait. */
    void stream_wait(void *stream) const {
        require();
        detail::check(dcp_future_stream_wait(get(), stream));
    }
    /** Blocks until the staging copies reading the caller's tensors are done. */
    void wait_staged() const {
        require();
        detail::check(dcp_future_wait_staged(get()));
    }
    /** How the save staged this rank's state. */
    dcp_staging_report staging_report() const {
        require();
        dcp_staging_report r{};
        detail::check(dcp_future_staging_report(get(), &r));
        return r;
    }
    /** Whether the save has completed (successfully or not). */
    bool done() const {
        require();
        bool d = false;
        detail::check(dcp_future_done(get(), &d));
        return d;
    }
    dcp_future *get() const noexcept { return h_.get(); }

private:
    void require() const {
        if (!h_) throw Error(DCP_ERROR_NULL_ARGUMENT, "dcp::Future: no async save (moved from or default)");
    }
    detail::Handle<dcp_future, dcp_future_free> h_;
    std::shared_ptr<void> keep_alive_;
    std::shared_ptr<Communicator> comm_;
};

/** Collective: every rank saves its registered state to the checkpoint directory `path`. */
inline void save(Context &ctx, const State &st, const std::string &path, const SaveOptions &opts = SaveOptions()) {
    auto o = opts.handle();
    ctx.check(dcp_save(ctx.get(), st.get(), path.c_str(), o.get()));
}

/** Collective: returns once this rank's state is staged; `keep_alive` is held by the future. */
inline Future save_async(Context &ctx, const State &st, const std::string &path,
                         const SaveOptions &opts = SaveOptions(), std::shared_ptr<void> keep_alive = nullptr) {
    auto o = opts.handle();
    dcp_future *f = nullptr;
    ctx.check(dcp_save_async(ctx.get(), st.get(), path.c_str(), o.get(), &f));
    return Future(f, std::move(keep_alive), ctx.communicator());
}

/** Collective: loads `path` into the registered state, in place, resharding as needed. */
inline void load(Context &ctx, State &st, const std::string &path, const LoadOptions &opts = LoadOptions()) {
    auto o = opts.handle();
    ctx.check(dcp_load(ctx.get(), st.get(), path.c_str(), o.get()));
}

// ------------------------------------------------------------------------------------------------
// Checkpoint manager: a series of checkpoints under one root
// ------------------------------------------------------------------------------------------------

/** Policy of a Manager (plain values). Defaults: saves when the caller asks (interval 0), keep
    the last 3, none kept forever, the cheap integrity check on resume, a 600 s claim. */
struct ManagerPolicy {
    uint64_t save_interval = 0;
    uint32_t keep_last = 3;
    uint64_t keep_every = 0;
    bool full_verify = false;
    uint64_t lease_seconds = 600;
    bool read_only = false;
    SaveOptions save_options;

    ManagerPolicy &set_save_interval(uint64_t v) { save_interval = v; return *this; }
    ManagerPolicy &set_keep_last(uint32_t v) { keep_last = v; return *this; }
    ManagerPolicy &set_keep_every(uint64_t v) { keep_every = v; return *this; }
    ManagerPolicy &set_full_verify(bool v) { full_verify = v; return *this; }
    ManagerPolicy &set_lease_seconds(uint64_t v) { lease_seconds = v; return *this; }
    ManagerPolicy &set_read_only(bool v) { read_only = v; return *this; }
    ManagerPolicy &set_save_options(const SaveOptions &v) { save_options = v; return *this; }
};

/** A step newer than the one resumed from, and why it was skipped. */
struct SkippedStep {
    uint64_t step;
    dcp_step_health health;
    std::string message;
};

/** dcp_manager: saves every N steps to ROOT/step-%08d, resumes from the newest whole step,
    keeps what the policy says (see dcp.h). The Context must outlive it. Move-only. */
class Manager {
public:
    /** Collective: opens (and, unless read-only, claims) the root. */
    Manager(Context &ctx, const std::string &root, const ManagerPolicy &policy = ManagerPolicy()) : ctx_(&ctx) {
        detail::Handle<dcp_manager_policy, dcp_manager_policy_free> p;
        detail::check(dcp_manager_policy_new(p.out()));
        detail::check(dcp_manager_policy_set_save_interval(p.get(), policy.save_interval));
        detail::check(dcp_manager_policy_set_keep_last(p.get(), policy.keep_last));
        detail::check(dcp_manager_policy_set_keep_every(p.get(), policy.keep_every));
        detail::check(dcp_manager_policy_set_full_verify(p.get(), policy.full_verify));
        detail::check(dcp_manager_policy_set_lease_seconds(p.get(), policy.lease_seconds));
        detail::check(dcp_manager_policy_set_read_only(p.get(), policy.read_only));
        auto o = policy.save_options.handle();
        detail::check(dcp_manager_policy_set_save_options(p.get(), o.get()));
        ctx.check(dcp_manager_open(ctx.get(), root.c_str(), p.get(), h_.out()));
    }
    Manager(Manager &&) noexcept = default;
    Manager &operator=(Manager &&) noexcept = default;

    bool should_save(uint64_t step) const {
        bool b = false;
        detail::check(dcp_manager_should_save(get(), step, &b));
        return b;
    }
    /** Collective: saves `st` as `step`, then applies retention. */
    void save(uint64_t step, const State &st) { ctx_->check(dcp_manager_save(get(), step, st.get())); }
    /** Collective: saves in the background; retention runs after it committed. */
    Future save_async(uint64_t step, const State &st, std::shared_ptr<void> keep_alive = nullptr) {
        dcp_future *f = nullptr;
        ctx_->check(dcp_manager_save_async(get(), step, st.get(), &f));
        return Future(f, std::move(keep_alive), ctx_->communicator());
    }
    /** Collective: waits for the async save in flight and applies retention. */
    void wait() { ctx_->check(dcp_manager_wait(get())); }
    /** Collective: the newest whole step (nullopt: none); skipped() lists the newer ones. */
    std::optional<uint64_t> latest() {
        int64_t step = -1;
        ctx_->check(dcp_manager_latest(get(), &step));
        return step < 0 ? std::nullopt : std::optional<uint64_t>(static_cast<uint64_t>(step));
    }
    /** Collective: loads the newest whole step into `st` (nullopt: none, `st` untouched). */
    std::optional<uint64_t> load_latest(State &st, const LoadOptions &opts = LoadOptions()) {
        int64_t step = -1;
        auto o = opts.handle();
        ctx_->check(dcp_manager_load_latest(get(), st.get(), o.get(), &step));
        return step < 0 ? std::nullopt : std::optional<uint64_t>(static_cast<uint64_t>(step));
    }
    /** The steps the last latest() / load_latest() skipped, newest first, with why. */
    std::vector<SkippedStep> skipped() const {
        size_t n = 0;
        detail::check(dcp_manager_skipped_count(get(), &n));
        std::vector<SkippedStep> out;
        for (size_t i = 0; i < n; ++i) {
            SkippedStep s{0, DCP_STEP_WHOLE, {}};
            const char *m = nullptr;
            detail::check(dcp_manager_skipped(get(), i, &s.step, &s.health, &m));
            s.message = m ? m : "";
            out.push_back(std::move(s));
        }
        return out;
    }
    /** Collective: applies retention now; returns how many steps were deleted. */
    size_t apply_retention() {
        size_t n = 0;
        ctx_->check(dcp_manager_apply_retention(get(), &n));
        return n;
    }
    /** Collective: waits, applies retention, gives the root up. */
    void finish() { ctx_->check(dcp_manager_finish(get())); }
    dcp_manager *get() const {
        if (!h_) throw Error(DCP_ERROR_NULL_ARGUMENT, "dcp::Manager: moved from");
        return h_.get();
    }

private:
    Context *ctx_;
    detail::Handle<dcp_manager, dcp_manager_free> h_;
};

// ------------------------------------------------------------------------------------------------
// Inspection
// ------------------------------------------------------------------------------------------------

/** One key of an open checkpoint. */
struct KeyInfo {
    std::string fqn;
    dcp_key_kind kind = DCP_KEY_TENSOR;
    int32_t dtype = 0; ///< a dcp_dtype; 0 for objects
    std::vector<int64_t> shape;
    size_t num_chunks = 0;
};

/** A saved chunk: its box in the global tensor. */
struct ChunkInfo {
    std::vector<int64_t> offsets;
    std::vector<int64_t> sizes;
};

/** A checkpoint opened read-only (no registration, no communication). Move-only. */
class Checkpoint {
public:
    explicit Checkpoint(const std::string &path) { detail::check(dcp_checkpoint_open(path.c_str(), h_.out())); }
    /// Opens with `ctx`'s storage options (an S3 endpoint or credentials set with
    /// `Context::set_storage_option`).
    Checkpoint(const Context &ctx, const std::string &path) {
        detail::check(dcp_checkpoint_open_with_context(ctx.get(), path.c_str(), h_.out()));
    }

    size_t num_keys() const {
        size_t n = 0;
        detail::check(dcp_checkpoint_num_keys(get(), &n));
        return n;
    }
    KeyInfo key(size_t index) const {
        dcp_key_info info{};
        detail::check(dcp_checkpoint_key(get(), index, &info));
        KeyInfo k;
        k.fqn = info.fqn;
        k.kind = static_cast<dcp_key_kind>(info.kind);
        k.dtype = info.dtype;
        k.shape.assign(info.shape, info.shape + info.ndim);
        k.num_chunks = info.num_chunks;
        return k;
    }
    std::vector<KeyInfo> keys() const {
        std::vector<KeyInfo> out;
        size_t n = num_keys();
        for (size_t i = 0; i < n; ++i) out.push_back(key(i));
        return out;
    }
    /** The key's index, or nullopt if the checkpoint lacks it. */
    std::optional<size_t> find(const std::string &fqn) const {
        size_t i = 0;
        dcp_status s = dcp_checkpoint_find(get(), fqn.c_str(), &i);
        if (s == DCP_ERROR_NOT_FOUND) return std::nullopt;
        detail::check(s);
        return i;
    }
    bool contains(const std::string &fqn) const { return find(fqn).has_value(); }
    ChunkInfo chunk(size_t key_index, size_t chunk_index) const {
        const int64_t *off = nullptr, *sz = nullptr;
        detail::check(dcp_checkpoint_chunk(get(), key_index, chunk_index, &off, &sz));
        size_t nd = key(key_index).shape.size();
        return ChunkInfo{std::vector<int64_t>(off, off + nd), std::vector<int64_t>(sz, sz + nd)};
    }
    /** Reads a box into `dst`, laid out with `strides` (elements; empty: contiguous). `sizes`
        empty: the whole tensor; `offsets` empty: the origin. */
    void read_tensor(const std::string &fqn, void *dst, uint64_t dst_nbytes, const std::vector<int64_t> &offsets = {},
                     const std::vector<int64_t> &sizes = {}, const std::vector<int64_t> &strides = {}) const {
        if (sizes.empty() && offsets.empty()) {
            auto i = find(fqn);
            if (!i) throw Error(DCP_ERROR_NOT_FOUND, "key \"" + fqn + "\" is not in the checkpoint");
            int32_t nd = static_cast<int32_t>(key(*i).shape.size());
            detail::check(dcp_checkpoint_read_tensor(get(), fqn.c_str(), nd, nullptr, nullptr, detail::dims_or_null(strides),
                                                     dst, dst_nbytes));
            return;
        }
        std::vector<int64_t> off = offsets.empty() ? std::vector<int64_t>(sizes.size(), 0) : offsets;
        if (sizes.size() != off.size())
            throw Error(DCP_ERROR_INVALID_ARGUMENT, "read_tensor \"" + fqn + "\": offsets and sizes differ in length");
        detail::check(dcp_checkpoint_read_tensor(get(), fqn.c_str(), static_cast<int32_t>(sizes.size()),
                                                 detail::dims_or_null(off), detail::dims_or_null(sizes),
                                                 detail::dims_or_null(strides), dst, dst_nbytes));
    }
    std::string read_bytes(const std::string &fqn, dcp_value_kind *kind = nullptr) const {
        return detail::fetch_bytes(
            [&](void *buf, size_t cap, size_t *n, int32_t *k) { return dcp_checkpoint_read_bytes(get(), fqn.c_str(), buf, cap, n, k); },
            kind);
    }
    /** The dcp_value_kind of a non-tensor value. */
    dcp_value_kind value_kind(const std::string &fqn) const {
        int32_t k = 0;
        detail::check(dcp_checkpoint_value_kind(get(), fqn.c_str(), &k));
        return static_cast<dcp_value_kind>(k);
    }
    bool read_bool(const std::string &fqn) const {
        bool v = false;
        detail::check(dcp_checkpoint_read_bool(get(), fqn.c_str(), &v));
        return v;
    }
    std::vector<double> read_doubles(const std::string &fqn) const {
        return detail::fetch_doubles(
            [&](double *buf, size_t cap, size_t *n) { return dcp_checkpoint_read_doubles(get(), fqn.c_str(), buf, cap, n); });
    }
    std::vector<std::string> read_strings(const std::string &fqn) const {
        return detail::fetch_strings([&](char *buf, size_t cap, size_t *n, size_t *count) {
            return dcp_checkpoint_read_strings(get(), fqn.c_str(), buf, cap, n, count);
        });
    }
    int64_t read_int(const std::string &fqn) const {
        int64_t v = 0;
        detail::check(dcp_checkpoint_read_int(get(), fqn.c_str(), &v));
        return v;
    }
    double read_double(const std::string &fqn) const {
        double v = 0;
        detail::check(dcp_checkpoint_read_double(get(), fqn.c_str(), &v));
        return v;
    }
    std::string read_literal(const std::string &fqn) const {
        return detail::fetch_literal(
            [&](char *buf, size_t cap, size_t *n) { return dcp_checkpoint_read_literal(get(), fqn.c_str(), buf, cap, n); });
    }

    dcp_checkpoint *get() const noexcept { return h_.get(); }

private:
    detail::Handle<dcp_checkpoint, dcp_checkpoint_free> h_;
};

} // namespace dcp

#endif /* DCP_HPP */
