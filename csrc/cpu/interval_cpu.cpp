// CPU kernels of the interval operators: single passes over memory with at::parallel_for,
// written as plain restrict-qualified loops that the compiler vectorises. The per-element
// formulas are those of the CUDA kernels (csrc/math/*.h); half and bfloat16 are computed in float
// and stored back, as on CUDA.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/loops.h"
#include "dispatch.h"
#include "interval_products.h"
#include "math/box.h"
#include "math/elision.h"
#include "math/relaxation.h"
#include "math/sound.h"

namespace pyibp {
namespace {

template <typename T>
using opmath_t = at::opmath_type<T>;

// Stores a box computed in opmath into two outputs of the tensor's dtype.
template <typename T, typename acc_t>
inline void store(const Box<acc_t>& b, T* __restrict__ first, T* __restrict__ second) {
  *first = static_cast<T>(b.first);
  *second = static_cast<T>(b.second);
}

// In place on fresh product outputs: add the bias of channel c, then the interval ReLU.
void bias_relu_epilogue(at::Tensor& mu, at::Tensor& rad, const std::optional<at::Tensor>& bias_in) {
  PYIBP_DISPATCH(mu.scalar_type(), "pyibp_bias_relu_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    scalar_t* __restrict__ m = mu.data_ptr<scalar_t>();
    scalar_t* __restrict__ r = rad.data_ptr<scalar_t>();
    if (!bias_in.has_value()) {
      at::parallel_for(0, mu.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          store(relu_box_at(acc_t(m[i]), acc_t(r[i])), m + i, r + i);
        }
      });
      return;
    }
    // A strided bias (a view such as w[:, 0]) is read through a contiguous copy.
    const at::Tensor bias = bias_in->contiguous();
    const scalar_t* __restrict__ b = bias.data_ptr<scalar_t>();
    for_each_with_channel(mu, [&](int64_t i, int64_t c) {
      store(relu_box_at(acc_t(m[i]) + acc_t(b[c]), acc_t(r[i])), m + i, r + i);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> input_box_cpu(const at::Tensor& x_in, const at::Tensor& eps_in,
                                                 double lower, double upper) {
  check_input_box(x_in, eps_in, lower, upper);
  const at::Tensor x = x_in.contiguous();
  // Double, as on CUDA, so that a float64 box is not rounded to a narrower eps.
  const at::Tensor eps = eps_in.to(at::kDouble).contiguous();
  at::Tensor mu = at::empty_like(x), rad = at::empty_like(x);
  const int64_t n = x.numel(), per = per_example(x);
  const bool shared_eps = eps.numel() == 1;
  PYIBP_DISPATCH(x.scalar_type(), "pyibp_input_box_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* __restrict__ xp = x.data_ptr<scalar_t>();
    const double* __restrict__ ep = eps.data_ptr<double>();
    scalar_t* __restrict__ m = mu.data_ptr<scalar_t>();
    scalar_t* __restrict__ r = rad.data_ptr<scalar_t>();
    const acc_t lo = static_cast<acc_t>(lower), hi = static_cast<acc_t>(upper);
    for_each_with_example(n, per, [&](int64_t i, int64_t b) {
      const acc_t e = static_cast<acc_t>(ep[shared_eps ? 0 : b]);
      store(input_box_at(acc_t(xp[i]), e, lo, hi), m + i, r + i);
    });
  });
  return {mu, rad};
}

std::tuple<at::Tensor, at::Tensor> interval_linear_cpu(const at::Tensor& mu, const at::Tensor& rad,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& abs_weight,
                                                       const std::optional<at::Tensor>& bias, bool relu) {
  auto [m, r] = linear_products(mu, rad, weight, abs_weight, bias, !relu);
  if (relu) bias_relu_epilogue(m, r, bias);
  return {m, r};
}

std::tuple<at::Tensor, at::Tensor> interval_conv2d_cpu(
    const at::Tensor& mu, const at::Tensor& rad, const at::Tensor& weight, const at::Tensor& abs_weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu) {
  auto [m, r] = conv2d_products(mu, rad, weight, abs_weight, bias, stride, padding, dilation, groups, !relu);
  if (relu) {
    std::tie(m, r) = same_dense_layout(m, r);
    bias_relu_epilogue(m, r, bias);
  }
  return {m, r};
}

std::tuple<at::Tensor, at::Tensor> interval_relu_cpu(const at::Tensor& mu_in, const at::Tensor& rad_in) {
  check_pair(mu_in, rad_in);
  auto [mu, rad] = same_dense_layout(mu_in, rad_in);
  at::Tensor mu_out = at::empty_like(mu), rad_out = at::empty_like(rad);
  PYIBP_DISPATCH(mu.scalar_type(), "pyibp_interval_relu_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* __restrict__ m = mu.data_ptr<scalar_t>();
    const scalar_t* __restrict__ r = rad.data_ptr<scalar_t>();
    scalar_t* __restrict__ mo = mu_out.data_ptr<scalar_t>();
    scalar_t* __restrict__ ro = rad_out.data_ptr<scalar_t>();
    at::parallel_for(0, mu.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) store(relu_box_at(acc_t(m[i]), acc_t(r[i])), mo + i, ro + i);
    });
  });
  return {mu_out, rad_out};
}

