// CUDA kernels of the interval operators, the same operators, in the same order, as
// csrc/cpu/interval_cpu.cpp, over the same per-element formulas (csrc/math/*.h). Reduced precision
// (half, bfloat16) is computed in float and stored back.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "cuda/pointwise.cuh"
#include "dispatch.h"
#include "interval_products.h"
#include "math/box.h"
#include "math/elision.h"
#include "math/relaxation.h"
#include "math/sound.h"

namespace pyibp {
namespace {

// Stores a box computed in opmath into two outputs of the tensor's dtype.
template <typename T, typename acc_t>
__device__ __forceinline__ void store(const Box<acc_t>& b, T* first, T* second) {
  *first = static_cast<T>(b.first);
  *second = static_cast<T>(b.second);
}

void bias_relu_epilogue(at::Tensor& mu, at::Tensor& rad, const std::optional<at::Tensor>& bias_in) {
  const int64_t n = mu.numel();
  const ChannelOf channel = channel_of(inner_size(mu), mu.size(1), is_channels_last(mu), n);
  // A strided bias (a view such as w[:, 0]) is read through a contiguous copy.
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  PYIBP_DISPATCH(mu.scalar_type(), "pyibp_bias_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* m = mu.data_ptr<scalar_t>();
    scalar_t* r = rad.data_ptr<scalar_t>();
    const scalar_t* b = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    launch_pointwise(n, [=] __device__(int64_t i) {
      acc_t mi = static_cast<acc_t>(m[i]);
      if (b != nullptr) mi += static_cast<acc_t>(b[channel(i)]);
      store(relu_box_at(mi, static_cast<acc_t>(r[i])), m + i, r + i);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> input_box_cuda(const at::Tensor& x_in, const at::Tensor& eps_in,
                                                  double lower, double upper) {
  check_input_box(x_in, eps_in, lower, upper);
  const at::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  // Double, so that a float64 box is not rounded to float32's eps.
  const at::Tensor eps = eps_in.to(x.device(), at::kDouble).contiguous();
  at::Tensor mu = at::empty_like(x), rad = at::empty_like(x);
  const int64_t per = per_example(x);
  const bool shared_eps = eps.numel() == 1;
  const IndexDivider example = index_divider(per, x.numel());
  PYIBP_DISPATCH(x.scalar_type(), "pyibp_input_box_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const double* ep = eps.data_ptr<double>();
    scalar_t* m = mu.data_ptr<scalar_t>();
    scalar_t* r = rad.data_ptr<scalar_t>();
    const acc_t lo = static_cast<acc_t>(lower), hi = static_cast<acc_t>(upper);
    launch_pointwise(x.numel(), [=] __device__(int64_t i) {
      const acc_t e = static_cast<acc_t>(ep[shared_eps ? 0 : example.div(i)]);
      store(input_box_at(static_cast<acc_t>(xp[i]), e, lo, hi), m + i, r + i);
    });
  });
  return {mu, rad};
}

std::tuple<at::Tensor, at::Tensor> interval_linear_cuda(const at::Tensor& mu, const at::Tensor& rad,
                                                        const at::Tensor& weight,
                                                        const at::Tensor& abs_weight,
                                                        const std::optional<at::Tensor>& bias, bool relu) {
  const at::cuda::OptionalCUDAGuard guard(mu.device());
  auto [m, r] = linear_products(mu, rad, weight, abs_weight, bias, !relu);
  if (relu) bias_relu_epilogue(m, r, bias);
  return {m, r};
}

std::tuple<at::Tensor, at::Tensor> interval_conv2d_cuda(
    const at::Tensor& mu, const at::Tensor& rad, const at::Tensor& weight, const at::Tensor& abs_weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu) {
  const at::cuda::OptionalCUDAGuard guard(mu.device());
  auto [m, r] = conv2d_products(mu, rad, weight, abs_weight, bias, stride, padding, dilation, groups, !relu);
  if (relu) {
    std::tie(m, r) = same_dense_layout(m, r);
    bias_relu_epilogue(m, r, bias);
  }
  return {m, r};
}

std::tuple<at::Tensor, at::Tensor> interval_relu_cuda(const at::Tensor& mu_in, const at::Tensor& rad_in) {
  check_pair(mu_in, rad_in);
  const at::cuda::OptionalCUDAGuard guard(mu_in.device());
  auto [mu, rad] = same_dense_layout(mu_in, rad_in);
  at::Tensor mu_out = at::empty_like(mu), rad_out = at::empty_like(rad);
  PYIBP_DISPATCH(mu.scalar_type(), "pyibp_interval_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m = mu.data_ptr<scalar_t>();
    const scalar_t* r = rad.data_ptr<scalar_t>();
    scalar_t* mo = mu_out.data_ptr<scalar_t>();
    scalar_t* ro = rad_out.data_ptr<scalar_t>();
    launch_pointwise(mu.numel(), [=] __device__(int64_t i) {
      store(relu_box_at(static_cast<acc_t>(m[i]), static_cast<acc_t>(r[i])), mo + i, ro + i);
    });
  });
  return {mu_out, rad_out};
}

std::tuple<at::Tensor, at::Tensor> interval_relu_backward_cuda(const at::Tensor& grad_mu_in,
                                                               const at::Tensor& grad_rad_in,
                                                               const at::Tensor& out_mu_in,
                                                               const at::Tensor& out_rad_in) {
  check_relu_backward(grad_mu_in, grad_rad_in, out_mu_in, out_rad_in);
  const at::cuda::OptionalCUDAGuard guard(grad_mu_in.device());
  // All four in the outputs' layout: a channels-last box keeps channels-last gradients.
  const at::Tensor om = dense(out_mu_in), orad = dense_like(out_rad_in, om);
  const at::Tensor gm = dense_like(grad_mu_in, om), gr = dense_like(grad_rad_in, om);
  at::Tensor grad_mu = at::empty_like(gm), grad_rad = at::empty_like(gr);
  PYIBP_DISPATCH(gm.scalar_type(), "pyibp_interval_relu_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gmp = gm.data_ptr<scalar_t>();
    const scalar_t* grp = gr.data_ptr<scalar_t>();
    const scalar_t* m = om.data_ptr<scalar_t>();
    const scalar_t* r = orad.data_ptr<scalar_t>();
    scalar_t* gmo = grad_mu.data_ptr<scalar_t>();
    scalar_t* gro = grad_rad.data_ptr<scalar_t>();
    launch_pointwise(gm.numel(), [=] __device__(int64_t i) {
      store(relu_box_grad_at(static_cast<acc_t>(gmp[i]), static_cast<acc_t>(grp[i]), static_cast<acc_t>(m[i]),
                             static_cast<acc_t>(r[i])),
            gmo + i, gro + i);
    });
  });
  return {grad_mu, grad_rad};
}

std::tuple<at::Tensor, at::Tensor> interval_affine_cuda(const at::Tensor& mu_in, const at::Tensor& rad_in,
                                                        const at::Tensor& scale_in,
                                                        const at::Tensor& shift_in) {
  check_affine(mu_in, rad_in, scale_in, shift_in);
  const int64_t channels = mu_in.size(1);
  const at::cuda::OptionalCUDAGuard guard(mu_in.device());
  auto [mu, rad] = same_dense_layout(mu_in, rad_in);
  const at::Tensor scale = scale_in.to(mu.scalar_type()).contiguous();
  const at::Tensor shift = shift_in.to(mu.scalar_type()).contiguous();
  at::Tensor mu_out = at::empty_like(mu), rad_out = at::empty_like(rad);
  const ChannelOf channel = channel_of(inner_size(mu), channels, is_channels_last(mu), mu.numel());
  PYIBP_DISPATCH(mu.scalar_type(), "pyibp_interval_affine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m = mu.data_ptr<scalar_t>();
    const scalar_t* r = rad.data_ptr<scalar_t>();
    const scalar_t* s = scale.data_ptr<scalar_t>();
    const scalar_t* t = shift.data_ptr<scalar_t>();
    scalar_t* mo = mu_out.data_ptr<scalar_t>();
    scalar_t* ro = rad_out.data_ptr<scalar_t>();
    launch_pointwise(mu.numel(), [=] __device__(int64_t i) {
      const int64_t c = channel(i);
      store(affine_box_at(static_cast<acc_t>(m[i]), static_cast<acc_t>(r[i]), static_cast<acc_t>(s[c]),
                          static_cast<acc_t>(t[c])),
            mo + i, ro + i);
    });
  });
  return {mu_out, rad_out};
}

// The conversions between (lower, upper) and (mu, rad) share one kernel.
template <bool kToInterval>
std::tuple<at::Tensor, at::Tensor> convert_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_pair(a_in, b_in);
  const at::cuda::OptionalCUDAGuard guard(a_in.device());
  auto [a, b] = same_dense_layout(a_in, b_in);
  at::Tensor first = at::empty_like(a), second = at::empty_like(b);
  PYIBP_DISPATCH(a.scalar_type(), "pyibp_convert_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    scalar_t* fo = first.data_ptr<scalar_t>();
    scalar_t* so = second.data_ptr<scalar_t>();
    launch_pointwise(a.numel(), [=] __device__(int64_t i) {
      store(convert_at<kToInterval>(static_cast<acc_t>(ap[i]), static_cast<acc_t>(bp[i])), fo + i, so + i);
    });
  });
  return {first, second};
}

