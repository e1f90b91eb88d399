#include "autograd/autograd.h"

#include <unordered_map>
#include <unordered_set>

#include "engine/parallel.h"

namespace mv::autograd {

static thread_local bool g_grad_enabled = true;

bool grad_enabled() { return g_grad_enabled; }
NoGrad::NoGrad() : prev_(g_grad_enabled) { g_grad_enabled = false; }
NoGrad::~NoGrad() { g_grad_enabled = prev_; }

bool needs_graph(const std::vector<Tensor>& inputs) {
  if (!g_grad_enabled) return false;
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

Tensor record(const char* name, Tensor out, std::vector<Tensor> inputs, BackwardFn backward) {
  if (!needs_graph(inputs)) return out;
  auto node = std::make_shared<Node>(Node{name, std::move(inputs), std::move(backward)});
  out.impl().grad_fn = std::move(node);
  out.impl().requires_grad = true;
  return out;
}

// Nodes reachable from `root`, each after every node that consumes its output.
static std::vector<Node*> topological_order(Node* root) {
  std::vector<Node*> order;
  std::unordered_set<Node*> seen{root};
  std::vector<std::pair<Node*, size_t>> stack{{root, 0}};  // node, next input to visit
  while (!stack.empty()) {
    auto& [node, next] = stack.back();
    if (next < node->inputs.size()) {
      const Tensor& in = node->inputs[next++];
      Node* child = in.defined() ? in.grad_fn().get() : nullptr;
      if (child && seen.insert(child).second) stack.push_back({child, 0});
    } else {
      order.push_back(node);
      stack.pop_back();
    }
  }
  return {order.rbegin(), order.rend()};
}

// slot += g. In place when the slot's tensor is the only handle on its memory (no other slot,
// saved tensor or caller holds it): one pass and no new tensor. Otherwise a new sum, so that a
// gradient shared with anything else is never written. Either way the same floats (s + g).
static void accumulate(std::shared_ptr<TensorImpl>& slot, const Tensor& g) {
  if (!slot) {
    slot = g.impl_ptr();
    return;
  }
  const TensorImpl& s = *slot;
  const bool own = slot.use_count() == 1 && s.storage.use_count() == 1;
  const bool cpu_f32 = s.storage->device() == Device::CPU && s.dtype == DType::F32 && g.device() == Device::CPU &&
                       g.dtype() == DType::F32;
  Tensor acc(slot);
  if (!own || !cpu_f32 || !acc.is_contiguous() || acc.shape() != g.shape()) {
    slot = add_same_shape(acc, g).impl_ptr();
    return;
  }
  const Tensor gc = g.contiguous();
  float* d = acc.data<float>();
  const float* a = gc.data<float>();
  parallel_for(acc.numel(), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) d[i] += a[i];
  });
}

void backward(const Tensor& out, const Tensor& grad_output, const LeafDone& leaf_done) {
  MV_CHECK(out.requires_grad(), "backward: ", out.str(), " does not require grad (no input of the "
           "ops that made it requires grad, or it was made under NoGrad)");
  Tensor g = grad_output;
  if (!g.defined()) {
    MV_CHECK(out.numel() == 1, "backward: an implicit gradient needs a one-element output, got ",
             out.str(), "; pass grad_output");
    g = Tensor::ones(out.shape(), DType::F32, out.device());
  }
  MV_CHECK(g.shape() == out.shape(), "backward: grad_output ", g.str(), " does not match output ",
           out.str());
  NoGrad no_grad;  // backward closures build no graph of their own
  if (!out.grad_fn()) {
    accumulate(out.impl().grad, g);
    if (leaf_done) leaf_done(out);
    return;
  }
  const std::vector<Node*> order = topological_order(out.grad_fn().get());
  // With a hook: the position of the last node that feeds each leaf.
  std::unordered_map<const TensorImpl*, size_t> last_use;
  if (leaf_done)
    for (size_t k = 0; k < order.size(); ++k)
      for (const Tensor& in : order[k]->inputs)
        if (in.defined() && in.requires_grad() && !in.grad_fn()) last_use[&in.impl()] = k;
  std::unordered_map<Node*, std::shared_ptr<TensorImpl>> pending{{out.grad_fn().get(), g.impl_ptr()}};
  for (size_t k = 0; k < order.size(); ++k) {
    Node* node = order[k];
    auto it = pending.find(node);
    if (it != pending.end()) {
      Tensor gy(std::move(it->second));
      pending.erase(it);
      std::vector<Tensor> grads = node->backward(gy);
      MV_CHECK(grads.size() == node->inputs.size(), "backward of ", node->name, ": returned ",
               grads.size(), " gradients for ", node->inputs.size(), " inputs");
      for (size_t i = 0; i < grads.size(); ++i) {
        const Tensor& in = node->inputs[i];
        if (!grads[i].defined() || !in.defined() || !in.requires_grad()) continue;
        MV_CHECK(grads[i].shape() == in.shape(), "backward of ", node->name, ": gradient ",
                 grads[i].str(), " for input ", i, " does not match the input ", in.str());
        if (in.grad_fn())
          accumulate(pending[in.grad_fn().get()], grads[i]);
        else
          accumulate(in.impl().grad, grads[i]);
      }
    }
    if (!leaf_done) continue;
    for (const Tensor& in : node->inputs) {
      if (!in.defined() || in.grad_fn()) continue;
      auto u = last_use.find(&in.impl());
      if (u != last_use.end() && u->second == k) {
        last_use.erase(u);  // an input listed twice is reported once
        leaf_done(in);
      }
    }
  }
}

}  // namespace mv::autograd

namespace mv {

void Tensor::backward(const Tensor& grad_output) const { autograd::backward(*this, grad_output, {}); }

}  // namespace mv
