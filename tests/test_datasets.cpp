#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <stdexcept>
#include <string>
#include <unistd.h>

#include "datasets/cifar.h"
#include "datasets/idx.h"
#include "datasets/loader.h"
#include "datasets/synthetic.h"
#include "datasets/transforms.h"
#include "tests/helpers.h"

using namespace mv;
using namespace mv::datasets;
namespace fs = std::filesystem;

namespace {

// doctest::Contains from a std::string (doctest copies it into its own String).
doctest::Contains has(const std::string& s) { return doctest::Contains(s.c_str()); }

// A fresh, empty folder under /tmp for one test.
std::string temp_dir(const std::string& tag) {
  fs::path p = fs::temp_directory_path() /
               ("moevit_test_datasets_" + std::to_string(::getpid()) + "_" + tag);
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

void put_be32(std::string& s, uint32_t v) {
  for (int sh = 24; sh >= 0; sh -= 8) s.push_back(char((v >> sh) & 0xff));
}

// Bytes of an IDX file: magic, dims, data (+ `extra` trailing bytes, - `cut` bytes at the end).
std::string idx_bytes(uint32_t magic, const std::vector<uint32_t>& dims,
                      const std::vector<uint8_t>& data, int cut = 0, int extra = 0) {
  std::string s;
  put_be32(s, magic);
  for (uint32_t d : dims) put_be32(s, d);
  s.append(data.begin(), data.end());
  s.resize(s.size() - size_t(cut));
  s.append(size_t(extra), '\x07');
  return s;
}

void write_file(const std::string& path, const std::string& bytes, bool gz) {
  if (gz) {
    gzFile f = gzopen(path.c_str(), "wb");
    REQUIRE(f != nullptr);
    REQUIRE(gzwrite(f, bytes.data(), unsigned(bytes.size())) == int(bytes.size()));
    REQUIRE(gzclose(f) == Z_OK);
  } else {
    std::ofstream f(path, std::ios::binary);
    f.write(bytes.data(), std::streamsize(bytes.size()));
    REQUIRE(f.good());
  }
}

// A small MNIST-layout split: n images of rows x cols with pixel (i, y, x) = i*31 + y*7 + x.
struct SmallIdx {
  uint32_t n = 5, rows = 3, cols = 4;
  std::vector<uint8_t> pixels, labels;
  SmallIdx() {
    for (uint32_t i = 0; i < n; ++i)
      for (uint32_t y = 0; y < rows; ++y)
        for (uint32_t x = 0; x < cols; ++x) pixels.push_back(uint8_t(i * 31 + y * 7 + x));
    labels = {3, 0, 9, 1, 7};
  }
  void write(const std::string& dir, const std::string& split, bool gz) const {
    const std::string ext = gz ? ".gz" : "";
    write_file(dir + "/" + split + "-images-idx3-ubyte" + ext,
               idx_bytes(0x803, {n, rows, cols}, pixels), gz);
    write_file(dir + "/" + split + "-labels-idx1-ubyte" + ext, idx_bytes(0x801, {n}, labels), gz);
  }
};

void check_small(const Dataset& d, const SmallIdx& s) {
  CHECK(d.n == 5);
  CHECK(d.channels == 1);
  CHECK(d.height == 3);
  CHECK(d.width == 4);
  CHECK(d.num_classes == 10);
  CHECK(d.pixels == s.pixels);
  CHECK(d.labels == std::vector<int64_t>{3, 0, 9, 1, 7});
  CHECK_NOTHROW(d.validate());
}

// One CIFAR record: label byte(s) then 3072 pixels with value (seed + j) % 251.
std::string cifar_record(const std::vector<uint8_t>& label_bytes, int seed) {
  std::string r(label_bytes.begin(), label_bytes.end());
  for (int j = 0; j < 3072; ++j) r.push_back(char((seed + j) % 251));
  return r;
}

// Batch (B, C, H, W) with distinct values.
Tensor ramp_batch(int64_t B, int64_t C, int64_t H, int64_t W, uint64_t seed = 1) {
  Generator g(seed);
  return rand({B, C, H, W}, g);
}

bool same_values(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.to_vector<float>() == b.to_vector<float>();
}

float max_abs_diff(const Tensor& a, const Tensor& b) {
  std::vector<float> x = a.to_vector<float>(), y = b.to_vector<float>();
  REQUIRE(x.size() == y.size());
  float m = 0;
  for (size_t i = 0; i < x.size(); ++i) m = std::max(m, std::fabs(x[i] - y[i]));
  return m;
}

// Reference bilinear sample of one (H, W) plane, in double, written from the CropBox contract.
double ref_sample(const std::vector<float>& img, int64_t off, int64_t H, int64_t W, double sy,
                  double sx) {
  if (sy < -0.5 || sy > H - 0.5 || sx < -0.5 || sx > W - 0.5) return 0.0;
  sy = std::clamp(sy, 0.0, double(H - 1));
  sx = std::clamp(sx, 0.0, double(W - 1));
  const int64_t y0 = int64_t(std::floor(sy)), x0 = int64_t(std::floor(sx));
  const int64_t y1 = std::min(y0 + 1, H - 1), x1 = std::min(x0 + 1, W - 1);
  const double wy = sy - y0, wx = sx - x0;
  auto at = [&](int64_t y, int64_t x) { return double(img[size_t(off + y * W + x)]); };
  return (1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x1)) +
         wy * ((1 - wx) * at(y1, x0) + wx * at(y1, x1));
}

}  // namespace

