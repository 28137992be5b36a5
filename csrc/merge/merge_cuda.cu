// CUDA implementation of the LSE-merge ops: one pass, fp32 math, on the current stream. A thread
// block holds whole rows (threadIdx.y picks the row, threadIdx.x walks head_dim), each thread moves
// 8 elements per step as 16-byte accesses (two for fp32) when every row start is 16-byte aligned,
// else element by element. The per-row weights come from merge_math.h, shared with the CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10 headers, not ATen/cuda/CUDAContext.h (see shard_pad.cu: minimal toolkits lack cuBLAS headers).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "merge/merge.h"
#include "merge/merge_math.h"

namespace sp_kernels {

namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // elements per thread step: 16 bytes of bf16/fp16, two 16-byte accesses of fp32

#define SP_UNROLL _Pragma("unroll")

// N elements of T at p (16-byte aligned when N * sizeof(T) is a multiple of 16) as floats.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* __restrict__ p, float (&v)[N]) {
  if constexpr (N * sizeof(T) % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
    SP_UNROLL
    for (int c = 0; c < N / kPer; ++c) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[c];
      T vals[kPer];
      memcpy(vals, &raw, 16);
      SP_UNROLL
      for (int k = 0; k < kPer; ++k) {
        v[c * kPer + k] = static_cast<float>(vals[k]);
      }
    }
  } else {
    SP_UNROLL
    for (int k = 0; k < N; ++k) {
      v[k] = static_cast<float>(p[k]);
    }
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* __restrict__ p, const float (&v)[N]) {
  if constexpr (N * sizeof(T) % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
    SP_UNROLL
    for (int c = 0; c < N / kPer; ++c) {
      T vals[kPer];
      SP_UNROLL
      for (int k = 0; k < kPer; ++k) {
        vals[k] = static_cast<T>(v[c * kPer + k]);
      }
      uint4 raw;
      memcpy(&raw, vals, 16);
      reinterpret_cast<uint4*>(p)[c] = raw;
    }
  } else {
    SP_UNROLL
    for (int k = 0; k < N; ++k) {
      p[k] = static_cast<T>(v[k]);
    }
  }
}

struct MergeGeom {
  int32_t rows;
  int32_t S;
  int32_t H;
  int32_t D;
};

template <typename BlkT, typename OutT>
struct PairArgs {
  const float* acc;
  const float* acc_lse;
  const BlkT* blk;
  const float* blk_lse;
  OutT* dst;
  float* dst_lse;
  MergeStrides acc_st, blk_st, dst_st, acc_lse_st, blk_lse_st, dst_lse_st;
  MergeGeom g;
};

template <typename BlkT, typename OutT, int V>
__global__ void __launch_bounds__(kThreads) merge_pair_kernel(PairArgs<BlkT, OutT> a) {
  const int32_t row = static_cast<int32_t>(blockIdx.x) * static_cast<int32_t>(blockDim.y) +
                      static_cast<int32_t>(threadIdx.y);
  const bool valid = row < a.g.rows;
  MergeRow<int32_t> r{0, 0, 0};
  MergePair p{0.0f, 0.0f, 0.0f};
  if (valid) {
    r = merge_row<int32_t>(row, a.g.S, a.g.H);
    p = merge_pair(a.acc_lse[merge_lse_offset(r, a.acc_lse_st)], a.blk_lse[merge_lse_offset(r, a.blk_lse_st)]);
  }
  // In place, dst_lse is acc_lse: every thread of a row (all in this block) has read the old value
  // before thread x == 0 overwrites it.
  __syncthreads();
  if (!valid) {
    return;
  }
  if (threadIdx.x == 0) {
    a.dst_lse[merge_lse_offset(r, a.dst_lse_st)] = p.lse;
  }
  const float* acc = a.acc + merge_out_offset(r, a.acc_st);
  const BlkT* blk = a.blk + merge_out_offset(r, a.blk_st);
  OutT* dst = a.dst + merge_out_offset(r, a.dst_st);
  for (int32_t d = static_cast<int32_t>(threadIdx.x) * V; d < a.g.D; d += static_cast<int32_t>(blockDim.x) * V) {
    float x[V];
    float y[V];
    load_floats<float, V>(acc + d, x);
    load_floats<BlkT, V>(blk + d, y);
    SP_UNROLL
    for (int k = 0; k < V; ++k) {
      x[k] = x[k] * p.w_a + y[k] * p.w_b;
    }
    store_floats<OutT, V>(dst + d, x);
  }
}

