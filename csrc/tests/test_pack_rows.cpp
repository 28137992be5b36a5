// The CUDA pack kernels' body (row_copy_thread, csrc/pack/pack_rows.h) run on the CPU
// for every thread of several grids, on the same row maps the CUDA host code builds, and compared
// byte for byte with the CPU ops. What a GPU adds beyond this is the memory system, not the logic.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "pack/pack.h"
#include "pack/pack_rows.h"
#include "pack/pack_rows_host.h"

#include "check.h"

namespace {

using namespace sp_kernels;

// Host stand-ins for CUDA's uint4 / uint2 (same size, zero-initialised by V{}).
struct alignas(16) Vec16 {
  uint32_t x, y, z, w;
};
struct alignas(8) Vec8 {
  uint32_t x, y;
};

using sp_kernels_test::check;
using sp_kernels_test::g_failed;
using sp_kernels_test::g_passed;

// Runs the kernel body for every thread of grids of 1 block, 3 blocks and enough blocks for one pass.
template <typename V, typename I, typename Rows>
void emulate_and_compare(const Rows& map, const at::Tensor& out_like, const at::Tensor& want, const std::string& what) {
  const int64_t row_units = static_cast<int64_t>(map.row_units());
  const int64_t unit_bytes = static_cast<int64_t>(sizeof(V));
  const int64_t total = out_like.numel() * out_like.element_size() / unit_bytes;
  const int64_t rows = total / row_units;
  const RowCopyShape shape = row_copy_shape(rows, row_units);
  const int64_t one_pass = ((rows << shape.tpr_log2) + 255) / 256 * 256;
  for (int64_t threads : {int64_t{256}, int64_t{768}, std::max<int64_t>(256, one_pass)}) {
    at::Tensor out = at::full_like(out_like, 7);  // poisoned: every byte must be written
    auto* dst = static_cast<V*>(out.mutable_data_ptr());
    for (int64_t t = 0; t < threads; ++t) {
      row_copy_thread<V, I>(map, dst, static_cast<I>(rows), shape.tpr_log2, static_cast<I>(t), static_cast<I>(threads));
    }
    const bool same = out.sizes() == want.sizes() &&
                      std::memcmp(out.const_data_ptr(), want.const_data_ptr(), out.numel() * out.element_size()) == 0;
    check(same, what + " (" + std::to_string(threads) + " threads, " + std::to_string(sizeof(V)) + "-byte units, " +
                    std::to_string(sizeof(I) * 8) + "-bit index, tpr " + std::to_string(1 << shape.tpr_log2) + ")");
  }
}

at::Tensor rnd(at::IntArrayRef shape, at::ScalarType dtype) { return at::randn(shape, at::kFloat).to(dtype); }

c10::OperatorHandle op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

template <typename V>
void test_pack_qkv(at::ScalarType dtype, int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t P,
                   std::vector<int64_t> kv_index, bool fused) {
  at::Tensor q, k, v;
  if (fused) {  // slices of one fused projection: token stride (Hq + 2 Hkv) * D
    at::Tensor qkv = rnd({B, S, Hq + 2 * Hkv, D}, dtype);
    q = qkv.narrow(2, 0, Hq);
    k = qkv.narrow(2, Hq, Hkv);
    v = qkv.narrow(2, Hq + Hkv, Hkv);
  } else {
    q = rnd({B, S, Hq, D}, dtype);
    k = rnd({B, S, Hkv, D}, dtype);
    v = rnd({B, S, Hkv, D}, dtype);
  }
  const auto want = op_handle("sp_kernels::pack_qkv")
                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                          c10::IntArrayRef)>()
                        .call(q, k, v, P, kv_index);
  const PackQkvArgs args = prepare_pack_qkv(q, k, v, P, kv_index);
  const int64_t f = static_cast<int64_t>(sizeof(V)) / args.elem_size;
  const std::string what = "pack_qkv B" + std::to_string(B) + " S" + std::to_string(S) + " Hq" + std::to_string(Hq) +
                           " Hkv" + std::to_string(Hkv) + " D" + std::to_string(D) + " P" + std::to_string(P) +
                           (fused ? " fused" : "");
  emulate_and_compare<V, int32_t>(make_pack_qkv_rows<V, int32_t>(args, f), args.out, want, what);
  emulate_and_compare<V, int64_t>(make_pack_qkv_rows<V, int64_t>(args, f), args.out, want, what);
}

template <typename V>
void test_unpack_qkv(at::ScalarType dtype, int64_t P, int64_t B, int64_t S_loc, int64_t W, int64_t D, int64_t S,
                     int64_t J, int64_t hq, int64_t nkv, bool front) {
  const at::Tensor recv = rnd({P, B, S_loc, W, D}, dtype);
  c10::optional<at::Tensor> jq, jk, jv;
  if (J > 0) {
    jq = rnd({B, J, hq, D}, dtype);
    jk = rnd({B, J, nkv, D}, dtype);
    jv = rnd({B, J, nkv, D}, dtype);
  }
  const auto want = op_handle("sp_kernels::unpack_qkv")
                        .typed<at::Tensor(const at::Tensor&, int64_t, const c10::optional<at::Tensor>&,
                                          const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, bool)>()
                        .call(recv, S, jq, jk, jv, front);
  const UnpackQkvArgs args = prepare_unpack_qkv(recv, S, jq, jk, jv, front);
  const int64_t f = static_cast<int64_t>(sizeof(V)) / args.elem_size;
  const std::string what = "unpack_qkv P" + std::to_string(P) + " B" + std::to_string(B) + " S" + std::to_string(S) +
                           " J" + std::to_string(J) + (front ? " front" : " rear");
  emulate_and_compare<V, int32_t>(make_unpack_qkv_rows<V, int32_t>(args, f), args.out, want, what);
  emulate_and_compare<V, int64_t>(make_unpack_qkv_rows<V, int64_t>(args, f), args.out, want, what);
}