// ---- IDX ------------------------------------------------------------------------------------

TEST_CASE("IDX: plain and gzipped files read back") {
  const std::string dir = temp_dir("idx_ok");
  SmallIdx s;
  s.write(dir, "train", false);
  s.write(dir, "t10k", true);
  Dataset tr = load_mnist(dir, true, "fashion-mnist");
  check_small(tr, s);
  CHECK(tr.name == "fashion-mnist-train");
  CHECK(tr.class_names.size() == 10);
  CHECK(tr.class_names[9] == "Ankle boot");
  Dataset te = load_mnist(dir, false);
  check_small(te, s);
  CHECK(te.name == "mnist-test");
  CHECK(te.class_names[3] == "3");
  std::vector<int64_t> dims;
  CHECK(read_idx_u8(dir + "/t10k-labels-idx1-ubyte.gz", 1, dims) == s.labels);
  CHECK(dims == std::vector<int64_t>{5});
  fs::remove_all(dir);
}

TEST_CASE("IDX: broken files are rejected with the file name and the reason") {
  SmallIdx s;
  for (bool gz : {false, true}) {
    const std::string ext = gz ? ".gz" : "";
    INFO("gzipped: " << gz);
    const std::string dir = temp_dir(gz ? "idx_bad_gz" : "idx_bad");
    const std::string img = dir + "/train-images-idx3-ubyte" + ext;
    const std::string lab = dir + "/train-labels-idx1-ubyte" + ext;
    auto reset = [&] { s.write(dir, "train", gz); };

    reset();  // truncated images: one data byte short
    write_file(img, idx_bytes(0x803, {s.n, s.rows, s.cols}, s.pixels, 1), gz);
    CHECK_THROWS_WITH_AS(load_mnist(dir, true), has(img + ": file is truncated"), Error);
    write_file(img, idx_bytes(0x803, {s.n, s.rows, s.cols}, {}, 0), gz);  // header only
    CHECK_THROWS_WITH_AS(load_mnist(dir, true), has("but only 0 follow"), Error);
    write_file(img, std::string("\x00\x00\x08", 3), gz);  // not even a magic number
    CHECK_THROWS_WITH_AS(load_mnist(dir, true), has(img + ": file is truncated"), Error);

    reset();  // wrong magic: a labels file where images belong
    write_file(img, idx_bytes(0x801, {s.n}, s.labels), gz);
    CHECK_THROWS_WITH_AS(load_mnist(dir, true),
                         has(img + ": wrong magic number 0x00000801, expected 0x00000803"),
                         Error);
    reset();
    write_file(lab, idx_bytes(0x12345678, {s.n}, s.labels), gz);
    CHECK_THROWS_WITH_AS(load_mnist(dir, true), has(lab + ": wrong magic number"), Error);

    reset();  // 4 labels for 5 images
    write_file(lab, idx_bytes(0x801, {4}, {1, 2, 3, 4}), gz);
    CHECK_THROWS_WITH_AS(load_mnist(dir, true),
                         has(img + " holds 5 images but " + lab + " holds 4 labels"),
                         Error);

    reset();  // label out of range
    write_file(lab, idx_bytes(0x801, {s.n}, {1, 2, 10, 4, 5}), gz);
    CHECK_THROWS_WITH_AS(load_mnist(dir, true),
                         has(lab + ": label 10 of item 2 is outside [0, 10)"), Error);

    reset();  // trailing garbage
    write_file(lab, idx_bytes(0x801, {s.n}, s.labels, 0, 3), gz);
    CHECK_THROWS_WITH_AS(load_mnist(dir, true), has(lab + ": trailing bytes"), Error);
    write_file(img, idx_bytes(0x803, {s.n, s.rows, s.cols}, s.pixels, 0, 1), gz);
    CHECK_THROWS_WITH_AS(load_mnist(dir, true), has(img + ": trailing bytes"), Error);

    reset();
    CHECK_NOTHROW(load_mnist(dir, true));  // the reset files themselves are fine
    fs::remove(lab);  // missing file
    CHECK_THROWS_WITH_AS(load_mnist(dir, true),
                         has("train-labels-idx1-ubyte.gz exists; scripts/setup installs "
                                           "Fashion-MNIST to /usr/share/datasets/fashion-mnist"),
                         Error);
    fs::remove_all(dir);
  }
  CHECK_THROWS_WITH_AS(load_mnist("/nonexistent/moevit", false),
                       has("neither /nonexistent/moevit/t10k-images-idx3-ubyte nor"),
                       Error);
}

