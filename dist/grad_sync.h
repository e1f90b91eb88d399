// Data parallel: after each backward, every rank holds the mean over ranks of the gradients of
// the parameters all ranks share (or, for split experts, all the ranks holding the same ones),
// the same bits everywhere and from run to run.
//
// The parameters are cut into buckets (about 1 MB of gradients each, in the reverse of their
// order, which is roughly the order backward finishes them). A bucket starts its reduction as
// soon as backward has finished all of its gradients (autograd::backward's leaf_done hook), so
// the communication of the last layers overlaps the backward of the first. Each bucket is
// reduced in two collectives with a fixed order of addition, whatever algorithm MPI picks:
//   1. all-to-all: rank r receives piece r of the bucket from every rank;
//   2. it adds the pieces in rank order 0, 1, ..., n-1 and divides by n;
//   3. all-gather: every rank receives every reduced piece.
// Each rank sends and receives 2 (n-1)/n of the bucket, as a ring all-reduce does. On GPUs
// (dist/device_comm.h) a bucket is packed on the device and NCCL's all-reduce sums it (NCCL's
// order of addition, fixed for a given rank count and topology), queued on the backend's stream.
#pragma once
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "dist/comm.h"
#include "engine/tensor.h"

namespace mv::dist {

class GradientSync {
 public:
  // params: F32 leaves, identical on every rank of `group` (same shapes, same order), all on
  // the CPU or all on the GPU (with NCCL, the whole world only).
  explicit GradientSync(const std::vector<Tensor>& params, int64_t bucket_floats = 1 << 18,
                        Group group = Group::World);
  // The backward hook: `leaf`'s gradient is final. Starts its bucket once the bucket is complete;
  // other leaves are ignored.
  void ready(const Tensor& leaf);
  // After backward: reduces the buckets not yet started, waits for all and writes each
  // parameter's mean gradient into its .grad (a parameter no rank used keeps none).
  void finish();
  size_t buckets() const { return buckets_.size(); }

 private:
  struct Bucket {
    std::vector<Tensor> params;
    int64_t floats = 0, piece = 0;  // gradient floats, then one per parameter (1 where this rank
                                    // has its gradient); floats per rank's piece (padded)
    size_t waiting = 0;             // gradients backward has not finished yet
    bool started = false;
    int handle = -1;
    std::vector<float> flat, pieces, gathered;  // CPU: n * piece floats each
    std::vector<float> reduced;                 // CPU: piece floats
    Tensor device_flat;                         // GPU: the floats above, summed in place
  };
  void start(Bucket& b);
  void finish_on_device(Bucket& b);
  Group group_;
  Device device_ = Device::CPU;
  bool alone_ = false;  // a group of one in a larger world: the gradients stay as they are
  std::vector<Bucket> buckets_;
  std::unordered_map<const TensorImpl*, size_t> bucket_of_;
};

}  // namespace mv::dist
