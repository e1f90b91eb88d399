// Optimizer updates as ops: in place, no autograd, on the parameters' device. models/optim.h
// builds AdamW and SGD on them; their CUDA twins are in cuda/optim.cu.
#pragma once
#include <vector>

#include "engine/tensor.h"

namespace mv::ops {

// AdamW, as torch.optim.AdamW: every parameter p with its gradient g (read times grad_scale, the
// clip scale), moments m and v, and weight decay wd, one list entry each:
//   p -= lr wd p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   p -= lr (m / (1 - b1^step)) / (sqrt(v / (1 - b2^step)) + eps).
// step: 1 for the first update. All lists of one length, each entry's tensors of one shape.
void adamw_step(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, const std::vector<Tensor>& m,
                const std::vector<Tensor>& v, float lr, float beta1, float beta2, float eps,
                const std::vector<float>& weight_decays, int64_t step, float grad_scale);

// SGD with momentum and coupled weight decay, as torch.optim.SGD, on one tensor:
//   g = grad * grad_scale + wd p;  buf = momentum buf + g;  p -= lr buf.
void sgd_step(const Tensor& p, const Tensor& grad, const Tensor& buf, float lr, float momentum, float wd,
              float grad_scale);

// The sum of the squares of every element of every tensor (all on one device), in double where the
// device allows: the square of the global gradient norm.
double sum_of_squares(const std::vector<Tensor>& xs);

}  // namespace mv::ops
