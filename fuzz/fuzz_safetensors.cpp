// libFuzzer target for the safetensors reader (engine/safetensors.h), which checkpoints and
// eval/viz go through. What it accepts must survive a save and a second load unchanged: same
// names, dtypes, shapes, bytes and metadata.
#include <cstdlib>
#include <cstring>
#include <string>

#include "engine/error.h"
#include "engine/file_write.h"
#include "engine/safetensors.h"
#include "fuzz/scratch.h"

namespace {

bool same(const mv::TensorMap& a, const mv::TensorMap& b) {
  if (a.size() != b.size()) return false;
  for (auto ia = a.begin(), ib = b.begin(); ia != a.end(); ++ia, ++ib) {
    const mv::Tensor &x = ia->second, &y = ib->second;
    if (ia->first != ib->first || x.dtype() != y.dtype() || x.shape() != y.shape() ||
        x.nbytes() != y.nbytes() || (x.nbytes() && std::memcmp(x.raw(), y.raw(), x.nbytes())))
      return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = (mv::fuzz::scratch_dir() / "input.safetensors").string();
  const std::string copy = (mv::fuzz::scratch_dir() / "copy.safetensors").string();
  mv::write_file(path, std::string(reinterpret_cast<const char*>(data), size));
  mv::TensorMap tensors;
  mv::Metadata meta;
  try {
    tensors = mv::load_safetensors(path, &meta);
  } catch (const mv::Error&) {
    return 0;
  }
  mv::save_safetensors(copy, tensors, meta);
  mv::Metadata meta2;
  if (!same(tensors, mv::load_safetensors(copy, &meta2)) || meta != meta2) std::abort();
  return 0;
}
