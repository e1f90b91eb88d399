// Routing maps (methods.md section 6): per-patch maps read from a Route (which expert a patch
// goes to, whether its first choice was kept, a Soft MoE slot's dispatch weights), and the
// routes of a model's forward on chosen images, which report/pictures.h draws.
//
// Patches are the image's tokens without the CLS token (token 0), in row-major order of a
// grid x grid layout; every per-patch map below is (B, P) flattened, P = grid * grid.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "datasets/dataset.h"
#include "datasets/transforms.h"
#include "models/router.h"
#include "models/vit.h"

namespace mv::report {

// ---- per-patch maps from a Route ------------------------------------------------------------
// A Route of B images of T = P + 1 tokens each, routed one group per image (G = B, N = T) or as
// one group (G = 1, N = B*T): either way token t of image b is flat token b*T + t.

// (B, P): each patch's top-1 expert, the argmax of the clean probabilities (ties: lower expert).
std::vector<int> patch_top1_experts(const models::Route& r, int64_t images);
// (B, P): 1 where the patch's first (top-1) choice got a buffer row, 0 where it was dropped.
// Token-choice routes only (Route::slot defined); throws otherwise.
std::vector<uint8_t> patch_top1_kept(const models::Route& r, int64_t images);
// (B, P): the Soft MoE dispatch weight of slot `slot` (e*slots + j) on each patch: softmax of
// soft_logits[g, :, slot] over the group's N tokens (CLS included, so a group's patches sum to
// at most 1). Soft routes only; throws otherwise or when the slot is out of range.
std::vector<float> soft_slot_weights(const models::Route& r, int64_t images, int64_t slot);
// v rescaled linearly so that its min is 0 and its max 1; all zeros when v is constant.
std::vector<float> normalize_min_max(const std::vector<float>& v);
// 1 where a[i] != b[i] (same sizes).
std::vector<uint8_t> changed_patches(const std::vector<int>& a, const std::vector<int>& b);

// ---- running the model ----------------------------------------------------------------------

// Images first .. first+count-1 of d (clamped to the data set) as (B, C, H, W) F32, normalised.
Tensor dataset_images(const datasets::Dataset& d, int64_t first, int64_t count,
                      const datasets::Normalize& norm);
// images (B, C, H, W) + sigma * N(0, 1) noise drawn from Generator(seed), on the CPU: noise on
// normalised pixels.
Tensor add_pixel_noise(const Tensor& images, float sigma, uint64_t seed);
// One evaluation forward of images (B, C, H, W) without a graph (the model is left in the mode
// it was in); every MoE layer's Route, in moe_layers() order, as the pictures read it: probs,
// expert, slot, soft_logits and capacity copied to the CPU (assign and aux_loss left out).
std::vector<models::Route> route_images(models::ViT& model, const Tensor& images);
// Token-choice models only: routes of images (B, C, H, W) at evaluation capacity factor
// `capacity` without BPR (.first) and with BPR (.second); the routers' capacity_eval and bpr are
// restored afterwards.
std::pair<std::vector<models::Route>, std::vector<models::Route>> route_with_and_without_bpr(
    models::ViT& model, const Tensor& images, float capacity);

}  // namespace mv::report
