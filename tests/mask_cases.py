"""Rank-side runner for masked distributed attention cases (executed inside RankPool workers).

Every rank builds the same full inputs and the same full-frame mask from the seed, cuts out its shard
the way the hooks would (auto_pad rows are NaN, so a padded row reaching a softmax shows), passes the
mask in the full frame or in its local frame, and compares its rows with a float64 reference over the
full sequence (plain softmax with the mask; a row with no key -> 0). Outputs come from poisoned
(NaN-filled) buffers, so a row no kernel wrote shows too.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from sp_kernels.attn import attention
from sp_kernels.distributed.parallel_state import SequenceParallelConfig, init_sequence_parallel
from sp_kernels.plan.context import ShardLayout, sp_forward_context
from tests.attention_cases import BF16_FACTOR, _inputs, shard_bounds
from tests.attention_cases import failures as attention_failures
from tests.poison import poisoned

ABS_TOL = {"float32": 2e-5, "float64": 1e-12}


def describe(case: dict) -> str:
    keys = ("backend", "degrees", "batch", "seq", "heads", "kv_heads", "joint", "strategy", "dtype", "mode", "kind",
            "form", "frame", "lengths")
    return " ".join(f"{k}={case[k]}" for k in keys if k in case)


def full_keep(case: dict) -> torch.Tensor:
    """The full-frame keep mask [B, Q or 1, K] (bool) of a case, K = Q = joint + seq, in strategy order."""
    B, S, J = case["batch"], case["seq"], case.get("joint", 0)
    K = J + S
    front = case.get("strategy", "front") == "front"
    gen = torch.Generator().manual_seed(case["seed"] + 7)
    kind = case["kind"]
    qdim = K if kind in ("query", "dead_row") else 1
    if kind in ("holes", "query", "dead_row", "additive"):
        keep = torch.rand(B, qdim, K, generator=gen) < 0.6
        keep[..., 0] = True if kind != "holes" else keep[..., 0]
        if kind == "dead_row":
            keep[0, min(1, K - 1)] = False  # one query row sees no key
            keep[-1, K - 1] = False
    elif kind == "endcut":  # every sample's keys cut at the end of the full key axis
        keep = torch.zeros(B, 1, K, dtype=torch.bool)
        for b in range(B):
            keep[b, 0, : max(1, K - 1 - 3 * b)] = True
    elif kind == "text_endcut":  # joint (text) tokens cut at their end, sequence all kept
        keep = torch.ones(B, 1, K, dtype=torch.bool)
        for b in range(B):
            n = max(0, J - 1 - b)
            j0 = 0 if front else S
            keep[b, 0, j0 + n : j0 + J] = False
    elif kind == "dead_sample":  # the last sample sees no key at all
        keep = torch.rand(B, 1, K, generator=gen) < 0.7
        keep[-1] = False
    else:
        raise ValueError(kind)
    return keep


def additive(case: dict, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(case["seed"] + 9)
    vals = torch.randn(keep.shape, generator=gen, dtype=torch.float64) * 0.5
    return vals.masked_fill(~keep, float("-inf")).to(dtype)


def reference(q, k, v, keep_bias: torch.Tensor, scale: float, joint, strategy: str) -> torch.Tensor:
    """float64 masked attention over [joint | seq] (front) / [seq | joint] (rear); rows with no key -> 0."""
    if joint is not None:
        q, k, v = (torch.cat([j, x] if strategy == "front" else [x, j], dim=1) for j, x in zip(joint, (q, k, v)))
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(g, dim=2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + keep_bias[:, None].double()
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _local_frame(t: torch.Tensor, dim: int, J: int, front: bool, start: int, n: int, rows: int) -> torch.Tensor:
    """The local frame of a full-frame tensor along ``dim``: joint part + this rank's ``rows`` (n real)."""
    S = t.shape[dim] - J
    jpart = t.narrow(dim, 0, J) if front else t.narrow(dim, S, J)
    seq = t.narrow(dim, (J if front else 0) + start, n)
    if rows > n:  # auto_pad rows: any value (they are dropped); True / 0 here
        shape = list(seq.shape)
        shape[dim] = rows - n
        seq = torch.cat([seq, torch.ones(shape, dtype=t.dtype) if t.dtype == torch.bool else seq.new_zeros(shape)],
                        dim=dim)
    return torch.cat([jpart, seq] if front else [seq, jpart], dim=dim)


