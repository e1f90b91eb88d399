// Tensor: a shape, a dtype, a device, and a view (offset + strides) into reference-counted
// Storage. New tensors are contiguous row-major; reshape of a contiguous tensor, permute and
// slice are views that share storage; kernels ask for contiguous() input.
//
// A tensor also carries its autograd state (requires_grad, grad, grad_fn). The engine only
// stores it; autograd/ gives it meaning.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "engine/dtype.h"
#include "engine/error.h"
#include "engine/memory.h"

namespace mv {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "(2, 3)"
int64_t shape_numel(const Shape& s);
Shape contiguous_strides(const Shape& s);

namespace autograd { struct Node; }

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  int64_t offset = 0;  // in elements
  Shape shape, strides;
  DType dtype = DType::F32;
  bool requires_grad = false;
  std::shared_ptr<TensorImpl> grad;             // accumulated gradient (leaves and retained)
  std::shared_ptr<autograd::Node> grad_fn;      // the op that made this tensor, if any
};

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // Factories. Values are row-major; the vector length must equal the shape's element count.
  static Tensor empty(const Shape& shape, DType dtype = DType::F32, Device device = Device::CPU);
  static Tensor zeros(const Shape& shape, DType dtype = DType::F32, Device device = Device::CPU);
  static Tensor ones(const Shape& shape, DType dtype = DType::F32, Device device = Device::CPU);
  static Tensor full(const Shape& shape, float value, Device device = Device::CPU);
  static Tensor from(const std::vector<float>& values, const Shape& shape);
  static Tensor from_i64(const std::vector<int64_t>& values, const Shape& shape);
  static Tensor from_i32(const std::vector<int32_t>& values, const Shape& shape);
  static Tensor scalar(float value) { return from({value}, {}); }
  static Tensor arange(int64_t n, DType dtype = DType::I64);

  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return impl().shape; }
  const Shape& strides() const { return impl().strides; }
  int64_t size(int d) const;  // negative d counts from the end
  int ndim() const { return int(impl().shape.size()); }
  int64_t numel() const { return shape_numel(impl().shape); }
  DType dtype() const { return impl().dtype; }
  Device device() const { return impl().storage->device(); }
  bool is_contiguous() const;
  std::string str() const;  // "F32 (2, 3) cpu"

  // Raw pointer to the first element (device memory for CUDA tensors). Checks the dtype.
  template <class T> T* data() const;
  void* raw() const;
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype()); }

  // Copies to a CPU vector (any device, any layout). Checks the dtype.
  template <class T> std::vector<T> to_vector() const;
  float item() const;  // one-element F32 tensor

  Tensor to(Device device) const;  // same tensor if already there
  Tensor contiguous() const;       // same tensor if already contiguous
  // The elements, made contiguous if they are not, seen as `shape` (same element count). No
  // autograd: kernels flatten their operands with it (ops::reshape is the differentiable one).
  Tensor reshaped(const Shape& shape) const;
  Tensor clone() const;            // a contiguous copy with no autograd history
  Tensor detach() const;           // shares storage, no autograd history

  // A view sharing storage (no autograd); used by ops/ to build reshape, permute and slice.
  Tensor view_as(const Shape& shape, const Shape& strides, int64_t offset) const;

  // In-place writes outside autograd (optimizers, data loading, initialisation).
  void fill_(float value);
  void copy_(const Tensor& src);  // same shape and dtype; any devices

  // Autograd state.
  bool requires_grad() const { return impl().requires_grad; }
  Tensor& set_requires_grad(bool r);  // leaves only
  Tensor grad() const { return Tensor(impl().grad); }
  void set_grad(const Tensor& g) { impl().grad = g.impl_; }
  void zero_grad() { impl().grad.reset(); }
  const std::shared_ptr<autograd::Node>& grad_fn() const { return impl().grad_fn; }
  void backward(const Tensor& grad_output = Tensor()) const;  // in autograd/autograd.cpp

  TensorImpl& impl() const {
    MV_CHECK(impl_, "use of an undefined Tensor");
    return *impl_;
  }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  bool same(const Tensor& o) const { return impl_ == o.impl_; }

 private:
  std::shared_ptr<TensorImpl> impl_;
};

template <class T> T* Tensor::data() const {
  MV_CHECK(dtype() == dtype_of<T>(), "Tensor::data: tensor ", str(), " is not ",
           dtype_name(dtype_of<T>()));
  return static_cast<T*>(raw());
}

// a + b for F32 tensors of one shape on one device: a new contiguous tensor, no autograd. What
// autograd sums gradients with where paths meet (autograd sits below ops/, so not ops::add; the
// same floats).
Tensor add_same_shape(const Tensor& a, const Tensor& b);

}  // namespace mv
