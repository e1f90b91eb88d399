// CUDA kernels against CPU references: every kernel in cuda/kernels.h, forward and backward,
// on random inputs with odd sizes (not multiples of a warp, a float4 or a tile), compared with
// (1) a straightforward double-precision loop written here and (2) the CPU op in ops/ where one
// exists (its autograd backward for the gradients).
//
// Reported per comparison (in the INFO of a failure): max-abs error, normalised MSE
// (sum (a-b)^2 / sum b^2) and the worst element. Tolerances, fp32 unless stated:
//   elementwise, softmax, layer norm, cross-entropy, attention: |got - ref| <= rtol |ref| + atol
//     with rtol = 1e-5 and atol = 1e-5 * max|ref| (reductions that cancel need the atol term),
//     and nmse <= 1e-10;
//   matmul FP32: |got - ref| <= 1e-5 * sum_k |a_ik b_kj|; TF32: 5e-3 * sum_k |a_ik b_kj|;
//   philox uniform: bitwise equal; philox normal: 2e-6 relative + 1e-6 absolute (both run
//     philox::normal_pair, but nvcc and g++ need not fuse the same multiply-adds; the count of
//     bitwise-equal draws is reported).
//
// This binary has its own main: without a CUDA device it prints a line and exits with 77, which
// meson reports as SKIP.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numbers>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/kernels.h"
#include "engine/memory.h"
#include "engine/random.h"
#include "engine/tensor.h"
#include "ops/attention.h"
#include "ops/elementwise.h"
#include "ops/loss.h"
#include "ops/matmul.h"
#include "ops/norm.h"
#include "ops/shape.h"
#include "ops/softmax.h"

int main(int argc, char** argv) {
  if (!mv::cuda_available()) {
    std::printf("moevit_cuda_tests: no CUDA device, skipping\n");
    return 77;  // meson: SKIP
  }
  doctest::Context ctx;
  ctx.applyCommandLine(argc, argv);
  return ctx.run();
}

using namespace mv;
using Vec = std::vector<float>;
using DVec = std::vector<double>;

namespace {

// ---- comparison -----------------------------------------------------------------------------

struct Report {
  double max_abs = 0, nmse = 0;
  size_t worst = 0, bad = 0;
  std::string text;
};

// Elementwise |got - ref| <= rtol |ref| + atol_i, where atol_i = bound[i] if given, else atol.
Report compare(const Vec& got, const DVec& ref, double rtol, double atol, const DVec* bound = nullptr) {
  Report r;
  REQUIRE(got.size() == ref.size());
  double num = 0, den = 0, worst_excess = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    const double e = std::fabs(double(got[i]) - ref[i]);
    num += e * e;
    den += ref[i] * ref[i];
    if (!(e <= r.max_abs)) r.max_abs = std::isnan(e) ? INFINITY : std::max(r.max_abs, e);
    const double tol = rtol * std::fabs(ref[i]) + (bound ? (*bound)[i] : atol);
    if (!(e <= tol)) {
      ++r.bad;
      const double excess = std::isnan(e) ? INFINITY : e - tol;
      if (excess > worst_excess) worst_excess = excess, r.worst = i;
    }
  }
  r.nmse = den > 0 ? num / den : num;
  std::ostringstream os;
  os << "n=" << got.size() << " max_abs=" << r.max_abs << " nmse=" << r.nmse << " bad=" << r.bad;
  if (r.bad) os << " worst[" << r.worst << "]: got " << got[r.worst] << " ref " << ref[r.worst];
  r.text = os.str();
  return r;
}

double max_abs(const DVec& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

DVec to_d(const Vec& v) { return DVec(v.begin(), v.end()); }

// The standard fp32 check: rtol 1e-5, atol 1e-5 * max(max|ref|, scale), nmse <= 1e-10.
// `scale` is the size of the terms a result is computed from, for outputs that are small only
// by cancellation (a softmax gradient of a one-hot row, a layernorm gradient with D = 1): there
// float rounding of the terms, not of the result, sets the attainable error.
void check_f32(const std::string& what, const Vec& got, const DVec& ref, double rtol = 1e-5,
               double atol_frac = 1e-5, double scale = 0) {
  const double big = std::max(max_abs(ref), scale);
  const Report r = compare(got, ref, rtol, atol_frac * std::max(big, 1e-30));
  INFO(what << ": " << r.text << " (rtol " << rtol << ", atol " << atol_frac << " * " << big << ")");
  CHECK(r.bad == 0);
  if (big == max_abs(ref)) CHECK(r.nmse <= 1e-10);
}

// ---- inputs ---------------------------------------------------------------------------------

Vec randn_vec(int64_t n, uint64_t seed, float scale = 1.f, float shift = 0.f) {
  Generator g(seed);
  Vec v = randn({n}, g).to_vector<float>();
  for (float& x : v) x = x * scale + shift;
  return v;
}

Tensor host(const Vec& v, const Shape& s) { return Tensor::from(v, s); }
Tensor dev(const Vec& v, const Shape& s) { return Tensor::from(v, s).to(Device::CUDA); }
Vec get(const Tensor& t) { return t.to_vector<float>(); }

// A contiguous CUDA view that starts one float into a fresh buffer: its data is only 4-byte
// aligned, which sends the kernels down their scalar (non-float4) paths.
Tensor dev_misaligned(const Vec& v, const Shape& s) {
  Vec padded(v.size() + 1, 0.f);
  std::copy(v.begin(), v.end(), padded.begin() + 1);
  Tensor buf = Tensor::from(padded, {int64_t(padded.size())}).to(Device::CUDA);
  return buf.view_as(s, contiguous_strides(s), 1);
}

}  // namespace

// =============================================================================================
// matmul / linear
// =============================================================================================

namespace {

// C = A B in double, plus sum_k |a||b| per element (the scale of fp32 rounding error).
void ref_gemm(const Vec& a, const Vec& b, int64_t M, int64_t K, int64_t N, DVec& c, DVec& mag) {
  c.assign(size_t(M * N), 0.0);
  mag.assign(size_t(M * N), 0.0);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) {
      const double x = a[size_t(i * K + k)];
      for (int64_t j = 0; j < N; ++j) {
        const double y = b[size_t(k * N + j)];
        c[size_t(i * N + j)] += x * y;
        mag[size_t(i * N + j)] += std::fabs(x * y);
      }
    }
}

void check_gemm(const char* what, const Vec& got, const DVec& ref, const DVec& mag, bool tf32) {
  const double f = tf32 ? 5e-3 : 1e-5;
  DVec bound(mag.size());
  for (size_t i = 0; i < mag.size(); ++i) bound[i] = f * mag[i] + 1e-30;
  const Report r = compare(got, ref, 0.0, 0.0, &bound);
  INFO(what << (tf32 ? " [TF32]" : " [FP32]") << ": " << r.text << " (tolerance " << f << " * sum|a||b|)");
  CHECK(r.bad == 0);
  CHECK(r.nmse <= (tf32 ? 1e-5 : 1e-11));
}

}  // namespace

