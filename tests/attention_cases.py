"""Rank-side runner for distributed attention cases (executed inside RankPool workers).

A case is a plain dict (picklable, printable). Every rank builds the same full inputs from the
seed, cuts out its shard the way the hooks would (recording a ShardLayout for auto_pad / prefix
cases), runs ``sp_kernels.attention`` inside a sharded context, and compares its rows with the
float64 reference over the full sequence. Padding rows of the input are NaN, so a padded row that
reached any softmax would turn the output NaN.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from sp_kernels.attn import attention
from sp_kernels.distributed.parallel_state import SequenceParallelConfig, init_sequence_parallel
from sp_kernels.plan.context import ShardLayout, sp_forward_context
from tests.attention_reference import random_qkv, reference_attention
from tests.poison import poisoned

# bf16 SP error may be this many times the error of single-process bf16 attention (both vs fp64).
BF16_FACTOR = 3.0
ABS_TOL = {"float32": 2e-5, "float64": 1e-12}


def sp_degrees(backend: str, world: int) -> tuple[int, int]:
    """(ulysses, ring) degrees that run ``backend`` on ``world`` ranks; usp uses both where the world factors."""
    if backend == "ulysses":
        return world, 1
    if backend in ("ring", "fused_ring"):
        return 1, world
    return {2: (2, 1), 3: (1, 3), 4: (2, 2)}[world]


def describe(case: dict) -> str:
    keys = ("backend", "degrees", "batch", "seq", "heads", "kv_heads", "head_dim", "joint", "strategy", "prefix",
            "causal", "dtype", "mode", "lengths", "merge")
    return " ".join(f"{k}={case[k]}" for k in keys if k in case)


def shard_bounds(case: dict, P: int) -> tuple[list[tuple[int, int]], int, bool]:
    """(start, valid rows) per rank, local length, whether a ShardLayout is recorded."""
    S, mode = case["seq"], case.get("mode", "pad")
    if mode == "uneven":
        lengths = case["lengths"]
        assert len(lengths) == P and sum(lengths) == S, case
        starts = [sum(lengths[:r]) for r in range(P)]
        return list(zip(starts, lengths)), -1, False
    local = math.ceil(S / P)
    bounds = [(r * local, max(0, min(local, S - r * local))) for r in range(P)]
    if mode == "even":
        assert S % P == 0, case
    return bounds, local, mode == "pad" or case.get("prefix", 0) > 0


def _inputs(case: dict):
    dtype = getattr(torch, case["dtype"])
    B, S, H, Hkv, D = case["batch"], case["seq"], case["heads"], case["kv_heads"], case["head_dim"]
    seed = case["seed"]
    seq = random_qkv(seed, B, S, H, Hkv, D, dtype)
    J, prefix = case.get("joint", 0), case.get("prefix", 0)
    joint = random_qkv(seed + 1, B, J, H, Hkv, D, dtype) if J else None
    pre = random_qkv(seed + 2, B, prefix, H, Hkv, D, dtype) if prefix else None
    return seq, joint, pre


def run_case(case: dict) -> dict:
    P = dist.get_world_size()
    rank = dist.get_rank()
    U, R = case["degrees"]
    state = init_sequence_parallel(SequenceParallelConfig(ulysses_degree=U, ring_degree=R))
    (q, k, v), joint, pre = _inputs(case)
    strategy = case.get("strategy", "front")
    causal = case.get("causal", False)
    scale = case.get("scale", 1.0 / math.sqrt(case["head_dim"]))
    bounds, local, with_layout = shard_bounds(case, P)
    start, n = bounds[rank]
    rows = local if local >= 0 else n

    def shard(t: torch.Tensor) -> torch.Tensor:
        out = torch.full((t.shape[0], rows, *t.shape[2:]), float("nan"), dtype=t.dtype)
        out[:, :n] = t[:, start : start + n]
        return out

    lq, lk, lv = shard(q), shard(k), shard(v)
    prefix = case.get("prefix", 0)
    if pre is not None:
        lq, lk, lv = (torch.cat([p, x], dim=1) for p, x in zip(pre, (lq, lk, lv)))
    jkw = {}
    if joint is not None:
        jkw = dict(joint_query=joint[0], joint_key=joint[1], joint_value=joint[2], joint_strategy=strategy)
    with sp_forward_context(state) as ctx:
        ctx.sharded = True
        if with_layout:
            ctx.record(ShardLayout(true_len=case["seq"], local_len=local, sp_size=P, prefix_len=prefix))
        with torch.no_grad():
            out = attention(lq, lk, lv, softmax_scale=scale, causal=causal, backend=case["backend"], **jkw)

    # Reference: replicated rows (joint, then prefix) in front or joint at the rear.
    rep = None
    if joint is not None and pre is not None:
        rep = tuple(torch.cat([j, p], dim=1) for j, p in zip(joint, pre))
    elif joint is not None or pre is not None:
        rep = joint if joint is not None else pre
    rep_strategy = strategy if joint is not None else "front"
    ref = reference_attention(q, k, v, scale=scale, causal=causal, joint=rep, strategy=rep_strategy)
    nrep = rep[0].shape[1] if rep is not None else 0
    front = rep_strategy == "front"
    S = case["seq"]
    ref_rep = ref[:, :nrep] if front else ref[:, S:]
    ref_seq = ref[:, nrep:] if front else ref[:, :S]
    expect_rows = nrep + rows
    if tuple(out.shape) != (q.shape[0], expect_rows, q.shape[2], q.shape[3]):
        return {"error": f"output shape {tuple(out.shape)}, expected {(q.shape[0], expect_rows, q.shape[2], q.shape[3])}"}
    out_rep = out[:, :nrep] if front else out[:, rows:]
    out_seq = out[:, nrep:] if front else out[:, :rows]
    got = torch.cat([out_rep, out_seq[:, :n]], dim=1).double()
    want = torch.cat([ref_rep, ref_seq[:, start : start + n]], dim=1)
    err = (got - want).abs().max().item() if got.numel() else 0.0
    result = {
        "err": err,
        "finite": bool(torch.isfinite(out).all()),
        "pad_zero": bool((out_seq[:, n:] == 0).all()),
        "joint": out_rep.clone(),
    }
    if case["dtype"] == "bfloat16":
        # Baseline: the same attention on one process (no SP), in bf16, against the same reference.
        fq, fk, fv = q, k, v
        single = attention(fq, fk, fv, softmax_scale=scale, causal=causal, backend="local",
                           **({} if rep is None else dict(joint_query=rep[0], joint_key=rep[1], joint_value=rep[2],
                                                           joint_strategy=rep_strategy)))
        base = (single.double() - ref).abs().max().item()
        result["tol"] = BF16_FACTOR * base
    else:
        result["tol"] = ABS_TOL[case["dtype"]]
    return result


def run_cases(cases: list[dict]) -> list[dict]:
    """Run every case; an exception becomes that case's result instead of aborting the batch."""
    results = []
    with poisoned():
        for case in cases:
            try:
                results.append(run_case(case))
            except Exception as e:  # noqa: BLE001 - reported per case to the parent
                results.append({"error": f"{type(e).__name__}: {e}"})
    return results


