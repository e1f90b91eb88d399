// Dropout. The mask is never stored: forward and backward both evaluate Philox block by block
// (4 draws per block) from the same (seed, offset), which is also what a CUDA kernel does.
#include "ops/dropout.h"

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "engine/philox.h"
#include "ops/dispatch.h"

namespace mv::cpu {

// x: any shape -> x * scale where Philox draw i of (seed, offset) is >= p, else 0. The forward
// and, with the same (seed, offset), the backward.
Tensor dropout_mask(const Tensor& x_, float p, float scale, uint64_t seed, uint64_t offset) {
  const Tensor x = x_.contiguous();
  Tensor out = Tensor::empty(x.shape());
  const float* in = x.data<float>();
  float* po = out.data<float>();
  const int64_t n = x.numel(), blocks = (n + 3) / 4;
  parallel_for(blocks, 64, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const philox::U4 w = philox::block(seed, offset + uint64_t(k));
      const uint32_t lanes[4] = {w.x, w.y, w.z, w.w};
      for (int64_t l = 0; l < 4 && 4 * k + l < n; ++l) {
        const int64_t i = 4 * k + l;
        po[i] = philox::to_unit(lanes[l]) < p ? 0.f : in[i] * scale;
      }
    }
  });
  return out;
}

}  // namespace mv::cpu

namespace mv::ops {

// d dropout / dx = mask / (1 - p), the same mask as the forward pass
Tensor dropout(const Tensor& x, float p, Generator& g, bool training) {
  const OpDevice dev = device_of("dropout", {&x});
  expect_f32("dropout", {&x});
  MV_CHECK(p >= 0.f && p < 1.f, "dropout: probability ", p, " is outside [0, 1)");
  if (!training || p == 0.f) return x;
  const uint64_t seed = g.seed, offset = g.take(uint64_t(x.numel() + 3) / 4);
  const float scale = 1.f / (1.f - p);
  Tensor out = MV_CPU_KERNEL(dropout_mask)(dev, x, p, scale, seed, offset);
  return autograd::record("dropout", out, {x}, [=](const Tensor& gy) {
    return std::vector<Tensor>{MV_CPU_KERNEL(dropout_mask)(dev, gy, p, scale, seed, offset)};
  });
}

}  // namespace mv::ops
