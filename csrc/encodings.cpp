// The constants that the C++ kernels and the Python/Triton side must agree on, read back by the
// tests (tests/test_library.py): the Python copies in sparse_attn/encodings.py are the one source
// for Python and Triton, and a test fails if this file's view of them differs.
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/depthwise_conv2d_grid.h"
#include "common/gated_dwconv.h"
#include "common/gated_dwconv_args.h"
#include "common/mixed_scale_dwconv.h"
#include "common/mixed_scale_dwconv_args.h"
#include "common/sparse_channel_attention.h"

namespace sparse_attn {
namespace {

std::vector<int64_t> encoding(c10::string_view name, int64_t size) {
  if (name == "activation_codes") return {sca::kSoftmax, sca::kRelu2};
  if (name == "mixed_scale_dwconv_grad_layout") {  // size: h
    const msdw::GradLayout g(size);
    return {g.w3, g.w5, g.w3_1, g.w5_1, g.b3, g.b5, g.b3_1, g.b5_1, g.total};
  }
  if (name == "mixed_scale_dwconv_sources") {  // size: h; (kind, channel) per (output channel, slot)
    std::vector<int64_t> table;
    for (int o = 0; o < 2 * size; ++o) {
      for (int slot = 0; slot < 2; ++slot) {
        const msdw::StageOneMap m = msdw::source_of(o, slot, static_cast<int>(size));
        const msdw::StageTwoSlot back = msdw::consumer_of(m.kind, m.channel, static_cast<int>(size));
        TORCH_CHECK(back.out_channel == o && back.slot == slot, "consumer_of is not the inverse of source_of");
        table.push_back(m.kind);
        table.push_back(m.channel);
      }
    }
    return table;
  }
  if (name == "gated_dwconv_activation_codes") return {gdw::kGelu, gdw::kPrelu, gdw::kRelu2, gdw::kIdentity};
  if (name == "gated_dwconv_grad_layout") {  // size: h
    const gdw::GradLayout g(size);
    return {g.weight, g.bias, g.slope, g.total};
  }
  if (name == "gated_dwconv_cuda_grid") return {gdw::kCudaTileH, gdw::kCudaTileW, gdw::kCudaGridLimit};
  if (name == "mixed_scale_dwconv_cuda_grid") return {msdw::kCudaTileH, msdw::kCudaTileW, msdw::kCudaGridLimit};
  if (name == "depthwise_conv2d_cuda_grid") return {dwc::kCudaTileH, dwc::kCudaTileW, dwc::kCudaGridLimit};
  TORCH_CHECK(false, "encoding: unknown name '", std::string(name), "'");
  return {};
}

}  // namespace
}  // namespace sparse_attn

TORCH_LIBRARY_IMPL(sparse_attn, CompositeExplicitAutograd, m) { m.impl("encoding", &sparse_attn::encoding); }
