// ops::unfold (im2col, channels-last), Conv2d and the ViT's conv stem.
#include <vector>

#include "models/vit.h"
#include "ops/conv.h"
#include "ops/matmul.h"
#include "ops/shape.h"
#include "tests/helpers.h"
#include "train/config.h"

using namespace mv;
using test::check_close;
using test::check_grad;
using test::param;

namespace {
Tensor iota(const Shape& s) {
  std::vector<float> v(size_t(shape_numel(s)));
  for (size_t i = 0; i < v.size(); ++i) v[i] = float(i);
  return Tensor::from(v, s);
}

// A convolution by its definition, in double: x (B, H, W, C), w (k k C, O), b (O,) ->
// (B, Ho, Wo, O) flattened.
std::vector<float> direct_conv(const Tensor& x, const Tensor& w, const Tensor& b, int k, int s, int pad) {
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), O = w.size(1);
  const int64_t ho = (H + 2 * pad - k) / s + 1, wo = (W + 2 * pad - k) / s + 1;
  const std::vector<float> xv = x.to_vector<float>(), wv = w.to_vector<float>(), bv = b.to_vector<float>();
  std::vector<float> out;
  for (int64_t n = 0; n < B; ++n)
    for (int64_t oy = 0; oy < ho; ++oy)
      for (int64_t ox = 0; ox < wo; ++ox)
        for (int64_t o = 0; o < O; ++o) {
          double acc = bv[size_t(o)];
          for (int i = 0; i < k; ++i)
            for (int j = 0; j < k; ++j) {
              const int64_t y = oy * s + i - pad, xx = ox * s + j - pad;
              if (y < 0 || y >= H || xx < 0 || xx >= W) continue;
              for (int64_t c = 0; c < C; ++c)
                acc += double(xv[size_t(((n * H + y) * W + xx) * C + c)]) * wv[size_t(((i * k + j) * C + c) * O + o)];
            }
          out.push_back(float(acc));
        }
  return out;
}
}  // namespace

TEST_CASE("unfold: hand-checked windows, with and without padding") {
  // x (1, 3, 3, 1) holds 3 r + c; 2 x 2 windows, stride 1: four windows, taps row-major.
  Tensor x = iota({1, 3, 3, 1});
  Tensor r = ops::unfold(x, 2, 1, 0);
  CHECK(r.shape() == Shape{1, 4, 4});
  check_close(r, {0, 1, 3, 4, 1, 2, 4, 5, 3, 4, 6, 7, 4, 5, 7, 8}, 0.f, 0.f);
  // 3 x 3 windows, stride 2, padding 1: 2 x 2 windows; the first has the padding's zeros on its
  // top row and left column, the last reads the bottom-right 2 x 2 pixels.
  Tensor p = ops::unfold(x, 3, 2, 1);
  CHECK(p.shape() == Shape{1, 4, 9});
  const std::vector<float> v = p.to_vector<float>();
  CHECK(std::vector<float>(v.begin(), v.begin() + 9) == std::vector<float>{0, 0, 0, 0, 0, 1, 0, 3, 4});
  CHECK(std::vector<float>(v.end() - 9, v.end()) == std::vector<float>{4, 5, 0, 7, 8, 0, 0, 0, 0});
  // Two channels stay adjacent within a tap.
  Tensor c2 = ops::unfold(iota({1, 2, 2, 2}), 2, 1, 0);
  check_close(c2, {0, 1, 2, 3, 4, 5, 6, 7}, 0.f, 0.f);
  CHECK(ops::conv_out_size(28, 3, 2, 1) == 14);
  CHECK(ops::conv_out_size(7, 3, 2, 1) == 4);
}

TEST_CASE("unfold then a product is the convolution by its definition; gradients of overlapping windows") {
  Generator g(3);
  for (auto [k, s, pad] : {std::tuple{3, 2, 1}, std::tuple{3, 1, 1}, std::tuple{2, 2, 0}, std::tuple{3, 2, 0}}) {
    INFO("k " << k << " stride " << s << " pad " << pad);
    Tensor x = randn({2, 7, 6, 3}, g), w = randn({int64_t(k) * k * 3, 5}, g), b = randn({5}, g);
    Tensor y = ops::linear(ops::unfold(x, k, s, pad), w, b);
    check_close(y, direct_conv(x, w, b, k, s, pad), 1e-4f, 1e-4f);
    check_grad([k, s, pad](const std::vector<Tensor>& t) { return ops::unfold(t[0], k, s, pad); },
               {param({2, 5, 4, 3}, 7)});
  }
  // a transposed (strided) input is read as its logical layout
  Tensor xt = ops::transpose(iota({1, 4, 3, 2}), 1, 2);
  check_close(ops::unfold(xt, 2, 1, 0), ops::unfold(xt.contiguous(), 2, 1, 0).to_vector<float>(), 0.f, 0.f);
}

TEST_CASE("unfold: errors name the shape and the window") {
  CHECK_THROWS_WITH_AS(ops::unfold(iota({3, 3, 1}), 2, 1, 0), doctest::Contains("must be channels-last images (B, H, W, C)"), Error);
  CHECK_THROWS_WITH_AS(ops::unfold(iota({1, 3, 3, 1}), 0, 1, 0), doctest::Contains("expected window >= 1"), Error);
  CHECK_THROWS_WITH_AS(ops::unfold(iota({1, 3, 3, 1}), 2, 0, 0), doctest::Contains("stride 0"), Error);
  CHECK_THROWS_WITH_AS(ops::unfold(iota({1, 3, 3, 1}), 3, 1, 3), doctest::Contains("0 <= padding < window"), Error);
  CHECK_THROWS_WITH_AS(ops::unfold(iota({1, 2, 5, 1}), 3, 1, 0), doctest::Contains("smaller than the 3 x 3 window"), Error);
}

