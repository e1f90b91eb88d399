// Elementwise kernels, twins of ops/elementwise.cpp: GELU (tanh form) forward and backward, bias
// add, the binary ops with broadcasting, the other unary maps with their derivatives, and the
// scaled sum alpha a + beta b (the scalar ops).
//
// All are memory-bound maps. One grid-stride kernel template per arity: when every pointer is
// 16-byte aligned, each thread moves float4s (one 16-byte load per input and one store per
// 4 elements, coalesced across the warp), and the n % 4 tail is done by the first threads of
// the grid; otherwise it runs element by element. The grid is sized to fill the device a few
// times over (grid_for), not one thread per element, so large tensors loop instead of
// launching millions of blocks. Operands of different shapes (broadcasting) or strides go
// through one index-walking kernel instead (detail::Indexer): one thread per output element.
#include <algorithm>
#include <utility>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace mv::cuda {
namespace {

using detail::aligned16;
using detail::expect_cuda_f32;
using detail::grid_for;
using detail::Indexer;

constexpr int kThreads = 256;

// out[i] = f(a[i]) or f(a[i], b[i]); with VEC, four at a time.
template <bool VEC, class F>
__global__ void __launch_bounds__(kThreads) map1(const float* __restrict__ a, float* __restrict__ out, int64_t n, F f) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if constexpr (VEC) {
    const int64_t n4 = n / 4;
    for (int64_t i = tid; i < n4; i += stride) {
      float4 x = reinterpret_cast<const float4*>(a)[i];
      reinterpret_cast<float4*>(out)[i] = make_float4(f(x.x), f(x.y), f(x.z), f(x.w));
    }
    if (tid < n - 4 * n4) out[4 * n4 + tid] = f(a[4 * n4 + tid]);
  } else {
    for (int64_t i = tid; i < n; i += stride) out[i] = f(a[i]);
  }
}

template <bool VEC, class F>
__global__ void __launch_bounds__(kThreads) map2(const float* __restrict__ a, const float* __restrict__ b,
                                                 float* __restrict__ out, int64_t n, F f) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if constexpr (VEC) {
    const int64_t n4 = n / 4;
    for (int64_t i = tid; i < n4; i += stride) {
      float4 x = reinterpret_cast<const float4*>(a)[i];
      float4 y = reinterpret_cast<const float4*>(b)[i];
      reinterpret_cast<float4*>(out)[i] = make_float4(f(x.x, y.x), f(x.y, y.y), f(x.z, y.z), f(x.w, y.w));
    }
    if (tid < n - 4 * n4) out[4 * n4 + tid] = f(a[4 * n4 + tid], b[4 * n4 + tid]);
  } else {
    for (int64_t i = tid; i < n; i += stride) out[i] = f(a[i], b[i]);
  }
}

template <class F>
void launch_map1(const float* a, float* out, int64_t n, F f) {
  if (n == 0) return;
  const bool vec = aligned16(a) && aligned16(out);
  const unsigned g = grid_for(vec ? (n + 3) / 4 : n, kThreads);
  if (vec) map1<true><<<g, kThreads, 0, stream()>>>(a, out, n, f);
  else map1<false><<<g, kThreads, 0, stream()>>>(a, out, n, f);
  MV_CUDA_LAUNCH_CHECK();
}

template <class F>
void launch_map2(const float* a, const float* b, float* out, int64_t n, F f) {
  if (n == 0) return;
  const bool vec = aligned16(a) && aligned16(b) && aligned16(out);
  const unsigned g = grid_for(vec ? (n + 3) / 4 : n, kThreads);
  if (vec) map2<true><<<g, kThreads, 0, stream()>>>(a, b, out, n, f);
  else map2<false><<<g, kThreads, 0, stream()>>>(a, b, out, n, f);
  MV_CUDA_LAUNCH_CHECK();
}

// GELU, tanh form. u = c (x + k x^3), t = tanh(u):
//   y  = 0.5 x (1 + t)
//   y' = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 k x^2)
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluK = 0.044715f;

