#include "models/train.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "autograd/autograd.h"
#include "datasets/cifar.h"
#include "datasets/idx.h"
#include "datasets/loader.h"
#include "datasets/synthetic.h"
#include "engine/memory.h"
#include "models/checkpoint.h"
#include "models/optim.h"
#include "ops/elementwise.h"
#include "ops/loss.h"
#include "ops/matmul.h"
#include "ops/prc.h"
#include "ops/reduce.h"
#include "ops/shape.h"

namespace mv::models {

datasets::Dataset load_dataset(const std::string& name, const std::string& dir, bool train) {
  using namespace datasets;
  if (name == "fashion-mnist") return load_mnist(dir.empty() ? kFashionMnistDir : dir, train, name);
  if (name == "mnist") {
    MV_CHECK(!dir.empty(), "--dataset mnist needs --data-dir: a folder with the four MNIST IDX files");
    return load_mnist(dir, train, name);
  }
  if (name == "cifar10" || name == "cifar100") {
    MV_CHECK(!dir.empty(), "--dataset ", name, " needs --data-dir: the folder of the binary version "
             "from https://www.cs.toronto.edu/~kriz/cifar.html");
    return load_cifar(dir, train, name == "cifar10" ? 10 : 100);
  }
  if (name == "synthetic") {
    Dataset d = make_synthetic(train ? 4096 : 1024, 1, 28, 10, train ? 1 : 2);
    d.name = std::string("synthetic-") + (train ? "train" : "test");
    return d;
  }
  MV_FAIL("--dataset: unknown data set '", name,
          "' (expected fashion-mnist, mnist, cifar10, cifar100 or synthetic)");
}

datasets::Normalize normalization(const std::string& name) {
  using datasets::Normalize;
  if (name == "fashion-mnist") return Normalize::fashion_mnist();
  if (name == "mnist") return Normalize::mnist();
  if (name == "cifar10") return Normalize::cifar10();
  if (name == "cifar100") return Normalize::cifar100();
  return Normalize{{0.5f}, {0.5f}};
}

EvalResult evaluate(ViT& model, const datasets::Dataset& data, const std::string& dataset,
                    int batch, bool keep_logits) {
  autograd::NoGrad no_grad;
  model.train(false);
  const Device dev = model.device();
  datasets::Loader loader(data, batch, /*shuffle=*/false, 0, /*drop_last=*/false,
                          datasets::Augment::none(), normalization(dataset));
  const int C = model.config.num_classes;
  EvalResult r;
  r.confusion.assign(size_t(C) * C, 0);
  std::vector<float> all_logits;
  loader.begin_epoch(0);
  for (datasets::Batch b; loader.next(b);) {
    Tensor logits = model.forward(b.images.to(dev));
    const int64_t B = b.labels.numel();
    r.loss += double(ops::cross_entropy(logits, b.labels.to(dev)).item()) * B;
    std::vector<int64_t> pred = ops::argmax(logits, 1).to_vector<int64_t>();
    std::vector<int64_t> lab = b.labels.to_vector<int64_t>();
    for (int64_t i = 0; i < B; ++i) {
      r.accuracy += pred[size_t(i)] == lab[size_t(i)];
      r.confusion[size_t(lab[size_t(i)] * C + pred[size_t(i)])]++;
    }
    r.n += B;
    if (keep_logits) {
      std::vector<float> v = logits.to_vector<float>();
      all_logits.insert(all_logits.end(), v.begin(), v.end());
    }
  }
  model.train(true);
  r.loss /= double(std::max<int64_t>(r.n, 1));
  r.accuracy /= double(std::max<int64_t>(r.n, 1));
  if (keep_logits) r.logits = Tensor::from(all_logits, {r.n, C});
  return r;
}

void TrainConfig::validate() const {
  vit.validate();
  MV_CHECK(epochs >= 1, "--epochs must be at least 1, got ", epochs);
  MV_CHECK(batch >= 1 && eval_batch >= 1, "--batch must be at least 1, got ", batch);
  MV_CHECK(lr > 0 && std::isfinite(lr), "--lr must be positive, got ", lr);
  MV_CHECK(weight_decay >= 0, "--weight-decay must be >= 0, got ", weight_decay);
  MV_CHECK(warmup_epochs >= 0, "--warmup must be >= 0 epochs, got ", warmup_epochs);
  MV_CHECK(label_smoothing >= 0 && label_smoothing < 1, "--label-smoothing must be in [0, 1), got ",
           label_smoothing);
  MV_CHECK(clip >= 0, "--clip must be >= 0, got ", clip);
  MV_CHECK(optimizer == "adamw" || optimizer == "sgd", "--optimizer must be adamw or sgd, got '",
           optimizer, "'");
  MV_CHECK(schedule == "cosine" || schedule == "linear", "--schedule must be cosine or linear, got '",
           schedule, "'");
  MV_CHECK(augment == "none" || augment == "crop" || augment == "crop-flip",
           "--augment must be none, crop or crop-flip, got '", augment, "'");
  MV_CHECK(device == "cpu" || device == "cuda", "--device must be cpu or cuda, got '", device, "'");
  MV_CHECK(device != "cuda" || cuda_available(), "--device cuda: no CUDA device is available (a "
           "build without CUDA, or no GPU found); use --device cpu");
  MV_CHECK(!tf32 || device == "cuda", "--tf32 applies to CUDA GEMMs only; add --device cuda");
  MV_CHECK(device != "cuda" || vit.moe_placement == "none", "model '", model,
           "' has MoE layers, which have no CUDA kernels yet; use --device cpu");
  MV_CHECK(!prc || vit.moe_placement != "none", "--prc needs a model with MoE layers (an MoE "
           "preset such as vmoe-tiny, or --moe every-2); model '", model, "' is dense");
  MV_CHECK(!prc || vit.moe.router.type != "soft", "--prc needs a router that assigns tokens to "
           "experts; Soft MoE mixes tokens into slots");
  MV_CHECK(prc_diag_weight >= 0 && prc_off_weight >= 0, "--prc-diag-weight and "
           "--prc-off-weight must be >= 0, got ", prc_diag_weight, " and ", prc_off_weight);
  for (int b : prc_blocks)
    MV_CHECK(b >= 0 && b < vit.depth && vit.is_moe_block(b), "--prc-blocks: block ", b,
             " has no MoE layer (model '", model, "': ", vit.depth, " blocks, MoE placement ",
             vit.moe_placement, ")");
  MV_CHECK(jaccard_weight >= 0 && jaccard_sigma > 0, "--jaccard-weight must be >= 0 and "
           "--jaccard-sigma > 0, got ", jaccard_weight, " and ", jaccard_sigma);
  MV_CHECK(jaccard_weight == 0 || vit.moe_placement != "none", "--jaccard-weight needs a model "
           "with MoE layers; model '", model, "' is dense");
}

// The MoE part of a ViT config, every field, so a checkpoint rebuilds exactly its model.
static nlohmann::ordered_json moe_json(const ViTConfig& v) {
  const RouterConfig& r = v.moe.router;
  return {{"placement", v.moe_placement}, {"last_n", v.moe_last_n}, {"mlp_dim", v.moe.mlp_dim},
          {"group_per_batch", v.moe.group_per_batch}, {"router", r.type}, {"experts", r.experts},
          {"k", r.k}, {"capacity_train", r.capacity_train}, {"capacity_eval", r.capacity_eval},
          {"round_to_4", r.round_to_4}, {"bpr", r.bpr}, {"renormalize", r.renormalize},
          {"noise_std", r.noise_std}, {"importance_weight", r.importance_weight},
          {"load_weight", r.load_weight}, {"ec_capacity", r.ec_capacity}, {"slots", r.slots},
          {"soft_scale", r.soft_scale}, {"proj_dim", r.proj_dim}, {"tau1", r.tau1},
          {"tau2", r.tau2}, {"centroids", r.centroids}, {"separation_weight", r.separation_weight},
          {"vote_dim", r.vote_dim}, {"global_query", r.global_query}};
}

static void moe_from_json(const nlohmann::json& j, ViTConfig& v) {
  RouterConfig& r = v.moe.router;
  v.moe_placement = j.at("placement"), v.moe_last_n = j.at("last_n");
  v.moe.mlp_dim = j.at("mlp_dim"), v.moe.group_per_batch = j.at("group_per_batch");
  r.type = j.at("router"), r.experts = j.at("experts"), r.k = j.at("k");
  r.capacity_train = j.at("capacity_train"), r.capacity_eval = j.at("capacity_eval");
  r.round_to_4 = j.at("round_to_4"), r.bpr = j.at("bpr"), r.renormalize = j.at("renormalize");
  r.noise_std = j.at("noise_std"), r.importance_weight = j.at("importance_weight");
  r.load_weight = j.at("load_weight"), r.ec_capacity = j.at("ec_capacity");
  r.slots = j.at("slots"), r.proj_dim = j.at("proj_dim"), r.tau1 = j.at("tau1");
  r.soft_scale = j.value("soft_scale", 1.f);  // checkpoints before the field had the method's 1
  r.tau2 = j.at("tau2"), r.centroids = j.at("centroids");
  r.separation_weight = j.at("separation_weight"), r.vote_dim = j.at("vote_dim");
  r.global_query = j.at("global_query");
}

std::string TrainConfig::to_json() const {
  nlohmann::ordered_json j = {
      {"dataset", dataset}, {"data_dir", data_dir}, {"model", model},
      {"image_size", vit.image_size}, {"channels", vit.channels}, {"patch", vit.patch},
      {"dim", vit.dim}, {"depth", vit.depth}, {"heads", vit.heads}, {"mlp_dim", vit.mlp_dim},
      {"num_classes", vit.num_classes}, {"epochs", epochs}, {"batch", batch},
      {"eval_batch", eval_batch}, {"optimizer", optimizer}, {"lr", lr},
      {"weight_decay", weight_decay}, {"momentum", momentum}, {"schedule", schedule},
      {"warmup_epochs", warmup_epochs}, {"label_smoothing", label_smoothing}, {"clip", clip},
      {"augment", augment}, {"seed", seed}, {"limit_train", limit_train},
      {"limit_test", limit_test}, {"device", device}, {"tf32", tf32}, {"prc", prc},
      {"prc_diag_weight", prc_diag_weight}, {"prc_off_weight", prc_off_weight},
      {"prc_reference_diagonal", prc_reference_diagonal}, {"prc_blocks", prc_blocks},
      {"prc_cls_pair", prc_cls_pair}, {"jaccard_weight", jaccard_weight},
      {"jaccard_sigma", jaccard_sigma}};
  if (vit.moe_placement != "none") j["moe"] = moe_json(vit);
  return j.dump();
}

TrainConfig TrainConfig::from_json(const std::string& text) {
  TrainConfig c;
  try {
    auto j = nlohmann::json::parse(text);
    c.dataset = j.at("dataset"), c.data_dir = j.at("data_dir"), c.model = j.at("model");
    c.vit = {j.at("image_size"), j.at("channels"), j.at("patch"), j.at("dim"), j.at("depth"),
             j.at("heads"), j.at("mlp_dim"), j.at("num_classes")};
    if (j.contains("moe")) moe_from_json(j.at("moe"), c.vit);
    c.epochs = j.at("epochs"), c.batch = j.at("batch"), c.eval_batch = j.at("eval_batch");
    c.optimizer = j.at("optimizer"), c.lr = j.at("lr"), c.weight_decay = j.at("weight_decay");
    c.momentum = j.at("momentum"), c.schedule = j.at("schedule");
    c.warmup_epochs = j.at("warmup_epochs"), c.label_smoothing = j.at("label_smoothing");
    c.clip = j.at("clip"), c.augment = j.at("augment"), c.seed = j.at("seed");
    c.limit_train = j.at("limit_train"), c.limit_test = j.at("limit_test");
    c.device = j.value("device", std::string("cpu"));  // checkpoints from before --device: CPU
    c.tf32 = j.value("tf32", false);                    // ... and from before --tf32
    c.prc = j.value("prc", false);                      // ... and from before --prc
    c.prc_diag_weight = j.value("prc_diag_weight", c.prc_diag_weight);
    c.prc_off_weight = j.value("prc_off_weight", c.prc_off_weight);
    c.prc_reference_diagonal = j.value("prc_reference_diagonal", false);
    c.prc_blocks = j.value("prc_blocks", std::vector<int>{});
    c.prc_cls_pair = j.value("prc_cls_pair", false);
    c.jaccard_weight = j.value("jaccard_weight", 0.f);  // ... and from before --jaccard-weight
    c.jaccard_sigma = j.value("jaccard_sigma", c.jaccard_sigma);
  } catch (const nlohmann::json::exception& e) {
    MV_FAIL("training configuration: ", e.what());
  }
  return c;
}

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

datasets::Augment augment_for(const std::string& a) {
  if (a == "crop") return datasets::Augment::crop_flip(2, 0.f);
  if (a == "crop-flip") return datasets::Augment::crop_flip(2, 0.5f);
  return datasets::Augment::none();
}

// One status line per epoch: a bar redrawn in place on a terminal, a line every ~10% otherwise.
class Progress {
 public:
  Progress(FILE* out, int epoch, int epochs, int64_t total)
      : out_(out), epoch_(epoch), epochs_(epochs), total_(total), tty_(out && isatty(fileno(out))) {}
  void update(int64_t done, double loss, double acc, double img_s, double eta) {
    if (!out_) return;
    const bool last = done == total_;
    if (!tty_ && !last && done % std::max<int64_t>(total_ / 10, 1) != 0) return;
    char bar[21];
    const int fill = int(20 * done / std::max<int64_t>(total_, 1));
    for (int i = 0; i < 20; ++i) bar[i] = i < fill ? '=' : (i == fill ? '>' : ' ');
    bar[20] = 0;
    std::fprintf(out_, "%sepoch %d/%d [%s] %lld/%lld loss %.4f acc %.2f%% %.0f img/s ETA %s%s",
                 tty_ ? "\r" : "", epoch_, epochs_, bar, (long long)done, (long long)total_, loss,
                 100 * acc, img_s, format_seconds(eta).c_str(), tty_ ? (last ? "\n" : "") : "\n");
    std::fflush(out_);
  }

