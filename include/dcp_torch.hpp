/*
 * libdcp for LibTorch: checkpoints of at::Tensor, torch::nn::Module and torch::optim::Adam /
 * AdamW / SGD under the keys Python torch uses (torch.distributed.checkpoint.state_dict's
 * get_state_dict naming), so the same checkpoint opens in Python and in C++.
 *
 *   dcp::Checkpointer ckpt(dcp::Context::local());     // or dcp::context_from_process_group(pg)
 *   ckpt.add_module(*model).add_optimizer(optimizer, *model);
 *   ckpt.save("/ckpt/step-100");                      // or save_async(...) / load(...)
 *
 * Zero-stall saves of CUDA state: the copy overlaps the next forward and backward passes.
 *   auto f = ckpt.save_async(dir, dcp::SaveOptions().set_stream_ordered(true)
 *                                     .set_device_snapshot(budget_bytes));  // snapshot optional
 *   ... forward, backward ...
 *   dcp::stream_wait_current(f, device);   // before optimizer.step(): a GPU-side wait
 *
 * Keys (for a module with a parameter "net1.weight" and Adam):
 *   model.net1.weight                                  parameters and buffers, in place
 *   optimizer.state.net1.weight.step                   0-d float32 tensor (Python's type)
 *   optimizer.state.net1.weight.exp_avg / exp_avg_sq / max_exp_avg_sq (amsgrad)
 *   optimizer.state.net1.weight.momentum_buffer        SGD with momentum
 *   optimizer.param_groups.0.lr, .betas, .eps, ...     Python values; .params lists the fqns
 * Loading writes tensors in place, then applies the scalars (lr, betas, step counts...).
 * Optimizer state that LibTorch creates lazily (at the first step) is created before a load,
 * so a fresh optimizer can be loaded into.
 *
 * Header-only; needs LibTorch (C++17, or C++20 for torch >= 2.15) and libdcp (-ldcp). CUDA
 * tensors are supported without CUDA headers: the current stream is found through c10's
 * device-guard registry, which exists only when LibTorch's CUDA library is loaded.
 */
#ifndef DCP_TORCH_HPP
#define DCP_TORCH_HPP

#include "dcp.hpp"

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/nn/module.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/sgd.h>

#include <charconv>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

