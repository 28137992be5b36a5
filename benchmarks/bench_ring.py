"""Ring attention benchmarks: loop overhead, comm/compute overlap, step vs all merge, multi-rank.

1. ``loop``: on one device, a W-step ring loop on rank-local data with the real kernels
   (``sp_kernels.attn.local.block_attention``: cuDNN/flash on a GPU) and no transfer (a null
   communicator leaves the blocks in place, so only merge + bookkeeping are added), against ONE
   attention call over the same FLOPs (the same queries against W*s keys), and against the peers'
   loop (ring-flash-attn / diffusers style: fresh receive buffers per step, eager fp32
   sigmoid/logsigmoid merge). Target: ours >= 95% of the single call.
2. ``overlap``: the same loop with an emulated link: every step copies the real K+V bytes and waits
   out the time the link would take (CPU: a worker thread doing copy + sleep; CUDA: the copy plus
   ``torch.cuda._sleep(cycles)`` issued on the comm stream, cycles calibrated against CUDA events),
   at 450 GB/s (NVLink 4 per direction) and at a "balanced" bandwidth where transfer == compute
   (the hardest case to hide). Reports step time / max(compute, transfer); target <= 1.05.
3. ``merge``: "step" (per-step merge) vs "all" (one W-way merge) from the loop rows, timed side by side;
   says which is faster and whether ``DEFAULT_MERGE[device]`` (sp_kernels/attn/ring.py) agrees.
4. ``ranks``: ring vs fused_ring per call on W ranks: gloo on CPU; NCCL on CUDA only when there are
   W GPUs. On a GPU machine with fewer GPUs it is skipped: it used to fall back to gloo ranks, which
   ran the GPU shapes (s=16384, H=24, D=128, bf16) on CPU cores at one thread per rank -- tens of
   minutes with nothing printed, the hang reported in issue 13.

Every measurement prints one flushed line as it finishes; tables, target verdicts and ``key:`` lines
(read by scripts/gpu_check.sh) come at the end. Time caps: ``--cap`` per measurement (repeats stop
once it has run that long; past 2*cap+30 s the stacks are dumped and the process exits) and
``--budget`` for the whole run (measurements that would start past it are skipped and listed).

Output: <out>/bench_ring_{quick,cpu,cuda}.csv/.png (default out: benchmarks/out/) and the tables.
"""

from __future__ import annotations

import argparse
import faulthandler
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _harness  # noqa: E402
from _harness import environment, plot_bars, print_table, sync, write_csv  # noqa: E402

from sp_kernels.attn import ring  # noqa: E402
from sp_kernels.attn.local import block_attention, select_block_kernel  # noqa: E402

Tensor = torch.Tensor
NVLINK_BPS = 450e9
LOOP_TARGET = 0.95  # ours / one attention call, at least
OVERLAP_TARGET = 1.05  # step / max(compute, transfer), at most
MERGE_TIE = 0.005  # "step" and "all" within 0.5% of each other: no reason to change the default
MIN_CAP_S = 0.5  # a measurement given less than this by the budget is skipped, not started

# ---------------------------------------------------------------------------------------------
# Settings (pure: tested on CPU)


@dataclass
class Settings:
    device: str
    dtype: str
    blocks: list[int]
    heads: int
    head_dim: int
    steps: list[int]
    ranks: int
    repeats: int
    warmup: int
    cap_s: float
    budget_s: float
    quick: bool = False


# Per (device type, quick). CUDA default: Flux/Wan-like heads at two ring blocks (4096: where the
# performance model predicts ~96%; 16384: the headline shape, ~5.5 ms of cuDNN per step on an H100),
# about 10 s of GPU work in all, so the run ends well inside one minute. CPU: what fits 2 cores.
DEFAULTS: dict[tuple[str, bool], dict] = {
    ("cuda", False): dict(dtype="bfloat16", blocks=[4096, 16384], heads=24, head_dim=128, steps=[2, 4, 8],
                          repeats=7, warmup=2, cap_s=10.0, budget_s=45.0),
    ("cuda", True): dict(dtype="bfloat16", blocks=[1024], heads=8, head_dim=128, steps=[2, 4],
                         repeats=2, warmup=1, cap_s=5.0, budget_s=30.0),
    ("cpu", False): dict(dtype="float32", blocks=[1024], heads=8, head_dim=64, steps=[2, 4, 8],
                         repeats=5, warmup=2, cap_s=120.0, budget_s=1800.0),
    ("cpu", True): dict(dtype="float32", blocks=[256], heads=2, head_dim=32, steps=[2, 4],
                        repeats=2, warmup=1, cap_s=20.0, budget_s=120.0),
}  # fmt: skip


