// Top-k by a partial sort of each row's indices, argsort by a full sort. The comparators break
// ties by index, which makes the order total (so results are deterministic and std::sort is
// as good as a stable sort) and puts NaN after (ascending) or before (descending) all numbers.
#include "ops/topk.h"

#include <algorithm>
#include <numeric>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"

namespace mv::ops {

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

// d values / dx = g scattered to the chosen positions (each position is chosen at most once)
TopK topk(const Tensor& x_, int k) {
  expect_cpu_f32("topk", {&x_});
  MV_CHECK(x_.ndim() >= 1, "topk: needs at least one axis, got ", x_.str());
  const int64_t n = x_.shape().back();
  MV_CHECK(k >= 1 && k <= n, "topk: k = ", k, " is outside [1, ", n, "] for ", x_.str());
  Tensor x = x_.contiguous();
  const int64_t rows = x.numel() / n;
  Shape os = x.shape();
  os.back() = k;
  Tensor vals = Tensor::empty(os), idx = Tensor::empty(os, DType::I64);
  const float* px = x.data<float>();
  float* pv = vals.data<float>();
  int64_t* pi = idx.data<int64_t>();
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
  TopK res{vals, idx};
  res.values = autograd::record("topk", vals, {x_}, [idx, xs = x.shape(), rows, n, k](const Tensor& g_) {
    Tensor g = g_.contiguous();
    Tensor gx = Tensor::zeros(xs);
    const float* pg = g.data<float>();
    const int64_t* pi = idx.data<int64_t>();
    float* po = gx.data<float>();
    parallel_for(rows, k, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        for (int64_t j = 0; j < k; ++j) po[r * n + pi[r * k + j]] = pg[r * k + j];
    });
    return std::vector<Tensor>{gx};
  });
  return res;
}

Tensor argsort(const Tensor& x_, bool descending) {
  expect_cpu_f32("argsort", {&x_});
  MV_CHECK(x_.ndim() >= 1, "argsort: needs at least one axis, got ", x_.str());
  Tensor x = x_.contiguous();
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

}  // namespace mv::ops