struct GeluFwd {
  __device__ float operator()(float x) const {
    const float t = tanhf(kGeluC * (x + kGeluK * x * x * x));
    return 0.5f * x * (1.f + t);
  }
};
struct GeluBwd {
  __device__ float operator()(float x, float dy) const {
    const float t = tanhf(kGeluC * (x + kGeluK * x * x * x));
    const float du = kGeluC * (1.f + 3.f * kGeluK * x * x);
    return dy * (0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * du);
  }
};
struct BinaryFn {
  Binary op;
  __device__ float operator()(float a, float b) const {
    switch (op) {
      case Binary::Add: return a + b;
      case Binary::Sub: return a - b;
      case Binary::Mul: return a * b;
      default: return a / b;
    }
  }
};

// out[i] = a[off_a(i)] (op) b[off_b(i)]: broadcasting (stride 0) and strided operands.
__global__ void __launch_bounds__(kThreads) binary_strided(const float* a, const float* b, float* __restrict__ out,
                                                           int64_t n, Indexer<2> ix, BinaryFn f) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    int64_t off[2];
    ix.offsets(i, off);
    out[i] = f(a[off[0]], b[off[1]]);
  }
}

constexpr float kInvSqrt2 = 0.7071067811865476f, kInvSqrt2Pi = 0.3989422804014327f;

struct UnaryFwd {
  Unary f;
  float p;
  __device__ float operator()(float x) const {
    switch (f) {
      case Unary::Exp: return expf(x);
      case Unary::Log: return logf(x);
      case Unary::Sqrt: return sqrtf(x);
      case Unary::Rsqrt: return rsqrtf(x);
      case Unary::Tanh: return tanhf(x);
      case Unary::Pow: return powf(x, p);
      case Unary::Relu: return x > 0.f ? x : 0.f;
      case Unary::GeluErf: return 0.5f * x * (1.f + erff(x * kInvSqrt2));
      default: return 0.5f * erfcf(-x * kInvSqrt2);  // NormalCdf; erfc keeps the far left tail accurate
    }
  }
};

// dx = dy * f'(x), with y = f(x) where that is the cheaper form.
struct UnaryBwd {
  Unary f;
  float p;
  __device__ float grad(float x, float y) const {
    switch (f) {
      case Unary::Exp: return y;
      case Unary::Log: return 1.f / x;
      case Unary::Sqrt: return 0.5f / y;
      case Unary::Rsqrt: return -0.5f * y * y * y;
      case Unary::Tanh: return 1.f - y * y;
      case Unary::Pow: return p * powf(x, p - 1.f);
      case Unary::Relu: return x > 0.f ? 1.f : 0.f;
      case Unary::GeluErf: return 0.5f * (1.f + erff(x * kInvSqrt2)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
      default: return kInvSqrt2Pi * expf(-0.5f * x * x);  // NormalCdf: the normal density
    }
  }
};

// dx[i] = dy[i] * f'(x[i], y[i]): three inputs, element by element (not a hot path).
__global__ void __launch_bounds__(kThreads) unary_bwd_kernel(const float* __restrict__ x, const float* __restrict__ y,
                                                             const float* __restrict__ dy, float* __restrict__ dx,
                                                             int64_t n, UnaryBwd f) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dx[i] = dy[i] * f.grad(x[i], y[i]);
}

// out[r, c] = x[r, c] + b[c] over (R, C). VEC (C % 4 == 0, aligned): thread i handles the
// float4 at flat element 4i, whose 4 columns are 4i % C .. + 3 (never crossing a row).
template <bool VEC>
__global__ void __launch_bounds__(kThreads) bias_kernel(const float* x, const float* __restrict__ b, float* out, int64_t n, int64_t C) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if constexpr (VEC) {
    for (int64_t i = tid; i < n / 4; i += stride) {
      const float4 v = reinterpret_cast<const float4*>(x)[i];
      const float4 w = *reinterpret_cast<const float4*>(b + (4 * i) % C);
      reinterpret_cast<float4*>(out)[i] = make_float4(v.x + w.x, v.y + w.y, v.z + w.z, v.w + w.w);
    }
  } else {
    for (int64_t i = tid; i < n; i += stride) out[i] = x[i] + b[i % C];
  }
}

