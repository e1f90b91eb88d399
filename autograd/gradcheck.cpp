#include "autograd/gradcheck.h"

#include <cmath>
#include <sstream>

#include "autograd/autograd.h"
#include "engine/random.h"

namespace mv::autograd {

static double weighted_sum(const Tensor& y, const std::vector<float>& r) {
  std::vector<float> v = y.to_vector<float>();
  double s = 0;
  for (size_t i = 0; i < v.size(); ++i) s += double(v[i]) * r[i];
  return s;
}

GradcheckResult gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& f,
                          const std::vector<Tensor>& inputs, const GradcheckOptions& opt) {
  GradcheckResult res;
  std::vector<Tensor> xs;
  for (const Tensor& t : inputs) {
    Tensor c = t.clone();  // private copies, so perturbing never touches the caller's tensors
    if (t.requires_grad()) c.set_requires_grad(true);
    xs.push_back(c);
  }
  Tensor y = f(xs);
  if (!y.requires_grad()) return {false, "output does not require grad: the op recorded no graph", 0};
  Generator g(opt.seed);
  Tensor r = randn(y.shape(), g);
  std::vector<float> rv = r.to_vector<float>();
  y.backward(r);

  double worst = -1;
  for (size_t k = 0; k < xs.size(); ++k) {
    if (!xs[k].requires_grad()) continue;
    Tensor x = xs[k];
    MV_CHECK(x.dtype() == DType::F32 && x.device() == Device::CPU,
             "gradcheck: input ", k, " must be a CPU F32 tensor, got ", x.str());
    if (!x.grad().defined()) {
      // An input that does not reach the output legitimately has no gradient; that is only
      // correct if the numerical gradient is zero too, which the loop below checks.
      x.set_grad(Tensor::zeros(x.shape()));
    }
    std::vector<float> analytic = x.grad().to_vector<float>();
    float* p = x.data<float>();
    NoGrad no_grad;
    for (int64_t i = 0; i < x.numel(); ++i) {
      const float orig = p[i];
      p[i] = orig + opt.eps;
      double lp = weighted_sum(f(xs), rv);
      p[i] = orig - opt.eps;
      double lm = weighted_sum(f(xs), rv);
      p[i] = orig;
      double numeric = (lp - lm) / (2.0 * double(opt.eps));
      double a = analytic[size_t(i)];
      double err = std::fabs(a - numeric);
      double tol = opt.atol + opt.rtol * std::max(std::fabs(a), std::fabs(numeric));
      res.max_abs_error = std::max(res.max_abs_error, err);
      if (!std::isfinite(a) || err > tol) {
        if (err - tol > worst || !std::isfinite(a)) {
          worst = std::isfinite(a) ? err - tol : 1e300;
          std::ostringstream os;
          os << "input " << k << " " << x.str() << " element " << i << ": backward gives " << a
             << ", finite differences give " << numeric << " (|diff| " << err << " > tol " << tol
             << ")";
          res.report = os.str();
        }
        res.ok = false;
      }
    }
  }
  return res;
}

}  // namespace mv::autograd
