// libFuzzer target for the IDX reader (datasets/idx.h), plain and gzipped. The first input byte
// picks the form: bit 0 clear, the rest is the file as is (a fuzzed gzip stream among others);
// set, the rest is gzipped here first, so that mutations of the IDX bytes get past gzip's CRC.
// Each file is read as an image file (3 dimensions) and as a label file (1).
#include <zlib.h>

#include <cstdlib>
#include <string_view>
#include <vector>

#include "datasets/idx.h"
#include "engine/error.h"
#include "engine/file_write.h"
#include "fuzz/scratch.h"

namespace {

std::string gzip(const uint8_t* data, size_t size) {
  z_stream z{};
  if (deflateInit2(&z, Z_BEST_SPEED, Z_DEFLATED, 15 + 16 /* gzip wrapper */, 8,
                   Z_DEFAULT_STRATEGY) != Z_OK)
    std::abort();
  std::string out(deflateBound(&z, uLong(size)), '\0');
  z.next_in = const_cast<Bytef*>(data);
  z.avail_in = uInt(size);
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = uInt(out.size());
  if (deflate(&z, Z_FINISH) != Z_STREAM_END) std::abort();
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string path = (mv::fuzz::scratch_dir() / "input.idx").string();
  const bool wrap = data[0] & 1;
  mv::write_file(path, wrap ? gzip(data + 1, size - 1)
                            : std::string(reinterpret_cast<const char*>(data + 1), size - 1));
  for (int ndims : {1, 3}) {
    try {
      std::vector<int64_t> dims;
      const std::vector<uint8_t> v = mv::datasets::read_idx_u8(path, ndims, dims);
      // What a reader accepts must be whole: exactly the bytes its header announces.
      size_t total = 1;
      for (int64_t d : dims) total *= size_t(d);
      if (dims.size() != size_t(ndims) || v.size() != total) std::abort();
    } catch (const mv::Error&) {
    }
  }
  return 0;
}
