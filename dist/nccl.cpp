// GPU collectives over NCCL (dist/device_comm.h). NCCL's own algorithms reduce: for one rank
// count, topology and NCCL version they add in the same order every run, and a ring or tree
// all-reduce gives every rank the same bits.
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdlib>
#include <string>

#include "dist/comm.h"
#include "dist/device_comm.h"
#include "engine/error.h"

namespace mv::dist {

namespace {

void check(ncclResult_t r, const char* what) {
  MV_CHECK(r == ncclSuccess, "NCCL ", what, " failed on rank ", rank(), ": ", ncclGetErrorString(r));
}

void check_cuda(cudaError_t e, const char* what) {
  MV_CHECK(e == cudaSuccess, "CUDA ", what, " failed on rank ", rank(), ": ", cudaGetErrorString(e));
}

// The communicator of every rank, made at the first collective: rank 0's id travels by MPI (in
// a world of one, no MPI is needed).
ncclComm_t comm() {
  static ncclComm_t c = [] {
    ncclUniqueId id;
    if (rank() == 0) check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    const std::string root = broadcast(std::string(reinterpret_cast<const char*>(&id), sizeof id));
    std::copy(root.begin(), root.end(), reinterpret_cast<char*>(&id));
    ncclComm_t made = nullptr;
    check(ncclCommInitRank(&made, size(), id, rank()), "ncclCommInitRank");
    return made;
  }();
  return c;
}

size_t count(int64_t n) {
  MV_CHECK(n >= 0, "NCCL: negative count ", n);
  return size_t(n);
}

}  // namespace

bool nccl_built() { return true; }

void use_local_gpu() {
  int devices = 0;
  check_cuda(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
  MV_CHECK(devices > 0, "rank ", rank(), ": --device cuda, but no GPU is visible");
  const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  const int r = local ? std::atoi(local) : 0;
  check_cuda(cudaSetDevice(r % devices), "cudaSetDevice");
}

void device_all_reduce_sum(float* data, int64_t n) {
  check(ncclAllReduce(data, data, count(n), ncclFloat, ncclSum, comm(), cudaStreamLegacy),
        "ncclAllReduce");
}

void device_all_to_all_v(const float* send, const std::vector<int64_t>& sc, float* recv,
                         const std::vector<int64_t>& rc) {
  const int n = size();
  MV_CHECK(int(sc.size()) == n && int(rc.size()) == n, "NCCL all_to_all_v: counts for ",
           sc.size(), " and ", rc.size(), " ranks, expected ", n);
  ncclComm_t c = comm();
  check(ncclGroupStart(), "ncclGroupStart");
  int64_t s_at = 0, r_at = 0;
  for (int r = 0; r < n; ++r) {
    if (sc[size_t(r)] > 0)
      check(ncclSend(send + s_at, count(sc[size_t(r)]), ncclFloat, r, c, cudaStreamLegacy), "ncclSend");
    if (rc[size_t(r)] > 0)
      check(ncclRecv(recv + r_at, count(rc[size_t(r)]), ncclFloat, r, c, cudaStreamLegacy), "ncclRecv");
    s_at += sc[size_t(r)];
    r_at += rc[size_t(r)];
  }
  check(ncclGroupEnd(), "ncclGroupEnd");
}

}  // namespace mv::dist
