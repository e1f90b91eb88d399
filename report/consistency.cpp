#include "report/consistency.h"

#include <algorithm>
#include <cmath>

#include "autograd/autograd.h"
#include "datasets/loader.h"
#include "engine/random.h"
#include "ops/elementwise.h"
#include "ops/reduce.h"
#include "ops/shape.h"
#include "ops/topk.h"
#include "train/data.h"

namespace mv::report {

// ---- metrics ----------------------------------------------------------------------------------

void AgreementSums::add(const AgreementSums& o) {
  top1 += o.top1, top2 += o.top2, top2_set += o.top2_set, tokens += o.tokens;
  jaccard += o.jaccard;
}

Agreement AgreementSums::agreement() const {
  const double n = double(std::max<int64_t>(tokens, 1));
  return {double(top1) / n, double(top2) / n, double(top2_set) / n, jaccard / n};
}

AgreementSums compare_routes(const int32_t* a, const int32_t* b, int64_t tokens, int L,
                             int jaccard_k) {
  MV_CHECK(L >= 1 && jaccard_k >= 1 && jaccard_k <= L, "compare_routes: list length ", L,
           " and Jaccard k ", jaccard_k, ": expected 1 <= k <= length");
  AgreementSums s;
  s.tokens = tokens;
  for (int64_t t = 0; t < tokens; ++t) {
    const int32_t* x = a + t * L;
    const int32_t* y = b + t * L;
    const bool first = x[0] == y[0];
    s.top1 += first;
    if (L >= 2) {
      s.top2 += first && x[1] == y[1];
      s.top2_set += (first && x[1] == y[1]) || (x[0] == y[1] && x[1] == y[0]);
    } else {  // a single expert per token: its pair is itself
      s.top2 += first, s.top2_set += first;
    }
    // Top-k masks m, m': <m, m'> = |A n B|, |A u B| = 2k - <m, m'>.
    int inter = 0;
    for (int i = 0; i < jaccard_k; ++i)
      for (int j = 0; j < jaccard_k; ++j) inter += x[i] == y[j];
    s.jaccard += double(inter) / double(2 * jaccard_k - inter);
  }
  return s;
}

std::vector<int32_t> ranked_experts(const Tensor& probs, int L) {
  const Tensor p = probs.to(Device::CPU).contiguous();
  MV_CHECK(p.ndim() >= 1 && p.dtype() == DType::F32, "ranked_experts: probs ", p.str(),
           " must be F32 (..., E)");
  const int64_t E = p.size(-1), n = p.numel() / std::max<int64_t>(E, 1);
  MV_CHECK(L >= 1 && L <= E, "ranked_experts: ", L, " experts per token asked of ", p.str());
  // ops::topk sorts descending with ties to the lower index, the order the metrics need.
  const std::vector<int64_t> idx = ops::topk(p.detach(), L).indices.to_vector<int64_t>();
  std::vector<int32_t> out(size_t(n * L));
  std::transform(idx.begin(), idx.end(), out.begin(), [](int64_t e) { return int32_t(e); });
  return out;
}

int parse_noise_on(const std::string& s) {
  if (s == "pixels") return -1;
  const std::string pre = "block:";
  if (s.rfind(pre, 0) == 0 && s.size() > pre.size() &&
      s.find_first_not_of("0123456789", pre.size()) == std::string::npos)
    return std::stoi(s.substr(pre.size()));
  MV_FAIL("--noise-on: '", s, "' must be pixels or block:N (N a block index)");
}

// ---- the sweep --------------------------------------------------------------------------------

// The model's forward of images (B, C, H, W) with eps added to the token input of block `block`
// (eps (B, T, D)), or to the pixels when block < 0 (eps (B, C, H, W)).
static Tensor forward_with_noise(models::ViT& m, const Tensor& images, int block,
                                 const Tensor& eps) {
  if (block < 0) return m.forward(images + eps);
  m.block_input_hook = [&](int i, const Tensor& x) { return i == block ? x + eps : x; };
  Tensor logits;
  try {
    logits = m.forward(images);
  } catch (...) {
    m.block_input_hook = nullptr;
    throw;
  }
  m.block_input_hook = nullptr;
  return logits;
}

static std::vector<int64_t> predictions(const Tensor& logits) {
  return ops::argmax(logits, 1).to_vector<int64_t>();
}

ConsistencyResult routing_consistency(models::ViT& model, const datasets::Dataset& data,
                                      const ConsistencyConfig& cfg) {
  const models::ViTConfig& vc = model.config;
  const std::vector<models::MoELayer*> layers = model.moe_layers();
  MV_CHECK(!layers.empty(), "routing consistency: the model (MoE placement '", vc.moe_placement,
           "') has no MoE layers: there is no routing to compare");
  MV_CHECK(cfg.block >= -1 && cfg.block < vc.depth, "routing consistency: noise on block ",
           cfg.block, ", but the model has blocks 0..", vc.depth - 1);
  MV_CHECK(!cfg.sigmas.empty(), "routing consistency: no sigma to sweep");
  for (double s : cfg.sigmas)
    MV_CHECK(std::isfinite(s) && s >= 0, "routing consistency: sigma ", s, " must be >= 0");
  MV_CHECK(cfg.batch >= 1, "routing consistency: batch ", cfg.batch, " must be >= 1");
  MV_CHECK(!cfg.dataset.empty(), "routing consistency: the data set name (for its normalisation) "
           "is not set");
  MV_CHECK(data.n > 0, "routing consistency: data set '", data.name, "' is empty");
  MV_CHECK(data.channels == vc.channels && data.height == vc.image_size &&
               data.width == vc.image_size,
           "routing consistency: images of '", data.name, "' are (", data.channels, ", ",
           data.height, ", ", data.width, "), the model expects (", vc.channels, ", ",
           vc.image_size, ", ", vc.image_size, ")");

  const models::RouterConfig& rc = vc.moe.router;
  const int E = rc.experts;
  const int jk = std::min(rc.token_choice() ? rc.k : 2, E);
  const int L = std::max(jk, std::min(2, E));  // experts ranked per token

  ConsistencyResult res;
  res.noise_on = cfg.block < 0 ? "pixels" : "block:" + std::to_string(cfg.block);
  for (int i = 0; i < vc.depth; ++i)
    if (vc.is_moe_block(i)) res.moe_blocks.push_back(i);
  res.router = rc.type;
  res.jaccard_k = jk;
  res.seed = cfg.seed;

  const size_t S = cfg.sigmas.size(), NL = layers.size();
  std::vector<std::vector<AgreementSums>> sums(S, std::vector<AgreementSums>(NL));
  std::vector<int64_t> correct(S, 0);
  int64_t clean_correct = 0;
  // One stream per sigma, all from the same seed: every sigma scales the same draws.
  std::vector<Generator> gens(S, Generator(cfg.seed));

  const bool was_training = model.training();
  model.train(false);
  autograd::NoGrad no_grad;
  const Device dev = model.device();
  datasets::Loader loader(data, cfg.batch, /*shuffle=*/false, 0, /*drop_last=*/false,
                          datasets::Augment::none(), train::normalization(cfg.dataset));
  try {
    loader.begin_epoch(0);
    for (datasets::Batch b; loader.next(b);) {
      const Tensor images = b.images.to(dev);
      const std::vector<int64_t> labels = b.labels.to_vector<int64_t>();
      const int64_t B = images.size(0);
      std::vector<int64_t> pred = predictions(model.forward(images));
      for (int64_t i = 0; i < B; ++i) clean_correct += pred[size_t(i)] == labels[size_t(i)];
      std::vector<std::vector<int32_t>> clean(NL);
      for (size_t l = 0; l < NL; ++l) clean[l] = ranked_experts(layers[l]->last.probs, L);
      const int64_t tokens = int64_t(clean[0].size()) / L;

      const Shape noise_shape = cfg.block < 0 ? images.shape()
                                              : Shape{B, int64_t(vc.tokens()), int64_t(vc.dim)};
      for (size_t s = 0; s < S; ++s) {
        const Tensor eps = ops::mul(randn(noise_shape, gens[s]), float(cfg.sigmas[s])).to(dev);
        const Tensor logits = forward_with_noise(model, images, cfg.block, eps);
        pred = predictions(logits);
        for (int64_t i = 0; i < B; ++i) correct[s] += pred[size_t(i)] == labels[size_t(i)];
        for (size_t l = 0; l < NL; ++l) {
          const std::vector<int32_t> r = ranked_experts(layers[l]->last.probs, L);
          sums[s][l].add(compare_routes(clean[l].data(), r.data(), tokens, L, jk));
        }
      }
      res.images += B;
    }
  } catch (...) {
    model.train(was_training);
    throw;
  }
  model.train(was_training);

  res.tokens = sums[0][0].tokens;
  res.clean_accuracy = double(clean_correct) / double(res.images);
  for (size_t s = 0; s < S; ++s) {
    SigmaPoint p;
    p.sigma = cfg.sigmas[s];
    p.accuracy = double(correct[s]) / double(res.images);
    for (size_t l = 0; l < NL; ++l) {
      const Agreement a = sums[s][l].agreement();
      p.layers.push_back(a);
      p.mean.top1 += a.top1 / double(NL), p.mean.top2 += a.top2 / double(NL);
      p.mean.top2_set += a.top2_set / double(NL), p.mean.jaccard += a.jaccard / double(NL);
    }
    res.points.push_back(p);
  }
  return res;
}

}  // namespace mv::report
