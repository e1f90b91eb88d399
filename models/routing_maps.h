// Routing pictures (methods.md section 6): per-patch maps read from a Route (which expert a patch
// goes to, whether its first choice was kept, a Soft MoE slot's dispatch weights), drawn over the
// upscaled input image, and the four pictures apps/viz writes:
//
//   expert map  each patch tinted by its top-1 expert (one palette colour per expert)
//   noise       clean | noisy image, each tinted; patches whose top-1 expert changed outlined red
//   capacity    without BPR | with BPR at a low capacity factor; dropped first choices greyed
//               and hatched (token-choice routers only)
//   soft        one Soft MoE slot's dispatch weights over the image as a heat map
//
// Patches are the image's tokens without the CLS token (token 0), in row-major order of a
// grid x grid layout; every per-patch map below is (B, P) flattened, P = grid * grid.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "datasets/dataset.h"
#include "datasets/transforms.h"
#include "models/router.h"
#include "models/vit.h"

namespace mv::models {

// ---- per-patch maps from a Route ------------------------------------------------------------
// A Route of B images of T = P + 1 tokens each, routed one group per image (G = B, N = T) or as
// one group (G = 1, N = B*T): either way token t of image b is flat token b*T + t.

// (B, P): each patch's top-1 expert, the argmax of the clean probabilities (ties: lower expert).
std::vector<int> patch_top1_experts(const Route& r, int64_t images);
// (B, P): 1 where the patch's first (top-1) choice got a buffer row, 0 where it was dropped.
// Token-choice routes only (Route::slot defined); throws otherwise.
std::vector<uint8_t> patch_top1_kept(const Route& r, int64_t images);
// (B, P): the Soft MoE dispatch weight of slot `slot` (e*slots + j) on each patch: softmax of
// soft_logits[g, :, slot] over the group's N tokens (CLS included, so a group's patches sum to
// at most 1). Soft routes only; throws otherwise or when the slot is out of range.
std::vector<float> soft_slot_weights(const Route& r, int64_t images, int64_t slot);
// v rescaled linearly so that its min is 0 and its max 1; all zeros when v is constant.
std::vector<float> normalize_min_max(const std::vector<float>& v);
// 1 where a[i] != b[i] (same sizes).
std::vector<uint8_t> changed_patches(const std::vector<int>& a, const std::vector<int>& b);

// ---- RGB images and drawing -----------------------------------------------------------------

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
  bool operator==(const Rgb&) const = default;
};
inline constexpr Rgb kRed{255, 0, 0};      // changed routing
inline constexpr Rgb kWhite{255, 255, 255};

struct RgbImage {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height rows of width pixels, 3 bytes each, top row first
  RgbImage() = default;
  RgbImage(int w, int h, Rgb fill = kWhite);
  Rgb at(int x, int y) const;
  void set(int x, int y, Rgb c);
};

// `experts` distinct colours: a fixed list of 16 named ones, then golden-ratio hues. None is
// close to red (kRed marks changes) or to grey (dropped patches).
std::vector<Rgb> expert_palette(int experts);
std::string colour_name(int expert);  // "blue", ... ("hue 137" past the fixed list)
std::string hex(Rgb c);               // "#0072e6"

// One image chw: (C, S, S) normalised with `norm`, back to [0, 1] (clamped), each pixel an
// s x s block: an (S*s) x (S*s) image, grey for 1 channel, RGB for 3.
RgbImage upscale_image(const float* chw, int channels, int size, const datasets::Normalize& norm,
                       int scale);

// The drawing functions below paint an image of exactly (grid*cell) x (grid*cell) pixels whose
// patch p (row p / grid, column p % grid) covers a cell x cell square; per-patch inputs have
// grid*grid entries.
// Blends each patch with palette[label] (weight alpha); labels < 0 are left alone.
void tint_patches(RgbImage& img, int grid, int cell, const std::vector<int>& labels,
                  const std::vector<Rgb>& palette, float alpha);
