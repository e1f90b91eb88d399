// bench/train_step: images/s of one whole training step of a ViT preset (forward,
// cross-entropy with label smoothing 0.1, backward, gradient-norm clip at 1, AdamW update) on a
// fixed random batch, the same step that bench/reference/train_step.py times in PyTorch. It runs
// train::train_step, the step of apps/train, so MoE presets (vmoe-tiny, ec-tiny, ...) train with
// their routers' auxiliary losses added to the loss. On the CPU, or with --device cuda on the GPU
// (the batch is copied to the device in every step, as in training, and the clock stops once the
// step's loss has been read back: the step's queued kernels are done).
//
//   bench_train_step --preset vit-tiny --batch 128 --threads 2 --steps 20
//   bench_train_step --preset vmoe-tiny --threads 2
//   bench_train_step --preset vmoe-tiny --device cuda
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>

#include "engine/parallel.h"
#include "engine/random.h"
#include "models/optim.h"
#include "models/vit.h"
#include "ops/matmul.h"
#include "train/step.h"

using namespace mv;

int main(int argc, char** argv) {
  CLI::App app{"Time a ViT training step"};
  std::string preset = "vit-tiny";
  int batch = 128, threads = 2, steps = 20, warmup = 3;
  app.add_option("--preset", preset)->capture_default_str();
  app.add_option("--batch", batch)->capture_default_str();
  app.add_option("--threads", threads)->capture_default_str();
  app.add_option("--steps", steps, "timed steps")->capture_default_str();
  app.add_option("--warmup", warmup, "untimed steps first")->capture_default_str();
  std::string device = "cpu", stem = "patch";
  int depth = 0;
  app.add_option("--stem", stem, "patch | conv | conv-deep: how images become tokens (models/vit.h)")->capture_default_str();
  app.add_option("--depth", depth, "override the preset's number of blocks")->check(CLI::PositiveNumber);
  app.add_option("--device", device, "cpu | cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  bool bf16 = false;
  app.add_flag("--bf16", bf16, "CPU matrix products on bfloat16 inputs (ops::set_matmul_bf16)");
  CLI11_PARSE(app, argc, argv);
  try {
    set_num_threads(threads);
    ops::set_matmul_bf16(bf16);
    models::ViTConfig c = models::vit_preset(preset);
    c.stem = stem;
    if (depth > 0) c.depth = depth;
    models::ViT model(c, 0);
    const bool gpu = device == "cuda";
    MV_CHECK(!gpu || cuda_available(), "--device cuda: no CUDA device is available");
    if (gpu) model.to(Device::CUDA);
    models::AdamW opt(model.named_parameters(), 0.05f);
    Generator g(1);
    datasets::Batch b;
    b.images = randn({batch, c.channels, c.image_size, c.image_size}, g);
    std::vector<int64_t> y(static_cast<size_t>(batch));
    for (int i = 0; i < batch; ++i) y[size_t(i)] = i % c.num_classes;
    b.labels = Tensor::from_i64(y, {batch});
    train::TrainConfig step_cfg;  // one view, no PRC or noise-injection loss
    step_cfg.label_smoothing = 0.1f;
    step_cfg.clip = 1.0f;
    const std::vector<Tensor> params = model.parameters();
    std::vector<double> ms;
    for (int s = 0; s < warmup + steps; ++s) {
      auto t0 = std::chrono::steady_clock::now();
      // Kept to the end of the iteration, so that the graph is freed outside the timed span.
      const train::StepResult r = train::train_step(model, opt, params, b, step_cfg, 1e-3f);
      if (gpu) r.loss.item();  // waits for the step's kernels
      auto t1 = std::chrono::steady_clock::now();
      if (s >= warmup) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    const double med = ms[ms.size() / 2];
    std::printf("moevit %s (%s, %s stem) batch %d threads %d: median step %.1f ms (min %.1f) over %d steps after "
                "%d warm-up, %.0f images/s; CPU pool peak %.1f MB; %lld parameters\n",
                preset.c_str(), device.c_str(), stem.c_str(), batch, threads, med, ms.front(), steps, warmup, batch / med * 1e3,
                double(cpu_pool_stats().peak) / 1e6, (long long)model.num_parameters());
    const std::vector<models::MoELayer*> moe = model.moe_layers();
    if (!moe.empty()) {
      int64_t choices = 0, dropped = 0;
      for (const models::MoELayer* m : moe) {
        const models::MoEStats::Totals t = m->stats.totals();
        choices += t.choices, dropped += t.dropped;
      }
      // MoEStats::dropped: token choice counts (token, choice) pairs that found their buffer
      // full; expert choice and attention vote count tokens that no expert took; soft: none.
      const char* what = c.moe.router.token_choice() ? "of token choices dropped"
                                                     : "of tokens taken by no expert";
      std::printf("  %zu MoE layers, router %s, E %d, capacity per group %lld; %.1f%% %s over "
                  "all steps\n",
                  moe.size(), c.moe.router.type.c_str(), c.moe.router.experts,
                  (long long)moe.front()->last.capacity,
                  choices ? 100.0 * double(dropped) / double(choices) : 0.0, what);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_train_step: error: %s\n", e.what());
    return 1;
  }
}
