// Elementwise ops. The broadcasting kernel walks the output row by row (a row is the last
// dimension); each input is read through strides that are 0 along its broadcast dimensions.
#include "ops/elementwise.h"

#include <cmath>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"
#include "ops/fast_math.h"
// Its enums name the CUDA maps (cuda::Binary, cuda::Unary); its functions exist only in builds
// with MOEVIT_CUDA, and are only called there.
#include "cuda/kernels.h"

namespace mv::ops {

using autograd::record;

Shape broadcast_shape(const Shape& a, const Shape& b, const char* op) {
  const size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (size_t i = 0; i < n; ++i) {
    int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    MV_CHECK(da == db || da == 1 || db == 1, op, ": shapes ", shape_str(a), " and ", shape_str(b),
             " do not broadcast");
    out[i] = da == 1 ? db : da;
  }
  return out;
}

// Strides of a contiguous tensor of shape `s` seen as shape `out` (0 where broadcast).
static Shape broadcast_strides(const Shape& s, const Shape& out) {
  Shape st(out.size(), 0);
  Shape cs = contiguous_strides(s);
  const size_t lead = out.size() - s.size();
  for (size_t i = 0; i < s.size(); ++i) st[lead + i] = s[i] == 1 ? 0 : cs[i];
  return st;
}

// Offset of the first element of output row `row` through strides `st`.
static int64_t row_offset(int64_t row, const Shape& out, const Shape& st) {
  int64_t off = 0;
  for (int d = int(out.size()) - 2; d >= 0; --d) {
    off += (row % out[d]) * st[d];
    row /= out[d];
  }
  return off;
}

// out[i] = f(a[i], b[i]) with broadcasting.
template <class F>
static Tensor binary_kernel(const char* op, const Tensor& a_, const Tensor& b_, F f) {
  expect_cpu_f32(op, {&a_, &b_});
  Tensor a = a_.contiguous(), b = b_.contiguous();
  const Shape out_shape = broadcast_shape(a.shape(), b.shape(), op);
  Tensor out = Tensor::empty(out_shape);
  const float* pa = a.data<float>();
  const float* pb = b.data<float>();
  float* po = out.data<float>();
  const int64_t n = out.numel();
  if (a.shape() == b.shape()) {
    parallel_for(n, 1, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) po[i] = f(pa[i], pb[i]);
    });
    return out;
  }
  if (n == 0) return out;
  const Shape sa = broadcast_strides(a.shape(), out_shape), sb = broadcast_strides(b.shape(), out_shape);
  const int64_t cols = out_shape.empty() ? 1 : out_shape.back();
  const int64_t ca = sa.empty() ? 0 : sa.back(), cb = sb.empty() ? 0 : sb.back();
  parallel_for(n / cols, cols, [&](int64_t s, int64_t e) {
    for (int64_t r = s; r < e; ++r) {
      const float* ra = pa + row_offset(r, out_shape, sa);
      const float* rb = pb + row_offset(r, out_shape, sb);
      float* ro = po + r * cols;
      for (int64_t j = 0; j < cols; ++j) ro[j] = f(ra[j * ca], rb[j * cb]);
    }
  });
  return out;
}

// out[i] = f(x[i]).
template <class F>
static Tensor unary_kernel(const char* op, const Tensor& x_, F f) {
  expect_cpu_f32(op, {&x_});
  Tensor x = x_.contiguous();
  Tensor out = Tensor::empty(x.shape());
  const float* px = x.data<float>();
  float* po = out.data<float>();
  parallel_for(x.numel(), 4, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) po[i] = f(px[i]);
  });
  return out;
}

#ifdef MOEVIT_CUDA
// ---- CUDA: broadcasting maps (cuda::binary); adding a bias gets its own faster kernel ---------

// The number of trailing elements `small` covers when it is a bias of `big`: its shape, leading
// 1s dropped, is a suffix of big's ((C,) or (1, 1, C) against (B, T, C)); -1 otherwise.
static int64_t bias_width(const Shape& small, const Shape& big) {
  size_t lead = 0;
  while (lead < small.size() && small[lead] == 1) ++lead;
  const size_t k = small.size() - lead;
  if (k > big.size() || small.size() > big.size() + lead) return -1;
  int64_t C = 1;
  for (size_t i = 0; i < k; ++i) {
    if (small[lead + i] != big[big.size() - k + i]) return -1;
    C *= small[lead + i];
  }
  return C;
}

