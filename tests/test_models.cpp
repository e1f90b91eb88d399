#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "autograd/autograd.h"
#include "datasets/synthetic.h"
#include "engine/memory.h"
#include "engine/safetensors.h"
#include "models/ema.h"
#include "models/optim.h"
#include "models/vit.h"
#include "ops/elementwise.h"
#include "ops/loss.h"
#include "ops/matmul.h"
#include "ops/shape.h"
#include "ops/tile_gemm.h"
#include "tests/helpers.h"
#include "train/checkpoint.h"
#include "train/evaluate.h"
#include "train/loop.h"
#include "train/progress.h"
#include "train/step.h"
#include "train/stop.h"

using namespace mv;
using namespace mv::models;
using namespace mv::train;

static ViTConfig tiny_config() { return {28, 1, 7, 16, 2, 2, 32, 10}; }

TEST_CASE("ViT: parameter names, shapes and output") {
  ViT m(tiny_config(), 0);
  auto params = m.named_parameters();
  std::map<std::string, Shape> shapes;
  for (auto& [n, p] : params) shapes[n] = p.shape();
  CHECK(shapes.at("patch_embed.weight") == Shape{49, 16});
  CHECK(shapes.at("cls") == Shape{1, 1, 16});
  CHECK(shapes.at("pos") == Shape{1, 17, 16});
  CHECK(shapes.at("blocks.1.attn.qkv.weight") == Shape{16, 48});
  CHECK(shapes.at("blocks.0.mlp.fc1.bias") == Shape{32});
  CHECK(shapes.at("head.weight") == Shape{16, 10});
  Tensor logits = m.forward(randn({3, 1, 28, 28}));
  CHECK(logits.shape() == Shape{3, 10});
  // The zero-initialised head gives uniform predictions: loss log(10) exactly.
  CHECK(ops::cross_entropy(logits, Tensor::from_i64({1, 2, 3}, {3})).item() ==
        doctest::Approx(std::log(10.0)).epsilon(1e-6));
  CHECK_THROWS_WITH_AS(m.forward(randn({3, 1, 32, 32})), doctest::Contains("do not match"), Error);
}

TEST_CASE("ViT: impossible configs and unknown presets fail clearly") {
  ViTConfig c = tiny_config();
  c.patch = 5;
  CHECK_THROWS_WITH_AS(ViT(c, 0), doctest::Contains("not a multiple of patch size 5"), Error);
  c = tiny_config();
  c.heads = 3;
  CHECK_THROWS_WITH_AS(ViT(c, 0), doctest::Contains("not divisible by 3 heads"), Error);
  CHECK_THROWS_WITH_AS(vit_preset("vit-huge"), doctest::Contains("unknown model preset 'vit-huge'"), Error);
}