// Found by fuzz/fuzz_idx (docs/reliability.md, "Fuzzing"): sizes whose product passes 2^63
// overflowed the running product before the size check saw it (here 2^40 x (2^32 - 1) wrapped
// to -2^40, which passed the check).
TEST_CASE("IDX: header sizes whose product overflows are refused") {
  const std::string dir = temp_dir("idx_overflow");
  const std::string img = dir + "/images";
  write_file(img, idx_bytes(0x803, {65536u, 16777216u, 0xFFFFFFFFu}, {}), false);
  std::vector<int64_t> dims;
  CHECK_THROWS_WITH_AS(read_idx_u8(img, 3, dims),
                       has(img + ": implausible sizes in header: 65536x16777216x4294967295"),
                       Error);
  fs::remove_all(dir);
}

TEST_CASE("IDX: a gzip stream cut short is reported, not read as data") {
  const std::string dir = temp_dir("idx_cut_gz");
  SmallIdx s;
  s.write(dir, "train", true);
  const std::string img = dir + "/train-images-idx3-ubyte.gz";
  std::string bytes;
  {
    std::ifstream f(img, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(f), {});
  }
  write_file(img, bytes.substr(0, bytes.size() - 12), false);  // drop the gzip trailer and more
  CHECK_THROWS_WITH_AS(load_mnist(dir, true), has(img), Error);
  fs::remove_all(dir);
}

TEST_CASE("Fashion-MNIST from /usr/share/datasets/fashion-mnist") {
  if (!fs::is_directory(kFashionMnistDir)) {
    MESSAGE("skipped: ", kFashionMnistDir, " is missing (scripts/setup installs it)");
    return;
  }
  Dataset tr = load_fashion_mnist(true);
  Dataset te = load_fashion_mnist(false);
  CHECK(tr.n == 60000);
  CHECK(te.n == 10000);
  for (const Dataset* d : {&tr, &te}) {
    CHECK(d->channels == 1);
    CHECK(d->height == 28);
    CHECK(d->width == 28);
    CHECK_NOTHROW(d->validate());
  }
  // Balanced classes (6000 / 1000 each) and the published pixel mean 0.2860.
  std::vector<int64_t> count(10, 0);
  for (int64_t l : tr.labels) count[size_t(l)]++;
  CHECK(count == std::vector<int64_t>(10, 6000));
  double sum = 0;
  for (uint8_t p : tr.pixels) sum += p;
  CHECK(sum / double(tr.pixels.size()) / 255.0 == doctest::Approx(0.2860).epsilon(0.002));
}

// ---- CIFAR ----------------------------------------------------------------------------------

TEST_CASE("CIFAR-10 and CIFAR-100 binary records read back") {
  const std::string dir = temp_dir("cifar_ok");
  for (int b = 1; b <= 5; ++b)
    write_file(dir + "/data_batch_" + std::to_string(b) + ".bin",
               cifar_record({uint8_t(b)}, b) + cifar_record({uint8_t(9 - b)}, 100 + b), false);
  write_file(dir + "/test_batch.bin", cifar_record({4}, 7), false);
  Dataset tr = load_cifar(dir, true, 10);
  CHECK(tr.n == 10);
  CHECK(tr.channels == 3);
  CHECK(tr.height == 32);
  CHECK(tr.width == 32);
  CHECK(tr.num_classes == 10);
  CHECK(tr.labels == std::vector<int64_t>{1, 8, 2, 7, 3, 6, 4, 5, 5, 4});
  CHECK(tr.image(3)[0] == 102);                   // record 2 of batch 2: seed 102
  CHECK(tr.image(3)[3071] == (102 + 3071) % 251);  // last pixel (channel 2, row 31, col 31)
  CHECK(tr.class_names[0] == "airplane");
  CHECK_NOTHROW(tr.validate());
  Dataset te = load_cifar(dir, false, 10);
  CHECK(te.n == 1);
  CHECK(te.labels[0] == 4);
  CHECK(te.name == "cifar10-test");

  // CIFAR-100 under the folder its archive extracts to: coarse byte first, fine label used.
  fs::create_directories(dir + "/cifar-100-binary");
  write_file(dir + "/cifar-100-binary/train.bin",
             cifar_record({3, 99}, 1) + cifar_record({19, 0}, 2) + cifar_record({0, 42}, 3), false);
  Dataset c100 = load_cifar(dir, true, 100);
  CHECK(c100.n == 3);
  CHECK(c100.num_classes == 100);
  CHECK(c100.labels == std::vector<int64_t>{99, 0, 42});
  CHECK(c100.image(2)[0] == 3);
  CHECK(c100.class_names.size() == 100);
  fs::remove_all(dir);
}

