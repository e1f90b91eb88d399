// libFuzzer target for the CIFAR-10/100 binary reader (datasets/cifar.h). The input lays out a
// data folder: byte 0 picks CIFAR-100 (bit 0), the training split (bit 1) and the extracted
// archive's subfolder (bit 2); byte 1 is the length n of the class-names file, whose bytes
// follow; the rest becomes every record file the split reads.
#include <cstdlib>
#include <filesystem>
#include <string>

#include "datasets/cifar.h"
#include "engine/error.h"
#include "engine/file_write.h"
#include "fuzz/scratch.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace fs = std::filesystem;
  if (size < 2) return 0;
  const int classes = data[0] & 1 ? 100 : 10;
  const bool train = data[0] & 2, nested = data[0] & 4;
  const size_t n = std::min<size_t>(data[1], size - 2);
  const std::string names(reinterpret_cast<const char*>(data + 2), n);
  const std::string records(reinterpret_cast<const char*>(data + 2 + n), size - 2 - n);

  // A fresh folder each time: no file of an earlier input may be read.
  const fs::path dir = mv::fuzz::scratch_dir() / "cifar";
  const fs::path root =
      nested ? dir / (classes == 10 ? "cifar-10-batches-bin" : "cifar-100-binary") : dir;
  fs::remove_all(dir);
  fs::create_directories(root);
  if (classes == 10) {
    mv::write_file((root / "batches.meta.txt").string(), names);
    if (train) {
      for (int b = 1; b <= 5; ++b)
        mv::write_file((root / ("data_batch_" + std::to_string(b) + ".bin")).string(), records);
    } else {
      mv::write_file((root / "test_batch.bin").string(), records);
    }
  } else {
    mv::write_file((root / "fine_label_names.txt").string(), names);
    mv::write_file((root / (train ? "train.bin" : "test.bin")).string(), records);
  }

  try {
    const mv::datasets::Dataset d = mv::datasets::load_cifar(dir.string(), train, classes);
    // An accepted folder yields whole records, every label a class, and a name per class.
    const size_t rec = classes == 10 ? 3073 : 3074;
    const size_t want = (train && classes == 10 ? 5 : 1) * (records.size() / rec);
    if (size_t(d.n) != want || d.labels.size() != want || d.pixels.size() != want * 3072 ||
        d.class_names.size() != size_t(classes))
      std::abort();
    for (int64_t l : d.labels)
      if (l < 0 || l >= classes) std::abort();
  } catch (const mv::Error&) {
  }
  return 0;
}
