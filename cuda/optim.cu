// The optimizer updates on the GPU, twins of ops/optim.cpp: AdamW over all parameters in one
// launch, SGD one tensor per launch, and the sum of squares behind gradient-norm clipping.
//
// AdamW over a whole list of parameters in one launch (a multi-tensor apply).
//
// Per element, in torch.optim.AdamW's order (decoupled weight decay, bias-corrected moments), with
// g = grad * grad_scale (the clip scale; gradients themselves are never written):
//   p = p * (1 - lr * wd)
//   m = m + (g - m) * (1 - beta1)                 (torch's lerp)
//   v = v * beta2 + (1 - beta2) * g * g
//   p = p - (lr / bc1) * (m / (sqrt(v) / sqrt(bc2) + eps)),   bc1 = 1 - beta1^step, bc2 = 1 - beta2^step
//
// The tensors are cut into chunks of kChunk elements. The host builds a table with one entry per
// tensor (its four pointers, size, weight decay, whether all four are 16-byte aligned, and its
// first chunk) and one int per chunk naming its tensor; block b updates chunk b, b + gridDim, ...
// So one launch covers every tensor whatever their sizes, and blocks stay evenly loaded.
//
// The table travels in one cudaMemcpyAsync from a pinned host buffer into a device buffer. Both
// are kept between calls; before the pinned buffer is rewritten the host waits on an event
// recorded after the previous copy (which finished long ago in a training loop), so the call
// never blocks on the GPU's queue of work the way a pageable cudaMemcpy would.
#include <cmath>
#include <cstring>
#include <mutex>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace mv::cuda {
namespace {

using namespace detail;

constexpr int64_t kChunk = 16384;  // elements per chunk: 64 KB per array
constexpr int kThreads = 256;

struct Entry {
  float* p;
  const float* g;
  float* m;
  float* v;
  int64_t n;
  int64_t first_chunk;
  float wd;
  int vec;
};

struct Hyper {
  float lr, b1, b2, eps, step_size, sqrt_bc2, gs;
};

__device__ __forceinline__ void adam_one(float& p, float g, float& m, float& v, float wd, const Hyper& h) {
  g *= h.gs;
  p *= 1.f - h.lr * wd;
  m += (g - m) * (1.f - h.b1);
  v = v * h.b2 + (1.f - h.b2) * g * g;
  p -= h.step_size * (m / (sqrtf(v) / h.sqrt_bc2 + h.eps));
}

__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const Entry* __restrict__ table, const int* __restrict__ chunk_tensor, int64_t nchunks, Hyper h) {
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const Entry e = table[chunk_tensor[c]];
    const int64_t begin = (c - e.first_chunk) * kChunk;
    const int64_t end = begin + kChunk < e.n ? begin + kChunk : e.n;
    if (e.vec) {  // kChunk % 4 == 0, so chunks start on float4 boundaries
      const int64_t end4 = begin + (end - begin) / 4 * 4;
      for (int64_t i = begin + 4 * threadIdx.x; i < end4; i += 4 * kThreads) {
        float4 p = *reinterpret_cast<float4*>(e.p + i);
        const float4 g = *reinterpret_cast<const float4*>(e.g + i);
        float4 m = *reinterpret_cast<float4*>(e.m + i);
        float4 v = *reinterpret_cast<float4*>(e.v + i);
        adam_one(p.x, g.x, m.x, v.x, e.wd, h);
        adam_one(p.y, g.y, m.y, v.y, e.wd, h);
        adam_one(p.z, g.z, m.z, v.z, e.wd, h);
        adam_one(p.w, g.w, m.w, v.w, e.wd, h);
        *reinterpret_cast<float4*>(e.p + i) = p;
        *reinterpret_cast<float4*>(e.m + i) = m;
        *reinterpret_cast<float4*>(e.v + i) = v;
      }
      for (int64_t i = end4 + threadIdx.x; i < end; i += kThreads) adam_one(e.p[i], e.g[i], e.m[i], e.v[i], e.wd, h);
    } else {
      for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) adam_one(e.p[i], e.g[i], e.m[i], e.v[i], e.wd, h);
    }
  }
}

// The pinned staging buffer, the device table and the event guarding the staging buffer.
struct Staging {
  std::mutex mu;
  void* host = nullptr;
  void* dev = nullptr;
  size_t cap = 0;
  cudaEvent_t copied = nullptr;
  bool pending = false;

  void ensure(size_t bytes) {
    if (!copied) MV_CUDA_CHECK(cudaEventCreateWithFlags(&copied, cudaEventDisableTiming));
    if (pending) MV_CUDA_CHECK(cudaEventSynchronize(copied));  // last copy out of `host` is done
    pending = false;
    if (bytes <= cap) return;
    if (host) MV_CUDA_CHECK(cudaFreeHost(host));
    if (dev) MV_CUDA_CHECK(cudaFree(dev));  // synchronises: earlier kernels reading it are done
    cap = bytes * 2;
    MV_CUDA_CHECK(cudaMallocHost(&host, cap));
    MV_CUDA_CHECK(cudaMalloc(&dev, cap));
  }
};

// SGD with momentum and coupled weight decay (torch.optim.SGD's update), a plain grid-stride map:
//   g = grad * grad_scale + wd * p;  buf = momentum * buf + g;  p -= lr * buf.
__global__ void sgd_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buf,
                           int64_t n, float lr, float momentum, float wd, float gs) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float b = momentum * buf[i] + g[i] * gs + wd * p[i];
    buf[i] = b;
    p[i] -= lr * b;
  }
}

