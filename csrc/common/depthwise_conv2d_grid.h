// The depthwise convolution's CUDA grid (csrc/cuda/depthwise_conv2d.cu): the tile of lattice
// pixels a thread block covers and the bound of the one-dimensional grid. Python's limit check
// (sparse_attn/ops/depthwise_conv2d.py) reads them through the `encoding` op.
#pragma once

#include <algorithm>
#include <cstdint>

namespace sparse_attn {
namespace dwc {

constexpr int kCudaTileH = 32;
constexpr int kCudaTileW = 32;
constexpr int64_t kCudaGridLimit = int64_t(1) << 31;

// Thread blocks per (image, channel) of an H x W map: one per dilation phase that holds pixels
// (min(d, H) x min(d, W) of them) and tile of the largest phase's lattice, ceil(H/d) x ceil(W/d).
inline int64_t cuda_blocks_per_plane(int64_t height, int64_t width, int64_t dilation) {
  const int64_t lattice_h = (height + dilation - 1) / dilation, lattice_w = (width + dilation - 1) / dilation;
  return std::min(dilation, height) * std::min(dilation, width) * ((lattice_h + kCudaTileH - 1) / kCudaTileH) *
         ((lattice_w + kCudaTileW - 1) / kCudaTileW);
}

}  // namespace dwc
}  // namespace sparse_attn
