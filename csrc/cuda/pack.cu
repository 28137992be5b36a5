// CUDA implementation of the Ulysses pack/unpack ops: one pass, each output unit written once by
// one thread, 16-byte units whenever head_dim, strides and pointers allow (always for bf16/fp16
// with head_dim a multiple of 8). Where each head row comes from is the index math of
// pack_index.h, shared with the CPU kernels.
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

#include "sp_kernels/pack.h"
#include "sp_kernels/pack_index.h"

namespace sp_kernels {

namespace {

constexpr int kThreads = 256;
// Units per thread: independent loads in flight before the first store, which a copy kernel needs
// to approach DRAM bandwidth.
constexpr int kUnroll = 4;
constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kUnroll;

// ---- per-op element maps: output unit e -> value (a source unit or zero) ----------------------

template <typename V, typename I>
struct PackQkvMap {
  const V* q;
  const V* k;
  const V* v;
  PackQkvGeometry<I> g;
  KvIndexTable kv;

  __device__ __forceinline__ V operator()(I e) const {
    const I c = e % g.Du;
    const I hr = e / g.Du;
    const I h = hr % g.W;
    const I row = hr / g.W;
    const I s = row % g.S;
    const I pb = row / g.S;
    const auto ref = pack_qkv_source(g, kv, pb / g.B, pb % g.B, s, h);
    if (ref.which == kSrcZero) {
      return V{};
    }
    const V* base = ref.which == kSrcQ ? q : (ref.which == kSrcK ? k : v);
    return base[ref.offset + c];
  }
};

template <typename V, typename I>
struct UnpackQkvMap {
  const V* recv;
  const V* jq;
  const V* jk;
  const V* jv;
  UnpackQkvGeometry<I> g;

  __device__ __forceinline__ V operator()(I e) const {
    const I c = e % g.Du;
    const I hr = e / g.Du;
    const I h = hr % g.W;
    const I row = hr / g.W;
    const I rows = unpack_qkv_rows(g);
    const auto ref = unpack_qkv_source(g, row / rows, row % rows, h);
    const V* base = ref.which == kSrcSeq ? recv : (ref.which == kSrcQ ? jq : (ref.which == kSrcK ? jk : jv));
    return base[ref.offset + c];
  }
};

template <typename V, typename I>
struct PackOutMap {
  const V* seq;
  const V* joint;
  PackOutGeometry<I> g;

  __device__ __forceinline__ V operator()(I e) const {
    const I row_units = g.hq * g.Du;
    const I c = e % row_units;
    const I row = e / row_units;
    const I rows = pack_out_rows(g);
    const I pb = row / rows;
    const auto ref = pack_out_row_source(g, pb / g.B, pb % g.B, row % rows);
    if (ref.which == kSrcZero) {
      return V{};
    }
    return (ref.which == kSrcJoint ? joint : seq)[ref.offset + c];
  }
};

template <typename V, typename I>
struct UnpackOutMap {
  const V* recv;
  UnpackOutGeometry<I> g;