// A function with restrict parameters, so the compiler vectorises without run-time alias checks.
// The masks are arithmetic rather than branches: the pattern is data-dependent and mispredicts.
template <typename T>
void relu_backward_loop(const T* __restrict__ gm, const T* __restrict__ gr, const T* __restrict__ m,
                        const T* __restrict__ r, T* __restrict__ gm_out, T* __restrict__ gr_out, int64_t n) {
  using acc_t = opmath_t<T>;
  for (int64_t i = 0; i < n; ++i) {
    store(relu_box_grad_at(acc_t(gm[i]), acc_t(gr[i]), acc_t(m[i]), acc_t(r[i])), gm_out + i, gr_out + i);
  }
}

std::tuple<at::Tensor, at::Tensor> interval_relu_backward_cpu(const at::Tensor& grad_mu_in,
                                                              const at::Tensor& grad_rad_in,
                                                              const at::Tensor& out_mu_in,
                                                              const at::Tensor& out_rad_in) {
  check_relu_backward(grad_mu_in, grad_rad_in, out_mu_in, out_rad_in);
  // All four in the outputs' layout: a channels-last box keeps channels-last gradients.
  const at::Tensor om = dense(out_mu_in), orad = dense_like(out_rad_in, om);
  const at::Tensor gm = dense_like(grad_mu_in, om), gr = dense_like(grad_rad_in, om);
  at::Tensor grad_mu = at::empty_like(gm), grad_rad = at::empty_like(gr);
  PYIBP_DISPATCH(gm.scalar_type(), "pyibp_interval_relu_backward_cpu", [&] {
    const scalar_t* __restrict__ gmp = gm.data_ptr<scalar_t>();
    const scalar_t* __restrict__ grp = gr.data_ptr<scalar_t>();
    const scalar_t* __restrict__ m = om.data_ptr<scalar_t>();
    const scalar_t* __restrict__ r = orad.data_ptr<scalar_t>();
    scalar_t* __restrict__ gmo = grad_mu.data_ptr<scalar_t>();
    scalar_t* __restrict__ gro = grad_rad.data_ptr<scalar_t>();
    at::parallel_for(0, gm.numel(), kGrain, [&](int64_t begin, int64_t end) {
      relu_backward_loop(gmp + begin, grp + begin, m + begin, r + begin, gmo + begin, gro + begin, end - begin);
    });
  });
  return {grad_mu, grad_rad};
}

std::tuple<at::Tensor, at::Tensor> interval_affine_cpu(const at::Tensor& mu_in, const at::Tensor& rad_in,
                                                       const at::Tensor& scale_in,
                                                       const at::Tensor& shift_in) {
  check_affine(mu_in, rad_in, scale_in, shift_in);
  auto [mu, rad] = same_dense_layout(mu_in, rad_in);
  const at::Tensor scale = scale_in.to(mu.scalar_type()).contiguous();
  const at::Tensor shift = shift_in.to(mu.scalar_type()).contiguous();
  at::Tensor mu_out = at::empty_like(mu), rad_out = at::empty_like(rad);
  PYIBP_DISPATCH(mu.scalar_type(), "pyibp_interval_affine_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* __restrict__ m = mu.data_ptr<scalar_t>();
    const scalar_t* __restrict__ r = rad.data_ptr<scalar_t>();
    const scalar_t* __restrict__ s = scale.data_ptr<scalar_t>();
    const scalar_t* __restrict__ t = shift.data_ptr<scalar_t>();
    scalar_t* __restrict__ mo = mu_out.data_ptr<scalar_t>();
    scalar_t* __restrict__ ro = rad_out.data_ptr<scalar_t>();
    for_each_with_channel(mu, [&](int64_t i, int64_t c) {
      store(affine_box_at(acc_t(m[i]), acc_t(r[i]), acc_t(s[c]), acc_t(t[c])), mo + i, ro + i);
    });
  });
  return {mu_out, rad_out};
}

// The conversions between (lower, upper) and (mu, rad) share one loop.
template <bool kToInterval>
std::tuple<at::Tensor, at::Tensor> convert_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_pair(a_in, b_in);
  auto [a, b] = same_dense_layout(a_in, b_in);
  at::Tensor first = at::empty_like(a), second = at::empty_like(b);
  PYIBP_DISPATCH(a.scalar_type(), "pyibp_convert_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* __restrict__ ap = a.data_ptr<scalar_t>();
    const scalar_t* __restrict__ bp = b.data_ptr<scalar_t>();
    scalar_t* __restrict__ fo = first.data_ptr<scalar_t>();
    scalar_t* __restrict__ so = second.data_ptr<scalar_t>();
    at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) store(convert_at<kToInterval>(acc_t(ap[i]), acc_t(bp[i])), fo + i, so + i);
    });
  });
  return {first, second};
}

