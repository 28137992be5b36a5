#!/usr/bin/env python3
"""Ulysses pack/unpack: our one-pass ops vs the peers' eager chain vs torch.compile of that chain.

One rank's data movement around the all-to-all (the exchange itself is not timed; on one process
it is emulated by the local buffer), per case ``B, S (global), H, D, P``, bf16:

  pack_qkv    ours: one send buffer [P, B, S_loc, 3h, D] in one pass.
              eager: per tensor, pad heads (H % P) + reshape + transpose + contiguous -> 3 send buffers.
  unpack_qkv  ours: [P, B, S_loc, 3h, D] -> [B, S, 3h, D], padding rows dropped, one pass.
              eager: per tensor, transpose + reshape + slice to S + contiguous.
  pack_out    ours: [B, S, h, D] -> [P, B, S_loc, h, D] with zero padding rows, one pass.
              eager: pad rows + reshape + transpose + contiguous.
  unpack_out  ours: [P, B, S_loc, h, D] -> [B, S_loc, H, D], padding heads dropped.
              eager: permute + reshape + slice heads + contiguous.

GB/s counts bytes read + written by a single pass (the floor); ``copy GB/s`` is a measured
``dst.copy_(src)`` of the same size (ordinary stores; our CPU ops stream big outputs with
non-temporal stores, so they can exceed it); ``stream copy GB/s`` is our native kernel copying the
same bytes as one contiguous run (unpack_qkv of a single shard): the floor of our ops.
``eager_passes``: full-size copies the eager chain makes, counted while it runs (measured_passes);
``target``: the speedup the targets in docs/performance.md asks of that row (0.95x at one pass, 2x from two), and
``target_met`` whether the best of ours reached it. On a GPU the times are device time (see
_harness: the host side of each call is hidden behind queued work) and ``*_host_us`` is each way's host
time per call (Python, checks, launches) measured on its own. ``step`` rows (S not divisible by P;
bf16 at the targets' shapes on a GPU, small fp32 ones on CPU): the whole Ulysses step of one rank, ours
(exact S, the library's block kernel choice) vs peers (padded sequence, SDPA with a boolean mask
over padded keys), with the attention kernel each way runs.

    python benchmarks/bench_pack.py            # default sweep (a few minutes on 2 CPU cores)
    python benchmarks/bench_pack.py --full     # every shape of the spec grid (long on CPU)
    python benchmarks/bench_pack.py --quick    # CI smoke: tiny shapes, no torch.compile

On CPU the script re-executes itself with glibc's mmap disabled (see _harness.ensure_steady_cpu_allocator)
so that big outputs are recycled as a GPU caching allocator would; ``--malloc-as-is`` keeps the default.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness as H  # noqa: E402
from sp_kernels.attn.local import block_attention, select_block_kernel  # noqa: E402
from sp_kernels.ops import _dispatch  # noqa: E402
from sp_kernels.ops import pack as pk  # noqa: E402

Tensor = torch.Tensor
# Minimum over the repeats: this 2-core machine is shared with other jobs, and the fastest repeat is
# the one least disturbed by them (the CSV has the same statistic for every column).
STAT = "min"


# ---- the peers' eager chains (yunchang / vLLM-Omni style) ---------------------------------------


def eager_pack_qkv(q: Tensor, k: Tensor, v: Tensor, P: int) -> list[Tensor]:
    out = []
    for t in (q, k, v):
        B, S, Hh, D = t.shape
        h = -(-Hh // P)
        if Hh % P:
            t = F.pad(t, (0, 0, 0, P * h - Hh))
        out.append(t.reshape(B, S, P, h, D).transpose(0, 2).contiguous())  # [P, S, B, h, D]
    return out


def eager_unpack_qkv(recvs: list[Tensor], S: int) -> list[Tensor]:
    out = []
    for r in recvs:
        P, S_loc, B, h, D = r.shape
        out.append(r.permute(2, 0, 1, 3, 4).reshape(B, P * S_loc, h, D)[:, :S].contiguous())
    return out


def eager_pack_out(o: Tensor, P: int, L: int) -> Tensor:
    B, S, h, D = o.shape
    if S < P * L:
        o = F.pad(o, (0, 0, 0, 0, 0, P * L - S))
    return o.reshape(B, P, L, h, D).transpose(0, 1).contiguous()


def eager_unpack_out(r: Tensor, heads: int) -> Tensor:
    P, B, L, h, D = r.shape
    return r.permute(1, 2, 0, 3, 4).reshape(B, L, P * h, D)[:, :, :heads].contiguous()


class _NewStorageBytes(TorchDispatchMode):
    """Sums the bytes of the new storages that the aten ops run under it produce: views and in-place
    ops produce none, so this is what a chain writes to freshly allocated memory."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                self.nbytes += t.untyped_storage().nbytes()
        return out


