"""benchmarks/bench_ring.py: the --quick CPU run end to end, and the logic of its CUDA path on CPU.

The CUDA path cannot run here, so what decides it is factored into pure functions and tested
directly: default shapes and their FLOP budget, the multi-rank plan (the cause of the hang reported
in issue 13: gloo ranks computing the GPU shapes on the CPU), the time caps, the _sleep cycle
calibration, the overlap arithmetic and the verdicts. No test asserts an absolute time.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.op_utils import run_quick_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_ring as br  # noqa: E402


def test_bench_ring_quick():
    rows, stdout = run_quick_bench("bench_ring.py", "bench_ring_quick")
    loop = {(r["W"], r["method"]) for r in rows if r["bench"] == "loop" and r["status"] == "ok"}
    for W in ("2", "4"):
        for method in ("one attention call", "W kernel calls, no merge", "ours (merge=step)", "ours (merge=all)",
                       "peers (sigmoid merge, alloc per step)"):
            assert (W, method) in loop, loop
    overlap = [r for r in rows if r["bench"] == "overlap"]
    assert len(overlap) == 2 and all(float(r["step / max(compute, transfer)"]) > 0 for r in overlap)
    ranks = {r["method"] for r in rows if r["bench"].startswith("ranks")}
    assert ranks == {"ring", "fused_ring merge=step", "fused_ring merge=all"}
    assert all(float(r["ms"]) > 0 for r in rows)
    assert all(r["s"] == "256" for r in rows)
    # Progress: one line per measurement, printed as it finished (before the tables).
    tables = stdout.index("loop: W steps vs one call")
    assert 0 <= stdout.index("loop s=256 W=2: one attention call: ") < tables
    assert 0 <= stdout.index("overlap s=256 W=4 link 450 GB/s: step / max(compute, transfer) = ") < tables
    assert "ranks: time per call" in stdout
    assert "merge (step vs all" in stdout and "no basis for a default" in stdout
    keys = [line for line in stdout.splitlines() if line.startswith("key: ")]
    assert [k.split()[1] for k in keys] == ["loop", "overlap", "merge"], keys
    assert "FAILED" not in stdout


# ---------------------------------------------------------------------------------------------
# settings and plans


def test_cuda_defaults_are_gpu_shapes_without_cpu_ranks():
    st = br.resolve_settings("cuda", False, cuda_devices=1)
    assert (st.dtype, st.heads, st.head_dim, st.steps) == ("bfloat16", 24, 128, [2, 4, 8])
    assert 16384 in st.blocks
    assert st.ranks == 0  # one GPU: no ring of ranks at all (before: 4 gloo ranks on the CPU)
    assert br.resolve_settings("cuda", False, cuda_devices=4).ranks == 4
    assert br.resolve_settings("cuda", False, cuda_devices=16).ranks == 8
    assert br.resolve_settings("cpu", False, cuda_devices=0).ranks == 2
    given = br.resolve_settings("cuda", True, cuda_devices=1, blocks=[512], ranks=2, cap_s=3.0, dtype=None)
    assert (given.blocks, given.ranks, given.cap_s, given.dtype, given.quick) == ([512], 2, 3.0, "bfloat16", True)


def test_cuda_defaults_fit_one_minute():
    """At half of the cuDNN rate measured on an H100 (603 TFLOP/s, docs/performance.md), the default
    CUDA run's attention work stays under 20 s: room for startup, cuDNN plans and the copies."""
    st = br.resolve_settings("cuda", False, cuda_devices=1)
    assert br.planned_flops(st) / 300e12 < 20
    assert st.budget_s < 60
    assert br.hard_cap_s(st.cap_s) < 60
    assert br.planned_flops(br.resolve_settings("cuda", True, cuda_devices=1)) / 300e12 < 1


def test_resolve_settings_rejects():
    for device in ("xpu", "cuda:0"):  # main passes the device type only; anything else is a mistake
        with pytest.raises(ValueError, match="--device must be cpu or cuda"):
            br.resolve_settings(device, False, 0)
    with pytest.raises(ValueError, match="must be >= 1"):
        br.resolve_settings("cpu", False, 0, blocks=[0])
    with pytest.raises(ValueError, match="must be positive"):
        br.resolve_settings("cpu", False, 0, cap_s=0.0)


