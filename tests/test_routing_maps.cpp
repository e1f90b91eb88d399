// Routing pictures: per-patch maps from hand-made Routes, palette, drawing, and an end-to-end run
// of a tiny MoE-ViT writing real PNG files.
#include <cmath>
#include <filesystem>
#include <fstream>

#include "datasets/synthetic.h"
#include "report/draw.h"
#include "report/pictures.h"
#include "report/routing_maps.h"
#include "tests/helpers.h"

using namespace mv;
using namespace mv::models;
using namespace mv::report;

namespace {

// (width, height) from a PNG file's IHDR chunk, after checking the 8-byte signature.
std::pair<int, int> png_size(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<unsigned char> h(24);
  f.read(reinterpret_cast<char*>(h.data()), 24);
  REQUIRE(f.gcount() == 24);
  const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  for (int i = 0; i < 8; ++i) REQUIRE(h[size_t(i)] == sig[i]);
  CHECK(std::string(h.begin() + 12, h.begin() + 16) == "IHDR");
  auto be = [&](int o) { return int(h[size_t(o)]) << 24 | int(h[size_t(o + 1)]) << 16 | int(h[size_t(o + 2)]) << 8 | int(h[size_t(o + 3)]); };
  return {be(16), be(20)};
}

double dist(Rgb a, Rgb b) {
  return std::sqrt(double(a.r - b.r) * (a.r - b.r) + double(a.g - b.g) * (a.g - b.g) +
                   double(a.b - b.b) * (a.b - b.b));
}

}  // namespace

TEST_CASE("routing maps: top-1 expert per patch, CLS dropped, per-image and per-batch groups") {
  // 2 images of 1 CLS + 3 patches, E = 3.
  const std::vector<float> p = {
      0.9f, 0.05f, 0.05f,  0.1f, 0.7f, 0.2f,  0.2f, 0.2f, 0.6f,  0.5f, 0.4f, 0.1f,  // image 0
      0.1f, 0.1f, 0.8f,    0.3f, 0.3f, 0.4f,  0.4f, 0.4f, 0.2f,  0.1f, 0.8f, 0.1f,  // image 1
  };
  Route r;
  r.probs = Tensor::from(p, {2, 4, 3});
  CHECK(patch_top1_experts(r, 2) == std::vector<int>{1, 2, 0, 2, 0, 1});  // tie 0.4/0.4 -> 0
  r.probs = Tensor::from(p, {1, 8, 3});  // the whole batch as one group: same flat tokens
  CHECK(patch_top1_experts(r, 2) == std::vector<int>{1, 2, 0, 2, 0, 1});
  CHECK_THROWS_WITH_AS(patch_top1_experts(r, 3), doctest::Contains("does not split into 3 images"),
                       mv::Error);
  CHECK(changed_patches({1, 2, 0}, {1, 0, 0}) == std::vector<uint8_t>{0, 1, 0});
}

TEST_CASE("routing maps: kept / dropped first choice from the slots") {
  Route r;
  r.probs = Tensor::zeros({2, 3, 4});
  // (G=2, N=3, k=2): only the first choice (rank 0) decides; CLS (token 0) is skipped.
  r.slot = Tensor::from_i64({5, -1,  -1, 3,  0, -1,   2, 2,  1, -1,  -1, -1}, {2, 3, 2});
  CHECK(patch_top1_kept(r, 2) == std::vector<uint8_t>{0, 1, 1, 0});
  Route soft;
  soft.probs = r.probs;
  CHECK_THROWS_WITH_AS(patch_top1_kept(soft, 2), doctest::Contains("token-choice"), mv::Error);
}