TEST_CASE("Conv2d: the module's layout is the convolution's; errors") {
  Generator g(5);
  models::Conv2d conv(3, 4, 3, 2, 1, g);
  conv.bias.copy_(randn({4}, g));
  Tensor x = randn({2, 6, 5, 3}, g);
  Tensor y = conv.forward(x);
  CHECK(y.shape() == Shape{2, 3, 3, 4});
  check_close(y, direct_conv(x, conv.weight, conv.bias, 3, 2, 1), 1e-4f, 1e-4f);
  CHECK_THROWS_WITH_AS(conv.forward(randn({2, 6, 5, 2}, g)), doctest::Contains("must be (B, H, W, 3)"), Error);
}

TEST_CASE("conv stem: the patch grid, parameters, gradients, config checks and its JSON") {
  models::ViTConfig c = models::vit_preset("vmoe-tiny");
  c.stem = "conv";
  models::ViT m(c, 1);
  CHECK(m.patch_embed == nullptr);
  REQUIRE(m.stem != nullptr);
  std::map<std::string, Shape> shapes;
  for (auto& [n, t] : m.named_parameters()) shapes[n] = t.shape();
  CHECK(shapes.at("stem.convs.0.weight") == Shape{9, 32});    // 3x3 taps of 1 channel -> D/2
  CHECK(shapes.at("stem.convs.1.weight") == Shape{288, 64});  // 3x3 taps of D/2 -> D
  CHECK(shapes.count("patch_embed.weight") == 0);
  Generator g(2);
  CHECK(m.stem->forward(randn({2, 1, 28, 28}, g)).shape() == Shape{2, 49, 64});
  CHECK(m.forward(randn({2, 1, 28, 28}, g)).shape() == Shape{2, 10});
  // the estimate counts the stem's weights
  int64_t n = 0;
  for (auto& [name, t] : m.named_parameters()) n += t.numel();
  CHECK(std::abs(c.parameter_estimate() - double(n)) < 0.05 * double(n));
  // gradients through both convolutions and the GELU, to the pixels
  models::ViTConfig small{8, 2, 4, 16, 1, 1, 8, 3};  // widths 8, 16
  small.stem = "conv";
  models::ConvStem stem(small, g);
  check_grad([&stem](const std::vector<Tensor>& t) { return stem.forward(t[0]); }, {param({2, 2, 8, 8}, 9)});
  // impossible configurations
  c.patch = 7;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("power of 2 (2, 4, 8, ...) and a width divisible by patch / 2; got patch 7"), Error);
  c.patch = 4, c.stem = "resnet";
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("stem 'resnet' must be patch, conv or conv-deep"), Error);
  // saved with the run, read back; a run saved without the field has the patch embedding
  train::TrainConfig t;
  t.vit.stem = "conv";
  CHECK(train::TrainConfig::from_json(t.to_json()).vit.stem == "conv");
  t.vit.stem = "patch";
  CHECK(t.to_json().find("stem") == std::string::npos);
  CHECK(train::TrainConfig::from_json(t.to_json()).vit.stem == "patch");
}

TEST_CASE("deep conv stem: a stride-1 convolution after each stride-2 one, the same patch grid") {
  models::ViTConfig c = models::vit_preset("vmoe-tiny");
  c.stem = "conv-deep";
  const std::vector<models::ViTConfig::StemConv> convs = c.stem_convs();
  REQUIRE(convs.size() == 4);
  const int64_t in[] = {1, 32, 32, 64}, out[] = {32, 32, 64, 64};
  const int stride[] = {2, 1, 2, 1}, side[] = {14, 14, 7, 7};
  for (size_t i = 0; i < 4; ++i) {
    INFO("convolution " << i);
    CHECK(convs[i].in == in[i]);
    CHECK(convs[i].out == out[i]);
    CHECK(convs[i].stride == stride[i]);
    CHECK(convs[i].out_side == side[i]);
  }
  models::ViT m(c, 1);
  REQUIRE(m.stem != nullptr);
  REQUIRE(m.stem->convs.size() == 4);
  CHECK(m.stem->convs[1]->stride == 1);
  CHECK(m.stem->convs[1]->weight.shape() == Shape{288, 32});  // 3x3 taps of D/2 -> D/2
  CHECK(m.stem->convs[3]->weight.shape() == Shape{576, 64});  // 3x3 taps of D -> D
  Generator g(4);
  CHECK(m.stem->forward(randn({2, 1, 28, 28}, g)).shape() == Shape{2, 49, 64});
  int64_t n = 0;
  for (auto& [name, t] : m.named_parameters()) n += t.numel();
  CHECK(std::abs(c.parameter_estimate() - double(n)) < 0.05 * double(n));
  // its activations count in the memory estimate
  models::ViTConfig shallow = c;
  shallow.stem = "conv";
  CHECK(c.activation_bytes(1) > shallow.activation_bytes(1));
  // gradients through all four convolutions and their GELUs, to the pixels
  models::ViTConfig small{8, 2, 4, 16, 1, 1, 8, 3};
  small.stem = "conv-deep";
  models::ConvStem stem(small, g);
  check_grad([&stem](const std::vector<Tensor>& t) { return stem.forward(t[0]); }, {param({2, 2, 8, 8}, 9)});
  // the patch embedding has no stem convolutions
  CHECK(models::vit_preset("vmoe-tiny").stem_convs().empty());
}
