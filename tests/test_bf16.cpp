// bfloat16 products on the CPU (ops::set_matmul_bf16, train --bf16): linear's forward and
// backward against products of rounded inputs, the backward keeping its forward's precision, the
// expert MLP and fused attention, and routers that stay float32. Skipped, with a message, by a build without
// AVX-512 BF16.
#include <algorithm>
#include <cmath>
#include <vector>

#include "autograd/autograd.h"
#include "models/moe.h"
#include "ops/attention.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"
#include "ops/moe.h"
#include "ops/reduce.h"
#include "ops/tile_gemm.h"
#include "tests/helpers.h"

using namespace mv;
using test::check_close;
using test::param;
using test::round_bf16;

namespace {

// Sets the process-wide precision for one test and puts FP32 back at its end.
struct Bf16Products {
  Bf16Products() { ops::set_matmul_bf16(true); }
  ~Bf16Products() { ops::set_matmul_bf16(false); }
};

bool skip_without_bf16() {
  if (ops::tile_gemm_has_bf16()) return false;
  MESSAGE("this build has no AVX-512 BF16: the bfloat16 products are not tested");
  return true;
}

// c (M, N) = a (M, K) b (K, N) in double, each input rounded to bfloat16 when `round`; a and b
// row-major, or a read as its transpose (K, M) when at.
std::vector<float> product(const std::vector<float>& a, const std::vector<float>& b, int64_t M, int64_t K,
                           int64_t N, bool round, bool at = false) {
  auto in = [round](float v) { return round ? round_bf16(v) : v; };
  std::vector<float> c(size_t(M * N));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += double(in(a[size_t(at ? k * M + i : i * K + k)])) * in(b[size_t(k * N + j)]);
      c[size_t(i * N + j)] = float(s);
    }
  return c;
}

std::vector<float> transposed(const std::vector<float>& m, int64_t rows, int64_t cols) {
  std::vector<float> t(m.size());
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) t[size_t(j * rows + i)] = m[size_t(i * cols + j)];
  return t;
}

// A result of bfloat16 products against the FP32 one: off by more than FP32 rounding (so the
// products did round) and by less than 3% of the largest value.
void check_rounded(const std::vector<float>& got, const std::vector<float>& fp32) {
  REQUIRE(got.size() == fp32.size());
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    max_diff = std::max(max_diff, double(std::fabs(got[i] - fp32[i])));
    max_ref = std::max(max_ref, double(std::fabs(fp32[i])));
  }
  CHECK(max_diff > 1e-5 * max_ref);
  CHECK(max_diff < 3e-2 * max_ref);
}

}  // namespace

// y = x w + b, dx = dy w^T, dw = x^T dy, each a product of rounded inputs with FP32 sums; the
// precision is switched off between forward and backward, which must not change the backward.
// The tolerance (1e-4) is far below what rounding moves these sums (about 1e-2), so an FP32
// product fails it.
TEST_CASE("bf16 products: linear forward and backward against products of rounded inputs") {
  if (skip_without_bf16()) return;
  const int64_t R = 150, IN = 40, OUT = 24;
  Tensor x = param({R, IN}, 1), w = param({IN, OUT}, 2), b = param({OUT}, 3);
  const Tensor dy = param({R, OUT}, 4).detach();
  Tensor y;
  {
    const Bf16Products on;
    y = ops::linear(x, w, b);
  }
  const auto xv = x.to_vector<float>(), wv = w.to_vector<float>(), bv = b.to_vector<float>(), gv = dy.to_vector<float>();
  std::vector<float> expect = product(xv, wv, R, IN, OUT, true);
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < OUT; ++j) expect[size_t(i * OUT + j)] += bv[size_t(j)];
  check_close(y, expect, 1e-4f, 1e-4f);
  y.backward(dy);
  check_close(x.grad(), product(gv, transposed(wv, IN, OUT), R, OUT, IN, true), 1e-4f, 1e-4f);
  check_close(w.grad(), product(xv, gv, IN, R, OUT, true, true), 1e-4f, 1e-4f);
}