namespace dcp {

// ------------------------------------------------------------------------------------------------
// dtypes
// ------------------------------------------------------------------------------------------------

/** The dcp_dtype of a torch scalar type; throws DCP_ERROR_UNSUPPORTED for others (e.g. qint8). */
inline int32_t dtype_of(at::ScalarType t) {
    switch (t) {
    case at::kFloat: return DCP_FLOAT32;
    case at::kDouble: return DCP_FLOAT64;
    case at::kHalf: return DCP_FLOAT16;
    case at::kBFloat16: return DCP_BFLOAT16;
    case at::kFloat8_e4m3fn: return DCP_FLOAT8_E4M3FN;
    case at::kFloat8_e5m2: return DCP_FLOAT8_E5M2;
    case at::kLong: return DCP_INT64;
    case at::kInt: return DCP_INT32;
    case at::kShort: return DCP_INT16;
    case at::kChar: return DCP_INT8;
    case at::kByte: return DCP_UINT8;
    case at::kBool: return DCP_BOOL;
    case at::kComplexFloat: return DCP_COMPLEX64;
    case at::kComplexDouble: return DCP_COMPLEX128;
    case at::kUInt16: return DCP_UINT16;
    case at::kUInt32: return DCP_UINT32;
    case at::kUInt64: return DCP_UINT64;
    default:
        throw Error(DCP_ERROR_UNSUPPORTED, std::string("torch dtype ") + c10::toString(t) + " has no dcp_dtype");
    }
}

/** The torch scalar type of a dcp_dtype. */
inline at::ScalarType scalar_type_of(int32_t dtype) {
    switch (dtype) {
    case DCP_FLOAT32: return at::kFloat;
    case DCP_FLOAT64: return at::kDouble;
    case DCP_FLOAT16: return at::kHalf;
    case DCP_BFLOAT16: return at::kBFloat16;
    case DCP_FLOAT8_E4M3FN: return at::kFloat8_e4m3fn;
    case DCP_FLOAT8_E5M2: return at::kFloat8_e5m2;
    case DCP_INT64: return at::kLong;
    case DCP_INT32: return at::kInt;
    case DCP_INT16: return at::kShort;
    case DCP_INT8: return at::kChar;
    case DCP_UINT8: return at::kByte;
    case DCP_BOOL: return at::kBool;
    case DCP_COMPLEX64: return at::kComplexFloat;
    case DCP_COMPLEX128: return at::kComplexDouble;
    case DCP_UINT16: return at::kUInt16;
    case DCP_UINT32: return at::kUInt32;
    case DCP_UINT64: return at::kUInt64;
    default: throw Error(DCP_ERROR_INVALID_ARGUMENT, "unknown dcp_dtype " + std::to_string(dtype));
    }
}

// ------------------------------------------------------------------------------------------------
// Registering one at::Tensor with a dcp::State. The tensor's memory is borrowed: keep the
// tensor alive until the state is freed (dcp::Checkpointer does that for you).
// ------------------------------------------------------------------------------------------------

namespace detail {

struct TensorDesc {
    int32_t dtype;
    std::vector<int64_t> sizes, strides;
    void *data;
    uint64_t nbytes; // from the first element to the furthest one
};

inline TensorDesc describe(const std::string &fqn, const at::Tensor &t) {
    if (!t.defined()) throw Error(DCP_ERROR_INVALID_ARGUMENT, "tensor \"" + fqn + "\" is undefined");
    if (t.layout() != at::kStrided)
        throw Error(DCP_ERROR_UNSUPPORTED, "tensor \"" + fqn + "\" is not strided (sparse or mkldnn layouts are not supported)");
    if (!t.device().is_cpu() && !t.device().is_cuda())
        throw Error(DCP_ERROR_UNSUPPORTED, "tensor \"" + fqn + "\" is on " + t.device().str() + " (CPU and CUDA are supported)");
    if (t.is_neg() || t.is_conj())
        throw Error(DCP_ERROR_UNSUPPORTED, "tensor \"" + fqn + "\" has a lazy negation or conjugation bit: call resolve_neg()/resolve_conj() first");
    TensorDesc d;
    d.dtype = dtype_of(t.scalar_type());
    d.sizes = t.sizes().vec();
    d.strides = t.strides().vec();
    uint64_t extent = 0;
    if (t.numel() > 0) {
        int64_t last = 0;
        for (size_t i = 0; i < d.sizes.size(); ++i) {
            if (d.strides[i] < 0) throw Error(DCP_ERROR_UNSUPPORTED, "tensor \"" + fqn + "\" has a negative stride");
            last += (d.sizes[i] - 1) * d.strides[i];
        }
        extent = static_cast<uint64_t>(last + 1) * t.element_size();
    }
    d.nbytes = extent;
    d.data = t.numel() > 0 ? t.data_ptr() : nullptr;
    return d;
}

/** The native handle (cudaStream_t) of the current stream of a CUDA device, without CUDA headers. */
inline void *current_stream(const at::Device &device) {
    if (!c10::impl::hasDeviceGuardImpl(device.type()))
        throw Error(DCP_ERROR_UNSUPPORTED, "no " + c10::DeviceTypeName(device.type()) + " support in this LibTorch");
    const auto *impl = c10::impl::getDeviceGuardImpl(device.type());
    return impl->getStreamNativeHandle(impl->getStream(device));
}

inline void mark_device(State &st, const std::string &fqn, const at::Tensor &t) {
    if (t.is_cuda()) st.set_cuda(fqn, t.device().index(), current_stream(t.device()));
}

} // namespace detail

/** For a stream-ordered async save: makes LibTorch's current stream of `device` wait on the GPU
    for the staging copies that read the saved tensors. Call it before changing them (before
    optimizer.step()) and before waiting on the future; a CPU device waits on the CPU instead
    (Future::wait_staged). See dcp_future_stream_wait. */
inline void stream_wait_current(const Future &f, const at::Device &device) {
    if (device.is_cuda())
        f.stream_wait(detail::current_stream(device));
    else
        f.wait_staged();
}

/** Registers a whole tensor (CPU or CUDA, any dtype and strides) under `fqn`. */
inline void add_tensor(State &st, const std::string &fqn, const at::Tensor &t) {
    auto d = detail::describe(fqn, t);
    st.add_tensor(fqn, d.dtype, d.sizes, d.data, d.nbytes, d.strides);
    detail::mark_device(st, fqn, t);
}

/** Registers `t` as the box at `offsets` of a global tensor of `global_shape`. */
inline void add_tensor_chunk(State &st, const std::string &fqn, const at::Tensor &t, const std::vector<int64_t> &global_shape,
                             const std::vector<int64_t> &offsets) {
    auto d = detail::describe(fqn, t);
    st.add_tensor_chunk(fqn, d.dtype, d.sizes, d.data, d.nbytes, global_shape, offsets, d.strides);
    detail::mark_device(st, fqn, t);
}

/** Registers `t` as this rank's shard of a tensor of `global_shape` over `mesh` by `placements`. */
inline void add_tensor_sharded(State &st, const std::string &fqn, const at::Tensor &t, const std::vector<int64_t> &global_shape,
                               const Mesh &mesh, const std::vector<int32_t> &placements) {
    auto d = detail::describe(fqn, t);
    st.add_tensor_sharded(fqn, d.dtype, d.sizes, d.data, d.nbytes, global_shape, mesh, placements, d.strides);
    detail::mark_device(st, fqn, t);
}

// ------------------------------------------------------------------------------------------------
// Layouts: where a rank's tensor sits in the global tensor.
// ------------------------------------------------------------------------------------------------

/** Where a registered tensor sits. Copyable (meshes are shared). */
struct Layout {
    enum class Kind {
        Whole,       ///< the full value; ranks registering the same key hold replicas (written once)
        Chunk,       ///< the box at `offsets` of `global_shape`
        Sharded,     ///< this rank's shard of `global_shape` over `mesh` by `placements`
        ShardedSave, ///< the full value on every rank (replicated compute); a save writes this
                     ///< rank's torch.chunk piece along `dim` over the 1-D `mesh` (FSDP-style
                     ///< files, each byte written once); a load reads the whole value
    };
    Kind kind = Kind::Whole;
    std::vector<int64_t> global_shape, offsets;
    std::shared_ptr<const Mesh> mesh;
    std::vector<int32_t> placements;
    int64_t dim = 0;

