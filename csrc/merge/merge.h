// Host-side contract of the sp_kernels LSE-merge ops, shared by the CPU and CUDA implementations:
// argument checks (TORCH_CHECK messages name the op and the argument) and the row geometry the
// kernels walk. Header-only so it lives with the merge kernels and nowhere else.
//
//   lse_merge_(acc_out, acc_lse, block_out, block_lse)              acc <- merge(acc, block), in place
//   lse_merge_out(acc_out, acc_lse, block_out, block_lse, out, lse)  (out, lse) <- merge(acc, block)
//   lse_merge_all(outs, lses, out_dtype) -> (out, lse)               W-way merge, one pass
//   lse_merge_all_out(outs, lses, out, lse)                          same, into given tensors
//
// Layouts: outputs [B, S, H, D] with any strides over B, S, H and stride 1 over D; lse [B, H, S]
// fp32 with any strides. Accumulators are fp32; parts and final outputs fp32, fp16 or bf16.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cstdint>
#include <vector>

#include "merge/merge_math.h"

namespace sp_kernels {

struct MergeShape {
  int64_t B = 0;
  int64_t S = 0;
  int64_t H = 0;
  int64_t D = 0;
  int64_t rows() const { return B * S * H; }
};

inline bool merge_value_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// (b, s, h) strides of a [B, S, H, D] tensor.
inline MergeStrides merge_out_strides(const at::Tensor& t) {
  return MergeStrides{t.stride(0), t.stride(1), t.stride(2)};
}

// (b, s, h) strides of a [B, H, S] tensor, in the out's naming (see merge_lse_offset).
inline MergeStrides merge_lse_strides(const at::Tensor& t) {
  return MergeStrides{t.stride(0), t.stride(2), t.stride(1)};
}

inline void check_merge_out(const char* op, const char* name, const at::Tensor& t, const MergeShape* like,
                            const char* like_name, bool must_be_fp32) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D [B, S, H, D], got shape ", t.sizes());
  if (must_be_fp32) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32 (the fp32 accumulator), got ",
                t.scalar_type());
  } else {
    TORCH_CHECK(merge_value_dtype(t.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
                t.scalar_type());
  }
  if (like != nullptr) {
    TORCH_CHECK(t.size(0) == like->B && t.size(1) == like->S && t.size(2) == like->H && t.size(3) == like->D, op,
                ": ", name, " must have shape [", like->B, ", ", like->S, ", ", like->H, ", ", like->D,
                "] like ", like_name, ", got ", t.sizes());
  }
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, ": ", name,
              " must have stride 1 in its last (head_dim) dimension, got strides ", t.strides());
}

inline void check_merge_lse(const char* op, const char* name, const at::Tensor& t, const MergeShape& like,
                            const char* like_name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == like.B && t.size(1) == like.H && t.size(2) == like.S, op, ": ", name,
              " must have shape [B, H, S] = [", like.B, ", ", like.H, ", ", like.S, "] to match ", like_name,
              ", got ", t.sizes());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

inline void check_writable(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
              " has overlapping elements (an expanded or broadcast view) and cannot be written");
}

inline MergeShape shape_of(const at::Tensor& t) {
  return MergeShape{t.size(0), t.size(1), t.size(2), t.size(3)};
}

// Checks of the pair merge. `out`/`out_lse` are the destinations (the accumulator itself in place).
inline MergeShape check_merge_pair(const char* op, const at::Tensor& acc_out, const at::Tensor& acc_lse,
                                   const at::Tensor& block_out, const at::Tensor& block_lse, const at::Tensor& out,
                                   const at::Tensor& out_lse, bool in_place) {
  check_merge_out(op, "acc_out", acc_out, nullptr, nullptr, /*must_be_fp32=*/true);
  const MergeShape shape = shape_of(acc_out);
  check_merge_lse(op, "acc_lse", acc_lse, shape, "acc_out");
  check_merge_out(op, "block_out", block_out, &shape, "acc_out", false);
  check_merge_lse(op, "block_lse", block_lse, shape, "acc_out");
  check_same_device(op, "acc_lse", acc_lse, acc_out, "acc_out");
  check_same_device(op, "block_out", block_out, acc_out, "acc_out");
  check_same_device(op, "block_lse", block_lse, acc_out, "acc_out");
  if (!in_place) {
    check_merge_out(op, "out", out, &shape, "acc_out", false);
    check_merge_lse(op, "lse", out_lse, shape, "acc_out");
    check_same_device(op, "out", out, acc_out, "acc_out");
    check_same_device(op, "lse", out_lse, acc_out, "acc_out");
    // The destinations are written while the inputs are read, row by row in one pass.
    at::assert_no_overlap(out, acc_out);
    at::assert_no_overlap(out, block_out);
    at::assert_no_overlap(out_lse, acc_lse);
    at::assert_no_overlap(out_lse, block_lse);
    at::assert_no_overlap(out, out_lse);
  } else {
    at::assert_no_overlap(acc_out, block_out);
    at::assert_no_overlap(acc_lse, block_lse);
    at::assert_no_overlap(acc_out, acc_lse);
  }
  check_writable(op, in_place ? "acc_out" : "out", out);
  check_writable(op, in_place ? "acc_lse" : "lse", out_lse);
  return shape;
}

