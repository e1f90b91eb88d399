// Helpers shared by the op implementations (not part of the public op API). Device dispatch is
// in ops/dispatch.h.
#pragma once
#include <cstdint>
#include <string>

#include "engine/tensor.h"

namespace mv::ops {

// Normalises a possibly negative axis for a tensor of rank `ndim`.
int norm_axis(const char* op, int axis, int ndim);
// For error messages: t.str(), or "undefined".
std::string str_of(const Tensor& t);
// t is defined, I64 and of rank ndim (the index tensors of the MoE ops).
bool is_i64(const Tensor& t, int ndim);

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
