// LayerNorm over the last axis; its CUDA twin is cuda/norm.cu. Forward: per row, mean and
// variance in two passes (vectorised lane sums), then y = xhat * gamma + beta with
// xhat = (x - mean) * rstd; mean and rstd are saved per row.
// Backward: rows split into a fixed number of blocks; each block writes dx for its rows and its
// own partial dgamma/dbeta, which are added in block order afterwards: no shared writes, and the
// same result for any thread count.
#include "ops/norm.h"

#include <algorithm>
#include <cmath>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/dispatch.h"
#include "ops/fast_math.h"

namespace mv::cpu {

using ops::lane_sum;

// x: (..., D) contiguous, gamma, beta: (D,) contiguous -> y (..., D), mean and rstd (...)
ops::LayerNormOut layernorm_forward(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps) {
  const int64_t D = x.shape().back(), rows = x.numel() / D;
  const Shape row_shape(x.shape().begin(), x.shape().end() - 1);
  ops::LayerNormOut o{Tensor::empty(x.shape()), Tensor::empty(row_shape), Tensor::empty(row_shape)};
  const float *px = x.data<float>(), *pw = gamma.data<float>(), *pb = beta.data<float>();
  float *py = o.y.data<float>(), *pm = o.mean.data<float>(), *pr = o.rstd.data<float>();
  parallel_for(rows, D * 8, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* xr = px + r * D;
      const float m = lane_sum(D, [&](int64_t j) { return xr[j]; }) / float(D);
      const float v = lane_sum(D, [&](int64_t j) { return (xr[j] - m) * (xr[j] - m); }) / float(D);
      const float rs = 1.f / std::sqrt(v + eps);
      pm[r] = m;
      pr[r] = rs;
      float* yr = py + r * D;
      for (int64_t j = 0; j < D; ++j) yr[j] = (xr[j] - m) * rs * pw[j] + pb[j];
    }
  });
  return o;
}

// dy: (..., D), x: (..., D) and gamma: (D,) contiguous, mean, rstd: (...) from the forward
// -> dx, dgamma, dbeta, with xhat = (x - mean) * rstd:
//   dbeta = sum_rows dy,  dgamma = sum_rows dy * xhat,
//   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dy * gamma
ops::LayerNormGrads layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& gamma, const Tensor& mean,
                                       const Tensor& rstd) {
  const int64_t D = x.shape().back(), rows = x.numel() / D;
  const Tensor g = dy.contiguous();
  ops::LayerNormGrads d{Tensor::empty(x.shape()), Tensor::empty({D}), Tensor::empty({D})};
  const float *px = x.data<float>(), *pw = gamma.data<float>(), *pg = g.data<float>();
  const float *pm = mean.data<float>(), *pr = rstd.data<float>();
  float* pdx = d.dx.data<float>();
  const int64_t nblk = std::clamp<int64_t>(rows, 1, 64), per = (rows + nblk - 1) / nblk;
  // Partial sums per block: [blk][0..D) dgamma, [blk][D..2D) dbeta.
  std::vector<float> part(size_t(nblk * 2 * D), 0.f);
  parallel_for(nblk, per * D * 10, [&](int64_t b, int64_t e) {
    std::vector<float> xhat(static_cast<size_t>(D));
    float* xh = xhat.data();
    for (int64_t blk = b; blk < e; ++blk) {
      float* pgw = part.data() + blk * 2 * D;
      float* pgb = pgw + D;
      for (int64_t r = blk * per, rend = std::min(rows, r + per); r < rend; ++r) {
        const float *xr = px + r * D, *gr = pg + r * D;
        const float m = pm[r], rs = pr[r];
        for (int64_t j = 0; j < D; ++j) xh[j] = (xr[j] - m) * rs;
        for (int64_t j = 0; j < D; ++j) {
          pgw[j] += gr[j] * xh[j];
          pgb[j] += gr[j];
        }
        // a = mean(dxhat), c = mean(dxhat * xhat), with dxhat = g * gamma
        const float a = lane_sum(D, [&](int64_t j) { return gr[j] * pw[j]; }) / float(D);
        const float c = lane_sum(D, [&](int64_t j) { return gr[j] * pw[j] * xh[j]; }) / float(D);
        float* dr = pdx + r * D;
        for (int64_t j = 0; j < D; ++j) dr[j] = rs * (gr[j] * pw[j] - a - xh[j] * c);
      }
    }
  });
  float *pdw = d.dgamma.data<float>(), *pdb = d.dbeta.data<float>();
  for (int64_t j = 0; j < D; ++j) {
    double sw = 0, sb = 0;  // the few block partials, added in a fixed order
    for (int64_t blk = 0; blk < nblk; ++blk) {
      sw += part[size_t(blk * 2 * D + j)];
      sb += part[size_t(blk * 2 * D + D + j)];
    }
    pdw[j] = float(sw);
    pdb[j] = float(sb);
  }
  return d;
}

}  // namespace mv::cpu

namespace mv::ops {

Tensor layernorm(const Tensor& x_, const Tensor& gamma_, const Tensor& beta_, float eps) {
  const OpDevice dev = device_of("layernorm", {&x_, &gamma_, &beta_});
  expect_f32("layernorm", {&x_, &gamma_, &beta_});
  MV_CHECK(x_.ndim() >= 1 && x_.shape().back() > 0, "layernorm: x ", x_.str(),
           " needs a non-empty last axis");
  const int64_t D = x_.shape().back();
  MV_CHECK(gamma_.shape() == Shape{D} && beta_.shape() == Shape{D}, "layernorm: x ", x_.str(),
           " needs gamma and beta of shape (", D, "), got ", gamma_.str(), " and ", beta_.str());
  MV_CHECK(eps >= 0.f, "layernorm: eps ", eps, " must be >= 0");
  const Tensor x = x_.contiguous(), gamma = gamma_.contiguous();
  LayerNormOut f = MV_KERNEL(layernorm_forward)(dev, x, gamma, beta_.contiguous(), eps);
  const bool gx = x_.requires_grad(), gw = gamma_.requires_grad(), gb = beta_.requires_grad();
  return autograd::record(
      "layernorm", f.y, {x_, gamma_, beta_},
      [dev, xd = x.detach(), wd = gamma.detach(), mean = f.mean, rstd = f.rstd, gx, gw, gb](const Tensor& g) {
        LayerNormGrads d = MV_KERNEL(layernorm_backward)(dev, g, xd, wd, mean, rstd);
        return std::vector<Tensor>{gx ? d.dx : Tensor(), gw ? d.dgamma : Tensor(), gb ? d.dbeta : Tensor()};
      });
}

}  // namespace mv::ops
