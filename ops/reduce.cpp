// Reductions; their CUDA twin is cuda/reduce.cu. On the CPU a tensor reduced over one run of
// adjacent axes is seen as (outer, R, inner); a set of axes is reduced one run at a time, last
// run first, which keeps every kernel a simple (outer, R, inner) -> (outer, inner) walk over
// contiguous memory. When inner > 1 the walk goes
// row by row of R and accumulates a block of inner columns at once, so memory is read in order.
#include "ops/reduce.h"

#include <algorithm>
#include <cmath>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"
#include "ops/dispatch.h"
#include "ops/elementwise.h"

namespace mv::cpu {

namespace {

// Sum of 4 interleaved double accumulators: keeps the add chain short without reordering
// anything across calls (results depend only on n, never on the thread count).
inline double sum_run(const float* p, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {
    s0 += p[r];
    s1 += p[r + 1];
    s2 += p[r + 2];
    s3 += p[r + 3];
  }
  for (; r < n; ++r) s0 += p[r];
  return (s0 + s1) + (s2 + s3);
}

// x contiguous, seen as (outer, R, inner) -> out (outer * inner elements, shape out_shape),
// each the sum over R times scale.
Tensor sum_kernel(const Tensor& x, int64_t outer, int64_t R, int64_t inner, double scale,
                  const Shape& out_shape) {
  Tensor out = Tensor::empty(out_shape);
  const float* px = x.data<float>();
  float* po = out.data<float>();
  const int64_t cols = outer * inner;
  if (cols == 0) return out;
  constexpr int64_t kChunk = 1 << 14;
  if (cols < 16 && R >= 2 * kChunk) {
    // Few outputs over a long axis: fixed-size chunks of R summed in parallel, then combined in
    // chunk order (deterministic for any thread count).
    const int64_t nc = (R + kChunk - 1) / kChunk;
    std::vector<double> part(size_t(nc * cols));
    parallel_for(nc, kChunk * cols, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        const int64_t r0 = c * kChunk, r1 = std::min(R, r0 + kChunk);
        for (int64_t o = 0; o < outer; ++o)
          for (int64_t i = 0; i < inner; ++i) {
            double s = 0;
            if (inner == 1) {
              s = sum_run(px + o * R + r0, r1 - r0);
            } else {
              for (int64_t r = r0; r < r1; ++r) s += px[(o * R + r) * inner + i];
            }
            part[size_t(c * cols + o * inner + i)] = s;
          }
      }
    });
    for (int64_t col = 0; col < cols; ++col) {
      double s = 0;
      for (int64_t c = 0; c < nc; ++c) s += part[size_t(c * cols + col)];
      po[col] = float(s * scale);
    }
    return out;
  }
  parallel_for(cols, R, [&](int64_t b, int64_t e) {
    if (inner == 1) {
      for (int64_t col = b; col < e; ++col) po[col] = float(sum_run(px + col * R, R) * scale);
      return;
    }
    std::vector<double> acc;
    for (int64_t col = b; col < e;) {
      const int64_t o = col / inner, i0 = col % inner, i1 = std::min(inner, i0 + (e - col));
      acc.assign(size_t(i1 - i0), 0.0);
      for (int64_t r = 0; r < R; ++r) {
        const float* row = px + (o * R + r) * inner;
        for (int64_t i = i0; i < i1; ++i) acc[size_t(i - i0)] += row[i];
      }
      for (int64_t i = i0; i < i1; ++i) po[o * inner + i] = float(acc[size_t(i - i0)] * scale);
      col += i1 - i0;
    }
  });
  return out;
}

