"""Plans applied on gloo ranks (world sizes 1-4) against the same model run on one process.

Each world size runs all of its cases in one call on a shared rank pool (spawning ranks costs
seconds). The reference is computed on every rank by the same model without hooks, on the full
sequence, in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sp_kernels import (
    SequenceParallelConfig,
    apply_sequence_parallel,
    init_sequence_parallel,
    remove_sequence_parallel,
    sp_gather,
    sp_shard,
    sp_shard_with_padding,
)
from sp_kernels.plan.context import ShardLayout, sp_forward_context
from sp_kernels.testing.launch import RankError
from tests.plan_models import SPI, SPO, build, make_inputs

# (model kind, sequence length, forward kwargs)
CASES = [
    ("dit", 24, {}),
    ("dit", 13, {}),  # not divisible: auto_pad
    ("dit", 3, {"return_dict": True}),  # shorter than some worlds: whole shards of padding
    ("root", 11, {}),
    ("root", 12, {"return_dict": True}),
    ("wrapped", 10, {"return_dict": "dataclass"}),
    ("wrapped", 9, {"return_dict": "dict"}),
    ("wrapped", 7, {}),
    ("partial", 10, {}),
    ("partial", 5, {}),
    ("intrusive", 14, {}),
]


def _sample(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    if isinstance(out, dict):
        return out["sample"]
    return out.sample


def _probes(model):
    return [m for m in model.modules() if type(m).__name__ == "Probe"]


def run_plan_cases(cases):
    world = dist.get_world_size()
    rank = dist.get_rank()
    config = SequenceParallelConfig(ulysses_degree=world)
    results = []
    for kind, seq, kwargs in cases:
        model = build(kind)
        inputs = make_inputs(kind, seq)
        ref = _sample(model(**inputs, **kwargs))
        apply_sequence_parallel(model, config)
        for p in _probes(model):
            p.records.clear()
        out = model(**inputs, **kwargs)
        records = [r for p in _probes(model) for r in p.records]
        remove_sequence_parallel(model)
        got = _sample(out)
        assert type(out) is type(model(**inputs, **kwargs)), (kind, type(out))
        local = -(-seq // world)
        if kind == "partial":
            expect_local = 3 + local  # replicated text prefix + image shard
            layout = ShardLayout(true_len=seq, local_len=local, sp_size=world, prefix_len=3)
        else:
            expect_local = local
            layout = ShardLayout(true_len=seq, local_len=local, sp_size=world)
        region_ok = all(
            r[0] == (world > 1) and r[1] == expect_local and (world == 1 or layout in r[2]) for r in records
        )
        results.append(
            {
                "case": (kind, seq, kwargs),
                "shape_ok": tuple(got.shape) == tuple(ref.shape),
                "err": (got - ref).abs().max().item() if got.shape == ref.shape else float("inf"),
                "region_ok": region_ok and len(records) > 0,
                "rank": rank,
            }
        )
    return results


def run_grad_case(seq):
    world = dist.get_world_size()
    model = build("dit")
    inputs = make_inputs("dit", seq)
    x = inputs["x"].clone().requires_grad_(True)
    (ref,) = model(x, inputs["temb"])
    (ref**2).sum().backward()
    ref_xgrad = x.grad.clone()
    ref_pgrad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    x.grad = None
    apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=world))
    (out,) = model(x, inputs["temb"])
    (out**2).sum().backward()
    remove_sequence_parallel(model)
    # The SP-group average of every gradient is the full-sequence gradient (DDP's reduction).
    errs = []
    for g, r in zip([x.grad] + [p.grad for p in model.parameters()], [ref_xgrad] + ref_pgrad):
        g = g.clone()
        dist.all_reduce(g)
        errs.append((g / world - r).abs().max().item())
    return max(errs)


def run_intrusive_without_plan(seq):
    """sp_shard / sp_gather with no model and no hooks: the default context of the SP state."""
    world = dist.get_world_size()
    init_sequence_parallel(SequenceParallelConfig(ulysses_degree=world))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, seq, 5, generator=g)
    shard = sp_shard(x, 1, auto_pad=True)
    assert shard.shape[1] == -(-seq // world) and shard.is_contiguous()
    back = sp_gather(shard * 2, 1)
    y = torch.randn(3, seq, generator=g)
    yshard, pad = sp_shard_with_padding(y, 1, pad_value=-7.0)
    assert pad == -(-seq // world) * world - seq
    if dist.get_rank() == world - 1 and pad:
        assert (yshard[:, -pad:] == -7.0).all()
    yback = sp_gather(yshard, 1)
    with sp_forward_context(init_sequence_parallel(SequenceParallelConfig(ulysses_degree=world))) as ctx:
        z = sp_shard(x, -2, auto_pad=True)
        assert ctx.sharded == (world > 1)
        zback = sp_gather(z, -2)
        assert not ctx.sharded
    return max((back - 2 * x).abs().max().item(), (yback - y).abs().max().item(), (zback - x).abs().max().item())


def run_error_cases():
    world = dist.get_world_size()
    msgs = {}
    model = build("dit")
    plan = {"blocks.0": {"hidden_states": SPI(split_dim=1, expected_dims=3)}, "proj_out": SPO(1, 3)}
    apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=world), plan)
    try:
        model(**make_inputs("dit", 4 * world + 1))
    except ValueError as e:
        msgs["divisible"] = str(e)
    remove_sequence_parallel(model)

    apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=world), {"proj_out": SPO(1, 3)})
    try:
        model(**make_inputs("dit", 8))
    except RuntimeError as e:
        msgs["gather_unsharded"] = str(e)
    remove_sequence_parallel(model)

    try:
        sp_shard(torch.randn(2, 4 * world + 1), 1)
    except ValueError as e:
        msgs["sp_shard"] = str(e)

    before = {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()}
    try:
        apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=world + 1))
    except ValueError as e:
        msgs["degrees"] = str(e)
    msgs["untouched"] = before == {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()}
    return msgs


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{k}-S{s}-{kw or 'plain'}" for k, s, kw in CASES])
def test_plans_match_single_process(rank_batch, world, index):
    for rank, results in enumerate(rank_batch(run_plan_cases, world, CASES)):
        r = results[index]
        assert r["shape_ok"], (rank, r)
        assert r["err"] < 1e-12, (rank, r)
        assert r["region_ok"], (rank, r)


@pytest.mark.parametrize("world", [2, 3])
def test_gradients_match_single_process(rank_pool, world):
    errs = rank_pool(world).run(run_grad_case, 3 * world + 1)
    assert max(errs) < 1e-10, errs


@pytest.mark.parametrize("world", [1, 3])
def test_intrusive_api_without_plan(rank_pool, world):
    errs = rank_pool(world).run(run_intrusive_without_plan, 10)
    assert max(errs) == 0.0, errs


@pytest.mark.parametrize("world", [2, 3])
def test_error_messages_on_every_rank(rank_pool, world):
    for msgs in rank_pool(world).run(run_error_cases):
        n = 4 * world + 1
        assert msgs["divisible"] == (
            f"_sp_plan['blocks.0']['hidden_states']: length {n} of dim 1 (shape (2, {n}, 16)) is not divisible by "
            f"the sequence-parallel size {world}; set auto_pad=True in its SequenceParallelInput to pad it "
            "(attention then excludes the padding exactly)"
        )
        assert "the sequence is not sharded in this forward" in msgs[
            "gather_unsharded"]
        assert f"sp_shard: length {n} of dim 1 (shape (2, {n})) is not divisible by the sequence-parallel size" in (
            msgs["sp_shard"])
        assert f"= {world + 1} does not divide the world size {world}" in msgs["degrees"]
        assert msgs["untouched"]


def run_disagreeing_gather():
    rank = dist.get_rank()
    init_sequence_parallel(SequenceParallelConfig(ulysses_degree=dist.get_world_size()))
    local = torch.randn(2, 4 + rank, 3)  # rank-dependent length: a user bug
    try:
        sp_gather(local, 1)
    except ValueError as e:
        return str(e)
    return "no error"


def test_disagreeing_shards_raise_on_every_rank(rank_pool):
    msgs = rank_pool(3).run(run_disagreeing_gather)
    for m in msgs:
        assert "sp_gather: the ranks' shards disagree (shapes by rank: [(2, 4, 3), (2, 5, 3), (2, 6, 3)]" in m, m


def test_rank_errors_come_back(rank_pool):
    with pytest.raises(RankError, match="rank 1: ValueError"):
        rank_pool(2).run(_raise_on_rank_1)


def _raise_on_rank_1():
    if dist.get_rank() == 1:
        raise ValueError("boom")
    return 0


def run_group_layout(u, r):
    state = init_sequence_parallel(SequenceParallelConfig(ulysses_degree=u, ring_degree=r))
    again = init_sequence_parallel(SequenceParallelConfig(ulysses_degree=u, ring_degree=r))

    def ranks(g):
        return None if g is None else dist.get_process_group_ranks(g)

    return {
        "cached": again is state,
        "sp": ranks(state.sp_group),
        "ulysses": ranks(state.ulysses_group),
        "ring": ranks(state.ring_group),
        "sp_rank": state.sp_rank,
        "ulysses_rank": state.ulysses_rank,
        "ring_rank": state.ring_rank,
    }


@pytest.mark.parametrize(
    "u, r, expect",
    [
        # rank 3's view: Ulysses groups are contiguous ranks, ring groups strided by U.
        (2, 2, {"sp": [0, 1, 2, 3], "ulysses": [2, 3], "ring": [1, 3], "sp_rank": 3, "ulysses_rank": 1,
                "ring_rank": 1}),
        (4, 1, {"sp": [0, 1, 2, 3], "ulysses": [0, 1, 2, 3], "ring": None, "sp_rank": 3, "ulysses_rank": 3,
                "ring_rank": 0}),
        (1, 4, {"sp": [0, 1, 2, 3], "ulysses": None, "ring": [0, 1, 2, 3], "sp_rank": 3, "ulysses_rank": 0,
                "ring_rank": 3}),
        # SP size 2 in a world of 4: two SP groups (data-parallel replicas), [0, 1] and [2, 3].
        (2, 1, {"sp": [2, 3], "ulysses": [2, 3], "ring": None, "sp_rank": 1, "ulysses_rank": 1, "ring_rank": 0}),
    ],
)
def test_group_layout(rank_pool, u, r, expect):
    views = rank_pool(4).run(run_group_layout, u, r)
    assert all(v["cached"] for v in views)
    got = {k: v for k, v in views[3].items() if k != "cached"}
    assert got == expect
