// GEMM through cuBLAS / cuBLASLt, and the small pieces of device state every kernel file uses
// (the multiprocessor count, synchronize()).
//
// Row-major through the operand swap: cuBLAS is column-major, and a row-major (M, N) matrix is the
// column-major (N, M) matrix with the same bytes. So C = A B (row-major) is computed as
// C^T = B^T A^T (column-major): cuBLAS gets (b, a) with m = N, n = M, k = K and leading
// dimensions N, K, N, and no transposes. A 3-D operand becomes one strided-batched call (a 2-D
// operand gets stride 0, i.e. is shared); a 3-D `a` with a 2-D `b` is one plain GEMM over B*M rows.
//
// The ops' kernels (matmul_forward / matmul_backward, linear_forward / linear_backward, the twins
// of ops/matmul.cpp) flatten their operands and hand the backward's transposed products to
// cuBLAS as op(X) = X^T (matmul_t): no transposed copies.
//
// linear_forward uses cuBLASLt so the bias add happens in the GEMM's epilogue (the bias vector
// runs along the column-major rows of C^T, i.e. along `out`, exactly what the BIAS epilogue
// broadcasts). Plans (descriptors + the heuristic's algorithm) are cached per shape and
// alignment; when Lt offers no algorithm, or the bias is not 16-byte aligned (an Lt requirement),
// it falls back to a plain GEMM followed by the add_bias kernel.
#include <cublasLt.h>

#include <climits>
#include <map>
#include <mutex>
#include <tuple>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

#define MV_CUBLASLT_CHECK(call)                                                       \
  do {                                                                                \
    cublasStatus_t st_ = (call);                                                      \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                 \
      ::mv::detail::fail(__FILE__, __LINE__, "cuBLASLt error in ", #call, ": ",       \
                         cublasGetStatusString(st_));                                 \
  } while (0)

namespace mv::cuda {

namespace detail {
int sm_count() {
  static int n = [] {
    int dev = 0, c = 0;
    MV_CUDA_CHECK(cudaGetDevice(&dev));
    MV_CUDA_CHECK(cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev));
    return c;
  }();
  return n;
}
// In-place y[r, c] += b[c] over a contiguous (R, C) matrix; in elementwise.cu.
void add_bias_inplace(float* y, const float* b, int64_t R, int64_t C);
}  // namespace detail

void synchronize() { MV_CUDA_CHECK(cudaDeviceSynchronize()); }

namespace {

// Created on first use and never destroyed: at exit the CUDA context may already be gone.
cublasHandle_t blas() {
  static cublasHandle_t h = [] {
    cublasHandle_t x;
    MV_CUBLAS_CHECK(cublasCreate(&x));
    MV_CUBLAS_CHECK(cublasSetStream(x, stream()));
    return x;
  }();
  return h;
}

cublasLtHandle_t blas_lt() {
  static cublasLtHandle_t h = [] {
    cublasLtHandle_t x;
    MV_CUBLASLT_CHECK(cublasLtCreate(&x));
    return x;
  }();
  return h;
}

// cuBLASLt workspace: 32 MiB, as NVIDIA recommends for Hopper; allocated once, never freed.
constexpr size_t kLtWorkspace = size_t(32) << 20;
void* lt_workspace() {
  static void* p = [] {
    void* q = nullptr;
    MV_CUDA_CHECK(cudaMalloc(&q, kLtWorkspace));
    return q;
  }();
  return p;
}

// The largest power of two (up to 256) that divides the address: what Lt's heuristic must
// assume about a pointer.
uint32_t alignment(const void* p) {
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && (a % al) != 0) al >>= 1;
  return al;
}

void check_int(const char* fn, int64_t v, const char* what) {
  MV_CHECK(v <= INT_MAX, "cuda::", fn, ": ", what, " = ", v, " exceeds cuBLAS's int range");
}