at::Tensor margin_elision_cpu(const at::Tensor& mu_in, const at::Tensor& rad_in, const at::Tensor& weight_in,
                              const std::optional<at::Tensor>& bias_in, const at::Tensor& labels_in) {
  check_margin_elision(mu_in, rad_in, weight_in, bias_in, labels_in);
  const int64_t B = mu_in.size(0), F = mu_in.size(1), K = weight_in.size(0);
  const at::Tensor mu = mu_in.contiguous(), rad = rad_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  if (B > 0) {
    const int64_t lo = labels.min().item<int64_t>(), hi = labels.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < K, "labels must lie in [0, ", K, "), got values in [", lo, ", ", hi, "]");
  }
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::zeros({K}, mu.options());
  at::Tensor out = at::empty({B, K}, mu.options());
  PYIBP_DISPATCH(mu.scalar_type(), "pyibp_margin_elision_cpu", [&] {
    const scalar_t* m = mu.data_ptr<scalar_t>();
    const scalar_t* r = rad.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    const int64_t* y = labels.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * K, 64, [&](int64_t begin, int64_t end) {
      for (int64_t bj = begin; bj < end; ++bj) {
        const int64_t b = bj / K, j = bj % K, yb = y[b];
        if (j == yb) {
          o[bj] = scalar_t(0);
          continue;
        }
        const scalar_t* wy = w + yb * F;
        const scalar_t* wj = w + j * F;
        const scalar_t* mb = m + b * F;
        const scalar_t* rb = r + b * F;
        // The lanes and order of the CUDA kernel (math/elision.h).
        double lanes[kElisionLanes] = {};
        for (int64_t base = 0; base < F; base += kElisionLanes) {
          const int64_t count = std::min<int64_t>(kElisionLanes, F - base);
          for (int64_t lane = 0; lane < count; ++lane) {
            const int64_t f = base + lane;
            lanes[lane] += elision_term(double(wy[f]), double(wj[f]), double(mb[f]), double(rb[f]));
          }
        }
        o[bj] = static_cast<scalar_t>(elision_with_bias(reduce_lanes(lanes), double(bp[yb]), double(bp[j])));
      }
    });
  });
  return out;
}

template <typename T>
void relaxation_loop(const T* __restrict__ l, const T* __restrict__ u, T* __restrict__ lower_slope,
                     T* __restrict__ upper_slope, T* __restrict__ upper_intercept, int64_t n) {
  using acc_t = opmath_t<T>;
  for (int64_t i = 0; i < n; ++i) {
    const ReluRelaxation<acc_t> r = relu_relaxation_at(acc_t(l[i]), acc_t(u[i]));
    lower_slope[i] = static_cast<T>(r.lower_slope);
    upper_slope[i] = static_cast<T>(r.upper_slope);
    upper_intercept[i] = static_cast<T>(r.upper_intercept);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relu_relaxation_cpu(const at::Tensor& lower_in,
                                                                   const at::Tensor& upper_in) {
  check_pair(lower_in, upper_in);
  auto [lower, upper] = same_dense_layout(lower_in, upper_in);
  at::Tensor lower_slope = at::empty_like(lower), upper_slope = at::empty_like(lower),
             upper_intercept = at::empty_like(lower);
  PYIBP_DISPATCH(lower.scalar_type(), "pyibp_relu_relaxation_cpu", [&] {
    const scalar_t* __restrict__ l = lower.data_ptr<scalar_t>();
    const scalar_t* __restrict__ u = upper.data_ptr<scalar_t>();
    scalar_t* __restrict__ ls = lower_slope.data_ptr<scalar_t>();
    scalar_t* __restrict__ us = upper_slope.data_ptr<scalar_t>();
    scalar_t* __restrict__ ui = upper_intercept.data_ptr<scalar_t>();
    at::parallel_for(0, lower.numel(), kGrain, [&](int64_t begin, int64_t end) {
      relaxation_loop(l + begin, u + begin, ls + begin, us + begin, ui + begin, end - begin);
    });
  });
  return {lower_slope, upper_slope, upper_intercept};
}

// The sum over i in [0, n) of term(i) in kLanes fixed partial sums (the same order on every run),
// which lets the compiler vectorise the loop, term's side effects (a row's coefficients) included.
template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t n, const F& term) {
  constexpr int kLanes = 8;
  acc_t partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 8
    for (int lane = 0; lane < kLanes; ++lane) partial[lane] += term(i + lane);
  }
  for (; i < n; ++i) partial[0] += term(i);
  acc_t sum = 0;
  for (int lane = 0; lane < kLanes; ++lane) sum += partial[lane];
  return sum;
}

