// include/dcp_torch.hpp against LibTorch, one process:
//  - every torch dtype saved and loaded bit for bit, contiguous and strided, whole, as a box
//    (add_tensor_chunk) of a saved tensor, and sharded over a 1-rank mesh;
//  - Checkpointer with a module and Adam / AdamW / Adam(amsgrad) / SGD(momentum, nesterov) /
//    SGD: save, keep training, load into a fresh module and optimizer constructed with other
//    hyper-parameters, and the continued training is bit-identical; the keys are Python's;
//    a fresh optimizer (no state yet) saves and loads; values (int, double, bytes, bool);
//  - errors: amsgrad or Adam/AdamW mismatch, missing keys (strict) and missing_keys() (partial);
//  - CUDA (when a GPU is present): a CUDA module + Adam saved and loaded (also from and into
//    CPU), strided CUDA tensors, and an async save whose tensors change right after it returns.
//
//   usage: test_dcp_torch SCRATCH_DIR
#include "dcp_torch.hpp"

#include <filesystem>
#include "dcp_torch.hpp"

#include <torch/torch.h>

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

static int failures = 0, checks = 0;
#define EXPECT(cond)                                                                                \
    do {                                                                                           \
        ++checks;                                                                                  \
        if (!(cond)) {                                                                             \
            ++failures;                                                                            \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);          \
        }                                                                                          \
    } while (0)

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

/** Same dtype, shape and bytes (NaN payloads, -0.0 and float8 included). */
static bool same_bits(const at::Tensor &a, const at::Tensor &b) {
    if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
    auto ca = a.cpu().contiguous(), cb = b.cpu().contiguous();
    return std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.numel() * ca.element_size()) == 0;
}

/** Random bits of any dtype. */
static at::Tensor random_tensor(at::ScalarType t, std::vector<int64_t> shape, int64_t seed) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    std::vector<int64_t> bshape = shape;
    int64_t elem = static_cast<int64_t>(c10::elementSize(t));
    bshape.back() *= elem;
    at::Tensor bytes = at::randint(0, 256, bshape, gen, at::TensorOptions().dtype(at::kByte));
    if (t == at::kBool) return bytes.remainder(2).to(at::kBool).view(shape);
    return bytes.view(t);
}

/** A tensor of bytes 0xA5 (a load that writes nothing into it cannot pass), any dtype and device:
 *  made as bytes and viewed, since CUDA has no fill kernels for some dtypes (uint16/32/64). */
static at::Tensor poisoned(std::vector<int64_t> shape, at::ScalarType t, const at::Device &device) {
    std::vector<int64_t> bshape = shape;
    bshape.back() *= static_cast<int64_t>(c10::elementSize(t));
    return at::full(bshape, 0xA5, at::TensorOptions().dtype(at::kByte).device(device)).view(t);
}

