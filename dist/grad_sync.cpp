#include "dist/grad_sync.h"

#include <algorithm>
#include <cstring>

#include "dist/comm.h"
#include "dist/device_comm.h"
#include "engine/error.h"
#include "engine/memory.h"
#include "ops/elementwise.h"

namespace mv::dist {

GradientSync::GradientSync(const std::vector<Tensor>& params, int64_t bucket_floats, Group group)
    : group_(group) {
  const int64_t n = size(group);
  if (!params.empty()) device_ = params.front().device();
  MV_CHECK(device_ == Device::CPU || nccl_built(), "data parallel on the GPU needs NCCL, which "
           "this build did not find");
  MV_CHECK(device_ == Device::CPU || n == 1 || n == size(), "data parallel on the GPU reduces "
           "over the whole world only");
  // A group of one inside a larger world (the replicas of experts split over all ranks) has
  // nothing to reduce. A world of one still runs the whole path (its tests; NCCL at one rank).
  alone_ = n == 1 && size() > 1;
  for (auto it = params.rbegin(); it != params.rend(); ++it) {
    const Tensor& p = *it;
    MV_CHECK(p.device() == device_ && p.dtype() == DType::F32, "data parallel: parameter ",
             p.str(), " must be F32 on the device of the others");
    if (buckets_.empty() || buckets_.back().floats >= bucket_floats) buckets_.emplace_back();
    Bucket& b = buckets_.back();
    b.params.push_back(p);
    b.floats += p.numel() + 1;
    bucket_of_[&p.impl()] = buckets_.size() - 1;
  }
  for (Bucket& b : buckets_) {
    b.waiting = b.params.size();
    if (device_ == Device::CUDA) {
      b.device_flat = Tensor::empty({b.floats}, DType::F32, Device::CUDA);
      continue;
    }
    b.piece = (b.floats + n - 1) / n;
    b.flat.assign(size_t(b.piece * n), 0.f);
    b.pieces.assign(size_t(b.piece * n), 0.f);
    b.gathered.assign(size_t(b.piece * n), 0.f);
    b.reduced.assign(size_t(b.piece), 0.f);
  }
}

void GradientSync::ready(const Tensor& leaf) {
  if (alone_) return;
  auto it = bucket_of_.find(&leaf.impl());
  if (it == bucket_of_.end()) return;
  Bucket& b = buckets_[it->second];
  if (b.waiting > 0 && --b.waiting == 0) start(b);
}

// Packs the bucket's gradients (zeros and flag 0 where this rank has none) and starts the
// reduction: on the CPU piece r goes to rank r; on the GPU NCCL sums the whole bucket.
void GradientSync::start(Bucket& b) {
  const bool gpu = device_ == Device::CUDA;
  float* f = gpu ? b.device_flat.data<float>() : b.flat.data();
  std::vector<float> flags;
  for (const Tensor& p : b.params) {
    const Tensor g = p.grad();
    const size_t bytes = size_t(p.numel()) * sizeof(float);
    if (g.defined() && gpu) cuda_hooks()->copy_d2d(f, g.contiguous().data<float>(), bytes);
    else if (g.defined()) std::memcpy(f, g.contiguous().data<float>(), bytes);
    else if (gpu) cuda_hooks()->zero(f, bytes);
    else std::fill(f, f + p.numel(), 0.f);
    f += p.numel();
    flags.push_back(g.defined() ? 1.f : 0.f);
  }
  b.started = true;
  if (gpu) {
    cuda_hooks()->copy_h2d(f, flags.data(), flags.size() * sizeof(float));
    device_all_reduce_sum(b.device_flat.data<float>(), b.floats);  // the world's communicator
    return;
  }
  std::copy(flags.begin(), flags.end(), f);
  b.handle = start_all_to_all(b.flat.data(), b.piece, b.pieces.data(), group_);
}

// The GPU bucket after NCCL's sum: the mean, each parameter's slice as its gradient.
void GradientSync::finish_on_device(Bucket& b) {
  const Tensor mean = ops::mul(b.device_flat, 1.f / float(size(group_)));
  std::vector<float> used(b.params.size());
  const float* f = mean.data<float>();
  cuda_hooks()->copy_d2h(used.data(), f + (b.floats - int64_t(used.size())),
                         used.size() * sizeof(float));
  for (size_t k = 0; k < b.params.size(); ++k) {
    Tensor p = b.params[k];
    if (used[k] > 0.f) {
      Tensor g = Tensor::empty(p.shape(), DType::F32, Device::CUDA);
      cuda_hooks()->copy_d2d(g.data<float>(), f, size_t(p.numel()) * sizeof(float));
      p.set_grad(g);
    } else {
      p.zero_grad();
    }
    f += p.numel();
  }
}

void GradientSync::finish() {
  if (alone_) return;
  const int n = size(group_);
  const float inv = 1.f / float(n);
  for (Bucket& b : buckets_)
    if (!b.started) start(b);
  if (device_ == Device::CUDA) {
    for (Bucket& b : buckets_) {
      finish_on_device(b);
      b.started = false;
      b.waiting = b.params.size();
    }
    return;
  }
  // Each bucket's own piece: the sum in rank order, then the mean; then every piece to all.
  for (Bucket& b : buckets_) {
    wait(b.handle);
    for (int64_t i = 0; i < b.piece; ++i) {
      float s = 0.f;
      for (int r = 0; r < n; ++r) s += b.pieces[size_t(r * b.piece + i)];
      b.reduced[size_t(i)] = s * inv;
    }
    b.handle = start_all_gather(b.reduced.data(), b.piece, b.gathered.data(), group_);
  }
  for (Bucket& b : buckets_) {
    wait(b.handle);
    const float* f = b.gathered.data();
    const float* used = f + (b.floats - int64_t(b.params.size()));
    for (size_t k = 0; k < b.params.size(); ++k) {
      Tensor p = b.params[k];
      if (used[k] > 0.f) {
        Tensor g = Tensor::empty(p.shape());
        std::memcpy(g.data<float>(), f, size_t(p.numel()) * sizeof(float));
        p.set_grad(g);
      } else {
        p.zero_grad();
      }
      f += p.numel();
    }
    b.started = false;
    b.waiting = b.params.size();
  }
}

}  // namespace mv::dist
