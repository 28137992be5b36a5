"""benchmarks/bench_ring.py --quick runs end to end (so the benchmark cannot rot) and reports every part."""

from __future__ import annotations

from tests.op_utils import run_quick_bench


def test_bench_ring_quick():
    rows, stdout = run_quick_bench("bench_ring.py", "bench_ring_quick")
    loop = {(r["W"], r["method"]) for r in rows if r["bench"] == "loop"}
    for W in ("2", "4"):
        for method in ("one attention call", "W kernel calls, no merge", "ours (fused merge)", "ours (deferred merge)",
                       "peers (sigmoid merge, alloc per step)"):
            assert (W, method) in loop, loop
    overlap = [r for r in rows if r["bench"] == "overlap"]
    assert len(overlap) == 2 and all(float(r["step / max(compute, transfer)"]) > 0 for r in overlap)
    ranks = {r["method"] for r in rows if r["bench"].startswith("ranks")}
    assert ranks == {"ring", "fused_ring fused", "fused_ring deferred"}
    assert all(float(r["ms"]) > 0 for r in rows)
    assert "ranks: time per call" in stdout