// One row of A through the ReLU step; returns the row's shift.
template <typename T>
opmath_t<T> crown_relu_row(const T* __restrict__ a, const T* __restrict__ m, const T* __restrict__ r,
                           T* __restrict__ out, int64_t n) {
  using acc_t = opmath_t<T>;
  return lane_sum<acc_t>(n, [&](int64_t i) {
    const acc_t mi = acc_t(m[i]), ri = acc_t(r[i]);
    acc_t term;
    out[i] = static_cast<T>(crown_relu_coefficient(acc_t(a[i]), relu_relaxation_at(mi - ri, mi + ri), &term));
    return term;
  });
}

std::tuple<at::Tensor, at::Tensor> crown_relu_step_cpu(const at::Tensor& A_in, const at::Tensor& mu_in,
                                                       const at::Tensor& rad_in) {
  check_crown_relu_step(A_in, mu_in, rad_in);
  const at::Tensor A = A_in.contiguous(), mu = mu_in.contiguous(), rad = rad_in.contiguous();
  const int64_t rows = A.size(1), n = A.size(2);
  at::Tensor out = at::empty_like(A), shift = at::empty({A.size(0), rows}, A.options());
  PYIBP_DISPATCH(A.scalar_type(), "pyibp_crown_relu_step_cpu", [&] {
    const scalar_t* __restrict__ a = A.data_ptr<scalar_t>();
    const scalar_t* __restrict__ m = mu.data_ptr<scalar_t>();
    const scalar_t* __restrict__ r = rad.data_ptr<scalar_t>();
    scalar_t* __restrict__ o = out.data_ptr<scalar_t>();
    scalar_t* __restrict__ sh = shift.data_ptr<scalar_t>();
    // One (example, row) pair per task: its shift is a sum over that row only.
    at::parallel_for(0, A.size(0) * rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)),
                     [&](int64_t row0, int64_t row1) {
      for (int64_t row = row0; row < row1; ++row) {
        const scalar_t* __restrict__ ar = a + row * n;
        const scalar_t* __restrict__ mb = m + (row / rows) * n;
        const scalar_t* __restrict__ rb = r + (row / rows) * n;
        scalar_t* __restrict__ orow = o + row * n;
        sh[row] = static_cast<scalar_t>(crown_relu_row(ar, mb, rb, orow, n));
      }
    });
  });
  return {out, shift};
}

// The backward of one row: its gradient, and its terms of the slope and intercept gradients
// (summed over the rows of an example into s_acc and i_acc, in opmath).
template <typename T, typename acc_t>
void crown_relu_row_backward(const T* __restrict__ a, const T* __restrict__ g, acc_t g_shift,
                             const T* __restrict__ m, const T* __restrict__ r, T* __restrict__ grad_a,
                             acc_t* __restrict__ s_acc, acc_t* __restrict__ i_acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t mi = acc_t(m[i]), ri = acc_t(r[i]);
    const ReluRelaxation<acc_t> rl = relu_relaxation_at(mi - ri, mi + ri);
    const acc_t ai = acc_t(a[i]), gi = acc_t(g[i]);
    const bool negative = ai < acc_t(0);
    // The lower slope where A > 0; the upper slope and intercept elsewhere (as in the forward).
    grad_a[i] = static_cast<T>(ai > acc_t(0) ? gi * rl.lower_slope : gi * rl.upper_slope + g_shift * rl.upper_intercept);
    s_acc[i] += negative ? ai * gi : acc_t(0);
    i_acc[i] += negative ? ai * g_shift : acc_t(0);
  }
}

