"""parallel_state: config validation, timeouts, the group cache, setup agreement, broken states, devices.

The multi-rank cases run on the shared gloo pools (tests/conftest.py) and always pass their own
deadline, so a regression that hangs fails here in seconds instead of blocking the session. Ranks
that are made to skip a collective on purpose do it on a group the case destroys afterwards, so
the pool's world group stays clean for the next test.
"""

from __future__ import annotations

import datetime
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist

from sp_kernels.distributed import parallel_state as ps
from sp_kernels.distributed.parallel_state import (
    SequenceParallelConfig,
    SetupError,
    SPState,
    agree_on_setup,
    destroy_sequence_parallel,
    device_of_group,
    init_sequence_parallel,
    parse_backend_config,
)

# ---------------------------------------------------------------------------------------------
# Local: config validation


def test_timeout_accepts_none_seconds_and_timedelta():
    assert SequenceParallelConfig().timeout is None
    assert SequenceParallelConfig(timeout=3).timeout == 3  # stored as given
    assert SequenceParallelConfig(timeout=2.5).timeout_delta() == datetime.timedelta(seconds=2.5)
    td = datetime.timedelta(minutes=2)
    assert SequenceParallelConfig(timeout=td).timeout is td
    assert SequenceParallelConfig(timeout=td).timeout_delta() == td
    # Without torch.distributed, None means torch's default.
    assert SequenceParallelConfig().timeout_delta() == dist.distributed_c10d.default_pg_timeout


@pytest.mark.parametrize(
    "value, exc, text",
    [
        (0, ValueError, "finite number of seconds > 0, got 0"),
        (-1.5, ValueError, "got -1.5"),
        (float("inf"), ValueError, "got inf"),
        (float("nan"), ValueError, "got nan"),
        (datetime.timedelta(0), ValueError, "positive duration"),
        (True, TypeError, "got True (bool)"),
        ("30", TypeError, "got '30' (str)"),
    ],
)
def test_timeout_rejects(value, exc, text):
    with pytest.raises(exc, match="SequenceParallelConfig.timeout") as info:
        SequenceParallelConfig(timeout=value)
    assert text in str(info.value)


@pytest.mark.parametrize("value", ["no", 0, 1, None])
def test_strict_dims_must_be_a_real_bool(value):
    with pytest.raises(TypeError, match=r"SequenceParallelConfig.strict_dims must be a bool .* got "):
        SequenceParallelConfig(strict_dims=value)
    assert SequenceParallelConfig(strict_dims=True).strict_dims is True


@pytest.mark.parametrize("field", ["ulysses_degree", "ring_degree"])
@pytest.mark.parametrize("value", [0, -2, 1.0, True, "2"])
def test_degrees_validated(field, value):
    with pytest.raises(ValueError, match=f"SequenceParallelConfig.{field} must be an int >= 1, got {value!r}"):
        SequenceParallelConfig(**{field: value})


def test_configs_differing_in_timeout_spelling_are_equal():
    assert SequenceParallelConfig(timeout=3) == SequenceParallelConfig(timeout=3.0)
    assert hash(SequenceParallelConfig(timeout=3)) == hash(SequenceParallelConfig(timeout=3.0))


# ---------------------------------------------------------------------------------------------
# Local: broken state


def test_mark_broken_and_raise_if_broken():
    state = SPState(config=SequenceParallelConfig(ulysses_degree=2))
    assert state.broken is None
    state.raise_if_broken("attention")  # nothing to raise
    state.mark_broken("ValueError in ulysses attention: boom")
    state.mark_broken("RuntimeError: the fallout")  # the first reason is the root cause: kept
    assert state.broken == "ValueError in ulysses attention: boom"
    with pytest.raises(RuntimeError) as info:
        state.raise_if_broken("Toy.forward")
    assert str(info.value) == (
        "Toy.forward: sequence parallelism is unusable after an earlier error in a sharded region "
        "(ValueError in ulysses attention: boom); call remove_sequence_parallel(model) and apply again, or "
        "destroy_sequence_parallel() and init again"
    )
    with pytest.raises(TypeError, match="reason must be a str"):
        state.mark_broken(ValueError("not a str"))


