"""Ulysses pack/unpack ops (native CPU and torch implementations) against independent references.

Triton runs in tests/test_pack_triton.py (interpreter in a subprocess, plus AOT PTX checks).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from sp_kernels.ops import _ext
from tests.op_utils import OpRecorder, force_impl
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

pk = importlib.import_module("sp_kernels.ops.pack")

NATIVE = pk.NATIVE_OPS_REGISTERED
NATIVE_SKIP = f"native extension without pack ops: {_ext.native_error()}"
IMPLS = [pytest.param("native", marks=pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)), "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch) -> str:
    monkeypatch.setenv("SP_KERNELS_IMPL", request.param)
    return request.param


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype and got.is_contiguous(), what
    # Bitwise: a NaN left by the poison, a wrong row or a non-zero padding element all fail.
    assert torch.equal(got, want), f"{what}: values differ"


def qkv_inputs(case, dtype, strided: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, S, Hq, Hkv, D = case.B, case.S_loc, case.Hq, case.Hkv, case.D
    if strided:
        # q, k, v as views of one fused projection output [B, S, Hq + 2 Hkv, D]: batch/token strides
        # are not those of a contiguous tensor, head rows are.
        fused = rand((B, S, Hq + 2 * Hkv, D), dtype, g)
        return fused[:, :, :Hq], fused[:, :, Hq : Hq + Hkv], fused[:, :, Hq + Hkv :]
    return rand((B, S, Hq, D), dtype, g), rand((B, S, Hkv, D), dtype, g), rand((B, S, Hkv, D), dtype, g)


@pytest.mark.parametrize("case", QKV_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pack_qkv(impl, case, dtype):
    for strided in (False, True):
        q, k, v = qkv_inputs(case, dtype, strided)
        with poisoned():
            got = pk.pack_qkv(q, k, v, case.P, case.kv_index)
        assert_same(got, expected_pack_qkv(q, k, v, case.P, case.kv_index), f"{case} strided={strided}")


@pytest.mark.parametrize("case", QKV_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("joint", [None, "front", "rear"])
def test_unpack_qkv(impl, case, dtype, joint):
    g = torch.Generator().manual_seed(1)
    plan_hq = -(-case.Hq // case.P)
    nkv = len(case.kv_index) // case.P
    W = plan_hq + 2 * nkv
    recv = rand((case.P, case.B, case.S_loc, W, case.D), dtype, g)
    J = 3
    jq = jk = jv = None
    if joint is not None:
        # Joint heads as slices of full-head tensors, like slice_joint returns them.
        jq = rand((case.B, J, plan_hq + 1, case.D), dtype, g)[:, :, 1:]
        jk, jv = rand((case.B, J, nkv, case.D), dtype, g), rand((case.B, J, nkv, case.D), dtype, g)
    padded = case.P * case.S_loc
    for seq_len in sorted({padded, max(0, padded - 1), max(0, padded - case.S_loc - 1), 0}):
        with poisoned():
            got = pk.unpack_qkv(recv, seq_len, jq, jk, jv, joint != "rear")
        want = expected_unpack_qkv(recv, seq_len, jq, jk, jv, joint != "rear")
        assert_same(got, want, f"{case} seq_len={seq_len} joint={joint}")


@pytest.mark.parametrize("case", OUT_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("front", [True, False])
def test_pack_out(impl, case, dtype, front):
    B, S, P, L, hq, D, J = case
    g = torch.Generator().manual_seed(2)
    # The sequence part as a slice of a [B, J + S, hq, D] attention output (batch stride != S*hq*D).
    full = rand((B, J + S + 1, hq, D), dtype, g)
    out_seq = full[:, 1 : 1 + S]
    out_joint = rand((B, J, hq, D), dtype, g) if J else None
    with poisoned():
        got = pk.pack_out(out_seq, out_joint, P, L, front)
    assert_same(got, expected_pack_out(out_seq, out_joint, P, L, front), f"{case} front={front}")


@pytest.mark.parametrize("heads,P", [(8, 2), (5, 2), (6, 4), (3, 4), (24, 8), (1, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 80, 128])
def test_unpack_out(impl, heads, P, dtype, D):
    g = torch.Generator().manual_seed(3)
    hq = -(-heads // P)
    for B, rows in ((1, 5), (2, 3)):
        recv = rand((P, B, rows, hq, D), dtype, g)
        with poisoned():
            got = pk.unpack_out(recv, heads)
        assert_same(got, expected_unpack_out(recv, heads), f"heads={heads} P={P} B={B}")


def test_float64_and_large_multithreaded(impl):
    # Large enough for several parallel_for tasks whose boundaries fall inside copy runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        g = torch.Generator().manual_seed(4)
        q, k, v = rand((2, 700, 5, 64), torch.float64, g), rand((2, 700, 1, 64), torch.float64, g), None
        v = rand((2, 700, 1, 64), torch.float64, g)
        index = [0, 0, 0]
        with poisoned():
            send = pk.pack_qkv(q, k, v, 3, index)
        assert_same(send, expected_pack_qkv(q, k, v, 3, index), "pack_qkv fp64")
        with poisoned():
            seq = pk.unpack_qkv(send, 2 * 700 + 3)
        assert_same(seq, expected_unpack_qkv(send, 2 * 700 + 3), "unpack_qkv fp64")
        out = rand((2, 1999, 2, 64), torch.float64, g)
        with poisoned():
            got = pk.pack_out(out, None, 3, 700)
        assert_same(got, expected_pack_out(out, None, 3, 700), "pack_out fp64")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype,D", [(torch.float16, 67), (torch.bfloat16, 128)], ids=str)
def test_large_outputs_streaming_stores(impl, dtype, D):
    # Outputs of 2 MiB and more take the CPU kernels' non-temporal store path: cover it with head
    # rows that are not 64-byte multiples (D=67 fp16: 134 bytes, runs starting mid cache line),
    # padding heads and rows, GQA replication, strided and offset sources, joint rows, 2 threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        g = torch.Generator().manual_seed(6)
        B, S_loc, Hq, P = 2, 1000, 7, 3
        fused = rand((B, S_loc, Hq + 4 + 1, D), dtype, g)[:, :, 1:]  # q | k | v, offset by one head
        q, k, v = fused[:, :, :Hq], fused[:, :, Hq : Hq + 2], fused[:, :, Hq + 2 :]
        kv_index = [0, 1, 1]
        with poisoned():
            send = pk.pack_qkv(q, k, v, P, kv_index)
        assert send.nbytes >= 2 << 20
        assert_same(send, expected_pack_qkv(q, k, v, P, kv_index), "pack_qkv")
        S = P * S_loc - 5
        jq, jk, jv = rand((B, 3, 3, D), dtype, g), rand((B, 3, 1, D), dtype, g), rand((B, 3, 1, D), dtype, g)
        for front in (True, False):
            with poisoned():
                got = pk.unpack_qkv(send, S, jq, jk, jv, front)
            assert got.nbytes >= 2 << 20
            assert_same(got, expected_unpack_qkv(send, S, jq, jk, jv, front), f"unpack_qkv front={front}")
        out_seq = rand((B, S + 1, 3, D), dtype, g)[:, 1:]
        out_joint = rand((B, 3, 3, D), dtype, g)
        with poisoned():
            got = pk.pack_out(out_seq, out_joint, P, S_loc, False)
        assert got.nbytes >= 2 << 20
        assert_same(got, expected_pack_out(out_seq, out_joint, P, S_loc, False), "pack_out")
        recv = rand((P, B, 2000, 3, D), dtype, g)
        with poisoned():
            got = pk.unpack_out(recv, Hq)
        assert got.nbytes >= 2 << 20
        assert_same(got, expected_unpack_out(recv, Hq), "unpack_out")
    finally:
        torch.set_num_threads(threads)


def test_round_trip_through_emulated_exchange(impl):
    """pack_qkv -> all-to-all (emulated for every rank) -> unpack_qkv gives each rank its heads of
    the exact sequence; pack_out -> exchange -> unpack_out gives back each rank's shard."""
    g = torch.Generator().manual_seed(5)
    P, B, Hq, Hkv, D, S = 4, 2, 6, 2, 64, 10
    L = -(-S // P)
    case_index = __import__("sp_kernels.attn.ulysses", fromlist=["assign_heads"]).assign_heads(Hq, Hkv, P)
    kv_index = list(case_index.kv_index) if case_index.kv_index is not None else list(range(P * case_index.kv_local))
    q_full, k_full, v_full = rand((B, P * L, Hq, D), torch.float32, g), rand((B, P * L, Hkv, D), torch.float32, g), None
    v_full = rand((B, P * L, Hkv, D), torch.float32, g)
    sends = [pk.pack_qkv(t[0], t[1], t[2], P, kv_index) for t in zip(*(x.split(L, 1) for x in (q_full, k_full, v_full)))]
    hq, nkv = case_index.q_local, case_index.kv_local
    outs = []
    for r in range(P):
        recv = torch.stack([sends[src][r] for src in range(P)])
        qkv = pk.unpack_qkv(recv, S)
        heads = [h for h in range(r * hq, (r + 1) * hq) if h < Hq]
        assert torch.equal(qkv[:, :, : len(heads)], q_full[:, :S, heads])
        kv = kv_index[r * nkv : (r + 1) * nkv]
        assert torch.equal(qkv[:, :, hq : hq + nkv], k_full[:, :S, kv])
        assert torch.equal(qkv[:, :, hq + nkv :], v_full[:, :S, kv])
        outs.append(pk.pack_out(qkv[:, :, :hq], None, P, L))  # "attention output" = this rank's q heads
    for r in range(P):
        got = pk.unpack_out(torch.stack([outs[src][r] for src in range(P)]).contiguous(), Hq)
        n = max(0, min(L, S - r * L))
        assert torch.equal(got[:, :n], q_full[:, r * L : r * L + n])
        assert (got[:, n:] == 0).all()


@pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)
@pytest.mark.parametrize("forced", [None, "native", "torch"])
def test_dispatch_choice(monkeypatch, forced):
    force_impl(monkeypatch, forced)
    q = rand((1, 4, 4, 64), torch.float32)
    with OpRecorder() as rec:
        send = pk.pack_qkv(q, q, q, 2, [0, 1, 2, 3])
        pk.unpack_qkv(send, 7)
        pk.pack_out(q, None, 2, 2)
        pk.unpack_out(send[:, :, :, :2].contiguous(), 4)
    native = [op for op in rec.ops if op.startswith("sp_kernels.")]
    if forced == "torch":
        assert native == [], rec.ops
    else:
        assert [op.split(".")[1] for op in native] == ["pack_qkv", "unpack_qkv", "pack_out", "unpack_out"], rec.ops


