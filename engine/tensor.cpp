#include "engine/tensor.h"

#include <algorithm>
#include <cstring>
#include <sstream>

#include "engine/parallel.h"

namespace mv {

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << ")";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

Shape contiguous_strides(const Shape& s) {
  Shape st(s.size());
  int64_t acc = 1;
  for (int i = int(s.size()) - 1; i >= 0; --i) {
    st[i] = acc;
    acc *= s[i];
  }
  return st;
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  for (int64_t d : shape)
    MV_CHECK(d >= 0, "Tensor::empty: negative size in shape ", shape_str(shape));
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::make_shared<Storage>(size_t(shape_numel(shape)) * dtype_size(dtype), device);
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  if (t.nbytes() == 0) return t;  // no storage to clear (and a null pointer)
  if (device == Device::CPU)
    std::memset(t.raw(), 0, t.nbytes());
  else
    cuda_hooks()->zero(t.raw(), t.nbytes());
  return t;
}

Tensor Tensor::ones(const Shape& shape, DType dtype, Device device) {
  MV_CHECK(dtype == DType::F32, "Tensor::ones: only F32 is supported, got ", dtype_name(dtype));
  return full(shape, 1.0f, device);
}

Tensor Tensor::full(const Shape& shape, float value, Device device) {
  Tensor t = empty(shape, DType::F32, device);
  t.fill_(value);
  return t;
}

template <class T>
static Tensor from_values(const std::vector<T>& values, const Shape& shape) {
  MV_CHECK(int64_t(values.size()) == shape_numel(shape), "Tensor::from: ", values.size(),
           " values do not fill shape ", shape_str(shape));
  Tensor t = Tensor::empty(shape, dtype_of<T>());
  if (!values.empty()) std::memcpy(t.raw(), values.data(), values.size() * sizeof(T));
  return t;
}
Tensor Tensor::from(const std::vector<float>& v, const Shape& s) { return from_values(v, s); }
Tensor Tensor::from_i64(const std::vector<int64_t>& v, const Shape& s) { return from_values(v, s); }
Tensor Tensor::from_i32(const std::vector<int32_t>& v, const Shape& s) { return from_values(v, s); }

Tensor Tensor::arange(int64_t n, DType dtype) {
  Tensor t = empty({n}, dtype);
  for (int64_t i = 0; i < n; ++i) {
    if (dtype == DType::I64) t.data<int64_t>()[i] = i;
    else if (dtype == DType::I32) t.data<int32_t>()[i] = int32_t(i);
    else if (dtype == DType::F32) t.data<float>()[i] = float(i);
    else MV_FAIL("Tensor::arange: unsupported dtype ", dtype_name(dtype));
  }
  return t;
}

int64_t Tensor::size(int d) const {
  int n = ndim();
  int i = d < 0 ? d + n : d;
  MV_CHECK(i >= 0 && i < n, "Tensor::size: dim ", d, " out of range for ", str());
  return impl().shape[i];
}

bool Tensor::is_contiguous() const { return impl().strides == contiguous_strides(impl().shape); }

std::string Tensor::str() const {
  if (!impl_) return "undefined";
  return std::string(dtype_name(dtype())) + " " + shape_str(shape()) + " " + device_name(device());
}

void* Tensor::raw() const {
  return static_cast<char*>(impl().storage->data()) + impl().offset * int64_t(dtype_size(dtype()));
}

// Copies a strided CPU tensor, as elements of T (the dtype's width), into contiguous memory at
// dst. The outer axes advance as an odometer; along the last axis runs a tight strided loop. A
// transposed matrix (last axis strided, the one before it of unit stride) goes in square tiles
// instead, so that both its reads and its writes stay in a few cache lines.
template <class T>
static void gather_strided(const T* src, T* dst, const Shape& shape, const Shape& strides) {
  const int nd = int(shape.size());
  const int64_t n = shape_numel(shape);
  if (nd == 0 || n == 0) {
    if (n == 1) dst[0] = src[0];
    return;
  }
  const int64_t cols = shape[size_t(nd - 1)], cs = strides[size_t(nd - 1)];
  const bool transposed = nd >= 2 && cs != 1 && strides[size_t(nd - 2)] == 1;
  const int outer = transposed ? nd - 2 : nd - 1;  // the odometer's axes
  const int64_t rows = transposed ? shape[size_t(nd - 2)] : 1, block = rows * cols;
  std::vector<int64_t> idx(size_t(outer), 0);
  for (int64_t b = 0; b < n / block; ++b) {
    int64_t off = 0;
    for (int d = 0; d < outer; ++d) off += idx[size_t(d)] * strides[size_t(d)];
    const T* in = src + off;
    T* out = dst + b * block;
    if (!transposed) {
      for (int64_t c = 0; c < cols; ++c) out[c] = in[c * cs];
    } else {
      constexpr int64_t kTile = 32;
      for (int64_t r0 = 0; r0 < rows; r0 += kTile)
        for (int64_t c0 = 0; c0 < cols; c0 += kTile)
          for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c)
            for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r) out[r * cols + c] = in[r + c * cs];
    }
    for (int d = outer - 1; d >= 0; --d) {
      if (++idx[size_t(d)] < shape[size_t(d)]) break;
      idx[size_t(d)] = 0;
    }
  }
}