def run_case(case: dict) -> dict:
    P = dist.get_world_size()
    rank = dist.get_rank()
    U, R = case["degrees"]
    state = init_sequence_parallel(SequenceParallelConfig(ulysses_degree=U, ring_degree=R))
    dtype = getattr(torch, case["dtype"])
    (q, k, v), joint, _ = _inputs(case)
    strategy = case.get("strategy", "front")
    front = strategy == "front"
    scale = 1.0 / math.sqrt(case["head_dim"])
    bounds, local, with_layout = shard_bounds(case, P)
    start, n = bounds[rank]
    rows = local if local >= 0 else n
    J = case.get("joint", 0)

    def shard(t: torch.Tensor) -> torch.Tensor:
        out = torch.full((t.shape[0], rows, *t.shape[2:]), float("nan"), dtype=t.dtype)
        out[:, :n] = t[:, start : start + n]
        return out

    keep = full_keep(case)  # [B, Qm, K]
    form, frame = case["form"], case.get("frame", "full")
    bias_full = additive(case, keep, torch.float64) if form == "additive" else \
        torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    m = bias_full if form == "additive" else keep
    if frame == "local":  # keys of this rank only; with a query dim: this rank's query rows over every key
        m = _local_frame(m, 1 if m.shape[1] > 1 else 2, J, front, start, n, rows)
    kw: dict = {}
    if form == "kpm":
        kw["key_padding_mask"] = m[:, 0]
    elif form == "additive":
        kw["attn_mask"] = m[:, None].to(dtype)
    elif form == "bool":
        kw["attn_mask"] = m[:, None]
    elif form == "both":  # a key padding mask and a bool attn_mask that excludes nothing more
        kw["key_padding_mask"] = m[:, 0]
        kw["attn_mask"] = torch.ones_like(m[:1, None])
    else:
        raise ValueError(form)
    if joint is not None:
        kw.update(joint_query=joint[0], joint_key=joint[1], joint_value=joint[2], joint_strategy=strategy)
    with sp_forward_context(state) as ctx:
        ctx.sharded = True
        if with_layout:
            ctx.record(ShardLayout(true_len=case["seq"], local_len=local, sp_size=P))
        with torch.no_grad():
            out = attention(shard(q), shard(k), shard(v), softmax_scale=scale, backend=case["backend"], **kw)

    ref = reference(q, k, v, bias_full.to(dtype).double() if form == "additive" else bias_full, scale, joint, strategy)
    S = case["seq"]
    ref_j = ref[:, :J] if front else ref[:, S:]
    ref_s = ref[:, J:] if front else ref[:, :S]
    out_j = out[:, :J] if front else out[:, rows:]
    out_s = out[:, J:] if front else out[:, :rows]
    got = torch.cat([out_j, out_s[:, :n]], dim=1).double()
    want = torch.cat([ref_j, ref_s[:, start : start + n]], dim=1)
    err = (got - want).abs().max().item() if got.numel() else 0.0
    if case["dtype"] == "bfloat16":
        # Baseline: the same masked attention on one process in bf16, against the same reference.
        full_kw = {key: val for key, val in kw.items() if key.startswith("joint_")}
        fm = bias_full if form == "additive" else keep
        if form == "kpm":
            full_kw["key_padding_mask"] = fm[:, 0]
        else:
            full_kw["attn_mask"] = fm[:, None].to(dtype) if form == "additive" else fm[:, None]
        single = attention(q, k, v, softmax_scale=scale, backend="local", **full_kw)
        tol = BF16_FACTOR * max((single.double() - ref).abs().max().item(), 1e-3)
    else:
        tol = ABS_TOL[case["dtype"]]
    return {
        "err": err,
        "finite": bool(torch.isfinite(out).all()),
        "pad_zero": bool((out_s[:, n:] == 0).all()),
        "joint": out_j.clone(),
        "tol": tol,
    }


def run_cases(cases: list[dict]) -> list[dict]:
    results = []
    with poisoned():
        for case in cases:
            try:
                results.append(run_case(case))
            except Exception as e:  # noqa: BLE001 - reported per case to the parent
                results.append({"error": f"{type(e).__name__}: {e}"})
    return results


def failures(cases: list[dict], per_rank: list[list[dict]]) -> list[str]:
    return attention_failures(cases, per_rank, name=describe)


