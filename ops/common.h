// Helpers shared by the CPU op implementations (not part of the public op API).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>

#include "engine/tensor.h"

namespace mv::ops {

// Throws unless every tensor is a defined F32 tensor on the CPU. CUDA dispatch happens before
// this check in ops that have a CUDA kernel.
void expect_cpu_f32(const char* op, std::initializer_list<const Tensor*> ts);
// Throws unless all tensors live on the same device.
void expect_same_device(const char* op, std::initializer_list<const Tensor*> ts);
// The dispatch test of every op with a CUDA kernel: true when the (defined) inputs live on the
// GPU, false on the CPU; throws naming the op when they mix devices. Undefined tensors (an
// optional bias) are skipped. Ops call it first, then take the CUDA branch (inside
// #ifdef MOEVIT_CUDA) or fall through to expect_cpu_f32 and the CPU kernel:
//   #ifdef MOEVIT_CUDA
//     if (on_cuda("add", {&a, &b})) return ...cuda kernels...;
//   #endif
bool on_cuda(const char* op, std::initializer_list<const Tensor*> ts);
// x as a contiguous tensor of shape s (same element count): a view when x is contiguous, else a
// contiguous copy viewed so. No autograd; used by kernels (both devices) to flatten operands.
Tensor flat_view(const Tensor& x, const Shape& s);
// Normalises a possibly negative axis for a tensor of rank `ndim`.
int norm_axis(const char* op, int axis, int ndim);
// For error messages: t.str(), or "undefined".
std::string str_of(const Tensor& t);
// t is defined, I64, on the CPU and of rank ndim (the index tensors of the MoE ops).
bool is_cpu_i64(const Tensor& t, int ndim);

// f(i, e, r) for the flat rows i in [s, end) of (E, R) buffers, i = e*R + r, without a division
// per row (the MoE ops' expert buffers).
template <class F>
inline void for_rows(int64_t s, int64_t end, int64_t R, F f) {
  if (s >= end) return;
  int64_t x = s / R, r = s % R;
  for (int64_t i = s; i < end; ++i) {
    f(i, x, r);
    if (++r == R) r = 0, ++x;
  }
}

}  // namespace mv::ops
