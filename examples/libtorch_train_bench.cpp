// Training-loop checkpoint benchmark in C++ (LibTorch): what each way of checkpointing with
// libdcp costs a training step. The C++ counterpart of scripts/bench_train.py, for its libdcp
// rows (torch's async_save has no C++ API):
//
//   scripts/bench_train_cpp.sh [--device cuda|cpu] [--steps 300] [--every 60] ...
//
// The model: --layers x torch::nn::Linear(width, width) with ReLU between, fp32 parameters,
// bf16 autocast on CUDA (where this LibTorch has the C++ autocast API), torch::optim::Adam
// (LibTorch's, not fused), loss = output.float().pow(2).mean(). Every --every steps the state
// (parameters, Adam's exp_avg, exp_avg_sq and step) is saved with dcp::Checkpointer::save_async
// to a fresh directory; the previous one is deleted once the next save has completed. Each
// variant (one table row) runs --warmup steps and one untimed first save, then --steps timed
// steps, each between two synchronizations of the training stream. One markdown table is printed, with the
// columns of scripts/bench_train.py (docs/bench-train-notes.md explains them).
//
// Variants: none; libdcp host staging (a plain save_async); libdcp stream-ordered (the copies
// to the host run on the GPU after the call returns, ordered before optimizer.step() by
// dcp::stream_wait_current); libdcp device snapshot (stream-ordered, the state first copied
// into up to --snapshot-gib of device memory kept by the context).

#include "dcp_torch.hpp"

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <set>
#include <string>
#include <thread>
#include <vector>

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
#define BENCH_HAS_AUTOCAST_API 1 // at::autocast::set_autocast_enabled(DeviceType, bool)
#else
#define BENCH_HAS_AUTOCAST_API 0
#endif

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
constexpr double kNone = std::numeric_limits<double>::quiet_NaN(); // a value not measured: "-"

// ---- arguments

enum class Variant { None, Host, Stream, Snapshot };

struct VariantName {
    Variant variant;
    const char *key, *title;
};
constexpr VariantName kVariants[] = {
    {Variant::None, "none", "none"},
    {Variant::Host, "libdcp-host", "libdcp host staging"},
    {Variant::Stream, "libdcp-stream", "libdcp stream-ordered"},
    {Variant::Snapshot, "libdcp-snapshot", "libdcp device snapshot"},
};

const VariantName &name_of(Variant v) {
    for (const auto &n : kVariants)
        if (n.variant == v) return n;
    throw std::logic_error("unnamed variant");
}

const char *title_of(Variant v) { return name_of(v).title; }

struct Args {
    std::string device = "cuda", dir = "/tmp/bench-train-cpp";
    int64_t layers = 24, width = 4096, batch = 16384, steps = 300, every = 60, warmup = 10;
    std::optional<double> snapshot_gib;
    std::vector<Variant> variants{Variant::None, Variant::Host, Variant::Stream, Variant::Snapshot};
};

[[noreturn]] void usage(const std::string &msg) {
    std::fprintf(stderr,
                 "libtorch_train_bench: %s\n"
                 "usage: libtorch_train_bench [--device cuda|cpu] [--layers 24] [--width 4096] [--batch 16384]\n"
                 "       [--steps 300] [--every 60] [--warmup 10] [--dir /tmp/bench-train-cpp] [--snapshot-gib G]\n"
                 "       [--variants none,libdcp-host,libdcp-stream,libdcp-snapshot]\n",
                 msg.c_str());
    std::exit(2);
}

std::vector<Variant> parse_variants(const std::string &list) {
    std::vector<Variant> out;
    size_t start = 0;
    while (start <= list.size()) {
        size_t end = std::min(list.find(',', start), list.size());
        std::string key = list.substr(start, end - start);
        if (!key.empty()) {
            auto it = std::find_if(std::begin(kVariants), std::end(kVariants), [&](const VariantName &n) { return key == n.key; });
            if (it == std::end(kVariants)) usage("unknown variant " + key);
            out.push_back(it->variant);
        }
        start = end + 1;
    }
    return out;
}

