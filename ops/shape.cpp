// Shape ops; their CUDA twin is cuda/shape.cu. Views (reshape of a contiguous tensor, permute,
// slice) only change shape, strides and offset, so they work for any dtype and device; copies
// (contiguous, placing a piece along an axis, patchify) are kernels. On the CPU every copy moves
// whole runs of contiguous elements (memcpy of rows or blocks) rather than element by element.
#include "ops/shape.h"

#include <cstring>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"
#include "ops/dispatch.h"

namespace mv::cpu {

namespace {

// out (contiguous) = x (any strides); one row (the last dim) at a time.
template <class T>
void strided_copy(const Tensor& x, T* out) {
  const int nd = x.ndim();
  const Shape& sh = x.shape();
  const Shape& st = x.strides();
  const T* p = static_cast<const T*>(x.raw());
  const int64_t cols = sh[nd - 1], sc = st[nd - 1];
  const int64_t rows = cols ? x.numel() / cols : 0;
  parallel_for(rows, cols, [&](int64_t s, int64_t e) {
    for (int64_t r = s; r < e; ++r) {
      int64_t off = 0;
      for (int64_t d = nd - 2, rem = r; d >= 0; --d) {
        off += (rem % sh[d]) * st[d];
        rem /= sh[d];
      }
      const T* src = p + off;
      T* dst = out + r * cols;
      if (sc == 1)
        std::memcpy(dst, src, size_t(cols) * sizeof(T));
      else
        for (int64_t j = 0; j < cols; ++j) dst[j] = src[j * sc];
    }
  });
}

// A contiguous tensor seen as (outer, len, inner) around `axis`.
struct Split {
  int64_t outer = 1, inner = 1;
};
Split split_at(const Shape& s, int axis) {
  Split r;
  for (int d = 0; d < axis; ++d) r.outer *= s[size_t(d)];
  for (size_t d = size_t(axis) + 1; d < s.size(); ++d) r.inner *= s[d];
  return r;
}

// For o < outer: copies `count` slabs of `slab` bytes from src slab (o * src_len + src_pos) to
// dst slab (o * dst_len + dst_pos). Both buffers are contiguous (outer, len, slab).
void copy_blocks(const void* src, int64_t src_len, int64_t src_pos, void* dst, int64_t dst_len,
                 int64_t dst_pos, int64_t outer, int64_t slab, int64_t count) {
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
  const size_t bytes = size_t(count * slab);
  if (bytes == 0) return;
  parallel_for(outer, count * slab / 4, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o)
      std::memcpy(d + (o * dst_len + dst_pos) * slab, s + (o * src_len + src_pos) * slab, bytes);
  });
}

// Calls f(image_offset, patch_offset) for every run of p floats that patchify moves: offsets
// into contiguous images (B, C, H, W) and patches (B, N, C p p); runs are disjoint on both sides.
template <class F>
void for_patch_runs(const Shape& is, int64_t p, F f) {
  const int64_t B = is[0], C = is[1], H = is[2], W = is[3], gw = W / p, N = (H / p) * gw;
  parallel_for(B * N, C * p * p, [&](int64_t s, int64_t e) {
    for (int64_t bn = s; bn < e; ++bn) {
      const int64_t b = bn / N, gy = (bn % N) / gw, gx = (bn % N) % gw;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < p; ++i)
          f(((b * C + c) * H + gy * p + i) * W + gx * p, (bn * C + c) * p * p + i * p);
    }
  });
}

}  // namespace

// x: any layout and dtype (elements of 2, 4 or 8 bytes) -> x itself if contiguous, else a
// contiguous copy
Tensor contiguous(const Tensor& x) {
  if (x.is_contiguous()) return x;
  Tensor out = Tensor::empty(x.shape(), x.dtype());
  switch (dtype_size(x.dtype())) {
    case 2: strided_copy(x, static_cast<uint16_t*>(out.raw())); break;
    case 4: strided_copy(x, static_cast<uint32_t*>(out.raw())); break;
    case 8: strided_copy(x, static_cast<uint64_t*>(out.raw())); break;
    default: MV_FAIL("contiguous: unsupported element size for ", x.str());
  }
  return out;
}

// dst: contiguous; src: dst's shape but length len along axis -> dst[.., pos : pos + len, ..] = src
void place_along(const Tensor& dst, int axis, int64_t pos, const Tensor& src_) {
  const Tensor src = contiguous(src_);
  const Split sp = split_at(dst.shape(), axis);
  const int64_t len = src.shape()[size_t(axis)];
  copy_blocks(src.raw(), len, 0, dst.raw(), dst.shape()[size_t(axis)], pos, sp.outer,
              sp.inner * int64_t(dtype_size(dst.dtype())), len);
}

// src: any layout -> a contiguous copy of src[.., pos : pos + len, ..]
Tensor take_along(const Tensor& src_, int axis, int64_t pos, int64_t len) {
  const Tensor src = contiguous(src_);
  Shape shape = src.shape();
  shape[size_t(axis)] = len;
  Tensor out = Tensor::empty(shape, src.dtype());
  const Split sp = split_at(src.shape(), axis);
  copy_blocks(src.raw(), src.shape()[size_t(axis)], pos, out.raw(), len, 0, sp.outer,
              sp.inner * int64_t(dtype_size(src.dtype())), len);
  return out;
}