    static Layout whole() { return Layout(); }
    static Layout chunk(std::vector<int64_t> global_shape, std::vector<int64_t> offsets) {
        Layout l;
        l.kind = Kind::Chunk;
        l.global_shape = std::move(global_shape);
        l.offsets = std::move(offsets);
        return l;
    }
    static Layout sharded(std::shared_ptr<const Mesh> mesh, std::vector<int32_t> placements, std::vector<int64_t> global_shape) {
        Layout l;
        l.kind = Kind::Sharded;
        l.mesh = std::move(mesh);
        l.placements = std::move(placements);
        l.global_shape = std::move(global_shape);
        return l;
    }
    static Layout sharded_save(std::shared_ptr<const Mesh> mesh, int64_t dim = 0) {
        Layout l;
        l.kind = Kind::ShardedSave;
        l.mesh = std::move(mesh);
        l.dim = dim;
        return l;
    }
};

/** Picks the layout of each tensor of a module (and of its optimizer state): called with the
    parameter's or buffer's name in the module ("net1.weight") and the tensor. */
using LayoutFn = std::function<Layout(const std::string &name, const at::Tensor &t)>;

/** Replicated compute, sharded files: every tensor with more than `dim` dimensions is saved as
    this rank's torch.chunk piece along `dim` over the 1-D `mesh`; smaller ones whole. */
inline LayoutFn shard_saves(std::shared_ptr<const Mesh> mesh, int64_t dim = 0) {
    if (!mesh || mesh->ndim() != 1) throw Error(DCP_ERROR_INVALID_ARGUMENT, "shard_saves needs a 1-D mesh");
    return [mesh, dim](const std::string &, const at::Tensor &t) {
        return t.dim() > dim ? Layout::sharded_save(mesh, dim) : Layout::whole();
    };
}

namespace detail {

enum class Mode { Save, Load };

/** This rank's torch.chunk piece {start, length} of a dimension of `n` over `parts` ranks. */
inline std::pair<int64_t, int64_t> chunk_box(int64_t n, int64_t parts, int64_t index) {
    int64_t c = parts > 0 ? (n + parts - 1) / parts : n;
    int64_t start = std::min(index * c, n);
    return {start, std::min(c, n - start)};
}

/** Registers `t` with `layout` for a save or a load; returns the tensor whose memory is used. */
inline at::Tensor register_tensor(State &st, const std::string &fqn, const at::Tensor &t, const Layout &layout, Mode mode) {
    switch (layout.kind) {
    case Layout::Kind::Whole:
        add_tensor(st, fqn, t);
        return t;
    case Layout::Kind::Chunk:
        add_tensor_chunk(st, fqn, t, layout.global_shape, layout.offsets);
        return t;
    case Layout::Kind::Sharded:
        if (!layout.mesh) throw Error(DCP_ERROR_NULL_ARGUMENT, "layout of \"" + fqn + "\" has no mesh");
        add_tensor_sharded(st, fqn, t, layout.global_shape, *layout.mesh, layout.placements);
        return t;
    case Layout::Kind::ShardedSave: {
        if (mode == Mode::Load || t.dim() <= layout.dim) {
            add_tensor(st, fqn, t);
            return t;
        }
        if (!layout.mesh || layout.mesh->ndim() != 1)
            throw Error(DCP_ERROR_INVALID_ARGUMENT, "sharded_save layout of \"" + fqn + "\" needs a 1-D mesh");
        const Mesh &mesh = *layout.mesh;
        std::vector<int64_t> coords = mesh.coordinates();
        if (coords.empty())
            throw Error(DCP_ERROR_INVALID_ARGUMENT, "rank " + std::to_string(mesh.rank()) + " is not in the mesh of \"" + fqn + "\"");
        auto [start, len] = chunk_box(t.size(layout.dim), mesh.shape()[0], coords[0]);
        at::Tensor piece = t.narrow(layout.dim, start, len);
        add_tensor_sharded(st, fqn, piece, t.sizes().vec(), mesh, {Shard(static_cast<int32_t>(layout.dim))});
        return piece;
    }
    }
    throw Error(DCP_ERROR_INTERNAL, "unknown layout kind");
}

/** Python literal text of a float (shortest round trip; always reads back as a float). */
inline std::string py_float(double v) {
    if (!std::isfinite(v)) throw Error(DCP_ERROR_INVALID_ARGUMENT, "a non-finite float cannot be written as a Python literal");
    char buf[64];
    auto r = std::to_chars(buf, buf + sizeof buf, v);
    std::string out(buf, r.ptr);
    if (out.find_first_of(".e") == std::string::npos) out += ".0";
    return out;
}

inline std::string py_bool(bool b) { return b ? "True" : "False"; }

inline std::string py_str_list(const std::vector<std::string> &items) {
    std::string out = "[";
    for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += ", ";
        out += '\'';
        for (char c : items[i]) {
            if (c == '\\' || c == '\'') out += '\\';
            out += c;
        }
        out += '\'';
    }
    return out + "]";
}

/** "model." -> {"model"}; "" -> {}; "a.b." -> {"a", "b"}. */
inline std::vector<std::string> prefix_parts(const std::string &prefix) {
    std::vector<std::string> parts;
    std::string cur;
    for (char c : prefix) {
        if (c == '.') {
            if (!cur.empty()) parts.push_back(cur);
            cur.clear();
        } else {
            cur += c;
        }
    }
    if (!cur.empty()) parts.push_back(cur);
    return parts;
}

inline std::string normalize_prefix(std::string prefix) {
    if (!prefix.empty() && prefix.back() != '.') prefix += '.';
    return prefix;
}

/** Everything one save or load registers, and what to do once a load returns. */
struct Built {
    State state;
    Mode mode = Mode::Save;
    std::vector<at::Tensor> keep;    ///< registered memory (views and temporaries) kept alive
    std::vector<std::string> keys;   ///< registration order
    std::set<std::string> optional;  ///< keys a load may miss (torch-version-dependent extras)
    struct Created {                 ///< optimizer state made for a load: kept only if loaded
        std::vector<std::string> keys;
        std::function<void()> undo;
    };
    std::vector<Created> created;
    std::vector<std::function<void(const State &)>> validate; ///< after a load, before apply
    std::vector<std::function<void(const State &)>> apply;    ///< after a load