// One block per example, one warp per class j at a time, lane l summing features f = l mod 32 in
// double, then the shuffle-down tree: the order math/elision.h describes, which the CPU emulates.
template <typename scalar_t>
__global__ void margin_elision_kernel(const scalar_t* __restrict__ mu, const scalar_t* __restrict__ rad,
                                      const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                                      const int64_t* __restrict__ labels, scalar_t* __restrict__ out,
                                      int64_t F, int64_t K) {
  static_assert(kElisionLanes == 32, "one lane of a warp per partial sum");
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t y = labels[b];
  // Labels are range-checked by the Python API; a device-side assert catches the rest without
  // synchronising the stream.
  CUDA_KERNEL_ASSERT(y >= 0 && y < K);
  const scalar_t* wy = weight + y * F;
  const scalar_t* m = mu + b * F;
  const scalar_t* r = rad + b * F;
  for (int64_t j = warp; j < K; j += warps) {
    const scalar_t* wj = weight + j * F;
    double acc = 0;
    if (j != y) {
      for (int64_t f = lane; f < F; f += 32) {
        acc += elision_term(static_cast<double>(wy[f]), static_cast<double>(wj[f]), static_cast<double>(m[f]),
                            static_cast<double>(r[f]));
      }
    }
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffff, acc, offset);
    if (lane == 0) {
      out[b * K + j] = j == y ? scalar_t(0)
                              : static_cast<scalar_t>(elision_with_bias(acc, static_cast<double>(bias[y]),
                                                                        static_cast<double>(bias[j])));
    }
  }
}