TEST_CASE("routing maps: soft dispatch weights of a slot and min/max normalisation") {
  Route r;
  // G=1, N=4 (1 image: CLS + 3 patches), 2 slots. Slot 1 logits: 0, ln 2, ln 3, ln 4.
  const float l2 = std::log(2.f), l3 = std::log(3.f), l4 = std::log(4.f);
  r.soft_logits = Tensor::from({5.f, 0.f, -1.f, l2, 0.f, l3, 2.f, l4}, {1, 4, 2});
  test::check_close(Tensor::from(soft_slot_weights(r, 1, 1), {3}), {0.2f, 0.3f, 0.4f}, 1e-6f);
  CHECK_THROWS_WITH_AS(soft_slot_weights(r, 1, 2), doctest::Contains("slot 2 out of range"), mv::Error);
  Route hard;
  hard.probs = Tensor::zeros({1, 4, 2});
  CHECK_THROWS_WITH_AS(soft_slot_weights(hard, 1, 0), doctest::Contains("Soft MoE"), mv::Error);

  test::check_close(Tensor::from(normalize_min_max({2.f, 4.f, 3.f, 6.f}), {4}), {0.f, 0.5f, 0.25f, 1.f});
  test::check_close(Tensor::from(normalize_min_max({0.3f, 0.3f}), {2}), {0.f, 0.f});
  CHECK(heat_colour(0.f) == heat_colour(-1.f));
  CHECK(heat_colour(1.f) == heat_colour(2.f));
  // The ramp brightens: the sum of channels grows with t.
  auto sum = [](Rgb c) { return int(c.r) + c.g + c.b; };
  for (float t = 0.1f; t <= 1.f; t += 0.1f) CHECK(sum(heat_colour(t)) > sum(heat_colour(t - 0.1f)));
}

TEST_CASE("routing maps: palette colours are distinct and far from red and grey") {
  const std::vector<Rgb> p16 = expert_palette(16);
  for (size_t i = 0; i < p16.size(); ++i) {
    CHECK(dist(p16[i], kRed) > 100);
    const int mx = std::max({p16[i].r, p16[i].g, p16[i].b}), mn = std::min({p16[i].r, p16[i].g, p16[i].b});
    CHECK(mx - mn > 60);  // saturated: never mistaken for a greyed patch
    for (size_t j = 0; j < i; ++j) {
      INFO("colours " << j << " and " << i);
      CHECK(dist(p16[i], p16[j]) > 60);
    }
  }
  const std::vector<Rgb> p48 = expert_palette(48);
  for (size_t i = 0; i < p48.size(); ++i) {
    CHECK(dist(p48[i], kRed) > 60);
    for (size_t j = 0; j < i; ++j) CHECK(dist(p48[i], p48[j]) > 12);
  }
  CHECK(std::vector<Rgb>(p48.begin(), p48.begin() + 16) == p16);  // a prefix: colours stay put
  CHECK(colour_name(0) == "blue");
  CHECK(hex(Rgb{0, 114, 230}) == "#0072e6");
}

TEST_CASE("routing maps: outline puts red exactly on the border pixels of marked patches") {
  const int grid = 3, cell = 5;
  const Rgb bg{10, 20, 30};
  for (int thickness : {1, 2}) {
    RgbImage img(grid * cell, grid * cell, bg);
    const std::vector<uint8_t> mask = {0, 1, 0, 0, 1, 0, 1, 0, 0};  // patches 1, 4 (below 1), 6
    outline_patches(img, grid, cell, mask, kRed, thickness);
    for (int y = 0; y < img.height; ++y)
      for (int x = 0; x < img.width; ++x) {
        const int p = (y / cell) * grid + x / cell, i = y % cell, j = x % cell;
        const bool border = std::min({i, j, cell - 1 - i, cell - 1 - j}) < thickness;
        INFO("pixel (" << x << ", " << y << "), thickness " << thickness);
        CHECK(img.at(x, y) == (mask[size_t(p)] && border ? kRed : bg));
      }
  }
  RgbImage wrong(14, 15);
  CHECK_THROWS_WITH_AS(outline_patches(wrong, 3, 5, std::vector<uint8_t>(9)),
                       doctest::Contains("is not 3 x 3 patches of 5 pixels"), mv::Error);
}

