// exp, tanh, the normal CDF and row sums written so that loops over them vectorise (libm's scalar
// calls and a single running sum do not), for the hot elementwise and row ops. Accuracy: a few ulp
// of exp on [-87, 88]; tanh within 2e-7 absolute; the normal CDF within 5e-7 relative. The
// scalar functions compile for the GPU too (MV_HD), where the CUDA twins of the ops call them.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "engine/host_device.h"

namespace mv::ops {

// e^x = 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial
// (truncation below 2e-8 relative on that interval); 2^n is built in the exponent bits.
MV_HD float fast_exp(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  // Round to nearest by adding and removing 1.5 * 2^23 (keeps the loop free of libm calls).
  const float n = (x * 1.44269504f + 12582912.f) - 12582912.f;
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln 2 split in two for precision
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// The standard normal CDF Phi and density phi beyond |v| = 12.9: there Phi(-|v|) falls below
// float's smallest normal number, so Phi is flat in float (exactly 0 or 1) and phi is 0 with it.
inline constexpr float kNormalFlat = 12.9f;

// phi(v) = e^(-v^2/2) / sqrt(2 pi)
MV_HD float fast_normal_pdf(float v) {
  return std::fabs(v) > kNormalFlat ? 0.f : 0.3989422804014327f * fast_exp(-0.5f * v * v);
}

// Phi(v). The lower tail w = -v >= 0 as Phi(-w) = e^(-w^2/2) t q(t), t = 3 / (3 + w): the Mills
// ratio Phi(-w) e^(w^2/2) falls like 1/w, which t takes up, so q is smooth on t in (0, 1] and a
// degree-8 polynomial fits it to 2e-7 relative for w in [0, 13] (a Chebyshev fit weighted for
// relative error, converted to powers of t). The upper half is 1 - Phi(-v). e^(-w^2/2) is a
// product of two exps, w^2 split so that the large part is exact (s keeps 12 significant bits):
// the far tail keeps its relative accuracy (erfc does the same job in libm, but does not
// vectorise).
MV_HD float fast_normal_cdf(float v) {
  const float w = std::fabs(v), t = 3.f / (3.f + w);
  float q = -2.297313511e-02f;
  q = q * t + 1.308127493e-01f;
  q = q * t - 2.741802931e-01f;
  q = q * t + 2.226741910e-01f;
  q = q * t - 5.618305504e-02f;
  q = q * t + 1.212003008e-01f;
  q = q * t + 1.120721325e-01f;
  q = q * t + 1.336252838e-01f;
  q = q * t + 1.329518855e-01f;
  uint32_t bits;
  std::memcpy(&bits, &w, 4);
  bits &= 0xFFFFF000u;
  float s;
  std::memcpy(&s, &bits, 4);
  const float lower = w > kNormalFlat ? 0.f : fast_exp(-0.5f * s * s) * fast_exp(-0.5f * (w - s) * (w + s)) * t * q;
  return v > 0.f ? 1.f - lower : lower;
}

// sum of f(j) for j in [0, n), in 8 interleaved float partial sums. One running sum fixes the
// order of the adds, so without -ffast-math the compiler cannot vectorise it and every add waits
// for the one before; 8 independent lanes fill one AVX register. Rounding error grows like
// n/8 ulps, not n (rows here are short: D <= a few thousand).
template <class F>
inline float lane_sum(int64_t n, F f) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += f(j + l);
  float s = 0.f;
  for (; j < n; ++j) s += f(j);
  return s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// tanh(u) = 1 - 2 / (e^(2u) + 1): saturates cleanly to +-1 at both ends.
MV_HD float fast_tanh(float u) { return 1.f - 2.f / (fast_exp(2.f * u) + 1.f); }

// GELU, tanh form: y = x/2 (1 + t), t = tanh(c (x + k x^3)), c = sqrt(2/pi), k = 0.044715;
//   y' = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 k x^2).
// One definition for ops::gelu and the fused expert MLP (ops/moe.cpp), so both give the same bits.
inline constexpr float kGeluC = 0.7978845608028654f, kGeluK = 0.044715f;
MV_HD float gelu_tanh(float v) { return 0.5f * v * (1.f + fast_tanh(kGeluC * (v + kGeluK * v * v * v))); }
MV_HD float gelu_tanh_grad(float v) {
  const float t = fast_tanh(kGeluC * (v + kGeluK * v * v * v));
  return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * kGeluC * (1.f + 3.f * kGeluK * v * v);
}
// Both from one tanh.
MV_HD void gelu_tanh_both(float v, float& y, float& dy) {
  const float t = fast_tanh(kGeluC * (v + kGeluK * v * v * v));
  y = 0.5f * v * (1.f + t);
  dy = 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * kGeluC * (1.f + 3.f * kGeluK * v * v);
}

}  // namespace mv::ops
