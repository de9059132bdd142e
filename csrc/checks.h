// Argument checks whose messages name the argument and say what was expected.
#pragma once
#include <torch/types.h>

#include <string>

namespace pyibp {
// Messages use the operator's schema names. Kernels keep a raw argument as `name_in` when they
// work on a converted copy `name`, and optional arguments are spelled `name.value()`, so those
// suffixes are dropped here.
inline std::string arg(const char* expr) {
  std::string s(expr);
  for (const std::string suffix : {".value()", "_in"}) {
    if (s.size() > suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0) {
      s.resize(s.size() - suffix.size());
    }
  }
  return s;
}
}  // namespace pyibp

#define PYIBP_CHECK_FLOAT(x)                                                                 \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()), pyibp::arg(#x),                       \
              " must be a floating-point tensor, got ", (x).scalar_type())
#define PYIBP_CHECK_SAME_SHAPE(a, b)                                                         \
  TORCH_CHECK((a).sizes() == (b).sizes(), pyibp::arg(#a), " and ", pyibp::arg(#b),         \
              " must have the same shape, got ", (a).sizes(), " and ", (b).sizes())
#define PYIBP_CHECK_SAME_DTYPE(a, b)                                                         \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), pyibp::arg(#a), " and ",             \
              pyibp::arg(#b), " must have the same dtype, got ", (a).scalar_type(), " and ", \
              (b).scalar_type())
#define PYIBP_CHECK_SAME_DEVICE(a, b)                                                        \
  TORCH_CHECK((a).device() == (b).device(), pyibp::arg(#a), " and ", pyibp::arg(#b),       \
              " must be on the same device, got ", (a).device(), " and ", (b).device())
#define PYIBP_CHECK_DIM(x, d)                                                                \
  TORCH_CHECK((x).dim() == (d), pyibp::arg(#x), " must have ", d, " dimensions, got shape ", \
              (x).sizes())
// A per-example parameter: one value, or one value per example of a batch of B.
#define PYIBP_CHECK_PER_EXAMPLE(p, B)                                                        \
  TORCH_CHECK((p).numel() == 1 || ((p).dim() == 1 && (p).size(0) == (B)), pyibp::arg(#p),  \
              " must hold one value or one per example (", B, "), got shape ", (p).sizes())

namespace pyibp {

// Elements per example of a tensor whose first dimension is the batch.
inline int64_t per_example(const at::Tensor& t) {
  return t.dim() == 0 || t.size(0) == 0 ? 1 : t.numel() / t.size(0);
}

// Number of elements after dimension 1 (1 for (B, F), H*W for (B, C, H, W)).
inline int64_t inner_size(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 2; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

}  // namespace pyibp
