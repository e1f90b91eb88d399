// Multi-head self-attention over a packed qkv tensor, flash-style, forward and backward.
//
//   qkv: (B, T, 3D) = [q | k | v], head h at columns h*Dh .. h*Dh + Dh - 1 of each part
//   S = q k^T / sqrt(Dh) per (batch, head),  P = softmax_rows(S),  out = P v   (B, T, D)
//   lse[b, h, i] = log sum_j exp(S_ij)                                         (B, heads, T)
//
// No T x T matrix ever reaches global memory.
//
// Thread mapping. A block owns BQ rows (queries in the forward and the dQ pass, keys in the
// dK/dV pass) of one (batch, head): grid = (ceil(T / BQ), heads, B). The head dimension is padded
// to DH in {16, 32, 64} and cut into slices of SL = 16 dims; NS = DH / SL consecutive threads share
// a row, each holding its 16-dim slice of the row's vectors in registers. A dot product over the
// head is 16 FMAs per thread plus log2(NS) xor-shuffles; the butterfly leaves identical bits in
// all NS threads, so the softmax bookkeeping (max, sum) is redundantly identical in each.
//
// Tiles. The other side's rows stream through shared memory in tiles of BK = 32 rows, stored
// slice-major ([slice][row][16 dims], each slice padded by 4 floats so the NS slices a warp reads
// at once fall in different banks) and read as float4 (a warp reads only NS distinct addresses;
// the rest are broadcasts). Rows past T and dims past Dh are zero-filled.
//
// Forward: per tile, 32 scores per thread, then the online softmax: new max m', rescale the
// running sum l and the output accumulator by exp(m - m'), add p_j = exp(s_j - m') and p_j v_j.
// Scores are kept in base 2 (q is pre-multiplied by log2(e) / sqrt(Dh)) so exp is one exp2f.
//
// Backward (deterministic, no atomics), recomputing P = exp(S - lse) from the saved lse:
//   Di   = rowsum(dO_i * O_i)
//   dP   = dO v^T,  dS = P * (dP - Di)
//   dQ_i = sum_j dS_ij k_j / sqrt(Dh)           (kernel 1: query rows, key tiles; also writes Di)
//   dK_j = sum_i dS_ij q_i / sqrt(Dh),  dV_j = sum_i P_ij dO_i   (kernel 2: key rows, query tiles)
// Each output row is owned by one thread group and accumulated in registers, so nothing is added
// to global memory twice; P is recomputed in both kernels, the price of having no atomics.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace mv::cuda {
namespace {

using namespace detail;

constexpr int SL = 16;  // head dims per thread
constexpr int BK = 32;  // rows per shared-memory tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int DH>
struct Cfg {
  static constexpr int NS = DH / SL;             // threads per row
  static constexpr int BQ = DH == 16 ? 64 : 32;  // rows per block
  static constexpr int THREADS = BQ * NS;
  static constexpr int PITCH = BK * SL + 4;      // floats per slice of a tile
  static constexpr int TILE = NS * PITCH;        // floats per tile
  static_assert(THREADS % 32 == 0 && 32 % NS == 0, "a row's threads must sit inside one warp");
};

// Loads rows r0 .. r0 + BK - 1 (of T) of one head's (T, Dh) matrix into a slice-major tile.
// `base` points at row 0, first column of the head; rows are `ld` floats apart.
template <int DH, bool VEC>
__device__ __forceinline__ void load_tile(float* __restrict__ tile, const float* __restrict__ base,
                                          int64_t ld, int r0, int T, int Dh) {
  using C = Cfg<DH>;
  if constexpr (VEC) {  // Dh % 4 == 0 and 16-byte aligned rows: whole float4s are in or out
    for (int e = threadIdx.x; e < BK * DH / 4; e += C::THREADS) {
      const int j = e / (DH / 4), d = 4 * (e % (DH / 4));
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (r0 + j < T && d < Dh) v = *reinterpret_cast<const float4*>(base + int64_t(r0 + j) * ld + d);
      *reinterpret_cast<float4*>(tile + (d / SL) * C::PITCH + j * SL + d % SL) = v;
    }
  } else {
    for (int e = threadIdx.x; e < BK * DH; e += C::THREADS) {
      const int j = e / DH, d = e % DH;
      float v = 0.f;
      if (r0 + j < T && d < Dh) v = base[int64_t(r0 + j) * ld + d];
      tile[(d / SL) * C::PITCH + j * SL + d % SL] = v;
    }
  }
}

// r[k] = scale * row[d0 + k] for the dims that exist (zero elsewhere, or everywhere if !valid).
template <bool VEC>
__device__ __forceinline__ void load_slice(float (&r)[SL], const float* __restrict__ row, int d0,
                                           int Dh, bool valid, float scale) {
  if constexpr (VEC) {
#pragma unroll
    for (int c = 0; c < SL / 4; ++c) {
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (valid && d0 + 4 * c < Dh) v = *reinterpret_cast<const float4*>(row + d0 + 4 * c);
      r[4 * c] = v.x * scale, r[4 * c + 1] = v.y * scale, r[4 * c + 2] = v.z * scale, r[4 * c + 3] = v.w * scale;
    }
  } else {
#pragma unroll
    for (int k = 0; k < SL; ++k) r[k] = (valid && d0 + k < Dh) ? row[d0 + k] * scale : 0.f;
  }
}

template <bool VEC>
__device__ __forceinline__ void store_slice(float* __restrict__ row, const float (&r)[SL], int d0, int Dh,
                                            float scale) {
  if constexpr (VEC) {
#pragma unroll
    for (int c = 0; c < SL / 4; ++c)
      if (d0 + 4 * c < Dh)
        *reinterpret_cast<float4*>(row + d0 + 4 * c) =
            make_float4(r[4 * c] * scale, r[4 * c + 1] * scale, r[4 * c + 2] * scale, r[4 * c + 3] * scale);
  } else {
#pragma unroll
    for (int k = 0; k < SL; ++k)
      if (d0 + k < Dh) row[d0 + k] = r[k] * scale;
  }
}

// Dot product of a register slice with a 16-float shared-memory slice row.
__device__ __forceinline__ float dot16(const float (&a)[SL], const float* __restrict__ row) {
  const float4* r4 = reinterpret_cast<const float4*>(row);
  float acc = 0.f;
#pragma unroll
  for (int c = 0; c < SL / 4; ++c) {
    const float4 v = r4[c];
    acc = fmaf(a[4 * c], v.x, acc);
    acc = fmaf(a[4 * c + 1], v.y, acc);
    acc = fmaf(a[4 * c + 2], v.z, acc);
    acc = fmaf(a[4 * c + 3], v.w, acc);
  }
  return acc;
}

// acc += p * row (a 16-float shared-memory slice row).
__device__ __forceinline__ void axpy16(float (&acc)[SL], float p, const float* __restrict__ row) {
  const float4* r4 = reinterpret_cast<const float4*>(row);
#pragma unroll
  for (int c = 0; c < SL / 4; ++c) {
    const float4 v = r4[c];
    acc[4 * c] = fmaf(p, v.x, acc[4 * c]);
    acc[4 * c + 1] = fmaf(p, v.y, acc[4 * c + 1]);
    acc[4 * c + 2] = fmaf(p, v.z, acc[4 * c + 2]);
    acc[4 * c + 3] = fmaf(p, v.w, acc[4 * c + 3]);
  }
}

// Sum over the NS threads of a row.
template <int NS>
__device__ __forceinline__ float slice_sum(float v) {
#pragma unroll
  for (int o = 1; o < NS; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- forward --------------------------------------------------------------------------------

template <int DH, bool VEC>
__global__ void __launch_bounds__(Cfg<DH>::THREADS)
    attn_fwd(const float* __restrict__ qkv, float* __restrict__ out, float* __restrict__ lse, int T, int D,
             int H, int Dh, float qscale) {
  using C = Cfg<DH>;
  __shared__ __align__(16) float Ks[C::TILE];
  __shared__ __align__(16) float Vs[C::TILE];
  const int b = blockIdx.z, h = blockIdx.y;
  const int r = threadIdx.x / C::NS, sl = threadIdx.x % C::NS, d0 = sl * SL;
  const int i = blockIdx.x * C::BQ + r;
  const bool valid = i < T;
  const int64_t ld = 3 * int64_t(D);
  const float* base = qkv + int64_t(b) * T * ld + int64_t(h) * Dh;  // q of row 0 of this head

  float q[SL], o[SL];
  load_slice<VEC>(q, base + int64_t(valid ? i : 0) * ld, d0, Dh, valid, qscale);
#pragma unroll
  for (int k = 0; k < SL; ++k) o[k] = 0.f;
  float m = -INFINITY, l = 0.f;

  for (int j0 = 0; j0 < T; j0 += BK) {
    __syncthreads();  // everyone is done with the previous tile
    load_tile<DH, VEC>(Ks, base + D, ld, j0, T, Dh);
    load_tile<DH, VEC>(Vs, base + 2 * D, ld, j0, T, Dh);
    __syncthreads();
    const float* kt = Ks + sl * C::PITCH;
    const float* vt = Vs + sl * C::PITCH;
    float s[BK];
#pragma unroll
    for (int j = 0; j < BK; ++j) s[j] = dot16(q, kt + j * SL);
    float mt = m;
#pragma unroll
    for (int j = 0; j < BK; ++j) {
      s[j] = slice_sum<C::NS>(s[j]);
      if (j0 + j >= T) s[j] = -INFINITY;
      mt = fmaxf(mt, s[j]);
    }
    // mt is finite: every tile holds at least one real key.
    const float alpha = exp2f(m - mt);  // 0 on the first tile (m = -inf)
    l *= alpha;
#pragma unroll
    for (int k = 0; k < SL; ++k) o[k] *= alpha;
#pragma unroll
    for (int j = 0; j < BK; ++j) {
      const float p = exp2f(s[j] - mt);
      l += p;
      axpy16(o, p, vt + j * SL);
    }
    m = mt;
  }
  if (valid) {
    store_slice<VEC>(out + (int64_t(b) * T + i) * D + int64_t(h) * Dh, o, d0, Dh, 1.f / l);
    if (sl == 0) lse[(int64_t(b) * H + h) * T + i] = (m + log2f(l)) * kLn2;
  }
}

// ---- backward, kernel 1: dQ (and Di) ---------------------------------------------------------

constexpr int CH = 8;  // rows of a tile handled per inner step (registers for scores / dP)

template <int DH, bool VEC>
__global__ void __launch_bounds__(Cfg<DH>::THREADS)
    attn_bwd_dq(const float* __restrict__ qkv, const float* __restrict__ out, const float* __restrict__ dout,
                const float* __restrict__ lse, float* __restrict__ dvec, float* __restrict__ dqkv, int T,
                int D, int H, int Dh, float qscale, float scale) {
  using C = Cfg<DH>;
  __shared__ __align__(16) float Ks[C::TILE];
  __shared__ __align__(16) float Vs[C::TILE];
  const int b = blockIdx.z, h = blockIdx.y;
  const int r = threadIdx.x / C::NS, sl = threadIdx.x % C::NS, d0 = sl * SL;
  const int i = blockIdx.x * C::BQ + r;
  const bool valid = i < T;
  const int ic = valid ? i : 0;
  const int64_t ld = 3 * int64_t(D);
  const float* base = qkv + int64_t(b) * T * ld + int64_t(h) * Dh;
  const int64_t orow = (int64_t(b) * T + ic) * D + int64_t(h) * Dh;  // row i of out / dout, this head
  const int64_t srow = (int64_t(b) * H + h) * T + ic;               // lse / Di index

  float q[SL], g[SL], dq[SL];
  load_slice<VEC>(q, base + int64_t(ic) * ld, d0, Dh, valid, qscale);
  load_slice<VEC>(g, out + orow, d0, Dh, valid, 1.f);  // O, only to form Di
  load_slice<VEC>(dq, dout + orow, d0, Dh, valid, 1.f);
  float di = 0.f;
#pragma unroll
  for (int k = 0; k < SL; ++k) di = fmaf(g[k], dq[k], di);
  di = slice_sum<C::NS>(di);
#pragma unroll
  for (int k = 0; k < SL; ++k) g[k] = dq[k], dq[k] = 0.f;  // g = dO from here on
  const float lse2 = valid ? lse[srow] * kLog2e : 0.f;
  if (valid && sl == 0) dvec[srow] = di;

  for (int j0 = 0; j0 < T; j0 += BK) {
    __syncthreads();
    load_tile<DH, VEC>(Ks, base + D, ld, j0, T, Dh);
    load_tile<DH, VEC>(Vs, base + 2 * D, ld, j0, T, Dh);
    __syncthreads();
    const float* kt = Ks + sl * C::PITCH;
    const float* vt = Vs + sl * C::PITCH;
#pragma unroll
    for (int c0 = 0; c0 < BK; c0 += CH) {
      float s[CH], dp[CH];
#pragma unroll
      for (int jj = 0; jj < CH; ++jj) {
        s[jj] = dot16(q, kt + (c0 + jj) * SL);
        dp[jj] = dot16(g, vt + (c0 + jj) * SL);
      }
#pragma unroll
      for (int jj = 0; jj < CH; ++jj) {
        const float sj = slice_sum<C::NS>(s[jj]), dpj = slice_sum<C::NS>(dp[jj]);
        const float p = j0 + c0 + jj < T ? exp2f(sj - lse2) : 0.f;
        axpy16(dq, p * (dpj - di), kt + (c0 + jj) * SL);
      }
    }
  }
  if (valid) store_slice<VEC>(dqkv + (int64_t(b) * T + i) * ld + int64_t(h) * Dh, dq, d0, Dh, scale);
}

// ---- backward, kernel 2: dK and dV -----------------------------------------------------------

template <int DH, bool VEC>
__global__ void __launch_bounds__(Cfg<DH>::THREADS)
    attn_bwd_dkv(const float* __restrict__ qkv, const float* __restrict__ dout, const float* __restrict__ lse,
                 const float* __restrict__ dvec, float* __restrict__ dqkv, int T, int D, int H, int Dh,
                 float qscale, float scale) {
  using C = Cfg<DH>;
  __shared__ __align__(16) float Qs[C::TILE];
  __shared__ __align__(16) float Gs[C::TILE];  // dO
  __shared__ float L2s[BK], Ds[BK];
  const int b = blockIdx.z, h = blockIdx.y;
  const int r = threadIdx.x / C::NS, sl = threadIdx.x % C::NS, d0 = sl * SL;
  const int j = blockIdx.x * C::BQ + r;  // this thread group's key row
  const bool valid = j < T;
  const int jc = valid ? j : 0;
  const int64_t ld = 3 * int64_t(D);
  const float* base = qkv + int64_t(b) * T * ld + int64_t(h) * Dh;
  const float* gbase = dout + int64_t(b) * T * D + int64_t(h) * Dh;
  const int64_t sbase = (int64_t(b) * H + h) * T;

  float k[SL], v[SL], dk[SL], dv[SL];
  load_slice<VEC>(k, base + int64_t(jc) * ld + D, d0, Dh, valid, qscale);  // scores in base 2
  load_slice<VEC>(v, base + int64_t(jc) * ld + 2 * D, d0, Dh, valid, 1.f);
#pragma unroll
  for (int c = 0; c < SL; ++c) dk[c] = 0.f, dv[c] = 0.f;

  for (int i0 = 0; i0 < T; i0 += BK) {
    __syncthreads();
    load_tile<DH, VEC>(Qs, base, ld, i0, T, Dh);
    load_tile<DH, VEC>(Gs, gbase, D, i0, T, Dh);
    for (int e = threadIdx.x; e < BK; e += C::THREADS) {
      const bool in = i0 + e < T;
      L2s[e] = in ? lse[sbase + i0 + e] * kLog2e : INFINITY;  // p = exp2(s - inf) = 0 past T
      Ds[e] = in ? dvec[sbase + i0 + e] : 0.f;
    }
    __syncthreads();
    const float* qt = Qs + sl * C::PITCH;
    const float* gt = Gs + sl * C::PITCH;
#pragma unroll
    for (int c0 = 0; c0 < BK; c0 += CH) {
      float s[CH], dp[CH];
#pragma unroll
      for (int ii = 0; ii < CH; ++ii) {
        s[ii] = dot16(k, qt + (c0 + ii) * SL);
        dp[ii] = dot16(v, gt + (c0 + ii) * SL);
      }
#pragma unroll
      for (int ii = 0; ii < CH; ++ii) {
        const float si = slice_sum<C::NS>(s[ii]), dpi = slice_sum<C::NS>(dp[ii]);
        const float p = exp2f(si - L2s[c0 + ii]);
        axpy16(dv, p, gt + (c0 + ii) * SL);
        axpy16(dk, p * (dpi - Ds[c0 + ii]), qt + (c0 + ii) * SL);
      }
    }
  }
  if (valid) {
    float* row = dqkv + (int64_t(b) * T + j) * ld + int64_t(h) * Dh;
    store_slice<VEC>(row + D, dk, d0, Dh, scale);
    store_slice<VEC>(row + 2 * D, dv, d0, Dh, 1.f);
  }
}

struct Dims {
  int B, T, D, H, Dh, DH;
  bool vec;
};

Dims check_qkv(const char* fn, const Tensor& qkv, int heads) {
  expect_cuda_f32(fn, "qkv", qkv);
  MV_CHECK(qkv.ndim() == 3 && qkv.size(2) % 3 == 0, "cuda::", fn, ": qkv ", qkv.str(),
           ": expected (B, T, 3D)");
  const int64_t D = qkv.size(2) / 3;
  MV_CHECK(heads >= 1 && D % heads == 0, "cuda::", fn, ": D = ", D, " (qkv ", qkv.str(),
           ") is not divisible by heads = ", heads);
  const int64_t Dh = D / heads;
  MV_CHECK(Dh >= 1 && Dh <= 64, "cuda::", fn, ": head dim ", Dh, " (qkv ", qkv.str(), ", heads ", heads,
           ") is outside 1..64, which the kernel supports");
  MV_CHECK(qkv.size(0) <= 65535 && qkv.size(1) < (int64_t(1) << 24) && qkv.numel() < (int64_t(1) << 40),
           "cuda::", fn, ": qkv ", qkv.str(), " too large");
  Dims d{int(qkv.size(0)), int(qkv.size(1)), int(D), heads, int(Dh), Dh <= 16 ? 16 : Dh <= 32 ? 32 : 64, false};
  d.vec = Dh % 4 == 0 && D % 4 == 0 && aligned16(qkv.raw());
  return d;
}

// Calls f.template operator()<DH, VEC>() for the padded head size and vector mode.
template <class F>
void dispatch_head(const Dims& d, F&& f) {
  if (d.DH == 16) return d.vec ? f.template operator()<16, true>() : f.template operator()<16, false>();
  if (d.DH == 32) return d.vec ? f.template operator()<32, true>() : f.template operator()<32, false>();
  return d.vec ? f.template operator()<64, true>() : f.template operator()<64, false>();
}

}  // namespace

AttentionOut attention_forward(const Tensor& qkv, int heads, bool /*for_backward: lse is always kept*/,
                               bool /*bf16*/) {
  const Dims d = check_qkv("attention_forward", qkv, heads);
  AttentionOut o{Tensor::empty({d.B, d.T, d.D}, DType::F32, Device::CUDA),
                 Tensor::empty({d.B, d.H, d.T}, DType::F32, Device::CUDA)};
  if (o.out.numel() == 0) return o;
  const bool vec = d.vec && aligned16(o.out.raw());
  const float qscale = kLog2e / std::sqrt(float(d.Dh));
  Dims dv = d;
  dv.vec = vec;
  dispatch_head(dv, [&]<int DH, bool VEC>() {
    using C = Cfg<DH>;
    const dim3 grid(unsigned(ceil_div(d.T, C::BQ)), unsigned(d.H), unsigned(d.B));
    attn_fwd<DH, VEC><<<grid, C::THREADS, 0, stream()>>>(qkv.data<float>(), o.out.data<float>(),
                                                         o.saved.data<float>(), d.T, d.D, d.H, d.Dh, qscale);
  });
  MV_CUDA_LAUNCH_CHECK();
  return o;
}

Tensor attention_backward(const Tensor& qkv, const Tensor& out, const Tensor& lse, const Tensor& dout,
                          int heads, bool /*bf16*/) {
  const char* fn = "attention_backward";
  Dims d = check_qkv(fn, qkv, heads);
  expect_cuda_f32(fn, "out", out);
  expect_cuda_f32(fn, "lse", lse);
  expect_cuda_f32(fn, "dout", dout);
  const Shape os{d.B, d.T, d.D}, ls{d.B, d.H, d.T};
  MV_CHECK(out.shape() == os && dout.shape() == os, "cuda::attention_backward: out ", out.str(), " and dout ",
           dout.str(), " must be ", shape_str(os), " for qkv ", qkv.str());
  MV_CHECK(lse.shape() == ls, "cuda::attention_backward: lse ", lse.str(), " must be ", shape_str(ls));
  Tensor dqkv = Tensor::empty(qkv.shape(), DType::F32, Device::CUDA);
  if (dqkv.numel() == 0) return dqkv;
  d.vec = d.vec && aligned16(out.raw()) && aligned16(dout.raw()) && aligned16(dqkv.raw());
  Tensor dvec = Tensor::empty(ls, DType::F32, Device::CUDA);  // Di = rowsum(dO * O)
  const float scale = 1.f / std::sqrt(float(d.Dh)), qscale = scale * kLog2e;
  dispatch_head(d, [&]<int DH, bool VEC>() {
    using C = Cfg<DH>;
    const dim3 grid(unsigned(ceil_div(d.T, C::BQ)), unsigned(d.H), unsigned(d.B));
    attn_bwd_dq<DH, VEC><<<grid, C::THREADS, 0, stream()>>>(
        qkv.data<float>(), out.data<float>(), dout.data<float>(), lse.data<float>(), dvec.data<float>(),
        dqkv.data<float>(), d.T, d.D, d.H, d.Dh, qscale, scale);
    MV_CUDA_LAUNCH_CHECK();
    attn_bwd_dkv<DH, VEC><<<grid, C::THREADS, 0, stream()>>>(
        qkv.data<float>(), dout.data<float>(), lse.data<float>(), dvec.data<float>(), dqkv.data<float>(),
        d.T, d.D, d.H, d.Dh, qscale, scale);
    MV_CUDA_LAUNCH_CHECK();
  });
  return dqkv;
}

}  // namespace mv::cuda
