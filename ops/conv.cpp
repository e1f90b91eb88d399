// Unfold (im2col, channels-last) and its backward; the CUDA twin is cuda/conv.cu. A tap row of a
// window is k adjacent pixels of C channels, contiguous in the image, so the CPU copies up to
// k C floats at a time; the backward adds them back image by image (windows overlap within an
// image, never across images).
#include "ops/conv.h"

#include <algorithm>
#include <cstring>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"
#include "ops/dispatch.h"

namespace mv::cpu {

namespace {

// Calls f(x_offset, row_offset, n) for each run of n contiguous floats that window (b, oy, ox)
// copies from the image: per tap row, the taps inside the image are adjacent pixels, so one run
// of up to k C floats. z(row_offset, n) for each run of the window that falls on the padding.
// Offsets into contiguous x (B, H, W, C) and rows (B, Ho Wo, k k C).
template <class F, class Z>
void for_window_runs(const Shape& xs, const ops::ConvGeometry& g, int64_t b, int64_t oy, int64_t ox, F f, Z z) {
  const int64_t H = xs[1], W = xs[2], C = xs[3];
  const int64_t row = (b * g.ho + oy) * g.wo + ox, x0 = ox * g.stride - g.pad;
  const int64_t j0 = std::clamp<int64_t>(-x0, 0, g.k), j1 = std::clamp<int64_t>(W - x0, j0, g.k);
  for (int64_t i = 0; i < g.k; ++i) {
    const int64_t y = oy * g.stride + i - g.pad, r = (row * g.k + i) * g.k * C;
    if (y < 0 || y >= H || j1 == j0) {
      z(r, g.k * C);
      continue;
    }
    if (j0 > 0) z(r, j0 * C);
    f(((b * H + y) * W + x0 + j0) * C, r + j0 * C, (j1 - j0) * C);
    if (j1 < g.k) z(r + j1 * C, (g.k - j1) * C);
  }
}

}  // namespace

// x: (B, H, W, C) contiguous -> (B, Ho Wo, k k C)
Tensor unfold(const Tensor& x, const ops::ConvGeometry& g) {
  const Shape& xs = x.shape();
  const int64_t B = xs[0], C = xs[3];
  Tensor out = Tensor::empty({B, g.ho * g.wo, g.k * g.k * C});
  const float* px = x.data<float>();
  float* po = out.data<float>();
  parallel_for(B * g.ho, g.wo * g.k * g.k * C, [&](int64_t s, int64_t e) {
    for (int64_t by = s; by < e; ++by)
      for (int64_t ox = 0; ox < g.wo; ++ox)
        for_window_runs(
            xs, g, by / g.ho, by % g.ho, ox,
            [&](int64_t xo, int64_t r, int64_t n) { std::memcpy(po + r, px + xo, size_t(n) * sizeof(float)); },
            [&](int64_t r, int64_t n) { std::memset(po + r, 0, size_t(n) * sizeof(float)); });
  });
  return out;
}

// rows: (B, Ho Wo, k k C) contiguous -> dx (B, H, W, C) = the sum of the rows' entries per pixel
Tensor fold(const Tensor& rows, const Shape& xs, const ops::ConvGeometry& g) {
  const int64_t B = xs[0], C = xs[3];
  Tensor dx = Tensor::zeros(xs);
  const float* pr = rows.data<float>();
  float* pd = dx.data<float>();
  parallel_for(B, g.ho * g.wo * g.k * g.k * C, [&](int64_t s, int64_t e) {
    for (int64_t b = s; b < e; ++b)
      for (int64_t oy = 0; oy < g.ho; ++oy)
        for (int64_t ox = 0; ox < g.wo; ++ox)
          for_window_runs(
              xs, g, b, oy, ox,
              [&](int64_t xo, int64_t r, int64_t n) {
                for (int64_t c = 0; c < n; ++c) pd[xo + c] += pr[r + c];
              },
              [](int64_t, int64_t) {});
  });
  return dx;
}

}  // namespace mv::cpu

namespace mv::ops {

int64_t conv_out_size(int64_t size, int k, int stride, int pad) {
  return (size + 2 * int64_t(pad) - k) / stride + 1;
}

Tensor unfold(const Tensor& x, int k, int stride, int pad) {
  const OpDevice dev = device_of("unfold", {&x});
  expect_f32("unfold", {&x});
  MV_CHECK(x.ndim() == 4, "unfold: x ", x.str(), " must be channels-last images (B, H, W, C)");
  MV_CHECK(k >= 1 && stride >= 1 && pad >= 0 && pad < k, "unfold: window ", k, ", stride ", stride,
           " and padding ", pad, ": expected window >= 1, stride >= 1 and 0 <= padding < window");
  MV_CHECK(x.size(1) + 2 * pad >= k && x.size(2) + 2 * pad >= k, "unfold: x ", x.str(),
           " padded by ", pad, " is smaller than the ", k, " x ", k, " window");
  const ConvGeometry g{k, stride, pad, conv_out_size(x.size(1), k, stride, pad),
                       conv_out_size(x.size(2), k, stride, pad)};
  return autograd::record("unfold", MV_KERNEL(unfold)(dev, x.contiguous(), g), {x},
                          [dev, xs = x.shape(), g](const Tensor& grad) {
                            return std::vector<Tensor>{MV_KERNEL(fold)(dev, grad.contiguous(), xs, g)};
                          });
}

}  // namespace mv::ops
