#include "datasets/two_view.h"

#include <cmath>

#include "engine/error.h"

namespace mv::datasets {
namespace {

void check_area(const char* which, float lo, float hi) {
  MV_CHECK(lo > 0.f && lo <= hi && hi <= 1.f, "TwoViewConfig: ", which, " area range [", lo, ", ",
           hi, "] must satisfy 0 < lo <= hi <= 1");
}

void check_grid(const char* op, int H, int W, int patch) {
  MV_CHECK(patch > 0 && H > 0 && W > 0 && H % patch == 0 && W % patch == 0, op, ": patch ", patch,
           " does not divide the view size ", H, "x", W);
}

}  // namespace

TwoViewConfig TwoViewConfig::for_image_size(int size) {
  TwoViewConfig c;
  if (size == 28) {
    c.area1_lo = 0.35f, c.area1_hi = 0.8f, c.area2_lo = 0.7f, c.area2_hi = 1.f;
  } else {
    c.area1_lo = 0.25f, c.area1_hi = 0.8f, c.area2_lo = 0.6f, c.area2_hi = 1.f;
  }
  return c;
}

void TwoViewConfig::validate(int64_t H, int64_t W) const {
  check_area("view-1", area1_lo, area1_hi);
  check_area("view-2", area2_lo, area2_hi);
  MV_CHECK(ratio_lo > 0.f && ratio_lo <= ratio_hi, "TwoViewConfig: bad aspect ratio range [",
           ratio_lo, ", ", ratio_hi, "]");
  MV_CHECK(flip_p >= 0.f && flip_p <= 1.f, "TwoViewConfig: flip probability ", flip_p,
           " is outside [0, 1]");
  MV_CHECK(size >= 0, "TwoViewConfig: view size ", size, " is negative");
  check_grid("TwoViewConfig", out_h(H), out_w(W), patch);
}

int64_t TwoViewConfig::tokens(int64_t H, int64_t W) const {
  check_grid("TwoViewConfig", out_h(H), out_w(W), patch);
  return int64_t(out_h(H) / patch) * (out_w(W) / patch) + 1;
}

std::vector<int64_t> pair_patches(const CropBox& box1, const CropBox& box2, int H, int W, int patch,
                                  bool cls_pair) {
  check_grid("pair_patches", H, W, patch);
  MV_CHECK(box1.height > 0 && box1.width > 0 && box2.height > 0 && box2.width > 0,
           "pair_patches: empty box (", box1.height, "x", box1.width, " and ", box2.height, "x",
           box2.width, ")");
  const int gh = H / patch, gw = W / patch;
  std::vector<int64_t> pairs(size_t(gh) * gw + 1, -1);
  pairs[0] = cls_pair ? 0 : -1;
  const float half = 0.5f * float(patch - 1);  // patch centre, from its first pixel centre
  for (int r = 0; r < gh; ++r)
    for (int c = 0; c < gw; ++c) {
      auto [sy, sx] = box_to_source(box1, H, W, float(r * patch) + half, float(c * patch) + half);
      auto [y2, x2] = source_to_box(box2, H, W, sy, sx);
      // Patch r2 owns pixels r2*p .. r2*p+p-1: the interval [r2*p - 0.5, (r2+1)*p - 0.5).
      const double fy = std::floor((double(y2) + 0.5) / patch);
      const double fx = std::floor((double(x2) + 0.5) / patch);
      if (fy < 0 || fy >= gh || fx < 0 || fx >= gw) continue;
      pairs[size_t(1 + r * gw + c)] = 1 + int64_t(fy) * gw + int64_t(fx);
    }
  return pairs;
}

Tensor pair_batch(const std::vector<CropBox>& boxes1, const std::vector<CropBox>& boxes2, int H,
                  int W, int patch, bool cls_pair) {
  MV_CHECK(boxes1.size() == boxes2.size(), "pair_batch: ", boxes1.size(), " view-1 boxes but ",
           boxes2.size(), " view-2 boxes");
  check_grid("pair_batch", H, W, patch);
  const int64_t B = int64_t(boxes1.size()), T = int64_t(H / patch) * (W / patch) + 1;
  Tensor out = Tensor::empty({B, T}, DType::I64);
  int64_t* p = out.data<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    const std::vector<int64_t> row =
        pair_patches(boxes1[size_t(i)], boxes2[size_t(i)], H, W, patch, cls_pair);
    std::copy(row.begin(), row.end(), p + i * T);
  }
  return out;
}

TwoViewBoxes sample_two_views(int64_t B, int64_t H, int64_t W, const TwoViewConfig& cfg,
                              Generator& g) {
  cfg.validate(H, W);
  TwoViewBoxes v;
  v.view1 = sample_resized_crops(B, H, W, cfg.area1_lo, cfg.area1_hi, cfg.ratio_lo, cfg.ratio_hi,
                                 cfg.flip_p, g);
  v.view2 = sample_resized_crops(B, H, W, cfg.area2_lo, cfg.area2_hi, cfg.ratio_lo, cfg.ratio_hi,
                                 cfg.flip_p, g);
  return v;
}

TwoViews make_two_views(const Tensor& x, const TwoViewConfig& cfg, Generator& g) {
  MV_CHECK(x.defined() && x.ndim() == 4, "make_two_views: expected a batch (B, C, H, W), got ",
           x.defined() ? x.str() : std::string("an undefined tensor"));
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  const int oh = cfg.out_h(H), ow = cfg.out_w(W);
  TwoViews t;
  t.boxes = sample_two_views(B, H, W, cfg, g);
  t.images = apply_crops(x, t.boxes.view1, oh, ow);
  t.images2 = apply_crops(x, t.boxes.view2, oh, ow);
  t.pairs = pair_batch(t.boxes.view1, t.boxes.view2, oh, ow, cfg.patch, cfg.cls_pair);
  return t;
}

}  // namespace mv::datasets
