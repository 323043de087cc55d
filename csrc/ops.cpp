// The op schemas of sparse_attn._C, and nothing else: the CPU and CUDA kernels register their
// implementations in csrc/cpu and csrc/cuda; fake implementations and autograd formulas are
// registered from Python (sparse_attn/ops/).
#include <Python.h>
#include <torch/library.h>

// `import sparse_attn._C` loads this library, which runs the registrations below.
static struct PyModuleDef sparse_attn_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sparse_attn_module); }

TORCH_LIBRARY(sparse_attn, m) {
  // Top-k channel attention (DESIGN.md §1). q, k, v: (B, heads, d, N); temperature: (heads,);
  // weights: (R,); topk: R integers in 1..d; activation: R codes, 0 = softmax, 1 = relu2.
  // Besides `out` it returns what backward needs: the normalised Gram matrix q̂k̂ᵀ (B, heads, d, d)
  // and the channel norms ‖q‖, ‖k‖ (B, heads, d), all in the accumulation dtype.
  m.def(
      "sparse_channel_attention_forward(Tensor q, Tensor k, Tensor v, Tensor temperature, "
      "Tensor weights, int[] topk, int[] activation) "
      "-> (Tensor out, Tensor gram, Tensor q_norm, Tensor k_norm)");
  m.def(
      "sparse_channel_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor temperature, Tensor weights, Tensor gram, Tensor q_norm, Tensor k_norm, "
      "int[] topk, int[] activation) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_temperature, Tensor grad_weights)");
}