at::Tensor margin_elision_cuda(const at::Tensor& mu_in, const at::Tensor& rad_in, const at::Tensor& weight_in,
                               const std::optional<at::Tensor>& bias_in, const at::Tensor& labels_in) {
  check_margin_elision(mu_in, rad_in, weight_in, bias_in, labels_in);
  const at::cuda::OptionalCUDAGuard guard(mu_in.device());
  const int64_t B = mu_in.size(0), F = mu_in.size(1), K = weight_in.size(0);
  const at::Tensor mu = mu_in.contiguous(), rad = rad_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::zeros({K}, mu.options());
  at::Tensor out = at::empty({B, K}, mu.options());
  if (B == 0 || K == 0) return out;
  PYIBP_DISPATCH(mu.scalar_type(), "pyibp_margin_elision_cuda", [&] {
    margin_elision_kernel<scalar_t><<<B, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        mu.data_ptr<scalar_t>(), rad.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
        bias.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), F, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relu_relaxation_cuda(const at::Tensor& lower_in,
                                                                    const at::Tensor& upper_in) {
  check_pair(lower_in, upper_in);
  const at::cuda::OptionalCUDAGuard guard(lower_in.device());
  auto [lower, upper] = same_dense_layout(lower_in, upper_in);
  at::Tensor lower_slope = at::empty_like(lower), upper_slope = at::empty_like(lower),
             upper_intercept = at::empty_like(lower);
  PYIBP_DISPATCH(lower.scalar_type(), "pyibp_relu_relaxation_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* l = lower.data_ptr<scalar_t>();
    const scalar_t* u = upper.data_ptr<scalar_t>();
    scalar_t* ls = lower_slope.data_ptr<scalar_t>();
    scalar_t* us = upper_slope.data_ptr<scalar_t>();
    scalar_t* ui = upper_intercept.data_ptr<scalar_t>();
    launch_pointwise(lower.numel(), [=] __device__(int64_t i) {
      const ReluRelaxation<acc_t> r = relu_relaxation_at(static_cast<acc_t>(l[i]), static_cast<acc_t>(u[i]));
      ls[i] = static_cast<scalar_t>(r.lower_slope);
      us[i] = static_cast<scalar_t>(r.upper_slope);
      ui[i] = static_cast<scalar_t>(r.upper_intercept);
    });
  });
  return {lower_slope, upper_slope, upper_intercept};
}

// The sum of v over the block's threads (blockDim.x a power of two, at most kThreads), reduced in
// shared memory in a fixed order (so the result does not depend on scheduling); valid in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t partial[kThreads];
  partial[threadIdx.x] = v;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  return partial[0];
}

