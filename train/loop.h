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

// --time-budget's epoch count after `done` epochs: those plus as many more as fit in left_s
// seconds at epoch_s each, at most cap (--epochs). In the first half of the current schedule it
// may grow or shrink (the first epoch, with the start-up in it, tends to run slow, and a longer
// cosine moves the learning rate little there); after that it lies in done..current, so it only
// shrinks: when epochs run slower, the schedule is cut to end within the budget rather than
// stopped before its end.
int epochs_for_budget(int done, double left_s, double epoch_s, int current, int cap);

}  // namespace mv::train