// Sum of contiguous x over the axes marked in `red`, times scale, with reduced axes kept as 1.
Tensor sum_marked(const Tensor& x, const std::vector<bool>& red, double scale) {
  const int nd = x.ndim();
  Shape s = x.shape();
  if (nd == 0) return sum_kernel(x, 1, 1, 1, scale, {});
  // Runs of adjacent reduced axes, last first; the last kernel to run (the first run) scales.
  std::vector<std::pair<int, int>> runs;
  for (int d = 0; d < nd;) {
    if (!red[size_t(d)]) {
      ++d;
      continue;
    }
    int e = d;
    while (e < nd && red[size_t(e)]) ++e;
    runs.push_back({d, e});
    d = e;
  }
  Tensor cur = x;
  if (runs.empty()) return sum_kernel(x, x.numel(), 1, 1, scale, s);  // nothing reduced: x * scale
  for (size_t k = runs.size(); k-- > 0;) {
    auto [a, b] = runs[k];
    int64_t outer = 1, R = 1, inner = 1;
    for (int d = 0; d < a; ++d) outer *= s[size_t(d)];
    for (int d = a; d < b; ++d) R *= s[size_t(d)];
    for (int d = b; d < nd; ++d) inner *= s[size_t(d)];
    for (int d = a; d < b; ++d) s[size_t(d)] = 1;
    cur = sum_kernel(cur, outer, R, inner, k == 0 ? scale : 1.0, s);
  }
  return cur;
}

}  // namespace

// x: any layout; keep: x's shape with 1 at each reduced axis (a size-1 axis of x counts as
// reduced: summing one element changes nothing, and adjacent reduced axes form fewer runs)
// -> (keep): scale * the sums
Tensor sum_keep(const Tensor& x, const Shape& keep, double scale) {
  std::vector<bool> red(keep.size());
  for (size_t d = 0; d < keep.size(); ++d) red[d] = keep[d] == 1;
  return sum_marked(x.contiguous(), red, scale);
}

// g: x_shape with 1 at the reduced axes -> (x_shape): g repeated along them, times scale
Tensor expand(const Tensor& g_, const Shape& xs, float scale) {
  Tensor g = g_.contiguous();
  Tensor out = Tensor::empty(xs);
  const int nd = int(xs.size());
  const float* pg = g.data<float>();
  float* po = out.data<float>();
  if (nd == 0 || out.numel() == 0) {
    if (out.numel()) po[0] = pg[0] * scale;
    return out;
  }
  const Shape& gs = g.shape();
  Shape st = contiguous_strides(gs);
  for (int d = 0; d < nd; ++d)
    if (gs[size_t(d)] == 1) st[size_t(d)] = 0;
  const int64_t cols = xs.back(), cs = st.back(), rows = out.numel() / cols;
  parallel_for(rows, cols, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      int64_t off = 0, rr = r;
      for (int d = nd - 2; d >= 0; --d) {
        off += (rr % xs[size_t(d)]) * st[size_t(d)];
        rr /= xs[size_t(d)];
      }
      float* ro = po + r * cols;
      if (cs == 0) {
        const float v = pg[off] * scale;
        for (int64_t j = 0; j < cols; ++j) ro[j] = v;
      } else {
        for (int64_t j = 0; j < cols; ++j) ro[j] = pg[off + j] * scale;
      }
    }
  });
  return out;
}

namespace {

// x contiguous seen as (outer, n, inner) -> first index of the largest value per column (NaN
// counts as largest) and that value.
void max_kernel(const Tensor& x, int64_t outer, int64_t n, int64_t inner, float* vals,
                int64_t* idx) {
  const float* px = x.data<float>();
  // v beats the best so far: strictly larger, or the first NaN.
  auto beats = [](float v, float best) { return v > best || (v != v && best == best); };
  parallel_for(outer * inner, n, [&](int64_t b, int64_t e) {
    for (int64_t col = b; col < e;) {
      const int64_t o = col / inner, i0 = col % inner, i1 = std::min(inner, i0 + (e - col));
      const float* base = px + o * n * inner;
      for (int64_t i = i0; i < i1; ++i) {
        vals[o * inner + i] = base[i];
        idx[o * inner + i] = 0;
      }
      for (int64_t r = 1; r < n; ++r) {
        const float* row = base + r * inner;
        for (int64_t i = i0; i < i1; ++i)
          if (beats(row[i], vals[o * inner + i])) {
            vals[o * inner + i] = row[i];
            idx[o * inner + i] = r;
          }
      }
      col += i1 - i0;
    }
  });
}

}  // namespace