TEST_CASE("CIFAR: broken files are rejected with the file name and the reason") {
  const std::string dir = temp_dir("cifar_bad");
  CHECK_THROWS_WITH_AS(load_cifar(dir, true, 10),
                       has(dir + "/data_batch_1.bin not found"), Error);
  CHECK_THROWS_WITH_AS(load_cifar(dir, true, 10),
                       has("\"CIFAR-10 binary version\" from https://www.cs.toronto.edu/~kriz/cifar.html"),
                       Error);
  CHECK_THROWS_WITH_AS(load_cifar(dir, false, 100), has("CIFAR-100 binary version"), Error);
  for (int b = 1; b <= 5; ++b)
    if (b != 3) write_file(dir + "/data_batch_" + std::to_string(b) + ".bin", cifar_record({1}, 0), false);
  CHECK_THROWS_WITH_AS(load_cifar(dir, true, 10),
                       has(dir + "/data_batch_3.bin not found"), Error);
  write_file(dir + "/data_batch_3.bin", cifar_record({1}, 0) + "xy", false);
  CHECK_THROWS_WITH_AS(load_cifar(dir, true, 10),
                       has(dir + "/data_batch_3.bin: size 3075 bytes is not a multiple "
                                               "of the record size 3073"),
                       Error);
  write_file(dir + "/data_batch_3.bin", cifar_record({1}, 0) + cifar_record({10}, 0), false);
  CHECK_THROWS_WITH_AS(load_cifar(dir, true, 10),
                       has(dir + "/data_batch_3.bin: label 10 of record 1 is outside [0, 10)"),
                       Error);
  write_file(dir + "/test.bin", cifar_record({1, 100}, 0), false);
  CHECK_THROWS_WITH_AS(load_cifar(dir, false, 100),
                       has(dir + "/test.bin: label 100 of record 0 is outside [0, 100)"),
                       Error);
  write_file(dir + "/test.bin", cifar_record({1}, 0), false);  // a CIFAR-10 record in CIFAR-100
  CHECK_THROWS_WITH_AS(load_cifar(dir, false, 100), has("record size 3074"), Error);
  write_file(dir + "/test_batch.bin", "", false);
  CHECK_THROWS_WITH_AS(load_cifar(dir, false, 10), has("test_batch.bin is empty"), Error);
  CHECK_THROWS_WITH_AS(load_cifar(dir, false, 20), has("must be 10 or 100"), Error);
  fs::remove_all(dir);
}

// ---- synthetic ------------------------------------------------------------------------------

TEST_CASE("synthetic data: deterministic, balanced, and separable by class means") {
  Dataset a = make_synthetic(600, 3, 16, 6, 42), b = make_synthetic(600, 3, 16, 6, 42);
  Dataset c = make_synthetic(600, 3, 16, 6, 43);
  CHECK_NOTHROW(a.validate());
  CHECK(a.pixels == b.pixels);
  CHECK(a.labels == b.labels);
  CHECK(a.pixels != c.pixels);
  CHECK(a.labels[7] == 1);
  // Nearest class mean, fit on the first half, scores well above chance (1/6) on the second.
  const int64_t P = a.image_size();
  std::vector<double> mean(size_t(6 * P), 0.0);
  for (int64_t i = 0; i < 300; ++i)
    for (int64_t j = 0; j < P; ++j) mean[size_t(a.labels[size_t(i)] * P + j)] += a.image(i)[j] / 50.0;
  int correct = 0;
  for (int64_t i = 300; i < 600; ++i) {
    int best = -1;
    double best_d = 1e300;
    for (int k = 0; k < 6; ++k) {
      double dist = 0;
      for (int64_t j = 0; j < P; ++j) {
        const double e = a.image(i)[j] - mean[size_t(k * P + j)];
        dist += e * e;
      }
      if (dist < best_d) best_d = dist, best = k;
    }
    correct += best == a.labels[size_t(i)];
  }
  INFO("nearest-class-mean accuracy on synthetic data: " << correct / 300.0);
  CHECK(correct > 200);
}

