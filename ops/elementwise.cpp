// Elementwise ops; their CUDA twin is cuda/elementwise.cu. The CPU's broadcasting kernel walks the
// output row by row (a row is the last dimension); each input is read through strides that are 0
// along its broadcast dimensions.
#include "ops/elementwise.h"

#include <cmath>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/dispatch.h"
#include "ops/fast_math.h"

namespace mv::ops {

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

}  // namespace mv::ops

namespace mv::cpu {

using ops::Binary;
using ops::Unary;

namespace {

// Strides of a contiguous tensor of shape `s` seen as shape `out` (0 where broadcast).
Shape broadcast_strides(const Shape& s, const Shape& out) {
  Shape st(out.size(), 0);
  Shape cs = contiguous_strides(s);
  const size_t lead = out.size() - s.size();
  for (size_t i = 0; i < s.size(); ++i) st[lead + i] = s[i] == 1 ? 0 : cs[i];
  return st;
}

// Offset of the first element of output row `row` through strides `st`.
int64_t row_offset(int64_t row, const Shape& out, const Shape& st) {
  int64_t off = 0;
  for (int d = int(out.size()) - 2; d >= 0; --d) {
    off += (row % out[d]) * st[d];
    row /= out[d];
  }
  return off;
}

// out[i] = f(a[i], b[i]) with broadcasting (shapes already checked to fit).
template <class F>
Tensor map2(const Tensor& a_, const Tensor& b_, F f) {
  Tensor a = a_.contiguous(), b = b_.contiguous();
  const Shape out_shape = ops::broadcast_shape(a.shape(), b.shape(), "map2");
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
Tensor map1(const Tensor& x_, F f) {
  Tensor x = x_.contiguous();
  Tensor out = Tensor::empty(x.shape());
  const float* px = x.data<float>();
  float* po = out.data<float>();
  parallel_for(x.numel(), 4, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) po[i] = f(px[i]);
  });
  return out;
}

// dx[i] = dy[i] * df(x[i], y[i]): the backward of a map whose derivative is written with x and y.
template <class DF>
Tensor map_grad(const Tensor& x_, const Tensor& y, const Tensor& dy, DF df) {
  const Tensor g = dy.contiguous(), x = x_.contiguous();
  Tensor gx = Tensor::empty(x.shape());
  const float *pg = g.data<float>(), *px = x.data<float>(), *py = y.data<float>();
  float* po = gx.data<float>();
  parallel_for(gx.numel(), 4, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) po[i] = pg[i] * df(px[i], py[i]);
  });
  return gx;
}

// Calls visit(f, df) with the map named by `code` and its derivative df(x, y), y = f(x).
template <class Visit>
Tensor with_unary(Unary code, float p, Visit visit) {
  constexpr float inv_sqrt2 = 0.7071067811865476f, inv_sqrt2pi = 0.3989422804014327f;
  switch (code) {
    case Unary::Exp:  // exp' = y
      return visit([](float v) { return std::exp(v); }, [](float, float y) { return y; });
    case Unary::Log:  // log' = 1/x
      return visit([](float v) { return std::log(v); }, [](float v, float) { return 1.0f / v; });
    case Unary::Sqrt:  // sqrt' = 1/(2y)
      return visit([](float v) { return std::sqrt(v); }, [](float, float y) { return 0.5f / y; });
    case Unary::Rsqrt:  // rsqrt' = -y^3/2
      return visit([](float v) { return 1.0f / std::sqrt(v); }, [](float, float y) { return -0.5f * y * y * y; });
    case Unary::Tanh:  // tanh' = 1 - y^2
      return visit([](float v) { return ops::fast_tanh(v); }, [](float, float y) { return 1.0f - y * y; });
    case Unary::Pow:  // (x^p)' = p x^(p-1)
      return visit([p](float v) { return std::pow(v, p); }, [p](float v, float) { return p * std::pow(v, p - 1.0f); });
    case Unary::Relu:  // relu' = [x > 0]
      return visit([](float v) { return v > 0.f ? v : 0.f; }, [](float v, float) { return v > 0.f ? 1.f : 0.f; });
    case Unary::GeluErf:  // y = x Phi(x); y' = Phi(x) + x phi(x)
      return visit([](float v) { return 0.5f * v * (1.f + std::erf(v * inv_sqrt2)); },
                   [](float v, float) {
                     return 0.5f * (1.f + std::erf(v * inv_sqrt2)) + v * inv_sqrt2pi * std::exp(-0.5f * v * v);
                   });
    case Unary::NormalCdf:  // Phi'(x) = phi(x) = exp(-x^2/2) / sqrt(2 pi)
      return visit([](float v) { return ops::fast_normal_cdf(v); }, [](float v, float) { return ops::fast_normal_pdf(v); });
  }
  MV_FAIL("unary: unknown map ", int(code));
}

}  // namespace