TEST_CASE("cuda matmul: 2-D, batched, shared operands, FP32 and TF32, against double and ops::matmul") {
  const int64_t M = 37, K = 77, N = 129, B = 3;
  for (bool tf32 : {false, true}) {
    // (M, K) x (K, N)
    Vec a = randn_vec(M * K, 1), b = randn_vec(K * N, 2);
    DVec c, mag;
    ref_gemm(a, b, M, K, N, c, mag);
    Tensor out = cuda::matmul(dev(a, {M, K}), dev(b, {K, N}), tf32);
    CHECK(out.shape() == Shape{M, N});
    check_gemm("2-D", get(out), c, mag, tf32);
    if (!tf32) check_f32("2-D vs ops::matmul", get(out), to_d(get(ops::matmul(host(a, {M, K}), host(b, {K, N})))), 1e-4, 1e-5);

    // (B, M, K) x (B, K, N), (B, M, K) x (K, N), (M, K) x (B, K, N)
    Vec ab = randn_vec(B * M * K, 3), bb = randn_vec(B * K * N, 4);
    DVec cb, mb;
    for (int mode = 0; mode < 3; ++mode) {
      const bool a3 = mode != 2, b3 = mode != 1;
      DVec ref, refmag;
      for (int64_t z = 0; z < B; ++z) {
        Vec az(ab.begin() + (a3 ? z * M * K : 0), ab.begin() + (a3 ? z * M * K : 0) + M * K);
        Vec bz(bb.begin() + (b3 ? z * K * N : 0), bb.begin() + (b3 ? z * K * N : 0) + K * N);
        ref_gemm(az, bz, M, K, N, cb, mb);
        ref.insert(ref.end(), cb.begin(), cb.end());
        refmag.insert(refmag.end(), mb.begin(), mb.end());
      }
      Tensor ta = a3 ? dev(ab, {B, M, K}) : dev(Vec(ab.begin(), ab.begin() + M * K), {M, K});
      Tensor tb = b3 ? dev(bb, {B, K, N}) : dev(Vec(bb.begin(), bb.begin() + K * N), {K, N});
      Tensor o = cuda::matmul(ta, tb, tf32);
      CHECK(o.shape() == Shape{B, M, N});
      const char* names[] = {"batched", "batched x shared b", "shared a x batched"};
      check_gemm(names[mode], get(o), ref, refmag, tf32);
    }
  }
}

TEST_CASE("cuda linear_forward: fused bias epilogue, bias fallback path, no bias") {
  const int64_t R = 37, IN = 77, OUT = 129;
  Vec x = randn_vec(R * IN, 11), w = randn_vec(IN * OUT, 12, 0.2f), bias = randn_vec(OUT, 13);
  DVec ref, mag;
  ref_gemm(x, w, R, IN, OUT, ref, mag);
  DVec refb = ref;
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < OUT; ++j) refb[size_t(i * OUT + j)] += bias[size_t(j)], mag[size_t(i * OUT + j)] += std::fabs(bias[size_t(j)]);
  for (bool tf32 : {false, true}) {
    check_gemm("linear + bias (Lt epilogue)", get(cuda::linear_forward(dev(x, {R, IN}), dev(w, {IN, OUT}), dev(bias, {OUT}), tf32)), refb, mag, tf32);
    // A bias that is only 4-byte aligned is refused by Lt's epilogue: GEMM + add_bias kernel.
    check_gemm("linear + misaligned bias (fallback)",
               get(cuda::linear_forward(dev(x, {R, IN}), dev(w, {IN, OUT}), dev_misaligned(bias, {OUT}), tf32)), refb, mag, tf32);
    check_gemm("linear, no bias", get(cuda::linear_forward(dev(x, {R, IN}), dev(w, {IN, OUT}), Tensor(), tf32)), ref, mag, tf32);
  }
  // Leading dims are rows; against ops::linear.
  Tensor y3 = cuda::linear_forward(dev(x, {1, R, IN}), dev(w, {IN, OUT}), dev(bias, {OUT}));
  CHECK(y3.shape() == Shape{1, R, OUT});
  check_f32("linear vs ops::linear", get(y3), to_d(get(ops::linear(host(x, {1, R, IN}), host(w, {IN, OUT}), host(bias, {OUT})))), 1e-4, 1e-5);
}

TEST_CASE("cuda matmul / linear: errors name the function and the shapes") {
  Tensor a = Tensor::zeros({3, 4}, DType::F32, Device::CUDA), b = Tensor::zeros({5, 6}, DType::F32, Device::CUDA);
  CHECK_THROWS_WITH_AS(cuda::matmul(a, b), doctest::Contains("cuda::matmul: F32 (3, 4) cuda x F32 (5, 6) cuda: inner sizes differ"), Error);
  CHECK_THROWS_WITH_AS(cuda::matmul(Tensor::zeros({3, 4}), b), doctest::Contains("cuda::matmul: a must be a contiguous F32 CUDA tensor"), Error);
  CHECK_THROWS_WITH_AS(cuda::linear_forward(a, Tensor::zeros({4, 2}, DType::F32, Device::CUDA), Tensor::zeros({3}, DType::F32, Device::CUDA)),
                       doctest::Contains("bias F32 (3) cuda does not match w"), Error);
}

// =============================================================================================
// softmax
// =============================================================================================

namespace {

// Random rows with outliers: a few large positive and negative values per row, and one row
// whose max is far beyond exp's float range (80), so only a max-subtracted softmax survives.
Vec softmax_input(int64_t R, int64_t C, uint64_t seed) {
  Vec x = randn_vec(R * C, seed, 3.f);
  Generator g(seed + 1000);
  Vec u = rand({R * C}, g).to_vector<float>();
  for (size_t i = 0; i < x.size(); ++i) {
    if (u[i] < 0.01f) x[i] += 25.f;
    else if (u[i] > 0.99f) x[i] -= 40.f;
  }
  x[size_t(C / 2)] = 80.f;  // row 0
  return x;
}

void ref_softmax(const Vec& x, int64_t R, int64_t C, DVec& y) {
  y.resize(x.size());
  for (int64_t r = 0; r < R; ++r) {
    double m = -INFINITY, s = 0;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, double(x[size_t(r * C + c)]));
    for (int64_t c = 0; c < C; ++c) s += std::exp(double(x[size_t(r * C + c)]) - m);
    for (int64_t c = 0; c < C; ++c) y[size_t(r * C + c)] = std::exp(double(x[size_t(r * C + c)]) - m) / s;
  }
}

}  // namespace

