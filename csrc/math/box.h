// Per-element formulas of the interval operators in centre-radius form, shared by the CPU and
// CUDA kernels (host and device), so that the CPU tests exercise the arithmetic CUDA runs.
// Every formula is written in the opmath type (float for half/bfloat16, the dtype otherwise).
//
// NaN policy, one for both backends: a NaN never becomes a finite box. The selects below are
// written `a < 0 ? 0 : a` rather than `a > 0 ? a : 0` because a comparison with NaN is false, so
// the NaN is what passes through; masks in the gradients multiply (0 * inf is NaN), as the
// arithmetic itself would.
#pragma once
#include <c10/macros/Macros.h>

namespace pyibp {

template <typename T>
struct Box {
  T first, second;  // (mu, rad), or (lower, upper) for the conversions
};

// max(a, 0) that keeps NaN.
template <typename T>
C10_HOST_DEVICE inline T relu_keep_nan(T a) {
  return a < T(0) ? T(0) : a;
}

// |a| that keeps NaN.
template <typename T>
C10_HOST_DEVICE inline T abs_keep_nan(T a) {
  return a < T(0) ? -a : a;
}

// The box x ± e intersected with [lo, hi], as (mu, rad).
template <typename T>
C10_HOST_DEVICE inline Box<T> input_box_at(T x, T e, T lo, T hi) {
  const T l = x - e < lo ? lo : x - e;
  const T u = x + e > hi ? hi : x + e;
  return {(l + u) * T(0.5), (u - l) * T(0.5)};
}

// Interval ReLU: l = relu(mu - r), u = relu(mu + r), back to (mu, rad).
template <typename T>
C10_HOST_DEVICE inline Box<T> relu_box_at(T m, T r) {
  const T l = relu_keep_nan(m - r), u = relu_keep_nan(m + r);
  return {(l + u) * T(0.5), (u - l) * T(0.5)};
}

// Gradient of the interval ReLU with respect to its input (mu, rad), given the gradients of its
// output and the output itself: relu(l) > 0 exactly when l > 0, so the output carries the pattern.
template <typename T>
C10_HOST_DEVICE inline Box<T> relu_box_grad_at(T g_mu, T g_rad, T out_mu, T out_rad) {
  const T pass_l = T(out_mu - out_rad > T(0)), pass_u = T(out_mu + out_rad > T(0));
  const T g_l = pass_l * (g_mu - g_rad) * T(0.5);
  const T g_u = pass_u * (g_mu + g_rad) * T(0.5);
  return {g_l + g_u, g_u - g_l};
}

// Per-channel affine map z * s + t.
template <typename T>
C10_HOST_DEVICE inline Box<T> affine_box_at(T m, T r, T s, T t) {
  return {m * s + t, r * abs_keep_nan(s)};
}

// (mu, rad) -> (lower, upper) when kToInterval, else (lower, upper) -> (mu, rad).
template <bool kToInterval, typename T>
C10_HOST_DEVICE inline Box<T> convert_at(T a, T b) {
  if (kToInterval) return {a - b, a + b};
  return {(a + b) * T(0.5), (b - a) * T(0.5)};
}

}  // namespace pyibp