Args parse(int argc, char **argv) {
    Args a;
    for (int i = 1; i < argc; ++i) {
        std::string k = argv[i];
        auto val = [&]() -> std::string {
            if (i + 1 >= argc) usage("missing value for " + k);
            return argv[++i];
        };
        if (k == "--device") a.device = val();
        else if (k == "--layers") a.layers = std::stoll(val());
        else if (k == "--width") a.width = std::stoll(val());
        else if (k == "--batch") a.batch = std::stoll(val());
        else if (k == "--steps") a.steps = std::stoll(val());
        else if (k == "--every") a.every = std::stoll(val());
        else if (k == "--warmup") a.warmup = std::stoll(val());
        else if (k == "--dir") a.dir = val();
        else if (k == "--snapshot-gib") a.snapshot_gib = std::stod(val());
        else if (k == "--variants") a.variants = parse_variants(val());
        else usage("unknown argument " + k);
    }
    if (a.device != "cuda" && a.device != "cpu") usage("--device is cuda or cpu");
    if (a.steps < 1 || a.every < 1 || a.layers < 1 || a.width < 1 || a.batch < 1) usage("sizes and counts must be positive");
    if (a.warmup < 1) usage("--warmup must be at least 1 (the first warmup step creates Adam's state)");
    return a;
}

// ---- measurements

double mean(const std::vector<double> &v) { return std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size()); }

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    size_t n = v.size();
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

uint64_t rss_bytes() {
    std::ifstream f("/proc/self/status");
    std::string line;
    while (std::getline(f, line))
        if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
    return 0;
}

/** Samples this process's resident memory every 5 ms while alive; peak() is the highest
    increase over the start. discount(n) leaves n bytes the benchmark itself allocates out. */
class PeakRss {
public:
    PeakRss() : base_(rss_bytes()), thread_([this] { run(); }) {}
    ~PeakRss() { stop(); }
    void discount(uint64_t nbytes) { base_ += nbytes; }
    double peak_gib() {
        stop();
        return static_cast<double>(peak_) / kGiB;
    }

private:
    void sample() { peak_ = std::max<int64_t>(peak_, static_cast<int64_t>(rss_bytes()) - static_cast<int64_t>(base_.load())); }
    void run() {
        while (!stopping_) {
            sample();
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
    }
    void stop() {
        if (!thread_.joinable()) return;
        stopping_ = true;
        thread_.join();
        sample();
    }
    std::atomic<uint64_t> base_;
    std::atomic<int64_t> peak_{0};
    std::atomic<bool> stopping_{false};
    std::thread thread_;
};

/** Device memory in use (total - free, from cudaMemGetInfo of the CUDA runtime that LibTorch
    has loaded, found with dlsym: no CUDA headers needed) over its level after the warmup:
    libdcp's snapshot buffers, allocated through the driver, and any growth of torch's cache. */
class DeviceMem {
public:
    explicit DeviceMem(bool cuda) {
        if (cuda) mem_get_info_ = reinterpret_cast<MemGetInfo>(dlsym(RTLD_DEFAULT, "cudaMemGetInfo"));
        if (mem_get_info_) base_ = used();
    }
    static bool available(bool cuda) { return cuda && dlsym(RTLD_DEFAULT, "cudaMemGetInfo") != nullptr; }
    void sample() {
        if (mem_get_info_) peak_ = std::max(peak_, used() - base_);
    }
    /** NaN where not measured. */
    double peak_gib() const {
        if (!mem_get_info_) return kNone;
        return static_cast<double>(std::max<int64_t>(peak_, 0)) / kGiB;
    }

private:
    using MemGetInfo = int (*)(size_t *free, size_t *total);
    int64_t used() const {
        size_t free = 0, total = 0;
        if (mem_get_info_(&free, &total) != 0) return base_ + peak_; // an error: no new information
        return static_cast<int64_t>(total - free);
    }
    MemGetInfo mem_get_info_ = nullptr;
    int64_t base_ = 0, peak_ = 0;
};

// ---- the model

/** bf16 autocast for CUDA over one scope, as Python's torch.autocast does (its cache of cast
    weights is cleared on leaving, since the weights change at every step). */
class AutocastBf16 {
public:
    explicit AutocastBf16(bool on) : on_(on && BENCH_HAS_AUTOCAST_API) {
#if BENCH_HAS_AUTOCAST_API
        if (!on_) return;
        at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
        at::autocast::set_autocast_enabled(at::kCUDA, true);
        at::autocast::increment_nesting();
#endif
    }
    ~AutocastBf16() {
#if BENCH_HAS_AUTOCAST_API
        if (!on_) return;
        at::autocast::set_autocast_enabled(at::kCUDA, false);
        if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
#endif
    }
    AutocastBf16(const AutocastBf16 &) = delete;
    AutocastBf16 &operator=(const AutocastBf16 &) = delete;

private:
    bool on_;
};

torch::nn::Sequential make_model(int64_t layers, int64_t width) {
    torch::nn::Sequential model;
    for (int64_t i = 0; i < layers; ++i) {
        model->push_back(torch::nn::Linear(width, width));
        if (i + 1 < layers) model->push_back(torch::nn::ReLU());
    }
    return model;
}

/** The benchmark's model, the same for every run: initialized from seed 0. */
torch::nn::Sequential seeded_model(int64_t layers, int64_t width) {
    torch::manual_seed(0);
    return make_model(layers, width);
}

std::unique_ptr<torch::optim::Adam> make_adam(torch::nn::Sequential &model) {
    return std::make_unique<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(1e-5));
}

