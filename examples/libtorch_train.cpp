// libdcp from a LibTorch training loop: an MLP trained with Adam, an asynchronous checkpoint
// at step K while training goes on, and a resume from it that reproduces the uninterrupted
// run's losses bit for bit, on 1 process or several (gloo), on CPU or CUDA.
//
// The checkpoint uses Python's names (model.net1.weight, optimizer.state.net1.weight.exp_avg,
// optimizer.param_groups.0.lr, ...), so torch.distributed.checkpoint loads it into the same
// nn.Module and torch.optim.Adam (tests/python/test_libtorch.py does).
//
//   libtorch_train [--steps N] [--save-at K --save DIR] [--resume DIR] [--device cpu|cuda]
//                  [--series ROOT --every N]
//                  [--optim adam|adamw|amsgrad|sgd|sgd0] [--rank R --world W --store FILE]
//
// Prints "step I loss HEX" (C's %a, exact) on rank 0 for every step it runs.
//
// --series ROOT --every N: a checkpoint series under a dcp::Manager: resume from its newest
// whole step (if any) in one call, an async save every N steps (the last 2 kept).
//
// Multi-rank (W = 1, 2 or 4 processes, gloo over a c10d::FileStore): every rank keeps the whole
// model and computes the same update. The batch of each step is cut into 4 micro-batches;
// each rank computes the gradients of its 4/W of them, an all-gather over the training group
// collects all 4, and every rank sums them in micro-batch order, so the arithmetic is the
// same for every world size (a ring all-reduce would add in a world-size-dependent order).
// The checkpoint is sharded FSDP-style: each rank saves only its torch.chunk piece (Shard(0)
// over a 1-D mesh) of every parameter and Adam buffer, through a second process group of
// its own (the async save commits from a libdcp thread while training keeps using the first).
// A checkpoint saved by W ranks resumes under any other W.
//
// Determinism: one intra-op thread (torch::set_num_threads(1)); on CUDA set
// CUBLAS_WORKSPACE_CONFIG=:4096:8 (tests/gpu/test_libtorch_gpu.sh does).

#include "dcp_torch.hpp"
#ifdef DCP_EXAMPLE_GLOO
#include "dcp_c10d.hpp"
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif

#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

namespace {

struct NetImpl : torch::nn::Module {
    NetImpl()
        : net1(register_module("net1", torch::nn::Linear(8, 16))),
          net2(register_module("net2", torch::nn::Linear(16, 32))),
          net3(register_module("net3", torch::nn::Linear(32, 64))),
          net4(register_module("net4", torch::nn::Linear(64, 8))) {}
    torch::Tensor forward(torch::Tensor x) {
        x = torch::relu(net1(x));
        x = torch::relu(net2(x));
        x = torch::relu(net3(x));
        return net4(x);
    }
    torch::nn::Linear net1, net2, net3, net4;
};
TORCH_MODULE(Net);

constexpr int64_t kBatch = 32, kMicro = 4;

/** The batch of step `i`: the same in Python (torch.Generator().manual_seed(1000 + i)). */
std::pair<torch::Tensor, torch::Tensor> batch(int64_t i) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + i);
    torch::Tensor x = torch::randn({kBatch, 8}, gen);
    torch::Tensor y = torch::randn({kBatch, 8}, gen);
    return {x, y};
}

struct Args {
    int64_t steps = 12, save_at = -1, every = 0;
    std::string save, resume, series, device = "cpu", optim = "adam", store, dcp_group = "process-group";
    int rank = 0, world = 1;
};

[[noreturn]] void usage(const char *msg) {
    std::fprintf(stderr,
                 "libtorch_train: %s\nusage: libtorch_train [--steps N] [--save-at K --save DIR] [--resume DIR] [--series ROOT --every N]\n"
                 "       [--device cpu|cuda] [--optim adam|adamw|amsgrad|sgd|sgd0] [--rank R --world W --store FILE]\n"
                 "       [--dcp-group process-group|backend]\n",
                 msg);
    std::exit(2);
}

