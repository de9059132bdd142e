// Host code shared by the CPU and CUDA PGD kernels: argument checks and the in-place helper. The
// per-element update and projection are in math/projection.h.
#pragma once
#include <ATen/ATen.h>

#include "checks.h"
#include "math/projection.h"

namespace pyibp {

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