/** The tensors a save writes, by checkpoint key, and Adam's step counts (saved as 0-d tensors). */
struct NamedState {
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    std::vector<std::pair<std::string, int64_t>> steps;

    uint64_t nbytes() const {
        uint64_t n = steps.size() * sizeof(float);
        for (const auto &[k, t] : tensors) n += t.numel() * t.element_size();
        return n;
    }
    size_t count() const { return tensors.size() + steps.size(); }
};

NamedState named_state(torch::nn::Module &model, torch::optim::Adam &opt) {
    NamedState s;
    for (const auto &kv : model.named_parameters()) {
        s.tensors.emplace_back("model." + kv.key(), kv.value().detach());
        auto it = opt.state().find(kv.value().unsafeGetTensorImpl());
        if (it == opt.state().end()) continue;
        const auto &ps = static_cast<const torch::optim::AdamParamState &>(*it->second);
        const std::string pre = "optimizer.state." + kv.key() + ".";
        s.tensors.emplace_back(pre + "exp_avg", ps.exp_avg());
        s.tensors.emplace_back(pre + "exp_avg_sq", ps.exp_avg_sq());
        s.steps.emplace_back(pre + "step", ps.step());
    }
    return s;
}

NamedState cpu_copy(const NamedState &live) {
    NamedState c = live;
    for (auto &[k, t] : c.tensors) t = t.to(torch::kCPU, /*non_blocking=*/false, /*copy=*/true);
    return c;
}

bool same_bytes(const at::Tensor &a, const at::Tensor &b) {
    if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
    auto bytes = [](const at::Tensor &t) { return t.contiguous().reshape(-1).view(torch::kUInt8); };
    return torch::equal(bytes(a), bytes(b));
}

/** "" when every tensor and step count of `expected` is in `got` with the same bytes, else the
    first key that differs. */
std::string first_difference(const NamedState &expected, const NamedState &got) {
    if (expected.tensors.size() != got.tensors.size() || expected.steps.size() != got.steps.size()) return "(the key sets differ)";
    for (size_t i = 0; i < expected.tensors.size(); ++i)
        if (expected.tensors[i].first != got.tensors[i].first || !same_bytes(expected.tensors[i].second, got.tensors[i].second))
            return expected.tensors[i].first;
    for (size_t i = 0; i < expected.steps.size(); ++i)
        if (expected.steps[i] != got.steps[i]) return expected.steps[i].first;
    return "";
}

struct Trainer {
    torch::Device device;
    bool autocast;
    torch::nn::Sequential model;
    std::unique_ptr<torch::optim::Adam> opt;
    torch::Tensor x;