    void tensor(const std::string &fqn, const at::Tensor &t, const Layout &layout, std::vector<std::string> path = {},
                std::vector<bool> is_index = {}) {
        keep.push_back(register_tensor(state, fqn, t, layout, mode));
        keep.push_back(t);
        if (!path.empty()) state.set_path(fqn, path, is_index);
        keys.push_back(fqn);
    }
    void path(const std::string &fqn, const std::vector<std::string> &parts, const std::vector<bool> &is_index = {}) {
        if (!parts.empty()) state.set_path(fqn, parts, is_index);
        keys.push_back(fqn);
    }
};

inline std::vector<std::string> concat(std::vector<std::string> a, std::initializer_list<std::string> b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
}

/** One hyper-parameter of an optimizer's param group: its value for a save and how a load applies it. */
struct Hyper {
    std::string name;
    bool literal;          ///< a Python literal (tuple, bool, None, list) rather than a float
    std::string text;      ///< the literal, for a save
    double number = 0;     ///< the float, for a save
    bool optional = false; ///< absent in checkpoints of some torch versions
    std::function<void(const State &, const std::string &fqn)> check; ///< may throw; before any apply
    std::function<void(const State &, const std::string &fqn)> apply;
};

inline Hyper hyper_double(std::string name, double v, std::function<void(double)> set) {
    Hyper h{std::move(name), false, "", v, false, nullptr, nullptr};
    h.apply = [set](const State &st, const std::string &fqn) { set(st.get_double(fqn)); };
    return h;
}

/** A value LibTorch has no use for (foreach, fused, ...): saved as Python's default, not checked. */
inline Hyper hyper_ignored(std::string name, std::string text) {
    return Hyper{std::move(name), true, std::move(text), 0, true, nullptr, nullptr};
}

/** A bool LibTorch cannot change: a load checks the checkpoint holds `want`. */
inline Hyper hyper_fixed_bool(std::string name, bool want, bool optional, std::string why) {
    Hyper h{name, true, py_bool(want), 0, optional, nullptr, nullptr};
    h.check = [want, why](const State &st, const std::string &fqn) {
        if (st.get_bool(fqn) != want)
            throw Error(DCP_ERROR_MISMATCH, "\"" + fqn + "\" is " + py_bool(!want) + " in the checkpoint: " + why);
    };
    return h;
}

} // namespace detail

// ------------------------------------------------------------------------------------------------
// Checkpointer: modules, optimizers, tensors and values, saved and loaded together.
// ------------------------------------------------------------------------------------------------

/**
 * Saves and loads registered tensors, modules, optimizers and values through one context.
 * Registration keeps references (to modules, optimizers and value pointers, which must outlive
 * the checkpointer) and reads their current tensors at every save and load, so parameters
 * replaced by `module->to(device)` or optimizer state created by a step are picked up.
 * save / save_async / load are collective: every rank of the context calls them in the same
 * order. Not thread-safe.
 */
class Checkpointer {
public:
    explicit Checkpointer(Context ctx) : ctx_(std::move(ctx)) {}
    Checkpointer(Checkpointer &&) = default;
    Checkpointer &operator=(Checkpointer &&) = default;

    Context &context() noexcept { return ctx_; }
    int32_t rank() const { return ctx_.rank(); }
    int32_t world_size() const { return ctx_.world_size(); }

    /** A tensor under `fqn` (CPU or CUDA, any dtype and strides; loaded in place). `path`: its
        nesting for torch (default: `fqn` split on '.'). The tensor is kept (shares storage). */
    Checkpointer &add_tensor(const std::string &fqn, const at::Tensor &t, Layout layout = Layout::whole(),
                             std::vector<std::string> path = {}) {
        at::Tensor keep = t.detach();
        registrars_.push_back([fqn, keep, layout, path](detail::Built &b) { b.tensor(fqn, keep, layout, path); });
        return *this;
    }

    /** A module's parameters and buffers, as `prefix` + their name ("model.net1.weight"), like
        Python's model.state_dict() under get_state_dict. `layout` (default: whole) picks each
        tensor's layout by name; the module's optimizer state uses the same. */
    Checkpointer &add_module(torch::nn::Module &module, const std::string &prefix = "model.", LayoutFn layout = nullptr) {
        std::string pre = detail::normalize_prefix(prefix);
        torch::nn::Module *m = &module;
        module_layouts_.emplace_back(m, layout);
        registrars_.push_back([m, pre, layout](detail::Built &b) {
            auto parts = detail::prefix_parts(pre);
            auto one = [&](const std::string &name, const at::Tensor &t) {
                if (!t.defined()) return;
                at::Tensor d = t.detach();
                b.tensor(pre + name, d, layout ? layout(name, d) : Layout::whole(), detail::concat(parts, {name}));
            };
            for (const auto &kv : m->named_parameters(/*recurse=*/true)) one(kv.key(), kv.value());
            for (const auto &kv : m->named_buffers(/*recurse=*/true)) one(kv.key(), kv.value());
        });
        return *this;
    }
    template <class M> Checkpointer &add_module(torch::nn::ModuleHolder<M> &module, const std::string &prefix = "model.", LayoutFn layout = nullptr) {
        return add_module(*module, prefix, std::move(layout));
    }

