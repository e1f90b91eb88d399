// The MoE layer and MoE-ViT: equivalence with the dense MLP, placement, statistics,
// reproducibility, configs and a resumed MoE run.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "autograd/autograd.h"
#include "models/moe.h"
#include "models/vit.h"
#include "ops/elementwise.h"
#include "ops/loss.h"
#include "ops/matmul.h"
#include "ops/reduce.h"
#include "ops/shape.h"
#include "ops/softmax.h"
#include "tests/helpers.h"
#include "train/loop.h"
#include "train/step.h"

using namespace mv;
using namespace mv::models;
using namespace mv::train;

static Tensor param_named(const Module& m, const std::string& name) {
  for (auto& [n, t] : m.named_parameters())
    if (n == name) return t;
  MV_FAIL("no parameter ", name);
}

// A small MoE-ViT: 28 px, patch 7 (17 tokens), width 16, depth 2 (block 1 is MoE).
static ViTConfig small_moe(const std::string& router) {
  ViTConfig c{28, 1, 7, 16, 2, 2, 32, 10};
  c.moe_placement = "every-2";
  c.moe.mlp_dim = 24;
  c.moe.router.type = router;
  c.moe.router.experts = 4;
  c.moe.router.slots = 2;
  return c;
}

TEST_CASE("MoE layer: one expert, k = 1, ample capacity is the dense MLP with the same weights") {
  Generator g(3);
  MoEConfig c;
  c.mlp_dim = 12;
  c.router.experts = 1;
  c.router.k = 1;
  c.router.capacity_train = c.router.capacity_eval = 1.f;
  c.router.noise_std = 0.f;
  MoELayer moe(8, c, g, &g);
  moe.b2.copy_(test::param({1, 8}, 5).detach());
  Tensor x = randn({3, 5, 8});
  // The dense MLP from separate ops (models::MLP itself runs the expert kernel on the CPU).
  const Tensor dense = ops::linear(ops::gelu(ops::linear(x, ops::reshape(moe.w1, {8, 12}), ops::reshape(moe.b1, {12}))),
                                   ops::reshape(moe.w2, {12, 8}), ops::reshape(moe.b2, {8}));
  for (bool group_batch : {false, true}) {
    moe.config.group_per_batch = group_batch;
    test::check_close(moe.forward(x), dense.to_vector<float>(), 1e-5f, 1e-4f);
  }
  CHECK(moe.stats.totals().dropped == 0);
  CHECK(moe.stats.totals().load[0] == 2 * 15);  // every token of both forwards
}

TEST_CASE("MoE layer: gradient to tokens, experts and router") {
  Generator g(4);
  MoEConfig c;
  c.mlp_dim = 6;
  c.router.experts = 2;
  c.router.k = 2;  // every token visits both experts: the routing set cannot flip
  c.router.capacity_eval = 2.f;
  MoELayer moe(4, c, g, &g);
  moe.train(false);
  Tensor x = test::param({2, 3, 4}, 7);
  Tensor r = test::param({2, 3, 4}, 8).detach();
  auto f = [&](const std::vector<Tensor>&) { return ops::sum(moe.forward(x) * r); };
  test::check_grad(f, {x, moe.w1, moe.b2, param_named(moe, "router.weight")});
}

TEST_CASE("MoE-ViT: placements, parameter names and presets") {
  ViTConfig c{28, 1, 7, 16, 8, 2, 32, 10};
  c.moe_placement = "every-2";
  std::vector<int> moe_blocks;
  for (int i = 0; i < 8; ++i)
    if (c.is_moe_block(i)) moe_blocks.push_back(i);
  CHECK(moe_blocks == std::vector<int>{1, 3, 5, 7});
  c.moe_placement = "last-n";  // V-MoE "Last 2" on 8 blocks: 5 and 7
  moe_blocks.clear();
  for (int i = 0; i < 8; ++i)
    if (c.is_moe_block(i)) moe_blocks.push_back(i);
  CHECK(moe_blocks == std::vector<int>{5, 7});

  ViT m(small_moe("topk"), 0);
  CHECK(m.moe_layers().size() == 1);
  CHECK(param_named(m, "blocks.1.moe.w1").shape() == Shape{4, 16, 24});
  CHECK(param_named(m, "blocks.1.moe.b2").shape() == Shape{4, 16});
  CHECK(param_named(m, "blocks.1.moe.router.weight").shape() == Shape{16, 4});
  CHECK(param_named(m, "blocks.0.mlp.fc1.weight").shape() == Shape{16, 32});
  for (const std::string p : {"vmoe-tiny", "ec-tiny", "soft-tiny", "cosine-tiny", "pcosine-tiny",
                              "mcentroid-tiny", "vote-tiny"}) {
    INFO(p);
    const ViTConfig v = vit_preset(p);
    CHECK(v.moe_placement == "every-2");
    CHECK(v.moe.router.experts == 8);
    CHECK_NOTHROW(v.validate());
  }
  const RouterConfig soft = vit_preset("soft-tiny").moe.router;
  CHECK((soft.slots == 6 && soft.soft_scale == 10.f));  // the preset's own choices (vit.cpp)
  const ViTConfig s = vit_preset("vmoe-s-cifar");
  CHECK((s.depth == 8 && s.dim == 512 && s.moe.router.k == 2 && s.is_moe_block(5) &&
         s.is_moe_block(7) && !s.is_moe_block(3)));
}

