// moevit train: trains a ViT preset on a data set, evaluating on the test set after every epoch.
//
//   train --dataset fashion-mnist --model vit-tiny --epochs 10 --out runs/vit-tiny
//   train --dataset fashion-mnist --model vit-tiny --device cuda --out runs/vit-tiny-gpu
//   train --resume runs/vit-tiny          # continues that run exactly where it stopped
//   train --model vmoe-tiny --k 1 --bpr true --out runs/top1   # an MoE-ViT preset, overridden
//   mpirun -np 2 train --model vmoe-tiny --expert-parallel 2 --threads 1 --out runs/ep2
#include <cstdio>

#include "apps/cli.h"
#include "apps/train_flags.h"
#include "dist/comm.h"
#include "report/curves.h"
#include "train/checkpoint.h"
#include "train/loop.h"
#include "train/progress.h"
#include "train/stop.h"

using namespace mv;

namespace {

void print_done(const train::TrainResult& r, const std::string& dir) {
  std::printf("done: %d epochs, test accuracy %.2f%% (best %.2f%%), test loss %.4f, %.0f train "
              "images/s, training time %s; checkpoint %s\n",
              r.epochs_done, 100 * r.test_accuracy, 100 * r.best_test_accuracy, r.test_loss,
              r.images_per_second,
              train::format_seconds(r.train_seconds).c_str(), train::run_checkpoint(dir).c_str());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Train a (MoE-)ViT with moevit"};
  cli::TrainFlags f;
  cli::add_train_flags(app, f);
  CLI11_PARSE(app, argc, argv);
  const int rc = cli::guarded("train", [&] {
    dist::init(argc, argv);  // under mpirun: this rank's place (train/parallel.h)
    const train::TrainConfig cfg = cli::train_config(app, f);
    train::install_stop_handlers();
    const bool is_resume = !f.resume.empty();
    const std::string dir = is_resume ? f.resume : f.out;
    const bool root = dist::rank() == 0;  // prints and writes; the other ranks only train
    const train::TrainResult r =
        train::fit(cfg, dir, is_resume, root ? stdout : nullptr, f.stop_after, f.expert_parallel);
    if (root) report::write_training_curves(dir + "/metrics.jsonl", dir + "/curves.png");
    if (r.stop_signal != 0) return 128 + r.stop_signal;  // as a shell reports a killed process
    if (root) print_done(r, dir);
    return 0;
  });
  // An error on one rank ends them all: the others may be waiting for it in a collective.
  if (rc != 0 && rc < 128 && dist::size() > 1) dist::abort_all(rc);
  dist::finalize();
  return rc;
}