// Paints the `thickness` outermost pixel rings of every patch with mask != 0 in `colour`;
// every other pixel is untouched.
void outline_patches(RgbImage& img, int grid, int cell, const std::vector<uint8_t>& mask,
                     Rgb colour = kRed, int thickness = 1);
// Greys out (desaturated, faded) and hatches (dark diagonal lines) every patch with mask != 0.
void grey_patches(RgbImage& img, int grid, int cell, const std::vector<uint8_t>& mask);
// Blends each patch with heat_colour(v[p]) (weight alpha); v in [0, 1].
void heat_patches(RgbImage& img, int grid, int cell, const std::vector<float>& v, float alpha);
// A dark-to-bright colour ramp: 0 -> near black (blue tint), 0.5 -> red-orange, 1 -> pale yellow.
Rgb heat_colour(float t);

// Images side by side (tops aligned) with `gap` background pixels between them.
RgbImage hstack(const std::vector<RgbImage>& images, int gap, Rgb background = kWhite);
// Images of one size in rows of `columns` (the last row may be shorter), `gap` pixels between.
RgbImage tile(const std::vector<RgbImage>& images, int columns, int gap, Rgb background = kWhite);

// ---- the pictures ---------------------------------------------------------------------------

struct PictureStyle {
  int scale = 8;     // each input pixel becomes scale x scale
  int columns = 4;   // images (expert, soft) or pairs (noise, capacity) per row
  int gap = 8;       // pixels between images (or pairs) of the grid
  int pair_gap = 2;  // pixels between the two halves of a pair
  float alpha = 0.5f;  // tint / heat opacity
  int outline = 0;     // outline thickness in pixels; 0: max(1, scale / 4)
};

// images: (B, C, S, S) F32 on the CPU, normalised with norm (what the model saw); patch: the
// model's patch size; routes: the layer's Route for exactly these images.
RgbImage expert_map_picture(const Tensor& images, const datasets::Normalize& norm, int patch,
                            const Route& r, const PictureStyle& s = {});

struct NoisePicture {
  RgbImage image;
  int64_t changed = 0, patches = 0;  // patches whose top-1 expert changed, of all
};
NoisePicture noise_picture(const Tensor& clean, const Tensor& noisy,
                           const datasets::Normalize& norm, int patch, const Route& r_clean,
                           const Route& r_noisy, const PictureStyle& s = {});

struct CapacityPicture {
  RgbImage image;
  int64_t kept_plain = 0, kept_bpr = 0, patches = 0;  // first choices kept without / with BPR
};
// Token-choice routes only. Kept patches tinted by their top-1 expert, dropped ones greyed.
CapacityPicture capacity_picture(const Tensor& images, const datasets::Normalize& norm, int patch,
                                 const Route& r_plain, const Route& r_bpr,
                                 const PictureStyle& s = {});

// Soft routes only: slot's dispatch weights, min/max-normalised per image, as a heat map.
RgbImage soft_picture(const Tensor& images, const datasets::Normalize& norm, int patch,
                      const Route& r, int64_t slot, const PictureStyle& s = {});

// ---- running the model ----------------------------------------------------------------------

// Images first .. first+count-1 of d (clamped to the data set) as (B, C, H, W) F32, normalised.
Tensor dataset_images(const datasets::Dataset& d, int64_t first, int64_t count,
                      const datasets::Normalize& norm);
// images + sigma * N(0, 1) noise drawn from Generator(seed): noise on normalised pixels.
Tensor add_pixel_noise(const Tensor& images, float sigma, uint64_t seed);
// One evaluation forward without a graph (the model is left in the mode it was in); every MoE
// layer's Route, in moe_layers() order, as the pictures read it: probs, expert, slot,
// soft_logits and capacity copied to the CPU (assign and aux_loss left out).
std::vector<Route> route_images(ViT& model, const Tensor& images);
// Token-choice models only: routes at evaluation capacity factor `capacity` without BPR
// (.first) and with BPR (.second); the routers' capacity_eval and bpr are restored afterwards.
std::pair<std::vector<Route>, std::vector<Route>> route_with_and_without_bpr(
    ViT& model, const Tensor& images, float capacity);

}  // namespace mv::models
