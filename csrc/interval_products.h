// The parts of the interval operators that are the same on every device: argument checks and
// the two matrix products of centre-radius IBP, which go to the vendor libraries (oneDNN/MKL on
// the CPU, cuDNN/cuBLAS on CUDA). Each backend fuses what comes after them in its own kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>

#include <limits>

#include "checks.h"

namespace pyibp {

inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// t itself when dense (row-major, or channels_last for 4-d), else a row-major copy.
inline at::Tensor dense(const at::Tensor& t) {
  return t.is_contiguous() || is_channels_last(t) ? t : t.contiguous();
}

// t in the dense layout of `like` (row-major, or channels_last when like is), copied only if needed.
inline at::Tensor dense_like(const at::Tensor& t, const at::Tensor& like) {
  return is_channels_last(like) ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

// Gives a and b one dense layout (row-major, or channels_last for 4-d), so that kernels can walk
// both with one linear index; a channel's index then follows from the layout alone.
inline std::pair<at::Tensor, at::Tensor> same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_contiguous() && b.is_contiguous()) return {a, b};
  if (is_channels_last(a) && is_channels_last(b)) return {a, b};
  return {a.contiguous(), b.contiguous()};
}

inline void check_pair(const at::Tensor& mu, const at::Tensor& rad) {
  PYIBP_CHECK_FLOAT(mu);
  PYIBP_CHECK_SAME_SHAPE(mu, rad);
  PYIBP_CHECK_SAME_DTYPE(mu, rad);
  PYIBP_CHECK_SAME_DEVICE(mu, rad);
}

inline void check_weights(const at::Tensor& mu, const at::Tensor& weight, const at::Tensor& abs_weight,
                          const std::optional<at::Tensor>& bias) {
  PYIBP_CHECK_SAME_SHAPE(weight, abs_weight);
  PYIBP_CHECK_SAME_DTYPE(mu, weight);
  PYIBP_CHECK_SAME_DTYPE(mu, abs_weight);
  PYIBP_CHECK_SAME_DEVICE(mu, weight);
  PYIBP_CHECK_SAME_DEVICE(mu, abs_weight);
  if (bias.has_value()) {
    PYIBP_CHECK_SAME_DTYPE(mu, bias.value());
    PYIBP_CHECK_SAME_DEVICE(mu, bias.value());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
  }
}

inline void check_input_box(const at::Tensor& x, const at::Tensor& eps, double lower, double upper) {
  PYIBP_CHECK_FLOAT(x);
  TORCH_CHECK(x.dim() >= 1, "x must have a batch dimension, got a 0-d tensor");
  PYIBP_CHECK_PER_EXAMPLE(eps, x.size(0));
  TORCH_CHECK(lower <= upper, "lower (", lower, ") must be <= upper (", upper, ")");
}

inline void check_relu_backward(const at::Tensor& grad_mu, const at::Tensor& grad_rad, const at::Tensor& out_mu,
                                const at::Tensor& out_rad) {
  check_pair(out_mu, out_rad);
  check_pair(grad_mu, grad_rad);
  PYIBP_CHECK_SAME_SHAPE(grad_mu, out_mu);
  PYIBP_CHECK_SAME_DTYPE(grad_mu, out_mu);
  PYIBP_CHECK_SAME_DEVICE(grad_mu, out_mu);
}

inline void check_crown_relu_step(const at::Tensor& A, const at::Tensor& mu, const at::Tensor& rad) {
  check_pair(mu, rad);
  PYIBP_CHECK_DIM(A, 3);
  PYIBP_CHECK_DIM(mu, 2);
  PYIBP_CHECK_SAME_DTYPE(A, mu);
  PYIBP_CHECK_SAME_DEVICE(A, mu);
  TORCH_CHECK(A.size(0) == mu.size(0) && A.size(2) == mu.size(1), "A must have shape (B, R, N) = (",
              mu.size(0), ", R, ", mu.size(1), ") to match mu (B, N), got ", A.sizes());
}