// images: (B, C, H, W), any layout -> (B, (H/p)(W/p), C p p), p floats at a time
Tensor patchify(const Tensor& x_, int p) {
  const Tensor x = x_.contiguous();
  const Shape& is = x.shape();
  Tensor out = Tensor::empty({is[0], (is[2] / p) * (is[3] / p), is[1] * p * p});
  const size_t run = size_t(p) * sizeof(float);
  const float* px = x.data<float>();
  float* po = out.data<float>();
  for_patch_runs(is, p, [&](int64_t io, int64_t pi) { std::memcpy(po + pi, px + io, run); });
  return out;
}

// The inverse map: patches (B, N, C p p) -> (B, C, H, W)
Tensor unpatchify(const Tensor& patches, const Shape& is, int p) {
  const Tensor g = patches.contiguous();
  Tensor dx = Tensor::empty(is);
  const size_t run = size_t(p) * sizeof(float);
  const float* pg = g.data<float>();
  float* pd = dx.data<float>();
  for_patch_runs(is, p, [&](int64_t io, int64_t pi) { std::memcpy(pd + io, pg + pi, run); });
  return dx;
}

}  // namespace mv::cpu

namespace mv::ops {

using autograd::record;

namespace {

// x's elements [start, start + len) along axis a, as a view (no autograd).
Tensor slice_view(const Tensor& x, int a, int64_t start, int64_t len) {
  Shape shape = x.shape();
  shape[size_t(a)] = len;
  return x.view_as(shape, x.strides(), x.impl().offset + start * x.strides()[size_t(a)]);
}

// The permuted view, no autograd.
Tensor permute_view(const Tensor& x, const std::vector<int>& p) {
  Shape shape(p.size()), strides(p.size());
  for (size_t i = 0; i < p.size(); ++i) {
    shape[i] = x.shape()[size_t(p[i])];
    strides[i] = x.strides()[size_t(p[i])];
  }
  return x.view_as(shape, strides, x.impl().offset);
}

// dims normalised and checked to be a permutation of 0..n-1.
std::vector<int> permutation(const char* op, const Tensor& x, const std::vector<int>& dims) {
  const int n = x.ndim();
  auto dims_str = [&] {
    std::string s = "(";
    for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
    return s + ")";
  };
  MV_CHECK(int(dims.size()) == n, op, ": dims ", dims_str(), " do not match the rank of ", x.str());
  std::vector<int> p(dims.size());
  std::vector<bool> seen(dims.size(), false);
  for (size_t i = 0; i < dims.size(); ++i) {
    p[i] = norm_axis(op, dims[i], n);
    MV_CHECK(!seen[size_t(p[i])], op, ": dims ", dims_str(), " repeat axis ", p[i], " (", x.str(), ")");
    seen[size_t(p[i])] = true;
  }
  return p;
}

Tensor permute_impl(const char* op, const Tensor& x, const std::vector<int>& p) {
  const OpDevice dev = device_of(op, {&x});
  Tensor out = permute_view(x, p);
  std::vector<int> inv(p.size());
  for (size_t i = 0; i < p.size(); ++i) inv[size_t(p[i])] = int(i);
  // d permute = permute of g by the inverse permutation
  return record(op, out, {x}, [dev, inv](const Tensor& g) {
    return std::vector<Tensor>{MV_KERNEL(contiguous)(dev, permute_view(g, inv))};
  });
}

}  // namespace

Tensor reshape(const Tensor& x, const Shape& shape) {
  MV_CHECK(x.defined(), "reshape: the input is undefined");
  const OpDevice dev = device_of("reshape", {&x});
  Shape s = shape;
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == -1) {
      MV_CHECK(infer < 0, "reshape: more than one -1 in ", shape_str(shape));
      infer = int(i);
    } else {
      MV_CHECK(s[i] >= 0, "reshape: negative size in ", shape_str(shape));
      known *= s[i];
    }
  }
  if (infer >= 0) {
    MV_CHECK(known > 0 && x.numel() % known == 0, "reshape: cannot reshape ", x.str(), " to ",
             shape_str(shape));
    s[size_t(infer)] = x.numel() / known;
  }
  MV_CHECK(shape_numel(s) == x.numel(), "reshape: cannot reshape ", x.str(), " (", x.numel(),
           " elements) to ", shape_str(shape), " (", shape_numel(s), " elements)");
  Tensor c = MV_KERNEL(contiguous)(dev, x);
  Tensor out = c.view_as(s, contiguous_strides(s), c.impl().offset);
  // d reshape = g reshaped back
  return record("reshape", out, {x}, [xs = x.shape()](const Tensor& g) {
    return std::vector<Tensor>{reshape(g, xs)};
  });
}

Tensor transpose(const Tensor& x, int d0, int d1) {
  MV_CHECK(x.defined(), "transpose: the input is undefined");
  const int n = x.ndim();
  const int a = norm_axis("transpose", d0, n), b = norm_axis("transpose", d1, n);
  std::vector<int> p(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) p[size_t(i)] = i;
  std::swap(p[size_t(a)], p[size_t(b)]);
  return permute_impl("transpose", x, p);
}