template <typename V>
void test_pack_out(at::ScalarType dtype, int64_t B, int64_t S, int64_t hq, int64_t D, int64_t P, int64_t L, int64_t J,
                   bool front) {
  const at::Tensor seq = rnd({B, S, hq, D}, dtype);
  c10::optional<at::Tensor> joint;
  if (J > 0) {
    joint = rnd({B, J, hq, D}, dtype);
  }
  const auto want = op_handle("sp_kernels::pack_out")
                        .typed<at::Tensor(const at::Tensor&, const c10::optional<at::Tensor>&, int64_t, int64_t,
                                          bool)>()
                        .call(seq, joint, P, L, front);
  const PackOutArgs args = prepare_pack_out(seq, joint, P, L, front);
  const int64_t f = static_cast<int64_t>(sizeof(V)) / args.elem_size;
  const std::string what = "pack_out B" + std::to_string(B) + " S" + std::to_string(S) + " hq" + std::to_string(hq) +
                           " P" + std::to_string(P) + " L" + std::to_string(L) + " J" + std::to_string(J);
  emulate_and_compare<V, int32_t>(make_pack_out_rows<V, int32_t>(args, f), args.out, want, what);
  emulate_and_compare<V, int64_t>(make_pack_out_rows<V, int64_t>(args, f), args.out, want, what);
}

template <typename V>
void test_unpack_out(at::ScalarType dtype, int64_t P, int64_t B, int64_t R, int64_t hq, int64_t D, int64_t heads) {
  const at::Tensor recv = rnd({P, B, R, hq, D}, dtype);
  const auto want =
      op_handle("sp_kernels::unpack_out").typed<at::Tensor(const at::Tensor&, int64_t)>().call(recv, heads);
  const UnpackOutArgs args = prepare_unpack_out(recv, heads);
  const int64_t f = static_cast<int64_t>(sizeof(V)) / args.elem_size;
  const std::string what = "unpack_out P" + std::to_string(P) + " B" + std::to_string(B) + " R" + std::to_string(R) +
                           " heads" + std::to_string(heads);
  emulate_and_compare<V, int32_t>(make_unpack_out_rows<V, int32_t>(args, f), args.out, want, what);
  emulate_and_compare<V, int64_t>(make_unpack_out_rows<V, int64_t>(args, f), args.out, want, what);
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto bf16 = at::kBFloat16;
  const auto f32 = at::kFloat;
  // pack_qkv: MHA with a padding head (Hq 5 over P 2), GQA (8 q / 2 kv heads over P 4, kv table
  // 0 0 1 1), B 2, fused-projection strides, D 64 (16-byte units, 8 per row), D 40 (5 units), fp32 D 7.
  test_pack_qkv<Vec16>(bf16, 1, 6, 5, 5, 64, 2, {0, 1, 2, 3, 4, 0}, false);
  test_pack_qkv<Vec16>(bf16, 2, 5, 8, 2, 40, 4, {0, 0, 1, 1}, true);
  test_pack_qkv<Vec8>(bf16, 2, 3, 4, 4, 128, 2, {0, 1, 2, 3}, false);
  test_pack_qkv<uint32_t>(f32, 2, 4, 3, 3, 7, 3, {0, 1, 2}, false);
  // unpack_qkv: padding rows dropped (S < P * S_loc), joint rows front and rear, B 1 and 2.
  test_unpack_qkv<Vec16>(bf16, 3, 2, 4, 3 + 2 * 1, 64, 10, 0, 3, 1, true);
  test_unpack_qkv<Vec16>(bf16, 2, 2, 5, 2 + 2 * 2, 40, 9, 3, 2, 2, true);
  test_unpack_qkv<Vec16>(bf16, 4, 1, 3, 1 + 2 * 1, 256, 11, 2, 1, 1, false);
  test_unpack_qkv<uint32_t>(f32, 2, 2, 3, 4, 7, 5, 1, 2, 1, false);
  // pack_out: zero rows where a rank holds padding, joint rows front and rear, hq * Du from 5 to 320
  // units (rows longer than one chunk of 32 lanes x 8 units loop over chunks).
  test_pack_out<Vec16>(bf16, 2, 7, 3, 64, 2, 4, 0, true);
  test_pack_out<Vec16>(bf16, 1, 9, 2, 40, 4, 3, 2, true);
  test_pack_out<Vec16>(bf16, 2, 5, 20, 128, 2, 3, 1, false);
  test_pack_out<uint32_t>(f32, 2, 5, 3, 7, 3, 2, 2, false);
  // unpack_out: padding heads dropped (heads < P * hq).
  test_unpack_out<Vec16>(bf16, 2, 2, 6, 3, 64, 5);
  test_unpack_out<Vec16>(bf16, 4, 1, 5, 2, 40, 8);
  test_unpack_out<uint32_t>(f32, 3, 2, 4, 2, 7, 5);
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
