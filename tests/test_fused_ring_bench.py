"""benchmarks/bench_ring.py --quick runs end to end (so the benchmark cannot rot) and reports every part."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_ring_quick():
    out = ROOT / "benchmarks" / "out"
    csv_path, png_path = out / "bench_ring_quick.csv", out / "bench_ring_quick.png"
    for p in (csv_path, png_path):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_ring.py"), "--quick", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert csv_path.exists() and png_path.stat().st_size > 0
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
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
    assert "ranks: time per call" in proc.stdout