  __device__ __forceinline__ V operator()(I e) const {
    const I c = e % g.Du;
    const I hr = e / g.Du;
    const I h = hr % g.Hq;
    const I row = hr / g.Hq;
    return recv[unpack_out_source(g, row / g.R, row % g.R, h) + c];
  }
};

template <typename V, typename I, typename Map>
__global__ void __launch_bounds__(kThreads) pack_copy_kernel(Map map, V* __restrict__ dst, I total) {
  const I base = static_cast<I>(blockIdx.x) * static_cast<I>(kTile) + static_cast<I>(threadIdx.x);
  V values[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const I e = base + static_cast<I>(u * kThreads);
    if (e < total) {
      values[u] = map(e);
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const I e = base + static_cast<I>(u * kThreads);
    if (e < total) {
      dst[e] = values[u];
    }
  }
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
  const int64_t blocks = (total + kTile - 1) / kTile;
  int64_t largest = blocks * kTile;
  for (int64_t x : extents) {
    largest = std::max(largest, x);
  }
  return largest < std::numeric_limits<int32_t>::max();
}

template <typename V, typename I, typename Map>
void launch(const Map& map, const at::Tensor& out, int64_t total, cudaStream_t stream) {
  const int64_t blocks = (total + kTile - 1) / kTile;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "pack kernels: output too large (", total, " units)");
  auto* dst = static_cast<V*>(out.mutable_data_ptr());
  pack_copy_kernel<V, I, Map><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(map, dst, static_cast<I>(total));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename V>
const V* ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<const V*>(t.const_data_ptr()) : nullptr;
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
  PackQkvPlan plan = prepare_pack_qkv(q, k, v, world_size, kv_index);
  if (plan.out.numel() == 0) {
    return plan.out;
  }
  const int64_t es = plan.elem_size;
  const int64_t unit = pick_unit(es, plan.g.Du, {plan.q, plan.k, plan.v, plan.out});
  const int64_t f = unit / es;  // elements per unit
  const int64_t total = plan.out.numel() / f;
  const bool small = fits_int32(total, {extent_units(plan.q, es, unit), extent_units(plan.k, es, unit),
                                        extent_units(plan.v, es, unit)});
  const auto& g = plan.g;
  dispatch_unit(unit, small, [&](auto vtag, auto itag) {
    using V = decltype(vtag);
    using I = decltype(itag);
    PackQkvMap<V, I> map;
    map.q = ptr<V>(plan.q);
    map.k = ptr<V>(plan.k);
    map.v = ptr<V>(plan.v);
    map.g = PackQkvGeometry<I>{I(g.P),        I(g.B),        I(g.S),        I(g.Hq),       I(g.hq),
                               I(g.nkv),      I(g.W),        I(g.Du / f),   I(g.q_sb / f), I(g.q_ss / f),
                               I(g.k_sb / f), I(g.k_ss / f), I(g.v_sb / f), I(g.v_ss / f)};
    map.kv = plan.kv;
    launch<V, I>(map, plan.out, total, stream_of(q));
  });
  return plan.out;
}

at::Tensor unpack_qkv_cuda(const at::Tensor& recv, int64_t seq_len, const c10::optional<at::Tensor>& joint_q,
                           const c10::optional<at::Tensor>& joint_k, const c10::optional<at::Tensor>& joint_v,
                           bool joint_front) {
  TORCH_CHECK(recv.device().is_cuda(), "unpack_qkv (CUDA kernel): recv must be a CUDA tensor, got ", recv.device());
  check_cuda("unpack_qkv", "joint_q", joint_q.value_or(at::Tensor()), recv);
  check_cuda("unpack_qkv", "joint_k", joint_k.value_or(at::Tensor()), recv);
  check_cuda("unpack_qkv", "joint_v", joint_v.value_or(at::Tensor()), recv);
  const c10::cuda::CUDAGuard device_guard(recv.device());
  UnpackQkvPlan plan = prepare_unpack_qkv(recv, seq_len, joint_q, joint_k, joint_v, joint_front);
  if (plan.out.numel() == 0) {
    return plan.out;
  }
  const int64_t es = plan.elem_size;
  const int64_t unit = pick_unit(es, plan.g.Du, {plan.recv, plan.jq, plan.jk, plan.jv, plan.out});
  const int64_t f = unit / es;
  const int64_t total = plan.out.numel() / f;
  const bool small =
      fits_int32(total, {extent_units(plan.recv, es, unit), extent_units(plan.jq, es, unit),
                         extent_units(plan.jk, es, unit), extent_units(plan.jv, es, unit)});
  const auto& g = plan.g;
  dispatch_unit(unit, small, [&](auto vtag, auto itag) {
    using V = decltype(vtag);
    using I = decltype(itag);
    UnpackQkvMap<V, I> map;
    map.recv = ptr<V>(plan.recv);
    map.jq = ptr<V>(plan.jq);
    map.jk = ptr<V>(plan.jk);
    map.jv = ptr<V>(plan.jv);
    map.g = UnpackQkvGeometry<I>{I(g.P),         I(g.B),         I(g.S_loc),     I(g.S),         I(g.J),
                                 I(g.W),         I(g.hq),        I(g.nkv),       I(g.Du / f),    I(g.front),
                                 I(g.jq_sb / f), I(g.jq_ss / f), I(g.jk_sb / f), I(g.jk_ss / f), I(g.jv_sb / f),
                                 I(g.jv_ss / f)};
    launch<V, I>(map, plan.out, total, stream_of(recv));
  });
  return plan.out;
}

at::Tensor pack_out_cuda(const at::Tensor& out_seq, const c10::optional<at::Tensor>& out_joint, int64_t world_size,
                         int64_t local_len, bool joint_front) {
  TORCH_CHECK(out_seq.device().is_cuda(), "pack_out (CUDA kernel): out_seq must be a CUDA tensor, got ",
              out_seq.device());
  check_cuda("pack_out", "out_joint", out_joint.value_or(at::Tensor()), out_seq);
  const c10::cuda::CUDAGuard device_guard(out_seq.device());
  PackOutPlan plan = prepare_pack_out(out_seq, out_joint, world_size, local_len, joint_front);
  if (plan.out.numel() == 0) {
    return plan.out;
  }
  const int64_t es = plan.elem_size;
  const int64_t unit = pick_unit(es, plan.g.Du, {plan.seq, plan.joint, plan.out});
  const int64_t f = unit / es;
  const int64_t total = plan.out.numel() / f;
  const bool small =
      fits_int32(total, {extent_units(plan.seq, es, unit), extent_units(plan.joint, es, unit)});
  const auto& g = plan.g;
  dispatch_unit(unit, small, [&](auto vtag, auto itag) {
    using V = decltype(vtag);
    using I = decltype(itag);
    PackOutMap<V, I> map;
    map.seq = ptr<V>(plan.seq);
    map.joint = ptr<V>(plan.joint);
    map.g = PackOutGeometry<I>{I(g.P),        I(g.B),        I(g.L),        I(g.S),       I(g.J),   I(g.hq),
                               I(g.Du / f),   I(g.front),    I(g.o_sb / f), I(g.o_ss / f), I(g.j_sb / f),
                               I(g.j_ss / f)};
    launch<V, I>(map, plan.out, total, stream_of(out_seq));
  });
  return plan.out;
}

at::Tensor unpack_out_cuda(const at::Tensor& recv, int64_t heads) {
  TORCH_CHECK(recv.device().is_cuda(), "unpack_out (CUDA kernel): recv must be a CUDA tensor, got ", recv.device());
  const c10::cuda::CUDAGuard device_guard(recv.device());
  UnpackOutPlan plan = prepare_unpack_out(recv, heads);
  if (plan.out.numel() == 0) {
    return plan.out;
  }
  const int64_t es = plan.elem_size;
  const int64_t unit = pick_unit(es, plan.g.Du, {plan.recv, plan.out});
  const int64_t f = unit / es;
  const int64_t total = plan.out.numel() / f;
  const bool small = fits_int32(total, {extent_units(plan.recv, es, unit)});
  const auto& g = plan.g;
  dispatch_unit(unit, small, [&](auto vtag, auto itag) {
    using V = decltype(vtag);
    using I = decltype(itag);
    UnpackOutMap<V, I> map;
    map.recv = ptr<V>(plan.recv);
    map.g = UnpackOutGeometry<I>{I(g.P), I(g.B), I(g.R), I(g.hq), I(g.Hq), I(g.Du / f)};
    launch<V, I>(map, plan.out, total, stream_of(recv));
  });
  return plan.out;
}

TORCH_LIBRARY_IMPL(sp_kernels, CUDA, m) {
  m.impl("pack_qkv", &pack_qkv_cuda);
  m.impl("unpack_qkv", &unpack_qkv_cuda);
  m.impl("pack_out", &pack_out_cuda);
  m.impl("unpack_out", &unpack_out_cuda);
}

}  // namespace sp_kernels