// From the slope and intercept gradients to those of the box (l = mu - rad, u = mu + rad).
template <typename T, typename acc_t>
void crown_relu_box_grad(const T* __restrict__ m, const T* __restrict__ r, const acc_t* __restrict__ s_acc,
                         const acc_t* __restrict__ i_acc, T* __restrict__ grad_mu, T* __restrict__ grad_rad,
                         int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t mi = acc_t(m[i]), ri = acc_t(r[i]);
    acc_t g_l, g_u;
    relu_relaxation_grad(mi - ri, mi + ri, s_acc[i], i_acc[i], &g_l, &g_u);
    grad_mu[i] = static_cast<T>(g_l + g_u);
    grad_rad[i] = static_cast<T>(g_u - g_l);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> crown_relu_step_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& grad_shift_in, const at::Tensor& A_in,
    const at::Tensor& mu_in, const at::Tensor& rad_in) {
  check_crown_relu_step_backward(grad_out_in, grad_shift_in, A_in, mu_in, rad_in);
  const at::Tensor grad_out = grad_out_in.contiguous(), grad_shift = grad_shift_in.contiguous();
  const at::Tensor A = A_in.contiguous(), mu = mu_in.contiguous(), rad = rad_in.contiguous();
  const int64_t rows = A.size(1), n = A.size(2);
  at::Tensor grad_A = at::empty_like(A), grad_mu = at::empty_like(mu), grad_rad = at::empty_like(mu);
  PYIBP_DISPATCH(A.scalar_type(), "pyibp_crown_relu_step_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* __restrict__ g = grad_out.data_ptr<scalar_t>();
    const scalar_t* __restrict__ gs = grad_shift.data_ptr<scalar_t>();
    const scalar_t* __restrict__ a = A.data_ptr<scalar_t>();
    const scalar_t* __restrict__ m = mu.data_ptr<scalar_t>();
    const scalar_t* __restrict__ r = rad.data_ptr<scalar_t>();
    scalar_t* __restrict__ ga = grad_A.data_ptr<scalar_t>();
    scalar_t* __restrict__ gm = grad_mu.data_ptr<scalar_t>();
    scalar_t* __restrict__ gr = grad_rad.data_ptr<scalar_t>();
    // One example per task: the slope and intercept gradients sum over its rows.
    at::parallel_for(0, A.size(0), 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> g_slope(n), g_intercept(n);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* __restrict__ mb = m + b * n;
        const scalar_t* __restrict__ rb = r + b * n;
        std::fill(g_slope.begin(), g_slope.end(), acc_t(0));
        std::fill(g_intercept.begin(), g_intercept.end(), acc_t(0));
        acc_t* __restrict__ s_acc = g_slope.data();
        acc_t* __restrict__ i_acc = g_intercept.data();
        for (int64_t row = b * rows; row < (b + 1) * rows; ++row) {
          crown_relu_row_backward(a + row * n, g + row * n, acc_t(gs[row]), mb, rb, ga + row * n, s_acc, i_acc, n);
        }
        crown_relu_box_grad(mb, rb, s_acc, i_acc, gm + b * n, gr + b * n, n);
      }
    });
  });
  return {grad_A, grad_mu, grad_rad};
}

// One row of A through the ReLU step with the lower slopes alpha (of this row); returns its shift.
template <typename T>
opmath_t<T> crown_relu_alpha_row(const T* __restrict__ a, const T* __restrict__ l, const T* __restrict__ u,
                                 const T* __restrict__ alpha, T* __restrict__ out, int64_t n) {
  using acc_t = opmath_t<T>;
  return lane_sum<acc_t>(n, [&](int64_t i) {
    const ReluRelaxation<acc_t> r = relu_relaxation_alpha_at(acc_t(l[i]), acc_t(u[i]), acc_t(alpha[i]));
    acc_t term;
    out[i] = static_cast<T>(relu_lines_coefficient(acc_t(a[i]), r.lower_slope, r.upper_slope, r.upper_intercept,
                                                   &term));
    return term;
  });
}

std::tuple<at::Tensor, at::Tensor> crown_relu_alpha_step_cpu(const at::Tensor& A_in, const at::Tensor& lower_in,
                                                             const at::Tensor& upper_in, const at::Tensor& alpha_in) {
  check_crown_relu_alpha_step(A_in, lower_in, upper_in, alpha_in);
  const at::Tensor A = A_in.contiguous(), lower = lower_in.contiguous(), upper = upper_in.contiguous();
  const at::Tensor alpha = broadcast_alpha(alpha_in, A);
  const int64_t rows = A.size(1), n = A.size(2);
  const int64_t alpha_example = alpha.stride(0), alpha_row = alpha.stride(1);
  at::Tensor out = at::empty_like(A), shift = at::empty({A.size(0), rows}, A.options());
  PYIBP_DISPATCH(A.scalar_type(), "pyibp_crown_relu_alpha_step_cpu", [&] {
    const scalar_t* __restrict__ a = A.data_ptr<scalar_t>();
    const scalar_t* __restrict__ l = lower.data_ptr<scalar_t>();
    const scalar_t* __restrict__ u = upper.data_ptr<scalar_t>();
    const scalar_t* __restrict__ al = alpha.data_ptr<scalar_t>();
    scalar_t* __restrict__ o = out.data_ptr<scalar_t>();
    scalar_t* __restrict__ sh = shift.data_ptr<scalar_t>();
    // One (example, row) pair per task, as crown_relu_step.
    at::parallel_for(0, A.size(0) * rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)),
                     [&](int64_t row0, int64_t row1) {
      for (int64_t row = row0; row < row1; ++row) {
        const int64_t b = row / rows, r = row - b * rows;
        sh[row] = static_cast<scalar_t>(crown_relu_alpha_row(a + row * n, l + b * n, u + b * n,
                                                             al + b * alpha_example + r * alpha_row, o + row * n, n));
      }
    });
  });
  return {out, shift};
}

