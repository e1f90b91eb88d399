// Matrix products; their CUDA twin is cuda/matmul.cu (cuBLAS). On the CPU: tile_gemm
// (ops/tile_gemm.h) for the narrow ones, Eigen's GEMM for those large on every side.
//
// Every operand is described as a Mat (pointer, leading dimension, transposed flag) over the
// tensor's own memory: row-major when the last dim has stride 1, column-major when the
// second-to-last has (a transposed view). Eigen takes either as a Map and tile_gemm reads A
// through strides, so neither copies, except a transposed B for tile_gemm (a layer's weight,
// small: gemm_serial). Only other strided layouts are made contiguous first. Outputs are
// contiguous row-major.
//
// Threading is ours, not Eigen's (EIGEN_DONT_PARALLELIZE): one product is cut into one block
// of output rows (or columns) per thread, each an independent serial GEMM, so a product
// costs one fork-join; deep, narrow products (weight gradients) are cut by depth instead, and
// their partial results summed. Eigen's own threading (threads sync once per depth block)
// measured slower at 2 threads on most shapes in bench/gemm, up to 1.4x (docs/benchmarks.md).
// Many small products (a batch of 512 50x16x50 products, as in the composite attention) run
// whole products per thread instead.
#include "ops/matmul.h"

// Eigen 3.4's AVX code trips -Wunused-variable where its templates are instantiated (here), and
// with AVX-512 GCC 12's own _mm512_undefined_ps trips -Wmaybe-uninitialized inside Eigen.
#pragma GCC diagnostic ignored "-Wunused-variable"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define EIGEN_DONT_PARALLELIZE
#include <Eigen/Core>
#include <algorithm>
#include <cstring>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/dispatch.h"
#include "ops/tile_gemm.h"

namespace mv::cpu {

using ops::tile_gemm;

namespace {

// A logical matrix: element (i, j) at p[i * ld + j], or at p[j * ld + i] when t (transposed).
struct Mat {
  const float* p;
  int64_t ld;
  bool t;
};
Mat trans(Mat m) {
  m.t = !m.t;
  return m;
}
Mat at(Mat m, int64_t offset) {
  m.p += offset;
  return m;
}

template <int OA, int OB>
void gemm_eigen(int64_t M, int64_t N, int64_t K, Mat a, Mat b, float* c, int64_t ldc, bool acc) {
  using Eigen::Dynamic, Eigen::Map, Eigen::Matrix, Eigen::OuterStride, Eigen::Unaligned;
  Map<const Matrix<float, Dynamic, Dynamic, OA>, Unaligned, OuterStride<>> ma(a.p, M, K, OuterStride<>(a.ld));
  Map<const Matrix<float, Dynamic, Dynamic, OB>, Unaligned, OuterStride<>> mb(b.p, K, N, OuterStride<>(b.ld));
  Map<Matrix<float, Dynamic, Dynamic, Eigen::RowMajor>, Unaligned, OuterStride<>> mc(c, M, N, OuterStride<>(ldc));
  if (acc)
    mc.noalias() += ma * mb;
  else
    mc.noalias() = ma * mb;
}

// One thread: c (M x N, row stride ldc) = a b, or += when acc. Products with a side of at most
// kNarrow (every layer of the presets up to 384 wide, whose token side is in the thousands) go
// through tile_gemm, which packs nothing: at these shapes packing costs about what the
// arithmetic does. tile_gemm reads B by rows, so a transposed B (a weight in dx = dy w^T) is
// first copied into a per-thread buffer. Products large on every side go to Eigen, whose
// packed, cache-blocked operands then pay for themselves. bf16: tile_gemm's bfloat16 products
// (Eigen's stay FP32).
constexpr int64_t kNarrow = 256;
void gemm_serial(int64_t M, int64_t N, int64_t K, Mat a, Mat b, float* c, int64_t ldc, bool acc, bool bf16) {
  if (std::min({M, N, K}) <= kNarrow && (!b.t || K * N <= kNarrow * kNarrow * 4)) {
    const float* pb = b.p;
    int64_t ldb = b.ld;
    if (b.t) {
      thread_local std::vector<float> bt;
      bt.resize(size_t(K * N));
      for (int64_t j = 0; j < N; ++j)
        for (int64_t k = 0; k < K; ++k) bt[size_t(k * N + j)] = b.p[j * b.ld + k];
      pb = bt.data(), ldb = N;
    }
    tile_gemm(M, N, K, a.p, a.t ? 1 : a.ld, a.t ? a.ld : 1, pb, ldb, c, ldc, acc, bf16);
    return;
  }
  constexpr int R = Eigen::RowMajor, C = Eigen::ColMajor;
  if (!a.t && !b.t) gemm_eigen<R, R>(M, N, K, a, b, c, ldc, acc);
  else if (!a.t && b.t) gemm_eigen<R, C>(M, N, K, a, b, c, ldc, acc);
  else if (a.t && !b.t) gemm_eigen<C, R>(M, N, K, a, b, c, ldc, acc);
  else gemm_eigen<C, C>(M, N, K, a, b, c, ldc, acc);
}

// a from row r0 on; b from column c0 on.
Mat rows_of(Mat a, int64_t r0) { return at(a, a.t ? r0 : r0 * a.ld); }
Mat cols_of(Mat b, int64_t c0) { return at(b, b.t ? c0 * b.ld : c0); }

// Deep, narrow products (weight gradients: K counts tokens, M and N are layer widths): thread i
// multiplies depth slice i into its own partial result, and the partials are summed at the end.
// Cutting M or N instead would make every thread pack and read the whole of one operand.
void gemm_split_depth(int64_t M, int64_t N, int64_t K, Mat a, Mat b, float* c, bool acc, bool bf16) {
  const int64_t T = num_threads(), kb = (K + T - 1) / T;
  std::vector<float> part(size_t((T - 1) * M * N));  // thread 0 writes into c itself
  parallel_for(T, 2 * M * N * kb, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) {
      const int64_t k0 = std::min(K, i * kb), k1 = std::min(K, k0 + kb);
      float* dst = i == 0 ? c : part.data() + (i - 1) * M * N;
      const bool add = i == 0 && acc;
      if (k1 > k0)
        gemm_serial(M, N, k1 - k0, cols_of(a, k0), rows_of(b, k0), dst, N, add, bf16);
      else if (!add)
        std::fill(dst, dst + M * N, 0.f);
    }
  });
  for (int64_t i = 1; i < T; ++i)
    for (int64_t j = 0; j < M * N; ++j) c[j] += part[size_t((i - 1) * M * N + j)];
}