def test_agree_on_setup_without_distributed():
    agree_on_setup(None)  # nothing to agree with: returns
    err = ValueError("local")
    with pytest.raises(ValueError) as info:
        agree_on_setup(err, what="apply")
    assert info.value is err


# ---------------------------------------------------------------------------------------------
# Local: which device a group communicates


def test_parse_backend_config():
    assert parse_backend_config("cpu:gloo,cuda:nccl") == {"cpu": "gloo", "cuda": "nccl"}
    assert parse_backend_config(" CPU:gloo , cuda:nccl ") == {"cpu": "gloo", "cuda": "nccl"}
    assert parse_backend_config("nccl") == {"cuda": "nccl"}
    assert parse_backend_config("gloo") == {"cpu": "gloo"}
    assert parse_backend_config("undefined") == {"cpu": "gloo", "cuda": "nccl"}
    assert parse_backend_config("custom_thing") == {}
    with pytest.raises(ValueError, match="malformed entry 'cuda' in 'cpu:gloo,cuda'"):
        parse_backend_config("cpu:gloo,cuda")


@pytest.fixture
def fake_backend(monkeypatch):
    """Make ``device_of_group`` see a group with the given backend config (no real group, no GPU)."""
    def use(text: str, cuda: bool = False):
        monkeypatch.setattr(ps, "_backend_text", lambda group: text)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        return object()
    return use


def test_device_of_group_multi_backend_takes_cuda_tensors(fake_backend):
    group = fake_backend("cpu:gloo,cuda:nccl")
    assert device_of_group(group, torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert device_of_group(group, "cpu") == torch.device("cpu")
    assert device_of_group(group) == torch.device("cpu")  # no CUDA here: the cpu backend
    group = fake_backend("cpu:gloo,cuda:nccl", cuda=True)
    assert device_of_group(group) == torch.device("cuda", 0)  # CUDA available: prefer it


def test_device_of_group_single_backends(fake_backend):
    group = fake_backend("cpu:gloo,cuda:gloo")  # what torch records for a plain gloo group
    with pytest.raises(ValueError, match=r"no backend for cuda tensors: it communicates cpu tensors"):
        device_of_group(group, torch.device("cuda", 0))
    assert device_of_group(group) == torch.device("cpu")
    group = fake_backend("nccl", cuda=True)
    assert device_of_group(group) == torch.device("cuda", 0)
    assert device_of_group(group, "cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"backend 'nccl'\) has no backend for cpu tensors"):
        device_of_group(group, torch.device("cpu"))
    group = fake_backend("undefined")  # init_process_group() without a backend, old torch
    assert device_of_group(group) == torch.device("cpu")


def test_device_of_no_group():
    assert device_of_group(None) == torch.device("cpu")
    assert device_of_group(None, "cuda:1") == torch.device("cuda", 1)


# ---------------------------------------------------------------------------------------------
# Distributed (gloo ranks)


def _timeout_of(group):
    return ps._backend_timeout(group)


def run_timeouts(seconds: float):
    """Rank 1 skips a collective on the SP group: rank 0 must raise after ``seconds``, not hang."""
    rank = dist.get_rank()
    world_timeout = _timeout_of(dist.group.WORLD)
    default = init_sequence_parallel(SequenceParallelConfig(ulysses_degree=2))
    state = init_sequence_parallel(SequenceParallelConfig(ulysses_degree=2, timeout=seconds))
    out = {
        "default_follows_world": _timeout_of(default.sp_group) == world_timeout
        and _timeout_of(default.ulysses_group) == world_timeout,
        "configured": _timeout_of(state.sp_group) == datetime.timedelta(seconds=seconds)
        and _timeout_of(state.ulysses_group) == datetime.timedelta(seconds=seconds),
        "separate_groups": state.sp_group is not default.sp_group,
    }
    if rank == 0:
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(4), group=state.sp_group)  # rank 1 never joins
            out["error"] = None
        except RuntimeError as e:
            out["error"] = str(e)
        out["elapsed"] = time.monotonic() - start
    # Rank 1 keeps its end of the group open until rank 0 timed out (closing it would end the wait
    # early with a connection error instead of the timeout under test).
    dist.barrier()
    destroy_sequence_parallel()
    return out


