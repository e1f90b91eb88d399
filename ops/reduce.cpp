// Reductions. A tensor reduced over one run of adjacent axes is seen as (outer, R, inner); a set
// of axes is reduced one run at a time, last run first, which keeps every kernel a simple
// (outer, R, inner) -> (outer, inner) walk over contiguous memory. When inner > 1 the walk goes
// row by row of R and accumulates a block of inner columns at once, so memory is read in order.
#include "ops/reduce.h"

#include <algorithm>
#include <cmath>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"

#ifdef MOEVIT_CUDA
#include "cuda/kernels.h"
#endif
#include "ops/elementwise.h"

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

Shape drop_shape(const Shape& s, const std::vector<bool>& red) {
  Shape k;
  for (size_t d = 0; d < s.size(); ++d)
    if (!red[d]) k.push_back(s[d]);
  return k;
}

int64_t reduced_count(const Shape& s, const std::vector<bool>& red) {
  int64_t n = 1;
  for (size_t d = 0; d < s.size(); ++d)
    if (red[d]) n *= s[d];
  return n;
}

// A contiguous tensor seen with another shape of the same element count (no copy).
Tensor reshaped(const Tensor& t, const Shape& s) {
  Tensor c = t.contiguous();
  return c.view_as(s, contiguous_strides(s), c.impl().offset);
}

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
Tensor sum_keep(const Tensor& x, const std::vector<bool>& red, double scale) {
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
  if (runs.empty()) return scale == 1.0 ? x.clone() : mul(x.detach(), float(scale));
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

// g: shape k (x's shape with reduced axes as 1) -> x's shape, every element times scale.
Tensor expand_kernel(const Tensor& g_, const Shape& xs, float scale) {
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

// sum (scale 1) and mean (scale 1/count); d/dx = g broadcast back, times scale
Tensor sum_or_mean(const char* op, const Tensor& x, const std::vector<int>& axes, bool keepdim,
                   bool is_mean) {
  const bool gpu = on_cuda(op, {&x});
  if (!gpu) expect_cpu_f32(op, {&x});
  const std::vector<bool> red = reduced_axes(op, x, axes);
  const int64_t count = reduced_count(x.shape(), red);
  const double scale = is_mean ? 1.0 / double(count) : 1.0;
#ifdef MOEVIT_CUDA
  if (gpu) {  // every element: one block's tree; some axes: cuda::sum_keep, a thread per output
    Shape ks = x.shape();
    for (size_t d = 0; d < ks.size(); ++d)
      if (red[d]) ks[d] = 1;
    Tensor k = count == x.numel() ? flat_view(cuda::sum_all(x.contiguous(), float(scale)), ks)
                                  : cuda::sum_keep(x, ks, float(scale));
    Tensor out = keepdim ? k : flat_view(k, drop_shape(x.shape(), red));
    if (!autograd::needs_graph({x})) return out;
    // d/dx = g broadcast back to x's shape, times scale: g + 0 through the broadcasting add
    return record(op, out, {x}, [xs = x.shape(), ks, s = float(scale)](const Tensor& g) {
      const Tensor e = cuda::binary(Tensor::zeros(xs, DType::F32, Device::CUDA), flat_view(g, ks),
                                    cuda::Binary::Add);
      return std::vector<Tensor>{s == 1.f ? e : cuda::axpby(e, Tensor(), s, 0.f)};
    });
  }
#endif
  Tensor k = sum_keep(x.contiguous(), red, scale);
  Tensor out = keepdim ? k : reshaped(k, drop_shape(x.shape(), red));
  return record(op, out, {x}, [xs = x.shape(), ks = k.shape(), s = float(scale)](const Tensor& g) {
    return std::vector<Tensor>{expand_kernel(reshaped(g, ks), xs, s)};
  });
}

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

struct Split {
  int64_t outer = 1, n = 1, inner = 1;
  Shape out_shape;
};

Split split_axis(const char* op, const Tensor& x, int axis, bool keepdim) {
  MV_CHECK(x.ndim() >= 1, op, ": needs at least one axis, got ", x.str());
  const int a = norm_axis(op, axis, x.ndim());
  Split s;
  for (int d = 0; d < x.ndim(); ++d) {
    const int64_t v = x.shape()[size_t(d)];
    if (d < a) s.outer *= v;
    if (d > a) s.inner *= v;
    if (d != a || keepdim) s.out_shape.push_back(d == a ? 1 : v);
  }
  s.n = x.shape()[size_t(a)];
  MV_CHECK(s.n > 0, op, ": axis ", axis, " of ", x.str(), " is empty");
  return s;
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
// sum to zero because sum(x - m) = 0)
Tensor var(const Tensor& x, std::vector<int> axes, bool keepdim, int correction) {
  expect_cpu_f32("var", {&x});
  const std::vector<bool> red = reduced_axes("var", x, axes);
  const int64_t count = reduced_count(x.shape(), red);
  MV_CHECK(correction >= 0 && count > correction, "var: reducing ", count, " elements of ", x.str(),
           " with correction ", correction, "; needs more elements than the correction");
  const double denom = double(count - correction);
  Tensor xd = x.detach().contiguous();
  Tensor k;
  {
    autograd::NoGrad ng;
    Tensor m = sum_keep(xd, red, 1.0 / double(count));
    Tensor d = sub(xd, m);  // two passes: no cancellation from E[x^2] - E[x]^2
    k = sum_keep(mul(d, d), red, 1.0 / denom);
  }
  Tensor out = keepdim ? k : reshaped(k, drop_shape(x.shape(), red));
  return record("var", out, {x}, [xd, red, ks = k.shape(), count, denom](const Tensor& g) {
    Tensor m = sum_keep(xd, red, 1.0 / double(count));
    Tensor gk = reshaped(g, ks);
    return std::vector<Tensor>{mul(sub(xd, m), mul(gk, float(2.0 / denom)))};
  });
}

// d max / dx = g at the first maximal element of each column, 0 elsewhere
Tensor max(const Tensor& x, int axis, bool keepdim) {
  expect_cpu_f32("max", {&x});
  const Split s = split_axis("max", x, axis, keepdim);
  Tensor out = Tensor::empty(s.out_shape);
  Tensor idx = Tensor::empty(s.out_shape, DType::I64);
  max_kernel(x.contiguous(), s.outer, s.n, s.inner, out.data<float>(), idx.data<int64_t>());
  return record("max", out, {x}, [idx, s, xs = x.shape()](const Tensor& g_) {
    Tensor g = g_.contiguous();
    Tensor gx = Tensor::zeros(xs);
    const float* pg = g.data<float>();
    const int64_t* pi = idx.data<int64_t>();
    float* px = gx.data<float>();
    for (int64_t o = 0; o < s.outer; ++o)
      for (int64_t i = 0; i < s.inner; ++i) {
        const int64_t c = o * s.inner + i;
        px[(o * s.n + pi[c]) * s.inner + i] = pg[c];
      }
    return std::vector<Tensor>{gx};
  });
}

Tensor argmax(const Tensor& x, int axis, bool keepdim) {
  const bool gpu = on_cuda("argmax", {&x});
  if (!gpu) expect_cpu_f32("argmax", {&x});
  const Split s = split_axis("argmax", x, axis, keepdim);
#ifdef MOEVIT_CUDA
  if (gpu) {
    MV_CHECK(s.inner == 1, "argmax: only the last axis has a CUDA kernel yet; got axis ", axis,
             " of ", x.str());
    return flat_view(cuda::argmax_last(x.contiguous()), s.out_shape);
  }
#endif
  Tensor idx = Tensor::empty(s.out_shape, DType::I64);
  std::vector<float> vals(size_t(s.outer * s.inner));
  max_kernel(x.contiguous(), s.outer, s.n, s.inner, vals.data(), idx.data<int64_t>());
  return idx;
}

}  // namespace mv::ops