static Tensor cuda_binary(const char* op, const Tensor& a, const Tensor& b, cuda::Binary kind) {
  const Shape out = broadcast_shape(a.shape(), b.shape(), op);  // the op's own error for bad shapes
  if (kind == cuda::Binary::Add && a.shape() != b.shape()) {
    const bool b_small = out == a.shape();
    const Tensor& big = b_small ? a : b;
    const Tensor& small = b_small ? b : a;
    const int64_t C = out == big.shape() ? bias_width(small.shape(), big.shape()) : -1;
    if (C >= 0) {
      const int64_t R = C == 0 ? 0 : big.numel() / C;
      return flat_view(cuda::add_bias(flat_view(big, {R, C}), flat_view(small, {C})), out);
    }
  }
  return cuda::binary(a, b, kind);
}
#endif

// a (op) b on either device; f is the CPU map, kind names it for the CUDA path.
template <class F>
static Tensor binary_forward(const char* op, const Tensor& a, const Tensor& b, cuda::Binary kind, F f) {
#ifdef MOEVIT_CUDA
  if (on_cuda(op, {&a, &b})) return cuda_binary(op, a, b, kind);
#endif
  (void)kind;
  return binary_kernel(op, a, b, f);
}

// alpha * x + beta on either device; f is the same map for the CPU kernel.
template <class F>
static Tensor scalar_forward(const char* op, const Tensor& x, float alpha, float beta, F f) {
#ifdef MOEVIT_CUDA
  if (on_cuda(op, {&x})) return cuda::axpby(x.contiguous(), Tensor(), alpha, beta);
#endif
  (void)alpha, (void)beta;
  return unary_kernel(op, x, f);
}

Tensor sum_to(const Tensor& g_, const Shape& shape) {
  if (g_.shape() == shape) return g_;
#ifdef MOEVIT_CUDA
  if (on_cuda("sum_to", {&g_})) {
    MV_CHECK(broadcast_shape(shape, g_.shape(), "sum_to") == g_.shape(), "sum_to: ", shape_str(shape),
             " does not broadcast to ", g_.str());
    const int64_t C = bias_width(shape, g_.shape());
    if (C >= 0) {  // a bias gradient: column sums over the leading rows
      const int64_t R = C == 0 ? 0 : g_.numel() / C;
      return flat_view(cuda::column_sum(flat_view(g_, {R, C})), shape);
    }
    Shape keep(g_.shape().size() - shape.size(), 1);  // shape, left-padded with 1s to g's rank
    keep.insert(keep.end(), shape.begin(), shape.end());
    return flat_view(cuda::sum_keep(g_, keep), shape);
  }
#endif
  expect_cpu_f32("sum_to", {&g_});
  Tensor g = g_.contiguous();
  const Shape& gs = g.shape();
  MV_CHECK(broadcast_shape(shape, gs, "sum_to") == gs, "sum_to: ", shape_str(shape),
           " does not broadcast to ", shape_str(gs));
  Tensor out = Tensor::zeros(shape);
  const Shape so = broadcast_strides(shape, gs);
  const int64_t cols = gs.back(), co = so.back();
  const float* pg = g.data<float>();
  float* po = out.data<float>();
  // Serial: output rows may receive many input rows. Sums in place without a race.
  for (int64_t r = 0, rows = g.numel() / std::max<int64_t>(cols, 1); r < rows; ++r) {
    float* ro = po + row_offset(r, gs, so);
    const float* rg = pg + r * cols;
    if (co == 0) {
      float s = 0;
      for (int64_t j = 0; j < cols; ++j) s += rg[j];
      ro[0] += s;
    } else {
      for (int64_t j = 0; j < cols; ++j) ro[j] += rg[j];
    }
  }
  return out;
}

// d(a+b) = (g, g)
Tensor add(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward("add", a, b, cuda::Binary::Add, [](float x, float y) { return x + y; });
  return record("add", out, {a, b}, [sa = a.shape(), sb = b.shape()](const Tensor& g) {
    return std::vector<Tensor>{sum_to(g, sa), sum_to(g, sb)};
  });
}

// d(a-b) = (g, -g)
Tensor sub(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward("sub", a, b, cuda::Binary::Sub, [](float x, float y) { return x - y; });
  return record("sub", out, {a, b}, [sa = a.shape(), sb = b.shape()](const Tensor& g) {
    return std::vector<Tensor>{sum_to(g, sa), sum_to(neg(g), sb)};
  });
}

// d(a*b) = (g*b, g*a)
Tensor mul(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward("mul", a, b, cuda::Binary::Mul, [](float x, float y) { return x * y; });
  const bool ga = a.requires_grad(), gb = b.requires_grad();
  return record("mul", out, {a, b}, [ad = a.detach(), bd = b.detach(), ga, gb](const Tensor& g) {
    return std::vector<Tensor>{ga ? sum_to(mul(g, bd), ad.shape()) : Tensor(),
                               gb ? sum_to(mul(g, ad), bd.shape()) : Tensor()};
  });
}

