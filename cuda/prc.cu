// The router-consistency losses on the GPU, twins of ops/prc.cpp: PRC (both diagonal forms) and
// the soft-Jaccard noise-injection loss, forward and backward.
//
// Both are tiny next to the model (PRC is B T E^2 multiply-adds per MoE layer), so the kernels
// aim at two things only: no host round trip (the pair count M, the scale E / M and the loss
// stay on the device) and a fixed summation order, in double as on the CPU, so that a run is
// reproducible bit for bit. No atomics anywhere.
//
// PRC forward, with n = (b, t) -> (b, s = pairs[b, t]) the valid pairs:
//   count     one block counts M (an integer sum: any order gives the same M);
//   partials  a thread per (b, i, j): P_b[i, j] = sum_t p[b, t, i] q[b, s, j], t in order;
//   C         a thread per (i, j): C_ij = (E / M) sum_b P_b[i, j], b in order;
//   D         (reference diagonal) a thread per (t, e): (E / M) sum_b p[b, t, e] q[b, s, e];
//   finish    one block: L_off, L_diag and the loss through a fixed-order tree, then
//             G = (E / M) dL/dC and H = (E / M) dL/dD for the backward (all zero when M = 0).
// PRC backward: a thread per (b, t, i) writes dp = g (H[t] * q_s + G q_s)_i; a thread per
// (b, s, j) sums, over t in order, the contributions of the view-1 tokens paired with s:
// dq = g (H[t] * p_t + G^T p_t)_j. So dq needs no atomics although several t may share one s.
//
// Soft Jaccard: a thread per token sums A = sum_i min(s, s2) and U = sum_i max(s, s2) in double;
// one block averages the tokens' 1 - A / U; the backward is a map over the elements.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace mv::cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

// Sum of v over the block (kThreads threads) in a fixed tree; the result in every thread.
__device__ double block_sum(double v) {
  __shared__ double part[kThreads];
  __syncthreads();  // a previous call's readers are done with part
  part[threadIdx.x] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  return part[0];
}

__global__ void count_pairs_kernel(const int64_t* pairs, int64_t n, int64_t* M) {
  double c = 0;  // exact: counts stay far below 2^53
  for (int64_t i = threadIdx.x; i < n; i += kThreads) c += pairs[i] >= 0;
  c = block_sum(c);
  if (threadIdx.x == 0) *M = int64_t(c);
}

__global__ void prc_partials_kernel(const float* p, const float* q, const int64_t* pairs, double* part,
                                    int64_t B, int64_t T, int64_t E) {
  const int64_t n = B * E * E, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += stride) {
    const int64_t b = k / (E * E), i = (k / E) % E, j = k % E;
    double c = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = pairs[b * T + t];
      if (s >= 0) c += double(p[(b * T + t) * E + i]) * q[(b * T + s) * E + j];
    }
    part[k] = c;
  }
}

__global__ void prc_c_kernel(const double* part, const int64_t* M, double* C, float* Cf, int64_t B, int64_t E) {
  const int64_t ij = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ij >= E * E) return;
  double c = 0;
  if (*M > 0) {
    for (int64_t b = 0; b < B; ++b) c += part[b * E * E + ij];
    c *= double(E) / double(*M);
  }
  C[ij] = c;
  Cf[ij] = float(c);
}

__global__ void prc_d_kernel(const float* p, const float* q, const int64_t* pairs, const int64_t* M, double* D,
                             int64_t B, int64_t T, int64_t E) {
  const int64_t te = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (te >= T * E) return;
  const int64_t t = te / E, e = te % E;
  double d = 0;
  if (*M > 0) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t s = pairs[b * T + t];
      if (s >= 0) d += double(p[(b * T + t) * E + e]) * q[(b * T + s) * E + e];
    }
    d *= double(E) / double(*M);
  }
  D[te] = d;
}

// One block: the terms, the loss, G and H (see the top of the file and ops/prc.cpp).
__global__ void prc_finish_kernel(const double* C, const double* D, const int64_t* M, float wd, float wo, int64_t T,
                                  int64_t E, float* loss, float* terms, float* G, float* H) {
  const bool ref = D != nullptr, any = *M > 0;
  double off = 0, diag = 0;
  for (int64_t k = threadIdx.x; k < E * E; k += kThreads) {
    const double c = C[k];
    if (k / E != k % E) off += c * c;
    else if (!ref) diag += (c - 1) * (c - 1);
  }
  if (ref)
    for (int64_t k = threadIdx.x; k < T * E; k += kThreads) diag += (D[k] - 1) * (D[k] - 1);
  off = block_sum(off);
  diag = block_sum(diag);
  const double l_off = any && E > 1 ? off / double(E * (E - 1)) : 0.0;
  const double l_diag = any ? diag / double(ref ? T * E : E) : 0.0;
  if (threadIdx.x == 0) {
    loss[0] = float(double(wd) * l_diag + double(wo) * l_off);
    terms[0] = float(l_diag), terms[1] = float(l_off);
  }
  const double scale = any ? double(E) / double(*M) : 0.0;
  for (int64_t k = threadIdx.x; k < E * E; k += kThreads) {
    const double c = C[k];
    double g = 0;
    if (k / E != k % E) g = E > 1 ? double(wo) * 2 * c / double(E * (E - 1)) : 0.0;
    else if (!ref) g = double(wd) * 2 * (c - 1) / double(E);
    G[k] = float(scale * g);
  }
  if (ref)
    for (int64_t k = threadIdx.x; k < T * E; k += kThreads) H[k] = float(scale * double(wd) * 2 * (D[k] - 1) / double(T * E));
}

