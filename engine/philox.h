// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11):
// a counter-based generator. Draw i of a call reads block (offset + i / lanes) and is a pure
// function of (seed, counter), so a CPU loop and a CUDA thread per element draw the same numbers.
// This header compiles under both g++ and nvcc.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MV_HD __host__ __device__ __forceinline__
#else
#define MV_HD inline
#endif

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

// Standard normal draw i: Box-Muller on the first two words of block offset + i / 2; even i
// takes the cosine branch, odd i the sine branch.
MV_HD float normal(uint64_t seed, uint64_t offset, uint64_t i) {
  U4 b = block(seed, offset + i / 2);
  float u1 = (float(b.x >> 8) + 1.0f) * (1.0f / 16777216.0f);  // (0, 1]: log is finite
  float u2 = to_unit(b.y);
  float r = sqrtf(-2.0f * logf(u1));
  float t = 6.2831853071795864f * u2;
  return (i % 2 == 0) ? r * cosf(t) : r * sinf(t);
}

}  // namespace mv::philox
