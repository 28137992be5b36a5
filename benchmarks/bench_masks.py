"""The cost of an attention mask under Ulysses and Ring (issue 15), on gloo ranks on the CPU.

Per backend (ulysses on (P, 1), ring on (1, P)) one ``sp_kernels.attention`` call over a sharded
sequence, timed for three masks given as ``key_padding_mask`` [B, S] in the full frame:

* ``none``: no mask (the maskless fast path);
* ``end-cut``: every sample's keys cut at its end (sample b keeps S - b*S/8): turned into per-sample key
  lengths, so the maskless kernels run on each sample's valid prefix;
* ``holes``: ~10% of the keys of every sample excluded at random: the masked kernel (cpu_flash with
  an additive mask on CPU).

Times are the slowest rank's, the minimum over interleaved repeats (after warm-up), each call
preceded by a barrier. The table gives the ratios to ``none`` side by side. Output: the table, and
<out>/bench_masks.csv (default out: benchmarks/out/).

    python benchmarks/bench_masks.py            # B=2 S=4096 H=8 D=64 fp32, 2 ranks
    python benchmarks/bench_masks.py --quick    # tiny shapes (smoke test)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _harness import environment, print_table, write_csv  # noqa: E402

MASKS = ("none", "end-cut", "holes")
BACKENDS = ("ulysses", "ring")


def make_mask(kind: str, B: int, S: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "end-cut":
        keep = torch.zeros(B, S, dtype=torch.bool)
        for b in range(B):
            keep[b, : S - b * S // 8] = True
        return keep
    keep = torch.rand(B, S, generator=torch.Generator().manual_seed(3)) >= 0.1
    keep[:, 0] = True
    return keep


def _rank_bench(P: int, B: int, S: int, H: int, D: int, warmup: int, repeats: int) -> dict:
    """Rank side: {(backend, mask): seconds} (this rank's minimum)."""
    import torch.distributed as dist

    from sp_kernels.attn import attention
    from sp_kernels.distributed.parallel_state import SequenceParallelConfig, init_sequence_parallel
    from sp_kernels.plan.context import sp_forward_context

    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, S, H, D, generator=gen) for _ in range(3))
    n = S // P
    lq, lk, lv = (t[:, rank * n : (rank + 1) * n].contiguous() for t in (q, k, v))
    out: dict = {}
    for backend in BACKENDS:
        U, R = (P, 1) if backend == "ulysses" else (1, P)
        state = init_sequence_parallel(SequenceParallelConfig(ulysses_degree=U, ring_degree=R))

        def call(mask: torch.Tensor | None, state=state, backend=backend) -> None:
            with sp_forward_context(state) as ctx, torch.no_grad():
                ctx.sharded = True
                attention(lq, lk, lv, backend=backend, key_padding_mask=mask)

        masks = {kind: make_mask(kind, B, S) for kind in MASKS}
        for _ in range(warmup):
            for m in masks.values():
                call(m)
        best = {kind: float("inf") for kind in MASKS}
        for _ in range(repeats):  # interleaved: drift in machine load hits every mask alike
            for kind, m in masks.items():
                dist.barrier()
                t0 = time.perf_counter()
                call(m)
                best[kind] = min(best[kind], time.perf_counter() - t0)
        for kind in MASKS:
            out[(backend, kind)] = best[kind]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (smoke test)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args(argv)
    if a.quick:
        a.seq, a.heads, a.head_dim, a.repeats, a.warmup = 64, 2, 16, 2, 1
    from sp_kernels.testing.launch import RankPool

    env = environment()
    print(f"# {env['device']}, torch {env['torch']}, {a.ranks} gloo ranks, B={a.batch} S={a.seq} H={a.heads} "
          f"D={a.head_dim} fp32", flush=True)
    with RankPool(a.ranks, timeout=600.0) as pool:
        res = pool.run(_rank_bench, a.ranks, a.batch, a.seq, a.heads, a.head_dim, a.warmup, a.repeats)
    rows = []
    for backend in BACKENDS:
        t = {kind: max(r[(backend, kind)] for r in res) for kind in MASKS}  # the slowest rank sets the time
        row = {"backend": backend, "B": a.batch, "S": a.seq, "H": a.heads, "D": a.head_dim, "P": a.ranks}
        for kind in MASKS:
            row[f"{kind} ms"] = t[kind] * 1e3
        for kind in MASKS[1:]:
            row[f"{kind} / none"] = t[kind] / t["none"]
        rows.append(row)
    cols = ["backend", "B", "S", "P"] + [f"{k} ms" for k in MASKS] + [f"{k} / none" for k in MASKS[1:]]
    print_table(rows, cols, title="mask cost per attention call (slowest rank, min over repeats)")
    if not a.quick:
        print(f"csv: {write_csv(rows, 'bench_masks')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
