// CUDA kernels of the fused PGD updates, the same operators as csrc/cpu/pgd_cpu.cpp, over the same
// per-element update (csrc/math/projection.h). Impossible inputs (x outside the domain, eps < 0)
// leave delta at 0 there: the CPU raises, but a check here would synchronise the stream, and the
// Python API checks them before any kernel runs.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "cuda/pointwise.cuh"
#include "dispatch.h"
#include "pgd_common.h"

namespace pyibp {
namespace {

at::Tensor per_example_values(const at::Tensor& p, const at::Tensor& like) {
  return p.to(like.device(), at::kDouble).contiguous();
}

void pgd_linf_step_cuda(at::Tensor& delta, const at::Tensor& grad_in, const at::Tensor& x_in,
                        const at::Tensor& eps_in, const at::Tensor& alpha_in, double lower, double upper) {
  check_pgd_args(delta, grad_in, x_in, eps_in, alpha_in, lower, upper);
  const at::cuda::OptionalCUDAGuard guard(delta.device());
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  const at::Tensor eps = per_example_values(eps_in, delta), alpha = per_example_values(alpha_in, delta);
  const IndexDivider example = index_divider(per_example(delta), delta.numel());
  const bool shared_eps = eps.numel() == 1, shared_alpha = alpha.numel() == 1;
  in_place(delta, [&](at::Tensor& d) {
    PYIBP_DISPATCH(d.scalar_type(), "pyibp_pgd_linf_step_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* dp = d.data_ptr<scalar_t>();
      const scalar_t* gp = grad.data_ptr<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const double* ep = eps.data_ptr<double>();
      const double* ap = alpha.data_ptr<double>();
      const acc_t lo = static_cast<acc_t>(lower), hi = static_cast<acc_t>(upper);
      launch_pointwise(d.numel(), [=] __device__(int64_t i) {
        const int64_t b = example.div(i);
        const acc_t e = static_cast<acc_t>(ep[shared_eps ? 0 : b]);
        const acc_t a = static_cast<acc_t>(ap[shared_alpha ? 0 : b]);
        dp[i] = projection_feasible(xp[i], e, lo, hi) ? pgd_linf_at<scalar_t, acc_t>(dp[i], gp[i], xp[i], e, a, lo, hi)
                                                      : scalar_t(0);
      });
    });
  });
}

void pgd_l2_step_cuda(at::Tensor& delta, const at::Tensor& grad_in, const at::Tensor& x_in,
                      const at::Tensor& eps_in, const at::Tensor& alpha_in, double lower, double upper) {
  check_pgd_args(delta, grad_in, x_in, eps_in, alpha_in, lower, upper);
  if (delta.numel() == 0) return;
  const at::cuda::OptionalCUDAGuard guard(delta.device());
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  const at::Tensor eps = per_example_values(eps_in, delta), alpha = per_example_values(alpha_in, delta);
  const int64_t B = delta.size(0), per = per_example(delta);
  const IndexDivider example = index_divider(per, delta.numel());
  const bool shared_eps = eps.numel() == 1, shared_alpha = alpha.numel() == 1;
  auto norms = [&](const at::Tensor& t) {
    return at::linalg_vector_norm(t.reshape({B, per}), 2, {1}, false, at::kDouble).contiguous();
  };
  const at::Tensor grad_norm = norms(grad);
  in_place(delta, [&](at::Tensor& d) {
    PYIBP_DISPATCH(d.scalar_type(), "pyibp_pgd_l2_step_cuda", [&] {
      scalar_t* dp = d.data_ptr<scalar_t>();
      const scalar_t* gp = grad.data_ptr<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const double* ep = eps.data_ptr<double>();
      const double* ap = alpha.data_ptr<double>();
      const double* gn = grad_norm.data_ptr<double>();
      launch_pointwise(d.numel(), [=] __device__(int64_t i) {
        const int64_t b = example.div(i);
        const double step = gn[b] > 0 ? ap[shared_alpha ? 0 : b] / gn[b] : 0.0;
        dp[i] = static_cast<scalar_t>(static_cast<double>(dp[i]) + step * static_cast<double>(gp[i]));
      });
      const at::Tensor delta_norm = norms(d);
      const double* dn = delta_norm.data_ptr<double>();
      // Shrink the projection by a few ulps so the rounded result stays inside the ball.
      const double shrink = 1.0 - 4.0 * static_cast<double>(std::numeric_limits<scalar_t>::epsilon());
      launch_pointwise(d.numel(), [=] __device__(int64_t i) {
        const int64_t b = example.div(i);
        const double e = ep[shared_eps ? 0 : b], xi = static_cast<double>(xp[i]);
        const double f = dn[b] > e ? shrink * e / dn[b] : 1.0;
        const double v = clamp_keep_nan(static_cast<double>(dp[i]) * f, lower - xi, upper - xi);
        // Clamping and rounding towards zero only shrink |v|, so the ball holds; this fixes the domain.
        dp[i] = projection_feasible(xp[i], e, lower, upper)
                    ? project_exact<scalar_t, double>(v, xp[i], INFINITY, lower, upper)
                    : scalar_t(0);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyibp, CUDA, m) {
  m.impl("pgd_linf_step_", &pgd_linf_step_cuda);
  m.impl("pgd_l2_step_", &pgd_l2_step_cuda);
}

}  // namespace pyibp
