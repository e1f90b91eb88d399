// Memory for tensors: a caching CPU pool, and the hooks through which the CUDA backend
// (when it is built) provides device memory and copies. The engine never includes CUDA headers.
#pragma once
#include <cstddef>
#include <memory>

#include "engine/dtype.h"

namespace mv {

class Tensor;

// Bytes a pool hands out and keeps. `in_use`/`peak` count live blocks, `cached` free ones.
struct PoolStats {
  size_t in_use = 0, peak = 0, cached = 0, system_allocs = 0;
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
};
const CudaHooks* cuda_hooks();
bool cuda_available();  // built with CUDA and a device is present

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
