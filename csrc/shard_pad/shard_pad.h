// Host-side contract of sp_kernels::shard_pad, shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>

namespace sp_kernels {

// Everything a backend needs to run shard_pad, decided once so both backends agree on validation,
// output allocation and pad encoding. Sizes are in elements.
struct ShardPadArgs {
  at::Tensor src;    // contiguous; may be a narrowed copy of x when x was not contiguous
  at::Tensor out;    // freshly allocated contiguous output
  int64_t outer = 0;
  int64_t n = 0;      // src size along dim
  int64_t length = 0;
  int64_t inner = 0;  // elements per row
  int64_t start = 0;  // first src row of the shard
  int64_t elem_size = 0;
  // pad_value encoded in x's dtype and repeated over 16 bytes: a kernel that copies units of any
  // power-of-two size between elem_size and 16 bytes takes its pad unit from the front.
  std::array<uint8_t, 16> pad_pattern{};
};

// Validates the arguments (TORCH_CHECK messages name the argument) and allocates the output.
ShardPadArgs prepare_shard_pad(const at::Tensor& x, int64_t dim, int64_t start, int64_t length, double pad_value);

at::Tensor shard_pad_cpu(const at::Tensor& x, int64_t dim, int64_t start, int64_t length, double pad_value);
at::Tensor shard_pad_cuda(const at::Tensor& x, int64_t dim, int64_t start, int64_t length, double pad_value);

}  // namespace sp_kernels
