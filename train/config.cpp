#include "train/config.h"

#include <cmath>
#include <limits>
#include <sstream>
#include <nlohmann/json.hpp>
#include <utility>

#include "engine/memory.h"
#include "ops/tile_gemm.h"

namespace mv::train {

void TrainConfig::validate() const {
  vit.validate();
  MV_CHECK(epochs >= 1 && epochs <= 100000, "--epochs must be in 1..100000, got ", epochs);
  MV_CHECK(batch >= 1 && batch <= 65536, "--batch must be in 1..65536, got ", batch);
  MV_CHECK(eval_batch >= 1 && eval_batch <= 65536, "--eval-batch must be in 1..65536, got ",
           eval_batch);
  MV_CHECK(limit_train >= 0 && limit_test >= 0, "--limit-train and --limit-test must be >= 0 "
           "(0: all images), got ", limit_train, " and ", limit_test);
  MV_CHECK(lr > 0 && std::isfinite(lr), "--lr must be positive and finite, got ", lr);
  MV_CHECK(weight_decay >= 0 && std::isfinite(weight_decay),
           "--weight-decay must be finite and >= 0, got ", weight_decay);
  MV_CHECK(momentum >= 0 && momentum < 1, "--momentum must be in [0, 1), got ", momentum);
  MV_CHECK(warmup_epochs >= 0 && warmup_epochs <= float(epochs),
           "--warmup must be in 0..--epochs (", epochs, ") epochs, got ", warmup_epochs);
  MV_CHECK(label_smoothing >= 0 && label_smoothing < 1, "--label-smoothing must be in [0, 1), got ",
           label_smoothing);
  MV_CHECK(clip >= 0 && std::isfinite(clip), "--clip must be finite and >= 0, got ", clip);
  MV_CHECK(optimizer == "adamw" || optimizer == "sgd", "--optimizer must be adamw or sgd, got '",
           optimizer, "'");
  MV_CHECK(schedule == "cosine" || schedule == "linear", "--schedule must be cosine or linear, got '",
           schedule, "'");
  MV_CHECK(augment == "none" || augment == "crop" || augment == "crop-flip",
           "--augment must be none, crop or crop-flip, got '", augment, "'");
  MV_CHECK(device == "cpu" || device == "cuda", "--device must be cpu or cuda, got '", device, "'");
  MV_CHECK(!bf16 || device == "cpu", "--bf16 applies to CPU matrix products only; on CUDA use --tf32");
  MV_CHECK(device != "cuda" || cuda_available(), "--device cuda: no CUDA device is available (a "
           "build without CUDA, or no GPU found); use --device cpu");
  MV_CHECK(!tf32 || device == "cuda", "--tf32 applies to CUDA GEMMs only; add --device cuda");
  MV_CHECK(!bf16 || ops::tile_gemm_has_bf16(), "--bf16: this build has no bfloat16 products (they need a CPU "
           "with AVX-512 BF16, such as AMD Zen 4 or Intel Sapphire Rapids, and -Dcpu=native on it)");
  MV_CHECK(device != "cuda" || vit.moe_placement == "none" || !vit.moe.router.token_choice() ||
               vit.moe.router.k <= 8, "--k ", vit.moe.router.k,
           ": the CUDA routing kernels take at most 8 experts per token; use --device cpu");
  MV_CHECK(!prc || vit.moe_placement != "none", "--prc needs a model with MoE layers (an MoE "
           "preset such as vmoe-tiny, or --moe every-2); model '", model, "' is dense");
  MV_CHECK(!prc || vit.moe.router.type != "soft", "--prc needs a router that assigns tokens to "
           "experts; Soft MoE mixes tokens into slots");
  MV_CHECK(prc_diag_weight >= 0 && prc_off_weight >= 0 && std::isfinite(prc_diag_weight) &&
               std::isfinite(prc_off_weight),
           "--prc-diag-weight and --prc-off-weight must be finite and >= 0, got ", prc_diag_weight,
           " and ", prc_off_weight);
  MV_CHECK(prc_share > 0 && prc_share <= 1, "--prc-share must be in (0, 1], got ", prc_share);
  for (auto [flag, a] : {std::pair{"--prc-area1", &prc_area1}, std::pair{"--prc-area2", &prc_area2}}) {
    std::ostringstream got;
    for (size_t i = 0; i < a->size(); ++i) got << (i ? "," : "") << (*a)[i];
    MV_CHECK(a->empty() || (a->size() == 2 && (*a)[0] > 0 && (*a)[0] <= (*a)[1] && (*a)[1] <= 1), flag,
             " takes two fractions of the image's area, 0 < LO <= HI <= 1, e.g. 0.35,0.8; got '", got.str(), "'");
  }
  for (int b : prc_blocks)
    MV_CHECK(b >= 0 && b < vit.depth && vit.is_moe_block(b), "--prc-blocks: block ", b,
             " has no MoE layer (model '", model, "': ", vit.depth, " blocks, MoE placement ",
             vit.moe_placement, ")");
  MV_CHECK(jaccard_weight >= 0 && std::isfinite(jaccard_weight),
           "--jaccard-weight must be finite and >= 0, got ", jaccard_weight);
  MV_CHECK(jaccard_sigma > 0 && std::isfinite(jaccard_sigma),
           "--jaccard-sigma must be finite and > 0, got ", jaccard_sigma);
  MV_CHECK(jaccard_weight == 0 || vit.moe_placement != "none", "--jaccard-weight needs a model "
           "with MoE layers; model '", model, "' is dense");
  MV_CHECK(ema_decay > 0 && ema_decay < 1, "--ema-decay must be in (0, 1), got ", ema_decay);
  MV_CHECK(time_budget_minutes >= 0 && time_budget_minutes <= 1e6f,
           "--time-budget must be in 0..1000000 minutes, got ", time_budget_minutes);
  MV_CHECK(schedule_steps >= 0, "schedule_steps (the steps a time budget gave the run) must be "
           ">= 0, got ", schedule_steps);
  if (device == "cpu") check_fits_memory(training_bytes(), "training with --batch " +
                                         std::to_string(batch) + (prc ? " (two views: --prc)" : "") +
                                         " and this model");
}

double TrainConfig::training_bytes() const {
  // Weights, gradients and two AdamW moments, and what the forward keeps for the backward.
  return 16 * vit.parameter_estimate() + vit.activation_bytes(double(batch) * (prc ? 1 + prc_share : 1));
}

// The MoE part of a ViT config, every field, so a checkpoint rebuilds exactly its model.
static nlohmann::ordered_json moe_json(const models::ViTConfig& v) {
  const models::RouterConfig& r = v.moe.router;
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

// A JSON integer in T's range, else an error naming the field: nlohmann's own conversion
// truncates 1.5 to 1, wraps 4294967306 to 10 in an int, and is undefined for 1e30.
template <class T>
static T as_integer(const nlohmann::json& v, const std::string& name) {
  const bool ok = v.is_number_unsigned()
                      ? std::in_range<T>(v.get<uint64_t>())
                      : v.is_number_integer() && std::in_range<T>(v.get<int64_t>());
  MV_CHECK(ok, "training configuration: ", name, " = ", v.dump(), ", expected an integer in ",
           +std::numeric_limits<T>::min(), "..", +std::numeric_limits<T>::max());
  return v.get<T>();
}

// The integer field j[key]; `where` prefixes the name in messages ("moe.").
template <class T>
static T integer(const nlohmann::json& j, const std::string& key, const std::string& where = "") {
  return as_integer<T>(j.at(key), where + key);
}

static void moe_from_json(const nlohmann::json& j, models::ViTConfig& v) {
  models::RouterConfig& r = v.moe.router;
  v.moe_placement = j.at("placement"), v.moe_last_n = integer<int>(j, "last_n", "moe.");
  v.moe.mlp_dim = integer<int>(j, "mlp_dim", "moe.");
  v.moe.group_per_batch = j.at("group_per_batch"), r.type = j.at("router");
  r.experts = integer<int>(j, "experts", "moe."), r.k = integer<int>(j, "k", "moe.");
  r.capacity_train = j.at("capacity_train"), r.capacity_eval = j.at("capacity_eval");
  r.round_to_4 = j.at("round_to_4"), r.bpr = j.at("bpr"), r.renormalize = j.at("renormalize");
  r.noise_std = j.at("noise_std"), r.importance_weight = j.at("importance_weight");
  r.load_weight = j.at("load_weight"), r.ec_capacity = j.at("ec_capacity");
  r.slots = integer<int>(j, "slots", "moe."), r.proj_dim = integer<int>(j, "proj_dim", "moe.");
  r.tau1 = j.at("tau1");
  r.soft_scale = j.value("soft_scale", 1.f);  // checkpoints before the field had the method's 1
  r.tau2 = j.at("tau2"), r.centroids = integer<int>(j, "centroids", "moe.");
  r.separation_weight = j.at("separation_weight");
  r.vote_dim = integer<int>(j, "vote_dim", "moe.");
  r.global_query = j.at("global_query");
}

std::string TrainConfig::to_json() const {
  nlohmann::ordered_json j = {
      {"dataset", dataset}, {"data_dir", data_dir}, {"model", model},
      {"image_size", vit.image_size}, {"channels", vit.channels}, {"patch", vit.patch},
      {"dim", vit.dim}, {"depth", vit.depth}, {"heads", vit.heads}, {"mlp_dim", vit.mlp_dim},
      {"num_classes", vit.num_classes}, {"epochs", epochs}, {"batch", batch},
      {"eval_batch", eval_batch}, {"eval_flip", eval_flip}, {"optimizer", optimizer}, {"lr", lr},
      {"weight_decay", weight_decay}, {"momentum", momentum}, {"schedule", schedule},
      {"warmup_epochs", warmup_epochs}, {"label_smoothing", label_smoothing}, {"clip", clip},
      {"augment", augment}, {"seed", seed}, {"limit_train", limit_train},
      {"limit_test", limit_test}, {"device", device}, {"tf32", tf32}, {"bf16", bf16}, {"prc", prc},
      {"prc_diag_weight", prc_diag_weight}, {"prc_off_weight", prc_off_weight},
      {"prc_reference_diagonal", prc_reference_diagonal}, {"prc_blocks", prc_blocks},
      {"prc_cls_pair", prc_cls_pair}, {"prc_share", prc_share}, {"prc_area1", prc_area1},
      {"prc_area2", prc_area2}, {"jaccard_weight", jaccard_weight},
      {"jaccard_sigma", jaccard_sigma}, {"ema", ema}, {"ema_decay", ema_decay},
      {"time_budget_minutes", time_budget_minutes}, {"schedule_steps", schedule_steps}};
  if (vit.stem != "patch") j["stem"] = vit.stem;
  if (vit.pool != "cls") j["pool"] = vit.pool;
  if (vit.moe_placement != "none") j["moe"] = moe_json(vit);
  return j.dump();
}

TrainConfig TrainConfig::from_json(const std::string& text) {
  TrainConfig c;
  try {
    auto j = nlohmann::json::parse(text);
    c.dataset = j.at("dataset"), c.data_dir = j.at("data_dir"), c.model = j.at("model");
    c.vit = {integer<int>(j, "image_size"), integer<int>(j, "channels"), integer<int>(j, "patch"),
             integer<int>(j, "dim"),        integer<int>(j, "depth"),    integer<int>(j, "heads"),
             integer<int>(j, "mlp_dim"),    integer<int>(j, "num_classes")};
    c.vit.stem = j.value("stem", std::string("patch"));  // checkpoints from before --stem: patch
    c.vit.pool = j.value("pool", std::string("cls"));    // ... and before --pool: the CLS token
    if (j.contains("moe")) moe_from_json(j.at("moe"), c.vit);
    c.epochs = integer<int>(j, "epochs"), c.batch = integer<int>(j, "batch");
    c.eval_batch = integer<int>(j, "eval_batch");
    c.optimizer = j.at("optimizer"), c.lr = j.at("lr"), c.weight_decay = j.at("weight_decay");
    c.momentum = j.at("momentum"), c.schedule = j.at("schedule");
    c.warmup_epochs = j.at("warmup_epochs"), c.label_smoothing = j.at("label_smoothing");
    c.clip = j.at("clip"), c.augment = j.at("augment"), c.seed = integer<uint64_t>(j, "seed");
    c.limit_train = integer<int64_t>(j, "limit_train");
    c.limit_test = integer<int64_t>(j, "limit_test");
    c.device = j.value("device", std::string("cpu"));  // checkpoints from before --device: CPU
    c.tf32 = j.value("tf32", false);                    // ... and from before --tf32
    c.bf16 = j.value("bf16", false);                    // ... and from before --bf16
    c.prc = j.value("prc", false);                      // ... and from before --prc
    c.prc_diag_weight = j.value("prc_diag_weight", c.prc_diag_weight);
    c.prc_off_weight = j.value("prc_off_weight", c.prc_off_weight);
    c.prc_reference_diagonal = j.value("prc_reference_diagonal", false);
    if (j.contains("prc_blocks")) {
      const nlohmann::json& b = j.at("prc_blocks");
      MV_CHECK(b.is_array(), "training configuration: prc_blocks = ", b.dump(),
               ", expected an array of block numbers");
      for (size_t i = 0; i < b.size(); ++i)
        c.prc_blocks.push_back(as_integer<int>(b[i], "prc_blocks[" + std::to_string(i) + "]"));
    }
    c.prc_cls_pair = j.value("prc_cls_pair", false);
    c.prc_share = j.value("prc_share", 1.f);  // runs from before --prc-share paired every image
    c.prc_area1 = j.value("prc_area1", std::vector<float>{});
    c.prc_area2 = j.value("prc_area2", std::vector<float>{});
    c.jaccard_weight = j.value("jaccard_weight", 0.f);  // ... and from before --jaccard-weight
    c.jaccard_sigma = j.value("jaccard_sigma", c.jaccard_sigma);
    c.ema = j.value("ema", false);  // ... and from before --ema and --time-budget
    c.ema_decay = j.value("ema_decay", c.ema_decay);
    c.time_budget_minutes = j.value("time_budget_minutes", 0.f);
    c.eval_flip = j.value("eval_flip", false);  // ... and from before --eval-flip
    // Runs from before a budget counted steps had whole epochs only.
    if (j.contains("schedule_steps")) c.schedule_steps = integer<int64_t>(j, "schedule_steps");
  } catch (const nlohmann::json::exception& e) {
    MV_FAIL("training configuration: ", e.what());
  }
  return c;
}

}  // namespace mv::train