Staging& staging() {
  static Staging* s = new Staging;  // never destroyed: the CUDA context may be gone at exit
  return *s;
}

}  // namespace

void adamw_step(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                const std::vector<Tensor>& m, const std::vector<Tensor>& v, float lr, float beta1,
                float beta2, float eps, const std::vector<float>& weight_decays, int64_t step,
                float grad_scale) {
  const size_t T = params.size();
  MV_CHECK(grads.size() == T && m.size() == T && v.size() == T && weight_decays.size() == T,
           "cuda::adamw_step: list lengths differ: ", T, " params, ", grads.size(), " grads, ",
           m.size(), " m, ", v.size(), " v, ", weight_decays.size(), " weight decays");
  MV_CHECK(step >= 1, "cuda::adamw_step: step must be >= 1, got ", step);
  MV_CHECK(beta1 >= 0.f && beta1 < 1.f && beta2 >= 0.f && beta2 < 1.f, "cuda::adamw_step: betas (",
           beta1, ", ", beta2, ") must lie in [0, 1)");
  if (T == 0) return;

  std::vector<Entry> entries(T);
  std::vector<int> chunk_tensor;
  int64_t chunks = 0;
  for (size_t i = 0; i < T; ++i) {
    for (const auto* list : {&params, &grads, &m, &v}) {
      const Tensor& t = (*list)[i];
      MV_CHECK(t.defined() && t.device() == Device::CUDA && t.dtype() == DType::F32 && t.is_contiguous(),
               "cuda::adamw_step: tensor ", i, " of ", list == &params ? "params" : list == &grads ? "grads" : list == &m ? "m" : "v",
               " must be a contiguous F32 CUDA tensor, got ", t.str());
    }
    MV_CHECK(grads[i].shape() == params[i].shape() && m[i].shape() == params[i].shape() &&
                 v[i].shape() == params[i].shape(),
             "cuda::adamw_step: tensor ", i, ": param ", params[i].str(), ", grad ", grads[i].str(),
             ", m ", m[i].str(), ", v ", v[i].str(), " differ in shape");
    Entry& e = entries[i];
    e.p = params[i].data<float>();
    e.g = grads[i].data<float>();
    e.m = m[i].data<float>();
    e.v = v[i].data<float>();
    e.n = params[i].numel();
    e.wd = weight_decays[i];
    e.vec = aligned16(e.p) && aligned16(e.g) && aligned16(e.m) && aligned16(e.v);
    e.first_chunk = chunks;
    const int64_t c = ceil_div(e.n, kChunk);
    chunk_tensor.insert(chunk_tensor.end(), size_t(c), int(i));
    chunks += c;
  }
  if (chunks == 0) return;

  // Bias corrections in double: beta^step for large steps underflows gracefully to 0.
  const double bc1 = 1.0 - std::pow(double(beta1), double(step));
  const double bc2 = 1.0 - std::pow(double(beta2), double(step));
  const Hyper h{lr, beta1, beta2, eps, float(double(lr) / bc1), float(std::sqrt(bc2)), grad_scale};

  const size_t table_bytes = T * sizeof(Entry);
  const size_t bytes = table_bytes + size_t(chunks) * sizeof(int);
  Staging& s = staging();
  std::lock_guard<std::mutex> lock(s.mu);
  s.ensure(bytes);
  std::memcpy(s.host, entries.data(), table_bytes);
  std::memcpy(static_cast<char*>(s.host) + table_bytes, chunk_tensor.data(), size_t(chunks) * sizeof(int));
  MV_CUDA_CHECK(cudaMemcpyAsync(s.dev, s.host, bytes, cudaMemcpyHostToDevice, stream()));
  MV_CUDA_CHECK(cudaEventRecord(s.copied, stream()));
  s.pending = true;
  const Entry* dt = static_cast<const Entry*>(s.dev);
  const int* dc = reinterpret_cast<const int*>(static_cast<const char*>(s.dev) + table_bytes);
  const unsigned grid = unsigned(std::min<int64_t>(chunks, int64_t(sm_count()) * 8));
  adamw_kernel<<<grid, kThreads, 0, stream()>>>(dt, dc, chunks, h);
  MV_CUDA_LAUNCH_CHECK();
}

void sgd_step(const Tensor& p, const Tensor& grad, const Tensor& buf, float lr, float momentum,
              float wd, float grad_scale) {
  detail::expect_cuda_f32("sgd_step", "p", p);
  detail::expect_cuda_f32("sgd_step", "grad", grad);
  detail::expect_cuda_f32("sgd_step", "buf", buf);
  MV_CHECK(grad.shape() == p.shape() && buf.shape() == p.shape(), "cuda::sgd_step: p ", p.str(),
           ", grad ", grad.str(), ", buf ", buf.str(), " differ in shape");
  const int64_t n = p.numel();
  if (n == 0) return;
  sgd_kernel<<<detail::grid_for(n, kThreads), kThreads, 0, stream()>>>(
      p.data<float>(), grad.data<float>(), buf.data<float>(), n, lr, momentum, wd, grad_scale);
  MV_CUDA_LAUNCH_CHECK();
}

// Each tensor's sum of squares (x * x, then the one-block sum), added up on the device: one host
// read for all of them.
double sum_of_squares(const std::vector<Tensor>& xs) {
  Tensor total;
  for (const Tensor& x_ : xs) {
    const Tensor x = x_.contiguous();
    const Tensor s = sum_all(binary(x, x, Binary::Mul), 1.f);
    total = total.defined() ? binary(total, s, Binary::Add) : s;
  }
  return total.defined() ? double(total.item()) : 0.0;
}

}  // namespace mv::cuda
