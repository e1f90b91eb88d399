// moevit eval: accuracy and confusion matrix of a checkpoint on a test set, and optionally the
// routing consistency of an MoE model under Gaussian input noise (report/consistency.h).
//
//   eval runs/vit-tiny/checkpoint.safetensors [--dump-logits logits.safetensors]
//   eval runs/vit-tiny                                  (a run folder: its checkpoint)
//   eval runs/vit-tiny --eval-flip                      (also the mirror images: logits averaged)
//   eval runs/vmoe/checkpoint.safetensors --consistency [--sigmas 0.05,0.1,0.2,0.5,1]
//        [--noise-on pixels|block:N] [--noise-seed 0] [--report DIR]
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>

#include "apps/cli.h"
#include "engine/file_write.h"
#include "engine/memory.h"
#include "engine/safetensors.h"
#include "report/consistency.h"
#include "report/consistency_report.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/evaluate.h"

using namespace mv;

namespace {

struct Flags {
  std::string ckpt, data_dir, dump, dataset, device = "cpu";
  int batch = 500, threads = 0;
  int64_t limit = 0;
  bool consistency = false;
  bool flip = false;  // with --eval-flip or --no-eval-flip; else the run's own setting
  report::ConsistencyConfig cc;  // block: set from noise_on
  std::string noise_on = "pixels", report_dir;
};

void add_flags(CLI::App& app, Flags& f) {
  // A flag given twice takes its last value, so scripts can append overrides to defaults.
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("checkpoint", f.ckpt, "a checkpoint.safetensors written by train, or the run "
                 "folder that holds it")->required();
  app.add_option("--dataset", f.dataset, "override the data set the run was trained on");
  app.add_option("--data-dir", f.data_dir, "override the data folder");
  app.add_option("--batch", f.batch)->capture_default_str();
  app.add_option("--limit", f.limit, "use only the first N test images");
  app.add_option("--device", f.device, "cpu | cuda: where the model runs")->capture_default_str();
  app.add_option("--threads", f.threads, "CPU threads (default: all cores)");
  app.add_flag("--eval-flip,!--no-eval-flip", f.flip, "average the logits of each image and its "
               "mirror image (default: as the run was evaluated in training)");
  app.add_option("--dump-logits", f.dump, "write the logits (and labels) to this safetensors file");
  app.add_flag("--consistency", f.consistency,
               "routing agreement of every MoE layer under Gaussian input noise, over a sigma sweep");
  app.add_option("--sigmas", f.cc.sigmas, "noise std values, comma-separated (in normalised-pixel "
                 "units: 5% to 100% of a pixel's std by default)")
      ->delimiter(',')->capture_default_str();
  app.add_option("--noise-on", f.noise_on, "pixels (normalised) | block:N (the token input of "
                 "block N)")->capture_default_str();
  app.add_option("--noise-seed", f.cc.seed, "seed of the noise")->capture_default_str();
  app.add_option("--report", f.report_dir, "write consistency.json, .csv and .png to this folder");
}

// Throws naming a flag that the machine cannot serve, or that needs --consistency.
void check_flags(const CLI::App& app, const Flags& f) {
  cli::parse_device(f.device);
  MV_CHECK(f.batch >= 1 && f.batch <= 65536, "--batch must be in 1..65536, got ", f.batch);
  MV_CHECK(app.count("--limit") == 0 || f.limit >= 1, "--limit must be at least 1 image, got ",
           f.limit);
  MV_CHECK(f.cc.sigmas.size() <= 64, "--sigmas: at most 64 values, got ", f.cc.sigmas.size());
  for (double s : f.cc.sigmas)
    MV_CHECK(std::isfinite(s) && s >= 0, "--sigmas: ", s, " must be finite and >= 0");
  if (!f.dump.empty()) check_writable_path(f.dump, "--dump-logits");
  MV_CHECK(f.consistency || (f.report_dir.empty() && app.count("--sigmas") == 0 &&
                             app.count("--noise-on") == 0 && app.count("--noise-seed") == 0),
           "--sigmas, --noise-on, --noise-seed and --report need --consistency");
}

// Throws when the noise flags do not fit the model: --consistency of a dense model, a block
// that it does not have, a negative sigma.
void check_noise_flags(const Flags& f, const models::ViT& model) {
  const models::ViTConfig& v = model.config;
  MV_CHECK(!f.consistency || !model.moe_layers().empty(), "--consistency: ", f.ckpt,
           " is a dense model (MoE placement '", v.moe_placement,
           "'): it has no MoE layers, so no routing to compare");
  MV_CHECK(!f.consistency || f.cc.block < v.depth, "--noise-on block:", f.cc.block,
           ": the model has blocks 0..", v.depth - 1);
}

// The accuracy line, then the confusion matrix with the class names.
void print_accuracy(const Flags& f, const datasets::Dataset& test, const train::EvalResult& r,
                    int C) {
  std::printf("%s on %s (%lld images): accuracy %.2f%%, loss %.4f\n", f.ckpt.c_str(),
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
}

void dump_logits(const Flags& f, const datasets::Dataset& test, const train::EvalResult& r) {
  save_safetensors(f.dump, {{"logits", r.logits},
                            {"labels", Tensor::from_i64(test.labels, {test.n})}},
                   {{"checkpoint", f.ckpt}, {"dataset", test.name}});
  std::printf("logits written to %s\n", f.dump.c_str());
}

// The noise sweep: its table, and the report files with --report.
void print_consistency(const Flags& f, const train::TrainConfig& c, models::ViT& model,
                       const datasets::Dataset& test) {
  report::ConsistencyConfig cc = f.cc;
  cc.batch = f.batch;
  cc.dataset = c.dataset;
  const report::ConsistencyResult cr = report::routing_consistency(model, test, cc);
  std::printf("\n%s", report::consistency_table(cr).c_str());
  if (f.report_dir.empty()) return;
  report::write_consistency_report(cr, f.report_dir);
  std::printf("wrote %s/consistency.json, consistency.csv and consistency.png (mean over MoE "
              "layers against sigma, sweep points evenly spaced; y 0..1; top-1 blue, top-2 "
              "red, top-2 set green, Jaccard orange, accuracy grey dashed)\n",
              f.report_dir.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Evaluate a moevit checkpoint"};
  Flags f;
  add_flags(app, f);
  CLI11_PARSE(app, argc, argv);

  return cli::guarded("eval", [&] {
    if (app.count("--threads")) cli::set_threads(f.threads);
    check_flags(app, f);
    f.ckpt = train::checkpoint_file(f.ckpt);
    const train::TrainConfig c = train::checkpoint_config(f.ckpt, "eval", f.dataset, f.data_dir);
    if (f.consistency) f.cc.block = report::parse_noise_on(f.noise_on);
    // Without a backward only about one block's activations are alive at a time.
    check_fits_memory(c.vit.activation_bytes(f.batch) / c.vit.depth,
                      "--batch " + std::to_string(f.batch) + " with this model");
    models::ViT model(c.vit, c.seed);
    check_noise_flags(f, model);
    if (train::load_weights_for_evaluation(f.ckpt, model))
      std::printf("the run kept an average of its weights (--ema): evaluating it\n");
    model.to(cli::parse_device(f.device));
    datasets::Dataset test = train::load_dataset(c.dataset, c.data_dir, false);
    if (f.limit > 0) test = datasets::head(test, f.limit);

    const bool flip = app.count("--eval-flip") ? f.flip : c.eval_flip;  // either spelling counts
    if (flip) std::printf("each image's logits averaged with its mirror image's (--eval-flip)\n");
    const train::EvalResult r = train::evaluate(
        model, test, c.dataset, {.batch = f.batch, .flip = flip, .keep_logits = !f.dump.empty()});
    print_accuracy(f, test, r, c.vit.num_classes);
    if (!f.dump.empty()) dump_logits(f, test, r);
    if (f.consistency && flip)
      std::printf("\n(the noise sweep classifies each image alone, without its mirror image)");
    if (f.consistency) print_consistency(f, c, model, test);
    return 0;
  });
}
