#include "dist/experts.h"

#include <chrono>
#include <algorithm>
#include <cstring>
#include <utility>

#include "autograd/autograd.h"
#include "dist/comm.h"
#include "dist/device_comm.h"
#include "engine/error.h"
#include "engine/memory.h"

namespace mv::dist {

namespace {

double g_exchange_s = 0;

// Adds its lifetime to g_exchange_s.
struct Timed {
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  ~Timed() {
    g_exchange_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
};

// One side of an exchange: buffers of `rows` rows of width D, the first `used[b]` rows of buffer
// b filled, and the blocks of rows in the order they travel, with the rows sent to (or
// received from) each rank.
struct Block {
  int64_t first, rows;  // flat over the buffers
  int rank;             // the rank it goes to or comes from
};
struct Side {
  int64_t buffers = 0, rows = 0;
  std::vector<int64_t> used;      // (buffers,)
  std::vector<Block> blocks;      // in the order they travel
  std::vector<int64_t> per_rank;  // rows to or from each rank
};

// The token side: expert after expert, each one's rows in use, to the rank that holds it.
Side token_side(const RowRoute& rt, int n) {
  const int64_t El = rt.E / n;
  Side s{rt.E, rt.R, rt.sent, {}, std::vector<int64_t>(size_t(n), 0)};
  for (int64_t e = 0; e < rt.E; ++e) {
    s.blocks.push_back({e * rt.R, rt.sent[size_t(e)], int(e / El)});
    s.per_rank[size_t(e / El)] += rt.sent[size_t(e)];
  }
  return s;
}

// The expert side: from rank 0, its rows for local expert 0, 1, ...; then rank 1, ...; each
// expert's rows packed rank after rank.
Side expert_side(const RowRoute& rt, int n) {
  const int64_t El = rt.E / n;
  Side s{El, n * rt.R, std::vector<int64_t>(size_t(El), 0), {}, std::vector<int64_t>(size_t(n), 0)};
  for (int r = 0; r < n; ++r)
    for (int64_t l = 0; l < El; ++l) {
      const int64_t k = rt.got[size_t(r * El + l)];
      s.blocks.push_back({l * s.rows + s.used[size_t(l)], k, r});
      s.used[size_t(l)] += k;
      s.per_rank[size_t(r)] += k;
    }
  return s;
}

// src laid out as `from` -> a new tensor laid out as `to`: the blocks of `from` are packed, sent
// (all-to-all), and what arrives is placed in the blocks of `to`; padding rows are zero. The
// rows that stay on this rank skip MPI: its blocks on both sides come in the same order, and are
// copied straight across. The staging buffers come from the CPU pool, so a training step
// allocates nothing new.
Tensor move_rows(const Tensor& src, const Side& from, const Side& to, int64_t D) {
  Timed timed;
  const int me = rank(Group::Experts);
  const Device dev = src.device();
  const bool gpu = dev == Device::CUDA;
  auto copy = [gpu](float* dst, const float* from_, int64_t floats) {
    if (gpu) cuda_hooks()->copy_d2d(dst, from_, size_t(floats) * sizeof(float));
    else std::memcpy(dst, from_, size_t(floats) * sizeof(float));
  };
  std::vector<int64_t> send_counts, recv_counts;
  int64_t send_rows = 0, recv_rows = 0;
  for (size_t r = 0; r < from.per_rank.size(); ++r) {
    const bool other = int(r) != me;
    send_counts.push_back(other ? from.per_rank[r] * D : 0);
    recv_counts.push_back(other ? to.per_rank[r] * D : 0);
    send_rows += other ? from.per_rank[r] : 0;
    recv_rows += other ? to.per_rank[r] : 0;
  }
  Tensor send = Tensor::empty({std::max<int64_t>(1, send_rows * D)}, DType::F32, dev);
  Tensor recv = Tensor::empty({std::max<int64_t>(1, recv_rows * D)}, DType::F32, dev);
  const Tensor sc = src.contiguous();
  const float* in = sc.data<float>();
  Tensor out = Tensor::empty({to.buffers, to.rows, D}, DType::F32, dev);
  float* o = out.data<float>();
  float* p = send.data<float>();
  std::vector<const Block*> staying;
  for (const Block& b : from.blocks) {
    if (b.rank == me) {
      staying.push_back(&b);
      continue;
    }
    copy(p, in + b.first * D, b.rows * D);
    p += b.rows * D;
  }
  if (gpu)
    device_all_to_all_v(send.data<float>(), send_counts, recv.data<float>(), recv_counts);
  else
    all_to_all_v(send.data<float>(), send_counts, recv.data<float>(), recv_counts, Group::Experts);
  const float* q = recv.data<float>();
  size_t k = 0;
  for (const Block& b : to.blocks) {
    if (b.rank == me) {
      copy(o + b.first * D, in + staying[k++]->first * D, b.rows * D);
      continue;
    }
    copy(o + b.first * D, q, b.rows * D);
    q += b.rows * D;
  }
  for (int64_t b = 0; b < to.buffers; ++b) {
    float* pad = o + (b * to.rows + to.used[size_t(b)]) * D;
    const size_t bytes = size_t((to.rows - to.used[size_t(b)]) * D) * sizeof(float);
    if (gpu) cuda_hooks()->zero(pad, bytes);
    else std::memset(pad, 0, bytes);
  }
  return out;
}

// (E, R, D) -> (El, n R, D): the forward of send_to_experts and the backward of
// return_to_tokens; to_tokens the other way.
Tensor to_experts(const Tensor& buf, const RowRoute& rt) {
  const int n = size(Group::Experts);
  return move_rows(buf, token_side(rt, n), expert_side(rt, n), rt.D);
}
Tensor to_tokens(const Tensor& y, const RowRoute& rt) {
  const int n = size(Group::Experts);
  return move_rows(y, expert_side(rt, n), token_side(rt, n), rt.D);
}

void check_f32(const char* op, const Tensor& t) {
  MV_CHECK(t.dtype() == DType::F32, op, ": ", t.str(), " must be F32");
  MV_CHECK(t.device() == Device::CPU || nccl_built(), op, ": ", t.str(), " is on the GPU, and "
           "moving GPU rows between ranks needs NCCL, which this build did not find");
}

}  // namespace

AtExperts send_to_experts(const Tensor& buf, const Tensor& rows) {
  check_f32("send_to_experts", buf);
  const int n = size(Group::Experts);
  MV_CHECK(buf.ndim() == 3 && rows.ndim() == 1 && rows.size(0) == buf.size(0) &&
               rows.dtype() == DType::I64 && buf.size(0) % n == 0,
           "send_to_experts: buffers ", buf.str(), " and rows ", rows.str(), ": expected (E, R, D) "
           "and (E,) I64 with E a multiple of the ", n, " ranks");
  auto rt = std::make_shared<RowRoute>();
  rt->E = buf.size(0), rt->R = buf.size(1), rt->D = buf.size(2);
  const int64_t El = rt->E / n;
  rt->sent = rows.to(Device::CPU).contiguous().to_vector<int64_t>();
  rt->got.assign(size_t(n * El), 0);
  const std::vector<int64_t> each(size_t(n), El);
  {
    Timed timed;
    all_to_all_v(rt->sent.data(), each, rt->got.data(), each, Group::Experts);  // counts first
  }
  AtExperts at;
  at.rows = Tensor::zeros({El}, DType::I64);
  for (int s = 0; s < n; ++s)
    for (int64_t l = 0; l < El; ++l) at.rows.data<int64_t>()[l] += rt->got[size_t(s * El + l)];
  at.rows = at.rows.to(buf.device());
  at.route = rt;
  at.buf = autograd::record("send_to_experts", to_experts(buf, *rt), {buf}, [rt](const Tensor& g) {
    return std::vector<Tensor>{to_tokens(g, *rt)};
  });
  return at;
}

Tensor return_to_tokens(const Tensor& y, const std::shared_ptr<const RowRoute>& rt) {
  check_f32("return_to_tokens", y);
  const int n = size(Group::Experts);
  MV_CHECK(y.ndim() == 3 && y.size(0) * n == rt->E && y.size(1) == n * rt->R && y.size(2) == rt->D,
           "return_to_tokens: ", y.str(), " is not the (El, n R, D) layout of send_to_experts");
  return autograd::record("return_to_tokens", to_tokens(y, *rt), {y}, [rt](const Tensor& g) {
    return std::vector<Tensor>{to_experts(g, *rt)};
  });
}

double take_exchange_seconds() {
  const double s = g_exchange_s;
  g_exchange_s = 0;
  return s;
}

Tensor gather_experts(const Tensor& local) {
  MV_CHECK(local.dtype() == DType::F32, "gather_experts: ", local.str(), " must be F32");
  const Tensor host = local.to(Device::CPU).contiguous();  // checkpoints and evaluation: rare
  Shape shape = local.shape();
  shape.at(0) *= size(Group::Experts);
  Tensor full = Tensor::empty(shape);
  all_gather(host.data<float>(), host.numel(), full.data<float>(), Group::Experts);
  return full.to(local.device());
}

Tensor own_experts(const Tensor& full) {
  const int n = size(Group::Experts);
  MV_CHECK(full.ndim() >= 1 && full.size(0) % n == 0, "own_experts: ", full.str(), " does not "
           "split by its first axis over ", n, " ranks");
  const int64_t El = full.size(0) / n, per = full.numel() / full.size(0);
  Shape shape = full.shape();
  shape[0] = El;
  Tensor out = Tensor::empty(shape);
  const Tensor f = full.contiguous();
  const float* mine = f.data<float>() + rank(Group::Experts) * El * per;
  std::memcpy(out.data<float>(), mine, size_t(El * per) * sizeof(float));
  return out;
}

}  // namespace mv::dist