    explicit Trainer(const Args &a)
        : device(a.device), autocast(device.is_cuda() && BENCH_HAS_AUTOCAST_API), model(seeded_model(a.layers, a.width)) {
        model->to(device);
        opt = make_adam(model);
        x = torch::randn({a.batch, a.width}, torch::TensorOptions().device(device));
    }
    void forward_backward() {
        torch::Tensor out;
        {
            AutocastBf16 bf16(autocast);
            out = model->forward(x);
        }
        out.to(torch::kFloat).pow(2).mean().backward();
    }
    void optimizer_step() {
        opt->step();
        opt->zero_grad(/*set_to_none=*/true);
    }
    NamedState state() { return named_state(*model, *opt); }
    void sync() const {
        // The training stream only: torch::cuda::synchronize() would also wait for libdcp's
        // background copy stream, which a training loop never waits for.
        if (device.is_cuda()) c10::impl::getDeviceGuardImpl(device.type())->getStream(device).synchronize();
    }
};

// ---- savers

/** Fresh directories for one variant's saves; a save's predecessors are deleted (on a thread,
    off the timed steps) once it has completed. */
class CheckpointDirs {
public:
    explicit CheckpointDirs(fs::path root) : root_(std::move(root)) {
        fs::remove_all(root_);
        fs::create_directories(root_);
    }
    ~CheckpointDirs() { remove_all(); }
    std::string fresh(const std::string &name) const { return (root_ / name).string(); }
    void completed(const std::string &path) {
        for (const auto &old : kept_)
            if (old != path) removers_.emplace_back([old] { std::error_code ec; fs::remove_all(old, ec); });
        kept_ = {path};
    }
    void remove_all() {
        for (auto &t : removers_) t.join();
        removers_.clear();
        std::error_code ec;
        fs::remove_all(root_, ec);
    }

private:
    fs::path root_;
    std::vector<std::string> kept_;
    std::vector<std::thread> removers_;
};

/** dcp::Checkpointer::save_async of the trainer's model and Adam, as `variant` says; the step
    loop calls save(), then before_optimizer_step() in every step, in_flight() at the start of
    a step, finish() at the end. Variant::None never saves. */
class Saver {
public:
    Saver(Variant v, Trainer &t, CheckpointDirs &dirs, uint64_t snapshot_bytes)
        : variant_(v), trainer_(t), dirs_(dirs), snapshot_bytes_(snapshot_bytes), ckpt_(dcp::Context::local()) {
        ckpt_.add_module(*t.model).add_optimizer(*t.opt, *t.model);
    }
    bool saves() const { return variant_ != Variant::None; }

    void save(const std::string &path) {
        auto t0 = std::chrono::steady_clock::now();
        wait_previous();
        waits_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        future_ = ckpt_.save_async(path, options());
        path_ = path;
        needs_stream_wait_ = variant_ != Variant::Host;
    }
    /** Stream-ordered copies read the live tensors: the optimizer's kernels queue after them. */
    void before_optimizer_step() {
        if (!needs_stream_wait_) return;
        dcp::stream_wait_current(future_, trainer_.device);
        needs_stream_wait_ = false;
    }
    bool in_flight() const { return future_.valid() && !future_.done(); }
    void finish() { wait_previous(); }
    /** After a failure: the outstanding save waited for, its error dropped (the first is reported). */
    void drain() noexcept {
        try {
            before_optimizer_step();
        } catch (const std::exception &) {
        }
        try {
            finish();
        } catch (const std::exception &) {
        }
    }

    const std::optional<dcp_staging_report> &staging_report() const { return report_; }
    uint64_t device_snapshot_bytes() { return ckpt_.context().device_snapshot_bytes(); }

private:
    dcp::SaveOptions options() const {
        auto o = dcp::SaveOptions().set_overwrite(true);
        if (variant_ == Variant::Stream || variant_ == Variant::Snapshot) o.set_stream_ordered(true);
        if (variant_ == Variant::Snapshot) o.set_device_snapshot(snapshot_bytes_);
        return o;
    }
    void wait_previous() {
        if (!future_.valid()) return;
        future_.wait();
        report_ = future_.staging_report();
        dirs_.completed(path_);
        future_ = dcp::Future();
    }