static void test_dtypes(const at::Device &device) {
    const std::vector<at::ScalarType> types = {
        at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kFloat8_e4m3fn, at::kFloat8_e5m2, at::kLong, at::kInt, at::kShort,
        at::kChar, at::kByte, at::kBool, at::kComplexFloat, at::kComplexDouble, at::kUInt16, at::kUInt32, at::kUInt64};
    dcp::Context ctx = dcp::Context::local();
    dcp::State st;
    std::vector<at::Tensor> src, strided;
    for (size_t i = 0; i < types.size(); ++i) {
        EXPECT(dcp::scalar_type_of(dcp::dtype_of(types[i])) == types[i]);
        at::Tensor t = random_tensor(types[i], {6, 10}, static_cast<int64_t>(i)).to(device);
        at::Tensor s = random_tensor(types[i], {10, 6}, 100 + static_cast<int64_t>(i)).to(device).t(); // transposed
        at::Tensor e = t.slice(1, 1, 10, 3); // every third column: strides {10, 3}
        src.push_back(t);
        strided.push_back(s);
        std::string name = c10::toString(types[i]);
        dcp::add_tensor(st, "plain." + name, t);
        dcp::add_tensor(st, "transposed." + name, s);
        dcp::add_tensor(st, "every3." + name, e);
    }
    // Registered memory is borrowed: the tensors must outlive the state.
    at::Tensor scalar_src = at::scalar_tensor(2.5, at::kDouble).to(device), empty_src = at::empty({0, 4}, at::kFloat).to(device);
    dcp::add_tensor(st, "scalar", scalar_src);
    dcp::add_tensor(st, "empty", empty_src);
    dcp::save(ctx, st, dir + "/dtypes-" + device.str());

    // Load into fresh buffers laid out the other way (contiguous <-> strided), on the device.
    dcp::State ld;
    std::vector<at::Tensor> got, got_t, got_e;
    for (size_t i = 0; i < types.size(); ++i) {
        std::string name = c10::toString(types[i]);
        got.push_back(poisoned({10, 6}, types[i], device).t());
        got_t.push_back(poisoned({6, 10}, types[i], device));
        got_e.push_back(poisoned({6, 3}, types[i], device));
        dcp::add_tensor(ld, "plain." + name, got.back());
        dcp::add_tensor(ld, "transposed." + name, got_t.back());
        dcp::add_tensor(ld, "every3." + name, got_e.back());
    }
    at::Tensor scalar = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device));
    dcp::add_tensor(ld, "scalar", scalar);
    dcp::load(ctx, ld, dir + "/dtypes-" + device.str());
    for (size_t i = 0; i < types.size(); ++i) {
        bool ok = same_bits(got[i], src[i]) && same_bits(got_t[i], strided[i]) && same_bits(got_e[i], src[i].slice(1, 1, 10, 3));
        EXPECT(ok);
        if (!ok) std::fprintf(stderr, "  dtype %s differs\n", c10::toString(types[i]));
    }
    EXPECT(scalar.item<double>() == 2.5);

    // A box of a saved tensor (add_tensor_chunk), and a shard over a 1-rank mesh.
    at::Tensor box = at::zeros({2, 4}, at::TensorOptions().dtype(at::kFloat).device(device));
    auto mesh = std::make_shared<dcp::Mesh>(ctx, std::vector<int64_t>{1});
    at::Tensor shard = poisoned({6, 10}, at::kInt, device);
    dcp::State part;
    dcp::add_tensor_chunk(part, "plain.Float", box, {6, 10}, {3, 5});
    dcp::add_tensor_sharded(part, "plain.Int", shard, {6, 10}, *mesh, {dcp::Shard(0)});
    dcp::load(ctx, part, dir + "/dtypes-" + device.str());
    EXPECT(same_bits(box, src[0].slice(0, 3, 5).slice(1, 5, 9)));
    EXPECT(same_bits(shard, src[7]));

    EXPECT_ERROR(DCP_ERROR_UNSUPPORTED, "has no dcp_dtype", dcp::dtype_of(at::kComplexHalf));
    EXPECT_ERROR(DCP_ERROR_INVALID_ARGUMENT, "undefined", dcp::add_tensor(st, "undef", at::Tensor()));
}

// --- modules and optimizers ---------------------------------------------------------------------

struct NetImpl : torch::nn::Module {
    NetImpl()
        : net1(register_module("net1", torch::nn::Linear(8, 16))), net2(register_module("net2", torch::nn::Linear(16, 4))) {
        register_buffer("counts", torch::arange(5, torch::kLong));
    }
    torch::Tensor forward(torch::Tensor x) { return net2(torch::relu(net1(x))); }
    torch::nn::Linear net1, net2;
};
TORCH_MODULE(Net);

static float step(Net &model, torch::optim::Optimizer &opt, int64_t i, const at::Device &device) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(500 + i);
    at::Tensor x = torch::randn({16, 8}, gen).to(device), y = torch::randn({16, 4}, gen).to(device);
    opt.zero_grad();
    at::Tensor loss = torch::mse_loss(model->forward(x), y);
    loss.backward();
    opt.step();
    return loss.item<float>();
}

using MakeOpt = std::function<std::unique_ptr<torch::optim::Optimizer>(std::vector<at::Tensor>, bool fresh_hyper)>;

