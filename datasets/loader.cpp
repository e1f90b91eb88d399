#include "datasets/loader.h"

#include <chrono>

#include "engine/error.h"
#include "engine/random.h"

namespace mv::datasets {
namespace {

// splitmix64 finaliser: decorrelates the seeds of (seed, epoch, stream) triples.
uint64_t mix(uint64_t seed, uint64_t epoch, uint64_t stream) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (epoch + 1) + 0xBF58476D1CE4E5B9ull * (stream + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

Loader::Loader(const Dataset& data, int batch_size, bool shuffle, uint64_t seed, bool drop_last,
               Augment aug, Normalize norm, int prefetch)
    : data_(data), batch_size_(batch_size), shuffle_(shuffle), drop_last_(drop_last), seed_(seed),
      aug_(aug), norm_(std::move(norm)), prefetch_(size_t(prefetch)) {
  data_.validate();
  MV_CHECK(batch_size > 0, "Loader: batch size ", batch_size, " is not positive");
  MV_CHECK(prefetch >= 1, "Loader: prefetch ", prefetch, " must be at least 1");
  MV_CHECK(!norm_.enabled() || int64_t(norm_.mean.size()) == data_.channels, "Loader: ",
           data_.name, " has ", data_.channels, " channels but the normalisation has ",
           norm_.mean.size());
  // Sample one box now so a bad augmentation config fails here, not in the worker.
  Generator probe(0);
  if (data_.n > 0) aug_.sample(1, data_.height, data_.width, probe);
}

Loader::~Loader() { stop_worker(); }

int64_t Loader::batches_per_epoch() const {
  return drop_last_ ? data_.n / batch_size_ : (data_.n + batch_size_ - 1) / batch_size_;
}

double Loader::build_seconds() {
  std::lock_guard<std::mutex> lock(mu_);
  return build_s_;
}

std::vector<int64_t> Loader::epoch_order(int epoch) const {
  if (!shuffle_) {
    std::vector<int64_t> order(static_cast<size_t>(data_.n));
    for (int64_t i = 0; i < data_.n; ++i) order[size_t(i)] = i;
    return order;
  }
  Generator g(mix(seed_, uint64_t(epoch), 1));
  return randperm(data_.n, g).to_vector<int64_t>();
}

void Loader::stop_worker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  space_cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

void Loader::begin_epoch(int epoch, int64_t first_batch) {
  MV_CHECK(first_batch >= 0 && first_batch <= batches_per_epoch(), "Loader::begin_epoch: batch ",
           first_batch, " is outside the epoch's 0..", batches_per_epoch());
  stop_worker();
  std::vector<int64_t> order = epoch_order(epoch);
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.clear();
    stop_ = finished_ = false;
    error_ = nullptr;
    started_ = true;
    build_s_ = 0;
  }
  worker_ = std::thread(&Loader::work, this, epoch, first_batch, std::move(order), hook_, two_view_);
}

bool Loader::next(Batch& out) {
  std::unique_lock<std::mutex> lock(mu_);
  MV_CHECK(started_, "Loader::next: call begin_epoch(epoch) first");
  ready_cv_.wait(lock, [&] { return !queue_.empty() || finished_; });
  if (!queue_.empty()) {
    out = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    space_cv_.notify_one();
    return true;
  }
  if (error_) std::rethrow_exception(error_);  // again on every call, until begin_epoch
  return false;
}

// Batch k's indices and labels in the order of `order`.
Batch Loader::start_batch(int64_t k, const std::vector<int64_t>& order) const {
  const int64_t begin = k * batch_size_;
  const int64_t B = std::min<int64_t>(batch_size_, data_.n - begin);
  Batch b;
  b.batch_index = k;
  b.indices.assign(order.begin() + begin, order.begin() + begin + B);
  b.labels = Tensor::empty({B}, DType::I64);
  int64_t* lab = b.labels.data<int64_t>();
  for (int64_t i = 0; i < B; ++i) lab[i] = data_.labels[size_t(b.indices[size_t(i)])];
  return b;
}

Batch Loader::build(int64_t k, const std::vector<int64_t>& order, Generator& g) const {
  Batch b = start_batch(k, order);
  const int64_t B = b.labels.numel();
  const int64_t C = data_.channels, H = data_.height, W = data_.width;
  const int oh = aug_.out_h(H), ow = aug_.out_w(W);
  b.boxes = aug_.sample(B, H, W, g);
  keep_share(b);
  const int64_t n = b.labels.numel();
  b.images = Tensor::empty({n, C, oh, ow});
  float* img = b.images.data<float>();
  const int64_t plane = int64_t(oh) * ow;  // crop, /255 and normalisation in one pass per image
  // Serial on purpose: this thread runs beside the training step's OpenMP team; a second team
  // here would fight it for the same cores.
  for (int64_t i = 0; i < n; ++i) {
    const int64_t idx = b.indices[size_t(i)];
    float* dst = img + i * C * plane;
    crop_image_u8(data_.image(idx), C, H, W, b.boxes[size_t(i)], oh, ow, dst, norm_);
  }
  return b;
}

void Loader::set_share(int part, int parts) {
  MV_CHECK(parts >= 1 && 0 <= part && part < parts, "Loader: share ", part, " of ", parts);
  MV_CHECK(batch_size_ % parts == 0, "--batch ", batch_size_, " does not split evenly over ",
           parts, " ranks; use a multiple of ", parts);
  part_ = part, parts_ = parts;
}

// Cuts a batch (its crops already drawn, no pixels yet) to this loader's share of its rows.
void Loader::keep_share(Batch& b) const {
  if (parts_ == 1) return;
  const int64_t B = b.labels.numel();
  MV_CHECK(B % parts_ == 0, "Loader: a batch of ", B, " images does not split over ", parts_,
           " ranks (the last, partial batch of an epoch needs drop_last)");
  const int64_t lo = B / parts_ * part_, hi = lo + B / parts_;
  auto cut = [&](auto& v) {
    if (!v.empty()) v = std::vector(v.begin() + lo, v.begin() + hi);
  };
  cut(b.indices), cut(b.boxes), cut(b.boxes2);
  Tensor labels = Tensor::empty({hi - lo}, DType::I64);
  std::copy(b.labels.data<int64_t>() + lo, b.labels.data<int64_t>() + hi, labels.data<int64_t>());
  b.labels = labels;
}

void Loader::set_two_view(std::optional<TwoViewConfig> cfg) {
  if (cfg) {
    MV_CHECK(aug_.crop == CropMode::None && aug_.hflip_p == 0.f && aug_.size == 0,
             "Loader: two-view mode cuts its own crops and flips (TwoViewConfig); construct the "
             "Loader with Augment::none()");
    cfg->validate(data_.height, data_.width);
  }
  two_view_ = std::move(cfg);
}

Batch Loader::build_two_view(int64_t k, const std::vector<int64_t>& order, Generator& g,
                             const TwoViewConfig& cfg) const {
  Batch b = start_batch(k, order);
  const int64_t B = b.labels.numel();
  const int64_t C = data_.channels, H = data_.height, W = data_.width;
  const int oh = cfg.out_h(H), ow = cfg.out_w(W);
  TwoViewBoxes boxes = sample_two_views(B, H, W, cfg, g);
  b.boxes = std::move(boxes.view1);
  b.boxes2 = std::move(boxes.view2);
  keep_share(b);
  const int64_t n = b.labels.numel();
  b.images = Tensor::empty({n, C, oh, ow});
  b.images2 = Tensor::empty({n, C, oh, ow});
  float *img = b.images.data<float>(), *img2 = b.images2.data<float>();
  const int64_t plane = int64_t(oh) * ow;
  for (int64_t i = 0; i < n; ++i) {  // serial, as in build()
    const uint8_t* src = data_.image(b.indices[size_t(i)]);
    crop_image_u8(src, C, H, W, b.boxes[size_t(i)], oh, ow, img + i * C * plane, norm_);
    crop_image_u8(src, C, H, W, b.boxes2[size_t(i)], oh, ow, img2 + i * C * plane, norm_);
  }
  b.pairs = pair_batch(b.boxes, b.boxes2, oh, ow, cfg.patch, cfg.cls_pair);
  return b;
}

void Loader::work(int epoch, int64_t first_batch, std::vector<int64_t> order,
                  std::function<void(Batch&)> hook, std::optional<TwoViewConfig> two_view) {
  Generator g(mix(seed_, uint64_t(epoch), 2));  // crops and flips of this epoch
  // Two views: batch k reads its own range of Philox blocks of a separate stream, reserved for a
  // full batch (measured once by sampling one), so its boxes depend on (seed, epoch, k) only.
  Generator g2(mix(seed_, uint64_t(epoch), 3));
  const int64_t nb = batches_per_epoch();
  try {
    uint64_t blocks = 0;
    if (two_view) {
      Generator probe(0);
      sample_two_views(batch_size_, data_.height, data_.width, *two_view, probe);
      blocks = probe.offset;
    }
    for (int64_t k = 0; k < nb; ++k) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_) return;
      }
      const auto t0 = std::chrono::steady_clock::now();
      Batch b;
      if (two_view) {
        if (k < first_batch) continue;  // batch k's views depend on k alone
        g2.offset = uint64_t(k) * blocks;
        b = build_two_view(k, order, g2, *two_view);
      } else {
        b = build(k, order, g);  // also before first_batch: it advances g as the full epoch did
        if (k < first_batch) continue;
      }
      if (hook) hook(b);
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::unique_lock<std::mutex> lock(mu_);
      build_s_ += dt;
      space_cv_.wait(lock, [&] { return stop_ || queue_.size() < prefetch_; });
      if (stop_) return;
      queue_.push_back(std::move(b));
      lock.unlock();
      ready_cv_.notify_one();
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = std::current_exception();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    finished_ = true;
  }
  ready_cv_.notify_all();
}

}  // namespace mv::datasets