TEST_CASE("cuda softmax forward and backward: warp rows, block rows, long rows, outliers") {
  // C = 1: trivial; 77, 193: scalar warp rows; 1000: float4 warp rows; 4096: 256-thread rows;
  // 8191: the longest register row (scalar); 10000 / 10001: the online two-pass path.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{37, 1}, {37, 77}, {37, 1000}, {6, 193}, {7, 4096},
                                                           {3, 8191}, {3, 10000}, {2, 10001}};
  for (auto [R, C] : shapes) {
    CAPTURE(R);
    CAPTURE(C);
    Vec x = softmax_input(R, C, uint64_t(R * 1000 + C));
    DVec y;
    ref_softmax(x, R, C, y);
    Tensor ty = cuda::softmax_forward(dev(x, {R, C}));
    Vec gy = get(ty);
    check_f32("softmax forward", gy, y);
    bool finite = true;
    for (float v : gy) finite = finite && std::isfinite(v);
    CHECK(finite);

    // dx = y * (dy - sum(dy * y)), with the double reference computed from the double y.
    Vec dy = randn_vec(R * C, uint64_t(R * 7 + C));
    DVec dx(y.size());
    for (int64_t r = 0; r < R; ++r) {
      double d = 0;
      for (int64_t c = 0; c < C; ++c) d += dy[size_t(r * C + c)] * y[size_t(r * C + c)];
      for (int64_t c = 0; c < C; ++c) dx[size_t(r * C + c)] = y[size_t(r * C + c)] * (dy[size_t(r * C + c)] - d);
    }
    // The kernel gets the float y; its error (1e-5 relative) feeds through, so compare at 1e-5
    // of the largest gradient.
    check_f32("softmax backward", get(cuda::softmax_backward(ty, dev(dy, {R, C}))), dx, 1e-5, 1e-5,
              max_abs(to_d(dy)));

    if (C <= 1000) {  // the CPU op and its autograd backward
      Tensor xc = host(x, {R, C}).set_requires_grad(true);
      Tensor yc = ops::softmax(xc);
      check_f32("softmax vs ops::softmax", gy, to_d(get(yc)));
      yc.backward(host(dy, {R, C}));
      check_f32("softmax backward vs ops::softmax autograd", get(cuda::softmax_backward(ty, dev(dy, {R, C}))),
                to_d(get(xc.grad())), 1e-5, 1e-5, max_abs(to_d(dy)));
    }
  }
  // Scalar path on 4-byte-aligned data with C % 4 == 0, and a 3-D input.
  Vec x = softmax_input(5, 64, 9);
  DVec y;
  ref_softmax(x, 5, 64, y);
  check_f32("softmax misaligned", get(cuda::softmax_forward(dev_misaligned(x, {5, 64}))), y);
  DVec y3;
  ref_softmax(x, 10, 32, y3);
  Tensor t3 = cuda::softmax_forward(dev(x, {5, 2, 32}));
  CHECK(t3.shape() == Shape{5, 2, 32});
  check_f32("softmax 3-D", get(t3), y3);
}

TEST_CASE("cuda softmax: errors") {
  CHECK_THROWS_WITH_AS(cuda::softmax_forward(Tensor::zeros({3, 4})), doctest::Contains("cuda::softmax_forward: x must be a contiguous F32 CUDA tensor, got F32 (3, 4) cpu"), Error);
  CHECK_THROWS_WITH_AS(cuda::softmax_backward(Tensor::zeros({3, 4}, DType::F32, Device::CUDA), Tensor::zeros({3, 5}, DType::F32, Device::CUDA)),
                       doctest::Contains("differ in shape"), Error);
}

// =============================================================================================
// layer norm
// =============================================================================================

namespace {

struct LnRef {
  DVec y, mean, rstd, dx, dg, db;
};

LnRef ref_layernorm(const Vec& x, const Vec& g, const Vec& b, const Vec& dy, int64_t R, int64_t D, double eps) {
  LnRef o;
  o.y.resize(x.size()), o.dx.resize(x.size()), o.mean.resize(size_t(R)), o.rstd.resize(size_t(R));
  o.dg.assign(size_t(D), 0.0), o.db.assign(size_t(D), 0.0);
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = &x[size_t(r * D)];
    double mu = 0, var = 0;
    for (int64_t c = 0; c < D; ++c) mu += xr[c];
    mu /= double(D);
    for (int64_t c = 0; c < D; ++c) var += (xr[c] - mu) * (xr[c] - mu);
    var /= double(D);
    const double rs = 1.0 / std::sqrt(var + eps);
    o.mean[size_t(r)] = mu, o.rstd[size_t(r)] = rs;
    double a = 0, bb = 0;
    for (int64_t c = 0; c < D; ++c) {
      const double xh = (xr[c] - mu) * rs, gy = dy[size_t(r * D + c)] * double(g[size_t(c)]);
      o.y[size_t(r * D + c)] = xh * g[size_t(c)] + b[size_t(c)];
      a += gy, bb += gy * xh;
      o.dg[size_t(c)] += dy[size_t(r * D + c)] * xh;
      o.db[size_t(c)] += dy[size_t(r * D + c)];
    }
    a /= double(D), bb /= double(D);
    for (int64_t c = 0; c < D; ++c) {
      const double xh = (xr[c] - mu) * rs, gy = dy[size_t(r * D + c)] * double(g[size_t(c)]);
      o.dx[size_t(r * D + c)] = rs * (gy - a - xh * bb);
    }
  }
  return o;
}

}  // namespace

TEST_CASE("cuda layernorm forward and backward against double and ops::layernorm") {
  // 77: scalar warp rows; 192: float4 warp rows; 1000: float4, 32 values per lane; 4096 and
  // 8192: 256-thread rows; 1: degenerate. R = 3000 exercises many blocks of partial sums.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{37, 77}, {37, 192}, {13, 1000}, {9, 4096},
                                                           {3, 8192}, {5, 1}, {3000, 192}, {1000, 77}};
  const float eps = 1e-5f;
  for (auto [R, D] : shapes) {
    CAPTURE(R);
    CAPTURE(D);
    const uint64_t s = uint64_t(R * 31 + D);
    Vec x = randn_vec(R * D, s, 2.f, 3.f), g = randn_vec(D, s + 1, 0.5f, 1.f), b = randn_vec(D, s + 2);
    Vec dy = randn_vec(R * D, s + 3);
    LnRef ref = ref_layernorm(x, g, b, dy, R, D, eps);
    auto f = cuda::layernorm_forward(dev(x, {R, D}), dev(g, {D}), dev(b, {D}), eps);
    CHECK(f.mean.shape() == Shape{R});
    check_f32("layernorm y", get(f.y), ref.y);
    check_f32("layernorm mean", get(f.mean), ref.mean);
    check_f32("layernorm rstd", get(f.rstd), ref.rstd);
    auto bw = cuda::layernorm_backward(dev(dy, {R, D}), dev(x, {R, D}), dev(g, {D}), f.mean, f.rstd);
    // dx sums terms of size |dy| |gamma| rstd; with D = 1 they cancel to exactly 0.
    const double dx_scale = max_abs(to_d(dy)) * max_abs(to_d(g)) * max_abs(ref.rstd);
    check_f32("layernorm dx", get(bw.dx), ref.dx, 1e-5, 1e-5, dx_scale);
    check_f32("layernorm dgamma", get(bw.dgamma), ref.dg);
    check_f32("layernorm dbeta", get(bw.dbeta), ref.db);
    // Deterministic: a second run gives the same bits.
    auto bw2 = cuda::layernorm_backward(dev(dy, {R, D}), dev(x, {R, D}), dev(g, {D}), f.mean, f.rstd);
    CHECK(get(bw2.dgamma) == get(bw.dgamma));
    CHECK(get(bw2.dbeta) == get(bw.dbeta));
    CHECK(get(bw2.dx) == get(bw.dx));

    if (R * D <= 200000) {  // the CPU op and its autograd backward
      Tensor xc = host(x, {R, D}).set_requires_grad(true), gc = host(g, {D}).set_requires_grad(true),
             bc = host(b, {D}).set_requires_grad(true);
      Tensor yc = ops::layernorm(xc, gc, bc, eps);
      check_f32("layernorm vs ops::layernorm", get(f.y), to_d(get(yc)), 1e-4, 1e-5);
      yc.backward(host(dy, {R, D}));
      check_f32("layernorm dx vs autograd", get(bw.dx), to_d(get(xc.grad())), 1e-4, 1e-5, dx_scale);
      check_f32("layernorm dgamma vs autograd", get(bw.dgamma), to_d(get(gc.grad())), 1e-4, 1e-5);
      check_f32("layernorm dbeta vs autograd", get(bw.dbeta), to_d(get(bc.grad())), 1e-4, 1e-5);
    }
  }
  // No affine parameters (gamma = 1, beta = 0), on 4-byte-aligned data.
  const int64_t R = 7, D = 96;
  Vec x = randn_vec(R * D, 5), dy = randn_vec(R * D, 6), ones(size_t(D), 1.f), zeros(size_t(D), 0.f);
  LnRef ref = ref_layernorm(x, ones, zeros, dy, R, D, eps);
  auto f = cuda::layernorm_forward(dev_misaligned(x, {R, D}), Tensor(), Tensor(), eps);
  check_f32("layernorm no affine y", get(f.y), ref.y);
  auto bw = cuda::layernorm_backward(dev_misaligned(dy, {R, D}), dev(x, {R, D}), Tensor(), f.mean, f.rstd);
  check_f32("layernorm no affine dx", get(bw.dx), ref.dx);
  check_f32("layernorm no affine dgamma", get(bw.dgamma), ref.dg);
}