def test_grad_takes_torch_path(monkeypatch):
    monkeypatch.delenv("SP_KERNELS_IMPL", raising=False)
    q = rand((1, 4, 3, 64), torch.float64).requires_grad_()
    send = pk.pack_qkv(q, q, q, 2, [0, 1, 2, 0])
    send.sum().backward()
    # q is used as q (3 heads, each once), as k and v (heads 0 twice, 1 and 2 once): counts per head.
    want = torch.tensor([1 + 2 * 2, 1 + 2, 1 + 2], dtype=torch.float64).view(1, 1, 3, 1).expand_as(q)
    assert torch.equal(q.grad, want)


def test_forced_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("SP_KERNELS_IMPL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = rand((1, 2, 2, 64), torch.float32)
    with pytest.raises(RuntimeError, match="pack_qkv cannot use it on cpu: .*TRITON_INTERPRET=1"):
        pk.pack_qkv(q, q, q, 2, [0, 1])


@pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)
def test_opcheck():
    g = torch.Generator().manual_seed(6)
    q, k = rand((2, 3, 5, 64), torch.float32, g), rand((2, 3, 2, 64), torch.float32, g)
    fused = rand((1, 4, 8, 64), torch.bfloat16, g)
    recv = rand((2, 2, 3, 4, 64), torch.float32, g)
    jq, jk = rand((2, 2, 2, 64), torch.float32, g), rand((2, 2, 1, 64), torch.float32, g)
    out_seq = rand((2, 6, 3, 64), torch.float16, g)
    samples = {
        torch.ops.sp_kernels.pack_qkv.default: [
            (q, k, k, 2, [0, 1]),
            (q, k, k, 4, [0, 0, 1, 1]),
            (fused[:, :, :4], fused[:, :, 4:6], fused[:, :, 6:], 2, [0, 1]),
        ],
        torch.ops.sp_kernels.unpack_qkv.default: [
            (recv, 5, None, None, None, True),
            (recv, 4, jq, jk, jk, True),
            (recv, 6, jq, jk, jk, False),
        ],
        torch.ops.sp_kernels.pack_out.default: [
            (out_seq, None, 2, 3, True),
            (out_seq[:, :5], out_seq[:, :2], 3, 2, False),
        ],
        torch.ops.sp_kernels.unpack_out.default: [(recv, 7), (recv, 8)],
    }
    for op, args_list in samples.items():
        for args in args_list:
            torch.library.opcheck(op, args)


@pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)
def test_fake_shapes_match():
    from torch._subclasses.fake_tensor import FakeTensorMode

    recv = rand((4, 2, 3, 5, 64), torch.float32)
    with FakeTensorMode() as mode:
        fr = mode.from_tensor(recv)
        assert torch.ops.sp_kernels.unpack_qkv(fr, 10, None, None, None, True).shape == (2, 10, 5, 64)
        assert torch.ops.sp_kernels.unpack_out(fr, 18).shape == (2, 3, 18, 64)


def _t(shape, dtype=torch.float32):
    return rand(shape, dtype)


BAD_PY = [
    (lambda: pk.pack_qkv([1.0], _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), 2, [0, 1]), TypeError, r"pack_qkv: q must be a torch.Tensor"),
    (lambda: pk.pack_qkv(_t((1, 2, 2, 64), torch.int32), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), 2, [0, 1]), ValueError, r"pack_qkv: unsupported dtype torch.int32 for q"),
    (lambda: pk.pack_qkv(_t((2, 2, 64)), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), 2, [0, 1]), ValueError, r"pack_qkv: q must be \[batch, seq, heads, head_dim\] \(4 dims\)"),
    (lambda: pk.pack_qkv(_t((1, 2, 64, 2)).transpose(2, 3), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), 2, [0, 1]), ValueError, r"pack_qkv: q must have contiguous \[heads, head_dim\] rows"),
    (lambda: pk.pack_qkv(_t((1, 2, 2, 64)), _t((1, 2, 2, 64), torch.float16), _t((1, 2, 2, 64)), 2, [0, 1]), ValueError, r"pack_qkv: k has dtype torch.float16 but q has torch.float32"),
    (lambda: pk.pack_qkv(_t((1, 2, 2, 64)), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)).to("meta"), 2, [0, 1]), ValueError, r"pack_qkv: v is on meta but q is on cpu"),
    (lambda: pk.pack_qkv(_t((1, 2, 2, 64)), _t((1, 3, 2, 64)), _t((1, 3, 2, 64)), 2, [0, 1]), ValueError, r"pack_qkv: k/v \(1, 3, 2, 64\) must match q"),
    (lambda: pk.pack_qkv(_t((1, 2, 2, 64)), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), 0, []), ValueError, r"pack_qkv: world_size must be >= 1, got 0"),
    (lambda: pk.pack_qkv(_t((1, 2, 2, 64)), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), 2, [0, 1, 0]), ValueError, r"pack_qkv: kv_index must hold world_size \* nkv >= 2 entries"),
    (lambda: pk.pack_qkv(_t((1, 2, 2, 64)), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), 2, [0, 2]), ValueError, r"pack_qkv: kv_index\[1\] = 2 is out of range for 2"),
    (lambda: pk.unpack_qkv(_t((2, 1, 3, 4, 64)), 7), ValueError, r"unpack_qkv: seq_len must be in \[0, P \* S_loc\] = \[0, 6\], got 7"),
    (lambda: pk.unpack_qkv(_t((2, 1, 3, 4, 64)), -1), ValueError, r"unpack_qkv: seq_len must be in \[0, P \* S_loc\] = \[0, 6\], got -1"),
    (lambda: pk.unpack_qkv(_t((2, 1, 3, 4, 64)).transpose(2, 3), 3), ValueError, r"unpack_qkv: recv must be contiguous"),
    (lambda: pk.unpack_qkv(_t((2, 3, 4, 64)), 3), ValueError, r"unpack_qkv: recv must have 5 dims"),
    (lambda: pk.unpack_qkv(_t((2, 1, 3, 4, 64)), 3, _t((1, 2, 2, 64)), None, None), ValueError, r"joint_q, joint_k and joint_v must be given together"),
    (lambda: pk.unpack_qkv(_t((2, 1, 3, 4, 64)), 3, _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), _t((1, 2, 2, 64))), ValueError, r"joint heads \(q 2 \+ 2 \* kv 2\) must equal recv's head slots 4"),
    (lambda: pk.pack_out(_t((1, 7, 2, 64)), None, 2, 3), ValueError, r"pack_out: out_seq has 7 rows, more than world_size \* local_len = 6"),
    (lambda: pk.pack_out(_t((1, 5, 2, 64)), _t((1, 2, 3, 64)), 2, 3), ValueError, r"pack_out: out_joint \(1, 2, 3, 64\) must match out_seq"),
    (lambda: pk.pack_out(_t((1, 5, 2, 64)), None, 2, -1), ValueError, r"pack_out: local_len must be >= 0, got -1"),
    (lambda: pk.unpack_out(_t((2, 1, 3, 4, 64)), 9), ValueError, r"unpack_out: heads must satisfy ceil\(heads / P\) == hq \(P = 2, hq = 4\), got heads = 9"),
    (lambda: pk.unpack_out(_t((2, 1, 3, 4, 64)), 2.0), TypeError, r"unpack_out: heads must be an int, got float"),
]