def measured_passes(fn) -> int:
    """Full-size copy passes a chain makes: bytes it writes to new storage over the bytes of its
    result (0: views only). Measured, not modelled: whether a reshape of a permuted tensor copies
    depends on the strides (the peers' sequence-first receive layout [P, S_loc, B, h, D] makes
    unpack_qkv's permute + reshape a view, leaving one copy even with padding rows). One pass is the
    floor every implementation shares, where fusion can only reach parity; from two on, a one-pass op
    should approach the ratio of passes (the targets in docs/performance.md asks >= 2x there)."""
    with _NewStorageBytes() as counter:
        out = fn()
    outs = out if isinstance(out, (list, tuple)) else [out]
    result_bytes = sum(o.numel() * o.element_size() for o in outs)
    return round(counter.nbytes / result_bytes) if result_bytes else 0


def target_speedup(passes: int) -> float:
    """the targets in docs/performance.md: never slower than the eager chain, >= 2x where it makes extra passes."""
    return 2.0 if passes >= 2 else 0.95


# ---- implementations of ours available here ------------------------------------------------------


def our_impls(device: torch.device) -> list[str]:
    names = []
    for name in _dispatch.IMPL_NAMES:
        reason = pk._candidates("pack_qkv", device.type).get(name)
        if reason is None:
            names.append(name)
    return names


def _forced_call(impl: str, fn):
    with forced(impl):
        return fn()


class forced:
    def __init__(self, impl: str) -> None:
        self.impl = impl

    def __enter__(self):
        self.prev = os.environ.get(_dispatch.IMPL_ENV)
        os.environ[_dispatch.IMPL_ENV] = self.impl

    def __exit__(self, *exc):
        if self.prev is None:
            os.environ.pop(_dispatch.IMPL_ENV, None)
        else:
            os.environ[_dispatch.IMPL_ENV] = self.prev


# ---- one case ------------------------------------------------------------------------------------


