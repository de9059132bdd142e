// The parts of the interval operators that are the same on every device: argument checks and
// the two matrix products of centre-radius IBP, which go to the vendor libraries (oneDNN/MKL on
// the CPU, cuDNN/cuBLAS on CUDA). Each backend fuses what comes after them in its own kernels.
#pragma once
#include <ATen/ATen.h>

#include "checks.h"

namespace pyibp {

inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
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
