// Shared checks for the test suites.
#pragma once
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "autograd/gradcheck.h"
#include "engine/random.h"
#include "engine/safetensors.h"
#include "engine/tensor.h"

namespace mv::test {

// x rounded to the nearest bfloat16 (ties to an even last bit), by picking the nearer of the two
// bfloat16s around it: written apart from the library's bit trick (ops/tile_gemm.cpp) to check it.
inline float round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
  float fl, fh;
  std::memcpy(&fl, &lo, 4);
  std::memcpy(&fh, &hi, 4);
  const double dl = std::fabs(double(x) - fl), dh = std::fabs(double(fh) - x);
  if (dl != dh) return dl < dh ? fl : fh;
  return (lo >> 16) % 2 == 0 ? fl : fh;
}

// Every element of `t` within atol + rtol*|expected| of `expected`.
inline void check_close(const Tensor& t, const std::vector<float>& expected, float atol = 1e-5f,
                        float rtol = 1e-5f) {
  std::vector<float> v = t.to_vector<float>();
  REQUIRE(v.size() == expected.size());
  for (size_t i = 0; i < v.size(); ++i) {
    INFO("element " << i << ": got " << v[i] << ", expected " << expected[i]);
    CHECK(std::fabs(v[i] - expected[i]) <= atol + rtol * std::fabs(expected[i]));
  }
}

// gradcheck with the report in the failure message.
inline void check_grad(const std::function<Tensor(const std::vector<Tensor>&)>& f,
                       const std::vector<Tensor>& inputs, const autograd::GradcheckOptions& opt = {}) {
  autograd::GradcheckResult r = autograd::gradcheck(f, inputs, opt);
  INFO(r.report);
  CHECK(r.ok);
}

// A random F32 tensor that requires grad, drawn from N(0, scale^2) with a fixed seed.
inline Tensor param(const Shape& shape, uint64_t seed, float scale = 1.0f) {
  Generator g(seed);
  Tensor t = randn(shape, g);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] *= scale;
  return t.set_requires_grad(true);
}

// The checkpoints of two runs hold the same tensors, bit for bit.
inline void check_same_checkpoint(const std::string& run_a, const std::string& run_b) {
  TensorMap ta = load_safetensors(run_a + "/checkpoint.safetensors");
  TensorMap tb = load_safetensors(run_b + "/checkpoint.safetensors");
  REQUIRE(ta.size() == tb.size());
  for (auto& [n, t] : ta) {
    INFO(n);
    CHECK(t.to_vector<float>() == tb.at(n).to_vector<float>());
  }
}

}  // namespace mv::test
