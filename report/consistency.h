// Routing consistency under noise (methods.md section 5): the clean and a Gaussian-perturbed copy
// of each input go through the model in eval mode (no routing noise), and each MoE layer's routing
// of every token is compared, from the clean router probabilities Route::probs of both passes:
//
//   top-1     same argmax expert
//   top-2     same ordered pair (first, second)
//   top-2 set same set {first, second} (order-agnostic)
//   Jaccard   |A n B| / |A u B| of the top-k sets, k = the router's k for token-choice routers,
//             else 2; for top-k masks <m, m'> / (2k - <m, m'>)
//
// over a sweep of sigma, per layer and averaged over layers, with the accuracy under the same
// noise. Noise goes on the normalised pixels, or on the token input of one block (x' = x + eps
// before block `block` runs; the forward is rebuilt here from the ViT's public parts, so that
// the model itself needs no hook). Every sigma scales the same standard-normal draws (one
// Generator(seed) per sigma, drawn batch after batch), so the sweep is reproducible and its
// points differ only by the noise scale.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "datasets/dataset.h"
#include "models/vit.h"

namespace mv::report {

struct ConsistencyConfig {
  // Noise std in normalised-pixel units (pixels have about unit std after normalisation, so
  // these are 5% .. 100% of the signal's spread); in hidden units with block >= 0.
  std::vector<double> sigmas = {0.05, 0.1, 0.2, 0.5, 1.0};
  int block = -1;          // -1: noise on the normalised pixels; else on block `block`'s input
  uint64_t seed = 0;       // noise seed
  int batch = 250;
  std::string dataset;     // data set name, for its normalisation (train/data.h)
};

// Agreement fractions over the compared tokens (each in [0, 1]).
struct Agreement {
  double top1 = 0, top2 = 0, top2_set = 0, jaccard = 0;
};

// Counts summed over tokens; agreement() divides by tokens.
struct AgreementSums {
  int64_t top1 = 0, top2 = 0, top2_set = 0, tokens = 0;
  double jaccard = 0;
  void add(const AgreementSums& o);
  Agreement agreement() const;
};

// a, b: (tokens, L) expert indices of each token in descending order of preference (L >= 1;
// top-2 metrics read the first min(L, 2) entries, Jaccard the first jaccard_k <= L entries).
AgreementSums compare_routes(const int32_t* a, const int32_t* b, int64_t tokens, int L,
                             int jaccard_k);
// probs: (..., E) -> (tokens, L) the L most probable experts per token, in descending order
// (ties to the lower index), flattened row-major.
std::vector<int32_t> ranked_experts(const Tensor& probs, int L);

struct SigmaPoint {
  double sigma = 0;
  double accuracy = 0;              // accuracy on the perturbed inputs
  std::vector<Agreement> layers;    // one per MoE layer, in block order
  Agreement mean;                   // the layers' average
};

struct ConsistencyResult {
  std::string noise_on;             // "pixels" or "block:N"
  std::vector<int> moe_blocks;      // the block index of each MoE layer
  std::string router;
  int jaccard_k = 2;
  int64_t images = 0, tokens = 0;   // tokens compared per layer (images * tokens per image)
  uint64_t seed = 0;
  double clean_accuracy = 0;
  std::vector<SigmaPoint> points;   // in the order of the sigmas given
};

// Runs the sweep. The model is put in eval mode and returned to its previous mode. Throws for a
// dense model ("has no MoE layers"), a block out of range, a negative sigma, or images that do
// not fit the model.
ConsistencyResult routing_consistency(models::ViT& model, const datasets::Dataset& data,
                                      const ConsistencyConfig& cfg);

// "pixels" -> -1, "block:N" -> N (range checked by routing_consistency); throws otherwise.
int parse_noise_on(const std::string& s);

}  // namespace mv::report
