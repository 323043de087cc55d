// Host-side pieces of block-sparse region attention shared by its CPU and CUDA launchers: the
// argument checks (the Python wrapper checks the same with friendlier messages; these guard
// direct calls of torch.ops.sparse_attn.*), the operands, checked and contiguous, and the
// inverse index that makes the backward deterministic.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/block_sparse_attention.h"

namespace sparse_attn {
namespace bsa {

// The accumulation dtype, also the log-sum-exp's: float64 for float64 inputs, else float32.
inline at::ScalarType accumulation_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The op's tensors, checked and contiguous, and their sizes. groups = B·heads; q, k, v are
// (groups, d, H·W) in memory; key_blocks is (groups, R, t). grad_out, out and lse are set for the
// backward only. (On CUDA, make the device guard before calling these.)
struct Operands {
  at::Tensor q, k, v, key_blocks;
  RegionGeometry geometry;
  int64_t groups, d, t;
  at::Tensor grad_out, out, lse;
  int64_t plane() const { return geometry.height * geometry.width; }
};

inline Operands forward_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& key_blocks, int64_t region_h, int64_t region_w) {
  TORCH_CHECK(q.dim() == 5, "q: expected (B, heads, d, H, W), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "k, v: expected the shape of q ", q.sizes(),
              ", got ", k.sizes(), " and ", v.sizes());
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device() == q.device(),
                "k, v: expected q's dtype and device");
  }
  TORCH_CHECK(region_h >= 1 && region_w >= 1, "region: expected positive sizes, got ", region_h, " x ", region_w);
  const RegionGeometry geometry{q.size(3), q.size(4), region_h, region_w};
  TORCH_CHECK(geometry.height % region_h == 0 && geometry.width % region_w == 0, "q: H x W = ", geometry.height,
              " x ", geometry.width, " must be multiples of the region ", region_h, " x ", region_w);
  const int64_t groups = q.size(0) * q.size(1), regions = geometry.regions();
  TORCH_CHECK(key_blocks.scalar_type() == at::kLong && key_blocks.device() == q.device(),
              "key_blocks: expected int64 on q's device");
  TORCH_CHECK(key_blocks.dim() == 4 && key_blocks.size(0) == q.size(0) && key_blocks.size(1) == q.size(1) &&
                  key_blocks.size(2) == regions && key_blocks.size(3) >= 1 && key_blocks.size(3) <= regions,
              "key_blocks: expected (B, heads, R, t) with R = ", regions, " and 1 <= t <= R, got ",
              key_blocks.sizes());
  return {q.contiguous(), k.contiguous(), v.contiguous(), key_blocks.contiguous(), geometry, groups, q.size(2),
          key_blocks.size(3), at::Tensor(), at::Tensor(), at::Tensor()};
}

inline Operands backward_operands(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                  const at::Tensor& key_blocks, int64_t region_h, int64_t region_w) {
  Operands o = forward_operands(q, k, v, key_blocks, region_h, region_w);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "block_sparse_attention_backward: grad_out and out must have q's shape");
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "block_sparse_attention_backward: out must have q's dtype");
  TORCH_CHECK(lse.numel() == o.groups * o.plane() && lse.scalar_type() == accumulation_dtype(q),
              "block_sparse_attention_backward: lse must hold one value per pixel (B, heads, H, W) in ",
              accumulation_dtype(q));
  o.grad_out = grad_out.to(q.scalar_type()).contiguous();
  o.out = out.contiguous();
  o.lse = lse.contiguous();
  return o;
}

// For every (group g, key region s), the query regions that read s, ascending:
// readers[offsets[g·R + s] .. offsets[g·R + s + 1]). A stable sort of the flat indices keeps
// every list in query-region order, so the sums over it have one order on every run.
struct InverseIndex {
  at::Tensor offsets, readers;  // int64: (groups·R + 1,), (groups·R·t,)
};

inline InverseIndex inverse_index(const at::Tensor& key_blocks, int64_t groups, int64_t regions, int64_t t) {
  const at::Tensor group_base = at::arange(groups, key_blocks.options()).mul_(regions).view({groups, 1});
  const at::Tensor keys = (key_blocks.view({groups, regions * t}) + group_base).view({-1});
  const at::Tensor order = std::get<1>(at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor readers = order.remainder(regions * t).div_(t, "floor");
  const at::Tensor counts = at::bincount(keys, {}, groups * regions);
  const at::Tensor offsets = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)});
  return {offsets.contiguous(), readers.contiguous()};
}

}  // namespace bsa
}  // namespace sparse_attn
