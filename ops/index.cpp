// Indexing ops (CPU kernels only so far). The kernels check the indices' values in one serial
// pass before their parallel loop, so no error is ever raised inside an OpenMP region.
//
// gather and scatter_add walk idx as (outer, A, inner) around the axis. Work is split over
// outer (and over chunks of inner when outer is small): elements that differ only along the axis
// stay in one task, so scatter_add's accumulation into the same target never races.
#include "ops/index.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"
#include "ops/dispatch.h"

namespace mv::cpu {

namespace {

// Throws naming the first index outside [0, size).
void check_range(const char* op, const Tensor& idx, int64_t size, int axis, const Tensor& x) {
  const int64_t* p = idx.data<int64_t>();
  for (int64_t i = 0, n = idx.numel(); i < n; ++i)
    MV_CHECK(p[i] >= 0 && p[i] < size, op, ": index ", p[i], " (at flat position ", i,
             ") is out of range for axis ", axis, " of size ", size, " in ", x.str());
}

// The walk of an index tensor of shape s around axis a over a contiguous tensor of shape xs.
struct Walk {
  int64_t outer = 1, A = 1, inner = 1, xstride = 1;  // xstride: x's stride along the axis
  std::vector<int64_t> outer_off, inner_off;          // x offsets of each outer / inner position
};

Walk make_walk(const Shape& s, const Shape& xs, int a) {
  Walk w;
  const Shape st = contiguous_strides(xs);
  const int r = int(s.size());
  for (int d = 0; d < a; ++d) w.outer *= s[size_t(d)];
  w.A = s[size_t(a)];
  for (int d = a + 1; d < r; ++d) w.inner *= s[size_t(d)];
  w.xstride = st[size_t(a)];
  // x offset of the i-th position in dims [d0, d1) of s, row-major.
  auto offsets = [&](int d0, int d1, int64_t count) {
    std::vector<int64_t> off(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) {
      int64_t o = 0;
      for (int64_t d = d1 - 1, rem = i; d >= d0; --d) {
        o += (rem % s[size_t(d)]) * st[size_t(d)];
        rem /= s[size_t(d)];
      }
      off[size_t(i)] = o;
    }
    return off;
  };
  w.outer_off = offsets(0, a, w.outer);
  w.inner_off = offsets(a + 1, r, w.inner);
  return w;
}

// f(p, xo) for every idx position p (flat, contiguous) with xo the x offset it addresses.
template <class F>
void walk(const Walk& w, const int64_t* idx, F f) {
  const int64_t kchunks = w.outer >= 8 ? 1 : std::clamp<int64_t>(w.inner / 256, 1, 16);
  const int64_t per = (w.inner + kchunks - 1) / kchunks;
  parallel_for(w.outer * kchunks, w.A * per * 2, [&](int64_t s, int64_t e) {
    for (int64_t t = s; t < e; ++t) {
      const int64_t o = t / kchunks, k0 = (t % kchunks) * per, k1 = std::min(w.inner, k0 + per);
      const int64_t base = w.outer_off[size_t(o)];
      for (int64_t a = 0; a < w.A; ++a) {
        const int64_t p0 = (o * w.A + a) * w.inner;
        for (int64_t k = k0; k < k1; ++k)
          f(p0 + k, base + w.inner_off[size_t(k)] + idx[p0 + k] * w.xstride);
      }
    }
  });
}

}  // namespace

// x: (..., L, ...) with L at axis a, idx: (n,) I64 -> (..., n, ...); throws naming an index
// outside [0, L)
Tensor index_select_forward(const Tensor& x_, int a, const Tensor& idx_) {
  const Tensor x = x_.contiguous(), idx = idx_.contiguous();
  const int64_t L = x.shape()[size_t(a)], n = idx.numel();
  check_range("index_select", idx, L, a, x);
  Shape shape = x.shape();
  shape[size_t(a)] = n;
  Tensor out = Tensor::empty(shape);
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < a; ++d) outer *= shape[size_t(d)];
  for (size_t d = size_t(a) + 1; d < shape.size(); ++d) inner *= shape[d];
  const int64_t* pi = idx.data<int64_t>();
  const float* px = x.data<float>();
  float* po = out.data<float>();
  parallel_for(outer * n, inner, [&](int64_t s, int64_t e) {
    for (int64_t t = s; t < e; ++t) {
      const int64_t o = t / n, j = t % n;
      std::memcpy(po + t * inner, px + (o * L + pi[j]) * inner, size_t(inner) * sizeof(float));
    }
  });
  return out;
}

