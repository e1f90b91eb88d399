// Batches from an in-memory Dataset: a seeded order per epoch, crops/flips and normalisation,
// prepared by one background thread a few batches ahead, so the training step rarely waits.
//
//   Loader loader(train, 128, /*shuffle=*/true, seed, /*drop_last=*/true,
//                 Augment::crop_flip(2), Normalize::fashion_mnist());
//   for (int epoch = 0; epoch < E; ++epoch) {
//     loader.begin_epoch(epoch);
//     for (Batch b; loader.next(b);) step(b.images, b.labels);
//   }
//
// Two views for PRC: a Loader with Augment::none(), then
// loader.set_two_view(TwoViewConfig::for_image_size(28)); batches also carry images2 and pairs.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "datasets/dataset.h"
#include "datasets/transforms.h"
#include "datasets/two_view.h"
#include "engine/tensor.h"

namespace mv::datasets {

struct Batch {
  Tensor images;                 // (B, C, H, W) F32, augmented and normalised
  Tensor labels;                 // (B,) I64
  std::vector<int64_t> indices;  // the B data set indices, in batch order
  std::vector<CropBox> boxes;    // the box each image was cut with (source pixel units)
  int64_t batch_index = 0;       // position in the epoch
  // Two-view mode only (Loader::set_two_view; else undefined/empty): `images` and `boxes` are
  // view 1, these view 2 of the same images, and `pairs` = pair_batch(boxes, boxes2, ...).
  Tensor images2;                // (B, C, H, W) F32
  Tensor pairs;                  // (B, T) I64: per view-1 token, the view-2 token or -1
  std::vector<CropBox> boxes2;
};

class Loader {
 public:
  // `data` is read in place and must outlive the loader. `prefetch`: batches prepared ahead.
  Loader(const Dataset& data, int batch_size, bool shuffle, uint64_t seed, bool drop_last = false,
         Augment aug = {}, Normalize norm = {}, int prefetch = 2);
  ~Loader();  // stops and joins the worker, also in the middle of an epoch
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  // Starts epoch `epoch` (ending any running one): its order is a function of (seed, epoch)
  // only, and so are its crops and flips. From `first_batch` on: a run resumed in the middle of
  // an epoch gets the very batches it would have had.
  void begin_epoch(int epoch, int64_t first_batch = 0);
  // The next batch of the epoch; false when the epoch is over. An exception thrown while
  // preparing a batch is rethrown here, in order, after the batches before it.
  bool next(Batch& out);

  int64_t batches_per_epoch() const;
  // Seconds the worker has spent preparing the batches of the current epoch (hook included):
  // the cost of the data pipeline itself, apart from any waiting.
  double build_seconds();
  int64_t size() const { return data_.n; }
  const Dataset& dataset() const { return data_; }
  // The image order of an epoch (identity without shuffle).
  std::vector<int64_t> epoch_order(int epoch) const;
  // Runs on the worker after a batch is built (extra views, noise, ...); exceptions it throws
  // reach next(). Taken by each begin_epoch: a running epoch keeps the hook it started with.
  void set_batch_hook(std::function<void(Batch&)> hook) { hook_ = std::move(hook); }
  // Two-view mode (PRC, datasets/two_view.h), from the next begin_epoch; std::nullopt turns it
  // off. Both views are cut by `cfg` (the Loader's Augment must be none); batch k's boxes depend
  // on (seed, epoch, k) only. Throws here on a bad config.
  void set_two_view(std::optional<TwoViewConfig> cfg);
  const std::optional<TwoViewConfig>& two_view() const { return two_view_; }
  // Data parallel (dist/): batches are still the global batches of batch_size images, with the
  // order, crops and flips one process would get, but this loader builds only share `part` of
  // `parts` of each: rows [part B / parts, (part + 1) B / parts). B must divide evenly.
  void set_share(int part, int parts);

 private:
  void stop_worker();
  void work(int epoch, int64_t first_batch, std::vector<int64_t> order,
            std::function<void(Batch&)> hook, std::optional<TwoViewConfig> two_view);
  Batch start_batch(int64_t k, const std::vector<int64_t>& order) const;
  Batch build(int64_t k, const std::vector<int64_t>& order, Generator& g) const;
  void keep_share(Batch& b) const;
  Batch build_two_view(int64_t k, const std::vector<int64_t>& order, Generator& g,
                       const TwoViewConfig& cfg) const;

  const Dataset& data_;
  int batch_size_;
  bool shuffle_, drop_last_;
  int part_ = 0, parts_ = 1;
  uint64_t seed_;
  Augment aug_;
  Normalize norm_;
  size_t prefetch_;
  std::function<void(Batch&)> hook_;
  std::optional<TwoViewConfig> two_view_;

  std::thread worker_;
  std::mutex mu_;
  std::condition_variable ready_cv_, space_cv_;
  std::deque<Batch> queue_;
  bool started_ = false, stop_ = false, finished_ = false;
  double build_s_ = 0;
  std::exception_ptr error_;
};

}  // namespace mv::datasets
