#!/usr/bin/env python3
"""LSE merge: ours (native / Triton / torch faces) vs the peers' eager sigmoid chain, its torch.compile, and
the eager log1p merge, side by side in one run; achieved GB/s against a measured memcpy.

Two workloads per shape (B=1, D=128, fp32 accumulator, bf16 block outputs, as in a ring step):
  step   one in-place merge of a bf16 block into the fp32 accumulator (what every ring step does);
  wway   W bf16 partials -> one bf16 output: W-1 step merges + final cast (peers, eager log1p, ours
         per-step with the final step writing bf16 directly), or our one-pass W-way merge.

Bytes-moved model (elements N = B*S*H*D; lse traffic is 1/D of it and ignored):
  step  reads acc fp32 + block bf16, writes acc fp32            = 10 N bytes
  wway  reads W bf16 partials, writes one bf16 output           = (2W + 2) N bytes (one-pass floor)

    python benchmarks/bench_merge.py            # CPU default set (S 4096 and 32760, H 24)
    python benchmarks/bench_merge.py --quick    # seconds-long smoke run (tests run it)
    python benchmarks/bench_merge.py --full     # every shape of the spec (S up to 75600, H 40: needs memory)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _harness as harness  # noqa: E402
from sp_kernels.ops import merge as merge_ops  # noqa: E402

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# the competitors
# ---------------------------------------------------------------------------------------------


def sigmoid_step(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """ring-flash-attn's update (fp32): out [B,S,H,D], lse [B,S,H,1]; block_lse [B,H,S] as kernels return it."""
    block_out = block_out.to(torch.float32)
    block_lse = block_lse.transpose(-2, -1).unsqueeze(dim=-1)
    out = out - F.sigmoid(block_lse - lse) * (out - block_out)
    lse = lse - F.logsigmoid(lse - block_lse)
    return out, lse


_compiled_step: Callable | None = None
_compile_error: str | None = None


def compiled_step() -> Callable | None:
    """torch.compile of the sigmoid chain (dynamic shapes: one compile serves every shape)."""
    global _compiled_step, _compile_error
    if _compiled_step is None and _compile_error is None:
        try:
            _compiled_step = torch.compile(sigmoid_step, dynamic=True)
        except Exception as exc:  # report, do not abort the other measurements
            _compile_error = f"{type(exc).__name__}: {exc}"
    return _compiled_step


def with_impl(name: str, fn: Callable) -> Callable:
    def run(*args, **kwargs):
        old = os.environ.get("SP_KERNELS_IMPL")
        os.environ["SP_KERNELS_IMPL"] = name
        try:
            return fn(*args, **kwargs)
        finally:
            if old is None:
                del os.environ["SP_KERNELS_IMPL"]
            else:
                os.environ["SP_KERNELS_IMPL"] = old

    return run


def available_impls(device: str) -> dict[str, str | None]:
    cands = merge_ops._candidates(device)
    return {name: reason for name, reason in cands.items()}


# ---------------------------------------------------------------------------------------------
# one shape
# ---------------------------------------------------------------------------------------------


