// bench/moe_layer: forward + backward of one MoE layer (models/moe.h) per router type, against a
// dense MLP (models/layers.h) of the same *active* FLOPs, at ViT shapes, in training mode.
//
// Dense twin hidden width: token choice (topk and the cosine family) k*h, since each token runs k
// experts of width h; expert choice and attention vote round(c*h), since the E experts take
// about c*T tokens per image; soft round(h*E*slots/T), since E*slots slot vectors replace the T
// tokens. The MoE also spends work the count leaves out: the router and its auxiliary losses,
// and moving rows between the tokens and the expert buffers (dispatch and combine). Token-choice
// buffers are packed (ops/moe.h), so the expert matmuls multiply only the rows in use: the
// output states rows computed against the buffer's E*C rows and the k*T active ones.
//
// One step = forward with a graph, then backward of sum(out * g) + the router's aux loss (what a
// training step sees; the dense twin gets sum(out * g)), g a fixed random (B, T, D) tensor; the
// parameters' gradients are dropped between steps. MoE and dense steps alternate so that
// drifting load from other processes hits both alike. Median and min over the timed steps, no
// cache flush. For topk, a breakdown times the public ops the layer calls (the router, then
// moe_mlp: dispatch, experts and combine in one op) one by one under the same shapes, and the
// backward pass alone. With --device cuda everything lives on the GPU and each timed span ends by
// reading back a sum of its last result (the one stream's queued kernels are then done).
//
//   bench_moe_layer [--router topk] [--batch 128 --tokens 50 --dim 64] [--experts 8 -k 2]
//                   [--hidden 128 --capacity 1.25 --slots 6] [--threads 2 --steps 20]
//   bench_moe_layer --device cuda --tokens 65 --dim 384 --hidden 1536 --experts 32   # ViT-S-like
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "autograd/autograd.h"
#include "engine/memory.h"
#include "engine/parallel.h"
#include "engine/random.h"
#include "models/layers.h"
#include "models/moe.h"
#include "ops/elementwise.h"
#include "ops/moe.h"
#include "ops/reduce.h"
#include "ops/shape.h"

using namespace mv;
using Clock = std::chrono::steady_clock;

