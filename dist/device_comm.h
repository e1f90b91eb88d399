// Collectives on GPU buffers (NCCL), for ranks whose tensors live on a GPU: the gradient
// all-reduce and the row exchange of dist/grad_sync.h and dist/experts.h take these when their
// tensors are CUDA tensors. Under mpirun the NCCL communicator is set up over MPI (rank 0's
// NCCL id broadcast); a process outside mpirun gets a communicator of its own (one rank), so the
// same calls run, and are tested, on one GPU. Calls are queued on the CUDA backend's stream
// (the legacy default stream), in order with its kernels.
#pragma once
#include <cstdint>
#include <vector>

namespace mv::dist {

bool nccl_built();  // built with NCCL (nccl.cpp); else every call below throws
// Picks this rank's GPU (OMPI_COMM_WORLD_LOCAL_RANK modulo the GPUs present); call before any
// CUDA allocation of a multi-rank run.
void use_local_gpu();
// data: n floats on the GPU -> their sum over ranks, in place on every rank.
void device_all_reduce_sum(float* data, int64_t n);
// The all-to-all with counts of comm.h, on GPU buffers (grouped NCCL sends and receives).
void device_all_to_all_v(const float* send, const std::vector<int64_t>& send_counts, float* recv,
                         const std::vector<int64_t>& recv_counts);

}  // namespace mv::dist