// Column-major C(m x n) = op(A)(m x k) op(B)(k x n), optionally batched with strides;
// op(X) = X^T where tA / tB (then lda / ldb are the leading dims of the stored, untransposed X).
void gemm_cm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, int64_t sA,
             const float* B, int64_t ldb, int64_t sB, float* C, int64_t ldc, int64_t sC,
             int64_t batch, bool tf32, bool tA = false, bool tB = false) {
  const float one = 1.f, zero = 0.f;
  const cublasComputeType_t ct = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  const cublasOperation_t oA = tA ? CUBLAS_OP_T : CUBLAS_OP_N, oB = tB ? CUBLAS_OP_T : CUBLAS_OP_N;
  if (batch == 1) {
    MV_CUBLAS_CHECK(cublasGemmEx(blas(), oA, oB, int(m), int(n), int(k), &one, A,
                                 CUDA_R_32F, int(lda), B, CUDA_R_32F, int(ldb), &zero, C,
                                 CUDA_R_32F, int(ldc), ct, CUBLAS_GEMM_DEFAULT));
  } else {
    MV_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        blas(), oA, oB, int(m), int(n), int(k), &one, A, CUDA_R_32F, int(lda),
        sA, B, CUDA_R_32F, int(ldb), sB, &zero, C, CUDA_R_32F, int(ldc), sC, int(batch), ct,
        CUBLAS_GEMM_DEFAULT));
  }
}

}  // namespace

namespace {

// op(a) @ op(b), row-major, for matmul and matmul_t (fn names the caller in errors). Through the
// operand swap, C^T = op(b)^T op(a)^T: the bytes of a row-major b are the column-major b^T, so
// op(b)^T needs no transpose when b is used as stored and cuBLAS's OP_T when b is stored
// transposed; the same for a.
Tensor gemm_rm(const char* fn, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, bool tf32) {
  detail::expect_cuda_f32(fn, "a", a);
  detail::expect_cuda_f32(fn, "b", b);
  MV_CHECK((a.ndim() == 2 || a.ndim() == 3) && (b.ndim() == 2 || b.ndim() == 3), "cuda::", fn, ": ",
           a.str(), " x ", b.str(), ": expected (M, K) or (B, M, K) times (K, N) or (B, K, N)");
  const int64_t M = trans_a ? a.size(-1) : a.size(-2), K = trans_a ? a.size(-2) : a.size(-1);
  const int64_t N = trans_b ? b.size(-2) : b.size(-1), Kb = trans_b ? b.size(-1) : b.size(-2);
  MV_CHECK(Kb == K, "cuda::", fn, ": ", a.str(), (trans_a ? "^T" : ""), " x ", b.str(),
           (trans_b ? "^T" : ""), ": inner sizes differ");
  const bool a3 = a.ndim() == 3, b3 = b.ndim() == 3;
  MV_CHECK(!(a3 && b3) || a.size(0) == b.size(0), "cuda::", fn, ": ", a.str(), " x ", b.str(),
           ": batch sizes differ");
  const int64_t B = a3 ? a.size(0) : b3 ? b.size(0) : 1;
  Tensor out = Tensor::empty(a3 || b3 ? Shape{B, M, N} : Shape{M, N}, DType::F32, Device::CUDA);
  if (out.numel() == 0) return out;
  if (K == 0) {
    MV_CUDA_CHECK(cudaMemsetAsync(out.raw(), 0, out.nbytes(), stream()));
    return out;
  }
  for (auto [v, what] : {std::pair{M, "M"}, {K, "K"}, {N, "N"}, {B, "batch"}}) check_int(fn, v, what);
  const int64_t ldb = trans_b ? K : N, lda = trans_a ? M : K;
  if (!b3 && !trans_a) {  // (B*M, K) x (K, N): one GEMM; a's batches are just more rows
    check_int(fn, B * M, "rows");
    gemm_cm(N, B * M, K, b.data<float>(), ldb, 0, a.data<float>(), lda, 0, out.data<float>(), N, 0, 1,
            tf32, trans_b, trans_a);
  } else {  // one strided-batched call; a 2-D operand gets stride 0 (shared by every batch)
    gemm_cm(N, M, K, b.data<float>(), ldb, b3 ? K * N : 0, a.data<float>(), lda, a3 ? M * K : 0,
            out.data<float>(), N, M * N, B, tf32, trans_b, trans_a);
  }
  return out;
}

}  // namespace