/** Train 3 steps, save, train 3 more; a fresh model + optimizer (other seed and hyper-
    parameters) loads and trains the same 3 steps bit for bit. */
static void check_resume(const char *name, const MakeOpt &make, const at::Device &device) {
    torch::manual_seed(1);
    Net a;
    a->to(device);
    auto oa = make(a->parameters(), false);
    for (int i = 0; i < 3; ++i) step(a, *oa, i, device);
    std::string path = dir + "/opt-" + name + "-" + device.str();
    dcp::Checkpointer ca(dcp::Context::local());
    int64_t saved_step = 3;
    ca.add_module(a).add_optimizer(*oa, a).add_value("train.step", &saved_step);
    ca.save(path);
    std::vector<float> want;
    for (int i = 3; i < 6; ++i) want.push_back(step(a, *oa, i, device));

    torch::manual_seed(2);
    Net b;
    b->to(device);
    auto ob = make(b->parameters(), true);
    int64_t loaded_step = -1;
    dcp::Checkpointer cb(dcp::Context::local());
    cb.add_module(b).add_optimizer(*ob, b).add_value("train.step", &loaded_step);
    cb.load(path);
    EXPECT(loaded_step == 3);
    std::vector<float> got;
    for (int i = 3; i < 6; ++i) got.push_back(step(b, *ob, i, device));
    bool same = got == want;
    for (size_t i = 0; i < a->parameters().size(); ++i) same = same && same_bits(a->parameters()[i], b->parameters()[i]);
    EXPECT(same);
    if (!same) std::fprintf(stderr, "  %s on %s: resumed training differs\n", name, device.str().c_str());
    EXPECT(same_bits(b->named_buffers()["counts"], torch::arange(5, torch::kLong).to(device)));
    EXPECT(ob->param_groups()[0].options().get_lr() == oa->param_groups()[0].options().get_lr());
}

