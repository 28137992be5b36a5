"""LSE merge ops (sp_kernels/ops/merge.py): every implementation against independent fp64 references.

The main property: merging the (out, lse) of softmax attention over disjoint key blocks equals
softmax attention over the union of the keys. Checked with random block sizes (empty blocks
included), several part dtypes and W, plus -inf rows, lse values 1e4 apart, strided layouts and
poisoned destinations. The Triton implementation runs on CPU tensors under Triton's interpreter, in
this process (tests/triton_interp.py); its compiled PTX is checked in tests/test_merge_triton.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from sp_kernels.ops import _ext
from tests.op_utils import OpRecorder, force_impl
from tests.poison import nan_full
from tests.triton_interp import needs_triton, use_interpreter

merge_mod = importlib.import_module("sp_kernels.ops.merge")

NATIVE = merge_mod.NATIVE_OPS_REGISTERED
NATIVE_SKIP = f"native extension not built or not loadable: {_ext.native_error()}"

IMPLS = [
    pytest.param("native", marks=pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)),
    pytest.param("triton", marks=needs_triton),  # Triton's interpreter, in this process
    "torch",
]
PART_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = float("-inf")


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch) -> str:
    monkeypatch.setenv("SP_KERNELS_IMPL", request.param)
    if request.param == "triton":
        use_interpreter(monkeypatch, "merge")
    return request.param


# ---------------------------------------------------------------------------------------------
# independent fp64 references
# ---------------------------------------------------------------------------------------------


def attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in fp64 from its definition: (out [B, Sq, H, D], lse [B, H, Sq]); no keys -> (0, -inf)."""
    q, k, v = q.double(), k.double(), v.double()
    B, Sq, H, D = q.shape
    if k.shape[1] == 0:
        return torch.zeros(B, Sq, H, D, dtype=torch.float64), torch.full((B, H, Sq), NEG_INF, dtype=torch.float64)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse


def merge64(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of the parts as given (already rounded to their dtypes), in fp64 with logsumexp."""
    lse_stack = torch.stack([x.double() for x in lses])  # [W, B, H, S]
    total = torch.logsumexp(lse_stack, dim=0)
    empty = torch.isneginf(total)
    w = torch.exp(lse_stack - total.masked_fill(empty, 0.0)).masked_fill(empty, 0.0)  # [W, B, H, S]
    out = sum(o.double() * wi.transpose(1, 2)[..., None] for o, wi in zip(outs, w))
    return out, total


def split_attention(seed: int, sizes: list[int], dtype: torch.dtype, B=2, Sq=7, H=3, D=16, scale=0.35):
    """Queries attended to key blocks of the given sizes: per-block (out in dtype, lse fp32), and the full result."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, sum(sizes), H, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, sum(sizes), H, D, generator=g, dtype=torch.float64) + 0.5
    parts, start = [], 0
    for n in sizes:
        o, lse = attention64(q, k[:, start : start + n], v[:, start : start + n], scale)
        parts.append((o.to(dtype), lse.float()))
        start += n
    return parts, attention64(q, k, v, scale)


def tolerance(dtype: torch.dtype) -> float:
    # Per-part rounding of the outputs (values of order 1) dominates: bf16 has 8 mantissa bits.
    return {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


# ---------------------------------------------------------------------------------------------
# merging blocks == attention over the union of keys
# ---------------------------------------------------------------------------------------------


def random_sizes(seed: int, ways: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 9, (ways,), generator=g).tolist()
    if ways > 1:
        sizes[int(torch.randint(0, ways, (1,), generator=g))] = 0  # one empty block in every case
    if sum(sizes) == 0:
        sizes[-1] = 5
    return sizes


@pytest.mark.parametrize("ways", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", PART_DTYPES, ids=str)
def test_stepwise_merge_equals_full_attention(impl, ways, dtype):
    sizes = random_sizes(100 + ways, ways)
    parts, (full_out, full_lse) = split_attention(ways, sizes, dtype)
    acc = parts[0][0].float().clone()
    acc_lse = parts[0][1].clone()
    for o, lse in parts[1:]:
        merge_mod.lse_merge_(acc, acc_lse, o, lse)
    want_out, want_lse = merge64([p[0] for p in parts], [p[1] for p in parts])
    # The kernel against the exact merge of the same rounded parts: only fp32 arithmetic error.
    torch.testing.assert_close(acc.double(), want_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(acc_lse.double(), want_lse, atol=2e-5, rtol=1e-6)
    # And the semantics: attention over all keys at once.
    torch.testing.assert_close(acc.double(), full_out, atol=tolerance(dtype), rtol=0)
    torch.testing.assert_close(acc_lse.double(), full_lse, atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("ways", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", PART_DTYPES, ids=str)
def test_w_way_merge_equals_full_attention(impl, ways, dtype):
    sizes = random_sizes(200 + ways, ways)
    parts, (full_out, full_lse) = split_attention(10 + ways, sizes, dtype)
    outs, lses = [p[0] for p in parts], [p[1] for p in parts]
    want_out, want_lse = merge64(outs, lses)
    for out_dtype in PART_DTYPES:
        out, lse = merge_mod.lse_merge_all(outs, lses, out_dtype)
        assert out.dtype == out_dtype and lse.dtype == torch.float32
        assert out.shape == outs[0].shape and lse.shape == lses[0].shape
        rounding = 0.0 if out_dtype == torch.float32 else tolerance(out_dtype)
        torch.testing.assert_close(out.double(), want_out, atol=2e-5 + rounding, rtol=1e-5)
        torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=1e-6)
        torch.testing.assert_close(out.double(), full_out, atol=tolerance(dtype) + rounding, rtol=0)
        torch.testing.assert_close(lse.double(), full_lse, atol=2e-5, rtol=1e-6)
    # Into poisoned destinations (a strided slice, as the ring's joint output is), and from one stacked tensor.
    big = nan_full((2, 7, 5, 16), torch.bfloat16)
    dest = big[:, :, 1:4]
    dest_lse = nan_full((2, 7, 3), torch.float32).transpose(1, 2)
    merge_mod.lse_merge_all(torch.stack(outs), torch.stack(lses), out=dest, lse=dest_lse)
    torch.testing.assert_close(dest.double(), want_out, atol=tolerance(torch.bfloat16), rtol=1e-5)
    torch.testing.assert_close(dest_lse.double(), want_lse, atol=2e-5, rtol=1e-6)
    assert torch.isnan(big[:, :, 0]).all() and torch.isnan(big[:, :, 4]).all(), "wrote outside the destination"


@pytest.mark.parametrize("dtype", PART_DTYPES, ids=str)
def test_final_write_into_poisoned_output(impl, dtype):
    parts, (full_out, full_lse) = split_attention(7, [4, 0, 6], dtype)
    acc = parts[0][0].float().clone()
    acc_lse = parts[0][1].clone()
    merge_mod.lse_merge_(acc, acc_lse, *parts[1])
    acc_before, lse_before = acc.clone(), acc_lse.clone()
    for out_dtype in PART_DTYPES:
        out = nan_full(acc.shape, out_dtype)
        lse = nan_full(acc_lse.shape, torch.float32)
        merge_mod.lse_merge_out(acc, acc_lse, *parts[2], out, lse)
        rounding = 0.0 if out_dtype == torch.float32 else tolerance(out_dtype)
        torch.testing.assert_close(out.double(), full_out, atol=tolerance(dtype) + rounding, rtol=0)
        torch.testing.assert_close(lse.double(), full_lse, atol=2e-5, rtol=1e-6)
        assert torch.equal(acc, acc_before) and torch.equal(acc_lse, lse_before), "the accumulator must not change"


# ---------------------------------------------------------------------------------------------
# -inf rows, far-apart lse, layouts
# ---------------------------------------------------------------------------------------------


def synthetic_parts(seed: int, ways: int, dtype: torch.dtype, spread: float, B=2, S=6, H=3, D=24):
    g = torch.Generator().manual_seed(seed)
    outs = [(torch.randn(B, S, H, D, generator=g) + 2.0).to(dtype) for _ in range(ways)]
    lses = [torch.randn(B, H, S, generator=g) * spread for _ in range(ways)]
    return outs, lses


@pytest.mark.parametrize("ways", [1, 2, 3, 8])
def test_neg_inf_rows(impl, ways):
    outs, lses = synthetic_parts(ways, ways, torch.bfloat16, 3.0)
    # Row (0, h0, s0): empty in every part -> lse -inf, out exactly 0. Row (1, h1, s2): empty in all
    # but the last part -> exactly that part. Empty parts carry finite garbage that must get weight 0.
    for i in range(ways):
        lses[i][0, 0, 0] = NEG_INF
        if i < ways - 1:
            lses[i][1, 1, 2] = NEG_INF
    out, lse = merge_mod.lse_merge_all(outs, lses, torch.float32)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.isneginf(lse[0, 0, 0]) and torch.equal(out[0, 0, 0], torch.zeros_like(out[0, 0, 0]))
    assert lse[1, 1, 2] == lses[-1][1, 1, 2]
    assert torch.equal(out[1, 2, 1], outs[-1][1, 2, 1].float())
    want_out, want_lse = merge64(outs, lses)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=1e-6)

    # The same through the step-wise merge, starting from an empty accumulator (what a ring step
    # with no keys yet holds): garbage in the accumulator, lse -inf.
    acc = torch.full(outs[0].shape, 123.0)
    acc_lse = torch.full(lses[0].shape, NEG_INF)
    for o, x in zip(outs, lses):
        merge_mod.lse_merge_(acc, acc_lse, o, x)
    assert torch.isneginf(acc_lse[0, 0, 0]) and torch.equal(acc[0, 0, 0], torch.zeros_like(acc[0, 0, 0]))
    assert torch.equal(acc[1, 2, 1], outs[-1][1, 2, 1].float())
    torch.testing.assert_close(acc.double(), want_out, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("ways", [2, 3, 8])
def test_lse_far_apart(impl, ways):
    # lse 1e4 apart: exp of a difference overflows fp32 unless the max is taken first.
    outs, lses = synthetic_parts(50 + ways, ways, torch.float32, 1e4)
    lses[0][0, 0, 0] = 1e4
    lses[1][0, 0, 0] = -1e4
    out, lse = merge_mod.lse_merge_all(outs, lses, torch.float32)
    want_out, want_lse = merge64(outs, lses)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=0, rtol=1e-6)
    acc, acc_lse = outs[0].clone(), lses[0].clone()
    for o, x in zip(outs[1:], lses[1:]):
        merge_mod.lse_merge_(acc, acc_lse, o, x)
    torch.testing.assert_close(acc.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acc_lse.double(), want_lse, atol=0, rtol=1e-6)


def test_equal_lse_adds_log2(impl):
    outs, lses = synthetic_parts(3, 2, torch.float32, 1.0)
    lses[1] = lses[0].clone()
    acc, acc_lse = outs[0].clone(), lses[0].clone()
    merge_mod.lse_merge_(acc, acc_lse, outs[1], lses[1])
    torch.testing.assert_close(acc_lse.double(), lses[0].double() + torch.log(torch.tensor(2.0, dtype=torch.float64)))
    torch.testing.assert_close(acc, (outs[0] + outs[1]) / 2)


@pytest.mark.parametrize("dtype", PART_DTYPES, ids=str)
def test_strided_layouts(impl, dtype):
    """Outputs as attention kernels produce them ([B, H, S, D] memory viewed as BSHD), lse [B, S, H] memory."""
    g = torch.Generator().manual_seed(5)
    B, S, H, D = 2, 9, 3, 40
    outs = [(torch.randn(B, H, S, D, generator=g) + 1).to(dtype).transpose(1, 2) for _ in range(3)]
    lses = [torch.randn(B, S, H, generator=g).transpose(1, 2) for _ in range(3)]
    assert not outs[0].is_contiguous() and not lses[0].is_contiguous()
    want_out, want_lse = merge64(outs, lses)
    out, lse = merge_mod.lse_merge_all(outs, lses, torch.float32)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=1e-6)
    # Mixed layouts (one contiguous part among strided ones).
    mixed = [outs[0].contiguous(), outs[1], outs[2]]
    out, _ = merge_mod.lse_merge_all(mixed, [lses[0].contiguous(), lses[1], lses[2]], torch.float32)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=1e-5)
    # Step-wise into a strided accumulator.
    acc = torch.empty(B, H, S, D).transpose(1, 2)
    acc.copy_(outs[0])
    acc_lse = torch.empty(B, S, H).transpose(1, 2)
    acc_lse.copy_(lses[0])
    for o, x in zip(outs[1:], lses[1:]):
        merge_mod.lse_merge_(acc, acc_lse, o, x)
    torch.testing.assert_close(acc.double(), want_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(acc_lse.double(), want_lse, atol=2e-5, rtol=1e-6)


def test_many_ways_fold(impl):
    # W above one launch's limit (8 on CUDA and Triton): merged in groups, then the groups.
    outs, lses = synthetic_parts(9, 19, torch.bfloat16, 4.0, D=8)
    want_out, want_lse = merge64(outs, lses)
    out, lse = merge_mod.lse_merge_all(outs, lses, torch.float32)
    torch.testing.assert_close(out.double(), want_out, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=3e-5, rtol=1e-6)


@pytest.mark.parametrize("shape", [(0, 4, 2, 8), (1, 0, 2, 8), (2, 3, 2, 1), (1, 5, 1, 3)])
def test_odd_shapes(impl, shape):
    B, S, H, D = shape
    g = torch.Generator().manual_seed(1)
    outs = [torch.randn(B, S, H, D, generator=g).bfloat16() for _ in range(3)]
    lses = [torch.randn(B, H, S, generator=g) for _ in range(3)]
    out, lse = merge_mod.lse_merge_all(outs, lses, torch.float32)
    want_out, want_lse = merge64(outs, lses)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=1e-6)


def test_large_rows_split_across_threads(impl):
    # Many rows: the CPU kernel's tasks split them; every row must still be written exactly once.
    if impl == "triton":
        pytest.skip("large shape: too slow under the Triton interpreter")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        outs, lses = synthetic_parts(4, 3, torch.bfloat16, 2.0, B=1, S=3000, H=5, D=64)
        want_out, want_lse = merge64(outs, lses)
        dest = nan_full(outs[0].shape, torch.float32)
        dest_lse = nan_full(lses[0].shape, torch.float32)
        merge_mod.lse_merge_all(outs, lses, out=dest, lse=dest_lse)
        torch.testing.assert_close(dest.double(), want_out, atol=2e-5, rtol=1e-5)
        acc, acc_lse = outs[0].float(), lses[0].clone()
        merge_mod.lse_merge_(acc, acc_lse, outs[1], lses[1])
        merge_mod.lse_merge_(acc, acc_lse, outs[2], lses[2])
        torch.testing.assert_close(acc.double(), want_out, atol=2e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# implementations agree with each other; dispatch
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)
def test_native_pair_matches_native_w_way_bitwise(monkeypatch):
    # merge_math.h's W-way lse reduces to the pair formula for W = 2 (log1p of the non-max term).
    monkeypatch.setenv("SP_KERNELS_IMPL", "native")
    outs, lses = synthetic_parts(77, 2, torch.float32, 5.0)
    acc, acc_lse = outs[0].clone(), lses[0].clone()
    merge_mod.lse_merge_(acc, acc_lse, outs[1], lses[1])
    _, lse = merge_mod.lse_merge_all(outs, lses, torch.float32)
    assert torch.equal(acc_lse, lse)


@pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)
@pytest.mark.parametrize("forced", [None, "native", "torch"])
def test_dispatch_choice(monkeypatch, forced):
    force_impl(monkeypatch, forced)
    outs, lses = synthetic_parts(1, 2, torch.float32, 1.0)
    with OpRecorder() as rec:
        merge_mod.lse_merge_all(outs, lses)
        merge_mod.lse_merge_(outs[0], lses[0], outs[1], lses[1])
    native = [op for op in rec.ops if "sp_kernels." in op]
    assert len(native) == (0 if forced == "torch" else 2), rec.ops


def test_forced_unavailable_impl_says_why(monkeypatch):
    outs, lses = synthetic_parts(1, 2, torch.float32, 1.0)
    monkeypatch.setenv("SP_KERNELS_IMPL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="SP_KERNELS_IMPL=triton but lse_merge cannot use it on cpu"):
        merge_mod.lse_merge_all(outs, lses)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck, fake impls
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)
def test_opcheck():
    ops = torch.ops.sp_kernels
    for dtype in PART_DTYPES:
        outs, lses = synthetic_parts(3, 3, dtype, 2.0, D=16)
        acc = torch.randn(outs[0].shape)
        acc_lse = torch.randn(lses[0].shape)
        torch.library.opcheck(ops.lse_merge_.default, (acc, acc_lse, outs[1], lses[1]))
        dest = torch.randn(outs[0].shape).to(dtype)
        dest_lse = torch.randn(lses[0].shape)
        torch.library.opcheck(ops.lse_merge_out.default, (acc, acc_lse, outs[1], lses[1], dest, dest_lse))
        torch.library.opcheck(ops.lse_merge_all.default, (outs, lses, dtype))
        torch.library.opcheck(ops.lse_merge_all_out.default, (outs, lses, dest, dest_lse))


@pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)
def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        outs = [torch.empty(2, 5, 3, 8, dtype=torch.bfloat16) for _ in range(4)]
        lses = [torch.empty(2, 3, 5) for _ in range(4)]
        out, lse = torch.ops.sp_kernels.lse_merge_all(outs, lses, torch.float16)
    assert out.shape == (2, 5, 3, 8) and out.dtype == torch.float16
    assert lse.shape == (2, 3, 5) and lse.dtype == torch.float32


@pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)
def test_torch_compile_fullgraph(monkeypatch):
    # aot_eager traces through the fake impls and functionalises the in-place op without Inductor's
    # C++ compile (which would cost tens of seconds here); the result must match eager bit for bit.
    monkeypatch.delenv("SP_KERNELS_IMPL", raising=False)
    torch._dynamo.reset()

    def f(outs, lses, acc, acc_lse, blk, blk_lse):
        out, lse = merge_mod.lse_merge_all(outs, lses, torch.bfloat16)
        merge_mod.lse_merge_(acc, acc_lse, blk, blk_lse)
        return out.float() * 2, lse + 1

    outs, lses = synthetic_parts(8, 3, torch.bfloat16, 2.0)
    acc, acc_lse = synthetic_parts(9, 1, torch.float32, 2.0)
    blk, blk_lse = synthetic_parts(10, 1, torch.float16, 2.0)
    acc_ref, acc_lse_ref = acc[0].clone(), acc_lse[0].clone()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(outs, lses, acc[0], acc_lse[0], blk[0], blk_lse[0])
    want = f(outs, lses, acc_ref, acc_lse_ref, blk[0], blk_lse[0])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(acc[0], acc_ref) and torch.equal(acc_lse[0], acc_lse_ref)
    assert not torch.equal(acc_ref, synthetic_parts(9, 1, torch.float32, 2.0)[0][0]), "the merge must mutate acc"


