// What a run prints while it trains: the progress line of an epoch and short durations.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>

namespace mv::train {

// One status line per epoch: a bar redrawn in place on a terminal, a line every ~10% otherwise.
class Progress {
 public:
  // out: null for silence; epochs: of the run, 0 while unknown (printed "?"); total: batches in
  // the epoch.
  Progress(FILE* out, int epoch, int epochs, int64_t total);
  // After batch `done` (1-based): the epoch's running loss and accuracy, images per second and
  // the seconds left.
  void update(int64_t done, double loss, double acc, double img_s, double eta);

 private:
  FILE* out_;
  int epoch_, epochs_;
  int64_t total_;
  bool tty_;
};

// A short human-readable duration: "1m23s", "45.2s".
std::string format_seconds(double s);

}  // namespace mv::train
