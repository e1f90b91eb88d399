#include "datasets/transforms.h"

#include <algorithm>
#include <cmath>

#include "engine/error.h"
#include "engine/parallel.h"
#include "engine/philox.h"

namespace mv::datasets {
namespace {

void check_batch(const char* op, const Tensor& x) {
  MV_CHECK(x.defined(), op, ": undefined tensor");
  MV_CHECK(x.device() == Device::CPU && x.dtype() == DType::F32, op, ": expected a CPU F32 batch, got ",
           x.str());
  MV_CHECK(x.ndim() == 4, op, ": expected a batch (B, C, H, W), got ", x.str());
}

bool starts_with(const std::string& s, const char* p) { return s.rfind(p, 0) == 0; }

// One output row or column: which two source pixels it blends, and the weight of the second.
struct Tap {
  int64_t i0 = 0, i1 = 0;
  float w = 0;
  bool inside = false;  // false: the sample lies in the padding and reads 0
};

Tap make_tap(double s, int64_t n) {
  Tap t;
  if (s < -0.5 || s > double(n) - 0.5) return t;
  s = std::clamp(s, 0.0, double(n - 1));
  t.inside = true;
  t.i0 = int64_t(std::floor(s));
  t.i1 = std::min(t.i0 + 1, n - 1);
  t.w = float(s - double(t.i0));
  return t;
}

// dst = mul[c] * sample + add[c] per channel; samples in the padding are 0 before the affine
// map (as if the image had been padded, then normalised).
template <class T>
void crop_impl(const T* src, const float* mul, const float* add, int64_t C, int64_t H, int64_t W,
               const CropBox& box, int out_h, int out_w, float* dst) {
  MV_CHECK(out_h > 0 && out_w > 0, "crop_image: output size ", out_h, "x", out_w, " is empty");
  MV_CHECK(box.height > 0 && box.width > 0, "crop_image: empty box ", box.height, "x", box.width);
  if (box.height == float(out_h) && box.width == float(out_w) && box.top == std::floor(box.top) &&
      box.left == std::floor(box.left)) {
    // Pixel-aligned window (random_crop, flips, identity): a copy, the same values the bilinear
    // path below gives with zero weights, only faster. Output columns [x0, x1) read the image.
    const int64_t top = int64_t(box.top), left = int64_t(box.left);
    int64_t x0 = std::clamp<int64_t>(-left, 0, out_w), x1 = std::clamp<int64_t>(W - left, 0, out_w);
    if (box.flip) {  // output ox reads source column left + out_w - 1 - ox
      const int64_t a = std::clamp<int64_t>(left + out_w - W, 0, out_w);
      const int64_t b = std::clamp<int64_t>(left + out_w, 0, out_w);
      x0 = a, x1 = b;
    }
    for (int64_t c = 0; c < C; ++c) {
      const float m = mul[c], pad = add[c];
      for (int oy = 0; oy < out_h; ++oy) {
        float* out = dst + (c * out_h + oy) * out_w;
        const int64_t sy = top + oy;
        if (sy < 0 || sy >= H || x0 >= x1) {
          std::fill(out, out + out_w, pad);
          continue;
        }
        std::fill(out, out + x0, pad);
        std::fill(out + x1, out + out_w, pad);
        const T* row = src + (c * H + sy) * W;
        if (!box.flip) {
          const T* r = row + left;
          for (int64_t ox = x0; ox < x1; ++ox) out[ox] = m * float(r[ox]) + pad;
        } else {
          const T* r = row + left + out_w - 1;
          for (int64_t ox = x0; ox < x1; ++ox) out[ox] = m * float(r[-ox]) + pad;
        }
      }
    }
    return;
  }
  // Coordinates in double so that samples meant to land on pixel centres do.
  std::vector<Tap> rows(static_cast<size_t>(out_h)), cols(static_cast<size_t>(out_w));
  for (int oy = 0; oy < out_h; ++oy)
    rows[size_t(oy)] = make_tap(box.top + (oy + 0.5) * double(box.height) / out_h - 0.5, H);
  for (int ox = 0; ox < out_w; ++ox) {
    const int mx = box.flip ? out_w - 1 - ox : ox;
    cols[size_t(ox)] = make_tap(box.left + (mx + 0.5) * double(box.width) / out_w - 0.5, W);
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* plane = src + c * H * W;
    const float m = mul[c], pad = add[c];
    for (int oy = 0; oy < out_h; ++oy) {
      float* out = dst + (c * out_h + oy) * out_w;
      const Tap& r = rows[size_t(oy)];
      if (!r.inside) {
        std::fill(out, out + out_w, pad);
        continue;
      }
      const T *r0 = plane + r.i0 * W, *r1 = plane + r.i1 * W;
      for (int ox = 0; ox < out_w; ++ox) {
        const Tap& t = cols[size_t(ox)];
        if (!t.inside) {
          out[ox] = pad;
          continue;
        }
        const float top = (1.f - t.w) * float(r0[t.i0]) + t.w * float(r0[t.i1]);
        const float bot = (1.f - t.w) * float(r1[t.i0]) + t.w * float(r1[t.i1]);
        out[ox] = m * ((1.f - r.w) * top + r.w * bot) + pad;
      }
    }
  }
}

// Per-channel affine maps: identity, or bytes -> [0, 1] -> normalised.
struct Affine {
  std::vector<float> mul, add;
  Affine(int64_t C, float scale, const Normalize* n) : mul(size_t(C), scale), add(size_t(C), 0.f) {
    if (!n || !n->enabled()) return;
    MV_CHECK(int64_t(n->mean.size()) == C && int64_t(n->std.size()) == C, "crop_image: ", C,
             " channels but mean/std have ", n->mean.size(), "/", n->std.size());
    for (int64_t c = 0; c < C; ++c) {
      MV_CHECK(n->std[size_t(c)] > 0.f, "crop_image: std ", n->std[size_t(c)], " is not positive");
      mul[size_t(c)] = scale / n->std[size_t(c)];
      add[size_t(c)] = -n->mean[size_t(c)] / n->std[size_t(c)];
    }
  }
};

}  // namespace

Normalize Normalize::for_dataset(const std::string& name) {
  if (starts_with(name, "fashion-mnist")) return fashion_mnist();
  if (starts_with(name, "mnist")) return mnist();
  if (starts_with(name, "cifar100")) return cifar100();
  if (starts_with(name, "cifar10")) return cifar10();
  return none();
}

void normalize_(Tensor& x, const Normalize& n) {
  check_batch("normalize", x);
  if (!n.enabled()) return;
  MV_CHECK(x.is_contiguous(), "normalize_: batch ", x.str(), " is not contiguous");
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  MV_CHECK(int64_t(n.mean.size()) == C && int64_t(n.std.size()) == C, "normalize: batch ",
           x.str(), " has ", C, " channels but mean/std have ", n.mean.size(), "/", n.std.size());
  for (float s : n.std) MV_CHECK(s > 0.f, "normalize: std ", s, " is not positive");
  float* p = x.data<float>();
  parallel_for(B * C, HW, [&](int64_t b, int64_t e) {
    for (int64_t bc = b; bc < e; ++bc) {
      const int64_t c = bc % C;
      const float m = n.mean[size_t(c)], inv = 1.f / n.std[size_t(c)];
      float* q = p + bc * HW;
      for (int64_t i = 0; i < HW; ++i) q[i] = (q[i] - m) * inv;
    }
  });
}

Tensor normalize(const Tensor& x, const Normalize& n) {
  check_batch("normalize", x);
  Tensor y = x.clone();
  normalize_(y, n);
  return y;
}

std::pair<float, float> box_to_source(const CropBox& b, int out_h, int out_w, float oy, float ox) {
  const double mx = b.flip ? double(out_w) - 1.0 - ox : double(ox);
  return {float(b.top + (oy + 0.5) * double(b.height) / out_h - 0.5),
          float(b.left + (mx + 0.5) * double(b.width) / out_w - 0.5)};
}

std::pair<float, float> source_to_box(const CropBox& b, int out_h, int out_w, float sy, float sx) {
  const double oy = (sy + 0.5 - b.top) * out_h / double(b.height) - 0.5;
  const double mx = (sx + 0.5 - b.left) * out_w / double(b.width) - 0.5;
  return {float(oy), float(b.flip ? double(out_w) - 1.0 - mx : mx)};
}

std::vector<CropBox> sample_random_crops(int64_t B, int64_t H, int64_t W, int size, int padding,
                                         float flip_p, Generator& g) {
  MV_CHECK(size > 0 && padding >= 0, "random_crop: bad size ", size, " or padding ", padding);
  const int64_t ry = H + 2 * padding - size + 1, rx = W + 2 * padding - size + 1;
  MV_CHECK(ry >= 1 && rx >= 1, "random_crop: crop ", size, "x", size, " does not fit an image of ",
           H, "x", W, " padded by ", padding);
  MV_CHECK(flip_p >= 0.f && flip_p <= 1.f, "random_crop: flip probability ", flip_p,
           " is outside [0, 1]");
  const uint64_t off = g.take(uint64_t(B));  // one block per image: top, left, flip
  std::vector<CropBox> boxes(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) {
    const philox::U4 r = philox::block(g.seed, off + uint64_t(i));
    boxes[size_t(i)] = {float(int64_t(r.x % uint64_t(ry)) - padding),
                        float(int64_t(r.y % uint64_t(rx)) - padding), float(size), float(size),
                        philox::to_unit(r.z) < flip_p};
  }
  return boxes;
}

std::vector<CropBox> sample_resized_crops(int64_t B, int64_t H, int64_t W, float scale_lo,
                                          float scale_hi, float ratio_lo, float ratio_hi,
                                          float flip_p, Generator& g) {
  MV_CHECK(scale_lo > 0.f && scale_lo <= scale_hi, "random_resized_crop: bad scale range [",
           scale_lo, ", ", scale_hi, "]");
  MV_CHECK(ratio_lo > 0.f && ratio_lo <= ratio_hi, "random_resized_crop: bad ratio range [",
           ratio_lo, ", ", ratio_hi, "]");
  MV_CHECK(flip_p >= 0.f && flip_p <= 1.f, "random_resized_crop: flip probability ", flip_p,
           " is outside [0, 1]");
  constexpr int kTries = 10, kBlocks = kTries + 1;  // a block per try, one for the flip
  const uint64_t off = g.take(uint64_t(B) * kBlocks);
  const double area = double(H) * double(W);
  const double lr0 = std::log(double(ratio_lo)), lr1 = std::log(double(ratio_hi));
  std::vector<CropBox> boxes(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) {
    const uint64_t base = off + uint64_t(i) * kBlocks;
    CropBox& bx = boxes[size_t(i)];
    bool found = false;
    for (int t = 0; t < kTries && !found; ++t) {
      const philox::U4 r = philox::block(g.seed, base + uint64_t(t));
      const double target = area * (scale_lo + (scale_hi - scale_lo) * double(philox::to_unit(r.x)));
      const double ar = std::exp(lr0 + (lr1 - lr0) * double(philox::to_unit(r.y)));
      const int64_t w = std::llround(std::sqrt(target * ar)), h = std::llround(std::sqrt(target / ar));
      if (w <= 0 || h <= 0 || w > W || h > H) continue;
      bx.top = float(int64_t(r.z % uint64_t(H - h + 1)));
      bx.left = float(int64_t(r.w % uint64_t(W - w + 1)));
      bx.height = float(h), bx.width = float(w);
      found = true;
    }
    if (!found) {  // centred, whole image clipped to the ratio range
      int64_t w = W, h = H;
      const double in_ratio = double(W) / double(H);
      if (in_ratio < ratio_lo) h = std::max<int64_t>(1, std::llround(double(w) / ratio_lo));
      else if (in_ratio > ratio_hi) w = std::max<int64_t>(1, std::llround(double(h) * ratio_hi));
      bx = {float((H - h) / 2), float((W - w) / 2), float(h), float(w), false};
    }
    bx.flip = philox::to_unit(philox::block(g.seed, base + kTries).x) < flip_p;
  }
  return boxes;
}

void crop_image(const float* src, int64_t C, int64_t H, int64_t W, const CropBox& box, int out_h,
                int out_w, float* dst) {
  const Affine a(C, 1.f, nullptr);
  crop_impl(src, a.mul.data(), a.add.data(), C, H, W, box, out_h, out_w, dst);
}

void crop_image_u8(const uint8_t* src, int64_t C, int64_t H, int64_t W, const CropBox& box,
                   int out_h, int out_w, float* dst, const Normalize& norm) {
  const Affine a(C, 1.f / 255.f, &norm);
  crop_impl(src, a.mul.data(), a.add.data(), C, H, W, box, out_h, out_w, dst);
}

Tensor apply_crops(const Tensor& x, const std::vector<CropBox>& boxes, int out_h, int out_w) {
  check_batch("apply_crops", x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  MV_CHECK(int64_t(boxes.size()) == B, "apply_crops: ", boxes.size(), " boxes for batch ", x.str());
  MV_CHECK(out_h > 0 && out_w > 0, "apply_crops: output size ", out_h, "x", out_w, " is empty");
  for (const CropBox& b : boxes)
    MV_CHECK(b.height > 0 && b.width > 0, "apply_crops: empty box ", b.height, "x", b.width);
  Tensor xc = x.contiguous();
  Tensor y = Tensor::empty({B, C, out_h, out_w});
  const float* src = xc.data<float>();
  float* dst = y.data<float>();
  const Affine a(C, 1.f, nullptr);
  parallel_for(B, C * out_h * out_w * 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      crop_impl(src + i * C * H * W, a.mul.data(), a.add.data(), C, H, W, boxes[size_t(i)], out_h,
                out_w, dst + i * C * out_h * out_w);
  });
  return y;
}

Tensor random_crop(const Tensor& x, int size, int padding, Generator& g) {
  check_batch("random_crop", x);
  return apply_crops(x, sample_random_crops(x.size(0), x.size(2), x.size(3), size, padding, 0.f, g),
                     size, size);
}

Tensor random_hflip(const Tensor& x, float p, Generator& g) {
  check_batch("random_hflip", x);
  MV_CHECK(p >= 0.f && p <= 1.f, "random_hflip: probability ", p, " is outside [0, 1]");
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  const uint64_t off = g.take(uint64_t(B + 3) / 4);
  std::vector<CropBox> boxes(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i)
    boxes[size_t(i)] = full_box(H, W, philox::uniform(g.seed, off, uint64_t(i)) < p);
  return apply_crops(x, boxes, int(H), int(W));
}

Tensor hflip(const Tensor& x) {
  check_batch("hflip", x);
  return apply_crops(x, std::vector<CropBox>(size_t(x.size(0)), full_box(x.size(2), x.size(3), true)),
                     int(x.size(2)), int(x.size(3)));
}

Tensor random_resized_crop(const Tensor& x, int out_size, float scale_lo, float scale_hi,
                           float ratio_lo, float ratio_hi, Generator& g) {
  check_batch("random_resized_crop", x);
  MV_CHECK(out_size > 0, "random_resized_crop: output size ", out_size, " is not positive");
  return apply_crops(x,
                     sample_resized_crops(x.size(0), x.size(2), x.size(3), scale_lo, scale_hi,
                                          ratio_lo, ratio_hi, 0.f, g),
                     out_size, out_size);
}

std::vector<CropBox> Augment::sample(int64_t B, int64_t H, int64_t W, Generator& g) const {
  switch (crop) {
    case CropMode::Pad:
      MV_CHECK(size > 0 || H == W, "Augment: padded random crops of a non-square ", H, "x", W,
               " image need an explicit size");
      return sample_random_crops(B, H, W, size > 0 ? size : int(H), padding, hflip_p, g);
    case CropMode::Resized:
      return sample_resized_crops(B, H, W, scale_lo, scale_hi, ratio_lo, ratio_hi, hflip_p, g);
    case CropMode::None:
    default: {
      // The whole image (resized when `size` differs); flips only when asked for.
      std::vector<CropBox> boxes(size_t(B), full_box(H, W));
      if (hflip_p > 0.f) {
        const uint64_t off = g.take(uint64_t(B + 3) / 4);
        for (int64_t i = 0; i < B; ++i)
          boxes[size_t(i)].flip = philox::uniform(g.seed, off, uint64_t(i)) < hflip_p;
      }
      return boxes;
    }
  }
}

}  // namespace mv::datasets
