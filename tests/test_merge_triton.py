"""Triton merge kernels without a GPU: the interpreter run of tests/test_merge.py, and AOT PTX for sm_80/sm_90.

TRITON_INTERPRET must be set before triton is imported, and this pytest process has imported it
already (or may have), so the interpreter tests run in a child pytest with the variable set.
The ahead-of-time compile needs no GPU and catches what the interpreter forgives (types, layouts,
vectorisation): the PTX must show 16-byte global loads and stores for the row data.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

triton = pytest.importorskip("triton")


def test_triton_interpreter_run_of_test_merge():
    env = dict(os.environ, TRITON_INTERPRET="1", SP_KERNELS_TEST_TRITON="1")
    env.pop("SP_KERNELS_IMPL", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/test_merge.py",
            "-q",
            "-k",
            "triton and not cuda",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    match = re.search(r"(\d+) passed", proc.stdout)
    assert match is not None and int(match.group(1)) >= 40, tail
    # Only the one large-shape test may skip itself under the interpreter.
    skipped = re.search(r"(\d+) skipped", proc.stdout)
    assert skipped is None or int(skipped.group(1)) <= 1, tail


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


def _compile(fn, sig: dict, constexprs: dict, arch: int) -> str:
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
    return triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm["ptx"]


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
    from sp_kernels.triton import merge as tm

    fn = tm.merge_pair_kernel
    block_d, block_r = tm._meta(128)
    ptx = _compile(fn, _pair_signature(fn, blk, dst), {"D": 128, "BLOCK_D": block_d, "BLOCK_R": block_r}, arch)
    assert f".target sm_{arch}" in ptx
    assert _VEC_LOAD.search(ptx), "no 16-byte global loads in the pair kernel's PTX"
    assert _VEC_STORE.search(ptx), "no 16-byte global stores in the pair kernel's PTX"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("ways,src,dst", [(4, "bf16", "bf16"), (8, "fp16", "fp32"), (2, "fp32", "bf16")])
def test_aot_ways_kernel_vectorised(arch, ways, src, dst):
    from sp_kernels.triton import merge as tm

    fn = tm.merge_ways_kernel
    block_d, block_r = tm._meta(128)
    consts = {"W": ways, "D": 128, "BLOCK_D": block_d, "BLOCK_R": block_r}
    ptx = _compile(fn, _ways_signature(fn, ways, src, dst), consts, arch)
    assert f".target sm_{arch}" in ptx
    assert _VEC_LOAD.search(ptx), "no 16-byte global loads in the W-way kernel's PTX"
    assert _VEC_STORE.search(ptx), "no 16-byte global stores in the W-way kernel's PTX"


def test_aot_odd_head_dim_compiles():
    # D = 72 is not a power of two: the column mask path (BLOCK_D = 128) must compile too.
    from sp_kernels.triton import merge as tm

    block_d, block_r = tm._meta(72)
    fn = tm.merge_pair_kernel
    ptx = _compile(fn, _pair_signature(fn, "bf16", "fp32"), {"D": 72, "BLOCK_D": block_d, "BLOCK_R": block_r}, 90)
    assert "st.global" in ptx