inline void check_crown_relu_step_backward(const at::Tensor& grad_out, const at::Tensor& grad_shift,
                                           const at::Tensor& A, const at::Tensor& mu, const at::Tensor& rad) {
  check_crown_relu_step(A, mu, rad);
  PYIBP_CHECK_SAME_SHAPE(grad_out, A);
  PYIBP_CHECK_SAME_DTYPE(grad_out, A);
  PYIBP_CHECK_SAME_DTYPE(grad_shift, A);
  PYIBP_CHECK_SAME_DEVICE(grad_out, A);
  PYIBP_CHECK_SAME_DEVICE(grad_shift, A);
  TORCH_CHECK(grad_shift.dim() == 2 && grad_shift.size(0) == A.size(0) && grad_shift.size(1) == A.size(1),
              "grad_shift must have shape (", A.size(0), ", ", A.size(1), "), got ", grad_shift.sizes());
}

// A (B, R, N); the pre-activation bounds lower, upper (B, N); the lower slopes alpha (Ba, Ra, N) with
// Ba in {1, B} and Ra in {1, R} (shared over the examples or the rows when 1); one dtype, one device.
inline void check_crown_relu_alpha_step(const at::Tensor& A, const at::Tensor& lower, const at::Tensor& upper,
                                        const at::Tensor& alpha) {
  PYIBP_CHECK_FLOAT(A);
  PYIBP_CHECK_DIM(A, 3);
  PYIBP_CHECK_DIM(lower, 2);
  PYIBP_CHECK_DIM(alpha, 3);
  PYIBP_CHECK_SAME_SHAPE(lower, upper);
  const auto like_A = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == A.scalar_type(), name, " must have A's dtype ", A.scalar_type(), ", got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == A.device(), name, " must be on A's device ", A.device(), ", got ", t.device());
  };
  like_A(lower, "lower");
  like_A(upper, "upper");
  like_A(alpha, "alpha");
  const int64_t B = A.size(0), R = A.size(1), N = A.size(2);
  TORCH_CHECK(lower.size(0) == B && lower.size(1) == N, "lower and upper must have shape (B, N) = (", B, ", ", N,
              ") to match A ", A.sizes(), ", got ", lower.sizes());
  TORCH_CHECK((alpha.size(0) == B || alpha.size(0) == 1) && (alpha.size(1) == R || alpha.size(1) == 1) &&
                  alpha.size(2) == N,
              "alpha must have shape (B or 1, R or 1, N) = (", B, " or 1, ", R, " or 1, ", N, ") to match A ",
              A.sizes(), ", got ", alpha.sizes());
}

inline void check_crown_relu_alpha_step_backward(const at::Tensor& grad_out, const at::Tensor& grad_shift,
                                                 const at::Tensor& A, const at::Tensor& lower,
                                                 const at::Tensor& upper, const at::Tensor& alpha) {
  check_crown_relu_alpha_step(A, lower, upper, alpha);
  PYIBP_CHECK_SAME_SHAPE(grad_out, A);
  PYIBP_CHECK_SAME_DTYPE(grad_out, A);
  PYIBP_CHECK_SAME_DTYPE(grad_shift, A);
  PYIBP_CHECK_SAME_DEVICE(grad_out, A);
  PYIBP_CHECK_SAME_DEVICE(grad_shift, A);
  TORCH_CHECK(grad_shift.dim() == 2 && grad_shift.size(0) == A.size(0) && grad_shift.size(1) == A.size(1),
              "grad_shift must have shape (", A.size(0), ", ", A.size(1), "), got ", grad_shift.sizes());
}

// alpha (Ba, Ra, N) as a view of A's shape (B, R, N): its stride is 0 along a dimension it shares.
inline at::Tensor broadcast_alpha(const at::Tensor& alpha, const at::Tensor& A) {
  return alpha.contiguous().expand_as(A);
}