Args parse(int argc, char **argv) {
    Args a;
    for (int i = 1; i < argc; ++i) {
        std::string k = argv[i];
        auto val = [&]() -> std::string {
            if (i + 1 >= argc) usage(("missing value for " + k).c_str());
            return argv[++i];
        };
        if (k == "--steps") a.steps = std::stoll(val());
        else if (k == "--save-at") a.save_at = std::stoll(val());
        else if (k == "--save") a.save = val();
        else if (k == "--resume") a.resume = val();
        else if (k == "--series") a.series = val();
        else if (k == "--every") a.every = std::stoll(val());
        else if (k == "--device") a.device = val();
        else if (k == "--optim") a.optim = val();
        else if (k == "--rank") a.rank = std::stoi(val());
        else if (k == "--world") a.world = std::stoi(val());
        else if (k == "--store") a.store = val();
        else if (k == "--dcp-group") a.dcp_group = val();
        else usage(("unknown argument " + k).c_str());
    }
    if ((a.save_at >= 0) != !a.save.empty()) usage("--save-at and --save go together");
    if (!a.series.empty() != (a.every > 0)) usage("--series and --every N (N > 0) go together");
    if (!a.series.empty() && !a.resume.empty()) usage("--series resumes from its own newest step: no --resume");
    if (a.world < 1 || kMicro % a.world != 0) usage("--world must divide 4");
    if (a.world > 1 && a.store.empty()) usage("--world > 1 needs --store FILE");
    if (a.world > 1 && a.device != "cpu") usage("this example runs several ranks on CPU (gloo) only");
    if (a.dcp_group != "process-group" && a.dcp_group != "backend") usage("--dcp-group is process-group or backend");
    return a;
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const std::string &name, std::vector<torch::Tensor> params) {
    using namespace torch::optim;
    if (name == "adam") return std::make_unique<Adam>(params, AdamOptions(1e-2));
    if (name == "adamw") return std::make_unique<AdamW>(params, AdamWOptions(1e-2).weight_decay(0.05));
    if (name == "amsgrad") return std::make_unique<Adam>(params, AdamOptions(1e-2).amsgrad(true).weight_decay(0.01));
    if (name == "sgd") return std::make_unique<SGD>(params, SGDOptions(0.05).momentum(0.9).nesterov(true));
    if (name == "sgd0") return std::make_unique<SGD>(params, SGDOptions(0.05));
    usage(("unknown optimizer " + name).c_str());
}

/** Gathers every rank's [n, len] rows into [W * n, len], in rank order. */
using Gather = std::function<torch::Tensor(const torch::Tensor &)>;

/** One training step (see the top of the file); returns the loss of the whole batch. */
float train_step(Net &model, torch::optim::Optimizer &opt, int64_t step, const torch::Device &device, int rank, int world,
                 const Gather &gather) {
    auto [x, y] = batch(step);
    x = x.to(device);
    y = y.to(device);
    const int64_t per_rank = kMicro / world, rows = kBatch / kMicro;
    std::vector<torch::Tensor> params = model->parameters();
    std::vector<torch::Tensor> mine;
    for (int64_t m = rank * per_rank; m < (rank + 1) * per_rank; ++m) {
        opt.zero_grad();
        torch::Tensor loss = torch::mse_loss(model->forward(x.narrow(0, m * rows, rows)), y.narrow(0, m * rows, rows));
        loss.backward();
        std::vector<torch::Tensor> flat;
        for (auto &p : params) flat.push_back(p.grad().reshape(-1));
        flat.push_back(loss.detach().reshape(1));
        mine.push_back(torch::cat(flat));
    }
    torch::Tensor all = torch::stack(mine);
    if (world > 1) all = gather(all);
    torch::NoGradGuard no_grad;
    torch::Tensor sum = all[0].clone();
    for (int64_t m = 1; m < kMicro; ++m) sum.add_(all[m]);
    sum.mul_(1.0 / kMicro);
    int64_t off = 0;
    for (auto &p : params) {
        p.mutable_grad() = sum.narrow(0, off, p.numel()).view_as(p).clone();
        off += p.numel();
    }
    opt.step();
    return sum[off].item<float>();
}

} // namespace

