// Per-row math of the LSE merge, shared by the CPU and CUDA kernels (compiled by both compilers), so
// the CPU tests exercise the arithmetic the GPU executes. Semantics follow sp_kernels/attn/merge.py:
//   lse = hi + log1p(exp(lo - hi)),  w_i = exp(lse_i - lse),  out = sum_i w_i * out_i   (fp32)
// and a row whose parts are all -inf (no keys anywhere) gets lse = -inf and every weight 0, so its
// output is 0 and never NaN.
#pragma once

#include <cmath>
#include <cstdint>

#include "sp_kernels/index_math.h"

// Unrolling keeps per-row arrays indexed by loop counters in registers on the GPU (no local memory).
#if defined(__CUDA_ARCH__)
#define SP_MERGE_UNROLL _Pragma("unroll")
#else
#define SP_MERGE_UNROLL
#endif

namespace sp_kernels {

// Largest W one launch of the W-way kernel merges; the host folds larger W in chunks. Eight keeps the
// per-thread lse values in registers (fully unrolled loops) and covers common ring degrees.
constexpr int kMergeMaxWays = 8;

SP_HOST_DEVICE float merge_neg_inf() {
  return -INFINITY;
}

// Weight of a part with log-sum-exp lse_i in a total lse_total; 0 when the total is empty (-inf),
// where exp(-inf - -inf) would be NaN.
SP_HOST_DEVICE float merge_weight(float lse_i, float lse_total) {
  return lse_total == -INFINITY ? 0.0f : expf(lse_i - lse_total);
}

// lse of two parts in the log1p form: no exp of a large number, exact when one part is empty.
SP_HOST_DEVICE float merge_lse2(float lse_a, float lse_b) {
  const float hi = lse_a > lse_b ? lse_a : lse_b;
  const float lo = lse_a > lse_b ? lse_b : lse_a;
  if (hi == -INFINITY) {
    return -INFINITY;
  }
  return hi + log1pf(expf(lo - hi));
}

struct MergePair {
  float lse;  // merged log-sum-exp
  float w_a;  // weight of the running accumulator
  float w_b;  // weight of the block
};

SP_HOST_DEVICE MergePair merge_pair(float lse_a, float lse_b) {
  MergePair p;
  p.lse = merge_lse2(lse_a, lse_b);
  p.w_a = merge_weight(lse_a, p.lse);
  p.w_b = merge_weight(lse_b, p.lse);
  return p;
}

// W-way lse, numerically stable: max first, then log1p of the sum of the other terms, so that for
// W = 2 this is bit-identical to merge_lse2 (the largest term contributes exactly 1, kept out of the
// sum so a tiny remainder is not rounded away by 1 + x). `lse_at(i)` returns part i's value.
template <typename Get>
SP_HOST_DEVICE float merge_lse_n(int ways, Get lse_at) {
  float hi = lse_at(0);
  int arg = 0;
  SP_MERGE_UNROLL
  for (int i = 1; i < ways; ++i) {
    const float x = lse_at(i);
    if (x > hi) {
      hi = x;
      arg = i;
    }
  }
  if (hi == -INFINITY) {
    return -INFINITY;
  }
  float rest = 0.0f;
  SP_MERGE_UNROLL
  for (int i = 0; i < ways; ++i) {
    if (i != arg) {
      rest += expf(lse_at(i) - hi);
    }
  }
  return hi + log1pf(rest);
}

// Row geometry of [B, S, H, D] outputs and [B, H, S] lse with arbitrary strides over B, S, H (D has
// stride 1). Rows are enumerated in (b, s, h) order, h fastest, so consecutive rows of a contiguous
// [B, S, H, D] tensor are consecutive in memory. I is the row index type (int32 on the GPU when the
// row count fits: 64-bit division is emulated there).
template <typename I>
struct MergeRow {
  I b;
  I s;
  I h;
};

template <typename I>
SP_HOST_DEVICE MergeRow<I> merge_row(I row, I S, I H) {
  MergeRow<I> r;
  r.h = row % H;
  const I bs = row / H;
  r.s = bs % S;
  r.b = bs / S;
  return r;
}

struct MergeStrides {
  int64_t b;
  int64_t s;
  int64_t h;
};

template <typename I>
SP_HOST_DEVICE int64_t merge_out_offset(const MergeRow<I>& r, const MergeStrides& st) {
  return static_cast<int64_t>(r.b) * st.b + static_cast<int64_t>(r.s) * st.s + static_cast<int64_t>(r.h) * st.h;
}

// lse strides are given in the out's (b, s, h) naming: for a [B, H, S] tensor, st.s = stride(2), st.h = stride(1).
template <typename I>
SP_HOST_DEVICE int64_t merge_lse_offset(const MergeRow<I>& r, const MergeStrides& st) {
  return merge_out_offset(r, st);
}

}  // namespace sp_kernels