// The buffer of the alpha step's backward for alpha's gradient: one (Ra, N) per example of A, in
// opmath (B, Ra, N); sum_alpha_grad then sums it over the examples when alpha shares them.
inline at::Tensor per_example_alpha_grad(const at::Tensor& alpha, const at::Tensor& A) {
  return at::empty({A.size(0), alpha.size(1), A.size(2)}, A.options().dtype(at::toOpMathType(A.scalar_type())));
}

inline at::Tensor sum_alpha_grad(const at::Tensor& per_example, const at::Tensor& alpha) {
  const at::Tensor total = alpha.size(0) == per_example.size(0) ? per_example : per_example.sum(0, /*keepdim=*/true);
  return total.to(alpha.scalar_type());
}

// A (B, R, N); the lines alpha, sigma, tau and the optional error weights m_in, m_out (B, N), all
// float32 or float64 (the error model of sound CROWN covers those two), on one device.
inline void check_sound_crown_relu_step(const at::Tensor& A, const at::Tensor& alpha, const at::Tensor& sigma,
                                        const at::Tensor& tau, const std::optional<at::Tensor>& m_in,
                                        const std::optional<at::Tensor>& m_out) {
  PYIBP_CHECK_DIM(A, 3);
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "sound_crown_relu_step computes in float32 or float64, got A of dtype ", A.scalar_type());
  const auto per_feature = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == A.scalar_type(), name, " must have A's dtype ", A.scalar_type(), ", got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == A.device(), name, " must be on A's device ", A.device(), ", got ", t.device());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == A.size(0) && t.size(1) == A.size(2), name,
                " must have shape (B, N) = (", A.size(0), ", ", A.size(2), ") to match A ", A.sizes(), ", got ",
                t.sizes());
  };
  per_feature(alpha, "alpha");
  per_feature(sigma, "sigma");
  per_feature(tau, "tau");
  if (m_in.has_value()) per_feature(*m_in, "m_in");
  if (m_out.has_value()) per_feature(*m_out, "m_out");
}

// A box (mu, rad) of the sound mode: float32 or float64 (its error model covers those two), (B, ...).
inline void check_sound_pair(const at::Tensor& mu, const at::Tensor& rad, const char* op) {
  check_pair(mu, rad);
  TORCH_CHECK(mu.scalar_type() == at::kFloat || mu.scalar_type() == at::kDouble, op,
              " computes in float32 or float64, got mu of dtype ", mu.scalar_type());
  TORCH_CHECK(mu.dim() >= 1, op, " needs a batch dimension: mu must have shape (B, ...), got ", mu.sizes());
}

// In place, the pair must share a dense layout (row-major or channels-last) and not overlap.
inline void check_sound_relu_inplace(const at::Tensor& mu, const at::Tensor& rad) {
  check_sound_pair(mu, rad, "sound_relu_");
  const bool dense = (mu.is_contiguous() && rad.is_contiguous()) || (is_channels_last(mu) && is_channels_last(rad));
  TORCH_CHECK(dense, "sound_relu_ writes in place: mu and rad must both be row-major or both channels-last, got "
              "strides ", mu.strides(), " and ", rad.strides());
  TORCH_CHECK(at::get_overlap_status(mu, rad) == at::MemOverlapStatus::No,
              "sound_relu_ writes in place: mu and rad must not share memory");
}

inline void check_sound_radius_operand(const at::Tensor& mu, const at::Tensor& rad, double c) {
  check_sound_pair(mu, rad, "sound_radius_operand");
  TORCH_CHECK(c >= 0 && c < std::numeric_limits<double>::infinity(),
              "sound_radius_operand needs a finite error factor c >= 0, got ", c);
}