// The backward of one row of the alpha step: its gradient, and its terms of the upper-slope and
// upper-intercept gradients (summed over the example's rows into s_acc, i_acc) and of the alpha
// gradient (summed into alpha_acc when the rows share alpha, else stored there), in opmath.
// (A template flag: a loop-invariant `shared ? alpha_acc[i] : 0` keeps GCC from vectorising.)
template <bool shared_alpha, typename T, typename acc_t>
void crown_relu_alpha_row_backward(const T* __restrict__ a, const T* __restrict__ g, acc_t g_shift,
                                   const T* __restrict__ l, const T* __restrict__ u, const T* __restrict__ alpha,
                                   T* __restrict__ grad_a, acc_t* __restrict__ s_acc, acc_t* __restrict__ i_acc,
                                   acc_t* __restrict__ alpha_acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t li = acc_t(l[i]), ui = acc_t(u[i]);
    const ReluLinesGrad<acc_t> d = relu_lines_coefficient_grad(acc_t(a[i]), acc_t(g[i]), g_shift,
                                                               relu_relaxation_alpha_at(li, ui, acc_t(alpha[i])));
    grad_a[i] = static_cast<T>(d.a);
    s_acc[i] += d.upper_slope;
    i_acc[i] += d.upper_intercept;
    const acc_t d_alpha = relu_unstable(li, ui) ? d.lower_slope : acc_t(0);
    if constexpr (shared_alpha) {
      alpha_acc[i] += d_alpha;
    } else {
      alpha_acc[i] = d_alpha;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crown_relu_alpha_step_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& grad_shift_in, const at::Tensor& A_in,
    const at::Tensor& lower_in, const at::Tensor& upper_in, const at::Tensor& alpha_in) {
  check_crown_relu_alpha_step_backward(grad_out_in, grad_shift_in, A_in, lower_in, upper_in, alpha_in);
  const at::Tensor grad_out = grad_out_in.contiguous(), grad_shift = grad_shift_in.contiguous();
  const at::Tensor A = A_in.contiguous(), lower = lower_in.contiguous(), upper = upper_in.contiguous();
  const at::Tensor alpha = broadcast_alpha(alpha_in, A);
  const int64_t rows = A.size(1), n = A.size(2), alpha_rows = alpha_in.size(1);
  const int64_t alpha_example = alpha.stride(0), alpha_row = alpha.stride(1);
  const bool shared_alpha = alpha_rows == 1;
  at::Tensor grad_A = at::empty_like(A), grad_lower = at::empty_like(lower), grad_upper = at::empty_like(lower);
  at::Tensor alpha_acc = per_example_alpha_grad(alpha_in, A);
  PYIBP_DISPATCH(A.scalar_type(), "pyibp_crown_relu_alpha_step_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* __restrict__ g = grad_out.data_ptr<scalar_t>();
    const scalar_t* __restrict__ gs = grad_shift.data_ptr<scalar_t>();
    const scalar_t* __restrict__ a = A.data_ptr<scalar_t>();
    const scalar_t* __restrict__ l = lower.data_ptr<scalar_t>();
    const scalar_t* __restrict__ u = upper.data_ptr<scalar_t>();
    const scalar_t* __restrict__ al = alpha.data_ptr<scalar_t>();
    scalar_t* __restrict__ ga = grad_A.data_ptr<scalar_t>();
    scalar_t* __restrict__ gl = grad_lower.data_ptr<scalar_t>();
    scalar_t* __restrict__ gu = grad_upper.data_ptr<scalar_t>();
    acc_t* __restrict__ gal = alpha_acc.data_ptr<acc_t>();
    // One example per task: the slope and intercept gradients (and alpha's, when shared) sum over its rows.
    at::parallel_for(0, A.size(0), 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> g_slope(n), g_intercept(n);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* __restrict__ lb = l + b * n;
        const scalar_t* __restrict__ ub = u + b * n;
        std::fill(g_slope.begin(), g_slope.end(), acc_t(0));
        std::fill(g_intercept.begin(), g_intercept.end(), acc_t(0));
        if (shared_alpha) std::fill(gal + b * n, gal + (b + 1) * n, acc_t(0));
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = b * rows + r;
          const auto row_backward = shared_alpha ? crown_relu_alpha_row_backward<true, scalar_t, acc_t>
                                                 : crown_relu_alpha_row_backward<false, scalar_t, acc_t>;
          row_backward(a + row * n, g + row * n, acc_t(gs[row]), lb, ub, al + b * alpha_example + r * alpha_row,
                       ga + row * n, g_slope.data(), g_intercept.data(),
                       gal + (b * alpha_rows + (shared_alpha ? 0 : r)) * n, n);
        }
        for (int64_t i = 0; i < n; ++i) {
          acc_t g_l, g_u;
          relu_relaxation_grad(acc_t(lb[i]), acc_t(ub[i]), g_slope[i], g_intercept[i], &g_l, &g_u);
          gl[b * n + i] = static_cast<scalar_t>(g_l);
          gu[b * n + i] = static_cast<scalar_t>(g_u);
        }
      }
    });
  });
  return {grad_A, grad_lower, grad_upper, sum_alpha_grad(alpha_acc, alpha_in)};
}

