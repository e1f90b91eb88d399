#include "datasets/cifar.h"

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "engine/error.h"

namespace mv::datasets {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kPixels = 3 * 32 * 32;

// The folder that holds `probe`: dir itself or the folder the archive extracts to.
fs::path data_dir(const std::string& dir, const std::string& sub, const std::string& probe,
                  int classes) {
  if (fs::is_regular_file(fs::path(dir) / probe)) return dir;
  if (fs::is_regular_file(fs::path(dir) / sub / probe)) return fs::path(dir) / sub;
  MV_FAIL("load_cifar: ", (fs::path(dir) / probe).string(), " not found (nor under ", sub,
          "/); download the \"CIFAR-", classes, " binary version\" from ",
          "https://www.cs.toronto.edu/~kriz/cifar.html and extract it into ", dir);
}

// Non-empty lines of a text file; empty if it does not exist.
std::vector<std::string> read_lines(const fs::path& p) {
  std::vector<std::string> out;
  std::ifstream f(p);
  for (std::string line; std::getline(f, line);) {
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
    if (!line.empty()) out.push_back(line);
  }
  return out;
}

// Appends the records of one file to d.
void read_file(const fs::path& path, int label_bytes, int classes, Dataset& d) {
  const std::string ps = path.string();
  MV_CHECK(fs::is_regular_file(path), "load_cifar: ", ps, " not found; download the \"CIFAR-",
           classes, " binary version\" from https://www.cs.toronto.edu/~kriz/cifar.html");
  const int64_t rec = label_bytes + kPixels;
  const int64_t size = int64_t(fs::file_size(path));
  MV_CHECK(size > 0, "load_cifar: ", ps, " is empty");
  MV_CHECK(size % rec == 0, "load_cifar: ", ps, ": size ", size,
           " bytes is not a multiple of the record size ", rec, " (", label_bytes,
           " label byte(s) + ", kPixels, " pixels); truncated, or not the CIFAR-", classes,
           " binary version?");
  std::ifstream f(path, std::ios::binary);
  MV_CHECK(f, "load_cifar: cannot open ", ps);
  std::vector<uint8_t> buf(static_cast<size_t>(size));
  f.read(reinterpret_cast<char*>(buf.data()), size);
  MV_CHECK(f.gcount() == size, "load_cifar: ", ps, ": read ", f.gcount(), " of ", size, " bytes");

  const int64_t count = size / rec, base = d.n;
  d.pixels.resize(size_t((base + count) * kPixels));
  d.labels.resize(size_t(base + count));
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t* r = buf.data() + i * rec;
    const int label = r[label_bytes - 1];  // CIFAR-100: byte 0 coarse, byte 1 fine
    MV_CHECK(label < classes, "load_cifar: ", ps, ": label ", label, " of record ", i,
             " is outside [0, ", classes, ")");
    d.labels[size_t(base + i)] = label;
    std::copy(r + label_bytes, r + rec, d.pixels.begin() + (base + i) * kPixels);
  }
  d.n = base + count;
}

}  // namespace

Dataset load_cifar(const std::string& dir, bool train, int classes) {
  MV_CHECK(classes == 10 || classes == 100, "load_cifar: classes must be 10 or 100, got ",
           classes);
  Dataset d;
  d.name = std::string(classes == 10 ? "cifar10" : "cifar100") + (train ? "-train" : "-test");
  d.channels = 3;
  d.height = d.width = 32;
  d.num_classes = classes;
  if (classes == 10) {
    const fs::path root =
        data_dir(dir, "cifar-10-batches-bin", train ? "data_batch_1.bin" : "test_batch.bin", 10);
    if (train) {
      for (int b = 1; b <= 5; ++b)
        read_file(root / ("data_batch_" + std::to_string(b) + ".bin"), 1, 10, d);
    } else {
      read_file(root / "test_batch.bin", 1, 10, d);
    }
    d.class_names = read_lines(root / "batches.meta.txt");
    if (d.class_names.size() != 10)
      d.class_names = {"airplane", "automobile", "bird", "cat", "deer",
                       "dog",      "frog",       "horse", "ship", "truck"};
  } else {
    const std::string file = train ? "train.bin" : "test.bin";
    const fs::path root = data_dir(dir, "cifar-100-binary", file, 100);
    read_file(root / file, 2, 100, d);
    d.class_names = read_lines(root / "fine_label_names.txt");
    if (d.class_names.size() != 100) {
      d.class_names.clear();
      for (int c = 0; c < 100; ++c) d.class_names.push_back(std::to_string(c));
    }
  }
  return d;
}

}  // namespace mv::datasets