static void gather_strided_cpu(const Tensor& src, void* dst) {
  const void* p = src.raw();
  switch (dtype_size(src.dtype())) {
    case 2: return gather_strided(static_cast<const uint16_t*>(p), static_cast<uint16_t*>(dst), src.shape(), src.strides());
    case 4: return gather_strided(static_cast<const uint32_t*>(p), static_cast<uint32_t*>(dst), src.shape(), src.strides());
    case 8: return gather_strided(static_cast<const uint64_t*>(p), static_cast<uint64_t*>(dst), src.shape(), src.strides());
  }
  MV_FAIL("contiguous: no copy for elements of ", dtype_size(src.dtype()), " bytes");
}

Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  Tensor out = empty(shape(), dtype(), device());
  if (device() == Device::CUDA) cuda_hooks()->copy_strided(out, *this);
  else gather_strided_cpu(*this, out.raw());
  return out;
}

Tensor Tensor::reshaped(const Shape& s) const {
  MV_CHECK(shape_numel(s) == numel(), "Tensor::reshaped: ", str(), " cannot be seen as ", shape_str(s));
  Tensor c = contiguous();
  return c.view_as(s, contiguous_strides(s), c.impl().offset);
}

template <class T> std::vector<T> Tensor::to_vector() const {
  MV_CHECK(dtype() == dtype_of<T>(), "Tensor::to_vector: tensor ", str(), " is not ",
           dtype_name(dtype_of<T>()));
  Tensor c = contiguous();
  std::vector<T> v(static_cast<size_t>(numel()));
  copy_bytes(v.data(), Device::CPU, c.raw(), c.device(), c.nbytes());
  return v;
}
template std::vector<float> Tensor::to_vector<float>() const;
template std::vector<int32_t> Tensor::to_vector<int32_t>() const;
template std::vector<int64_t> Tensor::to_vector<int64_t>() const;

float Tensor::item() const {
  MV_CHECK(numel() == 1, "Tensor::item: expected one element, got ", str());
  return to_vector<float>()[0];
}

Tensor Tensor::to(Device d) const {
  if (device() == d) return *this;
  Tensor c = contiguous();
  Tensor out = empty(shape(), dtype(), d);
  copy_bytes(out.raw(), d, c.raw(), c.device(), c.nbytes());
  return out;
}

Tensor Tensor::clone() const {
  Tensor out = empty(shape(), dtype(), device());
  out.copy_(*this);
  return out;
}

Tensor Tensor::detach() const {
  auto impl = std::make_shared<TensorImpl>(*impl_);
  impl->requires_grad = false;
  impl->grad.reset();
  impl->grad_fn.reset();
  return Tensor(std::move(impl));
}

Tensor Tensor::view_as(const Shape& shape, const Shape& strides, int64_t offset) const {
  MV_CHECK(shape.size() == strides.size(), "Tensor::view_as: shape ", shape_str(shape),
           " and strides ", shape_str(strides), " differ in rank");
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = impl_->storage;
  impl->dtype = impl_->dtype;
  impl->shape = shape;
  impl->strides = strides;
  impl->offset = offset;
  return Tensor(std::move(impl));
}

void Tensor::fill_(float value) {
  MV_CHECK(dtype() == DType::F32 && is_contiguous(), "Tensor::fill_: needs a contiguous F32 tensor, got ", str());
  if (device() != Device::CPU) {
    cuda_hooks()->fill(*this, value);
    return;
  }
  float* p = data<float>();
  for (int64_t i = 0, n = numel(); i < n; ++i) p[i] = value;
}

void Tensor::copy_(const Tensor& src) {
  MV_CHECK(src.shape() == shape() && src.dtype() == dtype(), "Tensor::copy_: source ", src.str(),
           " does not match destination ", str());
  MV_CHECK(is_contiguous(), "Tensor::copy_: destination ", str(), " must be contiguous");
  Tensor c = src.contiguous();
  copy_bytes(raw(), device(), c.raw(), c.device(), nbytes());
}

Tensor add_same_shape(const Tensor& a_, const Tensor& b_) {
  MV_CHECK(a_.shape() == b_.shape() && a_.dtype() == DType::F32 && b_.dtype() == DType::F32 &&
               a_.device() == b_.device(),
           "add_same_shape: expected two F32 tensors of one shape on one device, got ", a_.str(), " and ", b_.str());
  const Tensor a = a_.contiguous(), b = b_.contiguous();
  if (a.device() == Device::CUDA) return cuda_hooks()->add(a, b);
  Tensor out = Tensor::empty(a.shape());
  const float *pa = a.data<float>(), *pb = b.data<float>();
  float* po = out.data<float>();
  parallel_for(out.numel(), 1, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) po[i] = pa[i] + pb[i];
  });
  return out;
}

Tensor& Tensor::set_requires_grad(bool r) {
  MV_CHECK(!impl().grad_fn, "set_requires_grad: ", str(), " is the result of an op, not a leaf");
  MV_CHECK(!r || dtype() == DType::F32, "set_requires_grad: only F32 tensors have gradients, got ", str());
  impl().requires_grad = r;
  return *this;
}

}  // namespace mv