TEST_CASE("MoE-ViT: every router trains a step; aux losses reach the loss") {
  for (const std::string& router : router_types()) {
    INFO(router);
    ViT m(small_moe(router), 1);
    m.head->weight.copy_(test::param({16, 10}, 2, 0.5f).detach());
    Tensor loss = ops::cross_entropy(m.forward(randn({3, 1, 28, 28})),
                                     Tensor::from_i64({1, 2, 3}, {3}));
    const Tensor aux = m.aux_loss();
    CHECK(aux.defined() == (router == "topk" || router == "cosine" || router == "perturbed_cosine" ||
                            router == "multi_centroid"));
    if (aux.defined()) loss = loss + aux;
    loss.backward();
    CHECK(std::isfinite(loss.item()));
    for (auto& [n, p] : m.named_parameters()) {
      if (n.find("moe.router") == std::string::npos && n.find("moe.w1") == std::string::npos)
        continue;
      INFO(n);
      REQUIRE(p.grad().defined());
      CHECK(ops::sum(p.grad() * p.grad()).item() > 0.f);  // the router learns through combine
    }
  }
}

TEST_CASE("MoE-ViT: routing noise is reproducible under a seed") {
  ViTConfig c = small_moe("topk");
  c.moe.router.noise_std = 1.f;  // large, so it changes routing
  ViT a(c, 5), b(c, 5);
  Tensor x = randn({2, 1, 28, 28});
  CHECK(a.forward(x).to_vector<float>() == b.forward(x).to_vector<float>());
  const Tensor ea = a.moe_layers()[0]->last.expert;
  const std::vector<float> second = a.forward(x).to_vector<float>();  // new noise, same input
  CHECK(a.moe_layers()[0]->last.expert.to_vector<int64_t>() != ea.to_vector<int64_t>());
  CHECK(second == b.forward(x).to_vector<float>());
}

TEST_CASE("MoE-ViT: the noise-injection loss, recomputed by hand; its gradient; off in eval") {
  ViTConfig c = small_moe("topk");
  c.moe.router.noise_std = 0.f;  // route_noise then draws only the token noise
  ViT m(c, 6);
  m.jaccard_sigma = 0.3f;
  Tensor in;  // block 1's input
  m.block_input_hook = [&](int i, const Tensor& x) { return i == 1 ? (in = x) : x; };
  const Tensor images = randn({2, 1, 28, 28});
  const Generator before = *m.route_noise;
  m.forward(images);
  const Tensor loss = m.jaccard_loss();
  REQUIRE(loss.defined());

  // By hand: x' = x + 0.3 eps, h = x' + Attn(LN1(x')), s' = softmax(LN2(h) W) per image.
  Generator g = before;
  Block& b = *m.blocks[1];
  const Tensor xp = in + ops::mul(randn(in.shape(), g), 0.3f);
  const Tensor h = xp + b.attn->forward(b.ln1->forward(xp));
  const std::vector<float> s2 =
      ops::softmax(ops::matmul(b.ln2->forward(h), param_named(m, "blocks.1.moe.router.weight")))
          .to_vector<float>();
  const std::vector<float> s1 = m.moe_layers()[0]->last.probs.to_vector<float>();
  REQUIRE(s1.size() == s2.size());
  double expected = 0;
  const size_t E = 4, tokens = s1.size() / E;
  for (size_t t = 0; t < tokens; ++t) {
    double lo = 0, hi = 0;
    for (size_t e = t * E; e < (t + 1) * E; ++e)
      lo += std::min(s1[e], s2[e]), hi += std::max(s1[e], s2[e]);
    expected += (1 - lo / hi) / double(tokens);
  }
  CHECK(expected > 0.005);  // the noise moves the probabilities
  CHECK(loss.item() == doctest::Approx(expected).epsilon(1e-4));

  // The gradient reaches the router and the attention through both branches.
  auto f = [&](const std::vector<Tensor>&) {
    *m.route_noise = before;
    m.forward(images);
    return m.jaccard_loss();
  };
  test::check_grad(f, {param_named(m, "blocks.1.moe.router.weight"),
                       param_named(m, "blocks.1.attn.qkv.weight")});

  m.jaccard_sigma = 1e-5f;  // a vanishing perturbation leaves the routing as it was
  m.forward(images);
  CHECK(m.jaccard_loss().item() < 1e-3f);
  m.train(false);
  m.forward(images);
  CHECK_FALSE(m.jaccard_loss().defined());
}