    /**
     * An optimizer's state and param groups under `prefix` ("optimizer."), keyed by the fqns of
     * its parameters in `module` (every parameter must be one of the module's), exactly as
     * Python's get_state_dict(model, optim) names them. Supported: torch::optim::Adam, AdamW,
     * SGD. `layout`: the layout of the per-parameter state (default: the one given to
     * add_module for this module, else whole); step counts are saved whole.
     */
    Checkpointer &add_optimizer(torch::optim::Optimizer &optimizer, torch::nn::Module &module,
                                const std::string &prefix = "optimizer.", LayoutFn layout = nullptr) {
        using torch::optim::Optimizer;
        void (*reg)(detail::Built &, Optimizer &, torch::nn::Module &, const std::string &, const LayoutFn &);
        if (dynamic_cast<torch::optim::AdamW *>(&optimizer))
            reg = [](detail::Built &b, Optimizer &o, torch::nn::Module &m, const std::string &pre, const LayoutFn &layout) {
                register_adam<torch::optim::AdamWParamState, torch::optim::AdamWOptions>(b, o, m, pre, layout, true);
            };
        else if (dynamic_cast<torch::optim::Adam *>(&optimizer))
            reg = [](detail::Built &b, Optimizer &o, torch::nn::Module &m, const std::string &pre, const LayoutFn &layout) {
                register_adam<torch::optim::AdamParamState, torch::optim::AdamOptions>(b, o, m, pre, layout, false);
            };
        else if (dynamic_cast<torch::optim::SGD *>(&optimizer))
            reg = [](detail::Built &b, Optimizer &o, torch::nn::Module &m, const std::string &pre, const LayoutFn &layout) {
                register_sgd(b, static_cast<torch::optim::SGD &>(o), m, pre, layout);
            };
        else
            throw Error(DCP_ERROR_UNSUPPORTED, "add_optimizer: only torch::optim::Adam, AdamW and SGD are supported");
        if (!layout)
            for (const auto &ml : module_layouts_)
                if (ml.first == &module) layout = ml.second;
        std::string pre = detail::normalize_prefix(prefix);
        torch::optim::Optimizer *opt = &optimizer;
        torch::nn::Module *m = &module;
        registrars_.push_back([reg, opt, m, pre, layout](detail::Built &b) { reg(b, *opt, *m, pre, layout); });
        return *this;
    }
    template <class M> Checkpointer &add_optimizer(torch::optim::Optimizer &optimizer, torch::nn::ModuleHolder<M> &module,
                                                   const std::string &prefix = "optimizer.", LayoutFn layout = nullptr) {
        return add_optimizer(optimizer, *module, prefix, std::move(layout));
    }

    /** A value read from `*value` at each save and written to it after a load (Python int). */
    Checkpointer &add_value(const std::string &fqn, int64_t *value) {
        registrars_.push_back([fqn, value](detail::Built &b) {
            b.state.add_int(fqn, b.mode == detail::Mode::Save ? *value : 0);
            b.path(fqn, {});
            b.apply.push_back([fqn, value](const State &st) { if (st.loaded(fqn)) *value = st.get_int(fqn); });
        });
        return *this;
    }
    /** A Python float. */
    Checkpointer &add_value(const std::string &fqn, double *value) {
        registrars_.push_back([fqn, value](detail::Built &b) {
            b.state.add_double(fqn, b.mode == detail::Mode::Save ? *value : 0.0);
            b.path(fqn, {});
            b.apply.push_back([fqn, value](const State &st) { if (st.loaded(fqn)) *value = st.get_double(fqn); });
        });
        return *this;
    }
    /** Python bytes. */
    Checkpointer &add_value(const std::string &fqn, std::string *value) {
        registrars_.push_back([fqn, value](detail::Built &b) {
            b.state.add_bytes(fqn, b.mode == detail::Mode::Save ? *value : std::string());
            b.path(fqn, {});
            b.apply.push_back([fqn, value](const State &st) { if (st.loaded(fqn)) *value = st.get_bytes(fqn); });
        });
        return *this;
    }
    /** A Python bool. */
    Checkpointer &add_value(const std::string &fqn, bool *value) {
        registrars_.push_back([fqn, value](detail::Built &b) {
            b.state.add_literal(fqn, b.mode == detail::Mode::Save ? detail::py_bool(*value) : "None");
            b.path(fqn, {});
            b.apply.push_back([fqn, value](const State &st) {
                if (st.loaded(fqn)) *value = st.get_bool(fqn);
            });
        });
        return *this;
    }

    /** Collective: saves everything registered to the checkpoint directory `path`. */
    void save(const std::string &path, const SaveOptions &opts = SaveOptions()) {
        auto b = build(detail::Mode::Save);
        dcp::save(ctx_, b->state, path, opts);
    }

    /** Collective: returns once this rank's state is staged (the tensors may then change);
        writing and committing go on in the background. Wait on the future before relying on
        the checkpoint. */
    Future save_async(const std::string &path, const SaveOptions &opts = SaveOptions()) {
        auto b = build(detail::Mode::Save);
        return dcp::save_async(ctx_, b->state, path, opts, b);
    }

