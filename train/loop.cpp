#include "train/loop.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <nlohmann/json.hpp>

#include "datasets/loader.h"
#include "dist/comm.h"
#include "dist/device_comm.h"
#include "engine/file_write.h"
#include "ops/matmul.h"
#include "ops/reduce.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/evaluate.h"
#include "train/moe_stats.h"
#include "train/parallel.h"
#include "train/progress.h"
#include "train/step.h"
#include "train/stop.h"

namespace mv::train {

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// --resume: the metadata of the run folder's checkpoint, which holds the run's configuration and
// its last epoch.
Metadata resume_metadata(const std::string& ckpt) {
  MV_CHECK(std::filesystem::exists(ckpt), "--resume: no checkpoint at '", ckpt, "'");
  Metadata meta = read_checkpoint_metadata(ckpt);
  MV_CHECK(meta.count("epoch"), "--resume: '", ckpt, "' has no 'epoch' in its metadata: not a "
           "checkpoint of train");
  return meta;
}

// Where a resumed run starts: after `epoch` whole epochs and `batch` batches of the next (a run
// stopped by a signal in mid-epoch), each checked against the run's own length.
struct ResumePoint {
  int epoch = 0;
  int64_t batch = 0;
};
ResumePoint resume_point(const std::string& ckpt, const Metadata& meta, const TrainConfig& cfg,
                         int64_t per_epoch) {
  ResumePoint p;
  p.epoch = int(metadata_uint(meta, "epoch", ckpt, uint64_t(cfg.epochs)));
  if (meta.count("epoch_batches"))
    p.batch = int64_t(metadata_uint(meta, "epoch_batches", ckpt, uint64_t(per_epoch - 1)));
  MV_CHECK(p.epoch < cfg.epochs || p.batch == 0, "checkpoint '", ckpt, "': metadata "
           "'epoch_batches' is ", p.batch, " after the run's last epoch");
  return p;
}

struct RunData {
  datasets::Dataset train, test;
};

// The run's training and test images, cut to --limit-train and --limit-test; throws when they
// do not fit the model.
RunData load_data(const TrainConfig& cfg) {
  RunData d{load_dataset(cfg.dataset, cfg.data_dir, true),
            load_dataset(cfg.dataset, cfg.data_dir, false)};
  if (cfg.limit_train > 0) d.train = datasets::head(d.train, cfg.limit_train);
  if (cfg.limit_test > 0) d.test = datasets::head(d.test, cfg.limit_test);
  const datasets::Dataset& t = d.train;
  MV_CHECK(t.channels == cfg.vit.channels && t.height == cfg.vit.image_size &&
               t.num_classes == cfg.vit.num_classes,
           "model '", cfg.model, "' expects ", cfg.vit.channels, "x", cfg.vit.image_size, "x",
           cfg.vit.image_size, " images and ", cfg.vit.num_classes, " classes, but ", t.name,
           " has ", t.channels, "x", t.height, "x", t.width, " and ", t.num_classes);
  return d;
}

// Made after the model moved to its device, so that the optimizer's state is allocated there.
std::unique_ptr<models::Optimizer> make_optimizer(const TrainConfig& cfg, models::ViT& model) {
  if (cfg.optimizer == "adamw")
    return std::make_unique<models::AdamW>(model.named_parameters(), cfg.weight_decay);
  return std::make_unique<models::SGD>(model.named_parameters(), cfg.momentum, cfg.weight_decay);
}

// --resume: the parameters, optimizer state, weight averages and routing-noise offset saved
// after the run's last step.
void restore(const std::string& ckpt, const Metadata& meta, models::ViT& model,
             models::Optimizer& opt, models::WeightAverage* ema, const SplitParameters* split) {
  load_checkpoint(ckpt, model, &opt, ema, split);
  if (meta.count("route_noise_offset"))
    model.route_noise->offset = metadata_uint(meta, "route_noise_offset", ckpt, ~uint64_t(0));
}

// PRC's two views of each image, with patch pairs on the model's patch grid.
datasets::TwoViewConfig two_views(const TrainConfig& cfg) {
  datasets::TwoViewConfig views = datasets::TwoViewConfig::for_image_size(cfg.vit.image_size);
  views.patch = cfg.vit.patch;
  views.cls_pair = cfg.prc_cls_pair;
  if (!cfg.prc_area1.empty()) views.area1_lo = cfg.prc_area1[0], views.area1_hi = cfg.prc_area1[1];
  if (!cfg.prc_area2.empty()) views.area2_lo = cfg.prc_area2[0], views.area2_hi = cfg.prc_area2[1];
  return views;
}

// The learning rate of every step of the run: a linear warmup, then cosine or linear decay.
struct LrSchedule {
  int64_t total, warmup;
  float base;
  models::Schedule kind;
  float at(int64_t step) const { return models::lr_at(step, total, warmup, base, kind); }
};

// What fit sets up once and every epoch uses. With --time-budget, each epoch's end may change
// cfg.epochs, cfg.schedule_steps, lr.total and end_epoch (fit_schedule_to_budget).
struct Run {
  TrainConfig& cfg;
  models::ViT& model;
  models::Optimizer& opt;
  models::WeightAverage* ema;  // with --ema, else null
  LrSchedule& lr;
  const datasets::Dataset& test_set;
  const std::string& ckpt;
  FILE* log;                  // rank 0's; null on the others
  const Ranks& ranks;
  Replicas* replicas;         // on several ranks, else null
  const SplitParameters* split;  // with split experts, else null
  int64_t per_epoch;          // batches in a whole epoch
  Clock::time_point started;  // of this call of fit: with the epochs since, the time left
  double wall_before;         // seconds the run took in earlier calls (resumed runs)
  int first_epoch, end_epoch;
  int epoch_cap;              // --epochs as given: what the time budget may grow the epochs to
  int stop_after;             // --stop-after (0: none)
  // The epoch this call of fit ends at with a schedule of `epochs`.
  int end_for(int epochs) const { return stop_after > 0 ? std::min(epochs, stop_after) : epochs; }
  double wall_seconds() const { return wall_before + since(started); }
  // The schedule ends after lr.total steps, in the last epoch's middle where a budget cut it.
  bool schedule_done() const { return opt.steps() >= lr.total; }
  int64_t batches_in(int epoch) const {
    return std::min(per_epoch, lr.total - int64_t(epoch) * per_epoch);
  }
  bool out_of_time() const {
    return cfg.time_budget_minutes > 0 && wall_seconds() >= 60.0 * cfg.time_budget_minutes;
  }
  // Whether to stop after this step for a signal or the time budget, agreed by every rank (all
  // must leave the loop at the same step): 2 * signal + time, the largest over ranks.
  int stop_now() const {
    return int(agree_max(2.0 * (stop_signal() != 0) + double(out_of_time()), ranks));
  }
};

// What the training steps of one epoch add up to.
struct EpochTotals {
  int64_t steps = 0, seen = 0;          // batches; rows (view-1 rows too with PRC)
  double loss_sum = 0, correct = 0;     // classification loss times images; right predictions
  double prc_sum = 0, jaccard_sum = 0;  // the steps' PRC and noise-injection losses
  double compute_s = 0;                 // in the steps themselves
  double seconds = 0;                   // the whole epoch, waiting for batches included
  int64_t first_batch = 0, next_batch = 0;  // where the epoch began and stopped (whole: 0, per_epoch)
};

// metrics.jsonl, a line per epoch, rewritten whole by the checked writer after each line (it is
// a few KB), so that a full disk stops the run instead of silently dropping lines.
struct MetricsLog {
  std::string path, text;
  bool write;  // rank 0 writes; the others keep the text only
  MetricsLog(std::string p, bool resume, bool w) : path(std::move(p)), write(w) {
    std::ifstream in(path, std::ios::binary);
    if (resume && in) text.assign(std::istreambuf_iterator<char>(in), {});
  }
  void add(const nlohmann::ordered_json& line) {
    text += line.dump() + "\n";
    if (write) write_file(path, text);
  }
  // The best test accuracy of the lines so far (those of a resumed run's earlier epochs); 0 if none.
  double best_test_accuracy() const {
    double best = 0;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) {
      const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_object() && j.contains("test_accuracy") && j["test_accuracy"].is_number())
        best = std::max(best, j["test_accuracy"].get<double>());
    }
    return best;
  }
};

