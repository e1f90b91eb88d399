// Softmax along the last axis: one pass for the row max, one for exp and the sum, one to scale.
// Rows are independent, so the loops split over rows. exp is fast_exp and the sum runs in 8
// float lanes (ops/fast_math.h), so both loops vectorise: libm's expf, one call per element,
// made the routers' softmax over 8 experts cost 1.6 ns per element (docs/benchmarks.md).
#include "ops/softmax.h"

#include <cmath>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"
#include "ops/dispatch.h"
#include "ops/fast_math.h"

namespace mv::cpu {

using ops::fast_exp;
using ops::lane_sum;

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

int64_t width(const Tensor& x) { return x.shape().back(); }
int64_t rows_of(const Tensor& x) { return width(x) == 0 ? 0 : x.numel() / width(x); }

// dx of rows of y (the softmax, or the log-softmax with log_form) and dy: (rows, C):
//   softmax: dx = y * (dy - sum(dy * y));  log-softmax: dx = dy - exp(y) * sum(dy)
Tensor rows_backward(const Tensor& y, const Tensor& dy, bool log_form) {
  const int64_t rows = rows_of(y), C = width(y);
  Tensor g = dy.contiguous();
  Tensor gx = Tensor::empty(y.shape());
  const float *pg = g.data<float>(), *py = y.data<float>();
  float* po = gx.data<float>();
  parallel_for(rows, C * (log_form ? 8 : 4), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float *gr = pg + r * C, *yr = py + r * C;
      float* dr = po + r * C;
      double s = 0;
      if (log_form) {
        for (int64_t j = 0; j < C; ++j) s += gr[j];
        const float sg = float(s);
        for (int64_t j = 0; j < C; ++j) dr[j] = gr[j] - std::exp(yr[j]) * sg;
      } else {
        for (int64_t j = 0; j < C; ++j) s += double(gr[j]) * yr[j];
        const float d = float(s);
        for (int64_t j = 0; j < C; ++j) dr[j] = yr[j] * (gr[j] - d);
      }
    }
  });
  return gx;
}

}  // namespace

// x: (..., C) contiguous -> softmax over the last axis: (..., C)
Tensor softmax_forward(const Tensor& x) {
  Tensor y = Tensor::empty(x.shape());
  softmax_rows(x.data<float>(), y.data<float>(), rows_of(x), width(x), false);
  return y;
}
// y, dy: (..., C) -> dx = y * (dy - sum(dy * y)) per row
Tensor softmax_backward(const Tensor& y, const Tensor& dy) { return rows_backward(y, dy, false); }

// x: (..., C) contiguous -> log-softmax over the last axis: (..., C)
Tensor log_softmax_forward(const Tensor& x) {
  Tensor y = Tensor::empty(x.shape());
  softmax_rows(x.data<float>(), y.data<float>(), rows_of(x), width(x), true);
  return y;
}
// y (the log-softmax), dy: (..., C) -> dx = dy - softmax * sum(dy) per row, softmax = exp(y)
Tensor log_softmax_backward(const Tensor& y, const Tensor& dy) { return rows_backward(y, dy, true); }

}  // namespace mv::cpu

namespace mv::ops {

namespace {

OpDevice check_rows(const char* op, const Tensor& x) {
  const OpDevice dev = device_of(op, {&x});
  expect_f32(op, {&x});
  MV_CHECK(x.ndim() >= 1, op, ": needs at least one axis, got ", x.str());
  return dev;
}

}  // namespace

Tensor softmax(const Tensor& x) {
  const OpDevice dev = check_rows("softmax", x);
  Tensor y = MV_KERNEL(softmax_forward)(dev, x.contiguous());
  return autograd::record("softmax", y, {x}, [dev, yd = y.detach()](const Tensor& g) {
    return std::vector<Tensor>{MV_KERNEL(softmax_backward)(dev, yd, g.contiguous())};
  });
}

Tensor log_softmax(const Tensor& x) {
  const OpDevice dev = check_rows("log_softmax", x);
  Tensor y = MV_CPU_KERNEL(log_softmax_forward)(dev, x.contiguous());
  return autograd::record("log_softmax", y, {x}, [dev, yd = y.detach()](const Tensor& g) {
    return std::vector<Tensor>{MV_CPU_KERNEL(log_softmax_backward)(dev, yd, g.contiguous())};
  });
}

}  // namespace mv::ops
