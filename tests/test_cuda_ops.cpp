// The ops:: API on CUDA tensors against the same ops on the CPU: every op that dispatches to a
// CUDA kernel, forward and backward (through autograd), then a whole tiny ViT forward + backward.
// Part of moevit_cuda_tests (main in test_cuda.cpp: skips without a device).
//
// Each parity check (tests/cuda_parity.h) runs f on CPU leaves and on CUDA copies of the same
// values, compares the outputs, then back-propagates the same random output gradient through
// both and compares every input's gradient. Tolerance (fp32): |gpu - cpu| <= 1e-5 |cpu| + 1e-5
// max|cpu|; the ViT check uses 1e-4 (two blocks of GEMMs, layer norms and attention, summed in
// different orders).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/kernels.h"
#include "tests/cuda_parity.h"
#include "engine/random.h"
#include "engine/tensor.h"
#include "models/optim.h"
#include "models/vit.h"
#include "ops/attention.h"
#include "ops/conv.h"
#include "ops/elementwise.h"
#include "ops/loss.h"
#include "ops/matmul.h"
#include "ops/norm.h"
#include "ops/reduce.h"
#include "ops/shape.h"
#include "ops/softmax.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/evaluate.h"
#include "train/loop.h"

using namespace mv;
using namespace mv::test;

// Positive values away from 0 (denominators, logs, roots): exp of a small normal.
Tensor pos(const Shape& s, uint64_t seed) { return ops::exp(rnd(s, seed, 0.5f)).detach(); }

TEST_CASE("cuda ops: elementwise add/sub/mul/div (equal shapes, bias and general broadcasts), scalars, gelu") {
  const Shape s{3, 5, 7};
  auto add = [](const std::vector<Tensor>& x) { return ops::add(x[0], x[1]); };
  auto sub = [](const std::vector<Tensor>& x) { return ops::sub(x[0], x[1]); };
  auto mul = [](const std::vector<Tensor>& x) { return ops::mul(x[0], x[1]); };
  auto div = [](const std::vector<Tensor>& x) { return ops::div(x[0], x[1]); };
  for (const auto& [name, f] : std::vector<std::pair<std::string, Fn>>{{"add", add}, {"sub", sub}, {"mul", mul}, {"div", div}}) {
    parity(name + " same shape", f, {rnd(s, 1), pos(s, 2)});
    parity(name + " (B,T,C) (C)", f, {rnd(s, 3), pos({7}, 4)});
    parity(name + " (C) (B,T,C)", f, {rnd({7}, 5), pos(s, 6)});
    parity(name + " (B,T,C) (1,T,C)", f, {rnd(s, 7), pos({1, 5, 7}, 8)});
    parity(name + " (1,1,C) (B,1,C)", f, {rnd({1, 1, 7}, 9), pos({3, 1, 7}, 10)});
    // general broadcasts: both operands stretched, a column against a row, a leading-axis vector
    parity(name + " (B,1,C) (1,T,C)", f, {rnd({3, 1, 7}, 17), pos({1, 5, 7}, 18)});
    parity(name + " (T,1) (1,C)", f, {rnd({5, 1}, 19), pos({1, 7}, 20)});
    parity(name + " (B,T,C) (B,T,1)", f, {rnd(s, 21), pos({3, 5, 1}, 22)});
  }
  // a strided (permuted) operand goes through the strided-copy kernel first
  parity("add of a permuted view",
         [](const std::vector<Tensor>& x) { return ops::add(ops::permute(x[0], {0, 2, 1}), x[1]); },
         {rnd({3, 7, 5}, 11), rnd(s, 12)});
  parity("mul scalar", [](const std::vector<Tensor>& x) { return ops::mul(x[0], -2.5f); }, {rnd(s, 13)});
  parity("add scalar", [](const std::vector<Tensor>& x) { return ops::add(x[0], 0.75f); }, {rnd(s, 14)});
  parity("neg", [](const std::vector<Tensor>& x) { return ops::neg(x[0]); }, {rnd(s, 15)});
  parity("gelu (tanh)", [](const std::vector<Tensor>& x) { return ops::gelu(x[0]); }, {rnd(s, 16, 2.f)});
}