# ---------------------------------------------------------------------------------------------
# bad inputs: clear errors before any launch
# ---------------------------------------------------------------------------------------------


def _pair(B=2, S=4, H=3, D=8, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, S, H, D, generator=g),
        torch.randn(B, H, S, generator=g),
        torch.randn(B, S, H, D, generator=g).to(dtype),
        torch.randn(B, H, S, generator=g),
    )


def _bad_pair_cases():
    acc, acc_lse, blk, blk_lse = _pair()
    return [
        ((acc.bfloat16(), acc_lse, blk, blk_lse), "acc_out must be float32"),
        ((acc, acc_lse.double(), blk, blk_lse), "acc_lse must be float32, got torch.float64"),
        ((acc, acc_lse, blk.double(), blk_lse), "block_out must be float32, float16 or bfloat16"),
        ((acc, acc_lse, blk[:, :3], blk_lse), r"block_out must have shape \[2, 4, 3, 8\] like acc_out"),
        ((acc, acc_lse, blk, blk_lse.transpose(1, 2)), r"block_lse must have shape \[B, H, S\] = \[2, 3, 4\]"),
        ((acc[0], acc_lse, blk, blk_lse), "acc_out must be 4-D"),
        ((acc, acc_lse, blk[..., ::2].repeat(1, 1, 1, 1), blk_lse), "block_out must have shape"),
        ((acc, acc_lse, torch.randn(2, 4, 8, 3).transpose(2, 3).bfloat16(), blk_lse), "stride 1 in its last"),
        ((acc, acc_lse, blk, blk_lse.to("meta")), "block_lse is on meta but acc_out is on cpu"),
        ((acc, acc_lse, acc, blk_lse), "acc_out and block_out overlap"),
        ((acc[:1].expand(2, 4, 3, 8), acc_lse, blk, blk_lse), "acc_out has overlapping elements"),
        ((acc, acc_lse, "x", blk_lse), "block_out must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_inputs_pair(impl, case):
    args, message = _bad_pair_cases()[case]
    exc = TypeError if "must be a torch.Tensor" in message else ValueError
    with pytest.raises(exc, match=message):
        merge_mod.lse_merge_(*args)


def test_bad_inputs_w_way(impl):
    acc, acc_lse, blk, blk_lse = _pair()
    with pytest.raises(ValueError, match="outs must hold at least one"):
        merge_mod.lse_merge_all([], [])
    with pytest.raises(ValueError, match="outs and lses must have the same length, got 2 and 1"):
        merge_mod.lse_merge_all([blk, blk], [blk_lse])
    with pytest.raises(ValueError, match=r"outs\[1\] has dtype torch.float16 but outs\[0\] has torch.bfloat16"):
        merge_mod.lse_merge_all([blk, blk.half()], [blk_lse, blk_lse])
    with pytest.raises(ValueError, match=r"lses\[1\] must be float32"):
        merge_mod.lse_merge_all([blk, blk], [blk_lse, blk_lse.half()])
    with pytest.raises(ValueError, match="out_dtype must be float32, float16 or bfloat16, got torch.float64"):
        merge_mod.lse_merge_all([blk], [blk_lse], torch.float64)
    with pytest.raises(ValueError, match="give both out and lse"):
        merge_mod.lse_merge_all([blk], [blk_lse], out=acc)
    with pytest.raises(ValueError, match=r"out and outs\[0\] overlap"):
        merge_mod.lse_merge_all([acc], [blk_lse], out=acc, lse=acc_lse)
    with pytest.raises(ValueError, match="outs given as one tensor must be 5-D"):
        merge_mod.lse_merge_all(blk, torch.stack([blk_lse]))
    with pytest.raises(TypeError, match="outs must be a list of tensors"):
        merge_mod.lse_merge_all({1: blk}, [blk_lse])


NATIVE_BAD = [
    ("lse_merge_", lambda a: (a[0].bfloat16(), a[1], a[2], a[3]), "lse_merge_: acc_out must be float32"),
    ("lse_merge_", lambda a: (a[0], a[1], a[2][:, :2], a[3]), "lse_merge_: block_out must have shape [2, 4, 3, 8]"),
    ("lse_merge_", lambda a: (a[0], a[1][:, :2], a[2], a[3]), "lse_merge_: acc_lse must have shape [B, H, S]"),
    ("lse_merge_", lambda a: (a[0], a[1], a[2].double(), a[3]), "block_out must be float32, float16 or bfloat16"),
    (
        "lse_merge_",
        lambda a: (a[0], a[1], torch.randn(2, 4, 8, 3).transpose(2, 3), a[3]),
        "block_out must have stride 1 in its last (head_dim) dimension",
    ),
    ("lse_merge_all", lambda a: ([a[2]], [a[3]], torch.float64), "out_dtype must be float32, float16 or bfloat16"),
    ("lse_merge_all", lambda a: ([a[2], a[2].half()], [a[3], a[3]], torch.float32), "outs[1] has dtype Half"),
    ("lse_merge_all_out", lambda a: ([a[2]], [a[3]], a[0][:, :1], a[1]), "lse_merge_all_out: out must have shape"),
    ("lse_merge_out", lambda a: (a[0], a[1], a[2], a[3], a[0], a[1]), "unsupported operation"),
]


@pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)
@pytest.mark.parametrize("name,make,message", NATIVE_BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(NATIVE_BAD)])
def test_bad_inputs_native(name, make, message):
    with pytest.raises(RuntimeError) as info:
        getattr(torch.ops.sp_kernels, name)(*make(_pair()))
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------
# CUDA (runs only where a GPU and the CUDA kernels exist; never on the CPU-only CI machines)
# ---------------------------------------------------------------------------------------------

