// Helpers shared by the CUDA kernel files (not part of the public API; kernels.h is):
// the stream, input checks, launch checks, grid sizing, and warp / row reductions.
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "cuda/check.h"
#include "engine/tensor.h"

// Every kernel launch is followed by this: launch-configuration errors surface at the call site.
#define MV_CUDA_LAUNCH_CHECK() MV_CUDA_CHECK(cudaGetLastError())

namespace mv::cuda {

// The one stream every kernel, copy and cuBLAS call runs on: the legacy default stream, so the
// synchronous cudaMemcpy of the memory hooks is ordered with the kernels.
inline cudaStream_t stream() { return 0; }

namespace detail {

// Throws unless `t` is a defined, contiguous F32 tensor on the CUDA device.
inline void expect_cuda_f32(const char* fn, const char* name, const Tensor& t) {
  MV_CHECK(t.defined(), "cuda::", fn, ": ", name, " is undefined");
  MV_CHECK(t.device() == Device::CUDA && t.dtype() == DType::F32 && t.is_contiguous(), "cuda::", fn,
           ": ", name, " must be a contiguous F32 CUDA tensor, got ", t.str(),
           t.is_contiguous() ? "" : " (strided)");
}

// A new, uninitialised CUDA tensor.
inline Tensor device_empty(const Shape& s, DType t = DType::F32) { return Tensor::empty(s, t, Device::CUDA); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Multiprocessor count of the current device (read once).
int sm_count();

// The expert kernels' row helpers (cuda/experts.cu). x: (E, M, c), rows: (E,) I64 or undefined
// -> a contiguous copy of x with the rows past rows[e] zeroed (x itself, contiguous, when rows is
// undefined).
Tensor mask_rows(const Tensor& x, const Tensor& rows);
// y: (E, M, c) contiguous += b: (E, c), in place.
void add_expert_bias(const Tensor& y, const Tensor& b);
// g: (E, M, c) -> (E, c): the sum of each expert's rows (a bias gradient). Deterministic.
Tensor expert_sums(const Tensor& g);

// A grid for a grid-stride loop over `n` items with `threads` per block: enough blocks to fill
// the device a few times over, never more than the work needs.
inline unsigned grid_for(int64_t n, int threads, int waves = 8) {
  int64_t want = (n + threads - 1) / threads;
  int64_t cap = int64_t(sm_count()) * waves * (2048 / threads);
  if (want > cap) want = cap;
  return unsigned(want < 1 ? 1 : want);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The number of trailing elements `small` covers when it is a bias of `big`: its shape, leading
// 1s dropped, is a suffix of big's ((C,) or (1, 1, C) against (B, T, C)); -1 otherwise. Adding
// such an operand, and summing a gradient back to it, take the row kernels (add_bias,
// column_sum) instead of the general broadcasting ones.
inline int64_t bias_width(const Shape& small, const Shape& big) {
  size_t lead = 0;
  while (lead < small.size() && small[lead] == 1) ++lead;
  const size_t k = small.size() - lead;
  if (k > big.size() || small.size() > big.size() + lead) return -1;
  int64_t C = 1;
  for (size_t i = 0; i < k; ++i) {
    if (small[lead + i] != big[big.size() - k + i]) return -1;
    C *= small[lead + i];
  }
  return C;
}

// The most dims a strided (or broadcasting) kernel walks.
constexpr int kMaxDims = 8;

// Element i of a row-major walk over `shape` sits at offset sum_d idx_d * stride[k][d] in operand
// k: the index arithmetic of strided copies, broadcasting maps and axis reductions (an operand
// that broadcasts along d has stride 0 there). Passed to kernels by value.
template <int N>
struct Indexer {
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t stride[N][kMaxDims] = {};

  // shape and each operand's strides, all of the same rank (<= kMaxDims; checked by the caller).
  static Indexer make(const Shape& s, std::initializer_list<const Shape*> strides) {
    Indexer ix;
    ix.ndim = int(s.size());
    for (int d = 0; d < ix.ndim; ++d) ix.shape[d] = s[size_t(d)];
    int k = 0;
    for (const Shape* st : strides) {
      for (int d = 0; d < ix.ndim; ++d) ix.stride[k][d] = (*st)[size_t(d)];
      ++k;
    }
    return ix;
  }
  __device__ void offsets(int64_t i, int64_t (&off)[N]) const {
#pragma unroll
    for (int k = 0; k < N; ++k) off[k] = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t c = i % shape[d];
      i /= shape[d];
#pragma unroll
      for (int k = 0; k < N; ++k) off[k] += c * stride[k][d];
    }
  }
};

// --- device helpers ---------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // the butterfly leaves the same bits in every lane (a + b == b + a exactly)
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum / max over the TPR threads that share a row. TPR == 32: the row is one warp, so shuffles
// suffice. TPR > 32: the row is the whole block (one row per block); warps meet in shared memory.
// Every thread of the block must call it (it contains __syncthreads when TPR > 32).
template <int TPR>
__device__ __forceinline__ float row_sum(float v) {
  v = warp_sum(v);
  if constexpr (TPR > 32) {
    __shared__ float red[32];
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();  // the previous call's readers are done with red
    if (l == 0) red[w] = v;
    __syncthreads();
    v = warp_sum(l < TPR / 32 ? red[l] : 0.f);
  }
  return v;
}

template <int TPR>
__device__ __forceinline__ float row_max(float v) {
  v = warp_max(v);
  if constexpr (TPR > 32) {
    __shared__ float red[32];
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) red[w] = v;
    __syncthreads();
    v = warp_max(l < TPR / 32 ? red[l] : -INFINITY);
  }
  return v;
}

// Online softmax statistics: a running max m and a sum s of exp(x - m) over the values seen.
// ms_push adds one value (rescaling s when the max grows); ms_merge combines two partial
// (m, s) pairs. An empty side (m = -inf, s = 0) contributes nothing, and exp(-inf - -inf) = NaN
// is never formed. Both are symmetric, so a xor-butterfly leaves the same bits in every lane.
__device__ __forceinline__ void ms_push(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.f;  // m = -inf: s = 0 * 0 + 1
    m = x;
  } else if (x != -INFINITY) {
    s += expf(x - m);
  }
}

__device__ __forceinline__ void ms_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;
  s = (m == -INFINITY ? 0.f : s * expf(m - mn)) + (m2 == -INFINITY ? 0.f : s2 * expf(m2 - mn));
  m = mn;
}

