// Index math shared by the CPU and CUDA kernels.
//
// Every function here is compiled twice: by the host compiler for the CPU kernels and by nvcc for
// the device kernels. Keeping one definition means the CPU tests (which run everywhere) exercise the
// exact arithmetic the GPU kernels execute.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SP_HOST_DEVICE inline
#endif

namespace sp_kernels {

template <typename I>
SP_HOST_DEVICE I min_of(I a, I b) {
  return a < b ? a : b;
}

template <typename I>
SP_HOST_DEVICE I max_of(I a, I b) {
  return a > b ? a : b;
}

// ---------------------------------------------------------------------------------------------
// shard_pad
//
// Input viewed as [outer, n, inner], output as [outer, length, inner]. Output row i of every outer
// slice is input row (start + i) when it exists, padding otherwise. `inner` counts copy units: the
// CPU passes elements, the CUDA kernel passes vectors (16 bytes when alignment allows), so one
// geometry covers both granularities. I is the index type: the CUDA kernel uses int32 when the
// output fits because 64-bit integer division is emulated on the GPU and costs a dozen instructions.
// ---------------------------------------------------------------------------------------------

// Number of output rows per outer slice that come from the input; the rest are padding.
template <typename I>
SP_HOST_DEVICE I shard_pad_valid_rows(I n, I start, I length) {
  return max_of<I>(I(0), min_of<I>(n - start, length));
}

template <typename I>
struct ShardPadGeometry {
  I outer;    // product of the dims before `dim`
  I n;        // input size along `dim`
  I length;   // output size along `dim`
  I inner;    // copy units per row (product of the dims after `dim`, in units)
  I start;    // first input row of the shard
  I n_valid;  // shard_pad_valid_rows(n, start, length)
};

template <typename I>
SP_HOST_DEVICE ShardPadGeometry<I> make_shard_pad_geometry(I outer, I n, I length, I inner, I start) {
  ShardPadGeometry<I> g;
  g.outer = outer;
  g.n = n;
  g.length = length;
  g.inner = inner;
  g.start = start;
  g.n_valid = shard_pad_valid_rows<I>(n, start, length);
  return g;
}

template <typename I>
SP_HOST_DEVICE I shard_pad_output_numel(const ShardPadGeometry<I>& g) {
  return g.outer * g.length * g.inner;
}

// Flat input index (in units) that output unit `e` copies, or -1 when `e` is padding.
template <typename I>
SP_HOST_DEVICE I shard_pad_source_index(const ShardPadGeometry<I>& g, I e) {
  const I slice = g.length * g.inner;
  const I o = e / slice;
  const I r = e - o * slice;  // offset inside the outer slice
  const I i = r / g.inner;
  if (i >= g.n_valid) {
    return I(-1);
  }
  // Row (start + i) of slice o; r - i * inner is the offset inside the row.
  return (o * g.n + g.start) * g.inner + r;
}

// Units from output unit `e` up to the end of its run: a run is either a stretch of copied rows
// (contiguous in the input too) or a stretch of padding, never crossing an outer slice.
template <typename I>
SP_HOST_DEVICE I shard_pad_run_length(const ShardPadGeometry<I>& g, I e) {
  const I slice = g.length * g.inner;
  const I r = e % slice;
  const I valid_units = g.n_valid * g.inner;
  return r < valid_units ? valid_units - r : slice - r;
}

}  // namespace sp_kernels
