// CUDA implementation of the Ulysses pack/unpack ops: one pass, each output unit written once, 16-byte
// units whenever head_dim, strides and pointers allow (always for bf16/fp16 with head_dim a multiple
// of 8). The work is split by output ROW (pack_rows.h): where a row comes from is worked out once per
// row with the index math of pack_index.h (shared with the CPU kernels), then the row's lanes move
// up to kMaxUpt vectors each with no index arithmetic in between. The kernel body, row_copy_thread,
// also runs on the CPU in csrc/tests/test_pack_rows.cpp for every thread of several grids.
#include <ATen/ATen.h>
// c10 stream/guard headers, not ATen/cuda/CUDAContext.h: that one pulls in cuSPARSE/cuBLAS headers,
// which minimal CUDA toolkits (like the one CI builds against) do not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "pack/pack.h"
#include "pack/pack_index.h"
#include "pack/pack_rows.h"
#include "pack/pack_rows_host.h"

namespace sp_kernels {

namespace {

constexpr int kThreads = 256;
// Resident blocks per SM the grid aims for (2048 threads / 256), times two waves; the grid-stride
// loop covers any rows beyond. Also bounds how far `row` can run past `rows` before the loop ends.
constexpr int kBlocksPerSm = 16;
constexpr int64_t kMaxGridThreads = int64_t{1} << 24;

// minBlocks 2 lets ptxas use up to 128 registers: with 64 the widest variant (8 units in flight plus
// 64-bit row math) spilled a word.
template <typename V, typename I, typename Rows>
__global__ void __launch_bounds__(kThreads, 2)
    row_copy_kernel(Rows map, V* __restrict__ dst, I rows, int tpr_log2) {
  const I thread = static_cast<I>(blockIdx.x) * static_cast<I>(kThreads) + static_cast<I>(threadIdx.x);
  const I threads = static_cast<I>(gridDim.x) * static_cast<I>(kThreads);
  row_copy_thread<V, I>(map, dst, rows, tpr_log2, thread, threads);
}

// ---- host side ---------------------------------------------------------------------------------

// Largest power-of-two unit (16 bytes down to one element) dividing the head row, every stride and
// every base pointer: head rows then start on unit boundaries everywhere, so no unit straddles two
// head rows (which may come from different sources).
int64_t pick_unit(int64_t elem_size, int64_t head_dim, std::initializer_list<at::Tensor> tensors) {
  int64_t unit = 16;
  auto fits = [&](int64_t u) {
    if ((head_dim * elem_size) % u != 0) {
      return false;
    }
    for (const auto& t : tensors) {
      if (!t.defined()) {
        continue;
      }
      if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % static_cast<uintptr_t>(u) != 0) {
        return false;
      }
      for (int64_t d = 0; d < t.dim(); ++d) {
        if (t.size(d) > 1 && (t.stride(d) * elem_size) % u != 0) {
          return false;
        }
      }
    }
    return true;
  };
  while (unit > elem_size && !fits(unit)) {
    unit /= 2;
  }
  return unit;
}

// Largest unit offset + 1 that indexing `t` can form, in units: 32-bit indexing needs it to fit.
int64_t extent_units(const at::Tensor& t, int64_t elem_size, int64_t unit) {
  if (!t.defined() || t.numel() == 0) {
    return 0;
  }
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * t.stride(d);
  }
  return (last + 1) * elem_size / unit + 1;
}

bool fits_int32(int64_t total, std::initializer_list<int64_t> extents) {
  // Row indices may run one grid stride past the last row before the loop ends.
  int64_t largest = total + kMaxGridThreads;
  for (int64_t x : extents) {
    largest = std::max(largest, x);
  }
  return largest < std::numeric_limits<int32_t>::max();
}

int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) {
    return 132;
  }
  if (cached[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cached[device] = std::max(n, 1);
  }
  return cached[device];
}

template <typename V, typename I, typename Rows>
void launch(const Rows& map, const at::Tensor& out, int64_t total, cudaStream_t stream) {
  const int64_t row_units = static_cast<int64_t>(map.row_units());
  const int64_t rows = total / row_units;
  const RowCopyShape shape = row_copy_shape(rows, row_units);
  const int64_t threads_needed = rows << shape.tpr_log2;
  const int64_t cap = std::min<int64_t>(int64_t{sm_count(out.get_device())} * kBlocksPerSm,
                                        kMaxGridThreads / kThreads);
  const int64_t blocks = std::max<int64_t>(1, std::min(cap, (threads_needed + kThreads - 1) / kThreads));
  auto* dst = static_cast<V*>(out.mutable_data_ptr());
  row_copy_kernel<V, I, Rows><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      map, dst, static_cast<I>(rows), shape.tpr_log2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Dispatch over the copy unit (V) and index width (I). `run` is a generic lambda taking (V{}, I{}).
template <typename Run>
void dispatch_unit(int64_t unit, bool small, Run&& run) {
  auto with_index = [&](auto v) {
    if (small) {
      run(v, int32_t{0});
    } else {
      run(v, int64_t{0});
    }
  };
  switch (unit) {
    case 16:
      with_index(uint4{});
      break;
    case 8:
      with_index(uint2{});
      break;
    case 4:
      with_index(uint32_t{0});
      break;
    case 2:
      with_index(uint16_t{0});
      break;
    default:
      TORCH_CHECK(false, "pack kernels: unexpected copy unit of ", unit, " bytes");
  }
}

void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(!t.defined() || (t.device().is_cuda() && t.device() == ref.device()), op, " (CUDA kernel): ", name,
              " must be on ", ref.device(), ", got ", t.device());
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

}  // namespace