TEST_CASE("ViT: end-to-end gradient of a few parameters") {
  ViT m({8, 1, 4, 8, 1, 2, 16, 3}, 1);
  // The head starts at zero, so nothing below it would get a gradient: give it values.
  m.head->weight.copy_(test::param({8, 3}, 2, 0.5f).detach());
  Tensor x = randn({2, 1, 8, 8});
  Tensor labels = Tensor::from_i64({0, 2}, {2});
  for (const char* name : {"pos", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.bias", "norm.weight"}) {
    Tensor p;
    for (auto& [n, t] : m.named_parameters())
      if (n == name) p = t;
    INFO(name);
    // Finite differences on the model's own parameter (the first 12 elements).
    p.zero_grad();
    Tensor loss = ops::cross_entropy(m.forward(x), labels);
    loss.backward();
    std::vector<float> analytic = p.grad().to_vector<float>();
    float* d = p.data<float>();
    const float eps = 1e-3f;  // gradients here reach ~100: a small step keeps curvature out
    for (int64_t i = 0; i < std::min<int64_t>(p.numel(), 12); ++i) {
      autograd::NoGrad ng;
      const float o = d[i];
      d[i] = o + eps;
      const double lp = ops::cross_entropy(m.forward(x), labels).item();
      d[i] = o - eps;
      const double lm = ops::cross_entropy(m.forward(x), labels).item();
      d[i] = o;
      const double numeric = (lp - lm) / (2 * eps);
      CHECK(std::fabs(numeric - analytic[size_t(i)]) <= 1e-2 + 2e-2 * std::fabs(numeric));
    }
  }
}

TEST_CASE("MLP: the fused CPU path matches linear, gelu, linear, forward and every gradient") {
  Generator g(12);
  MLP mlp(6, 7, g);
  mlp.fc1->bias.copy_(test::param({7}, 13).detach());
  mlp.fc2->bias.copy_(test::param({6}, 14).detach());
  std::vector<Tensor> ps = {mlp.fc1->weight, mlp.fc1->bias, mlp.fc2->weight, mlp.fc2->bias};
  std::vector<Tensor> twins;
  for (const Tensor& p : ps) twins.push_back(p.detach().clone().set_requires_grad(true));
  // 2 x 300 tokens: more than one 256-row block per thread, and a partial block.
  Tensor x = test::param({2, 300, 6}, 15), xc = x.detach().clone().set_requires_grad(true);
  Tensor y = mlp.forward(x);
  Tensor yc = ops::linear(ops::gelu(ops::linear(xc, twins[0], twins[1])), twins[2], twins[3]);
  REQUIRE(y.shape() == Shape{2, 300, 6});
  test::check_close(y, yc.to_vector<float>(), 1e-5f, 1e-5f);
  Tensor r = test::param(y.shape(), 16).detach();
  y.backward(r);
  yc.backward(r);
  test::check_close(x.grad(), xc.grad().to_vector<float>(), 1e-5f, 1e-5f);
  for (size_t i = 0; i < ps.size(); ++i) {
    CAPTURE(i);
    test::check_close(ps[i].grad(), twins[i].grad().to_vector<float>(), 1e-4f, 1e-5f);
  }
  CHECK_THROWS_WITH_AS(mlp.forward(randn({2, 5})), doctest::Contains("must be (..., 6)"), Error);
}

TEST_CASE("MLP: gradcheck of the fused CPU path") {
  Generator g(17);
  MLP mlp(3, 5, g);
  mlp.fc1->bias.copy_(test::param({5}, 18).detach());
  Tensor x = test::param({2, 4, 3}, 19);
  test::check_grad([&](const std::vector<Tensor>& in) { return mlp.forward(in[0]); },
                   {x, mlp.fc1->weight, mlp.fc1->bias, mlp.fc2->weight, mlp.fc2->bias});
}

TEST_CASE("AdamW matches a hand-computed first step, and skips decay where it should") {
  Tensor w = Tensor::from({1.0f, -2.0f, 3.0f, 0.5f}, {2, 2}).set_requires_grad(true);
  Tensor b = Tensor::from({1.0f, 1.0f}, {2}).set_requires_grad(true);
  w.set_grad(Tensor::from({0.1f, 0.2f, -0.3f, 0.0f}, {2, 2}));
  b.set_grad(Tensor::from({0.5f, -0.5f}, {2}));
  AdamW opt({{"fc.weight", w}, {"fc.bias", b}}, 0.1f);
  opt.step(0.01f);
  // First step: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps) = lr * sign(g).
  test::check_close(w, {1.0f - 0.001f * 1.0f - 0.01f, -2.0f + 0.002f - 0.01f,
                        3.0f - 0.003f + 0.01f, 0.5f - 0.0005f}, 1e-6f);
  test::check_close(b, {1.0f - 0.01f, 1.0f + 0.01f}, 1e-6f);
  CHECK(decays("blocks.0.mlp.fc1.weight", w));
  CHECK_FALSE(decays("pos", Tensor::zeros({1, 5, 4})));
  CHECK_FALSE(decays("cls", Tensor::zeros({1, 1, 4})));
  CHECK_FALSE(decays("norm.weight", b));
}

TEST_CASE("SGD with momentum and gradient clipping") {
  Tensor w = Tensor::from({1.0f, 1.0f}, {1, 2}).set_requires_grad(true);
  w.set_grad(Tensor::from({3.0f, 4.0f}, {1, 2}));  // norm 5
  ClipResult c = clip_scale({w}, 1.0f);
  CHECK(c.norm == doctest::Approx(5.0f));
  CHECK(c.scale == doctest::Approx(0.2f).epsilon(1e-5));
  CHECK(clip_scale({w}, 10.0f).scale == 1.0f);
  // Gradients longer than one summation block (4096), with a partial last block, and two tensors:
  // the norm against a sum in double.
  Tensor u = Tensor::zeros({9001}).set_requires_grad(true), z = Tensor::zeros({3, 5}).set_requires_grad(true);
  Tensor gu = test::param({9001}, 5).detach(), gz = test::param({3, 5}, 6).detach();
  u.set_grad(gu);
  z.set_grad(gz);
  double sq = 0;
  for (const Tensor& g : {gu, gz})
    for (float v : g.to_vector<float>()) sq += double(v) * v;
  CHECK(clip_scale({u, z}, 1.0f).norm == doctest::Approx(std::sqrt(sq)).epsilon(1e-6));
  SGD opt({{"w", w}}, 0.9f, 0.0f);
  opt.step(0.1f, c.scale);  // buffer = g/5 = (0.6, 0.8)
  opt.step(0.1f, c.scale);  // buffer = 0.9 * b + g/5 = (1.14, 1.52)
  test::check_close(w, {1.0f - 0.1f * (0.6f + 1.14f), 1.0f - 0.1f * (0.8f + 1.52f)}, 1e-6f);
}

TEST_CASE("learning-rate schedules") {
  CHECK(lr_at(0, 100, 10, 1.0f, Schedule::Cosine) == doctest::Approx(0.1f));
  CHECK(lr_at(9, 100, 10, 1.0f, Schedule::Cosine) == doctest::Approx(1.0f));
  CHECK(lr_at(10, 100, 10, 1.0f, Schedule::Cosine) == doctest::Approx(1.0f));
  CHECK(lr_at(55, 100, 10, 1.0f, Schedule::Cosine) == doctest::Approx(0.5f));
  CHECK(lr_at(100, 100, 10, 1.0f, Schedule::Cosine) == doctest::Approx(0.0f));
  CHECK(lr_at(55, 100, 10, 2.0f, Schedule::Linear) == doctest::Approx(1.0f));
}

TEST_CASE("checkpoints: round trip, and mismatches named") {
  const std::string path = "/tmp/moevit_test_ckpt.safetensors";
  ViT a(tiny_config(), 1), b(tiny_config(), 2);
  AdamW opt(a.named_parameters(), 0.05f);
  save_checkpoint(path, a, &opt, {{"epoch", "3"}});
  Metadata meta = load_checkpoint(path, b, nullptr);
  CHECK(meta.at("epoch") == "3");
  auto pa = a.named_parameters(), pb = b.named_parameters();
  for (size_t i = 0; i < pa.size(); ++i) CHECK(pa[i].second.to_vector<float>() == pb[i].second.to_vector<float>());
  ViTConfig wider = tiny_config();
  wider.dim = 32, wider.mlp_dim = 64;
  ViT c(wider, 0);
  CHECK_THROWS_WITH_AS(load_checkpoint(path, c, nullptr), doctest::Contains("'cls' is F32 (1, 1, 16) cpu but the model expects F32 (1, 1, 32)"), Error);
  std::remove(path.c_str());
}

TEST_CASE("checkpoints: a run folder names the checkpoint inside it") {
  namespace fs = std::filesystem;
  const std::string dir = "/tmp/moevit_test_run_folder";
  fs::create_directories(dir);
  CHECK(checkpoint_file(dir) == dir + "/checkpoint.safetensors");
  CHECK(checkpoint_file(dir + "/other.safetensors") == dir + "/other.safetensors");
  CHECK(checkpoint_file("/tmp/moevit_no_such_path") == "/tmp/moevit_no_such_path");
  fs::remove_all(dir);
}

static TrainConfig smoke_config() {
  TrainConfig c;
  c.dataset = "synthetic";
  c.model = "test";
  c.vit = tiny_config();
  c.epochs = 2;
  c.batch = 32;
  c.eval_batch = 64;
  c.lr = 3e-3f;
  c.limit_train = 192;
  c.limit_test = 64;
  c.warmup_epochs = 0.5f;
  return c;
}

static std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream f(path);
  std::vector<std::string> out;
  for (std::string l; std::getline(f, l);) out.push_back(l);
  return out;
}