def _bad_kwargs(kind: str, rank: int, B: int, S: int, L: int) -> dict:
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[:, 1] = False
    return {
        "int_mask": dict(attn_mask=keep.int()[:, None, None]),
        "float_keep": dict(attn_mask=keep.float()[:, None, None]),
        "nan_mask": dict(attn_mask=torch.full((B, 1, 1, S), float("nan"))),
        "kpm_float": dict(key_padding_mask=keep.float()),
        "kpm_shape": dict(key_padding_mask=keep[:, :-1]),
        "kpm_batch": dict(key_padding_mask=keep[:1]),
        "mask_batch": dict(attn_mask=keep[:1].expand(3, S)[:, None, None]),
        "mask_device": dict(attn_mask=keep.to("meta")[:, None, None]),
        "key_len": dict(attn_mask=torch.ones(B, 1, 1, S + 3, dtype=torch.bool)),
        "heads": dict(attn_mask=torch.ones(B, 2, 1, S, dtype=torch.bool)),
        "causal": dict(key_padding_mask=keep),
        "one_rank_bad": dict(key_padding_mask=keep if rank else keep.float()),
        "one_rank_other": dict(key_padding_mask=keep if rank else ~keep),
        "one_rank_none": dict(key_padding_mask=keep) if rank else {},
    }[kind]


def bad_input(cases: list[dict]) -> list[dict]:
    """Calls that must raise on every rank; per case the exception type and message (or 'no error')."""
    P = dist.get_world_size()
    rank = dist.get_rank()
    out = []
    for case in cases:
        state = init_sequence_parallel(SequenceParallelConfig(ulysses_degree=case["degrees"][0],
                                                              ring_degree=case["degrees"][1]))
        B, S, H, D = 2, 4 * P, 2, 8
        gen = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(B, S // P, H, D, generator=gen) for _ in range(3))
        try:
            with sp_forward_context(state) as ctx:
                ctx.sharded = True
                with torch.no_grad():
                    attention(q, k, v, backend=case["backend"], causal=case["kind"] == "causal",
                              **_bad_kwargs(case["kind"], rank, B, S, S // P))
            out.append({"type": None, "msg": "no error"})
        except Exception as e:  # noqa: BLE001 - what every rank raised is the result
            out.append({"type": type(e).__name__, "msg": str(e)})
    return out


def kernel_choice(cases: list[dict]) -> list[dict]:
    """Rank side: run each case counting masked-kernel runs and Ulysses' two-block split (per case)."""
    from sp_kernels.attn import local, ulysses

    counts = {"masked": 0, "split": 0}
    real_kernels, real_merge = list(local._KERNELS), ulysses.lse_merge_all_torch

    def counted(run):
        def fn(*a, **k):
            counts["masked"] += 1
            return run(*a, **k)
        return fn

    def merge(*a, **k):
        counts["split"] += 1
        return real_merge(*a, **k)

    local._KERNELS[:] = [local.BlockKernel(kn.name, kn.decline, kn.run, counted(kn.run_masked) if kn.run_masked else None)
                         for kn in real_kernels]
    ulysses.lse_merge_all_torch = merge
    out = []
    try:
        for case in cases:
            counts.update(masked=0, split=0)
            res = run_cases([case])[0]
            res.pop("joint", None)
            out.append({**res, **counts})
    finally:
        local._KERNELS[:] = real_kernels
        ulysses.lse_merge_all_torch = real_merge
    return out


def memo_check() -> dict:
    """Rank side: three calls in one forward with local-frame masks (the same, the same again, another):
    the all-gather of the mask runs for the first and the third only, and every output matches the
    reference."""
    import sp_kernels.attn as attn_mod

    P, rank = dist.get_world_size(), dist.get_rank()
    state = init_sequence_parallel(SequenceParallelConfig(ulysses_degree=1, ring_degree=P))
    B, S, H, D = 2, 4 * P, 2, 8
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, S, H, D, generator=gen, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(B, S, generator=gen) < 0.6
    keep[:, 0] = True
    other = keep.clone()
    other[:, -1] = ~other[:, -1]
    n = S // P
    sl = slice(rank * n, (rank + 1) * n)
    real, gathers = attn_mod._all_gather_cat, []

    def counting(*a, **kw):
        gathers.append(1)
        return real(*a, **kw)

    attn_mod._all_gather_cat = counting
    counts, errs = [], []
    try:
        with sp_forward_context(state) as ctx, torch.no_grad():
            ctx.sharded = True
            for m in (keep, keep.clone(), other):
                before = len(gathers)
                out = attention(q[:, sl], k[:, sl], v[:, sl], backend="ring", key_padding_mask=m[:, sl])
                counts.append(len(gathers) - before)
                bias = torch.zeros(B, 1, S, dtype=torch.float64).masked_fill(~m[:, None], float("-inf"))
                errs.append((out - reference(q, k, v, bias, D**-0.5, None, "front")[:, sl]).abs().max().item())
    finally:
        attn_mod._all_gather_cat = real
    return {"counts": counts, "err": max(errs)}