Tensor matmul(const Tensor& a, const Tensor& b, bool tf32) { return gemm_rm("matmul", a, b, false, false, tf32); }

// The transposed-operand variant, for backward passes (dA = dC B^T, dB = A^T dC) without
// materialising a transpose.
Tensor matmul_t(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, bool tf32) {
  return gemm_rm("matmul_t", a, b, trans_a, trans_b, tf32);
}

namespace {

struct LtPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool ok = false;
};

// Plan for column-major y^T (out x R) = w^T (out x in) x^T (in x R) + bias, cached by shape,
// precision and pointer alignments.
LtPlan& lt_plan(int64_t R, int64_t in, int64_t out, bool tf32, uint32_t al_w, uint32_t al_x,
                      uint32_t al_y) {
  using Key = std::tuple<int64_t, int64_t, int64_t, bool, uint32_t, uint32_t, uint32_t>;
  static std::map<Key, LtPlan> plans;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  const Key key{R, in, out, tf32, al_w, al_x, al_y};
  auto it = plans.find(key);
  if (it != plans.end()) return it->second;
  LtPlan& p = plans[key];
  const cublasComputeType_t ct = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  MV_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&p.op, ct, CUDA_R_32F));
  const cublasOperation_t opn = CUBLAS_OP_N;
  MV_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &opn, sizeof(opn)));
  MV_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &opn, sizeof(opn)));
  const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
  MV_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  const cudaDataType_t bias_t = CUDA_R_32F;
  MV_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_t, sizeof(bias_t)));
  MV_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&p.la, CUDA_R_32F, uint64_t(out), uint64_t(in), out));
  MV_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&p.lb, CUDA_R_32F, uint64_t(in), uint64_t(R), in));
  MV_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&p.lc, CUDA_R_32F, uint64_t(out), uint64_t(R), out));

  cublasLtMatmulPreference_t pref;
  MV_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const size_t ws = kLtWorkspace;
  MV_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  MV_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_w, sizeof(al_w)));
  MV_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_x, sizeof(al_x)));
  MV_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_y, sizeof(al_y)));
  MV_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_y, sizeof(al_y)));
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(blas_lt(), p.op, p.la, p.lb, p.lc, p.lc,
                                                           pref, 1, &res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st == CUBLAS_STATUS_SUCCESS && found > 0) {
    p.algo = res.algo;
    p.ok = true;
  }
  return p;
}

}  // namespace

