// Matrix products, each differentiable, on the CPU (ops/matmul.cpp: tile_gemm and Eigen) or on
// cuBLAS (cuda/matmul.cu). The CPU kernels read the tensors' memory in place: an operand whose
// last two dims are a transposed view (ops::transpose) is read through a column-major map
// instead of being copied.
#pragma once
#include "engine/tensor.h"

namespace mv::ops {

// a: (..., M, K), b: (K, N) -> (..., M, N)        shared weight: a's leading dims are rows of one GEMM
// a: (..., M, K), b: (..., K, N) -> (..., M, N)   batched: b has exactly a's leading dims
Tensor matmul(const Tensor& a, const Tensor& b);

// a: (B, M, K), b: (B, K, N) -> (B, M, N)
Tensor bmm(const Tensor& a, const Tensor& b);

// x: (..., in), w: (in, out), bias: (out,) or undefined Tensor() -> y: (..., out)
// y = x w + bias (weights stored in -> out, the flax convention).
Tensor linear(const Tensor& x, const Tensor& w, const Tensor& bias = Tensor());

// On CUDA, matmul / bmm / linear (forward and backward) run in full FP32 unless TF32 is allowed:
// then cuBLAS may use TF32 tensor cores (10-bit mantissa inputs, about 1e-3 relative error) for a
// several-fold faster GEMM, as torch.backends.cuda.matmul.allow_tf32. Off by default; the CPU
// ignores it. Process-wide.
void set_allow_tf32(bool allow);
bool allow_tf32();

// On the CPU, matrix products may round their inputs to bfloat16 and sum the products in FP32
// (tile_gemm: twice the FP32 rate with AVX-512 BF16) at up to 0.4% relative error per input
// (8-bit mantissa), as torch.set_float32_matmul_precision("medium"). Off by default;
// process-wide; refused by a build without AVX-512 BF16; CUDA ignores it. It covers matmul, bmm,
// linear, expert_mlp, moe_mlp and self_attention's products (not expert_matmul, nor the rare
// products large on every side that go to Eigen); each op's backward keeps its forward's choice.
// Fp32Products keeps the ops recorded while it lives in FP32 (the routers: V-MoE keeps router
// logits in float32, since a rounded logit can flip a top-k choice).
void set_matmul_bf16(bool on);
bool matmul_bf16();
struct Fp32Products {
  Fp32Products();
  ~Fp32Products();
  Fp32Products(const Fp32Products&) = delete;
  Fp32Products& operator=(const Fp32Products&) = delete;

 private:
  bool saved_;
};

namespace detail {
// Internal GEMM, no autograd, for ops that schedule their own products over the threads
// (ops/moe.cpp gives each thread pieces of several experts' rows, one fork-join for all):
// c (M x N, row stride ldc) = op(a) op(b), or c += op(a) op(b) when accumulate, computed on the
// calling thread only (call it from inside parallel_for). op(a) is M x K with element (i, j) at
// a[i * lda + j], or at a[j * lda + i] when trans_a; op(b) is K x N, likewise. K = 0 gives zeros
// (or leaves c unchanged when accumulating).
void gemm_on_thread(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, bool trans_a,
                    const float* b, int64_t ldb, bool trans_b, float* c, int64_t ldc, bool accumulate, bool bf16);
}  // namespace detail

}  // namespace mv::ops
