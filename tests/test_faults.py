"""Fault injection: no hangs. Every fault below must end in an error on every rank within the
configured SP timeout (a few seconds here), later calls must raise a clear error instead of crossing
collectives, and removing and applying SP again must give exact results.

Faults: an exception inside the ring loop after a transfer was posted; one rank raising in a hook
and staying alive (a server process); a rank exiting mid-forward; retrying after an error;
reconfiguring 50 times (no growth in process groups, file descriptors or threads).
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from sp_kernels import (
    SequenceParallelConfig,
    SequenceParallelInput,
    SequenceParallelOutput,
    apply_sequence_parallel,
    attention,
    destroy_sequence_parallel,
    remove_sequence_parallel,
)
from sp_kernels.testing.launch import RankPool
from tests.attention_cases import sp_degrees

H, D = 2, 4
C = H * D
TIMEOUT = 4.0  # seconds: the SP groups' timeout in these tests


class Model(nn.Module):
    _sp_plan = {
        "": {"x": SequenceParallelInput(1, expected_dims=3)},
        "proj_out": SequenceParallelOutput(1, expected_dims=3),
    }

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, C)
        self.qkv = nn.Linear(C, 3 * C)
        self.proj_out = nn.Linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        q, k, v = (t.view(*t.shape[:2], H, D) for t in self.qkv(h).chunk(3, dim=-1))
        return self.proj_out(h + attention(q, k, v).flatten(2))


def _config(backend: str) -> SequenceParallelConfig:
    u, r = sp_degrees(backend, dist.get_world_size())
    return SequenceParallelConfig(ulysses_degree=u, ring_degree=r, attention_backend=backend, timeout=TIMEOUT)


def _inputs(seq: int) -> torch.Tensor:
    return torch.randn(1, seq, 3, generator=torch.Generator().manual_seed(seq), dtype=torch.float64)


def _attempt(fn, *args) -> tuple[str | None, float]:
    """(error type and message or None, seconds taken)."""
    start = time.monotonic()
    try:
        with torch.no_grad():
            fn(*args)
    except Exception as e:  # noqa: BLE001 - the test inspects whatever each rank raised
        return f"{type(e).__name__}: {e}", time.monotonic() - start
    return None, time.monotonic() - start


def _reapplied_error(model: nn.Module, backend: str, x: torch.Tensor, ref: torch.Tensor) -> float:
    remove_sequence_parallel(model)
    apply_sequence_parallel(model, _config(backend))
    with torch.no_grad():
        err = (model(x) - ref).abs().max().item()
    remove_sequence_parallel(model)
    return err


def run_ring_exception(backend: str) -> dict:
    """Rank 0's block attention raises (an OOM) after the step's K/V transfer was posted."""
    import sp_kernels.attn.ring as ring

    torch.manual_seed(0)
    model = Model().double()
    x = _inputs(4 * dist.get_world_size())
    with torch.no_grad():
        ref = model(x)
    apply_sequence_parallel(model, _config(backend))
    real = ring.block_attention

    def failing(*args, **kwargs):
        raise torch.OutOfMemoryError("injected: out of memory in block attention")

    if dist.get_rank() == 0:
        ring.block_attention = failing
    try:
        first = _attempt(model, x)
    finally:
        ring.block_attention = real
    second = _attempt(model, x)
    return {"first": first, "second": second, "reapplied": _reapplied_error(model, backend, x, ref)}


@pytest.mark.parametrize("backend", ["ring", "fused_ring"])
def test_exception_inside_ring_loop(rank_pool, backend):
    results = rank_pool(2).run(run_ring_exception, backend, timeout=90)
    assert "injected: out of memory" in results[0]["first"][0], results
    for rank, res in enumerate(results):
        # Rank 1 finished its ring call and waits for rank 0 in the gather: an error within the timeout.
        assert res["first"][0] is not None and res["first"][1] < TIMEOUT + 20, (rank, res)
        assert res["second"][0] and "unusable after an earlier error" in res["second"][0], (rank, res)
        assert res["reapplied"] < 1e-10, (rank, res)


def run_hook_error(backend: str) -> dict:
    """Rank 1 gets an input its split refuses (a bad request in a server process) and stays alive."""
    world = dist.get_world_size()
    torch.manual_seed(0)
    model = Model().double()
    good = _inputs(4 * world)
    with torch.no_grad():
        ref = model(good)
    apply_sequence_parallel(model, _config(backend))
    bad = _inputs(4 * world + 1)  # not divisible, and the plan has no auto_pad
    first = _attempt(model, bad if dist.get_rank() == 1 else good)
    second = _attempt(model, good)
    return {"first": first, "second": second, "reapplied": _reapplied_error(model, backend, good, ref)}


@pytest.mark.parametrize("backend", ["ulysses", "fused_ring"])
def test_one_rank_raises_in_a_hook(rank_pool, backend):
    results = rank_pool(2).run(run_hook_error, backend, timeout=90)
    assert "is not divisible by the sequence-parallel size" in results[1]["first"][0], results
    for rank, res in enumerate(results):
        assert res["first"][0] is not None and res["first"][1] < TIMEOUT + 20, (rank, res)
        # The second call: rank 0 is marked broken (raises at once); rank 1 waits for rank 0 and times out.
        assert res["second"][0] is not None and res["second"][1] < TIMEOUT + 20, (rank, res)
        assert res["reapplied"] < 1e-10, (rank, res)


def run_rank_exit(report: str) -> None:
    """Rank 1 exits in the middle of a forward; rank 0 reports what it saw to a file."""
    torch.manual_seed(0)
    model = Model().double()
    apply_sequence_parallel(model, _config("ulysses"))
    if dist.get_rank() == 1:
        model.qkv.register_forward_hook(lambda *a: os._exit(3))
    error, took = _attempt(model, _inputs(8))
    with open(report, "w") as f:
        f.write(f"{took}\n{error}")


def test_rank_exiting_mid_forward(tmp_path):
    report = tmp_path / "rank0.txt"
    pool = RankPool(2, timeout=60.0)
    try:
        with pytest.raises(RuntimeError, match="rank 1 died"):
            pool.run(run_rank_exit, str(report), timeout=60)
    finally:
        pool.close(force=True)
    took, error = report.read_text().split("\n", 1)
    assert error != "None" and float(took) < TIMEOUT + 20, (took, error)


def _counts() -> tuple[int, int, int]:
    from torch.distributed import distributed_c10d as c10d

    groups = len(getattr(c10d._world, "pg_map", {}))
    return groups, len(os.listdir("/proc/self/fd")), threading.active_count()


def run_reconfigure() -> dict:
    world = dist.get_world_size()
    torch.manual_seed(0)
    model = Model().double()
    x = _inputs(4 * world)
    with torch.no_grad():
        ref = model(x)
    # Warm: the first apply of each kind creates its groups.
    for backend in ("ring", "fused_ring"):
        apply_sequence_parallel(model, _config(backend))
        remove_sequence_parallel(model)
    before = _counts()
    worst = 0.0
    for i in range(50):
        apply_sequence_parallel(model, _config("ring" if i % 2 else "fused_ring"))
        if i % 10 == 0:
            with torch.no_grad():
                worst = max(worst, (model(x) - ref).abs().max().item())
        remove_sequence_parallel(model)
    after_cycles = _counts()
    reinit = []
    for i in range(30):
        destroy_sequence_parallel()
        apply_sequence_parallel(model, _config("fused_ring"))
        remove_sequence_parallel(model)
        if i in (4, 29):  # after a few cycles (groups other tests left are gone by then) and at the end
            reinit.append(_counts())
    return {"before": before, "cycles": after_cycles, "reinit": reinit, "err": worst}


def test_reconfigure_does_not_leak(rank_pool):
    for res in rank_pool(2).run(run_reconfigure, timeout=150):
        assert res["err"] < 1e-10, res
        b, c, (r5, r30) = res["before"], res["cycles"], res["reinit"]
        assert c == b, res  # apply/remove cycles: no new groups, fds or threads at all
        # destroy + re-init: 25 more cycles add nothing (the first ones drop groups other tests left).
        assert r30[0] == r5[0] and r30[1] <= r5[1] + 2 and r30[2] <= r5[2] + 1, res


def run_apply_failing_on_one_rank() -> dict:
    """Rank 1 gets a plan with a key its model lacks: every rank raises before any group is built, and
    the model is left as it was."""
    torch.manual_seed(0)
    model = Model().double()
    plan = dict(Model._sp_plan)
    if dist.get_rank() == 1:
        plan["nope"] = SequenceParallelOutput(1)
    error, took = _attempt(lambda: apply_sequence_parallel(model, _config("ulysses"), plan))
    untouched = not hasattr(model, "_sp_kernels_applied") and "forward" not in model.__dict__
    return {"error": error, "took": took, "untouched": untouched}


def test_apply_failing_on_one_rank_raises_everywhere(rank_pool):
    results = rank_pool(2).run(run_apply_failing_on_one_rank, timeout=60)
    assert "has no submodule 'nope'" in results[1]["error"], results
    assert results[0]["error"] and "rank" in results[0]["error"] and "nope" in results[0]["error"], results
    for res in results:
        assert res["untouched"] and res["took"] < TIMEOUT + 20, res
