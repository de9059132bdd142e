// CPU kernels of the fused APGD updates (Croce & Hein 2020): the gradient step, its projection,
// the momentum step and the final exact projection in one pass for l-inf; for l2 three passes
// around the per-example norms of the gradient, of the projected step and of the combination.
// The per-element formulas are in csrc/math/apgd.h, shared with the CUDA twin.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "apgd_common.h"
#include "cpu/loops.h"
#include "dispatch.h"
#include "math/apgd.h"

namespace pyibp {
namespace {

void apgd_linf_step_cpu(at::Tensor& delta, at::Tensor& previous, const at::Tensor& grad_in, const at::Tensor& x_in,
                        const at::Tensor& eps_in, const at::Tensor& step_in, double momentum,
                        const at::Tensor& lower_in, const at::Tensor& upper_in) {
  check_apgd_args(delta, previous, grad_in, x_in, eps_in, step_in, momentum, lower_in, upper_in);
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  const at::Tensor lower = lower_in.contiguous(), upper = upper_in.contiguous();
  const at::Tensor eps = eps_in.to(at::kDouble).contiguous(), step = step_in.to(at::kDouble).contiguous();
  const int64_t per = per_example(delta);
  in_place(delta, [&](at::Tensor& d) {
    in_place(previous, [&](at::Tensor& prev) {
      PYIBP_DISPATCH(d.scalar_type(), "pyibp_apgd_linf_step_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        scalar_t* __restrict__ dp = d.data_ptr<scalar_t>();
        scalar_t* __restrict__ pp = prev.data_ptr<scalar_t>();
        const scalar_t* __restrict__ gp = grad.data_ptr<scalar_t>();
        const scalar_t* __restrict__ xp = x.data_ptr<scalar_t>();
        const scalar_t* lop = lower.data_ptr<scalar_t>();
        const scalar_t* hip = upper.data_ptr<scalar_t>();
        const double* ep = eps.data_ptr<double>();
        const double* sp = step.data_ptr<double>();
        const bool shared_eps = eps.numel() == 1, shared_step = step.numel() == 1;
        const bool shared_lo = lower.numel() == 1, shared_hi = upper.numel() == 1;
        const acc_t a = static_cast<acc_t>(momentum);
        for_each_with_example(d.numel(), per, [&](int64_t i, int64_t b) {
          const acc_t di = static_cast<acc_t>(dp[i]);
          const acc_t lo = static_cast<acc_t>(lop[shared_lo ? 0 : i]);
          const acc_t hi = static_cast<acc_t>(hip[shared_hi ? 0 : i]);
          dp[i] = apgd_linf_update<scalar_t, acc_t>(di, static_cast<acc_t>(pp[i]), static_cast<acc_t>(gp[i]), xp[i],
                                                    static_cast<acc_t>(ep[shared_eps ? 0 : b]),
                                                    static_cast<acc_t>(sp[shared_step ? 0 : b]), a, lo, hi);
          pp[i] = static_cast<scalar_t>(di);
        });
      });
    });
  });
}

void apgd_l2_step_cpu(at::Tensor& delta, at::Tensor& previous, const at::Tensor& grad_in, const at::Tensor& x_in,
                      const at::Tensor& eps_in, const at::Tensor& step_in, double momentum,
                      const at::Tensor& lower_in, const at::Tensor& upper_in) {
  check_apgd_args(delta, previous, grad_in, x_in, eps_in, step_in, momentum, lower_in, upper_in);
  if (delta.numel() == 0) return;
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  const at::Tensor lower = lower_in.contiguous(), upper = upper_in.contiguous();
  const at::Tensor eps = eps_in.to(at::kDouble).contiguous(), step = step_in.to(at::kDouble).contiguous();
  const int64_t B = delta.size(0), per = per_example(delta);
  auto norms = [&](const at::Tensor& t) {  // per-example l2 norms, accumulated in double
    return at::linalg_vector_norm(t.reshape({B, per}), 2, {1}, false, at::kDouble).contiguous();
  };
  const at::Tensor grad_norm = norms(grad);
  // The stepped point, then the combination, in double between the passes.
  at::Tensor work = at::empty(delta.sizes(), delta.options().dtype(at::kDouble));
  in_place(delta, [&](at::Tensor& d) {
    in_place(previous, [&](at::Tensor& prev) {
      PYIBP_DISPATCH(d.scalar_type(), "pyibp_apgd_l2_step_cpu", [&] {
        scalar_t* __restrict__ dp = d.data_ptr<scalar_t>();
        scalar_t* __restrict__ pp = prev.data_ptr<scalar_t>();
        const scalar_t* __restrict__ gp = grad.data_ptr<scalar_t>();
        const scalar_t* __restrict__ xp = x.data_ptr<scalar_t>();
        const scalar_t* lop = lower.data_ptr<scalar_t>();
        const scalar_t* hip = upper.data_ptr<scalar_t>();
        double* __restrict__ wp = work.data_ptr<double>();
        const double* ep = eps.data_ptr<double>();
        const double* sp = step.data_ptr<double>();
        const double* gn = grad_norm.data_ptr<double>();
        const bool shared_eps = eps.numel() == 1, shared_step = step.numel() == 1;
        const bool shared_lo = lower.numel() == 1, shared_hi = upper.numel() == 1;
        for_each_with_example(d.numel(), per, [&](int64_t i, int64_t b) {
          // A zero gradient leaves delta where it is.
          const double s = gn[b] > 0 ? sp[shared_step ? 0 : b] / gn[b] : 0.0;
          wp[i] = double(dp[i]) + s * double(gp[i]);
        });
        const at::Tensor step_norm = norms(work);
        const double* zn = step_norm.data_ptr<double>();
        for_each_with_example(d.numel(), per, [&](int64_t i, int64_t b) {
          const double di = double(dp[i]);
          const double z = wp[i] * ball_factor(zn[b], ep[shared_eps ? 0 : b], 1.0);
          wp[i] = apgd_l2_combine<double>(di, double(pp[i]), z, double(xp[i]), momentum,
                                          double(lop[shared_lo ? 0 : i]), double(hip[shared_hi ? 0 : i]));
          pp[i] = dp[i];
        });
        const at::Tensor combined_norm = norms(work);
        const double* vn = combined_norm.data_ptr<double>();
        const double shrink = 1.0 - 4.0 * double(std::numeric_limits<scalar_t>::epsilon());
        for_each_with_example(d.numel(), per, [&](int64_t i, int64_t b) {
          const double v = wp[i] * ball_factor(vn[b], ep[shared_eps ? 0 : b], shrink);
          dp[i] = apgd_l2_finish<scalar_t, double>(v, xp[i], double(lop[shared_lo ? 0 : i]),
                                                   double(hip[shared_hi ? 0 : i]));
        });
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyibp, CPU, m) {
  m.impl("apgd_linf_step_", &apgd_linf_step_cpu);
  m.impl("apgd_l2_step_", &apgd_l2_step_cpu);
}

}  // namespace pyibp
