// Losses. Per-row (or per-chunk) partial results go to separate slots and are summed in order
// afterwards, so the value does not depend on the thread count.
#include "ops/loss.h"

#include <algorithm>
#include <cmath>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"

#ifdef MOEVIT_CUDA
#include "cuda/kernels.h"
#endif

namespace mv::ops {

// loss_n = lse_n - sum_j t_j x_nj with lse = log(sum_j exp(x_nj)), sum_j t_j = 1;
// dloss/dx_nj = (softmax(x_n)_j - t_j) / N
Tensor cross_entropy(const Tensor& logits_, const Tensor& labels_, float ls) {
  const bool gpu = on_cuda("cross_entropy", {&logits_, &labels_});
  if (!gpu) expect_cpu_f32("cross_entropy", {&logits_});
  MV_CHECK(labels_.defined() && labels_.dtype() == DType::I64,
           "cross_entropy: labels must be an I64 tensor on the logits' device, got ", labels_.str());
  MV_CHECK(logits_.ndim() == 2 && logits_.size(0) > 0 && logits_.size(1) > 0,
           "cross_entropy: logits ", logits_.str(), " must be (N, C) with N, C > 0");
  const int64_t N = logits_.size(0), C = logits_.size(1);
  MV_CHECK(labels_.shape() == Shape{N}, "cross_entropy: labels ", labels_.str(),
           " must be (N,) = (", N, ") for logits ", logits_.str());
  MV_CHECK(ls >= 0.f && ls <= 1.f, "cross_entropy: label_smoothing ", ls, " is outside [0, 1]");
#ifdef MOEVIT_CUDA
  if (gpu) {  // labels are not range-checked on the GPU (no host sync): a bad label gives NaN
    const Tensor x = logits_.contiguous(), labels = labels_.contiguous();
    cuda::CrossEntropyOut f = cuda::cross_entropy_forward(x, labels, ls);
    Tensor out = cuda::sum_all(f.loss, 1.f / float(N));  // the mean over rows
    if (!autograd::needs_graph({logits_})) return out;
    return autograd::record("cross_entropy", out, {logits_},
                            [xd = x.detach(), labels, lse = f.lse, ls](const Tensor& g) {
                              return std::vector<Tensor>{
                                  cuda::cross_entropy_backward(xd, labels, lse, ls, g.contiguous())};
                            });
  }
#endif
  Tensor x = logits_.contiguous(), labels = labels_.contiguous();
  const int64_t* py = labels.data<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    MV_CHECK(py[n] >= 0 && py[n] < C, "cross_entropy: label ", py[n], " in row ", n,
             " is outside [0, ", C, ")");
  const float* px = x.data<float>();
  Tensor lse = Tensor::empty({N});
  float* pl = lse.data<float>();
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
    }
  });
  double total = 0;
  for (double v : row_loss) total += v;
  Tensor out = Tensor::scalar(float(total / double(N)));
  return autograd::record(
      "cross_entropy", out, {logits_},
      [xd = x.detach(), labels, lse, N, C, on, off](const Tensor& g) {
        const float scale = g.item() / float(N);
        Tensor gx = Tensor::empty({N, C});
        const float *px = xd.data<float>(), *pl = lse.data<float>();
        const int64_t* py = labels.data<int64_t>();
        float* po = gx.data<float>();
        const float fon = float(on), foff = float(off);
        parallel_for(N, C * 8, [&](int64_t b, int64_t e) {
          for (int64_t n = b; n < e; ++n)
            for (int64_t j = 0; j < C; ++j) {
              const float t = foff + (j == py[n] ? fon : 0.f);
              po[n * C + j] = (std::exp(px[n * C + j] - pl[n]) - t) * scale;
            }
        });
        return std::vector<Tensor>{gx};
      });
}

// d mean((a - b)^2) = (2 (a - b) / n, -2 (a - b) / n) times g
Tensor mse(const Tensor& a_, const Tensor& b_) {
  expect_cpu_f32("mse", {&a_, &b_});
  MV_CHECK(a_.shape() == b_.shape(), "mse: shapes ", shape_str(a_.shape()), " and ",
           shape_str(b_.shape()), " differ; expected the same shape");
  MV_CHECK(a_.numel() > 0, "mse: empty inputs ", a_.str());
  Tensor a = a_.contiguous(), b = b_.contiguous();
  const int64_t n = a.numel();
  const float *pa = a.data<float>(), *pb = b.data<float>();
  constexpr int64_t kChunk = 1 << 14;  // fixed chunks: the sum is the same for any thread count
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
  Tensor out = Tensor::scalar(float(total / double(n)));
  const bool ga = a_.requires_grad(), gb = b_.requires_grad();
  return autograd::record("mse", out, {a_, b_},
                          [ad = a.detach(), bd = b.detach(), n, ga, gb](const Tensor& g) {
    const float k = 2.f * g.item() / float(n);
    Tensor da = Tensor::empty(ad.shape());
    const float *pa = ad.data<float>(), *pb = bd.data<float>();
    float* pd = da.data<float>();
    parallel_for(n, 2, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) pd[i] = k * (pa[i] - pb[i]);
    });
    Tensor db;
    if (gb) {
      db = Tensor::empty(bd.shape());
      float* q = db.data<float>();
      parallel_for(n, 1, [&](int64_t s, int64_t e) {
        for (int64_t i = s; i < e; ++i) q[i] = -pd[i];
      });
    }
    return std::vector<Tensor>{ga ? da : Tensor(), db};
  });
}

}  // namespace mv::ops
