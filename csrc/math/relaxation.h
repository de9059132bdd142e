// The CROWN relaxation of ReLU on [l, u], shared by the CPU and CUDA kernels (host and device):
//   lower_slope * z <= relu(z) <= upper_slope * z + upper_intercept   for z in [l, u].
// Inactive (u <= 0): all zero. Active (l >= 0, u > 0): the identity. Unstable (l < 0 < u): the
// chord u / (u - l) * (z - l) above and the adaptive slope 1 if u > -l else 0 below (CROWN-IBP).
// NaN bounds give a NaN relaxation (never the inactive one): see the NaN policy in math/box.h.
#pragma once
#include <c10/macros/Macros.h>

#include <limits>

namespace pyibp {

template <typename T>
struct ReluRelaxation {
  T lower_slope, upper_slope, upper_intercept;
};

// Selects, not branches, and bitwise rather than short-circuit logic: with -fno-trapping-math the
// CPU loops that call this vectorise (the guarded denominator keeps the discarded lanes finite).
template <typename T>
C10_HOST_DEVICE inline ReluRelaxation<T> relu_relaxation_at(T l, T u) {
  const bool positive_u = u > T(0), negative_l = l < T(0);
  const bool unstable = positive_u & negative_l, active = positive_u & !negative_l;
  const bool nan = (l != l) | (u != u);
  const T chord = u / (unstable ? u - l : T(1));
  const T identity = active ? T(1) : T(0);
  const T not_a_number = std::numeric_limits<T>::quiet_NaN();
  return {nan ? not_a_number : (unstable ? (u > -l ? T(1) : T(0)) : identity),
          nan ? not_a_number : (unstable ? chord : identity),
          nan ? not_a_number : (unstable ? -chord * l : T(0))};
}

// Chain rule through the relaxation: given the gradients g_s, g_b of the upper slope and the upper
// intercept, the gradients of (l, u). s = u / (u - l) and b = -l u / (u - l) on unstable neurons;
// elsewhere, and for the piecewise-constant lower slope, the gradient is 0.
template <typename T>
C10_HOST_DEVICE inline void relu_relaxation_grad(T l, T u, T g_s, T g_b, T* g_l, T* g_u) {
  const bool unstable = (l < T(0)) & (u > T(0));
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

// One element of a sound CROWN step back through a ReLU whose lines alpha z <= relu(z) <= sigma z + tau
// the caller computed with outward rounding (alpha 0 or 1): the coefficient that replaces a, and
// its term of the row's shift (<= 0, the upper intercept where a < 0).
template <typename T>
C10_HOST_DEVICE inline T sound_relu_coefficient(T a, T alpha, T sigma, T tau, T* shift_term) {
  *shift_term = a < T(0) ? a * tau : T(0);
  return a < T(0) ? a * sigma : a * alpha;
}

}  // namespace pyibp