def resolve_settings(device_type: str, quick: bool, cuda_devices: int, **given: object) -> Settings:
    """Defaults for the device type, overridden by every ``given`` value that is not None.

    ``ranks`` defaults to 2 gloo ranks on CPU and, on CUDA, to the GPU count when it is 2-8 (one NCCL
    rank per GPU), else 0: one GPU cannot host a NCCL ring (see ranks_plan).
    """
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"bench_ring: --device must be cpu or cuda (optionally cuda:N), got {device_type!r}")
    values = dict(DEFAULTS[(device_type, quick)])
    if device_type == "cuda":
        values["ranks"] = min(cuda_devices, 8) if cuda_devices >= 2 else 0
    else:
        values["ranks"] = 2
    values.update({k: v for k, v in given.items() if v is not None})
    st = Settings(device=device_type, quick=quick, **values)  # type: ignore[arg-type]
    if not st.blocks or min(st.blocks) < 1 or not st.steps or min(st.steps) < 1:
        raise ValueError(f"bench_ring: block sizes and ring sizes must be >= 1, got {st.blocks} and {st.steps}")
    if st.repeats < 1 or st.cap_s <= 0 or st.budget_s <= 0:
        raise ValueError("bench_ring: --repeats, --cap and --budget must be positive")
    return st


def planned_flops(st: Settings) -> float:
    """Attention FLOPs the loop and overlap parts run at most (every warmup and repeat round), with
    the balanced link's sleeps counted as the compute they stand for. Tests hold the CUDA defaults
    to it, so that a default change cannot push the run past its one-minute limit unnoticed."""
    rounds = st.warmup + st.repeats
    W_max = max(st.steps)
    total = 0.0
    for s in st.blocks:
        step = 4.0 * s * s * st.heads * st.head_dim
        total += sum(rounds * 5 * W * step for W in st.steps)  # loop: 5 methods of W steps each
        total += rounds * W_max * step  # overlap: compute alone
        total += 2 * rounds * 2 * W_max * step  # two links: compute + overlapped loop
        total += rounds * (W_max - 1) * step  # the balanced link's transfers last as long as compute
    return total


def ranks_plan(device_type: str, ranks: int, cuda_devices: int) -> tuple[str | None, str]:
    """(backend, why) for the multi-rank part; backend None = skipped.

    On CUDA only NCCL over one GPU per rank is a measurement of this code: gloo ranks would move the
    tensors to the CPU and compute the GPU shapes there (the earlier hang), and NCCL refuses two ranks
    on one GPU.
    """
    if ranks < 2:
        return None, f"skipped: --ranks {ranks} (a ring needs >= 2 ranks)"
    if device_type == "cuda":
        if cuda_devices >= ranks:
            return "nccl", f"NCCL, {ranks} ranks on {ranks} GPUs"
        return None, (
            f"skipped: {ranks} NCCL ranks need {ranks} GPUs, this machine has {cuda_devices} "
            "(gloo ranks would compute the GPU shapes on the CPU)"
        )
    return "gloo", f"gloo, {ranks} ranks on the CPU"


# ---------------------------------------------------------------------------------------------
# Time caps (pure given a clock: tested on CPU)


class Budget:
    """The whole run's time budget; ``cap()`` is what the next measurement may use (None: skip it)."""

    def __init__(self, total_s: float, cap_s: float, now: Callable[[], float] = time.monotonic) -> None:
        self.total_s, self.cap_s, self.now = total_s, cap_s, now
        self.start = now()

    def elapsed(self) -> float:
        return self.now() - self.start

    def cap(self) -> float | None:
        left = self.total_s - self.elapsed()
        cap = min(self.cap_s, left)
        return cap if cap >= MIN_CAP_S else None


def hard_cap_s(cap_s: float) -> float:
    """Past this, a measurement is stuck (not merely slow): the stacks are dumped and the process exits."""
    return 2 * cap_s + 30.0


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int, cap_s: float,
    now: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, float], int]:
    """(min seconds per call of each fn, rounds timed), timed round-robin within ``cap_s``.

    Round-robin + min: load from other processes drifts over seconds, and interleaving keeps it from
    favouring whichever ran first. Every fn is warmed up once (first calls pay for cuDNN plans,
    allocator growth, lazy imports); further warmups and rounds stop once ``cap_s`` is spent, but
    one timed round always runs.
    """
    start = now()
    for i in range(max(1, warmup)):
        if i and now() - start > cap_s / 2:
            break
        for fn in fns.values():
            fn()
            sync(device)
    best = {name: float("inf") for name in fns}
    rounds = 0
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = now()
            fn()
            sync(device)
            best[name] = min(best[name], now() - t0)
        rounds += 1
        if now() - start > cap_s:
            break
    return best, rounds


