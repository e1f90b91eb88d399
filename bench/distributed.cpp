// bench/distributed: training over the ranks of mpirun (train/parallel.h), timed two ways.
//
// 1. The whole training step of a preset (train::train_step with the gradient reduction, as
//    apps/train runs it) on a fixed random global batch, each rank stepping on its share:
//    images/s of the global batch, and the seconds per step spent inside MPI calls (waiting for
//    the gradient buckets and, with --expert-parallel, the all-to-all of token rows).
// 2. With --expert-parallel, one MoE layer of the preset alone, forward + backward of
//    sum(out * g) + aux on each rank's share of the batch's tokens: the layer's time and the part
//    of it spent exchanging rows (packing, all-to-all, unpacking; forward and backward).
//
// With --device cuda the model is on the GPU and the gradients are reduced by NCCL, also at one
// rank (then NCCL's calls run, with one rank, and their time is what the step spends in them).
//
// Medians over the timed steps; rank 0 prints. Run with 1 thread per rank on a 2-core machine:
//
//   mpirun -np 1 bench_distributed --preset vmoe-tiny --threads 1
//   mpirun -np 2 --oversubscribe bench_distributed --preset vmoe-tiny --threads 1
//   mpirun -np 2 --oversubscribe bench_distributed --preset vmoe-tiny --threads 1 --expert-parallel 2
//   bench_distributed --preset vmoe-tiny --device cuda              (one GPU, NCCL at one rank)
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>

#include "dist/comm.h"
#include "dist/experts.h"
#include "dist/device_comm.h"
#include "engine/memory.h"
#include "engine/parallel.h"
#include "engine/random.h"
#include "models/optim.h"
#include "models/vit.h"
#include "ops/elementwise.h"
#include "ops/reduce.h"
#include "train/parallel.h"
#include "train/step.h"

