// How an op runs on its inputs' device: the one place in ops/ that knows whether CUDA is built.
//
// A kernel is a pair of functions of one signature: cpu::NAME, written in the op's file in ops/,
// and cuda::NAME, declared in cuda/kernels.h and written in the .cu file of the same name
// (ops/softmax.cpp and cuda/softmax.cu). Every op reads in three steps:
//
//   Tensor softmax(const Tensor& x) {
//     const OpDevice dev = device_of("softmax", {&x});                       // 1. validate
//     MV_CHECK(x.ndim() >= 1, ...);
//     Tensor y = MV_KERNEL(softmax_forward)(dev, x.contiguous());            // 2. the kernel
//     return autograd::record("softmax", y, {x}, [dev, yd = y.detach()](const Tensor& g) {
//       return std::vector<Tensor>{MV_KERNEL(softmax_backward)(dev, yd, g)};  // 3. one backward
//     });
//   }
//
// MV_CPU_KERNEL(NAME) names a kernel whose CUDA twin is not written yet: on CUDA tensors it
// throws "OP: has no CUDA kernel yet". Writing the twin and changing the macro is all it takes
// to move such an op to the GPU. Validation checks what the tensors are (devices, dtypes,
// shapes) and never reads their elements; a check of the values (an index in range) belongs to
// the kernel, which can read them on its own device.
#pragma once
#include <initializer_list>
#include <utility>

#include "engine/tensor.h"
#include "ops/kernel_types.h"

namespace mv::ops {

// The op's name, for messages, and the device its kernels run on.
struct OpDevice {
  const char* op;
  Device device;
};

// The device of the op's tensors. Every defined one must live there; undefined ones (an optional
// bias) are skipped. Throws naming the op when they mix devices or when none is defined.
OpDevice device_of(const char* op, std::initializer_list<const Tensor*> ts);
// Throws naming the op unless every tensor is defined and F32.
void expect_f32(const char* op, std::initializer_list<const Tensor*> ts);

[[noreturn]] void no_cuda_kernel(const OpDevice& dev, const char* kernel);

// A kernel's two implementations; call it with the OpDevice and the kernel's arguments.
template <class F>
struct Kernel {
  const char* name;
  F* cpu;
  F* cuda;  // null: not written yet, or a build without CUDA
  template <class... Args>
  decltype(auto) operator()(const OpDevice& dev, Args&&... args) const {
    if (dev.device == Device::CUDA) {
      if (!cuda) no_cuda_kernel(dev, name);
      return cuda(std::forward<Args>(args)...);
    }
    return cpu(std::forward<Args>(args)...);
  }
};

}  // namespace mv::ops

#ifdef MOEVIT_CUDA
#include "cuda/kernels.h"
namespace mv::ops {
inline constexpr bool kCudaBuilt = true;
}
#define MV_CUDA_TWIN(name) &::mv::cuda::name
#else
namespace mv::ops {
inline constexpr bool kCudaBuilt = false;
}
#define MV_CUDA_TWIN(name) nullptr
#endif

#define MV_KERNEL(name) (::mv::ops::Kernel<decltype(::mv::cpu::name)>{#name, &::mv::cpu::name, MV_CUDA_TWIN(name)})
#define MV_CPU_KERNEL(name) (::mv::ops::Kernel<decltype(::mv::cpu::name)>{#name, &::mv::cpu::name, nullptr})