TEST_CASE("a run resumed from epoch 1 reproduces the uninterrupted run bit for bit") {
  namespace fs = std::filesystem;
  const std::string a = "/tmp/moevit_test_run_a", b = "/tmp/moevit_test_run_b";
  fs::remove_all(a);
  fs::remove_all(b);
  TrainConfig c = smoke_config();
  fit(c, a, false, nullptr);
  fit(c, b, false, nullptr, /*stop_after=*/1);
  CHECK(read_lines(b + "/metrics.jsonl").size() == 1);
  const TrainResult rb = fit(c, b, /*resume=*/true, nullptr);
  // Losses, accuracies and learning rates of both epochs agree exactly (timings differ).
  auto la = read_lines(a + "/metrics.jsonl"), lb = read_lines(b + "/metrics.jsonl");
  REQUIRE(la.size() == 2);
  REQUIRE(lb.size() == 2);
  for (size_t i = 0; i < 2; ++i) CHECK(la[i].substr(0, la[i].find("epoch_seconds")) ==
                                       lb[i].substr(0, lb[i].find("epoch_seconds")));
  // And so do the final parameters and optimizer state.
  test::check_same_checkpoint(a, b);
  // The resumed run's training time counts both epochs, not only the one it ran.
  double summed = 0;
  for (auto& l : lb) summed += nlohmann::json::parse(l).at("epoch_seconds").get<double>();
  CHECK(rb.train_seconds == doctest::Approx(summed));
  fs::remove_all(a);
  fs::remove_all(b);
}

