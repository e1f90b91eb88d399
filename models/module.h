// Module: a named tree of parameters. Each module registers its own parameters and children;
// named_parameters() walks the tree and joins names with dots ("blocks.3.attn.qkv.weight"), the
// names checkpoints use.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/tensor.h"

namespace mv::models {

class Module {
 public:
  virtual ~Module() = default;

  std::vector<std::pair<std::string, Tensor>> named_parameters() const;
  std::vector<Tensor> parameters() const;
  int64_t num_parameters() const;

  void train(bool on = true);  // this module and every child
  // Moves every parameter to `device` in place: the storage inside each parameter's TensorImpl is
  // swapped, so every handle to it (optimizers, callers) stays valid. Gradients are dropped.
  void to(Device device);
  Device device() const;  // where the first parameter lives (CPU for a module without any)
  bool training() const { return training_; }

 protected:
  // Registers t (made a leaf that requires grad) under `name`; returns the stored handle.
  Tensor register_parameter(const std::string& name, Tensor t);
  // Puts t in the place of the registered parameter `name` (before an optimizer holds it);
  // returns the stored handle.
  Tensor replace_parameter(const std::string& name, Tensor t);
  template <class M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> m) {
    children_.emplace_back(name, m);
    return m;
  }

 private:
  void collect(const std::string& prefix, std::vector<std::pair<std::string, Tensor>>& out) const;

  std::vector<std::pair<std::string, Tensor>> params_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  bool training_ = true;
};

}  // namespace mv::models