inline void check_affine(const at::Tensor& mu, const at::Tensor& rad, const at::Tensor& scale,
                         const at::Tensor& shift) {
  check_pair(mu, rad);
  TORCH_CHECK(mu.dim() >= 2, "mu must have shape (B, C, ...), got ", mu.sizes());
  const int64_t channels = mu.size(1);
  TORCH_CHECK(scale.numel() == channels && shift.numel() == channels, "scale and shift must hold one "
              "value per channel (", channels, "), got ", scale.sizes(), " and ", shift.sizes());
  PYIBP_CHECK_FLOAT(scale);
  PYIBP_CHECK_FLOAT(shift);
  PYIBP_CHECK_SAME_DEVICE(mu, scale);
  PYIBP_CHECK_SAME_DEVICE(mu, shift);
}

inline void check_margin_elision(const at::Tensor& mu, const at::Tensor& rad, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& labels) {
  check_pair(mu, rad);
  PYIBP_CHECK_DIM(mu, 2);
  PYIBP_CHECK_DIM(weight, 2);
  PYIBP_CHECK_SAME_DTYPE(mu, weight);
  PYIBP_CHECK_SAME_DEVICE(mu, weight);
  PYIBP_CHECK_SAME_DEVICE(mu, labels);
  TORCH_CHECK(mu.size(1) == weight.size(1), "mu has ", mu.size(1), " features but weight expects ",
              weight.size(1));
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == mu.size(0), "labels must have shape (", mu.size(0),
              ",), got ", labels.sizes());
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false), "labels must be integers, got ",
              labels.scalar_type());
  if (bias.has_value()) {
    PYIBP_CHECK_SAME_DTYPE(mu, bias.value());
    PYIBP_CHECK_SAME_DEVICE(mu, bias.value());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (",
                weight.size(0), ",) to match weight ", weight.sizes(), ", got ", bias->sizes());
  }
}

// mu' = mu W^T (+ b when add_bias), rad' = rad |W|^T.
inline std::pair<at::Tensor, at::Tensor> linear_products(const at::Tensor& mu, const at::Tensor& rad,
                                                         const at::Tensor& weight,
                                                         const at::Tensor& abs_weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         bool add_bias) {
  check_pair(mu, rad);
  PYIBP_CHECK_DIM(mu, 2);
  PYIBP_CHECK_DIM(weight, 2);
  check_weights(mu, weight, abs_weight, bias);
  TORCH_CHECK(mu.size(1) == weight.size(1), "mu has ", mu.size(1), " features but weight expects ",
              weight.size(1), " (weight shape ", weight.sizes(), ")");
  at::Tensor mu_out = add_bias && bias.has_value() ? at::addmm(*bias, mu, weight.t())
                                                   : at::mm(mu, weight.t());
  return {mu_out, at::mm(rad, abs_weight.t())};
}

inline std::pair<at::Tensor, at::Tensor> conv2d_products(
    const at::Tensor& mu, const at::Tensor& rad, const at::Tensor& weight, const at::Tensor& abs_weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool add_bias) {
  check_pair(mu, rad);
  PYIBP_CHECK_DIM(mu, 4);
  PYIBP_CHECK_DIM(weight, 4);
  check_weights(mu, weight, abs_weight, bias);
  TORCH_CHECK(groups >= 1 && mu.size(1) == weight.size(1) * groups, "mu has ", mu.size(1),
              " channels but weight ", weight.sizes(), " with groups=", groups, " expects ",
              weight.size(1) * groups);
  const std::optional<at::Tensor> no_bias;
  const std::vector<int64_t> no_output_padding{0, 0};
  at::Tensor mu_out = at::convolution(mu, weight, add_bias ? bias : no_bias, stride, padding, dilation,
                                      false, no_output_padding, groups);
  at::Tensor rad_out = at::convolution(rad, abs_weight, no_bias, stride, padding, dilation, false,
                                       no_output_padding, groups);
  return {mu_out, rad_out};
}

}  // namespace pyibp