using namespace mv;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Time training over the ranks of mpirun"};
  std::string preset = "vmoe-tiny";
  int batch = 128, threads = 1, steps = 20, warmup = 3, expert_parallel = 1;
  app.add_option("--preset", preset)->capture_default_str();
  app.add_option("--batch", batch, "global batch, split over the ranks")->capture_default_str();
  app.add_option("--threads", threads, "per rank")->capture_default_str();
  app.add_option("--steps", steps, "timed steps")->capture_default_str();
  app.add_option("--warmup", warmup, "untimed steps first")->capture_default_str();
  app.add_option("--expert-parallel", expert_parallel, "split the experts over groups of this "
                 "many ranks")->capture_default_str();
  std::string device = "cpu";
  app.add_option("--device", device, "cpu | cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  CLI11_PARSE(app, argc, argv);
  try {
    dist::init(argc, argv);
    set_num_threads(threads);
    const train::Ranks ranks = train::world_ranks(expert_parallel);
    train::TrainConfig cfg;  // one view, label smoothing 0.1, clip 1, as bench_train_step
    cfg.model = preset;
    cfg.vit = models::vit_preset(preset);
    cfg.batch = batch;
    cfg.device = device;
    const bool gpu = device == "cuda";
    train::check_ranks(cfg, ranks, preset + " " + std::to_string(batch) + " " +
                                       std::to_string(expert_parallel));
    if (gpu) {
      MV_CHECK(cuda_available() && dist::nccl_built(), "--device cuda needs a GPU and NCCL");
      if (ranks.many()) dist::use_local_gpu();
    }
    models::ViT model(cfg.vit, 0);
    train::split_model(model, ranks);
    if (gpu) model.to(Device::CUDA);
    models::AdamW opt(model.named_parameters(), 0.05f);
    std::unique_ptr<train::Replicas> replicas;
    if (ranks.many() || gpu) replicas = std::make_unique<train::Replicas>(model, ranks);
    const models::ViTConfig& c = cfg.vit;
    const int share = batch / ranks.size;
    Generator g(1 + uint64_t(ranks.rank));
    datasets::Batch b;
    b.images = randn({share, c.channels, c.image_size, c.image_size}, g);
    std::vector<int64_t> y(static_cast<size_t>(share));
    for (int i = 0; i < share; ++i) y[size_t(i)] = (ranks.rank * share + i) % c.num_classes;
    b.labels = Tensor::from_i64(y, {share});
    const std::vector<Tensor> params = model.parameters();

    std::vector<double> step_s, comm_s;
    for (int s = 0; s < warmup + steps; ++s) {
      dist::take_comm_seconds();
      const auto t0 = Clock::now();
      const train::StepResult r = train::train_step(model, opt, params, b, cfg, 1e-3f, replicas.get());
      if (gpu) r.loss.item();  // waits for the step's kernels and NCCL's
      if (s < warmup) continue;
      step_s.push_back(seconds_since(t0));
      comm_s.push_back(dist::take_comm_seconds());
    }
    // The slowest rank sets the pace: the largest median over ranks.
    const double step = train::agree_max(median(step_s), ranks);
    const double comm = train::agree_max(median(comm_s), ranks);
    if (ranks.rank == 0)
      std::printf("moevit %s (%s), %d rank%s x %d thread%s, global batch %d%s: median step %.1f ms, "
                  "%.0f images/s; inside MPI %.1f ms per step (%.0f%%; the slowest rank's medians)\n",
                  preset.c_str(), device.c_str(), ranks.size, ranks.size > 1 ? "s" : "", threads,
                  threads > 1 ? "s" : "", batch,
                  ranks.split_experts() ? ", experts split over the ranks" : "", 1e3 * step,
                  batch / step, 1e3 * comm, 100 * comm / step);

    const std::vector<models::MoELayer*> moe = model.moe_layers();
    if (!ranks.split_experts() || moe.empty()) {
      dist::finalize();
      return 0;
    }
    // 2. One MoE layer alone, on this rank's share of the batch's tokens.
    models::MoELayer& layer = *moe.front();
    const int64_t T = (c.image_size / c.patch) * (c.image_size / c.patch) + 1;
    const Device dev = gpu ? Device::CUDA : Device::CPU;
    const Tensor x = randn({share, T, c.dim}, g).to(dev).set_requires_grad(true);
    const Tensor go = randn({share, T, c.dim}, g).to(dev);
    std::vector<double> layer_s, exchange_s, mpi_s;
    for (int s = 0; s < warmup + steps; ++s) {
      dist::take_exchange_seconds();
      dist::take_comm_seconds();
      const auto t0 = Clock::now();
      const Tensor out = layer.forward(x);
      Tensor loss = ops::sum(ops::mul(out, go));
      if (layer.last.aux_loss.defined()) loss = loss + layer.last.aux_loss;
      loss.backward();
      if (gpu) loss.item();
      for (const Tensor& p : layer.parameters()) Tensor(p).zero_grad();
      if (s < warmup) continue;
      layer_s.push_back(seconds_since(t0));
      exchange_s.push_back(dist::take_exchange_seconds());
      mpi_s.push_back(dist::take_comm_seconds());
    }
    const double ls = train::agree_max(median(layer_s), ranks);
    const double xs = train::agree_max(median(exchange_s), ranks);
    const double ms = train::agree_max(median(mpi_s), ranks);
    if (ranks.rank == 0)
      std::printf("  one MoE layer (E %d, k %d, %d of the batch's images per rank, %lld tokens "
                  "each, width %d): forward + backward %.2f ms, of which exchanging rows %.2f ms "
                  "(%.0f%%: packing, all-to-all, unpacking, both ways), %.2f ms of it inside MPI "
                  "calls (waiting for the other rank included)\n",
                  c.moe.router.experts, c.moe.router.k, share, (long long)T, c.dim, 1e3 * ls,
                  1e3 * xs, 100 * xs / ls, 1e3 * ms);
    dist::finalize();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_distributed: error: %s\n", e.what());
    dist::abort_all(1);
  }
}
