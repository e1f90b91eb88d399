// IDX files (the MNIST format): a big-endian header of magic 0x0000TTDD (TT = element type,
// 0x08 for unsigned bytes; DD = number of dimensions), DD big-endian uint32 sizes, then the data.
// MNIST and Fashion-MNIST ship four of them, usually gzipped; zlib reads plain and gzipped alike.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "datasets/dataset.h"

namespace mv::datasets {

// Where Debian's dataset-fashion-mnist package (installed by scripts/setup) puts the four .gz files.
inline constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

// One unsigned-byte IDX file, plain or gzipped. Checks the magic (0x00000800 + ndims), that
// exactly the bytes the header announces follow, and returns the data with `dims` filled.
// Errors name the file and what was wrong.
std::vector<uint8_t> read_idx_u8(const std::string& path, int ndims, std::vector<int64_t>& dims);

// MNIST-layout data in `dir`: {train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte,
// each plain or with .gz. The result is (n, 1, 28, 28) with 10 classes; `name` is the data set
// name prefix ("fashion-mnist" also selects the Fashion-MNIST class names, else digits 0..9).
Dataset load_mnist(const std::string& dir, bool train, const std::string& name = "mnist");
Dataset load_fashion_mnist(bool train, const std::string& dir = kFashionMnistDir);

}  // namespace mv::datasets