// c (M x N, contiguous row-major) = a (M x K) b (K x N), or += when acc. Each thread takes a
// block of output rows (or columns, when N > M); small products, and products inside a parallel
// region, run on the calling thread.
void gemm(int64_t M, int64_t N, int64_t K, Mat a, Mat b, float* c, bool acc, bool bf16) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!acc) std::fill(c, c + M * N, 0.f);
    return;
  }
  const int64_t T = num_threads(), flops = 2 * M * N * K;
  if (T <= 1 || omp_team_size() > 1 || flops < (int64_t(1) << 21)) {
    gemm_serial(M, N, K, a, b, c, N, acc, bf16);
    return;
  }
  if (K >= 8 * std::max(M, N)) {
    gemm_split_depth(M, N, K, a, b, c, acc, bf16);
    return;
  }
  const bool by_rows = M >= N;
  const int64_t len = by_rows ? M : N;
  // Blocks of a multiple of 32 (whole micro-kernel panels), at most one per thread.
  const int64_t blk = std::max<int64_t>(32, (len + 32 * T - 1) / (32 * T) * 32);
  const int64_t nblk = (len + blk - 1) / blk;
  parallel_for(nblk, flops / nblk, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) {
      const int64_t p0 = i * blk, n = std::min(len, p0 + blk) - p0;
      if (by_rows)
        gemm_serial(n, N, K, rows_of(a, p0), b, c + p0 * N, N, acc, bf16);
      else
        gemm_serial(M, n, K, a, cols_of(b, p0), c + p0, N, acc, bf16);
    }
  });
}

// A tensor (..., R, C) as a batch of R x C matrices: matrix i is `m` shifted by off[i].
struct Operand {
  Tensor keep;  // what `m` points into (a contiguous copy when the layout could not be mapped)
  int64_t rows = 0, cols = 0;
  Mat m{nullptr, 0, false};
  std::vector<int64_t> off;
  // The whole batch is one (batch * R) x C row-major matrix.
  bool flat() const {
    if (m.t) return false;
    for (size_t i = 0; i < off.size(); ++i)
      if (off[i] != int64_t(i) * rows * m.ld) return false;
    return true;
  }
};

