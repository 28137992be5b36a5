"""Helpers shared by the op tests: which aten/custom ops a call dispatches, and forcing an impl."""

from __future__ import annotations

import pytest
from torch.utils._python_dispatch import TorchDispatchMode


class OpRecorder(TorchDispatchMode):
    """Records the name of every op dispatched inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def force_impl(monkeypatch: pytest.MonkeyPatch, forced: str | None) -> None:
    """Set SP_KERNELS_IMPL to ``forced`` (None: automatic selection) for one test."""
    if forced is None:
        monkeypatch.delenv("SP_KERNELS_IMPL", raising=False)
    else:
        monkeypatch.setenv("SP_KERNELS_IMPL", forced)


def run_quick_bench_lines(script: str) -> list[str]:
    """Run ``benchmarks/<script> --quick`` (a benchmark that prints tables only); return its stdout lines."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--quick"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.splitlines()


def run_quick_bench(script: str, stem: str) -> tuple[list[dict], str]:
    """Run ``benchmarks/<script> --quick --device cpu``; return its CSV rows and stdout.

    ``stem`` names the CSV/PNG pair it writes to benchmarks/out/ (removed first, so stale files
    cannot pass).
    """
    import csv
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = root / "benchmarks" / "out"
    csv_path, png_path = out / f"{stem}.csv", out / f"{stem}.png"
    for p in (csv_path, png_path):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, str(root / "benchmarks" / script), "--quick", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert csv_path.exists() and png_path.stat().st_size > 0
    with csv_path.open() as f:
        return list(csv.DictReader(f)), proc.stdout