static void test_optimizers(const at::Device &device) {
    using namespace torch::optim;
    check_resume("adam", [](std::vector<at::Tensor> p, bool fresh) -> std::unique_ptr<Optimizer> {
        return std::make_unique<Adam>(p, fresh ? AdamOptions(0.5).betas({0.5, 0.6}).eps(1e-3) : AdamOptions(1e-2).weight_decay(0.01));
    }, device);
    check_resume("amsgrad", [](std::vector<at::Tensor> p, bool fresh) -> std::unique_ptr<Optimizer> {
        return std::make_unique<Adam>(p, AdamOptions(fresh ? 0.5 : 1e-2).amsgrad(true));
    }, device);
    check_resume("adamw", [](std::vector<at::Tensor> p, bool fresh) -> std::unique_ptr<Optimizer> {
        return std::make_unique<AdamW>(p, AdamWOptions(fresh ? 0.5 : 1e-2).weight_decay(fresh ? 0.0 : 0.05));
    }, device);
    check_resume("sgd", [](std::vector<at::Tensor> p, bool fresh) -> std::unique_ptr<Optimizer> {
        return std::make_unique<SGD>(p, fresh ? SGDOptions(0.5).momentum(0.1) : SGDOptions(0.05).momentum(0.9).nesterov(true).dampening(0));
    }, device);
    check_resume("sgd0", [](std::vector<at::Tensor> p, bool fresh) -> std::unique_ptr<Optimizer> {
        return std::make_unique<SGD>(p, SGDOptions(fresh ? 0.5 : 0.05).weight_decay(fresh ? 0 : 1e-3));
    }, device);

    // Hyper-parameters and step counts are applied after the load.
    {
        torch::manual_seed(3);
        Net m;
        m->to(device);
        Adam opt(m->parameters(), AdamOptions(0.25).betas({0.8, 0.95}).eps(1e-6).weight_decay(0.125));
        for (int i = 0; i < 4; ++i) step(m, opt, i, device);
        dcp::Checkpointer c(dcp::Context::local());
        c.add_module(m).add_optimizer(opt, m);
        c.save(dir + "/hyper-" + device.str());
        auto keys = c.keys();
        EXPECT(keys.size() == 5 + 4 * 3 + 12); // 4 params + 1 buffer, 4 x (step, exp_avg, exp_avg_sq), 12 group entries
        EXPECT(std::find(keys.begin(), keys.end(), "optimizer.state.net1.weight.exp_avg_sq") != keys.end());
        EXPECT(std::find(keys.begin(), keys.end(), "optimizer.param_groups.0.decoupled_weight_decay") != keys.end());
        dcp::Checkpoint ck(dir + "/hyper-" + device.str());
        EXPECT(ck.read_literal("optimizer.param_groups.0.betas") == "(0.8, 0.95)");
        EXPECT(ck.read_literal("optimizer.param_groups.0.params") == "['net1.weight', 'net1.bias', 'net2.weight', 'net2.bias']");
        EXPECT(ck.read_literal("optimizer.param_groups.0.foreach") == "None");
        EXPECT(ck.read_double("optimizer.param_groups.0.weight_decay") == 0.125);
        float s = 0;
        ck.read_tensor("optimizer.state.net2.bias.step", &s, sizeof s);
        EXPECT(s == 4.0f);

        Net m2;
        m2->to(device);
        Adam opt2(m2->parameters(), AdamOptions(1.0));
        dcp::Checkpointer c2(dcp::Context::local());
        c2.add_module(m2).add_optimizer(opt2, m2);
        c2.load(dir + "/hyper-" + device.str());
        auto &o = static_cast<AdamOptions &>(opt2.param_groups()[0].options());
        EXPECT(o.lr() == 0.25 && std::get<0>(o.betas()) == 0.8 && std::get<1>(o.betas()) == 0.95 && o.eps() == 1e-6 &&
              o.weight_decay() == 0.125);
        for (auto &p : m2->parameters()) {
            auto it = opt2.state().find(p.unsafeGetTensorImpl());
            EXPECT(it != opt2.state().end() && static_cast<AdamParamState &>(*it->second).step() == 4);
        }

        // Mismatches: amsgrad, Adam vs AdamW, a group with other parameters.
        Net m3;
        m3->to(device);
        Adam ams(m3->parameters(), AdamOptions(1.0).amsgrad(true));
        dcp::Checkpointer c3(dcp::Context::local());
        c3.add_module(m3).add_optimizer(ams, m3);
        EXPECT_ERROR(DCP_ERROR_NOT_FOUND, "max_exp_avg_sq", c3.load(dir + "/hyper-" + device.str()));
        AdamW adamw(m3->parameters(), AdamWOptions(1.0));
        dcp::Checkpointer c4(dcp::Context::local());
        c4.add_module(m3).add_optimizer(adamw, m3);
        EXPECT_ERROR(DCP_ERROR_MISMATCH, "decoupled_weight_decay", c4.load(dir + "/hyper-" + device.str()));
        Adam half(m3->net1->parameters(), AdamOptions(1.0));
        dcp::Checkpointer c5(dcp::Context::local());
        c5.add_module(m3).add_optimizer(half, m3);
        EXPECT_ERROR(DCP_ERROR_MISMATCH, "params", c5.load(dir + "/hyper-" + device.str()));
        Adam ams2(m3->parameters(), AdamOptions(1.0).amsgrad(true));
        dcp::Checkpointer c6(dcp::Context::local());
        c6.add_module(m3).add_optimizer(ams2, m3);
        EXPECT_ERROR(DCP_ERROR_MISMATCH, "amsgrad", c6.load(dir + "/hyper-" + device.str(), dcp::LoadOptions().set_strict(false)));
        EXPECT(c6.missing_keys().size() == 4); // the max_exp_avg_sq of each parameter
    }

    // A fresh optimizer (LibTorch creates state at the first step) saves zeros and step 0, as
    // Python would after its lazy initialisation; a fresh one loads them and trains on.
    {
        torch::manual_seed(4);
        Net m;
        m->to(device);
        Adam opt(m->parameters(), AdamOptions(1e-2));
        EXPECT(opt.state().empty());
        dcp::Checkpointer c(dcp::Context::local());
        c.add_module(m).add_optimizer(opt, m);
        c.save(dir + "/fresh-" + device.str());
        EXPECT(opt.state().empty()); // saving did not create state
        float ref = step(m, opt, 0, device);

        torch::manual_seed(5);
        Net m2;
        m2->to(device);
        Adam opt2(m2->parameters(), AdamOptions(1e-2));
        dcp::Checkpointer c2(dcp::Context::local());
        c2.add_module(m2).add_optimizer(opt2, m2);
        c2.load(dir + "/fresh-" + device.str());
        EXPECT(opt2.state().size() == 4);
        EXPECT(step(m2, opt2, 0, device) == ref);
    }

    // Values, and missing keys (strict / partial).
    {
        int64_t i = 12;
        double d = 0.375;
        std::string bytes("x\0y", 3);
        bool flag = true;
        dcp::Checkpointer c(dcp::Context::local());
        c.add_value("v.i", &i).add_value("v.d", &d).add_value("v.b", &bytes).add_value("v.flag", &flag);
        c.add_tensor("v.t", at::arange(6, at::kFloat).view({2, 3}).to(device));
        c.save(dir + "/values-" + device.str());
        int64_t i2 = 0;
        double d2 = 0;
        std::string b2;
        bool f2 = false;
        at::Tensor t2 = at::zeros({3, 2}, at::TensorOptions().dtype(at::kFloat).device(device)).t();
        dcp::Checkpointer c2(dcp::Context::local());
        c2.add_value("v.i", &i2).add_value("v.d", &d2).add_value("v.b", &b2).add_value("v.flag", &f2).add_tensor("v.t", t2);
        c2.load(dir + "/values-" + device.str());
        EXPECT(i2 == 12 && d2 == 0.375 && b2 == bytes && f2);
        EXPECT(same_bits(t2, at::arange(6, at::kFloat).view({2, 3})));
        int64_t missing = 5;
        c2.add_value("v.missing", &missing);
        EXPECT_ERROR(DCP_ERROR_NOT_FOUND, "v.missing", c2.load(dir + "/values-" + device.str()));
        c2.load(dir + "/values-" + device.str(), dcp::LoadOptions().set_strict(false));
        EXPECT(c2.missing_keys() == std::vector<std::string>{"v.missing"} && missing == 5);
    }
}

