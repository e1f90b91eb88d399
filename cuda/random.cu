// Philox random tensors on the device: element i of philox_uniform / philox_normal is
// mv::philox::uniform(seed, offset, i) / mv::philox::normal(seed, offset, i) (engine/philox.h,
// the same header the CPU's rand / randn use), so a CPU and a GPU run draw the same numbers.
//
// Thread mapping: one thread per Philox block, not per element. A block's 128 random bits serve
// 4 uniform draws (lanes x, y, z, w -> elements 4k .. 4k+3) or 2 normal draws (Box-Muller on
// x, y: element 2k takes the cosine, 2k+1 the sine), so the 10-round cipher runs once per
// block instead of once per element. The arithmetic per element is philox.h's own (uniform: top
// 24 bits times 2^-24, exact; normal: philox::normal_pair, plain float steps with no libm call),
// which the parity test checks against the CPU. Grid-stride loop; stores are coalesced across the
// warp.
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "engine/philox.h"

namespace mv::cuda {
namespace {

using namespace detail;

__global__ void __launch_bounds__(256) uniform_kernel(float* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t blocks = (n + 3) / 4;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < blocks; k += int64_t(gridDim.x) * blockDim.x) {
    const philox::U4 b = philox::block(seed, offset + uint64_t(k));
    const int64_t i = 4 * k;
    out[i] = philox::to_unit(b.x);  // == philox::uniform(seed, offset, i)
    if (i + 1 < n) out[i + 1] = philox::to_unit(b.y);
    if (i + 2 < n) out[i + 2] = philox::to_unit(b.z);
    if (i + 3 < n) out[i + 3] = philox::to_unit(b.w);
  }
}

__global__ void __launch_bounds__(256) normal_kernel(float* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t blocks = (n + 1) / 2;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < blocks; k += int64_t(gridDim.x) * blockDim.x) {
    // philox::normal(seed, offset, 2k) and (.., 2k + 1), one block and one pair.
    float c, s;
    philox::normal_pair(philox::block(seed, offset + uint64_t(k)), c, s);
    out[2 * k] = c;
    if (2 * k + 1 < n) out[2 * k + 1] = s;
  }
}

}  // namespace

Tensor philox_uniform(const Shape& shape, uint64_t seed, uint64_t offset) {
  Tensor t = Tensor::empty(shape, DType::F32, Device::CUDA);
  const int64_t n = t.numel();
  if (n == 0) return t;
  uniform_kernel<<<grid_for((n + 3) / 4, 256), 256, 0, stream()>>>(t.data<float>(), n, seed, offset);
  MV_CUDA_LAUNCH_CHECK();
  return t;
}

Tensor philox_normal(const Shape& shape, uint64_t seed, uint64_t offset) {
  Tensor t = Tensor::empty(shape, DType::F32, Device::CUDA);
  const int64_t n = t.numel();
  if (n == 0) return t;
  normal_kernel<<<grid_for((n + 1) / 2, 256), 256, 0, stream()>>>(t.data<float>(), n, seed, offset);
  MV_CUDA_LAUNCH_CHECK();
  return t;
}

}  // namespace mv::cuda