__global__ void prc_dp_kernel(const float* dloss, const float* q, const int64_t* pairs, const float* G, const float* H,
                              float* dp, int64_t B, int64_t T, int64_t E) {
  const int64_t n = B * T * E, stride = int64_t(gridDim.x) * blockDim.x;
  const double k = *dloss;
  for (int64_t x = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; x < n; x += stride) {
    const int64_t bt = x / E, i = x % E, t = bt % T, s = pairs[bt];
    if (s < 0) {
      dp[x] = 0.f;
      continue;
    }
    const float* qv = q + (bt - t + s) * E;
    double a = H ? double(H[t * E + i]) * qv[i] : 0.0;
    for (int64_t j = 0; j < E; ++j) a += double(G[i * E + j]) * qv[j];
    dp[x] = float(k * a);
  }
}

__global__ void prc_dq_kernel(const float* dloss, const float* p, const int64_t* pairs, const float* G, const float* H,
                              float* dq, int64_t B, int64_t T, int64_t E) {
  const int64_t n = B * T * E, stride = int64_t(gridDim.x) * blockDim.x;
  const double k = *dloss;
  for (int64_t x = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; x < n; x += stride) {
    const int64_t bs = x / E, j = x % E, s = bs % T, b = bs / T;
    float out = 0.f;
    for (int64_t t = 0; t < T; ++t) {
      if (pairs[b * T + t] != s) continue;
      const float* pv = p + (b * T + t) * E;
      double a = H ? double(H[t * E + j]) * pv[j] : 0.0;
      for (int64_t i = 0; i < E; ++i) a += double(G[i * E + j]) * pv[i];
      out += float(k * a);
    }
    dq[x] = out;
  }
}

__global__ void jaccard_sums_kernel(const float* a, const float* b, float* A, float* U, double* loss, int64_t N,
                                    int64_t E) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += stride) {
    double s_min = 0, s_max = 0;
    for (int64_t i = n * E; i < (n + 1) * E; ++i) {
      s_min += a[i] < b[i] ? a[i] : b[i];
      s_max += a[i] < b[i] ? b[i] : a[i];
    }
    A[n] = float(s_min), U[n] = float(s_max);
    loss[n] = s_max != 0 ? 1 - s_min / s_max : 0.0;
  }
}

__global__ void mean_kernel(const double* v, int64_t n, float* out) {
  double s = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += v[i];
  s = block_sum(s);
  if (threadIdx.x == 0) *out = float(s / double(n));
}

__global__ void jaccard_grad_kernel(const float* dloss, const float* a, const float* b, const float* A, const float* U,
                                    float* da, float* db, int64_t N, int64_t E) {
  const int64_t n = N * E, stride = int64_t(gridDim.x) * blockDim.x;
  const double k = -double(*dloss) / double(N);  // d(1 - J)/d. = -dJ/d., mean over N
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t t = i / E;
    const double u = U[t];
    const double in_min = u != 0 ? k / u : 0.0, in_max = u != 0 ? -k * double(A[t]) / (u * u) : 0.0;
    const double tie = 0.5 * (in_min + in_max);
    if (da) da[i] = float(a[i] < b[i] ? in_min : a[i] > b[i] ? in_max : tie);
    if (db) db[i] = float(a[i] < b[i] ? in_max : a[i] > b[i] ? in_min : tie);
  }
}


// A scratch buffer of n doubles (as I64 storage: the same eight bytes).
Tensor doubles(int64_t n) { return Tensor::empty({n}, DType::I64, Device::CUDA); }
double* as_doubles(const Tensor& t) { return reinterpret_cast<double*>(t.raw()); }

unsigned blocks_for(int64_t n) { return unsigned(detail::ceil_div(std::max<int64_t>(n, 1), kThreads)); }

}  // namespace

