// The PGD update and its projection onto the eps-ball and the domain, per element, shared by the
// CPU and CUDA kernels (host and device). The result satisfies |delta| <= eps and
// lower <= x + delta <= upper exactly in the tensor's own dtype, not merely up to rounding.
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

namespace pyibp {

// The representable value next to v in the direction of zero (v != 0). Half and bfloat16 are
// sign-magnitude, so one step down of the bit pattern moves one ulp towards zero.
C10_HOST_DEVICE inline float step_toward_zero(float v) { return nextafterf(v, 0.0f); }
C10_HOST_DEVICE inline double step_toward_zero(double v) { return nextafter(v, 0.0); }
C10_HOST_DEVICE inline c10::Half step_toward_zero(c10::Half v) {
  c10::Half r = v;
  r.x = static_cast<unsigned short>(r.x - 1);
  return r;
}
C10_HOST_DEVICE inline c10::BFloat16 step_toward_zero(c10::BFloat16 v) {
  c10::BFloat16 r = v;
  r.x = static_cast<uint16_t>(r.x - 1);
  return r;
}

// Whether the inputs admit any delta: x in [lo, hi] and e >= 0 (false for NaN too). Callers
// check this first; project_exact returns 0 for impossible inputs instead of searching.
template <typename T, typename acc_t>
C10_HOST_DEVICE inline bool projection_feasible(T x, acc_t e, acc_t lo, acc_t hi) {
  const acc_t xa = static_cast<acc_t>(x);
  return (xa >= lo) & (xa <= hi) & (e >= acc_t(0));
}

// How many one-ulp moves towards zero project_exact tries before it falls back to 0. The callers
// clamp d into [-e, e] ∩ [lo - x, hi - x] in acc_t first, so rounding d to T and x + d in T leave
// it outside by at most an ulp or two; the cap bounds the work whatever the inputs (an input
// outside the domain once made this loop walk every float down to zero).
constexpr int kMaxProjectionSteps = 8;

// Rounds d (computed in acc_t, already clamped as above) to T and moves it towards zero until the
// stored value keeps |d| <= e and lo <= x + d <= hi as evaluated in T. After kMaxProjectionSteps
// it returns 0, which gives x itself: inside the ball, and inside the domain for feasible inputs.
template <typename T, typename acc_t>
C10_HOST_DEVICE inline T project_exact(acc_t d, T x, acc_t e, acc_t lo, acc_t hi) {
  T out = static_cast<T>(d);
  for (int step = 0; step < kMaxProjectionSteps; ++step) {
    const acc_t o = static_cast<acc_t>(out);
    if (o == acc_t(0)) return out;
    const acc_t moved = static_cast<acc_t>(static_cast<T>(static_cast<acc_t>(x) + o));
    if (!((o > e) | (-o > e) | (moved > hi) | (moved < lo))) return out;
    out = step_toward_zero(out);
  }
  return T(0);
}

// min(max(v, lo), hi) that keeps NaN (the PGD and APGD updates' one clamp).
template <typename T>
C10_HOST_DEVICE inline T clamp_keep_nan(T v, T lo, T hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// One l-inf PGD step on one element: delta + a * sign(g), clamped to the ball and the domain.
template <typename T, typename acc_t>
C10_HOST_DEVICE inline T pgd_linf_at(T delta, T g, T x, acc_t e, acc_t a, acc_t lo, acc_t hi) {
  const acc_t ga = static_cast<acc_t>(g), xa = static_cast<acc_t>(x);
  const acc_t sign = acc_t((ga > acc_t(0)) - (ga < acc_t(0)));
  acc_t v = clamp_keep_nan(static_cast<acc_t>(delta) + a * sign, -e, e);
  v = clamp_keep_nan(v, lo - xa, hi - xa);
  return project_exact<T, acc_t>(v, x, e, lo, hi);
}

}  // namespace pyibp
