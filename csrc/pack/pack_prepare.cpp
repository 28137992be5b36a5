// Validation and output allocation of the Ulysses pack/unpack ops (used by the CPU and CUDA kernels).
#include <ATen/ATen.h>

#include "pack/pack.h"

namespace sp_kernels {

namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// A [B, rows, heads, D] tensor whose head rows are contiguous (unit stride along D, heads packed);
// its batch and token strides may be anything (e.g. a slice of the attention output).
void check_bshd(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be [batch, seq, heads, head_dim] (4 dims), got shape ", t.sizes());
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), op, ": unsupported dtype ", t.scalar_type(), " for ", name,
              " (supported: float32, float64, float16, bfloat16)");
  const int64_t D = t.size(3);
  TORCH_CHECK((t.size(3) <= 1 || t.stride(3) == 1) && (t.size(2) <= 1 || t.stride(2) == D), op, ": ", name,
              " must have contiguous [heads, head_dim] rows (strides (*, *, ", D, ", 1)), got strides ",
              t.strides());
}

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type());
}

void check_contiguous_5d(const char* op, const at::Tensor& recv) {
  TORCH_CHECK(recv.dim() == 5, op, ": recv must have 5 dims [P, B, rows, heads, head_dim], got shape ",
              recv.sizes());
  TORCH_CHECK(is_supported_dtype(recv.scalar_type()), op, ": unsupported dtype ", recv.scalar_type(),
              " for recv (supported: float32, float64, float16, bfloat16)");
  TORCH_CHECK(recv.is_contiguous(), op, ": recv must be contiguous, got strides ", recv.strides());
}

at::Tensor empty_like_dtype(const at::Tensor& ref, at::IntArrayRef sizes) {
  return at::empty(sizes, ref.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace

PackQkvArgs prepare_pack_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t world_size,
                             c10::IntArrayRef kv_index) {
  constexpr const char* op = "pack_qkv";
  check_bshd(op, "q", q);
  check_bshd(op, "k", k);
  check_bshd(op, "v", v);
  check_same(op, "k", k, q, "q");
  check_same(op, "v", v, q, "q");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k ", k.sizes(), " and v ", v.sizes(), " must have the same shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": k/v ", k.sizes(), " must match q ", q.sizes(), " in batch, seq and head_dim");
  TORCH_CHECK(world_size >= 1, op, ": world_size must be >= 1, got ", world_size);
  const int64_t n_idx = static_cast<int64_t>(kv_index.size());
  TORCH_CHECK(n_idx >= world_size && n_idx % world_size == 0, op, ": kv_index must hold world_size * nkv >= ",
              world_size, " entries, got ", n_idx);
  TORCH_CHECK(n_idx <= kMaxKvIndex, op, ": kv_index holds ", n_idx, " entries, more than the supported ",
              kMaxKvIndex);
  const int64_t Hkv = k.size(2);
  PackQkvArgs args;
  for (int64_t i = 0; i < n_idx; ++i) {
    TORCH_CHECK(kv_index[i] >= 0 && kv_index[i] < Hkv, op, ": kv_index[", i, "] = ", kv_index[i],
                " is out of range for ", Hkv, " key/value heads");
    args.kv.idx[i] = static_cast<int32_t>(kv_index[i]);
  }
  const int64_t B = q.size(0), S = q.size(1), Hq = q.size(2), D = q.size(3);
  TORCH_CHECK(Hq >= 1, op, ": q must have at least one head");
  auto& g = args.g;
  g.P = world_size;
  g.B = B;
  g.S = S;
  g.Hq = Hq;
  g.hq = (Hq + world_size - 1) / world_size;
  g.nkv = n_idx / world_size;
  g.W = g.hq + 2 * g.nkv;
  g.Du = D;
  g.q_sb = q.stride(0);
  g.q_ss = q.stride(1);
  g.k_sb = k.stride(0);
  g.k_ss = k.stride(1);
  g.v_sb = v.stride(0);
  g.v_ss = v.stride(1);
  args.q = q;
  args.k = k;
  args.v = v;
  args.elem_size = static_cast<int64_t>(q.element_size());
  args.out = empty_like_dtype(q, {g.P, B, S, g.W, D});
  return args;
}

