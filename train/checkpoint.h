// Checkpoints: one safetensors file with the parameters under their dotted names, the optimizer
// buffers under "<kind>.<name>", and string metadata (config, epoch, step, RNG state). Written
// atomically (engine/safetensors.h), so an interrupted save leaves the previous checkpoint.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "engine/safetensors.h"
#include "models/ema.h"
#include "models/module.h"
#include "models/optim.h"
#include "train/config.h"

namespace mv::train {

// Expert parallel (train/parallel.h): the parameters each rank holds only its rows of (axis 0),
// by name. A checkpoint always holds the whole model: saving gathers these parameters, their
// optimizer buffers and averages from every rank, and loading keeps this rank's rows, so a run
// resumes on any number of ranks and a single-process eval reads it.
struct SplitParameters {
  std::vector<std::string> names;
  // name is one of them, or a buffer of one ("<kind>.<name>").
  bool covers(const std::string& name) const;
};

// With ema, also its averages ("ema.<name>") and their update count. With split parameters
// every rank must call it (the gathering is collective); only those with `write` write.
void save_checkpoint(const std::string& path, const models::Module& model,
                     const models::Optimizer* opt, const Metadata& meta,
                     const models::WeightAverage* ema = nullptr,
                     const SplitParameters* split = nullptr, bool write = true);

// Copies the parameters (and optimizer buffers when opt is given, the weight averages when ema
// is) into the existing tensors. Every expected tensor must be present with its exact shape;
// errors name the file and tensor.
Metadata load_checkpoint(const std::string& path, models::Module& model, models::Optimizer* opt,
                         models::WeightAverage* ema = nullptr,
                         const SplitParameters* split = nullptr);

// The weights to evaluate: the averaged ones of a run trained with --ema, else the parameters.
// Returns whether they were the averages.
bool load_weights_for_evaluation(const std::string& path, models::Module& model);

// A whole non-negative integer of the metadata, at most `max`; errors name the file and key.
uint64_t metadata_uint(const Metadata& meta, const std::string& key, const std::string& path,
                       uint64_t max);

// A number of seconds of the metadata (finite, >= 0), or 0 when the key is absent (older
// checkpoints); errors name the file and key.
double metadata_seconds(const Metadata& meta, const std::string& key, const std::string& path);

// Only the metadata, to rebuild the model before loading its weights.
Metadata read_checkpoint_metadata(const std::string& path);
// The training configuration in a checkpoint's metadata, its model shape validated; errors
// begin with `who` and name the file.
TrainConfig config_from_metadata(const Metadata& meta, const std::string& path,
                                 const std::string& who);
// The training configuration in the metadata, from which eval and viz rebuild the model, with
// the data set and its folder replaced where given (non-empty). The error when the metadata has
// none begins with `who`.
TrainConfig checkpoint_config(const std::string& path, const std::string& who,
                              const std::string& dataset, const std::string& data_dir);

// The checkpoint that fit keeps in its run folder (train --out): run_dir/checkpoint.safetensors.
std::string run_checkpoint(const std::string& run_dir);

// What a user may name a checkpoint by: a run folder stands for its run_checkpoint; any other
// path is returned as it is.
std::string checkpoint_file(const std::string& path_or_run);

}  // namespace mv::train