// One block per (example, row) of A: the threads stride over the row, then reduce its shift.
template <typename scalar_t, typename acc_t>
__global__ void crown_relu_step_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ m,
                                       const scalar_t* __restrict__ r, scalar_t* __restrict__ out,
                                       scalar_t* __restrict__ shift, int64_t rows, int64_t n) {
  const int64_t row = blockIdx.x;
  const int64_t example = row / rows;
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t mi = static_cast<acc_t>(m[example * n + i]), ri = static_cast<acc_t>(r[example * n + i]);
    acc_t term;
    out[row * n + i] = static_cast<scalar_t>(
        crown_relu_coefficient(static_cast<acc_t>(a[row * n + i]), relu_relaxation_at(mi - ri, mi + ri), &term));
    sum += term;
  }
  const acc_t total = block_sum(sum);
  if (threadIdx.x == 0) shift[row] = static_cast<scalar_t>(total);
}

std::tuple<at::Tensor, at::Tensor> crown_relu_step_cuda(const at::Tensor& A_in, const at::Tensor& mu_in,
                                                        const at::Tensor& rad_in) {
  check_crown_relu_step(A_in, mu_in, rad_in);
  const at::cuda::OptionalCUDAGuard guard(A_in.device());
  const at::Tensor A = A_in.contiguous(), mu = mu_in.contiguous(), rad = rad_in.contiguous();
  const int64_t rows = A.size(1), n = A.size(2), blocks = A.size(0) * rows;
  at::Tensor out = at::empty_like(A), shift = at::empty({A.size(0), rows}, A.options());
  if (blocks == 0) return {out, shift};
  PYIBP_DISPATCH(A.scalar_type(), "pyibp_crown_relu_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    crown_relu_step_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        A.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(), rad.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        shift.data_ptr<scalar_t>(), rows, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> crown_relu_step_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& grad_shift_in, const at::Tensor& A_in,
    const at::Tensor& mu_in, const at::Tensor& rad_in) {
  check_crown_relu_step_backward(grad_out_in, grad_shift_in, A_in, mu_in, rad_in);
  const at::cuda::OptionalCUDAGuard guard(A_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous(), grad_shift = grad_shift_in.contiguous();
  const at::Tensor A = A_in.contiguous(), mu = mu_in.contiguous(), rad = rad_in.contiguous();
  const int64_t rows = A.size(1), n = A.size(2);
  at::Tensor grad_A = at::empty_like(A), grad_mu = at::empty_like(mu), grad_rad = at::empty_like(mu);
  PYIBP_DISPATCH(A.scalar_type(), "pyibp_crown_relu_step_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    const scalar_t* gs = grad_shift.data_ptr<scalar_t>();
    const scalar_t* a = A.data_ptr<scalar_t>();
    const scalar_t* m = mu.data_ptr<scalar_t>();
    const scalar_t* r = rad.data_ptr<scalar_t>();
    scalar_t* ga = grad_A.data_ptr<scalar_t>();
    scalar_t* gm = grad_mu.data_ptr<scalar_t>();
    scalar_t* gr = grad_rad.data_ptr<scalar_t>();
    // One thread per (example, feature), looping over the rows: consecutive threads take
    // consecutive features, so each row's loads and stores are coalesced, and the sums over rows
    // need no atomics.
    const IndexDivider feature = index_divider(n, mu.numel());
    launch_pointwise(mu.numel(), [=] __device__(int64_t k) {
      const int64_t example = feature.div(k), i = k - example * n;
      const acc_t l = static_cast<acc_t>(m[k]) - static_cast<acc_t>(r[k]);
      const acc_t u = static_cast<acc_t>(m[k]) + static_cast<acc_t>(r[k]);
      const ReluRelaxation<acc_t> rl = relu_relaxation_at(l, u);
      acc_t g_slope = 0, g_intercept = 0;
      for (int64_t row = example * rows; row < (example + 1) * rows; ++row) {
        const acc_t ai = static_cast<acc_t>(a[row * n + i]), gi = static_cast<acc_t>(g[row * n + i]);
        const acc_t gsr = static_cast<acc_t>(gs[row]);
        ga[row * n + i] = static_cast<scalar_t>(ai > acc_t(0) ? gi * rl.lower_slope
                                                              : gi * rl.upper_slope + gsr * rl.upper_intercept);
        if (ai < acc_t(0)) {
          g_slope += ai * gi;
          g_intercept += ai * gsr;
        }
      }
      acc_t g_l, g_u;
      relu_relaxation_grad(l, u, g_slope, g_intercept, &g_l, &g_u);
      gm[k] = static_cast<scalar_t>(g_l + g_u);
      gr[k] = static_cast<scalar_t>(g_u - g_l);
    });
  });
  return {grad_A, grad_mu, grad_rad};
}

// One block per (example, row) of A, as crown_relu_step_kernel, of just enough threads for short
// rows; alpha is read through its strides over the examples and rows (0 along what it shares).
template <typename scalar_t, typename acc_t>
__global__ void crown_relu_alpha_step_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ l,
                                             const scalar_t* __restrict__ u, const scalar_t* __restrict__ alpha,
                                             scalar_t* __restrict__ out, scalar_t* __restrict__ shift, int64_t rows,
                                             int64_t n, int64_t alpha_example, int64_t alpha_row) {
  const int64_t row = blockIdx.x;
  const int64_t example = row / rows;
  const scalar_t* __restrict__ al = alpha + example * alpha_example + (row - example * rows) * alpha_row;
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const ReluRelaxation<acc_t> r = relu_relaxation_alpha_at(
        static_cast<acc_t>(l[example * n + i]), static_cast<acc_t>(u[example * n + i]), static_cast<acc_t>(al[i]));
    acc_t term;
    out[row * n + i] = static_cast<scalar_t>(relu_lines_coefficient(static_cast<acc_t>(a[row * n + i]), r.lower_slope,
                                                                    r.upper_slope, r.upper_intercept, &term));
    sum += term;
  }
  const acc_t total = block_sum(sum);
  if (threadIdx.x == 0) shift[row] = static_cast<scalar_t>(total);
}