// Merges the (m, s) of the TPR threads of a row (a warp, or the whole block when TPR > 32; then
// every thread of the block must call it, once per kernel: the shared arrays are not reused).
template <int TPR>
__device__ __forceinline__ void row_ms(float& m, float& s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    ms_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  if constexpr (TPR > 32) {
    __shared__ float sm[32], ss[32];
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    if (l == 0) sm[w] = m, ss[w] = s;
    __syncthreads();
    m = l < TPR / 32 ? sm[l] : -INFINITY;
    s = l < TPR / 32 ? ss[l] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      ms_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  }
}

// A row of C floats held in registers by the TPR threads of a row, VPT values per thread.
// Scalar layout: thread t holds columns t, t + TPR, t + 2 TPR, ...: each load instruction of a
// warp reads 32 consecutive floats. Vector layout (C % 4 == 0, 16-byte aligned rows): thread t
// holds float4 chunks t, t + TPR, ...: each load reads 512 consecutive bytes. Values are indexed
// with compile-time k only (unrolled loops), so they stay in registers.
template <int VPT, bool VEC, int TPR>
struct RowRegs {
  static_assert(!VEC || VPT % 4 == 0, "vector rows hold whole float4 chunks");
  __device__ static __forceinline__ int col(int t, int k) {
    return VEC ? 4 * (t + TPR * (k / 4)) + (k % 4) : t + TPR * k;
  }
  __device__ static __forceinline__ void load(const float* __restrict__ row, int C, int t,
                                              float (&r)[VPT], float fill) {
    if constexpr (VEC) {
#pragma unroll
      for (int j = 0; j < VPT / 4; ++j) {
        const int c = 4 * (t + TPR * j);
        float4 v = make_float4(fill, fill, fill, fill);
        if (c < C) v = *reinterpret_cast<const float4*>(row + c);
        r[4 * j] = v.x, r[4 * j + 1] = v.y, r[4 * j + 2] = v.z, r[4 * j + 3] = v.w;
      }
    } else {
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int c = t + TPR * k;
        r[k] = c < C ? row[c] : fill;
      }
    }
  }
  __device__ static __forceinline__ void store(float* __restrict__ row, int C, int t,
                                               const float (&r)[VPT]) {
    if constexpr (VEC) {
#pragma unroll
      for (int j = 0; j < VPT / 4; ++j) {
        const int c = 4 * (t + TPR * j);
        if (c < C)
          *reinterpret_cast<float4*>(row + c) =
              make_float4(r[4 * j], r[4 * j + 1], r[4 * j + 2], r[4 * j + 3]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int c = t + TPR * k;
        if (c < C) row[c] = r[k];
      }
    }
  }
};

// Rows per block of a row kernel: 4 warps (one row each) when TPR == 32, else one row.
template <int TPR>
constexpr int rows_per_block() { return TPR == 32 ? 4 : 1; }
template <int TPR>
constexpr int row_block_threads() { return TPR == 32 ? 128 : TPR; }

// The largest row the register kernels hold: 256 threads x 32 values.
constexpr int kMaxRegRow = 8192;

// Picks the register layout for a row of C floats and calls f.template operator()<VPT, VEC, TPR>().
// Rows up to 1024: one warp per row, VPT = the next power of two >= C / 32. Longer rows (up to
// kMaxRegRow): 256 threads per row, VPT 8, 16 or 32. `vec_ok`: C % 4 == 0 and 16-byte aligned
// pointers, which allows float4 loads (only used when a thread holds at least 4 values).
template <class F>
void dispatch_row_layout(int C, bool vec_ok, F&& f) {
  MV_CHECK(C >= 1 && C <= kMaxRegRow, "row kernel: row length ", C, " outside 1..", kMaxRegRow);
  if (C <= 1024) {
    const int need = int(ceil_div(C, 32));
    if (need <= 1) return f.template operator()<1, false, 32>();
    if (need <= 2) return f.template operator()<2, false, 32>();
    if (need <= 4) return vec_ok ? f.template operator()<4, true, 32>() : f.template operator()<4, false, 32>();
    if (need <= 8) return vec_ok ? f.template operator()<8, true, 32>() : f.template operator()<8, false, 32>();
    if (need <= 16) return vec_ok ? f.template operator()<16, true, 32>() : f.template operator()<16, false, 32>();
    return vec_ok ? f.template operator()<32, true, 32>() : f.template operator()<32, false, 32>();
  }
  const int need = int(ceil_div(C, 256));
  if (need <= 8) return vec_ok ? f.template operator()<8, true, 256>() : f.template operator()<8, false, 256>();
  if (need <= 16) return vec_ok ? f.template operator()<16, true, 256>() : f.template operator()<16, false, 256>();
  return vec_ok ? f.template operator()<32, true, 256>() : f.template operator()<32, false, 256>();
}

}  // namespace detail
}  // namespace mv::cuda
