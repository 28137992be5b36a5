"""Distributed attention (ulysses, ring, usp, auto) on gloo against a float64 full-sequence reference.

One rank-pool call per world size runs a whole list of cases (spawning ranks costs seconds).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.attention_cases import case_failures, case_params, describe, failures, run_cases


def _backends(P: int) -> list[tuple[str, tuple[int, int]]]:
    if P == 1:
        return [("auto", (1, 1)), ("usp", (1, 1))]
    out = [("ulysses", (P, 1)), ("ring", (1, P)), ("usp", (P, 1)), ("usp", (1, P)), ("auto", (P, 1)), ("auto", (1, P))]
    if P == 4:
        out += [("usp", (2, 2)), ("auto", (2, 2))]
    return out


def standard_cases(P: int) -> list[dict]:
    cases: list[dict] = []
    seed = 1000 * P

    def add(backend: str, degrees: tuple[int, int], **kw) -> None:
        nonlocal seed
        seed += 10
        case = dict(backend=backend, degrees=degrees, batch=1, seq=4 * P, heads=4, kv_heads=4, head_dim=64,
                    dtype="float32", mode="pad", seed=seed)
        case.update(kw)
        cases.append(case)

    odd = 4 * P + 1 if P > 1 else 7  # not divisible by P (P > 1)
    for backend, deg in _backends(P):
        add(backend, deg, mode="even")  # no layout recorded: lengths come from the agreement exchange
        add(backend, deg, seq=odd)  # auto_pad
        add(backend, deg, seq=odd, heads=3, kv_heads=3)  # heads not divisible
        add(backend, deg, seq=odd, heads=6, kv_heads=2)  # GQA
        add(backend, deg, seq=odd, heads=4, kv_heads=1)  # MQA (fewer KV heads than ranks)
        add(backend, deg, seq=odd, joint=3, strategy="front")
        add(backend, deg, seq=odd, joint=3, strategy="rear", batch=2)
        add(backend, deg, seq=odd, causal=True)
        add(backend, deg, seq=odd, causal=True, joint=2, strategy="front", heads=6, kv_heads=3)
        add(backend, deg, seq=odd, causal=True, joint=2, strategy="rear")
        add(backend, deg, seq=odd, head_dim=128, batch=2, heads=2, kv_heads=2)
        add(backend, deg, seq=odd, prefix=3)  # SequenceParallelPartialInput: replicated prefix
        add(backend, deg, seq=odd, prefix=2, joint=2, strategy="front", causal=True)
        add(backend, deg, seq=odd, dtype="bfloat16", joint=3, heads=6, kv_heads=2)
        add(backend, deg, seq=odd, dtype="bfloat16", causal=True, strategy="rear", joint=2, head_dim=128)
        add(backend, deg, seq=odd, dtype="float64", heads=5, kv_heads=5, joint=1, strategy="rear")
        add(backend, deg, seq=max(1, P - 1))  # S < P: at least one shard is all padding
        if P > 1 and deg[0] == 1:  # ring-only: unequal shard lengths without padding
            lengths = [3 + 2 * r for r in range(P)]
            lengths[0] = 0  # an empty shard
            add(backend, deg, mode="uneven", lengths=lengths, seq=sum(lengths))
            add(backend, deg, mode="uneven", lengths=lengths, seq=sum(lengths), joint=2, causal=True, strategy="rear",
                heads=4, kv_heads=2)
    return cases


@functools.cache
def standard_cases_cached(P: int) -> list[dict]:
    return standard_cases(P)


@pytest.mark.parametrize("world_size,index", case_params(standard_cases_cached, [1, 2, 3, 4]))
def test_backend_matches_reference(rank_batch, world_size, index):
    cases = standard_cases_cached(world_size)
    bad = case_failures(cases, rank_batch(run_cases, world_size, cases), index)
    assert not bad, bad[0]


@st.composite
def random_case(draw, P: int) -> dict:
    factors = [(u, P // u) for u in range(1, P + 1) if P % u == 0]
    backend = draw(st.sampled_from(["ulysses", "ring", "usp", "auto"]))
    if backend == "ulysses":
        degrees = (P, 1)
    elif backend == "ring":
        degrees = (1, P)
    else:
        degrees = draw(st.sampled_from(factors))
    kv_heads = draw(st.integers(1, 4))
    heads = kv_heads * draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["pad", "uneven"] if degrees[0] == 1 else ["pad"]))
    case = dict(
        backend=backend,
        degrees=degrees,
        batch=draw(st.integers(1, 2)),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([8, 16, 64])),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        causal=draw(st.booleans()),
        joint=draw(st.integers(0, 3)),
        strategy=draw(st.sampled_from(["front", "rear"])),
        mode=mode,
        seed=draw(st.integers(0, 10**6)),
        scale=draw(st.floats(0.05, 1.0)),
    )
    if mode == "uneven":
        lengths = draw(st.lists(st.integers(0, 9), min_size=P, max_size=P).filter(lambda x: sum(x) > 0))
        case.update(lengths=lengths, seq=sum(lengths))
    else:
        case["seq"] = draw(st.integers(1, 6 * P))
        if case["joint"] == 0 or case["strategy"] == "front":
            case["prefix"] = draw(st.integers(0, 2))
    return case


@functools.cache
def random_cases(P: int) -> list[dict]:
    """Hypothesis draws the cases at collection (shrinking would diverge across ranks, so generation
    only; derandomized, so every collection draws the same ones)."""
    cases: list[dict] = []

    @settings(max_examples=30, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(random_case(P))
    def collect(case):
        cases.append(case)

    collect()
    assert len(cases) >= 20
    return cases


@pytest.mark.parametrize("world_size,index", case_params(random_cases, [2, 3, 4]))
def test_random_shapes_property(rank_batch, world_size, index):
    cases = random_cases(world_size)
    bad = case_failures(cases, rank_batch(run_cases, world_size, cases), index)
    assert not bad, bad[0]


# --------------------------------------------------------------------------------------------
# Errors that must be raised on every rank (and never hang)


def _disagreeing_call(kind: str) -> str:
    import torch

    from sp_kernels.attn import attention
    from sp_kernels.distributed.parallel_state import SequenceParallelConfig, init_sequence_parallel
    from sp_kernels.plan.context import ShardLayout, sp_forward_context

    rank, P = dist.get_rank(), dist.get_world_size()
    state = init_sequence_parallel(SequenceParallelConfig(ulysses_degree=P))
    heads = 6 if (kind == "heads" and rank == 1) else 4
    dtype = torch.float64 if (kind == "dtype" and rank == P - 1) else torch.float32
    rows = 5 if (kind == "rows" and rank == 0) else 4
    q = torch.randn(1, rows, heads, 8, dtype=dtype)
    kv = torch.randn(1, rows, heads, 8, dtype=dtype)
    joint = {}
    if kind == "joint":
        J = 2 if rank == 0 else 3
        joint = dict(joint_query=torch.randn(1, J, heads, 8), joint_key=torch.randn(1, J, heads, 8),
                     joint_value=torch.randn(1, J, heads, 8))
    with sp_forward_context(state) as ctx:
        ctx.sharded = True
        if kind == "layout":
            ctx.record(ShardLayout(true_len=4 * P - rank, local_len=4, sp_size=P))
        try:
            attention(q, kv, kv, backend="ulysses", **joint)
        except ValueError as e:
            return str(e)
    return "no error"


@pytest.mark.parametrize("kind", ["heads", "dtype", "rows", "joint", "layout"])
def test_disagreement_raises_on_every_rank(rank_pool, kind):
    pool = rank_pool(3)
    messages = pool.run(_disagreeing_call, kind, timeout=60)
    assert all(m != "no error" for m in messages), messages
    expected = {"heads": "query heads", "dtype": "dtype", "rows": "equal local lengths", "joint": "joint length",
                "layout": "layout true_len"}[kind]
    for m in messages:
        assert expected in m, m
    # The pool (and its process groups) still work after every rank raised.
    cases = standard_cases(3)[:2]
    assert not failures(cases, pool.run(run_cases, cases))


def _degree_errors() -> list[str]:
    import torch

    from sp_kernels.attn import attention
    from sp_kernels.distributed.parallel_state import SequenceParallelConfig, init_sequence_parallel
    from sp_kernels.plan.context import sp_forward_context

    msgs = []
    for config, backend in [((2, 2), "ring"), ((2, 2), "ulysses"), ((4, 1), "ring"), ((1, 4), "ulysses"),
                            ((2, 2), "fused_ring"), ((2, 2), "bogus")]:
        state = init_sequence_parallel(SequenceParallelConfig(ulysses_degree=config[0], ring_degree=config[1]))
        q = torch.randn(1, 4, 4, 8)
        with sp_forward_context(state) as ctx:
            ctx.sharded = True
            try:
                attention(q, q, q, backend=backend)
                msgs.append("no error")
            except ValueError as e:
                msgs.append(str(e))
    return msgs


def test_degrees_that_do_not_fit(rank_pool):
    per_rank = rank_pool(4).run(_degree_errors)
    for msgs in per_rank:
        assert "needs ulysses_degree == 1" in msgs[0] and "ring_degree=2" in msgs[0]
        assert "needs ring_degree == 1" in msgs[1]
        assert "needs ulysses_degree == 1" in msgs[2] and "ulysses_degree=4" in msgs[2]
        assert "needs ring_degree == 1" in msgs[3]
        assert "needs ulysses_degree == 1" in msgs[4] and "ring_degree=2" in msgs[4]
        assert "'bogus' is unknown" in msgs[5] and "ulysses" in msgs[5]


def test_case_lists_cover_the_features():
    """The standard lists exercise what issue 3 asks for (guards against a silently shrunk list)."""
    cases = [c for P in (1, 2, 3, 4) for c in standard_cases(P)]
    assert {c["backend"] for c in cases} >= {"ulysses", "ring", "usp", "auto"}
    assert any(c["seq"] % math.prod(c["degrees"]) for c in cases)
    assert any(c["heads"] % c["degrees"][0] for c in cases if c["backend"] == "ulysses")
    assert any(c["kv_heads"] < c["degrees"][0] for c in cases)
    assert {c.get("strategy", "front") for c in cases if c.get("joint")} == {"front", "rear"}
    assert {c["head_dim"] for c in cases} >= {64, 128}
    assert {c["dtype"] for c in cases} >= {"float32", "bfloat16"}
    assert any(c.get("mode") == "uneven" for c in cases) and any(c.get("causal") for c in cases)
    assert any(c["batch"] > 1 for c in cases)
    assert describe(cases[0])