@pytest.mark.parametrize("call,exc,pattern", BAD_PY)
def test_bad_inputs_python(impl, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


NATIVE_BAD = [
    (lambda: torch.ops.sp_kernels.pack_qkv(_t((1, 2, 64, 2)).transpose(2, 3), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), 2, [0, 1]), "pack_qkv: q must have contiguous [heads, head_dim] rows"),
    (lambda: torch.ops.sp_kernels.pack_qkv(_t((1, 2, 2, 64)), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), 2, [0, 5]), "pack_qkv: kv_index[1] = 5 is out of range for 2 key/value heads"),
    (lambda: torch.ops.sp_kernels.pack_qkv(_t((1, 2, 2, 64)), _t((1, 2, 2, 64), torch.float16), _t((1, 2, 2, 64)), 2, [0, 1]), "pack_qkv: k has dtype Half but q has Float"),
    (lambda: torch.ops.sp_kernels.pack_qkv(_t((1, 2, 2, 64)), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), 2, list(range(2)) * 129), "pack_qkv: kv_index holds 258 entries, more than the supported 256"),
    (lambda: torch.ops.sp_kernels.unpack_qkv(_t((2, 1, 3, 4, 64)), 7, None, None, None, True), "unpack_qkv: seq_len must be in [0, P * S_loc] = [0, 6], got 7"),
    (lambda: torch.ops.sp_kernels.unpack_qkv(_t((2, 1, 3, 4, 64)).transpose(2, 3), 2, None, None, None, True), "unpack_qkv: recv must be contiguous"),
    (lambda: torch.ops.sp_kernels.pack_out(_t((1, 7, 2, 64)), None, 2, 3, True), "pack_out: out_seq has 7 rows, more than world_size * local_len = 6"),
    (lambda: torch.ops.sp_kernels.unpack_out(_t((2, 1, 3, 4, 64)), 9), "unpack_out: heads must satisfy ceil(heads / P) == hq (P = 2, hq = 4), got heads = 9"),
    (lambda: torch.ops.sp_kernels.unpack_out(_t((2, 1, 3, 4, 64), torch.int32), 8), "unpack_out: unsupported dtype Int for recv"),
]


@pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)
@pytest.mark.parametrize("call,message", NATIVE_BAD)
def test_bad_inputs_native(call, message):
    with pytest.raises(RuntimeError) as info:
        call()
    assert message in str(info.value)


def test_benchmark_smoke(monkeypatch, capsys):
    # The benchmark must not rot: its --quick mode runs every column on tiny shapes in seconds.
    monkeypatch.delenv("SP_KERNELS_IMPL", raising=False)
    bench = importlib.import_module("benchmarks.bench_pack")
    assert bench.main(["--quick", "--name", "bench_pack_smoke"]) == 0
    out = capsys.readouterr().out
    assert "Ulysses step" in out and "pack_qkv" in out and "unpack_out" in out
    assert "speedup_vs_eager" in out and "target_met" in out


def test_benchmark_counts_eager_passes():
    # The per-row target (0.95x or 2x) rests on this count: it must see copies, not views.
    bench = importlib.import_module("benchmarks.bench_pack")
    g = torch.Generator().manual_seed(3)
    P, L, B, h, D = 3, 4, 2, 2, 8
    recvs = [rand((P, L, B, h, D), torch.float32, g) for _ in range(3)]
    # Sequence-first receive layout: permute + reshape is a view, slicing the padding is the one copy.
    assert bench.measured_passes(lambda: bench.eager_unpack_qkv(recvs, P * L - 1)) == 1
    assert bench.measured_passes(lambda: bench.eager_unpack_qkv(recvs, P * L)) == 1  # B > 1: the slice is not contiguous
    one = [r[:, :, :1].contiguous() for r in recvs]
    assert bench.measured_passes(lambda: bench.eager_unpack_qkv(one, P * L)) == 0  # B = 1, no padding: views
    q = rand((1, 6, 5, D), torch.float32, g)  # 5 heads over P = 3: pad heads, then the transpose copy
    assert bench.measured_passes(lambda: bench.eager_pack_qkv(q, q, q, P)) == 2
    assert bench.measured_passes(lambda: q.view(6, 5, D)[:3]) == 0
    assert bench.target_speedup(1) == 0.95 and bench.target_speedup(2) == 2.0


@pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)
def test_ulysses_hot_path_uses_the_ops(monkeypatch):
    """The Ulysses backend's pack/unpack (group of one rank, B=2, joint rows) runs our ops and no
    eager copy/pad/cat chain."""
    from sp_kernels.attn import ulysses

    monkeypatch.delenv("SP_KERNELS_IMPL", raising=False)
    g = torch.Generator().manual_seed(7)
    plan = ulysses.assign_heads(4, 2, 1)
    q, k, v = rand((2, 5, 4, 64), torch.float32, g), rand((2, 5, 2, 64), torch.float32, g), None
    v = rand((2, 5, 2, 64), torch.float32, g)
    joint = (rand((2, 3, 4, 64), torch.float32, g), rand((2, 3, 2, 64), torch.float32, g),
             rand((2, 3, 2, 64), torch.float32, g))  # fmt: skip
    with OpRecorder() as rec:
        send = ulysses.pack_qkv(q, k, v, plan)
        qq, kk, vv = ulysses.exchange_qkv(send, None, plan, [5], joint, "rear")
        back = ulysses.unpack_out(ulysses.pack_out(qq[:, :5], qq[:, 5:], plan, [5], 5, "rear"), plan)
    ours = [op.split(".")[1] for op in rec.ops if op.startswith("sp_kernels.")]
    assert ours == ["pack_qkv", "unpack_qkv", "pack_out", "unpack_out"], rec.ops
    eager = [op for op in rec.ops if any(s in op for s in ("copy_", "clone", "pad", "cat", "index", "zero", "fill"))]
    assert eager == [], eager
    assert torch.equal(qq, torch.cat([q, joint[0]], dim=1))
    assert torch.equal(kk, torch.cat([k, joint[1]], dim=1)) and torch.equal(vv, torch.cat([v, joint[2]], dim=1))
    assert torch.equal(back, torch.cat([q, joint[0]], dim=1))


def test_ulysses_pack_accepts_any_layout(impl):
    # Users may hand attention [B, H, S, D] tensors transposed to BSHD: head rows are then strided,
    # which the ops reject; the Ulysses wrapper makes them contiguous first.
    from sp_kernels.attn import ulysses

    g = torch.Generator().manual_seed(8)
    q = rand((1, 3, 5, 64), torch.float32, g).transpose(1, 2)  # [B, S=5, H=3, D] with stride(2) != D
    plan = ulysses.assign_heads(3, 3, 2)
    send = ulysses.pack_qkv(q, q, q, plan)
    index = list(plan.kv_index) if plan.kv_index is not None else list(range(2 * plan.kv_local))
    assert torch.equal(send, expected_pack_qkv(q, q, q, 2, index))
