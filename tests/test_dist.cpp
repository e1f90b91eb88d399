// The pieces of multi-process training that one process can check: the backward hook the
// gradient reduction starts from, the reduction and the row exchange in a world of one, the
// shares of noise and of batches that make n ranks equal to one process. The ranks themselves
// are tested by tests/mpi_training.py (suite mpi).
#include <algorithm>
#include <doctest/doctest.h>

#include "autograd/autograd.h"
#include "datasets/loader.h"
#include "datasets/synthetic.h"
#include "dist/comm.h"
#include "dist/experts.h"
#include "dist/grad_sync.h"
#include "models/moe.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"
#include "ops/moe.h"
#include "ops/prc.h"
#include "ops/reduce.h"
#include "ops/shape.h"
#include "ops/softmax.h"
#include "tests/helpers.h"
#include "train/checkpoint.h"

using namespace mv;

TEST_CASE("autograd::backward reports each leaf once, when its gradient is final") {
  Tensor a = test::param({3}, 1), b = test::param({3}, 2), c = test::param({3}, 3);
  // a feeds two nodes (its gradient is final only after the second), b one, c none.
  const Tensor y = ops::sum(ops::mul(a, b) + ops::exp(a));
  std::vector<const TensorImpl*> seen;
  std::vector<std::vector<float>> grad_at_report;
  autograd::backward(y, Tensor(), [&](const Tensor& leaf) {
    seen.push_back(&leaf.impl());
    grad_at_report.push_back(leaf.grad().to_vector<float>());
  });
  REQUIRE(seen.size() == 2);
  CHECK(std::count(seen.begin(), seen.end(), &a.impl()) == 1);
  CHECK(std::count(seen.begin(), seen.end(), &b.impl()) == 1);
  CHECK(!c.grad().defined());
  for (size_t i = 0; i < seen.size(); ++i) {  // what was reported is the final gradient
    const Tensor& leaf = seen[i] == &a.impl() ? a : b;
    CHECK(grad_at_report[i] == leaf.grad().to_vector<float>());
  }
}

TEST_CASE("GradientSync in a world of one: the gradients stay as they were, bucket by bucket") {
  REQUIRE(dist::size() == 1);
  Tensor a = test::param({5, 7}, 1), b = test::param({300}, 2), unused = test::param({4}, 3);
  dist::GradientSync sync({a, b, unused}, /*bucket_floats=*/4);  // one bucket per parameter
  CHECK(sync.buckets() == 3);
  const Tensor y = ops::sum(ops::mul(ops::sum(a), b));
  autograd::backward(y, Tensor(), [&](const Tensor& leaf) { sync.ready(leaf); });
  const std::vector<float> ga = a.grad().to_vector<float>(), gb = b.grad().to_vector<float>();
  sync.finish();
  CHECK(a.grad().to_vector<float>() == ga);
  CHECK(b.grad().to_vector<float>() == gb);
  CHECK(!unused.grad().defined());  // no rank had one: none after the reduction either
}

TEST_CASE("send_to_experts / return_to_tokens in a world of one: the fused MoE layer's result") {
  // dispatch -> send -> expert MLP -> return -> combine is moe_mlp, forward and backward.
  const int64_t G = 3, N = 5, D = 4, E = 4, H = 6;
  Tensor x = test::param({G, N, D}, 1);
  Tensor w1 = test::param({E, D, H}, 2, 0.5f), b1 = test::param({E, H}, 3, 0.1f);
  Tensor w2 = test::param({E, H, D}, 4, 0.5f), b2 = test::param({E, D}, 5, 0.1f);
  const Tensor gates = ops::softmax(test::param({G, N, E}, 6));
  ops::TopKOptions o;
  o.k = 2;
  o.capacity_factor = 1.f;  // some choices dropped, so the buffers have padding
  const ops::Assignment a = ops::topk_route(gates, o).assign;
  auto split = [&](const std::vector<Tensor>& in) {
    const dist::AtExperts at = dist::send_to_experts(ops::dispatch(in[0], a), a.rows);
    CHECK(at.rows.to_vector<int64_t>() == a.rows.to_vector<int64_t>());
    const Tensor y = ops::expert_mlp(at.buf, in[1], in[2], in[3], in[4], at.rows);
    return ops::combine(dist::return_to_tokens(y, at.route), a);
  };
  auto fused = [&](const std::vector<Tensor>& in) {
    return ops::moe_mlp(in[0], a, in[1], in[2], in[3], in[4]);
  };
  const std::vector<Tensor> in{x, w1, b1, w2, b2};
  test::check_close(split(in), fused(in).to_vector<float>(), 1e-6f, 1e-5f);
  test::check_grad(split, in);
}

