// Seeded random tensors. A Generator is (seed, offset): each call reserves the Philox blocks it
// reads and advances offset past them, so a stream of calls is reproducible and can be saved
// and restored (checkpoints store both numbers).
#pragma once
#include <cstdint>

#include "engine/tensor.h"

namespace mv {

struct Generator {
  uint64_t seed = 0;
  uint64_t offset = 0;  // next unused Philox block

  // Data parallel (dist/): this process is part `part` of `parts`, each drawing for its equal
  // share of a batch. A call reserves the blocks of all parts and reads its own share, so the
  // parts' draws side by side are those one process drawing for the whole batch would read.
  uint64_t part = 0, parts = 1;

  explicit Generator(uint64_t seed_ = 0) : seed(seed_) {}
  // Reserves `blocks` blocks (of every part) and returns the first one of this part's.
  uint64_t take(uint64_t blocks) {
    const uint64_t o = offset + part * blocks;
    offset += parts * blocks;
    return o;
  }
};

Generator& default_generator();
void manual_seed(uint64_t seed);  // resets the default generator

Tensor rand(const Shape& shape, Generator& g = default_generator());   // U[0, 1), F32
// N(0, 1), F32, on `device`: the same draws on either (the GPU's through cuda/random.cu).
Tensor randn(const Shape& shape, Generator& g = default_generator(), Device device = Device::CPU);
Tensor bernoulli(const Shape& shape, float p, Generator& g = default_generator());  // 1 with prob p
Tensor randperm(int64_t n, Generator& g = default_generator());         // I64 permutation of 0..n-1
// Truncated normal on [lo, hi] (in units of std), by inverse-free resampling of rejected draws.
Tensor trunc_normal(const Shape& shape, float std, float lo, float hi,
                    Generator& g = default_generator());

}  // namespace mv
