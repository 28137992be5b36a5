// Host side of the row-copy pack kernels: the row maps built from prepared args, for a copy unit of
// `f` elements (f > 1: vectors). Used by csrc/pack/pack_cuda.cu and by the CPU emulation test, so both
// run the kernel body on exactly the same maps.
#pragma once

#include <ATen/ATen.h>

#include "pack/pack.h"
#include "pack/pack_rows.h"

namespace sp_kernels {

template <typename V>
const V* unit_ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<const V*>(t.const_data_ptr()) : nullptr;
}

template <typename V, typename I>
PackQkvRows<V, I> make_pack_qkv_rows(const PackQkvArgs& args, int64_t f) {
  const auto& g = args.g;
  PackQkvRows<V, I> m;
  m.q = unit_ptr<V>(args.q);
  m.k = unit_ptr<V>(args.k);
  m.v = unit_ptr<V>(args.v);
  m.g = PackQkvGeometry<I>{I(g.P),        I(g.B),        I(g.S),        I(g.Hq),       I(g.hq),
                           I(g.nkv),      I(g.W),        I(g.Du / f),   I(g.q_sb / f), I(g.q_ss / f),
                           I(g.k_sb / f), I(g.k_ss / f), I(g.v_sb / f), I(g.v_ss / f)};
  m.kv = args.kv;
  return m;
}

template <typename V, typename I>
UnpackQkvRows<V, I> make_unpack_qkv_rows(const UnpackQkvArgs& args, int64_t f) {
  const auto& g = args.g;
  UnpackQkvRows<V, I> m;
  m.recv = unit_ptr<V>(args.recv);
  m.jq = unit_ptr<V>(args.jq);
  m.jk = unit_ptr<V>(args.jk);
  m.jv = unit_ptr<V>(args.jv);
  m.g = UnpackQkvGeometry<I>{I(g.P),         I(g.B),         I(g.S_loc),     I(g.S),         I(g.J),
                             I(g.W),         I(g.hq),        I(g.nkv),       I(g.Du / f),    I(g.front),
                             I(g.jq_sb / f), I(g.jq_ss / f), I(g.jk_sb / f), I(g.jk_ss / f), I(g.jv_sb / f),
                             I(g.jv_ss / f)};
  return m;
}

template <typename V, typename I>
PackOutRows<V, I> make_pack_out_rows(const PackOutArgs& args, int64_t f) {
  const auto& g = args.g;
  PackOutRows<V, I> m;
  m.seq = unit_ptr<V>(args.seq);
  m.joint = unit_ptr<V>(args.joint);
  m.g = PackOutGeometry<I>{I(g.P),      I(g.B),     I(g.L),        I(g.S),        I(g.J),        I(g.hq),
                           I(g.Du / f), I(g.front), I(g.o_sb / f), I(g.o_ss / f), I(g.j_sb / f), I(g.j_ss / f)};
  return m;
}

template <typename V, typename I>
UnpackOutRows<V, I> make_unpack_out_rows(const UnpackOutArgs& args, int64_t f) {
  const auto& g = args.g;
  UnpackOutRows<V, I> m;
  m.recv = unit_ptr<V>(args.recv);
  m.g = UnpackOutGeometry<I>{I(g.P), I(g.B), I(g.R), I(g.hq), I(g.Hq), I(g.Du / f)};
  return m;
}

}  // namespace sp_kernels