// ---- transforms -----------------------------------------------------------------------------

TEST_CASE("normalize: per-channel (x - mean) / std") {
  Tensor x = Tensor::from({0.f, 0.5f, 1.f, 0.25f,   // image 0, channel 0
                           0.f, 0.5f, 1.f, 0.25f,   // image 0, channel 1
                           1.f, 1.f, 0.f, 0.f,      // image 1, channel 0
                           0.2f, 0.2f, 0.2f, 0.2f}, // image 1, channel 1
                          {2, 2, 1, 4});
  Normalize n{{0.5f, 0.2f}, {0.25f, 0.5f}};
  test::check_close(normalize(x, n), {-2, 0, 2, -1, -0.4f, 0.6f, 1.6f, 0.1f, 2, 2, -2, -2, 0, 0, 0, 0});
  CHECK(same_values(normalize(x, Normalize::none()), x));
  Tensor fm = Tensor::full({1, 1, 1, 1}, 0.2860f);
  test::check_close(normalize(fm, Normalize::fashion_mnist()), {0.f});
  CHECK(Normalize::for_dataset("fashion-mnist-train").mean[0] == 0.2860f);
  CHECK(Normalize::for_dataset("mnist-test").std[0] == 0.3081f);
  CHECK(Normalize::for_dataset("cifar100-train").mean[0] == 0.5071f);
  CHECK(Normalize::for_dataset("cifar10-train").mean.size() == 3);
  CHECK(!Normalize::for_dataset("synthetic").enabled());
  CHECK_THROWS_WITH_AS(normalize(x, Normalize::cifar10()),
                       has("has 2 channels but mean/std have 3/3"), Error);
  CHECK_THROWS_WITH_AS(normalize(Tensor::zeros({2, 2}), n), has("expected a batch (B, C, H, W)"),
                       Error);
}

TEST_CASE("hflip mirrors columns; twice is the identity") {
  Tensor x = Tensor::from({1, 2, 3, 4, 5, 6}, {1, 1, 2, 3});
  CHECK(hflip(x).to_vector<float>() == std::vector<float>{3, 2, 1, 6, 5, 4});
  Tensor y = ramp_batch(3, 2, 5, 7);
  CHECK(same_values(hflip(hflip(y)), y));
  Generator g(5);
  CHECK(same_values(random_hflip(y, 0.f, g), y));
  CHECK(same_values(random_hflip(y, 1.f, g), hflip(y)));
  // p = 0.5: each image is either itself or its mirror, reproducibly under the seed.
  Tensor big = ramp_batch(64, 1, 4, 4);
  Generator g1(9), g2(9);
  Tensor f1 = random_hflip(big, 0.5f, g1), f2 = random_hflip(big, 0.5f, g2);
  CHECK(same_values(f1, f2));
  const std::vector<float> v = f1.to_vector<float>(), o = big.to_vector<float>(),
                           m = hflip(big).to_vector<float>();
  int flipped = 0;
  for (int i = 0; i < 64; ++i) {
    const bool is_o = std::equal(v.begin() + i * 16, v.begin() + i * 16 + 16, o.begin() + i * 16);
    const bool is_m = std::equal(v.begin() + i * 16, v.begin() + i * 16 + 16, m.begin() + i * 16);
    CHECK((is_o || is_m));
    flipped += is_m;
  }
  CHECK(flipped > 16);
  CHECK(flipped < 48);
  CHECK_THROWS_WITH_AS(random_hflip(y, 1.5f, g), has("outside [0, 1]"), Error);
}