TEST_CASE("cuda ops: unary maps and their gradients (exp, log, sqrt, rsqrt, tanh, pow, relu, gelu erf, normal_cdf)") {
  const Shape s{3, 5, 7};
  using F = Tensor (*)(const Tensor&);
  for (const auto& [name, f] : std::vector<std::pair<std::string, F>>{{"exp", ops::exp}, {"tanh", ops::tanh}, {"relu", ops::relu}, {"normal_cdf", ops::normal_cdf}})
    parity(name, [f](const std::vector<Tensor>& x) { return f(x[0]); }, {rnd(s, 23, 2.f)});
  for (const auto& [name, f] : std::vector<std::pair<std::string, F>>{{"log", ops::log}, {"sqrt", ops::sqrt}, {"rsqrt", ops::rsqrt}})
    parity(name, [f](const std::vector<Tensor>& x) { return f(x[0]); }, {pos(s, 24)});
  parity("pow 3", [](const std::vector<Tensor>& x) { return ops::pow(x[0], 3.f); }, {rnd(s, 25)});
  parity("pow 0.5", [](const std::vector<Tensor>& x) { return ops::pow(x[0], 0.5f); }, {pos(s, 26)});
  parity("gelu (erf)", [](const std::vector<Tensor>& x) { return ops::gelu(x[0], ops::GeluForm::Erf); }, {rnd(s, 27, 2.f)});
  parity("exp of a permuted view", [](const std::vector<Tensor>& x) { return ops::exp(ops::permute(x[0], {2, 0, 1})); }, {rnd(s, 28)});
}

TEST_CASE("cuda ops: sum_to reduces the leading dims (the bias gradient) and any other broadcast") {
  const Tensor g = rnd({4, 5, 6}, 20);
  const Tensor gd = g.to(Device::CUDA);
  for (const Shape& to : {Shape{6}, Shape{1, 5, 6}, Shape{5, 6}, Shape{1, 1, 6}, Shape{4, 5, 6},
                          Shape{4, 1, 6}, Shape{5, 1}, Shape{4, 5, 1}, Shape{1}})
    close("sum_to " + shape_str(to), ops::sum_to(gd, to), ops::sum_to(g, to), 1e-5);
  // a large column count and many rows: one thread per column walking the rows
  const Tensor big = rnd({1000, 300}, 21);
  close("sum_to (1000, 300) -> (300)", ops::sum_to(big.to(Device::CUDA), {300}), ops::sum_to(big, {300}), 1e-5);
}

TEST_CASE("cuda ops: matmul (2-D, shared weight, batched, transposed view) and linear") {
  auto mm = [](const std::vector<Tensor>& x) { return ops::matmul(x[0], x[1]); };
  parity("matmul 2-D", mm, {rnd({9, 13}, 30), rnd({13, 6}, 31)});
  parity("matmul shared (B,M,K)(K,N)", mm, {rnd({3, 9, 13}, 32), rnd({13, 6}, 33)});
  parity("matmul batched", mm, {rnd({2, 3, 9, 13}, 34), rnd({2, 3, 13, 6}, 35)});
  parity("matmul of a transposed view",
         [](const std::vector<Tensor>& x) { return ops::matmul(ops::transpose(x[0], 1, 2), x[1]); },
         {rnd({3, 13, 9}, 36), rnd({3, 13, 6}, 37)});
  auto lin = [](const std::vector<Tensor>& x) { return ops::linear(x[0], x[1], x.size() > 2 ? x[2] : Tensor()); };
  parity("linear with bias", lin, {rnd({2, 11, 17}, 38), rnd({17, 10}, 39), rnd({10}, 40)});
  parity("linear without bias", lin, {rnd({11, 17}, 41), rnd({17, 10}, 42)});
  parity("linear, bias width not a multiple of 4", lin, {rnd({5, 8}, 43), rnd({8, 3}, 44), rnd({3}, 45)});
}

