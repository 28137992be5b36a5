// CPU implementation of sp_kernels::shard_pad.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "sp_kernels/index_math.h"
#include "shard_pad/shard_pad.h"

namespace sp_kernels {

namespace {

template <typename T>
void fill_units(uint8_t* dst, int64_t count, const std::array<uint8_t, 16>& pattern) {
  T value;
  std::memcpy(&value, pattern.data(), sizeof(T));
  std::fill_n(reinterpret_cast<T*>(dst), count, value);
}

void fill_pad(uint8_t* dst, int64_t count, int64_t elem_size, const std::array<uint8_t, 16>& pattern) {
  switch (elem_size) {
    case 1:
      std::memset(dst, pattern[0], static_cast<size_t>(count));
      break;
    case 2:
      fill_units<uint16_t>(dst, count, pattern);
      break;
    case 4:
      fill_units<uint32_t>(dst, count, pattern);
      break;
    case 8:
      fill_units<uint64_t>(dst, count, pattern);
      break;
    default:
      TORCH_CHECK(false, "shard_pad: unexpected element size ", elem_size);
  }
}

}  // namespace

at::Tensor shard_pad_cpu(const at::Tensor& x, int64_t dim, int64_t start, int64_t length, double pad_value) {
  TORCH_CHECK(x.device().is_cpu(), "shard_pad (CPU kernel): x must be a CPU tensor, got ", x.device());
  ShardPadArgs args = prepare_shard_pad(x, dim, start, length, pad_value);
  const auto g = make_shard_pad_geometry<int64_t>(args.outer, args.n, args.length, args.inner, args.start);
  const int64_t total = shard_pad_output_numel(g);
  if (total == 0) {
    return args.out;
  }
  const int64_t es = args.elem_size;
  const auto* src = static_cast<const uint8_t*>(args.src.const_data_ptr());
  auto* dst = static_cast<uint8_t*>(args.out.mutable_data_ptr());
  const auto& pattern = args.pad_pattern;
  // About 256 KiB per task: large enough to amortise scheduling, small enough to split a single
  // outer slice across threads (B=1 is the common case, so parallelising over outer alone would not).
  const int64_t grain = std::max<int64_t>(1, (int64_t{256} << 10) / es);
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    // Walk whole runs: each is one memcpy or one fill, so narrow rows (small inner) cost no per-row call.
    int64_t e = begin;
    while (e < end) {
      const int64_t run = std::min(shard_pad_run_length(g, e), end - e);
      const int64_t s = shard_pad_source_index(g, e);
      if (s >= 0) {
        std::memcpy(dst + e * es, src + s * es, static_cast<size_t>(run * es));
      } else {
        fill_pad(dst + e * es, run, es, pattern);
      }
      e += run;
    }
  });
  return args.out;
}

TORCH_LIBRARY_IMPL(sp_kernels, CPU, m) {
  m.impl("shard_pad", &shard_pad_cpu);
}

}  // namespace sp_kernels
