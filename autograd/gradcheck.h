// gradcheck: compares an op's hand-written backward with central finite differences.
//
// The scalar checked is L = sum(f(x) * r) for a fixed random r, so every output element counts.
// Math runs in float32, so differences use a step `eps` large enough that rounding stays small
// (|L| * 1e-7 / eps) while the truncation error (eps^2 * f''') stays below the tolerance; L is
// summed in double. A wrong factor, sign or index in a backward changes gradients by O(1) and
// fails these tolerances; tests/test_autograd.cpp checks that gradcheck does catch such bugs.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "engine/tensor.h"

namespace mv::autograd {

struct GradcheckOptions {
  float eps = 1e-2f;
  double atol = 5e-3;
  double rtol = 1e-2;
  uint64_t seed = 1234;
};

struct GradcheckResult {
  bool ok = true;
  std::string report;  // the worst element, or the first structural problem
  double max_abs_error = 0;
};

// Checks d sum(f(inputs) * r) / d input for every F32 CPU input that requires grad.
GradcheckResult gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& f,
                          const std::vector<Tensor>& inputs, const GradcheckOptions& opt = {});

}  // namespace mv::autograd
