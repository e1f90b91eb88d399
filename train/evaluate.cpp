#include "train/evaluate.h"

#include <algorithm>

#include "autograd/autograd.h"
#include "datasets/loader.h"
#include "ops/elementwise.h"
#include "ops/loss.h"
#include "ops/reduce.h"
#include "train/data.h"

namespace mv::train {

EvalResult evaluate(models::ViT& model, const datasets::Dataset& data, const std::string& dataset,
                    const EvalOptions& o) {
  autograd::NoGrad no_grad;
  model.train(false);
  const Device dev = model.device();
  datasets::Loader loader(data, o.batch, /*shuffle=*/false, 0, /*drop_last=*/false,
                          datasets::Augment::none(), normalization(dataset));
  const int C = model.config.num_classes;
  EvalResult r;
  r.confusion.assign(size_t(C) * C, 0);
  std::vector<float> all_logits;
  loader.begin_epoch(0);
  for (datasets::Batch b; loader.next(b);) {
    Tensor logits = model.forward(b.images.to(dev));
    if (o.flip)  // (B, classes): the mean over the two views
      logits = ops::mul(ops::add(logits, model.forward(datasets::hflip(b.images).to(dev))), 0.5f);
    const int64_t B = b.labels.numel();
    r.loss += double(ops::cross_entropy(logits, b.labels.to(dev)).item()) * B;
    std::vector<int64_t> pred = ops::argmax(logits, 1).to_vector<int64_t>();
    std::vector<int64_t> lab = b.labels.to_vector<int64_t>();
    for (int64_t i = 0; i < B; ++i) {
      r.accuracy += pred[size_t(i)] == lab[size_t(i)];
      r.confusion[size_t(lab[size_t(i)] * C + pred[size_t(i)])]++;
    }
    r.n += B;
    if (o.keep_logits) {
      std::vector<float> v = logits.to_vector<float>();
      all_logits.insert(all_logits.end(), v.begin(), v.end());
    }
  }
  model.train(true);
  r.loss /= double(std::max<int64_t>(r.n, 1));
  r.accuracy /= double(std::max<int64_t>(r.n, 1));
  if (o.keep_logits) r.logits = Tensor::from(all_logits, {r.n, C});
  return r;
}

}  // namespace mv::train
