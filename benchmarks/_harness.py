"""Shared benchmark harness: timing, a measured copy baseline, CSV + PNG output and a text table.

Timing: ``warmup`` untimed calls, then the median of ``repeats`` timed calls (CUDA events on GPU,
``time.perf_counter`` around a synchronised call on CPU). Bandwidth is always compared with a
MEASURED device copy of the same number of bytes (``dst.copy_(src)``), never a datasheet number.

On a GPU the events time the device work alone: a queued sleep holds the start event back until
the timed call has queued all its kernels (triton.testing.do_bench gets the same head start from its
cache-clearing kernel). Without it a small op's time would be its Python and launch cost on an idle
GPU, not its kernels. That host cost is measured on its own by ``host_seconds``.
"""

from __future__ import annotations

import csv
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

OUT_DIR = Path(__file__).resolve().parent / "out"


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# The head start: about 200 us at 2 GHz, longer than any timed call's host side here, so every launch
# of the call is queued before its start event fires.
HEAD_START_CYCLES = 400_000


def _timed_on_gpu(fn: Callable[[], object]) -> float:
    """Seconds of the device work of one call of ``fn`` (CUDA events, host cost hidden)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(HEAD_START_CYCLES)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def host_seconds(fn: Callable[[], object], device: torch.device | str, calls: int = 20) -> float:
    """Seconds of host time per call of ``fn`` on a GPU: Python, checks, launches, with the GPU busy
    behind a long sleep so no call waits for the device (NaN on CPU, where host time is all of it).
    Few calls: the launch queue (about 1000 kernels) must not fill."""
    device = torch.device(device)
    if device.type != "cuda":
        return float("nan")
    fn()
    torch.cuda.synchronize(device)
    torch.cuda._sleep(HEAD_START_CYCLES * 50)  # ~10 ms: longer than ``calls`` host sides
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize(device)
    return seconds


def time_fn(
    fn: Callable[[], object], device: torch.device | str, warmup: int = 2, repeats: int = 5, stat: str = "median"
) -> float:
    """Seconds of one call of ``fn``: the median (default) or the minimum (``stat="min"``, the robust
    choice on a machine shared with other jobs) of ``repeats`` timed calls."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            times.append(_timed_on_gpu(fn))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return min(times) if stat == "min" else statistics.median(times)


def cache_flusher(device: torch.device | str) -> Callable[[], None]:
    """A function that evicts the last-level cache: it zeroes a buffer twice the cache's size.

    The same idea as triton.testing.do_bench (which zeroes 256 MB before every timed call on a GPU).
    Without it, timing columns round-robin leaves each one a different cache state (whatever the
    column before it left behind), and for buffers that fit in the cache that order decides the
    ratio; with it, every call starts as in the real pipeline, with its input and output in memory.
    """
    device = torch.device(device)
    nbytes = 256 << 20 if device.type == "cuda" else 2 * _cpu_llc_bytes()
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return buf.zero_


def _cpu_llc_bytes() -> int:
    """Largest data/unified cache of cpu0 in bytes (Linux sysfs), else 32 MiB."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        digits = text.rstrip("KM")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or 32 << 20


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device | str, warmup: int = 1, repeats: int = 9,
    stat: str = "min", flush: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Seconds per call of each function, timed round-robin (a, b, c, a, b, c, ...) so that bursts of
    load from other jobs on a shared machine hit every column alike; then min (or median) per column.
    ``flush`` (see cache_flusher) runs, untimed, before every timed call."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if flush is not None:
                flush()
                sync(device)
            if device.type == "cuda":
                times[name].append(_timed_on_gpu(fn))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    pick = min if stat == "min" else statistics.median
    return {name: pick(ts) for name, ts in times.items()}


def copy_baseline(
    nbytes: int, device: torch.device | str, warmup: int = 2, repeats: int = 5, stat: str = "median"
) -> float:
    """Median seconds of a plain device copy of ``nbytes`` (reads nbytes, writes nbytes)."""
    n = max(1, nbytes)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(7)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device, warmup, repeats, stat)


STEADY_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_TOP_PAD_": str(1 << 30)}


def ensure_steady_cpu_allocator(argv: Sequence[str]) -> None:
    """Re-exec the benchmark with glibc malloc kept from returning big blocks to the OS.

    glibc serves allocations above 32 MiB with mmap and unmaps them on free, so on CPU every call
    that allocates a big output page-faults and zeroes it again (as slow as the copy itself), while
    smaller outputs are recycled: that penalises one big fused buffer against three smaller ones
    for reasons no GPU caching allocator has. With mmap off, both sides run in the steady state.
    """
    if all(os.environ.get(k) == v for k, v in STEADY_MALLOC_ENV.items()):
        return
    env = dict(os.environ, **STEADY_MALLOC_ENV)
    os.execve(sys.executable, [sys.executable, *argv], env)


def gbps(nbytes_moved: int, seconds: float) -> float:
    return nbytes_moved / seconds / 1e9 if seconds > 0 else float("nan")


def write_csv(rows: Sequence[dict], name: str) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.csv"
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_bars(rows: Sequence[dict], label_key: str, value_keys: Sequence[str], ylabel: str, name: str) -> Path | None:
    """Grouped bar chart (one group per row) into benchmarks/out/<name>.png; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    labels = [str(r[label_key]) for r in rows]
    width = 0.8 / max(1, len(value_keys))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) * len(value_keys)), 4.5))
    for i, key in enumerate(value_keys):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [float(r.get(key) or 0.0) for r in rows], width=width, label=key)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = OUT_DIR / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str = "") -> None:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    if title:
        print(title)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def environment() -> dict[str, str]:
    """A one-line description of where a benchmark ran."""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {"device": dev, "threads": str(torch.get_num_threads()), "torch": torch.__version__}
