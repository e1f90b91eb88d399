// The picture of a training run: its metrics.jsonl drawn as two panels, loss and accuracy per
// epoch (train and test), with the training time so far as a second row of x labels.
#pragma once
#include <string>

namespace mv::report {

// Reads the epoch lines of metrics_path (a line of a run stopped in mid-epoch adds its time
// only) and writes the PNG; false, writing nothing, when no epoch has ended yet. Throws naming a
// file that cannot be read, parsed or written.
bool write_training_curves(const std::string& metrics_path, const std::string& png_path);

}  // namespace mv::report
