// Routing pictures (methods.md section 6): the per-patch maps of report/routing_maps.h drawn
// over the upscaled input image, and the four pictures apps/viz writes:
//
//   expert map  each patch tinted by its top-1 expert (one palette colour per expert)
//   noise       clean | noisy image, each tinted; patches whose top-1 expert changed outlined red
//   capacity    without BPR | with BPR at a low capacity factor; dropped first choices greyed
//               and hatched (token-choice routers only)
//   soft        one Soft MoE slot's dispatch weights over the image as a heat map
#pragma once
#include <cstdint>
#include <vector>

#include "datasets/transforms.h"
#include "models/router.h"
#include "report/draw.h"

namespace mv::report {

// ---- patches --------------------------------------------------------------------------------

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
                            const models::Route& r, const PictureStyle& s = {});

struct NoisePicture {
  RgbImage image;
  int64_t changed = 0, patches = 0;  // patches whose top-1 expert changed, of all
};
NoisePicture noise_picture(const Tensor& clean, const Tensor& noisy,
                           const datasets::Normalize& norm, int patch,
                           const models::Route& r_clean, const models::Route& r_noisy,
                           const PictureStyle& s = {});

struct CapacityPicture {
  RgbImage image;
  int64_t kept_plain = 0, kept_bpr = 0, patches = 0;  // first choices kept without / with BPR
};
// Token-choice routes only. Kept patches tinted by their top-1 expert, dropped ones greyed.
CapacityPicture capacity_picture(const Tensor& images, const datasets::Normalize& norm, int patch,
                                 const models::Route& r_plain, const models::Route& r_bpr,
                                 const PictureStyle& s = {});

// Soft routes only: slot's dispatch weights, min/max-normalised per image, as a heat map.
RgbImage soft_picture(const Tensor& images, const datasets::Normalize& norm, int patch,
                      const models::Route& r, int64_t slot, const PictureStyle& s = {});

}  // namespace mv::report
