// Image transforms on float batches x: (B, C, H, W) F32 (CPU), all randomness drawn from a
// Generator (Philox), so a seed reproduces every crop and flip.
//
// Crops and flips are split in two steps so that other features can reuse them: sampling gives a
// CropBox per image (where in the source image, and whether to mirror), applying resamples a
// given box. Two views of an image with patch correspondences are two boxes for the same image;
// box_to_source / source_to_box map points between a view and the source image.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "engine/random.h"
#include "engine/tensor.h"

namespace mv::datasets {

// ---- normalisation --------------------------------------------------------------------------

// Per-channel (x - mean[c]) / std[c] on values in [0, 1]. Empty = identity.
struct Normalize {
  std::vector<float> mean, std;
  bool enabled() const { return !mean.empty(); }
  static Normalize none() { return {}; }
  static Normalize mnist() { return {{0.1307f}, {0.3081f}}; }
  static Normalize fashion_mnist() { return {{0.2860f}, {0.3530f}}; }
  // Pixel statistics of the training sets (std over all pixels of a channel).
  static Normalize cifar10() { return {{0.4914f, 0.4822f, 0.4465f}, {0.2470f, 0.2435f, 0.2616f}}; }
  static Normalize cifar100() { return {{0.5071f, 0.4865f, 0.4409f}, {0.2673f, 0.2564f, 0.2762f}}; }
  // By Dataset::name prefix ("fashion-mnist-train" -> fashion_mnist()); none() if unknown.
  static Normalize for_dataset(const std::string& name);
};

// x: (B, C, H, W) -> (B, C, H, W)
Tensor normalize(const Tensor& x, const Normalize& n);
void normalize_(Tensor& x, const Normalize& n);  // in place; x contiguous

// ---- crop boxes -----------------------------------------------------------------------------

// A window of the source image in pixel units (may reach past the image: zero padding) and a
// horizontal mirror of the result. Output pixel (oy, ox) of an out_h x out_w crop samples the
// source at box_to_source(box, out_h, out_w, oy, ox), bilinearly; points outside the image area
// [-0.5, H - 0.5] x [-0.5, W - 0.5] read 0. A box whose size equals the output size at integer
// top/left copies pixels exactly.
struct CropBox {
  float top = 0, left = 0, height = 0, width = 0;
  bool flip = false;
};

inline CropBox full_box(int64_t H, int64_t W, bool flip = false) {
  return {0.f, 0.f, float(H), float(W), flip};
}

// Source coordinates (pixel centres are integers) of output point (oy, ox); fractional output
// points (e.g. a patch centre at 7.5) are fine.
std::pair<float, float> box_to_source(const CropBox& b, int out_h, int out_w, float oy, float ox);
// The inverse: where source point (sy, sx) lands in the output (may be outside [0, out)).
std::pair<float, float> source_to_box(const CropBox& b, int out_h, int out_w, float sy, float sx);

// Sampling. Each call reserves its Philox blocks for all B images at once (image i reads its own
// blocks), so results depend only on the generator state, never on timing or threads.
// Random crop: a size x size window of the image zero-padded by `padding` on each side, at a
// uniform integer offset; flipped with probability flip_p.
std::vector<CropBox> sample_random_crops(int64_t B, int64_t H, int64_t W, int size, int padding,
                                         float flip_p, Generator& g);
// Random resized crop (Inception-style): area fraction in [scale_lo, scale_hi], aspect ratio
// w/h log-uniform in [ratio_lo, ratio_hi], integer box inside the image; after 10 rejected tries
// the largest centred box with a ratio in range. Flipped with probability flip_p.
std::vector<CropBox> sample_resized_crops(int64_t B, int64_t H, int64_t W, float scale_lo,
                                          float scale_hi, float ratio_lo, float ratio_hi,
                                          float flip_p, Generator& g);

// Applying. src: one image (C, H, W); dst: (C, out_h, out_w).
void crop_image(const float* src, int64_t C, int64_t H, int64_t W, const CropBox& box,
                int out_h, int out_w, float* dst);
// The same from bytes: values / 255, then normalised per channel (padding too, as if the padded
// image had been normalised), in one pass.
void crop_image_u8(const uint8_t* src, int64_t C, int64_t H, int64_t W, const CropBox& box,
                   int out_h, int out_w, float* dst, const Normalize& norm = {});
// x: (B, C, H, W), boxes: B of them -> (B, C, out_h, out_w)
Tensor apply_crops(const Tensor& x, const std::vector<CropBox>& boxes, int out_h, int out_w);

// ---- one-call transforms --------------------------------------------------------------------

// x: (B, C, H, W) -> (B, C, size, size)
Tensor random_crop(const Tensor& x, int size, int padding, Generator& g);
// x: (B, C, H, W) -> (B, C, H, W); each image mirrored left-right with probability p
Tensor random_hflip(const Tensor& x, float p, Generator& g);
Tensor hflip(const Tensor& x);
// x: (B, C, H, W) -> (B, C, out_size, out_size), bilinear, a box per image
Tensor random_resized_crop(const Tensor& x, int out_size, float scale_lo, float scale_hi,
                           float ratio_lo, float ratio_hi, Generator& g);

// ---- what the loader applies ----------------------------------------------------------------

enum class CropMode { None, Pad /* random_crop */, Resized /* random_resized_crop */ };

struct Augment {
  CropMode crop = CropMode::None;
  int size = 0;     // output side; 0 keeps the image size (Pad, None)
  int padding = 0;  // Pad
  float scale_lo = 0.08f, scale_hi = 1.f, ratio_lo = 3.f / 4.f, ratio_hi = 4.f / 3.f;  // Resized
  float hflip_p = 0.f;

  static Augment none() { return {}; }
  static Augment crop_flip(int padding, float hflip_p = 0.5f) {
    Augment a;
    a.crop = CropMode::Pad, a.padding = padding, a.hflip_p = hflip_p;
    return a;
  }
  static Augment resized_crop_flip(int size, float scale_lo, float scale_hi, float hflip_p = 0.5f) {
    Augment a;
    a.crop = CropMode::Resized, a.size = size, a.scale_lo = scale_lo, a.scale_hi = scale_hi;
    a.hflip_p = hflip_p;
    return a;
  }
  bool random() const { return crop != CropMode::None || hflip_p > 0.f; }
  int out_h(int64_t H) const { return size > 0 ? size : int(H); }
  int out_w(int64_t W) const { return size > 0 ? size : int(W); }
  // One box per image (identity boxes when nothing is random; no generator draws then).
  std::vector<CropBox> sample(int64_t B, int64_t H, int64_t W, Generator& g) const;
};

}  // namespace mv::datasets
