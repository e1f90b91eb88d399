#include "engine/memory.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "engine/error.h"

namespace mv {
namespace {

// Size classes: powers of two up to 1 MiB, then multiples of 1 MiB. Waste stays under 2x for
// small blocks and under 1 MiB for large ones.
size_t size_class(size_t bytes) {
  if (bytes <= 64) return 64;
  if (bytes <= (1u << 20)) {
    size_t c = 64;
    while (c < bytes) c <<= 1;
    return c;
  }
  return (bytes + (1u << 20) - 1) & ~size_t((1u << 20) - 1);
}

struct CpuPool {
  std::mutex mu;
  std::map<size_t, std::vector<void*>> free_blocks;
  PoolStats stats;

  ~CpuPool() { release(); }
  void release() {
    for (auto& [size, blocks] : free_blocks)
      for (void* p : blocks) std::free(p);
    free_blocks.clear();
    stats.cached = 0;
  }
};

CpuPool& pool() {
  static CpuPool* p = new CpuPool;  // never destroyed: tensors may outlive static destructors
  return *p;
}

}  // namespace

void* cpu_alloc(size_t bytes) {
  size_t c = size_class(bytes);
  CpuPool& P = pool();
  {
    std::lock_guard<std::mutex> lock(P.mu);
    auto it = P.free_blocks.find(c);
    if (it != P.free_blocks.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      P.stats.cached -= c;
      P.stats.in_use += c;
      if (P.stats.in_use > P.stats.peak) P.stats.peak = P.stats.in_use;
      return p;
    }
    P.stats.in_use += c;
    P.stats.system_allocs++;
    if (P.stats.in_use > P.stats.peak) P.stats.peak = P.stats.in_use;
  }
  void* p = std::aligned_alloc(64, c);
  MV_CHECK(p != nullptr, "cpu_alloc: out of memory asking for ", bytes, " bytes (pool holds ",
           P.stats.in_use, " in use, ", P.stats.cached, " cached)");
  return p;
}

void cpu_free(void* p, size_t bytes) {
  if (!p) return;
  size_t c = size_class(bytes);
  CpuPool& P = pool();
  std::lock_guard<std::mutex> lock(P.mu);
  P.free_blocks[c].push_back(p);
  P.stats.in_use -= c;
  P.stats.cached += c;
}

PoolStats cpu_pool_stats() {
  std::lock_guard<std::mutex> lock(pool().mu);
  return pool().stats;
}

void cpu_pool_release() {
  std::lock_guard<std::mutex> lock(pool().mu);
  pool().release();
}

bool cuda_available() {
  const CudaHooks* h = cuda_hooks();
  return h && h->device_count() > 0;
}

static const CudaHooks& require_cuda(const char* what) {
  const CudaHooks* h = cuda_hooks();
  MV_CHECK(h, what, ": this build has no CUDA backend (configure with -Dcuda=enabled)");
  MV_CHECK(h->device_count() > 0, what, ": no CUDA device is present");
  return *h;
}

Storage::Storage(size_t bytes, Device device) : bytes_(bytes), device_(device) {
  if (bytes == 0) return;
  ptr_ = device == Device::CPU ? cpu_alloc(bytes) : require_cuda("Storage").alloc(bytes);
}

Storage::~Storage() {
  if (!ptr_) return;
  if (device_ == Device::CPU)
    cpu_free(ptr_, bytes_);
  else
    cuda_hooks()->free(ptr_, bytes_);
}

void copy_bytes(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes) {
  if (bytes == 0) return;
  if (dst_dev == Device::CPU && src_dev == Device::CPU) {
    std::memcpy(dst, src, bytes);
    return;
  }
  const CudaHooks& h = require_cuda("copy");
  if (dst_dev == Device::CUDA && src_dev == Device::CPU) h.copy_h2d(dst, src, bytes);
  else if (dst_dev == Device::CPU) h.copy_d2h(dst, src, bytes);
  else h.copy_d2d(dst, src, bytes);
}

}  // namespace mv
