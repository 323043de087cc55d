// Host-side pieces of the gated depthwise op shared by its CPU and CUDA launchers: the argument
// checks (the Python wrapper checks the same with friendlier messages; these guard direct calls
// of torch.ops.sparse_attn.*), the operands, and the table in which both backwards write their
// per-tile parameter gradient partials.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/gated_dwconv.h"
#include "common/mixed_scale_dwconv_args.h"  // contiguous_or_none, pointer_or_null

namespace sparse_attn {
namespace gdw {

using msdw::contiguous_or_none;
using msdw::pointer_or_null;

// The CUDA kernels' tile (pixels per thread block) and the bound of their one-dimensional grids;
// Python's limit check reads them through the `encoding` op.
constexpr int kCudaTileH = 16;
constexpr int kCudaTileW = 32;
constexpr int64_t kCudaGridLimit = int64_t(1) << 31;

inline void check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       int64_t act, const std::optional<at::Tensor>& activation_weight) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) % 2 == 0, "x: expected (B, 2h, H, W), got ", x.sizes());
  const int64_t c = x.size(1);
  TORCH_CHECK(weight.numel() == c * 9, "weight: expected (2h, 1, 3, 3) for 2h = ", c);
  TORCH_CHECK(!bias.has_value() || bias->numel() == c, "bias: expected ", c, " values");
  TORCH_CHECK(act >= 0 && act < kActivations, "activation: unknown code ", act);
  TORCH_CHECK(act != kPrelu || (activation_weight.has_value() && activation_weight->numel() == 1),
              "activation_weight: prelu needs one slope");
  for (const auto& t : {std::optional<at::Tensor>(weight), bias, activation_weight}) {
    if (!t.has_value()) continue;
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "every parameter must have x's dtype and device");
  }
}

// The op's tensors, checked and contiguous; grad_out (in x's dtype) is set for the backward only.
// (On CUDA, make the device guard before calling these.)
struct Operands {
  at::Tensor x, weight;
  std::optional<at::Tensor> bias, activation_weight;
  at::Tensor grad_out;
};

inline Operands forward_operands(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 int64_t act, const std::optional<at::Tensor>& activation_weight) {
  check_args(x, weight, bias, act, activation_weight);
  return {x.contiguous(), weight.contiguous(), contiguous_or_none(bias), contiguous_or_none(activation_weight),
          at::Tensor()};
}

inline Operands backward_operands(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, int64_t act,
                                  const std::optional<at::Tensor>& activation_weight) {
  TORCH_CHECK(grad_out.size(0) == x.size(0) && grad_out.size(1) * 2 == x.size(1) && grad_out.size(2) == x.size(2) &&
                  grad_out.size(3) == x.size(3),
              "gated_dwconv_backward: grad_out must be (B, h, H, W) for x (B, 2h, H, W)");
  Operands o = forward_operands(x, weight, bias, act, activation_weight);
  o.grad_out = grad_out.to(x.scalar_type()).contiguous();
  return o;
}

template <typename T>
T slope_of(const Operands& o) {
  return o.activation_weight.has_value() ? o.activation_weight->const_data_ptr<T>()[0] : T(0);
}

// Where each parameter's gradient lives in a row of the partial-sum table (one row per
// (batch, tile); group g's task writes the entries of channels g and h + g and slope entry g).
// Its one source is GATED_GRAD_LAYOUT in sparse_attn/encodings.py (the Triton launcher reads it).
struct GradLayout {
  int64_t weight, bias, slope, total;
  explicit GradLayout(int64_t hidden) : weight(0), bias(18 * hidden), slope(20 * hidden), total(21 * hidden) {}

  // The summed table (total,) as the gradients of weight (2h,1,3,3), bias (2h,), slope (1,).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> split(const at::Tensor& summed, const at::Tensor& x) const {
    const at::Tensor g = summed.to(x.scalar_type());
    const int64_t c = x.size(1), h = c / 2;
    return {g.narrow(0, weight, c * 9).reshape({c, 1, 3, 3}).clone(), g.narrow(0, bias, c).clone(),
            summed.narrow(0, slope, h).sum().reshape({1}).to(x.scalar_type())};
  }
};

using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

}  // namespace gdw
}  // namespace sparse_attn
