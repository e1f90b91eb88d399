// Elementwise kernels: GELU (tanh form) forward and backward, bias add, add, mul.
//
// All are memory-bound maps. One grid-stride kernel template per arity: when every pointer is
// 16-byte aligned, each thread moves float4s (one 16-byte load per input and one store per
// 4 elements, coalesced across the warp), and the n % 4 tail is done by the first threads of
// the grid; otherwise it runs element by element. The grid is sized to fill the device a few
// times over (grid_for), not one thread per element, so large tensors loop instead of
// launching millions of blocks.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace mv::cuda {
namespace {

using detail::aligned16;
using detail::expect_cuda_f32;
using detail::grid_for;

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
struct Add {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Mul {
  __device__ float operator()(float a, float b) const { return a * b; }
};

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

Tensor add(const Tensor& a, const Tensor& b) {
  expect_cuda_f32("add", "a", a);
  expect_cuda_f32("add", "b", b);
  expect_same_shape("add", a, b);
  Tensor y = Tensor::empty(a.shape(), DType::F32, Device::CUDA);
  launch_map2(a.data<float>(), b.data<float>(), y.data<float>(), a.numel(), Add{});
  return y;
}

Tensor mul(const Tensor& a, const Tensor& b) {
  expect_cuda_f32("mul", "a", a);
  expect_cuda_f32("mul", "b", b);
  expect_same_shape("mul", a, b);
  Tensor y = Tensor::empty(a.shape(), DType::F32, Device::CUDA);
  launch_map2(a.data<float>(), b.data<float>(), y.data<float>(), a.numel(), Mul{});
  return y;
}

}  // namespace mv::cuda
