// Index math of the Ulysses pack/unpack family, shared by the CPU and CUDA kernels.
//
// Every function is compiled twice (host compiler for csrc/pack/pack_cpu.cpp, nvcc for
// csrc/pack/pack_cuda.cu), so the CPU tests exercise the arithmetic the GPU kernels execute.
//
// Geometry is expressed in copy UNITS: the CPU passes elements, the CUDA kernels pass vectors of up
// to 16 bytes. `Du` is the number of units in one head row (D elements); every stride below is in
// units too. A "head row" is the D contiguous elements of one (batch, token, head): the smallest
// piece any of these layouts moves, so every op maps an output head row to one source head row (or
// to zero padding), and copies it whole.
//
// Layouts (P = Ulysses group size, hq = ceil(Hq / P) query heads per rank, nkv KV heads per rank,
// W = hq + 2 * nkv head slots per token in the packed q|k|v layout):
//   pack_qkv    q [B, S_loc, Hq, D], k/v [B, S_loc, Hkv, D] -> send [P, B, S_loc, W, D]
//   unpack_qkv  recv [P, B, S_loc, W, D] (+ joint q/k/v [B, J, hq|nkv, D]) -> [B, S + J, W, D]
//   pack_out    out [B, S, hq, D] (+ joint out [B, J, hq, D]) -> send [P, B, J + S_loc, hq, D]
//   unpack_out  recv [P, B, rows, hq, D] -> [B, rows, Hq, D]
// Padding rows sit at the end of the global sequence, so the valid rows are the first S of the
// rank-ordered concatenation of the P shards: row i of the exact sequence is row i % S_loc of shard
// i / S_loc, whatever the number of padded (even whole) shards.
#pragma once

#include <cstdint>

#include "sp_kernels/index_math.h"

