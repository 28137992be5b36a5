// The CUDA pack kernels' work split, as host/device code: one output ROW (a head row of D elements, or
// pack_out's row of all hq heads) comes from one contiguous source row or is zero padding, so its
// source is worked out once per row, and the threads sharing the row then move several vectors each
// with no index arithmetic in between.
//
// `row_copy_thread` is the whole body of the kernel for one thread of the grid. It is compiled by
// nvcc for csrc/pack/pack_cuda.cu and by the host compiler for csrc/tests/test_pack_rows.cpp, which runs
// it for every thread of several grids on the CPU and compares with the CPU ops: the GPU's loop and
// index math are exercised without a GPU.
//
// Thread layout: 2^tpr_log2 consecutive threads share a row ("tpr": threads per row, at most a warp);
// lane l moves units l, l + tpr, l + 2 tpr, ... of it, so at every step the row's lanes touch one
// contiguous stretch (16 lanes x 16 bytes = 256 bytes: whole sectors). Up to kMaxUpt units per lane
// are loaded before the first store (memory-level parallelism); longer rows loop over chunks.
#pragma once

#include <cstdint>

#include "sp_kernels/index_math.h"
#include "pack/pack_index.h"

namespace sp_kernels {

constexpr int kMaxUpt = 8;  // units per lane per chunk: 8 x 16 B = 128 B in flight per thread

struct RowCopyShape {
  int64_t rows = 0;
  int64_t row_units = 0;
  int tpr_log2 = 0;
};

// Threads per row: enough that each lane moves about kMaxUpt units, at most a warp.
inline RowCopyShape row_copy_shape(int64_t rows, int64_t row_units) {
  RowCopyShape s;
  s.rows = rows;
  s.row_units = row_units;
  const int64_t want = (row_units + kMaxUpt - 1) / kMaxUpt;
  while ((int64_t{1} << s.tpr_log2) < want && s.tpr_log2 < 5) {
    ++s.tpr_log2;
  }
  return s;
}

// ---- row maps: output row -> first unit of its source row, or nullptr for zero padding ----------

template <typename V, typename I>
struct PackQkvRows {  // rows: head rows (p, b, s, h) of send [P, B, S_loc, W, D]
  const V* q;
  const V* k;
  const V* v;
  PackQkvGeometry<I> g;
  KvIndexTable kv;

  SP_HOST_DEVICE I row_units() const { return g.Du; }
  SP_HOST_DEVICE const V* source(I hr) const {
    const I row = hr / g.W;
    const I h = hr - row * g.W;
    const I pb = row / g.S;
    const I s = row - pb * g.S;
    const I p = pb / g.B;
    const auto ref = pack_qkv_source(g, kv, p, pb - p * g.B, s, h);
    if (ref.which == kSrcZero) {
      return nullptr;
    }
    return (ref.which == kSrcQ ? q : (ref.which == kSrcK ? k : v)) + ref.offset;
  }
};

template <typename V, typename I>
struct UnpackQkvRows {  // rows: head rows (b, t, h) of [B, S + J, W, D]
  const V* recv;
  const V* jq;
  const V* jk;
  const V* jv;
  UnpackQkvGeometry<I> g;

  SP_HOST_DEVICE I row_units() const { return g.Du; }
  SP_HOST_DEVICE const V* source(I hr) const {
    const I row = hr / g.W;
    const I h = hr - row * g.W;
    const I rows = unpack_qkv_rows(g);
    const I b = row / rows;
    const auto ref = unpack_qkv_source(g, b, row - b * rows, h);
    return (ref.which == kSrcSeq ? recv : (ref.which == kSrcQ ? jq : (ref.which == kSrcK ? jk : jv))) + ref.offset;
  }
};

template <typename V, typename I>
struct PackOutRows {  // rows: (p, b, t) of send [P, B, J + S_loc, hq, D], all hq heads at once
  const V* seq;
  const V* joint;
  PackOutGeometry<I> g;

  SP_HOST_DEVICE I row_units() const { return g.hq * g.Du; }
  SP_HOST_DEVICE const V* source(I row) const {
    const I rows = pack_out_rows(g);
    const I pb = row / rows;
    const I p = pb / g.B;
    const auto ref = pack_out_row_source(g, p, pb - p * g.B, row - pb * rows);
    if (ref.which == kSrcZero) {
      return nullptr;
    }
    return (ref.which == kSrcJoint ? joint : seq) + ref.offset;
  }
};

template <typename V, typename I>
struct UnpackOutRows {  // rows: head rows (b, t, h) of [B, R, Hq, D]
  const V* recv;
  UnpackOutGeometry<I> g;

  SP_HOST_DEVICE I row_units() const { return g.Du; }
  SP_HOST_DEVICE const V* source(I hr) const {
    const I row = hr / g.Hq;
    const I h = hr - row * g.Hq;
    const I b = row / g.R;
    return recv + unpack_out_source(g, b, row - b * g.R, h);
  }
};

// ---- the kernel body ---------------------------------------------------------------------------

// The work of grid thread `thread` of `threads`: rows thread / tpr, + threads / tpr, ... (a grid-stride
// loop, so any grid size covers every row exactly once; the host picks one that fills the GPU).
// `threads` must be a multiple of the threads per row.
template <typename V, typename I, typename Rows>
SP_HOST_DEVICE void row_copy_thread(const Rows& map, V* dst, I rows, int tpr_log2, I thread, I threads) {
  const I row_units = map.row_units();
  const I tpr = I(1) << tpr_log2;
  const I lane = thread & (tpr - 1);
  const I row_step = threads >> tpr_log2;
  const I chunk = tpr * I(kMaxUpt);
  for (I row = thread >> tpr_log2; row < rows; row += row_step) {
    const V* src = map.source(row);
    V* out = dst + row * row_units;
    for (I c0 = lane; c0 < row_units; c0 += chunk) {
      V vals[kMaxUpt];
#pragma unroll
      for (int u = 0; u < kMaxUpt; ++u) {
        const I c = c0 + I(u) * tpr;
        if (c < row_units) {
          vals[u] = src != nullptr ? src[c] : V{};
        }
      }
#pragma unroll
      for (int u = 0; u < kMaxUpt; ++u) {
        const I c = c0 + I(u) * tpr;
        if (c < row_units) {
          out[c] = vals[u];
        }
      }
    }
  }
}

}  // namespace sp_kernels
