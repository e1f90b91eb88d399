// moevit eval: accuracy and confusion matrix of a checkpoint on a test set.
//
//   eval runs/vit-tiny/checkpoint.safetensors [--dump-logits logits.safetensors]
#include <CLI/CLI.hpp>
#include <cstdio>

#include "engine/memory.h"
#include "engine/parallel.h"
#include "engine/safetensors.h"
#include "models/checkpoint.h"
#include "models/train.h"

using namespace mv;

int main(int argc, char** argv) {
  CLI::App app{"Evaluate a moevit checkpoint"};
  // A flag given twice takes its last value, so scripts can append overrides to defaults.
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  std::string ckpt, data_dir, dump, dataset, device = "cpu";
  int batch = 500, threads = 0;
  int64_t limit = 0;
  app.add_option("checkpoint", ckpt, "a checkpoint.safetensors written by train")->required();
  app.add_option("--dataset", dataset, "override the data set the run was trained on");
  app.add_option("--data-dir", data_dir, "override the data folder");
  app.add_option("--batch", batch)->capture_default_str();
  app.add_option("--limit", limit, "use only the first N test images");
  app.add_option("--device", device, "cpu | cuda: where the model runs")->capture_default_str();
  app.add_option("--threads", threads, "CPU threads (default: all cores)");
  app.add_option("--dump-logits", dump, "write the logits (and labels) to this safetensors file");
  CLI11_PARSE(app, argc, argv);

  try {
    if (threads > 0) set_num_threads(threads);
    Metadata meta = models::read_checkpoint_metadata(ckpt);
    MV_CHECK(meta.count("config"), "eval: '", ckpt, "' has no training configuration in its metadata");
    models::TrainConfig c = models::TrainConfig::from_json(meta.at("config"));
    if (!dataset.empty()) c.dataset = dataset;
    if (!data_dir.empty()) c.data_dir = data_dir;
    MV_CHECK(device == "cpu" || device == "cuda", "--device must be cpu or cuda, got '", device, "'");
    MV_CHECK(device == "cpu" || cuda_available(), "--device cuda: no CUDA device is available (a "
             "build without CUDA, or no GPU found); use --device cpu");
    models::ViT model(c.vit, c.seed);
    models::load_checkpoint(ckpt, model, nullptr);
    model.to(device == "cuda" ? Device::CUDA : Device::CPU);
    datasets::Dataset test = models::load_dataset(c.dataset, c.data_dir, false);
    if (limit > 0) test = datasets::head(test, limit);
    models::EvalResult r = models::evaluate(model, test, c.dataset, batch, !dump.empty());

    const int C = c.vit.num_classes;
    std::printf("%s on %s (%lld images): accuracy %.2f%%, loss %.4f\n", ckpt.c_str(),
                test.name.c_str(), (long long)r.n, 100 * r.accuracy, r.loss);
    std::printf("confusion matrix (rows: true class, columns: predicted)\n      ");
    for (int j = 0; j < C; ++j) std::printf("%6d", j);
    std::printf("\n");
    for (int i = 0; i < C; ++i) {
      std::printf("%5d ", i);
      for (int j = 0; j < C; ++j) std::printf("%6lld", (long long)r.confusion[size_t(i * C + j)]);
      if (size_t(i) < test.class_names.size()) std::printf("  %s", test.class_names[size_t(i)].c_str());
      std::printf("\n");
    }
    if (!dump.empty()) {
      save_safetensors(dump, {{"logits", r.logits},
                              {"labels", Tensor::from_i64(test.labels, {test.n})}},
                       {{"checkpoint", ckpt}, {"dataset", test.name}});
      std::printf("logits written to %s\n", dump.c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "eval: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
