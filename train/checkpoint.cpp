#include "train/checkpoint.h"

#include <filesystem>

namespace mv::train {

void save_checkpoint(const std::string& path, const models::Module& model,
                     const models::Optimizer* opt, const Metadata& meta) {
  TensorMap all;
  for (auto& [n, p] : model.named_parameters()) all.emplace(n, p);
  if (opt) {
    for (auto& [n, t] : opt->state()) all.emplace(n, t);
  }
  Metadata m = meta;
  if (opt) m["optimizer_steps"] = std::to_string(opt->steps());
  save_safetensors(path, all, m);
}

static void copy_into(const std::string& path, const TensorMap& file, const std::string& name,
                      Tensor& dst) {
  auto it = file.find(name);
  MV_CHECK(it != file.end(), "checkpoint '", path, "': tensor '", name, "' is missing");
  MV_CHECK(it->second.shape() == dst.shape() && it->second.dtype() == dst.dtype(), "checkpoint '",
           path, "': tensor '", name, "' is ", it->second.str(), " but the model expects ", dst.str());
  dst.copy_(it->second);
}

Metadata load_checkpoint(const std::string& path, models::Module& model, models::Optimizer* opt) {
  Metadata meta;
  TensorMap file = load_safetensors(path, &meta);
  for (auto& [n, p] : model.named_parameters()) copy_into(path, file, n, p);
  if (opt) {
    for (auto& [n, t] : opt->state()) copy_into(path, file, n, t);
    auto it = meta.find("optimizer_steps");
    MV_CHECK(it != meta.end(), "checkpoint '", path, "': metadata 'optimizer_steps' is missing");
    opt->set_steps(std::stoll(it->second));
  }
  return meta;
}

Metadata read_checkpoint_metadata(const std::string& path) {
  Metadata meta;
  load_safetensors(path, &meta);
  return meta;
}

TrainConfig checkpoint_config(const std::string& path, const std::string& who,
                              const std::string& dataset, const std::string& data_dir) {
  const Metadata meta = read_checkpoint_metadata(path);
  MV_CHECK(meta.count("config"), who, ": '", path, "' has no training configuration in its metadata");
  TrainConfig c = TrainConfig::from_json(meta.at("config"));
  if (!dataset.empty()) c.dataset = dataset;
  if (!data_dir.empty()) c.data_dir = data_dir;
  return c;
}

std::string run_checkpoint(const std::string& run_dir) { return run_dir + "/checkpoint.safetensors"; }

std::string checkpoint_file(const std::string& path_or_run) {
  return std::filesystem::is_directory(path_or_run) ? run_checkpoint(path_or_run) : path_or_run;
}

}  // namespace mv::train
