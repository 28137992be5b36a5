// Host-side contract of the Ulysses pack/unpack ops, shared by the CPU and CUDA implementations:
// validation (TORCH_CHECK messages name the argument), output allocation and the geometry (in
// elements) that each backend rescales to its copy unit.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "pack/pack_index.h"

namespace sp_kernels {

struct PackQkvArgs {
  at::Tensor q, k, v, out;
  PackQkvGeometry<int64_t> g;  // in elements (Du = D)
  KvIndexTable kv;
  int64_t elem_size = 0;
};

struct UnpackQkvArgs {
  at::Tensor recv, jq, jk, jv, out;  // jq/jk/jv undefined when there are no joint rows
  UnpackQkvGeometry<int64_t> g;
  int64_t elem_size = 0;
};

struct PackOutArgs {
  at::Tensor seq, joint, out;  // joint undefined when there are no joint rows
  PackOutGeometry<int64_t> g;
  int64_t elem_size = 0;
};

struct UnpackOutArgs {
  at::Tensor recv, out;
  UnpackOutGeometry<int64_t> g;
  int64_t elem_size = 0;
};

PackQkvArgs prepare_pack_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t world_size,
                             c10::IntArrayRef kv_index);
UnpackQkvArgs prepare_unpack_qkv(const at::Tensor& recv, int64_t seq_len, const c10::optional<at::Tensor>& joint_q,
                                 const c10::optional<at::Tensor>& joint_k, const c10::optional<at::Tensor>& joint_v,
                                 bool joint_front);
PackOutArgs prepare_pack_out(const at::Tensor& out_seq, const c10::optional<at::Tensor>& out_joint,
                             int64_t world_size, int64_t local_len, bool joint_front);
UnpackOutArgs prepare_unpack_out(const at::Tensor& recv, int64_t heads);

}  // namespace sp_kernels