TEST_CASE("MoE-ViT: statistics count loads and drops") {
  ViTConfig c = small_moe("topk");
  c.moe.router.capacity_train = 0.25f;  // C = ceil(17 * 2 * 0.25 / 4) = 3 of 17 * 2 choices
  ViT m(c, 2);
  m.forward(randn({2, 1, 28, 28}));
  const MoEStats::Totals s = m.moe_layers()[0]->stats.totals();
  int64_t filled = 0;
  for (int64_t l : s.load) filled += l;
  CHECK(s.choices == 2 * 17 * 2);
  CHECK(filled + s.dropped == s.choices);
  CHECK(filled <= 2 * 4 * 3);
  CHECK(s.dropped > 0);
  // load = rows in use per expert
  CHECK(s.load == m.moe_layers()[0]->last.assign.rows.to_vector<int64_t>());
  // Expert choice fills every row (E*G*C); dropped counts the tokens no expert took.
  ViTConfig ce = small_moe("expert_choice");
  ce.moe.router.ec_capacity = 0.5f;  // C = ceil(17 * 0.5 / 4) = 3: 12 rows for 17 tokens per image
  ViT me(ce, 3);
  me.forward(randn({2, 1, 28, 28}));
  const models::MoELayer& layer = *me.moe_layers()[0];
  const MoEStats::Totals st = layer.stats.totals();
  CHECK(st.load == std::vector<int64_t>(4, 2 * 3));
  const auto tr = layer.last.assign.token_rows.to_vector<int64_t>();
  const int64_t K = layer.last.assign.token_rows.size(2);
  int64_t untaken = 0;
  for (int64_t t = 0; t < 2 * 17; ++t)
    untaken += std::all_of(tr.begin() + t * K, tr.begin() + (t + 1) * K, [](int64_t r) { return r < 0; });
  CHECK(untaken >= 2 * (17 - 12));
  CHECK(st.dropped == untaken);
  CHECK(st.choices == 2 * 17);
}

TEST_CASE("MoE statistics: rows filed past the held count are folded in, the totals unchanged") {
  MoEStats s;
  s.reset(3, true);
  const size_t n = MoEStats::kRowsHeld + 44;
  for (size_t i = 0; i < n; ++i) {
    s.add_rows(Tensor::from_i64({1, 2, int64_t(i % 3)}, {3}));
    s.choices += 7;
  }
  CHECK(s.rows.size() < MoEStats::kRowsHeld);
  int64_t third = 0;
  for (size_t i = 0; i < n; ++i) third += int64_t(i % 3);
  const MoEStats::Totals t = s.totals();
  CHECK(t.load == std::vector<int64_t>{int64_t(n), 2 * int64_t(n), third});
  CHECK(t.dropped == 7 * int64_t(n) - 3 * int64_t(n) - third);
}

TEST_CASE("a NaN in a router's logits is traced to its block") {
  ViT m(small_moe("topk"), 2);
  m.forward(randn({2, 1, 28, 28}));
  CHECK(nonfinite_router_block(m) == -1);
  Tensor w = param_named(m, "blocks.1.moe.router.weight");
  std::vector<float> v = w.to_vector<float>();
  v[3] = NAN;
  w.copy_(Tensor::from(v, w.shape()));
  m.forward(randn({2, 1, 28, 28}));
  CHECK(nonfinite_router_block(m) == 1);
}