TEST_CASE("bf16 products: Fp32Products keeps an op in float32, and matmul rounds like linear") {
  if (skip_without_bf16()) return;
  const Tensor a = param({2, 30, 20}, 5).detach(), b = param({20, 9}, 6).detach();
  const auto av = a.to_vector<float>(), bv = b.to_vector<float>();
  const Bf16Products on;
  check_close(ops::matmul(a, b), product(av, bv, 60, 20, 9, true), 1e-4f, 1e-4f);
  const ops::Fp32Products fp32;
  CHECK(!ops::matmul_bf16());
  check_close(ops::matmul(a, b), product(av, bv, 60, 20, 9, false), 1e-5f, 1e-5f);
}

// The fused expert MLP: near the FP32 result (rounding moves it by about 1%) but not equal to it,
// and its backward, run after the precision is switched off, equal bit for bit to one run on.
TEST_CASE("bf16 products: the expert MLP rounds, and its backward keeps its forward's precision") {
  if (skip_without_bf16()) return;
  const int64_t E = 3, M = 300, d = 16, H = 24, O = 12;
  const Tensor rows = Tensor::from_i64({300, 41, 0}, {E});
  Tensor x = param({E, M, d}, 11), w1 = param({E, d, H}, 12, 0.3f), b1 = param({E, H}, 13);
  Tensor w2 = param({E, H, O}, 14, 0.3f), b2 = param({E, O}, 15);
  const Tensor dy = param({E, M, O}, 16).detach();
  const auto fp32 = ops::expert_mlp(x, w1, b1, w2, b2, rows).to_vector<float>();
  std::vector<std::vector<float>> grads[2];
  for (int switch_off : {0, 1}) {
    for (Tensor* t : {&x, &w1, &w2}) t->zero_grad();
    Tensor y;
    {
      const Bf16Products on;
      y = ops::expert_mlp(x, w1, b1, w2, b2, rows);
      if (!switch_off) y.backward(dy);
    }
    if (switch_off) y.backward(dy);
    check_rounded(y.to_vector<float>(), fp32);
    grads[switch_off] = {x.grad().to_vector<float>(), w1.grad().to_vector<float>(), w2.grad().to_vector<float>()};
  }
  CHECK(grads[0] == grads[1]);
}

// V-MoE keeps the router in float32: under bf16 products the router's probabilities are bit for
// bit those of FP32, while the layer's output is not.
TEST_CASE("bf16 products: the MoE layer routes in float32") {
  if (skip_without_bf16()) return;
  Generator g(21);
  models::MoEConfig c;
  c.mlp_dim = 32;
  c.router.experts = 4;
  c.router.k = 2;
  models::MoELayer moe(24, c, g, &g);
  moe.train(false);
  const Tensor x = param({4, 17, 24}, 22).detach();
  const auto probs = moe.router_probs(x).to_vector<float>();
  const auto out = moe.forward(x).to_vector<float>();
  const auto last_probs = moe.last.probs.to_vector<float>();
  const Bf16Products on;
  CHECK(moe.router_probs(x).to_vector<float>() == probs);
  CHECK(moe.forward(x).to_vector<float>() != out);
  CHECK(moe.last.probs.to_vector<float>() == last_probs);
}

// Fused attention: its four products round, softmax stays FP32, so the output is near the FP32
// one but not equal to it; the backward, which reads P kept in bfloat16 pairs of rows (an odd T
// pairs its last row with zeros), is near the FP32 gradient and keeps its forward's precision.
TEST_CASE("bf16 products: fused attention rounds, and its backward keeps its forward's precision") {
  if (skip_without_bf16()) return;
  for (int64_t T : {50, 7}) {
    CAPTURE(T);
    Tensor qkv = param({2, T, 48}, 31);
    const Tensor dout = param({2, T, 16}, 32).detach();
    const Tensor y32 = ops::self_attention(qkv, 2);
    y32.backward(dout);
    const auto fp32 = y32.to_vector<float>(), grad32 = qkv.grad().to_vector<float>();
    std::vector<float> grads[2];
    for (int switch_off : {0, 1}) {
      qkv.zero_grad();
      Tensor y;
      {
        const Bf16Products on;
        y = ops::self_attention(qkv, 2);
        if (!switch_off) y.backward(dout);
      }
      if (switch_off) y.backward(dout);
      check_rounded(y.to_vector<float>(), fp32);
      grads[switch_off] = qkv.grad().to_vector<float>();
      check_rounded(grads[switch_off], grad32);
    }
    CHECK(grads[0] == grads[1]);
  }
}
