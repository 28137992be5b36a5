// CUDA implementation of sp_kernels::shard_pad: one pass, each output byte written once and each
// needed input byte read once, in 16-byte units whenever the row size and pointers allow.
#include <ATen/ATen.h>
// c10 stream/guard headers, not ATen/cuda/CUDAContext.h: that one pulls in cuSPARSE/cuBLAS headers,
// which minimal CUDA toolkits (like the one CI builds against) do not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>

#include "sp_kernels/index_math.h"
#include "shard_pad/shard_pad.h"

namespace sp_kernels {

namespace {

constexpr int kThreads = 256;
// Units per thread: independent loads in flight before the first store, which a copy kernel needs
// to approach DRAM bandwidth.
constexpr int kUnroll = 4;
constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kUnroll;

template <typename V, typename I>
__global__ void __launch_bounds__(kThreads) shard_pad_kernel(const V* __restrict__ src, V* __restrict__ dst,
                                                             ShardPadGeometry<I> g, V pad, I total) {
  const I base = static_cast<I>(blockIdx.x) * static_cast<I>(kTile) + static_cast<I>(threadIdx.x);
  V values[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const I e = base + static_cast<I>(u * kThreads);
    values[u] = pad;
    if (e < total) {
      const I s = shard_pad_source_index(g, e);
      if (s >= 0) {
        values[u] = src[s];
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const I e = base + static_cast<I>(u * kThreads);
    if (e < total) {
      dst[e] = values[u];
    }
  }
}

template <typename V>
void launch_units(const ShardPadArgs& args, int64_t unit_bytes, cudaStream_t stream) {
  static_assert(sizeof(V) <= 16, "pad pattern holds 16 bytes");
  V pad;
  std::memcpy(&pad, args.pad_pattern.data(), sizeof(V));
  const int64_t inner_units = args.inner * args.elem_size / unit_bytes;
  const int64_t total = args.outer * args.length * inner_units;
  const int64_t blocks = (total + kTile - 1) / kTile;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "shard_pad: output too large (", total, " units)");
  const auto* src = static_cast<const V*>(args.src.const_data_ptr());
  auto* dst = static_cast<V*>(args.out.mutable_data_ptr());
  // 32-bit indices whenever every index the kernel forms (up to blocks * kTile and the source
  // extent) fits: 64-bit division is emulated on the GPU and would dominate a copy kernel.
  const int64_t src_units = args.src.numel() * args.elem_size / unit_bytes;
  const int64_t largest = std::max(blocks * kTile, src_units);
  if (largest < std::numeric_limits<int32_t>::max()) {
    const auto g = make_shard_pad_geometry<int32_t>(static_cast<int32_t>(args.outer), static_cast<int32_t>(args.n),
                                                    static_cast<int32_t>(args.length),
                                                    static_cast<int32_t>(inner_units),
                                                    static_cast<int32_t>(args.start));
    shard_pad_kernel<V, int32_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        src, dst, g, pad, static_cast<int32_t>(total));
  } else {
    const auto g = make_shard_pad_geometry<int64_t>(args.outer, args.n, args.length, inner_units, args.start);
    shard_pad_kernel<V, int64_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(src, dst, g, pad, total);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Largest power-of-two unit (16 bytes down to one element) dividing a row and both base pointers:
// rows then start on unit boundaries in src and dst, so no unit straddles a row or the pad/copy edge.
int64_t pick_unit_bytes(const ShardPadArgs& args) {
  const int64_t row_bytes = args.inner * args.elem_size;
  const auto src_addr = reinterpret_cast<uintptr_t>(args.src.const_data_ptr());
  const auto dst_addr = reinterpret_cast<uintptr_t>(args.out.const_data_ptr());
  int64_t unit = 16;
  while (unit > args.elem_size &&
         (row_bytes % unit != 0 || src_addr % static_cast<uintptr_t>(unit) != 0 ||
          dst_addr % static_cast<uintptr_t>(unit) != 0)) {
    unit /= 2;
  }
  return unit;
}

}  // namespace

at::Tensor shard_pad_cuda(const at::Tensor& x, int64_t dim, int64_t start, int64_t length, double pad_value) {
  TORCH_CHECK(x.device().is_cuda(), "shard_pad (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  ShardPadArgs args = prepare_shard_pad(x, dim, start, length, pad_value);
  if (args.out.numel() == 0) {
    return args.out;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t unit = pick_unit_bytes(args);
  switch (unit) {
    case 16:
      launch_units<uint4>(args, unit, stream);
      break;
    case 8:
      launch_units<uint2>(args, unit, stream);
      break;
    case 4:
      launch_units<uint32_t>(args, unit, stream);
      break;
    case 2:
      launch_units<uint16_t>(args, unit, stream);
      break;
    case 1:
      launch_units<uint8_t>(args, unit, stream);
      break;
    default:
      TORCH_CHECK(false, "shard_pad: unexpected copy unit of ", unit, " bytes");
  }
  return args.out;
}

TORCH_LIBRARY_IMPL(sp_kernels, CUDA, m) {
  m.impl("shard_pad", &shard_pad_cuda);
}

}  // namespace sp_kernels