int main(int argc, char **argv) try {
    Args args = parse(argc, argv);
    torch::set_num_threads(1);
    const torch::Device device(args.device);
    if (device.is_cuda() && !torch::cuda::is_available()) usage("--device cuda but CUDA is not available");

    torch::manual_seed(0);
    Net model;
    model->to(device);
    auto opt = make_optimizer(args.optim, model->parameters());

    // Collectives: none for one process; two gloo groups over one FileStore otherwise.
    Gather gather;
    dcp::Context ctx = dcp::Context::local();
#ifdef DCP_EXAMPLE_GLOO
    c10::intrusive_ptr<c10d::ProcessGroup> train_pg;
    if (args.world > 1) {
        auto store = c10::make_intrusive<c10d::FileStore>(args.store, args.world);
        auto make_gloo = [&](const std::string &name) {
            auto prefixed = c10::make_intrusive<c10d::PrefixStore>(name, store);
            auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::seconds(120));
            opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
            return c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, args.rank, args.world, opts);
        };
        auto make_group = [&](const std::string &name) {
            auto gloo = make_gloo(name);
            auto pg = c10::make_intrusive<c10d::ProcessGroup>(c10::make_intrusive<c10d::PrefixStore>(name, store), args.rank, args.world);
            pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
            pg->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
            return pg;
        };
        train_pg = make_group("train");
        gather = [&](const torch::Tensor &t) {
            std::vector<std::vector<torch::Tensor>> out(1);
            for (int r = 0; r < args.world; ++r) out[0].push_back(torch::empty_like(t));
            std::vector<torch::Tensor> in{t};
            train_pg->allgather(out, in)->wait();
            return torch::cat(out[0]);
        };
        // libdcp's own group: its collectives never interleave with the training loop's. A
        // c10d::ProcessGroup (the default) or, with --dcp-group backend, the gloo Backend itself.
        if (args.dcp_group == "backend")
            ctx = dcp::context_from_process_group(make_gloo("dcp"), std::chrono::seconds(120));
        else
            ctx = dcp::context_from_process_group(make_group("dcp"), std::chrono::seconds(120));
    }
#else
    if (args.world > 1) usage("built without gloo (DCP_EXAMPLE_GLOO): one process only");
#endif

    // The three lines: a checkpointer, the model and optimizer registered, save / load.
    dcp::Checkpointer ckpt(std::move(ctx));
    dcp::LayoutFn layout; // whole tensors for one process
    if (args.world > 1) layout = dcp::shard_saves(std::make_shared<dcp::Mesh>(ckpt.context(), std::vector<int64_t>{args.world}));
    int64_t done = 0; // steps trained so far; saved as "train.step"
    ckpt.add_module(*model, "model.", layout).add_optimizer(*opt, *model).add_value("train.step", &done);

    if (!args.resume.empty()) {
        ckpt.load(args.resume);
        if (args.rank == 0) std::fprintf(stderr, "resumed from %s at step %lld\n", args.resume.c_str(), (long long)done);
    }

    std::unique_ptr<dcp::Manager> series;
    if (!args.series.empty()) {
        series = std::make_unique<dcp::Manager>(ckpt.context(), args.series,
                                                dcp::ManagerPolicy().set_save_interval(static_cast<uint64_t>(args.every)).set_keep_last(2));
        if (auto step = ckpt.load_latest(*series); step && args.rank == 0)
            std::fprintf(stderr, "resumed from step %llu of %s (train.step %lld)\n", (unsigned long long)*step, args.series.c_str(), (long long)done);
    }

    dcp::Future pending;
    if (done == args.save_at) { // --save-at 0: the state before training (a fresh optimizer)
        ckpt.save(args.save, dcp::SaveOptions().set_overwrite(true));
        if (args.rank == 0) std::fprintf(stderr, "saved step %lld to %s\n", (long long)done, args.save.c_str());
    }
    for (int64_t step = done; step < args.steps; ++step) {
        float loss = train_step(model, *opt, step, device, args.rank, args.world, gather);
        done = step + 1;
        if (args.rank == 0) std::printf("step %lld loss %a\n", (long long)step, static_cast<double>(loss));
        if (done == args.save_at) {
            auto t0 = std::chrono::steady_clock::now();
            pending = ckpt.save_async(args.save, dcp::SaveOptions().set_overwrite(true));
            double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            if (args.rank == 0) std::fprintf(stderr, "async save of step %lld to %s: blocked %.1f ms\n", (long long)done, args.save.c_str(), ms);
        }
        if (series && series->should_save(static_cast<uint64_t>(done))) pending = ckpt.save_async(*series, static_cast<uint64_t>(done));
    }
    if (series) series->finish(); // waits for the last save, applies retention, gives the root up
    if (pending.valid()) {
        pending.wait();
        if (args.rank == 0) std::fprintf(stderr, "checkpoint %s committed\n", args.save.c_str());
    }
    std::fflush(stdout);
    return 0;
} catch (const dcp::Error &e) {
    std::fprintf(stderr, "libtorch_train: libdcp error %s: %s\n", e.status_name(), e.what());
    return 1;
} catch (const std::exception &e) {
    std::fprintf(stderr, "libtorch_train: %s\n", e.what());
    return 1;
}
