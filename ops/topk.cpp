// Top-k and argsort (CPU kernels only so far). Top-k by a partial sort of each row's indices,
// argsort by a full sort. The comparators break ties by index, which makes the order total (so
// results are deterministic and std::sort is as good as a stable sort) and puts NaN after
// (ascending) or before (descending) all numbers.
#include "ops/topk.h"

#include <algorithm>
#include <numeric>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/dispatch.h"

namespace mv::cpu {

namespace {

// a goes before b in descending order: larger value, NaN largest, ties by lower index.
struct Descending {
  const float* row;
  bool operator()(int64_t a, int64_t b) const {
    const float va = row[a], vb = row[b];
    const bool na = va != va, nb = vb != vb;
    if (na || nb) return na && nb ? a < b : na;
    return va > vb || (va == vb && a < b);
  }
};

// a goes before b in ascending order: smaller value, NaN largest, ties by lower index.
struct Ascending {
  const float* row;
  bool operator()(int64_t a, int64_t b) const {
    const float va = row[a], vb = row[b];
    const bool na = va != va, nb = vb != vb;
    if (na || nb) return na && nb ? a < b : nb;
    return va < vb || (va == vb && a < b);
  }
};

}  // namespace

// x: (..., n) -> the k largest values of each row and their indices: (..., k)
ops::TopK topk_forward(const Tensor& x_, int k) {
  const Tensor x = x_.contiguous();
  const int64_t n = x.shape().back(), rows = x.numel() / n;
  Shape os = x.shape();
  os.back() = k;
  ops::TopK o{Tensor::empty(os), Tensor::empty(os, DType::I64)};
  const float* px = x.data<float>();
  float* pv = o.values.data<float>();
  int64_t* pi = o.indices.data<int64_t>();
  parallel_for(rows, n * 4, [&](int64_t b, int64_t e) {
    std::vector<int64_t> order(static_cast<size_t>(n));
    for (int64_t r = b; r < e; ++r) {
      const float* row = px + r * n;
      std::iota(order.begin(), order.end(), int64_t(0));
      std::partial_sort(order.begin(), order.begin() + k, order.end(), Descending{row});
      for (int64_t j = 0; j < k; ++j) {
        pi[r * k + j] = order[size_t(j)];
        pv[r * k + j] = row[order[size_t(j)]];
      }
    }
  });
  return o;
}

// g: (..., k), indices from topk_forward -> (x_shape): g scattered to the chosen positions (each
// position is chosen at most once)
Tensor topk_backward(const Tensor& g_, const Tensor& indices, const Shape& xs) {
  const Tensor g = g_.contiguous();
  const int64_t n = xs.back(), k = indices.shape().back(), rows = shape_numel(xs) / n;
  Tensor gx = Tensor::zeros(xs);
  const float* pg = g.data<float>();
  const int64_t* pi = indices.data<int64_t>();
  float* po = gx.data<float>();
  parallel_for(rows, k, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t j = 0; j < k; ++j) po[r * n + pi[r * k + j]] = pg[r * k + j];
  });
  return gx;
}

// x: (..., n) -> I64 (..., n): each row's sorting permutation
Tensor argsort(const Tensor& x_, bool descending) {
  const Tensor x = x_.contiguous();
  const int64_t n = x.shape().back(), rows = n == 0 ? 0 : x.numel() / n;
  Tensor idx = Tensor::empty(x.shape(), DType::I64);
  const float* px = x.data<float>();
  int64_t* pi = idx.data<int64_t>();
  parallel_for(rows, n * 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      int64_t* o = pi + r * n;
      std::iota(o, o + n, int64_t(0));
      if (descending)
        std::sort(o, o + n, Descending{px + r * n});
      else
        std::sort(o, o + n, Ascending{px + r * n});
    }
  });
  return idx;
}

}  // namespace mv::cpu

namespace mv::ops {

TopK topk(const Tensor& x, int k) {
  const OpDevice dev = device_of("topk", {&x});
  expect_f32("topk", {&x});
  MV_CHECK(x.ndim() >= 1, "topk: needs at least one axis, got ", x.str());
  const int64_t n = x.shape().back();
  MV_CHECK(k >= 1 && k <= n, "topk: k = ", k, " is outside [1, ", n, "] for ", x.str());
  TopK res = MV_CPU_KERNEL(topk_forward)(dev, x, k);
  res.values = autograd::record("topk", res.values, {x}, [dev, idx = res.indices, xs = x.shape()](const Tensor& g) {
    return std::vector<Tensor>{MV_CPU_KERNEL(topk_backward)(dev, g, idx, xs)};
  });
  return res;
}

Tensor argsort(const Tensor& x, bool descending) {
  const OpDevice dev = device_of("argsort", {&x});
  expect_f32("argsort", {&x});
  MV_CHECK(x.ndim() >= 1, "argsort: needs at least one axis, got ", x.str());
  return MV_CPU_KERNEL(argsort)(dev, x, descending);
}

}  // namespace mv::ops