// The smallest power of two of threads, from a warp to kThreads, that covers a row of n.
inline int row_threads(int64_t n) {
  int threads = 32;
  while (threads < n && threads < kThreads) threads *= 2;
  return threads;
}

std::tuple<at::Tensor, at::Tensor> crown_relu_alpha_step_cuda(const at::Tensor& A_in, const at::Tensor& lower_in,
                                                              const at::Tensor& upper_in, const at::Tensor& alpha_in) {
  check_crown_relu_alpha_step(A_in, lower_in, upper_in, alpha_in);
  const at::cuda::OptionalCUDAGuard guard(A_in.device());
  const at::Tensor A = A_in.contiguous(), lower = lower_in.contiguous(), upper = upper_in.contiguous();
  const at::Tensor alpha = broadcast_alpha(alpha_in, A);
  const int64_t rows = A.size(1), n = A.size(2), blocks = A.size(0) * rows;
  at::Tensor out = at::empty_like(A), shift = at::empty({A.size(0), rows}, A.options());
  if (blocks == 0) return {out, shift};
  PYIBP_DISPATCH(A.scalar_type(), "pyibp_crown_relu_alpha_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    crown_relu_alpha_step_kernel<scalar_t, acc_t><<<blocks, row_threads(n), 0, c10::cuda::getCurrentCUDAStream()>>>(
        A.data_ptr<scalar_t>(), lower.data_ptr<scalar_t>(), upper.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), rows, n, alpha.stride(0), alpha.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, shift};
}

