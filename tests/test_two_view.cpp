#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "datasets/loader.h"
#include "datasets/synthetic.h"
#include "datasets/two_view.h"
#include "engine/philox.h"
#include "tests/helpers.h"

using namespace mv;
using namespace mv::datasets;

namespace {

doctest::Contains has(const std::string& s) { return doctest::Contains(s.c_str()); }

// Centre of patch (r, c) of an H x W view cut by box, in source coordinates, written from the
// CropBox contract (not through box_to_source): output x maps to left + (x + 0.5) * w / W - 0.5,
// mirrored first when flipped.
std::pair<double, double> centre_in_source(const CropBox& b, int H, int W, int p, int r, int c) {
  const double oy = r * p + 0.5 * (p - 1), ox = c * p + 0.5 * (p - 1);
  const double mx = b.flip ? W - 1 - ox : ox;
  return {b.top + (oy + 0.5) * b.height / H - 0.5, b.left + (mx + 0.5) * b.width / W - 0.5};
}

// Random boxes with fractional corners, some reaching past the image, half of them flipped.
CropBox random_box(uint64_t seed, uint64_t i, int H, int W) {
  const philox::U4 r = philox::block(seed, i);
  const float h = 0.3f * H + 0.9f * H * philox::to_unit(r.x);
  const float w = 0.3f * W + 0.9f * W * philox::to_unit(r.y);
  return {-0.2f * H + (H - 0.6f * h) * philox::to_unit(r.z),
          -0.2f * W + (W - 0.6f * w) * philox::to_unit(r.w), h, w, (r.x & 1u) != 0};
}

bool same(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         (a.dtype() == DType::I64 ? a.to_vector<int64_t>() == b.to_vector<int64_t>()
                                  : a.to_vector<float>() == b.to_vector<float>());
}

bool same_boxes(const std::vector<CropBox>& a, const std::vector<CropBox>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].top != b[i].top || a[i].left != b[i].left || a[i].height != b[i].height ||
        a[i].width != b[i].width || a[i].flip != b[i].flip)
      return false;
  return true;
}

}  // namespace

TEST_CASE("pair_patches: identical views pair every patch with itself; CLS only when asked") {
  for (const CropBox& b : {full_box(28, 28), full_box(28, 28, true),
                           CropBox{3.f, 5.5f, 17.f, 20.25f, true}}) {
    std::vector<int64_t> p = pair_patches(b, b, 28, 28, 4, true);
    REQUIRE(p.size() == 50u);  // 7 x 7 patches + CLS
    for (int64_t t = 0; t < 50; ++t) CHECK(p[size_t(t)] == t);
    CHECK(pair_patches(b, b, 28, 28, 4, false)[0] == -1);
    CHECK(pair_patches(b, b, 28, 28, 4, false)[17] == 17);
  }
  // Non-square view, 2 x 3 patches of 4 px.
  std::vector<int64_t> p = pair_patches(full_box(8, 12), full_box(8, 12), 8, 12, 4, false);
  CHECK(p == std::vector<int64_t>{-1, 1, 2, 3, 4, 5, 6});
}

TEST_CASE("pair_patches: a mirrored view pairs (r, c) with (r, W/p - 1 - c)") {
  const int H = 32, W = 32, p = 4, g = 8;
  std::vector<int64_t> a = pair_patches(full_box(H, W), full_box(H, W, true), H, W, p, true);
  std::vector<int64_t> b = pair_patches(full_box(H, W, true), full_box(H, W), H, W, p, false);
  CHECK(a[0] == 0);
  CHECK(b[0] == -1);
  for (int r = 0; r < g; ++r)
    for (int c = 0; c < g; ++c) {
      CHECK(a[size_t(1 + r * g + c)] == 1 + r * g + (g - 1 - c));
      CHECK(b[size_t(1 + r * g + c)] == 1 + r * g + (g - 1 - c));
    }
}

TEST_CASE("pair_patches: a view 2 of the left half leaves the right half unpaired") {
  // View 2 = source columns [0, 8) stretched to 16 px: source x -> 2x + 0.5. View-1 patch
  // column c has source centre 4c + 1.5 -> view-2 x = 8c + 3.5, in view-2 column 2c + 1.
  const CropBox left_half{0.f, 0.f, 16.f, 8.f, false};
  std::vector<int64_t> p = pair_patches(full_box(16, 16), left_half, 16, 16, 4, false);
  for (int r = 0; r < 4; ++r) {
    CHECK(p[size_t(1 + r * 4 + 0)] == 1 + r * 4 + 1);
    CHECK(p[size_t(1 + r * 4 + 1)] == 1 + r * 4 + 3);
    CHECK(p[size_t(1 + r * 4 + 2)] == -1);
    CHECK(p[size_t(1 + r * 4 + 3)] == -1);
  }
}

