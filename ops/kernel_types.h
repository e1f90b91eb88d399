// The types in the signatures of the kernel pairs (ops/dispatch.h): cpu::NAME in ops/ and
// cuda::NAME in cuda/ take and return these, so that one call site serves both devices.
#pragma once
#include "engine/tensor.h"

namespace mv::ops {

// The four broadcasting binary maps (ops::add, sub, mul, div).
enum class Binary { Add, Sub, Mul, Div };
// The unary maps of ops/elementwise.h whose derivative is written with x and y = f(x):
//   GeluErf: x Phi(x);  NormalCdf: Phi(x);  Pow: x^p.
enum class Unary { Exp, Log, Sqrt, Rsqrt, Tanh, Pow, Relu, GeluErf, NormalCdf };

struct LayerNormOut {
  Tensor y;     // (..., D)
  Tensor mean;  // (...): one per row
  Tensor rstd;  // (...): 1 / sqrt(var + eps), biased variance
};
struct LayerNormGrads {
  Tensor dx;      // (..., D)
  Tensor dgamma;  // (D,)
  Tensor dbeta;   // (D,)
};

struct CrossEntropyOut {
  Tensor loss;      // (): the mean over rows, the training loss
  Tensor row_loss;  // (N,): each row's loss
  Tensor lse;       // (N,): log-sum-exp of each row, kept for the backward
};

struct AttentionOut {
  Tensor out;  // (B, T, D): heads concatenated along the last axis
  // What the backward needs besides qkv and out. Each device keeps what is cheap for it: the CPU
  // the probabilities P (B*heads, T, Tp) (rows padded to a multiple of 8; recomputing them costs
  // more than storing them there), the GPU only the row log-sum-exp (B, heads, T), from which its
  // backward rebuilds P on chip (memory traffic, not arithmetic, is what costs on a GPU).
  Tensor saved;
};

struct MaxOut {
  Tensor values;  // the largest element along the axis (kept as 1)
  Tensor index;   // I64: its index (the first, on ties)
};

// Gradients of a product; each undefined unless asked for.
struct MatmulGrads {
  Tensor da, db;
};
struct LinearGrads {
  Tensor dx, dw, db;
};

// A convolution's window (ops/conv.h): k x k, its stride, the zero padding on every side, and
// the output's height and width.
struct ConvGeometry {
  int64_t k, stride, pad, ho, wo;
};

}  // namespace mv::ops