// d(a/b) = (g/b, -g*a/b^2)
Tensor div(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward("div", a, b, cuda::Binary::Div, [](float x, float y) { return x / y; });
  const bool ga = a.requires_grad(), gb = b.requires_grad();
  return record("div", out, {a, b}, [ad = a.detach(), bd = b.detach(), ga, gb](const Tensor& g) {
    Tensor gq = div(g, bd);
    return std::vector<Tensor>{ga ? sum_to(gq, ad.shape()) : Tensor(),
                               gb ? sum_to(neg(div(mul(gq, ad), bd)), bd.shape()) : Tensor()};
  });
}

// d(a+s) = g
Tensor add(const Tensor& a, float s) {
  Tensor out = scalar_forward("add", a, 1.f, s, [s](float x) { return x + s; });
  return record("add_scalar", out, {a}, [](const Tensor& g) { return std::vector<Tensor>{g}; });
}

// d(a*s) = g*s
Tensor mul(const Tensor& a, float s) {
  Tensor out = scalar_forward("mul", a, s, 0.f, [s](float x) { return x * s; });
  return record("mul_scalar", out, {a}, [s](const Tensor& g) { return std::vector<Tensor>{mul(g, s)}; });
}

// d(-x) = -g
Tensor neg(const Tensor& x) {
  Tensor out = scalar_forward("neg", x, -1.f, 0.f, [](float v) { return -v; });
  return record("neg", out, {x}, [](const Tensor& g) { return std::vector<Tensor>{neg(g)}; });
}

// Unary op on the CPU whose derivative is a function of (x, y): backward = g * df(x, y).
template <class F, class DF>
static Tensor unary_cpu(const char* name, const Tensor& x, F f, DF df) {
  Tensor y = unary_kernel(name, x, f);
  if (!autograd::needs_graph({x})) return y;
  return record(name, y, {x}, [xd = x.detach(), yd = y.detach(), df](const Tensor& g) {
    Tensor gc = g.contiguous();
    Tensor gx = Tensor::empty(xd.shape());
    const float *pg = gc.data<float>(), *px = xd.contiguous().data<float>(), *py = yd.data<float>();
    float* po = gx.data<float>();
    parallel_for(gx.numel(), 4, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) po[i] = pg[i] * df(px[i], py[i]);
    });
    return std::vector<Tensor>{gx};
  });
}

// The same on either device: on CUDA, the map and its derivative are the kernel's `code`
// (p: pow's exponent).
template <class F, class DF>
static Tensor unary_op(const char* name, const Tensor& x, cuda::Unary code, float p, F f, DF df) {
#ifdef MOEVIT_CUDA
  if (on_cuda(name, {&x})) {
    const Tensor xc = x.contiguous();
    Tensor y = cuda::unary_forward(xc, code, p);
    if (!autograd::needs_graph({x})) return y;
    return record(name, y, {x}, [xd = xc.detach(), yd = y.detach(), code, p](const Tensor& g) {
      return std::vector<Tensor>{cuda::unary_backward(xd, yd, g.contiguous(), code, p)};
    });
  }
#endif
  (void)code, (void)p;
  return unary_cpu(name, x, f, df);
}

// exp' = y
Tensor exp(const Tensor& x) {
  return unary_op("exp", x, cuda::Unary::Exp, 0.f, [](float v) { return std::exp(v); }, [](float, float y) { return y; });
}
// log' = 1/x
Tensor log(const Tensor& x) {
  return unary_op("log", x, cuda::Unary::Log, 0.f, [](float v) { return std::log(v); }, [](float v, float) { return 1.0f / v; });
}
// sqrt' = 1/(2y)
Tensor sqrt(const Tensor& x) {
  return unary_op("sqrt", x, cuda::Unary::Sqrt, 0.f, [](float v) { return std::sqrt(v); },
                  [](float, float y) { return 0.5f / y; });
}
// rsqrt' = -y^3/2
Tensor rsqrt(const Tensor& x) {
  return unary_op("rsqrt", x, cuda::Unary::Rsqrt, 0.f, [](float v) { return 1.0f / std::sqrt(v); },
                  [](float, float y) { return -0.5f * y * y * y; });
}
// tanh' = 1 - y^2
Tensor tanh(const Tensor& x) {
  return unary_op("tanh", x, cuda::Unary::Tanh, 0.f, [](float v) { return fast_tanh(v); },
                  [](float, float y) { return 1.0f - y * y; });
}
// (x^p)' = p x^(p-1)
Tensor pow(const Tensor& x, float p) {
  return unary_op("pow", x, cuda::Unary::Pow, p, [p](float v) { return std::pow(v, p); },
                  [p](float v, float) { return p * std::pow(v, p - 1.0f); });
}
// relu' = [x > 0]
Tensor relu(const Tensor& x) {
  return unary_op("relu", x, cuda::Unary::Relu, 0.f, [](float v) { return v > 0.f ? v : 0.f; },
                  [](float v, float) { return v > 0.f ? 1.f : 0.f; });
}