/** CUDA: an async save returns once staged; the tensors change right after and the checkpoint
    keeps the old values; the checkpoint loads on CPU. */
static void test_cuda_async() {
    at::Device cuda("cuda");
    torch::manual_seed(6);
    Net m;
    m->to(cuda);
    torch::optim::Adam opt(m->parameters(), torch::optim::AdamOptions(1e-2));
    for (int i = 0; i < 2; ++i) step(m, opt, i, cuda);
    std::vector<at::Tensor> before;
    for (auto &p : m->parameters()) before.push_back(p.detach().cpu().clone());
    dcp::Checkpointer c(dcp::Context::local());
    c.add_module(m).add_optimizer(opt, m);
    dcp::Future f = c.save_async(dir + "/cuda-async");
    {
        torch::NoGradGuard ng;
        for (auto &p : m->parameters()) p.fill_(-7.0f);
    }
    f.wait();
    Net cpu;
    torch::optim::Adam opt2(cpu->parameters());
    dcp::Checkpointer c2(dcp::Context::local());
    c2.add_module(cpu).add_optimizer(opt2, cpu);
    c2.load(dir + "/cuda-async");
    for (size_t i = 0; i < before.size(); ++i) EXPECT(same_bits(cpu->parameters()[i], before[i]));

    // Zero-stall: stream-ordered (the current stream waits for the copies before the writes) and
    // a device snapshot smaller than the state (what does not fit is stream-ordered).
    for (uint64_t snapshot : {uint64_t(0), uint64_t(4096)}) {
        std::vector<at::Tensor> now;
        for (auto &p : m->parameters()) now.push_back(p.detach().cpu().clone());
        std::string path = dir + "/cuda-zero-stall-" + std::to_string(snapshot);
        dcp::Future z = c.save_async(path, dcp::SaveOptions().set_stream_ordered(true).set_device_snapshot(snapshot));
        dcp::stream_wait_current(z, cuda);
        {
            torch::NoGradGuard ng;
            for (auto &p : m->parameters()) p.add_(1.0f);
        }
        auto r = z.staging_report();
        EXPECT(r.stream_ordered_bytes > 0 && r.device_snapshot_bytes <= snapshot);
        z.wait();
        c2.load(path);
        for (size_t i = 0; i < now.size(); ++i) EXPECT(same_bits(cpu->parameters()[i], now[i]));
    }
}

