// Argument checks of the fused APGD updates, shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>

#include "checks.h"

namespace pyibp {

// A domain bound: one value, or one per element of x (the wrapper expands per-channel bounds).
#define PYIBP_CHECK_DOMAIN(bound, x)                                                                 \
  do {                                                                                               \
    TORCH_CHECK((bound).numel() == 1 || (bound).sizes() == (x).sizes(), pyibp::arg(#bound),          \
                " must hold one value or one per element of x ", (x).sizes(), ", got shape ",        \
                (bound).sizes());                                                                    \
    PYIBP_CHECK_SAME_DTYPE(bound, x);                                                                \
    PYIBP_CHECK_SAME_DEVICE(bound, x);                                                               \
  } while (0)

inline void check_apgd_args(const at::Tensor& delta, const at::Tensor& previous, const at::Tensor& grad,
                            const at::Tensor& x, const at::Tensor& eps, const at::Tensor& step, double momentum,
                            const at::Tensor& lower, const at::Tensor& upper) {
  PYIBP_CHECK_FLOAT(delta);
  PYIBP_CHECK_SAME_SHAPE(delta, previous);
  PYIBP_CHECK_SAME_SHAPE(delta, grad);
  PYIBP_CHECK_SAME_SHAPE(delta, x);
  PYIBP_CHECK_SAME_DTYPE(delta, previous);
  PYIBP_CHECK_SAME_DTYPE(delta, grad);
  PYIBP_CHECK_SAME_DTYPE(delta, x);
  PYIBP_CHECK_SAME_DEVICE(delta, previous);
  PYIBP_CHECK_SAME_DEVICE(delta, grad);
  PYIBP_CHECK_SAME_DEVICE(delta, x);
  TORCH_CHECK(delta.dim() >= 1, "delta must have a batch dimension, got a 0-d tensor");
  PYIBP_CHECK_PER_EXAMPLE(eps, delta.size(0));
  PYIBP_CHECK_PER_EXAMPLE(step, delta.size(0));
  TORCH_CHECK(std::isfinite(momentum) && momentum >= 0.0 && momentum <= 1.0,
              "momentum must lie in [0, 1], got ", momentum);
  PYIBP_CHECK_DOMAIN(lower, x);
  PYIBP_CHECK_DOMAIN(upper, x);
}

}  // namespace pyibp