// A stop signal (train/stop.h) raised before fit stops it after its first step: the checkpoint
// then holds one step, and the resumed run ends where the uninterrupted one does, bit for bit.
static void check_stop_and_resume(const TrainConfig& c) {
  namespace fs = std::filesystem;
  const std::string a = "/tmp/moevit_test_stop_a", b = "/tmp/moevit_test_stop_b";
  fs::remove_all(a);
  fs::remove_all(b);
  fit(c, a, false, nullptr);
  request_stop(SIGINT);
  const TrainResult stopped = fit(c, b, false, nullptr);
  request_stop(0);
  CHECK(stopped.stop_signal == SIGINT);
  const Metadata meta = read_checkpoint_metadata(run_checkpoint(b));
  CHECK(meta.at("epoch") == "0");
  CHECK(meta.at("epoch_batches") == "1");
  CHECK(meta.at("optimizer_steps") == "1");
  const auto line = nlohmann::json::parse(read_lines(b + "/metrics.jsonl").at(0));
  CHECK(line.at("stopped_by") == "SIGINT");
  CHECK(line.at("epoch_batches") == 1);
  const TrainResult resumed = fit(c, b, /*resume=*/true, nullptr);
  CHECK(resumed.stop_signal == 0);
  CHECK(resumed.epochs_done == c.epochs);
  test::check_same_checkpoint(a, b);
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST_CASE("a run stopped by a signal in mid-epoch resumes at the next batch, bit for bit") {
  SUBCASE("dense, one view with crops and flips") { check_stop_and_resume(smoke_config()); }
  SUBCASE("MoE with PRC's two views and router noise") {
    TrainConfig c = smoke_config();
    c.vit.moe_placement = "every-2";
    c.vit.moe.mlp_dim = c.vit.mlp_dim;
    c.vit.moe.router.experts = 4;
    c.prc = true;
    check_stop_and_resume(c);
  }
  SUBCASE("with an average of the weights (--ema)") {
    TrainConfig c = smoke_config();
    c.ema = true;
    check_stop_and_resume(c);
  }
}

TEST_CASE("the weight average follows its formula, swaps in and out, and is what eval loads") {
  ViT m(tiny_config(), 0);
  const Tensor w = m.named_parameters().at(0).second;
  const std::vector<float> w0 = w.to_vector<float>();
  WeightAverage avg(m.named_parameters(), 0.5f);
  // Two updates after the weights moved by +1: d_0 = min(0.5, 1/10), d_1 = min(0.5, 2/11).
  for (auto& [n, p] : m.named_parameters()) p.copy_(ops::add(p, 1.f));
  avg.update();
  avg.update();
  const double expected = 1.0 - 0.1 * (2.0 / 11.0);  // 1 - d_0 d_1 of the step of 1
  avg.swap();
  const std::vector<float> a = w.to_vector<float>();
  for (size_t i = 0; i < a.size(); ++i) CHECK(a[i] - w0[i] == doctest::Approx(expected).epsilon(1e-5));
  avg.swap();
  const std::vector<float> back = w.to_vector<float>();
  for (size_t i = 0; i < a.size(); ++i) CHECK(back[i] == doctest::Approx(w0[i] + 1.f));
  // A checkpoint with averages: evaluation loads them, a plain one loads the weights.
  const std::string path = "/tmp/moevit_test_ema.safetensors";
  save_checkpoint(path, m, nullptr, {}, &avg);
  ViT e(tiny_config(), 7);
  CHECK(load_weights_for_evaluation(path, e));
  CHECK(e.named_parameters().at(0).second.to_vector<float>() == a);
  save_checkpoint(path, m, nullptr, {});
  CHECK_FALSE(load_weights_for_evaluation(path, e));
  CHECK(e.named_parameters().at(0).second.to_vector<float>() == back);
  std::remove(path.c_str());
  CHECK_THROWS_WITH_AS(WeightAverage(m.named_parameters(), 1.f), doctest::Contains("--ema-decay"), Error);
}

TEST_CASE("--eval-flip: each image's logits are the mean of its own and its mirror image's") {
  ViT m(tiny_config(), 0);
  Generator g(5);
  m.head->weight.copy_(randn(m.head->weight.shape(), g));  // zero at first: logits = bias
  const datasets::Dataset data = datasets::make_synthetic(6, 1, 28, 10, 3);
  datasets::Dataset mirrored = data;  // by hand: column x reads column 27 - x
  for (int64_t i = 0; i < data.n; ++i)
    for (int64_t y = 0; y < 28; ++y)
      for (int64_t x = 0; x < 28; ++x)
        mirrored.pixels[size_t((i * 28 + y) * 28 + x)] = data.pixels[size_t((i * 28 + y) * 28 + 27 - x)];
  // Batches of 4: the last one is partial.
  const std::vector<float> a = evaluate(m, data, "synthetic", {.batch = 4, .keep_logits = true})
                                   .logits.to_vector<float>(),
                           b = evaluate(m, mirrored, "synthetic", {.batch = 4, .keep_logits = true})
                                   .logits.to_vector<float>();
  CHECK(a != b);
  std::vector<float> want(a.size());
  for (size_t i = 0; i < a.size(); ++i) want[i] = 0.5f * (a[i] + b[i]);
  const EvalResult both =
      evaluate(m, data, "synthetic", {.batch = 4, .flip = true, .keep_logits = true});
  CHECK(both.n == 6);
  test::check_close(both.logits, want, 1e-5f, 1e-5f);
  TrainConfig t;
  t.eval_flip = true;
  CHECK(TrainConfig::from_json(t.to_json()).eval_flip);
}

TEST_CASE("a time budget caps the epochs, and stops a run that reaches it with a checkpoint") {
  namespace fs = std::filesystem;
  const std::string dir = "/tmp/moevit_test_budget";
  fs::remove_all(dir);
  TrainConfig c = smoke_config();
  c.time_budget_minutes = 10;  // far more than the 2 epochs need: --epochs caps them
  CHECK(fit(c, dir, false, nullptr).epochs_done == 2);
  CHECK(TrainConfig::from_json(read_checkpoint_metadata(run_checkpoint(dir)).at("config")).epochs == 2);
  fs::remove_all(dir);
  c.time_budget_minutes = 1e-5f;  // 0.6 ms: over after the first step
  const TrainResult r = fit(c, dir, false, nullptr);
  CHECK(r.epochs_done == 0);
  CHECK(r.stop_signal == 0);
  const Metadata meta = read_checkpoint_metadata(run_checkpoint(dir));
  CHECK(meta.at("epoch_batches") == "1");
  CHECK(std::stod(meta.at("wall_seconds")) > 0);
  const auto line = nlohmann::json::parse(read_lines(dir + "/metrics.jsonl").at(0));
  CHECK(line.at("stopped_by") == "time budget");
  fs::remove_all(dir);
}

TEST_CASE("the time budget's schedule in steps: grown or cut at any epoch, capped by --epochs") {
  CHECK(steps_for_budget(468, 546, 0.125, 100000) == 468 + 4368);  // 4368 more fit
  CHECK(steps_for_budget(468, 546, 0.125, 3000) == 3000);           // --epochs caps it
  CHECK(steps_for_budget(468, 0.1, 0.125, 100000) == 468);          // not even one more
  CHECK(steps_for_budget(4000, 125.06, 0.125, 100000) == 5000);     // late in the run too
  CHECK(steps_for_budget(3000, -5, 0.125, 100000) == 3000);         // over already: what is done
  CHECK(steps_for_budget(3000, 50, 0.125, 2000) == 3000);          // never below what is done
}

TEST_CASE("a schedule that ends inside an epoch evaluates there, and a resume finds it complete") {
  namespace fs = std::filesystem;
  const std::string dir = "/tmp/moevit_test_partial";
  fs::remove_all(dir);
  TrainConfig c = smoke_config();   // 6 batches an epoch
  c.schedule_steps = 6 + 2;         // as a time budget sets it: the second epoch ends after 2
  const TrainResult r = fit(c, dir, false, nullptr);
  CHECK(r.epochs_done == 2);
  CHECK(r.test_accuracy > 0);
  const std::vector<std::string> lines = read_lines(dir + "/metrics.jsonl");
  REQUIRE(lines.size() == 2);
  const auto last = nlohmann::json::parse(lines[1]);
  CHECK(last.at("step") == 8);
  CHECK(last.at("epoch_batches") == 2);
  CHECK(last.contains("test_accuracy"));
  CHECK_FALSE(nlohmann::json::parse(lines[0]).contains("epoch_batches"));
  const Metadata meta = read_checkpoint_metadata(run_checkpoint(dir));
  CHECK(meta.at("epoch") == "1");
  CHECK(meta.at("epoch_batches") == "2");
  // Resuming the finished run takes no step and adds no line.
  fit(c, dir, true, nullptr);
  CHECK(read_lines(dir + "/metrics.jsonl").size() == 2);
  fs::remove_all(dir);
  c.schedule_steps = -1;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("schedule_steps"), Error);
}

