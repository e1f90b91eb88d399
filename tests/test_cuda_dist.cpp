// Multi-process training's GPU paths (dist/device_comm.h, NCCL) in a world of one rank: the
// gradient reduction (NCCL's all-reduce, at one rank) and the expert row exchange (the device
// packing and placing; at one rank every row stays, so NCCL's sends and receives need 2 GPUs)
// on CUDA tensors against the CPU path, and the PRC loss over ranks (ops::prc_loss_of_total)
// against its CPU run. Part of moevit_cuda_tests (skips without a device); each
// case also skips, saying so, in a build without NCCL.
#include <doctest/doctest.h>

#include <cstdio>

#include "autograd/autograd.h"
#include "dist/device_comm.h"
#include "dist/experts.h"
#include "dist/grad_sync.h"
#include "ops/elementwise.h"
#include "ops/moe.h"
#include "ops/prc.h"
#include "ops/reduce.h"
#include "ops/softmax.h"
#include "tests/cuda_parity.h"

using namespace mv;
using namespace mv::test;

namespace {
bool have_nccl() {
  if (!dist::nccl_built()) std::printf("test_cuda_dist: built without NCCL, case skipped\n");
  return dist::nccl_built();
}
}  // namespace

TEST_CASE("cuda GradientSync (NCCL, one rank): each gradient the CPU's, bucket by bucket") {
  if (!have_nccl()) return;
  const Tensor a0 = rnd({5, 7}, 1), b0 = rnd({300}, 2);
  std::vector<std::vector<float>> got;
  for (Device dev : {Device::CPU, Device::CUDA}) {
    Tensor a = a0.to(dev).set_requires_grad(true), b = b0.to(dev).set_requires_grad(true);
    Tensor unused = rnd({4}, 3).to(dev).set_requires_grad(true);
    dist::GradientSync sync({a, b, unused}, /*bucket_floats=*/4);
    autograd::backward(ops::sum(ops::mul(ops::sum(a), b)), Tensor(),
                       [&](const Tensor& leaf) { sync.ready(leaf); });
    sync.finish();
    CHECK(!unused.grad().defined());
    CHECK(a.grad().device() == dev);
    got.push_back(a.grad().to_vector<float>());
    got.push_back(b.grad().to_vector<float>());
  }
  CHECK(got[0] == got[2]);  // a sum of 1 rank's bits is those bits
  CHECK(got[1] == got[3]);
}

TEST_CASE("cuda send_to_experts / return_to_tokens (NCCL, one rank): forward and gradients against the CPU") {
  if (!have_nccl()) return;
  const int64_t G = 4, N = 9, D = 8, E = 4, H = 6;
  const Tensor gates = ops::softmax(rnd({G, N, E}, 6, 2.f));
  ops::TopKOptions o;
  o.k = 2;
  o.capacity_factor = 1.f;
  const ops::Assignment a_cpu = ops::topk_route(gates, o).assign;
  const ops::Assignment a_gpu = ops::topk_route(gates.to(Device::CUDA), o).assign;
  const Fn layer = [&](const std::vector<Tensor>& in) {
    const ops::Assignment& a = in[0].device() == Device::CUDA ? a_gpu : a_cpu;
    const dist::AtExperts at = dist::send_to_experts(ops::dispatch(in[0], a), a.rows);
    const Tensor y = ops::expert_mlp(at.buf, in[1], in[2], in[3], in[4], at.rows);
    return ops::combine(dist::return_to_tokens(y, at.route), a);
  };
  parity("exchange", layer,
         {rnd({G, N, D}, 1), rnd({E, D, H}, 2, 0.5f), rnd({E, H}, 3, 0.1f), rnd({E, H, D}, 4, 0.5f),
          rnd({E, D}, 5, 0.1f)},
         1e-4);
}

TEST_CASE("cuda prc_loss_of_total: value and gradients against the CPU") {
  const int64_t B = 3, T = 5, E = 4;
  std::vector<int64_t> pr;
  for (int64_t i = 0; i < B * T; ++i) pr.push_back(i % 4 == 3 ? -1 : (i * 7 + 2) % T);
  const Tensor pairs = Tensor::from_i64(pr, {B, T});
  // A total taken over more than this batch: this batch's correlation, shifted.
  const Tensor C = ops::add(ops::prc_matrix(ops::softmax(rnd({B, T, E}, 1)),
                                            ops::softmax(rnd({B, T, E}, 2)), pairs),
                            rnd({E, E}, 3, 0.1f));
  const Fn loss = [&](const std::vector<Tensor>& in) {
    return ops::prc_loss_of_total(ops::softmax(in[0]), ops::softmax(in[1]),
                                  pairs.to(in[0].device()), C, 2 * B * T, ops::PrcOptions{}, 2.f);
  };
  parity("prc_loss_of_total", loss, {rnd({B, T, E}, 1), rnd({B, T, E}, 2)}, 1e-5);
}