def test_timeout_bounds_a_skipped_collective(rank_pool):
    out = rank_pool(2).run(run_timeouts, 2.0, timeout=60)
    for o in out:
        assert o["default_follows_world"] and o["configured"] and o["separate_groups"], o
    assert out[0]["error"] is not None and "timed out" in out[0]["error"].lower(), out[0]
    assert 1.5 < out[0]["elapsed"] < 15, out[0]


def _resources() -> dict:
    world = getattr(dist.distributed_c10d, "_world", None)
    pg_map = getattr(world, "pg_map", None)
    return {
        "groups": len(pg_map) if pg_map is not None else 0,
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "os_threads": len(os.listdir("/proc/self/task")),
    }


def run_group_reuse(cycles: int, reinit_cycles: int):
    ring = SequenceParallelConfig(ring_degree=2, attention_backend="ring")
    fused = SequenceParallelConfig(ring_degree=2, attention_backend="fused_ring", strict_dims=True)
    destroy_sequence_parallel()
    a, b = init_sequence_parallel(ring), init_sequence_parallel(fused)
    shared = (a is not b and a.sp_group is b.sp_group and a.ring_group is b.ring_group
              and a.config == ring and b.config == fused and a.ring_buffers is not b.ring_buffers)
    base = _resources()
    for _ in range(cycles):
        again = init_sequence_parallel(ring)
        init_sequence_parallel(fused)
    after_alternating = _resources()
    cached = again is a
    destroy_sequence_parallel()
    destroyed_marks_old = a.broken is not None
    state = init_sequence_parallel(ring)
    fresh = state is not a and state.broken is None and state.sp_group is not a.sp_group
    base_reinit = _resources()
    for _ in range(reinit_cycles):
        destroy_sequence_parallel()
        state = init_sequence_parallel(ring)
    t = torch.full((2,), float(dist.get_rank() + 1))
    dist.all_reduce(t, group=state.ring_group)
    after_reinit = _resources()
    destroy_sequence_parallel()
    return {
        "shared": shared, "cached": cached, "destroyed_marks_old": destroyed_marks_old, "fresh": fresh,
        "base": base, "after_alternating": after_alternating, "base_reinit": base_reinit,
        "after_reinit": after_reinit, "sum": t.tolist(),
    }


def _assert_no_growth(before: dict, after: dict, what: str) -> None:
    assert after["groups"] == before["groups"], (what, before, after)
    assert after["fds"] <= before["fds"] + 4, (what, before, after)
    assert after["threads"] <= before["threads"] + 2, (what, before, after)
    assert after["os_threads"] <= before["os_threads"] + 4, (what, before, after)


def test_groups_are_reused_across_backends_and_destroyed(rank_pool):
    for r in rank_pool(2).run(run_group_reuse, 50, 30, timeout=120):
        assert r["shared"] and r["cached"] and r["destroyed_marks_old"] and r["fresh"], r
        assert r["base"]["groups"] > 0, r  # the count is readable on this torch
        _assert_no_growth(r["base"], r["after_alternating"], "50 alternating ring/fused_ring inits")
        _assert_no_growth(r["base_reinit"], r["after_reinit"], "30 destroy + init cycles")
        assert r["sum"] == [3.0, 3.0]


