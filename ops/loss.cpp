// Losses; cross-entropy's CUDA twin is cuda/loss.cu. Per-row (or per-chunk) partial results go to separate slots and are summed in order
// afterwards, so the value does not depend on the thread count.
#include "ops/loss.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/dispatch.h"
#include "ops/elementwise.h"

namespace mv::cpu {

// logits: (N, C), labels: I64 (N,), both contiguous -> the mean loss (summed in double), the
// rows' losses and log-sum-exps:
//   loss_n = lse_n - sum_j t_j x_nj,  lse_n = log(sum_j exp(x_nj)),  t = (1 - s) onehot(y) + s / C
ops::CrossEntropyOut cross_entropy_forward(const Tensor& logits, const Tensor& labels, float ls) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const int64_t* py = labels.data<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    MV_CHECK(py[n] >= 0 && py[n] < C, "cross_entropy: label ", py[n], " in row ", n,
             " is outside [0, ", C, ")");
  const float* px = logits.data<float>();
  ops::CrossEntropyOut o{Tensor(), Tensor::empty({N}), Tensor::empty({N})};
  float *pl = o.lse.data<float>(), *pr = o.row_loss.data<float>();
  std::vector<double> row_loss(static_cast<size_t>(N));
  const double on = 1.0 - double(ls), off = double(ls) / double(C);
  parallel_for(N, C * 8, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const float* xr = px + n * C;
      float m = xr[0];
      for (int64_t j = 1; j < C; ++j) m = std::max(m, xr[j]);
      double s = 0, sx = 0;
      for (int64_t j = 0; j < C; ++j) {
        s += std::exp(xr[j] - m);
        sx += xr[j];
      }
      const double l = double(m) + std::log(s);
      pl[n] = float(l);
      row_loss[size_t(n)] = l - on * xr[py[n]] - off * sx;
      pr[n] = float(row_loss[size_t(n)]);
    }
  });
  double total = 0;
  for (double v : row_loss) total += v;
  o.loss = Tensor::scalar(float(total / double(N)));
  return o;
}

// d mean_n(loss_n) / dx_nj = dloss (softmax(x_n)_j - t_j) / N
Tensor cross_entropy_backward(const Tensor& logits, const Tensor& labels, const Tensor& lse, float ls,
                              const Tensor& dloss) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const float scale = dloss.item() / float(N);
  Tensor gx = Tensor::empty({N, C});
  const float *px = logits.data<float>(), *pl = lse.data<float>();
  const int64_t* py = labels.data<int64_t>();
  float* po = gx.data<float>();
  const float fon = float(1.0 - double(ls)), foff = float(double(ls) / double(C));
  parallel_for(N, C * 8, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      for (int64_t j = 0; j < C; ++j) {
        const float t = foff + (j == py[n] ? fon : 0.f);
        po[n * C + j] = (std::exp(px[n * C + j] - pl[n]) - t) * scale;
      }
  });
  return gx;
}

// a, b: same shape, contiguous -> mean((a - b)^2): (), summed in fixed chunks (the same for any
// thread count)
Tensor mse_forward(const Tensor& a, const Tensor& b) {
  const int64_t n = a.numel();
  const float *pa = a.data<float>(), *pb = b.data<float>();
  constexpr int64_t kChunk = 1 << 14;
  const int64_t nc = (n + kChunk - 1) / kChunk;
  std::vector<double> part(static_cast<size_t>(nc));
  parallel_for(nc, std::min(n, kChunk) * 3, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      double s = 0;
      for (int64_t i = c * kChunk, e = std::min(n, i + kChunk); i < e; ++i) {
        const double d = double(pa[i]) - pb[i];
        s += d * d;
      }
      part[size_t(c)] = s;
    }
  });
  double total = 0;
  for (double v : part) total += v;
  return Tensor::scalar(float(total / double(n)));
}

// d mean((a - b)^2) / da = 2 (a - b) / n times dloss (the gradient to b is its negation)
Tensor mse_backward(const Tensor& a, const Tensor& b, const Tensor& dloss) {
  const int64_t n = a.numel();
  const float k = 2.f * dloss.item() / float(n);
  Tensor da = Tensor::empty(a.shape());
  const float *pa = a.data<float>(), *pb = b.data<float>();
  float* pd = da.data<float>();
  parallel_for(n, 2, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) pd[i] = k * (pa[i] - pb[i]);
  });
  return da;
}

}  // namespace mv::cpu

namespace mv::ops {

Tensor cross_entropy(const Tensor& logits_, const Tensor& labels_, float ls) {
  const OpDevice dev = device_of("cross_entropy", {&logits_, &labels_});
  expect_f32("cross_entropy", {&logits_});
  MV_CHECK(labels_.defined() && labels_.dtype() == DType::I64,
           "cross_entropy: labels must be an I64 tensor on the logits' device, got ", labels_.str());
  MV_CHECK(logits_.ndim() == 2 && logits_.size(0) > 0 && logits_.size(1) > 0,
           "cross_entropy: logits ", logits_.str(), " must be (N, C) with N, C > 0");
  const int64_t N = logits_.size(0);
  MV_CHECK(labels_.shape() == Shape{N}, "cross_entropy: labels ", labels_.str(),
           " must be (N,) = (", N, ") for logits ", logits_.str());
  MV_CHECK(ls >= 0.f && ls <= 1.f, "cross_entropy: label_smoothing ", ls, " is outside [0, 1]");
  const Tensor x = logits_.contiguous(), labels = labels_.contiguous();
  CrossEntropyOut f = MV_KERNEL(cross_entropy_forward)(dev, x, labels, ls);
  return autograd::record("cross_entropy", f.loss, {logits_},
                          [dev, xd = x.detach(), labels, lse = f.lse, ls](const Tensor& g) {
                            return std::vector<Tensor>{
                                MV_KERNEL(cross_entropy_backward)(dev, xd, labels, lse, ls, g.contiguous())};
                          });
}

Tensor mse(const Tensor& a_, const Tensor& b_) {
  const OpDevice dev = device_of("mse", {&a_, &b_});
  expect_f32("mse", {&a_, &b_});
  MV_CHECK(a_.shape() == b_.shape(), "mse: shapes ", shape_str(a_.shape()), " and ",
           shape_str(b_.shape()), " differ; expected the same shape");
  MV_CHECK(a_.numel() > 0, "mse: empty inputs ", a_.str());
  const Tensor a = a_.contiguous(), b = b_.contiguous();
  const Tensor out = MV_CPU_KERNEL(mse_forward)(dev, a, b);
  const bool ga = a_.requires_grad(), gb = b_.requires_grad();
  return autograd::record("mse", out, {a_, b_}, [dev, ad = a.detach(), bd = b.detach(), ga, gb](const Tensor& g) {
    const Tensor da = MV_CPU_KERNEL(mse_backward)(dev, ad, bd, g);
    return std::vector<Tensor>{ga ? da : Tensor(), gb ? neg(da) : Tensor()};
  });
}

}  // namespace mv::ops