// a, b: shapes that broadcast, any layout -> a (op) b in the broadcast shape
Tensor binary(const Tensor& a, const Tensor& b, Binary op) {
  switch (op) {
    case Binary::Add: return map2(a, b, [](float x, float y) { return x + y; });
    case Binary::Sub: return map2(a, b, [](float x, float y) { return x - y; });
    case Binary::Mul: return map2(a, b, [](float x, float y) { return x * y; });
    case Binary::Div: return map2(a, b, [](float x, float y) { return x / y; });
  }
  MV_FAIL("binary: unknown op ", int(op));
}

// a: any shape, b: undefined or a's shape -> alpha a + beta b, or alpha a + beta. Plain x + beta
// and alpha x where the other term is the identity, so add, mul and neg give exactly x + s, x s
// and -x.
Tensor axpby(const Tensor& a, const Tensor& b, float alpha, float beta) {
  if (b.defined()) return map2(a, b, [=](float x, float y) { return alpha * x + beta * y; });
  if (alpha == 1.f) return map1(a, [=](float x) { return x + beta; });
  if (beta == 0.f) return map1(a, [=](float x) { return alpha * x; });
  return map1(a, [=](float x) { return alpha * x + beta; });
}

// g: any layout, shape: broadcasts to g's shape -> g summed back to shape. Serial: output rows
// may receive many input rows; it sums in place without a race.
Tensor sum_to(const Tensor& g_, const Shape& shape) {
  Tensor g = g_.contiguous();
  const Shape& gs = g.shape();
  Tensor out = Tensor::zeros(shape);
  const Shape so = broadcast_strides(shape, gs);
  const int64_t cols = gs.back(), co = so.back();
  const float* pg = g.data<float>();
  float* po = out.data<float>();
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

// x: contiguous -> f(x) for the map named by code (p: pow's exponent)
Tensor unary_forward(const Tensor& x, Unary code, float p) {
  return with_unary(code, p, [&](auto f, auto) { return map1(x, f); });
}
// x, y = f(x), dy: one shape -> dy * f'(x)
Tensor unary_backward(const Tensor& x, const Tensor& y, const Tensor& dy, Unary code, float p) {
  return with_unary(code, p, [&](auto, auto df) { return map_grad(x, y, dy, df); });
}

// GELU, tanh form (ops/fast_math.h):
//   y = x/2 (1 + tanh(u)), u = c (x + 0.044715 x^3), c = sqrt(2/pi)
//   y' = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 * 0.044715 x^2)
Tensor gelu_forward(const Tensor& x) {
  return map1(x, [](float v) { return ops::gelu_tanh(v); });
}
Tensor gelu_backward(const Tensor& x, const Tensor& dy) {
  return map_grad(x, x, dy, [](float v, float) { return ops::gelu_tanh_grad(v); });
}

// mask, a, b: shapes that broadcast to one -> a where mask != 0, else b
Tensor where(const Tensor& mask, const Tensor& a, const Tensor& b) {
  const Shape s = ops::broadcast_shape(ops::broadcast_shape(mask.shape(), a.shape(), "where"), b.shape(), "where");
  auto expand_to = [&](const Tensor& x) {  // x materialised at the output's shape
    return x.shape() == s ? x.contiguous() : map2(x, Tensor::zeros(s), [](float v, float) { return v; });
  };
  Tensor m = expand_to(mask), ea = expand_to(a), eb = expand_to(b);
  Tensor out = Tensor::empty(s);
  const float *pm = m.data<float>(), *pa = ea.data<float>(), *pb = eb.data<float>();
  float* po = out.data<float>();
  for (int64_t i = 0, n = out.numel(); i < n; ++i) po[i] = pm[i] != 0.f ? pa[i] : pb[i];
  return out;
}

// x, mask: broadcasts to x -> value where mask != 0, else x
Tensor masked_fill(const Tensor& x, const Tensor& mask, float value) {
  return map2(x, mask, [value](float v, float mv) { return mv != 0.f ? value : v; });
}

// g, mask: broadcasts to g -> g where (mask != 0) == set, else 0 (where's and masked_fill's
// backward)
Tensor mask_select(const Tensor& g, const Tensor& mask, bool set) {
  return map2(g, mask, [set](float v, float mv) { return (mv != 0.f) == set ? v : 0.f; });
}

}  // namespace mv::cpu

