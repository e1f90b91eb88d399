// CIFAR-10 and CIFAR-100, binary versions (https://www.cs.toronto.edu/~kriz/cifar.html).
// CIFAR-10: data_batch_1.bin .. data_batch_5.bin (train), test_batch.bin; records of 1 label byte
// + 3072 pixel bytes (3 x 32 x 32, CHW). CIFAR-100: train.bin, test.bin; records of 1 coarse
// + 1 fine label byte + 3072 pixel bytes; the fine label (100 classes) is used.
#pragma once
#include <string>

#include "datasets/dataset.h"

namespace mv::datasets {

// `dir` holds the .bin files, or holds the extracted cifar-10-batches-bin / cifar-100-binary
// folder. Class names come from batches.meta.txt / fine_label_names.txt when present.
Dataset load_cifar(const std::string& dir, bool train, int classes /* 10 or 100 */);

}  // namespace mv::datasets
