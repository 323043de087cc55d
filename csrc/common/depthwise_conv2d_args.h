// Host-side pieces of the depthwise convolution op shared by its CPU and CUDA launchers: the
// argument checks (the Python wrapper checks the same with friendlier messages; these guard
// direct calls of torch.ops.sparse_attn.*) and the operands.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "common/depthwise_conv2d.h"
#include "common/mixed_scale_dwconv_args.h"  // contiguous_or_none, pointer_or_null

namespace sparse_attn {
namespace dwc {

using msdw::contiguous_or_none;
using msdw::pointer_or_null;

inline void check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       int64_t dilation) {
  TORCH_CHECK(x.dim() == 4, "x: expected (B, C, H, W), got ", x.sizes());
  const int64_t c = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == c && weight.size(1) == 1 && weight.size(2) == weight.size(3),
              "weight: expected (C, 1, K, K) for C = ", c, ", got ", weight.sizes());
  const int64_t k = weight.size(2);
  TORCH_CHECK(k == 1 || k == 3 || k == 5 || k == 7, "weight: the kernel size K must be 1, 3, 5 or 7, got ", k);
  TORCH_CHECK(dilation >= 1, "dilation: expected a positive integer, got ", dilation);
  TORCH_CHECK(!bias.has_value() || bias->numel() == c, "bias: expected ", c, " values");
  for (const auto& t : {std::optional<at::Tensor>(weight), bias}) {
    if (!t.has_value()) continue;
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "every parameter must have x's dtype and device");
  }
}

// The op's tensors, checked and contiguous; grad_out (in x's dtype) is set for the backward only.
// (On CUDA, make the device guard before calling these.)
struct Operands {
  at::Tensor x, weight;
  std::optional<at::Tensor> bias;
  int kernel, dilation;
  at::Tensor grad_out;
};

inline Operands forward_operands(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 int64_t dilation) {
  check_args(x, weight, bias, dilation);
  return {x.contiguous(), weight.contiguous(), contiguous_or_none(bias), static_cast<int>(weight.size(2)),
          static_cast<int>(dilation), at::Tensor()};
}

inline Operands backward_operands(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, int64_t dilation) {
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "depthwise_conv2d_backward: grad_out must have x's shape ", x.sizes(),
              ", got ", grad_out.sizes());
  Operands o = forward_operands(x, weight, bias, dilation);
  o.grad_out = grad_out.to(x.scalar_type()).contiguous();
  return o;
}

// Calls fn(std::integral_constant<int, K>) for the kernel size (checked to be 1, 3, 5 or 7).
template <typename Fn>
void with_kernel_size(int k, Fn&& fn) {
  switch (k) {
    case 1: fn(std::integral_constant<int, 1>()); break;
    case 3: fn(std::integral_constant<int, 3>()); break;
    case 5: fn(std::integral_constant<int, 5>()); break;
    default: fn(std::integral_constant<int, 7>()); break;
  }
}

using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

}  // namespace dwc
}  // namespace sparse_attn