namespace {

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

struct Stat {
  std::vector<double> v;
  void add(double x) { v.push_back(x); }
  double median() const {
    std::vector<double> s = v;
    std::sort(s.begin(), s.end());
    return s[s.size() / 2];
  }
  double min() const { return *std::min_element(v.begin(), v.end()); }
};

// Ends a timed span on the GPU: reads back a sum of t, which waits for every queued kernel.
struct Waiter {
  bool gpu;
  void operator()(const Tensor& t) const {
    if (gpu) ops::sum(t.detach()).item();
  }
};

void drop_grads(const std::vector<Tensor>& params, Tensor& x) {
  for (Tensor p : params) p.zero_grad();
  x.zero_grad();
}

// sum(out * g) (+ aux): its gradient with respect to out is g.
Tensor step_loss(const Tensor& out, const Tensor& g, const Tensor& aux = Tensor()) {
  Tensor l = ops::sum(ops::mul(out, g));
  return aux.defined() ? ops::add(l, aux) : l;
}

struct Setup {
  int64_t B, T, D, E, k, h, slots;
  float capacity;
};

// The dense twin's hidden width and the rule that gave it.
int64_t dense_hidden(const models::RouterConfig& rc, const Setup& s, std::string& why) {
  char buf[160];
  int64_t w;
  if (rc.token_choice()) {
    w = s.k * s.h;
    std::snprintf(buf, sizeof buf, "k*h = %lld*%lld (token choice)", (long long)s.k,
                  (long long)s.h);
  } else if (rc.type == "soft") {
    w = std::llround(double(s.h) * double(s.E * s.slots) / double(s.T));
    std::snprintf(buf, sizeof buf, "round(h*E*slots/T) = round(%lld*%lld*%lld/%lld)",
                  (long long)s.h, (long long)s.E, (long long)s.slots, (long long)s.T);
  } else {
    w = std::llround(double(s.capacity) * double(s.h));
    std::snprintf(buf, sizeof buf, "round(c*h) = round(%.2f*%lld) (expert choice)", s.capacity,
                  (long long)s.h);
  }
  why = buf;
  return std::max<int64_t>(w, 1);
}

// Times the topk layer's public ops one by one, as MoELayer::forward calls them.
void topk_breakdown(models::MoELayer& layer, const Tensor& x0, const Tensor& g, Generator& noise,
                    const Setup& s, int warmup, int steps, const Waiter& wait) {
  const int64_t B = s.B, T = s.T, D = s.D;
  const std::vector<Tensor> params = layer.parameters();
  Stat router, experts, backward;
  for (int it = 0; it < warmup + steps; ++it) {
    Tensor x = x0.detach().set_requires_grad(true);
    drop_grads(params, x);
    auto t = Clock::now();
    const Tensor xg = ops::reshape(x, {B, T, D});
    models::Route r = layer.router->route(xg, noise);
    wait(r.assign.weight);
    const double t_router = ms_since(t);
    t = Clock::now();
    Tensor out = ops::reshape(ops::moe_mlp(xg, r.assign, layer.w1, layer.b1, layer.w2, layer.b2), {B, T, D});
    wait(out);
    const double t_experts = ms_since(t);
    Tensor loss = step_loss(out, g, r.aux_loss);
    t = Clock::now();
    loss.backward();
    wait(x.grad());
    const double t_backward = ms_since(t);
    if (it < warmup) continue;
    router.add(t_router), experts.add(t_experts), backward.add(t_backward);
  }
  std::printf("  topk breakdown, the public ops timed one by one, ms median (min):\n");
  std::printf("    router   (logits, noise, softmax, topk_route, aux losses)    %7.2f (%6.2f)\n",
              router.median(), router.min());
  std::printf("    experts  (ops::moe_mlp: dispatch, expert MLP, combine)      %7.2f (%6.2f)\n",
              experts.median(), experts.min());
  std::printf("    backward (loss.backward() of the whole graph)               %7.2f (%6.2f)\n",
              backward.median(), backward.min());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Time one MoE layer (forward + backward) per router against a dense MLP"};
  std::string only;
  int batch = 128, tokens = 50, dim = 64, experts = 8, k = 2, hidden = 128, slots = 6;
  float capacity = 1.25f;
  int threads = 2, steps = 20, warmup = 3;
  std::string device = "cpu";
  app.add_option("--router", only, "one router type (default: all of router_types())");
  app.add_option("--batch", batch, "B: images, one routing group each")->capture_default_str();
  app.add_option("--tokens", tokens, "T: tokens per image")->capture_default_str();
  app.add_option("--dim", dim, "D: token width")->capture_default_str();
  app.add_option("--experts", experts, "E")->capture_default_str();
  app.add_option("-k,--k", k, "experts per token (token-choice routers)")->capture_default_str();
  app.add_option("--hidden", hidden, "h: hidden width of each expert")->capture_default_str();
  app.add_option("--capacity", capacity,
                 "capacity factor c (token choice: C = ceil(T k c / E); expert choice and "
                 "attention vote: C = ceil(T c / E))")->capture_default_str();
  app.add_option("--slots", slots, "soft: slots per expert (soft-tiny preset: 6)")
      ->capture_default_str();
  app.add_option("--threads", threads)->capture_default_str();
  app.add_option("--device", device, "cpu | cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--steps", steps, "timed steps")->capture_default_str();
  app.add_option("--warmup", warmup, "untimed steps first")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    MV_CHECK(steps >= 1 && warmup >= 0, "bench_moe_layer: --steps ", steps, " must be >= 1");
    set_num_threads(threads);
    const bool gpu = device == "cuda";
    MV_CHECK(!gpu || cuda_available(), "--device cuda: no CUDA device is available");
    const Device dev = gpu ? Device::CUDA : Device::CPU;
    const Waiter wait{gpu};
    const Setup s{batch, tokens, dim, experts, k, hidden, slots, capacity};
    std::vector<std::string> types = models::router_types();
    if (!only.empty()) types = {only};

    Generator data(7);
    const Tensor x0 = randn({s.B, s.T, s.D}, data).to(dev);
    const Tensor g = randn({s.B, s.T, s.D}, data).to(dev);
    std::printf("MoE layer vs dense MLP of equal active FLOPs: (B, T, D) = (%lld, %lld, %lld), "
                "E %lld, k %lld, expert hidden h %lld, capacity factor %.2f, soft slots %lld; "
                "train mode (topk: noise std 1/E); %s; median (min) ms of forward + "
                "backward over %d steps after %d warm-up, MoE and dense steps alternating, no "
                "cache flush\n",
                (long long)s.B, (long long)s.T, (long long)s.D, (long long)s.E, (long long)s.k,
                (long long)s.h, s.capacity, (long long)s.slots,
                gpu ? "CUDA" : ("CPU, threads " + std::to_string(threads)).c_str(), steps, warmup);

    for (const std::string& type : types) {
      models::MoEConfig mc;
      mc.mlp_dim = hidden;
      mc.router.type = type;
      mc.router.experts = experts;
      mc.router.k = k;
      mc.router.capacity_train = capacity;
      mc.router.ec_capacity = capacity;
      mc.router.slots = slots;
      Generator init(1), noise(2);
      models::MoELayer moe(s.D, mc, init, &noise);
      moe.train(true);
      moe.to(dev);
      std::string why;
      const int64_t dh = dense_hidden(mc.router, s, why);
      models::MLP dense(s.D, dh, init);
      dense.to(dev);
      const std::vector<Tensor> pm = moe.parameters(), pd = dense.parameters();

      Stat tm, td, tmf, tdf;  // forward + backward; forward alone (inside the same step)
      int64_t C = 0;
      for (int it = 0; it < warmup + steps; ++it) {
        Tensor x = x0.detach().set_requires_grad(true);
        drop_grads(pm, x);
        auto t0 = Clock::now();
        Tensor out = moe.forward(x);
        Tensor lm = step_loss(out, g, moe.last.aux_loss);
        wait(lm);
        const double af = ms_since(t0);
        lm.backward();
        wait(x.grad());
        const double a = ms_since(t0);
        C = moe.last.capacity;

        x = x0.detach().set_requires_grad(true);
        drop_grads(pd, x);
        t0 = Clock::now();
        Tensor ld = step_loss(dense.forward(x), g);
        wait(ld);
        const double bf = ms_since(t0);
        ld.backward();
        wait(x.grad());
        const double b = ms_since(t0);
        if (it >= warmup) tm.add(a), td.add(b), tmf.add(af), tdf.add(bf);
      }
      // Expert rows computed per image: the rows in use (token choice: kept choices; expert
      // choice: all E*C; soft: E*slots), averaged over every forward of the run.
      const models::MoEStats::Totals st = moe.stats.totals();
      int64_t used = 0;
      for (int64_t l : st.load) used += l;
      const double rows = double(used) / double(st.forwards) / double(s.B);
      const double buffer = double(s.E * C), active = double(s.k * s.T);
      const double expert_flops = 2.0 * 2.0 * double(s.B) * rows * double(s.D * s.h);
      const double dense_flops = 2.0 * 2.0 * double(s.B * s.T) * double(s.D * dh);
      std::printf("\n%-16s MoE %7.2f (%6.2f) ms | dense hidden %lld %7.2f (%6.2f) ms | "
                  "MoE/dense %.2fx\n",
                  type.c_str(), tm.median(), tm.min(), (long long)dh, td.median(), td.min(),
                  tm.median() / td.median());
      std::printf("  dense twin: hidden %lld = %s\n", (long long)dh, why.c_str());
      std::printf("  of which forward (with the loss): MoE %.2f (%.2f), dense %.2f (%.2f) ms\n",
                  tmf.median(), tmf.min(), tdf.median(), tdf.min());
      std::printf("  MoE experts compute %.1f rows per image of the %.0f buffer rows (E*C, C = %lld), "
                  "%.2f GFLOP forward in the expert matmuls vs the twin's %.2f GFLOP",
                  rows, buffer, (long long)C, expert_flops * 1e-9, dense_flops * 1e-9);
      if (mc.router.token_choice())
        std::printf(" (k*T = %.0f active rows: computed %.2fx, buffer %.2fx of them)", active,
                    rows / active, buffer / active);
      std::printf("; params MoE %lld, dense %lld\n", (long long)moe.num_parameters(),
                  (long long)dense.num_parameters());
      if (mc.router.token_choice()) {
        const double drop = st.choices ? double(st.dropped) / double(st.choices) : 0;
        std::printf("  dropped choices over all steps: %.1f%%\n", 100.0 * drop);
      }
      if (type == "topk") topk_breakdown(moe, x0, g, noise, s, warmup, steps, wait);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_moe_layer: error: %s\n", e.what());
    return 1;
  }
}
