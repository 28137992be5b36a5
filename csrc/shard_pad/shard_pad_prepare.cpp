#include "shard_pad/shard_pad.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/TypeCast.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "sp_kernels/index_math.h"

namespace sp_kernels {

namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
    case at::kDouble:
    case at::kHalf:
    case at::kBFloat16:
    case at::kByte:
    case at::kChar:
    case at::kShort:
    case at::kInt:
    case at::kLong:
    case at::kBool:
      return true;
    default:
      return false;
  }
}

template <typename T>
void fill_pattern(std::array<uint8_t, 16>& pattern, T value) {
  for (size_t offset = 0; offset < pattern.size(); offset += sizeof(T)) {
    std::memcpy(pattern.data() + offset, &value, sizeof(T));
  }
}

std::array<uint8_t, 16> encode_pad(at::ScalarType dtype, double pad_value) {
  std::array<uint8_t, 16> pattern{};
  if (dtype == at::kBool) {
    TORCH_CHECK(pad_value == 0.0 || pad_value == 1.0, "shard_pad: pad_value must be 0 or 1 for dtype bool, got ",
                pad_value);
    fill_pattern<bool>(pattern, pad_value != 0.0);
    return pattern;
  }
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "shard_pad", [&] {
    if constexpr (std::is_integral_v<scalar_t>) {
      // An integer output cannot hold a fraction or a value out of range; truncating or wrapping
      // silently would hide a caller bug. The same check and message as the Python face.
      const auto lo = static_cast<int64_t>(std::numeric_limits<scalar_t>::min());
      const auto hi = static_cast<int64_t>(std::numeric_limits<scalar_t>::max());
      TORCH_CHECK(std::isfinite(pad_value) && std::trunc(pad_value) == pad_value &&
                      pad_value >= static_cast<double>(lo) && pad_value <= static_cast<double>(hi),
                  "shard_pad: pad_value must be an integer in [", lo, ", ", hi, "] for dtype ", dtype, ", got ",
                  pad_value);
    }
    // checked_convert also guards the conversion itself (floating dtypes: overflow to inf).
    fill_pattern<scalar_t>(pattern, c10::checked_convert<scalar_t, double>(pad_value, c10::toString(dtype)));
  });
  return pattern;
}

}  // namespace

ShardPadArgs prepare_shard_pad(const at::Tensor& x, int64_t dim, int64_t start, int64_t length, double pad_value) {
  TORCH_CHECK(x.dim() > 0, "shard_pad: x must have at least one dimension, got a 0-dim tensor");
  const int64_t ndim = x.dim();
  TORCH_CHECK(dim >= -ndim && dim < ndim, "shard_pad: dim must be in [", -ndim, ", ", ndim, ") for x of shape ",
              x.sizes(), ", got ", dim);
  if (dim < 0) {
    dim += ndim;
  }
  TORCH_CHECK(start >= 0, "shard_pad: start must be >= 0, got ", start);
  TORCH_CHECK(length >= 0, "shard_pad: length must be >= 0, got ", length);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(is_supported_dtype(dtype), "shard_pad: unsupported dtype ", dtype,
              " for x (supported: float32, float64, float16, bfloat16, int8, uint8, int16, int32, int64, bool)");

  ShardPadArgs args;
  args.pad_pattern = encode_pad(dtype, pad_value);
  args.elem_size = static_cast<int64_t>(x.element_size());

  const int64_t n = x.size(dim);
  const int64_t n_valid = shard_pad_valid_rows<int64_t>(n, start, length);
  if (x.is_contiguous()) {
    args.src = x;
    args.n = n;
    args.start = start;
  } else {
    // Only the shard's rows are made contiguous, not all of x: one extra pass over what is needed.
    args.src = x.narrow(dim, std::min(start, n), n_valid).contiguous();
    args.n = n_valid;
    args.start = 0;
  }

  auto out_sizes = x.sizes().vec();
  out_sizes[dim] = length;
  args.out = at::empty(out_sizes, x.options().memory_format(at::MemoryFormat::Contiguous));
  args.length = length;
  args.outer = 1;
  for (int64_t d = 0; d < dim; ++d) {
    args.outer *= x.size(d);
  }
  args.inner = 1;
  for (int64_t d = dim + 1; d < ndim; ++d) {
    args.inner *= x.size(d);
  }
  return args;
}

}  // namespace sp_kernels