void launch_bias(const float* x, const float* b, float* out, int64_t R, int64_t C) {
  const int64_t n = R * C;
  if (n == 0) return;
  const bool vec = C % 4 == 0 && aligned16(x) && aligned16(b) && aligned16(out);
  const unsigned g = grid_for(vec ? n / 4 : n, kThreads);
  if (vec) bias_kernel<true><<<g, kThreads, 0, stream()>>>(x, b, out, n, C);
  else bias_kernel<false><<<g, kThreads, 0, stream()>>>(x, b, out, n, C);
  MV_CUDA_LAUNCH_CHECK();
}

__global__ void axpby_kernel(const float* a, const float* b, float* out, int64_t n, float alpha,
                             float beta) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = b ? alpha * a[i] + beta * b[i] : alpha * a[i] + beta;
}

void expect_same_shape(const char* fn, const Tensor& a, const Tensor& b) {
  MV_CHECK(a.shape() == b.shape(), "cuda::", fn, ": shapes differ: ", a.str(), " and ", b.str());
}

}  // namespace

namespace detail {
void add_bias_inplace(float* y, const float* b, int64_t R, int64_t C) { launch_bias(y, b, y, R, C); }
}  // namespace detail

Tensor gelu_forward(const Tensor& x) {
  expect_cuda_f32("gelu_forward", "x", x);
  Tensor y = Tensor::empty(x.shape(), DType::F32, Device::CUDA);
  launch_map1(x.data<float>(), y.data<float>(), x.numel(), GeluFwd{});
  return y;
}

Tensor gelu_backward(const Tensor& x, const Tensor& dy) {
  expect_cuda_f32("gelu_backward", "x", x);
  expect_cuda_f32("gelu_backward", "dy", dy);
  expect_same_shape("gelu_backward", x, dy);
  Tensor dx = Tensor::empty(x.shape(), DType::F32, Device::CUDA);
  launch_map2(x.data<float>(), dy.data<float>(), dx.data<float>(), x.numel(), GeluBwd{});
  return dx;
}

Tensor add_bias(const Tensor& x, const Tensor& b) {
  expect_cuda_f32("add_bias", "x", x);
  expect_cuda_f32("add_bias", "b", b);
  MV_CHECK(x.ndim() >= 1 && b.ndim() == 1 && b.size(0) == x.size(-1), "cuda::add_bias: x ", x.str(),
           ", b ", b.str(), ": expected x (..., C) and b (C)");
  Tensor y = Tensor::empty(x.shape(), DType::F32, Device::CUDA);
  const int64_t C = x.size(-1);
  if (C > 0) launch_bias(x.data<float>(), b.data<float>(), y.data<float>(), x.numel() / C, C);
  return y;
}

