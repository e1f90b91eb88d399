// Dropout. The mask is never stored: forward and backward both evaluate Philox block by block
// (4 draws per block) from the same (seed, offset), which is also what a CUDA kernel does.
#include "ops/dropout.h"

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "engine/philox.h"
#include "ops/common.h"

namespace mv::ops {

namespace {

// out[i] = in[i] * scale where draw i >= p, else 0.
void apply_mask(const float* in, float* out, int64_t n, float p, float scale, uint64_t seed,
                uint64_t offset) {
  const int64_t blocks = (n + 3) / 4;
  parallel_for(blocks, 64, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const philox::U4 w = philox::block(seed, offset + uint64_t(k));
      const uint32_t lanes[4] = {w.x, w.y, w.z, w.w};
      for (int64_t l = 0; l < 4 && 4 * k + l < n; ++l) {
        const int64_t i = 4 * k + l;
        out[i] = philox::to_unit(lanes[l]) < p ? 0.f : in[i] * scale;
      }
    }
  });
}

}  // namespace

// d dropout / dx = mask / (1 - p), the same mask as the forward pass
Tensor dropout(const Tensor& x_, float p, Generator& g, bool training) {
  expect_cpu_f32("dropout", {&x_});
  MV_CHECK(p >= 0.f && p < 1.f, "dropout: probability ", p, " is outside [0, 1)");
  if (!training || p == 0.f) return x_;
  Tensor x = x_.contiguous();
  const int64_t n = x.numel();
  const uint64_t seed = g.seed, offset = g.take(uint64_t(n + 3) / 4);
  const float scale = 1.f / (1.f - p);
  Tensor out = Tensor::empty(x.shape());
  apply_mask(x.data<float>(), out.data<float>(), n, p, scale, seed, offset);
  return autograd::record("dropout", out, {x_}, [=](const Tensor& gy_) {
    Tensor gy = gy_.contiguous();
    Tensor gx = Tensor::empty(gy.shape());
    apply_mask(gy.data<float>(), gx.data<float>(), n, p, scale, seed, offset);
    return std::vector<Tensor>{gx};
  });
}

}  // namespace mv::ops
