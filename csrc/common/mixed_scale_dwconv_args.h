// Host-side pieces of the mixed-scale depthwise op shared by its CPU and CUDA launchers: the
// argument checks (the Python wrapper checks the same with friendlier messages; these guard
// direct calls of torch.ops.sparse_attn.*), and the table in which both backwards write their
// per-tile weight and bias gradient partials.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>

namespace sparse_attn {
namespace msdw {

// The CUDA kernels' tile (one thread block per batch, channel and tile). Here, not in the .cu
// file, because its grid limits (tiles down the image, B * 2h, each below 65536) are checked in
// Python before dispatch, which reads these through the `encoding` op.
constexpr int kCudaTileH = 16;
constexpr int kCudaTileW = 32;
constexpr int64_t kCudaGridLimit = 65536;  // gridDim.y and gridDim.z are below this

inline void check_args(const at::Tensor& x, const at::Tensor& w3, const at::Tensor& w5, const at::Tensor& w3_1,
                       const at::Tensor& w5_1, std::initializer_list<std::optional<at::Tensor>> biases) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) % 2 == 0, "x: expected (B, 2h, H, W), got ", x.sizes());
  const int64_t c = x.size(1), h = c / 2;
  TORCH_CHECK(w3.numel() == c * 9 && w5.numel() == c * 25 && w3_1.numel() == h * 18 && w5_1.numel() == h * 50,
              "w3, w5, w3_1, w5_1: expected (2h,1,3,3), (2h,1,5,5), (h,2,3,3), (h,2,5,5) for 2h = ", c);
  for (const at::Tensor* t : {&w3, &w5, &w3_1, &w5_1}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "every weight must have x's dtype and device");
  }
  for (const auto& b : biases) {
    if (!b.has_value()) continue;
    TORCH_CHECK(b->numel() == c || b->numel() == h, "a bias has ", b->numel(), " values for 2h = ", c);
    TORCH_CHECK(b->scalar_type() == x.scalar_type() && b->device() == x.device(),
                "every bias must have x's dtype and device");
  }
}

inline std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

template <typename T>
const T* pointer_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// The op's tensors, checked and contiguous, as the kernels index them. grad_out (in x's dtype)
// and out are set for the backward only, which takes no second-stage biases. (On CUDA, make the
// device guard before calling these: contiguous() may allocate.)
struct Operands {
  at::Tensor x, w3, w5, w3_1, w5_1;
  std::optional<at::Tensor> b3, b5, b3_1, b5_1;
  at::Tensor grad_out, out;
};

inline Operands forward_operands(const at::Tensor& x, const at::Tensor& w3, const at::Tensor& w5,
                                 const at::Tensor& w3_1, const at::Tensor& w5_1, const std::optional<at::Tensor>& b3,
                                 const std::optional<at::Tensor>& b5, const std::optional<at::Tensor>& b3_1,
                                 const std::optional<at::Tensor>& b5_1) {
  check_args(x, w3, w5, w3_1, w5_1, {b3, b5, b3_1, b5_1});
  return {x.contiguous(),          w3.contiguous(),         w5.contiguous(),           w3_1.contiguous(),
          w5_1.contiguous(),       contiguous_or_none(b3),  contiguous_or_none(b5),    contiguous_or_none(b3_1),
          contiguous_or_none(b5_1), at::Tensor(),           at::Tensor()};
}

inline Operands backward_operands(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
                                  const at::Tensor& w3, const at::Tensor& w5, const at::Tensor& w3_1,
                                  const at::Tensor& w5_1, const std::optional<at::Tensor>& b3,
                                  const std::optional<at::Tensor>& b5) {
  TORCH_CHECK(grad_out.sizes() == x.sizes() && out.sizes() == x.sizes(),
              "mixed_scale_dwconv_backward: grad_out and out must have x's shape");
  Operands o = forward_operands(x, w3, w5, w3_1, w5_1, b3, b5, std::nullopt, std::nullopt);
  o.grad_out = grad_out.to(x.scalar_type()).contiguous();
  o.out = out.contiguous();
  return o;
}

// Where each parameter's gradient lives in a row of the partial-sum table (one row per
// (batch, tile); every entry of a row is written by exactly one task).
struct GradLayout {
  int64_t w3, w5, w3_1, w5_1, b3, b5, b3_1, b5_1, total;
  explicit GradLayout(int64_t hidden) {
    const int64_t c = 2 * hidden;
    w3 = 0;
    w5 = w3 + c * 9;
    w3_1 = w5 + c * 25;
    w5_1 = w3_1 + hidden * 2 * 9;
    b3 = w5_1 + hidden * 2 * 25;
    b5 = b3 + c;
    b3_1 = b5 + c;
    b5_1 = b3_1 + hidden;
    total = b5_1 + hidden;
  }

  // The summed table (total,) as the eight gradients w3, w5, w3_1, w5_1, b3, b5, b3_1, b5_1.
  std::array<at::Tensor, 8> split(const at::Tensor& summed, const at::Tensor& x) const {
    const at::Tensor g = summed.to(x.scalar_type());
    const int64_t c = x.size(1), h = c / 2;
    auto part = [&](int64_t offset, int64_t count, at::IntArrayRef shape) {
      return g.narrow(0, offset, count).reshape(shape).clone();
    };
    return {part(w3, c * 9, {c, 1, 3, 3}), part(w5, c * 25, {c, 1, 5, 5}),
            part(w3_1, h * 18, {h, 2, 3, 3}), part(w5_1, h * 50, {h, 2, 5, 5}),
            part(b3, c, {c}), part(b5, c, {c}), part(b3_1, h, {h}), part(b5_1, h, {h})};
  }
};

using BackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline BackwardResult backward_result(const at::Tensor& grad_x, const std::array<at::Tensor, 8>& p) {
  return {grad_x, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
}

}  // namespace msdw
}  // namespace sparse_attn