TEST_CASE("pair_patches: a zoomed crop against a squashed, mirrored one, by hand") {
  // 12 x 12 views, 3 x 3 patches of 4 px; patch centres at 1.5, 5.5, 9.5.
  // View 1: rows 2..7, columns 4..9 of the source, zoomed 2x: centre o -> 0.5 (o + 0.5) + top - 0.5
  //   rows -> source y 2.5, 4.5, 6.5; columns -> source x 4.5, 6.5, 8.5.
  // View 2: top 1, height 5 (y -> (y - 0.5) * 2.4 - 0.5), left 2, width 10 (x -> (x - 1.5) * 1.2
  //   - 0.5, then mirrored: 11 - that).
  //   y 2.5 -> 4.3 (row 1), 4.5 -> 9.1 (row 2), 6.5 -> 13.9 (past 11.5: unpaired);
  //   x 4.5 -> 3.1 -> 7.9 (col 2), 6.5 -> 5.5 -> 5.5 (col 1), 8.5 -> 7.9 -> 3.1 (col 0).
  const CropBox v1{2.f, 4.f, 6.f, 6.f, false}, v2{1.f, 2.f, 5.f, 10.f, true};
  const std::vector<int64_t> want = {0, 1 + 3 + 2, 1 + 3 + 1, 1 + 3 + 0,  // row 0 -> view-2 row 1
                                     1 + 6 + 2, 1 + 6 + 1, 1 + 6 + 0,      // row 1 -> row 2
                                     -1, -1, -1};
  CHECK(pair_patches(v1, v2, 12, 12, 4, true) == want);
}

TEST_CASE("pair_patches: random boxes; each pair's view-2 patch holds the view-1 patch centre") {
  struct Case { int H, W, p; };
  int64_t paired = 0, unpaired = 0;
  for (const Case& k : {Case{28, 28, 4}, Case{32, 32, 4}, Case{12, 20, 2}, Case{30, 30, 5}}) {
    const int gh = k.H / k.p, gw = k.W / k.p;
    for (uint64_t i = 0; i < 300; ++i) {
      const CropBox b1 = random_box(11, 2 * i, k.H, k.W), b2 = random_box(11, 2 * i + 1, k.H, k.W);
      const std::vector<int64_t> pr = pair_patches(b1, b2, k.H, k.W, k.p, false);
      REQUIRE(pr.size() == size_t(gh * gw + 1));
      CHECK(pr[0] == -1);
      // Where view 2 sees the source: its output area [-0.5, H - 0.5] x [-0.5, W - 0.5].
      const double y_lo = b2.top - 0.5, y_hi = b2.top + b2.height - 0.5;
      const double x_lo = b2.left - 0.5, x_hi = b2.left + b2.width - 0.5;
      for (int r = 0; r < gh; ++r)
        for (int c = 0; c < gw; ++c) {
          const auto [sy, sx] = centre_in_source(b1, k.H, k.W, k.p, r, c);
          const int64_t t2 = pr[size_t(1 + r * gw + c)];
          const double e = 1e-3;  // away from the border, where rounding decides
          const bool inside = sy > y_lo + e && sy < y_hi - e && sx > x_lo + e && sx < x_hi - e;
          const bool outside = sy < y_lo - e || sy > y_hi + e || sx < x_lo - e || sx > x_hi + e;
          if (inside) CHECK(t2 >= 1);
          if (outside) CHECK(t2 == -1);
          if (t2 < 0) {
            ++unpaired;
            continue;
          }
          ++paired;
          REQUIRE(t2 <= gh * gw);
          const int r2 = int((t2 - 1) / gw), c2 = int((t2 - 1) % gw);
          const auto [qy, qx] = centre_in_source(b2, k.H, k.W, k.p, r2, c2);
          // Within half a view-2 patch (in source units) of the view-1 centre: it lies inside it.
          INFO("view-1 patch (" << r << ", " << c << ") -> view-2 (" << r2 << ", " << c2 << ")");
          CHECK(std::fabs(qy - sy) <= 0.5 * k.p * b2.height / k.H + 1e-3);
          CHECK(std::fabs(qx - sx) <= 0.5 * k.p * b2.width / k.W + 1e-3);
        }
    }
  }
  CHECK(paired > 1000);  // the boxes overlap often enough for both branches to be exercised
  CHECK(unpaired > 1000);
}

