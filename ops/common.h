// Helpers shared by the CPU op implementations (not part of the public op API).
#pragma once
#include <initializer_list>

#include "engine/tensor.h"

namespace mv::ops {

// Throws unless every tensor is a defined F32 tensor on the CPU. CUDA dispatch happens before
// this check in ops that have a CUDA kernel.
void expect_cpu_f32(const char* op, std::initializer_list<const Tensor*> ts);
// Throws unless all tensors live on the same device.
void expect_same_device(const char* op, std::initializer_list<const Tensor*> ts);
// Normalises a possibly negative axis for a tensor of rank `ndim`.
int norm_axis(const char* op, int axis, int ndim);

}  // namespace mv::ops
