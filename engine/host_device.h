// MV_HD marks a small function that both the CPU code (g++) and the CUDA kernels (nvcc) call, so
// that a CPU op and its CUDA twin run the same float steps (Philox draws, fast exp, Phi, GELU).
#pragma once

#if defined(__CUDACC__)
#define MV_HD __host__ __device__ __forceinline__
#else
#define MV_HD inline
#endif