TEST_CASE("cuda matmul_t: transposed operands through cuBLAS's op(X), against ops::matmul on the CPU") {
  // op(a): (M, K) = (5, 6), op(b): (K, N) = (6, 3); stored transposed where the flag is set
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (int batched = 0; batched < 4; ++batched) {  // 0: 2-D; 1: both 3-D; 2: a 3-D; 3: b 3-D
        const bool a3 = batched == 1 || batched == 2, b3 = batched == 1 || batched == 3;
        Shape sa = ta ? Shape{6, 5} : Shape{5, 6}, sb = tb ? Shape{3, 6} : Shape{6, 3};
        if (a3) sa.insert(sa.begin(), 4);
        if (b3) sb.insert(sb.begin(), 4);
        const Tensor a = rnd(sa, 100 + batched), b = rnd(sb, 200 + batched);
        Tensor ra = ta ? ops::transpose(a, -1, -2) : a, rb = tb ? ops::transpose(b, -1, -2) : b;
        if (!a3 && b3) ra = ops::stack({ra, ra, ra, ra}, 0);  // the CPU op has no 2-D x 3-D form
        const Tensor ref = ops::matmul(ra, rb);
        const Tensor got = cuda::matmul_t(a.to(Device::CUDA), b.to(Device::CUDA), ta, tb);
        close("matmul_t ta=" + std::to_string(ta) + " tb=" + std::to_string(tb) + " case " +
                  std::to_string(batched),
              got, ref, 1e-5);
      }
  CHECK_THROWS_WITH_AS(cuda::matmul_t(rnd({5, 6}, 1).to(Device::CUDA), rnd({5, 6}, 2).to(Device::CUDA), false, false),
                       doctest::Contains("inner sizes differ"), Error);
  CHECK_THROWS_WITH_AS(cuda::matmul_t(rnd({5, 6}, 1).to(Device::CUDA), rnd({4, 6}, 2).to(Device::CUDA), true, false),
                       doctest::Contains("inner sizes differ"), Error);
}

TEST_CASE("cuda ops: layernorm, softmax, cross_entropy, self_attention") {
  parity("layernorm",
         [](const std::vector<Tensor>& x) { return ops::layernorm(x[0], x[1], x[2], 1e-6f); },
         {rnd({3, 5, 24}, 50, 2.f), rnd({24}, 51), rnd({24}, 52)});
  parity("softmax", [](const std::vector<Tensor>& x) { return ops::softmax(x[0]); }, {rnd({4, 6, 19}, 53, 3.f)});
  const Tensor labels = Tensor::from_i64({3, 0, 9, 4, 4, 1, 7}, {7});
  for (float ls : {0.f, 0.1f})
    parity("cross_entropy ls=" + std::to_string(ls),
           [ls](const std::vector<Tensor>& x) { return ops::cross_entropy(x[0], x[1], ls); },
           {rnd({7, 10}, 54, 2.f), labels});
  parity("self_attention",
         [](const std::vector<Tensor>& x) { return ops::self_attention(x[0], 2); },
         {rnd({2, 17, 3 * 16}, 55)});
}

TEST_CASE("cuda ops: reshape, permute + contiguous, slice, concat") {
  // patchify's pattern: reshape, permute, reshape (a strided copy on the device)
  parity("reshape-permute-reshape",
         [](const std::vector<Tensor>& x) {
           Tensor t = ops::reshape(x[0], {2, 1, 2, 3, 2, 3});
           t = ops::permute(t, {0, 2, 4, 1, 3, 5});
           return ops::reshape(t, {2, 4, 9});
         },
         {rnd({2, 1, 6, 6}, 60)});
  parity("slice middle", [](const std::vector<Tensor>& x) { return ops::slice(x[0], 1, 2, 5); }, {rnd({3, 7, 4}, 61)});
  parity("slice + reshape (the CLS token)",
         [](const std::vector<Tensor>& x) { return ops::reshape(ops::slice(x[0], 1, 0, 1), {3, 4}); },
         {rnd({3, 7, 4}, 62)});
  parity("concat axis 1",
         [](const std::vector<Tensor>& x) { return ops::concat({x[0], x[1]}, 1); },
         {rnd({3, 1, 4}, 63), rnd({3, 6, 4}, 64)});
  parity("concat axis 0 of a permuted view",
         [](const std::vector<Tensor>& x) { return ops::concat({ops::transpose(x[0], 0, 1), x[1]}, 0); },
         {rnd({4, 2}, 65), rnd({3, 4}, 66)});
  // Tensor::contiguous on the device, I64 too (the strided-copy hook)
  const Tensor i = Tensor::from_i64({0, 1, 2, 3, 4, 5}, {2, 3});
  close("I64 transpose contiguous", ops::transpose(i.to(Device::CUDA), 0, 1).contiguous(),
        ops::transpose(i, 0, 1).contiguous(), 0);
}

