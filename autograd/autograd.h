// Reverse-mode autograd. Every op that runs in grad mode on an input that requires a gradient
// attaches a Node to its output: the node keeps the op's inputs and a closure that maps the
// output's gradient to the inputs' gradients. Tensor::backward() orders the nodes topologically
// and runs the closures from the output back to the leaves, accumulating where paths meet.
//
// Rule for op writers: a closure captures what backward needs as detached tensors
// (x.detach()) or plain values, never the op's output itself: the output owns the node, so
// capturing it would make a reference cycle.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "engine/tensor.h"

namespace mv::autograd {

// grad_output -> one gradient per input (undefined where the input needs none). Each gradient
// must have its input's shape.
using BackwardFn = std::function<std::vector<Tensor>(const Tensor& grad_output)>;

struct Node {
  const char* name;
  std::vector<Tensor> inputs;
  BackwardFn backward;
};

bool grad_enabled();

// Turns graph building off in a scope (evaluation, optimizer updates).
class NoGrad {
 public:
  NoGrad();
  ~NoGrad();
  NoGrad(const NoGrad&) = delete;
  NoGrad& operator=(const NoGrad&) = delete;

 private:
  bool prev_;
};

// True when grad mode is on and one of the inputs requires a gradient: the op must record.
bool needs_graph(const std::vector<Tensor>& inputs);

// Makes `out` the result of op `name` on `inputs`, if needs_graph(inputs). Returns `out`.
Tensor record(const char* name, Tensor out, std::vector<Tensor> inputs, BackwardFn backward);

// out.backward(grad_output), calling leaf_done(leaf) as soon as a leaf's gradient is final (no
// node still to run feeds it), while the rest of the backward is still to come: data-parallel
// training starts reducing those gradients early (dist/grad_sync.h). A leaf is reported once.
using LeafDone = std::function<void(const Tensor& leaf)>;
void backward(const Tensor& out, const Tensor& grad_output, const LeafDone& leaf_done);

}  // namespace mv::autograd