// The training steps of epoch `epoch` from batch `first_batch`, with the progress line, until the
// epoch or the schedule ends or a stop signal comes. A non-finite loss stops the run with an
// error naming the step.
EpochTotals train_epoch(const Run& run, datasets::Loader& loader, int epoch, int64_t first_batch) {
  const auto t0 = Clock::now();
  const std::vector<Tensor> params = run.model.parameters();
  EpochTotals t;
  // A time budget sizes the run after its first epoch; until then the count is unknown.
  const bool sized = run.cfg.time_budget_minutes <= 0 || epoch > 0;
  const int64_t batches = run.batches_in(epoch);
  Progress bar(run.log, epoch + 1, sized ? run.cfg.epochs : 0, batches);
  for (models::MoELayer* m : run.model.moe_layers()) m->stats.reset(m->config.router.experts, m->config.router.token_choice());
  loader.begin_epoch(epoch, first_batch);
  t.first_batch = t.next_batch = first_batch;
  for (datasets::Batch b; loader.next(b);) {
    const auto ts = Clock::now();
    const int64_t step = run.opt.steps();
    const StepResult r = train_step(run.model, run.opt, params, b, run.cfg, run.lr.at(step),
                                    run.replicas);
    if (run.ema) run.ema->update();
    const float ce = r.ce.item();  // the classification loss is what the logs show
    if (r.prc.defined()) t.prc_sum += double(r.prc.item());
    if (r.jaccard.defined()) t.jaccard_sum += double(r.jaccard.item());
    const float loss = r.loss.item();
    if (!std::isfinite(loss)) {
      const int block = nonfinite_router_block(run.model);
      MV_FAIL("training: the loss is ", loss, " at step ", step, " (epoch ", epoch + 1, ", batch ",
              b.batch_index + 1, ")",
              block >= 0 ? "; the router of the MoE layer in block " + std::to_string(block) +
                               " gave non-finite probabilities (its logits are not finite)"
                         : std::string(),
              "; stopping. The last good checkpoint is '", run.ckpt, "'");
    }
    t.compute_s += since(ts);

    const int64_t B = r.labels.numel();
    std::vector<int64_t> pred = ops::argmax(r.logits.detach(), 1).to_vector<int64_t>();
    std::vector<int64_t> lab = r.labels.to_vector<int64_t>();
    for (int64_t i = 0; i < B; ++i) t.correct += pred[size_t(i)] == lab[size_t(i)];
    t.loss_sum += double(ce) * B;
    t.seen += B;
    t.steps++;
    const double el = since(t0);
    t.next_batch = b.batch_index + 1;
    const double done = double(t.next_batch - t.first_batch);
    bar.update(t.next_batch, t.loss_sum / t.seen, t.correct / t.seen,  // this rank's share
               double(run.ranks.size) * double(t.seen) / el,            // every rank's images
               el / done * double(batches - t.next_batch));
    if (run.stop_now() != 0 || run.schedule_done()) break;
  }
  t.seconds = since(t0);
  return t;
}

