// The CROWN relaxation of ReLU on [l, u], shared by the CPU and CUDA kernels (host and device):
//   lower_slope * z <= relu(z) <= upper_slope * z + upper_intercept   for z in [l, u].
// Inactive (u <= 0): all zero. Active (l >= 0, u > 0): the identity. Unstable (l < 0 < u): the
// chord u / (u - l) * (z - l) above and the adaptive slope 1 if u > -l else 0 below (CROWN-IBP),
// or a given slope alpha in [0, 1] below (alpha-CROWN).
// NaN bounds give a NaN relaxation (never the inactive one): see the NaN policy in math/box.h.
#pragma once
#include <c10/macros/Macros.h>

#include <limits>

namespace pyibp {

template <typename T>
struct ReluRelaxation {
  T lower_slope, upper_slope, upper_intercept;
};

// Whether the ReLU is unstable on [l, u] (l < 0 < u): only there is its lower slope free.
template <typename T>
C10_HOST_DEVICE inline bool relu_unstable(T l, T u) {
  return (l < T(0)) & (u > T(0));
}

// Selects, not branches, and bitwise rather than short-circuit logic: with -fno-trapping-math the
// CPU loops that call this vectorise (the guarded denominator keeps the discarded lanes finite).
// GCC 12 if-converts the NaN test only when it is spelled `ordered ? value : NaN` and computed
// after the quotient (`nan ? NaN : value`, or the test first, leave a branch and a scalar loop).
template <typename T>
C10_HOST_DEVICE inline ReluRelaxation<T> relu_relaxation_at(T l, T u) {
  const bool positive_u = u > T(0), negative_l = l < T(0);
  const bool unstable = positive_u & negative_l, active = positive_u & !negative_l;
  const T chord = u / (unstable ? u - l : T(1));
  const T identity = active ? T(1) : T(0);
  const bool ordered = (l == l) & (u == u);
  const T not_a_number = std::numeric_limits<T>::quiet_NaN();
  return {ordered ? (unstable ? (u > -l ? T(1) : T(0)) : identity) : not_a_number,
          ordered ? (unstable ? chord : identity) : not_a_number,
          ordered ? (unstable ? -chord * l : T(0)) : not_a_number};
}

// Chain rule through the relaxation: given the gradients g_s, g_b of the upper slope and the upper
// intercept, the gradients of (l, u). s = u / (u - l) and b = -l u / (u - l) on unstable neurons;
// elsewhere, and for the piecewise-constant lower slope, the gradient is 0.
template <typename T>
C10_HOST_DEVICE inline void relu_relaxation_grad(T l, T u, T g_s, T g_b, T* g_l, T* g_u) {
  const bool unstable = relu_unstable(l, u);
  const T width = unstable ? u - l : T(1);
  const T inv2 = unstable ? T(1) / (width * width) : T(0);
  *g_l = (g_s * u - g_b * u * u) * inv2;
  *g_u = (-g_s * l + g_b * l * l) * inv2;
}

// One element of a CROWN step back through the ReLU: the coefficient that replaces a, and its
// term of the row's shift (the upper intercept where a < 0).
template <typename T>
C10_HOST_DEVICE inline T crown_relu_coefficient(T a, const ReluRelaxation<T>& r, T* shift_term) {
  *shift_term = a < T(0) ? a * r.upper_intercept : T(0);
  return a > T(0) ? a * r.lower_slope : a * r.upper_slope;
}

// The relaxation of alpha-CROWN: that of relu_relaxation_at with the lower slope `alpha` on
// unstable neurons (any alpha in [0, 1] gives a valid line; the caller keeps it there). alpha is
// read on unstable neurons only; NaN bounds still give a NaN relaxation.
template <typename T>
C10_HOST_DEVICE inline ReluRelaxation<T> relu_relaxation_alpha_at(T l, T u, T alpha) {
  ReluRelaxation<T> r = relu_relaxation_at(l, u);
  r.lower_slope = relu_unstable(l, u) ? alpha : r.lower_slope;
  return r;
}

// One element of a CROWN step back through a ReLU with the lines
// lower_slope z <= relu(z) <= upper_slope z + upper_intercept: the coefficient that replaces a (the
// lower line where a >= 0, the upper one where a < 0), and its term of the row's shift (the upper
// intercept where a < 0). The sound step passes lines the caller rounded outward.
template <typename T>
C10_HOST_DEVICE inline T relu_lines_coefficient(T a, T lower_slope, T upper_slope, T upper_intercept, T* shift_term) {
  *shift_term = a < T(0) ? a * upper_intercept : T(0);
  return a < T(0) ? a * upper_slope : a * lower_slope;
}

// Derivatives of relu_lines_coefficient and its shift term, given the gradients g of the
// coefficient and g_shift of the row's shift: the gradient of a, and a's terms of the gradients
// of the three lines. At a = 0 they are those of the lower line (a's side in the forward).
template <typename T>
struct ReluLinesGrad {
  T a, lower_slope, upper_slope, upper_intercept;
};

template <typename T>
C10_HOST_DEVICE inline ReluLinesGrad<T> relu_lines_coefficient_grad(T a, T g, T g_shift, const ReluRelaxation<T>& r) {
  const bool negative = a < T(0);
  return {negative ? g * r.upper_slope + g_shift * r.upper_intercept : g * r.lower_slope,
          negative ? T(0) : a * g,
          negative ? a * g : T(0),
          negative ? a * g_shift : T(0)};
}

}  // namespace pyibp
