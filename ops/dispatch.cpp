#include "ops/dispatch.h"

namespace mv::ops {

OpDevice device_of(const char* op, std::initializer_list<const Tensor*> ts) {
  const Tensor* first = nullptr;
  for (const Tensor* t : ts) {
    if (!t->defined()) continue;
    if (!first) first = t;
    MV_CHECK(t->device() == first->device(), op, ": inputs live on different devices (",
             first->str(), " and ", t->str(), "); move them with .to()");
  }
  MV_CHECK(first, op, ": an input is undefined");
  return {op, first->device()};
}

void expect_f32(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) {
    MV_CHECK(t->defined(), op, ": an input is undefined");
    MV_CHECK(t->dtype() == DType::F32, op, ": expected an F32 tensor, got ", t->str());
  }
}

void no_cuda_kernel(const OpDevice& dev, const char* kernel) {
  if (!kCudaBuilt) MV_FAIL(dev.op, ": moevit was built without CUDA, so it has no kernel for CUDA tensors");
  MV_FAIL(dev.op, ": has no CUDA kernel yet (", kernel, "); move its inputs to the CPU with .to(Device::CPU)");
}

}  // namespace mv::ops