Tensor binary(const Tensor& a, const Tensor& b, Binary op) {
  for (auto [t, name] : {std::pair{&a, "a"}, {&b, "b"}})
    MV_CHECK(t->defined() && t->device() == Device::CUDA && t->dtype() == DType::F32, "cuda::binary: ",
             name, " must be an F32 CUDA tensor, got ", t->defined() ? t->str() : "undefined");
  if (op == Binary::Add && a.shape() != b.shape()) {  // x + bias: the row kernel
    const bool b_small = b.numel() <= a.numel();
    const Tensor& big = b_small ? a : b;
    const Tensor& small = b_small ? b : a;
    const int64_t C = small.ndim() <= big.ndim() ? detail::bias_width(small.shape(), big.shape()) : -1;
    if (C >= 0) {  // then the broadcast shape is big's
      const int64_t R = C == 0 ? 0 : big.numel() / C;
      return add_bias(big.reshaped({R, C}), small.reshaped({C})).reshaped(big.shape());
    }
  }
  if (a.shape() == b.shape() && a.is_contiguous() && b.is_contiguous()) {
    Tensor y = Tensor::empty(a.shape(), DType::F32, Device::CUDA);
    launch_map2(a.data<float>(), b.data<float>(), y.data<float>(), a.numel(), BinaryFn{op});
    return y;
  }
  // Broadcast shape (NumPy rules: align the trailing dims; a size-1 dim stretches).
  const size_t r = std::max(a.shape().size(), b.shape().size());
  MV_CHECK(r <= size_t(detail::kMaxDims), "cuda::binary: ", a.str(), " and ", b.str(), ": rank > ",
           detail::kMaxDims);
  Shape out(r, 1), sa(r, 0), sb(r, 0);
  for (size_t d = 0; d < r; ++d) {
    const size_t pa = d + a.shape().size(), pb = d + b.shape().size();  // index + r, to stay unsigned
    const int64_t na = pa >= r ? a.shape()[pa - r] : 1, nb = pb >= r ? b.shape()[pb - r] : 1;
    MV_CHECK(na == nb || na == 1 || nb == 1, "cuda::binary: shapes ", a.str(), " and ", b.str(),
             " do not broadcast (axis ", d, " of the result: ", na, " vs ", nb, ")");
    out[d] = na == 1 ? nb : na;
    if (pa >= r && na != 1) sa[d] = a.strides()[pa - r];
    if (pb >= r && nb != 1) sb[d] = b.strides()[pb - r];
  }
  Tensor y = Tensor::empty(out, DType::F32, Device::CUDA);
  const int64_t n = y.numel();
  if (n == 0) return y;
  binary_strided<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
      a.data<float>(), b.data<float>(), y.data<float>(), n, Indexer<2>::make(out, {&sa, &sb}), BinaryFn{op});
  MV_CUDA_LAUNCH_CHECK();
  return y;
}

Tensor axpby(const Tensor& a, const Tensor& b, float alpha, float beta) {
  expect_cuda_f32("axpby", "a", a);
  if (b.defined()) {
    expect_cuda_f32("axpby", "b", b);
    MV_CHECK(a.shape() == b.shape(), "cuda::axpby: shapes differ: ", a.str(), " and ", b.str());
  }
  Tensor out = Tensor::empty(a.shape(), DType::F32, Device::CUDA);
  const int64_t n = a.numel();
  if (n == 0) return out;
  axpby_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
      a.data<float>(), b.defined() ? b.data<float>() : nullptr, out.data<float>(), n, alpha, beta);
  MV_CUDA_LAUNCH_CHECK();
  return out;
}

Tensor unary_forward(const Tensor& x, Unary f, float p) {
  expect_cuda_f32("unary_forward", "x", x);
  Tensor y = Tensor::empty(x.shape(), DType::F32, Device::CUDA);
  launch_map1(x.data<float>(), y.data<float>(), x.numel(), UnaryFwd{f, p});
  return y;
}

Tensor unary_backward(const Tensor& x, const Tensor& y, const Tensor& dy, Unary f, float p) {
  expect_cuda_f32("unary_backward", "x", x);
  expect_cuda_f32("unary_backward", "y", y);
  expect_cuda_f32("unary_backward", "dy", dy);
  expect_same_shape("unary_backward", x, y);
  expect_same_shape("unary_backward", x, dy);
  Tensor dx = Tensor::empty(x.shape(), DType::F32, Device::CUDA);
  const int64_t n = x.numel();
  if (n == 0) return dx;
  unary_bwd_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
      x.data<float>(), y.data<float>(), dy.data<float>(), dx.data<float>(), n, UnaryBwd{f, p});
  MV_CUDA_LAUNCH_CHECK();
  return dx;
}

}  // namespace mv::cuda