namespace sp_kernels {

// Maximum P * nkv entries of the KV head table. It travels to the GPU as a kernel parameter (no
// host-to-device copy per call); 256 int32 entries are 1 KiB of the 4 KiB parameter space.
constexpr int kMaxKvIndex = 256;

// Which source an output head row comes from.
enum PackSource : int { kSrcZero = -1, kSrcQ = 0, kSrcK = 1, kSrcV = 2, kSrcSeq = 3, kSrcJoint = 4 };

template <typename I>
struct SourceRef {
  int which;  // PackSource
  I offset;   // unit offset of the head row in that source (meaningless for kSrcZero)
};

// --------------------------------------------------------------------------------------------
// pack_qkv
// --------------------------------------------------------------------------------------------
template <typename I>
struct PackQkvGeometry {
  I P, B, S, Hq, hq, nkv, W, Du;
  I q_sb, q_ss;  // batch / token strides of q (its head stride is Du, its unit stride 1)
  I k_sb, k_ss;
  I v_sb, v_ss;
};

struct KvIndexTable {
  int32_t idx[kMaxKvIndex];  // P * nkv global KV heads, chunk (rank) major
};

// Output head row (p, b, s, h) of the send buffer -> its source head row.
// The table is taken by reference to the kernel parameter itself: the CUDA kernels then read it
// straight from the parameter (constant) bank, never through a local-memory copy.
template <typename I>
SP_HOST_DEVICE SourceRef<I> pack_qkv_source(const PackQkvGeometry<I>& g, const KvIndexTable& kv, I p, I b, I s,
                                            I h) {
  SourceRef<I> ref;
  if (h < g.hq) {
    const I head = p * g.hq + h;  // ranks take consecutive query heads; the tail ones are padding
    ref.which = head < g.Hq ? kSrcQ : kSrcZero;
    ref.offset = b * g.q_sb + s * g.q_ss + head * g.Du;
    return ref;
  }
  if (h < g.hq + g.nkv) {
    const I head = static_cast<I>(kv.idx[p * g.nkv + (h - g.hq)]);
    ref.which = kSrcK;
    ref.offset = b * g.k_sb + s * g.k_ss + head * g.Du;
    return ref;
  }
  const I head = static_cast<I>(kv.idx[p * g.nkv + (h - g.hq - g.nkv)]);
  ref.which = kSrcV;
  ref.offset = b * g.v_sb + s * g.v_ss + head * g.Du;
  return ref;
}

// Real query heads in rank p's chunk (the remaining hq - n are zero padding).
template <typename I>
SP_HOST_DEVICE I pack_qkv_real_q_heads(const PackQkvGeometry<I>& g, I p) {
  return max_of<I>(I(0), min_of<I>(g.hq, g.Hq - p * g.hq));
}

// --------------------------------------------------------------------------------------------
// unpack_qkv
// --------------------------------------------------------------------------------------------
template <typename I>
struct UnpackQkvGeometry {
  I P, B, S_loc, S, J, W, hq, nkv, Du;
  I front;  // 1: output rows [joint | sequence]; 0: [sequence | joint]
  I jq_sb, jq_ss, jk_sb, jk_ss, jv_sb, jv_ss;  // joint strides (unused when J == 0)
};

template <typename I>
SP_HOST_DEVICE I unpack_qkv_rows(const UnpackQkvGeometry<I>& g) {
  return g.S + g.J;
}

// First output row of the sequence part and of the joint part.
template <typename I>
SP_HOST_DEVICE I unpack_qkv_seq0(const UnpackQkvGeometry<I>& g) {
  return g.front ? g.J : I(0);
}

template <typename I>
SP_HOST_DEVICE I unpack_qkv_joint0(const UnpackQkvGeometry<I>& g) {
  return g.front ? I(0) : g.S;
}

// Unit offset in recv of exact-sequence row i of batch b (its whole W-slot row is contiguous there).
template <typename I>
SP_HOST_DEVICE I unpack_qkv_seq_offset(const UnpackQkvGeometry<I>& g, I b, I i) {
  const I p = i / g.S_loc;
  const I s = i - p * g.S_loc;
  return ((p * g.B + b) * g.S_loc + s) * g.W * g.Du;
}

// Sequence rows from row i to the end of its shard: consecutive in recv as well (one memcpy).
template <typename I>
SP_HOST_DEVICE I unpack_qkv_seq_run(const UnpackQkvGeometry<I>& g, I i) {
  return g.S_loc - i % g.S_loc;
}

// Output head row (b, t, h) -> its source: a recv head row (kSrcSeq) or a joint q/k/v head row.
template <typename I>
SP_HOST_DEVICE SourceRef<I> unpack_qkv_source(const UnpackQkvGeometry<I>& g, I b, I t, I h) {
  SourceRef<I> ref;
  const I j0 = unpack_qkv_joint0(g);
  if (t >= j0 && t < j0 + g.J) {
    const I j = t - j0;
    if (h < g.hq) {
      ref.which = kSrcQ;
      ref.offset = b * g.jq_sb + j * g.jq_ss + h * g.Du;
    } else if (h < g.hq + g.nkv) {
      ref.which = kSrcK;
      ref.offset = b * g.jk_sb + j * g.jk_ss + (h - g.hq) * g.Du;
    } else {
      ref.which = kSrcV;
      ref.offset = b * g.jv_sb + j * g.jv_ss + (h - g.hq - g.nkv) * g.Du;
    }
    return ref;
  }
  ref.which = kSrcSeq;
  ref.offset = unpack_qkv_seq_offset(g, b, t - unpack_qkv_seq0(g)) + h * g.Du;
  return ref;
}

// --------------------------------------------------------------------------------------------
// pack_out
// --------------------------------------------------------------------------------------------
template <typename I>
struct PackOutGeometry {
  I P, B, L, S, J, hq, Du;  // L: rows per shard (S_loc); S: exact sequence rows (<= P * L)
  I front;
  I o_sb, o_ss;  // strides of the sequence output [B, S, hq, D]
  I j_sb, j_ss;  // strides of the joint output [B, J, hq, D]
};

template <typename I>
SP_HOST_DEVICE I pack_out_rows(const PackOutGeometry<I>& g) {
  return g.J + g.L;
}

// Output row (p, b, t) of the send buffer -> the source row (all hq heads, contiguous in every
// source): rank p's sequence rows, zero where rank p holds padding, or a joint row.
template <typename I>
SP_HOST_DEVICE SourceRef<I> pack_out_row_source(const PackOutGeometry<I>& g, I p, I b, I t) {
  SourceRef<I> ref;
  const I seq0 = g.front ? g.J : I(0);
  const I j0 = g.front ? I(0) : g.L;
  if (t >= j0 && t < j0 + g.J) {
    ref.which = kSrcJoint;
    ref.offset = b * g.j_sb + (t - j0) * g.j_ss;
    return ref;
  }
  const I i = p * g.L + (t - seq0);  // row of the exact global sequence
  ref.which = i < g.S ? kSrcSeq : kSrcZero;
  ref.offset = b * g.o_sb + i * g.o_ss;
  return ref;
}

// --------------------------------------------------------------------------------------------
// unpack_out
// --------------------------------------------------------------------------------------------
template <typename I>
struct UnpackOutGeometry {
  I P, B, R, hq, Hq, Du;  // R: rows per chunk
};

// Output head row (b, t, h) of [B, R, Hq, D] -> unit offset of its head row in recv [P, B, R, hq, D].
template <typename I>
SP_HOST_DEVICE I unpack_out_source(const UnpackOutGeometry<I>& g, I b, I t, I h) {
  const I p = h / g.hq;
  const I hl = h - p * g.hq;
  return (((p * g.B + b) * g.R + t) * g.hq + hl) * g.Du;
}

}  // namespace sp_kernels