TEST_CASE("random_crop: identity without padding, a padded window otherwise") {
  Tensor x = ramp_batch(4, 3, 6, 6);
  Generator g(3);
  CHECK(same_values(random_crop(x, 6, 0, g), x));

  // Padding 2: each image is the window at its sampled box in the zero-padded image.
  Generator ga(11), gb(11);
  Tensor y = random_crop(x, 6, 2, ga);
  std::vector<CropBox> boxes = sample_random_crops(4, 6, 6, 6, 2, 0.f, gb);
  CHECK(ga.offset == gb.offset);
  const std::vector<float> xv = x.to_vector<float>(), yv = y.to_vector<float>();
  std::set<std::pair<int, int>> offsets;
  for (int i = 0; i < 4; ++i) {
    const int top = int(boxes[size_t(i)].top), left = int(boxes[size_t(i)].left);
    CHECK(top >= -2);
    CHECK(top <= 2);
    CHECK(left >= -2);
    CHECK(left <= 2);
    offsets.insert({top, left});
    for (int c = 0; c < 3; ++c)
      for (int oy = 0; oy < 6; ++oy)
        for (int ox = 0; ox < 6; ++ox) {
          const int sy = top + oy, sx = left + ox;
          const float want = (sy < 0 || sy >= 6 || sx < 0 || sx >= 6)
                                 ? 0.f
                                 : xv[size_t(((i * 3 + c) * 6 + sy) * 6 + sx)];
          CHECK(yv[size_t(((i * 3 + c) * 6 + oy) * 6 + ox)] == want);
        }
  }
  CHECK(offsets.size() > 1);
  // Smaller windows with flips, against the same reference with mirrored columns.
  Generator gc(21);
  std::vector<CropBox> fb = sample_random_crops(4, 6, 6, 4, 3, 0.5f, gc);
  Tensor z = apply_crops(x, fb, 4, 4);
  const std::vector<float> zv = z.to_vector<float>();
  int nflip = 0;
  for (int i = 0; i < 4; ++i) {
    const int top = int(fb[size_t(i)].top), left = int(fb[size_t(i)].left);
    nflip += fb[size_t(i)].flip;
    for (int c = 0; c < 3; ++c)
      for (int oy = 0; oy < 4; ++oy)
        for (int ox = 0; ox < 4; ++ox) {
          const int sy = top + oy, sx = left + (fb[size_t(i)].flip ? 3 - ox : ox);
          const float want = (sy < 0 || sy >= 6 || sx < 0 || sx >= 6)
                                 ? 0.f
                                 : xv[size_t(((i * 3 + c) * 6 + sy) * 6 + sx)];
          CHECK(zv[size_t(((i * 3 + c) * 4 + oy) * 4 + ox)] == want);
        }
  }
  CHECK(nflip > 0);
  CHECK(nflip < 4);
  Tensor small = random_crop(x, 4, 0, g);
  CHECK(small.shape() == Shape{4, 3, 4, 4});
  CHECK_THROWS_WITH_AS(random_crop(x, 11, 2, g), has("does not fit an image of 6x6"), Error);
}

TEST_CASE("random_resized_crop: full box is the identity; boxes follow the ranges; seeded") {
  Tensor x = ramp_batch(5, 2, 8, 8);
  Generator g(1);
  CHECK(max_abs_diff(random_resized_crop(x, 8, 1.f, 1.f, 1.f, 1.f, g), x) <= 1e-5f);

  Generator g1(77), g2(77), g3(78);
  Tensor a = random_resized_crop(x, 6, 0.2f, 0.8f, 0.75f, 1.333f, g1);
  Tensor b = random_resized_crop(x, 6, 0.2f, 0.8f, 0.75f, 1.333f, g2);
  Tensor c = random_resized_crop(x, 6, 0.2f, 0.8f, 0.75f, 1.333f, g3);
  CHECK(a.shape() == Shape{5, 2, 6, 6});
  CHECK(same_values(a, b));
  CHECK(!same_values(a, c));

  Generator gs(5);
  std::vector<CropBox> boxes = sample_resized_crops(200, 32, 32, 0.1f, 0.5f, 0.5f, 2.f, 0.5f, gs);
  int flips = 0;
  for (const CropBox& bx : boxes) {
    CHECK(bx.top >= 0);
    CHECK(bx.left >= 0);
    CHECK(bx.top + bx.height <= 32);
    CHECK(bx.left + bx.width <= 32);
    const float area = bx.height * bx.width / (32.f * 32.f);
    CHECK(area >= 0.08f);  // rounding of the sides moves the area a little
    CHECK(area <= 0.55f);
    CHECK(bx.width / bx.height >= 0.45f);
    CHECK(bx.width / bx.height <= 2.2f);
    flips += bx.flip;
  }
  CHECK(flips > 60);
  CHECK(flips < 140);
  // Impossible ranges fall back to a centred box with the ratio clipped.
  Generator gf(1);
  CropBox fb = sample_resized_crops(1, 10, 20, 1.f, 1.f, 0.5f, 1.f, 0.f, gf)[0];
  CHECK(fb.height == 10);
  CHECK(fb.width == 10);
  CHECK(fb.left == 5);
  CHECK_THROWS_WITH_AS(random_resized_crop(x, 6, 0.5f, 0.2f, 1.f, 1.f, g), has("bad scale range"),
                       Error);
}