 private:
  FILE* out_;
  int epoch_, epochs_;
  int64_t total_;
  bool tty_;
};

// Per MoE layer, the routing of the epoch's training steps: the share of filled buffer slots
// each expert had, the fraction of dropped choices, and the mean unweighted auxiliary losses.
nlohmann::ordered_json moe_stats_json(const ViT& model) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (size_t b = 0; b < model.blocks.size(); ++b) {
    const MoELayer* m = model.blocks[b]->moe.get();
    if (!m) continue;
    const MoEStats& s = m->stats;
    int64_t filled = 0;
    for (int64_t l : s.load) filled += l;
    std::vector<double> share;
    for (int64_t l : s.load) share.push_back(filled ? double(l) / double(filled) : 0.0);
    const double f = double(std::max<int64_t>(s.forwards, 1));
    out.push_back({{"block", b}, {"router", m->config.router.type}, {"load", share},
                   {"dropped", s.choices ? double(s.dropped) / double(s.choices) : 0.0},
                   {"importance_loss", s.importance_loss / f}, {"load_loss", s.load_loss / f},
                   {"separation_loss", s.separation_loss / f}});
  }
  return out;
}

// One line per MoE layer: dropped choices and the least and most loaded expert (1 = even).
void print_moe_stats(FILE* log, const nlohmann::ordered_json& moe) {
  for (auto& l : moe) {
    const std::vector<double> share = l.at("load");
    const auto [lo, hi] = std::minmax_element(share.begin(), share.end());
    const double even = 1.0 / double(share.size());
    std::fprintf(log, "  block %d (%s): dropped %.2f%%, expert load %.2f..%.2f of even, "
                 "importance loss %.4f, load loss %.4f\n",
                 int(l.at("block")), std::string(l.at("router")).c_str(),
                 100 * double(l.at("dropped")), *lo / even, *hi / even,
                 double(l.at("importance_loss")), double(l.at("load_loss")));
  }
}

