// Data sets, normalisations and augmentations chosen by name, as the flags give them.
#pragma once
#include <string>

#include "datasets/dataset.h"
#include "datasets/transforms.h"

namespace mv::train {

// "fashion-mnist" (default folder: Debian's package), "mnist", "cifar10", "cifar100", or
// "synthetic" (28 px, 1 channel, for smoke runs). An empty dir picks the data set's default.
datasets::Dataset load_dataset(const std::string& name, const std::string& dir, bool train);
// The data set's per-channel mean and std (synthetic: 0.5 and 0.5).
datasets::Normalize normalization(const std::string& name);
// --augment: "none", "crop" (pad-2 random crop) or "crop-flip" (and a horizontal flip).
datasets::Augment augmentation(const std::string& name);

}  // namespace mv::train
