// The training loop: a run of epochs with evaluation, checkpoints and metrics after each, which
// apps/train and the tests call.
#pragma once
#include <cstdio>
#include <string>

#include "train/config.h"

namespace mv::train {

struct TrainResult {
  int epochs_done = 0;
  double test_accuracy = 0, test_loss = 0, train_loss = 0;
  double best_test_accuracy = 0;  // over the run's epochs, those before a resume included
  double train_seconds = 0;      // training steps of all epochs, those before a resume included
  double images_per_second = 0;  // of the last epoch
  int stop_signal = 0;           // the signal that stopped the run early (train/stop.h), or 0
};

// Trains cfg in out_dir: out_dir/checkpoint.safetensors after every epoch (atomic), one JSON line
// per epoch in out_dir/metrics.jsonl, progress on `log` (a bar on a terminal, else log lines;
// null for silence). With resume, continues the run saved in out_dir from its last epoch, with
// the configuration saved there. stop_after > 0 ends the call after that many epochs of the run
// (as an interruption would; resume continues). A stop signal (train/stop.h) ends the run after
// the current step with a checkpoint from which resume continues at the next batch. A non-finite
// loss stops with an error naming the step; the last checkpoint stays as it was.
// Under mpirun every rank calls fit with the same arguments (train/parallel.h): data parallel,
// and with expert_parallel = the rank count, the MoE layers' experts split over the ranks.
TrainResult fit(const TrainConfig& cfg, const std::string& out_dir, bool resume, FILE* log,
                int stop_after = 0, int expert_parallel = 1);

// --time-budget's schedule length in steps after `done` steps: those plus as many more as fit in
// left_s seconds at step_s each, at most cap (--epochs whole epochs). Counted in steps, not
// epochs, so that the run ends near the budget rather than up to an epoch before it (the last
// epoch then ends early), and a new estimate moves the schedule's end, and so the learning
// rate, by tens of steps where the pace holds; so it may grow or shrink at any epoch.
int64_t steps_for_budget(int64_t done, double left_s, double step_s, int64_t cap);

}  // namespace mv::train