// PRC (methods.md section 4) of every MoE layer of the last forward, whose batch held view 1 of
// B images then view 2 of the same images; pairs: (B, T). Summed over the layers.
Tensor prc_loss(const std::vector<MoELayer*>& layers, const Tensor& pairs, const TrainConfig& cfg) {
  ops::PrcOptions opt;
  opt.reference_diagonal = cfg.prc_reference_diagonal;
  opt.diag_weight = cfg.prc_diag_weight;
  opt.off_weight = cfg.prc_off_weight;
  const int64_t B = pairs.size(0), T = pairs.size(1);
  Tensor sum;
  for (MoELayer* m : layers) {
    const Tensor& probs = m->last.probs;  // (G, N, E) with G * N = 2B * T, images in order
    const Tensor p = ops::reshape(probs, {2 * B, T, probs.size(2)});
    const Tensor l = ops::prc_loss(ops::slice(p, 0, 0, B), ops::slice(p, 0, B, 2 * B), pairs, opt);
    sum = sum.defined() ? sum + l : l;
  }
  return sum;
}

}  // namespace

TrainResult train(const TrainConfig& given, const std::string& out_dir, bool resume, FILE* log,
                  int stop_after) {
  namespace fs = std::filesystem;
  const std::string ckpt = run_checkpoint(out_dir);
  TrainConfig cfg = given;
  int start_epoch = 0;
  Metadata meta;
  if (resume) {
    MV_CHECK(fs::exists(ckpt), "--resume: no checkpoint at '", ckpt, "'");
    meta = read_checkpoint_metadata(ckpt);
    MV_CHECK(meta.count("config") && meta.count("epoch"), "--resume: '", ckpt,
             "' has no training configuration in its metadata");
    cfg = TrainConfig::from_json(meta.at("config"));
    start_epoch = std::stoi(meta.at("epoch"));
  }
  cfg.validate();
  fs::create_directories(out_dir);

  datasets::Dataset train_set = load_dataset(cfg.dataset, cfg.data_dir, true);
  datasets::Dataset test_set = load_dataset(cfg.dataset, cfg.data_dir, false);
  if (cfg.limit_train > 0) train_set = datasets::head(train_set, cfg.limit_train);
  if (cfg.limit_test > 0) test_set = datasets::head(test_set, cfg.limit_test);
  MV_CHECK(train_set.channels == cfg.vit.channels && train_set.height == cfg.vit.image_size &&
               train_set.num_classes == cfg.vit.num_classes,
           "model '", cfg.model, "' expects ", cfg.vit.channels, "x", cfg.vit.image_size, "x",
           cfg.vit.image_size, " images and ", cfg.vit.num_classes, " classes, but ", train_set.name,
           " has ", train_set.channels, "x", train_set.height, "x", train_set.width, " and ",
           train_set.num_classes);

  ViT model(cfg.vit, cfg.seed);
  if (cfg.jaccard_weight > 0) model.jaccard_sigma = cfg.jaccard_sigma;
  const Device dev = cfg.device == "cuda" ? Device::CUDA : Device::CPU;
  ops::set_allow_tf32(cfg.tf32);
  model.to(dev);  // before the optimizer, so its state is allocated on the same device
  std::unique_ptr<Optimizer> opt;
  if (cfg.optimizer == "adamw") opt = std::make_unique<AdamW>(model.named_parameters(), cfg.weight_decay);
  else opt = std::make_unique<SGD>(model.named_parameters(), cfg.momentum, cfg.weight_decay);
  TrainResult res;
  if (resume) {
    load_checkpoint(ckpt, model, opt.get());
    if (meta.count("route_noise_offset"))
      model.route_noise->offset = std::stoull(meta.at("route_noise_offset"));
    // A resumed run's training time counts the epochs before the interruption too.
    if (meta.count("train_seconds")) res.train_seconds = std::stod(meta.at("train_seconds"));
  }
  if (log) {
    std::fprintf(log, "model %s: %lld parameters; data %s: %lld train, %lld test images\n",
                 cfg.model.c_str(), (long long)model.num_parameters(), cfg.dataset.c_str(),
                 (long long)train_set.n, (long long)test_set.n);
    if (resume) std::fprintf(log, "resuming %s after epoch %d\n", ckpt.c_str(), start_epoch);
  }

  // With PRC the loader cuts two views per image (their own crops and flips) instead of the
  // usual augmentation.
  datasets::Loader loader(train_set, cfg.batch, /*shuffle=*/true, cfg.seed, /*drop_last=*/true,
                          cfg.prc ? datasets::Augment::none() : augment_for(cfg.augment),
                          normalization(cfg.dataset));
  if (cfg.prc) {
    datasets::TwoViewConfig views = datasets::TwoViewConfig::for_image_size(cfg.vit.image_size);
    views.patch = cfg.vit.patch;
    views.cls_pair = cfg.prc_cls_pair;
    loader.set_two_view(views);
  }
  std::vector<MoELayer*> prc_layers;  // the MoE layers of --prc-blocks (default: all)
  for (size_t i = 0; cfg.prc && i < model.blocks.size(); ++i) {
    const auto& want = cfg.prc_blocks;
    if (model.blocks[i]->moe && (want.empty() || std::count(want.begin(), want.end(), int(i))))
      prc_layers.push_back(model.blocks[i]->moe.get());
  }
  const int64_t per_epoch = loader.batches_per_epoch();
  MV_CHECK(per_epoch > 0, "--batch ", cfg.batch, " is larger than the ", train_set.n,
           " training images");
  const int64_t total = per_epoch * cfg.epochs;
  const int64_t warmup = int64_t(cfg.warmup_epochs * double(per_epoch));
  const Schedule kind = cfg.schedule == "cosine" ? Schedule::Cosine : Schedule::Linear;
  const std::vector<Tensor> params = model.parameters();

  std::ofstream metrics(out_dir + "/metrics.jsonl", resume ? std::ios::app : std::ios::trunc);
  const int end_epoch = stop_after > 0 ? std::min(cfg.epochs, stop_after) : cfg.epochs;
  for (int epoch = start_epoch; epoch < end_epoch; ++epoch) {
    const auto t0 = Clock::now();
    double compute_s = 0, loss_sum = 0, correct = 0, prc_sum = 0, jaccard_sum = 0;
    int64_t seen = 0;
    Progress bar(log, epoch + 1, cfg.epochs, per_epoch);
    for (MoELayer* m : model.moe_layers()) m->stats.reset(m->config.router.experts);
    loader.begin_epoch(epoch);
    for (datasets::Batch b; loader.next(b);) {
      const auto ts = Clock::now();
      const int64_t step = opt->steps();
      // PRC: both views in one batch (view 1 first), the classification loss on both.
      const Tensor images = (cfg.prc ? ops::concat({b.images, b.images2}, 0) : b.images).to(dev);
      const Tensor labels = (cfg.prc ? ops::concat({b.labels, b.labels}, 0) : b.labels).to(dev);
      Tensor logits = model.forward(images);
      Tensor loss = ops::cross_entropy(logits, labels, cfg.label_smoothing);
      const float lv = loss.item();  // the classification loss is what the logs show
      Tensor extra = model.aux_loss();
      if (cfg.prc) {
        const Tensor prc = prc_loss(prc_layers, b.pairs.to(dev), cfg);
        prc_sum += double(prc.item());
        extra = extra.defined() ? extra + prc : prc;
      }
      if (cfg.jaccard_weight > 0) {
        const Tensor j = model.jaccard_loss();
        jaccard_sum += double(j.item());
        const Tensor wj = ops::mul(j, cfg.jaccard_weight);
        extra = extra.defined() ? extra + wj : wj;
      }
      if (extra.defined()) loss = loss + extra;
      const float total_v = extra.defined() ? loss.item() : lv;
      MV_CHECK(std::isfinite(total_v), "training: the loss is ", total_v, " at step ", step,
               " (epoch ", epoch + 1, ", batch ", b.batch_index + 1,
               "); stopping. The last good checkpoint is '", ckpt, "'");
      opt->zero_grad();
      loss.backward();
      const ClipResult clip = clip_scale(params, cfg.clip);
      opt->step(lr_at(step, total, warmup, cfg.lr, kind), clip.scale);
      compute_s += since(ts);

      const int64_t B = labels.numel();
      std::vector<int64_t> pred = ops::argmax(logits.detach(), 1).to_vector<int64_t>();
      std::vector<int64_t> lab = labels.to_vector<int64_t>();
      for (int64_t i = 0; i < B; ++i) correct += pred[size_t(i)] == lab[size_t(i)];
      loss_sum += double(lv) * B;
      seen += B;
      const double el = since(t0);
      bar.update(b.batch_index + 1, loss_sum / seen, correct / seen, seen / el,
                 el / double(b.batch_index + 1) * double(per_epoch - b.batch_index - 1));
    }
    const double epoch_s = since(t0);
    const nlohmann::ordered_json moe = moe_stats_json(model);  // of training, before evaluation
    EvalResult ev = evaluate(model, test_set, cfg.dataset, cfg.eval_batch);
    res.epochs_done = epoch + 1;
    res.train_loss = loss_sum / double(seen);
    res.test_accuracy = ev.accuracy;
    res.test_loss = ev.loss;
    res.train_seconds += epoch_s;
    Metadata save_meta{{"config", cfg.to_json()}, {"epoch", std::to_string(epoch + 1)},
                       {"test_accuracy", std::to_string(ev.accuracy)},
                       {"route_noise_offset", std::to_string(model.route_noise->offset)},
                       {"train_seconds", nlohmann::json(res.train_seconds).dump()}};
    save_checkpoint(ckpt, model, opt.get(), save_meta);

    res.images_per_second = double(seen) / compute_s;
    nlohmann::ordered_json line = {
        {"epoch", epoch + 1}, {"step", opt->steps()}, {"train_loss", res.train_loss},
        {"train_accuracy", correct / double(seen)}, {"test_loss", ev.loss},
        {"test_accuracy", ev.accuracy}, {"lr", lr_at(opt->steps() - 1, total, warmup, cfg.lr, kind)},
        {"epoch_seconds", epoch_s}, {"images_per_second", res.images_per_second}};
    if (!moe.empty()) line["moe"] = moe;
    if (cfg.prc) line["prc_loss"] = prc_sum / double(per_epoch);  // weighted, summed over layers
    if (cfg.jaccard_weight > 0) line["jaccard_loss"] = jaccard_sum / double(per_epoch);  // unweighted
    metrics << line.dump() << "\n" << std::flush;
    if (log) {
      std::fprintf(log, "epoch %d/%d: train loss %.4f, test loss %.4f, test accuracy %.2f%% (%s)\n",
                   epoch + 1, cfg.epochs, res.train_loss, ev.loss, 100 * ev.accuracy,
                   format_seconds(epoch_s).c_str());
      print_moe_stats(log, moe);
    }
  }
  return res;
}

std::string format_seconds(double s) {
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%.1fs", s);
  else if (s < 3600) std::snprintf(buf, sizeof buf, "%dm%02ds", int(s) / 60, int(s) % 60);
  else std::snprintf(buf, sizeof buf, "%dh%02dm", int(s) / 3600, int(s) % 3600 / 60);
  return buf;
}

}  // namespace mv::models