PrcOut prc_forward(const char* op, const Tensor& p_, const Tensor& q_, const Tensor& pairs_, const ops::PrcOptions& opt) {
  const Tensor p = p_.contiguous(), q = q_.contiguous(), pairs = pairs_.contiguous();
  expect_cuda_f32(op, "p", p);
  expect_cuda_f32(op, "q", q);
  const int64_t B = p.size(0), T = p.size(1), E = p.size(2);
  const bool ref = opt.reference_diagonal;
  PrcOut o{device_empty({}), device_empty({2}), device_empty({E, E}), device_empty({E, E}),
           ref ? device_empty({T, E}) : Tensor()};
  const Tensor M = Tensor::empty({}, DType::I64, Device::CUDA), part = doubles(B * E * E), C = doubles(E * E);
  const Tensor D = ref ? doubles(T * E) : Tensor();
  const int64_t* pr = pairs.data<int64_t>();
  count_pairs_kernel<<<1, kThreads, 0, stream()>>>(pr, B * T, M.data<int64_t>());
  if (B * E * E > 0)
    prc_partials_kernel<<<grid_for(B * E * E, kThreads), kThreads, 0, stream()>>>(
        p.data<float>(), q.data<float>(), pr, as_doubles(part), B, T, E);
  prc_c_kernel<<<blocks_for(E * E), kThreads, 0, stream()>>>(as_doubles(part), M.data<int64_t>(), as_doubles(C),
                                                              o.C.data<float>(), B, E);
  if (ref)
    prc_d_kernel<<<blocks_for(T * E), kThreads, 0, stream()>>>(p.data<float>(), q.data<float>(), pr,
                                                                M.data<int64_t>(), as_doubles(D), B, T, E);
  prc_finish_kernel<<<1, kThreads, 0, stream()>>>(as_doubles(C), ref ? as_doubles(D) : nullptr, M.data<int64_t>(),
                                                  opt.diag_weight, opt.off_weight, T, E, o.loss.data<float>(),
                                                  o.terms.data<float>(), o.G.data<float>(),
                                                  ref ? o.H.data<float>() : nullptr);
  MV_CUDA_LAUNCH_CHECK();
  return o;
}

PairGrads prc_backward(const Tensor& dloss, const Tensor& p_, const Tensor& q_, const Tensor& pairs_, const Tensor& G,
                       const Tensor& H, bool need_p, bool need_q) {
  const Tensor p = p_.contiguous(), q = q_.contiguous(), pairs = pairs_.contiguous(), g = dloss.contiguous();
  expect_cuda_f32("prc_backward", "dloss", g);
  expect_cuda_f32("prc_backward", "G", G);
  const int64_t B = p.size(0), T = p.size(1), E = p.size(2), n = B * T * E;
  PairGrads o{need_p ? device_empty(p.shape()) : Tensor(), need_q ? device_empty(q.shape()) : Tensor()};
  const float* ph = H.defined() ? H.data<float>() : nullptr;
  if (n == 0) return o;
  if (need_p)
    prc_dp_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(g.data<float>(), q.data<float>(),
                                                                    pairs.data<int64_t>(), G.data<float>(), ph,
                                                                    o.da.data<float>(), B, T, E);
  if (need_q)
    prc_dq_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(g.data<float>(), p.data<float>(),
                                                                    pairs.data<int64_t>(), G.data<float>(), ph,
                                                                    o.db.data<float>(), B, T, E);
  MV_CUDA_LAUNCH_CHECK();
  return o;
}

JaccardOut soft_jaccard_forward(const Tensor& s_, const Tensor& s2_) {
  const Tensor s = s_.contiguous(), s2 = s2_.contiguous();
  expect_cuda_f32("soft_jaccard_forward", "s", s);
  expect_cuda_f32("soft_jaccard_forward", "s2", s2);
  const int64_t E = s.shape().back(), N = s.numel() / E;
  JaccardOut o{device_empty({}), device_empty({N}), device_empty({N})};
  const Tensor loss = doubles(N);
  jaccard_sums_kernel<<<grid_for(N, kThreads), kThreads, 0, stream()>>>(s.data<float>(), s2.data<float>(),
                                                                        o.A.data<float>(), o.U.data<float>(),
                                                                        as_doubles(loss), N, E);
  mean_kernel<<<1, kThreads, 0, stream()>>>(as_doubles(loss), N, o.loss.data<float>());
  MV_CUDA_LAUNCH_CHECK();
  return o;
}

PairGrads soft_jaccard_backward(const Tensor& dloss, const Tensor& s_, const Tensor& s2_, const Tensor& A,
                                const Tensor& U, bool need_a, bool need_b) {
  const Tensor s = s_.contiguous(), s2 = s2_.contiguous(), g = dloss.contiguous();
  expect_cuda_f32("soft_jaccard_backward", "dloss", g);
  const int64_t E = s.shape().back(), N = s.numel() / E;
  PairGrads o{need_a ? device_empty(s.shape()) : Tensor(), need_b ? device_empty(s.shape()) : Tensor()};
  if (N * E == 0) return o;
  jaccard_grad_kernel<<<grid_for(N * E, kThreads), kThreads, 0, stream()>>>(
      g.data<float>(), s.data<float>(), s2.data<float>(), A.data<float>(), U.data<float>(),
      need_a ? o.da.data<float>() : nullptr, need_b ? o.db.data<float>() : nullptr, N, E);
  MV_CUDA_LAUNCH_CHECK();
  return o;
}

}  // namespace mv::cuda