// An epoch's totals over every rank's share of the batches (the times are this rank's).
EpochTotals over_ranks(EpochTotals t, const Ranks& r) {
  if (!r.many()) return t;
  const std::vector<double> v =
      dist::sum({t.loss_sum, t.correct, double(t.seen), t.prc_sum, t.jaccard_sum});
  t.loss_sum = v[0], t.correct = v[1], t.seen = int64_t(v[2]);
  t.prc_sum = v[3] / r.size, t.jaccard_sum = v[4] / r.size;  // per-step means of each rank's share
  return t;
}

// The checkpoint after `epochs` whole epochs and `batches` steps of the next one.
void save_run(const Run& run, int epochs, int64_t batches, double test_accuracy,
              const TrainResult& res) {
  Metadata meta{{"config", run.cfg.to_json()}, {"epoch", std::to_string(epochs)},
                {"test_accuracy", std::to_string(test_accuracy)},
                {"route_noise_offset", std::to_string(run.model.route_noise->offset)},
                {"train_seconds", nlohmann::json(res.train_seconds).dump()},
                {"wall_seconds", nlohmann::json(run.wall_seconds()).dump()}};
  if (batches > 0) meta["epoch_batches"] = std::to_string(batches);
  save_checkpoint(run.ckpt, run.model, &run.opt, meta, run.ema, run.split, run.ranks.rank == 0);
}