template <typename InT, typename OutT>
struct WaysArgs {
  const InT* src[kMergeMaxWays];
  const float* src_lse[kMergeMaxWays];
  int32_t ways;
  OutT* dst;
  float* dst_lse;
  MergeStrides in_st, in_lse_st, dst_st, dst_lse_st;
  MergeGeom g;
};

template <typename InT, typename OutT, int V>
__global__ void __launch_bounds__(kThreads) merge_ways_kernel(WaysArgs<InT, OutT> a) {
  const int32_t row = static_cast<int32_t>(blockIdx.x) * static_cast<int32_t>(blockDim.y) +
                      static_cast<int32_t>(threadIdx.y);
  if (row >= a.g.rows) {
    return;
  }
  const auto r = merge_row<int32_t>(row, a.g.S, a.g.H);
  // Unused slots (i >= ways) read as -inf: they never win the max and add exp(-inf) = 0, so the
  // loops below run to the compile-time bound and the values stay in registers.
  float l[kMergeMaxWays];
  const int64_t lse_off = merge_lse_offset(r, a.in_lse_st);
  SP_UNROLL
  for (int i = 0; i < kMergeMaxWays; ++i) {
    l[i] = i < a.ways ? a.src_lse[i][lse_off] : merge_neg_inf();
  }
  const float total = merge_lse_n(kMergeMaxWays, [&](int i) { return l[i]; });
  float w[kMergeMaxWays];
  SP_UNROLL
  for (int i = 0; i < kMergeMaxWays; ++i) {
    w[i] = merge_weight(l[i], total);
  }
  if (threadIdx.x == 0) {
    a.dst_lse[merge_lse_offset(r, a.dst_lse_st)] = total;
  }
  const int64_t in_off = merge_out_offset(r, a.in_st);
  OutT* dst = a.dst + merge_out_offset(r, a.dst_st);
  for (int32_t d = static_cast<int32_t>(threadIdx.x) * V; d < a.g.D; d += static_cast<int32_t>(blockDim.x) * V) {
    float acc[V];
    load_floats<InT, V>(a.src[0] + in_off + d, acc);
    SP_UNROLL
    for (int k = 0; k < V; ++k) {
      acc[k] *= w[0];
    }
    SP_UNROLL
    for (int i = 1; i < kMergeMaxWays; ++i) {
      if (i < a.ways) {
        float x[V];
        load_floats<InT, V>(a.src[i] + in_off + d, x);
        SP_UNROLL
        for (int k = 0; k < V; ++k) {
          acc[k] += x[k] * w[i];
        }
      }
    }
    store_floats<OutT, V>(dst + d, acc);
  }
}

// Whether every row of t starts on a 16-byte boundary (base pointer and B/S/H strides), so 8-element
// steps of any supported dtype are whole 16-byte accesses.
bool rows_aligned_16(const at::Tensor& t) {
  const auto es = static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) {
    return false;
  }
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && (t.stride(d) * es) % 16 != 0) {
      return false;
    }
  }
  return true;
}

MergeGeom make_geom(const char* op, const MergeShape& shape) {
  TORCH_CHECK(shape.rows() < std::numeric_limits<int32_t>::max() && shape.D < std::numeric_limits<int32_t>::max(),
              op, ": too many rows (", shape.rows(), ") for the CUDA kernel");
  return MergeGeom{static_cast<int32_t>(shape.rows()), static_cast<int32_t>(shape.S), static_cast<int32_t>(shape.H),
                   static_cast<int32_t>(shape.D)};
}

// Threads per row: enough to cover head_dim in V-element steps (a power of two, at most a warp);
// the remaining threads of the block take further rows.
dim3 block_shape(int64_t D, int V) {
  const int64_t steps = std::max<int64_t>(1, (D + V - 1) / V);
  int bx = 1;
  while (bx < steps && bx < 32) {
    bx *= 2;
  }
  return dim3(static_cast<unsigned>(bx), static_cast<unsigned>(kThreads / bx), 1);
}

