#!/usr/bin/env python3
"""First run on a GPU: correctness of what only a GPU executes, before any benchmark is read.

Sections (one flushed line per check as it runs; a summary and ``key:`` lines at the end; exit 1
when any check fails):

  kernels  every local block kernel that accepts the inputs (flash3, flash2, cudnn, torch_flash,
           cpu_flash, math: sp_kernels.attn.local) against an fp64 reference: D 64/128, Sq != Sk,
           GQA/MQA, causal, bf16/fp16/fp32; plus which kernel each dtype gets by default.
  ops      pack/unpack (Ulysses), LSE merge and shard_pad, every implementation the device has
           (native CUDA, Triton, torch), against the torch implementation on CPU copies: copies
           must be bit-exact, merges equal to fp32 rounding. (No test of the suite runs the CUDA
           pack kernels or any Triton kernel on a GPU; this does.)
  ring     ``sp_kernels.attn.ring.ring_core`` for each of W virtual ranks in one process, with a
           fake RingComm that hands every rank the block its ring predecessor would send (and checks
           what it is given to send): step and all merge modes, unequal and empty shards, GQA/MQA,
           causal, buffers reused across calls, against the fp64 reference. On CUDA the loop runs
           with the dedicated comm stream and ``torch.cuda._sleep`` delays injected on the compute
           stream (before every block kernel) and on the comm stream (before every transfer): a
           missing or misplaced event then shows up as wrong numbers instead of a lucky race. On
           CPU the delays are skipped (no streams), with a message.

    python scripts/gpu_first_run.py                    # the GPU run (--device cuda when one is present)
    python scripts/gpu_first_run.py --device cpu --quick   # the same logic on CPU (tests/test_gpu_check.py)
    python scripts/gpu_first_run.py --print-arch       # SP_KERNELS_CUDA_ARCHS for this GPU (scripts/gpu_check.sh)
    python scripts/gpu_first_run.py --env              # versions: torch, CUDA, cuDNN, Triton, GPU, build
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

Tensor = torch.Tensor

# Max |error| vs the fp64 reference. Inputs are N(0, 1) and scores ~N(0, 1), so outputs are O(1):
# bf16 (8 mantissa bits: half an ulp at 1 is 2e-3, and flash kernels round P to bf16 before P @ V),
# fp16 (11 bits), fp32 (fp32 accumulation; TF32 is switched off below). The LSE is fp32 for every
# input dtype; its error comes from fp32 sums of the rounded inputs' products.
OUT_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 2e-4}
LSE_TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 2e-4}
MERGE_RTOL = 1e-5  # merge ops vs the torch merge, both in fp32: operation order only
DELAY_CYCLES = 1 << 20  # ~0.5 ms at 2 GHz: far longer than any step's kernels at these sizes


def cuda_arch_spec(major: int, minor: int) -> str:
    """SP_KERNELS_CUDA_ARCHS entry for compute capability (major, minor): "9.0a" on Hopper (the
    arch-specific sm_90a target setup.py defaults to), "major.minor" elsewhere."""
    return f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class Report:
    """Checks as they run: one printed line each, kept for the summary and the CSV."""

    rows: list[dict] = field(default_factory=list)
    start: float = field(default_factory=time.monotonic)

    def add(self, section: str, name: str, status: str, detail: str = "") -> None:
        self.rows.append({"section": section, "check": name, "status": status, "detail": detail})
        print(f"[{time.monotonic() - self.start:6.1f}s] {section:8s} {status:4s} {name}" + (f": {detail}" if detail else ""),
              flush=True)  # fmt: skip

    def note(self, section: str, text: str) -> None:
        self.add(section, text, "note")

    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "FAIL"]

    def counts(self, section: str) -> tuple[int, int, int]:
        rows = [r for r in self.rows if r["section"] == section]
        return (sum(r["status"] == "PASS" for r in rows), sum(r["status"] == "FAIL" for r in rows),
                sum(r["status"] == "skip" for r in rows))  # fmt: skip


def _max_err(got: Tensor, want: Tensor) -> float:
    if got.numel() == 0:
        return 0.0
    diff = (got.double().cpu() - want.double().cpu()).abs()
    # inf - inf is nan: positions where both are -inf (empty rows' lse) agree.
    both_inf = torch.isinf(got.double().cpu()) & (got.double().cpu() == want.double().cpu())
    diff = torch.where(both_inf, torch.zeros_like(diff), diff)
    return float("inf") if torch.isnan(diff).any() else float(diff.max())


# ---------------------------------------------------------------------------------------------
# fp64 reference


def reference_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """(out [B, Sq, Hq, D], lse [B, Hq, Sq]) in float64; GQA by repeating KV heads; causal top-left
    (only used with Sq == Sk). Rows without keys get out 0, lse -inf (the merge's identity)."""
    Hq, Hkv = q.shape[2], k.shape[2]
    qd, kd, vd = q.double(), k.double().repeat_interleave(Hq // Hkv, 2), v.double().repeat_interleave(Hq // Hkv, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    if causal:
        Sq, Sk = q.shape[1], k.shape[1]
        mask = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", p, vd)
    return out, lse


# ---------------------------------------------------------------------------------------------
# kernels


@dataclass(frozen=True)
class KernelCase:
    B: int
    Sq: int
    Sk: int
    Hq: int
    Hkv: int
    D: int
    causal: bool

    def __str__(self) -> str:
        return f"B{self.B} Sq{self.Sq} Sk{self.Sk} H{self.Hq}/{self.Hkv} D{self.D}" + (" causal" if self.causal else "")


def kernel_cases(quick: bool) -> list[KernelCase]:
    cases = [
        KernelCase(1, 128, 128, 4, 4, 64, False),
        KernelCase(2, 100, 260, 8, 2, 128, False),  # Sq != Sk, GQA, odd lengths
        KernelCase(1, 192, 192, 6, 3, 128, True),  # causal GQA
        KernelCase(1, 77, 1031, 4, 1, 64, False),  # MQA, long odd key block
    ]
    if quick:
        return [KernelCase(1, 33, 33, 2, 2, 64, False), KernelCase(2, 20, 45, 4, 2, 128, False),
                KernelCase(1, 24, 24, 4, 1, 64, True)]  # fmt: skip
    return cases + [KernelCase(1, 2048, 2048, 8, 8, 128, False), KernelCase(1, 1024, 1024, 8, 2, 128, True)]


def _rand(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def check_kernels(report: Report, device: torch.device, quick: bool) -> None:
    from sp_kernels.attn.local import NoKernelError, block_attention, block_kernel_names, select_block_kernel

    declined: dict[str, set[str]] = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for case in kernel_cases(quick):
            gen = torch.Generator().manual_seed(case.Sq * 31 + case.Sk)
            q = _rand((case.B, case.Sq, case.Hq, case.D), dtype, device, gen)
            k = _rand((case.B, case.Sk, case.Hkv, case.D), dtype, device, gen)
            v = _rand((case.B, case.Sk, case.Hkv, case.D), dtype, device, gen)
            scale = case.D**-0.5
            ref_out, ref_lse = reference_attention(q, k, v, scale, case.causal)
            try:
                default = select_block_kernel(q, k, v, case.causal).name
            except NoKernelError as e:
                report.add("kernels", f"default kernel {dtype} {case}", "FAIL", str(e))
                continue
            for name in block_kernel_names():
                try:
                    select_block_kernel(q, k, v, case.causal, kernels=[name])
                except NoKernelError as e:
                    declined.setdefault(f"{name} {str(dtype).removeprefix('torch.')}", set()).add(e.reasons.get(name, str(e)))
                    continue
                what = f"{name}{' (default)' if name == default else ''} {str(dtype).removeprefix('torch.')} {case}"
                try:
                    out, lse = block_attention(q, k, v, softmax_scale=scale, causal=case.causal, kernels=[name])
                except Exception as e:  # noqa: BLE001 - a kernel that accepts and then raises is a failure to report
                    report.add("kernels", what, "FAIL", f"raised {type(e).__name__}: {e}"[:300])
                    continue
                problems = []
                if out.shape != q.shape or out.dtype != dtype:
                    problems.append(f"out {tuple(out.shape)} {out.dtype}, expected {tuple(q.shape)} {dtype}")
                if lse.shape != (case.B, case.Hq, case.Sq) or lse.dtype != torch.float32:
                    problems.append(f"lse {tuple(lse.shape)} {lse.dtype}, expected {(case.B, case.Hq, case.Sq)} float32")
                e_out, e_lse = _max_err(out, ref_out), _max_err(lse, ref_lse)
                if not e_out <= OUT_TOL[dtype]:
                    problems.append(f"out error {e_out:.3g} > {OUT_TOL[dtype]:g}")
                if not e_lse <= LSE_TOL[dtype]:
                    problems.append(f"lse error {e_lse:.3g} > {LSE_TOL[dtype]:g}")
                detail = f"max|out err| {e_out:.2e}, max|lse err| {e_lse:.2e}"
                report.add("kernels", what, "FAIL" if problems else "PASS", "; ".join(problems) or detail)
    for key, reasons in sorted(declined.items()):
        report.note("kernels", f"{key} declined: {' | '.join(sorted(reasons))[:300]}")


# ---------------------------------------------------------------------------------------------
# ops


@contextlib.contextmanager
def forced_impl(name: str) -> Iterator[None]:
    """SP_KERNELS_IMPL=name for the ops called inside (it is read on every call)."""
    old = os.environ.get("SP_KERNELS_IMPL")
    os.environ["SP_KERNELS_IMPL"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SP_KERNELS_IMPL", None)
        else:
            os.environ["SP_KERNELS_IMPL"] = old


def _op_checks(device: torch.device, D: int, dtype: torch.dtype) -> list[tuple[str, Callable[[], object], Callable[[], object], str]]:
    """(name, run on device, expected on CPU, comparison) for every op; comparison "exact" or "merge"."""
    from sp_kernels.ops import merge as mg
    from sp_kernels.ops import pack as pk

    sp = importlib.import_module("sp_kernels.ops.shard_pad")  # the module; sp_kernels.ops re-exports the function
    gen = torch.Generator().manual_seed(D)
    cpu = torch.device("cpu")

    def on(t: Tensor) -> Tensor:
        # Always a copy (also on CPU): in-place ops must not touch the inputs the reference reads.
        return t.to(device, copy=True)

    checks: list[tuple[str, Callable[[], object], Callable[[], object], str]] = []
    # pack_qkv: padding heads (Hq 6 over P 4 -> 2 per rank) with replicated KV heads; and an even split.
    for B, S, Hq, Hkv, P, index in ((2, 33, 6, 2, 4, [0, 0, 1, 1]), (1, 64, 8, 8, 2, list(range(8)))):
        q, k, v = (_rand((B, S, h, D), dtype, cpu, gen) for h in (Hq, Hkv, Hkv))
        checks.append((f"pack_qkv B{B} S{S} H{Hq}/{Hkv} P{P}", lambda q=q, k=k, v=v, P=P, i=index: pk.pack_qkv(on(q), on(k), on(v), P, i),
                       lambda q=q, k=k, v=v, P=P, i=index: pk.pack_qkv_torch(q, k, v, P, i), "exact"))  # fmt: skip
    # unpack_qkv: padding rows dropped, joint rows in front and behind.
    P, B, S_loc, hq, nkv, J = 4, 2, 9, 2, 1, 5
    recv = _rand((P, B, S_loc, hq + 2 * nkv, D), dtype, cpu, gen)
    jq, jk, jv = _rand((B, J, hq, D), dtype, cpu, gen), _rand((B, J, nkv, D), dtype, cpu, gen), _rand((B, J, nkv, D), dtype, cpu, gen)
    for front in (True, False):
        checks.append((f"unpack_qkv joint {'front' if front else 'rear'}",
                       lambda f=front: pk.unpack_qkv(on(recv), P * S_loc - 3, on(jq), on(jk), on(jv), f),
                       lambda f=front: pk.unpack_qkv_torch(recv, P * S_loc - 3, jq, jk, jv, f), "exact"))  # fmt: skip
    checks.append(("unpack_qkv no joint", lambda: pk.unpack_qkv(on(recv), P * S_loc),
                   lambda: pk.unpack_qkv_torch(recv, P * S_loc, None, None, None, True), "exact"))  # fmt: skip
    # pack_out: zero rows where a rank holds padding, joint rows in every chunk.
    L = 7
    out_seq, out_joint = _rand((B, P * L - 3, hq, D), dtype, cpu, gen), _rand((B, J, hq, D), dtype, cpu, gen)
    for front in (True, False):
        checks.append((f"pack_out joint {'front' if front else 'rear'}",
                       lambda f=front: pk.pack_out(on(out_seq), on(out_joint), P, L, f),
                       lambda f=front: pk.pack_out_torch(out_seq, out_joint, P, L, f), "exact"))  # fmt: skip
    # unpack_out: a padding head dropped (heads 7 over P 4 -> 2 slots each).
    rrecv = _rand((P, B, L, hq, D), dtype, cpu, gen)
    checks.append(("unpack_out heads 7 of 8 slots", lambda: pk.unpack_out(on(rrecv), 7),
                   lambda: pk.unpack_out_torch(rrecv, 7), "exact"))  # fmt: skip
    # shard_pad: the last shard, partly past the end.
    x = _rand((3, 37, 5, D // 32), dtype, cpu, gen)
    checks.append(("shard_pad past the end", lambda: sp.shard_pad(on(x), 1, 30, 10, -1.0),
                   lambda: sp.shard_pad_reference(x, 1, 30, 10, -1.0), "exact"))  # fmt: skip
    # LSE merges: fp32 accumulator, partials in `dtype`, one row empty (-inf) in every part.
    Bm, Sm, Hm, W = 2, 19, 3, 3
    outs = [_rand((Bm, Sm, Hm, D), dtype, cpu, gen) for _ in range(W)]
    lses = [_rand((Bm, Hm, Sm), torch.float32, cpu, gen) * 3 for _ in range(W)]
    for lse in lses:
        lse[:, :, 0] = float("-inf")
    if dtype in mg.VALUE_DTYPES:
        acc, acc_lse = outs[0].float(), lses[0].clone()

        def step_dev() -> tuple[Tensor, Tensor]:
            a, al = on(acc), on(acc_lse)
            mg.lse_merge_(a, al, on(outs[1]), on(lses[1]))
            return a, al

        def step_ref() -> tuple[Tensor, Tensor]:
            a, al = acc.clone(), acc_lse.clone()
            mg.lse_merge_torch_(a, al, outs[1], lses[1])
            return a, al

        checks.append(("lse_merge_ (per step)", step_dev, step_ref, "merge"))
        checks.append((f"lse_merge_all W{W} -> {str(dtype).removeprefix('torch.')}",
                       lambda: mg.lse_merge_all([on(o) for o in outs], [on(s) for s in lses], dtype),
                       lambda: mg.lse_merge_all_torch(outs, lses, dtype), "merge"))  # fmt: skip
    return checks


def _compare(got: object, want: object, how: str) -> str | None:
    """None when equal enough, else what differs."""
    gots = list(got) if isinstance(got, (tuple, list)) else [got]
    wants = list(want) if isinstance(want, (tuple, list)) else [want]
    for i, (g, w) in enumerate(zip(gots, wants)):
        g = g.cpu()  # type: ignore[union-attr]
        if g.shape != w.shape or g.dtype != w.dtype:  # type: ignore[union-attr]
            return f"output {i}: {tuple(g.shape)} {g.dtype}, expected {tuple(w.shape)} {w.dtype}"  # type: ignore[union-attr]
        if how == "exact":
            if not torch.equal(g, w):  # type: ignore[arg-type]
                return f"output {i}: not bit-exact (max |diff| {_max_err(g, w):.3g})"  # type: ignore[arg-type]
        else:
            # Outputs in a 16-bit dtype may differ by one rounding step; fp32 values by operation order.
            rtol = MERGE_RTOL if g.dtype == torch.float32 else 2 * torch.finfo(g.dtype).eps
            gd, wd = g.double(), w.double()  # type: ignore[union-attr]
            same_inf = torch.isinf(gd) & (gd == wd)
            diff = torch.where(same_inf, torch.zeros_like(gd), (gd - wd).abs())
            limit = rtol * wd.abs().masked_fill(torch.isinf(wd), 0.0) + rtol
            if torch.isnan(diff).any() or (diff > limit).any():
                return f"output {i}: max |diff| {float(diff.nan_to_num(float('inf')).max()):.3g} beyond rtol {rtol:g}"
    return None


def check_ops(report: Report, device: torch.device, quick: bool) -> None:
    impls = ["native", "triton", "torch"] if device.type == "cuda" else ["native", "torch"]
    unavailable: dict[str, set[str]] = {}
    for impl in impls:
        for D in (64, 128):
            for dtype in (torch.bfloat16, torch.float32) if not quick or D == 64 else ():
                with forced_impl(impl):
                    checks = _op_checks(device, D, dtype)
                    for name, run, expect, how in checks:
                        what = f"{impl} {name} D{D} {str(dtype).removeprefix('torch.')}"
                        try:
                            got = run()
                        except RuntimeError as e:
                            if "SP_KERNELS_IMPL=" in str(e) and "cannot use it" in str(e):
                                unavailable.setdefault(impl, set()).add(str(e).split(": ", 1)[-1][:160])
                                continue
                            report.add("ops", what, "FAIL", f"raised {type(e).__name__}: {e}"[:300])
                            continue
                        except Exception as e:  # noqa: BLE001 - reported as a failure, the next check runs
                            report.add("ops", what, "FAIL", f"raised {type(e).__name__}: {e}"[:300])
                            continue
                        with forced_impl("torch"):
                            want = expect()
                        why = _compare(got, want, how)
                        report.add("ops", what, "FAIL" if why else "PASS", why or how)
    for impl, reasons in sorted(unavailable.items()):
        report.note("ops", f"{impl} unavailable for some ops: {' | '.join(sorted(reasons))[:400]}")


# ---------------------------------------------------------------------------------------------
# ring


class FakeRingComm:
    """One virtual rank of a ring in one process: ``post`` writes into ``recv`` the block the ring
    predecessor would send at this step (from ``blocks``, every rank's packed K/V), after an optional
    ``torch.cuda._sleep`` on the current stream (inside the ring: the comm stream), and records on
    the device, without a host sync, whether ``send`` holds the block this rank should forward."""

    def __init__(self, rank: int, blocks: list[Tensor], delay_cycles: int = 0, skew: int = 0) -> None:
        self.rank, self.size = rank, len(blocks)
        self.blocks, self.delay_cycles, self.skew = blocks, delay_cycles, skew
        self.posts = 0
        self.send_mismatch: list[Tensor] = []

    def post(self, send: Tensor, recv: Tensor) -> int:
        step = self.posts
        self.posts += 1
        if self.delay_cycles:
            torch.cuda._sleep(self.delay_cycles)
        held = self.blocks[(self.rank - step) % self.size]
        self.send_mismatch.append((send != held).any() if send.shape == held.shape else torch.ones((), dtype=torch.bool))
        # skew != 0 delivers the wrong block: tests use it to show that this check catches it.
        block = self.blocks[(self.rank - step - 1 - self.skew) % self.size]
        if block.shape == recv.shape:
            recv.copy_(block)
        else:  # only with skew: a block of another length, i.e. certainly the wrong data
            n = min(block.shape[2], recv.shape[2])
            recv.zero_()
            recv[:, :, :n].copy_(block[:, :, :n])
        return step

    def wait(self, handle: object) -> None:
        return None

    def send_ok(self) -> bool:
        return not any(bool(m) for m in self.send_mismatch)


@dataclass(frozen=True)
class RingCase:
    lens: tuple[int, ...]  # valid rows of each ring block
    Hq: int
    Hkv: int
    D: int
    causal: bool
    dtype: torch.dtype

    def __str__(self) -> str:
        return (f"lens {list(self.lens)} H{self.Hq}/{self.Hkv} D{self.D} {str(self.dtype).removeprefix('torch.')}"
                + (" causal" if self.causal else ""))  # fmt: skip


def ring_cases(quick: bool) -> list[RingCase]:
    bf16 = torch.bfloat16
    if quick:
        return [RingCase((16, 16, 16), 2, 2, 64, False, torch.float32), RingCase((12, 0, 20, 7), 4, 2, 64, False, torch.float32),
                RingCase((10, 6, 13), 4, 1, 64, True, torch.float32), RingCase((16, 9), 2, 1, 128, False, bf16)]  # fmt: skip
    return [
        RingCase((64, 64, 64, 64), 4, 4, 64, False, bf16),
        RingCase((40, 0, 72, 33), 8, 2, 128, False, bf16),  # unequal shards, an empty one (auto_pad), GQA
        RingCase((48, 20, 33), 4, 1, 128, True, bf16),  # causal (naive ring), MQA
        RingCase((96, 80, 96, 70, 96, 96, 96, 90), 8, 8, 128, False, bf16),  # W = 8
        RingCase((40, 0, 72, 33), 8, 2, 128, False, torch.float16),
        RingCase((40, 0, 72, 33), 8, 2, 64, True, torch.float32),
        RingCase((512, 512, 512, 512), 8, 4, 128, False, bf16),
    ]


def run_ring_case(
    case: RingCase, device: torch.device, merge: str, compute_delay: int = 0, comm_delay: int = 0, skew: int = 0
) -> tuple[float, bool]:
    """(max |error| of every rank's output vs the fp64 reference, whether every send held the right
    block) for one case run as W virtual ranks sharing one buffer cache."""
    from sp_kernels.attn import ring

    W, B = len(case.lens), 2
    S = sum(case.lens)
    gen = torch.Generator().manual_seed(S * 7 + case.Hq)
    q = _rand((B, S, case.Hq, case.D), case.dtype, device, gen)
    k = _rand((B, S, case.Hkv, case.D), case.dtype, device, gen)
    v = _rand((B, S, case.Hkv, case.D), case.dtype, device, gen)
    scale = case.D**-0.5
    ref, _ = reference_attention(q, k, v, scale, case.causal)
    offsets = [sum(case.lens[:r]) for r in range(W)]
    blocks = [torch.stack((k[:, o : o + n], v[:, o : o + n])).contiguous() for o, n in zip(offsets, case.lens)]
    engine = ring.RingEngine(merge=merge, comm_stream=True)
    cache: dict = {}  # one cache for every rank's call: buffers reused across calls, as in a model
    real = ring.block_attention

    def delayed(*args: object, **kwargs: object) -> tuple[Tensor, Tensor]:
        torch.cuda._sleep(compute_delay)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    outs, comms = [], []
    if compute_delay:
        ring.block_attention = delayed  # type: ignore[assignment]
    try:
        for r, (o, n) in enumerate(zip(offsets, case.lens)):
            comm = FakeRingComm(r, blocks, comm_delay, skew)
            out = torch.full((B, n, case.Hq, case.D), float("nan"), dtype=case.dtype, device=device)
            ring.ring_core(q[:, o : o + n].contiguous(), k[:, o : o + n].contiguous(), v[:, o : o + n].contiguous(),
                           valid=list(case.lens), comm=comm, scale=scale, causal=case.causal, joint=None,
                           out_seq=out, out_joint=None, cache=cache, engine=engine)  # fmt: skip
            outs.append(out)
            comms.append(comm)
    finally:
        ring.block_attention = real  # type: ignore[assignment]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    err = max(_max_err(out, ref[:, o : o + n]) for out, o, n in zip(outs, offsets, case.lens))
    return err, all(c.send_ok() for c in comms)


def check_ring(report: Report, device: torch.device, quick: bool) -> None:
    if device.type == "cuda":
        delays = [("no delay", 0, 0), ("compute delayed", DELAY_CYCLES, 0), ("comm delayed", 0, DELAY_CYCLES),
                  ("both delayed", DELAY_CYCLES, DELAY_CYCLES)]  # fmt: skip
    else:
        delays = [("no delay", 0, 0)]
        report.note("ring", "torch.cuda._sleep delays skipped: CUDA only (on CPU there are no streams to order)")
    for case in ring_cases(quick):
        for merge in ("step", "all"):
            for label, c_delay, m_delay in delays:
                what = f"{merge} {label} {case}"
                try:
                    err, sends = run_ring_case(case, device, merge, c_delay, m_delay)
                except Exception as e:  # noqa: BLE001 - reported; the other cases still run
                    report.add("ring", what, "FAIL", f"raised {type(e).__name__}: {e}"[:300])
                    continue
                problems = []
                if not err <= OUT_TOL[case.dtype]:
                    problems.append(f"max |err| {err:.3g} > {OUT_TOL[case.dtype]:g}")
                if not sends:
                    problems.append("a rank was handed the wrong block to send")
                report.add("ring", what, "FAIL" if problems else "PASS", "; ".join(problems) or f"max |err| {err:.2e}")


# ---------------------------------------------------------------------------------------------
# env


def _version(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except Exception as e:  # noqa: BLE001 - absent or broken: say which
        return f"not importable ({type(e).__name__})"


def environment_lines() -> list[str]:
    lines = [f"python {platform.python_version()} ({sys.executable})", f"torch {torch.__version__}",
             f"torch CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'n/a'}",
             f"triton {_version('triton')}", f"flash_attn {_version('flash_attn')}",
             f"flash_attn_interface (FA3) {_version('flash_attn_interface')}",
             f"ninja {'on PATH' if shutil.which('ninja') else 'NOT on PATH (the build compiles one file at a time)'}",
             f"nvcc {shutil.which('nvcc') or 'not on PATH'}"]  # fmt: skip
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {p.name}, sm_{p.major}{p.minor} (SP_KERNELS_CUDA_ARCHS={cuda_arch_spec(p.major, p.minor)}), "
                         f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")  # fmt: skip
    else:
        lines.append("no GPU: torch.cuda.is_available() is False")
    try:
        import sp_kernels

        info = sp_kernels.build_info()
        lines.append("sp_kernels build: " + json.dumps({k: info.get(k) for k in ("cpu_kernels", "cuda_kernels", "cuda_archs",
                                                                                  "built_with_torch", "built_with_cuda")}))  # fmt: skip
    except Exception as e:  # noqa: BLE001 - not built yet is a normal state before the build step
        lines.append(f"sp_kernels build: unavailable ({type(e).__name__}: {e})")
    return lines


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when a GPU is present) or cpu")
    ap.add_argument("--quick", action="store_true", help="small case set (the CPU test runs this)")
    ap.add_argument("--only", choices=("kernels", "ops", "ring"), action="append", help="run only these sections")
    ap.add_argument("--out", default=None, help="directory for gpu_first_run.csv")
    ap.add_argument("--print-arch", action="store_true", help="print SP_KERNELS_CUDA_ARCHS for GPU 0 (exit 2: no GPU)")
    ap.add_argument("--env", action="store_true", help="print versions and the GPU, then exit")
    args = ap.parse_args(argv)
    if args.print_arch:
        if not torch.cuda.is_available():
            print("no GPU: torch.cuda.is_available() is False", file=sys.stderr)
            return 2
        print(cuda_arch_spec(*torch.cuda.get_device_capability(0)))
        return 0
    if args.env:
        for line in environment_lines():
            print(line)
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_first_run: --device cuda but torch.cuda.is_available() is False (no GPU here)")
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"gpu_first_run: --device must be cpu or cuda, got {device}")
        return 2
    # fp32 checks compare against fp64 with fp32 tolerances: TF32 matmuls would need 100x looser ones.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = Report()
    report.note("env", f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
                + f", torch {torch.__version__}" + (" --quick" if args.quick else ""))  # fmt: skip
    sections = {"kernels": check_kernels, "ops": check_ops, "ring": check_ring}
    for name, fn in sections.items():
        if args.only and name not in args.only:
            continue
        try:
            fn(report, device, args.quick)
        except Exception as e:  # noqa: BLE001 - a section that cannot even start is one failure, not the end
            report.add(name, "section", "FAIL", f"raised {type(e).__name__}: {e}"[:300])
    print()
    for name in sections:
        if args.only and name not in args.only:
            continue
        passed, failed, skipped = report.counts(name)
        print(f"key: {name} {passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    failed = report.failed()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "gpu_first_run.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["section", "check", "status", "detail"])
            writer.writeheader()
            writer.writerows(report.rows)
        print(f"wrote {out / 'gpu_first_run.csv'}")
    if failed:
        print(f"{len(failed)} check(s) FAILED:")
        for r in failed:
            print(f"  {r['section']}: {r['check']}: {r['detail']}")
        return 1
    print("all checks passed" + ("" if device.type == "cuda" else " (CPU: the stream-ordering delays were not exercised)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