at::Tensor pack_qkv_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t world_size,
                         c10::IntArrayRef kv_index) {
  TORCH_CHECK(q.device().is_cuda(), "pack_qkv (CUDA kernel): q must be a CUDA tensor, got ", q.device());
  check_cuda("pack_qkv", "k", k, q);
  check_cuda("pack_qkv", "v", v, q);
  const c10::cuda::CUDAGuard device_guard(q.device());
  PackQkvArgs args = prepare_pack_qkv(q, k, v, world_size, kv_index);
  if (args.out.numel() == 0) {
    return args.out;
  }
  const int64_t es = args.elem_size;
  const int64_t unit = pick_unit(es, args.g.Du, {args.q, args.k, args.v, args.out});
  const int64_t f = unit / es;  // elements per unit
  const int64_t total = args.out.numel() / f;
  const bool small = fits_int32(total, {extent_units(args.q, es, unit), extent_units(args.k, es, unit),
                                        extent_units(args.v, es, unit)});
  dispatch_unit(unit, small, [&](auto vtag, auto itag) {
    using V = decltype(vtag);
    using I = decltype(itag);
    const auto map = make_pack_qkv_rows<V, I>(args, f);
    launch<V, I>(map, args.out, total, stream_of(q));
  });
  return args.out;
}

at::Tensor unpack_qkv_cuda(const at::Tensor& recv, int64_t seq_len, const c10::optional<at::Tensor>& joint_q,
                           const c10::optional<at::Tensor>& joint_k, const c10::optional<at::Tensor>& joint_v,
                           bool joint_front) {
  TORCH_CHECK(recv.device().is_cuda(), "unpack_qkv (CUDA kernel): recv must be a CUDA tensor, got ", recv.device());
  check_cuda("unpack_qkv", "joint_q", joint_q.value_or(at::Tensor()), recv);
  check_cuda("unpack_qkv", "joint_k", joint_k.value_or(at::Tensor()), recv);
  check_cuda("unpack_qkv", "joint_v", joint_v.value_or(at::Tensor()), recv);
  const c10::cuda::CUDAGuard device_guard(recv.device());
  UnpackQkvArgs args = prepare_unpack_qkv(recv, seq_len, joint_q, joint_k, joint_v, joint_front);
  if (args.out.numel() == 0) {
    return args.out;
  }
  const int64_t es = args.elem_size;
  const int64_t unit = pick_unit(es, args.g.Du, {args.recv, args.jq, args.jk, args.jv, args.out});
  const int64_t f = unit / es;
  const int64_t total = args.out.numel() / f;
  const bool small =
      fits_int32(total, {extent_units(args.recv, es, unit), extent_units(args.jq, es, unit),
                         extent_units(args.jk, es, unit), extent_units(args.jv, es, unit)});
  dispatch_unit(unit, small, [&](auto vtag, auto itag) {
    using V = decltype(vtag);
    using I = decltype(itag);
    const auto map = make_unpack_qkv_rows<V, I>(args, f);
    launch<V, I>(map, args.out, total, stream_of(recv));
  });
  return args.out;
}

at::Tensor pack_out_cuda(const at::Tensor& out_seq, const c10::optional<at::Tensor>& out_joint, int64_t world_size,
                         int64_t local_len, bool joint_front) {
  TORCH_CHECK(out_seq.device().is_cuda(), "pack_out (CUDA kernel): out_seq must be a CUDA tensor, got ",
              out_seq.device());
  check_cuda("pack_out", "out_joint", out_joint.value_or(at::Tensor()), out_seq);
  const c10::cuda::CUDAGuard device_guard(out_seq.device());
  PackOutArgs args = prepare_pack_out(out_seq, out_joint, world_size, local_len, joint_front);
  if (args.out.numel() == 0) {
    return args.out;
  }
  const int64_t es = args.elem_size;
  const int64_t unit = pick_unit(es, args.g.Du, {args.seq, args.joint, args.out});
  const int64_t f = unit / es;
  const int64_t total = args.out.numel() / f;
  const bool small =
      fits_int32(total, {extent_units(args.seq, es, unit), extent_units(args.joint, es, unit)});
  dispatch_unit(unit, small, [&](auto vtag, auto itag) {
    using V = decltype(vtag);
    using I = decltype(itag);
    const auto map = make_pack_out_rows<V, I>(args, f);
    launch<V, I>(map, args.out, total, stream_of(out_seq));
  });
  return args.out;
}

at::Tensor unpack_out_cuda(const at::Tensor& recv, int64_t heads) {
  TORCH_CHECK(recv.device().is_cuda(), "unpack_out (CUDA kernel): recv must be a CUDA tensor, got ", recv.device());
  const c10::cuda::CUDAGuard device_guard(recv.device());
  UnpackOutArgs args = prepare_unpack_out(recv, heads);
  if (args.out.numel() == 0) {
    return args.out;
  }
  const int64_t es = args.elem_size;
  const int64_t unit = pick_unit(es, args.g.Du, {args.recv, args.out});
  const int64_t f = unit / es;
  const int64_t total = args.out.numel() / f;
  const bool small = fits_int32(total, {extent_units(args.recv, es, unit)});
  dispatch_unit(unit, small, [&](auto vtag, auto itag) {
    using V = decltype(vtag);
    using I = decltype(itag);
    const auto map = make_unpack_out_rows<V, I>(args, f);
    launch<V, I>(map, args.out, total, stream_of(recv));
  });
  return args.out;
}

TORCH_LIBRARY_IMPL(sp_kernels, CUDA, m) {
  m.impl("pack_qkv", &pack_qkv_cuda);
  m.impl("unpack_qkv", &unpack_qkv_cuda);
  m.impl("pack_out", &pack_out_cuda);
  m.impl("unpack_out", &unpack_out_cuda);
}

}  // namespace sp_kernels