    /**
     * Collective: loads `path` into everything registered: tensors in place (resharded from
     * whatever layout was saved), then scalars (lr, betas, step counts, values). Strict by
     * default: every registered key must be in the checkpoint, except the param-group entries
     * that some torch versions lack (foreach, fused, capturable, differentiable, maximize,
     * decoupled_weight_decay) and the state of parameters that had none in the saved optimizer.
     */
    void load(const std::string &path, const LoadOptions &opts = LoadOptions()) {
        auto b = build(detail::Mode::Load);
        dcp::load(ctx_, b->state, path, partial(opts));
        apply_loaded(*b, path, opts);
    }

    /** Collective: saves everything registered as step `step` of `manager`'s series (retention
        runs once it is committed). */
    void save(Manager &manager, uint64_t step) {
        auto b = build(detail::Mode::Save);
        manager.save(step, b->state);
    }

    /** Collective: save_async as step `step` of `manager`'s series. */
    Future save_async(Manager &manager, uint64_t step) {
        auto b = build(detail::Mode::Save);
        return manager.save_async(step, b->state, b);
    }

    /** Collective: resumes from the newest whole step of `manager`'s series (damaged and
        unfinished newer steps are skipped: manager.skipped() says which and why), as load()
        does; returns the step, or nullopt when there is none (nothing is changed). */
    std::optional<uint64_t> load_latest(Manager &manager, const LoadOptions &opts = LoadOptions()) {
        auto b = build(detail::Mode::Load);
        auto step = manager.load_latest(b->state, partial(opts));
        if (!step) {
            for (auto &c : b->created) c.undo();
            return step;
        }
        apply_loaded(*b, "step " + std::to_string(*step), opts);
        return step;
    }

    /** Keys the last load did not find (non-strict loads). */
    const std::vector<std::string> &missing_keys() const noexcept { return missing_; }

    /** The keys a save writes from this rank, in registration order. */
    std::vector<std::string> keys() { return build(detail::Mode::Save)->keys; }

private:
    static LoadOptions partial(LoadOptions opts) {
        opts.strict = false; // strictness is decided in apply_loaded, with the exceptions above
        return opts;
    }

    /** After a partial load of `b`: state created for the load and not found is undone, strict
        loads fail on missing keys, then scalars are validated and applied. */
    void apply_loaded(detail::Built &b, const std::string &what, const LoadOptions &opts) {
        auto missing_list = b.state.missing_keys();
        std::set<std::string> missing(missing_list.begin(), missing_list.end());
        for (auto &c : b.created) {
            size_t n = 0;
            for (const auto &k : c.keys) n += missing.count(k);
            if (n == c.keys.size()) {
                c.undo();
                for (const auto &k : c.keys) missing.erase(k);
            }
        }
        for (const auto &k : b.optional) missing.erase(k);
        missing_.clear();
        for (const auto &k : b.keys)
            if (missing.count(k)) missing_.push_back(k);
        if (opts.strict && !missing_.empty()) {
            std::string msg = "checkpoint " + what + " lacks " + std::to_string(missing_.size()) + " registered key(s):";
            for (size_t i = 0; i < missing_.size() && i < 10; ++i) msg += " " + missing_[i];
            if (missing_.size() > 10) msg += " ...";
            throw Error(DCP_ERROR_NOT_FOUND, msg);
        }
        for (auto &f : b.validate) f(b.state);
        for (auto &f : b.apply) f(b.state);
    }

    std::shared_ptr<detail::Built> build(detail::Mode mode) {
        at::NoGradGuard no_grad;
        auto b = std::make_shared<detail::Built>();
        b->mode = mode;
        for (auto &r : registrars_) r(*b);
        return b;
    }

    static std::unordered_map<const void *, std::string> param_names(torch::nn::Module &m) {
        std::unordered_map<const void *, std::string> names;
        for (const auto &kv : m.named_parameters(/*recurse=*/true))
            names.emplace(kv.value().unsafeGetTensorImpl(), kv.key());
        return names;
    }

    /** The fqn of parameter `p` of param group `gi` in the module (`names`: param_names). */
    static const std::string &param_fqn(const std::unordered_map<const void *, std::string> &names, const at::Tensor &p, size_t gi) {
        auto it = names.find(p.unsafeGetTensorImpl());
        if (it == names.end())
            throw Error(DCP_ERROR_INVALID_ARGUMENT, "add_optimizer: a parameter of param group " + std::to_string(gi) + " (shape " +
                                                        c10::str(p.sizes()) + ") is not a parameter of the module");
        return it->second;
    }

    /**
     * The optimizer's state of parameter `p`, or NULL. On a load, missing state is created (as
     * `init` sets it up) and `created` receives how to remove it again; otherwise `created` is
     * left empty.
     */
    template <class PS, class Init>
    static PS *state_for(torch::optim::Optimizer &opt, const at::Tensor &p, bool load, Init init, std::function<void()> &created) {
        auto *states = &opt.state();
        void *key = p.unsafeGetTensorImpl();
        auto it = states->find(key);
        PS *ps = it == states->end() ? nullptr : static_cast<PS *>(it->second.get());
        if (!ps && load) {
            auto s = std::make_unique<PS>();
            init(*s);
            ps = s.get();
            (*states)[key] = std::move(s);
            created = [states, key] { states->erase(key); };
        }
        return ps;
    }

