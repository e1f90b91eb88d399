#include "engine/random.h"

#include <algorithm>
#include <numeric>

#include "engine/parallel.h"
#include "engine/philox.h"

namespace mv {

Generator& default_generator() {
  static Generator g(0);
  return g;
}

void manual_seed(uint64_t seed) { default_generator() = Generator(seed); }

Tensor rand(const Shape& shape, Generator& g) {
  Tensor t = Tensor::empty(shape);
  const int64_t n = t.numel();
  const uint64_t off = g.take(uint64_t(n + 3) / 4);
  float* p = t.data<float>();
  for (int64_t i = 0; i < n; ++i) p[i] = philox::uniform(g.seed, off, uint64_t(i));
  return t;
}

// Draws 2j and 2j + 1 share block off + j (philox::normal_pair). Each block is a pure function of
// (seed, off + j), so the pairs are split over the threads; within a thread, the integer Philox
// rounds of a chunk of blocks run first in a loop of their own, then Box-Muller in a second: both
// vectorise.
Tensor randn(const Shape& shape, Generator& g, Device device) {
  for (int64_t d : shape) MV_CHECK(d >= 0, "randn: negative size in shape ", shape_str(shape));
  const int64_t n = shape_numel(shape), pairs = (n + 1) / 2;
  const uint64_t seed = g.seed, off = g.take(uint64_t(pairs));
  if (device == Device::CUDA) {
    MV_CHECK(cuda_available(), "randn: a CUDA tensor was asked for, but no CUDA device is present");
    return cuda_hooks()->normal(shape, seed, off);
  }
  Tensor t = Tensor::empty(shape);
  float* p = t.data<float>();
  parallel_for(pairs, 96, [&](int64_t s, int64_t e) {
    constexpr int64_t kChunk = 256;
    philox::U4 blocks[kChunk];
    float cs[kChunk], sn[kChunk];
    for (int64_t j0 = s; j0 < e; j0 += kChunk) {
      const int64_t m = std::min(kChunk, e - j0);
      for (int64_t i = 0; i < m; ++i) blocks[i] = philox::block(seed, off + uint64_t(j0 + i));
      for (int64_t i = 0; i < m; ++i) philox::normal_pair(blocks[i], cs[i], sn[i]);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t j = j0 + i;
        p[2 * j] = cs[i];
        if (2 * j + 1 < n) p[2 * j + 1] = sn[i];
      }
    }
  });
  return t;
}

Tensor bernoulli(const Shape& shape, float prob, Generator& g) {
  MV_CHECK(prob >= 0.f && prob <= 1.f, "bernoulli: probability ", prob, " is outside [0, 1]");
  Tensor t = rand(shape, g);
  float* p = t.data<float>();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = p[i] < prob ? 1.f : 0.f;
  return t;
}

Tensor randperm(int64_t n, Generator& g) {
  // Sort indices by a random 32-bit key (ties by index): the same on any device.
  const uint64_t off = g.take(uint64_t(n + 3) / 4);
  std::vector<uint32_t> key(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    philox::U4 b = philox::block(g.seed, off + uint64_t(i) / 4);
    int lane = int(i % 4);
    key[size_t(i)] = lane == 0 ? b.x : lane == 1 ? b.y : lane == 2 ? b.z : b.w;
  }
  Tensor t = Tensor::arange(n, DType::I64);
  int64_t* p = t.data<int64_t>();
  std::stable_sort(p, p + n, [&](int64_t a, int64_t b) { return key[size_t(a)] < key[size_t(b)]; });
  return t;
}

Tensor trunc_normal(const Shape& shape, float std, float lo, float hi, Generator& g) {
  MV_CHECK(lo < hi, "trunc_normal: empty range [", lo, ", ", hi, "]");
  Tensor t = randn(shape, g);
  float* p = t.data<float>();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    while (p[i] < lo || p[i] > hi) p[i] = randn({1}, g).data<float>()[0];
    p[i] *= std;
  }
  return t;
}

}  // namespace mv
