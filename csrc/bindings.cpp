// Every op schema of the `harmonica` namespace, defined once. Device kernels live in
// cpu/*.cpp and cuda/*.cu (one TORCH_LIBRARY_IMPL per device file).
#include <Python.h>
#include <torch/library.h>

// `import harmonica_kernels._C` only has to run the static registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(harmonica, m) {
  // out = x + gate * cache   (reuse path; gate None = plain residual)
  m.def("cached_gated_residual(Tensor x, Tensor? gate, Tensor cache) -> Tensor");
  // out = x + gate * branch; cache[:] = branch   (compute path, one pass)
  m.def("gated_residual_update_(Tensor x, Tensor? gate, Tensor branch, Tensor(a!) cache) -> Tensor");
  // out = x + gate * (r * branch + (1 - r) * cache)   (training blend; r a 1-element tensor)
  m.def("routed_gated_residual(Tensor x, Tensor? gate, Tensor branch, Tensor cache, Tensor r) -> Tensor");
  // Gradients of routed_gated_residual w.r.t. (branch, gate, r); grad_x is grad_out itself.
  // grad_gate is an empty tensor when gate is None.
  m.def(
      "routed_gated_residual_backward(Tensor grad_out, Tensor? gate, Tensor branch, Tensor cache, "
      "Tensor r) -> (Tensor, Tensor, Tensor)");
  // x_out = x + gate * (reuse ? cache : y), cache[:] = y when given and not reuse;
  // h = LayerNorm(x_out) * (1 + scale) + shift
  m.def(
      "gated_residual_norm_modulate(Tensor x, Tensor? gate, Tensor? y, Tensor shift, Tensor scale, "
      "float eps, Tensor(a!)? cache, bool reuse) -> (Tensor, Tensor)");
  // Forecast read: out = x + gate * (c0 + a (c0 - c1) + b (c0 - 2 c1 + c2)), (a, b) = coeffs, an fp32
  // [2] tensor on x's device read by the kernel (no host sync). c1 = c2 = None: plain reuse
  // (coeffs ignored); c2 = None: first order. c0/c1/c2 share one float dtype, x's or another.
  m.def(
      "forecast_gated_residual(Tensor x, Tensor? gate, Tensor c0, Tensor? c1, Tensor? c2, Tensor? coeffs) "
      "-> Tensor");
  // x_out = the forecast read above; h = LayerNorm(x_out) * (1 + scale) + shift
  m.def(
      "forecast_residual_norm_modulate(Tensor x, Tensor? gate, Tensor c0, Tensor? c1, Tensor? c2, "
      "Tensor? coeffs, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor)");
}