TEST_CASE("routing maps: tint, grey-out, heat, upscale and layout") {
  const Rgb bg{100, 100, 100};
  RgbImage img(4, 4, bg);  // 2 x 2 patches of 2 pixels
  const std::vector<Rgb> pal = {{200, 0, 100}, {0, 200, 0}};
  tint_patches(img, 2, 2, {0, -1, 1, 0}, pal, 0.5f);
  CHECK(img.at(0, 0) == Rgb{150, 50, 100});
  CHECK(img.at(3, 1) == bg);  // label -1: untouched
  CHECK(img.at(1, 3) == Rgb{50, 150, 50});
  CHECK_THROWS_WITH_AS(tint_patches(img, 2, 2, {0, 0, 2, 0}, pal, 0.5f),
                       doctest::Contains("label 2 has no colour"), mv::Error);

  RgbImage g(8, 8, Rgb{0, 200, 0});  // 1 x 1 patch of 8 pixels
  grey_patches(g, 1, 8, {1});
  int hatch = 0;
  for (int y = 0; y < 8; ++y)
    for (int x = 0; x < 8; ++x) {
      const Rgb c = g.at(x, y);
      CHECK((c.r == c.g && c.g == c.b));  // no colour left
      hatch += c.r == 70;
    }
  CHECK(hatch == 16);  // (i + j) % 4 == 0 on an 8 x 8 patch: sums 0, 4, 8, 12: 1 + 5 + 7 + 3
  RgbImage h(2, 2, Rgb{0, 0, 0});
  heat_patches(h, 1, 2, {1.f}, 1.f);
  CHECK(h.at(1, 1) == heat_colour(1.f));

  // Upscale: normalised grey 0 -> mean 0.5 back to 128, each pixel 2 x 2.
  const std::vector<float> px = {0.f, 1.f, -1.f, 10.f};  // x * 0.5 + 0.5: 0.5, 1, 0, clamped 1
  RgbImage u = upscale_image(px.data(), 1, 2, datasets::Normalize{{0.5f}, {0.5f}}, 2);
  CHECK(u.width == 4);
  CHECK(u.at(1, 1) == Rgb{128, 128, 128});
  CHECK(u.at(2, 0) == Rgb{255, 255, 255});
  CHECK(u.at(0, 3) == Rgb{0, 0, 0});
  CHECK(u.at(3, 3) == Rgb{255, 255, 255});

  RgbImage a(3, 2, Rgb{1, 1, 1}), b(2, 4, Rgb{2, 2, 2});
  RgbImage s = hstack({a, b}, 1, Rgb{9, 9, 9});
  CHECK((s.width == 6 && s.height == 4));
  CHECK(s.at(3, 0) == Rgb{9, 9, 9});
  CHECK(s.at(0, 3) == Rgb{9, 9, 9});  // below the shorter image
  CHECK(s.at(5, 3) == Rgb{2, 2, 2});
  RgbImage t = tile({a, a, a}, 2, 2, Rgb{9, 9, 9});
  CHECK((t.width == 8 && t.height == 6));
  CHECK(t.at(1, 4) == Rgb{1, 1, 1});  // the third image starts the second row
  CHECK(t.at(6, 5) == Rgb{9, 9, 9});  // the missing 4th cell stays background
}