TEST_CASE("apply_crops: bilinear resampling and flips match a reference") {
  Tensor x = ramp_batch(2, 2, 6, 7);
  const std::vector<float> xv = x.to_vector<float>();
  std::vector<CropBox> boxes = {{1.f, 2.f, 3.f, 4.f, false}, {-1.5f, 0.5f, 5.f, 6.5f, true}};
  const int oh = 5, ow = 9;
  Tensor y = apply_crops(x, boxes, oh, ow);
  const std::vector<float> yv = y.to_vector<float>();
  for (int i = 0; i < 2; ++i)
    for (int c = 0; c < 2; ++c)
      for (int oy = 0; oy < oh; ++oy)
        for (int ox = 0; ox < ow; ++ox) {
          const CropBox& b = boxes[size_t(i)];
          const int mx = b.flip ? ow - 1 - ox : ox;
          const double sy = b.top + (oy + 0.5) * b.height / oh - 0.5;
          const double sx = b.left + (mx + 0.5) * b.width / ow - 0.5;
          const double want = ref_sample(xv, (i * 2 + c) * 42, 6, 7, sy, sx);
          CHECK(yv[size_t(((i * 2 + c) * oh + oy) * ow + ox)] == doctest::Approx(want).epsilon(1e-5));
        }
  // Point maps: a source point and its image in the crop map back onto each other.
  for (const CropBox& b : boxes) {
    auto [oy, ox] = source_to_box(b, oh, ow, 2.25f, 3.5f);
    auto [sy, sx] = box_to_source(b, oh, ow, oy, ox);
    CHECK(sy == doctest::Approx(2.25f));
    CHECK(sx == doctest::Approx(3.5f));
  }
  auto [fy, fx] = box_to_source(full_box(6, 7, true), 6, 7, 0.f, 0.f);
  CHECK(fy == 0.f);
  CHECK(fx == 6.f);
  CHECK_THROWS_WITH_AS(apply_crops(x, {boxes[0]}, 4, 4), has("1 boxes for batch"), Error);
}

// ---- loader ---------------------------------------------------------------------------------

TEST_CASE("Loader: every index once per epoch, seeded orders, drop_last") {
  Dataset d = make_synthetic(103, 1, 8, 4, 1);
  Loader keep(d, 10, true, 123, false);
  CHECK(keep.batches_per_epoch() == 11);
  std::vector<std::vector<int64_t>> orders;
  for (int epoch = 0; epoch < 2; ++epoch) {
    keep.begin_epoch(epoch);
    std::vector<int64_t> seen;
    int64_t batches = 0;
    for (Batch b; keep.next(b);) {
      CHECK(b.batch_index == batches);
      CHECK(b.images.shape() == Shape{int64_t(b.indices.size()), 1, 8, 8});
      CHECK(b.labels.shape() == Shape{int64_t(b.indices.size())});
      CHECK(b.indices.size() == (batches < 10 ? 10u : 3u));
      const std::vector<int64_t> lab = b.labels.to_vector<int64_t>();
      for (size_t i = 0; i < b.indices.size(); ++i) CHECK(lab[i] == d.labels[size_t(b.indices[i])]);
      seen.insert(seen.end(), b.indices.begin(), b.indices.end());
      ++batches;
    }
    Batch extra;
    CHECK(!keep.next(extra));  // stays finished
    CHECK(batches == 11);
    CHECK(seen == keep.epoch_order(epoch));
    std::vector<int64_t> sorted = seen;
    std::sort(sorted.begin(), sorted.end());
    for (int64_t i = 0; i < 103; ++i) CHECK(sorted[size_t(i)] == i);
    orders.push_back(seen);
  }
  CHECK(orders[0] != orders[1]);

  Loader again(d, 10, true, 123, false);
  CHECK(again.epoch_order(1) == orders[1]);
  Loader other_seed(d, 10, true, 124, false);
  CHECK(other_seed.epoch_order(0) != orders[0]);

  Loader drop(d, 10, true, 123, true);
  CHECK(drop.batches_per_epoch() == 10);
  drop.begin_epoch(0);
  std::set<int64_t> seen;
  int64_t batches = 0;
  for (Batch b; drop.next(b); ++batches) {
    CHECK(b.indices.size() == 10u);
    seen.insert(b.indices.begin(), b.indices.end());
  }
  CHECK(batches == 10);
  CHECK(seen.size() == 100u);  // 3 left out, none twice

  Loader ordered(d, 50, false, 0, false);
  CHECK(ordered.epoch_order(5) == ordered.epoch_order(0));
  CHECK(ordered.epoch_order(0)[7] == 7);
}