// One row of A through the sound ReLU step: its coefficients and its three sums, each in kLanes
// fixed partial sums (one order on every run, and the loop vectorises). m_in / m_out may be null.
template <typename T>
void sound_crown_relu_row(const T* __restrict__ a, const T* __restrict__ alpha, const T* __restrict__ sigma,
                          const T* __restrict__ tau, const T* __restrict__ m_in, const T* __restrict__ m_out,
                          T* __restrict__ out, T* __restrict__ sums, int64_t n) {
  constexpr int kLanes = 8;
  T shift[kLanes] = {}, slack_in[kLanes] = {}, slack_out[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 8
    for (int lane = 0; lane < kLanes; ++lane) {
      T term;
      const T ai = a[i + lane];
      const T oi = relu_lines_coefficient(ai, alpha[i + lane], sigma[i + lane], tau[i + lane], &term);
      out[i + lane] = oi;
      shift[lane] += term;
      if (m_in) slack_in[lane] += std::abs(ai) * m_in[i + lane];
      if (m_out) slack_out[lane] += std::abs(oi) * m_out[i + lane];
    }
  }
  for (; i < n; ++i) {
    T term;
    const T oi = relu_lines_coefficient(a[i], alpha[i], sigma[i], tau[i], &term);
    out[i] = oi;
    shift[0] += term;
    if (m_in) slack_in[0] += std::abs(a[i]) * m_in[i];
    if (m_out) slack_out[0] += std::abs(oi) * m_out[i];
  }
  T total[3] = {};
  for (int lane = 0; lane < kLanes; ++lane) {
    total[0] += shift[lane];
    total[1] += slack_in[lane];
    total[2] += slack_out[lane];
  }
  for (int k = 0; k < 3; ++k) sums[k] = total[k];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sound_crown_relu_step_cpu(
    const at::Tensor& A_in, const at::Tensor& alpha_in, const at::Tensor& sigma_in, const at::Tensor& tau_in,
    const std::optional<at::Tensor>& m_in_opt, const std::optional<at::Tensor>& m_out_opt) {
  check_sound_crown_relu_step(A_in, alpha_in, sigma_in, tau_in, m_in_opt, m_out_opt);
  const at::Tensor A = A_in.contiguous(), alpha = alpha_in.contiguous(), sigma = sigma_in.contiguous(),
                   tau = tau_in.contiguous();
  const at::Tensor m_in = m_in_opt.has_value() ? m_in_opt->contiguous() : at::Tensor();
  const at::Tensor m_out = m_out_opt.has_value() ? m_out_opt->contiguous() : at::Tensor();
  const int64_t rows = A.size(1), n = A.size(2);
  at::Tensor out = at::empty_like(A);
  at::Tensor sums[3] = {at::empty({A.size(0), rows}, A.options()), at::empty({A.size(0), rows}, A.options()),
                        at::empty({A.size(0), rows}, A.options())};
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "pyibp_sound_crown_relu_step_cpu", [&] {
    const scalar_t* a = A.data_ptr<scalar_t>();
    const scalar_t* al = alpha.data_ptr<scalar_t>();
    const scalar_t* si = sigma.data_ptr<scalar_t>();
    const scalar_t* ta = tau.data_ptr<scalar_t>();
    const scalar_t* mi = m_in.defined() ? m_in.data_ptr<scalar_t>() : nullptr;
    const scalar_t* mo = m_out.defined() ? m_out.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* s[3] = {sums[0].data_ptr<scalar_t>(), sums[1].data_ptr<scalar_t>(), sums[2].data_ptr<scalar_t>()};
    const int64_t total = A.size(0) * rows;
    at::parallel_for(0, total, std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t base = (row / rows) * n;
        scalar_t row_sums[3];
        sound_crown_relu_row(a + row * n, al + base, si + base, ta + base, mi ? mi + base : nullptr,
                             mo ? mo + base : nullptr, o + row * n, row_sums, n);
        for (int k = 0; k < 3; ++k) s[k][row] = row_sums[k];
      }
    });
  });
  return {out, sums[0], sums[1], sums[2]};
}

// One element of the sound ReLU: stores the box, returns 1 where mu + rad is not finite (an infinite or
// NaN input, or an overflow: the caller voids that example's bounds).
template <typename T, typename I = typename SameSizeInt<T>::type>
inline I sound_relu_element(T m, T r, T* mo, T* ro) {
  const Box<T> b = sound_relu_box_at(m, r);
  *mo = b.first;
  *ro = b.second;
  return I(!finite_at(m + r));  // the sum sound_relu_box_at formed
}