TEST_CASE("gather_experts and own_experts in a world of one are copies") {
  const Tensor t = test::param({4, 3}, 1);
  CHECK(dist::gather_experts(t).to_vector<float>() == t.to_vector<float>());
  CHECK(dist::own_experts(t).to_vector<float>() == t.to_vector<float>());
}

TEST_CASE("Generator parts: the parts' draws side by side are one process's draws") {
  Generator whole(7);
  const std::vector<float> all = randn({2, 6, 4}, whole).to_vector<float>();
  std::vector<float> joined;
  uint64_t end = 0;
  for (uint64_t p = 0; p < 2; ++p) {
    Generator g(7);
    g.part = p, g.parts = 2;
    const std::vector<float> v = randn({1, 6, 4}, g).to_vector<float>();
    joined.insert(joined.end(), v.begin(), v.end());
    end = g.offset;
  }
  CHECK(joined == all);
  CHECK(end == whole.offset);  // every part's stream goes on from the same place
}

TEST_CASE("Loader shares: the ranks' rows of a batch are the rows of one process's batch") {
  const datasets::Dataset d = datasets::make_synthetic(64, 1, 28, 10, 3);
  for (bool two_view : {false, true}) {
    CAPTURE(two_view);
    auto make = [&](int part, int parts) {
      auto l = std::make_unique<datasets::Loader>(
          d, 16, true, 5, true, two_view ? datasets::Augment::none() : datasets::Augment::crop_flip(2));
      if (two_view) l->set_two_view(datasets::TwoViewConfig::for_image_size(28));
      l->set_share(part, parts);
      return l;
    };
    auto whole = make(0, 1);
    std::vector<std::unique_ptr<datasets::Loader>> shares;
    for (int p = 0; p < 4; ++p) shares.push_back(make(p, 4));
    whole->begin_epoch(1);
    for (auto& s : shares) s->begin_epoch(1);
    for (datasets::Batch b; whole->next(b);) {
      std::vector<float> images, images2;
      std::vector<int64_t> labels, pairs;
      for (auto& s : shares) {
        datasets::Batch part;
        REQUIRE(s->next(part));
        REQUIRE(part.labels.numel() == 4);
        auto add = [](auto& to, const Tensor& t, auto tag) {
          if (!t.defined()) return;
          const auto v = t.to_vector<decltype(tag)>();
          to.insert(to.end(), v.begin(), v.end());
        };
        add(images, part.images, 0.f), add(labels, part.labels, int64_t(0));
        add(images2, part.images2, 0.f), add(pairs, part.pairs, int64_t(0));
      }
      CHECK(images == b.images.to_vector<float>());
      CHECK(labels == b.labels.to_vector<int64_t>());
      if (two_view) {
        CHECK(images2 == b.images2.to_vector<float>());
        CHECK(pairs == b.pairs.to_vector<int64_t>());
      }
    }
  }
  datasets::Loader odd(d, 10, true, 5, true);
  CHECK_THROWS_WITH_AS(odd.set_share(0, 4), doctest::Contains("--batch 10 does not split evenly"),
                       Error);
}

TEST_CASE("MoELayer::split_experts keeps this rank's rows of the experts") {
  models::MoEConfig c;
  c.router.experts = 4;
  Generator g(1), noise(2);
  models::MoELayer whole(8, c, g, &noise);
  Generator g2(1);
  models::MoELayer half(8, c, g2, &noise);
  half.split_experts(1, 2);
  CHECK(half.w1.shape() == Shape{2, 8, c.mlp_dim});
  CHECK(half.w1.to_vector<float>() == ops::slice(whole.w1, 0, 2, 4).contiguous().to_vector<float>());
  CHECK(half.b2.to_vector<float>() == ops::slice(whole.b2, 0, 2, 4).contiguous().to_vector<float>());
  // The registered parameter is the new one, which the optimizer will take.
  bool found = false;
  for (const auto& [n, p] : half.named_parameters())
    if (n == "w1") found = &p.impl() == &half.w1.impl();
  CHECK(found);
  models::MoELayer odd(8, c, g, &noise);
  CHECK_THROWS_WITH_AS(odd.split_experts(0, 3), doctest::Contains("do not split evenly over 3"), Error);
  c.router.type = "soft";
  models::MoELayer soft(8, c, g, &noise);
  CHECK_THROWS_WITH_AS(soft.split_experts(0, 2), doctest::Contains("Soft MoE"), Error);
}

