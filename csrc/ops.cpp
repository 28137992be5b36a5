// Every sp_kernels operator schema, in one place. Backends register implementations elsewhere
// (csrc/<op>/<op>_cpu.cpp with TORCH_LIBRARY_IMPL(sp_kernels, CPU, m), csrc/<op>/<op>_cuda.cu with CUDA), so adding
// an op means: a schema here, a kernel per backend, and a Python face in sp_kernels/ops/.
#include <torch/library.h>

#include "sp_kernels/build_info.h"

TORCH_LIBRARY(sp_kernels, m) {
  // set_python_module names the module that registers the op's fake (meta) and autograd impls, so
  // torch imports it on demand when a user calls torch.ops.sp_kernels.* without importing it first.
  m.set_python_module("sp_kernels.ops.shard_pad");
  // y = x rows [start, start + length) along dim; rows past x's end are pad_value. New contiguous tensor.
  m.def("shard_pad(Tensor x, int dim, int start, int length, float pad_value) -> Tensor");

  // LSE merge of partial attention results (csrc/merge/merge.h has the contract).
  // Outputs [B, S, H, D] (stride 1 over D), lse [B, H, S] fp32; accumulators fp32.
  m.set_python_module("sp_kernels.ops.merge");
  m.def("lse_merge_(Tensor(a!) acc_out, Tensor(b!) acc_lse, Tensor block_out, Tensor block_lse) -> ()");
  m.def(
      "lse_merge_out(Tensor acc_out, Tensor acc_lse, Tensor block_out, Tensor block_lse, Tensor(a!) out, "
      "Tensor(b!) lse) -> ()");
  m.def("lse_merge_all(Tensor[] outs, Tensor[] lses, ScalarType out_dtype) -> (Tensor, Tensor)");
  m.def("lse_merge_all_out(Tensor[] outs, Tensor[] lses, Tensor(a!) out, Tensor(b!) lse) -> ()");

  // Ulysses pack/unpack (layouts in csrc/pack/pack_index.h). Each returns a new
  // contiguous tensor written in one pass; padding heads/rows are zero, dropped rows never copied.
  m.set_python_module("sp_kernels.ops.pack");
  m.def("pack_qkv(Tensor q, Tensor k, Tensor v, int world_size, int[] kv_index) -> Tensor");
  m.def(
      "unpack_qkv(Tensor recv, int seq_len, Tensor? joint_q, Tensor? joint_k, Tensor? joint_v, "
      "bool joint_front) -> Tensor");
  m.def("pack_out(Tensor out_seq, Tensor? out_joint, int world_size, int local_len, bool joint_front) -> Tensor");
  m.def("unpack_out(Tensor recv, int heads) -> Tensor");

  // No tensor argument, so no dispatch key: a catch-all kernel, answered by every build.
  m.def("_build_info() -> str", &sp_kernels::build_info_json);
}
