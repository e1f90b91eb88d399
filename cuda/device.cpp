// The CUDA side of the engine's memory hooks: a caching device allocator and host<->device
// copies on one stream.
//
// The allocator keeps freed blocks in per-size free lists (the same size classes as the CPU
// pool) and hands them out again, so a training step that repeats its shapes calls cudaMalloc
// only in its first iteration. When cudaMalloc fails, the cache is released and the request
// retried once; a second failure names the request and what the allocator holds.
#include <map>
#include <mutex>
#include <vector>

#include "cuda/check.h"
#include "cuda/kernels.h"
#include "engine/memory.h"

namespace mv {
namespace {

size_t size_class(size_t bytes) {
  if (bytes <= 512) return 512;
  if (bytes <= (1u << 20)) {
    size_t c = 512;
    while (c < bytes) c <<= 1;
    return c;
  }
  return (bytes + (1u << 20) - 1) & ~size_t((1u << 20) - 1);
}

struct DevicePool {
  std::mutex mu;
  std::map<size_t, std::vector<void*>> free_blocks;
  PoolStats stats;

  void release_cache() {
    for (auto& [size, blocks] : free_blocks)
      for (void* p : blocks) cudaFree(p);
    free_blocks.clear();
    stats.cached = 0;
  }
};

DevicePool& pool() {
  static DevicePool* p = new DevicePool;  // never destroyed: the CUDA context may be gone first
  return *p;
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
  const size_t c = size_class(bytes);
  DevicePool& P = pool();
  std::lock_guard<std::mutex> lock(P.mu);
  P.stats.in_use += c;
  P.stats.peak = std::max(P.stats.peak, P.stats.in_use);
  auto it = P.free_blocks.find(c);
  if (it != P.free_blocks.end() && !it->second.empty()) {
    void* p = it->second.back();
    it->second.pop_back();
    P.stats.cached -= c;
    return p;
  }
  void* p = nullptr;
  if (cudaMalloc(&p, c) != cudaSuccess) {
    cudaGetLastError();
    P.release_cache();
    if (cudaMalloc(&p, c) != cudaSuccess) {
      cudaGetLastError();
      P.stats.in_use -= c;
      MV_FAIL("CUDA out of memory: asked for ", bytes, " bytes; the allocator holds ",
              P.stats.in_use, " bytes in use (peak ", P.stats.peak, ")");
    }
  }
  P.stats.system_allocs++;
  return p;
}

void free_block(void* p, size_t bytes) {
  const size_t c = size_class(bytes);
  DevicePool& P = pool();
  std::lock_guard<std::mutex> lock(P.mu);
  P.free_blocks[c].push_back(p);
  P.stats.in_use -= c;
  P.stats.cached += c;
}

PoolStats stats() {
  std::lock_guard<std::mutex> lock(pool().mu);
  return pool().stats;
}

void h2d(void* d, const void* s, size_t n) { MV_CUDA_CHECK(cudaMemcpy(d, s, n, cudaMemcpyHostToDevice)); }
void d2h(void* d, const void* s, size_t n) { MV_CUDA_CHECK(cudaMemcpy(d, s, n, cudaMemcpyDeviceToHost)); }
void d2d(void* d, const void* s, size_t n) { MV_CUDA_CHECK(cudaMemcpy(d, s, n, cudaMemcpyDeviceToDevice)); }
void zero(void* p, size_t n) { MV_CUDA_CHECK(cudaMemset(p, 0, n)); }

const CudaHooks kHooks{device_count, alloc, free_block, h2d, d2h, d2d, zero, stats,
                       cuda::copy_strided};

}  // namespace

const CudaHooks* cuda_hooks() { return &kHooks; }

}  // namespace mv
