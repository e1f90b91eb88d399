#include "ops/common.h"

namespace mv::ops {

int norm_axis(const char* op, int axis, int ndim) {
  int a = axis < 0 ? axis + ndim : axis;
  MV_CHECK(a >= 0 && a < ndim, op, ": axis ", axis, " is out of range for rank ", ndim);
  return a;
}

std::string str_of(const Tensor& t) { return t.defined() ? t.str() : std::string("undefined"); }

bool is_i64(const Tensor& t, int ndim) { return t.defined() && t.dtype() == DType::I64 && t.ndim() == ndim; }

}  // namespace mv::ops