TEST_CASE("SplitParameters::covers a parameter and its buffers, nothing else") {
  const train::SplitParameters s{{"blocks.1.moe.w1"}};
  CHECK(s.covers("blocks.1.moe.w1"));
  CHECK(s.covers("adamw.m.blocks.1.moe.w1"));
  CHECK(s.covers("ema.blocks.1.moe.w1"));
  CHECK_FALSE(s.covers("blocks.11.moe.w1"));
  CHECK_FALSE(s.covers("xblocks.1.moe.w1"));
  CHECK_FALSE(s.covers("blocks.1.moe.w1x"));
}

TEST_CASE("datasets::rows: a range of images, checked") {
  const datasets::Dataset d = datasets::make_synthetic(10, 1, 4, 3, 1);
  const datasets::Dataset r = datasets::rows(d, 3, 7);
  CHECK(r.n == 4);
  CHECK(std::equal(r.pixels.begin(), r.pixels.end(), d.image(3)));
  CHECK(r.labels == std::vector<int64_t>(d.labels.begin() + 3, d.labels.begin() + 7));
  CHECK_THROWS_WITH_AS(datasets::rows(d, 5, 11), doctest::Contains("is not a range of the 10"), Error);
}

TEST_CASE("prc_loss_of_total: two ranks' halves with summed correlations are the whole batch's PRC") {
  const int64_t B = 6, T = 5, E = 4;
  Generator g(3);
  const Tensor p0 = ops::softmax(randn({B, T, E}, g)), q0 = ops::softmax(randn({B, T, E}, g));
  std::vector<int64_t> pr;
  for (int64_t i = 0; i < B * T; ++i) pr.push_back(i % 4 == 3 ? -1 : (i * 7 + 2) % T);
  const Tensor pairs = Tensor::from_i64(pr, {B, T});
  ops::PrcOptions opt;
  opt.diag_weight = 0.3f, opt.off_weight = 0.7f;  // both terms matter
  Tensor p = p0.clone().set_requires_grad(true), q = q0.clone().set_requires_grad(true);
  const Tensor whole = ops::prc_loss(p, q, pairs, opt);
  whole.backward();
  // Each half as a rank sees it: its own C and pair count, summed as Replicas::prc_loss does.
  std::vector<Tensor> hp, hq, hpairs;
  std::vector<double> sum(size_t(E * E), 0.0);
  int64_t M = 0;
  for (int h = 0; h < 2; ++h) {
    hp.push_back(ops::slice(p0, 0, 3 * h, 3 * h + 3).clone().set_requires_grad(true));
    hq.push_back(ops::slice(q0, 0, 3 * h, 3 * h + 3).clone().set_requires_grad(true));
    hpairs.push_back(ops::slice(pairs, 0, 3 * h, 3 * h + 3).contiguous());
    const int64_t m = ops::prc_pair_count(hpairs.back());
    const std::vector<float> c = ops::prc_matrix(hp.back(), hq.back(), hpairs.back()).to_vector<float>();
    for (size_t k = 0; k < c.size(); ++k) sum[k] += double(m) * c[k];
    M += m;
  }
  CHECK(M == ops::prc_pair_count(pairs));
  std::vector<float> C;
  for (double s : sum) C.push_back(float(s / double(M)));
  std::vector<float> gp, gq;
  for (int h = 0; h < 2; ++h) {
    const Tensor l = ops::prc_loss_of_total(hp[size_t(h)], hq[size_t(h)], hpairs[size_t(h)],
                                            Tensor::from(C, {E, E}), M, opt, 2.f);
    CHECK(l.item() == doctest::Approx(whole.item()).epsilon(1e-5));
    l.backward();
    // The data-parallel mean of the two ranks' gradients (each 1/2 of its own).
    for (float v : ops::mul(hp[size_t(h)].grad(), 0.5f).to_vector<float>()) gp.push_back(v);
    for (float v : ops::mul(hq[size_t(h)].grad(), 0.5f).to_vector<float>()) gq.push_back(v);
  }
  test::check_close(Tensor::from(gp, {B, T, E}), p.grad().to_vector<float>(), 1e-6f, 1e-4f);
  test::check_close(Tensor::from(gq, {B, T, E}), q.grad().to_vector<float>(), 1e-6f, 1e-4f);
  opt.reference_diagonal = true;
  CHECK_THROWS_WITH_AS(ops::prc_loss_of_total(hp[0], hq[0], hpairs[0], Tensor::from(C, {E, E}), M, opt, 1.f),
                       doctest::Contains("paper form"), Error);
}