Operand operand(const Tensor& x) {
  Operand o;
  const int n = x.ndim();
  o.rows = x.shape()[n - 2];
  o.cols = x.shape()[n - 1];
  int64_t sr = x.strides()[n - 2], sc = x.strides()[n - 1];
  // The stride of a size-1 dim is never used: pick the one that makes the layout mappable.
  if (o.cols <= 1) sc = 1;
  if (o.rows <= 1) sr = sc == 1 ? std::max<int64_t>(o.cols, 1) : 1;
  Tensor t = x;
  if (sc == 1 && sr >= o.cols) {
    o.m = {nullptr, sr, false};
  } else if (sr == 1 && sc >= o.rows) {
    o.m = {nullptr, sc, true};
  } else {
    t = x.contiguous();
    o.m = {nullptr, std::max<int64_t>(o.cols, 1), false};
  }
  o.keep = t;
  o.m.p = t.data<float>();
  // Offsets of the matrices, batch dims walked in row-major order.
  int64_t nb = 1;
  for (int d = 0; d < n - 2; ++d) nb *= t.shape()[d];
  o.off.assign(size_t(nb), 0);
  std::vector<int64_t> idx(size_t(std::max(n - 2, 0)), 0);
  int64_t cur = 0;
  for (int64_t b = 0; b < nb; ++b) {
    o.off[size_t(b)] = cur;
    for (int d = n - 3; d >= 0; --d) {
      cur += t.strides()[d];
      if (++idx[size_t(d)] < t.shape()[d]) break;
      cur -= t.strides()[d] * t.shape()[d];
      idx[size_t(d)] = 0;
    }
  }
  return o;
}

// Like operand(), but guarantees flat(): all leading dims fold into the rows of one matrix.
Operand flat_operand(const Tensor& x) {
  Operand o = operand(x);
  if (!o.flat()) o = operand(x.contiguous());
  return o;
}

// x: (..., C) seen as one (rows x C) row-major matrix; a 1-D x is one row.
Operand rows_operand(const Tensor& x) {
  if (x.ndim() >= 2) return flat_operand(x);
  Operand o;
  o.keep = x.contiguous();
  o.rows = 1;
  o.cols = x.numel();
  o.m = {o.keep.data<float>(), std::max<int64_t>(o.cols, 1), false};
  o.off = {0};
  return o;
}

// Runs nb GEMMs c_i (M x N, at c + i*M*N) = A_i B_i (+ c_i when acc). With many batches, or
// small products, each thread takes whole products; otherwise products run one after another,
// each split over the threads.
template <class AtB>
void batched(int64_t nb, int64_t M, int64_t N, int64_t K, float* c, bool acc, bool bf16, AtB ab) {
  const int64_t flops = 2 * M * N * K;
  auto run = [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) {
      auto [a, b] = ab(i);
      gemm(M, N, K, a, b, c + i * M * N, acc, bf16);
    }
  };
  if (nb > 1 && (nb >= 4 * num_threads() || flops < (int64_t(1) << 22)))
    parallel_for(nb, flops, run);
  else
    run(0, nb);
}

// Column sums of a (rows x cols) row-major matrix with row stride ld -> cols values. Rows go in fixed blocks (so the
// result does not depend on the thread count), blocks are summed in double.
void column_sums(const float* g, int64_t rows, int64_t cols, int64_t ld, float* out) {
  constexpr int64_t kBlocks = 64;
  const int64_t per = (rows + kBlocks - 1) / kBlocks;
  std::vector<float> part(size_t(kBlocks * cols), 0.f);
  parallel_for(kBlocks, per * cols, [&](int64_t s, int64_t e) {
    for (int64_t blk = s; blk < e; ++blk) {
      float* acc = part.data() + blk * cols;
      for (int64_t r = blk * per, re = std::min(rows, r + per); r < re; ++r) {
        const float* row = g + r * ld;
        for (int64_t j = 0; j < cols; ++j) acc[j] += row[j];
      }
    }
  });
  for (int64_t j = 0; j < cols; ++j) {
    double s = 0;
    for (int64_t blk = 0; blk < kBlocks; ++blk) s += part[size_t(blk * cols + j)];
    out[j] = float(s);
  }
}

}  // namespace

// a: (..., M, K), b: (K, N) (shared) or (..., K, N), any layout -> (..., M, N). bf16: bfloat16
// inputs (the CUDA twin's flag, TF32 there).
Tensor matmul_forward(const Tensor& a, const Tensor& b, bool bf16) {
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1);
  Shape out_shape = a.shape();
  out_shape.back() = N;
  Tensor out = Tensor::empty(out_shape);
  float* po = out.data<float>();
  const Operand A = operand(a), B = operand(b);
  const int64_t nb = int64_t(A.off.size());
  const bool shared = b.ndim() == 2;
  if (shared && A.flat()) {
    gemm(nb * M, N, K, A.m, B.m, po, false, bf16);  // one GEMM over all rows
  } else {
    batched(nb, M, N, K, po, false, bf16, [&](int64_t i) {
      return std::pair{at(A.m, A.off[size_t(i)]), at(B.m, shared ? 0 : B.off[size_t(i)])};
    });
  }
  return out;
}

