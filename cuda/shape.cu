// The shape ops' copies on the GPU, twins of ops/shape.cpp: a contiguous copy, writing a piece
// into (or copying it out of) a range along an axis, all through the strided copy of
// cuda/tensor.cu; and patchify, which has its own kernel.
//
// Patchify: the first step of ViT's patch embedding, images (B, C, H, W) to rows of flattened
// patches (B, N, C p p) that one GEMM then projects to the model width.
//
// It is a pure permutation of the elements: with gh = H/p, gw = W/p,
//   patches[b, gy gw + gx, (c p + i) p + j] = images[b, c, gy p + i, gx p + j].
// One thread per element of the patch tensor, walked in its row-major order, so the writes are
// coalesced; consecutive threads read along j, i.e. along an image row, p floats at a time. The
// backward (unpatchify) runs the same index map the other way round: every image element has
// exactly one patch element, so neither direction needs atomics.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace mv::cuda {
namespace {

constexpr int kThreads = 256;

struct PatchDims {
  int64_t C, H, W, p, gw, N, F;  // gw = W / p patches per row, N patches, F = C p p features each
  int64_t sb, sc, sh, sw;        // image strides (elements)
};

// Offset in the image of patch element (b, n, f).
__device__ __forceinline__ int64_t image_offset(int64_t b, int64_t n, int64_t f, const PatchDims& d) {
  const int64_t gy = n / d.gw, gx = n % d.gw;
  const int64_t c = f / (d.p * d.p), i = (f / d.p) % d.p, j = f % d.p;
  return b * d.sb + c * d.sc + (gy * d.p + i) * d.sh + (gx * d.p + j) * d.sw;
}

// TO_PATCHES: patches[e] = images[image_offset(e)]; else images[image_offset(e)] = patches[e].
template <bool TO_PATCHES>
__global__ void patch_kernel(const float* src, float* dst, int64_t total, PatchDims d) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t f = e % d.F, n = (e / d.F) % d.N, b = e / (d.F * d.N);
    const int64_t o = image_offset(b, n, f, d);
    if constexpr (TO_PATCHES) dst[e] = src[o];
    else dst[o] = src[e];
  }
}

template <bool TO_PATCHES>
void launch(const float* src, float* dst, int64_t total, const PatchDims& d) {
  if (total == 0) return;
  patch_kernel<TO_PATCHES><<<detail::grid_for(total, kThreads), kThreads, 0, stream()>>>(src, dst, total, d);
  MV_CUDA_LAUNCH_CHECK();
}

PatchDims dims(const char* fn, const Shape& s, int p) {
  MV_CHECK(s.size() == 4 && p >= 1 && s[2] % p == 0 && s[3] % p == 0, "cuda::", fn, ": images ",
           shape_str(s), " must be (B, C, H, W) with H and W multiples of the patch size ", p);
  PatchDims d{};
  d.C = s[1], d.H = s[2], d.W = s[3], d.p = p;
  d.gw = d.W / p;
  d.N = (d.H / p) * d.gw;
  d.F = d.C * p * p;
  return d;
}

// x's elements [start, start + len) along axis a, as a view.
Tensor slice_view(const Tensor& x, int a, int64_t start, int64_t len) {
  Shape shape = x.shape();
  shape[size_t(a)] = len;
  return x.view_as(shape, x.strides(), x.impl().offset + start * x.strides()[size_t(a)]);
}

}  // namespace

Tensor contiguous(const Tensor& x) {
  if (x.is_contiguous()) return x;
  Tensor out = Tensor::empty(x.shape(), x.dtype(), Device::CUDA);
  copy_strided(out, x);
  return out;
}

void place_along(const Tensor& dst, int axis, int64_t pos, const Tensor& src) {
  copy_strided(slice_view(dst, axis, pos, src.size(axis)), src);
}

Tensor take_along(const Tensor& src, int axis, int64_t pos, int64_t len) {
  return contiguous(slice_view(src, axis, pos, len));
}

Tensor patchify(const Tensor& images, int p) {
  MV_CHECK(images.defined() && images.device() == Device::CUDA && images.dtype() == DType::F32,
           "cuda::patchify: images must be an F32 CUDA tensor, got ", images.str());
  PatchDims d = dims("patchify", images.shape(), p);
  d.sb = images.strides()[0], d.sc = images.strides()[1], d.sh = images.strides()[2], d.sw = images.strides()[3];
  const int64_t B = images.size(0);
  Tensor out = Tensor::empty({B, d.N, d.F}, DType::F32, Device::CUDA);
  launch<true>(images.data<float>(), out.data<float>(), out.numel(), d);
  return out;
}

Tensor unpatchify(const Tensor& patches, const Shape& image_shape, int p) {
  detail::expect_cuda_f32("unpatchify", "patches", patches);
  PatchDims d = dims("unpatchify", image_shape, p);
  const int64_t B = image_shape[0];
  MV_CHECK(patches.shape() == Shape({B, d.N, d.F}), "cuda::unpatchify: patches ", patches.str(),
           " do not match images ", shape_str(image_shape), " with patch size ", p, ": expected (",
           B, ", ", d.N, ", ", d.F, ")");
  d.sw = 1, d.sh = d.W, d.sc = d.H * d.W, d.sb = d.C * d.H * d.W;  // the new image is contiguous
  Tensor out = Tensor::empty(image_shape, DType::F32, Device::CUDA);
  launch<false>(patches.data<float>(), out.data<float>(), patches.numel(), d);
  return out;
}

}  // namespace mv::cuda
