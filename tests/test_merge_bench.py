"""benchmarks/bench_merge.py --quick runs end to end (so the benchmark cannot rot) and reports every method."""

from __future__ import annotations

from tests.op_utils import run_quick_bench


def test_bench_merge_quick():
    rows, stdout = run_quick_bench("bench_merge.py", "merge_cpu_quick")
    methods = {r["method"] for r in rows}
    for method in ("eager sigmoid chain", "eager log1p (torch merge)", "ours native", "ours native W-way"):
        assert method in methods, methods
    timed = [r for r in rows if r["ms"] not in ("", "None")]
    assert timed and all(float(r["ms"]) > 0 and float(r["GB/s"]) > 0 for r in timed)
    # The short table comes last: its header, a rule, then one line per row.
    assert "x eager sigmoid" in stdout.splitlines()[-len(rows) - 2]