def test_ranks_plan():
    backend, why = br.ranks_plan("cuda", 4, cuda_devices=1)
    assert backend is None and "need 4 GPUs, this machine has 1" in why and "CPU" in why
    assert br.ranks_plan("cuda", 4, cuda_devices=8)[0] == "nccl"
    assert br.ranks_plan("cpu", 2, cuda_devices=0)[0] == "gloo"
    assert br.ranks_plan("cpu", 2, cuda_devices=8)[0] == "gloo"
    assert br.ranks_plan("cuda", 0, cuda_devices=8)[0] is None
    assert br.ranks_plan("cpu", 1, cuda_devices=0)[0] is None


# ---------------------------------------------------------------------------------------------
# time caps


class FakeClock:
    def __init__(self, step: float = 0.0) -> None:
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_budget_caps_each_measurement_and_skips_past_the_end():
    clock = FakeClock()
    budget = br.Budget(total_s=25.0, cap_s=10.0, now=clock)
    assert budget.cap() == 10.0
    clock.t = 20.0
    assert budget.cap() == pytest.approx(5.0)
    clock.t = 25.0 - br.MIN_CAP_S / 2
    assert budget.cap() is None
    assert budget.elapsed() == pytest.approx(25.0 - br.MIN_CAP_S / 2)


def test_time_interleaved_stops_at_its_cap_but_times_one_round():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    cpu = torch.device("cpu")
    # Every clock read advances 1 s: a cap of 10 s allows a few rounds of 100.
    best, rounds = br.time_interleaved(fns, cpu, warmup=50, repeats=100, cap_s=10.0, now=FakeClock(1.0))
    assert 1 <= rounds < 10 and set(best) == {"a", "b"}
    assert calls.count("a") < 20  # warmups stopped at half the cap too
    assert calls[:2] == ["a", "b"]  # every fn warmed up once, round-robin
    best, rounds = br.time_interleaved(fns, cpu, warmup=3, repeats=5, cap_s=1e-9, now=FakeClock(1.0))
    assert rounds == 1 and all(math.isfinite(t) for t in best.values())
    best, rounds = br.time_interleaved(fns, cpu, warmup=1, repeats=4, cap_s=1e9, now=FakeClock(1.0))
    assert rounds == 4 and best == {"a": 1.0, "b": 1.0}


# ---------------------------------------------------------------------------------------------
# emulated link arithmetic


@pytest.mark.parametrize("hz, launch_s", [(1.98e9, 30e-6), (1.2e9, 0.0), (2.5e9, 1e-3)])
def test_calibrate_cycles_per_s_cancels_the_launch_cost(hz, launch_s):
    seen: list[int] = []

    def measure(cycles: int) -> float:
        seen.append(cycles)
        return cycles / hz + launch_s

    assert br.calibrate_cycles_per_s(measure) == pytest.approx(hz, rel=1e-9)
    assert len(seen) <= 12 + 1 and seen[-1] == 2 * seen[-2]


@pytest.mark.parametrize("value", [0.0, float("nan"), -1.0])
def test_calibrate_cycles_per_s_gives_up_instead_of_looping(value):
    seen: list[int] = []
    with pytest.raises(RuntimeError, match="does not sleep"):
        br.calibrate_cycles_per_s(lambda c: seen.append(c) or value, max_rounds=7)
    assert len(seen) == 7


def test_link_sleep_cycles():
    kv = 2 * 16384 * 24 * 128 * 2  # one K+V block of the CUDA default shape: 201 MB
    link_s = kv / br.NVLINK_BPS
    assert br.link_sleep_cycles(kv, br.NVLINK_BPS, 0.0, 2e9) == round(link_s * 2e9)
    assert br.link_sleep_cycles(kv, br.NVLINK_BPS, 1e-4, 2e9) == round((link_s - 1e-4) * 2e9)
    assert br.link_sleep_cycles(kv, br.NVLINK_BPS, 1.0, 2e9) == 0  # the copy alone is slower than the link


