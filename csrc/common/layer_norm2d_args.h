// Host-side pieces of the channel LayerNorm shared by its CPU and CUDA launchers: the argument
// checks (the Python wrapper checks the same with friendlier messages; these guard direct calls
// of torch.ops.sparse_attn.*) and the operands, checked and contiguous.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "common/mixed_scale_dwconv_args.h"  // contiguous_or_none, pointer_or_null

namespace sparse_attn {
namespace ln2d {

using msdw::contiguous_or_none;
using msdw::pointer_or_null;

// The statistics' dtype: float32 for float32 inputs, float64 for float64.
inline at::ScalarType stats_dtype(const at::Tensor& x) { return x.scalar_type(); }

inline void check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 4, "x: expected (B, C, H, W), got ", x.sizes());
  const int64_t c = x.size(1);
  TORCH_CHECK(weight.numel() == c, "weight: expected ", c, " values, got ", weight.numel());
  TORCH_CHECK(!bias.has_value() || bias->numel() == c, "bias: expected ", c, " values");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              "weight must have x's dtype and device");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == x.scalar_type() && bias->device() == x.device()),
              "bias must have x's dtype and device");
}

// The op's tensors, checked and contiguous. grad_out (in x's dtype), mean and rstd are set for
// the backward only. (On CUDA, make the device guard before calling these.)
struct Operands {
  at::Tensor x, weight;
  std::optional<at::Tensor> bias;
  at::Tensor grad_out, mean, rstd;
};

inline Operands forward_operands(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_args(x, weight, bias);
  return {x.contiguous(), weight.contiguous(), contiguous_or_none(bias), at::Tensor(), at::Tensor(), at::Tensor()};
}

inline Operands backward_operands(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                  const at::Tensor& rstd) {
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "layer_norm2d_backward: grad_out must have x's shape");
  Operands o = forward_operands(x, weight, bias);
  const int64_t pixels = x.size(0) * x.size(2) * x.size(3);
  TORCH_CHECK(mean.numel() == pixels && rstd.numel() == pixels,
              "layer_norm2d_backward: mean and rstd must hold one value per pixel (B, H, W)");
  TORCH_CHECK(mean.scalar_type() == stats_dtype(x) && rstd.scalar_type() == stats_dtype(x),
              "layer_norm2d_backward: mean and rstd must have x's dtype");
  o.grad_out = grad_out.to(x.scalar_type()).contiguous();
  o.mean = mean.contiguous();
  o.rstd = rstd.contiguous();
  return o;
}

}  // namespace ln2d
}  // namespace sparse_attn
