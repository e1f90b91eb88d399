// A deterministic, learnable stand-in for an image data set, for tests and benchmarks that must
// not depend on files. Each class is a fixed random low-frequency pattern (a few 2-D cosines per
// channel); each image is its class pattern, cyclically shifted by up to size/8 pixels, plus
// Gaussian pixel noise. Labels cycle 0, 1, ..., classes-1, so every prefix is balanced.
#pragma once
#include <cstdint>

#include "datasets/dataset.h"

namespace mv::datasets {

// n images of (channels, size, size) bytes; the same seed gives the same bytes.
Dataset make_synthetic(int64_t n, int channels, int size, int classes, uint64_t seed);

}  // namespace mv::datasets