// x: any layout -> values and (I64) indices of the first largest element along axis, x's shape
// with 1 at axis
ops::MaxOut max_forward(const Tensor& x, int axis) {
  Shape ks = x.shape();
  ks[size_t(axis)] = 1;
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < axis; ++d) outer *= x.size(d);
  for (int d = axis + 1; d < x.ndim(); ++d) inner *= x.size(d);
  ops::MaxOut o{Tensor::empty(ks), Tensor::empty(ks, DType::I64)};
  max_kernel(x.contiguous(), outer, x.size(axis), inner, o.values.data<float>(), o.index.data<int64_t>());
  return o;
}

// g: x's shape with 1 at axis, index from max_forward -> (x_shape): g at each maximal element,
// 0 elsewhere
Tensor max_backward(const Tensor& g_, const Tensor& index, const Shape& xs, int axis) {
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < axis; ++d) outer *= xs[size_t(d)];
  for (size_t d = size_t(axis) + 1; d < xs.size(); ++d) inner *= xs[d];
  const int64_t n = xs[size_t(axis)];
  const Tensor g = g_.contiguous();
  Tensor gx = Tensor::zeros(xs);
  const float* pg = g.data<float>();
  const int64_t* pi = index.data<int64_t>();
  float* px = gx.data<float>();
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t i = 0; i < inner; ++i) {
      const int64_t c = o * inner + i;
      px[(o * n + pi[c]) * inner + i] = pg[c];
    }
  return gx;
}

// x: any layout -> I64 indices of the first largest element along axis, x's shape with 1 at axis
Tensor argmax(const Tensor& x, int axis) { return max_forward(x, axis).index; }

}  // namespace mv::cpu

