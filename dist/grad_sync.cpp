#include "dist/grad_sync.h"

#include <algorithm>
#include <cstring>

#include "dist/comm.h"
#include "engine/error.h"

namespace mv::dist {

GradientSync::GradientSync(const std::vector<Tensor>& params, int64_t bucket_floats) {
  const int64_t n = size();
  for (auto it = params.rbegin(); it != params.rend(); ++it) {
    const Tensor& p = *it;
    MV_CHECK(p.device() == Device::CPU && p.dtype() == DType::F32, "data parallel: parameter ",
             p.str(), " must be F32 on the CPU (the GPU path needs NCCL, which is not built yet)");
    if (buckets_.empty() || buckets_.back().floats >= bucket_floats) buckets_.emplace_back();
    Bucket& b = buckets_.back();
    b.params.push_back(p);
    b.floats += p.numel() + 1;
    bucket_of_[&p.impl()] = buckets_.size() - 1;
  }
  for (Bucket& b : buckets_) {
    b.piece = (b.floats + n - 1) / n;
    b.flat.assign(size_t(b.piece * n), 0.f);
    b.pieces.assign(size_t(b.piece * n), 0.f);
    b.gathered.assign(size_t(b.piece * n), 0.f);
    b.reduced.assign(size_t(b.piece), 0.f);
    b.waiting = b.params.size();
  }
}

void GradientSync::ready(const Tensor& leaf) {
  auto it = bucket_of_.find(&leaf.impl());
  if (it == bucket_of_.end()) return;
  Bucket& b = buckets_[it->second];
  if (b.waiting > 0 && --b.waiting == 0) start(b);
}

// Packs the bucket's gradients (zeros and flag 0 where this rank has none) and sends piece r
// to rank r.
void GradientSync::start(Bucket& b) {
  float* f = b.flat.data();
  for (const Tensor& p : b.params) {
    const Tensor g = p.grad();
    if (g.defined()) std::memcpy(f, g.contiguous().data<float>(), size_t(p.numel()) * sizeof(float));
    else std::fill(f, f + p.numel(), 0.f);
    f += p.numel();
  }
  for (const Tensor& p : b.params) *f++ = p.grad().defined() ? 1.f : 0.f;
  b.handle = start_all_to_all(b.flat.data(), b.piece, b.pieces.data());
  b.started = true;
}

void GradientSync::finish() {
  const int n = size();
  const float inv = 1.f / float(n);
  for (Bucket& b : buckets_)
    if (!b.started) start(b);
  // Each bucket's own piece: the sum in rank order, then the mean; then every piece to all.
  for (Bucket& b : buckets_) {
    wait(b.handle);
    for (int64_t i = 0; i < b.piece; ++i) {
      float s = 0.f;
      for (int r = 0; r < n; ++r) s += b.pieces[size_t(r * b.piece + i)];
      b.reduced[size_t(i)] = s * inv;
    }
    b.handle = start_all_gather(b.reduced.data(), b.piece, b.gathered.data());
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