TEST_CASE("the progress line names the epoch count, or '?' before a time budget has sized it") {
  auto line = [](int epochs) {
    FILE* f = std::tmpfile();  // not a terminal: one line per tenth of the epoch, and the last
    mv::train::Progress(f, 1, epochs, 4).update(4, 0.5, 0.25, 100, 0);
    std::rewind(f);
    char buf[256] = {};
    const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    return std::string(buf, n);
  };
  CHECK(line(10).rfind("epoch 1/10 [====================] 4/4 loss 0.5000 acc 25.00% 100 img/s", 0) == 0);
  CHECK(line(0).rfind("epoch 1/? [", 0) == 0);
}

TEST_CASE("resume refuses checkpoint metadata that does not fit the run") {
  namespace fs = std::filesystem;
  const std::string dir = "/tmp/moevit_test_bad_meta";
  fs::remove_all(dir);
  const TrainConfig c = smoke_config();
  fit(c, dir, false, nullptr, /*stop_after=*/1);
  const std::string ckpt = run_checkpoint(dir);
  Metadata meta;
  const TensorMap tensors = load_safetensors(ckpt, &meta);
  auto resume_with = [&](const std::string& key, const std::string& value) {
    Metadata m = meta;
    m[key] = value;
    save_safetensors(ckpt, tensors, m);
    return fit(c, dir, true, nullptr);
  };
  CHECK_THROWS_WITH_AS(resume_with("epoch", "-1"), doctest::Contains("metadata 'epoch' is '-1', "
                       "expected a whole number in 0..2"), Error);
  CHECK_THROWS_WITH_AS(resume_with("epoch", "99"), doctest::Contains("metadata 'epoch' is '99'"), Error);
  CHECK_THROWS_WITH_AS(resume_with("epoch", "1x"), doctest::Contains("metadata 'epoch' is '1x'"), Error);
  CHECK_THROWS_WITH_AS(resume_with("epoch_batches", "6"), doctest::Contains("'epoch_batches' is '6', "
                       "expected a whole number in 0..5"), Error);
  CHECK_THROWS_WITH_AS(resume_with("optimizer_steps", "99999999999999999999"),
                       doctest::Contains("'optimizer_steps' is '99999999999999999999'"), Error);
  CHECK_THROWS_WITH_AS(resume_with("optimizer_steps", "5"), doctest::Contains("its optimizer took 5 "
                       "steps, but epoch 1 + batch 0"), Error);
  CHECK_THROWS_WITH_AS(resume_with("train_seconds", "nan"), doctest::Contains("'train_seconds' is "
                       "'nan'"), Error);
  // A configuration that asks for an absurd model is refused before anything is allocated.
  auto cfg = nlohmann::json::parse(meta.at("config"));
  cfg["depth"] = 1000000000;
  CHECK_THROWS_WITH_AS(resume_with("config", cfg.dump()), doctest::Contains("the training "
                       "configuration in its metadata is invalid: ViT config: depth 1000000000"), Error);
  cfg["depth"] = "six";
  CHECK_THROWS_WITH_AS(resume_with("config", cfg.dump()), doctest::Contains("training configuration"), Error);
  fs::remove_all(dir);
}