def test_overlap_summary():
    # W = 8, compute 2 ms and transfer 1 ms per step, perfectly hidden: 8 * 2 ms for the loop.
    r = br.overlap_summary(8, 16e-3, 7e-3, 16e-3)
    assert r["compute ms"] == pytest.approx(2.0) and r["transfer ms"] == pytest.approx(1.0)
    assert r["step / max(compute, transfer)"] == pytest.approx(1.0) and r["step / ideal"] == pytest.approx(1.0)
    # Transfer-bound (3 ms per transfer): ideal = (7 * 3 + 2) / 8 per step.
    r = br.overlap_summary(8, 16e-3, 21e-3, (7 * 3 + 2) * 1e-3)
    assert r["step / ideal"] == pytest.approx(1.0)
    assert r["step / max(compute, transfer)"] == pytest.approx(23 / 24)


def test_cuda_link_comm_sleeps_then_copies(monkeypatch):
    slept: list[int] = []
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: slept.append(cycles))
    comm = br.CudaLinkComm(4, sleep_cycles=1234)
    send, recv = torch.arange(10.0), torch.zeros(12)
    comm.wait(comm.post(send, recv))
    assert slept == [1234] and torch.equal(recv[:10], send) and not recv[10:].any()
    br.CudaLinkComm(4, sleep_cycles=0).post(send, recv)
    assert slept == [1234]  # no zero-cycle launches


# ---------------------------------------------------------------------------------------------
# verdicts


def _loop_rows(ms: dict[tuple[int, int, str], float]) -> list[dict]:
    rows = []
    for (s, W, method), t in ms.items():
        rows.append({"bench": "loop", "s": s, "W": W, "method": method, "ms": t, "status": "ok"})
    for r in rows:
        one = ms[(r["s"], r["W"], "one attention call")]
        r["vs one call"] = one / r["ms"]
    return rows


def test_merge_verdict_and_targets():
    ms = {}
    for s, W in itertools.product((4096, 16384), (2, 8)):
        ms[(s, W, "one attention call")] = 10.0
        ms[(s, W, "ours (merge=step)")] = 10.8
        ms[(s, W, "ours (merge=all)")] = 10.2
    rows = _loop_rows(ms)
    verdict = br.merge_verdict(rows, current_default="all")
    assert verdict["winner"] == "all" and verdict["speedup"] == pytest.approx(10.8 / 10.2)
    assert len(verdict["cases"]) == 4 and verdict["action"].startswith("keep")
    verdict = br.merge_verdict(rows, current_default="step")
    assert "change DEFAULT_MERGE from 'step' to 'all'" in verdict["action"]
    for key in list(ms):
        if key[2] == "ours (merge=all)":
            ms[key] = 10.8 * 1.002
    tie = br.merge_verdict(_loop_rows(ms), current_default="step")
    assert tie["winner"] == "tie" and tie["action"].startswith("keep")
    assert br.merge_verdict([], "all")["winner"] == "not measured"

    rows = _loop_rows(ms) + [
        {"bench": "loop", "s": 65536, "W": 8, "method": "ours (merge=step)", "status": "skipped (budget)"},
        {"bench": "overlap", "s": 4096, "W": 8, "method": "link 450 GB/s", "step / max(compute, transfer)": 1.01},
        {"bench": "overlap", "s": 4096, "W": 8, "method": "link balanced", "step / max(compute, transfer)": 1.2},
        {"bench": "overlap", "s": 4096, "W": 8, "method": "link other", "status": "skipped (budget)"},
    ]
    verdicts = br.target_verdicts(rows)
    by = {v["target"]: v for v in verdicts}
    assert by["loop s=4096 W=2: best merge / one call"]["value"] == pytest.approx(10 / 10.8)
    assert by["loop s=4096 W=2: best merge / one call"]["status"] == "missed"  # 0.926 < 0.95
    assert by["loop s=65536 W=8: best merge / one call"]["status"] == "not measured"
    assert [v["status"] for v in verdicts if v["target"].startswith("overlap")] == ["met", "missed", "not measured"]
    keys = br.key_lines(verdicts, tie, "cuda")
    assert keys[0].startswith("key: loop 0.926..0.926 (target >= 0.95: met 0/5)")
    assert keys[1] == "key: overlap 1.010..1.200 (target <= 1.05: met 1/3)"
    assert keys[2].startswith("key: merge on cuda: tie; keep")
