/*
 * libdcp over a c10d process group: a dcp::Context whose collectives are those of a
 * c10d::ProcessGroup or c10d::Backend (gloo, NCCL, or any other), so a LibTorch job needs no
 * second rendezvous.
 *
 *   auto ctx = dcp::context_from_process_group(pg);             // collectives over pg
 *   dcp::Checkpointer ckpt(std::move(ctx));
 *
 * - Byte buffers travel as uint8 tensors on the group's device: CPU for gloo, the current CUDA
 *   device for NCCL (or the device given).
 * - Every collective is bounded by libdcp's timeout: it is set in the c10d options and
 *   passed to Work::wait, and a timeout or a failed Work becomes a dcp::Error naming it.
 * - Give libdcp a process group of its own (a second group over the same store, e.g. with a
 *   c10d::PrefixStore): an async save commits from a libdcp thread while the training loop
 *   keeps issuing its own collectives, and two threads issuing collectives on one group can
 *   pair them differently on different ranks.
 *
 * Needs LibTorch built with distributed support (the pip wheels are) but no gloo or NCCL
 * headers: only torch/csrc/distributed/c10d/ProcessGroup.hpp.
 */
#ifndef DCP_C10D_HPP
#define DCP_C10D_HPP

#include "dcp.hpp"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace dcp {

/**
 * A dcp::Communicator over a c10d::ProcessGroup or c10d::Backend (`PG`): fixed-size byte
 * all-gathers and broadcasts as uint8 tensors on `device`, and the group's barrier.
 */
template <class PG> class ProcessGroupCommunicator : public Communicator {
public:
    /** `device`: where the byte tensors live; default CPU, or the current CUDA device when the
        group's backend is NCCL. */
    explicit ProcessGroupCommunicator(c10::intrusive_ptr<PG> pg, std::optional<at::Device> device = std::nullopt)
        : pg_(std::move(pg)), device_(pick_device(pg_, device)) {}

    int32_t rank() const override { return static_cast<int32_t>(pg_->getRank()); }
    int32_t world_size() const override { return static_cast<int32_t>(pg_->getSize()); }
    const at::Device &device() const noexcept { return device_; }

    void allgather(const void *send, void *recv, size_t len, std::chrono::milliseconds timeout) override {
        if (len == 0) return;
        Scope scope(device_);
        const int64_t n = static_cast<int64_t>(len);
        std::vector<at::Tensor> in{to_device(send, len)};
        std::vector<std::vector<at::Tensor>> out(1);
        for (int32_t r = 0; r < world_size(); ++r) out[0].push_back(at::empty({n}, options()));
        c10d::AllgatherOptions opts;
        opts.timeout = timeout;
        wait(pg_->allgather(out, in, opts), timeout, "allgather");
        for (int32_t r = 0; r < world_size(); ++r) {
            at::Tensor host = out[0][r].to(at::kCPU).contiguous();
            std::memcpy(static_cast<char *>(recv) + static_cast<size_t>(r) * len, host.data_ptr(), len);
        }
    }

    void broadcast(void *buf, size_t len, int32_t root, std::chrono::milliseconds timeout) override {
        if (len == 0) return;
        Scope scope(device_);
        std::vector<at::Tensor> t{to_device(buf, len)};
        c10d::BroadcastOptions opts;
        opts.rootRank = root;
        opts.rootTensor = 0;
        opts.timeout = timeout;
        wait(pg_->broadcast(t, opts), timeout, "broadcast");
        at::Tensor host = t[0].to(at::kCPU).contiguous();
        std::memcpy(buf, host.data_ptr(), len);
    }

    void barrier(std::chrono::milliseconds timeout) override {
        if (!device_.is_cpu()) {
            // NCCL's barrier guesses a device per rank; an all-gather of one byte is exact.
            Communicator::barrier(timeout);
            return;
        }
        Scope scope(device_);
        c10d::BarrierOptions opts;
        opts.timeout = timeout;
        wait(pg_->barrier(opts), timeout, "barrier");
    }

    const c10::intrusive_ptr<PG> &process_group() const noexcept { return pg_; }

private:
    /** No autograd, and the group's CUDA device current (libdcp may call from its own thread). */
    struct Scope {
        explicit Scope(const at::Device &d) {
            if (!d.is_cpu()) guard.emplace(d);
        }
        at::NoGradGuard no_grad;
        std::optional<c10::DeviceGuard> guard;
    };

    static at::Device pick_device(const c10::intrusive_ptr<PG> &pg, const std::optional<at::Device> &device) {
        if (!pg) throw Error(DCP_ERROR_NULL_ARGUMENT, "ProcessGroupCommunicator: null process group");
        if (device) return *device;
        if (pg->getBackendName() == "nccl") {
            if (!c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA))
                throw Error(DCP_ERROR_UNSUPPORTED, "an NCCL process group without CUDA support in LibTorch");
            return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getDevice();
        }
        return at::Device(at::kCPU);
    }

    at::TensorOptions options() const { return at::TensorOptions().dtype(at::kByte).device(device_); }

    at::Tensor to_device(const void *data, size_t len) const {
        at::Tensor host = at::empty({static_cast<int64_t>(len)}, at::TensorOptions().dtype(at::kByte));
        std::memcpy(host.data_ptr(), data, len);
        return device_.is_cpu() ? host : host.to(device_);
    }

    static void wait(const c10::intrusive_ptr<c10d::Work> &work, std::chrono::milliseconds timeout, const char *what) {
        if (!work) throw std::runtime_error(std::string("c10d ") + what + " returned no work");
        if (!work->wait(timeout))
            throw std::runtime_error(std::string("c10d ") + what + " did not complete within " +
                                     std::to_string(timeout.count()) + " ms");
    }

    c10::intrusive_ptr<PG> pg_;
    at::Device device_;
};

/** A context whose collectives run over `pg` (a c10d::ProcessGroup or c10d::Backend). */
template <class PG>
Context context_from_process_group(c10::intrusive_ptr<PG> pg, std::chrono::milliseconds timeout = std::chrono::minutes(10),
                                   std::optional<at::Device> device = std::nullopt) {
    return Context::from_communicator(std::make_shared<ProcessGroupCommunicator<PG>>(std::move(pg), device), timeout);
}

} // namespace dcp

#endif /* DCP_C10D_HPP */