unsigned grid_for(const MergeGeom& g, const dim3& block) {
  const int64_t blocks = (static_cast<int64_t>(g.rows) + block.y - 1) / block.y;
  return static_cast<unsigned>(blocks);
}

#define SP_MERGE_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

void run_pair(const char* op, const at::Tensor& acc_out, const at::Tensor& acc_lse, const at::Tensor& block_out,
              const at::Tensor& block_lse, const at::Tensor& out, const at::Tensor& out_lse, bool in_place) {
  TORCH_CHECK(acc_out.device().is_cuda(), op, " (CUDA kernel): acc_out must be a CUDA tensor, got ",
              acc_out.device());
  const c10::cuda::CUDAGuard guard(acc_out.device());
  const MergeShape shape = check_merge_pair(op, acc_out, acc_lse, block_out, block_lse, out, out_lse, in_place);
  if (shape.rows() == 0) {
    return;
  }
  const MergeGeom g = make_geom(op, shape);
  const bool vec = shape.D % kVec == 0 && rows_aligned_16(acc_out) && rows_aligned_16(block_out) &&
                   rows_aligned_16(out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(acc_out.device().index()).stream();
  SP_MERGE_DISPATCH(block_out.scalar_type(), "lse_merge", [&] {
    using BlkT = scalar_t;
    SP_MERGE_DISPATCH(out.scalar_type(), "lse_merge", [&] {
      using OutT = scalar_t;
      PairArgs<BlkT, OutT> a;
      a.acc = acc_out.const_data_ptr<float>();
      a.acc_lse = acc_lse.const_data_ptr<float>();
      a.blk = block_out.const_data_ptr<BlkT>();
      a.blk_lse = block_lse.const_data_ptr<float>();
      a.dst = static_cast<OutT*>(out.data_ptr());
      a.dst_lse = out_lse.data_ptr<float>();
      a.acc_st = merge_out_strides(acc_out);
      a.blk_st = merge_out_strides(block_out);
      a.dst_st = merge_out_strides(out);
      a.acc_lse_st = merge_lse_strides(acc_lse);
      a.blk_lse_st = merge_lse_strides(block_lse);
      a.dst_lse_st = merge_lse_strides(out_lse);
      a.g = g;
      if (vec) {
        const dim3 block = block_shape(shape.D, kVec);
        merge_pair_kernel<BlkT, OutT, kVec><<<grid_for(g, block), block, 0, stream>>>(a);
      } else {
        const dim3 block = block_shape(shape.D, 1);
        merge_pair_kernel<BlkT, OutT, 1><<<grid_for(g, block), block, 0, stream>>>(a);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// One launch for W <= kMergeMaxWays parts sharing one layout.
void launch_ways(const char* op, const std::vector<at::Tensor>& ins, const std::vector<at::Tensor>& in_lses,
                 const at::Tensor& out, const at::Tensor& out_lse, const MergeShape& shape, cudaStream_t stream) {
  const MergeGeom g = make_geom(op, shape);
  bool vec = shape.D % kVec == 0 && rows_aligned_16(out);
  for (const auto& t : ins) {
    vec = vec && rows_aligned_16(t);
  }
  SP_MERGE_DISPATCH(ins[0].scalar_type(), "lse_merge", [&] {
    using InT = scalar_t;
    SP_MERGE_DISPATCH(out.scalar_type(), "lse_merge", [&] {
      using OutT = scalar_t;
      WaysArgs<InT, OutT> a;
      a.ways = static_cast<int32_t>(ins.size());
      for (int i = 0; i < kMergeMaxWays; ++i) {
        const size_t k = std::min<size_t>(i, ins.size() - 1);  // unused slots repeat a valid pointer
        a.src[i] = ins[k].const_data_ptr<InT>();
        a.src_lse[i] = in_lses[k].const_data_ptr<float>();
      }
      a.dst = static_cast<OutT*>(out.data_ptr());
      a.dst_lse = out_lse.data_ptr<float>();
      a.in_st = merge_out_strides(ins[0]);
      a.in_lse_st = merge_lse_strides(in_lses[0]);
      a.dst_st = merge_out_strides(out);
      a.dst_lse_st = merge_lse_strides(out_lse);
      a.g = g;
      if (vec) {
        const dim3 block = block_shape(shape.D, kVec);
        merge_ways_kernel<InT, OutT, kVec><<<grid_for(g, block), block, 0, stream>>>(a);
      } else {
        const dim3 block = block_shape(shape.D, 1);
        merge_ways_kernel<InT, OutT, 1><<<grid_for(g, block), block, 0, stream>>>(a);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void run_ways(const char* op, at::TensorList outs, at::TensorList lses, const at::Tensor& out,
              const at::Tensor& out_lse, const MergeShape& shape) {
  if (shape.rows() == 0) {
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index()).stream();
  std::vector<at::Tensor> ins = merge_common_layout(outs);
  std::vector<at::Tensor> in_lses = merge_common_layout(lses);
  // More parts than one launch takes: merge groups of kMergeMaxWays into fp32 partials (exact up to
  // fp32 rounding: the merge is associative), then merge the partials, until one launch suffices.
  while (ins.size() > static_cast<size_t>(kMergeMaxWays)) {
    std::vector<at::Tensor> next;
    std::vector<at::Tensor> next_lse;
    for (size_t begin = 0; begin < ins.size(); begin += kMergeMaxWays) {
      const size_t end = std::min(ins.size(), begin + kMergeMaxWays);
      std::vector<at::Tensor> group(ins.begin() + begin, ins.begin() + end);
      std::vector<at::Tensor> group_lse(in_lses.begin() + begin, in_lses.begin() + end);
      at::Tensor part = merge_alloc_out(shape, at::kFloat, out);
      at::Tensor part_lse = merge_alloc_lse(shape, out);
      launch_ways(op, group, group_lse, part, part_lse, shape, stream);
      next.push_back(part);
      next_lse.push_back(part_lse);
    }
    ins = std::move(next);
    in_lses = std::move(next_lse);
  }
  launch_ways(op, ins, in_lses, out, out_lse, shape, stream);
}

void lse_merge_cuda_(const at::Tensor& acc_out, const at::Tensor& acc_lse, const at::Tensor& block_out,
                     const at::Tensor& block_lse) {
  run_pair("lse_merge_", acc_out, acc_lse, block_out, block_lse, acc_out, acc_lse, /*in_place=*/true);
}

void lse_merge_out_cuda(const at::Tensor& acc_out, const at::Tensor& acc_lse, const at::Tensor& block_out,
                        const at::Tensor& block_lse, const at::Tensor& out, const at::Tensor& lse) {
  run_pair("lse_merge_out", acc_out, acc_lse, block_out, block_lse, out, lse, /*in_place=*/false);
}

void lse_merge_all_out_cuda(at::TensorList outs, at::TensorList lses, const at::Tensor& out, const at::Tensor& lse) {
  const char* op = "lse_merge_all_out";
  const MergeShape shape = check_merge_ways(op, outs, lses);
  TORCH_CHECK(outs[0].device().is_cuda(), op, " (CUDA kernel): outs must be CUDA tensors, got ", outs[0].device());
  const c10::cuda::CUDAGuard guard(outs[0].device());
  check_merge_ways_dest(op, outs, lses, shape, out, lse);
  run_ways(op, outs, lses, out, lse, shape);
}

std::tuple<at::Tensor, at::Tensor> lse_merge_all_cuda(at::TensorList outs, at::TensorList lses,
                                                      at::ScalarType dtype) {
  const char* op = "lse_merge_all";
  const MergeShape shape = check_merge_ways(op, outs, lses);
  TORCH_CHECK(outs[0].device().is_cuda(), op, " (CUDA kernel): outs must be CUDA tensors, got ", outs[0].device());
  const c10::cuda::CUDAGuard guard(outs[0].device());
  check_merge_out_dtype(op, dtype);
  at::Tensor out = merge_alloc_out(shape, dtype, outs[0]);
  at::Tensor lse = merge_alloc_lse(shape, outs[0]);
  run_ways(op, outs, lses, out, lse, shape);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(sp_kernels, CUDA, m) {
  m.impl("lse_merge_", &lse_merge_cuda_);
  m.impl("lse_merge_out", &lse_merge_out_cuda);
  m.impl("lse_merge_all", &lse_merge_all_cuda);
  m.impl("lse_merge_all_out", &lse_merge_all_out_cuda);
}

}  // namespace sp_kernels
