#include "models/module.h"

namespace mv::models {

Tensor Module::register_parameter(const std::string& name, Tensor t) {
  for (const auto& [n, p] : params_)
    MV_CHECK(n != name, "Module: parameter '", name, "' registered twice");
  t.set_requires_grad(true);
  params_.emplace_back(name, t);
  return t;
}

Tensor Module::replace_parameter(const std::string& name, Tensor t) {
  for (auto& [n, p] : params_)
    if (n == name) {
      t.set_requires_grad(true);
      p = t;
      return t;
    }
  MV_FAIL("Module: no parameter '", name, "' to replace");
}

void Module::collect(const std::string& prefix,
                     std::vector<std::pair<std::string, Tensor>>& out) const {
  for (const auto& [n, p] : params_) out.emplace_back(prefix + n, p);
  for (const auto& [n, m] : children_) m->collect(prefix + n + ".", out);
}

std::vector<std::pair<std::string, Tensor>> Module::named_parameters() const {
  std::vector<std::pair<std::string, Tensor>> out;
  collect("", out);
  return out;
}

std::vector<Tensor> Module::parameters() const {
  std::vector<Tensor> out;
  for (auto& [n, p] : named_parameters()) out.push_back(p);
  return out;
}

int64_t Module::num_parameters() const {
  int64_t n = 0;
  for (auto& [name, p] : named_parameters()) n += p.numel();
  return n;
}

void Module::to(Device device) {
  for (auto& [name, p] : named_parameters()) {
    Tensor moved = p.detach().to(device).contiguous();
    TensorImpl& impl = p.impl();
    impl.storage = moved.impl().storage;
    impl.offset = moved.impl().offset;
    impl.strides = moved.impl().strides;
    impl.grad.reset();
  }
}

Device Module::device() const {
  const auto ps = named_parameters();
  return ps.empty() ? Device::CPU : ps.front().second.device();
}

void Module::train(bool on) {
  training_ = on;
  for (auto& [n, m] : children_) m->train(on);
}

}  // namespace mv::models
