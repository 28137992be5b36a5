"""benchmarks/bench_merge.py --quick runs end to end (so the benchmark cannot rot) and reports every method."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_merge_quick():
    out = ROOT / "benchmarks" / "out"
    csv_path, png_path = out / "merge_cpu_quick.csv", out / "merge_cpu_quick.png"
    for p in (csv_path, png_path):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_merge.py"), "--quick", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert csv_path.exists() and png_path.stat().st_size > 0
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    methods = {r["method"] for r in rows}
    for method in ("eager sigmoid chain", "eager log1p (attn/merge.py)", "ours native", "ours native W-way"):
        assert method in methods, methods
    timed = [r for r in rows if r["ms"] not in ("", "None")]
    assert timed and all(float(r["ms"]) > 0 and float(r["GB/s"]) > 0 for r in timed)
    # The short table comes last: its header, a rule, then one line per row.
    assert "x eager sigmoid" in proc.stdout.splitlines()[-len(rows) - 2]
