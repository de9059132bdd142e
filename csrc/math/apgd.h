// Per-element formulas of the fused APGD updates (Croce & Hein 2020), shared by
// csrc/cpu/apgd_cpu.cpp and csrc/cuda/apgd_cuda.cu so the CPU tests cover the arithmetic CUDA runs.
// `d` is the current perturbation, `p` the previous one, `x` the clean input, `e` the radius,
// `a` the momentum weight (1 on the first step: no momentum) and [lo, hi] the input domain.
#pragma once
#include <c10/macros/Macros.h>

#include "math/projection.h"

namespace pyibp {

// The heavy-ball combination of the projected step z with the last move d - p. Momentum 1 is
// the plain projected step: z itself, whatever p holds (the PGD steps pass scratch memory).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t apgd_momentum(acc_t d, acc_t p, acc_t z, acc_t a) {
  return a == acc_t(1) ? z : d + a * (z - d) + (acc_t(1) - a) * (d - p);
}

// l-inf: z = P(d + s sign(g)), then P(momentum), P the projection onto the box and the domain;
// the stored value satisfies |delta| <= e and lo <= x + delta <= hi exactly in T.
template <typename T, typename acc_t>
C10_HOST_DEVICE inline T apgd_linf_update(acc_t d, acc_t p, acc_t g, T x, acc_t e, acc_t s, acc_t a, acc_t lo,
                                          acc_t hi) {
  const acc_t xi = static_cast<acc_t>(x);
  const acc_t sign = acc_t((g > acc_t(0)) - (g < acc_t(0)));
  acc_t z = clamp_keep_nan(d + s * sign, -e, e);
  z = clamp_keep_nan(z, lo - xi, hi - xi);
  acc_t v = clamp_keep_nan(apgd_momentum(d, p, z, a), -e, e);
  v = clamp_keep_nan(v, lo - xi, hi - xi);
  return project_exact<T, acc_t>(v, x, e, lo, hi);
}

// l2, second pass: z_scaled is the gradient step already scaled into the ball; clamp it to the
// domain and combine it with the last move (the result is projected by apgd_l2_finish).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t apgd_l2_combine(acc_t d, acc_t p, acc_t z_scaled, acc_t xi, acc_t a, acc_t lo,
                                             acc_t hi) {
  return apgd_momentum(d, p, clamp_keep_nan(z_scaled, lo - xi, hi - xi), a);
}

// l2, last pass: v_scaled is the combination already scaled into the ball (with a few ulps to
// spare); clamping to the domain and rounding towards zero only shrink |v|, so the ball holds.
template <typename T, typename acc_t>
C10_HOST_DEVICE inline T apgd_l2_finish(acc_t v_scaled, T x, acc_t lo, acc_t hi) {
  const acc_t xi = static_cast<acc_t>(x);
  return project_exact<T, acc_t>(clamp_keep_nan(v_scaled, lo - xi, hi - xi), x,
                                 static_cast<acc_t>(INFINITY), lo, hi);
}

// The factor that scales a vector of norm `norm` into the ball of radius e, shrunk by a few
// ulps of T so that the rounded result stays inside.
C10_HOST_DEVICE inline double ball_factor(double norm, double e, double shrink) {
  return norm > e ? shrink * e / norm : 1.0;
}

}  // namespace pyibp