// --time-budget, after each epoch: the steps_for_budget at the run's mean pace so far (wall
// time per step, evaluations and checkpoints included), keeping the time of one more evaluation
// (eval_s) for the end; one slow epoch (a program beside the run, say) then does not cut the
// schedule as if every step left would be as slow. The schedule is stretched or cut to end with
// those steps. Saved in the configuration, so a resume keeps it.
void fit_schedule_to_budget(Run& run, double eval_s) {
  const int64_t done = run.opt.steps();
  const double step_s = run.wall_seconds() / double(done);
  const double left = 60.0 * run.cfg.time_budget_minutes - run.wall_seconds() - eval_s;
  const int64_t cap = int64_t(run.epoch_cap) * run.per_epoch;
  const int64_t steps = int64_t(agree_max(  // rank 0's count on every rank
      run.ranks.rank == 0 ? double(steps_for_budget(done, left, step_s, cap)) : 0, run.ranks));
  const int epochs = int((steps + run.per_epoch - 1) / run.per_epoch);
  if (run.log && (done == run.per_epoch || epochs != run.cfg.epochs))
    std::fprintf(run.log, "time budget %s: a step takes about %.0f ms with the evaluations, so the "
                 "run gets %lld steps (%.1f epochs; --epochs %d at most)\n",
                 format_seconds(60.0 * run.cfg.time_budget_minutes).c_str(), 1e3 * step_s,
                 (long long)steps, double(steps) / double(run.per_epoch), run.epoch_cap);
  run.end_epoch = run.end_for(epochs);
  run.cfg.epochs = epochs;
  run.cfg.schedule_steps = run.lr.total = steps;
}

// After an epoch: evaluation on the test set, the checkpoint, a line of metrics.jsonl and the
// log's summary. res takes the epoch's results.
void finish_epoch(Run& run, int epoch, const EpochTotals& share, MetricsLog& metrics,
                  TrainResult& res) {
  const TrainConfig& cfg = run.cfg;
  const EpochTotals t = over_ranks(share, run.ranks);
  const nlohmann::ordered_json moe = moe_stats_json(run.model);  // of training, before evaluation
  const auto t0 = Clock::now();
  if (run.ema) run.ema->swap();  // evaluates the averaged weights
  const EvalResult ev = evaluate_on_ranks(run.model, run.test_set, cfg.dataset,
                                          {.batch = cfg.eval_batch, .flip = cfg.eval_flip}, run.ranks);
  if (run.ema) run.ema->swap();
  if (cfg.time_budget_minutes > 0 && !run.schedule_done()) fit_schedule_to_budget(run, since(t0));
  const bool partial = t.next_batch < run.per_epoch;  // the schedule's last epoch, cut short
  res.epochs_done = epoch + 1;
  res.train_loss = t.loss_sum / double(t.seen);
  res.test_accuracy = ev.accuracy;
  res.test_loss = ev.loss;
  res.best_test_accuracy = std::max(res.best_test_accuracy, ev.accuracy);
  res.train_seconds += t.seconds;
  save_run(run, partial ? epoch : epoch + 1, partial ? t.next_batch : 0, ev.accuracy, res);

  res.images_per_second = double(t.seen) / t.compute_s;
  const int64_t steps = run.opt.steps();
  nlohmann::ordered_json line = {
      {"epoch", epoch + 1}, {"step", steps}, {"train_loss", res.train_loss},
      {"train_accuracy", t.correct / double(t.seen)}, {"test_loss", ev.loss},
      {"test_accuracy", ev.accuracy}, {"lr", run.lr.at(steps - 1)},
      {"epoch_seconds", t.seconds}, {"wall_seconds", run.wall_seconds()},
      {"images_per_second", res.images_per_second}};
  if (partial) line["epoch_batches"] = t.next_batch;
  if (!moe.empty()) line["moe"] = moe;
  if (cfg.prc) line["prc_loss"] = t.prc_sum / double(t.steps);  // weighted, summed over layers
  if (cfg.jaccard_weight > 0) line["jaccard_loss"] = t.jaccard_sum / double(t.steps);  // unweighted
  metrics.add(line);
  if (run.log) {
    // Time left: this call's wall time per epoch (evaluation included) times the epochs to go.
    const double left = since(run.started) / double(epoch + 1 - run.first_epoch) *
                        double(run.end_epoch - epoch - 1);
    std::fprintf(run.log, "epoch %d/%d: train loss %.4f, test loss %.4f, test accuracy %.2f%% "
                 "(best %.2f%%) (%s)%s%s\n", epoch + 1, cfg.epochs, res.train_loss, ev.loss,
                 100 * ev.accuracy, 100 * res.best_test_accuracy, format_seconds(t.seconds).c_str(),
                 epoch + 1 < run.end_epoch ? "; about " : "",
                 epoch + 1 < run.end_epoch ? (format_seconds(left) + " left").c_str() : "");
    print_moe_stats(run.log, moe);
  }
}

