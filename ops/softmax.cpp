// Softmax along the last axis: one pass for the row max, one for exp and the sum, one to scale.
// Rows are independent, so the loops split over rows. exp is fast_exp and the sum runs in 8
// float lanes (ops/fast_math.h), so both loops vectorise: libm's expf, one call per element,
// made the routers' softmax over 8 experts cost 1.6 ns per element (docs/benchmarks.md).
#include "ops/softmax.h"

#include <cmath>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"
#include "ops/fast_math.h"

#ifdef MOEVIT_CUDA
#include "cuda/kernels.h"
#endif

namespace mv::ops {

namespace {

// Fills y with softmax (log_form = false) or log-softmax (true) of rows of x: (rows, C).
void softmax_rows(const float* x, float* y, int64_t rows, int64_t C, bool log_form) {
  parallel_for(rows, C * 8, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* xr = x + r * C;
      float* yr = y + r * C;
      float m = xr[0];
      for (int64_t j = 1; j < C; ++j) m = xr[j] > m ? xr[j] : m;
      if (log_form) {
        const float lse = m + std::log(lane_sum(C, [&](int64_t j) { return fast_exp(xr[j] - m); }));
        for (int64_t j = 0; j < C; ++j) yr[j] = xr[j] - lse;
      } else {
        for (int64_t j = 0; j < C; ++j) yr[j] = fast_exp(xr[j] - m);
        const float inv = 1.f / lane_sum(C, [&](int64_t j) { return yr[j]; });
        for (int64_t j = 0; j < C; ++j) yr[j] *= inv;
      }
    }
  });
}

// Checks x, returns its contiguous form and the row count.
Tensor prepare(const char* op, const Tensor& x, int64_t& rows, int64_t& C) {
  expect_cpu_f32(op, {&x});
  MV_CHECK(x.ndim() >= 1, op, ": needs at least one axis, got ", x.str());
  C = x.shape().back();
  rows = C == 0 ? 0 : x.numel() / C;
  return x.contiguous();
}

}  // namespace

// dx = y * (g - sum(g * y)) per row
Tensor softmax(const Tensor& x_) {
#ifdef MOEVIT_CUDA
  if (on_cuda("softmax", {&x_})) {
    MV_CHECK(x_.ndim() >= 1, "softmax: needs at least one axis, got ", x_.str());
    Tensor y = cuda::softmax_forward(x_.contiguous());
    if (!autograd::needs_graph({x_})) return y;
    return autograd::record("softmax", y, {x_}, [yd = y.detach()](const Tensor& g) {
      return std::vector<Tensor>{cuda::softmax_backward(yd, g.contiguous())};
    });
  }
#endif
  int64_t rows, C;
  Tensor x = prepare("softmax", x_, rows, C);
  Tensor y = Tensor::empty(x.shape());
  softmax_rows(x.data<float>(), y.data<float>(), rows, C, false);
  return autograd::record("softmax", y, {x_}, [yd = y.detach(), rows, C](const Tensor& g_) {
    Tensor g = g_.contiguous();
    Tensor gx = Tensor::empty(yd.shape());
    const float *pg = g.data<float>(), *py = yd.data<float>();
    float* po = gx.data<float>();
    parallel_for(rows, C * 4, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float *gr = pg + r * C, *yr = py + r * C;
        double dot = 0;
        for (int64_t j = 0; j < C; ++j) dot += double(gr[j]) * yr[j];
        const float d = float(dot);
        for (int64_t j = 0; j < C; ++j) po[r * C + j] = yr[j] * (gr[j] - d);
      }
    });
    return std::vector<Tensor>{gx};
  });
}

// dx = g - softmax * sum(g) per row, softmax = exp(y)
Tensor log_softmax(const Tensor& x_) {
  int64_t rows, C;
  Tensor x = prepare("log_softmax", x_, rows, C);
  Tensor y = Tensor::empty(x.shape());
  softmax_rows(x.data<float>(), y.data<float>(), rows, C, true);
  return autograd::record("log_softmax", y, {x_}, [yd = y.detach(), rows, C](const Tensor& g_) {
    Tensor g = g_.contiguous();
    Tensor gx = Tensor::empty(yd.shape());
    const float *pg = g.data<float>(), *py = yd.data<float>();
    float* po = gx.data<float>();
    parallel_for(rows, C * 8, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float *gr = pg + r * C, *yr = py + r * C;
        double s = 0;
        for (int64_t j = 0; j < C; ++j) s += gr[j];
        const float sg = float(s);
        for (int64_t j = 0; j < C; ++j) po[r * C + j] = gr[j] - std::exp(yr[j]) * sg;
      }
    });
    return std::vector<Tensor>{gx};
  });
}

}  // namespace mv::ops
