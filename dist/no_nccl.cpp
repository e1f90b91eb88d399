// A build without NCCL: GPU tensors cannot be shared between ranks.
#include "dist/device_comm.h"
#include "engine/error.h"

namespace mv::dist {

namespace {
[[noreturn]] void refuse() {
  MV_FAIL("collectives on GPU tensors need NCCL, which this build did not find (nccl.h and "
          "libnccl; reconfigure with them present)");
}
}  // namespace

bool nccl_built() { return false; }
void use_local_gpu() { refuse(); }
void device_all_reduce_sum(float*, int64_t) { refuse(); }
void device_all_to_all_v(const float*, const std::vector<int64_t>&, float*,
                         const std::vector<int64_t>&) {
  refuse();
}

}  // namespace mv::dist