def case_params(cases_of, world_sizes) -> list:
    """pytest params (world_size, index) for every case of ``cases_of(P)``, named by the case."""
    return [
        pytest.param(P, i, id=f"P{P}-{i}-" + describe(case).replace(", ", "/").replace(" ", ","))
        for P in world_sizes
        for i, case in enumerate(cases_of(P))
    ]


def case_failures(cases: list[dict], per_rank: list[list[dict]], index: int) -> list[str]:
    """The failures of case ``index`` of a batch."""
    return failures([cases[index]], [results[index : index + 1] for results in per_rank])


def failures(cases: list[dict], per_rank: list[list[dict]], name=None) -> list[str]:
    """Human-readable failures of a batch (checked in the parent process); ``name`` describes a case."""
    name = name or describe
    bad = []
    for i, case in enumerate(cases):
        res = [r[i] for r in per_rank]
        errs = [r["error"] for r in res if "error" in r]
        if errs:
            bad.append(f"{name(case)}: {errs[0]}")
            continue
        for rank, r in enumerate(res):
            if not r["finite"]:
                bad.append(f"{name(case)}: rank {rank} output has NaN/inf")
            elif not r["pad_zero"]:
                bad.append(f"{name(case)}: rank {rank} padding rows are not zero")
            elif not r["err"] <= r["tol"]:
                bad.append(f"{name(case)}: rank {rank} max error {r['err']:.3g} > tolerance {r['tol']:.3g}")
        joints = [r["joint"] for r in res]
        if any(not torch.equal(joints[0], j) for j in joints[1:]):
            bad.append(f"{name(case)}: joint output differs between ranks")
    return bad
