#include "report/routing_maps.h"

#include <algorithm>
#include <cmath>

#include "autograd/autograd.h"
#include "engine/random.h"
#include "ops/shape.h"
#include "ops/softmax.h"

namespace mv::report {

// ---- per-patch maps -------------------------------------------------------------------------

namespace {

// Tokens per image of a route over `images` images; checks that the route splits evenly.
int64_t tokens_per_image(const Tensor& t, int64_t images, const char* what) {
  MV_CHECK(t.defined() && t.ndim() == 3, what, ": expected a (G, N, ...) routing tensor, got ",
           t.defined() ? t.str() : std::string("an undefined tensor"));
  const int64_t flat = t.size(0) * t.size(1);
  MV_CHECK(images >= 1 && flat % images == 0 && flat / images >= 2, what, ": ", t.str(),
           " does not split into ", images, " images of a CLS token and at least one patch");
  return flat / images;
}

}  // namespace

std::vector<int> patch_top1_experts(const models::Route& r, int64_t images) {
  const int64_t T = tokens_per_image(r.probs, images, "patch_top1_experts"), P = T - 1;
  const int64_t E = r.probs.size(2);
  const std::vector<float> p = r.probs.to_vector<float>();
  std::vector<int> out(size_t(images * P));
  for (int64_t b = 0; b < images; ++b)
    for (int64_t q = 0; q < P; ++q) {
      const float* row = p.data() + (b * T + q + 1) * E;  // + 1: skip the CLS token
      out[size_t(b * P + q)] = int(std::max_element(row, row + E) - row);  // first max wins
    }
  return out;
}

std::vector<uint8_t> patch_top1_kept(const models::Route& r, int64_t images) {
  MV_CHECK(r.slot.defined(), "patch_top1_kept: the route has no slots: only token-choice routers "
           "(topk, cosine, perturbed_cosine, multi_centroid) keep or drop a token's choices");
  const int64_t T = tokens_per_image(r.slot, images, "patch_top1_kept"), P = T - 1;
  const int64_t K = r.slot.size(2);
  const std::vector<int64_t> s = r.slot.to_vector<int64_t>();
  std::vector<uint8_t> out(size_t(images * P));
  for (int64_t b = 0; b < images; ++b)
    for (int64_t q = 0; q < P; ++q) out[size_t(b * P + q)] = s[size_t((b * T + q + 1) * K)] >= 0;
  return out;
}

std::vector<float> soft_slot_weights(const models::Route& r, int64_t images, int64_t slot) {
  MV_CHECK(r.soft_logits.defined(), "soft_slot_weights: the route has no soft logits: only a "
           "Soft MoE router (soft) dispatches tokens into slots");
  const Tensor& L = r.soft_logits;
  const int64_t T = tokens_per_image(L, images, "soft_slot_weights"), P = T - 1;
  const int64_t S = L.size(2);
  MV_CHECK(slot >= 0 && slot < S, "soft_slot_weights: slot ", slot, " out of range: the router has ",
           S, " slots (experts x slots per expert), expected 0..", S - 1);
  // Dispatch: per group, a softmax over its N tokens of the slot's logits -> (G, 1, N).
  const std::vector<float> w =
      ops::softmax(ops::transpose(ops::slice(L.to(Device::CPU), 2, slot, slot + 1), 1, 2))
          .to_vector<float>();
  std::vector<float> out(size_t(images * P));
  for (int64_t b = 0; b < images; ++b)
    for (int64_t q = 0; q < P; ++q) out[size_t(b * P + q)] = w[size_t(b * T + q + 1)];
  return out;
}

std::vector<float> normalize_min_max(const std::vector<float>& v) {
  std::vector<float> out(v.size(), 0.f);
  if (v.empty()) return out;
  const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
  const double a = *lo, range = double(*hi) - a;
  if (!(range > 0)) return out;
  for (size_t i = 0; i < v.size(); ++i) out[i] = float((double(v[i]) - a) / range);
  return out;
}

std::vector<uint8_t> changed_patches(const std::vector<int>& a, const std::vector<int>& b) {
  MV_CHECK(a.size() == b.size(), "changed_patches: maps of ", a.size(), " and ", b.size(),
           " patches, expected the same number");
  std::vector<uint8_t> out(a.size());
  for (size_t i = 0; i < a.size(); ++i) out[i] = a[i] != b[i];
  return out;
}
// ---- running the model ----------------------------------------------------------------------

Tensor dataset_images(const datasets::Dataset& d, int64_t first, int64_t count,
                      const datasets::Normalize& norm) {
  MV_CHECK(first >= 0 && first < d.n, "images: first index ", first, " is outside data set '",
           d.name, "' of ", d.n, " images");
  MV_CHECK(count >= 1, "images: count ", count, " must be at least 1");
  count = std::min(count, d.n - first);
  MV_CHECK(!norm.enabled() || int64_t(norm.mean.size()) == d.channels, "images: normalisation for ",
           norm.mean.size(), " channels, data set '", d.name, "' has ", d.channels);
  Tensor x = Tensor::empty({count, d.channels, d.height, d.width});
  float* p = x.data<float>();
  const int64_t plane = d.height * d.width;
  for (int64_t b = 0; b < count; ++b) {
    const uint8_t* src = d.image(first + b);
    for (int64_t c = 0; c < d.channels; ++c)
      for (int64_t i = 0; i < plane; ++i) {
        float v = src[c * plane + i] / 255.f;
        if (norm.enabled()) v = (v - norm.mean[size_t(c)]) / norm.std[size_t(c)];
        p[(b * d.channels + c) * plane + i] = v;
      }
  }
  return x;
}

Tensor add_pixel_noise(const Tensor& images, float sigma, uint64_t seed) {
  MV_CHECK(sigma >= 0 && std::isfinite(sigma), "pixel noise: sigma ", sigma, " must be >= 0");
  Generator g(seed);
  Tensor out = images.to(Device::CPU).clone();
  const Tensor eps = randn(out.shape(), g);
  float* o = out.data<float>();
  const float* e = eps.data<float>();
  for (int64_t i = 0, n = out.numel(); i < n; ++i) o[i] += sigma * e[i];
  return out;
}

std::vector<models::Route> route_images(models::ViT& model, const Tensor& images) {
  MV_CHECK(!model.moe_layers().empty(), "routing pictures: the model has no MoE layer (a dense "
           "ViT); use a checkpoint of an MoE model");
  autograd::NoGrad no_grad;
  const bool was_training = model.training();
  model.train(false);
  model.forward(images.to(model.device()));
  model.train(was_training);
  std::vector<models::Route> out;
  for (models::MoELayer* m : model.moe_layers()) {
    const models::Route& r = m->last;
    models::Route c;  // what the pictures read, on the CPU
    auto cpu = [](const Tensor& t) { return t.defined() ? t.to(Device::CPU) : Tensor(); };
    c.probs = cpu(r.probs), c.expert = cpu(r.expert), c.slot = cpu(r.slot);
    c.soft_logits = cpu(r.soft_logits);
    c.capacity = r.capacity;
    out.push_back(std::move(c));
  }
  return out;
}

std::pair<std::vector<models::Route>, std::vector<models::Route>> route_with_and_without_bpr(
    models::ViT& model, const Tensor& images, float capacity) {
  MV_CHECK(capacity > 0 && std::isfinite(capacity), "capacity picture: capacity factor ", capacity,
           " must be positive");
  const std::vector<models::MoELayer*> layers = model.moe_layers();
  MV_CHECK(!layers.empty(), "capacity picture: the model has no MoE layer");
  for (models::MoELayer* m : layers)
    MV_CHECK(m->router->config.token_choice(), "capacity picture: router '",
             m->router->config.type, "' does not drop tokens by capacity per token choice; it needs "
             "a token-choice router (topk, cosine, perturbed_cosine, multi_centroid)");
  std::vector<models::RouterConfig> saved;
  for (models::MoELayer* m : layers) saved.push_back(m->router->config);
  auto set = [&](bool bpr) {
    for (models::MoELayer* m : layers)
      m->router->config.capacity_eval = capacity, m->router->config.bpr = bpr;
  };
  auto restore = [&] {
    for (size_t i = 0; i < layers.size(); ++i) layers[i]->router->config = saved[i];
  };
  std::pair<std::vector<models::Route>, std::vector<models::Route>> out;
  try {
    set(false);
    out.first = route_images(model, images);
    set(true);
    out.second = route_images(model, images);
  } catch (...) {
    restore();
    throw;
  }
  restore();
  return out;
}

}  // namespace mv::report
