#include "ops/common.h"

namespace mv::ops {

void expect_same_device(const char* op, std::initializer_list<const Tensor*> ts) {
  const Tensor* first = nullptr;
  for (const Tensor* t : ts) {
    MV_CHECK(t->defined(), op, ": an input is undefined");
    if (!first) first = t;
    MV_CHECK(t->device() == first->device(), op, ": inputs live on different devices (",
             first->str(), " and ", t->str(), "); move them with .to()");
  }
}

void expect_cpu_f32(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) {
    MV_CHECK(t->defined(), op, ": an input is undefined");
    MV_CHECK(t->dtype() == DType::F32, op, ": expected an F32 tensor, got ", t->str());
    MV_CHECK(t->device() == Device::CPU, op, ": has no CUDA kernel yet; got ", t->str());
  }
}

bool on_cuda(const char* op, std::initializer_list<const Tensor*> ts) {
  const Tensor* first = nullptr;
  for (const Tensor* t : ts) {
    if (!t->defined()) continue;
    if (!first) first = t;
    MV_CHECK(t->device() == first->device(), op, ": inputs live on different devices (",
             first->str(), " and ", t->str(), "); move them with .to()");
  }
  return first && first->device() == Device::CUDA;  // the cuda:: kernels check dtypes
}

Tensor flat_view(const Tensor& x, const Shape& s) {
  MV_CHECK(shape_numel(s) == x.numel(), "flat_view: ", x.str(), " cannot be viewed as ", shape_str(s));
  Tensor c = x.contiguous();
  return c.view_as(s, contiguous_strides(s), c.impl().offset);
}

int norm_axis(const char* op, int axis, int ndim) {
  int a = axis < 0 ? axis + ndim : axis;
  MV_CHECK(a >= 0 && a < ndim, op, ": axis ", axis, " is out of range for rank ", ndim);
  return a;
}

std::string str_of(const Tensor& t) { return t.defined() ? t.str() : std::string("undefined"); }

bool is_cpu_i64(const Tensor& t, int ndim) {
  return t.defined() && t.dtype() == DType::I64 && t.device() == Device::CPU && t.ndim() == ndim;
}

}  // namespace mv::ops