# ---------------------------------------------------------------------------------------------
# Emulated link arithmetic (pure: tested on CPU)


def calibrate_cycles_per_s(
    measure: Callable[[int], float], start_cycles: int = 1 << 20, min_s: float = 2e-3, max_rounds: int = 12
) -> float:
    """Clock cycles per second of ``torch.cuda._sleep``, from ``measure(cycles) -> seconds``.

    Doubles the cycle count (at most ``max_rounds`` times: never an endless loop) until one sleep
    lasts ``min_s``, then takes the slope between c and 2c cycles, which cancels the fixed launch
    cost. The SM clock under load is what matters here, not the datasheet clock.
    """
    cycles = start_cycles
    t1 = float("nan")
    for _ in range(max_rounds):
        t1 = measure(cycles)
        if t1 >= min_s:  # False for NaN too
            t2 = measure(2 * cycles)
            return cycles / (t2 - t1) if t2 > t1 else cycles / t1
        cycles *= 2
    raise RuntimeError(
        f"calibrate_cycles_per_s: torch.cuda._sleep({cycles // 2}) lasted only {t1:.3g} s after {max_rounds} "
        "doublings; the sleep kernel does not sleep"
    )


def link_sleep_cycles(nbytes: int, bytes_per_s: float, copy_s: float, cycles_per_s: float) -> int:
    """Cycles to sleep so that copy + sleep lasts as long as ``nbytes`` take on the link (>= 0)."""
    return max(0, round((nbytes / bytes_per_s - copy_s) * cycles_per_s))


def overlap_summary(W: int, compute_call_s: float, transfer_total_s: float, step_call_s: float) -> dict[str, float]:
    """Per-step compute, transfer and step times and the two ratios, from whole-loop timings.

    ``compute_call_s``: the W-step loop without transfers; ``transfer_total_s``: W-1 transfers back to
    back; ``step_call_s``: the loop with transfers. W-1 transfers hide behind W computes, so the ideal
    loop is (W-1) * max(c, t) + c.
    """
    c, t, step = compute_call_s / W, transfer_total_s / max(1, W - 1), step_call_s / W
    ideal = ((W - 1) * max(c, t) + c) / W
    return {"compute ms": c * 1e3, "transfer ms": t * 1e3, "ms": step * 1e3,
            "step / max(compute, transfer)": step / max(c, t), "step / ideal": step / ideal}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Verdicts (pure: tested on CPU)