TEST_CASE("TwoViewConfig: defaults for 28 and 32 px pair most view-1 patches") {
  // The numbers behind the defaults' comment in datasets/two_view.h.
  for (int size : {28, 32}) {
    const TwoViewConfig cfg = TwoViewConfig::for_image_size(size);
    CHECK_NOTHROW(cfg.validate(size, size));
    CHECK(cfg.tokens(size, size) == (size / 4) * (size / 4) + 1);
    Generator g(3);
    const int64_t B = 4000;
    TwoViewBoxes v = sample_two_views(B, size, size, cfg, g);
    Tensor pairs = pair_batch(v.view1, v.view2, size, size, cfg.patch, cfg.cls_pair);
    const std::vector<int64_t> pv = pairs.to_vector<int64_t>();
    const int64_t T = cfg.tokens(size, size);
    int64_t paired = 0, empty = 0;
    float min_side = 1e9f;
    for (int64_t i = 0; i < B; ++i) {
      int64_t n = 0;
      for (int64_t t = 1; t < T; ++t) n += pv[size_t(i * T + t)] >= 0;
      paired += n;
      empty += n == 0;
      min_side = std::min({min_side, v.view1[size_t(i)].height, v.view1[size_t(i)].width});
    }
    const double frac = double(paired) / double(B * (T - 1));
    INFO(size << " px: " << 100 * frac << "% of view-1 patches paired, " << 100.0 * empty / B
              << "% of images with no pair, smallest view-1 side " << min_side << " px");
    CHECK(frac > (size == 28 ? 0.9 : 0.85));
    CHECK(empty == 0);
    CHECK(min_side >= 0.4f * size);  // shortest side: sqrt(0.25 * 3/4) = 0.43 of the image
  }
}

TEST_CASE("make_two_views: each view is its box's crop; pairs follow the boxes") {
  Generator gx(1);
  Tensor x = rand({3, 2, 16, 16}, gx);
  TwoViewConfig cfg = TwoViewConfig::for_image_size(32);
  cfg.size = 8;
  cfg.cls_pair = true;
  Generator g(9);
  TwoViews v = make_two_views(x, cfg, g);
  CHECK(v.images.shape() == Shape{3, 2, 8, 8});
  CHECK(same(v.images, apply_crops(x, v.boxes.view1, 8, 8)));
  CHECK(same(v.images2, apply_crops(x, v.boxes.view2, 8, 8)));
  CHECK(same(v.pairs, pair_batch(v.boxes.view1, v.boxes.view2, 8, 8, 4, true)));
  CHECK(v.pairs.shape() == Shape{3, 5});
  CHECK(g.offset == 2 * 3 * 11);  // two sample_resized_crops calls of 3 images
}

TEST_CASE("Loader two-view mode: both views of the same images, pairs from the boxes, seeded") {
  Dataset d = make_synthetic(37, 3, 16, 4, 5);
  const Normalize norm{{0.5f, 0.4f, 0.3f}, {0.25f, 0.5f, 1.f}};
  TwoViewConfig cfg = TwoViewConfig::for_image_size(16);
  cfg.cls_pair = true;
  Loader a(d, 8, true, 21, false, Augment::none(), norm);
  Loader b(d, 8, true, 21, false, Augment::none(), norm, /*prefetch=*/1);
  Loader other(d, 8, true, 22, false, Augment::none(), norm);
  a.set_two_view(cfg);
  b.set_two_view(cfg);
  other.set_two_view(cfg);
  REQUIRE(a.two_view().has_value());
  a.begin_epoch(2);
  b.begin_epoch(2);
  other.begin_epoch(2);
  int64_t batches = 0, flips1 = 0, flips2 = 0, differ = 0;
  for (Batch x; a.next(x); ++batches) {
    Batch y, z;
    REQUIRE(b.next(y));
    REQUIRE(other.next(z));
    const int64_t B = int64_t(x.indices.size());
    CHECK(B == (batches < 4 ? 8 : 5));
    CHECK(x.images.shape() == Shape{B, 3, 16, 16});
    CHECK(x.images2.shape() == Shape{B, 3, 16, 16});
    CHECK(x.pairs.shape() == Shape{B, 17});
    // Reproducible (b has a shorter prefetch queue: a different timing), and seed-dependent.
    CHECK(x.indices == y.indices);
    CHECK(same_boxes(x.boxes, y.boxes));
    CHECK(same_boxes(x.boxes2, y.boxes2));
    CHECK(same(x.images, y.images));
    CHECK(same(x.images2, y.images2));
    CHECK(same(x.pairs, y.pairs));
    differ += !same_boxes(x.boxes, z.boxes);
    // Pairs are pair_patches of the batch's boxes; images are those boxes' crops of the same
    // data set images, normalised.
    CHECK(same(x.pairs, pair_batch(x.boxes, x.boxes2, 16, 16, 4, true)));
    std::vector<float> want1(size_t(B * 3 * 256)), want2(want1.size());
    for (int64_t i = 0; i < B; ++i) {
      const uint8_t* src = d.image(x.indices[size_t(i)]);
      crop_image_u8(src, 3, 16, 16, x.boxes[size_t(i)], 16, 16, want1.data() + i * 768, norm);
      crop_image_u8(src, 3, 16, 16, x.boxes2[size_t(i)], 16, 16, want2.data() + i * 768, norm);
      flips1 += x.boxes[size_t(i)].flip;
      flips2 += x.boxes2[size_t(i)].flip;
      CHECK(x.pairs.to_vector<int64_t>()[size_t(i * 17)] == 0);
      CHECK(x.labels.to_vector<int64_t>()[size_t(i)] == d.labels[size_t(x.indices[size_t(i)])]);
    }
    CHECK(x.images.to_vector<float>() == want1);
    CHECK(x.images2.to_vector<float>() == want2);
    CHECK(!same_boxes(x.boxes, x.boxes2));
  }
  CHECK(batches == 5);
  CHECK(differ == 5);
  CHECK(flips1 > 5);  // flips are drawn per view
  CHECK(flips2 > 5);

  // A batch depends on (seed, epoch, k) only: restarting the epoch, the other loader's first
  // batch is the same again; another epoch gives other boxes.
  Batch first, again;
  a.begin_epoch(2);
  REQUIRE(a.next(first));
  b.begin_epoch(2);
  REQUIRE(b.next(again));
  CHECK(same(first.images2, again.images2));
  b.begin_epoch(3);
  REQUIRE(b.next(again));
  CHECK(!same_boxes(first.boxes, again.boxes));

  // Off again: one view, no pairs.
  a.set_two_view(std::nullopt);
  a.begin_epoch(0);
  REQUIRE(a.next(first));
  CHECK(!first.images2.defined());
  CHECK(!first.pairs.defined());
  CHECK(first.boxes2.empty());
}