namespace mv::ops {

using autograd::record;

namespace {

// a (op) b on the inputs' device, after the op's own checks.
Tensor binary_op(const char* op, const Tensor& a, const Tensor& b, Binary kind) {
  const OpDevice dev = device_of(op, {&a, &b});
  expect_f32(op, {&a, &b});
  broadcast_shape(a.shape(), b.shape(), op);  // the op's own message for shapes that do not fit
  return MV_KERNEL(binary)(dev, a, b, kind);
}

// alpha x + beta on the input's device.
Tensor scalar_op(const char* op, const Tensor& x, float alpha, float beta) {
  const OpDevice dev = device_of(op, {&x});
  expect_f32(op, {&x});
  return MV_KERNEL(axpby)(dev, x.contiguous(), Tensor(), alpha, beta);
}

// y = f(x) for the map named by code, whose derivative the backward kernel writes with x and y.
Tensor unary_op(const char* op, const Tensor& x, Unary code, float p = 0.f) {
  const OpDevice dev = device_of(op, {&x});
  expect_f32(op, {&x});
  const Tensor xc = x.contiguous();
  Tensor y = MV_KERNEL(unary_forward)(dev, xc, code, p);
  return record(op, y, {x}, [dev, xd = xc.detach(), yd = y.detach(), code, p](const Tensor& g) {
    return std::vector<Tensor>{MV_KERNEL(unary_backward)(dev, xd, yd, g.contiguous(), code, p)};
  });
}

}  // namespace

Tensor sum_to(const Tensor& g, const Shape& shape) {
  if (g.shape() == shape) return g;
  const OpDevice dev = device_of("sum_to", {&g});
  expect_f32("sum_to", {&g});
  MV_CHECK(broadcast_shape(shape, g.shape(), "sum_to") == g.shape(), "sum_to: ", shape_str(shape),
           " does not broadcast to ", g.str());
  return MV_KERNEL(sum_to)(dev, g, shape);
}

// d(a+b) = (g, g)
Tensor add(const Tensor& a, const Tensor& b) {
  Tensor out = binary_op("add", a, b, Binary::Add);
  return record("add", out, {a, b}, [sa = a.shape(), sb = b.shape()](const Tensor& g) {
    return std::vector<Tensor>{sum_to(g, sa), sum_to(g, sb)};
  });
}

// d(a-b) = (g, -g)
Tensor sub(const Tensor& a, const Tensor& b) {
  Tensor out = binary_op("sub", a, b, Binary::Sub);
  return record("sub", out, {a, b}, [sa = a.shape(), sb = b.shape()](const Tensor& g) {
    return std::vector<Tensor>{sum_to(g, sa), sum_to(neg(g), sb)};
  });
}

// d(a*b) = (g*b, g*a)
Tensor mul(const Tensor& a, const Tensor& b) {
  Tensor out = binary_op("mul", a, b, Binary::Mul);
  const bool ga = a.requires_grad(), gb = b.requires_grad();
  return record("mul", out, {a, b}, [ad = a.detach(), bd = b.detach(), ga, gb](const Tensor& g) {
    return std::vector<Tensor>{ga ? sum_to(mul(g, bd), ad.shape()) : Tensor(),
                               gb ? sum_to(mul(g, ad), bd.shape()) : Tensor()};
  });
}

// d(a/b) = (g/b, -g*a/b^2)
Tensor div(const Tensor& a, const Tensor& b) {
  Tensor out = binary_op("div", a, b, Binary::Div);
  const bool ga = a.requires_grad(), gb = b.requires_grad();
  return record("div", out, {a, b}, [ad = a.detach(), bd = b.detach(), ga, gb](const Tensor& g) {
    Tensor gq = div(g, bd);
    return std::vector<Tensor>{ga ? sum_to(gq, ad.shape()) : Tensor(),
                               gb ? sum_to(neg(div(mul(gq, ad), bd)), bd.shape()) : Tensor()};
  });
}

// d(a+s) = g
Tensor add(const Tensor& a, float s) {
  Tensor out = scalar_op("add", a, 1.f, s);
  return record("add_scalar", out, {a}, [](const Tensor& g) { return std::vector<Tensor>{g}; });
}

// d(a*s) = g*s
Tensor mul(const Tensor& a, float s) {
  Tensor out = scalar_op("mul", a, s, 0.f);
  return record("mul_scalar", out, {a}, [s](const Tensor& g) { return std::vector<Tensor>{mul(g, s)}; });
}

// d(-x) = -g
Tensor neg(const Tensor& x) {
  Tensor out = scalar_op("neg", x, -1.f, 0.f);
  return record("neg", out, {x}, [](const Tensor& g) { return std::vector<Tensor>{neg(g)}; });
}

// The derivatives of these maps are written next to them in cpu::with_unary.
Tensor exp(const Tensor& x) { return unary_op("exp", x, Unary::Exp); }
Tensor log(const Tensor& x) { return unary_op("log", x, Unary::Log); }
Tensor sqrt(const Tensor& x) { return unary_op("sqrt", x, Unary::Sqrt); }
Tensor rsqrt(const Tensor& x) { return unary_op("rsqrt", x, Unary::Rsqrt); }
Tensor tanh(const Tensor& x) { return unary_op("tanh", x, Unary::Tanh); }
Tensor pow(const Tensor& x, float p) { return unary_op("pow", x, Unary::Pow, p); }
Tensor relu(const Tensor& x) { return unary_op("relu", x, Unary::Relu); }
Tensor normal_cdf(const Tensor& x) { return unary_op("normal_cdf", x, Unary::NormalCdf); }

// The tanh form has kernels of its own (the MLP's hot path); the erf form is a unary map.
Tensor gelu(const Tensor& x, GeluForm form) {
  if (form == GeluForm::Erf) return unary_op("gelu_erf", x, Unary::GeluErf);
  const OpDevice dev = device_of("gelu", {&x});
  expect_f32("gelu", {&x});
  const Tensor xc = x.contiguous();
  Tensor y = MV_KERNEL(gelu_forward)(dev, xc);
  return record("gelu", y, {x}, [dev, xd = xc.detach()](const Tensor& g) {
    return std::vector<Tensor>{MV_KERNEL(gelu_backward)(dev, xd, g.contiguous())};
  });
}

// d where = (g where mask, g where not mask), reduced to a's and b's shapes; no gradient for the
// mask
Tensor where(const Tensor& mask, const Tensor& a, const Tensor& b) {
  const OpDevice dev = device_of("where", {&mask, &a, &b});
  expect_f32("where", {&mask, &a, &b});
  const Shape s = broadcast_shape(broadcast_shape(mask.shape(), a.shape(), "where"), b.shape(), "where");
  Tensor out = MV_CPU_KERNEL(where)(dev, mask, a, b);
  return record("where", out, {a, b}, [dev, m = mask.detach(), sa = a.shape(), sb = b.shape()](const Tensor& g) {
    return std::vector<Tensor>{sum_to(MV_CPU_KERNEL(mask_select)(dev, g, m, true), sa),
                               sum_to(MV_CPU_KERNEL(mask_select)(dev, g, m, false), sb)};
  });
}

// d masked_fill = g where the mask is zero
Tensor masked_fill(const Tensor& x, const Tensor& mask, float value) {
  const OpDevice dev = device_of("masked_fill", {&x, &mask});
  expect_f32("masked_fill", {&x, &mask});
  MV_CHECK(broadcast_shape(x.shape(), mask.shape(), "masked_fill") == x.shape(), "masked_fill: mask ",
           mask.str(), " must broadcast to x ", x.str());
  Tensor out = MV_CPU_KERNEL(masked_fill)(dev, x, mask, value);
  return record("masked_fill", out, {x}, [dev, md = mask.detach()](const Tensor& g) {
    return std::vector<Tensor>{MV_CPU_KERNEL(mask_select)(dev, g, md, false)};
  });
}

}  // namespace mv::ops
