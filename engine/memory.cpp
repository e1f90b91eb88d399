#include "engine/memory.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <unistd.h>

#include "engine/error.h"

namespace mv {

size_t BlockCache::size_class(size_t bytes) const {
  if (bytes <= (1u << 20)) {
    size_t c = min_class_;
    while (c < bytes) c <<= 1;
    return c;
  }
  return (bytes + (1u << 20) - 1) & ~size_t((1u << 20) - 1);
}

void* BlockCache::take(size_t c) {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.in_use += c;
  stats_.peak = std::max(stats_.peak, stats_.in_use);
  auto it = free_.find(c);
  if (it == free_.end() || it->second.empty()) {
    stats_.system_allocs++;
    return nullptr;
  }
  void* p = it->second.back();
  it->second.pop_back();
  stats_.cached -= c;
  return p;
}

void BlockCache::cancel(size_t c) {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.in_use -= c;
  stats_.system_allocs--;
}

void BlockCache::put(void* p, size_t c) {
  std::lock_guard<std::mutex> lock(mu_);
  free_[c].push_back(p);
  stats_.in_use -= c;
  stats_.cached += c;
}

void BlockCache::release(void (*free_block)(void*)) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [size, blocks] : free_)
    for (void* p : blocks) free_block(p);
  free_.clear();
  stats_.cached = 0;
}

PoolStats BlockCache::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

static BlockCache& cpu_cache() {
  static BlockCache* c = new BlockCache(64);  // never destroyed: tensors may outlive statics
  return *c;
}

void* cpu_alloc(size_t bytes) {
  BlockCache& cache = cpu_cache();
  const size_t c = cache.size_class(bytes);
  if (void* p = cache.take(c)) return p;
  void* p = std::aligned_alloc(64, c);
  if (!p) {
    cache.cancel(c);
    const PoolStats st = cache.stats();
    MV_FAIL("cpu_alloc: out of memory asking for ", bytes, " bytes (pool holds ", st.in_use,
            " in use, ", st.cached, " cached)");
  }
  return p;
}

void cpu_free(void* p, size_t bytes) {
  if (p) cpu_cache().put(p, cpu_cache().size_class(bytes));
}

PoolStats cpu_pool_stats() { return cpu_cache().stats(); }

void cpu_pool_release() { cpu_cache().release(std::free); }

bool cuda_available() {
  const CudaHooks* h = cuda_hooks();
  return h && h->device_count() > 0;
}

double available_memory_bytes() {
  std::ifstream in("/proc/meminfo");
  for (std::string key; in >> key;) {
    double kib = 0;
    in >> kib;
    if (key == "MemAvailable:") return kib * 1024.0;
    in.ignore(1 << 10, '\n');
  }
  return double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGESIZE));
}

void check_fits_memory(double bytes, const std::string& what) {
  const double avail = available_memory_bytes();
  auto gib = [](double b) {
    char s[32];
    std::snprintf(s, sizeof s, "%.1f", b / double(1u << 30));
    return std::string(s);
  };
  MV_CHECK(bytes <= avail, what, " needs about ", gib(bytes), " GiB, more than the ", gib(avail),
           " GiB of memory available");
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
