// The CUDA side of the engine's memory hooks: a caching device allocator and host<->device
// copies on one stream.
//
// The allocator keeps freed blocks in per-size free lists (the same size classes as the CPU
// pool) and hands them out again, so a training step that repeats its shapes calls cudaMalloc
// only in its first iteration. When cudaMalloc fails, the cache is released and the request
// retried once; a second failure names the request and what the allocator holds.
#include "cuda/check.h"
#include "cuda/kernels.h"
#include "engine/memory.h"

namespace mv {
namespace {

BlockCache& cache() {
  static BlockCache* c = new BlockCache(512);  // never destroyed: the CUDA context may go first
  return *c;
}

int device_count() {
  static int n = [] {
    int c = 0;
    if (cudaGetDeviceCount(&c) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no device" error
      return 0;
    }
    return c;
  }();
  return n;
}

void* alloc(size_t bytes) {
  BlockCache& C = cache();
  const size_t c = C.size_class(bytes);
  if (void* p = C.take(c)) return p;
  void* p = nullptr;
  if (cudaMalloc(&p, c) != cudaSuccess) {
    cudaGetLastError();
    C.release([](void* q) { cudaFree(q); });
    if (cudaMalloc(&p, c) != cudaSuccess) {
      cudaGetLastError();
      C.cancel(c);
      const PoolStats st = C.stats();
      MV_FAIL("CUDA out of memory: asked for ", bytes, " bytes; the allocator holds ", st.in_use,
              " bytes in use (peak ", st.peak, ")");
    }
  }
  return p;
}

void free_block(void* p, size_t bytes) { cache().put(p, cache().size_class(bytes)); }

PoolStats stats() { return cache().stats(); }

void h2d(void* d, const void* s, size_t n) { MV_CUDA_CHECK(cudaMemcpy(d, s, n, cudaMemcpyHostToDevice)); }
void d2h(void* d, const void* s, size_t n) { MV_CUDA_CHECK(cudaMemcpy(d, s, n, cudaMemcpyDeviceToHost)); }
void d2d(void* d, const void* s, size_t n) { MV_CUDA_CHECK(cudaMemcpy(d, s, n, cudaMemcpyDeviceToDevice)); }
void zero(void* p, size_t n) { MV_CUDA_CHECK(cudaMemset(p, 0, n)); }
Tensor add(const Tensor& a, const Tensor& b) { return cuda::axpby(a, b, 1.f, 1.f); }

const CudaHooks kHooks{device_count, alloc, free_block, h2d, d2h, d2d, zero, stats,
                       cuda::copy_strided, cuda::fill, add, cuda::philox_normal};

}  // namespace

const CudaHooks* cuda_hooks() { return &kHooks; }

}  // namespace mv