    Variant variant_;
    Trainer &trainer_;
    CheckpointDirs &dirs_;
    uint64_t snapshot_bytes_;
    dcp::Checkpointer ckpt_;
    dcp::Future future_;
    std::string path_;
    bool needs_stream_wait_ = false;
    std::optional<dcp_staging_report> report_;

public:
    /** How long each save waited for the previous one to complete (the disk's share). */
    std::vector<double> waits_ms;
};

/** Loads `path` into a fresh CPU model (parameters poisoned: every byte 0xFF) and a fresh Adam
    with dcp::Checkpointer::load: "bit-exact" if every tensor and step count is `expected`'s. */
std::string check_checkpoint(const std::string &path, const Args &a, const NamedState &expected) {
    torch::nn::Sequential model = make_model(a.layers, a.width);
    {
        torch::NoGradGuard no_grad;
        for (auto &p : model->parameters()) p.view(torch::kUInt8).fill_(0xFF);
    }
    auto opt = make_adam(model);
    dcp::Checkpointer ckpt(dcp::Context::local());
    ckpt.add_module(*model).add_optimizer(*opt, *model);
    ckpt.load(path);
    std::string diff = first_difference(expected, named_state(*model, *opt));
    return diff.empty() ? "bit-exact" : "MISMATCH at " + diff;
}

// ---- the training loop

/** Wall time of one step in ms, the training stream synchronized at both ends. */
double train_step(Trainer &t, Saver &saver, const std::string *save_path, DeviceMem &mem) {
    t.sync();
    auto t0 = Clock::now();
    if (save_path) {
        saver.save(*save_path);
        mem.sample();
    }
    t.forward_backward();
    saver.before_optimizer_step();
    mem.sample();
    t.optimizer_step();
    t.sync();
    double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    mem.sample();
    return ms;
}

/** Warmup steps without saves (the first creates Adam's state); returns their median. */
double warm_up(Trainer &t, Saver &saver, int64_t steps) {
    DeviceMem no_samples(false);
    std::vector<double> times;
    for (int64_t i = 0; i < steps; ++i) times.push_back(train_step(t, saver, nullptr, no_samples));
    return median(times);
}

enum class StepKind { Save, Background, Plain };

struct Result {
    Variant variant = Variant::None;
    std::vector<std::pair<double, StepKind>> steps;
    double first_save_ms = kNone, rss_gib = kNone, device_gib = kNone;
    std::string note, failed;
    std::optional<dcp_staging_report> staging_report;
    std::vector<double> waits_ms;

    std::vector<double> times(std::initializer_list<StepKind> kinds) const {
        std::vector<double> out;
        for (const auto &[ms, k] : steps)
            if (std::find(kinds.begin(), kinds.end(), k) != kinds.end()) out.push_back(ms);
        return out;
    }
};

std::set<int64_t> save_steps_of(const Saver &saver, const Args &a) {
    std::set<int64_t> s;
    if (saver.saves())
        for (int64_t i = 0; i < a.steps; i += a.every) s.insert(i);
    return s;
}

void timed_run(Trainer &t, Saver &saver, CheckpointDirs &dirs, const Args &a, Result &r) {
    double median_warm = warm_up(t, saver, a.warmup);
    DeviceMem mem(t.device.is_cuda());
    const std::set<int64_t> save_steps = save_steps_of(saver, a);
    const int64_t check_step = save_steps.empty() ? -1 : *save_steps.rbegin();
    NamedState expected;
    std::string check_path;
    PeakRss rss;
    if (!save_steps.empty()) {
        std::string first = dirs.fresh("first");
        r.first_save_ms = train_step(t, saver, &first, mem) - median_warm;
        saver.finish();
        saver.waits_ms.clear();
    }
    for (int64_t i = 0; i < a.steps; ++i) {
        bool in_flight = saver.in_flight();
        std::string path = dirs.fresh("step-" + std::to_string(i));
        if (i == check_step) { // untimed: the copy for the bit-exact check is taken right before it
            NamedState live = t.state();
            rss.discount(live.nbytes());
            expected = cpu_copy(live);
            check_path = path;
            train_step(t, saver, &path, mem);
            continue;
        }
        bool saving = save_steps.count(i) > 0;
        double ms = train_step(t, saver, saving ? &path : nullptr, mem);
        r.steps.emplace_back(ms, saving ? StepKind::Save : in_flight ? StepKind::Background : StepKind::Plain);
    }
    saver.finish();
    r.waits_ms = saver.waits_ms;
    r.rss_gib = rss.peak_gib();
    r.device_gib = mem.peak_gib();
    if (std::isnan(r.device_gib) && r.variant == Variant::Snapshot && t.device.is_cuda())
        r.device_gib = static_cast<double>(saver.device_snapshot_bytes()) / kGiB;
    if (saver.saves()) {
        r.note = "last save " + check_checkpoint(check_path, a, expected);
        r.staging_report = saver.staging_report();
    }
}