TEST_CASE("cuda layernorm: errors") {
  Tensor x = Tensor::zeros({4, 8}, DType::F32, Device::CUDA);
  CHECK_THROWS_WITH_AS(cuda::layernorm_forward(x, Tensor::zeros({7}, DType::F32, Device::CUDA), Tensor(), 1e-5f),
                       doctest::Contains("cuda::layernorm_forward: gamma F32 (7) cuda does not match the normalised size 8"), Error);
  CHECK_THROWS_WITH_AS(cuda::layernorm_forward(Tensor::zeros({2, 9000}, DType::F32, Device::CUDA), Tensor(), Tensor(), 1e-5f),
                       doctest::Contains("the normalised size must be 1..8192"), Error);
}

// =============================================================================================
// cross-entropy
// =============================================================================================

TEST_CASE("cuda cross-entropy forward and backward, with label smoothing") {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{37, 1000}, {37, 77}, {64, 10}, {5, 5000}, {3, 5001}};
  for (auto [N, C] : shapes) {
    for (float sm : {0.f, 0.1f}) {
      CAPTURE(N);
      CAPTURE(C);
      CAPTURE(sm);
      Vec x = softmax_input(N, C, uint64_t(N * 13 + C));
      std::vector<int64_t> y(static_cast<size_t>(N));
      for (int64_t i = 0; i < N; ++i) y[size_t(i)] = (i * 7919 + 13) % C;
      y[0] = C / 2;  // row 0's label sits on its outlier
      DVec loss(static_cast<size_t>(N)), lse(static_cast<size_t>(N)), dx(x.size());
      const double dl = 0.5;  // incoming gradient of the mean loss
      for (int64_t i = 0; i < N; ++i) {
        double m = -INFINITY, s = 0, sx = 0;
        for (int64_t c = 0; c < C; ++c) m = std::max(m, double(x[size_t(i * C + c)]));
        for (int64_t c = 0; c < C; ++c) s += std::exp(x[size_t(i * C + c)] - m), sx += x[size_t(i * C + c)];
        lse[size_t(i)] = m + std::log(s);
        loss[size_t(i)] = lse[size_t(i)] - (1 - sm) * x[size_t(i * C + y[size_t(i)])] - sm / double(C) * sx;
        for (int64_t c = 0; c < C; ++c)
          dx[size_t(i * C + c)] = dl / double(N) *
              (std::exp(x[size_t(i * C + c)] - lse[size_t(i)]) - sm / double(C) - (c == y[size_t(i)] ? 1 - sm : 0.0));
      }
      Tensor tx = dev(x, {N, C}), ty = Tensor::from_i64(y, {N}).to(Device::CUDA);
      auto f = cuda::cross_entropy_forward(tx, ty, sm);
      check_f32("ce loss", get(f.row_loss), loss);
      check_f32("ce lse", get(f.lse), lse);
      Tensor g = cuda::cross_entropy_backward(tx, ty, f.lse, sm, dev({float(dl)}, {1}));
      check_f32("ce dlogits", get(g), dx);
      // Without dloss the gradient is that of the mean loss itself.
      Vec g1 = get(cuda::cross_entropy_backward(tx, ty, f.lse, sm));
      DVec dx1(dx);
      for (double& v : dx1) v /= dl;
      check_f32("ce dlogits (dloss = 1)", g1, dx1);

      // ops::cross_entropy: the mean of our per-row losses, and its autograd gradient.
      Tensor xc = host(x, {N, C}).set_requires_grad(true);
      Tensor lc = ops::cross_entropy(xc, Tensor::from_i64(y, {N}), sm);
      double mean = 0;
      for (float v : get(f.row_loss)) mean += v;
      mean /= double(N);
      CHECK(std::fabs(mean - lc.item()) <= 1e-5 * std::max(1.0, std::fabs(mean)));
      CHECK(std::fabs(mean - f.loss.item()) <= 1e-5 * std::max(1.0, std::fabs(mean)));  // the kernel's own mean
      lc.backward();
      check_f32("ce dlogits vs ops::cross_entropy autograd", g1, to_d(get(xc.grad())), 1e-4, 1e-5);
    }
  }
  // A label outside [0, C) gives that row a NaN loss (not a wild read); other rows are fine.
  auto f = cuda::cross_entropy_forward(dev({1, 2, 3, 4, 5, 6}, {2, 3}), Tensor::from_i64({1, 3}, {2}).to(Device::CUDA));
  Vec l = get(f.row_loss);
  CHECK(std::isfinite(l[0]));
  CHECK(std::isnan(l[1]));
}

TEST_CASE("cuda cross-entropy: errors") {
  Tensor x = Tensor::zeros({4, 8}, DType::F32, Device::CUDA);
  CHECK_THROWS_WITH_AS(cuda::cross_entropy_forward(x, Tensor::from_i64({0, 1, 2, 3}, {4})),
                       doctest::Contains("labels must be a contiguous I64 CUDA tensor, got I64 (4) cpu"), Error);
  CHECK_THROWS_WITH_AS(cuda::cross_entropy_forward(x, Tensor::from_i64({0, 1, 2}, {3}).to(Device::CUDA)),
                       doctest::Contains("do not match logits"), Error);
}

// =============================================================================================
// elementwise
// =============================================================================================

