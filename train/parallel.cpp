#include "train/parallel.h"

#include <algorithm>

#include "autograd/autograd.h"
#include "dist/comm.h"
#include "dist/device_comm.h"
#include "ops/elementwise.h"

namespace mv::train {

Ranks world_ranks(int expert_parallel) {
  Ranks r;
  r.rank = dist::rank();
  r.size = dist::size();
  r.expert_parallel = expert_parallel;
  return r;
}

void check_ranks(const TrainConfig& cfg, const Ranks& r, const std::string& run) {
  MV_CHECK(r.expert_parallel == 1 || r.many(), "--expert-parallel ", r.expert_parallel, ": this "
           "process is not one of several ranks; start the run with mpirun -np N");
  MV_CHECK(r.size % r.expert_parallel == 0, "--expert-parallel ", r.expert_parallel, ": expert "
           "groups of that many ranks do not divide the ", r.size, " ranks mpirun started");
  if (!r.many()) return;
  MV_CHECK(cfg.device == "cpu" || dist::nccl_built(), "--device ", cfg.device, ": training "
           "GPUs over several ranks needs NCCL, which this build did not find (nccl.h, libnccl)");
  MV_CHECK(cfg.device == "cpu" || r.expert_parallel == 1 || r.expert_parallel == r.size,
           "--expert-parallel ", r.expert_parallel, " with --device cuda: on GPUs the experts split "
           "over all ", r.size, " ranks or none (NCCL's communicator is the world's)");
  MV_CHECK(cfg.batch % r.size == 0, "--batch ", cfg.batch, " does not split evenly over the ",
           r.size, " ranks; use a multiple of ", r.size);
  MV_CHECK(!cfg.prc || !cfg.prc_reference_diagonal, "--prc-reference-diagonal: that form's "
           "diagonal is taken per token position of the batch and is not summed over ranks; train "
           "it in one process, or use the paper form (the default) on ", r.size, " ranks");
  MV_CHECK(cfg.vit.moe_placement == "none" || !cfg.vit.moe.group_per_batch, "--group batch routes "
           "the whole batch as one group, which training over ", r.size, " ranks would cut into "
           "one group per rank; route per image");
  // Every rank must run the same steps: rank 0's flags are the run's.
  const std::string root = dist::broadcast(run);
  MV_CHECK(root == run, "rank ", r.rank, " was given other flags than rank 0 (every rank of "
           "mpirun must run the same command):\n  rank 0: ", root, "\n  rank ", r.rank, ": ", run);
}

namespace {

// The stacked expert weights of every MoE layer, by identity.
std::vector<const TensorImpl*> expert_weights(const models::ViT& model) {
  std::vector<const TensorImpl*> out;
  for (models::MoELayer* m : model.moe_layers())
    for (const Tensor* t : {&m->w1, &m->b1, &m->w2, &m->b2}) out.push_back(&t->impl());
  return out;
}

bool holds(const std::vector<const TensorImpl*>& set, const Tensor& t) {
  return std::find(set.begin(), set.end(), &t.impl()) != set.end();
}

}  // namespace

SplitParameters split_model(models::ViT& model, const Ranks& r) {
  model.route_noise->part = uint64_t(r.rank);
  model.route_noise->parts = uint64_t(r.size);
  SplitParameters split;
  if (!r.split_experts()) return split;
  dist::make_expert_groups(r.expert_parallel);
  for (models::MoELayer* m : model.moe_layers())
    m->split_experts(dist::rank(dist::Group::Experts), r.expert_parallel);
  // The names of the replaced parameters, found by their new handles.
  const std::vector<const TensorImpl*> experts = expert_weights(model);
  for (const auto& [name, p] : model.named_parameters())
    if (holds(experts, p)) split.names.push_back(name);
  return split;
}

namespace {

// The parameters every rank holds alike, and the experts this rank holds alone.
std::vector<Tensor> shared_parameters(const models::ViT& model, const Ranks& r, bool shared) {
  const std::vector<const TensorImpl*> experts =
      r.split_experts() ? expert_weights(model) : std::vector<const TensorImpl*>{};
  std::vector<Tensor> out;
  for (const Tensor& p : model.parameters())
    if (holds(experts, p) != shared) out.push_back(p);
  return out;
}

}  // namespace

Replicas::Replicas(models::ViT& model, const Ranks& r)
    : ranks_(r), shared_(shared_parameters(model, r, true)), own_(shared_parameters(model, r, false)),
      sync_(shared_), own_sync_(own_, 1 << 18, dist::Group::Replicas) {}

void Replicas::backward(const Tensor& loss) {
  autograd::backward(loss, Tensor(), [this](const Tensor& leaf) {
    sync_.ready(leaf);
    own_sync_.ready(leaf);
  });
  sync_.finish();
  own_sync_.finish();
  autograd::NoGrad no_grad;
  for (Tensor& p : own_)
    if (p.grad().defined()) p.set_grad(ops::mul(p.grad(), 1.f / float(ranks_.expert_parallel)));
}

float Replicas::clip_scale(float max_norm) const {
  double squares = models::gradient_squares(shared_);
  // Every expert once: the groups hold the same expert gradients after their reduction.
  if (!own_.empty()) squares += dist::sum({models::gradient_squares(own_)}, dist::Group::Experts)[0];
  return models::clip_scale_of_squares(squares, max_norm).scale;
}

Tensor Replicas::prc_loss(const Tensor& p, const Tensor& q, const Tensor& pairs,
                          const ops::PrcOptions& opt) const {
  const int64_t E = p.size(2), M = ops::prc_pair_count(pairs);
  const std::vector<float> c = ops::prc_matrix(p.detach(), q.detach(), pairs).to(Device::CPU)
                                   .to_vector<float>();
  std::vector<double> v(c.begin(), c.end());
  for (double& x : v) x *= double(M);  // C = (E / M) sum p q^T: M C sums over ranks
  v.push_back(double(M));
  v = dist::sum(v);
  const double total = v.back();
  std::vector<float> C(size_t(E * E), 0.f);
  if (total > 0)
    for (size_t k = 0; k < C.size(); ++k) C[k] = float(v[k] / total);
  return ops::prc_loss_of_total(p, q, pairs, Tensor::from(C, {E, E}), int64_t(total), opt,
                                float(ranks_.size));
}

EvalResult evaluate_on_ranks(models::ViT& model, const datasets::Dataset& data,
                             const std::string& dataset, const EvalOptions& o, const Ranks& r) {
  if (!r.many()) return evaluate(model, data, dataset, o);
  for (models::MoELayer* m : model.moe_layers()) m->hold_all_experts(true);
  const int64_t lo = data.n * r.rank / r.size, hi = data.n * (r.rank + 1) / r.size;
  EvalResult e = evaluate(model, datasets::rows(data, lo, hi), dataset, o);
  for (models::MoELayer* m : model.moe_layers()) m->hold_all_experts(false);
  // Sums of this rank's share: loss, right answers, images, the confusion matrix.
  std::vector<double> v{e.loss * double(e.n), e.accuracy * double(e.n), double(e.n)};
  v.insert(v.end(), e.confusion.begin(), e.confusion.end());
  v = dist::sum(v);
  EvalResult all;
  all.n = int64_t(v[2]);
  all.loss = v[0] / std::max(v[2], 1.0);
  all.accuracy = v[1] / std::max(v[2], 1.0);
  for (size_t i = 3; i < v.size(); ++i) all.confusion.push_back(int64_t(v[i]));
  return all;
}

double agree_max(double v, const Ranks& r) {
  if (!r.many()) return v;
  std::vector<double> all(size_t(r.size), 0.0);
  all[size_t(r.rank)] = v;
  all = dist::sum(all);
  return *std::max_element(all.begin(), all.end());
}

}  // namespace mv::train