CUDA_READY = torch.cuda.is_available() and _ext.has_native_kernel("lse_merge_all", "cuda")


@pytest.mark.skipif(not CUDA_READY, reason="needs a GPU and CUDA kernels in the build")
@pytest.mark.parametrize("impl_name", ["native", "triton"])
@pytest.mark.parametrize("D", [128, 40, 7])
def test_cuda_paths_and_stream(monkeypatch, impl_name, D):
    # D = 128 and 40 take the 16-byte path (8-element steps), D = 7 and the offset view the scalar one.
    monkeypatch.setenv("SP_KERNELS_IMPL", impl_name)
    for dtype in PART_DTYPES:
        for ways in (1, 2, 8, 19):
            outs, lses = synthetic_parts(ways + D, ways, dtype, 3.0, S=37, D=D)
            lses[0][0, 0, 0] = NEG_INF
            want_out, want_lse = merge64(outs, lses)
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                outs_c = [o.cuda() for o in outs]
                lses_c = [x.cuda() for x in lses]
                out, lse = merge_mod.lse_merge_all(outs_c, lses_c, torch.float32)
                # From an empty accumulator (garbage, lse -inf), as a ring step with no keys yet holds.
                # Starting from part 0 itself instead would leave its garbage in the row whose lse is
                # -inf when ways == 1 (nothing merged), which the reference defines as zeros.
                acc = torch.full(outs_c[0].shape, 123.0, device="cuda")
                acc_lse = torch.full(lses_c[0].shape, NEG_INF, device="cuda")
                for o, x in zip(outs_c, lses_c):
                    merge_mod.lse_merge_(acc, acc_lse, o, x)
            stream.synchronize()
            torch.testing.assert_close(out.double().cpu(), want_out, atol=3e-5, rtol=1e-5)
            torch.testing.assert_close(lse.double().cpu(), want_lse, atol=3e-5, rtol=1e-6)
            torch.testing.assert_close(acc.double().cpu(), want_out, atol=3e-5, rtol=1e-5)
            torch.testing.assert_close(acc_lse.double().cpu(), want_lse, atol=3e-5, rtol=1e-6)
    flat = torch.randn(1 + 2 * 5 * 3 * D, device="cuda")
    acc = flat[1:].view(2, 5, 3, D)  # misaligned by 4 bytes: the scalar path
    acc_lse = torch.randn(2, 3, 5, device="cuda")
    blk, blk_lse = torch.randn(2, 5, 3, D, device="cuda").bfloat16(), torch.randn(2, 3, 5, device="cuda")
    want_out, want_lse = merge64([acc.cpu(), blk.cpu()], [acc_lse.cpu(), blk_lse.cpu()])
    merge_mod.lse_merge_(acc, acc_lse, blk, blk_lse)
    torch.testing.assert_close(acc.double().cpu(), want_out, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(acc_lse.double().cpu(), want_lse, atol=3e-5, rtol=1e-6)