Result run_variant(Variant v, Trainer &t, const Args &a, uint64_t snapshot_bytes) {
    Result r;
    r.variant = v;
    CheckpointDirs dirs(fs::path(a.dir) / name_of(v).key);
    Saver saver(v, t, dirs, snapshot_bytes);
    try {
        timed_run(t, saver, dirs, a, r);
    } catch (const std::exception &e) { // a variant this build cannot run is a row, not a crash
        std::string msg = e.what();
        r.failed = "failed: " + msg.substr(0, msg.find('\n'));
        saver.drain();
    }
    return r;
}

// ---- the table

/** A cell: "-" for a value that does not exist (NaN). */
std::string fmt(double x, int digits = 1) {
    if (std::isnan(x)) return "-";
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*f", digits, x);
    return buf;
}

double median_or_nan(const std::vector<double> &v) { return v.empty() ? kNone : median(v); }

std::string row(const Result &r, double baseline_mean) {
    std::string out = std::string("| ") + title_of(r.variant) + " | ";
    if (!r.failed.empty()) {
        for (int i = 0; i < 8; ++i) out += "- | ";
        return out + r.failed + " |";
    }
    double m = mean(r.times({StepKind::Save, StepKind::Background, StepKind::Plain}));
    double between = median_or_nan(r.times({StepKind::Background, StepKind::Plain}));
    auto saves = r.times({StepKind::Save});
    double cost = saves.empty() ? kNone : mean(saves) - between;
    double overhead = baseline_mean > 0 ? (m - baseline_mean) / baseline_mean * 100 : kNone;
    double background = median_or_nan(r.times({StepKind::Background}));
    double waited = r.waits_ms.empty() ? kNone : mean(r.waits_ms);
    for (const auto &cell : {fmt(m), fmt(overhead), fmt(cost), fmt(waited), fmt(background), fmt(r.first_save_ms), fmt(r.rss_gib, 2), fmt(r.device_gib, 2)})
        out += cell + " | ";
    return out + r.note + " |";
}

