#include "apps/train_flags.h"

#include "apps/cli.h"

namespace mv::cli {
namespace {

// The data set, the preset and its overrides.
void add_model_flags(CLI::App& app, TrainFlags& f) {
  app.add_option("--dataset", f.cfg.dataset,
                 "fashion-mnist | mnist | cifar10 | cifar100 | synthetic")->capture_default_str();
  app.add_option("--data-dir", f.cfg.data_dir,
                 "folder of the data set files (default: per data set)");
  app.add_option("--model", f.cfg.model, "preset: " + [] {
    std::string s;
    for (auto& n : models::vit_preset_names()) s += (s.empty() ? "" : " | ") + n;
    return s;
  }())->capture_default_str();
  models::ViTConfig& o = f.overrides;
  models::RouterConfig& r = o.moe.router;
  app.add_option("--dim", o.dim, "override the preset's width");
  app.add_option("--depth", o.depth, "override the number of blocks");
  app.add_option("--heads", o.heads, "override the number of attention heads");
  app.add_option("--mlp-dim", o.mlp_dim, "override the MLP hidden width");
  app.add_option("--patch", o.patch, "override the patch size");
  app.add_option("--stem", o.stem, "patch (ViT's patch embedding) | conv (3x3 stride-2 convolutions "
                 "down to the patch grid) | conv-deep (each followed by a 3x3 stride-1 convolution)");
  app.add_option("--pool", o.pool, "what the head reads: cls (the CLS token) | mean (the mean of the patch tokens)");
  app.add_option("--moe", o.moe_placement, "MoE blocks: none | every-2 | last-n");
  app.add_option("--moe-last-n", o.moe_last_n, "n of --moe last-n");
  app.add_option("--router", r.type, "topk | expert_choice | soft | cosine | perturbed_cosine | "
                 "multi_centroid | attention_vote");
  app.add_option("--experts", r.experts, "experts per MoE layer");
  app.add_option("--k", r.k, "experts per token (token-choice routers)");
  app.add_option("--expert-mlp-dim", o.moe.mlp_dim, "hidden width of each expert");
  // "none" (dropless: every choice kept) is stored as the factor 0.
  auto none_as_zero = [](std::string s) { return s == "none" ? std::string("0") : s; };
  app.add_option("--capacity", r.capacity_train, "capacity factor in training, or none (dropless)")
      ->transform(none_as_zero);
  app.add_option("--eval-capacity", r.capacity_eval, "capacity factor in evaluation, or none (dropless)")
      ->transform(none_as_zero);
  app.add_option("--bpr", r.bpr, "Batch Prioritized Routing (true | false)");
  app.add_option("--renormalize", r.renormalize, "combine weights of a token's k choices sum to 1");
  app.add_option("--round-capacity", r.round_to_4, "round capacity up to a multiple of 4");
  app.add_option("--noise-std", r.noise_std, "router noise in training (negative: 1/E)");
  app.add_option("--importance-weight", r.importance_weight, "V-MoE importance loss weight");
  app.add_option("--load-weight", r.load_weight, "V-MoE load loss weight");
  app.add_option("--ec-capacity", r.ec_capacity, "expert choice capacity factor");
  app.add_option("--slots", r.slots, "Soft MoE slots per expert");
  app.add_option("--soft-scale", r.soft_scale, "Soft MoE: initial logit scale (the method's is 1)");
  app.add_option("--proj-dim", r.proj_dim, "cosine routers' projection width");
  app.add_option("--centroids", r.centroids, "multi_centroid: centroids per expert");
  app.add_option("--separation-weight", r.separation_weight, "multi_centroid separation loss");
  app.add_option("--vote-dim", r.vote_dim, "attention_vote query/key width");
  app.add_option("--global-query", r.global_query, "attention_vote: one query for all experts");
}

// Pairwise Router Consistency and the noise-injection loss.
void add_consistency_flags(CLI::App& app, TrainFlags& f) {
  app.add_flag("--prc", f.cfg.prc, "Pairwise Router Consistency: two views per image, PRC loss on "
               "every MoE layer (router auxiliary losses off unless their weights are given)");
  app.add_option("--prc-diag-weight", f.cfg.prc_diag_weight)->capture_default_str();
  app.add_option("--prc-off-weight", f.cfg.prc_off_weight)->capture_default_str();
  app.add_flag("--prc-reference-diagonal", f.cfg.prc_reference_diagonal,
               "the reference code's per-position diagonal term instead of the paper's");
  app.add_option("--prc-blocks", f.cfg.prc_blocks, "the MoE blocks whose routers get the PRC "
                 "loss, e.g. 3,5 (default: every MoE block)")->delimiter(',');
  app.add_flag("--prc-cls", f.cfg.prc_cls_pair, "PRC also pairs the CLS tokens of the two views");
  app.add_option("--prc-share", f.cfg.prc_share, "share of a batch's images that also get view 1 "
                 "and PRC pairs; the others train on view 2 alone")->capture_default_str();
  app.add_option("--prc-area1", f.cfg.prc_area1, "LO,HI: view 1's crop area, fractions of the image "
                 "(default 0.35,0.8 at 28 px, 0.25,0.8 else)")->delimiter(',')->expected(2);
  app.add_option("--prc-area2", f.cfg.prc_area2, "LO,HI: view 2's crop area (default 0.7,1 at 28 px, "
                 "0.6,1 else)")->delimiter(',')->expected(2);
  app.add_option("--jaccard-weight", f.cfg.jaccard_weight, "noise-injection consistency loss: "
                 "1 - soft Jaccard of router probabilities with and without noise (0: off)")
      ->capture_default_str();
  app.add_option("--jaccard-sigma", f.cfg.jaccard_sigma, "std of the noise added to each MoE "
                 "block's token input for that loss")->capture_default_str();
}

// Routing groups, optimisation, data, device, and where the run goes.
void add_training_flags(CLI::App& app, TrainFlags& f) {
  app.add_option("--group", f.group, "route tokens per image (default) or per batch")
      ->check(CLI::IsMember({"image", "batch"}));
  app.add_option("--epochs", f.cfg.epochs)->capture_default_str();
  app.add_option("--batch", f.cfg.batch)->capture_default_str();
  app.add_option("--eval-batch", f.cfg.eval_batch)->capture_default_str();
  app.add_flag("--eval-flip", f.cfg.eval_flip, "evaluate each test image and its mirror image "
               "and average their logits (test-time augmentation: twice the evaluation's cost)");
  app.add_option("--optimizer", f.cfg.optimizer, "adamw | sgd")->capture_default_str();
  app.add_option("--lr", f.cfg.lr, "peak learning rate")->capture_default_str();
  app.add_option("--weight-decay", f.cfg.weight_decay)->capture_default_str();
  app.add_option("--momentum", f.cfg.momentum, "SGD momentum")->capture_default_str();
  app.add_option("--schedule", f.cfg.schedule, "cosine | linear, after a linear warmup")
      ->capture_default_str();
  app.add_option("--warmup", f.cfg.warmup_epochs, "warmup length in epochs")->capture_default_str();
  app.add_option("--label-smoothing", f.cfg.label_smoothing)->capture_default_str();
  app.add_option("--clip", f.cfg.clip, "global gradient-norm clip (0: off)")->capture_default_str();
  app.add_option("--augment", f.cfg.augment, "none | crop | crop-flip")->capture_default_str();
  app.add_option("--seed", f.cfg.seed)->capture_default_str();
  app.add_option("--limit-train", f.cfg.limit_train, "use only the first N training images");
  app.add_option("--limit-test", f.cfg.limit_test, "use only the first N test images");
  app.add_option("--device", f.cfg.device, "cpu | cuda: where the model trains")
      ->capture_default_str();
  app.add_flag("--tf32", f.cfg.tf32,
               "CUDA: let cuBLAS use TF32 tensor cores (faster GEMMs, ~1e-3 relative error)");
  app.add_flag("--bf16", f.cfg.bf16,
               "CPU: matrix products on bfloat16 inputs with float32 sums (AVX-512 BF16: about twice "
               "as fast, ~4e-3 relative error per input); routers stay float32");
  app.add_option("--threads", f.threads, "CPU threads (default: all cores)");
  app.add_option("--expert-parallel", f.expert_parallel, "under mpirun: split each MoE layer's "
                 "experts over groups of this many consecutive ranks (a divisor of the rank "
                 "count; default 1: data parallel only)");
  app.add_option("--out", f.out, "output folder: checkpoint.safetensors, metrics.jsonl")
      ->capture_default_str();
  app.add_flag("--ema", f.cfg.ema, "keep an average of the weights (decay --ema-decay) and "
               "evaluate and deliver it instead of the last weights");
  app.add_option("--ema-decay", f.cfg.ema_decay, "decay of --ema per step")->capture_default_str();
  app.add_option("--time-budget", f.cfg.time_budget_minutes, "minutes the run may take, "
                 "evaluations included: after each epoch the schedule is scaled, in steps, to fit at the run's mean "
                 "pace (its last epoch may end early), and the run stops with a checkpoint at the limit");
  app.add_option("--stop-after", f.stop_after,
                 "end after this many epochs of the run (resume later)");
  app.add_option("--resume", f.resume,
                 "continue the run saved in this folder (its settings are used)");
}

// The preset of --model for the data set's images, with each override the command line gave.
models::ViTConfig model_config(const CLI::App& app, const TrainFlags& f) {
  const train::TrainConfig& c = f.cfg;
  models::ViTConfig v = models::vit_preset(c.model);
  if (c.dataset == "cifar10" || c.dataset == "cifar100") {
    v.image_size = 32, v.channels = 3;
    v.num_classes = c.dataset == "cifar10" ? 10 : 100;
  }
  // Each override the command line gave replaces the preset's value.
  auto given = [&](const char* flag) { return app.count(flag) > 0; };
  const models::ViTConfig& o = f.overrides;
  if (given("--dim")) v.dim = o.dim;
  if (given("--depth")) v.depth = o.depth;
  if (given("--heads")) v.heads = o.heads;
  if (given("--mlp-dim")) v.mlp_dim = o.mlp_dim;
  if (given("--patch")) v.patch = o.patch;
  if (given("--stem")) v.stem = o.stem;
  if (given("--pool")) v.pool = o.pool;
  // A dense preset made MoE gets experts as wide as its MLP unless told otherwise.
  if (given("--moe") && v.moe_placement == "none") v.moe.mlp_dim = v.mlp_dim;
  if (given("--expert-mlp-dim")) v.moe.mlp_dim = o.moe.mlp_dim;
  if (given("--moe")) v.moe_placement = o.moe_placement;
  if (given("--moe-last-n")) v.moe_last_n = o.moe_last_n;
  if (given("--group")) v.moe.group_per_batch = f.group == "batch";
  const models::RouterConfig& r = o.moe.router;
  models::RouterConfig& vr = v.moe.router;
  if (given("--router")) vr.type = r.type;
  if (given("--experts")) vr.experts = r.experts;
  if (given("--k")) vr.k = r.k;
  if (given("--capacity")) vr.capacity_train = r.capacity_train;
  if (given("--eval-capacity")) vr.capacity_eval = r.capacity_eval;
  if (given("--bpr")) vr.bpr = r.bpr;
  if (given("--renormalize")) vr.renormalize = r.renormalize;
  if (given("--round-capacity")) vr.round_to_4 = r.round_to_4;
  if (given("--noise-std")) vr.noise_std = r.noise_std;
  if (given("--importance-weight")) vr.importance_weight = r.importance_weight;
  if (given("--load-weight")) vr.load_weight = r.load_weight;
  if (given("--ec-capacity")) vr.ec_capacity = r.ec_capacity;
  if (given("--slots")) vr.slots = r.slots;
  if (given("--soft-scale")) vr.soft_scale = r.soft_scale;
  if (given("--proj-dim")) vr.proj_dim = r.proj_dim;
  if (given("--centroids")) vr.centroids = r.centroids;
  if (given("--separation-weight")) vr.separation_weight = r.separation_weight;
  if (given("--vote-dim")) vr.vote_dim = r.vote_dim;
  if (c.prc && !given("--importance-weight")) vr.importance_weight = 0.f;  // as PRC's reference
  if (c.prc && !given("--load-weight")) vr.load_weight = 0.f;
  if (given("--global-query")) vr.global_query = r.global_query;
  return v;
}

}  // namespace

void add_train_flags(CLI::App& app, TrainFlags& f) {
  // A flag given twice takes its last value, so scripts can append overrides to defaults.
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  add_model_flags(app, f);
  add_consistency_flags(app, f);
  add_training_flags(app, f);
}

train::TrainConfig train_config(const CLI::App& app, const TrainFlags& f) {
  auto given = [&](const char* flag) { return app.count(flag) > 0; };
  if (given("--threads")) set_threads(f.threads);
  // 0 and negative values are refused, not read as "all" or "never".
  MV_CHECK(!given("--stop-after") || f.stop_after >= 1, "--stop-after must be at least 1 epoch, got ",
           f.stop_after);
  MV_CHECK(!given("--limit-train") || f.cfg.limit_train >= 1, "--limit-train must be at least 1 "
           "image, got ", f.cfg.limit_train);
  MV_CHECK(!given("--limit-test") || f.cfg.limit_test >= 1, "--limit-test must be at least 1 "
           "image, got ", f.cfg.limit_test);
  MV_CHECK(!given("--out") || !f.out.empty(), "--out must name a folder");
  MV_CHECK(f.expert_parallel >= 1, "--expert-parallel must be at least 1 rank, got ",
           f.expert_parallel);
  MV_CHECK(!given("--time-budget") || f.cfg.time_budget_minutes > 0, "--time-budget must be more "
           "than 0 minutes, got ", f.cfg.time_budget_minutes);
  if (given("--resume")) {
    // The run's own settings are used; a flag that would silently be ignored is refused.
    for (const CLI::Option* o : app.get_options()) {
      const std::string name = o->get_name();
      MV_CHECK(o->count() == 0 || name == "--resume" || name == "--threads" ||
                   name == "--stop-after" || name == "--expert-parallel" || name == "--help",
               "--resume continues a run with the settings it saved; ", name, " cannot be changed "
               "(start a new run with --out instead)");
    }
  }
  train::TrainConfig c = f.cfg;
  c.vit = model_config(app, f);
  // A time budget chooses the epochs itself; --epochs, when given, caps them.
  if (given("--time-budget") && !given("--epochs")) c.epochs = 100000;
  return c;
}

}  // namespace mv::cli
