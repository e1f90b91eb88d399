// Two views of each image with patch correspondences, the data side of Pairwise Router
// Consistency (methods.md section 4): each view is a random resized crop with its own flip, and
// for every patch of view 1 we find the patch of view 2 that shows the same place of the source
// image (its centre mapped through box_to_source / source_to_box).
//
// Token layout is the ViT's (models/vit.h): token 0 is CLS, then the (H/p) x (W/p) patches in
// row-major order. A pair table has one entry per view-1 token: the view-2 token index, or -1.
#pragma once
#include <cstdint>
#include <vector>

#include "datasets/transforms.h"
#include "engine/random.h"
#include "engine/tensor.h"

namespace mv::datasets {

struct TwoViewConfig {
  // Area fractions of the source image, in (0, 1]: view 1 (the "local" view) and view 2.
  float area1_lo = 0.35f, area1_hi = 0.8f;
  float area2_lo = 0.7f, area2_hi = 1.f;
  float ratio_lo = 3.f / 4.f, ratio_hi = 4.f / 3.f;  // aspect ratio w/h, log-uniform
  float flip_p = 0.5f;                               // per view, independently
  bool cls_pair = false;  // pair CLS with CLS (reference: on for ImageNet, off for CIFAR)
  int patch = 4;          // ViT patch side; must divide the view size
  int size = 0;           // output side of both views; 0 keeps the image size (H x W)

  // Defaults for small images with 4 px patches, milder than the reference's 224 px ImageNet
  // ranges (view 1 [0.05, 0.7], view 2 [0.6, 1.0]). The share of view-1 patches with a partner
  // hardly depends on the ranges (~90% for all of them: a small view 1 mostly lies inside a large
  // view 2); what the small images cannot take is zoom. On 28 px a 5% crop is ~6 px wide: a 4 px
  // patch sees under 1.5 source pixels, view 1 is blown up ~4.5x and each view-2 patch pairs with
  // ~1.9 view-1 patches on average: near-duplicate pairs, and a view too small to classify
  // (the classification loss is applied to both views). So:
  //  28 (Fashion-MNIST, 7x7 patches; garments centred and filling the frame, told apart by
  //    sleeves and collars): view 1 [0.35, 0.8], view 2 [0.7, 1.0]. View 1 keeps >= 2.4 source
  //    px per patch (<= 1.7x zoom, scale gap to view 2 <= 1.7x); 93% of view-1 patches paired,
  //    1.37 per hit view-2 patch, practically no image with under half of its patches paired.
  //  32 (CIFAR, 8x8 patches; objects vary in place and scale, so more zoom is tolerated):
  //    view 1 [0.25, 0.8], view 2 [0.6, 1.0]. >= 2 source px per patch (<= 2x zoom); 90% paired,
  //    1.43 per hit view-2 patch.
  // Other sizes get the 32 px ranges. Measured over 20000 sampled pairs of boxes; the test
  // "defaults for 28 and 32 px" in tests/test_two_view.cpp checks the paired share.
  static TwoViewConfig for_image_size(int size);

  // Throws naming the bad field: an area range empty or outside (0, 1], a bad ratio range or
  // flip probability, or a patch that does not divide the view size of an H x W image.
  void validate(int64_t H, int64_t W) const;
  int out_h(int64_t H) const { return size > 0 ? size : int(H); }
  int out_w(int64_t W) const { return size > 0 ? size : int(W); }
  // Tokens per view: (out_h/p) * (out_w/p) + 1 (CLS).
  int64_t tokens(int64_t H, int64_t W) const;
};

// For every view-1 token, the view-2 token at the same source location, or -1.
// Both views are H x W outputs (of their own boxes) cut in p x p patches; returns T =
// (H/p)*(W/p) + 1 entries: [0] is CLS (0 when cls_pair, else -1), then view-1 patch
// t = 1 + r*(W/p) + c: its centre (r*p + (p-1)/2, c*p + (p-1)/2) is mapped to the source image
// (box_to_source on box1), then into view 2 (source_to_box on box2); the view-2 patch whose
// pixel area [r2*p - 0.5, r2*p + p - 0.5) x ... contains it, or -1 outside view 2.
std::vector<int64_t> pair_patches(const CropBox& box1, const CropBox& box2, int H, int W, int patch,
                                  bool cls_pair = false);

// A batch of pair tables: boxes1, boxes2: B each -> (B, T) I64.
Tensor pair_batch(const std::vector<CropBox>& boxes1, const std::vector<CropBox>& boxes2, int H,
                  int W, int patch, bool cls_pair = false);

struct TwoViewBoxes {
  std::vector<CropBox> view1, view2;
};

// Boxes for B images of H x W: all of view 1 first, then all of view 2, each a
// sample_resized_crops call (so g advances by 2 * B * 11 blocks: a function of B only).
TwoViewBoxes sample_two_views(int64_t B, int64_t H, int64_t W, const TwoViewConfig& cfg,
                              Generator& g);

// Float batches: x: (B, C, H, W) -> images, images2: (B, C, oh, ow), pairs: (B, T) I64.
struct TwoViews {
  Tensor images, images2, pairs;
  TwoViewBoxes boxes;
};
TwoViews make_two_views(const Tensor& x, const TwoViewConfig& cfg, Generator& g);

}  // namespace mv::datasets