// dy: (..., M, N) -> dA = dY B^T, dB = A^T dY (summed over the rows of every batch when B is
// shared), each only when asked for
ops::MatmulGrads matmul_backward(const Tensor& a, const Tensor& b, const Tensor& dy, bool need_a, bool need_b,
                                 bool bf16) {
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1);
  const bool shared = b.ndim() == 2;
  ops::MatmulGrads d;
  const Operand G = flat_operand(dy);  // (..., M, N)
  const int64_t nb = int64_t(G.off.size());
  if (need_a) {
    d.da = Tensor::empty(a.shape());
    const Operand B = operand(b);
    if (shared)
      gemm(nb * M, K, N, G.m, trans(B.m), d.da.data<float>(), false, bf16);
    else
      batched(nb, M, K, N, d.da.data<float>(), false, bf16, [&](int64_t i) {
        return std::pair{at(G.m, G.off[size_t(i)]), trans(at(B.m, B.off[size_t(i)]))};
      });
  }
  if (need_b) {
    d.db = Tensor::empty(b.shape());
    if (shared) {
      const Operand A = flat_operand(a);
      gemm(K, N, nb * M, trans(A.m), G.m, d.db.data<float>(), false, bf16);
    } else {
      const Operand A = operand(a);
      batched(nb, K, N, M, d.db.data<float>(), false, bf16, [&](int64_t i) {
        return std::pair{trans(at(A.m, A.off[size_t(i)])), at(G.m, G.off[size_t(i)])};
      });
    }
  }
  return d;
}

// x: (..., in), w: (in, out), bias: (out,) or undefined, any layout -> x w + bias: (..., out).
// The bias is written first and the GEMM accumulates onto it: no extra pass over the output.
Tensor linear_forward(const Tensor& x, const Tensor& w, const Tensor& bias, bool bf16) {
  const int64_t in = w.size(0), nout = w.size(1);
  Shape out_shape = x.shape();
  out_shape.back() = nout;
  const int64_t rows = shape_numel(Shape(x.shape().begin(), x.shape().end() - 1));
  Tensor out = Tensor::empty(out_shape);
  float* po = out.data<float>();
  const Operand X = rows_operand(x), W = operand(w);
  if (bias.defined()) {
    const Tensor bc = bias.contiguous();
    const float* pb = bc.data<float>();
    parallel_for(rows, nout, [&](int64_t s, int64_t e) {
      for (int64_t r = s; r < e; ++r) std::memcpy(po + r * nout, pb, size_t(nout) * sizeof(float));
    });
  }
  gemm(rows, nout, in, X.m, W.m, po, bias.defined(), bf16);
  return out;
}

// dy: (..., out) -> dx = dy w^T, dw = x^T dy over all rows, db = column sums of dy, each only
// when asked for
ops::LinearGrads linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, bool need_x, bool need_w,
                                 bool need_b, bool bf16) {
  const int64_t in = w.size(0), nout = w.size(1);
  const int64_t rows = shape_numel(Shape(x.shape().begin(), x.shape().end() - 1));
  ops::LinearGrads d;
  const Operand G = rows_operand(dy);  // (rows, out)
  if (need_x) {
    d.dx = Tensor::empty(x.shape());
    gemm(rows, in, nout, G.m, trans(operand(w).m), d.dx.data<float>(), false, bf16);
  }
  if (need_w) {
    d.dw = Tensor::empty(w.shape());
    gemm(in, nout, rows, trans(rows_operand(x).m), G.m, d.dw.data<float>(), false, bf16);
  }
  if (need_b) {
    d.db = Tensor::empty({nout});
    column_sums(G.m.p, rows, nout, G.m.ld, d.db.data<float>());
  }
  return d;
}

}  // namespace mv::cpu