Tensor linear_forward(const Tensor& x_, const Tensor& w_, const Tensor& bias_, bool tf32) {
  const Tensor x = x_.defined() ? x_.contiguous() : x_, w = w_.defined() ? w_.contiguous() : w_;
  const Tensor bias = bias_.defined() ? bias_.contiguous() : bias_;
  detail::expect_cuda_f32("linear_forward", "x", x);
  detail::expect_cuda_f32("linear_forward", "w", w);
  MV_CHECK(x.ndim() >= 2 && w.ndim() == 2 && x.size(-1) == w.size(0), "cuda::linear_forward: x ",
           x.str(), ", w ", w.str(), ": expected x (..., in) and w (in, out)");
  const int64_t in = w.size(0), outf = w.size(1), R = x.numel() / (in ? in : 1);
  if (bias.defined()) {
    detail::expect_cuda_f32("linear_forward", "bias", bias);
    MV_CHECK(bias.ndim() == 1 && bias.size(0) == outf, "cuda::linear_forward: bias ", bias.str(),
             " does not match w ", w.str(), ": expected (", outf, ")");
  }
  Shape oshape = x.shape();
  oshape.back() = outf;
  Tensor y = Tensor::empty(oshape, DType::F32, Device::CUDA);
  if (y.numel() == 0) return y;
  for (auto [v, what] : {std::pair{R, "rows"}, {in, "in"}, {outf, "out"}}) check_int("linear_forward", v, what);
  if (in == 0) {
    MV_CUDA_CHECK(cudaMemsetAsync(y.raw(), 0, y.nbytes(), stream()));
    if (bias.defined()) detail::add_bias_inplace(y.data<float>(), bias.data<float>(), R, outf);
    return y;
  }
  const float* px = x.data<float>();
  const float* pw = w.data<float>();
  float* py = y.data<float>();
  if (bias.defined() && alignment(bias.raw()) >= 16) {
    LtPlan& p = lt_plan(R, in, outf, tf32, alignment(pw), alignment(px), alignment(py));
    if (p.ok) {
      const void* pb = bias.raw();
      MV_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &pb, sizeof(pb)));
      const float one = 1.f, zero = 0.f;
      const cublasStatus_t st = cublasLtMatmul(blas_lt(), p.op, &one, pw, p.la, px, p.lb, &zero, py, p.lc,
                                               py, p.lc, &p.algo, lt_workspace(), kLtWorkspace, stream());
      if (st == CUBLAS_STATUS_SUCCESS) return y;
      // Refused at launch (nothing was queued): remember it and take the plain path.
      MV_CHECK(st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE,
               "cuda::linear_forward: cublasLtMatmul failed: ", cublasGetStatusString(st));
      p.ok = false;
    }
  }
  gemm_cm(outf, R, in, pw, outf, 0, px, in, 0, py, outf, 0, 1, tf32);
  if (bias.defined()) detail::add_bias_inplace(py, bias.data<float>(), R, outf);
  return y;
}

LinearGrads linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, bool need_x, bool need_w,
                            bool need_b, bool tf32) {
  const int64_t in = w.size(0), out = w.size(1), rows = shape_numel(Shape(x.shape().begin(), x.shape().end() - 1));
  const Tensor x2 = x.reshaped({rows, in}), g2 = dy.reshaped({rows, out});
  LinearGrads g;
  if (need_x) g.dx = matmul_t(g2, w.contiguous(), false, true, tf32).reshaped(x.shape());  // dx = dy w^T
  if (need_w) g.dw = matmul_t(x2, g2, true, false, tf32);                                // dw = x^T dy
  if (need_b) g.db = column_sum(g2);                                                     // db = column sums of dy
  return g;
}

// a: (..., M, K) as nb (M, K) matrices; b: (K, N) shared by all of them, or (..., K, N).
Tensor matmul_forward(const Tensor& a, const Tensor& b, bool tf32) {
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1), nb = M * K == 0 ? 0 : a.numel() / (M * K);
  Shape out_shape = a.shape();
  out_shape.back() = N;
  const Tensor out = b.ndim() == 2 ? matmul(a.reshaped({nb * M, K}), b.contiguous(), tf32)
                                   : matmul(a.reshaped({nb, M, K}), b.reshaped({nb, K, N}), tf32);
  return out.reshaped(out_shape);
}

MatmulGrads matmul_backward(const Tensor& a, const Tensor& b, const Tensor& dy, bool need_a, bool need_b,
                            bool tf32) {
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1), nb = M * K == 0 ? 0 : a.numel() / (M * K);
  MatmulGrads g;
  if (b.ndim() == 2) {  // one GEMM over all nb * M rows
    const Tensor g2 = dy.reshaped({nb * M, N});
    if (need_a) g.da = matmul_t(g2, b.contiguous(), false, true, tf32).reshaped(a.shape());  // dA = dY B^T
    if (need_b) g.db = matmul_t(a.reshaped({nb * M, K}), g2, true, false, tf32);           // dB = A^T dY
  } else {
    const Tensor g3 = dy.reshaped({nb, M, N});
    if (need_a) g.da = matmul_t(g3, b.reshaped({nb, K, N}), false, true, tf32).reshaped(a.shape());
    if (need_b) g.db = matmul_t(a.reshaped({nb, M, K}), g3, true, false, tf32).reshaped(b.shape());
  }
  return g;
}

}  // namespace mv::cuda