TEST_CASE("cuda gelu, add_bias, binary (equal shapes) against double and ops") {
  const double c = std::sqrt(2.0 / std::numbers::pi), k = 0.044715;
  for (int64_t n : {1, 3, 1001, 4096}) {
    CAPTURE(n);
    Vec x = randn_vec(n, uint64_t(n), 3.f), dy = randn_vec(n, uint64_t(n + 1));
    DVec y(static_cast<size_t>(n)), dx(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const double v = x[size_t(i)], t = std::tanh(c * (v + k * v * v * v));
      y[size_t(i)] = 0.5 * v * (1 + t);
      dx[size_t(i)] = dy[size_t(i)] * (0.5 * (1 + t) + 0.5 * v * (1 - t * t) * c * (1 + 3 * k * v * v));
    }
    // tanh near -1 loses digits in 1 + t (and 1 - t^2): the absolute term (1e-5 max|ref|) covers it.
    for (bool misaligned : {false, true}) {
      Tensor tx = misaligned ? dev_misaligned(x, {n}) : dev(x, {n});
      check_f32("gelu forward", get(cuda::gelu_forward(tx)), y);
      check_f32("gelu backward", get(cuda::gelu_backward(tx, dev(dy, {n}))), dx);
    }
    check_f32("gelu vs ops::gelu", get(cuda::gelu_forward(dev(x, {n}))), to_d(get(ops::gelu(host(x, {n}), ops::GeluForm::Tanh))), 1e-5, 1e-6);
    DVec sum(static_cast<size_t>(n)), prod(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) sum[size_t(i)] = double(x[size_t(i)]) + dy[size_t(i)], prod[size_t(i)] = double(x[size_t(i)]) * dy[size_t(i)];
    const auto bin = [](const Tensor& a, const Tensor& b, cuda::Binary op) { return get(cuda::binary(a, b, op)); };
    check_f32("add", bin(dev(x, {n}), dev(dy, {n}), ops::Binary::Add), to_d(get(ops::add(host(x, {n}), host(dy, {n})))), 0, 0);
    check_f32("mul", bin(dev(x, {n}), dev(dy, {n}), ops::Binary::Mul), to_d(get(ops::mul(host(x, {n}), host(dy, {n})))), 0, 0);
    check_f32("add vs double", bin(dev_misaligned(x, {n}), dev(dy, {n}), ops::Binary::Add), sum, 1e-7, 0);
    check_f32("mul vs double", bin(dev(x, {n}), dev_misaligned(dy, {n}), ops::Binary::Mul), prod, 1e-7, 0);
    DVec diff(static_cast<size_t>(n)), quot(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i)
      diff[size_t(i)] = double(x[size_t(i)]) - dy[size_t(i)], quot[size_t(i)] = double(x[size_t(i)]) / dy[size_t(i)];
    check_f32("sub vs double", bin(dev(x, {n}), dev(dy, {n}), ops::Binary::Sub), diff, 1e-7, 0);
    check_f32("div vs double", bin(dev(x, {n}), dev(dy, {n}), ops::Binary::Div), quot, 1e-6, 0);
  }
  for (auto [R, C] : std::vector<std::pair<int64_t, int64_t>>{{37, 77}, {37, 192}, {3, 1}}) {
    CAPTURE(C);
    Vec x = randn_vec(R * C, 21), b = randn_vec(C, 22);
    Vec ref = get(ops::add(host(x, {R, C}), host(b, {C})));  // exact float sums
    check_f32("add_bias", get(cuda::add_bias(dev(x, {R, C}), dev(b, {C}))), to_d(ref), 0, 0);
    check_f32("add_bias misaligned", get(cuda::add_bias(dev_misaligned(x, {R, C}), dev(b, {C}))), to_d(ref), 0, 0);
  }
  CHECK_THROWS_WITH_AS(cuda::binary(Tensor::zeros({3}, DType::F32, Device::CUDA), Tensor::zeros({4}, DType::F32, Device::CUDA), ops::Binary::Add),
                       doctest::Contains("cuda::binary: shapes F32 (3) cuda and F32 (4) cuda do not broadcast"), Error);
  CHECK_THROWS_WITH_AS(cuda::add_bias(Tensor::zeros({3, 4}, DType::F32, Device::CUDA), Tensor::zeros({3}, DType::F32, Device::CUDA)),
                       doctest::Contains("expected x (..., C) and b (C)"), Error);
}

TEST_CASE("cuda binary: broadcasting and strided operands against a double loop") {
  // out[i, j, k] = a[...] (op) b[...] with size-1 dims stretched; every case also through a
  // transposed (strided) view of a.
  struct Case {
    Shape a, b, out;
  };
  for (const Case& c : std::vector<Case>{{{3, 1, 5}, {1, 4, 5}, {3, 4, 5}},
                                         {{3, 4, 5}, {5}, {3, 4, 5}},
                                         {{4, 1}, {3, 1, 7}, {3, 4, 7}},
                                         {{1}, {2, 3}, {2, 3}}}) {
    CAPTURE(shape_str(c.a));
    CAPTURE(shape_str(c.b));
    const Vec a = randn_vec(shape_numel(c.a), 31), b = randn_vec(shape_numel(c.b), 32, 1.f, 3.f);
    // element of x (shape xs) that out index (i0, i1, i2) reads, right-aligned, size-1 dims at 0
    auto at = [&](const Vec& x, const Shape& xs, const std::vector<int64_t>& idx) {
      int64_t off = 0;
      for (size_t d = 0; d < xs.size(); ++d) {
        const int64_t k = idx[idx.size() - xs.size() + d];
        off = off * xs[d] + (xs[d] == 1 ? 0 : k);
      }
      return double(x[size_t(off)]);
    };
    for (cuda::Binary op : {ops::Binary::Add, ops::Binary::Sub, ops::Binary::Mul, ops::Binary::Div}) {
      CAPTURE(int(op));
      DVec ref;
      const Shape o3 = c.out.size() == 3 ? c.out : Shape{1, c.out[0], c.out[1]};
      for (int64_t i = 0; i < o3[0]; ++i)
        for (int64_t j = 0; j < o3[1]; ++j)
          for (int64_t k = 0; k < o3[2]; ++k) {
            const std::vector<int64_t> idx = c.out.size() == 3 ? std::vector<int64_t>{i, j, k} : std::vector<int64_t>{j, k};
            const double x = at(a, c.a, idx), y = at(b, c.b, idx);
            ref.push_back(op == ops::Binary::Add ? x + y : op == ops::Binary::Sub ? x - y : op == ops::Binary::Mul ? x * y : x / y);
          }
      const Tensor out = cuda::binary(dev(a, c.a), dev(b, c.b), op);
      CHECK(out.shape() == c.out);
      check_f32("binary broadcast", get(out), ref, 1e-6, 0);
      if (c.a.size() >= 2 && c.a.back() > 1 && c.a[c.a.size() - 2] > 1) {  // a through a transposed view
        Shape at_shape = c.a;
        std::swap(at_shape[at_shape.size() - 1], at_shape[at_shape.size() - 2]);
        Vec a_t(a.size());
        const int64_t R = c.a[c.a.size() - 2], C = c.a.back(), B = shape_numel(c.a) / (R * C);
        for (int64_t q = 0; q < B; ++q)
          for (int64_t r = 0; r < R; ++r)
            for (int64_t s2 = 0; s2 < C; ++s2) a_t[size_t((q * C + s2) * R + r)] = a[size_t((q * R + r) * C + s2)];
        const Tensor view = ops::transpose(dev(a_t, at_shape), -1, -2);
        REQUIRE(!view.is_contiguous());
        check_f32("binary broadcast, strided a", get(cuda::binary(view, dev(b, c.b), op)), ref, 1e-6, 0);
      }
    }
  }
}