// tanh form: y = x/2 (1 + tanh(u)), u = c (x + 0.044715 x^3), c = sqrt(2/pi)
//   y' = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 * 0.044715 x^2)
// erf form: y = x Phi(x); y' = Phi(x) + x phi(x)
Tensor gelu(const Tensor& x, GeluForm form) {
  constexpr float inv_sqrt2 = 0.7071067811865476f, inv_sqrt2pi = 0.3989422804014327f;
  if (form == GeluForm::Erf)
    return unary_op(
        "gelu_erf", x, cuda::Unary::GeluErf, 0.f, [](float v) { return 0.5f * v * (1.f + std::erf(v * inv_sqrt2)); },
        [](float v, float) {
          return 0.5f * (1.f + std::erf(v * inv_sqrt2)) + v * inv_sqrt2pi * std::exp(-0.5f * v * v);
        });
#ifdef MOEVIT_CUDA
  if (on_cuda("gelu", {&x})) {  // the tanh form has its own kernels (the MLP's hot path)
    Tensor y = cuda::gelu_forward(x.contiguous());
    if (!autograd::needs_graph({x})) return y;
    return record("gelu", y, {x}, [xd = x.detach().contiguous()](const Tensor& g) {
      return std::vector<Tensor>{cuda::gelu_backward(xd, g.contiguous())};
    });
  }
#endif
  return unary_cpu("gelu", x, [](float v) { return gelu_tanh(v); }, [](float v, float) { return gelu_tanh_grad(v); });
}

// Phi'(x) = phi(x) = exp(-x^2/2) / sqrt(2 pi)
Tensor normal_cdf(const Tensor& x) {
  return unary_op("normal_cdf", x, cuda::Unary::NormalCdf, 0.f, [](float v) { return fast_normal_cdf(v); },
                  [](float v, float) { return fast_normal_pdf(v); });
}

// x materialised at a shape it broadcasts to (no autograd).
static Tensor expand_to(const Tensor& x, const Shape& shape) {
  if (x.shape() == shape) return x.contiguous();
  return binary_kernel("expand", x, Tensor::zeros(shape), [](float v, float) { return v; });
}

// d where = (g * m, g * (1 - m)) reduced to a's and b's shapes; no gradient for the mask
Tensor where(const Tensor& mask, const Tensor& a, const Tensor& b) {
  expect_cpu_f32("where", {&mask, &a, &b});
  const Shape s = broadcast_shape(broadcast_shape(mask.shape(), a.shape(), "where"), b.shape(), "where");
  Tensor m = expand_to(mask, s), ea = expand_to(a, s), eb = expand_to(b, s);
  Tensor out = Tensor::empty(s);
  const float *pm = m.data<float>(), *pa = ea.data<float>(), *pb = eb.data<float>();
  float* po = out.data<float>();
  for (int64_t i = 0, n = out.numel(); i < n; ++i) po[i] = pm[i] != 0.f ? pa[i] : pb[i];
  return record("where", out, {a, b}, [m, sa = a.shape(), sb = b.shape()](const Tensor& g) {
    Tensor gm = binary_kernel("where", g, m, [](float v, float mv) { return mv != 0.f ? v : 0.f; });
    return std::vector<Tensor>{sum_to(gm, sa), sum_to(sub(g, gm), sb)};
  });
}

// d masked_fill = g where the mask is zero
Tensor masked_fill(const Tensor& x, const Tensor& mask, float value) {
  expect_cpu_f32("masked_fill", {&x, &mask});
  MV_CHECK(broadcast_shape(x.shape(), mask.shape(), "masked_fill") == x.shape(), "masked_fill: mask ",
           mask.str(), " must broadcast to x ", x.str());
  Tensor out = binary_kernel("masked_fill", x, mask,
                             [value](float v, float mv) { return mv != 0.f ? value : v; });
  return record("masked_fill", out, {x}, [md = mask.detach()](const Tensor& g) {
    return std::vector<Tensor>{binary_kernel("masked_fill", g, md,
                                             [](float v, float mv) { return mv != 0.f ? 0.f : v; })};
  });
}

}  // namespace mv::ops