    template <class ParamState, class Options>
    static void register_adam(detail::Built &b, torch::optim::Optimizer &opt, torch::nn::Module &m, const std::string &pre,
                              const LayoutFn &layout, bool decoupled) {
        using detail::concat;
        const auto names = param_names(m);
        const auto parts = detail::prefix_parts(pre);
        const bool load = b.mode == detail::Mode::Load;
        auto &groups = opt.param_groups();
        for (size_t gi = 0; gi < groups.size(); ++gi) {
            auto &options = static_cast<Options &>(groups[gi].options());
            std::vector<std::string> fqns;
            for (auto &p : groups[gi].params()) {
                const std::string &name = param_fqn(names, p, gi);
                fqns.push_back(name);
                const std::string base = pre + "state." + name + ".";
                auto path = [&](const char *leaf) { return concat(parts, {"state", name, leaf}); };
                at::Tensor param = p.detach();
                Layout lay = layout ? layout(name, param) : Layout::whole();

                std::function<void()> created;
                ParamState *ps = state_for<ParamState>(
                    opt, p, load,
                    [&](ParamState &s) {
                        s.step(0);
                        s.exp_avg(at::zeros_like(param, at::MemoryFormat::Preserve));
                        s.exp_avg_sq(at::zeros_like(param, at::MemoryFormat::Preserve));
                        if (options.amsgrad()) s.max_exp_avg_sq(at::zeros_like(param, at::MemoryFormat::Preserve));
                    },
                    created);
                if (ps && options.amsgrad() && !ps->max_exp_avg_sq().defined())
                    ps->max_exp_avg_sq(at::zeros_like(param, at::MemoryFormat::Preserve));
                // Python keeps `step` as a 0-d float32 tensor; LibTorch as an int64.
                at::Tensor step = at::scalar_tensor(ps ? static_cast<double>(ps->step()) : 0.0, at::kFloat);
                b.tensor(base + "step", step, Layout::whole(), path("step"));
                std::vector<std::string> keys{base + "step"};
                auto slot = [&](const char *leaf, const at::Tensor &t) {
                    at::Tensor v = t.defined() ? t : at::zeros_like(param, at::MemoryFormat::Contiguous);
                    b.tensor(base + leaf, v, lay, path(leaf));
                    keys.push_back(base + leaf);
                };
                slot("exp_avg", ps ? ps->exp_avg() : at::Tensor());
                slot("exp_avg_sq", ps ? ps->exp_avg_sq() : at::Tensor());
                if (options.amsgrad()) slot("max_exp_avg_sq", ps ? ps->max_exp_avg_sq() : at::Tensor());
                if (created) b.created.push_back({keys, created});
                if (load) {
                    std::string fqn = base + "step";
                    b.apply.push_back([ps, step, fqn](const State &st) {
                        if (st.loaded(fqn)) ps->step(static_cast<int64_t>(std::llround(step.item<double>())));
                    });
                }
            }
            Options *o = &options;
            const char *cls = decoupled ? "torch::optim::AdamW" : "torch::optim::Adam";
            std::vector<detail::Hyper> hs;
            hs.push_back(detail::hyper_double("lr", o->lr(), [o](double v) { o->lr(v); }));
            {
                detail::Hyper h{"betas", true,
                                "(" + detail::py_float(std::get<0>(o->betas())) + ", " + detail::py_float(std::get<1>(o->betas())) + ")",
                                0, false, nullptr, nullptr};
                h.check = [](const State &st, const std::string &fqn) {
                    if (st.get_doubles(fqn).size() != 2)
                        throw Error(DCP_ERROR_MISMATCH, "\"" + fqn + "\" holds " + st.get_literal(fqn) +
                                                            " where a pair (beta1, beta2) was expected");
                };
                h.apply = [o](const State &st, const std::string &fqn) {
                    auto v = st.get_doubles(fqn);
                    o->betas(std::make_tuple(v[0], v[1]));
                };
                hs.push_back(std::move(h));
            }
            hs.push_back(detail::hyper_double("eps", o->eps(), [o](double v) { o->eps(v); }));
            hs.push_back(detail::hyper_double("weight_decay", o->weight_decay(), [o](double v) { o->weight_decay(v); }));
            hs.push_back(detail::hyper_fixed_bool("amsgrad", o->amsgrad(), false,
                                                  std::string("construct the ") + cls + " with amsgrad(" + detail::py_bool(!o->amsgrad()) +
                                                      ") to load it (the state differs)"));
            hs.push_back(detail::hyper_fixed_bool("maximize", false, true, std::string(cls) + " cannot maximize"));
            hs.push_back(detail::hyper_ignored("foreach", "None"));
            hs.push_back(detail::hyper_ignored("capturable", "False"));
            hs.push_back(detail::hyper_ignored("differentiable", "False"));
            hs.push_back(detail::hyper_ignored("fused", "None"));
            hs.push_back(detail::hyper_fixed_bool("decoupled_weight_decay", decoupled, true,
                                                  std::string("the checkpoint's optimizer is ") +
                                                      (decoupled ? "Adam (coupled weight decay)" : "AdamW (decoupled weight decay)") +
                                                      ", this one " + cls));
            register_group(b, pre, parts, gi, fqns, std::move(hs));
        }
    }