def bench_case(B, S, Hh, D, P, device, dtype, impls, compiled, warmup, repeats, flush=None) -> list[dict]:
    L = -(-S // P)
    h = -(-Hh // P)
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype).to(device)
    q, k, v = mk(B, L, Hh, D), mk(B, L, Hh, D), mk(B, L, Hh, D)
    kv_index = list(range(P * h)) if Hh % P == 0 else None
    if kv_index is None:
        # Hq not divisible by P with MHA: pad KV heads like query heads (index of a real head for padding slots).
        kv_index = [min(i, Hh - 1) for i in range(P * h)]
    es = q.element_size()
    send = pk.pack_qkv(q, k, v, P, kv_index)
    recv_out = mk(P, B, L, h, D)
    out_seq = mk(B, S, h, D)
    eager_recvs = eager_pack_qkv(q, k, v, P)

    # What the Ulysses backend runs: no unpack pass for B == 1 (the received buffer is viewed and
    # sliced), no pack_out pass for B == 1 without padding (the output already is the send layout).
    def ours_unpack_qkv():
        return send.view(1, P * L, send.shape[3], D)[:, :S] if B == 1 else pk.unpack_qkv(send, S)

    def ours_pack_out():
        return out_seq.view(P, 1, L, h, D) if (B == 1 and S == P * L) else pk.pack_out(out_seq, None, P, L)

    work = {
        "pack_qkv": (
            lambda: pk.pack_qkv(q, k, v, P, kv_index),
            lambda: eager_pack_qkv(q, k, v, P),
            (q.numel() * 3 + send.numel()) * es,
            (q, k, v, P),
        ),
        "unpack_qkv": (
            ours_unpack_qkv,
            lambda: eager_unpack_qkv(eager_recvs, S),
            2 * B * S * send.shape[3] * D * es,
            (eager_recvs, S),
        ),
        "pack_out": (
            ours_pack_out,
            lambda: eager_pack_out(out_seq, P, L),
            (out_seq.numel() + P * B * L * h * D) * es,
            (out_seq, P, L),
        ),
        "unpack_out": (
            lambda: pk.unpack_out(recv_out, Hh),
            lambda: eager_unpack_out(recv_out, Hh),
            2 * B * L * Hh * D * es,
            (recv_out, Hh),
        ),
    }
    rows = []
    for op, (ours, eager, moved, args) in work.items():
        row = {"op": op, "B": B, "S": S, "H": Hh, "D": D, "P": P, "MB_moved": moved / 1e6}
        row["eager_passes"] = measured_passes(eager)
        row["target"] = target_speedup(row["eager_passes"])
        n = max(1, moved // 2)
        copy_src = torch.empty(n, dtype=torch.uint8, device=device).fill_(7)
        copy_dst = torch.empty_like(copy_src)
        fns = {"copy": lambda d=copy_dst, s=copy_src: d.copy_(s), "eager": eager}
        if "native" in impls:
            # Our own floor: the native unpack_qkv of a single shard is one contiguous copy of the
            # same bytes with the kernels' stores (streaming for big outputs).
            flat = copy_src[: n // 64 * 64].view(1, 1, -1, 1, 32).view(torch.float16)
            fns["stream_copy"] = lambda f=flat: torch.ops.sp_kernels.unpack_qkv.default(
                f, f.shape[2], None, None, None, True
            )
        auto = pk._impl_for(op, device.type)
        for impl in impls:
            # The implementation the op picks by itself is called as users call it; the others are
            # forced through the environment, which costs them a few microseconds per call.
            fns[impl] = ours if impl == auto else (lambda impl=impl, ours=ours: _forced_call(impl, ours))
        if compiled is not None:
            try:
                fn = compiled[op]
                t0 = time.perf_counter()
                fn(*args)  # first call compiles (dynamic shapes: once per op for the whole sweep)
                row["compile_s"] = time.perf_counter() - t0
                fns["compiled"] = lambda fn=fn, args=args: fn(*args)
            except Exception as exc:  # report, never hide: the table says why the column is empty
                row["compile_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        t = H.time_interleaved(fns, device, warmup, repeats, STAT, flush=flush)
        if device.type == "cuda":
            for name in ["eager", *impls]:
                row[f"{name}_host_us"] = H.host_seconds(fns[name], device) * 1e6
        row["copy_GBps"] = H.gbps(moved, t["copy"])
        row["stream_copy_GBps"] = H.gbps(moved, t["stream_copy"]) if "stream_copy" in t else float("nan")
        row["eager_ms"] = t["eager"] * 1e3
        row["compiled_ms"] = t["compiled"] * 1e3 if "compiled" in t else float("nan")
        for impl in impls:
            row[f"{impl}_ms"] = t[impl] * 1e3
            row[f"{impl}_GBps"] = H.gbps(moved, t[impl])
        best = min(row[f"{i}_ms"] for i in impls)
        if (op == "unpack_qkv" and B == 1) or (op == "pack_out" and B == 1 and S == P * L):
            # Both sides are views here (no pass at all): ratios of microseconds of Python overhead.
            row["path"] = "view"
            for impl in impls:
                row[f"{impl}_GBps"] = float("nan")
                row[f"{impl}_vs_eager"] = float("nan")
            row["speedup_vs_eager"] = float("nan")
            row["pct_of_copy"] = float("nan")
            row["target_met"] = None
            rows.append(row)
            continue
        row["path"] = "op"
        for impl in impls:
            row[f"{impl}_vs_eager"] = row["eager_ms"] / row[f"{impl}_ms"]
        row["speedup_vs_eager"] = row["eager_ms"] / best  # the best of ours
        row["pct_of_copy"] = 100.0 * H.gbps(moved, best / 1e3) / row["copy_GBps"]
        row["target_met"] = row["speedup_vs_eager"] >= row["target"]
        rows.append(row)
    return rows


def bench_step(B, S, Hh, D, P, device, warmup, repeats, dtype=torch.float32) -> dict:
    """One rank's Ulysses step with S % P != 0, exchange emulated locally: ours vs the peers' way.

    Ours: exact S (padding rows never reach attention), the library's own block kernel choice
    (``attn.local.block_attention``, as the Ulysses backend calls it). Peers: the padded sequence and
    SDPA with a boolean mask over the padded keys. The row names the kernel each way runs.
    """
    L = -(-S // P)
    h = Hh // P
    g = torch.Generator(device="cpu").manual_seed(1)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(device)
    q, k, v = mk(B, L, Hh, D), mk(B, L, Hh, D), mk(B, L, Hh, D)
    kv_index = list(range(Hh))

    def our_qkv():
        send = pk.pack_qkv(q, k, v, P, kv_index)  # exchange emulated: recv = send
        qkv = pk.unpack_qkv(send, S) if B > 1 else send.view(1, P * L, 3 * h, D)[:, :S]
        return tuple(qkv[:, :, i * h : (i + 1) * h] for i in range(3))

    def ours():
        o, _ = block_attention(*our_qkv())
        return pk.unpack_out(pk.pack_out(o, None, P, L), Hh)

    mask = torch.zeros(P * L, dtype=torch.bool, device=device)
    mask[:S] = True
    mask = mask.view(1, 1, 1, P * L)  # padded keys masked out for every query

    def peer_qkv():
        recvs = eager_pack_qkv(q, k, v, P)
        return tuple(r.permute(2, 0, 1, 3, 4).reshape(B, P * L, h, D).transpose(1, 2) for r in recvs)

    def peers():
        o = F.scaled_dot_product_attention(*peer_qkv(), attn_mask=mask).transpose(1, 2)
        return eager_unpack_out(eager_pack_out(o.contiguous(), P, L), Hh)

    ours_kernel = select_block_kernel(*our_qkv()).name
    peers_kernel = SDPBackend(torch._fused_sdp_choice(*peer_qkv(), mask)).name.lower()
    t = H.time_interleaved({"ours": ours, "peers": peers}, device, warmup, repeats, STAT)
    t_ours, t_peers = t["ours"], t["peers"]
    return {"op": "step", "B": B, "S": S, "H": Hh, "D": D, "P": P, "dtype": str(dtype).removeprefix("torch."),
            "ours_kernel": ours_kernel, "peers_kernel": peers_kernel, "ours_ms": t_ours * 1e3,
            "peers_ms": t_peers * 1e3, "speedup_vs_peers": t_peers / t_ours}  # fmt: skip


def make_compiled() -> dict:
    opts = {"dynamic": True}
    return {
        "pack_qkv": torch.compile(eager_pack_qkv, **opts),
        "unpack_qkv": torch.compile(eager_unpack_qkv, **opts),
        "pack_out": torch.compile(eager_pack_out, **opts),
        "unpack_out": torch.compile(eager_unpack_out, **opts),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny shapes, no compile (CI smoke, seconds)")
    mode.add_argument("--full", action="store_true", help="the whole spec grid (slow on CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", default="bench_pack", help="output file stem under benchmarks/out/")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="do not evict the cache before each timed call (see _harness.cache_flusher)")
    ap.add_argument("--malloc-as-is", action="store_true", help="do not re-exec with the steady-state malloc env")
    args = ap.parse_args(argv)
    if argv is None and not args.malloc_as_is and torch.device(args.device).type == "cpu":
        H.ensure_steady_cpu_allocator([str(Path(__file__).resolve()), *sys.argv[1:]])
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16
    D = 128
    if args.quick:
        cases = [(1, 256, 4, 64, 2), (1, 257, 6, 64, 4), (2, 130, 4, 64, 2)]
        steps = [(1, 129, 4, 64, 2)]
        warmup, repeats = 1, 3
    elif args.full:
        cases = [(1, S, Hh, D, P) for S, Hh, P in itertools.product((4096, 32760, 75600, 32761), (24, 40), (2, 4, 8))]
        cases += [(2, S, Hh, D, P) for S, Hh, P in itertools.product((4096, 32761), (24, 40), (2, 4, 8))]
        steps = [(1, 4097, 24, D, 8), (2, 4097, 24, D, 8), (1, 8191, 24, D, 8)]
        warmup, repeats = 2, 5
    else:
        cases = [
            (1, 4096, 24, D, 2),
            (1, 32760, 24, D, 8),
            (1, 32761, 24, D, 8),
            (1, 32760, 40, D, 4),
            (1, 32761, 40, D, 8),
            (1, 75600, 40, D, 8),
            (2, 32761, 24, D, 4),
            (2, 4096, 40, D, 8),
            (1, 32760, 40, D, 3),  # heads not divisible by P: padding heads
            (2, 8191, 40, D, 6),  # padding heads and rows, B > 1
        ]
        steps = [(1, 4097, 24, D, 8), (2, 4097, 24, D, 8)]
        warmup, repeats = 1, 9
    if device.type == "cuda" and not args.quick:
        # The shapes the targets name (S 32k-76k, H 24-40, P 4-8, S % P != 0), in the models' dtype.
        steps = [(1, 32761, 24, D, 8), (1, 75601, 40, D, 8), (1, 32761, 40, D, 4), (2, 32761, 24, D, 8)]
    step_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    impls = our_impls(device)
    compiled = None if (args.quick or args.no_compile) else make_compiled()
    env = H.environment()
    print(f"bench_pack on {env['device']}, {env['threads']} threads, torch {env['torch']}; ours: {', '.join(impls)}")
    flush = None if args.warm_cache else H.cache_flusher(device)
    print(f"cache: {'warm (as the previous call left it)' if flush is None else 'evicted before every timed call'}")
    rows = []
    for B, S, Hh, Dd, P in cases:
        rows += bench_case(B, S, Hh, Dd, P, device, dtype, impls, compiled, warmup, repeats, flush)
        print(f"  done B={B} S={S} H={Hh} P={P}", flush=True)
    step_rows = [bench_step(*c, device, warmup, max(3, repeats // 2), step_dtype) for c in steps]
    csv_path = H.write_csv(rows + step_rows, args.name)
    for r in rows:
        r["case"] = f"{r['op']} B{r['B']} S{r['S']} H{r['H']} P{r['P']}"
    png = H.plot_bars(rows, "case", [f"{i}_ms" for i in impls] + ["eager_ms"] + (["compiled_ms"] if compiled else []),
                      "ms (lower is better)", args.name)  # fmt: skip
    cols = ["op", "path", "B", "S", "H", "P", "eager_passes", "MB_moved", "copy_GBps", "stream_copy_GBps", "eager_ms"]
    cols += [f"{i}_ms" for i in impls] + (["compiled_ms"] if compiled else []) + [f"{impls[0]}_GBps", "pct_of_copy"]
    cols += [f"{i}_vs_eager" for i in impls] + ["speedup_vs_eager", "target", "target_met"]
    if device.type == "cuda":
        cols += ["eager_host_us"] + [f"{i}_host_us" for i in impls]
    print(f"\nCSV: {csv_path}" + (f"  PNG: {png}" if png else ""))
    if any("compile_error" in r for r in rows):
        print("torch.compile errors:", {r["compile_error"] for r in rows if "compile_error" in r})
    H.print_table(step_rows, ["op", "dtype", "B", "S", "H", "P", "ours_kernel", "peers_kernel", "ours_ms", "peers_ms",
                              "speedup_vs_peers"], "\nUlysses step")  # fmt: skip
    H.print_table(rows, cols, "\npack/unpack (bf16, D=128)")
    bad = [r for r in rows if r["path"] == "op" and not math.isfinite(r["speedup_vs_eager"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