TEST_CASE("a non-finite loss stops training with the step, and the last checkpoint survives") {
  namespace fs = std::filesystem;
  const std::string dir = "/tmp/moevit_test_run_nan";
  fs::remove_all(dir);
  TrainConfig c = smoke_config();
  fit(c, dir, false, nullptr, /*stop_after=*/1);
  std::ifstream f0(dir + "/checkpoint.safetensors", std::ios::binary);
  std::string before((std::istreambuf_iterator<char>(f0)), {});
  c.lr = 1e30f;  // the first update overflows the weights
  CHECK_THROWS_WITH_AS(fit(c, dir, false, nullptr), doctest::Contains("at step"), Error);
  std::ifstream f1(dir + "/checkpoint.safetensors", std::ios::binary);
  std::string after((std::istreambuf_iterator<char>(f1)), {});
  CHECK(before == after);
  fs::remove_all(dir);
}

TEST_CASE("training configs: impossible values are named") {
  TrainConfig c = smoke_config();
  c.epochs = 0;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("--epochs"), Error);
  c = smoke_config();
  c.optimizer = "lamb";
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("--optimizer must be adamw or sgd"), Error);
  c = smoke_config();
  c.dataset = "imagenet";
  CHECK_THROWS_WITH_AS(fit(c, "/tmp/moevit_test_bad", false, nullptr), doctest::Contains("unknown data set 'imagenet'"), Error);
  CHECK_THROWS_WITH_AS(fit(smoke_config(), "/tmp/moevit_test_missing", true, nullptr),
                       doctest::Contains("no checkpoint at"), Error);
  CHECK(TrainConfig::from_json(smoke_config().to_json()).to_json() == smoke_config().to_json());
}

TEST_CASE("training configs: --device, --tf32 and --bf16 are validated and saved") {
  TrainConfig c = smoke_config();
  c.device = "tpu";
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("--device must be cpu or cuda"), Error);
  c.device = "cuda";
  if (!cuda_available()) CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("--device"), Error);
  c = smoke_config();
  c.tf32 = true;  // TF32 is a CUDA GEMM mode: refused on the CPU
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("--tf32 applies to CUDA GEMMs only"), Error);
  c.device = "cuda";
  const TrainConfig r = TrainConfig::from_json(c.to_json());
  CHECK(r.device == "cuda");
  CHECK(r.tf32);
  CHECK(r.to_json() == c.to_json());
  c = smoke_config();
  c.bf16 = true;  // bfloat16 products are a CPU mode: refused on CUDA, saved and read back
  if (ops::tile_gemm_has_bf16())
    CHECK_NOTHROW(c.validate());
  else
    CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("--bf16: this build has no bfloat16 products"), Error);
  CHECK(TrainConfig::from_json(c.to_json()).bf16);
  c.device = "cuda";
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("--bf16 applies to CPU matrix products only"), Error);
  // A configuration saved before --device existed reads as CPU.
  std::string old = smoke_config().to_json();
  const size_t at = old.find(",\"device\"");
  REQUIRE(at != std::string::npos);
  old = old.substr(0, at) + "}";
  CHECK(TrainConfig::from_json(old).device == "cpu");
}

