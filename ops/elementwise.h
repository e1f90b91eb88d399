// Elementwise ops with NumPy broadcasting, each differentiable. Forward and backward of every op
// sit together in elementwise.cpp; the derivative used is written in a comment next to it.
#pragma once
#include "engine/tensor.h"

namespace mv::ops {

// Broadcast shape of a and b (NumPy rules); throws naming both shapes when they do not fit.
Shape broadcast_shape(const Shape& a, const Shape& b, const char* op);
// Sums g over the dimensions that broadcasting added or stretched, giving `shape` back.
Tensor sum_to(const Tensor& g, const Shape& shape);

// a, b broadcastable -> out: broadcast shape
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor add(const Tensor& a, float s);
Tensor mul(const Tensor& a, float s);

// x -> same shape
Tensor neg(const Tensor& x);
Tensor exp(const Tensor& x);
Tensor log(const Tensor& x);
Tensor sqrt(const Tensor& x);
Tensor rsqrt(const Tensor& x);
Tensor tanh(const Tensor& x);
Tensor pow(const Tensor& x, float p);
Tensor relu(const Tensor& x);
enum class GeluForm { Tanh, Erf };
Tensor gelu(const Tensor& x, GeluForm form = GeluForm::Tanh);
// Standard normal CDF Phi(x) = erfc(-x / sqrt 2) / 2 (erfc keeps the far left tail accurate)
Tensor normal_cdf(const Tensor& x);

// mask (any shape broadcastable to a and b, nonzero = take a), a and b broadcastable
Tensor where(const Tensor& mask, const Tensor& a, const Tensor& b);
// x with `value` wherever mask (broadcastable to x) is nonzero; no gradient where filled
Tensor masked_fill(const Tensor& x, const Tensor& mask, float value);

}  // namespace mv::ops

namespace mv {
inline Tensor operator+(const Tensor& a, const Tensor& b) { return ops::add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return ops::sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return ops::mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return ops::div(a, b); }
inline Tensor operator+(const Tensor& a, float s) { return ops::add(a, s); }
inline Tensor operator-(const Tensor& a, float s) { return ops::add(a, -s); }
inline Tensor operator*(const Tensor& a, float s) { return ops::mul(a, s); }
inline Tensor operator*(float s, const Tensor& a) { return ops::mul(a, s); }
inline Tensor operator/(const Tensor& a, float s) { return ops::mul(a, 1.0f / s); }
inline Tensor operator-(const Tensor& a) { return ops::neg(a); }
}  // namespace mv
