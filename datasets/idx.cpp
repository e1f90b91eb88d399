#include "datasets/idx.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>

#include "engine/error.h"

namespace mv::datasets {
namespace {

struct GzCloser {
  void operator()(gzFile_s* f) const { gzclose(f); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

std::string gz_error(gzFile f) {
  int code = 0;
  const char* msg = gzerror(f, &code);
  return code == Z_ERRNO ? std::strerror(errno) : (msg ? msg : "unknown zlib error");
}

// Reads up to `len` bytes; fewer only at the end of the file. Throws on a read error.
size_t read_some(gzFile f, const std::string& path, uint8_t* dst, size_t len) {
  size_t got = 0;
  while (got < len) {
    const unsigned chunk = unsigned(std::min<size_t>(len - got, size_t(1) << 30));
    const int r = gzread(f, dst + got, chunk);
    MV_CHECK(r >= 0, "read_idx: ", path, ": read error: ", gz_error(f));
    if (r == 0) break;
    got += size_t(r);
  }
  return got;
}

uint32_t be32(const uint8_t* p) {
  return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | uint32_t(p[3]);
}

std::string dims_str(const std::vector<int64_t>& dims) {
  std::string s;
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += 'x';
    s += std::to_string(dims[i]);
  }
  return s;
}

// `dir/base` or `dir/base.gz`, whichever exists (plain first: it reads faster).
std::string find_file(const std::string& dir, const std::string& base) {
  namespace fs = std::filesystem;
  const fs::path plain = fs::path(dir) / base, gz = fs::path(dir) / (base + ".gz");
  if (fs::is_regular_file(plain)) return plain.string();
  if (fs::is_regular_file(gz)) return gz.string();
  MV_FAIL("load_mnist: neither ", plain.string(), " nor ", gz.string(),
          " exists; scripts/setup installs Fashion-MNIST to ", kFashionMnistDir,
          " (Debian package dataset-fashion-mnist)");
}

const std::vector<std::string> kFashionNames = {"T-shirt/top", "Trouser", "Pullover", "Dress",
                                                "Coat",        "Sandal",  "Shirt",    "Sneaker",
                                                "Bag",         "Ankle boot"};

}  // namespace

std::vector<uint8_t> read_idx_u8(const std::string& path, int ndims, std::vector<int64_t>& dims) {
  MV_CHECK(ndims >= 1 && ndims <= 255, "read_idx: ", path, ": bad dimension count ", ndims);
  GzFile f(gzopen(path.c_str(), "rb"));
  MV_CHECK(f, "read_idx: cannot open ", path, ": ", std::strerror(errno));
  gzbuffer(f.get(), 1 << 17);

  uint8_t head[4];
  MV_CHECK(read_some(f.get(), path, head, 4) == 4, "read_idx: ", path,
           ": file is truncated: shorter than the 4-byte IDX magic number");
  const uint32_t magic = be32(head), want = 0x00000800u | uint32_t(ndims);
  if (magic != want) {
    char got_hex[16], want_hex[16];
    std::snprintf(got_hex, sizeof got_hex, "0x%08X", magic);
    std::snprintf(want_hex, sizeof want_hex, "0x%08X", want);
    MV_FAIL("read_idx: ", path, ": wrong magic number ", got_hex, ", expected ", want_hex,
            " (an IDX file of unsigned bytes with ", ndims, " dimensions)");
  }

  std::vector<uint8_t> hdr(size_t(4 * ndims));
  MV_CHECK(read_some(f.get(), path, hdr.data(), hdr.size()) == hdr.size(), "read_idx: ", path,
           ": file is truncated inside the header (", ndims, " dimension sizes expected)");
  dims.assign(size_t(ndims), 0);
  for (int d = 0; d < ndims; ++d) dims[size_t(d)] = be32(hdr.data() + 4 * d);
  // The product is bounded before each step: 32-bit sizes multiply past int64 in a few dimensions.
  constexpr int64_t kMaxTotal = int64_t(1) << 40;
  int64_t total = 1;
  for (int64_t d : dims) {
    MV_CHECK(d == 0 || total <= kMaxTotal / d, "read_idx: ", path,
             ": implausible sizes in header: ", dims_str(dims), " is more than 2^40 bytes of data");
    total *= d;
  }

  // Read in slices that grow with what has arrived (1 MiB, then doubling up to 64 MiB), so a
  // header that claims far more than the file holds fails as "truncated" having allocated at
  // most twice what the file held, not what it claims.
  std::vector<uint8_t> data;
  int64_t got = 0;
  while (got < total) {
    const int64_t want_now =
        std::min({total - got, std::max<int64_t>(got, int64_t(1) << 20), int64_t(64) << 20});
    data.resize(size_t(got + want_now));
    const size_t r = read_some(f.get(), path, data.data() + got, size_t(want_now));
    got += int64_t(r);
    if (int64_t(r) < want_now) break;
  }
  MV_CHECK(got == total, "read_idx: ", path, ": file is truncated: the header says ",
           dims_str(dims), " = ", total, " bytes of data but only ", got, " follow");
  uint8_t extra;
  MV_CHECK(read_some(f.get(), path, &extra, 1) == 0, "read_idx: ", path,
           ": trailing bytes after the ", total, " data bytes the header describes (",
           dims_str(dims), ")");
  return data;
}

Dataset load_mnist(const std::string& dir, bool train, const std::string& name) {
  const std::string split = train ? "train" : "t10k";
  const std::string img_path = find_file(dir, split + "-images-idx3-ubyte");
  const std::string lab_path = find_file(dir, split + "-labels-idx1-ubyte");

  std::vector<int64_t> idims, ldims;
  Dataset d;
  d.pixels = read_idx_u8(img_path, 3, idims);
  std::vector<uint8_t> labels = read_idx_u8(lab_path, 1, ldims);
  MV_CHECK(idims[0] == ldims[0], "load_mnist: ", img_path, " holds ", idims[0], " images but ",
           lab_path, " holds ", ldims[0], " labels");
  MV_CHECK(idims[1] > 0 && idims[2] > 0, "load_mnist: ", img_path, ": empty image size ",
           idims[1], "x", idims[2]);

  d.name = name + (train ? "-train" : "-test");
  d.n = idims[0];
  d.channels = 1;
  d.height = idims[1];
  d.width = idims[2];
  d.num_classes = 10;
  d.labels.resize(labels.size());
  for (size_t i = 0; i < labels.size(); ++i) {
    MV_CHECK(labels[i] < 10, "load_mnist: ", lab_path, ": label ", int(labels[i]), " of item ", i,
             " is outside [0, 10)");
    d.labels[i] = labels[i];
  }
  if (name.find("fashion") != std::string::npos) {
    d.class_names = kFashionNames;
  } else {
    for (int c = 0; c < 10; ++c) d.class_names.push_back(std::to_string(c));
  }
  return d;
}

Dataset load_fashion_mnist(bool train, const std::string& dir) {
  return load_mnist(dir, train, "fashion-mnist");
}

}  // namespace mv::datasets