TEST_CASE("routing maps: a tiny MoE-ViT writes the four pictures as PNG files") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / "moevit_test_routing_maps";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const datasets::Dataset data = datasets::make_synthetic(6, 1, 28, 10, 5);
  const datasets::Normalize norm{{0.5f}, {0.5f}};
  const Tensor x = dataset_images(data, 1, 3, norm);  // images 1, 2, 3
  REQUIRE(x.shape() == Shape{3, 1, 28, 28});
  PictureStyle st;
  st.scale = 2, st.columns = 2, st.gap = 3, st.pair_gap = 1;
  const int side = 28 * 2;  // 4 x 4 patches of 7 px, scaled by 2

  ViTConfig c{28, 1, 7, 16, 2, 2, 32, 10};
  c.moe_placement = "every-2";
  c.moe.mlp_dim = 16;
  c.moe.router.experts = 4;
  c.moe.router.k = 1;
  ViT model(c, 7);
  const std::vector<Route> routes = route_images(model, x);
  REQUIRE(routes.size() == 1);
  CHECK(model.training());  // left in the mode it was in

  const std::string experts = (dir / "experts.png").string();
  RgbImage em = expert_map_picture(x, norm, 7, routes[0], st);
  write_png(experts, em.width, em.height, em.rgb);
  CHECK(png_size(experts) == std::pair<int, int>{2 * side + 3, 2 * side + 3});

  // Noise: zero noise changes nothing; heavy noise changes some patch.
  NoisePicture n0 = noise_picture(x, add_pixel_noise(x, 0.f, 1), norm, 7, routes[0],
                                  route_images(model, add_pixel_noise(x, 0.f, 1))[0], st);
  CHECK(n0.changed == 0);
  CHECK(n0.patches == 3 * 16);
  const Tensor xn = add_pixel_noise(x, 3.f, 1);
  NoisePicture np = noise_picture(x, xn, norm, 7, routes[0], route_images(model, xn)[0], st);
  CHECK(np.changed > 0);
  const std::string noise = (dir / "noise.png").string();
  write_png(noise, np.image.width, np.image.height, np.image.rgb);
  CHECK(png_size(noise) == std::pair<int, int>{2 * (2 * side + 1) + 3, 2 * side + 3});

  // Capacity: at c = 0.25 (C = ceil(17 * 0.25 / 4) = 2 per expert) at most 8 of 17 tokens keep
  // their choice; the routers' settings come back afterwards.
  auto [plain, bpr] = route_with_and_without_bpr(model, x, 0.25f);
  CHECK(model.moe_layers()[0]->router->config.capacity_eval == c.moe.router.capacity_eval);
  CHECK(!model.moe_layers()[0]->router->config.bpr);
  CapacityPicture cp = capacity_picture(x, norm, 7, plain[0], bpr[0], st);
  CHECK(cp.patches == 48);
  CHECK(cp.kept_plain <= 3 * 8);
  CHECK(cp.kept_bpr <= 3 * 8);
  CHECK(cp.kept_plain < cp.patches);
  const std::string cap = (dir / "capacity.png").string();
  write_png(cap, cp.image.width, cp.image.height, cp.image.rgb);
  CHECK(png_size(cap) == std::pair<int, int>{2 * (2 * side + 1) + 3, 2 * side + 3});

  // Soft MoE: a slot's heat map; the capacity picture refuses it.
  ViTConfig cs = c;
  cs.moe.router.type = "soft";
  cs.moe.router.slots = 2;
  ViT soft(cs, 8);
  const std::vector<Route> rs = route_images(soft, x);
  RgbImage sp = soft_picture(x, norm, 7, rs[0], 7, st);
  const std::string sfile = (dir / "soft.png").string();
  write_png(sfile, sp.width, sp.height, sp.rgb);
  CHECK(png_size(sfile) == std::pair<int, int>{2 * side + 3, 2 * side + 3});
  CHECK_THROWS_WITH_AS(route_with_and_without_bpr(soft, x, 0.5f), doctest::Contains("token-choice"),
                       mv::Error);
  CHECK_THROWS_WITH_AS(soft_picture(x, norm, 7, routes[0], 0, st), doctest::Contains("Soft MoE"),
                       mv::Error);
  CHECK_THROWS_WITH_AS(write_png((dir / "no" / "such" / "dir.png").string(), 2, 2,
                                 std::vector<uint8_t>(12)),
                       doctest::Contains("cannot write"), mv::Error);
  fs::remove_all(dir);
}