TEST_CASE("cuda unary maps: forward and backward against double") {
  struct U {
    cuda::Unary f;
    const char* name;
    float p, scale, shift;  // input: scale * N(0, 1) + shift (positive where the domain needs it)
    double (*y)(double x, double p);
    double (*dy)(double x, double p);
  };
  static constexpr double s_is2 = 0.70710678118654752, s_is2pi = 0.39894228040143268;  // 1/sqrt(2), 1/sqrt(2 pi)
  const std::vector<U> maps = {
      {ops::Unary::Exp, "exp", 0, 2, 0, [](double x, double) { return std::exp(x); }, [](double x, double) { return std::exp(x); }},
      {ops::Unary::Log, "log", 0, 0.3f, 2, [](double x, double) { return std::log(x); }, [](double x, double) { return 1 / x; }},
      {ops::Unary::Sqrt, "sqrt", 0, 0.3f, 2, [](double x, double) { return std::sqrt(x); }, [](double x, double) { return 0.5 / std::sqrt(x); }},
      {ops::Unary::Rsqrt, "rsqrt", 0, 0.3f, 2, [](double x, double) { return 1 / std::sqrt(x); }, [](double x, double) { return -0.5 / (x * std::sqrt(x)); }},
      {ops::Unary::Tanh, "tanh", 0, 2, 0, [](double x, double) { return std::tanh(x); }, [](double x, double) { return 1 - std::tanh(x) * std::tanh(x); }},
      {ops::Unary::Pow, "pow 3", 3, 1, 0, [](double x, double p) { return std::pow(x, p); }, [](double x, double p) { return p * std::pow(x, p - 1); }},
      {ops::Unary::Pow, "pow 0.5", 0.5f, 0.3f, 2, [](double x, double p) { return std::pow(x, p); }, [](double x, double p) { return p * std::pow(x, p - 1); }},
      {ops::Unary::Relu, "relu", 0, 1, 0, [](double x, double) { return x > 0 ? x : 0; }, [](double x, double) { return x > 0 ? 1.0 : 0.0; }},
      {ops::Unary::GeluErf, "gelu erf", 0, 2, 0,
       [](double x, double) { return 0.5 * x * (1 + std::erf(x * s_is2)); },
       [](double x, double) { return 0.5 * (1 + std::erf(x * s_is2)) + x * s_is2pi * std::exp(-0.5 * x * x); }},
      {ops::Unary::NormalCdf, "normal cdf", 0, 3, 0,
       [](double x, double) { return 0.5 * std::erfc(-x * s_is2); },
       [](double x, double) { return s_is2pi * std::exp(-0.5 * x * x); }},
  };
  for (const U& u : maps)
    for (int64_t n : {1, 1001}) {
      CAPTURE(u.name);
      CAPTURE(n);
      const Vec x = randn_vec(n, 41, u.scale, u.shift), g = randn_vec(n, 42);
      DVec y, dx;
      for (int64_t i = 0; i < n; ++i) {
        y.push_back(u.y(x[size_t(i)], u.p));
        dx.push_back(g[size_t(i)] * u.dy(x[size_t(i)], u.p));
      }
      const Tensor tx = dev_misaligned(x, {n});
      const Tensor ty = cuda::unary_forward(tx, u.f, u.p);
      check_f32(std::string(u.name) + " forward", get(ty), y);
      // tanh' = 1 - y^2 is formed from the float output y: where |y| is near 1 the result is
      // small only by cancellation, so terms of size |g| set the attainable error.
      const double terms = u.f == ops::Unary::Tanh ? max_abs(to_d(g)) : 0;
      check_f32(std::string(u.name) + " backward", get(cuda::unary_backward(tx, ty, dev(g, {n}), u.f, u.p)), dx, 1e-5,
                1e-5, terms);
    }
  CHECK_THROWS_WITH_AS(cuda::unary_backward(Tensor::zeros({3}, DType::F32, Device::CUDA), Tensor::zeros({3}, DType::F32, Device::CUDA),
                                            Tensor::zeros({4}, DType::F32, Device::CUDA), ops::Unary::Exp),
                       doctest::Contains("cuda::unary_backward: shapes differ"), Error);
}

TEST_CASE("cuda sum_keep (sums over any axes), fill, patchify against double loops") {
  const int64_t A = 3, B = 5, C = 7;
  const Vec x = randn_vec(A * B * C, 51);
  auto X = [&](int64_t i, int64_t j, int64_t k) { return double(x[size_t((i * B + j) * C + k)]); };
  for (const Shape& keep : {Shape{A, 1, C}, Shape{1, B, 1}, Shape{1, 1, 1}, Shape{A, B, C}, Shape{1, B, C}}) {
    CAPTURE(shape_str(keep));
    DVec ref(size_t(shape_numel(keep)), 0.0);
    for (int64_t i = 0; i < A; ++i)
      for (int64_t j = 0; j < B; ++j)
        for (int64_t k = 0; k < C; ++k) {
          const int64_t o = ((keep[0] == 1 ? 0 : i) * keep[1] + (keep[1] == 1 ? 0 : j)) * keep[2] + (keep[2] == 1 ? 0 : k);
          ref[size_t(o)] += 0.5 * X(i, j, k);
        }
    const Tensor s = cuda::sum_keep(dev(x, {A, B, C}), keep, 0.5f);
    CHECK(s.shape() == keep);
    check_f32("sum_keep", get(s), ref, 1e-5, 1e-6 * A * B * C);
  }
  // a strided input: the transposed (A, C, B) view of the same values, reduced over its middle axis
  const Tensor xt = ops::transpose(dev(x, {A, B, C}), 1, 2);
  DVec ref_t;
  for (int64_t i = 0; i < A; ++i)
    for (int64_t j = 0; j < B; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < C; ++k) acc += X(i, j, k);
      ref_t.push_back(acc);
    }
  check_f32("sum_keep of a transposed view", get(cuda::sum_keep(xt, {A, 1, B})), ref_t, 1e-5, 1e-5);
  CHECK_THROWS_WITH_AS(cuda::sum_keep(dev(x, {A, B, C}), {A, 2, C}), doctest::Contains("cannot be kept as 2"), Error);

  Tensor f = Tensor::empty({1001}, DType::F32, Device::CUDA);
  f.fill_(-2.5f);
  check_f32("fill_", get(f), DVec(1001, -2.5), 0, 0);
  check_f32("Tensor::full on the device", get(Tensor::full({3, 4}, 7.f, Device::CUDA)), DVec(12, 7.0), 0, 0);

  // patchify: (2, 3, 8, 12) with p = 4 -> (2, 6, 48); exact (a permutation)
  const int64_t Bn = 2, Ch = 3, H = 8, W = 12, p = 4, gw = W / p, N = (H / p) * gw, F = Ch * p * p;
  const Vec img = randn_vec(Bn * Ch * H * W, 52);
  DVec pref(size_t(Bn * N * F));
  for (int64_t b = 0; b < Bn; ++b)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < Ch; ++c)
        for (int64_t i = 0; i < p; ++i)
          for (int64_t j = 0; j < p; ++j)
            pref[size_t((b * N + n) * F + (c * p + i) * p + j)] =
                img[size_t(((b * Ch + c) * H + (n / gw) * p + i) * W + (n % gw) * p + j)];
  const Tensor patches = cuda::patchify(dev(img, {Bn, Ch, H, W}), int(p));
  CHECK(patches.shape() == Shape{Bn, N, F});
  check_f32("patchify", get(patches), pref, 0, 0);
  check_f32("unpatchify", get(cuda::unpatchify(patches, {Bn, Ch, H, W}, int(p))), to_d(img), 0, 0);
  CHECK_THROWS_WITH_AS(cuda::patchify(dev(img, {Bn, Ch, H, W}), 5), doctest::Contains("multiples of the patch size 5"), Error);
}

TEST_CASE("cuda sgd_step: momentum and weight decay against double, gradients unchanged") {
  const int64_t n = 1001;
  const float lr = 0.1f, mom = 0.9f, wd = 0.01f, gs = 0.5f;
  const Vec p0 = randn_vec(n, 61);
  Tensor P = dev(p0, {n}), Bf = Tensor::zeros({n}, DType::F32, Device::CUDA);
  DVec p = to_d(p0), buf(size_t(n), 0.0);
  for (int step = 1; step <= 3; ++step) {
    const Vec g = randn_vec(n, 62 + uint64_t(step));
    const Tensor G = dev(g, {n});
    cuda::sgd_step(P, G, Bf, lr, mom, wd, gs);
    for (size_t i = 0; i < size_t(n); ++i) {
      buf[i] = mom * buf[i] + double(g[i]) * gs + wd * p[i];
      p[i] -= lr * buf[i];
    }
    CAPTURE(step);
    check_f32("sgd p", get(P), p, 1e-5, 1e-6);
    check_f32("sgd momentum", get(Bf), buf, 1e-5, 1e-6);
    check_f32("sgd leaves the gradient", get(G), to_d(g), 0, 0);
  }
  CHECK_THROWS_WITH_AS(cuda::sgd_step(P, Tensor::zeros({3}, DType::F32, Device::CUDA), Bf, lr, mom, wd),
                       doctest::Contains("differ in shape"), Error);
}

