// moevit train: trains a ViT preset on a data set, evaluating on the test set after every epoch.
//
//   train --dataset fashion-mnist --model vit-tiny --epochs 10 --out runs/vit-tiny
//   train --dataset fashion-mnist --model vit-tiny --device cuda --out runs/vit-tiny-gpu
//   train --resume runs/vit-tiny          # continues that run exactly where it stopped
#include <CLI/CLI.hpp>
#include <cstdio>

#include "engine/parallel.h"
#include "models/train.h"

using namespace mv;

int main(int argc, char** argv) {
  CLI::App app{"Train a (MoE-)ViT with moevit"};
  // A flag given twice takes its last value, so scripts can append overrides to defaults.
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  models::TrainConfig c;
  std::string out = "runs/default", resume;
  int threads = 0, stop_after = 0;
  int dim = 0, depth = 0, heads = 0, mlp_dim = 0, patch = 0;
  app.add_option("--dataset", c.dataset, "fashion-mnist | mnist | cifar10 | cifar100 | synthetic")
      ->capture_default_str();
  app.add_option("--data-dir", c.data_dir, "folder of the data set files (default: per data set)");
  app.add_option("--model", c.model, "preset: " + [] {
    std::string s;
    for (auto& n : models::vit_preset_names()) s += (s.empty() ? "" : " | ") + n;
    return s;
  }())->capture_default_str();
  app.add_option("--dim", dim, "override the preset's width");
  app.add_option("--depth", depth, "override the number of blocks");
  app.add_option("--heads", heads, "override the number of attention heads");
  app.add_option("--mlp-dim", mlp_dim, "override the MLP hidden width");
  app.add_option("--patch", patch, "override the patch size");
  app.add_option("--epochs", c.epochs)->capture_default_str();
  app.add_option("--batch", c.batch)->capture_default_str();
  app.add_option("--eval-batch", c.eval_batch)->capture_default_str();
  app.add_option("--optimizer", c.optimizer, "adamw | sgd")->capture_default_str();
  app.add_option("--lr", c.lr, "peak learning rate")->capture_default_str();
  app.add_option("--weight-decay", c.weight_decay)->capture_default_str();
  app.add_option("--momentum", c.momentum, "SGD momentum")->capture_default_str();
  app.add_option("--schedule", c.schedule, "cosine | linear, after a linear warmup")->capture_default_str();
  app.add_option("--warmup", c.warmup_epochs, "warmup length in epochs")->capture_default_str();
  app.add_option("--label-smoothing", c.label_smoothing)->capture_default_str();
  app.add_option("--clip", c.clip, "global gradient-norm clip (0: off)")->capture_default_str();
  app.add_option("--augment", c.augment, "none | crop | crop-flip")->capture_default_str();
  app.add_option("--seed", c.seed)->capture_default_str();
  app.add_option("--limit-train", c.limit_train, "use only the first N training images");
  app.add_option("--limit-test", c.limit_test, "use only the first N test images");
  app.add_option("--device", c.device, "cpu | cuda: where the model trains")->capture_default_str();
  app.add_option("--threads", threads, "CPU threads (default: all cores)");
  app.add_option("--out", out, "output folder: checkpoint.safetensors, metrics.jsonl")->capture_default_str();
  app.add_option("--stop-after", stop_after, "end after this many epochs of the run (resume later)");
  app.add_option("--resume", resume, "continue the run saved in this folder (its settings are used)");
  CLI11_PARSE(app, argc, argv);

  try {
    if (threads > 0) set_num_threads(threads);
    c.vit = models::vit_preset(c.model);
    if (c.dataset == "cifar10" || c.dataset == "cifar100") {
      c.vit.image_size = 32, c.vit.channels = 3;
      c.vit.num_classes = c.dataset == "cifar10" ? 10 : 100;
    }
    if (dim) c.vit.dim = dim;
    if (depth) c.vit.depth = depth;
    if (heads) c.vit.heads = heads;
    if (mlp_dim) c.vit.mlp_dim = mlp_dim;
    if (patch) c.vit.patch = patch;
    const bool is_resume = !resume.empty();
    models::TrainResult r = models::train(c, is_resume ? resume : out, is_resume, stdout, stop_after);
    std::printf("done: %d epochs, test accuracy %.2f%%, test loss %.4f, %.0f train images/s, "
                "training time %s; checkpoint %s/checkpoint.safetensors\n",
                r.epochs_done, 100 * r.test_accuracy, r.test_loss, r.images_per_second,
                models::format_seconds(r.train_seconds).c_str(), (is_resume ? resume : out).c_str());
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "\ntrain: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