def make_inputs(S: int, H: int, W: int, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, D = 1, 128
    outs = [torch.randn(B, S, H, D, generator=g).to(device=device, dtype=torch.bfloat16) for _ in range(W)]
    lses = [(torch.randn(B, H, S, generator=g) * 2 + 5).to(device) for _ in range(W)]
    return outs, lses


def bench_shape(
    S: int, H: int, W: int, device: str, reps: int, warmup: int, impls: dict, rows: list[dict], with_step: bool
) -> None:
    """Appends rows for the W-way workload and, with ``with_step``, the step workload (independent of W)."""
    B, D = 1, 128
    n = B * S * H * D
    outs, lses = make_inputs(S, H, W, device)
    step_bytes = 10 * n
    wway_bytes = (2 * W + 2) * n

    copy_s = {nb: harness.copy_baseline(nb // 2, device, warmup, reps) for nb in (step_bytes, wway_bytes)}

    host_us: list[float] = []  # the host time of the call time_it timed last (GPU only)

    def record(workload: str, method: str, seconds: float | None, nbytes: int, note: str = "") -> None:
        copy_gbps = harness.gbps(nbytes, copy_s[nbytes])
        host = host_us.pop() if seconds is not None and host_us else float("nan")
        rows.append(
            {
                "device": device,
                "S": S,
                "H": H,
                "W": W if workload == "wway" else 1,
                "workload": workload,
                "method": method,
                "ms": None if seconds is None else seconds * 1e3,
                "GB/s": None if seconds is None else harness.gbps(nbytes, seconds),
                "memcpy GB/s": copy_gbps,
                "% memcpy": None if seconds is None else 100.0 * harness.gbps(nbytes, seconds) / copy_gbps,
                "host us": host,
                "note": note,
            }
        )

    def time_it(fn) -> float:
        # Device time (host side hidden, see _harness) and, on a GPU, the host time per call beside it.
        seconds = harness.time_fn(fn, device, warmup=warmup, repeats=reps)
        host_us[:] = [harness.host_seconds(fn, device) * 1e6]
        return seconds

    step_c = compiled_step()
    if with_step:
        bench_step(outs, lses, device, time_it, record, impls, step_c, step_bytes)

    # --- wway: W partials -> one bf16 output --------------------------------------------------
    def peers_wway(step) -> Tensor:
        o = outs[0].float()
        lse = lses[0].transpose(1, 2).unsqueeze(-1)
        for i in range(1, W):
            o, lse = step(o, lse, outs[i], lses[i])
        return o.to(torch.bfloat16)

    record("wway", "eager sigmoid chain", time_it(lambda: peers_wway(sigmoid_step)), wway_bytes)
    if step_c is not None:
        try:
            record("wway", "torch.compile sigmoid chain", time_it(lambda: peers_wway(step_c)), wway_bytes)
        except Exception as exc:
            record("wway", "torch.compile sigmoid chain", None, wway_bytes, f"failed: {type(exc).__name__}")
    else:
        record("wway", "torch.compile sigmoid chain", None, wway_bytes, f"not run: {_compile_error}")
    record(
        "wway",
        "eager log1p (torch merge)",
        time_it(lambda: merge_ops.lse_merge_all_torch(outs, lses, torch.bfloat16)),
        wway_bytes,
    )
    final = torch.empty_like(outs[0])
    final_lse = torch.empty_like(lses[0])
    for name in ("native", "triton"):
        if impls.get(name) is not None:
            record("wway", f"ours {name} per-step", None, wway_bytes, f"unavailable: {impls[name]}")
            record("wway", f"ours {name} W-way", None, wway_bytes, f"unavailable: {impls[name]}")
            continue
        step_fn = with_impl(name, merge_ops.lse_merge_)
        out_fn = with_impl(name, merge_ops.lse_merge_out)
        all_fn = with_impl(name, merge_ops.lse_merge_all)

        def per_step(step_fn=step_fn, out_fn=out_fn) -> None:
            # Ring order: the first partial taken over as the fp32 accumulator, the last merge writes bf16.
            acc = outs[0].float()
            acc_lse = lses[0].clone()
            for i in range(1, W - 1):
                step_fn(acc, acc_lse, outs[i], lses[i])
            out_fn(acc, acc_lse, outs[W - 1], lses[W - 1], final, final_lse)

        record("wway", f"ours {name} per-step", time_it(per_step), wway_bytes)
        record(
            "wway",
            f"ours {name} W-way",
            time_it(lambda all_fn=all_fn: all_fn(outs, lses, torch.bfloat16, out=final, lse=final_lse)),
            wway_bytes,
        )


def bench_step(outs, lses, device, time_it, record, impls, step_c, step_bytes) -> None:
    """One in-place merge of a bf16 block into the fp32 accumulator, every method."""
    acc = outs[0].float()
    acc_lse = lses[0].clone()
    acc_lse_peer = acc_lse.transpose(1, 2).unsqueeze(-1).contiguous()  # their [B, S, H, 1]
    blk, blk_lse = outs[1], lses[1]
    record("step", "eager sigmoid chain", time_it(lambda: sigmoid_step(acc, acc_lse_peer, blk, blk_lse)), step_bytes)
    if step_c is not None:
        try:
            step_c(acc, acc_lse_peer, blk, blk_lse)  # compile outside the timing
            record(
                "step",
                "torch.compile sigmoid chain",
                time_it(lambda: step_c(acc, acc_lse_peer, blk, blk_lse)),
                step_bytes,
            )
        except Exception as exc:
            record("step", "torch.compile sigmoid chain", None, step_bytes, f"failed: {type(exc).__name__}")
    else:
        record("step", "torch.compile sigmoid chain", None, step_bytes, f"not run: {_compile_error}")
    record(
        "step",
        "eager log1p (torch merge)",
        time_it(lambda: merge_ops.lse_merge_torch_(acc, acc_lse, blk, blk_lse)),
        step_bytes,
    )
    for name in ("native", "triton"):
        if impls.get(name) is not None:
            record("step", f"ours {name}", None, step_bytes, f"unavailable: {impls[name]}")
            continue
        fn = with_impl(name, merge_ops.lse_merge_)
        record("step", f"ours {name}", time_it(lambda fn=fn: fn(acc, acc_lse, blk, blk_lse)), step_bytes)


def _case(row: dict) -> str:
    return f"{row['workload']} S{row['S']} H{row['H']} W{row['W']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--full", action="store_true", help="every shape of the spec (large memory)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the sigmoid chain")
    args = parser.parse_args(argv)

    if args.quick:
        shapes = [(512, 4, w) for w in (2, 3)]
        reps, warmup = args.reps or 3, 1
    elif args.full:
        shapes = [(s, h, w) for s in (4096, 32760, 75600) for h in (24, 40) for w in (2, 4, 8)]
        reps, warmup = args.reps or 7, 2
    else:
        shapes = [(s, 24, w) for s in (4096, 32760) for w in (2, 4, 8)]
        reps, warmup = args.reps or 7, 2
    if args.no_compile or args.quick:
        global _compile_error
        _compile_error = "skipped (--no-compile or --quick)"

    device = args.device
    impls = available_impls(device)
    env = harness.environment()
    print(f"bench_merge: {env['device']}, threads {env['threads']}, torch {env['torch']}; implementations {impls}")
    rows: list[dict] = []
    seen: set[tuple[int, int]] = set()
    for S, H, W in shapes:
        bench_shape(S, H, W, device, reps, warmup, impls, rows, with_step=(S, H) not in seen)
        seen.add((S, H))
        print(f"  done S={S} H={H} W={W}", flush=True)
    base = "eager sigmoid chain"
    for row in rows:
        b = next(r["ms"] for r in rows if _case(r) == _case(row) and r["method"] == base)
        row["x eager sigmoid"] = b / row["ms"] if row["ms"] else None
    tag = "quick" if args.quick else ("full" if args.full else "default")
    name = f"merge_{device}_{tag}"
    csv_path = harness.write_csv(rows, name)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cases = list(dict.fromkeys(_case(r) for r in rows))
    pivot = [
        {"case": case, **{m: r["x eager sigmoid"] for r in rows if _case(r) == case for m in [r["method"]]}}
        for case in cases
    ]
    png_path = harness.plot_bars(pivot, "case", methods, f"speed-up over the {base} (higher is better)", name)
    print(f"wrote {csv_path} and {png_path}")
    shown = [{**r, "ms": r["ms"] if r["ms"] is not None else r["note"][:60]} for r in rows]
    columns = ["workload", "S", "H", "W", "method", "ms", "GB/s", "% memcpy", "x eager sigmoid"]
    if torch.device(device).type == "cuda":
        columns.append("host us")
    harness.print_table(shown, columns, title=f"LSE merge on {env['device']} (B=1, D=128, bf16 parts, fp32 acc)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
