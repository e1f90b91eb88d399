// The copies behind Tensor on the GPU (engine/memory.h's CudaHooks): a strided copy, which
// Tensor::contiguous and the shape ops' copies use, and fill. Plain grid-stride loops, one
// thread per element.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace mv::cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

// dst[idx . dst_stride] = src[idx . src_stride] for every multi-index idx (row-major order of i).
template <class T>
__global__ void strided_copy_kernel(T* dst, const T* src, int64_t n, Indexer<2> ix) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    int64_t off[2];
    ix.offsets(i, off);
    dst[off[0]] = src[off[1]];
  }
}

__global__ void fill_kernel(float* p, int64_t n, float v) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) p[i] = v;
}

}  // namespace

void copy_strided(const Tensor& dst, const Tensor& src) {
  MV_CHECK(dst.defined() && src.defined() && dst.device() == Device::CUDA &&
               src.device() == Device::CUDA,
           "cuda::copy_strided: both tensors must be CUDA tensors, got ", dst.str(), " and ",
           src.str());
  MV_CHECK(dst.shape() == src.shape() && dst.dtype() == src.dtype(), "cuda::copy_strided: dst ",
           dst.str(), " and src ", src.str(), " must have the same shape and dtype");
  MV_CHECK(dst.ndim() <= kMaxDims, "cuda::copy_strided: rank ", dst.ndim(), " > ", kMaxDims);
  const int64_t n = dst.numel();
  if (n == 0) return;
  const Indexer<2> L = Indexer<2>::make(dst.shape(), {&dst.strides(), &src.strides()});
  const unsigned g = grid_for(n, kThreads);
  switch (dtype_size(dst.dtype())) {
    case 4:
      strided_copy_kernel<uint32_t><<<g, kThreads, 0, stream()>>>(
          static_cast<uint32_t*>(dst.raw()), static_cast<const uint32_t*>(src.raw()), n, L);
      break;
    case 8:
      strided_copy_kernel<uint64_t><<<g, kThreads, 0, stream()>>>(
          static_cast<uint64_t*>(dst.raw()), static_cast<const uint64_t*>(src.raw()), n, L);
      break;
    case 2:
      strided_copy_kernel<uint16_t><<<g, kThreads, 0, stream()>>>(
          static_cast<uint16_t*>(dst.raw()), static_cast<const uint16_t*>(src.raw()), n, L);
      break;
    default: MV_FAIL("cuda::copy_strided: unsupported element size for ", dst.str());
  }
  MV_CUDA_LAUNCH_CHECK();
}

void fill(const Tensor& t, float value) {
  expect_cuda_f32("fill", "t", t);
  const int64_t n = t.numel();
  if (n == 0) return;
  fill_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(t.data<float>(), n, value);
  MV_CUDA_LAUNCH_CHECK();
}

}  // namespace mv::cuda
