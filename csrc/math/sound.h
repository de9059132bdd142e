// Per-element steps of the sound interval mode (pyibp/bounds/sound.py), shared by the CPU and CUDA
// kernels (host and device), float and double only: each step rounds outward, so the box it
// returns contains every exact real value of the box it was given. The kernels are compiled
// without fast-math and without contraction (-ffp-contract=off, --fmad=false): each operation
// below is one IEEE operation rounded to nearest, as the error model counts them.
#pragma once
#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>
#include <limits>

#include "math/box.h"

namespace pyibp {

template <typename T>
struct SameSizeInt;
template <>
struct SameSizeInt<float> {
  using type = int32_t;
};
template <>
struct SameSizeInt<double> {
  using type = int64_t;
};

template <typename To, typename From>
C10_HOST_DEVICE inline To bits_as(const From& v) {
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
}

// The next value of T above x; +inf and NaN stay. Bit arithmetic rather than nextafter, so that the
// CPU loops vectorise: one step of the bit pattern moves a positive float up and a negative one
// towards zero, and both zeros go to the smallest subnormal.
template <typename T>
C10_HOST_DEVICE inline T next_up(T x) {
  using I = typename SameSizeInt<T>::type;
  const I bits = bits_as<I>(x);
  const T moved = bits_as<T>(x > T(0) ? bits + I(1) : bits - I(1));
  const bool stays = !(x < std::numeric_limits<T>::infinity());  // +inf or NaN
  return stays ? x : (x == T(0) ? std::numeric_limits<T>::denorm_min() : moved);
}

// A double constant as T, rounded up (a plain conversion rounds to nearest, possibly down).
template <typename T>
C10_HOST_DEVICE inline T round_up_to(double c) {
  const T t = static_cast<T>(c);
  return double(t) < c ? next_up(t) : t;
}

// Whether a value is neither infinite nor NaN, without a library call.
template <typename T>
C10_HOST_DEVICE inline bool finite_at(T x) {
  return abs_keep_nan(x) <= std::numeric_limits<T>::max();
}

// The sound ReLU of the box mu ± rad. Active (mu - rad >= 0, exactly when mu >= rad): the box itself.
// Otherwise the exact image lies in [0, top]: with s = fl(mu + rad), top = 0 when s <= 0 (a sum that
// rounds to 0 or below is exactly <= 0, rounding being monotone with gradual underflow) and the
// float above s when s > 0, one step of its bit pattern. It is returned as centre top/2 and radius
// max(top/2, top - top/2), the difference exact: where halving a subnormal top rounds up, the
// radius still reaches 0. A NaN stays NaN. Only selects, so that the CPU loops vectorise.
template <typename T>
C10_HOST_DEVICE inline Box<T> sound_relu_box_at(T m, T r) {
  using I = typename SameSizeInt<T>::type;
  const T p = relu_keep_nan(m + r);
  const I step = I(p > T(0)) & I(p < std::numeric_limits<T>::infinity());
  const T top = bits_as<T>(bits_as<I>(p) + step);
  const T half = top * T(0.5), rest = top - half;
  const bool active = m >= r;
  return {active ? m : half, active ? r : (half < rest ? rest : half)};
}

// The radius operand of a sound product, rad + c |mu|: two roundings down by at most (1 - u) each,
// which the constants of the product's error bound absorb (pyibp/bounds/sound.py).
template <typename T>
C10_HOST_DEVICE inline T sound_operand_at(T m, T r, T c) {
  return r + c * abs_keep_nan(m);
}

}  // namespace pyibp
