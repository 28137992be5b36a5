// CPU implementation of the LSE-merge ops: one pass over the rows with at::parallel_for; per row the
// weights come from merge_math.h (the same functions the CUDA kernels call) and the inner loop over
// head_dim is a plain multiply-add the compiler vectorises.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "merge/merge.h"
#include "merge/merge_math.h"

namespace sp_kernels {

namespace {

// Element d of a row as float. bf16 widens by a shift of its bits, written out so the compiler
// vectorises the row loops (c10::BFloat16's conversion operator kept them scalar: measured 1.7x slower).
template <typename T>
inline float load_float(const T* p, int64_t d) {
  return static_cast<float>(p[d]);
}

template <>
inline float load_float<c10::BFloat16>(const c10::BFloat16* p, int64_t d) {
  uint16_t raw;
  std::memcpy(&raw, p + d, sizeof(raw));
  const uint32_t bits = static_cast<uint32_t>(raw) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Rows per task: about 64 KiB of fp32 accumulator, so B=1 with tens of thousands of rows still splits
// across threads while each task amortises its scheduling.
int64_t merge_grain(int64_t D) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
}

template <typename BlkT, typename OutT>
void merge_pair_rows(const at::Tensor& acc_out, const at::Tensor& acc_lse, const at::Tensor& block_out,
                     const at::Tensor& block_lse, const at::Tensor& out, const at::Tensor& out_lse,
                     const MergeShape& shape) {
  const float* acc = acc_out.const_data_ptr<float>();
  const float* a_lse = acc_lse.const_data_ptr<float>();
  const BlkT* blk = block_out.const_data_ptr<BlkT>();
  const float* b_lse = block_lse.const_data_ptr<float>();
  // In place, out aliases acc (and out_lse acc_lse): each row reads its inputs before writing them.
  OutT* dst = static_cast<OutT*>(out.data_ptr());
  float* d_lse = out_lse.data_ptr<float>();
  const MergeStrides acc_st = merge_out_strides(acc_out);
  const MergeStrides blk_st = merge_out_strides(block_out);
  const MergeStrides dst_st = merge_out_strides(out);
  const MergeStrides a_lse_st = merge_lse_strides(acc_lse);
  const MergeStrides b_lse_st = merge_lse_strides(block_lse);
  const MergeStrides d_lse_st = merge_lse_strides(out_lse);
  const int64_t D = shape.D;
  at::parallel_for(0, shape.rows(), merge_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const auto r = merge_row<int64_t>(row, shape.S, shape.H);
      const MergePair p = merge_pair(a_lse[merge_lse_offset(r, a_lse_st)], b_lse[merge_lse_offset(r, b_lse_st)]);
      const float* a = acc + merge_out_offset(r, acc_st);
      const BlkT* b = blk + merge_out_offset(r, blk_st);
      OutT* o = dst + merge_out_offset(r, dst_st);
      for (int64_t d = 0; d < D; ++d) {
        o[d] = static_cast<OutT>(a[d] * p.w_a + load_float(b, d) * p.w_b);
      }
      d_lse[merge_lse_offset(r, d_lse_st)] = p.lse;
    }
  });
}

template <typename InT, typename OutT>
void merge_ways_rows(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& lses, const at::Tensor& out,
                     const at::Tensor& out_lse, const MergeShape& shape) {
  const int ways = static_cast<int>(outs.size());
  std::vector<const InT*> src(ways);
  std::vector<const float*> src_lse(ways);
  for (int i = 0; i < ways; ++i) {
    src[i] = outs[i].const_data_ptr<InT>();
    src_lse[i] = lses[i].const_data_ptr<float>();
  }
  const MergeStrides in_st = merge_out_strides(outs[0]);
  const MergeStrides in_lse_st = merge_lse_strides(lses[0]);
  const MergeStrides dst_st = merge_out_strides(out);
  const MergeStrides d_lse_st = merge_lse_strides(out_lse);
  OutT* dst = static_cast<OutT*>(out.data_ptr());
  float* d_lse = out_lse.data_ptr<float>();
  const int64_t D = shape.D;
  at::parallel_for(0, shape.rows(), merge_grain(D), [&](int64_t begin, int64_t end) {
    std::vector<float> lse_row(ways);
    std::vector<float> acc(static_cast<size_t>(D));
    for (int64_t row = begin; row < end; ++row) {
      const auto r = merge_row<int64_t>(row, shape.S, shape.H);
      const int64_t lse_off = merge_lse_offset(r, in_lse_st);
      for (int i = 0; i < ways; ++i) {
        lse_row[i] = src_lse[i][lse_off];
      }
      const float total = merge_lse_n(ways, [&](int i) { return lse_row[i]; });
      const int64_t off = merge_out_offset(r, in_st);
      // Part 0 initialises the row sum (no zero fill), the others accumulate into it: fp32 throughout.
      const float w0 = merge_weight(lse_row[0], total);
      const InT* x0 = src[0] + off;
      for (int64_t d = 0; d < D; ++d) {
        acc[d] = load_float(x0, d) * w0;
      }
      for (int i = 1; i < ways; ++i) {
        const float w = merge_weight(lse_row[i], total);
        const InT* x = src[i] + off;
        for (int64_t d = 0; d < D; ++d) {
          acc[d] += load_float(x, d) * w;
        }
      }
      OutT* o = dst + merge_out_offset(r, dst_st);
      for (int64_t d = 0; d < D; ++d) {
        o[d] = static_cast<OutT>(acc[d]);
      }
      d_lse[merge_lse_offset(r, d_lse_st)] = total;
    }
  });
}

