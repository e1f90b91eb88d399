// LayerNorm. Forward: per row, mean and variance in two passes (vectorised lane sums), then
// y = xhat * gamma + beta with xhat = (x - mean) * rstd; mean and rstd are saved per row.
// Backward: rows split into a fixed number of blocks; each block writes dx for its rows and its
// own partial dgamma/dbeta, which are added in block order afterwards: no shared writes, and the
// same result for any thread count.
#include "ops/norm.h"

#include <algorithm>
#include <cmath>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"
#include "ops/fast_math.h"

#ifdef MOEVIT_CUDA
#include "cuda/kernels.h"
#endif

namespace mv::ops {

#ifdef MOEVIT_CUDA
// The same op on the GPU: cuda::layernorm_forward saves mean and rstd; the backward kernel
// computes the same three gradients (dgamma, dbeta reduced deterministically).
static Tensor layernorm_cuda(const Tensor& x_, const Tensor& gamma_, const Tensor& beta_, float eps) {
  const Tensor x = x_.contiguous(), gamma = gamma_.contiguous();
  cuda::LayerNormOut f = cuda::layernorm_forward(x, gamma, beta_.contiguous(), eps);
  if (!autograd::needs_graph({x_, gamma_, beta_})) return f.y;
  const bool gx = x_.requires_grad(), gw = gamma_.requires_grad(), gb = beta_.requires_grad();
  return autograd::record(
      "layernorm", f.y, {x_, gamma_, beta_},
      [xd = x.detach(), wd = gamma.detach(), mean = f.mean, rstd = f.rstd, gx, gw, gb](const Tensor& g) {
        cuda::LayerNormGrads d = cuda::layernorm_backward(g.contiguous(), xd, wd, mean, rstd);
        return std::vector<Tensor>{gx ? d.dx : Tensor(), gw ? d.dgamma : Tensor(), gb ? d.dbeta : Tensor()};
      });
}
#endif

// xhat = (x - mean) * rstd, y = xhat * gamma + beta:
//   dbeta = sum_rows g,  dgamma = sum_rows g * xhat,
//   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = g * gamma
Tensor layernorm(const Tensor& x_, const Tensor& gamma_, const Tensor& beta_, float eps) {
  const bool gpu = on_cuda("layernorm", {&x_, &gamma_, &beta_});
  if (!gpu) expect_cpu_f32("layernorm", {&x_, &gamma_, &beta_});
  MV_CHECK(x_.ndim() >= 1 && x_.shape().back() > 0, "layernorm: x ", x_.str(),
           " needs a non-empty last axis");
  const int64_t D = x_.shape().back(), rows = x_.numel() / D;
  MV_CHECK(gamma_.shape() == Shape{D} && beta_.shape() == Shape{D}, "layernorm: x ", x_.str(),
           " needs gamma and beta of shape (", D, "), got ", gamma_.str(), " and ", beta_.str());
  MV_CHECK(eps >= 0.f, "layernorm: eps ", eps, " must be >= 0");
#ifdef MOEVIT_CUDA
  if (gpu) return layernorm_cuda(x_, gamma_, beta_, eps);
#endif
  Tensor x = x_.contiguous(), gamma = gamma_.contiguous(), beta = beta_.contiguous();
  Tensor y = Tensor::empty(x.shape());
  Tensor mean = Tensor::empty({rows}), rstd = Tensor::empty({rows});
  {
    const float *px = x.data<float>(), *pw = gamma.data<float>(), *pb = beta.data<float>();
    float *py = y.data<float>(), *pm = mean.data<float>(), *pr = rstd.data<float>();
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
  }
  const bool gx = x_.requires_grad(), gw = gamma_.requires_grad(), gb = beta_.requires_grad();
  return autograd::record(
      "layernorm", y, {x_, gamma_, beta_},
      [xd = x.detach(), wd = gamma.detach(), mean, rstd, rows, D, gx, gw, gb](const Tensor& g_) {
        Tensor g = g_.contiguous();
        Tensor dx = gx ? Tensor::empty(xd.shape()) : Tensor();
        const float *px = xd.data<float>(), *pw = wd.data<float>(), *pg = g.data<float>();
        const float *pm = mean.data<float>(), *pr = rstd.data<float>();
        float* pdx = gx ? dx.data<float>() : nullptr;
        const bool params = gw || gb;
        const int64_t nblk = std::clamp<int64_t>(rows, 1, 64), per = (rows + nblk - 1) / nblk;
        // Partial sums per block: [blk][0..D) dgamma, [blk][D..2D) dbeta.
        std::vector<float> part(params ? size_t(nblk * 2 * D) : 0, 0.f);
        parallel_for(nblk, per * D * 10, [&](int64_t b, int64_t e) {
          std::vector<float> xhat(static_cast<size_t>(D));
          float* xh = xhat.data();
          for (int64_t blk = b; blk < e; ++blk) {
            float* pgw = params ? part.data() + blk * 2 * D : nullptr;
            float* pgb = params ? pgw + D : nullptr;
            for (int64_t r = blk * per, rend = std::min(rows, r + per); r < rend; ++r) {
              const float *xr = px + r * D, *gr = pg + r * D;
              const float m = pm[r], rs = pr[r];
              for (int64_t j = 0; j < D; ++j) xh[j] = (xr[j] - m) * rs;
              if (params)
                for (int64_t j = 0; j < D; ++j) {
                  pgw[j] += gr[j] * xh[j];
                  pgb[j] += gr[j];
                }
              if (!gx) continue;
              // a = mean(dxhat), c = mean(dxhat * xhat), with dxhat = g * gamma
              const float a = lane_sum(D, [&](int64_t j) { return gr[j] * pw[j]; }) / float(D);
              const float c = lane_sum(D, [&](int64_t j) { return gr[j] * pw[j] * xh[j]; }) / float(D);
              float* dr = pdx + r * D;
              for (int64_t j = 0; j < D; ++j) dr[j] = rs * (gr[j] * pw[j] - a - xh[j] * c);
            }
          }
        });
        Tensor dw, db;
        if (params) {
          dw = Tensor::empty({D});
          db = Tensor::empty({D});
          float *pdw = dw.data<float>(), *pdb = db.data<float>();
          for (int64_t j = 0; j < D; ++j) {
            double sw = 0, sb = 0;  // the few block partials, added in a fixed order
            for (int64_t blk = 0; blk < nblk; ++blk) {
              sw += part[size_t(blk * 2 * D + j)];
              sb += part[size_t(blk * 2 * D + D + j)];
            }
            pdw[j] = float(sw);
            pdb[j] = float(sb);
          }
        }
        return std::vector<Tensor>{dx, gw ? dw : Tensor(), gb ? db : Tensor()};
      });
}

}  // namespace mv::ops
