"""Rank-side runner for the distributed attention-gradient cases (executed inside RankPool workers).

A case is a plain dict. Every rank builds the same full float64 inputs from the seed, cuts out its
shard (auto_pad rows NaN: a padding row that reached any softmax, forward or backward, turns the
result NaN), runs a differentiable backend of sp_kernels/attn/grad.py, and backpropagates its own
random output gradient (different on every rank, joint rows included). The reference is the
single-process float64 autograd gradient of sum over ranks r of <out_r, dout_r>; sharded gradients
must match on their own rank, joint gradients after a SUM all-reduce (the hooks' semantics).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from sp_kernels.attn import attention, local
from sp_kernels.attn.call import AttentionCall, Joint
from sp_kernels.attn.grad import GRAD_BACKENDS
from sp_kernels.attn.local import BlockKernel, register_block_kernel
from sp_kernels.distributed.parallel_state import SequenceParallelConfig, init_sequence_parallel
from sp_kernels.plan.context import ShardLayout, sp_forward_context
from tests.attention_reference import random_qkv, reference_attention
from tests.poison import poisoned

TOL = {"float64": 1e-10, "float32": 1e-5}


def describe(case: dict) -> str:
    keys = ("backend", "degrees", "batch", "seq", "heads", "kv_heads", "head_dim", "joint", "strategy", "causal",
            "dtype", "lengths", "merge", "kernels", "via", "mask", "grad_on")
    return " ".join(f"{k}={case[k]}" for k in keys if k in case)


def bounds(case: dict, P: int) -> tuple[list[tuple[int, int]], int]:
    """(start, valid rows) per rank and the local (padded) length."""
    if "lengths" in case:
        lengths = case["lengths"]
        starts = [sum(lengths[:r]) for r in range(P)]
        return list(zip(starts, lengths)), -1
    S = case["seq"]
    L = math.ceil(S / P)
    return [(r * L, max(0, min(L, S - r * L))) for r in range(P)], L


def _dout(case: dict, rank: int, rows: int, J: int, dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(case["seed"] + 100 + rank)
    return torch.randn(case["batch"], J + rows, case["heads"], case["head_dim"], generator=gen,
                       dtype=torch.float64).to(dtype)


def _reference(case: dict, P: int, full, joint, dtype):
    """float64 reference gradients of sum_r <out_r, dout_r> over the full sequence."""
    q, k, v = (t.to(dtype).double().clone().requires_grad_() for t in full)
    jt = tuple(t.to(dtype).double().clone().requires_grad_() for t in joint) if joint is not None else None
    strategy = case.get("strategy", "front")
    scale = case.get("scale", 1.0 / math.sqrt(case["head_dim"]))
    out = reference_attention(q, k, v, scale=scale, causal=case.get("causal", False), joint=jt, strategy=strategy)
    J = jt[0].shape[1] if jt is not None else 0
    seq = out[:, J:] if strategy == "front" else out[:, : out.shape[1] - J]
    jout = (out[:, :J] if strategy == "front" else out[:, out.shape[1] - J :]) if J else None
    spans, L = bounds(case, P)
    loss = 0.0
    for r, (start, n) in enumerate(spans):
        rows = L if L >= 0 else n
        d = _dout(case, r, rows, J, torch.float64)
        ds = d[:, J : J + n] if strategy == "front" else d[:, :n]
        loss = loss + (seq[:, start : start + n] * ds).sum()
        if J:
            dj = d[:, :J] if strategy == "front" else d[:, rows:]
            loss = loss + (jout * dj).sum()
    loss.backward()
    return (q.grad, k.grad, v.grad), (tuple(t.grad for t in jt) if jt is not None else None), (seq.detach(), jout)


def run_grad_case(case: dict) -> dict:
    P, rank = dist.get_world_size(), dist.get_rank()
    U, R = case["degrees"]
    state = init_sequence_parallel(SequenceParallelConfig(ulysses_degree=U, ring_degree=R))
    dtype = getattr(torch, case["dtype"])
    B, S, H, Hkv, D = case["batch"], case["seq"], case["heads"], case["kv_heads"], case["head_dim"]
    full = random_qkv(case["seed"], B, S, H, Hkv, D, torch.float64)
    J = case.get("joint", 0)
    joint = random_qkv(case["seed"] + 1, B, J, H, Hkv, D, torch.float64) if J else None
    strategy = case.get("strategy", "front")
    causal = case.get("causal", False)
    scale = case.get("scale", 1.0 / math.sqrt(D))
    spans, L = bounds(case, P)
    start, n = spans[rank]
    rows = L if L >= 0 else n

    def shard(t: torch.Tensor) -> torch.Tensor:
        s = torch.full((B, rows, t.shape[2], D), float("nan"), dtype=torch.float64)
        s[:, :n] = t[:, start : start + n]
        return s.to(dtype).requires_grad_()

    q, k, v = (shard(t) for t in full)
    jt = tuple(t.to(dtype).clone().requires_grad_() for t in joint) if joint is not None else None
    jobj = Joint(*jt, strategy) if jt is not None else None
    call = AttentionCall(q, k, v, scale, causal, jobj, case["backend"], state, None)
    valid = [nn for _, nn in spans]
    kwargs = {}
    if case.get("kernels") is not None:
        kwargs["kernels"] = case["kernels"]
    if case["backend"] == "fused_ring" and case.get("merge"):
        kwargs["merge"] = case["merge"]
    result: dict = {}
    # A forward-only block kernel (for the bad-input cases): the math forward under another name.
    fwd_only = "fwd_only" in (case.get("kernels") or [])
    if fwd_only:
        register_block_kernel(BlockKernel("fwd_only", local._decline_math, local._run_math))
    try:
        if case.get("via") == "attention":
            out = _through_attention(case, state, q, k, v, jt, scale, causal, strategy, L, rank)
        else:
            out = GRAD_BACKENDS[case["backend"]](call, valid, **kwargs)
        out.backward(_dout(case, rank, rows, J, dtype))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which checks the expectation
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if fwd_only:
            local._KERNELS[:] = [kern for kern in local._KERNELS if kern.name != "fwd_only"]
    (rq, rk, rv), rj, (ref_seq, ref_joint) = _reference(case, P, full, joint, dtype)
    tol = TOL[case["dtype"]]
    errs: dict[str, float] = {}
    # The forward of the differentiable path: this rank's rows (padding rows zero) and the joint rows.
    o = out.detach().double()
    o_seq = o[:, J : J + rows] if strategy == "front" else o[:, :rows]
    want = ref_seq[:, start : start + n]
    errs["out"] = float((o_seq[:, :n] - want).abs().max()) / max(1.0, float(want.abs().max())) if n else 0.0
    if J:
        o_j = o[:, :J] if strategy == "front" else o[:, rows:]
        errs["out_joint"] = float((o_j - ref_joint.detach()).abs().max())
    pad_zero = bool((o_seq[:, n:] == 0).all())
    finite = bool(torch.isfinite(o).all())
    for name, t, ref in (("dq", q, rq), ("dk", k, rk), ("dv", v, rv)):
        g = t.grad.double()
        finite &= bool(torch.isfinite(g).all())
        pad_zero &= bool((g[:, n:] == 0).all())
        want = ref[:, start : start + n]
        errs[name] = float((g[:, :n] - want).abs().max()) / max(1.0, float(want.abs().max())) if n else 0.0
    if jt is not None:
        for name, t, ref in zip(("djq", "djk", "djv"), jt, rj):
            g = t.grad.double().clone()
            dist.all_reduce(g)  # the partial shares of every rank sum to the full gradient
            finite &= bool(torch.isfinite(g).all())
            errs[name] = float((g - ref).abs().max()) / max(1.0, float(ref.abs().max()))
    result.update(errs=errs, tol=tol, finite=finite, pad_zero=pad_zero)
    return result


def _through_attention(case, state, q, k, v, jt, scale, causal, strategy, L, rank) -> torch.Tensor:
    """The public path: ``attention()`` in a sharded forward with the auto_pad layout recorded.
    ``mask``: a key-padding mask with a hole (refused under autograd); ``grad_on``: the ranks whose q
    requires grad (the others pass a detached q: the ranks disagree)."""
    P = dist.get_world_size()
    if rank not in case.get("grad_on", range(P)):
        q, k, v = q.detach(), k.detach(), v.detach()
        jt = tuple(t.detach() for t in jt) if jt is not None else None
    kw = {}
    if jt is not None:
        kw = dict(joint_query=jt[0], joint_key=jt[1], joint_value=jt[2], joint_strategy=strategy)
    if case.get("mask"):
        J = jt[0].shape[1] if jt is not None else 0
        keep = torch.ones(case["batch"], J + case["seq"], dtype=torch.bool)
        keep[:, 1] = False
        kw["key_padding_mask"] = keep
    with sp_forward_context(state) as ctx:
        ctx.sharded = True
        ctx.record(ShardLayout(true_len=case["seq"], local_len=L, sp_size=P))
        return attention(q, k, v, softmax_scale=scale, causal=causal, backend=case["backend"], **kw)


def run_grad_cases(cases: list[dict]) -> list[dict]:
    """Every case, with uninitialized allocations NaN-poisoned (tests/poison.py); an exception becomes
    that case's result."""
    results = []
    with poisoned():
        for case in cases:
            try:
                results.append(run_grad_case(case))
            except Exception as e:  # noqa: BLE001 - reported per case to the parent
                results.append({"error": f"{type(e).__name__}: {e}"})
    return results


def grad_failures(case: dict, per_rank: list[dict]) -> list[str]:
    bad = []
    expect = case.get("expect_error")
    for rank, r in enumerate(per_rank):
        if expect is not None:
            if "error" not in r or any(s not in r["error"] for s in expect):
                bad.append(f"{describe(case)}: rank {rank} expected an error with {expect}, got {r}")
            continue
        if "error" in r:
            bad.append(f"{describe(case)}: rank {rank}: {r['error']}")
        elif not r["finite"]:
            bad.append(f"{describe(case)}: rank {rank} gradients have NaN/inf")
        elif not r["pad_zero"]:
            bad.append(f"{describe(case)}: rank {rank} padding rows have nonzero gradients")
        else:
            over = {k: e for k, e in r["errs"].items() if not e <= r["tol"]}
            if over:
                bad.append(f"{describe(case)}: rank {rank} errors over {r['tol']:.0e}: {over}")
    return bad