// The number logged under `key` in dir/metrics.jsonl, which must hold exactly one epoch.
static double only_epoch_metric(const std::string& dir, const std::string& key) {
  const std::vector<std::string> lines = read_lines(dir + "/metrics.jsonl");
  REQUIRE(lines.size() == 1);
  const std::string tag = "\"" + key + "\":";
  const size_t at = lines[0].find(tag);
  REQUIRE(at != std::string::npos);
  return std::stod(lines[0].substr(at + tag.size()));
}

TEST_CASE("PRC training: two views, the PRC loss is logged; a dense model is refused") {
  namespace fs = std::filesystem;
  const std::string dir = "/tmp/moevit_test_prc";
  fs::remove_all(dir);
  TrainConfig c = smoke_config();
  c.prc = true;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("--prc needs a model with MoE layers"), Error);
  c.vit.moe_placement = "every-2";  // block 1 of 2
  c.vit.moe.mlp_dim = 32;
  c.vit.moe.router.experts = 4;
  c.vit.moe.router.importance_weight = c.vit.moe.router.load_weight = 0.f;
  c.epochs = 1;
  CHECK(TrainConfig::from_json(c.to_json()).to_json() == c.to_json());
  fit(c, dir, false, nullptr);
  const double prc = only_epoch_metric(dir, "prc_loss");
  CHECK(prc > 0.0);
  // C's entries are >= 0 and sum to E, so L_diag <= 3 and L_off <= 4/3 for E = 4: below 0.082.
  CHECK(prc < 0.082);

  // --prc-blocks: only MoE blocks; with MoE in blocks 1 and 3, PRC on block 3 alone is one term
  // of the two-layer sum, so about half of it.
  c.prc_blocks = {0};
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("--prc-blocks: block 0 has no MoE layer"),
                       Error);
  c.vit.depth = 4;
  c.prc_blocks = {1, 3};
  c.prc_cls_pair = true;
  const TrainConfig back = TrainConfig::from_json(c.to_json());
  CHECK((back.prc_blocks == c.prc_blocks && back.prc_cls_pair));
  fit(c, dir, false, nullptr);
  const double both = only_epoch_metric(dir, "prc_loss");
  c.prc_blocks = {3};
  fit(c, dir, false, nullptr);
  const double one = only_epoch_metric(dir, "prc_loss");
  CHECK(one > 0.25 * both);
  CHECK(one < 0.75 * both);
  fs::remove_all(dir);
}

TEST_CASE("ViT --pool mean: the head reads the mean of the final patch tokens") {
  ViTConfig c = tiny_config();
  c.pool = "mean";
  ViT m(c, 0);
  Generator g(3);
  m.head->weight.copy_(randn(m.head->weight.shape(), g));  // zero at first: logits = bias
  const Tensor images = randn({2, 1, 28, 28}, g);
  // the blocks by hand, then the pooling and the head in loops
  Tensor x = m.patch_embed->forward(ops::patchify(images, c.patch));
  x = ops::concat({ops::add(Tensor::zeros({2, 1, 16}), m.cls), x}, 1) + m.pos;
  for (auto& b : m.blocks) x = b->forward(x);
  const std::vector<float> h = m.norm->forward(x).to_vector<float>(), w = m.head->weight.to_vector<float>(),
                           bias = m.head->bias.to_vector<float>();
  const int64_t T = c.tokens(), D = c.dim, K = c.num_classes;
  std::vector<float> want;
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t k = 0; k < K; ++k) {
      double acc = bias[size_t(k)];
      for (int64_t d = 0; d < D; ++d) {
        double mean = 0;
        for (int64_t t = 1; t < T; ++t) mean += h[size_t((b * T + t) * D + d)];
        acc += mean / double(T - 1) * w[size_t(d * K + k)];
      }
      want.push_back(float(acc));
    }
  test::check_close(m.forward(images), want, 1e-5f, 1e-4f);
  c.pool = "max";
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("pool 'max' must be cls or mean"), Error);
  TrainConfig t;
  t.vit.pool = "mean";
  CHECK(TrainConfig::from_json(t.to_json()).vit.pool == "mean");
}

