// CPU self-attention: the fused op (ops::self_attention) against the composite of
// reshape/permute/matmul/softmax (ops::self_attention_composite), forward alone and
// forward + backward, at ViT shapes. Median of repeats after warm-up; no cache flush between
// repeats (the qkv of these shapes, 5 to 19 MB, does not stay in cache anyway).
//
//   ./build/bench/bench_attention [--threads 2] [--repeats 15] [--bf16]
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "engine/random.h"
#include "ops/attention.h"
#include "ops/matmul.h"

using namespace mv;

namespace {

struct Timing {
  double median, min;  // ms; the min shows the cost without interference from other processes
};

Timing time_ms(const std::function<void()>& f, int warmup, int repeats) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    auto a = std::chrono::steady_clock::now();
    f();
    auto b = std::chrono::steady_clock::now();
    t.push_back(std::chrono::duration<double, std::milli>(b - a).count());
  }
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t[0]};
}

using AttnFn = Tensor (*)(const Tensor&, int);

Timing time_forward(AttnFn f, const Tensor& qkv, int heads, int repeats) {
  return time_ms([&] {
    autograd::NoGrad ng;
    Tensor out = f(qkv, heads);
  }, 2, repeats);
}

Timing time_forward_backward(AttnFn f, const Tensor& qkv, const Tensor& g, int heads, int repeats) {
  return time_ms([&] {
    Tensor x = qkv.detach().set_requires_grad(true);
    Tensor out = f(x, heads);
    out.backward(g);
  }, 2, repeats);
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, repeats = 15;
  bool bf16 = false;
  CLI::App app{"CPU attention: fused vs composite"};
  app.add_option("--threads", threads)->capture_default_str();
  app.add_option("--repeats", repeats)->capture_default_str();
  app.add_flag("--bf16", bf16, "products on bfloat16 inputs (AVX-512 BF16), as train --bf16");
  CLI11_PARSE(app, argc, argv);
  set_num_threads(threads);
  ops::set_matmul_bf16(bf16);
  std::printf("threads %d, %s products, median (min) of %d repeats after 2 warm-up runs, ms\n\n", threads,
              bf16 ? "bfloat16" : "FP32", repeats);
  std::printf("%-19s | %-7s | %-15s | %-15s | %-7s | %s\n", "(B, T, D, heads)", "pass", "fused",
              "composite", "speedup", "fused GFLOP/s");
  struct Shape4 { int64_t B, T, D; int heads; };
  for (Shape4 s : {Shape4{128, 50, 64, 4}, Shape4{128, 65, 64, 4}, Shape4{128, 50, 192, 3},
                   Shape4{128, 65, 192, 3}}) {
    Generator gen(7);
    Tensor qkv = randn({s.B, s.T, 3 * s.D}, gen);
    Tensor g = randn({s.B, s.T, s.D}, gen);
    // Forward: two (T, T, Dh) products per head, 2 flops per multiply-add. The fused backward
    // adds four more (dV, dP, dQ, dK): 3x the forward's flops in all.
    const double fwd_flops = 4.0 * s.B * s.T * s.T * s.D;
    char name[64];
    std::snprintf(name, sizeof name, "(%lld, %lld, %lld, %d)", (long long)s.B, (long long)s.T,
                  (long long)s.D, s.heads);
    auto row = [&](const char* pass, Timing f, Timing c, double flops) {
      std::printf("%-19s | %-7s | %6.2f (%6.2f) | %6.2f (%6.2f) | %6.2fx | %.1f\n", name, pass,
                  f.median, f.min, c.median, c.min, c.median / f.median, flops / f.median * 1e-6);
    };
    row("fwd", time_forward(ops::self_attention, qkv, s.heads, repeats),
        time_forward(ops::self_attention_composite, qkv, s.heads, repeats), fwd_flops);
    row("fwd+bwd", time_forward_backward(ops::self_attention, qkv, g, s.heads, repeats),
        time_forward_backward(ops::self_attention_composite, qkv, g, s.heads, repeats),
        3.0 * fwd_flops);
  }
  return 0;
}
