// Every CUDA runtime and cuBLAS call goes through these checks, so a failure names the call
// site and the library's own error text.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "engine/error.h"

#define MV_CUDA_CHECK(call)                                                          \
  do {                                                                               \
    cudaError_t err_ = (call);                                                       \
    if (err_ != cudaSuccess)                                                         \
      ::mv::detail::fail(__FILE__, __LINE__, "CUDA error in ", #call, ": ",          \
                         cudaGetErrorString(err_));                                  \
  } while (0)

#define MV_CUBLAS_CHECK(call)                                                        \
  do {                                                                               \
    cublasStatus_t st_ = (call);                                                     \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                \
      ::mv::detail::fail(__FILE__, __LINE__, "cuBLAS error in ", #call, ": ",        \
                         cublasGetStatusString(st_));                                \
  } while (0)