namespace mv::ops {

namespace {
bool g_allow_tf32 = false, g_matmul_bf16 = false;
// The kernels' reduced-precision flag: TF32 on CUDA, bfloat16 inputs on the CPU.
bool reduced_precision(const OpDevice& dev) { return dev.device == Device::CUDA ? g_allow_tf32 : g_matmul_bf16; }
}  // namespace
void set_allow_tf32(bool allow) { g_allow_tf32 = allow; }
bool allow_tf32() { return g_allow_tf32; }
void set_matmul_bf16(bool on) {
  MV_CHECK(!on || tile_gemm_has_bf16(), "bfloat16 matrix products need a CPU with AVX-512 BF16 and a build for it "
           "(-Dcpu=native on such a machine); this build has none");
  g_matmul_bf16 = on;
}
bool matmul_bf16() { return g_matmul_bf16; }
Fp32Products::Fp32Products() : saved_(g_matmul_bf16) { g_matmul_bf16 = false; }
Fp32Products::~Fp32Products() { g_matmul_bf16 = saved_; }

void detail::gemm_on_thread(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, bool trans_a,
                            const float* b, int64_t ldb, bool trans_b, float* c, int64_t ldc, bool accumulate,
                            bool bf16) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(c + i * ldc, c + i * ldc + N, 0.f);
    return;
  }
  cpu::gemm_serial(M, N, K, cpu::Mat{a, lda, trans_a}, cpu::Mat{b, ldb, trans_b}, c, ldc, accumulate, bf16);
}

Tensor matmul(const Tensor& a, const Tensor& b) {
  const OpDevice dev = device_of("matmul", {&a, &b});
  expect_f32("matmul", {&a, &b});
  MV_CHECK(a.ndim() >= 2, "matmul: a ", a.str(), " must have at least 2 dims (..., M, K)");
  MV_CHECK(b.ndim() == 2 || b.ndim() == a.ndim(), "matmul: b ", b.str(),
           " must be (K, N) or have a's rank ", a.ndim(), " (a is ", a.str(), ")");
  const int64_t K = a.size(-1);
  MV_CHECK(b.size(-2) == K, "matmul: ", a.str(), " x ", b.str(), ": inner sizes differ (", K,
           " vs ", b.size(-2), ")");
  if (b.ndim() != 2)
    MV_CHECK(Shape(a.shape().begin(), a.shape().end() - 2) == Shape(b.shape().begin(), b.shape().end() - 2),
             "matmul: batch dims of ", a.str(), " and ", b.str(), " differ (no broadcasting)");
  const bool reduced = reduced_precision(dev);
  Tensor out = MV_KERNEL(matmul_forward)(dev, a, b, reduced);
  const bool ga = a.requires_grad(), gb = b.requires_grad();
  return autograd::record("matmul", out, {a, b}, [dev, ad = a.detach(), bd = b.detach(), ga, gb, reduced](const Tensor& g) {
    MatmulGrads d = MV_KERNEL(matmul_backward)(dev, ad, bd, g, ga, gb, reduced);
    return std::vector<Tensor>{d.da, d.db};
  });
}

Tensor bmm(const Tensor& a, const Tensor& b) {
  MV_CHECK(a.defined() && b.defined() && a.ndim() == 3 && b.ndim() == 3, "bmm: expected (B, M, K) x (B, K, N), got ",
           a.str(), " x ", b.str());
  MV_CHECK(a.size(0) == b.size(0), "bmm: batch sizes differ: ", a.str(), " x ", b.str());
  return matmul(a, b);
}

Tensor linear(const Tensor& x, const Tensor& w, const Tensor& bias) {
  const OpDevice dev = device_of("linear", {&x, &w, &bias});
  expect_f32("linear", {&x, &w});
  if (bias.defined()) expect_f32("linear", {&bias});
  MV_CHECK(x.ndim() >= 1 && w.ndim() == 2, "linear: expected x (..., in) and w (in, out), got x ", x.str(),
           " and w ", w.str());
  const int64_t in = w.size(0), nout = w.size(1);
  MV_CHECK(x.size(-1) == in, "linear: x ", x.str(), " has ", x.size(-1), " features, w ", w.str(),
           " expects ", in);
  MV_CHECK(!bias.defined() || bias.shape() == Shape{nout}, "linear: bias ", bias.str(), " must be (",
           nout, ") for w ", w.str());
  const bool reduced = reduced_precision(dev);
  Tensor out = MV_KERNEL(linear_forward)(dev, x, w, bias, reduced);
  const bool gx = x.requires_grad(), gw = w.requires_grad(), gbias = bias.defined() && bias.requires_grad();
  return autograd::record("linear", out, {x, w, bias},
                          [dev, xd = x.detach(), wd = w.detach(), gx, gw, gbias, reduced](const Tensor& g) {
                            LinearGrads d = MV_KERNEL(linear_backward)(dev, xd, wd, g, gx, gw, gbias, reduced);
                            return std::vector<Tensor>{d.dx, d.dw, d.db};
                          });
}

}  // namespace mv::ops