// A stop signal in mid-epoch: the checkpoint of the steps taken so far (resume continues at
// the next batch) and a metrics line of the partial epoch, without the test evaluation.
void stop_in_epoch(const Run& run, int epoch, const EpochTotals& share, MetricsLog& metrics,
                   TrainResult& res) {
  const EpochTotals t = over_ranks(share, run.ranks);
  res.train_seconds += t.seconds;
  save_run(run, epoch, t.next_batch, 0, res);
  const int64_t steps = run.opt.steps();
  nlohmann::ordered_json line = {{"epoch", epoch + 1}, {"step", steps},
                                 {"stopped_by", stop_signal() ? signal_name(stop_signal())
                                                              : "time budget"},
                                 {"epoch_batches", t.next_batch}, {"epoch_seconds", t.seconds}};
  if (t.seen > 0) {
    line["train_loss"] = t.loss_sum / double(t.seen);
    line["train_accuracy"] = t.correct / double(t.seen);
  }
  metrics.add(line);
}

}  // namespace

TrainResult fit(const TrainConfig& given, const std::string& out_dir, bool resume, FILE* log,
                int stop_after, int expert_parallel) {
  const Ranks ranks = world_ranks(expert_parallel);
  if (ranks.rank != 0) log = nullptr;
  const std::string ckpt = run_checkpoint(out_dir);
  const Metadata meta = resume ? resume_metadata(ckpt) : Metadata{};
  TrainConfig cfg = resume ? config_from_metadata(meta, ckpt, "--resume") : given;
  check_ranks(cfg, ranks, cfg.to_json() + " --out " + out_dir + (resume ? " --resume" : "") +
                              " --stop-after " + std::to_string(stop_after) +
                              " --expert-parallel " + std::to_string(expert_parallel));
  cfg.validate();
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  MV_CHECK(!ec && std::filesystem::is_directory(out_dir), "--out: cannot make the run folder '",
           out_dir, "': ", ec ? ec.message() : "a file of that name exists");
  remove_stale_temps(ckpt);  // of a run killed while it wrote its checkpoint
  const RunData data = load_data(cfg);

  if (ranks.many() && cfg.device == "cuda") dist::use_local_gpu();  // before any CUDA memory
  models::ViT model(cfg.vit, cfg.seed);
  const SplitParameters split = split_model(model, ranks);
  const SplitParameters* split_ptr = split.names.empty() ? nullptr : &split;
  if (cfg.jaccard_weight > 0) model.jaccard_sigma = cfg.jaccard_sigma;
  ops::set_allow_tf32(cfg.tf32);
  ops::set_matmul_bf16(cfg.bf16);
  model.to(cfg.device == "cuda" ? Device::CUDA : Device::CPU);
  const std::unique_ptr<models::Optimizer> opt = make_optimizer(cfg, model);
  std::unique_ptr<models::WeightAverage> ema;
  if (cfg.ema) ema = std::make_unique<models::WeightAverage>(model.named_parameters(), cfg.ema_decay);

  // With PRC the loader cuts two views per image (their own crops and flips) instead of the
  // usual augmentation.
  datasets::Loader loader(data.train, cfg.batch, /*shuffle=*/true, cfg.seed, /*drop_last=*/true,
                          cfg.prc ? datasets::Augment::none() : augmentation(cfg.augment),
                          normalization(cfg.dataset));
  if (cfg.prc) loader.set_two_view(two_views(cfg));
  loader.set_share(ranks.rank, ranks.size);
  std::unique_ptr<Replicas> replicas;
  if (ranks.many()) replicas = std::make_unique<Replicas>(model, ranks);
  const int64_t per_epoch = loader.batches_per_epoch();
  MV_CHECK(per_epoch > 0, "--batch ", cfg.batch, " is larger than the ", data.train.n,
           " training images");

  TrainResult res;
  const ResumePoint start = resume ? resume_point(ckpt, meta, cfg, per_epoch) : ResumePoint{};
  if (resume) {
    restore(ckpt, meta, model, *opt, ema.get(), split_ptr);
    // A resumed run's times count the epochs before the interruption too.
    res.train_seconds = metadata_seconds(meta, "train_seconds", ckpt);
    const int64_t step = start.epoch * per_epoch + start.batch;
    MV_CHECK(opt->steps() == step, "checkpoint '", ckpt, "': its optimizer took ", opt->steps(),
             " steps, but epoch ", start.epoch, " + batch ", start.batch, " of this data (",
             per_epoch, " batches an epoch) is step ", step, " (did the data set change?)");
  }
  if (log) {
    std::fprintf(log, "model %s: %lld parameters; data %s: %lld train, %lld test images\n",
                 cfg.model.c_str(), (long long)model.num_parameters(), cfg.dataset.c_str(),
                 (long long)data.train.n, (long long)data.test.n);
    if (resume)
      std::fprintf(log, "resuming %s after epoch %d, batch %lld\n", ckpt.c_str(), start.epoch,
                   (long long)start.batch);
  }
  LrSchedule lr{cfg.schedule_steps > 0 ? cfg.schedule_steps : per_epoch * cfg.epochs,
                int64_t(cfg.warmup_epochs * double(per_epoch)), cfg.lr,
                cfg.schedule == "cosine" ? models::Schedule::Cosine : models::Schedule::Linear};
  const double wall_before = resume ? metadata_seconds(meta, "wall_seconds", ckpt) : 0;
  Run run{cfg, model, *opt, ema.get(), lr, data.test, ckpt, log, ranks, replicas.get(), split_ptr,
          per_epoch, Clock::now(), wall_before, start.epoch, 0, cfg.epochs, stop_after};
  run.end_epoch = run.end_for(cfg.epochs);

  MetricsLog metrics(out_dir + "/metrics.jsonl", resume, ranks.rank == 0);
  res.best_test_accuracy = metrics.best_test_accuracy();
  // A stop signal ends the run after the step it arrived in (or, during an evaluation, after
  // that epoch's checkpoint).
  for (int epoch = start.epoch; epoch < run.end_epoch && !run.schedule_done(); ++epoch) {
    const EpochTotals t = train_epoch(run, loader, epoch, epoch == start.epoch ? start.batch : 0);
    if (t.next_batch < per_epoch && !run.schedule_done()) {
      stop_in_epoch(run, epoch, t, metrics, res);
      break;
    }
    finish_epoch(run, epoch, t, metrics, res);
    const int stop = run.stop_now();
    if (stop >= 2 || (stop == 1 && epoch + 1 < run.end_epoch)) break;
  }
  res.stop_signal = stop_signal();
  if (res.stop_signal != 0 && log)
    std::fprintf(log, "stopped by %s after step %lld; checkpoint %s; continue with: train "
                 "--resume %s\n", signal_name(res.stop_signal), (long long)opt->steps(),
                 ckpt.c_str(), out_dir.c_str());
  else if (!run.schedule_done() && run.out_of_time() && log)
    std::fprintf(log, "stopped at the time budget of %s after step %lld; checkpoint %s\n",
                 format_seconds(60.0 * cfg.time_budget_minutes).c_str(), (long long)opt->steps(),
                 ckpt.c_str());
  return res;
}

int64_t steps_for_budget(int64_t done, double left_s, double step_s, int64_t cap) {
  const double fit = double(done) + std::floor(std::max(left_s, 0.0) / step_s);
  return int64_t(std::clamp(fit, double(done), double(std::max(cap, done))));
}

}  // namespace mv::train
