// Every operator schema of pyibp, and the stub that makes `import pyibp._C` load this library.
// Kernels register themselves per backend at the end of csrc/cpu/*.cpp and csrc/cuda/*.cu;
// autograd formulas and fake (meta) implementations live beside the wrappers in pyibp/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pyibp, m) {
  // (mu, rad) of the box x ± eps intersected with [lower, upper]; eps is per example (B,) or one value.
  m.def("input_box(Tensor x, Tensor eps, float lower, float upper) -> (Tensor, Tensor)");
  // mu' = W mu + b, rad' = |W| rad; with relu=True the interval ReLU is applied in the same epilogue.
  m.def("interval_linear(Tensor mu, Tensor rad, Tensor weight, Tensor abs_weight, Tensor? bias, "
        "bool relu) -> (Tensor, Tensor)");
  m.def("interval_conv2d(Tensor mu, Tensor rad, Tensor weight, Tensor abs_weight, Tensor? bias, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> (Tensor, Tensor)");
  m.def("interval_relu(Tensor mu, Tensor rad) -> (Tensor, Tensor)");
  // Gradient of the interval ReLU given its *outputs* (the activation pattern is recoverable from them).
  m.def("interval_relu_backward(Tensor grad_mu, Tensor grad_rad, Tensor out_mu, Tensor out_rad) "
        "-> (Tensor, Tensor)");
  // Per-channel (dim 1) affine map: mu' = mu * scale + shift, rad' = rad * |scale|.
  m.def("interval_affine(Tensor mu, Tensor rad, Tensor scale, Tensor shift) -> (Tensor, Tensor)");
  m.def("center_to_interval(Tensor mu, Tensor rad) -> (Tensor, Tensor)");
  m.def("interval_to_center(Tensor lower, Tensor upper) -> (Tensor, Tensor)");
  // Lower bounds of logit_y - logit_j through the last Linear, without forming C W.
  m.def("margin_elision(Tensor mu, Tensor rad, Tensor weight, Tensor? bias, Tensor labels) -> Tensor");
  // CROWN ReLU relaxation from pre-activation bounds: (lower slope, upper slope, upper intercept).
  m.def("relu_relaxation(Tensor lower, Tensor upper) -> (Tensor, Tensor, Tensor)");
  // One CROWN step back through a ReLU whose pre-activation box is (mu, rad), (B, N): for the R
  // rows of A (B, R, N), A+ * lower_slope + A- * upper_slope and the shift sum_n A- * upper_intercept
  // (B, R), with the relaxation computed on the fly. The backward returns (grad_A, grad_mu, grad_rad).
  m.def("crown_relu_step(Tensor A, Tensor mu, Tensor rad) -> (Tensor, Tensor)");
  m.def("crown_relu_step_backward(Tensor grad_out, Tensor grad_shift, Tensor A, Tensor mu, Tensor rad) "
        "-> (Tensor, Tensor, Tensor)");
  // The same step with given lower slopes (alpha-CROWN): pre-activation bounds lower, upper (B, N)
  // and the slopes alpha (Ba, Ra, N), Ba in {1, B}, Ra in {1, R}, used on unstable neurons only
  // (1 and 0 elsewhere). The backward returns (grad_A, grad_lower, grad_upper, grad_alpha), the last
  // summed over what alpha shares.
  m.def("crown_relu_alpha_step(Tensor A, Tensor lower, Tensor upper, Tensor alpha) -> (Tensor, Tensor)");
  m.def("crown_relu_alpha_step_backward(Tensor grad_out, Tensor grad_shift, Tensor A, Tensor lower, "
        "Tensor upper, Tensor alpha) -> (Tensor, Tensor, Tensor, Tensor)");
  // One sound CROWN step back through ReLUs with the lines alpha z <= relu(z) <= sigma z + tau
  // (B, N), rounded outward by the caller: A' = A+ alpha + A- sigma (B, R, N) and per row the sums
  // (B, R) of A- tau, of |A| m_in and of |A'| m_out (the error weights of the coefficients before
  // and after the step; 0 when omitted), each over N terms of one sign, in the dtype's arithmetic.
  m.def("sound_crown_relu_step(Tensor A, Tensor alpha, Tensor sigma, Tensor tau, Tensor? m_in, "
        "Tensor? m_out) -> (Tensor, Tensor, Tensor, Tensor)");
  // The sound interval ReLU (csrc/math/sound.h), rounded outward, and per example (B,) whether
  // every value of the input box is finite (an overflowed centre voids the example's bounds).
  m.def("sound_relu(Tensor mu, Tensor rad) -> (Tensor, Tensor, Tensor)");
  m.def("sound_relu_(Tensor(a!) mu, Tensor(b!) rad) -> Tensor");
  // rad + c |mu|, the radius operand of a sound product (c rounded up into the dtype).
  m.def("sound_radius_operand(Tensor mu, Tensor rad, float c) -> Tensor");
  // In-place PGD updates, projected onto the eps-ball around x and the domain [lower, upper].
  m.def("pgd_linf_step_(Tensor(a!) delta, Tensor grad, Tensor x, Tensor eps, Tensor alpha, "
        "float lower, float upper) -> ()");
  m.def("pgd_l2_step_(Tensor(a!) delta, Tensor grad, Tensor x, Tensor eps, Tensor alpha, "
        "float lower, float upper) -> ()");
  // In-place APGD updates (Croce & Hein 2020): delta <- P(delta + momentum (z - delta) + (1 - momentum)
  // (delta - previous)) with z = P(delta + step * direction(grad)), P the projection onto the eps-ball
  // and the domain [lower, upper] (tensors: one value or one per element of x); previous <- delta.
  m.def("apgd_linf_step_(Tensor(a!) delta, Tensor(b!) previous, Tensor grad, Tensor x, Tensor eps, "
        "Tensor step, float momentum, Tensor lower, Tensor upper) -> ()");
  m.def("apgd_l2_step_(Tensor(a!) delta, Tensor(b!) previous, Tensor grad, Tensor x, Tensor eps, "
        "Tensor step, float momentum, Tensor lower, Tensor upper) -> ()");
}