// =============================================================================================
// AdamW
// =============================================================================================

TEST_CASE("cuda adamw_step: one launch over many tensors matches PyTorch's AdamW in double") {
  // Sizes: 1, an odd size, several chunks (16384 each) with a tail; one tensor misaligned.
  const std::vector<int64_t> sizes = {1, 1001, 40003, 64};
  const std::vector<float> wds = {0.f, 0.05f, 0.1f, 0.02f};
  const float lr = 1e-3f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
  std::vector<Tensor> P, M, V;
  std::vector<DVec> p, m, v;
  for (size_t t = 0; t < sizes.size(); ++t) {
    Vec p0 = randn_vec(sizes[t], 100 + t);
    P.push_back(t == 3 ? dev_misaligned(p0, {sizes[t]}) : dev(p0, {sizes[t]}));
    M.push_back(Tensor::zeros({sizes[t]}, DType::F32, Device::CUDA));
    V.push_back(Tensor::zeros({sizes[t]}, DType::F32, Device::CUDA));
    p.push_back(to_d(p0));
    m.emplace_back(size_t(sizes[t]), 0.0);
    v.emplace_back(size_t(sizes[t]), 0.0);
  }
  for (int64_t step = 1; step <= 3; ++step) {
    std::vector<Tensor> G;
    std::vector<Vec> g;
    for (size_t t = 0; t < sizes.size(); ++t) {
      g.push_back(randn_vec(sizes[t], 1000 * step + t, step == 2 ? 1e-3f : 1.f));  // step 2: tiny grads
      G.push_back(dev(g.back(), {sizes[t]}));
    }
    cuda::adamw_step(P, G, M, V, lr, b1, b2, eps, wds, step, 1.f);
    const double bc1 = 1 - std::pow(double(b1), double(step)), bc2 = 1 - std::pow(double(b2), double(step));
    for (size_t t = 0; t < sizes.size(); ++t)
      for (size_t i = 0; i < p[t].size(); ++i) {
        const double gi = g[t][i];
        p[t][i] *= 1 - double(lr) * wds[t];
        m[t][i] = b1 * m[t][i] + (1 - double(b1)) * gi;
        v[t][i] = b2 * v[t][i] + (1 - double(b2)) * gi * gi;
        p[t][i] -= double(lr) / bc1 * m[t][i] / (std::sqrt(v[t][i]) / std::sqrt(bc2) + eps);
      }
    for (size_t t = 0; t < sizes.size(); ++t) {
      CAPTURE(step);
      CAPTURE(t);
      // The update is lr-sized; 1e-5 relative on p and on the moments.
      check_f32("adamw p", get(P[t]), p[t], 1e-5, 1e-6);
      check_f32("adamw m", get(M[t]), m[t], 1e-5, 1e-6);
      check_f32("adamw v", get(V[t]), v[t], 1e-5, 1e-6);
    }
  }
  CHECK_THROWS_WITH_AS(cuda::adamw_step(P, {}, M, V, lr, b1, b2, eps, wds, 1, 1.f), doctest::Contains("list lengths differ"), Error);
  CHECK_THROWS_WITH_AS(cuda::adamw_step({Tensor::zeros({3})}, {Tensor::zeros({3})}, {Tensor::zeros({3})}, {Tensor::zeros({3})},
                                        lr, b1, b2, eps, {0.f}, 1, 1.f),
                       doctest::Contains("tensor 0 of params must be a contiguous F32 CUDA tensor"), Error);
}