/** A series under a dcp::Manager: a step saved after each training step (keep the last 2);
    the newest loses its .metadata; a fresh model and Adam resume with one call from the step
    before, bit for bit, and learn which step was skipped and why. */
static void test_manager_resume(const at::Device &device) {
    torch::manual_seed(3);
    Net a;
    a->to(device);
    torch::optim::Adam oa(a->parameters(), torch::optim::AdamOptions(1e-2));
    dcp::Checkpointer ca(dcp::Context::local());
    ca.add_module(a).add_optimizer(oa, a);
    std::string root = dir + "/series-" + device.str();
    std::vector<std::vector<at::Tensor>> saved;
    {
        dcp::Manager m(ca.context(), root, dcp::ManagerPolicy().set_keep_last(2));
        for (uint64_t i = 1; i <= 5; ++i) {
            step(a, oa, static_cast<int64_t>(i), device);
            std::vector<at::Tensor> now;
            for (auto &p : a->parameters()) now.push_back(p.detach().cpu().clone());
            saved.push_back(now);
            if (i < 5)
                ca.save(m, i);
            else
                ca.save_async(m, i).wait();
        }
        m.finish();
    }
    EXPECT(!std::filesystem::exists(root + "/step-00000003") && std::filesystem::exists(root + "/step-00000004"));
    std::filesystem::remove(root + "/step-00000005/.metadata");
    torch::manual_seed(4);
    Net b;
    b->to(device);
    torch::optim::Adam ob(b->parameters(), torch::optim::AdamOptions(1e-2));
    dcp::Checkpointer cb(dcp::Context::local());
    cb.add_module(b).add_optimizer(ob, b);
    dcp::Manager mb(cb.context(), root, dcp::ManagerPolicy().set_read_only(true));
    auto resumed = cb.load_latest(mb);
    EXPECT(resumed && *resumed == 4);
    for (size_t i = 0; i < saved[3].size(); ++i) EXPECT(same_bits(b->parameters()[i], saved[3][i].to(device)));
    auto skipped = mb.skipped();
    EXPECT(skipped.size() == 1 && skipped[0].step == 5 && skipped[0].health == DCP_STEP_UNCOMMITTED);
    // An empty series: nothing to resume from, nothing changed.
    dcp::Manager empty(cb.context(), dir + "/series-empty-" + device.str());
    EXPECT(!cb.load_latest(empty));
}

int main(int argc, char **argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: test_dcp_torch SCRATCH_DIR\n");
        return 2;
    }
    dir = argv[1];
    torch::set_num_threads(1);
    std::vector<at::Device> devices{at::Device("cpu")};
    if (torch::cuda::is_available()) devices.emplace_back("cuda");
    try {
        for (const auto &d : devices) {
            test_dtypes(d);
            test_optimizers(d);
            test_manager_resume(d);
        }
        if (torch::cuda::is_available()) test_cuda_async();
    } catch (const std::exception &e) {
        std::fprintf(stderr, "unexpected exception: %s\n", e.what());
        return 1;
    }
    std::printf("test_dcp_torch: %d checks, %d failed (%s)\n", checks, failures,
                torch::cuda::is_available() ? "CPU and CUDA" : "CPU only: no GPU here");
    return failures ? 1 : 0;
}