def _num(row: dict, key: str) -> float | None:
    try:
        value = float(row[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def merge_verdict(rows: Sequence[dict], current_default: str) -> dict:
    """Which merge mode was faster in the loop rows, by the geometric mean of all/step time.

    Returns winner ("step", "all", "tie" within MERGE_TIE, or "not measured"), the winner's
    speed-up, the per-case ratios and the action for ``DEFAULT_MERGE`` of this device.
    """
    step = {(r.get("s"), r["W"]): _num(r, "ms") for r in rows
            if r.get("bench") == "loop" and r.get("method") == "ours (merge=step)"}  # fmt: skip
    all_ = {(r.get("s"), r["W"]): _num(r, "ms") for r in rows
            if r.get("bench") == "loop" and r.get("method") == "ours (merge=all)"}  # fmt: skip
    cases = {k: all_[k] / step[k] for k in step if step[k] and all_.get(k)}
    if not cases:
        return {"winner": "not measured", "speedup": float("nan"), "cases": {}, "action": "no merge timings"}
    geo = math.exp(sum(math.log(x) for x in cases.values()) / len(cases))  # > 1: "step" faster
    if abs(geo - 1) <= MERGE_TIE:
        winner, speedup = "tie", 1.0
    else:
        winner, speedup = ("step", geo) if geo > 1 else ("all", 1 / geo)
    if winner in ("tie", current_default):
        action = f"keep DEFAULT_MERGE = {current_default!r}"
    else:
        action = f"change DEFAULT_MERGE from {current_default!r} to {winner!r} (sp_kernels/attn/ring.py)"
    return {"winner": winner, "speedup": speedup, "cases": cases, "action": action}


def target_verdicts(rows: Sequence[dict]) -> list[dict]:
    """One row per target: the loop (better merge vs one call, per block and W) and the overlap links."""
    out: list[dict] = []
    cases = sorted({(r.get("s"), r["W"]) for r in rows if r.get("bench") == "loop"}, key=lambda k: (int(k[0] or 0), int(k[1])))
    for s, W in cases:
        ours = [(_num(r, "vs one call"), r["method"]) for r in rows if r.get("bench") == "loop" and r.get("s") == s
                and r["W"] == W and str(r.get("method", "")).startswith("ours")]  # fmt: skip
        ours = [(v, m) for v, m in ours if v is not None]
        value, method = max(ours) if ours else (None, "")
        out.append({"target": f"loop s={s} W={W}: best merge / one call", "value": value, "goal": f">= {LOOP_TARGET}",
                    "status": "not measured" if value is None else ("met" if value >= LOOP_TARGET else "missed"),
                    "note": method})  # fmt: skip
    for r in rows:
        if r.get("bench") != "overlap":
            continue
        value = _num(r, "step / max(compute, transfer)")
        out.append({"target": f"overlap s={r.get('s')} W={r['W']} {r['method']}: step / max(c, t)", "value": value,
                    "goal": f"<= {OVERLAP_TARGET}",
                    "status": "not measured" if value is None else ("met" if value <= OVERLAP_TARGET else "missed"),
                    "note": r.get("note", "")})  # fmt: skip
    return out


def key_lines(verdicts: Sequence[dict], merge: dict, device_type: str) -> list[str]:
    """Short ``key:`` lines for scripts/gpu_check.sh's summary table."""
    lines = []
    for kind in ("loop", "overlap"):
        vals = [v for v in verdicts if v["target"].startswith(kind)]
        got = [v["value"] for v in vals if v["value"] is not None]
        met = sum(v["status"] == "met" for v in vals)
        span = f"{min(got):.3f}..{max(got):.3f}" if got else "n/a"
        goal = vals[0]["goal"] if vals else ""
        lines.append(f"key: {kind} {span} (target {goal}: met {met}/{len(vals)})")
    lines.append(f"key: merge on {device_type}: {merge['winner']}"
                 + (f" {100 * (merge['speedup'] - 1):.1f}% faster" if merge["winner"] in ("step", "all") else "")
                 + f"; {merge['action']}")  # fmt: skip
    return lines


# ---------------------------------------------------------------------------------------------
# Communicators and loops


class NullComm:
    """W ranks' worth of steps on one device, no bytes moved (the blocks stay where they are).

    Each receive buffer is filled with real K/V once (first time it is seen, i.e. during warmup):
    attention over uninitialised memory (denormals, NaN) runs at a different speed on a CPU.
    """

    def __init__(self, size: int, device_type: str) -> None:
        self.rank, self.size, self.device_type = 0, size, device_type
        self.filled: set[int] = set()

    def post(self, send: Tensor, recv: Tensor) -> None:
        if recv.data_ptr() not in self.filled:
            n = min(send.numel(), recv.numel())
            recv.view(-1)[:n].copy_(send.view(-1)[:n])
            self.filled.add(recv.data_ptr())
        return None

    def wait(self, handle: object) -> None:
        return None


class ThreadLinkComm:
    """CPU emulated link: a worker thread copies the real bytes, then sleeps until the link time is up."""

    def __init__(self, size: int, bytes_per_s: float) -> None:
        self.rank, self.size, self.device_type = 0, size, "cpu"
        self.bps = bytes_per_s
        self.pool = ThreadPoolExecutor(max_workers=1)

    def _transfer(self, send: Tensor, recv: Tensor) -> None:
        start = time.perf_counter()
        n = min(send.numel(), recv.numel())
        recv.view(-1)[:n].copy_(send.view(-1)[:n])
        left = send.numel() * send.element_size() / self.bps - (time.perf_counter() - start)
        if left > 0:
            time.sleep(left)

    def post(self, send: Tensor, recv: Tensor) -> Future:
        return self.pool.submit(self._transfer, send, recv)

    def wait(self, handle: Future) -> None:
        handle.result()

    def close(self) -> None:
        self.pool.shutdown()


class CudaLinkComm:
    """CUDA emulated link on the current stream (inside the ring: the dedicated comm stream):
    ``torch.cuda._sleep`` for the link time, then a copy of the real bytes, so the data lands when
    the emulated transfer ends. ``sleep_cycles`` comes from link_sleep_cycles."""

    def __init__(self, size: int, sleep_cycles: int) -> None:
        self.rank, self.size, self.device_type = 0, size, "cuda"
        self.sleep_cycles = sleep_cycles

    def post(self, send: Tensor, recv: Tensor) -> None:
        if self.sleep_cycles > 0:
            torch.cuda._sleep(self.sleep_cycles)
        n = min(send.numel(), recv.numel())
        recv.view(-1)[:n].copy_(send.view(-1)[:n], non_blocking=True)

    def wait(self, handle: object) -> None:
        return None

    def close(self) -> None:
        return None


def peers_loop(q: Tensor, k: Tensor, v: Tensor, W: int, scale: float) -> Tensor:
    """ring-flash-attn's structure: new receive buffers every step, eager sigmoid/logsigmoid merge."""
    out = lse = None
    kb, vb = k, v
    for _ in range(W):
        nk, nv = torch.empty_like(kb), torch.empty_like(vb)  # per-step receive allocation
        nk.copy_(kb)
        nv.copy_(vb)
        bo, bl = block_attention(q, kb, vb, softmax_scale=scale)
        bo, bl = bo.float(), bl.transpose(1, 2).unsqueeze(-1)  # their lse layout [B, S, H, 1]
        if out is None:
            out, lse = bo, bl
        else:
            out = out - torch.sigmoid(bl - lse) * (out - bo)
            lse = lse - torch.nn.functional.logsigmoid(lse - bl)
        kb, vb = nk, nv
    return out.to(q.dtype)


def ours_loop(q: Tensor, k: Tensor, v: Tensor, W: int, scale: float, merge: str, comm: object, cache: dict) -> Tensor:
    out = torch.empty_like(q)
    engine = ring.RingEngine(merge=merge, comm_stream=True)
    ring.ring_core(q, k, v, valid=[q.shape[1]] * W, comm=comm, scale=scale, causal=False, joint=None,
                   out_seq=out, out_joint=None, cache=cache, engine=engine)  # type: ignore[arg-type]
    return out


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    """What the parts share: settings, device, budget, the rows so far and the progress printer."""

    st: Settings
    device: torch.device
    budget: Budget
    out_name: str
    rows: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def log(self, msg: str) -> None:
        print(f"[{self.budget.elapsed():6.1f}s] {msg}", flush=True)

    def fail(self, what: str, error: BaseException) -> str:
        """Log a failed measurement and go on: one GPU session must report every part it can."""
        status = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
        self.failures.append(f"{what}: {status}")
        self.log(f"{what}: FAILED ({status})")
        traceback.print_exc(file=sys.stdout)
        return status

    def measure(
        self, what: str, fns: dict[str, Callable[[], object]], repeats: int | None = None
    ) -> tuple[dict[str, float] | None, str]:
        """Time ``fns`` side by side under the caps: (seconds per fn, "ok"), or (None, why not)."""
        cap = self.budget.cap()
        if cap is None:
            self.log(f"{what}: SKIPPED, time budget of {self.st.budget_s:g} s spent (--budget)")
            return None, "skipped (budget)"
        hard = hard_cap_s(cap)
        self.log(f"{what}: timing {len(fns)} side by side (cap {cap:.0f} s, hard cap {hard:.0f} s) ...")
        faulthandler.dump_traceback_later(hard, exit=True)  # a stuck call: stacks to stderr, exit 1
        try:
            res, rounds = time_interleaved(fns, self.device, self.st.warmup, repeats or self.st.repeats, cap)
        except Exception as e:  # noqa: BLE001 - reported, and the next measurement still runs
            return None, self.fail(what, e)
        finally:
            faulthandler.cancel_dump_traceback_later()
        for name, t in res.items():
            self.log(f"{what}: {name}: {t * 1e3:.3f} ms (min of {rounds})")
        return res, "ok"

    def save(self) -> Path:
        """Rewrite the CSV after every part: a run cut short by an outer timeout keeps what it measured."""
        return write_csv(self.rows, self.out_name)


def _randn(shape: tuple[int, ...], gen: torch.Generator, st: Settings, device: torch.device) -> Tensor:
    return torch.randn(shape, generator=gen).to(device, getattr(torch, st.dtype))


def bench_loop(run: Run) -> None:
    st, device = run.st, run.device
    B, H, D = 1, st.heads, st.head_dim
    scale = D**-0.5
    for s in st.blocks:
        for W in st.steps:
            gen = torch.Generator().manual_seed(W)
            q, k, v = (_randn((B, s, H, D), gen, st, device) for _ in range(3))
            kw, vw = k.repeat(1, W, 1, 1), v.repeat(1, W, 1, 1)  # W identical blocks: the same FLOPs
            flops = 4 * B * H * D * s * s * W
            cache: dict = {}
            null = NullComm(W, device.type)
            fns: dict[str, Callable[[], object]] = {
                "one attention call": lambda q=q, kw=kw, vw=vw: block_attention(q, kw, vw, softmax_scale=scale),
                # The kernel's own cost of cutting the keys into W blocks (no merge): separates kernel
                # efficiency on shorter key blocks from what the loop adds (merge + bookkeeping).
                "W kernel calls, no merge": lambda q=q, k=k, v=v, W=W: [
                    block_attention(q, k, v, softmax_scale=scale) for _ in range(W)
                ],
            }
            for merge in ("step", "all"):
                fns[f"ours (merge={merge})"] = lambda q=q, k=k, v=v, W=W, m=merge, c=null, cache=cache: ours_loop(
                    q, k, v, W, scale, m, c, cache
                )
            fns["peers (sigmoid merge, alloc per step)"] = lambda q=q, k=k, v=v, W=W: peers_loop(q, k, v, W, scale)
            res, status = run.measure(f"loop s={s} W={W}", fns)
            if res is None:
                run.rows += [{"bench": "loop", "s": s, "W": W, "method": m, "status": status} for m in fns]
                continue
            one, kernels = res["one attention call"], res["W kernel calls, no merge"]
            for method, t in res.items():
                run.rows.append({"bench": "loop", "s": s, "W": W, "method": method, "ms": t * 1e3,
                                 "TFLOP/s": flops / t / 1e12, "vs one call": one / t, "vs W kernel calls": kernels / t,
                                 "status": "ok", "label": f"s={s} W={W} {method}"})  # fmt: skip
            del q, k, v, kw, vw, cache
            run.save()


def _cuda_sleep_timer(device: torch.device) -> Callable[[int], float]:
    def measure(cycles: int) -> float:
        best = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return best

    return measure


def _copy_seconds(nbytes: int, device: torch.device) -> float:
    src = torch.ones(max(1, nbytes), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    res, _ = time_interleaved({"copy": lambda: dst.copy_(src)}, device, 1, 5, 5.0)
    return res["copy"]


def bench_overlap(run: Run) -> None:
    st, device = run.st, run.device
    W = max(st.steps)
    merge = ring.default_engine(device_type=device.type).merge
    cycles_per_s = 0.0
    if device.type == "cuda":
        if run.budget.cap() is None:
            run.log("overlap: SKIPPED, time budget spent (--budget)")
            return
        try:
            cycles_per_s = calibrate_cycles_per_s(_cuda_sleep_timer(device))
            how = "calibrated with CUDA events"
        except RuntimeError as e:
            props = torch.cuda.get_device_properties(device)
            cycles_per_s = float(getattr(props, "clock_rate", 0) or 1.5e6) * 1e3  # kHz -> Hz
            how = f"device clock rate (calibration failed: {e})"
        run.log(f"overlap: torch.cuda._sleep runs at {cycles_per_s / 1e9:.3f} GHz ({how})")
    for s in st.blocks:
        _overlap_block(run, s, W, merge, cycles_per_s)
        run.save()


def _overlap_block(run: Run, s: int, W: int, merge: str, cycles_per_s: float) -> None:
    """Both links at one ring block size: compute alone, transfers alone and the overlapped loop."""
    st, device = run.st, run.device
    B, H, D = 1, st.heads, st.head_dim
    scale = D**-0.5
    gen = torch.Generator().manual_seed(1)
    q, k, v = (_randn((B, s, H, D), gen, st, device) for _ in range(3))
    kv_bytes = 2 * k.numel() * k.element_size()
    cache: dict = {}
    null = NullComm(W, device.type)

    def compute() -> None:
        ours_loop(q, k, v, W, scale, merge, null, cache)

    base, status = run.measure(f"overlap s={s} W={W}: compute alone", {"compute": compute})
    if base is None:
        run.rows.append({"bench": "overlap", "s": s, "W": W, "method": "links", "status": status})
        return
    copy_s = _copy_seconds(kv_bytes, device) if device.type == "cuda" else 0.0
    links = [("450 GB/s", NVLINK_BPS), ("balanced (transfer = compute)", kv_bytes / (base["compute"] / W))]
    for name, bps in links:
        comm: ThreadLinkComm | CudaLinkComm
        note = f"{bps / 1e9:.3g} GB/s emulated"
        if device.type == "cuda":
            cycles = link_sleep_cycles(kv_bytes, bps, copy_s, cycles_per_s)
            comm = CudaLinkComm(W, cycles)
            note += f": _sleep({cycles}) + copy {copy_s * 1e3:.3f} ms on the comm stream"
        else:
            comm = ThreadLinkComm(W, bps)
        buf = torch.empty(2 * k.numel(), dtype=k.dtype, device=device)
        recv = torch.empty_like(buf)

        def transfer_only(comm: ThreadLinkComm | CudaLinkComm = comm, buf: Tensor = buf, recv: Tensor = recv) -> None:
            for _ in range(W - 1):
                comm.wait(comm.post(buf, recv))  # type: ignore[func-returns-value]

        def step(comm: ThreadLinkComm | CudaLinkComm = comm) -> None:
            ours_loop(q, k, v, W, scale, merge, comm, cache)

        res, status = run.measure(f"overlap s={s} W={W} link {name}",
                                  {"compute": compute, "transfer": transfer_only, "step": step})  # fmt: skip
        comm.close()
        row = {"bench": "overlap", "s": s, "W": W, "method": f"link {name}", "merge": merge, "note": note,
               "label": f"s={s} W={W} {name}"}  # fmt: skip
        if res is None:
            run.rows.append({**row, "status": status})
            continue
        row.update(overlap_summary(W, res["compute"], res["transfer"], res["step"]), status="ok")
        run.rows.append(row)
        run.log(f"overlap s={s} W={W} link {name}: step / max(compute, transfer) = "
                f"{row['step / max(compute, transfer)']:.3f} (target <= {OVERLAP_TARGET})")  # fmt: skip


def _rank_bench(W: int, B: int, s: int, H: int, D: int, dtype: str, warmup: int, repeats: int) -> dict:
    import torch.distributed as dist

    from sp_kernels.attn.call import AttentionCall
    from sp_kernels.distributed.comm import TorchRingComm
    from sp_kernels.distributed.parallel_state import SequenceParallelConfig, init_sequence_parallel

    state = init_sequence_parallel(SequenceParallelConfig(ring_degree=W))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    gen = torch.Generator().manual_seed(dist.get_rank())
    q, k, v = (torch.randn(B, s, H, D, generator=gen).to(device, getattr(torch, dtype)) for _ in range(3))
    call = AttentionCall(q, k, v, D**-0.5, False, None, "fused_ring", state, None)
    comm = TorchRingComm(state.ring_group)
    engines = {"ring": ring.REFERENCE_ENGINE, "fused_ring merge=step": ring.default_engine("step"),
               "fused_ring merge=all": ring.default_engine("all")}  # fmt: skip
    for engine in engines.values():
        for _ in range(warmup):
            ring.run_ring(call, [s] * W, comm, engine)
    best = {name: float("inf") for name in engines}
    for _ in range(repeats):  # interleaved, min: see time_interleaved
        for name, engine in engines.items():
            dist.barrier()
            t0 = time.perf_counter()
            ring.run_ring(call, [s] * W, comm, engine)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def bench_ranks(run: Run, backend: str) -> None:
    from sp_kernels.testing.launch import RankPool

    st = run.st
    cap = run.budget.cap()
    if cap is None:
        run.log("ranks: SKIPPED, time budget spent (--budget)")
        return
    s = max(st.blocks)
    # Spawning W processes that each import torch (and build NCCL communicators) takes seconds, and
    # on a loaded CPU machine tens of seconds: the pool's deadline covers that too, so it is wider.
    cap = max(cap, 60.0 if run.device.type == "cuda" else 180.0)
    run.log(f"ranks: {st.ranks} {backend} ranks, s={s} (cap {cap:.0f} s) ...")
    pool = RankPool(st.ranks, backend=backend, timeout=cap)
    try:
        res = pool.run(_rank_bench, st.ranks, 1, s, st.heads, st.head_dim, st.dtype, st.warmup, st.repeats)
    finally:
        pool.close()
    base = max(r["ring"] for r in res)
    for name in res[0]:
        t = max(r[name] for r in res)  # the slowest rank sets the call's time
        run.rows.append({"bench": f"ranks ({backend})", "s": s, "W": st.ranks, "method": name, "ms": t * 1e3,
                         "vs ring": base / t, "status": "ok", "label": f"{st.ranks} ranks {name}"})  # fmt: skip
        run.log(f"ranks: {name}: {t * 1e3:.3f} ms (slowest rank)")
    run.save()


def _header(st: Settings, device: torch.device) -> str:
    env = environment()
    parts = [f"# {env['device']}, {env['threads']} threads, torch {env['torch']}"]
    if device.type == "cuda":
        parts.append(f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    probe = torch.zeros(1, 16, st.heads, st.head_dim, dtype=getattr(torch, st.dtype), device=device)
    try:
        parts.append(f"block kernel: {select_block_kernel(probe, probe, probe).name}")
    except ValueError as e:
        parts.append(f"block kernel: none ({e})")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    # Line-buffered even into a pipe or a log file: every progress line appears as it is printed.
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (smoke test)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--block", type=int, nargs="+", default=None,
                   help="tokens per ring block (rank-local length); several give one table each")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--steps", type=int, nargs="+", default=None, help="ring sizes W")
    p.add_argument("--ranks", type=int, default=None, help="world size of the multi-rank run (0: skip)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--cap", type=float, default=None, help="seconds per measurement (default: 10 on CUDA)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default: 45 on CUDA)")
    p.add_argument("--out", default=None, help="directory for the CSV/PNG (default: benchmarks/out)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (on a machine shared with other jobs, 1 avoids OpenMP barrier stalls "
                        "that make every small parallel op take milliseconds)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_ring: --device cuda but torch.cuda.is_available() is False (no GPU or no CUDA build)")
        return 2
    cuda_devices = torch.cuda.device_count() if device.type == "cuda" else 0
    st = resolve_settings(device.type, args.quick, cuda_devices, dtype=args.dtype, blocks=args.block,
                          heads=args.heads, head_dim=args.head_dim, steps=args.steps, ranks=args.ranks,
                          repeats=args.repeats, cap_s=args.cap, budget_s=args.budget)  # fmt: skip
    if args.out:
        _harness.OUT_DIR = Path(args.out).resolve()  # write_csv / plot_bars read it at call time
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    name = "bench_ring_quick" if st.quick else f"bench_ring_{device.type}"
    run = Run(st, device, Budget(st.budget_s, st.cap_s), name)
    shape = f"B=1 s={','.join(map(str, st.blocks))} H={st.heads} D={st.head_dim} {st.dtype}"
    print(_header(st, device))
    backend, why = ranks_plan(device.type, st.ranks, cuda_devices)
    run.log(f"settings: {shape}, W={st.steps}, repeats {st.repeats}, cap {st.cap_s:g} s per measurement, "
            f"budget {st.budget_s:g} s; ranks: {why}")  # fmt: skip
    if device.type == "cuda":
        tflop = planned_flops(st) / 1e12
        run.log(f"planned: at most {tflop:.0f} TFLOP of attention, about {tflop / 400:.0f} s at 400 TFLOP/s")

    parts: list[tuple[str, Callable[[], None]]] = [("loop", lambda: bench_loop(run)), ("overlap", lambda: bench_overlap(run))]
    if backend is not None:
        parts.append(("ranks", lambda: bench_ranks(run, backend)))
    for part, fn in parts:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - e.g. out of memory in one part: the others still report
            run.fail(part, e)

    env = environment()
    for r in run.rows:
        r.update(shape=shape, **env)
    csv_path = run.save()
    loop = [r for r in run.rows if r["bench"] == "loop" and r.get("status") == "ok"]
    png = plot_bars(loop, "label", ["vs one call", "vs W kernel calls"], "throughput ratio (1.0 = same)", name)
    print()
    print_table(loop, ["s", "W", "method", "ms", "TFLOP/s", "vs one call", "vs W kernel calls"],
                "loop: W steps vs one call over the same FLOPs")
    print()
    print_table([r for r in run.rows if r["bench"] == "overlap"],
                ["s", "W", "method", "compute ms", "transfer ms", "ms", "step / max(compute, transfer)", "step / ideal",
                 "status"], "overlap: per-step time with an emulated link")  # fmt: skip
    ranks = [r for r in run.rows if r["bench"].startswith("ranks")]
    print()
    if ranks:
        print_table(ranks, ["bench", "W", "method", "ms", "vs ring"], "ranks: time per call (slowest rank)")
    else:
        print(f"ranks: {why}")
    current = ring.DEFAULT_MERGE.get(device.type, "all")
    merge = merge_verdict(run.rows, current)
    if st.quick:
        merge["action"] += " -- but these are --quick shapes: no basis for a default"
    print()
    print(f"merge (step vs all, side by side in the loop table, {len(merge['cases'])} cases): "
          f"{merge['winner']}" + (f", {100 * (merge['speedup'] - 1):.1f}% faster" if merge["winner"] in ("step", "all") else "")
          + f"; DEFAULT_MERGE[{device.type!r}] is {current!r}: {merge['action']}")  # fmt: skip
    for (s, W), ratio in sorted(merge["cases"].items(), key=lambda kv: (int(kv[0][0] or 0), int(kv[0][1]))):
        print(f"  s={s} W={W}: all / step time = {ratio:.3f}")
    verdicts = target_verdicts(run.rows)
    print()
    print_table(verdicts, ["target", "value", "goal", "status", "note"], "targets")
    print()
    for line in key_lines(verdicts, merge, device.type):
        print(line)
    print(f"\nwrote {csv_path}" + (f" and {png}" if png else ""))
    if run.failures:
        print(f"{len(run.failures)} measurement(s) FAILED:\n  " + "\n  ".join(run.failures))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
