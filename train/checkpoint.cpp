#include "train/checkpoint.h"

#include <charconv>
#include <cmath>
#include <filesystem>

#include "dist/experts.h"

namespace mv::train {

bool SplitParameters::covers(const std::string& name) const {
  for (const std::string& n : names)
    if (name == n || (name.size() > n.size() && name.compare(name.size() - n.size(), n.size(), n) == 0 &&
                      name[name.size() - n.size() - 1] == '.'))
      return true;
  return false;
}

void save_checkpoint(const std::string& path, const models::Module& model,
                     const models::Optimizer* opt, const Metadata& meta,
                     const models::WeightAverage* ema, const SplitParameters* split, bool write) {
  TensorMap all;
  for (auto& [n, p] : model.named_parameters()) all.emplace(n, p);
  if (opt) {
    for (auto& [n, t] : opt->state()) all.emplace(n, t);
  }
  if (ema) {
    for (auto& [n, t] : ema->state()) all.emplace(n, t);
  }
  if (split)  // in the map's (sorted) order, the same on every rank
    for (auto& [n, t] : all)
      if (split->covers(n)) t = dist::gather_experts(t);
  if (!write) return;
  Metadata m = meta;
  if (opt) m["optimizer_steps"] = std::to_string(opt->steps());
  if (ema) m["ema_updates"] = std::to_string(ema->updates());
  save_safetensors(path, all, m);
}

static void copy_into(const std::string& path, const TensorMap& file, const std::string& name,
                      Tensor& dst, const SplitParameters* split = nullptr) {
  auto it = file.find(name);
  MV_CHECK(it != file.end(), "checkpoint '", path, "': tensor '", name, "' is missing");
  Tensor src = it->second;
  if (split && split->covers(name)) {
    MV_CHECK(src.ndim() == dst.ndim() && src.dtype() == dst.dtype(), "checkpoint '", path,
             "': tensor '", name, "' is ", src.str(), " but the model expects ", dst.str());
    src = dist::own_experts(src);
  }
  MV_CHECK(src.shape() == dst.shape() && src.dtype() == dst.dtype(), "checkpoint '",
           path, "': tensor '", name, "' is ", src.str(), " but the model expects ", dst.str());
  dst.copy_(src);
}

Metadata load_checkpoint(const std::string& path, models::Module& model, models::Optimizer* opt,
                         models::WeightAverage* ema, const SplitParameters* split) {
  Metadata meta;
  TensorMap file = load_safetensors(path, &meta);
  for (auto& [n, p] : model.named_parameters()) copy_into(path, file, n, p, split);
  if (ema) {
    for (auto& [n, t] : ema->state()) copy_into(path, file, n, t, split);
    ema->set_updates(int64_t(metadata_uint(meta, "ema_updates", path, uint64_t(1) << 50)));
  }
  if (opt) {
    for (auto& [n, t] : opt->state()) copy_into(path, file, n, t, split);
    opt->set_steps(int64_t(metadata_uint(meta, "optimizer_steps", path, uint64_t(1) << 50)));
  }
  return meta;
}

uint64_t metadata_uint(const Metadata& meta, const std::string& key, const std::string& path,
                       uint64_t max) {
  auto it = meta.find(key);
  MV_CHECK(it != meta.end(), "checkpoint '", path, "': metadata '", key, "' is missing");
  const std::string& s = it->second;
  uint64_t v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  MV_CHECK(ec == std::errc() && end == s.data() + s.size() && v <= max, "checkpoint '", path,
           "': metadata '", key, "' is '", s, "', expected a whole number in 0..", max);
  return v;
}

double metadata_seconds(const Metadata& meta, const std::string& key, const std::string& path) {
  auto it = meta.find(key);
  if (it == meta.end()) return 0.0;
  const std::string& s = it->second;
  double v = -1;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  MV_CHECK(ec == std::errc() && end == s.data() + s.size() && std::isfinite(v) && v >= 0,
           "checkpoint '", path, "': metadata '", key, "' is '", s,
           "', expected a number of seconds >= 0");
  return v;
}

bool load_weights_for_evaluation(const std::string& path, models::Module& model) {
  const TensorMap file = load_safetensors(path);
  const bool averaged = file.count("ema." + model.named_parameters().at(0).first) > 0;
  for (auto& [n, p] : model.named_parameters())
    copy_into(path, file, averaged ? "ema." + n : n, p);
  return averaged;
}

Metadata read_checkpoint_metadata(const std::string& path) {
  Metadata meta;
  load_safetensors(path, &meta);
  return meta;
}

TrainConfig config_from_metadata(const Metadata& meta, const std::string& path,
                                 const std::string& who) {
  MV_CHECK(meta.count("config"), who, ": '", path, "' has no training configuration in its metadata");
  try {
    TrainConfig c = TrainConfig::from_json(meta.at("config"));
    c.vit.validate();  // the model's shape, before anything is allocated for it
    return c;
  } catch (const Error& e) {
    MV_FAIL(who, ": '", path, "': the training configuration in its metadata is invalid: ", e.what());
  }
}

TrainConfig checkpoint_config(const std::string& path, const std::string& who,
                              const std::string& dataset, const std::string& data_dir) {
  TrainConfig c = config_from_metadata(read_checkpoint_metadata(path), path, who);
  if (!dataset.empty()) c.dataset = dataset;
  if (!data_dir.empty()) c.data_dir = data_dir;
  return c;
}

std::string run_checkpoint(const std::string& run_dir) { return run_dir + "/checkpoint.safetensors"; }

std::string checkpoint_file(const std::string& path_or_run) {
  return std::filesystem::is_directory(path_or_run) ? run_checkpoint(path_or_run) : path_or_run;
}

}  // namespace mv::train