UnpackQkvArgs prepare_unpack_qkv(const at::Tensor& recv, int64_t seq_len, const c10::optional<at::Tensor>& joint_q,
                                 const c10::optional<at::Tensor>& joint_k, const c10::optional<at::Tensor>& joint_v,
                                 bool joint_front) {
  constexpr const char* op = "unpack_qkv";
  check_contiguous_5d(op, recv);
  const int64_t P = recv.size(0), B = recv.size(1), S_loc = recv.size(2), W = recv.size(3), D = recv.size(4);
  TORCH_CHECK(seq_len >= 0 && seq_len <= P * S_loc, op, ": seq_len must be in [0, P * S_loc] = [0, ", P * S_loc,
              "], got ", seq_len);
  const int n_joint = int(joint_q.has_value()) + int(joint_k.has_value()) + int(joint_v.has_value());
  TORCH_CHECK(n_joint == 0 || n_joint == 3, op, ": joint_q, joint_k and joint_v must be given together");
  UnpackQkvArgs args;
  auto& g = args.g;
  g.P = P;
  g.B = B;
  g.S_loc = S_loc;
  g.S = seq_len;
  g.W = W;
  g.Du = D;
  g.front = joint_front ? 1 : 0;
  g.J = 0;
  g.hq = W;
  g.nkv = 0;
  g.jq_sb = g.jq_ss = g.jk_sb = g.jk_ss = g.jv_sb = g.jv_ss = 0;
  if (n_joint == 3) {
    const at::Tensor& jq = *joint_q;
    const at::Tensor& jk = *joint_k;
    const at::Tensor& jv = *joint_v;
    check_bshd(op, "joint_q", jq);
    check_bshd(op, "joint_k", jk);
    check_bshd(op, "joint_v", jv);
    check_same(op, "joint_q", jq, recv, "recv");
    check_same(op, "joint_k", jk, recv, "recv");
    check_same(op, "joint_v", jv, recv, "recv");
    TORCH_CHECK(jk.sizes() == jv.sizes(), op, ": joint_k ", jk.sizes(), " and joint_v ", jv.sizes(),
                " must have the same shape");
    TORCH_CHECK(jq.size(0) == B && jk.size(0) == B, op, ": joint batch must be ", B, " (recv's), got joint_q ",
                jq.sizes(), " and joint_k ", jk.sizes());
    TORCH_CHECK(jq.size(1) == jk.size(1), op, ": joint_q has ", jq.size(1), " rows but joint_k has ", jk.size(1));
    TORCH_CHECK(jq.size(3) == D && jk.size(3) == D, op, ": joint head_dim must be ", D, " (recv's)");
    TORCH_CHECK(jq.size(2) + 2 * jk.size(2) == W, op, ": joint heads (q ", jq.size(2), " + 2 * kv ", jk.size(2),
                ") must equal recv's head slots ", W);
    g.J = jq.size(1);
    g.hq = jq.size(2);
    g.nkv = jk.size(2);
    g.jq_sb = jq.stride(0);
    g.jq_ss = jq.stride(1);
    g.jk_sb = jk.stride(0);
    g.jk_ss = jk.stride(1);
    g.jv_sb = jv.stride(0);
    g.jv_ss = jv.stride(1);
    args.jq = jq;
    args.jk = jk;
    args.jv = jv;
  }
  args.recv = recv;
  args.elem_size = static_cast<int64_t>(recv.element_size());
  args.out = empty_like_dtype(recv, {B, seq_len + g.J, W, D});
  return args;
}

PackOutArgs prepare_pack_out(const at::Tensor& out_seq, const c10::optional<at::Tensor>& out_joint,
                             int64_t world_size, int64_t local_len, bool joint_front) {
  constexpr const char* op = "pack_out";
  check_bshd(op, "out_seq", out_seq);
  TORCH_CHECK(world_size >= 1, op, ": world_size must be >= 1, got ", world_size);
  TORCH_CHECK(local_len >= 0, op, ": local_len must be >= 0, got ", local_len);
  const int64_t B = out_seq.size(0), S = out_seq.size(1), hq = out_seq.size(2), D = out_seq.size(3);
  TORCH_CHECK(S <= world_size * local_len, op, ": out_seq has ", S, " rows, more than world_size * local_len = ",
              world_size * local_len);
  PackOutArgs args;
  auto& g = args.g;
  g.P = world_size;
  g.B = B;
  g.L = local_len;
  g.S = S;
  g.J = 0;
  g.hq = hq;
  g.Du = D;
  g.front = joint_front ? 1 : 0;
  g.o_sb = out_seq.stride(0);
  g.o_ss = out_seq.stride(1);
  g.j_sb = g.j_ss = 0;
  if (out_joint.has_value()) {
    const at::Tensor& j = *out_joint;
    check_bshd(op, "out_joint", j);
    check_same(op, "out_joint", j, out_seq, "out_seq");
    TORCH_CHECK(j.size(0) == B && j.size(2) == hq && j.size(3) == D, op, ": out_joint ", j.sizes(),
                " must match out_seq ", out_seq.sizes(), " in batch, heads and head_dim");
    g.J = j.size(1);
    g.j_sb = j.stride(0);
    g.j_ss = j.stride(1);
    args.joint = j;
  }
  args.seq = out_seq;
  args.elem_size = static_cast<int64_t>(out_seq.element_size());
  args.out = empty_like_dtype(out_seq, {world_size, B, g.J + local_len, hq, D});
  return args;
}

UnpackOutArgs prepare_unpack_out(const at::Tensor& recv, int64_t heads) {
  constexpr const char* op = "unpack_out";
  check_contiguous_5d(op, recv);
  const int64_t P = recv.size(0), B = recv.size(1), R = recv.size(2), hq = recv.size(3), D = recv.size(4);
  TORCH_CHECK(heads >= 1 && hq == (heads + P - 1) / P, op, ": heads must satisfy ceil(heads / P) == hq (P = ", P,
              ", hq = ", hq, "), got heads = ", heads);
  UnpackOutArgs args;
  args.g = UnpackOutGeometry<int64_t>{P, B, R, hq, heads, D};
  args.recv = recv;
  args.elem_size = static_cast<int64_t>(recv.element_size());
  args.out = empty_like_dtype(recv, {B, R, heads, D});
  return args;
}

}  // namespace sp_kernels