constexpr int kTileColumns = 32, kTileRowGroups = kThreads / kTileColumns;

// One block per (example, kTileColumns neurons): each warp walks 32 consecutive neurons of every
// kTileRowGroups-th row (coalesced loads and stores), and the warps' sums over the rows (upper
// slope, upper intercept, and alpha when the rows share it) meet in shared memory in a fixed
// order, so that short batches still fill the GPU and no atomics are needed. grad_alpha is
// (B, Ra, N) in opmath: per row it is written where computed.
template <typename scalar_t, typename acc_t>
__global__ void crown_relu_alpha_step_backward_kernel(
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ gs, const scalar_t* __restrict__ a,
    const scalar_t* __restrict__ l, const scalar_t* __restrict__ u, const scalar_t* __restrict__ alpha,
    scalar_t* __restrict__ ga, scalar_t* __restrict__ gl, scalar_t* __restrict__ gu, acc_t* __restrict__ galpha,
    int64_t rows, int64_t n, int64_t tiles, int64_t alpha_example, int64_t alpha_row, bool shared_alpha) {
  __shared__ acc_t partial[3][kTileRowGroups][kTileColumns];
  const int64_t example = blockIdx.x / tiles;
  const int64_t i = (blockIdx.x - example * tiles) * kTileColumns + threadIdx.x, k = example * n + i;
  const bool inside = i < n;
  const acc_t li = inside ? static_cast<acc_t>(l[k]) : acc_t(0), ui = inside ? static_cast<acc_t>(u[k]) : acc_t(0);
  acc_t sums[3] = {0, 0, 0};
  if (inside) {
    const scalar_t* __restrict__ al = alpha + example * alpha_example + i;
    for (int64_t r = threadIdx.y; r < rows; r += kTileRowGroups) {
      const int64_t e = (example * rows + r) * n + i;
      const ReluLinesGrad<acc_t> d = relu_lines_coefficient_grad(
          static_cast<acc_t>(a[e]), static_cast<acc_t>(g[e]), static_cast<acc_t>(gs[example * rows + r]),
          relu_relaxation_alpha_at(li, ui, static_cast<acc_t>(al[r * alpha_row])));
      ga[e] = static_cast<scalar_t>(d.a);
      sums[0] += d.upper_slope;
      sums[1] += d.upper_intercept;
      const acc_t d_alpha = relu_unstable(li, ui) ? d.lower_slope : acc_t(0);
      if (shared_alpha) {
        sums[2] += d_alpha;
      } else {
        galpha[e] = d_alpha;
      }
    }
  }
  for (int s = 0; s < 3; ++s) partial[s][threadIdx.y][threadIdx.x] = sums[s];
  __syncthreads();
  if (threadIdx.y != 0 || !inside) return;
  acc_t total[3] = {0, 0, 0};
  for (int y = 0; y < kTileRowGroups; ++y) {
    for (int s = 0; s < 3; ++s) total[s] += partial[s][y][threadIdx.x];
  }
  acc_t g_l, g_u;
  relu_relaxation_grad(li, ui, total[0], total[1], &g_l, &g_u);
  gl[k] = static_cast<scalar_t>(g_l);
  gu[k] = static_cast<scalar_t>(g_u);
  if (shared_alpha) galpha[k] = total[2];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crown_relu_alpha_step_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& grad_shift_in, const at::Tensor& A_in,
    const at::Tensor& lower_in, const at::Tensor& upper_in, const at::Tensor& alpha_in) {
  check_crown_relu_alpha_step_backward(grad_out_in, grad_shift_in, A_in, lower_in, upper_in, alpha_in);
  const at::cuda::OptionalCUDAGuard guard(A_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous(), grad_shift = grad_shift_in.contiguous();
  const at::Tensor A = A_in.contiguous(), lower = lower_in.contiguous(), upper = upper_in.contiguous();
  const at::Tensor alpha = broadcast_alpha(alpha_in, A);
  const int64_t rows = A.size(1), n = A.size(2), tiles = (n + kTileColumns - 1) / kTileColumns;
  const int64_t blocks = A.size(0) * tiles;
  at::Tensor grad_A = at::empty_like(A), grad_lower = at::empty_like(lower), grad_upper = at::empty_like(lower);
  at::Tensor alpha_acc = per_example_alpha_grad(alpha_in, A);
  if (blocks > 0) {
    PYIBP_DISPATCH(A.scalar_type(), "pyibp_crown_relu_alpha_step_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      crown_relu_alpha_step_backward_kernel<scalar_t, acc_t>
          <<<blocks, dim3(kTileColumns, kTileRowGroups), 0, c10::cuda::getCurrentCUDAStream()>>>(
              grad_out.data_ptr<scalar_t>(), grad_shift.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
              lower.data_ptr<scalar_t>(), upper.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
              grad_A.data_ptr<scalar_t>(), grad_lower.data_ptr<scalar_t>(), grad_upper.data_ptr<scalar_t>(),
              alpha_acc.data_ptr<acc_t>(), rows, n, tiles, alpha.stride(0), alpha.stride(1), alpha_in.size(1) == 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_A, grad_lower, grad_upper, sum_alpha_grad(alpha_acc, alpha_in)};
}

// One block per (example, row) of A, as crown_relu_step_kernel: the threads stride over the row,
// then its three sums are reduced in shared memory in a fixed order. m_in / m_out may be null.
template <typename scalar_t>
__global__ void sound_crown_relu_step_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ alpha,
                                             const scalar_t* __restrict__ sigma, const scalar_t* __restrict__ tau,
                                             const scalar_t* __restrict__ m_in, const scalar_t* __restrict__ m_out,
                                             scalar_t* __restrict__ out, scalar_t* __restrict__ shift,
                                             scalar_t* __restrict__ slack_in, scalar_t* __restrict__ slack_out,
                                             int64_t rows, int64_t n) {
  __shared__ scalar_t partial[3][kThreads];
  const int64_t row = blockIdx.x;
  const int64_t base = (row / rows) * n;
  scalar_t sums[3] = {0, 0, 0};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const scalar_t ai = a[row * n + i];
    scalar_t term;
    const scalar_t oi = relu_lines_coefficient(ai, alpha[base + i], sigma[base + i], tau[base + i], &term);
    out[row * n + i] = oi;
    sums[0] += term;
    if (m_in) sums[1] += fabs(ai) * m_in[base + i];
    if (m_out) sums[2] += fabs(oi) * m_out[base + i];
  }
  for (int k = 0; k < 3; ++k) partial[k][threadIdx.x] = sums[k];
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      for (int k = 0; k < 3; ++k) partial[k][threadIdx.x] += partial[k][threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    shift[row] = partial[0][0];
    slack_in[row] = partial[1][0];
    slack_out[row] = partial[2][0];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sound_crown_relu_step_cuda(
    const at::Tensor& A_in, const at::Tensor& alpha_in, const at::Tensor& sigma_in, const at::Tensor& tau_in,
    const std::optional<at::Tensor>& m_in_opt, const std::optional<at::Tensor>& m_out_opt) {
  check_sound_crown_relu_step(A_in, alpha_in, sigma_in, tau_in, m_in_opt, m_out_opt);
  const at::cuda::OptionalCUDAGuard guard(A_in.device());
  const at::Tensor A = A_in.contiguous(), alpha = alpha_in.contiguous(), sigma = sigma_in.contiguous(),
                   tau = tau_in.contiguous();
  const at::Tensor m_in = m_in_opt.has_value() ? m_in_opt->contiguous() : at::Tensor();
  const at::Tensor m_out = m_out_opt.has_value() ? m_out_opt->contiguous() : at::Tensor();
  const int64_t rows = A.size(1), n = A.size(2), blocks = A.size(0) * rows;
  at::Tensor out = at::empty_like(A), shift = at::empty({A.size(0), rows}, A.options());
  at::Tensor slack_in = at::empty_like(shift), slack_out = at::empty_like(shift);
  if (blocks == 0) return {out, shift, slack_in, slack_out};
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "pyibp_sound_crown_relu_step_cuda", [&] {
    sound_crown_relu_step_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        A.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(), sigma.data_ptr<scalar_t>(), tau.data_ptr<scalar_t>(),
        m_in.defined() ? m_in.data_ptr<scalar_t>() : nullptr, m_out.defined() ? m_out.data_ptr<scalar_t>() : nullptr,
        out.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), slack_in.data_ptr<scalar_t>(),
        slack_out.data_ptr<scalar_t>(), rows, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, shift, slack_in, slack_out};
}

// A thread whose mu + rad is not finite clears its example's flag; every such thread stores the same
// value, so the stores need no atomics. mu/rad and mu_out/rad_out may be the same tensors (in place).
at::Tensor sound_relu_into(const at::Tensor& mu, const at::Tensor& rad, at::Tensor& mu_out, at::Tensor& rad_out) {
  const int64_t batch = mu.size(0), n = mu.numel();
  at::Tensor finite = at::ones({batch}, mu.options().dtype(at::kBool));
  if (n == 0) return finite;
  const IndexDivider example = index_divider(n / batch, n);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "pyibp_sound_relu_cuda", [&] {
    const scalar_t* m = mu.data_ptr<scalar_t>();
    const scalar_t* r = rad.data_ptr<scalar_t>();
    scalar_t* mo = mu_out.data_ptr<scalar_t>();
    scalar_t* ro = rad_out.data_ptr<scalar_t>();
    bool* ok = finite.data_ptr<bool>();
    launch_pointwise(n, [=] __device__(int64_t i) {
      const scalar_t mi = m[i], ri = r[i];
      const Box<scalar_t> b = sound_relu_box_at(mi, ri);
      mo[i] = b.first;
      ro[i] = b.second;
      if (!finite_at(mi + ri)) ok[example.div(i)] = false;
    });
  });
  return finite;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sound_relu_cuda(const at::Tensor& mu_in, const at::Tensor& rad_in) {
  check_sound_pair(mu_in, rad_in, "sound_relu");
  const at::cuda::OptionalCUDAGuard guard(mu_in.device());
  auto [mu, rad] = same_dense_layout(mu_in, rad_in);
  at::Tensor mu_out = at::empty_like(mu), rad_out = at::empty_like(rad);
  at::Tensor finite = sound_relu_into(mu, rad, mu_out, rad_out);
  return {mu_out, rad_out, finite};
}

at::Tensor sound_relu_inplace_cuda(at::Tensor& mu, at::Tensor& rad) {
  check_sound_relu_inplace(mu, rad);
  const at::cuda::OptionalCUDAGuard guard(mu.device());
  return sound_relu_into(mu, rad, mu, rad);
}

at::Tensor sound_radius_operand_cuda(const at::Tensor& mu_in, const at::Tensor& rad_in, double c) {
  check_sound_radius_operand(mu_in, rad_in, c);
  const at::cuda::OptionalCUDAGuard guard(mu_in.device());
  auto [mu, rad] = same_dense_layout(mu_in, rad_in);
  at::Tensor out = at::empty_like(rad);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "pyibp_sound_radius_operand_cuda", [&] {
    const scalar_t* m = mu.data_ptr<scalar_t>();
    const scalar_t* r = rad.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t ct = round_up_to<scalar_t>(c);
    launch_pointwise(mu.numel(), [=] __device__(int64_t i) { o[i] = sound_operand_at(m[i], r[i], ct); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyibp, CUDA, m) {
  m.impl("input_box", &input_box_cuda);
  m.impl("interval_linear", &interval_linear_cuda);
  m.impl("interval_conv2d", &interval_conv2d_cuda);
  m.impl("interval_relu", &interval_relu_cuda);
  m.impl("interval_relu_backward", &interval_relu_backward_cuda);
  m.impl("interval_affine", &interval_affine_cuda);
  m.impl("center_to_interval", &convert_cuda<true>);
  m.impl("interval_to_center", &convert_cuda<false>);
  m.impl("margin_elision", &margin_elision_cuda);
  m.impl("relu_relaxation", &relu_relaxation_cuda);
  m.impl("crown_relu_step", &crown_relu_step_cuda);
  m.impl("crown_relu_step_backward", &crown_relu_step_backward_cuda);
  m.impl("crown_relu_alpha_step", &crown_relu_alpha_step_cuda);
  m.impl("crown_relu_alpha_step_backward", &crown_relu_alpha_step_backward_cuda);
  m.impl("sound_crown_relu_step", &sound_crown_relu_step_cuda);
  m.impl("sound_relu", &sound_relu_cuda);
  m.impl("sound_relu_", &sound_relu_inplace_cuda);
  m.impl("sound_radius_operand", &sound_radius_operand_cuda);
}

}  // namespace pyibp