namespace mv::ops {

using autograd::record;

namespace {

// Which axes of a rank-nd tensor are reduced; empty `axes` means all of them.
std::vector<bool> reduced_axes(const char* op, const Tensor& x, const std::vector<int>& axes) {
  const int nd = x.ndim();
  std::vector<bool> red(size_t(nd), axes.empty());
  for (int a : axes) {
    int n = norm_axis(op, a, nd);
    MV_CHECK(!red[size_t(n)], op, ": axis ", a, " is listed twice for ", x.str());
    red[size_t(n)] = true;
  }
  return red;
}

// x's shape with the reduced axes as 1 (keep) or dropped.
Shape reduced_shape(const Shape& s, const std::vector<bool>& red, bool keep) {
  Shape k;
  for (size_t d = 0; d < s.size(); ++d)
    if (!red[d] || keep) k.push_back(red[d] ? 1 : s[d]);
  return k;
}

int64_t reduced_count(const Shape& s, const std::vector<bool>& red) {
  int64_t n = 1;
  for (size_t d = 0; d < s.size(); ++d)
    if (red[d]) n *= s[d];
  return n;
}

// sum (scale 1) and mean (scale 1/count); d/dx = g broadcast back, times scale
Tensor sum_or_mean(const char* op, const Tensor& x, const std::vector<int>& axes, bool keepdim, bool is_mean) {
  const OpDevice dev = device_of(op, {&x});
  expect_f32(op, {&x});
  const std::vector<bool> red = reduced_axes(op, x, axes);
  const int64_t count = reduced_count(x.shape(), red);
  const double scale = is_mean ? 1.0 / double(count) : 1.0;
  const Shape ks = reduced_shape(x.shape(), red, true);
  Tensor k = MV_KERNEL(sum_keep)(dev, x, ks, scale);
  Tensor out = keepdim ? k : k.reshaped(reduced_shape(x.shape(), red, false));
  return record(op, out, {x}, [dev, xs = x.shape(), ks, s = float(scale)](const Tensor& g) {
    return std::vector<Tensor>{MV_KERNEL(expand)(dev, g.reshaped(ks), xs, s)};
  });
}

// The axis of max and argmax, checked, and the output's shape.
int max_axis(const char* op, const Tensor& x, int axis, bool keepdim, Shape& out_shape) {
  MV_CHECK(x.ndim() >= 1, op, ": needs at least one axis, got ", x.str());
  const int a = norm_axis(op, axis, x.ndim());
  MV_CHECK(x.shape()[size_t(a)] > 0, op, ": axis ", axis, " of ", x.str(), " is empty");
  out_shape.clear();
  for (int d = 0; d < x.ndim(); ++d)
    if (d != a || keepdim) out_shape.push_back(d == a ? 1 : x.shape()[size_t(d)]);
  return a;
}

}  // namespace

Tensor sum(const Tensor& x) { return sum_or_mean("sum", x, {}, false, false); }
Tensor sum(const Tensor& x, std::vector<int> axes, bool keepdim) {
  return sum_or_mean("sum", x, axes, keepdim, false);
}
Tensor mean(const Tensor& x) { return sum_or_mean("mean", x, {}, false, true); }
Tensor mean(const Tensor& x, std::vector<int> axes, bool keepdim) {
  return sum_or_mean("mean", x, axes, keepdim, true);
}

// v = sum((x - m)^2) / (n - c), m = mean(x); dv/dx = 2 (x - m) / (n - c) (the terms through m
// sum to zero because sum(x - m) = 0). Made of the sum kernel and elementwise ops.
Tensor var(const Tensor& x, std::vector<int> axes, bool keepdim, int correction) {
  const OpDevice dev = device_of("var", {&x});
  expect_f32("var", {&x});
  const std::vector<bool> red = reduced_axes("var", x, axes);
  const int64_t count = reduced_count(x.shape(), red);
  MV_CHECK(correction >= 0 && count > correction, "var: reducing ", count, " elements of ", x.str(),
           " with correction ", correction, "; needs more elements than the correction");
  const double denom = double(count - correction), inv_count = 1.0 / double(count);
  const Shape ks = reduced_shape(x.shape(), red, true);
  const Tensor xd = x.detach();
  Tensor k;
  {
    autograd::NoGrad ng;
    Tensor d = sub(xd, MV_KERNEL(sum_keep)(dev, xd, ks, inv_count));  // two passes: no cancellation
    k = MV_KERNEL(sum_keep)(dev, mul(d, d), ks, 1.0 / denom);
  }
  Tensor out = keepdim ? k : k.reshaped(reduced_shape(x.shape(), red, false));
  return record("var", out, {x}, [dev, xd, ks, inv_count, denom](const Tensor& g) {
    const Tensor m = MV_KERNEL(sum_keep)(dev, xd, ks, inv_count);
    return std::vector<Tensor>{mul(sub(xd, m), mul(g.reshaped(ks), float(2.0 / denom)))};
  });
}

// d max / dx = g at the first maximal element of each column, 0 elsewhere
Tensor max(const Tensor& x, int axis, bool keepdim) {
  const OpDevice dev = device_of("max", {&x});
  expect_f32("max", {&x});
  Shape out_shape;
  const int a = max_axis("max", x, axis, keepdim, out_shape);
  MaxOut f = MV_KERNEL(max_forward)(dev, x, a);
  return record("max", f.values.reshaped(out_shape), {x}, [dev, index = f.index, xs = x.shape(), a](const Tensor& g) {
    return std::vector<Tensor>{MV_KERNEL(max_backward)(dev, g, index, xs, a)};
  });
}

Tensor argmax(const Tensor& x, int axis, bool keepdim) {
  const OpDevice dev = device_of("argmax", {&x});
  expect_f32("argmax", {&x});
  Shape out_shape;
  const int a = max_axis("argmax", x, axis, keepdim, out_shape);
  return MV_KERNEL(argmax)(dev, x, a).reshaped(out_shape);
}

}  // namespace mv::ops