// g: (..., n, ...) -> (x_shape): gx[.., idx[j], ..] += g[.., j, ..]. Tasks own (outer, column
// range) pairs, so repeated indices accumulate without races.
Tensor index_select_backward(const Tensor& g_, const Tensor& idx_, const Shape& xs, int a) {
  const Tensor g = g_.contiguous(), idx = idx_.contiguous();
  const int64_t L = xs[size_t(a)], n = idx.numel();
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < a; ++d) outer *= xs[size_t(d)];
  for (size_t d = size_t(a) + 1; d < xs.size(); ++d) inner *= xs[d];
  Tensor gx = Tensor::zeros(xs);
  const int64_t* pi = idx.data<int64_t>();
  const float* pg = g.data<float>();
  float* pgx = gx.data<float>();
  const int64_t kchunks = outer >= 8 ? 1 : std::clamp<int64_t>(inner / 256, 1, 16);
  const int64_t per = (inner + kchunks - 1) / kchunks;
  parallel_for(outer * kchunks, n * per, [&](int64_t s, int64_t e) {
    for (int64_t t = s; t < e; ++t) {
      const int64_t o = t / kchunks, k0 = (t % kchunks) * per, k1 = std::min(inner, k0 + per);
      for (int64_t j = 0; j < n; ++j) {
        const float* src = pg + (o * n + j) * inner;
        float* dst = pgx + (o * L + pi[j]) * inner;
        for (int64_t k = k0; k < k1; ++k) dst[k] += src[k];
      }
    }
  });
  return gx;
}

// x, idx: fitting shapes (ops::gather) -> idx's shape; throws naming an index out of range
Tensor gather_forward(const Tensor& x_, int a, const Tensor& idx_) {
  const Tensor x = x_.contiguous(), idx = idx_.contiguous();
  check_range("gather", idx, x.shape()[size_t(a)], a, x);
  Tensor out = Tensor::empty(idx.shape());
  const float* px = x.data<float>();
  float* po = out.data<float>();
  walk(make_walk(idx.shape(), x.shape(), a), idx.data<int64_t>(), [&](int64_t p, int64_t xo) { po[p] = px[xo]; });
  return out;
}

// x, idx, src: fitting shapes (ops::scatter_add) -> a copy of x with src added at the indices;
// throws naming an index out of range
Tensor scatter_add_forward(const Tensor& x, int a, const Tensor& idx_, const Tensor& src_) {
  const Tensor idx = idx_.contiguous(), src = src_.contiguous();
  check_range("scatter_add", idx, x.shape()[size_t(a)], a, x);
  Tensor out = x.clone();
  const float* ps = src.data<float>();
  float* po = out.data<float>();
  walk(make_walk(idx.shape(), x.shape(), a), idx.data<int64_t>(), [&](int64_t p, int64_t xo) { po[xo] += ps[p]; });
  return out;
}

// idx: I64 any shape -> F32 (..., n) with a 1 at each index; throws naming an index outside [0, n)
Tensor one_hot(const Tensor& idx_, int64_t n) {
  const Tensor idx = idx_.contiguous();
  const int64_t* pi = idx.data<int64_t>();
  for (int64_t i = 0, m = idx.numel(); i < m; ++i)
    MV_CHECK(pi[i] >= 0 && pi[i] < n, "one_hot: index ", pi[i], " (at flat position ", i,
             ") is out of range for n = ", n);
  Shape shape = idx.shape();
  shape.push_back(n);
  Tensor out = Tensor::zeros(shape);
  float* po = out.data<float>();
  for (int64_t i = 0, m = idx.numel(); i < m; ++i) po[i * n + pi[i]] = 1.f;
  return out;
}

}  // namespace mv::cpu