TEST_CASE("cuda adamw_step: grad_scale 0.5 equals scale 1 on halved gradients, gradients unchanged") {
  const std::vector<int64_t> sizes = {7, 40003};
  const std::vector<float> wds = {0.f, 0.05f};
  std::vector<Tensor> Pa, Ma, Va, Pb, Mb, Vb;
  for (size_t t = 0; t < sizes.size(); ++t) {
    const Vec p0 = randn_vec(sizes[t], 300 + t);
    Pa.push_back(dev(p0, {sizes[t]})), Pb.push_back(dev(p0, {sizes[t]}));
    for (auto* L : {&Ma, &Va, &Mb, &Vb}) L->push_back(Tensor::zeros({sizes[t]}, DType::F32, Device::CUDA));
  }
  for (int64_t step = 1; step <= 2; ++step) {
    std::vector<Tensor> G, Gh;
    std::vector<Vec> g;
    for (size_t t = 0; t < sizes.size(); ++t) {
      g.push_back(randn_vec(sizes[t], 700 * step + t));
      Vec half = g.back();
      for (float& x : half) x *= 0.5f;  // exact in binary floating point
      G.push_back(dev(g.back(), {sizes[t]})), Gh.push_back(dev(half, {sizes[t]}));
    }
    cuda::adamw_step(Pa, G, Ma, Va, 1e-2f, 0.9f, 0.999f, 1e-8f, wds, step, 0.5f);
    cuda::adamw_step(Pb, Gh, Mb, Vb, 1e-2f, 0.9f, 0.999f, 1e-8f, wds, step, 1.f);
    for (size_t t = 0; t < sizes.size(); ++t) {
      CAPTURE(step);
      CAPTURE(t);
      const Vec pa = get(Pa[t]), pb = get(Pb[t]), ma = get(Ma[t]), mb = get(Mb[t]);
      CHECK(std::memcmp(pa.data(), pb.data(), pa.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(ma.data(), mb.data(), ma.size() * sizeof(float)) == 0);
      const Vec ga = get(G[t]);  // the scaled gradient was read, not written
      CHECK(std::memcmp(ga.data(), g[t].data(), ga.size() * sizeof(float)) == 0);
    }
  }
}

// =============================================================================================
// Philox
// =============================================================================================

TEST_CASE("cuda philox: the same draws as the CPU's rand / randn") {
  for (int64_t n : {1, 3, 1001, 100000}) {
    for (uint64_t offset : {uint64_t(0), uint64_t(7), (uint64_t(1) << 33) + 5}) {
      CAPTURE(n);
      CAPTURE(offset);
      Generator gu(1234);
      gu.offset = offset;
      Vec cu = rand({n}, gu).to_vector<float>();
      Vec du = get(cuda::philox_uniform({n}, 1234, offset));
      CHECK(std::memcmp(cu.data(), du.data(), cu.size() * sizeof(float)) == 0);

      Generator gn(99);
      gn.offset = offset;
      Vec cn = randn({n}, gn).to_vector<float>();
      Vec dn = get(cuda::philox_normal({n}, 99, offset));
      size_t same = 0;
      for (size_t i = 0; i < cn.size(); ++i) same += std::memcmp(&cn[i], &dn[i], sizeof(float)) == 0;
      const Report r = compare(dn, to_d(cn), 2e-6, 1e-6);
      INFO("normal: " << r.text << ", bitwise equal " << same << " / " << cn.size());
      CHECK(r.bad == 0);
    }
  }
  CHECK(cuda::philox_normal({2, 3}, 1, 0).shape() == Shape{2, 3});
}

// =============================================================================================
// attention
// =============================================================================================

namespace {

struct AttnRef {
  DVec out, lse, dqkv;
};

// Per (batch, head): S = q k^T * scale, P = softmax(S), out = P v; backward with
// dP = dO v^T, Di = rowsum(dO * out), dS = P (dP - Di), dq = dS k scale, dk = dS^T q scale, dv = P^T dO.
AttnRef ref_attention(const Vec& qkv, const Vec& dout, int64_t B, int64_t T, int64_t D, int64_t H) {
  const int64_t Dh = D / H, ld = 3 * D;
  const double scale = 1.0 / std::sqrt(double(Dh));
  AttnRef r;
  r.out.assign(size_t(B * T * D), 0.0);
  r.lse.assign(size_t(B * H * T), 0.0);
  r.dqkv.assign(qkv.size(), 0.0);
  std::vector<double> P(size_t(T * T)), dP(size_t(T * T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      auto q = [&](int64_t i, int64_t d) { return double(qkv[size_t((b * T + i) * ld + h * Dh + d)]); };
      auto k = [&](int64_t i, int64_t d) { return double(qkv[size_t((b * T + i) * ld + D + h * Dh + d)]); };
      auto v = [&](int64_t i, int64_t d) { return double(qkv[size_t((b * T + i) * ld + 2 * D + h * Dh + d)]); };
      auto go = [&](int64_t i, int64_t d) { return double(dout[size_t((b * T + i) * D + h * Dh + d)]); };
      for (int64_t i = 0; i < T; ++i) {
        double m = -INFINITY;
        for (int64_t j = 0; j < T; ++j) {
          double s = 0;
          for (int64_t d = 0; d < Dh; ++d) s += q(i, d) * k(j, d);
          P[size_t(i * T + j)] = s * scale;
          m = std::max(m, s * scale);
        }
        double l = 0;
        for (int64_t j = 0; j < T; ++j) l += std::exp(P[size_t(i * T + j)] - m);
        r.lse[size_t((b * H + h) * T + i)] = m + std::log(l);
        for (int64_t j = 0; j < T; ++j) P[size_t(i * T + j)] = std::exp(P[size_t(i * T + j)] - m) / l;
        for (int64_t d = 0; d < Dh; ++d) {
          double o = 0;
          for (int64_t j = 0; j < T; ++j) o += P[size_t(i * T + j)] * v(j, d);
          r.out[size_t((b * T + i) * D + h * Dh + d)] = o;
        }
      }
      for (int64_t i = 0; i < T; ++i) {
        double di = 0;
        for (int64_t d = 0; d < Dh; ++d) di += go(i, d) * r.out[size_t((b * T + i) * D + h * Dh + d)];
        for (int64_t j = 0; j < T; ++j) {
          double dp = 0;
          for (int64_t d = 0; d < Dh; ++d) dp += go(i, d) * v(j, d);
          dP[size_t(i * T + j)] = P[size_t(i * T + j)] * (dp - di);  // dS
        }
      }
      for (int64_t i = 0; i < T; ++i)
        for (int64_t d = 0; d < Dh; ++d) {
          double dq = 0, dk = 0, dv = 0;
          for (int64_t j = 0; j < T; ++j) {
            dq += dP[size_t(i * T + j)] * k(j, d);
            dk += dP[size_t(j * T + i)] * q(j, d);
            dv += P[size_t(j * T + i)] * go(j, d);
          }
          r.dqkv[size_t((b * T + i) * ld + h * Dh + d)] = dq * scale;
          r.dqkv[size_t((b * T + i) * ld + D + h * Dh + d)] = dk * scale;
          r.dqkv[size_t((b * T + i) * ld + 2 * D + h * Dh + d)] = dv;
        }
    }
  return r;
}

}  // namespace

TEST_CASE("cuda attention forward and backward against double and ops::self_attention") {
  struct Case {
    int64_t B, T, D, H;
  };
  // Head dims 16, 64, 32 (the tuned sizes), 24 (padded to 32, float4), 10 (padded, scalar: D % 4
  // != 0), 1; T = 50 and 197 (ViT), 65, and sizes that leave partial tiles.
  const std::vector<Case> cases = {{2, 50, 64, 4}, {2, 197, 192, 3}, {2, 65, 128, 4}, {1, 37, 48, 2},
                                   {1, 19, 30, 3}, {1, 7, 8, 8}, {3, 1, 64, 1}};
  for (const Case& c : cases) {
    CAPTURE(c.B);
    CAPTURE(c.T);
    CAPTURE(c.D);
    CAPTURE(c.H);
    const uint64_t s = uint64_t(c.T * 100 + c.D);
    Vec qkv = randn_vec(c.B * c.T * 3 * c.D, s, 1.5f);  // scale 1.5: peaked rows, rescaling exercised
    Vec dout = randn_vec(c.B * c.T * c.D, s + 1);
    AttnRef ref = ref_attention(qkv, dout, c.B, c.T, c.D, c.H);
    Tensor tq = dev(qkv, {c.B, c.T, 3 * c.D});
    auto f = cuda::attention_forward(tq, int(c.H));
    CHECK(f.out.shape() == Shape{c.B, c.T, c.D});
    CHECK(f.saved.shape() == Shape{c.B, c.H, c.T});
    check_f32("attention out", get(f.out), ref.out);
    check_f32("attention lse", get(f.saved), ref.lse);
    Tensor dq = cuda::attention_backward(tq, f.out, f.saved, dev(dout, {c.B, c.T, c.D}), int(c.H));
    CHECK(dq.shape() == Shape{c.B, c.T, 3 * c.D});
    const Vec gdq = get(dq);
    check_f32("attention dqkv", gdq, ref.dqkv);
    // Each of dq, dk, dv on its own scale.
    for (int part = 0; part < 3; ++part) {
      Vec got;
      DVec want;
      for (int64_t r = 0; r < c.B * c.T; ++r)
        for (int64_t d = 0; d < c.D; ++d) {
          const size_t i = size_t(r * 3 * c.D + part * c.D + d);
          got.push_back(gdq[i]);
          want.push_back(ref.dqkv[i]);
        }
      const char* names[] = {"attention dq", "attention dk", "attention dv"};
      check_f32(names[part], got, want);
    }
    CHECK(get(cuda::attention_backward(tq, f.out, f.saved, dev(dout, {c.B, c.T, c.D}), int(c.H))) == gdq);  // deterministic

    // ops::self_attention (the CPU twin) and its autograd backward.
    Tensor xc = host(qkv, {c.B, c.T, 3 * c.D}).set_requires_grad(true);
    Tensor oc = ops::self_attention(xc, int(c.H));
    check_f32("attention vs ops::self_attention", get(f.out), to_d(get(oc)), 1e-4, 1e-5);
    oc.backward(host(dout, {c.B, c.T, c.D}));
    check_f32("attention dqkv vs autograd", gdq, to_d(get(xc.grad())), 1e-4, 1e-5);
  }
}

TEST_CASE("cuda attention: errors") {
  Tensor q = Tensor::zeros({2, 5, 3 * 130}, DType::F32, Device::CUDA);
  CHECK_THROWS_WITH_AS(cuda::attention_forward(q, 2), doctest::Contains("head dim 65"), Error);
  CHECK_THROWS_WITH_AS(cuda::attention_forward(q, 3), doctest::Contains("not divisible by heads = 3"), Error);
  CHECK_THROWS_WITH_AS(cuda::attention_forward(Tensor::zeros({2, 5, 7}, DType::F32, Device::CUDA), 1), doctest::Contains("expected (B, T, 3D)"), Error);
}
