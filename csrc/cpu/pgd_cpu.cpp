// CPU kernels of the fused PGD updates. The l-inf step is one pass over memory; the l2 step
// needs the per-example norms of the gradient and of the stepped delta, so it is a pass, a
// norm, and a pass.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>

#include "cpu/loops.h"
#include "dispatch.h"
#include "pgd_common.h"

namespace pyibp {
namespace {

// Impossible inputs (x outside the domain, eps < 0 or NaN) admit no delta: a clear error, raised
// after the pass (the kernel itself leaves such elements at 0 and carries on).
void check_feasible(bool infeasible, const char* op) {
  TORCH_CHECK(!infeasible, op, ": x has values outside [lower, upper], or eps is negative or NaN, so no "
              "delta can satisfy |delta| <= eps and lower <= x + delta <= upper");
}

// Per-example parameter as a contiguous double vector on the CPU (one value, or B values).
at::Tensor per_example_values(const at::Tensor& p) { return p.to(at::kDouble).contiguous(); }

void pgd_linf_step_cpu(at::Tensor& delta, const at::Tensor& grad_in, const at::Tensor& x_in,
                       const at::Tensor& eps_in, const at::Tensor& alpha_in, double lower, double upper) {
  check_pgd_args(delta, grad_in, x_in, eps_in, alpha_in, lower, upper);
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  const at::Tensor eps = per_example_values(eps_in), alpha = per_example_values(alpha_in);
  const int64_t per = per_example(delta);
  std::atomic<bool> infeasible{false};
  in_place(delta, [&](at::Tensor& d) {
    PYIBP_DISPATCH(d.scalar_type(), "pyibp_pgd_linf_step_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* __restrict__ dp = d.data_ptr<scalar_t>();
      const scalar_t* __restrict__ gp = grad.data_ptr<scalar_t>();
      const scalar_t* __restrict__ xp = x.data_ptr<scalar_t>();
      const double* ep = eps.data_ptr<double>();
      const double* ap = alpha.data_ptr<double>();
      const bool shared_eps = eps.numel() == 1, shared_alpha = alpha.numel() == 1;
      const acc_t lo = static_cast<acc_t>(lower), hi = static_cast<acc_t>(upper);
      for_each_with_example(d.numel(), per, [&](int64_t i, int64_t b) {
        const acc_t e = static_cast<acc_t>(ep[shared_eps ? 0 : b]);
        const acc_t a = static_cast<acc_t>(ap[shared_alpha ? 0 : b]);
        if (!projection_feasible(xp[i], e, lo, hi)) {
          infeasible.store(true, std::memory_order_relaxed);
          dp[i] = scalar_t(0);
          return;
        }
        dp[i] = pgd_linf_at<scalar_t, acc_t>(dp[i], gp[i], xp[i], e, a, lo, hi);
      });
    });
  });
  check_feasible(infeasible.load(), "pgd_linf_step_");
}

void pgd_l2_step_cpu(at::Tensor& delta, const at::Tensor& grad_in, const at::Tensor& x_in,
                     const at::Tensor& eps_in, const at::Tensor& alpha_in, double lower, double upper) {
  check_pgd_args(delta, grad_in, x_in, eps_in, alpha_in, lower, upper);
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  const at::Tensor eps = per_example_values(eps_in), alpha = per_example_values(alpha_in);
  const int64_t B = delta.size(0), per = per_example(delta);
  if (delta.numel() == 0) return;
  auto norms = [&](const at::Tensor& t) {  // per-example l2 norms, accumulated in double
    return at::linalg_vector_norm(t.reshape({B, per}), 2, {1}, false, at::kDouble).contiguous();
  };
  const at::Tensor grad_norm = norms(grad);
  std::atomic<bool> infeasible{false};
  in_place(delta, [&](at::Tensor& d) {
    PYIBP_DISPATCH(d.scalar_type(), "pyibp_pgd_l2_step_cpu", [&] {
      scalar_t* __restrict__ dp = d.data_ptr<scalar_t>();
      const scalar_t* __restrict__ gp = grad.data_ptr<scalar_t>();
      const scalar_t* __restrict__ xp = x.data_ptr<scalar_t>();
      const double* ep = eps.data_ptr<double>();
      const double* ap = alpha.data_ptr<double>();
      const double* gn = grad_norm.data_ptr<double>();
      const bool shared_eps = eps.numel() == 1, shared_alpha = alpha.numel() == 1;
      for_each_with_example(d.numel(), per, [&](int64_t i, int64_t b) {
        // A zero gradient leaves delta where it is.
        const double step = gn[b] > 0 ? ap[shared_alpha ? 0 : b] / gn[b] : 0.0;
        dp[i] = static_cast<scalar_t>(double(dp[i]) + step * double(gp[i]));
      });
      const at::Tensor delta_norm = norms(d);
      const double* dn = delta_norm.data_ptr<double>();
      // Shrink the projection by a few ulps so the rounded result stays inside the ball.
      const double shrink = 1.0 - 4.0 * double(std::numeric_limits<scalar_t>::epsilon());
      for_each_with_example(d.numel(), per, [&](int64_t i, int64_t b) {
        const double e = ep[shared_eps ? 0 : b];
        const double f = dn[b] > e ? shrink * e / dn[b] : 1.0;
        if (!projection_feasible(xp[i], e, lower, upper)) {
          infeasible.store(true, std::memory_order_relaxed);
          dp[i] = scalar_t(0);
          return;
        }
        const double v = clamp_keep_nan(double(dp[i]) * f, lower - double(xp[i]), upper - double(xp[i]));
        // Clamping and rounding towards zero only shrink |v|, so the ball holds; this fixes the domain.
        dp[i] = project_exact<scalar_t, double>(v, xp[i], std::numeric_limits<double>::infinity(), lower, upper);
      });
    });
  });
  check_feasible(infeasible.load(), "pgd_l2_step_");
}

}  // namespace

TORCH_LIBRARY_IMPL(pyibp, CPU, m) {
  m.impl("pgd_linf_step_", &pgd_linf_step_cpu);
  m.impl("pgd_l2_step_", &pgd_l2_step_cpu);
}

}  // namespace pyibp