// AT_DISPATCH over the three value dtypes, twice nested: (block or part dtype) x (destination dtype).
#define SP_MERGE_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

void run_pair(const char* op, const at::Tensor& acc_out, const at::Tensor& acc_lse, const at::Tensor& block_out,
              const at::Tensor& block_lse, const at::Tensor& out, const at::Tensor& out_lse, bool in_place) {
  TORCH_CHECK(acc_out.device().is_cpu(), op, " (CPU kernel): acc_out must be a CPU tensor, got ", acc_out.device());
  const MergeShape shape = check_merge_pair(op, acc_out, acc_lse, block_out, block_lse, out, out_lse, in_place);
  if (shape.rows() == 0) {
    return;
  }
  SP_MERGE_DISPATCH(block_out.scalar_type(), "lse_merge", [&] {
    using BlkT = scalar_t;
    SP_MERGE_DISPATCH(out.scalar_type(), "lse_merge", [&] {
      merge_pair_rows<BlkT, scalar_t>(acc_out, acc_lse, block_out, block_lse, out, out_lse, shape);
    });
  });
}

void run_ways(const char* op, at::TensorList outs, at::TensorList lses, const at::Tensor& out,
              const at::Tensor& out_lse, const MergeShape& shape) {
  if (shape.rows() == 0) {
    return;
  }
  const std::vector<at::Tensor> ins = merge_common_layout(outs);
  const std::vector<at::Tensor> in_lses = merge_common_layout(lses);
  SP_MERGE_DISPATCH(ins[0].scalar_type(), "lse_merge", [&] {
    using InT = scalar_t;
    SP_MERGE_DISPATCH(out.scalar_type(), "lse_merge", [&] { merge_ways_rows<InT, scalar_t>(ins, in_lses, out, out_lse, shape); });
  });
}

}  // namespace

void lse_merge_cpu_(const at::Tensor& acc_out, const at::Tensor& acc_lse, const at::Tensor& block_out,
                    const at::Tensor& block_lse) {
  run_pair("lse_merge_", acc_out, acc_lse, block_out, block_lse, acc_out, acc_lse, /*in_place=*/true);
}

void lse_merge_out_cpu(const at::Tensor& acc_out, const at::Tensor& acc_lse, const at::Tensor& block_out,
                       const at::Tensor& block_lse, const at::Tensor& out, const at::Tensor& lse) {
  run_pair("lse_merge_out", acc_out, acc_lse, block_out, block_lse, out, lse, /*in_place=*/false);
}

void lse_merge_all_out_cpu(at::TensorList outs, at::TensorList lses, const at::Tensor& out, const at::Tensor& lse) {
  const char* op = "lse_merge_all_out";
  const MergeShape shape = check_merge_ways(op, outs, lses);
  TORCH_CHECK(outs[0].device().is_cpu(), op, " (CPU kernel): outs must be CPU tensors, got ", outs[0].device());
  check_merge_ways_dest(op, outs, lses, shape, out, lse);
  run_ways(op, outs, lses, out, lse, shape);
}

std::tuple<at::Tensor, at::Tensor> lse_merge_all_cpu(at::TensorList outs, at::TensorList lses, at::ScalarType dtype) {
  const char* op = "lse_merge_all";
  const MergeShape shape = check_merge_ways(op, outs, lses);
  TORCH_CHECK(outs[0].device().is_cpu(), op, " (CPU kernel): outs must be CPU tensors, got ", outs[0].device());
  check_merge_out_dtype(op, dtype);
  at::Tensor out = merge_alloc_out(shape, dtype, outs[0]);
  at::Tensor lse = merge_alloc_lse(shape, outs[0]);
  run_ways(op, outs, lses, out, lse, shape);
  return {out, lse};
}

TORCH_LIBRARY_IMPL(sp_kernels, CPU, m) {
  m.impl("lse_merge_", &lse_merge_cpu_);
  m.impl("lse_merge_out", &lse_merge_out_cpu);
  m.impl("lse_merge_all", &lse_merge_all_cpu);
  m.impl("lse_merge_all_out", &lse_merge_all_out_cpu);
}

}  // namespace sp_kernels
