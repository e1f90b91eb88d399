// Accuracy, loss and confusion matrix of a model on a data set, without a graph.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "datasets/dataset.h"
#include "models/vit.h"

namespace mv::train {

struct EvalResult {
  double loss = 0, accuracy = 0;
  int64_t n = 0;
  std::vector<int64_t> confusion;  // classes x classes, row = true label, column = prediction
  Tensor logits;                   // (n, classes), filled when keep_logits
};

struct EvalOptions {
  int batch = 500;
  bool flip = false;         // logits: the mean of the image's and its mirror image's
  bool keep_logits = false;  // fill EvalResult::logits
};

// Accuracy and mean cross-entropy of `model` on `data`, in batches, without a graph. Batches go
// to the device the model's parameters live on; `dataset` names their normalisation.
EvalResult evaluate(models::ViT& model, const datasets::Dataset& data, const std::string& dataset,
                    const EvalOptions& o);

}  // namespace mv::train
