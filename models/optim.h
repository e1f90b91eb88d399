// Optimizers and learning-rate schedules. Updates run in place under NoGrad.
//
// Gradients are read, never written: autograd may hand the same gradient tensor to several
// parameters (an add's two inputs), so clipping passes a scale into step() instead of
// rescaling gradients in place.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "engine/tensor.h"

namespace mv::models {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// Weight decay applies to matrices and expert weight stacks only: never to biases, norms, the
// position embedding or the CLS token.
bool decays(const std::string& name, const Tensor& p);

class Optimizer {
 public:
  explicit Optimizer(NamedTensors params) : params_(std::move(params)) {}
  virtual ~Optimizer() = default;
  // One update with learning rate lr; every gradient is multiplied by grad_scale first.
  virtual void step(float lr, float grad_scale = 1.0f) = 0;
  void zero_grad();
  // Buffers to checkpoint, named "<kind>.<param name>", plus the step count.
  virtual NamedTensors state() const = 0;
  int64_t steps() const { return steps_; }
  void set_steps(int64_t s) { steps_ = s; }

 protected:
  // The device every parameter lives on (CPU when there are none); throws naming two parameters
  // that differ. `who` names the optimizer in the message.
  Device params_device(const char* who) const;
  // Moves every buffer that is not on d there: the model moved after the optimizer was made,
  // and its (still zero or loaded) state follows it.
  static void follow(std::vector<Tensor>& buffers, Device d);

  NamedTensors params_;
  int64_t steps_ = 0;
};

class AdamW : public Optimizer {
 public:
  AdamW(NamedTensors params, float weight_decay, float beta1 = 0.9f, float beta2 = 0.999f,
        float eps = 1e-8f);
  void step(float lr, float grad_scale = 1.0f) override;
  NamedTensors state() const override;

 private:
  float wd_, b1_, b2_, eps_;
  std::vector<Tensor> m_, v_;
};

class SGD : public Optimizer {
 public:
  SGD(NamedTensors params, float momentum, float weight_decay);
  void step(float lr, float grad_scale = 1.0f) override;
  NamedTensors state() const override;

 private:
  float momentum_, wd_;
  std::vector<Tensor> buf_;
};

// Global L2 norm of all gradients, and the scale that brings it to at most max_norm (1 if it
// already is, or if max_norm <= 0).
struct ClipResult {
  float norm, scale;
};
ClipResult clip_scale(const std::vector<Tensor>& params, float max_norm);
// The same from the sum of the squares of the gradients (with experts split over ranks, the
// squares of every rank's experts are added first).
double gradient_squares(const std::vector<Tensor>& params);
ClipResult clip_scale_of_squares(double squares, float max_norm);

// Linear warmup from 0 to base over `warmup` steps, then cosine or linear decay to 0 at `total`.
enum class Schedule { Cosine, Linear };
float lr_at(int64_t step, int64_t total, int64_t warmup, float base, Schedule kind);

}  // namespace mv::models