    static void register_sgd(detail::Built &b, torch::optim::SGD &opt, torch::nn::Module &m, const std::string &pre,
                             const LayoutFn &layout) {
        using detail::concat;
        const auto names = param_names(m);
        const auto parts = detail::prefix_parts(pre);
        const bool load = b.mode == detail::Mode::Load;
        auto &groups = opt.param_groups();
        for (size_t gi = 0; gi < groups.size(); ++gi) {
            auto &options = static_cast<torch::optim::SGDOptions &>(groups[gi].options());
            std::vector<std::string> fqns;
            for (auto &p : groups[gi].params()) {
                const std::string &name = param_fqn(names, p, gi);
                fqns.push_back(name);
                if (options.momentum() == 0) continue; // no state, as in Python
                at::Tensor param = p.detach();
                std::function<void()> created;
                auto *ps = state_for<torch::optim::SGDParamState>(
                    opt, p, load,
                    [&](torch::optim::SGDParamState &s) { s.momentum_buffer(at::zeros_like(param, at::MemoryFormat::Preserve)); },
                    created);
                if (ps && !ps->momentum_buffer().defined()) ps->momentum_buffer(at::zeros_like(param, at::MemoryFormat::Preserve));
                at::Tensor buf = ps ? ps->momentum_buffer() : at::zeros_like(param, at::MemoryFormat::Contiguous);
                const std::string fqn = pre + "state." + name + ".momentum_buffer";
                b.tensor(fqn, buf, layout ? layout(name, param) : Layout::whole(), concat(parts, {"state", name, "momentum_buffer"}));
                if (created) b.created.push_back({{fqn}, created});
            }
            auto *o = &options;
            std::vector<detail::Hyper> hs;
            hs.push_back(detail::hyper_double("lr", o->lr(), [o](double v) { o->lr(v); }));
            {
                detail::Hyper h = detail::hyper_double("momentum", o->momentum(), [o](double v) { o->momentum(v); });
                bool has = o->momentum() != 0;
                h.check = [has](const State &st, const std::string &fqn) {
                    if ((st.get_double(fqn) != 0) != has)
                        throw Error(DCP_ERROR_MISMATCH, "\"" + fqn + "\" is " + detail::py_float(st.get_double(fqn)) +
                                                            " in the checkpoint: construct the torch::optim::SGD with" +
                                                            (has ? "out momentum" : " momentum") + " to load it (the state differs)");
                };
                hs.push_back(std::move(h));
            }
            hs.push_back(detail::hyper_double("dampening", o->dampening(), [o](double v) { o->dampening(v); }));
            hs.push_back(detail::hyper_double("weight_decay", o->weight_decay(), [o](double v) { o->weight_decay(v); }));
            {
                detail::Hyper h{"nesterov", true, detail::py_bool(o->nesterov()), 0, false, nullptr, nullptr};
                h.check = [](const State &st, const std::string &fqn) { st.get_bool(fqn); };
                h.apply = [o](const State &st, const std::string &fqn) { o->nesterov(st.get_bool(fqn)); };
                hs.push_back(std::move(h));
            }
            hs.push_back(detail::hyper_fixed_bool("maximize", false, true, "torch::optim::SGD cannot maximize"));
            hs.push_back(detail::hyper_ignored("foreach", "None"));
            hs.push_back(detail::hyper_ignored("differentiable", "False"));
            hs.push_back(detail::hyper_ignored("fused", "None"));
            register_group(b, pre, parts, gi, fqns, std::move(hs));
        }
    }

    /** param_groups.<gi>.<name> for each hyper-parameter, then .params (the group's fqns). */
    static void register_group(detail::Built &b, const std::string &pre, const std::vector<std::string> &parts, size_t gi,
                               const std::vector<std::string> &fqns, std::vector<detail::Hyper> hs) {
        const bool load = b.mode == detail::Mode::Load;
        const std::string g = std::to_string(gi);
        std::vector<bool> is_index(parts.size(), false);
        is_index.insert(is_index.end(), {false, true, false});
        for (auto &h : hs) {
            const std::string fqn = pre + "param_groups." + g + "." + h.name;
            if (h.literal)
                b.state.add_literal(fqn, load ? std::string("None") : h.text);
            else
                b.state.add_double(fqn, load ? 0.0 : h.number);
            b.path(fqn, detail::concat(parts, {"param_groups", g, h.name}), is_index);
            if (h.optional) b.optional.insert(fqn);
            if (!load) continue;
            if (h.check) {
                auto check = h.check;
                b.validate.push_back([check, fqn](const State &st) { if (st.loaded(fqn)) check(st, fqn); });
            }
            if (h.apply) {
                auto apply = h.apply;
                b.apply.push_back([apply, fqn](const State &st) { if (st.loaded(fqn)) apply(st, fqn); });
            }
        }
        const std::string fqn = pre + "param_groups." + g + ".params";
        b.state.add_literal(fqn, load ? std::string("None") : detail::py_str_list(fqns));
        b.path(fqn, detail::concat(parts, {"param_groups", g, "params"}), is_index);
        if (load)
            b.validate.push_back([fqns, fqn](const State &st) {
                if (!st.loaded(fqn)) return;
                auto saved = st.get_strings(fqn);
                if (std::set<std::string>(saved.begin(), saved.end()) != std::set<std::string>(fqns.begin(), fqns.end()))
                    throw Error(DCP_ERROR_MISMATCH, "\"" + fqn + "\" is " + st.get_literal(fqn) +
                                                        " in the checkpoint, but this optimizer's group holds " +
                                                        detail::py_str_list(fqns));
            });
    }

    Context ctx_;
    std::vector<std::function<void(detail::Built &)>> registrars_;
    std::vector<std::pair<const torch::nn::Module *, LayoutFn>> module_layouts_;
    std::vector<std::string> missing_;
};

} // namespace dcp

#endif /* DCP_TORCH_HPP */
