// train's command line: its flags, and the run configuration they make (the preset of --model
// with each override given). Apart from main so that the flag parser can be tested and fuzzed
// (fuzz/fuzz_flags.cpp) without running anything.
#pragma once
#include <CLI/CLI.hpp>
#include <string>

#include "train/config.h"

namespace mv::cli {

// What the flags set; cfg.vit is made by train_config.
struct TrainFlags {
  train::TrainConfig cfg;       // the run's settings; model_config makes cfg.vit
  models::ViTConfig overrides;  // of the preset's values, applied only when given
  std::string group;
  std::string out = "runs/default", resume;
  int threads = 0, stop_after = 0;
  int expert_parallel = 1;  // ranks the experts are split over (a property of the launch, not
                            // of the run: a resumed run may change it)
};

void add_train_flags(CLI::App& app, TrainFlags& f);

// The run's configuration from the parsed flags (train::fit validates it, or with --resume the
// one the run saved). Throws mv::Error naming a flag that no configuration can take: 0 or
// negative counts, flags beside --resume. --threads is applied here, before any work.
train::TrainConfig train_config(const CLI::App& app, const TrainFlags& f);

}  // namespace mv::cli
