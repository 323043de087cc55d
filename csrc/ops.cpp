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

  // Mixed-scale depthwise core of DRSformer's MSFN (DESIGN.md §2). x: (B, 2h, H, W); w3: (2h,1,3,3),
  // w5: (2h,1,5,5), w3_1: (h,2,3,3), w5_1: (h,2,5,5); biases (2h,) / (h,) or None.
  // The backward recomputes the first stage from x; `out` gives the second stage's relu mask. It
  // returns the gradients of x, w3, w5, w3_1, w5_1, b3, b5, b3_1, b5_1 (bias gradients always).
  m.def(
      "mixed_scale_dwconv_forward(Tensor x, Tensor w3, Tensor w5, Tensor w3_1, Tensor w5_1, "
      "Tensor? b3, Tensor? b5, Tensor? b3_1, Tensor? b5_1) -> Tensor");
  m.def(
      "mixed_scale_dwconv_backward(Tensor grad_out, Tensor x, Tensor out, Tensor w3, Tensor w5, "
      "Tensor w3_1, Tensor w5_1, Tensor? b3, Tensor? b5) "
      "-> (Tensor grad_x, Tensor grad_w3, Tensor grad_w5, Tensor grad_w3_1, Tensor grad_w5_1, "
      "Tensor grad_b3, Tensor grad_b5, Tensor grad_b3_1, Tensor grad_b5_1)");

  // Channel LayerNorm of the Restormer family (DESIGN.md §5). x: (B, C, H, W); weight, bias: (C,);
  // with a bias it centres x (WithBias), without it divides x itself (BiasFree). Besides `out` it
  // returns what backward needs: the per-pixel mean and 1/sqrt(var + eps), (B, H, W) in x's dtype.
  // The backward returns the gradients of x, weight and bias (the bias gradient always).
  m.def("layer_norm2d_forward(Tensor x, Tensor weight, Tensor? bias, float eps) "
        "-> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor mean, Tensor rstd) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");

  // Gated depthwise core of Restormer's GDFN (DESIGN.md §5). x: (B, 2h, H, W); weight: (2h,1,3,3);
  // bias: (2h,) or None; activation: 0 = gelu, 1 = prelu, 2 = relu2, 3 = identity
  // (sparse_attn/encodings.py GATE_ACTIVATION_CODES); activation_weight: prelu's slope (1,).
  // out: (B, h, H, W). The backward recomputes z from x and returns the gradients of x, weight,
  // bias and activation_weight (the last two always).
  m.def("gated_dwconv_forward(Tensor x, Tensor weight, Tensor? bias, int activation, "
        "Tensor? activation_weight) -> Tensor");
  m.def(
      "gated_dwconv_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, int activation, "
      "Tensor? activation_weight) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_activation_weight)");

  // Depthwise convolution with zero "same" padding and stride 1 (DESIGN.md §5): the 3x3 on q, k, v
  // of the channel attentions, MEFC's depthwise experts. x: (B, C, H, W); weight: (C, 1, K, K), K one
  // of 1, 3, 5, 7; bias: (C,) or None; dilation >= 1, padding dilation·(K - 1)/2. The backward
  // returns the gradients of x, weight and bias (the bias gradient always).
  m.def("depthwise_conv2d_forward(Tensor x, Tensor weight, Tensor? bias, int dilation) -> Tensor");
  m.def(
      "depthwise_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, int dilation) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");

  // Patch attention, PANet's pyramid attention core (DESIGN.md §3). q: (B, Cq, H, W); keys[l]:
  // (B, Cq, H_l, W_l), values[l]: (B, Cv, H_l, W_l); topk: 0 (every key) or 1..M. Besides `out`
  // (B, Cv, H, W) it returns what backward needs, in the accumulation dtype: the key inverse norms
  // (B, M), each query's log-sum-exp (B, N), and its top-k threshold (the t-th largest score) and
  // the last key index kept at that score (int64; with topk = 0: -inf and M - 1).
  m.def(
      "patch_attention_forward(Tensor q, Tensor[] keys, Tensor[] values, float scale, int topk, float key_eps) "
      "-> (Tensor out, Tensor key_inverse_norm, Tensor lse, Tensor threshold, Tensor last_kept)");
  m.def(
      "patch_attention_backward(Tensor grad_out, Tensor q, Tensor[] keys, Tensor[] values, "
      "Tensor key_inverse_norm, Tensor lse, Tensor threshold, Tensor last_kept, float scale, int topk, "
      "float key_eps) -> (Tensor grad_q, Tensor[] grad_keys, Tensor[] grad_values)");

  // Block-sparse region attention (DESIGN.md §4). q, k, v: (B, heads, d, H, W), H and W multiples of
  // the region; key_blocks: (B, heads, R, t) int64, the key regions (row-major p_h x p_w tiles) each
  // query region reads. Besides `out` it returns what backward needs: the log-sum-exp of every
  // query pixel's scores, (B, heads, H, W) in the accumulation dtype (float64 for float64, else
  // float32). The backward returns the gradients of q, k and v.
  m.def(
      "block_sparse_attention_forward(Tensor q, Tensor k, Tensor v, Tensor key_blocks, int region_h, "
      "int region_w, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "block_sparse_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor key_blocks, int region_h, int region_w, float scale) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // The constants the kernels and the Python side share, for the tests to compare (csrc/encodings.cpp).
  m.def("encoding(str name, int size) -> int[]");
}