TEST_CASE("PRC on a share of the batch: view 1 of the first images only, their PRC as alone") {
  TrainConfig c = smoke_config();
  c.prc = true;
  c.vit.moe_placement = "every-2";
  c.vit.moe.router.experts = 4;
  c.vit.moe.router.noise_std = 0.f;  // no noise: the same rows route alike in any batch
  c.vit.moe.router.importance_weight = c.vit.moe.router.load_weight = 0.f;
  CHECK(prc_images(0.5f, 8) == 4);
  CHECK(prc_images(0.01f, 8) == 1);
  CHECK(prc_images(1.f, 8) == 8);
  Generator g(4);
  datasets::TwoViewConfig tv = datasets::TwoViewConfig::for_image_size(28);
  tv.patch = c.vit.patch;
  const datasets::TwoViews v = datasets::make_two_views(randn({8, 1, 28, 28}, g), tv, g);
  auto batch = [&](int64_t n) {
    datasets::Batch b;
    b.images = ops::slice(v.images, 0, 0, n).contiguous(), b.images2 = ops::slice(v.images2, 0, 0, n).contiguous();
    b.pairs = ops::slice(v.pairs, 0, 0, n).contiguous();
    std::vector<int64_t> labels(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) labels[size_t(i)] = i % 10;
    b.labels = Tensor::from_i64(labels, {n});
    return b;
  };
  auto step = [&](const datasets::Batch& b, float share) {
    c.prc_share = share;
    ViT m(c.vit, 3);
    models::SGD opt(m.named_parameters(), 0.f, 0.f);
    return train_step(m, opt, m.parameters(), b, c, 0.f);
  };
  const StepResult half = step(batch(8), 0.5f), alone = step(batch(4), 1.f);
  CHECK(half.logits.size(0) == 12);  // view 1 of 4 images, view 2 of 8
  CHECK(alone.logits.size(0) == 8);
  CHECK(half.prc.item() == doctest::Approx(alone.prc.item()).epsilon(1e-6));
  // the view-1 rows' logits are those of the same images in the smaller batch
  test::check_close(ops::slice(half.logits, 0, 0, 4).contiguous(), ops::slice(alone.logits, 0, 0, 4).contiguous().to_vector<float>(), 1e-5f, 1e-5f);

  c.prc_share = 0.f;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("--prc-share must be in (0, 1], got 0"), Error);
  c.prc_share = 0.25f;
  c.prc_area1 = {0.5f, 0.4f};
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("--prc-area1 takes two fractions of the image's area"), Error);
  c.prc_area1 = {0.5f, 0.9f}, c.prc_area2 = {0.9f, 1.f};
  const TrainConfig back = TrainConfig::from_json(c.to_json());
  CHECK((back.prc_share == 0.25f && back.prc_area1 == c.prc_area1 && back.prc_area2 == c.prc_area2));
}

TEST_CASE("noise-injection loss in training: logged; a dense model or a bad sigma is refused") {
  namespace fs = std::filesystem;
  const std::string dir = "/tmp/moevit_test_jaccard";
  fs::remove_all(dir);
  TrainConfig c = smoke_config();
  c.jaccard_weight = 0.1f;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("--jaccard-weight needs a model with MoE"),
                       Error);
  c.vit.moe_placement = "every-2";
  c.vit.moe.router.experts = 4;
  c.jaccard_sigma = 0.f;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("--jaccard-sigma must be finite and > 0"), Error);
  c.jaccard_sigma = 0.5f;
  c.epochs = 1;
  CHECK(TrainConfig::from_json(c.to_json()).to_json() == c.to_json());
  fit(c, dir, false, nullptr);
  const double j = only_epoch_metric(dir, "jaccard_loss");
  CHECK((j > 0.0 && j < 1.0));  // 1 - J of probabilities lies in [0, 1]
  fs::remove_all(dir);
}

TEST_CASE("Module::to(CPU) keeps every handle and drops gradients") {
  ViT m(tiny_config(), 0);
  auto before = m.named_parameters();
  before[0].second.set_grad(Tensor::ones(before[0].second.shape()));
  const std::vector<float> v = before[0].second.to_vector<float>();
  m.to(Device::CPU);
  CHECK(m.device() == Device::CPU);
  auto after = m.named_parameters();
  CHECK(after[0].second.same(before[0].second));
  CHECK(!before[0].second.grad().defined());
  CHECK(after[0].second.to_vector<float>() == v);
  CHECK(after[0].second.requires_grad());
}

TEST_CASE("slow: vit-tiny learns Fashion-MNIST in one epoch" * doctest::test_suite("slow")) {
  if (!std::filesystem::exists("/usr/share/datasets/fashion-mnist")) {
    MESSAGE("skipped: Fashion-MNIST is not installed (scripts/setup installs it)");
    return;
  }
  // The one-epoch recipe of docs/results.md (79.5% there): a short warmup, no augmentation.
  TrainConfig c;
  c.epochs = 1;
  c.warmup_epochs = 0.3f;
  c.augment = "none";
  c.schedule = "linear";
  TrainResult r = fit(c, "/tmp/moevit_test_fmnist", false, nullptr);
  INFO("test accuracy after one epoch: " << r.test_accuracy);
  CHECK(r.test_accuracy > 0.75);
  std::filesystem::remove_all("/tmp/moevit_test_fmnist");
}