// One example's run, out of place or in place (then in == out: restrict holds per pointer pair).
// An integer flag of the element's width vectorises; a bool does not.
template <typename T>
bool sound_relu_run(const T* __restrict__ m, const T* __restrict__ r, T* __restrict__ mo, T* __restrict__ ro,
                    int64_t n) {
  typename SameSizeInt<T>::type bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= sound_relu_element(m[i], r[i], mo + i, ro + i);
  return !bad;
}

template <typename T>
bool sound_relu_run_inplace(T* __restrict__ m, T* __restrict__ r, int64_t n) {
  typename SameSizeInt<T>::type bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= sound_relu_element(m[i], r[i], m + i, r + i);
  return !bad;
}

// Parallel over examples, each example's elements one contiguous run (row-major or channels-last).
// mu/rad and mu_out/rad_out may be the same tensors (the in-place op).
at::Tensor sound_relu_into(const at::Tensor& mu, const at::Tensor& rad, at::Tensor& mu_out, at::Tensor& rad_out) {
  const int64_t batch = mu.size(0), per = batch ? mu.numel() / batch : 0;
  at::Tensor finite = at::ones({batch}, mu.options().dtype(at::kBool));
  if (per == 0) return finite;
  const bool inplace = mu.data_ptr() == mu_out.data_ptr();
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "pyibp_sound_relu_cpu", [&] {
    const scalar_t* m = mu.data_ptr<scalar_t>();
    const scalar_t* r = rad.data_ptr<scalar_t>();
    scalar_t* mo = mu_out.data_ptr<scalar_t>();
    scalar_t* ro = rad_out.data_ptr<scalar_t>();
    bool* ok = finite.data_ptr<bool>();
    at::parallel_for(0, batch, std::max<int64_t>(1, kGrain / per), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t at = b * per;
        ok[b] = inplace ? sound_relu_run_inplace(mo + at, ro + at, per)
                        : sound_relu_run(m + at, r + at, mo + at, ro + at, per);
      }
    });
  });
  return finite;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sound_relu_cpu(const at::Tensor& mu_in, const at::Tensor& rad_in) {
  check_sound_pair(mu_in, rad_in, "sound_relu");
  auto [mu, rad] = same_dense_layout(mu_in, rad_in);
  at::Tensor mu_out = at::empty_like(mu), rad_out = at::empty_like(rad);
  at::Tensor finite = sound_relu_into(mu, rad, mu_out, rad_out);
  return {mu_out, rad_out, finite};
}

at::Tensor sound_relu_inplace_cpu(at::Tensor& mu, at::Tensor& rad) {
  check_sound_relu_inplace(mu, rad);
  return sound_relu_into(mu, rad, mu, rad);
}

template <typename T>
void sound_operand_loop(const T* __restrict__ m, const T* __restrict__ r, T* __restrict__ out, T c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = sound_operand_at(m[i], r[i], c);
}

at::Tensor sound_radius_operand_cpu(const at::Tensor& mu_in, const at::Tensor& rad_in, double c) {
  check_sound_radius_operand(mu_in, rad_in, c);
  auto [mu, rad] = same_dense_layout(mu_in, rad_in);
  at::Tensor out = at::empty_like(rad);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "pyibp_sound_radius_operand_cpu", [&] {
    const scalar_t* m = mu.data_ptr<scalar_t>();
    const scalar_t* r = rad.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t ct = round_up_to<scalar_t>(c);
    at::parallel_for(0, mu.numel(), kGrain, [&](int64_t begin, int64_t end) {
      sound_operand_loop(m + begin, r + begin, o + begin, ct, end - begin);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyibp, CPU, m) {
  m.impl("input_box", &input_box_cpu);
  m.impl("interval_linear", &interval_linear_cpu);
  m.impl("interval_conv2d", &interval_conv2d_cpu);
  m.impl("interval_relu", &interval_relu_cpu);
  m.impl("interval_relu_backward", &interval_relu_backward_cpu);
  m.impl("interval_affine", &interval_affine_cpu);
  m.impl("center_to_interval", &convert_cpu<true>);
  m.impl("interval_to_center", &convert_cpu<false>);
  m.impl("margin_elision", &margin_elision_cpu);
  m.impl("relu_relaxation", &relu_relaxation_cpu);
  m.impl("crown_relu_step", &crown_relu_step_cpu);
  m.impl("crown_relu_step_backward", &crown_relu_step_backward_cpu);
  m.impl("crown_relu_alpha_step", &crown_relu_alpha_step_cpu);
  m.impl("crown_relu_alpha_step_backward", &crown_relu_alpha_step_backward_cpu);
  m.impl("sound_crown_relu_step", &sound_crown_relu_step_cpu);
  m.impl("sound_relu", &sound_relu_cpu);
  m.impl("sound_relu_", &sound_relu_inplace_cpu);
  m.impl("sound_radius_operand", &sound_radius_operand_cpu);
}

}  // namespace pyibp
