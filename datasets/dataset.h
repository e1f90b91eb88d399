// An image-classification data set held in memory as bytes: every reader (IDX, CIFAR binary,
// synthetic) produces this, and the loader turns it into float batches.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mv::datasets {

struct Dataset {
  std::string name;  // "fashion-mnist-train", "cifar10-test", ...
  int64_t n = 0, channels = 0, height = 0, width = 0;
  int num_classes = 0;
  std::vector<uint8_t> pixels;  // n * C * H * W bytes, each image CHW, values 0..255
  std::vector<int64_t> labels;  // n labels in [0, num_classes)
  std::vector<std::string> class_names;  // num_classes names, or empty

  int64_t image_size() const { return channels * height * width; }  // bytes per image
  const uint8_t* image(int64_t i) const { return pixels.data() + i * image_size(); }

  // Throws mv::Error naming the data set when sizes disagree or a label is out of range.
  void validate() const;
};

// The first `count` images (all of them when count >= n), e.g. for quick runs and tests.
Dataset head(const Dataset& d, int64_t count);
// Images [begin, end) (a rank's share of a test set).
Dataset rows(const Dataset& d, int64_t begin, int64_t end);

}  // namespace mv::datasets