TEST_CASE("cuda ops: max and argmax along any axis, sum, mean") {
  Tensor x = rnd({5, 7, 11}, 70);
  for (int axis : {0, 1, 2}) {
    CAPTURE(axis);
    close("argmax", ops::argmax(x.to(Device::CUDA), axis), ops::argmax(x, axis), 0);
    parity("max", [axis](const std::vector<Tensor>& v) { return ops::max(v[0], axis); }, {x}, 0);
  }
  close("argmax last keepdim", ops::argmax(x.to(Device::CUDA), 2, true), ops::argmax(x, 2, true), 0);
  parity("max of a transposed view, keepdim",
         [](const std::vector<Tensor>& v) { return ops::max(ops::transpose(v[0], 0, 2), 1, true); }, {x}, 0);
  // ties go to the first index (and take the gradient), NaN counts as largest
  const Tensor t = Tensor::from({1.f, 3.f, 3.f, 0.f, NAN, 2.f, NAN, 5.f, 2.f, 2.f, 2.f, 2.f}, {3, 4});
  close("argmax ties / NaN", ops::argmax(t.to(Device::CUDA), 1), ops::argmax(t, 1), 0);
  close("argmax ties / NaN, axis 0", ops::argmax(t.to(Device::CUDA), 0), ops::argmax(t, 0), 0);
  parity("max with ties", [](const std::vector<Tensor>& v) { return ops::max(v[0], 0); },
         {Tensor::from({2.f, 1.f, 3.f, 2.f, 1.f, 3.f}, {2, 3})}, 0);
  parity("sum", [](const std::vector<Tensor>& v) { return ops::sum(v[0]); }, {rnd({5, 7, 11}, 71)});
  parity("mean", [](const std::vector<Tensor>& v) { return ops::mean(v[0]); }, {rnd({5, 7, 11}, 72)});
  parity("mean keepdim", [](const std::vector<Tensor>& v) { return ops::mean(v[0], {}, true); }, {rnd({3, 4}, 73)});
  // some axes: one thread per output element
  parity("sum axis 0", [](const std::vector<Tensor>& v) { return ops::sum(v[0], {0}); }, {rnd({5, 7, 11}, 74)});
  parity("sum axes 1, 2", [](const std::vector<Tensor>& v) { return ops::sum(v[0], {1, 2}); }, {rnd({5, 7, 11}, 75)});
  parity("mean axes 0, 2 keepdim", [](const std::vector<Tensor>& v) { return ops::mean(v[0], {0, -1}, true); }, {rnd({5, 7, 11}, 76)});
  parity("mean axis 1 of a transposed view",
         [](const std::vector<Tensor>& v) { return ops::mean(ops::transpose(v[0], 0, 2), {1}); }, {rnd({5, 7, 11}, 77)});
}

TEST_CASE("cuda ops: patchify (its kernel, forward and backward) and Tensor::full / fill_ on the device") {
  auto patch = [](int p) { return [p](const std::vector<Tensor>& x) { return ops::patchify(x[0], p); }; };
  parity("patchify p4", patch(4), {rnd({2, 1, 28, 28}, 78)});
  parity("patchify p2, 3 channels, non-square", patch(2), {rnd({3, 3, 6, 10}, 79)});
  parity("patchify of a transposed image",
         [](const std::vector<Tensor>& x) { return ops::patchify(ops::transpose(x[0], 2, 3), 4); }, {rnd({2, 3, 12, 8}, 84)});
  close("Tensor::full", Tensor::full({3, 5}, 1.25f, Device::CUDA), Tensor::full({3, 5}, 1.25f), 0);
  Tensor t = Tensor::zeros({7}, DType::F32, Device::CUDA);
  t.fill_(-3.f);
  close("fill_", t, Tensor::full({7}, -3.f), 0);
}

TEST_CASE("cuda ops: unfold (its kernels, forward and the gathering backward) and a conv-stem ViT") {
  auto unfold = [](int k, int s, int pad) {
    return [k, s, pad](const std::vector<Tensor>& x) { return ops::unfold(x[0], k, s, pad); };
  };
  parity("unfold 3x3 stride 2 pad 1 (the stem's first layer)", unfold(3, 2, 1), {rnd({4, 28, 28, 1}, 140)});
  parity("unfold 3x3 stride 2 pad 1, 32 channels", unfold(3, 2, 1), {rnd({3, 14, 14, 32}, 141)});
  parity("unfold 3x3 stride 1 pad 1, non-square", unfold(3, 1, 1), {rnd({2, 5, 9, 3}, 142)});
  parity("unfold 2x2 stride 2", unfold(2, 2, 0), {rnd({2, 6, 4, 5}, 143)});
  for (const char* stem : {"conv", "conv-deep"}) {
    models::ViTConfig c{28, 1, 4, 16, 2, 2, 32, 10};
    c.stem = stem;
    VitTwins t(c, true);
    forward_backward_parity(std::string(stem) + "-stem ViT", t, 1e-4);
  }
}