TEST_CASE("two views: bad configs are rejected with the reason") {
  TwoViewConfig c = TwoViewConfig::for_image_size(28);
  CHECK_NOTHROW(c.validate(28, 28));
  auto with = [&](auto edit) {
    TwoViewConfig x = c;
    edit(x);
    return x;
  };
  CHECK_THROWS_WITH_AS(with([](TwoViewConfig& x) { x.area1_lo = 0.9f; }).validate(28, 28),
                       has("view-1 area range [0.9, 0.8]"), Error);
  CHECK_THROWS_WITH_AS(with([](TwoViewConfig& x) { x.area2_lo = 0.f; }).validate(28, 28),
                       has("view-2 area range [0, 1] must satisfy 0 < lo <= hi <= 1"), Error);
  CHECK_THROWS_WITH_AS(with([](TwoViewConfig& x) { x.area2_hi = 1.5f; }).validate(28, 28),
                       has("view-2 area range"), Error);
  CHECK_THROWS_WITH_AS(with([](TwoViewConfig& x) { x.ratio_lo = 2.f; }).validate(28, 28),
                       has("bad aspect ratio range"), Error);
  CHECK_THROWS_WITH_AS(with([](TwoViewConfig& x) { x.flip_p = 1.5f; }).validate(28, 28),
                       has("flip probability 1.5"), Error);
  CHECK_THROWS_WITH_AS(with([](TwoViewConfig& x) { x.patch = 5; }).validate(28, 28),
                       has("patch 5 does not divide the view size 28x28"), Error);
  CHECK_THROWS_WITH_AS(with([](TwoViewConfig& x) { x.size = 30; }).validate(28, 28),
                       has("patch 4 does not divide the view size 30x30"), Error);
  CHECK_THROWS_WITH_AS(pair_patches(full_box(28, 28), full_box(28, 28), 28, 28, 3),
                       has("pair_patches: patch 3 does not divide the view size 28x28"), Error);
  CHECK_THROWS_WITH_AS(pair_patches(full_box(28, 28), CropBox{}, 28, 28, 4), has("empty box"),
                       Error);
  CHECK_THROWS_WITH_AS(pair_batch({full_box(8, 8)}, {}, 8, 8, 4),
                       has("1 view-1 boxes but 0 view-2 boxes"), Error);
  Generator g(1);
  CHECK_THROWS_WITH_AS(make_two_views(Tensor::zeros({2, 1, 28, 28}),
                                      with([](TwoViewConfig& x) { x.area1_hi = 0.f; }), g),
                       has("view-1 area range"), Error);

  Dataset d = make_synthetic(8, 1, 28, 2, 1);
  Loader plain(d, 4, true, 1);
  CHECK_THROWS_WITH_AS(plain.set_two_view(with([](TwoViewConfig& x) { x.patch = 6; })),
                       has("patch 6 does not divide the view size 28x28"), Error);
  CHECK(!plain.two_view().has_value());
  Loader augmented(d, 4, true, 1, false, Augment::crop_flip(2));
  CHECK_THROWS_WITH_AS(augmented.set_two_view(c), has("construct the Loader with Augment::none()"),
                       Error);
}