Tensor permute(const Tensor& x, const std::vector<int>& dims) {
  MV_CHECK(x.defined(), "permute: the input is undefined");
  return permute_impl("permute", x, permutation("permute", x, dims));
}

Tensor slice(const Tensor& x, int axis, int64_t start, int64_t end) {
  MV_CHECK(x.defined(), "slice: the input is undefined");
  const OpDevice dev = device_of("slice", {&x});
  const int a = norm_axis("slice", axis, x.ndim());
  const int64_t len = x.shape()[size_t(a)];
  const int64_t s = start < 0 ? start + len : start, e = end < 0 ? end + len : end;
  MV_CHECK(0 <= s && s <= e && e <= len, "slice: range [", start, ", ", end, ") is out of bounds for axis ",
           a, " of size ", len, " in ", x.str());
  Tensor out = slice_view(x, a, s, e - s);
  // d slice = g placed at [s, e) along the axis, zeros elsewhere
  return record("slice", out, {x}, [dev, xs = x.shape(), a, s](const Tensor& g) {
    Tensor gx = Tensor::zeros(xs, DType::F32, dev.device);
    MV_KERNEL(place_along)(dev, gx, a, s, g);
    return std::vector<Tensor>{gx};
  });
}

Tensor concat(const std::vector<Tensor>& xs, int axis) {
  MV_CHECK(!xs.empty(), "concat: no tensors to concatenate");
  for (const Tensor& t : xs) MV_CHECK(t.defined(), "concat: an input is undefined");
  const Tensor& x0 = xs[0];
  for (const Tensor& t : xs) device_of("concat", {&x0, &t});
  const OpDevice dev = device_of("concat", {&x0});
  const int a = norm_axis("concat", axis, x0.ndim());
  Shape shape = x0.shape();
  shape[size_t(a)] = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const Tensor& t = xs[i];
    bool match = t.ndim() == x0.ndim() && t.dtype() == x0.dtype();
    for (int d = 0; match && d < x0.ndim(); ++d) match = d == a || t.shape()[size_t(d)] == x0.shape()[size_t(d)];
    MV_CHECK(match, "concat: tensor ", i, " is ", t.str(), " but tensor 0 is ", x0.str(),
             "; they must match except along axis ", a);
    shape[size_t(a)] += t.shape()[size_t(a)];
  }
  Tensor out = Tensor::empty(shape, x0.dtype(), dev.device);
  std::vector<int64_t> pos, lens;
  std::vector<bool> need;
  for (int64_t p = 0; const Tensor& t : xs) {  // each input copied into its slice of out
    const int64_t li = t.shape()[size_t(a)];
    MV_KERNEL(place_along)(dev, out, a, p, t);
    pos.push_back(p);
    lens.push_back(li);
    need.push_back(t.requires_grad());
    p += li;
  }
  // d concat = the pieces of g along the axis
  return record("concat", out, xs, [dev, pos, lens, need, a](const Tensor& g) {
    std::vector<Tensor> grads(lens.size());
    for (size_t i = 0; i < lens.size(); ++i)
      if (need[i]) grads[i] = MV_KERNEL(take_along)(dev, g, a, pos[i], lens[i]);
    return grads;
  });
}

Tensor stack(const std::vector<Tensor>& xs, int axis) {
  MV_CHECK(!xs.empty(), "stack: no tensors to stack");
  for (size_t i = 0; i < xs.size(); ++i) {
    MV_CHECK(xs[i].defined(), "stack: an input is undefined");
    MV_CHECK(xs[i].shape() == xs[0].shape() && xs[i].dtype() == xs[0].dtype(), "stack: tensor ", i,
             " is ", xs[i].str(), " but tensor 0 is ", xs[0].str(), "; all must be the same");
  }
  const int a = norm_axis("stack", axis, xs[0].ndim() + 1);
  Shape s = xs[0].shape();
  s.insert(s.begin() + a, 1);
  // stack = concat of the inputs with a size-1 dim inserted; autograd flows through both.
  std::vector<Tensor> parts;
  parts.reserve(xs.size());
  for (const Tensor& t : xs) parts.push_back(reshape(t, s));
  return concat(parts, a);
}

// A permutation of the elements, so the backward is the inverse permutation of the gradient.
Tensor patchify(const Tensor& x, int p) {
  const OpDevice dev = device_of("patchify", {&x});
  expect_f32("patchify", {&x});
  MV_CHECK(p >= 1 && x.ndim() == 4 && x.size(2) % p == 0 && x.size(3) % p == 0, "patchify: images ",
           x.str(), " must be (B, C, H, W) with H and W multiples of the patch size ", p);
  return record("patchify", MV_KERNEL(patchify)(dev, x, p), {x}, [dev, is = x.shape(), p](const Tensor& g) {
    return std::vector<Tensor>{MV_KERNEL(unpatchify)(dev, g.contiguous(), is, p)};
  });
}

}  // namespace mv::ops
