// CUDA kernels of the fused APGD updates, the same operators and passes as csrc/cpu/apgd_cpu.cpp,
// over the per-element formulas of csrc/math/apgd.h.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "apgd_common.h"
#include "cuda/pointwise.cuh"
#include "dispatch.h"
#include "math/apgd.h"

namespace pyibp {
namespace {

at::Tensor per_example_doubles(const at::Tensor& p, const at::Tensor& like) {
  return p.to(like.device(), at::kDouble).contiguous();
}

void apgd_linf_step_cuda(at::Tensor& delta, at::Tensor& previous, const at::Tensor& grad_in, const at::Tensor& x_in,
                         const at::Tensor& eps_in, const at::Tensor& step_in, double momentum,
                         const at::Tensor& lower_in, const at::Tensor& upper_in) {
  check_apgd_args(delta, previous, grad_in, x_in, eps_in, step_in, momentum, lower_in, upper_in);
  const at::cuda::OptionalCUDAGuard guard(delta.device());
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  const at::Tensor lower = lower_in.contiguous(), upper = upper_in.contiguous();
  const at::Tensor eps = per_example_doubles(eps_in, delta), step = per_example_doubles(step_in, delta);
  const int64_t per = per_example(delta);
  const bool shared_eps = eps.numel() == 1, shared_step = step.numel() == 1;
  const bool shared_lo = lower.numel() == 1, shared_hi = upper.numel() == 1;
  in_place(delta, [&](at::Tensor& d) {
    in_place(previous, [&](at::Tensor& prev) {
      PYIBP_DISPATCH(d.scalar_type(), "pyibp_apgd_linf_step_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        scalar_t* dp = d.data_ptr<scalar_t>();
        scalar_t* pp = prev.data_ptr<scalar_t>();
        const scalar_t* gp = grad.data_ptr<scalar_t>();
        const scalar_t* xp = x.data_ptr<scalar_t>();
        const scalar_t* lop = lower.data_ptr<scalar_t>();
        const scalar_t* hip = upper.data_ptr<scalar_t>();
        const double* ep = eps.data_ptr<double>();
        const double* sp = step.data_ptr<double>();
        const acc_t a = static_cast<acc_t>(momentum);
        launch_pointwise(d.numel(), [=] __device__(int64_t i) {
          const int64_t b = i / per;
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

void apgd_l2_step_cuda(at::Tensor& delta, at::Tensor& previous, const at::Tensor& grad_in, const at::Tensor& x_in,
                       const at::Tensor& eps_in, const at::Tensor& step_in, double momentum,
                       const at::Tensor& lower_in, const at::Tensor& upper_in) {
  check_apgd_args(delta, previous, grad_in, x_in, eps_in, step_in, momentum, lower_in, upper_in);
  if (delta.numel() == 0) return;
  const at::cuda::OptionalCUDAGuard guard(delta.device());
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  const at::Tensor lower = lower_in.contiguous(), upper = upper_in.contiguous();
  const at::Tensor eps = per_example_doubles(eps_in, delta), step = per_example_doubles(step_in, delta);
  const int64_t B = delta.size(0), per = per_example(delta);
  const bool shared_eps = eps.numel() == 1, shared_step = step.numel() == 1;
  const bool shared_lo = lower.numel() == 1, shared_hi = upper.numel() == 1;
  auto norms = [&](const at::Tensor& t) {
    return at::linalg_vector_norm(t.reshape({B, per}), 2, {1}, false, at::kDouble).contiguous();
  };
  const at::Tensor grad_norm = norms(grad);
  at::Tensor work = at::empty(delta.sizes(), delta.options().dtype(at::kDouble));
  in_place(delta, [&](at::Tensor& d) {
    in_place(previous, [&](at::Tensor& prev) {
      PYIBP_DISPATCH(d.scalar_type(), "pyibp_apgd_l2_step_cuda", [&] {
        scalar_t* dp = d.data_ptr<scalar_t>();
        scalar_t* pp = prev.data_ptr<scalar_t>();
        const scalar_t* gp = grad.data_ptr<scalar_t>();
        const scalar_t* xp = x.data_ptr<scalar_t>();
        const scalar_t* lop = lower.data_ptr<scalar_t>();
        const scalar_t* hip = upper.data_ptr<scalar_t>();
        double* wp = work.data_ptr<double>();
        const double* ep = eps.data_ptr<double>();
        const double* sp = step.data_ptr<double>();
        const double* gn = grad_norm.data_ptr<double>();
        launch_pointwise(d.numel(), [=] __device__(int64_t i) {
          const int64_t b = i / per;
          const double s = gn[b] > 0 ? sp[shared_step ? 0 : b] / gn[b] : 0.0;
          wp[i] = static_cast<double>(dp[i]) + s * static_cast<double>(gp[i]);
        });
        const at::Tensor step_norm = norms(work);
        const double* zn = step_norm.data_ptr<double>();
        launch_pointwise(d.numel(), [=] __device__(int64_t i) {
          const int64_t b = i / per;
          const double di = static_cast<double>(dp[i]);
          const double z = wp[i] * ball_factor(zn[b], ep[shared_eps ? 0 : b], 1.0);
          wp[i] = apgd_l2_combine<double>(di, static_cast<double>(pp[i]), z, static_cast<double>(xp[i]), momentum,
                                          static_cast<double>(lop[shared_lo ? 0 : i]),
                                          static_cast<double>(hip[shared_hi ? 0 : i]));
          pp[i] = dp[i];
        });
        const at::Tensor combined_norm = norms(work);
        const double* vn = combined_norm.data_ptr<double>();
        const double shrink = 1.0 - 4.0 * static_cast<double>(std::numeric_limits<scalar_t>::epsilon());
        launch_pointwise(d.numel(), [=] __device__(int64_t i) {
          const int64_t b = i / per;
          const double v = wp[i] * ball_factor(vn[b], ep[shared_eps ? 0 : b], shrink);
          dp[i] = apgd_l2_finish<scalar_t, double>(v, xp[i], static_cast<double>(lop[shared_lo ? 0 : i]),
                                                   static_cast<double>(hip[shared_hi ? 0 : i]));
        });
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyibp, CUDA, m) {
  m.impl("apgd_linf_step_", &apgd_linf_step_cuda);
  m.impl("apgd_l2_step_", &apgd_l2_step_cuda);
}

}  // namespace pyibp