void print_table(const std::vector<Result> &results, const Args &a, uint64_t nbytes, uint64_t snapshot_bytes, bool cuda) {
    double baseline_mean = kNone;
    for (const auto &r : results)
        if (r.variant == Variant::None && r.failed.empty()) baseline_mean = mean(r.times({StepKind::Plain}));
    std::printf("\n| variant | mean step (ms) | overhead vs none (%%) | cost per save (ms) | of which waiting for the previous save (ms) "
                "| median step during background writes (ms) "
                "| first save (ms) | peak host RSS increase (GiB) | peak device mem increase (GiB) | note |\n");
    std::printf("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
    for (const auto &r : results) std::printf("%s\n", row(r, baseline_mean).c_str());
    int64_t nsaves = (a.steps + a.every - 1) / a.every;
    std::printf("\n%lld timed steps after %lld warmup steps; a save every %lld steps (%lld saves, %.2f GiB each). "
                "Steps are timed one by one between two synchronizations of the training stream (not the device: background copy streams are not waited for).\n",
                (long long)a.steps, (long long)a.warmup, (long long)a.every, (long long)nsaves, nbytes / kGiB);
    std::printf("First save: the untimed save before the timed steps (it allocates staging buffers), as its step's time "
                "less the median warmup step; it is not in the other columns.\n");
    std::printf("libdcp rows: the step of the last save is not timed (the state is copied to the CPU right before it, "
                "for the bit-exact check of what that save wrote, loaded with dcp::Checkpointer::load into a fresh model, "
                "its parameters poisoned, and a fresh Adam).\n");
    if (!cuda)
        std::printf("Peak device mem increase: - (a CPU run).\n");
    else if (DeviceMem::available(true))
        std::printf("Peak device mem increase: device memory in use (cudaMemGetInfo: total - free) over its level after the "
                    "warmup, sampled after each step and around each save.\n");
    else
        std::printf("Peak device mem increase: cudaMemGetInfo was not found in this process; the snapshot row shows "
                    "ctx.device_snapshot_bytes(), the others -.\n");
    std::printf("Device snapshot budget: %.2f GiB.\n", snapshot_bytes / kGiB);
    for (const auto &r : results)
        if (r.staging_report)
            std::printf("%s: f.staging_report() of its last save: device_snapshot_bytes=%llu stream_ordered_bytes=%llu "
                        "copied_bytes=%llu blocked_seconds=%.4f\n",
                        title_of(r.variant), (unsigned long long)r.staging_report->device_snapshot_bytes,
                        (unsigned long long)r.staging_report->stream_ordered_bytes,
                        (unsigned long long)r.staging_report->copied_bytes, r.staging_report->blocked_seconds);
}

// ---- setup

std::string now_text() {
    std::time_t now = std::time(nullptr);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M", std::localtime(&now));
    return buf;
}

void print_header(const Args &a, const Trainer &t, const NamedState &state) {
    std::string precision = !t.device.is_cuda() ? "fp32 (CPU)"
                            : t.autocast        ? "bf16 autocast"
                                                : "fp32 (this LibTorch has no C++ autocast API)";
    std::printf("%s | LibTorch %s | libdcp %s | %ld CPUs | %s | matmuls: %s | torch::optim::Adam (not fused)\n",
                t.device.is_cuda() ? "cuda" : "no GPU (cpu run)", TORCH_VERSION, dcp::version().c_str(), sysconf(_SC_NPROCESSORS_ONLN),
                now_text().c_str(), precision.c_str());
    std::printf("model: %lld x Linear(%lld, %lld), batch %lld; state %.2f GiB = %.1f MiB (%zu tensors)\n", (long long)a.layers,
                (long long)a.width, (long long)a.width, (long long)a.batch, state.nbytes() / kGiB, state.nbytes() / 1048576.0,
                state.count());
    std::fflush(stdout);
}

} // namespace

int main(int argc, char **argv) try {
    Args args = parse(argc, argv);
    if (args.device == "cuda" && !torch::cuda::is_available()) usage("--device cuda but CUDA is not available");
    Trainer trainer(args);
    {
        CheckpointDirs unused(fs::path(args.dir) / "setup");
        Saver none(Variant::None, trainer, unused, 0);
        warm_up(trainer, none, args.warmup); // creates Adam's state, so that the state's size is known
    }
    NamedState state = trainer.state();
    const uint64_t nbytes = state.nbytes();
    const uint64_t snapshot_bytes = args.snapshot_gib ? static_cast<uint64_t>(*args.snapshot_gib * kGiB) : nbytes;
    print_header(args, trainer, state);
    std::vector<Result> results;
    for (Variant v : args.variants) {
        std::fprintf(stderr, "running %s ...\n", title_of(v));
        results.push_back(run_variant(v, trainer, args, snapshot_bytes));
    }
    print_table(results, args, nbytes, snapshot_bytes, trainer.device.is_cuda());
    std::error_code ec;
    fs::remove(args.dir, ec); // empty by now; left where it holds other things
    return 0;
} catch (const dcp::Error &e) {
    std::fprintf(stderr, "libtorch_train_bench: libdcp error %s: %s\n", e.status_name(), e.what());
    return 1;
} catch (const std::exception &e) {
    std::fprintf(stderr, "libtorch_train_bench: %s\n", e.what());
    return 1;
}