namespace mv::ops {

using autograd::record;

namespace {

// Throws unless idx is a defined I64 tensor.
void expect_index(const char* op, const Tensor& idx) {
  MV_CHECK(idx.defined(), op, ": the index tensor is undefined");
  MV_CHECK(idx.dtype() == DType::I64, op, ": indices must be an I64 tensor, got ", idx.str());
}

// idx's shape fits x for gather/scatter_add: same rank, no larger than x off the axis.
void check_fits(const char* op, const Tensor& x, int a, const Tensor& idx) {
  bool ok = idx.ndim() == x.ndim();
  for (int d = 0; ok && d < x.ndim(); ++d) ok = d == a || idx.shape()[size_t(d)] <= x.shape()[size_t(d)];
  MV_CHECK(ok, op, ": index ", idx.str(), " must have the rank of ", x.str(),
           " and be no larger than it on every axis but ", a);
}

}  // namespace

Tensor index_select(const Tensor& x, int axis, const Tensor& idx) {
  expect_index("index_select", idx);
  const OpDevice dev = device_of("index_select", {&x, &idx});
  expect_f32("index_select", {&x});
  MV_CHECK(idx.ndim() == 1, "index_select: indices must be 1-D, got ", idx.str());
  const int a = norm_axis("index_select", axis, x.ndim());
  Tensor out = MV_CPU_KERNEL(index_select_forward)(dev, x, a, idx);
  return record("index_select", out, {x}, [dev, idx, xs = x.shape(), a](const Tensor& g) {
    return std::vector<Tensor>{MV_CPU_KERNEL(index_select_backward)(dev, g, idx, xs, a)};
  });
}

// d gather = scatter_add of g into zeros at the same indices
Tensor gather(const Tensor& x, int axis, const Tensor& idx) {
  expect_index("gather", idx);
  const OpDevice dev = device_of("gather", {&x, &idx});
  expect_f32("gather", {&x});
  const int a = norm_axis("gather", axis, x.ndim());
  check_fits("gather", x, a, idx);
  Tensor out = MV_CPU_KERNEL(gather_forward)(dev, x, a, idx);
  return record("gather", out, {x}, [dev, idx, xs = x.shape(), a](const Tensor& g) {
    return std::vector<Tensor>{scatter_add(Tensor::zeros(xs, DType::F32, dev.device), a, idx, g)};
  });
}

// d x = g; d src = g gathered at the indices
Tensor scatter_add(const Tensor& x, int axis, const Tensor& idx, const Tensor& src) {
  expect_index("scatter_add", idx);
  const OpDevice dev = device_of("scatter_add", {&x, &idx, &src});
  expect_f32("scatter_add", {&x, &src});
  const int a = norm_axis("scatter_add", axis, x.ndim());
  check_fits("scatter_add", x, a, idx);
  MV_CHECK(src.shape() == idx.shape(), "scatter_add: src ", src.str(), " must have the index's shape ",
           shape_str(idx.shape()));
  Tensor out = MV_CPU_KERNEL(scatter_add_forward)(dev, x, a, idx, src);
  const bool gx = x.requires_grad(), gs = src.requires_grad();
  return record("scatter_add", out, {x, src}, [idx, a, gx, gs](const Tensor& g) {
    return std::vector<Tensor>{gx ? g.contiguous() : Tensor(), gs ? gather(g, a, idx) : Tensor()};
  });
}

Tensor one_hot(const Tensor& idx, int64_t n) {
  MV_CHECK(n > 0, "one_hot: the number of classes must be positive, got ", n);
  expect_index("one_hot", idx);
  return MV_CPU_KERNEL(one_hot)(device_of("one_hot", {&idx}), idx, n);
}

}  // namespace mv::ops