def run_strict_subgroup():
    rank = dist.get_rank()
    sub = dist.new_group([0, 1])  # collective over the world; rank 2 gets NON_GROUP_MEMBER
    start = time.monotonic()
    try:
        init_sequence_parallel(SequenceParallelConfig(ulysses_degree=2, timeout=20), group=sub)
        error = None
    except (TypeError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    elapsed = time.monotonic() - start
    # The whole world as an explicit parent is fine.
    state = init_sequence_parallel(SequenceParallelConfig(ulysses_degree=3, timeout=20), group=dist.group.WORLD)
    t = torch.ones(1)
    dist.all_reduce(t, group=state.sp_group)
    if rank in (0, 1):
        dist.destroy_process_group(sub)
    destroy_sequence_parallel()
    return {"error": error, "elapsed": elapsed, "sum": t.item()}


def test_strict_subgroup_is_refused_before_any_collective(rank_pool):
    out = rank_pool(3).run(run_strict_subgroup, timeout=60)
    for rank in (0, 1):
        assert out[rank]["error"].startswith(
            "ValueError: init_sequence_parallel: the parent group has ranks [0, 1] but the world has 3 ranks"
        ), out[rank]
    assert out[2]["error"].startswith("TypeError: init_sequence_parallel: group must be a torch.distributed"), out[2]
    for o in out:
        assert o["elapsed"] < 2.0 and o["sum"] == 3.0, o


def run_disagreeing_init(case: str):
    rank = dist.get_rank()
    good = SequenceParallelConfig(ulysses_degree=2, timeout=20)
    bad = {
        "degrees": lambda: SequenceParallelConfig(ulysses_degree=3, timeout=20),
        "object": lambda: "ulysses_degree=2",
        "mismatch": lambda: SequenceParallelConfig(ring_degree=2, timeout=20),
        "timeout": lambda: SequenceParallelConfig(ulysses_degree=2, timeout=21),
    }[case]()
    start = time.monotonic()
    try:
        init_sequence_parallel(good if rank == 0 else bad)
        result = "ok"
    except Exception as e:  # noqa: BLE001 - the test reads type and message
        result = (type(e).__name__, str(e), isinstance(e, RuntimeError), getattr(e, "failed", None))
    return result, time.monotonic() - start


def run_good_init():
    state = init_sequence_parallel(SequenceParallelConfig(ulysses_degree=2, timeout=20))
    t = torch.full((1,), float(dist.get_rank() + 1))
    dist.all_reduce(t, group=state.sp_group)
    destroy_sequence_parallel()
    return t.item()


def test_init_failing_on_one_rank_raises_on_every_rank(rank_pool):
    pool = rank_pool(2)
    (r0, t0), (r1, t1) = pool.run(run_disagreeing_init, "degrees", timeout=60)
    assert r1[0] == "ValueError" and "= 3 does not divide the world size 2" in r1[1], r1
    assert r0[0] == "SetupError" and r0[2] and r0[3] == {1: r1[0] + ": " + r1[1]}, r0
    assert r0[1].startswith("init_sequence_parallel failed on rank(s) [1] of the group [0, 1], so it was not done"), r0
    assert max(t0, t1) < 10, (t0, t1)

    (r0, _), (r1, _) = pool.run(run_disagreeing_init, "object", timeout=60)
    assert r1[:2] == ("TypeError", "init_sequence_parallel expects a SequenceParallelConfig, got str"), r1
    assert r0[0] == "SetupError" and "rank 1: TypeError: init_sequence_parallel expects a" in r0[1], r0

    for case, text in (("mismatch", "rank 1: ulysses_degree=1, ring_degree=2, timeout=20s"),
                       ("timeout", "rank 1: ulysses_degree=2, ring_degree=1, timeout=21s")):
        for r, _ in pool.run(run_disagreeing_init, case, timeout=60):
            assert r[0] == "ValueError" and "the ranks passed different degrees or timeouts" in r[1], r
            assert "rank 0: ulysses_degree=2, ring_degree=1, timeout=20s" in r[1] and text in r[1], r

    assert pool.run(run_good_init, timeout=60) == [3.0, 3.0]  # the pool is still usable


def run_agree():
    rank = dist.get_rank()
    err = ValueError("bad plan on rank 1") if rank == 1 else None
    try:
        agree_on_setup(err, what="apply_sequence_parallel(Toy)")
        one = "ok"
    except Exception as e:  # noqa: BLE001
        one = (type(e).__name__, str(e), e is err, getattr(e, "failed", None))
    agree_on_setup(None)  # nobody failed: returns everywhere
    try:
        agree_on_setup("not an exception")
        bad_arg = "ok"
    except Exception as e:  # noqa: BLE001
        bad_arg = (type(e).__name__, str(e))
    # Rank 1 never comes: rank 0 must give up after the timeout. On a group of its own, destroyed
    # afterwards, because the exchange left pending there is not to meet a later collective.
    sub = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=3))
    late = None
    if rank == 0:
        start = time.monotonic()
        try:
            agree_on_setup(None, group=sub, what="late setup", timeout=1.5)
        except RuntimeError as e:
            late = (str(e), time.monotonic() - start)
    dist.barrier()
    dist.destroy_process_group(sub)
    return one, bad_arg, late


