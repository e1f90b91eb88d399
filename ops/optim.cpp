// Optimizer updates; their CUDA twins are in cuda/optim.cu. On the CPU each tensor is one flat
// loop over threads.
#include "ops/optim.h"

#include <algorithm>
#include <cmath>

#include "engine/parallel.h"
#include "ops/dispatch.h"
#include "ops/fast_math.h"

namespace mv::cpu {

// The update of ops/optim.h, tensor by tensor.
void adamw_step(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, const std::vector<Tensor>& m,
                const std::vector<Tensor>& v, float lr, float b1_, float b2_, float eps_,
                const std::vector<float>& weight_decays, int64_t step, float gs) {
  const float c1 = 1.f - std::pow(b1_, float(step)), c2 = 1.f - std::pow(b2_, float(step));
  // Locals copied into the loop's closure, not references: a store through the float pointers
  // could otherwise alias them, and the compiler would reload them after every store instead of
  // vectorising the loop.
  const float b1 = b1_, b2 = b2_, eps = eps_;
  for (size_t k = 0; k < params.size(); ++k) {
    const Tensor g = grads[k].contiguous();
    const float decay = lr * weight_decays[k];
    float *pp = params[k].data<float>(), *pm = m[k].data<float>(), *pv = v[k].data<float>();
    const float* pg = g.data<float>();
    parallel_for(params[k].numel(), 8, [=](int64_t s, int64_t e) {  // by value: see above
      for (int64_t i = s; i < e; ++i) {
        const float gi = pg[i] * gs;
        pm[i] = b1 * pm[i] + (1.f - b1) * gi;
        pv[i] = b2 * pv[i] + (1.f - b2) * gi * gi;
        pp[i] -= decay * pp[i] + lr * (pm[i] / c1) / (std::sqrt(pv[i] / c2) + eps);
      }
    });
  }
}

void sgd_step(const Tensor& p, const Tensor& grad, const Tensor& buf, float lr, float momentum, float wd, float gs) {
  const Tensor g = grad.contiguous();
  float *pp = p.data<float>(), *pb = buf.data<float>();
  const float* pg = g.data<float>();
  for (int64_t i = 0, n = p.numel(); i < n; ++i) {
    pb[i] = momentum * pb[i] + pg[i] * gs + wd * pp[i];
    pp[i] -= lr * pb[i];
  }
}

// Float lanes over blocks of 4096 (vectorised), the blocks summed in double.
double sum_of_squares(const std::vector<Tensor>& xs) {
  double sq = 0;
  for (const Tensor& x : xs) {
    const Tensor c = x.contiguous();
    const float* p = c.data<float>();
    for (int64_t b = 0; b < c.numel(); b += 4096)
      sq += ops::lane_sum(std::min<int64_t>(4096, c.numel() - b), [&](int64_t i) { return p[b + i] * p[b + i]; });
  }
  return sq;
}

}  // namespace mv::cpu

namespace mv::ops {

namespace {

// The one device of a list of tensors (the CPU for an empty list), each checked F32.
OpDevice device_of_all(const char* op, std::initializer_list<const std::vector<Tensor>*> lists) {
  OpDevice dev{op, Device::CPU};
  const Tensor* first = nullptr;
  for (const std::vector<Tensor>* list : lists)
    for (const Tensor& t : *list) {
      expect_f32(op, {&t});
      if (!first) first = &t;
      dev = device_of(op, {first, &t});
    }
  return dev;
}

}  // namespace

void adamw_step(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, const std::vector<Tensor>& m,
                const std::vector<Tensor>& v, float lr, float beta1, float beta2, float eps,
                const std::vector<float>& weight_decays, int64_t step, float grad_scale) {
  const size_t n = params.size();
  MV_CHECK(grads.size() == n && m.size() == n && v.size() == n && weight_decays.size() == n,
           "adamw_step: list lengths differ: ", n, " params, ", grads.size(), " grads, ", m.size(), " m, ", v.size(),
           " v, ", weight_decays.size(), " weight decays");
  const OpDevice dev = device_of_all("adamw_step", {&params, &grads, &m, &v});
  for (size_t k = 0; k < n; ++k)
    MV_CHECK(grads[k].shape() == params[k].shape() && m[k].shape() == params[k].shape() &&
                 v[k].shape() == params[k].shape() && params[k].is_contiguous() && m[k].is_contiguous() &&
                 v[k].is_contiguous(),
             "adamw_step: tensor ", k, ": param ", params[k].str(), ", grad ", grads[k].str(), ", m ", m[k].str(),
             ", v ", v[k].str(), " must share one shape, the updated ones contiguous");
  MV_CHECK(step >= 1, "adamw_step: step must be >= 1, got ", step);
  MV_KERNEL(adamw_step)(dev, params, grads, m, v, lr, beta1, beta2, eps, weight_decays, step, grad_scale);
}

void sgd_step(const Tensor& p, const Tensor& grad, const Tensor& buf, float lr, float momentum, float wd,
              float grad_scale) {
  const OpDevice dev = device_of("sgd_step", {&p, &grad, &buf});
  expect_f32("sgd_step", {&p, &grad, &buf});
  MV_CHECK(grad.shape() == p.shape() && buf.shape() == p.shape() && p.is_contiguous() && buf.is_contiguous(),
           "sgd_step: p ", p.str(), ", grad ", grad.str(), ", buf ", buf.str(),
           " must share one shape, the updated ones contiguous");
  MV_KERNEL(sgd_step)(dev, p, grad, buf, lr, momentum, wd, grad_scale);
}

double sum_of_squares(const std::vector<Tensor>& xs) {
  return MV_KERNEL(sum_of_squares)(device_of_all("sum_of_squares", {&xs}), xs);
}

}  // namespace mv::ops