// Checks of the W-way merge; returns the common shape.
inline MergeShape check_merge_ways(const char* op, at::TensorList outs, at::TensorList lses) {
  TORCH_CHECK(!outs.empty(), op, ": outs must hold at least one partial output, got an empty list");
  TORCH_CHECK(outs.size() == lses.size(), op, ": outs and lses must have the same length, got ", outs.size(),
              " and ", lses.size());
  check_merge_out(op, "outs[0]", outs[0], nullptr, nullptr, false);
  const MergeShape shape = shape_of(outs[0]);
  for (size_t i = 0; i < outs.size(); ++i) {
    const std::string on = "outs[" + std::to_string(i) + "]";
    const std::string ln = "lses[" + std::to_string(i) + "]";
    check_merge_out(op, on.c_str(), outs[i], &shape, "outs[0]", false);
    TORCH_CHECK(outs[i].scalar_type() == outs[0].scalar_type(), op, ": ", on, " has dtype ", outs[i].scalar_type(),
                " but outs[0] has ", outs[0].scalar_type(), " (all partial outputs must share one dtype)");
    check_merge_lse(op, ln.c_str(), lses[i], shape, "outs[0]");
    check_same_device(op, on.c_str(), outs[i], outs[0], "outs[0]");
    check_same_device(op, ln.c_str(), lses[i], outs[0], "outs[0]");
  }
  return shape;
}

inline void check_merge_ways_dest(const char* op, at::TensorList outs, at::TensorList lses, const MergeShape& shape,
                                  const at::Tensor& out, const at::Tensor& out_lse) {
  check_merge_out(op, "out", out, &shape, "outs[0]", false);
  check_merge_lse(op, "lse", out_lse, shape, "outs[0]");
  check_same_device(op, "out", out, outs[0], "outs[0]");
  check_same_device(op, "lse", out_lse, outs[0], "outs[0]");
  for (size_t i = 0; i < outs.size(); ++i) {
    at::assert_no_overlap(out, outs[i]);
    at::assert_no_overlap(out_lse, lses[i]);
  }
  at::assert_no_overlap(out, out_lse);
  check_writable(op, "out", out);
  check_writable(op, "lse", out_lse);
}

// The W inputs walked with one set of strides: the first input's when every input shares them (the
// usual case: W outputs of one attention kernel), else contiguous copies of the inputs that differ.
inline std::vector<at::Tensor> merge_common_layout(at::TensorList ts) {
  std::vector<at::Tensor> result(ts.begin(), ts.end());
  bool same = true;
  for (const auto& t : ts) {
    same = same && t.strides() == ts[0].strides();
  }
  if (!same) {
    for (auto& t : result) {
      t = t.contiguous();
    }
  }
  return result;
}

inline at::Tensor merge_alloc_out(const MergeShape& shape, at::ScalarType dtype, const at::Tensor& like) {
  return at::empty({shape.B, shape.S, shape.H, shape.D}, like.options().dtype(dtype));
}

inline at::Tensor merge_alloc_lse(const MergeShape& shape, const at::Tensor& like) {
  return at::empty({shape.B, shape.H, shape.S}, like.options().dtype(at::kFloat));
}

inline void check_merge_out_dtype(const char* op, at::ScalarType dtype) {
  TORCH_CHECK(merge_value_dtype(dtype), op, ": out_dtype must be float32, float16 or bfloat16, got ", dtype);
}

void lse_merge_cpu_(const at::Tensor& acc_out, const at::Tensor& acc_lse, const at::Tensor& block_out,
                    const at::Tensor& block_lse);
void lse_merge_out_cpu(const at::Tensor& acc_out, const at::Tensor& acc_lse, const at::Tensor& block_out,
                       const at::Tensor& block_lse, const at::Tensor& out, const at::Tensor& lse);
std::tuple<at::Tensor, at::Tensor> lse_merge_all_cpu(at::TensorList outs, at::TensorList lses, at::ScalarType dtype);
void lse_merge_all_out_cpu(at::TensorList outs, at::TensorList lses, const at::Tensor& out, const at::Tensor& lse);

}  // namespace sp_kernels
