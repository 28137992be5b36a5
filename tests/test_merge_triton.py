"""Triton merge kernels without a GPU: ahead-of-time PTX for sm_80/sm_90 (the interpreter runs them on
CPU tensors in tests/test_merge.py, in process).

The ahead-of-time compile needs no GPU and catches what the interpreter forgives (types, layouts,
vectorisation): the PTX must show 16-byte global loads and stores for the row data, and the in-place
pair merge must have a CTA barrier between every load of the accumulator (lse and rows) and the
first store to the destination (issue 13: without it a lagging warp could read the new lse). The GPU
test at the end runs that race-prone shape for real; it skips without CUDA.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile for sm_80 and sm_90
# ---------------------------------------------------------------------------------------------

_VEC_LOAD = re.compile(r"ld\.global(?:\.\w+)*\.v4\.(?:b32|u32|f32)")
_VEC_STORE = re.compile(r"st\.global(?:\.\w+)*\.v4\.(?:b32|u32|f32)")
_DTYPE = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}

# Integer arguments the kernels multiply into row offsets of the [B, S, H, D] tensors: multiples of
# 16 elements for D = 128 layouts, which Triton's JIT specialises on (tt.divisibility = 16), so the
# AOT compile is told the same.
_ROW_STRIDES = {"acc_sb", "acc_ss", "acc_sh", "blk_sb", "blk_ss", "blk_sh", "dst_sb", "dst_ss", "dst_sh"}
_ROW_STRIDES |= {"in_sb", "in_ss", "in_sh"}


def _compile(fn, sig: dict, constexprs: dict, arch: int, num_warps: int = 4) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {}
    for i, name in enumerate(fn.arg_names):
        kind = sig[name]
        if isinstance(kind, tuple):
            for j in range(len(kind)):
                attrs[(i, j)] = [["tt.divisibility", 16]]
        elif kind.startswith("*") or name in _ROW_STRIDES:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}).asm["ptx"]


def _pair_signature(fn, blk: str, dst: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in ("D", "BLOCK_D", "BLOCK_R"):
            sig[name] = "constexpr"
        elif name == "blk_ptr":
            sig[name] = _DTYPE[blk]
        elif name == "dst_ptr":
            sig[name] = _DTYPE[dst]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


def _ways_signature(fn, ways: int, src: str, dst: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in ("W", "D", "BLOCK_D", "BLOCK_R"):
            sig[name] = "constexpr"
        elif name == "srcs":
            sig[name] = tuple([_DTYPE[src]] * ways)
        elif name == "lses":
            sig[name] = tuple(["*fp32"] * ways)
        elif name == "dst_ptr":
            sig[name] = _DTYPE[dst]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("blk,dst", [("bf16", "fp32"), ("fp16", "bf16"), ("fp32", "fp32")])
def test_aot_pair_kernel_vectorised(arch, blk, dst):
    from sp_kernels.ops.triton import merge as tm

    fn = tm.merge_pair_kernel
    block_d, block_r = tm._meta(128)
    ptx = _compile(fn, _pair_signature(fn, blk, dst), {"D": 128, "BLOCK_D": block_d, "BLOCK_R": block_r}, arch)
    assert f".target sm_{arch}" in ptx
    assert _VEC_LOAD.search(ptx), "no 16-byte global loads in the pair kernel's PTX"
    assert _VEC_STORE.search(ptx), "no 16-byte global stores in the pair kernel's PTX"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("ways,src,dst", [(4, "bf16", "bf16"), (8, "fp16", "fp32"), (2, "fp32", "bf16")])
def test_aot_ways_kernel_vectorised(arch, ways, src, dst):
    from sp_kernels.ops.triton import merge as tm

    fn = tm.merge_ways_kernel
    block_d, block_r = tm._meta(128)
    consts = {"W": ways, "D": 128, "BLOCK_D": block_d, "BLOCK_R": block_r}
    ptx = _compile(fn, _ways_signature(fn, ways, src, dst), consts, arch)
    assert f".target sm_{arch}" in ptx
    assert _VEC_LOAD.search(ptx), "no 16-byte global loads in the W-way kernel's PTX"
    assert _VEC_STORE.search(ptx), "no 16-byte global stores in the W-way kernel's PTX"


def test_aot_odd_head_dim_compiles():
    # D = 72 is not a power of two: the column mask path (BLOCK_D = 128) must compile too.
    from sp_kernels.ops.triton import merge as tm

    block_d, block_r = tm._meta(72)
    fn = tm.merge_pair_kernel
    ptx = _compile(fn, _pair_signature(fn, "bf16", "fp32"), {"D": 72, "BLOCK_D": block_d, "BLOCK_R": block_r}, 90)
    assert "st.global" in ptx


# ---------------------------------------------------------------------------------------------
# in-place pair merge: no cross-warp read-after-write race (issue 13)
# ---------------------------------------------------------------------------------------------

_PTX_REG = re.compile(r"%[a-z]+\d+")
_PTX_BARRIER = re.compile(r"^(?:bar|barrier)(?:\.cta)?\.sync\b")


def _ptx_accesses(ptx: str, kernel: str, params: dict[str, int]) -> tuple[list[tuple[int, str, str]], list[int]]:
    """Global loads/stores of the kernel's PTX with the pointer parameter each address derives from.

    A small taint analysis over the (straight-line) PTX: ``ld.param`` of ``<kernel>_param_<i>`` taints
    its destination with the parameter's name, every other instruction passes the union of its source
    registers' taints to its destination (the first operand), and a global load's destination is
    data, not an address, so it carries no taint. Returns ([(line, "ld"/"st", param)], [barrier lines]).
    """
    by_index = {i: name for name, i in params.items()}
    taint: dict[str, set[str]] = {}
    accesses: list[tuple[int, str, str]] = []
    barriers: list[int] = []
    for lineno, raw in enumerate(ptx.splitlines()):
        line = raw.split("//", 1)[0].strip().rstrip(";").strip()
        line = re.sub(r"^@!?%p\d+\s+", "", line)
        if not line or line.startswith((".", "$", "{", "}")) or line.endswith(":"):
            continue
        opcode, _, rest = line.partition(" ")
        if _PTX_BARRIER.match(opcode):
            barriers.append(lineno)
            continue
        if opcode.startswith("ld.param"):
            m = re.search(rf"\[{re.escape(kernel)}_param_(\d+)\]", rest)
            regs = _PTX_REG.findall(rest)
            if m and regs and int(m.group(1)) in by_index:
                taint[regs[0]] = {by_index[int(m.group(1))]}
            continue
        if opcode.startswith(("ld.global", "st.global")):
            addr = re.search(r"\[([^\]]*)\]", rest)
            names = set().union(*(taint.get(r, set()) for r in _PTX_REG.findall(addr.group(1) if addr else "")))
            for name in names:
                accesses.append((lineno, opcode[:2], name))
            continue
        regs = _PTX_REG.findall(rest)
        if regs:
            taint[regs[0]] = set().union(taint.get(regs[0], set()), *(taint.get(r, set()) for r in regs[1:]))
    return accesses, barriers


def _assert_barrier_between(ptx: str, kernel: str, params: dict[str, int], src: str, dst: str) -> None:
    accesses, barriers = _ptx_accesses(ptx, kernel, params)
    loads = [line for line, kind, name in accesses if kind == "ld" and name == src]
    stores = [line for line, kind, name in accesses if kind == "st" and name == dst]
    assert loads and stores, f"PTX analysis found no loads of {src} or no stores to {dst}: {accesses}"
    last_load, first_store = max(loads), min(stores)
    assert last_load < first_store, f"a store to {dst} (PTX line {first_store}) precedes a load of {src} ({last_load})"
    assert any(last_load < b < first_store for b in barriers), (
        f"no bar.sync between the last load of {src} (PTX line {last_load}) and the first store to {dst} "
        f"(line {first_store}); barriers at {barriers}: in place (lse_merge_) another warp may read the new value"
    )


@pytest.mark.parametrize(
    "arch,blk,D,num_warps",
    [(90, "bf16", 128, 4), (90, "fp32", 128, 4), (90, "fp16", 72, 4), (90, "bf16", 64, 8), (90, "fp32", 16, 4)]
    + [(80, "bf16", 128, 4)],
)
def test_aot_pair_kernel_in_place_barrier(arch, blk, D, num_warps):
    # In place, acc_lse is dst_lse and acc is dst (fp32). Every load of either (the compiler loads
    # acc_lse once per register layout it needs) must precede a CTA barrier that precedes the first
    # store to the destination, as the CUDA kernel's __syncthreads does.
    from sp_kernels.ops.triton import merge as tm

    fn = tm.merge_pair_kernel
    block_d, block_r = tm._meta(D)
    consts = {"D": D, "BLOCK_D": block_d, "BLOCK_R": block_r}
    ptx = _compile(fn, _pair_signature(fn, blk, "fp32"), consts, arch, num_warps)
    runtime = [name for name in fn.arg_names if name not in consts]
    params = {name: runtime.index(name) for name in ("acc_ptr", "acc_lse_ptr", "dst_ptr", "dst_lse_ptr")}
    _assert_barrier_between(ptx, "merge_pair_kernel", params, "acc_lse_ptr", "dst_lse_ptr")
    _assert_barrier_between(ptx, "merge_pair_kernel", params, "acc_ptr", "dst_ptr")
    _assert_barrier_between(ptx, "merge_pair_kernel", params, "acc_lse_ptr", "dst_ptr")
    _assert_barrier_between(ptx, "merge_pair_kernel", params, "acc_ptr", "dst_lse_ptr")


# ---------------------------------------------------------------------------------------------
# on a GPU: the in-place merge over many rows and several warps against an fp64 reference
# ---------------------------------------------------------------------------------------------

GPU_TRITON = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
GPU_SKIP = "needs a CUDA GPU and compiled Triton (TRITON_INTERPRET unset): the in-place race shows only on hardware"


def _merge64(acc, acc_lse, blk, blk_lse):
    """Exact pair merge in fp64 on the CPU; -inf rows merge to (0, -inf)."""
    lses = torch.stack([acc_lse.double().cpu(), blk_lse.double().cpu()])
    total = torch.logsumexp(lses, dim=0)
    empty = torch.isneginf(total)
    w = torch.exp(lses - total.masked_fill(empty, 0.0)).masked_fill(empty, 0.0).transpose(2, 3)[..., None]
    return acc.double().cpu() * w[0] + blk.double().cpu() * w[1], total


def _launch_pair_in_place(acc, acc_lse, blk, blk_lse, num_warps: int) -> None:
    # sp_kernels.ops.triton.merge.merge_pair with the warp count chosen (the race needs several warps).
    from sp_kernels.ops.triton import merge as tm

    B, S, H, D = acc.shape
    block_d, block_r = tm._meta(D)
    tm.merge_pair_kernel[(triton.cdiv(B * S * H, block_r),)](
        acc, acc_lse, blk, blk_lse, acc, acc_lse, B * S * H, S, H,
        *tm._out_strides(acc), *tm._out_strides(blk), *tm._out_strides(acc),
        *tm._lse_strides(acc_lse), *tm._lse_strides(blk_lse), *tm._lse_strides(acc_lse),
        D=D, BLOCK_D=block_d, BLOCK_R=block_r, num_warps=num_warps,
    )  # fmt: skip


@pytest.mark.skipif(not GPU_TRITON, reason=GPU_SKIP)
@pytest.mark.parametrize("D,blk_dtype", [(128, torch.bfloat16), (64, torch.float32), (72, torch.float16)])
@pytest.mark.parametrize("num_warps", [4, 8])
def test_gpu_in_place_pair_merge_many_rows(monkeypatch, D, blk_dtype, num_warps):
    # Both lse close together: a warp that read the new lse instead of the old one would weight the
    # accumulator by about 1 instead of about 1/2, far outside the tolerance. Repeated launches give
    # the scheduler many chances; rows of -inf check the empty path under the same schedule.
    g = torch.Generator(device="cuda").manual_seed(D + num_warps)
    B, S, H = 2, 2048, 16  # 65536 rows: 2048 programs (D = 128), each 32 rows over all warps
    for rep in range(5):
        acc = torch.randn(B, S, H, D, device="cuda", generator=g)
        acc_lse = torch.randn(B, H, S, device="cuda", generator=g) * 2.0
        blk = torch.randn(B, S, H, D, device="cuda", generator=g).to(blk_dtype)
        blk_lse = acc_lse + 0.1 * torch.randn(B, H, S, device="cuda", generator=g)
        acc_lse[:, :, ::97] = float("-inf")
        blk_lse[:, 1, ::5] = float("-inf")
        want_out, want_lse = _merge64(acc, acc_lse, blk, blk_lse)
        if rep % 2:
            from sp_kernels.ops import merge as merge_mod

            monkeypatch.setenv("SP_KERNELS_IMPL", "triton")
            merge_mod.lse_merge_(acc, acc_lse, blk, blk_lse)  # the op's own launch (4 warps)
        else:
            _launch_pair_in_place(acc, acc_lse, blk, blk_lse, num_warps)
        torch.cuda.synchronize()
        torch.testing.assert_close(acc_lse.double().cpu(), want_lse, atol=2e-5, rtol=1e-6)
        torch.testing.assert_close(acc.double().cpu(), want_out, atol=3e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the in-process interpreter leaves triton.language as it found it
# ---------------------------------------------------------------------------------------------


def test_interpreter_leaves_triton_language_unpatched(monkeypatch, tmp_path):
    # The interpreter swaps triton.language's builtins for its own while a kernel runs. A device call
    # into triton's own library (tl.max's combine function) used to leave tl.core's swapped for good,
    # and every later compile in the process that missed Triton's cache then failed -- an AOT test's
    # result depended on the order tests ran in and on the cache directory.
    from sp_kernels.ops import merge as merge_mod
    from sp_kernels.ops import pack as pk
    from sp_kernels.ops.triton import merge as tm
    from tests.triton_interp import _language_snapshot, language_changes, use_interpreter

    snapshot = _language_snapshot()
    g = torch.Generator().manual_seed(3)
    outs = [torch.randn(1, 5, 2, 72, generator=g) for _ in range(3)]
    lses = [torch.randn(1, 2, 5, generator=g) for _ in range(3)]
    q = torch.randn(1, 6, 4, 64, generator=g)
    with monkeypatch.context() as m:
        use_interpreter(m, "merge")
        use_interpreter(m, "pack")
        merged, _ = merge_mod.lse_merge_all(outs, lses, torch.float32)
        acc, acc_lse = outs[0].clone(), lses[0].clone()
        merge_mod.lse_merge_(acc, acc_lse, outs[1], lses[1])
        pk.pack_qkv(q, q, q, 2, [0, 1, 2, 3])
    assert torch.isfinite(merged).all()
    assert language_changes(snapshot) == []
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a real compile, not a cache hit
    block_d, block_r = tm._meta(128)
    fn = tm.merge_pair_kernel
    ptx = _compile(fn, _pair_signature(fn, "bf16", "fp32"), {"D": 128, "BLOCK_D": block_d, "BLOCK_R": block_r}, 90)
    assert "st.global" in ptx
    assert any(tmp_path.iterdir()), "the compile did not go through the fresh cache directory"
