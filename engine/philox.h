// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11):
// a counter-based generator. Draw i of a call reads block (offset + i / lanes) and is a pure
// function of (seed, counter), so a CPU loop and a CUDA thread per element draw the same numbers.
// This header compiles under both g++ and nvcc.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "engine/host_device.h"

namespace mv::philox {

struct U4 {
  uint32_t x, y, z, w;
};

MV_HD U4 philox4x32_10(U4 ctr, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * ctr.x;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * ctr.z;
    ctr = U4{uint32_t(p1 >> 32) ^ ctr.y ^ k0, uint32_t(p1), uint32_t(p0 >> 32) ^ ctr.w ^ k1,
             uint32_t(p0)};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return ctr;
}

// The 4 random words of block `counter` under `seed`.
MV_HD U4 block(uint64_t seed, uint64_t counter) {
  return philox4x32_10(U4{uint32_t(counter), uint32_t(counter >> 32), 0u, 0u}, uint32_t(seed),
                       uint32_t(seed >> 32));
}

// A word to a float in [0, 1): the top 24 bits, so every value is exact in float32.
MV_HD float to_unit(uint32_t w) { return float(w >> 8) * (1.0f / 16777216.0f); }

// Uniform draw i of a call that starts at block `offset`: 4 draws per block.
MV_HD float uniform(uint64_t seed, uint64_t offset, uint64_t i) {
  U4 b = block(seed, offset + i / 4);
  uint32_t lane = uint32_t(i % 4);
  return to_unit(lane == 0 ? b.x : lane == 1 ? b.y : lane == 2 ? b.z : b.w);
}

// Box-Muller's log and sine / cosine as plain float arithmetic (no libm calls), so that a CPU
// loop over many draws vectorises and the GPU runs the very same steps. Both are within a few
// ulp of libm; tests/test_tensor.cpp checks them against double precision.

// ln u for a normal float u > 0: u = 2^e m with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(f),
// f = (m - 1) / (m + 1), |f| <= 0.172, by the odd series of atanh up to f^9 (the next term is
// below 3e-9 relative).
MV_HD float log_positive(float u) {
  uint32_t bits;
  memcpy(&bits, &u, 4);
  int32_t e = int32_t(bits >> 23) - 127;
  bits = (bits & 0x007FFFFFu) | 0x3F800000u;  // m in [1, 2)
  float m;
  memcpy(&m, &bits, 4);
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  e = high ? e + 1 : e;
  const float f = (m - 1.f) / (m + 1.f), f2 = f * f;
  float p = 1.f / 9.f;
  p = p * f2 + 1.f / 7.f;
  p = p * f2 + 1.f / 5.f;
  p = p * f2 + 1.f / 3.f;
  p = p * f2 + 1.f;
  return float(e) * 0.693147181f + 2.f * f * p;
}

// sin(2 pi u) and cos(2 pi u) for u in [0, 1) on the 2^-24 grid of to_unit: u minus its nearest
// quarter turn q / 4 is exact and leaves an angle a in [-pi/4, pi/4], where Taylor series to a^9
// (sine) and a^8 (cosine) are within 5e-9; the quarter turns then swap and negate the pair.
MV_HD void sincos_turns(float u, float& s, float& c) {
  const float q = floorf(4.f * u + 0.5f);
  const float a = 6.28318531f * (u - 0.25f * q), a2 = a * a;
  float ps = 1.f / 362880.f;
  ps = ps * a2 - 1.f / 5040.f;
  ps = ps * a2 + 1.f / 120.f;
  ps = ps * a2 - 1.f / 6.f;
  ps = ps * a2 + 1.f;
  float pc = 1.f / 40320.f;
  pc = pc * a2 - 1.f / 720.f;
  pc = pc * a2 + 1.f / 24.f;
  pc = pc * a2 - 0.5f;
  pc = pc * a2 + 1.f;
  const float sa = a * ps;
  const int quarter = int(q) & 3;
  s = quarter == 0 ? sa : quarter == 1 ? pc : quarter == 2 ? -sa : -pc;
  c = quarter == 0 ? pc : quarter == 1 ? -sa : quarter == 2 ? -pc : sa;
}

// The pair of standard normal draws of one block: Box-Muller on its first two words,
// r = sqrt(-2 ln u1), u1 in (0, 1] (so the log is finite), angle 2 pi u2.
MV_HD void normal_pair(U4 b, float& cos_draw, float& sin_draw) {
  const float u1 = (float(b.x >> 8) + 1.0f) * (1.0f / 16777216.0f);
  const float r = sqrtf(-2.0f * log_positive(u1));
  float s, c;
  sincos_turns(to_unit(b.y), s, c);
  cos_draw = r * c;
  sin_draw = r * s;
}

// Standard normal draw i: the pair of block offset + i / 2; even i takes the cosine draw, odd i
// the sine draw.
MV_HD float normal(uint64_t seed, uint64_t offset, uint64_t i) {
  float c, s;
  normal_pair(block(seed, offset + i / 2), c, s);
  return (i % 2 == 0) ? c : s;
}

}  // namespace mv::philox
