// Routing consistency under noise (report/consistency.h).
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unistd.h>

#include "autograd/autograd.h"
#include "datasets/dataset.h"
#include "ops/elementwise.h"
#include "ops/reduce.h"
#include "report/consistency.h"
#include "report/consistency_report.h"
#include "tests/helpers.h"
#include "train/data.h"
#include "train/evaluate.h"

using namespace mv;
using namespace mv::models;
using namespace mv::report;
using namespace mv::train;

namespace {

// 28 px, patch 7 (17 tokens), width 16, depth 4: blocks 1 and 3 are MoE.
ViTConfig tiny(const std::string& router, int k = 2) {
  ViTConfig c{28, 1, 7, 16, 4, 2, 32, 10};
  c.moe_placement = "every-2";
  c.moe.mlp_dim = 24;
  c.moe.router.type = router;
  c.moe.router.experts = 4;
  c.moe.router.k = k;
  return c;
}

const datasets::Dataset& test_images() {
  static const datasets::Dataset d = datasets::head(load_dataset("synthetic", "", false), 64);
  return d;
}

ConsistencyConfig config(std::vector<double> sigmas, int block = -1, uint64_t seed = 5) {
  ConsistencyConfig c;
  c.sigmas = std::move(sigmas);
  c.block = block;
  c.seed = seed;
  c.batch = 32;
  c.dataset = "synthetic";
  return c;
}

std::string read(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

}  // namespace

TEST_CASE("consistency: metrics on hand-made expert lists") {
  // 5 tokens, 2 ranked experts each.
  const std::vector<int32_t> a = {0, 1, 2, 3, 1, 0, 0, 2, 3, 1};
  const std::vector<int32_t> b = {0, 1, 2, 1, 0, 1, 1, 3, 0, 2};
  // token: top-1, ordered pair, set, |A n B| -> Jaccard
  //   0:   yes  yes  yes  2 -> 1
  //   1:   yes  no   no   1 -> 1/3
  //   2:   no   no   yes  2 -> 1
  //   3:   no   no   no   0 -> 0
  //   4:   no   no   no   0 -> 0
  AgreementSums s = compare_routes(a.data(), b.data(), 5, 2, 2);
  CHECK(s.tokens == 5);
  CHECK(s.top1 == 2);
  CHECK(s.top2 == 1);
  CHECK(s.top2_set == 2);
  CHECK(s.jaccard == doctest::Approx(7.0 / 3.0));
  Agreement g = s.agreement();
  CHECK(g.top1 == doctest::Approx(0.4));
  CHECK(g.top2 == doctest::Approx(0.2));
  CHECK(g.top2_set == doctest::Approx(0.4));
  CHECK(g.jaccard == doctest::Approx(7.0 / 15.0));

  // k = 1: Jaccard of single experts is top-1 agreement.
  CHECK(compare_routes(a.data(), b.data(), 5, 2, 1).jaccard == doctest::Approx(2.0));

  // k = 3: {0, 1, 2} vs {2, 1, 3} share 2 of 4 -> 2 / (6 - 2).
  const std::vector<int32_t> a3 = {0, 1, 2}, b3 = {2, 1, 3};
  AgreementSums s3 = compare_routes(a3.data(), b3.data(), 1, 3, 3);
  CHECK(s3.jaccard == doctest::Approx(0.5));
  CHECK(s3.top1 == 0);
  CHECK(s3.top2_set == 0);

  // Summing two parts equals the whole.
  AgreementSums p = compare_routes(a.data(), b.data(), 2, 2, 2);
  p.add(compare_routes(a.data() + 4, b.data() + 4, 3, 2, 2));
  CHECK(p.top1 == s.top1);
  CHECK(p.top2_set == s.top2_set);
  CHECK(p.jaccard == doctest::Approx(s.jaccard));

  CHECK_THROWS_WITH_AS(compare_routes(a.data(), b.data(), 5, 2, 3), doctest::Contains("Jaccard k 3"),
                       mv::Error);
}

TEST_CASE("consistency: experts ranked by probability, ties to the lower index") {
  Tensor p = Tensor::from({0.1f, 0.4f, 0.2f, 0.3f, 0.25f, 0.25f, 0.4f, 0.1f}, {1, 2, 4});
  CHECK(ranked_experts(p, 3) == std::vector<int32_t>{1, 3, 2, 2, 0, 1});
  CHECK(ranked_experts(p, 1) == std::vector<int32_t>{1, 2});
  CHECK_THROWS_WITH_AS(ranked_experts(p, 5), doctest::Contains("5 experts per token"), mv::Error);
}

TEST_CASE("consistency: noise-on parsing") {
  CHECK(parse_noise_on("pixels") == -1);
  CHECK(parse_noise_on("block:3") == 3);
  CHECK_THROWS_WITH_AS(parse_noise_on("block:"), doctest::Contains("pixels or block:N"), mv::Error);
  CHECK_THROWS_WITH_AS(parse_noise_on("tokens"), doctest::Contains("pixels or block:N"), mv::Error);
}

TEST_CASE("consistency: sigma 0 agrees fully at the clean accuracy; more noise agrees less") {
  ViT model(tiny("topk"), 11);
  const datasets::Dataset& data = test_images();
  const double clean = evaluate(model, data, "synthetic", {.batch = 32}).accuracy;
  const std::vector<double> sigmas = {0, 0.03, 0.3, 3, 30};
  for (int block : {-1, 1}) {
    CAPTURE(block);
    ConsistencyResult r = routing_consistency(model, data, config(sigmas, block));
    CHECK(model.training());  // the previous mode is restored
    CHECK(r.noise_on == (block < 0 ? "pixels" : "block:1"));
    CHECK(r.moe_blocks == std::vector<int>{1, 3});
    CHECK(r.jaccard_k == 2);
    CHECK(r.images == 64);
    CHECK(r.tokens == 64 * 17);
    CHECK(r.clean_accuracy == doctest::Approx(clean));
    REQUIRE(r.points.size() == sigmas.size());
    const SigmaPoint& zero = r.points[0];
    CHECK(zero.accuracy == doctest::Approx(clean));
    REQUIRE(zero.layers.size() == 2);
    for (const Agreement& a : zero.layers) {
      CHECK(a.top1 == 1.0);
      CHECK(a.top2 == 1.0);
      CHECK(a.top2_set == 1.0);
      CHECK(a.jaccard == 1.0);
    }
    for (size_t i = 1; i < r.points.size(); ++i) {
      CAPTURE(r.points[i].sigma);
      CHECK(r.points[i].mean.top1 <= r.points[i - 1].mean.top1 + 0.01);
      // The metrics nest: ordered pair <= set <= top-1 or the set's other match.
      CHECK(r.points[i].mean.top2 <= r.points[i].mean.top2_set);
      CHECK(r.points[i].mean.top2 <= r.points[i].mean.top1);
    }
    CHECK(r.points.back().mean.top1 < 0.9);
    CHECK(r.points.back().mean.top2 < r.points.back().mean.top1);
  }
}

TEST_CASE("consistency: pixel noise, accuracy and top-1 agreement match a direct computation") {
  ViT model(tiny("topk"), 16);
  Generator hg(3);
  model.head->weight.copy_(randn(model.head->weight.shape(), hg));  // predictions that vary
  const datasets::Dataset& data = test_images();
  const double sigma = 0.3;
  ConsistencyResult r = routing_consistency(model, data, config({sigma}, -1, 9));

  // The same sweep by hand: batches of 32 in order, synthetic normalisation (x / 255 - 0.5) / 0.5,
  // noise drawn batch after batch from Generator(seed).
  model.train(false);
  autograd::NoGrad ng;
  Generator g(9);
  int64_t correct = 0, clean_correct = 0, agree = 0, tokens = 0;
  for (int64_t start = 0; start < data.n; start += 32) {
    const int64_t B = std::min<int64_t>(32, data.n - start);
    std::vector<float> px(size_t(B * 28 * 28));
    for (size_t i = 0; i < px.size(); ++i)
      px[i] = (float(data.pixels[size_t(start * 28 * 28) + i]) / 255.f - 0.5f) / 0.5f;
    const Tensor x = Tensor::from(px, {B, 1, 28, 28});
    auto run = [&](const Tensor& in, int64_t& hits, std::vector<std::vector<int64_t>>& top1) {
      const std::vector<int64_t> pred = ops::argmax(model.forward(in), 1).to_vector<int64_t>();
      for (int64_t i = 0; i < B; ++i) hits += pred[size_t(i)] == data.labels[size_t(start + i)];
      top1.clear();
      for (MoELayer* m : model.moe_layers())
        top1.push_back(ops::argmax(m->last.probs, -1).to_vector<int64_t>());
    };
    std::vector<std::vector<int64_t>> c1, n1;
    run(x, clean_correct, c1);
    run(x + float(sigma) * randn({B, 1, 28, 28}, g), correct, n1);
    for (size_t l = 0; l < c1.size(); ++l)
      for (size_t t = 0; t < c1[l].size(); ++t) agree += c1[l][t] == n1[l][t], ++tokens;
  }
  model.train(true);
  CHECK(clean_correct > 0);
  CHECK(r.clean_accuracy == doctest::Approx(double(clean_correct) / 64));
  CHECK(r.points[0].accuracy == doctest::Approx(double(correct) / 64));
  CHECK(r.points[0].mean.top1 == doctest::Approx(double(agree) / double(tokens)));
}

TEST_CASE("consistency: reproducible under the noise seed") {
  ViT model(tiny("topk"), 12);
  const datasets::Dataset& data = test_images();
  const std::string a = consistency_json(routing_consistency(model, data, config({0.5f}, -1, 1)));
  const std::string b = consistency_json(routing_consistency(model, data, config({0.5f}, -1, 1)));
  const std::string c = consistency_json(routing_consistency(model, data, config({0.5f}, -1, 2)));
  CHECK(a == b);
  CHECK(a != c);
}

TEST_CASE("consistency: other routers; Jaccard k follows the router") {
  const datasets::Dataset data = datasets::head(test_images(), 16);
  ViT k1(tiny("topk", 1), 13);
  CHECK(routing_consistency(k1, data, config({0.f})).jaccard_k == 1);
  for (const char* router : {"expert_choice", "soft"}) {
    CAPTURE(router);
    ViT m(tiny(router), 13);
    ConsistencyResult r = routing_consistency(m, data, config({0.f, 100.f}));
    CHECK(r.jaccard_k == 2);
    CHECK(r.points[0].mean.jaccard == 1.0);
    CHECK(r.points[1].mean.top1 < 1.0);
  }
}

TEST_CASE("consistency: JSON, CSV and PNG report") {
  ViT model(tiny("topk"), 14);
  ConsistencyResult r =
      routing_consistency(model, datasets::head(test_images(), 16), config({0.f, 0.5f}));
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("moevit_test_consistency_" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  write_consistency_report(r, (dir / "sub").string());

  nlohmann::json j = nlohmann::json::parse(read(dir / "sub" / "consistency.json"));
  for (const char* key : {"noise_on", "seed", "router", "jaccard_k", "moe_blocks", "images",
                          "tokens_per_layer", "clean_accuracy", "points", "plot"})
    CHECK_MESSAGE(j.contains(key), key);
  REQUIRE(j["points"].size() == 2);
  CHECK(j["points"][1]["sigma"].get<double>() == doctest::Approx(0.5));
  CHECK(j["points"][0]["mean"]["top1"].get<double>() == 1.0);
  REQUIRE(j["points"][1]["layers"].size() == 2);
  CHECK(j["points"][1]["layers"][1]["block"] == 3);
  for (const char* key : {"top1", "top2", "top2_set", "jaccard"})
    CHECK_MESSAGE(j["points"][1]["layers"][0].contains(key), key);

  std::istringstream csv(read(dir / "sub" / "consistency.csv"));
  std::vector<std::string> lines;
  for (std::string l; std::getline(csv, l);) lines.push_back(l);
  REQUIRE(lines.size() == 1 + 2 * 3);  // header + (2 layers + mean) per sigma
  CHECK(lines[0] == "sigma,layer,block,top1,top2,top2_set,jaccard,accuracy");
  CHECK(lines[1].rfind("0,0,1,1.000000,1.000000,1.000000,1.000000,", 0) == 0);
  CHECK(lines[2].rfind("0,1,3,", 0) == 0);
  CHECK(lines[3].rfind("0,mean,-1,1.000000,", 0) == 0);
  CHECK(lines[6].rfind("0.5,mean,-1,", 0) == 0);

  const std::string png = read(dir / "sub" / "consistency.png");
  REQUIRE(png.size() > 8);
  CHECK(png.substr(0, 8) == std::string("\x89PNG\r\n\x1a\n", 8));
  std::filesystem::remove_all(dir);

  CHECK_THROWS_WITH_AS(write_consistency_png(r, "/nonexistent-dir/x.png"),
                       doctest::Contains("cannot write"), mv::Error);
}

TEST_CASE("consistency: a dense model and bad settings are named") {
  const datasets::Dataset data = datasets::head(test_images(), 4);
  ViT dense(ViTConfig{28, 1, 7, 16, 2, 2, 32, 10}, 1);
  CHECK_THROWS_WITH_AS(routing_consistency(dense, data, config({0.1f})),
                       doctest::Contains("has no MoE layers"), mv::Error);
  ViT model(tiny("topk"), 15);
  CHECK_THROWS_WITH_AS(routing_consistency(model, data, config({0.1f}, 4)),
                       doctest::Contains("noise on block 4, but the model has blocks 0..3"),
                       mv::Error);
  CHECK_THROWS_WITH_AS(routing_consistency(model, data, config({-0.1f})),
                       doctest::Contains("must be >= 0"), mv::Error);
  CHECK_THROWS_WITH_AS(routing_consistency(model, data, config({})),
                       doctest::Contains("no sigma"), mv::Error);
  ViTConfig cc{32, 3, 8, 16, 2, 2, 32, 10};
  cc.moe_placement = "every-2";
  ViT cifar(cc, 1);
  CHECK_THROWS_WITH_AS(routing_consistency(cifar, data, config({0.1f})),
                       doctest::Contains("the model expects (3, 32, 32)"), mv::Error);
}