TEST_CASE("Loader: images are the data set bytes, cropped and normalised") {
  Dataset d = make_synthetic(20, 2, 6, 3, 7);
  Normalize norm{{0.5f, 0.25f}, {0.5f, 2.f}};
  Loader plain(d, 8, false, 0, false, Augment::none(), norm);
  plain.begin_epoch(0);
  Batch b;
  REQUIRE(plain.next(b));
  const std::vector<float> v = b.images.to_vector<float>();
  for (int64_t i = 0; i < 8; ++i)
    for (int64_t c = 0; c < 2; ++c)
      for (int64_t j = 0; j < 36; ++j) {
        const float want = (d.image(i)[c * 36 + j] / 255.f - norm.mean[size_t(c)]) / norm.std[size_t(c)];
        CHECK(v[size_t((i * 2 + c) * 36 + j)] == doctest::Approx(want).epsilon(1e-6));
      }

  // With padding and flips: each image is the window of its reported box in the zero-padded
  // image (mirrored when flipped), then normalised; the same seed gives the same batches.
  Augment aug = Augment::crop_flip(2, 0.5f);
  Loader l1(d, 8, true, 5, false, aug, norm), l2(d, 8, true, 5, false, aug, norm);
  l1.begin_epoch(3);
  l2.begin_epoch(3);
  int nflip = 0;
  for (Batch b1, b2; l1.next(b1);) {
    REQUIRE(l2.next(b2));
    CHECK(same_values(b1.images, b2.images));
    CHECK(b1.indices == b2.indices);
    const std::vector<float> got = b1.images.to_vector<float>();
    for (size_t i = 0; i < b1.indices.size(); ++i) {
      const CropBox& bx = b1.boxes[i];
      nflip += bx.flip;
      for (int c = 0; c < 2; ++c)
        for (int oy = 0; oy < 6; ++oy)
          for (int ox = 0; ox < 6; ++ox) {
            const int sy = int(bx.top) + oy, sx = int(bx.left) + (bx.flip ? 5 - ox : ox);
            const float v01 = (sy < 0 || sy >= 6 || sx < 0 || sx >= 6)
                                  ? 0.f
                                  : d.image(b1.indices[i])[(c * 6 + sy) * 6 + sx] / 255.f;
            const float want = (v01 - norm.mean[size_t(c)]) / norm.std[size_t(c)];
            CHECK(got[((i * 2 + size_t(c)) * 6 + size_t(oy)) * 6 + size_t(ox)] ==
                  doctest::Approx(want).epsilon(1e-6));
          }
    }
  }
  CHECK(nflip > 0);
  Augment rr = Augment::resized_crop_flip(4, 0.3f, 1.f);
  Loader lr(d, 8, true, 5, false, rr);
  lr.begin_epoch(0);
  REQUIRE(lr.next(b));
  CHECK(b.images.shape() == Shape{8, 2, 4, 4});
  CHECK_THROWS_WITH_AS(Loader(d, 8, true, 5, false, Augment::crop_flip(2), Normalize::cifar10()),
                       has("has 2 channels but the normalisation has 3"), Error);
  CHECK_THROWS_WITH_AS(Loader(d, 0, true, 5), has("batch size 0"), Error);
}

TEST_CASE("Loader: worker errors reach the caller; stopping mid-epoch joins cleanly") {
  Dataset d = make_synthetic(64, 1, 4, 2, 3);
  Loader l(d, 8, true, 1, false);
  Batch b;
  CHECK_THROWS_WITH_AS(l.next(b), has("call begin_epoch"), Error);
  l.set_batch_hook([](Batch& batch) {
    if (batch.batch_index == 2) throw Error("hook failed on batch 2");
  });
  l.begin_epoch(0);
  CHECK(l.next(b));
  CHECK(l.next(b));
  CHECK(b.batch_index == 1);
  CHECK_THROWS_WITH_AS(l.next(b), has("hook failed on batch 2"), Error);
  CHECK_THROWS_WITH_AS(l.next(b), has("hook failed on batch 2"), Error);
  // Other exception types come through as themselves.
  l.set_batch_hook([](Batch&) { throw std::logic_error("not an mv::Error"); });
  l.begin_epoch(1);
  CHECK_THROWS_AS(l.next(b), std::logic_error);
  // A new epoch without the hook runs normally.
  l.set_batch_hook(nullptr);
  l.begin_epoch(2);
  int64_t n = 0;
  while (l.next(b)) ++n;
  CHECK(n == 8);

  // Restart mid-epoch and destroy mid-epoch while the worker waits on a full queue.
  for (int rep = 0; rep < 20; ++rep) {
    Loader m(d, 4, true, uint64_t(rep), false, Augment::crop_flip(1), Normalize::none(), 2);
    m.begin_epoch(0);
    CHECK(m.next(b));
    m.begin_epoch(1);
    CHECK(m.next(b));
  }
}
