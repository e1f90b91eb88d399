// Memory for tensors: a caching CPU pool, and the hooks through which the CUDA backend
// (when it is built) provides device memory and copies. The engine never includes CUDA headers.
#pragma once
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/dtype.h"

namespace mv {

class Tensor;

// Bytes a pool hands out and keeps. `in_use`/`peak` count live blocks, `cached` free ones.
struct PoolStats {
  size_t in_use = 0, peak = 0, cached = 0, system_allocs = 0;
};

// Freed blocks kept per size class and handed out again: the cache behind both the CPU pool
// and the CUDA allocator. Classes are powers of two from `min_class` up to 1 MiB, then multiples
// of 1 MiB (waste under 2x for small blocks, under 1 MiB for large ones). Thread-safe.
class BlockCache {
 public:
  explicit BlockCache(size_t min_class) : min_class_(min_class) {}
  size_t size_class(size_t bytes) const;
  // Counts a block of class c as in use and returns a cached one, or null: then the caller
  // allocates c bytes itself and, if that fails, calls cancel(c).
  void* take(size_t c);
  void cancel(size_t c);
  void put(void* p, size_t c);
  // Hands every cached block to free_block(p) and forgets it.
  void release(void (*free_block)(void*));
  PoolStats stats();

 private:
  size_t min_class_;
  std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;
  PoolStats stats_;
};

// CPU pool: blocks are rounded up to a size class and reused, so a training step that asks for
// the same shapes every iteration stops calling the system allocator after the first step.
void* cpu_alloc(size_t bytes);
void cpu_free(void* p, size_t bytes);
PoolStats cpu_pool_stats();
void cpu_pool_release();  // return every cached block to the system

// Provided by cuda/ when it is compiled in; null otherwise (engine/no_cuda.cpp).
struct CudaHooks {
  int (*device_count)();
  void* (*alloc)(size_t bytes);
  void (*free)(void* p, size_t bytes);
  void (*copy_h2d)(void* dst, const void* src, size_t bytes);
  void (*copy_d2h)(void* dst, const void* src, size_t bytes);
  void (*copy_d2d)(void* dst, const void* src, size_t bytes);
  void (*zero)(void* p, size_t bytes);
  PoolStats (*stats)();
  // Writes the strided CUDA tensor src into dst (same shape and dtype, any strides).
  void (*copy_strided)(const Tensor& dst, const Tensor& src);
  // Sets every element of a contiguous F32 CUDA tensor, on the device.
  void (*fill)(const Tensor& t, float value);
  // a + b of two contiguous F32 CUDA tensors of one shape (add_same_shape).
  Tensor (*add)(const Tensor& a, const Tensor& b);
  // Standard normal draws on the device, element i the CPU's draw i of (seed, offset) (randn).
  Tensor (*normal)(const std::vector<int64_t>& shape, uint64_t seed, uint64_t offset);
};
const CudaHooks* cuda_hooks();
bool cuda_available();  // built with CUDA and a device is present

// Bytes the system can still give (MemAvailable of /proc/meminfo; the physical memory where that
// cannot be read). For checks of sizes that come from user input, before allocating them.
double available_memory_bytes();
// Throws "<what> needs about X GiB, more than the Y GiB of memory available" when bytes exceed
// the available memory; `what` names the flags or file fields the size comes from.
void check_fits_memory(double bytes, const std::string& what);

// A reference-counted block of memory on one device. Tensors share Storage; views share it too.
class Storage {
 public:
  Storage(size_t bytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
  Device device_;
};

// dst and src may be on either device.
void copy_bytes(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes);

}  // namespace mv