TEST_CASE("cuda SGD: three steps with momentum and weight decay match the CPU optimizer") {
  const Tensor w0 = rnd({6, 5}, 85), b0 = rnd({5}, 86);
  auto run = [&](Device d) {
    Tensor w = d == Device::CPU ? w0.clone() : w0.to(d), b = d == Device::CPU ? b0.clone() : b0.to(d);
    w.set_requires_grad(true);
    b.set_requires_grad(true);
    models::SGD opt({{"layer.weight", w}, {"layer.bias", b}}, 0.9f, 0.01f);
    for (int step = 0; step < 3; ++step) {
      opt.zero_grad();
      ops::sum(ops::mul(ops::linear(rnd({4, 6}, 87 + uint64_t(step)).to(d), w, b), rnd({4, 5}, 90).to(d))).backward();
      opt.step(0.1f, 0.5f);
    }
    return std::pair{w, b};
  };
  const auto [wc, bc] = run(Device::CPU);
  const auto [wg, bg] = run(Device::CUDA);
  close("SGD weight (decayed)", wg, wc, 1e-5);
  close("SGD bias (not decayed)", bg, bc, 1e-5);
}

TEST_CASE("cuda ops: errors name the op") {
  const Tensor a = rnd({3, 4}, 80), ad = a.to(Device::CUDA);
  CHECK_THROWS_WITH_AS(ops::add(a, ad), doctest::Contains("different devices"), Error);
  CHECK_THROWS_WITH_AS(ops::matmul(ad, rnd({4, 2}, 81)), doctest::Contains("different devices"), Error);
  CHECK_THROWS_WITH_AS(ops::log_softmax(ad), doctest::Contains("log_softmax: has no CUDA kernel yet"), Error);
  CHECK_THROWS_WITH_AS(ops::add(rnd({3, 2}, 82).to(Device::CUDA), rnd({3, 4}, 83).to(Device::CUDA)),
                       doctest::Contains("add: shapes (3, 2) and (3, 4) do not broadcast"), Error);
}

TEST_CASE("cuda ops: a tiny ViT forward + backward on CUDA matches the CPU (1e-4)") {
  VitTwins t({28, 1, 7, 16, 2, 2, 32, 10}, true);
  forward_backward_parity("ViT", t, 1e-4);
}

// The whole training loop on the GPU (Module::to, batches moved, AdamW's multi-tensor kernel with
// the clip scale, evaluation, checkpoints) against the same run on the CPU.
TEST_CASE("cuda train: a tiny ViT trains on CUDA as on the CPU, and its checkpoint loads on the CPU") {
  namespace fs = std::filesystem;
  train::TrainConfig c;
  c.dataset = "synthetic";
  c.model = "test";
  c.vit = {28, 1, 7, 16, 2, 2, 32, 10};
  c.epochs = 2, c.batch = 32, c.eval_batch = 64, c.lr = 3e-3f;
  c.limit_train = 192, c.limit_test = 64, c.warmup_epochs = 0.5f;
  c.clip = 0.5f;  // small enough to clip: the scale goes through the kernel
  const std::string base = (fs::temp_directory_path() / "moevit_cuda_train").string();
  fs::remove_all(base);
  const auto cpu = train_metrics(c, "cpu", base + "/cpu"), gpu = train_metrics(c, "cuda", base + "/cuda");
  REQUIRE(cpu.size() == 2);
  REQUIRE(gpu.size() == 2);
  for (size_t e = 0; e < 2; ++e) {
    CAPTURE(e);
    const double lc = cpu[e].at("train_loss"), lg = gpu[e].at("train_loss");
    INFO("train loss cpu " << lc << ", cuda " << lg);
    CHECK(std::abs(lg - lc) <= 1e-3 * std::abs(lc));
    const double ac = cpu[e].at("test_accuracy"), ag = gpu[e].at("test_accuracy");
    INFO("test accuracy cpu " << ac << ", cuda " << ag);
    CHECK(std::abs(ag - ac) * double(c.limit_test) <= 3.5);
  }
  // The CUDA run's checkpoint (written from device tensors) loads into a CPU model and gives the
  // accuracy the run reported.
  models::ViT m(c.vit, 123);
  train::load_checkpoint(base + "/cuda/checkpoint.safetensors", m, nullptr);
  CHECK(m.device() == Device::CPU);
  datasets::Dataset test = datasets::head(train::load_dataset("synthetic", "", false), c.limit_test);
  const train::EvalResult ev = train::evaluate(m, test, "synthetic", {.batch = 64});
  const double ag = gpu[1].at("test_accuracy");
  CHECK(std::abs(ev.accuracy - ag) * double(c.limit_test) <= 1.5);
  fs::remove_all(base);
}