TEST_CASE("MoE layer: packed routing matches a loop over tokens and experts") {
  // out[t] = sum over t's kept choices of weight * expert_e(x[t]), experts GELU MLPs.
  Generator g(9);
  MoEConfig c;
  c.mlp_dim = 5;
  c.router.experts = 3;
  c.router.k = 2;
  c.router.capacity_eval = 0.75f;  // drops some choices
  MoELayer moe(4, c, g, &g);
  moe.train(false);
  for (Tensor p : {moe.b1, moe.b2}) p.copy_(test::param(p.shape(), 10).detach());
  Tensor x = test::param({2, 6, 4}, 11).detach();
  const std::vector<float> out = moe.forward(x).to_vector<float>();
  const Route& r = moe.last;
  const auto ex = r.expert.to_vector<int64_t>(), sl = r.slot.to_vector<int64_t>();
  const auto w = r.assign.weight.to_vector<float>(), xv = x.to_vector<float>();
  const auto w1 = moe.w1.to_vector<float>(), b1 = moe.b1.to_vector<float>();
  const auto w2 = moe.w2.to_vector<float>(), b2 = moe.b2.to_vector<float>();
  const int64_t D = 4, H = 5, R = 2 * r.capacity;
  int64_t dropped = 0;
  std::vector<float> want(out.size(), 0.f);
  for (int64_t t = 0; t < 12; ++t)
    for (int j = 0; j < 2; ++j) {
      const int64_t e = ex[size_t(t * 2 + j)], s = sl[size_t(t * 2 + j)];
      if (s < 0) {
        ++dropped;
        continue;
      }
      std::vector<double> hid(H);
      for (int64_t q = 0; q < H; ++q) {
        double a = b1[size_t(e * H + q)];
        for (int64_t i = 0; i < D; ++i) a += double(xv[size_t(t * D + i)]) * w1[size_t((e * D + i) * H + q)];
        hid[size_t(q)] = 0.5 * a * (1 + std::tanh(std::sqrt(2 / M_PI) * (a + 0.044715 * a * a * a)));
      }
      for (int64_t i = 0; i < D; ++i) {
        double a = b2[size_t(e * D + i)];
        for (int64_t q = 0; q < H; ++q) a += hid[size_t(q)] * w2[size_t((e * H + q) * D + i)];
        want[size_t(t * D + i)] += float(double(w[size_t(e * R + s)]) * a);
      }
    }
  CHECK(dropped > 0);
  test::check_close(Tensor::from(out, {2, 6, 4}), want, 1e-4f, 1e-4f);
}

TEST_CASE("MoE-ViT: impossible configs are named") {
  ViTConfig c = small_moe("topk");
  c.moe.router.k = 5;
  CHECK_THROWS_WITH_AS(ViT(c, 0), doctest::Contains("k (--k) = 5"), Error);
  c = small_moe("hash");
  CHECK_THROWS_WITH_AS(ViT(c, 0), doctest::Contains("hash"), Error);
  c = small_moe("topk");
  c.moe_placement = "every-3";
  CHECK_THROWS_WITH_AS(ViT(c, 0), doctest::Contains("every-3"), Error);
  c = small_moe("topk");
  c.moe_placement = "last-n";
  c.moe_last_n = 2;  // depth 2 has one odd block
  CHECK_THROWS_WITH_AS(ViT(c, 0), doctest::Contains("last-n"), Error);
  c = small_moe("soft");
  c.moe.router.slots = 0;
  CHECK_THROWS_WITH_AS(ViT(c, 0), doctest::Contains("slots"), Error);
}

static TrainConfig moe_smoke(const std::string& router) {
  TrainConfig c;
  c.dataset = "synthetic";
  c.model = "custom";
  c.vit = small_moe(router);
  c.epochs = 2, c.batch = 32, c.eval_batch = 64, c.lr = 3e-3f;
  c.limit_train = 128, c.limit_test = 64, c.warmup_epochs = 0.5f;
  return c;
}

TEST_CASE("MoE training configs round-trip through JSON") {
  for (const std::string& router : router_types()) {
    TrainConfig c = moe_smoke(router);
    c.vit.moe.router.bpr = true, c.vit.moe.router.k = 1, c.vit.moe.group_per_batch = true;
    c.vit.moe.router.soft_scale = 4.f;
    const TrainConfig back = TrainConfig::from_json(c.to_json());
    CHECK(back.vit.moe.router.soft_scale == 4.f);
    CHECK(back.to_json() == c.to_json());
  }
  // A configuration saved before soft_scale existed reads as the method's 1.
  std::string old = moe_smoke("soft").to_json();
  const size_t at = old.find("\"soft_scale\":");
  REQUIRE(at != std::string::npos);
  old.erase(at, old.find(',', at) + 1 - at);
  REQUIRE(old.find("soft_scale") == std::string::npos);
  CHECK(TrainConfig::from_json(old).vit.moe.router.soft_scale == 1.f);
}

TEST_CASE("an MoE run resumed from epoch 1 reproduces the uninterrupted run bit for bit") {
  namespace fs = std::filesystem;
  const std::string a = "/tmp/moevit_test_moe_a", b = "/tmp/moevit_test_moe_b";
  fs::remove_all(a);
  fs::remove_all(b);
  TrainConfig c = moe_smoke("topk");  // with routing noise
  fit(c, a, false, nullptr);
  fit(c, b, false, nullptr, /*stop_after=*/1);
  fit(c, b, /*resume=*/true, nullptr);
  test::check_same_checkpoint(a, b);
  // The epoch lines carry the routing statistics of each MoE layer.
  std::ifstream f(a + "/metrics.jsonl");
  std::string line;
  std::getline(f, line);
  CHECK(line.find("\"moe\":[{\"block\":1,\"router\":\"topk\",\"load\":[") != std::string::npos);
  fs::remove_all(a);
  fs::remove_all(b);
}
