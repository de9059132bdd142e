// Shared by the CPU and CUDA PGD kernels: the final projection that makes the returned delta
// satisfy |delta| <= eps and lower <= x + delta <= upper exactly in the tensor's own dtype, not
// merely up to rounding. Included by .cpp and .cu files alike.
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

#include "checks.h"

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

// Rounds d (computed in opmath precision `acc_t`) to T and shrinks it towards zero until the
// stored value keeps |d| <= e and lo <= x + d <= hi as evaluated in T. Terminates: d = 0 gives
// x itself, which the callers require to lie in [lo, hi].
template <typename T, typename acc_t>
C10_HOST_DEVICE inline T project_exact(acc_t d, T x, acc_t e, acc_t lo, acc_t hi) {
  T out = static_cast<T>(d);
  for (;;) {
    const acc_t o = static_cast<acc_t>(out);
    if (o == acc_t(0)) return out;
    const acc_t moved = static_cast<acc_t>(static_cast<T>(static_cast<acc_t>(x) + o));
    if ((o > e || -o > e) || moved > hi || moved < lo) {
      out = step_toward_zero(out);
    } else {
      return out;
    }
  }
}

// Runs `body(contiguous delta)` and writes the result back when delta was not contiguous.
template <typename Body>
void in_place(at::Tensor& delta, const Body& body) {
  if (delta.is_contiguous()) {
    body(delta);
    return;
  }
  at::Tensor work = delta.contiguous();
  body(work);
  delta.copy_(work);
}

inline void check_pgd_args(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x,
                           const at::Tensor& eps, const at::Tensor& alpha, double lower, double upper) {
  PYIBP_CHECK_FLOAT(delta);
  PYIBP_CHECK_SAME_SHAPE(delta, grad);
  PYIBP_CHECK_SAME_SHAPE(delta, x);
  PYIBP_CHECK_SAME_DTYPE(delta, grad);
  PYIBP_CHECK_SAME_DTYPE(delta, x);
  PYIBP_CHECK_SAME_DEVICE(delta, grad);
  PYIBP_CHECK_SAME_DEVICE(delta, x);
  TORCH_CHECK(delta.dim() >= 1, "delta must have a batch dimension, got a 0-d tensor");
  PYIBP_CHECK_PER_EXAMPLE(eps, delta.size(0));
  PYIBP_CHECK_PER_EXAMPLE(alpha, delta.size(0));
  TORCH_CHECK(lower <= upper, "lower (", lower, ") must be <= upper (", upper, ")");
}

}  // namespace pyibp
