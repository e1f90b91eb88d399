// Data loader throughput: images/s of the loader alone over one epoch (no training step), with
// and without augmentation, and how long a training loop waits for batches when each step takes
// --compute-ms (simulated by spinning, or sleeping with --sleep).
//
//   ./build/bench/bench_loader [--dir /usr/share/datasets/fashion-mnist] [--batch 128]
//                              [--compute-ms 2] [--epochs 3] [--prefetch 2]
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "datasets/idx.h"
#include "datasets/loader.h"
#include "datasets/synthetic.h"

using namespace mv;
using namespace mv::datasets;
using Clock = std::chrono::steady_clock;

static double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct EpochStats {
  double epoch_s = 0, wait_s = 0, first_wait_s = 0, build_s = 0;
  int64_t images = 0, batches = 0;
};

// One epoch; after each batch the "step" runs for compute_ms.
static EpochStats run_epoch(Loader& loader, int epoch, double compute_ms, bool sleep) {
  EpochStats st;
  const auto t0 = Clock::now();
  loader.begin_epoch(epoch);
  Batch b;
  for (;;) {
    const auto w0 = Clock::now();
    if (!loader.next(b)) break;
    const double w = seconds_since(w0);
    st.wait_s += w;
    if (st.batches == 0) st.first_wait_s = w;
    st.images += b.images.size(0);
    st.batches++;
    if (compute_ms > 0) {
      const auto c0 = Clock::now();
      if (sleep) {
        std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(compute_ms));
      } else {
        volatile double sink = 0;
        while (seconds_since(c0) * 1e3 < compute_ms) sink = sink + 1.0;
      }
    }
  }
  st.epoch_s = seconds_since(t0);
  st.build_s = loader.build_seconds();
  return st;
}

int main(int argc, char** argv) {
  CLI::App app("moevit data loader benchmark");
  std::string dir = kFashionMnistDir;
  int batch = 128, epochs = 3, prefetch = 2;
  double compute_ms = 2.0;
  bool sleep = false, synthetic = false;
  app.add_option("--dir", dir, "Fashion-MNIST folder");
  app.add_option("--batch", batch, "batch size");
  app.add_option("--epochs", epochs, "epochs per configuration (the best is reported)");
  app.add_option("--prefetch", prefetch, "batches the worker prepares ahead");
  app.add_option("--compute-ms", compute_ms, "simulated training step per batch, milliseconds");
  app.add_flag("--sleep", sleep, "simulate the step by sleeping instead of spinning a core");
  app.add_flag("--synthetic", synthetic, "60000 synthetic 28x28 images instead of the files");
  CLI11_PARSE(app, argc, argv);

  const auto tl = Clock::now();
  Dataset train = synthetic ? make_synthetic(60000, 1, 28, 10, 0) : load_fashion_mnist(true, dir);
  std::printf("data: %s, %lld images %lldx%lldx%lld, %s in %.3f s\n", train.name.c_str(),
              (long long)train.n, (long long)train.channels, (long long)train.height,
              (long long)train.width, synthetic ? "generated" : "read (gzip)", seconds_since(tl));
  std::printf("batch %d, prefetch %d, best of %d epochs; step = %.2f ms %s\n\n", batch, prefetch,
              epochs, compute_ms, sleep ? "sleep" : "spin");

  struct Config {
    const char* name;
    Augment aug;
  };
  const std::vector<Config> configs = {{"no augmentation", Augment::none()},
                                       {"crop pad 2 + hflip", Augment::crop_flip(2, 0.5f)}};
  std::printf("%-20s | %-34s | %s\n", "", "loader alone (main thread only waits)",
              "with a simulated step per batch");
  std::printf("%-20s | %10s %10s %12s | %8s %8s %11s %7s\n", "augmentation", "images/s",
              "ms/batch", "build/batch", "epoch s", "wait s", "wait/batch", "wait %");
  for (const Config& c : configs) {
    Loader loader(train, batch, true, 1234, false, c.aug, Normalize::fashion_mnist(), prefetch);
    EpochStats alone, step;
    alone.epoch_s = step.epoch_s = 1e30;
    for (int e = 0; e < epochs; ++e) {
      EpochStats s = run_epoch(loader, e, 0.0, sleep);
      if (s.epoch_s < alone.epoch_s) alone = s;
    }
    for (int e = 0; e < epochs; ++e) {
      EpochStats s = run_epoch(loader, e, compute_ms, sleep);
      if (s.epoch_s < step.epoch_s) step = s;
    }
    std::printf("%-20s | %10.0f %10.3f %9.3f ms | %8.3f %8.4f %8.3f ms %6.2f%%\n", c.name,
                double(alone.images) / alone.epoch_s, 1e3 * alone.epoch_s / double(alone.batches),
                1e3 * alone.build_s / double(alone.batches), step.epoch_s, step.wait_s,
                1e3 * step.wait_s / double(step.batches), 100.0 * step.wait_s / step.epoch_s);
  }
  std::printf("\nbuild/batch = worker time to gather, crop, flip and normalise one batch;\n"
              "wait = main-thread time inside Loader::next (first batch of the epoch included)\n");
  return 0;
}