def test_agree_on_setup(rank_pool):
    (one0, bad0, late0), (one1, bad1, late1) = rank_pool(2).run(run_agree, timeout=60)
    assert one1 == ("ValueError", "bad plan on rank 1", True, None), one1
    assert one0[0] == "SetupError" and one0[3] == {1: "ValueError: bad plan on rank 1"}, one0
    assert one0[1] == (
        "apply_sequence_parallel(Toy) failed on rank(s) [1] of the group [0, 1], so it was not done on this rank "
        "either: rank 1: ValueError: bad plan on rank 1"
    )
    # Both ranks passed a non-exception: each still took part, and each raises its own TypeError.
    for bad in (bad0, bad1):
        assert bad == ("TypeError", "agree_on_setup: error must be an exception or None, got str"), bad
    assert issubclass(SetupError, RuntimeError)
    text, elapsed = late0
    assert text.startswith("late setup: the ranks [0, 1] did not all reach the setup agreement within 1.5s"), text
    assert elapsed < 10, elapsed
    assert late1 is None


def run_broken_reinit():
    rank = dist.get_rank()
    cfg = SequenceParallelConfig(ring_degree=2, timeout=20)
    other = SequenceParallelConfig(ring_degree=2, attention_backend="ring", timeout=20)
    first = init_sequence_parallel(cfg)
    sibling = init_sequence_parallel(other)
    if rank == 0:
        first.mark_broken("ValueError in fused_ring attention: test")  # only rank 0 saw the error
    second = init_sequence_parallel(cfg)  # every rank rebuilds, since one rank is broken
    t = torch.full((1,), float(rank + 1))
    dist.all_reduce(t, group=second.ring_group)
    out = {
        "fresh": second is not first and second.broken is None,
        "new_groups": second.ring_group is not first.ring_group,
        "old_broken": first.broken is not None and sibling.broken is not None,
        "cached": init_sequence_parallel(cfg) is second,
        "sum": t.item(),
        "cpu": device_of_group(second.ring_group, "cpu") == torch.device("cpu"),
    }
    try:
        device_of_group(second.ring_group, torch.device("cuda", 0))
        out["cuda"] = "accepted"
    except ValueError as e:
        out["cuda"] = str(e)
    # discard_state of a broken state (what remove_sequence_parallel does): next init is fresh.
    second.mark_broken("KeyboardInterrupt in a sharded forward")
    ps.discard_state(second)
    third = init_sequence_parallel(cfg)
    dist.all_reduce(t, group=third.ring_group)
    out["after_discard"] = third is not second and third.broken is None and t.item() == 6.0
    destroy_sequence_parallel()
    return out


def test_broken_state_is_replaced_by_init(rank_pool):
    for o in rank_pool(2).run(run_broken_reinit, timeout=60):
        assert o["fresh"] and o["new_groups"] and o["old_broken"] and o["cached"], o
        assert o["sum"] == 3.0 and o["cpu"] and o["after_discard"], o
        assert "no backend for cuda tensors: it communicates cpu tensors" in o["cuda"], o
