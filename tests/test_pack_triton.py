"""Triton pack/unpack kernels: interpreter runs on CPU tensors and ahead-of-time PTX for sm_80 / sm_90.

The interpreter tests run in this process on a private interpreted copy of the kernels
(tests/triton_interp.py); the ahead-of-time tests compile the real ones. Nothing here imports
triton at module level.
"""

from __future__ import annotations

import pytest
import torch

from tests.pack_cases import (
    OUT_CASES,
    QKV_CASES,
    expected_pack_out,
    expected_pack_qkv,
    expected_unpack_out,
    expected_unpack_qkv,
    rand,
)
from tests.poison import poisoned
from tests.triton_interp import needs_triton, use_interpreter

# Tiny shapes: the interpreter executes every program in Python.
INTERP_QKV = [c for c in QKV_CASES if c.B * c.S_loc * c.P <= 32]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def triton_impl(monkeypatch):
    use_interpreter(monkeypatch, "pack")
    import sp_kernels.ops.pack as pk

    return pk


@needs_triton
@pytest.mark.parametrize("case", INTERP_QKV, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interp_pack_qkv(triton_impl, case, dtype):
    g = torch.Generator().manual_seed(0)
    fused = rand((case.B, case.S_loc, case.Hq + 2 * case.Hkv, case.D), dtype, g)
    q, k, v = fused[:, :, : case.Hq], fused[:, :, case.Hq : case.Hq + case.Hkv], fused[:, :, case.Hq + case.Hkv :]
    with poisoned():
        got = triton_impl.pack_qkv(q, k, v, case.P, case.kv_index)
    assert torch.equal(got, expected_pack_qkv(q, k, v, case.P, case.kv_index))


@needs_triton
@pytest.mark.parametrize("case", INTERP_QKV[:4], ids=str)
@pytest.mark.parametrize("joint", [None, "front", "rear"])
def test_interp_unpack_qkv(triton_impl, case, joint):
    g = torch.Generator().manual_seed(1)
    hq = -(-case.Hq // case.P)
    nkv = len(case.kv_index) // case.P
    recv = rand((case.P, case.B, case.S_loc, hq + 2 * nkv, case.D), torch.bfloat16, g)
    jq = jk = jv = None
    if joint:
        jq = rand((case.B, 2, hq + 1, case.D), torch.bfloat16, g)[:, :, 1:]
        jk, jv = (rand((case.B, 2, nkv, case.D), torch.bfloat16, g) for _ in range(2))
    for seq_len in (case.P * case.S_loc, case.P * case.S_loc - 1, 1):
        with poisoned():
            got = triton_impl.unpack_qkv(recv, seq_len, jq, jk, jv, joint != "rear")
        assert torch.equal(got, expected_unpack_qkv(recv, seq_len, jq, jk, jv, joint != "rear")), (seq_len, joint)


@needs_triton
@pytest.mark.parametrize("case", OUT_CASES, ids=str)
@pytest.mark.parametrize("front", [True, False])
def test_interp_pack_out(triton_impl, case, front):
    B, S, P, L, hq, D, J = case
    g = torch.Generator().manual_seed(2)
    out_seq = rand((B, J + S + 1, hq, D), torch.float16, g)[:, 1 : 1 + S]
    out_joint = rand((B, J, hq, D), torch.float16, g) if J else None
    with poisoned():
        got = triton_impl.pack_out(out_seq, out_joint, P, L, front)
    assert torch.equal(got, expected_pack_out(out_seq, out_joint, P, L, front))


@needs_triton
@pytest.mark.parametrize("heads,P,D", [(8, 2, 64), (5, 2, 80), (3, 4, 128), (6, 4, 64)])
def test_interp_unpack_out(triton_impl, heads, P, D):
    g = torch.Generator().manual_seed(3)
    recv = rand((P, 2, 3, -(-heads // P), D), torch.float32, g)
    with poisoned():
        got = triton_impl.unpack_out(recv, heads)
    assert torch.equal(got, expected_unpack_out(recv, heads))


# ---- ahead-of-time compilation: no GPU needed ---------------------------------------------------


def _aot_ptx(kernel, arch: int, D: int = 128) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sp_kernels.ops.triton.pack import _meta

    block_d, block_r = _meta(D)
    constexprs = {"D": D, "BLOCK_D": block_d, "BLOCK_R": block_r}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i16" if name != "kv_ptr" else "*i32"
            attrs[(i,)] = [["tt.divisibility", 16]]  # what the JIT specialises for 16-byte aligned tensors
        else:
            signature[name] = "i32"
            if name.endswith(("_sb", "_ss")):
                attrs[(i,)] = [["tt.divisibility", 16]]  # strides of D-multiple rows
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    return compiled.asm["ptx"]


@needs_triton
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", ["pack_qkv", "unpack_qkv", "pack_out", "unpack_out"])
def test_aot_ptx_has_16_byte_accesses(name, arch):
    from sp_kernels.ops.triton.pack import KERNELS

    ptx = _aot_ptx(KERNELS[name], arch)
    assert f".target sm_{arch}" in ptx
    loads = ptx.count("ld.global.v4.b32")
    stores = ptx.count("st.global.v4.b32")
    assert loads > 0 and stores > 0, f"{name} sm_{arch}: {loads} v4 loads, {stores} v4 stores"
    # No narrower global accesses of the copied data: every element moves in 16-byte vectors.
    narrow = [ln for ln in ptx.splitlines() if "st.global" in ln and ".v4." not in ln]
    assert not narrow, f"{name} sm_{arch}: narrow stores {narrow[:3]}"
