// moevit eval: accuracy and confusion matrix of a checkpoint on a test set, and optionally the
// routing consistency of an MoE model under Gaussian input noise (report/consistency.h).
//
//   eval runs/vit-tiny/checkpoint.safetensors [--dump-logits logits.safetensors]
//   eval runs/vit-tiny                                  (a run folder: its checkpoint)
//   eval runs/vmoe/checkpoint.safetensors --consistency [--sigmas 0.05,0.1,0.2,0.5,1]
//        [--noise-on pixels|block:N] [--noise-seed 0] [--report DIR]
#include <CLI/CLI.hpp>
#include <cstdio>

#include "engine/memory.h"
#include "engine/parallel.h"
#include "engine/safetensors.h"
#include "report/consistency.h"
#include "report/consistency_report.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/data.h"
#include "train/evaluate.h"

using namespace mv;

int main(int argc, char** argv) {
  CLI::App app{"Evaluate a moevit checkpoint"};
  // A flag given twice takes its last value, so scripts can append overrides to defaults.
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  std::string ckpt, data_dir, dump, dataset, device = "cpu";
  int batch = 500, threads = 0;
  int64_t limit = 0;
  app.add_option("checkpoint", ckpt, "a checkpoint.safetensors written by train, or the run "
                 "folder that holds it")->required();
  app.add_option("--dataset", dataset, "override the data set the run was trained on");
  app.add_option("--data-dir", data_dir, "override the data folder");
  app.add_option("--batch", batch)->capture_default_str();
  app.add_option("--limit", limit, "use only the first N test images");
  app.add_option("--device", device, "cpu | cuda: where the model runs")->capture_default_str();
  app.add_option("--threads", threads, "CPU threads (default: all cores)");
  app.add_option("--dump-logits", dump, "write the logits (and labels) to this safetensors file");
  bool consistency = false;
  report::ConsistencyConfig cc;
  std::string noise_on = "pixels", report;
  app.add_flag("--consistency", consistency,
               "routing agreement of every MoE layer under Gaussian input noise, over a sigma sweep");
  app.add_option("--sigmas", cc.sigmas, "noise std values, comma-separated (in normalised-pixel "
                 "units: 5% to 100% of a pixel's std by default)")
      ->delimiter(',')->capture_default_str();
  app.add_option("--noise-on", noise_on, "pixels (normalised) | block:N (the token input of "
                 "block N)")->capture_default_str();
  app.add_option("--noise-seed", cc.seed, "seed of the noise")->capture_default_str();
  app.add_option("--report", report, "write consistency.json, .csv and .png to this folder");
  CLI11_PARSE(app, argc, argv);

  try {
    if (threads > 0) set_num_threads(threads);
    ckpt = train::checkpoint_file(ckpt);
    Metadata meta = train::read_checkpoint_metadata(ckpt);
    MV_CHECK(meta.count("config"), "eval: '", ckpt, "' has no training configuration in its metadata");
    train::TrainConfig c = train::TrainConfig::from_json(meta.at("config"));
    if (!dataset.empty()) c.dataset = dataset;
    if (!data_dir.empty()) c.data_dir = data_dir;
    MV_CHECK(device == "cpu" || device == "cuda", "--device must be cpu or cuda, got '", device, "'");
    MV_CHECK(device == "cpu" || cuda_available(), "--device cuda: no CUDA device is available (a "
             "build without CUDA, or no GPU found); use --device cpu");
    MV_CHECK(consistency || (report.empty() && app.count("--sigmas") == 0 &&
                             app.count("--noise-on") == 0 && app.count("--noise-seed") == 0),
             "--sigmas, --noise-on, --noise-seed and --report need --consistency");
    if (consistency) cc.block = report::parse_noise_on(noise_on);
    models::ViT model(c.vit, c.seed);
    MV_CHECK(!consistency || !model.moe_layers().empty(), "--consistency: ", ckpt,
             " is a dense model (MoE placement '", c.vit.moe_placement,
             "'): it has no MoE layers, so no routing to compare");
    MV_CHECK(!consistency || cc.block < c.vit.depth, "--noise-on block:", cc.block,
             ": the model has blocks 0..", c.vit.depth - 1);
    for (double s : cc.sigmas) MV_CHECK(s >= 0, "--sigmas: ", s, " must be >= 0");
    train::load_checkpoint(ckpt, model, nullptr);
    model.to(device == "cuda" ? Device::CUDA : Device::CPU);
    datasets::Dataset test = train::load_dataset(c.dataset, c.data_dir, false);
    if (limit > 0) test = datasets::head(test, limit);
    train::EvalResult r = train::evaluate(model, test, c.dataset, batch, !dump.empty());

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
    if (consistency) {
      cc.batch = batch;
      cc.dataset = c.dataset;
      report::ConsistencyResult cr = report::routing_consistency(model, test, cc);
      std::printf("\n%s", report::consistency_table(cr).c_str());
      if (!report.empty()) {
        report::write_consistency_report(cr, report);
        std::printf("wrote %s/consistency.json, consistency.csv and consistency.png (mean over MoE "
                    "layers against sigma, sweep points evenly spaced; y 0..1; top-1 blue, top-2 "
                    "red, top-2 set green, Jaccard orange, accuracy grey dashed)\n",
                    report.c_str());
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "eval: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
