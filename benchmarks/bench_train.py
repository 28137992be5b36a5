"""Training cost under SP (issue 16), on gloo ranks on the CPU.

1. **One attention layer, forward + backward**, per backend (ulysses on (P, 1), ring and fused_ring on
   (1, P), usp): ``attention()`` over a sharded sequence with gradients of q, k, v, vs the same layer on one
   process over the whole sequence (each rank times it alone, 1 thread, like every rank of the SP run).
   Columns: forward and forward+backward ms, and "SP / single" (ideal: 1/P of the compute plus the
   communication); "bwd / fwd" shows what the backward adds (FlashAttention's is about 2-2.5x).
2. **The demo DiT, one training step** (forward, loss, backward) under SP: eager vs
   ``torch.compile(fullgraph=True)`` with inductor (compile time excluded: timed after warm-up), and
   vs the eager model on one process; and one inference forward (no grad), eager vs compiled. The
   compiled backward recomputes each attention call (docs/attention.md, "torch.compile"), which the
   training ratio includes.

Times are the slowest rank's, the minimum over interleaved repeats after warm-up, each call preceded by
a barrier. Output: the tables, and <out>/bench_train.csv (default out: benchmarks/out/).

    python benchmarks/bench_train.py            # layer: B=1 S=4096 H=8 D=64 fp32; model: demo DiT, 2 ranks
    python benchmarks/bench_train.py --quick    # tiny shapes (smoke test)
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

BACKENDS = ("ulysses", "ring", "fused_ring", "usp")


def _timed(fns: dict, warmup: int, repeats: int) -> dict:
    """{name: this rank's minimum seconds}, the calls interleaved and each preceded by a barrier."""
    import torch.distributed as dist

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _layer_bench(P: int, B: int, S: int, H: int, D: int, warmup: int, repeats: int) -> dict:
    """Rank side: {(backend, "fwd" | "fwd+bwd"): seconds}; backend "single" is the one-process layer."""
    import torch.distributed as dist

    from sp_kernels.attn import attention
    from sp_kernels.distributed.parallel_state import SequenceParallelConfig, init_sequence_parallel
    from sp_kernels.plan.context import sp_forward_context

    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, S, H, D, generator=gen) for _ in range(3))
    dout = torch.randn(B, S, H, D, generator=gen)
    n = S // P
    local = [t[:, rank * n : (rank + 1) * n].contiguous() for t in (q, k, v, dout)]
    fns = {}

    def make(tensors, dout, backend, state, grad):
        def fn():
            leaves = [t.detach().requires_grad_(grad) for t in tensors]
            if state is None:
                out = attention(*leaves, backend="local")
            else:
                with sp_forward_context(state) as ctx:
                    ctx.sharded = True
                    out = attention(*leaves, backend=backend)
            if grad:
                out.backward(dout)
        return fn

    for backend in BACKENDS:
        U, R = {"ulysses": (P, 1), "usp": (P // 2, 2) if P % 2 == 0 and P > 2 else (P, 1)}.get(backend, (1, P))
        state = init_sequence_parallel(SequenceParallelConfig(ulysses_degree=U, ring_degree=R))
        for grad in (False, True):
            fns[(backend, "fwd+bwd" if grad else "fwd")] = make(local[:3], local[3], backend, state, grad)
    out = _timed(fns, warmup, repeats)
    for grad in (False, True):  # each rank alone, the whole sequence
        fn = make((q, k, v), dout, "local", None, grad)
        for _ in range(warmup):
            fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[("single", "fwd+bwd" if grad else "fwd")] = best
    return out


def _model_bench(backend: str, tokens: int, layers: int, warmup: int, repeats: int, compiler: str) -> dict:
    """Rank side: seconds of one training step of the demo DiT: SP eager, SP compiled, one process eager."""
    import torch.distributed as dist

    from sp_kernels import SequenceParallelConfig, apply_sequence_parallel, remove_sequence_parallel
    from sp_kernels.testing.demo import Shape, build_model, make_inputs
    from sp_kernels.testing.models.dit import DiTConfig
    from tests.attention_cases import sp_degrees

    cfg = DiTConfig(num_layers=layers)
    inputs = make_inputs(Shape(batch=1, tokens=tokens), cfg, 5, torch.float32, torch.device("cpu"))
    single = build_model(cfg, 3, torch.float32, torch.device("cpu"))
    model = build_model(cfg, 3, torch.float32, torch.device("cpu"))
    U, R = sp_degrees(backend, dist.get_world_size())
    apply_sequence_parallel(model, SequenceParallelConfig(U, R, attention_backend=backend))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)

    def step(m):
        def fn():
            m.zero_grad()
            m(*inputs).square().mean().backward()
        return fn

    def infer(m):
        def fn():
            with torch.no_grad():
                m(*inputs)
        return fn

    try:
        t0 = time.perf_counter()
        step(compiled)()
        compile_s = time.perf_counter() - t0
        with torch.no_grad():
            compiled(*inputs)  # the inference graph compiles apart
        out = _timed({"sp eager": step(model), "sp compiled": step(compiled), "sp eager infer": infer(model),
                      "sp compiled infer": infer(compiled)}, warmup, repeats)
        best = float("inf")
        fn = step(single)
        fn()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out["single eager"] = best
        out["first compiled step"] = compile_s
        return out
    finally:
        remove_sequence_parallel(model)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (smoke test)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--model-tokens", type=int, default=4096)
    p.add_argument("--model-layers", type=int, default=4)
    p.add_argument("--model-backends", default="ulysses,fused_ring")
    p.add_argument("--compiler", default="inductor", help="torch.compile backend of the model table")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args(argv)
    if a.quick:
        a.seq, a.heads, a.head_dim, a.repeats, a.warmup = 64, 2, 16, 2, 1
        a.model_tokens, a.model_layers, a.model_backends, a.compiler = 32, 1, "ulysses", "aot_eager"
    from sp_kernels.testing.launch import RankPool

    env = environment()
    print(f"# {env['device']}, torch {env['torch']}, {a.ranks} gloo ranks (1 thread each), fp32", flush=True)
    rows = []
    with RankPool(a.ranks, timeout=900.0) as pool:
        res = pool.run(_layer_bench, a.ranks, a.batch, a.seq, a.heads, a.head_dim, a.warmup, a.repeats)
        t = {key: max(r[key] for r in res) for key in res[0]}  # the slowest rank sets the time
        single = t[("single", "fwd+bwd")]
        for backend in ("single", *BACKENDS):
            fwd, both = t[(backend, "fwd")], t[(backend, "fwd+bwd")]
            rows.append({"table": "layer", "what": backend, "B": a.batch, "S": a.seq, "H": a.heads, "D": a.head_dim,
                         "P": a.ranks, "fwd ms": fwd * 1e3, "fwd+bwd ms": both * 1e3, "bwd / fwd": (both - fwd) / fwd,
                         "SP / single": both / single})
        print_table(rows, ["what", "S", "P", "fwd ms", "fwd+bwd ms", "bwd / fwd", "SP / single"],
                    title=f"one attention layer, forward + backward (B={a.batch} H={a.heads} D={a.head_dim})")
        model_rows = []
        for backend in a.model_backends.split(","):
            res = pool.run(_model_bench, backend, a.model_tokens, a.model_layers, a.warmup, a.repeats, a.compiler)
            t = {key: max(r[key] for r in res) for key in res[0]}
            model_rows.append({"table": "model", "what": backend, "S": a.model_tokens, "P": a.ranks,
                               "layers": a.model_layers, "single eager ms": t["single eager"] * 1e3,
                               "sp eager ms": t["sp eager"] * 1e3, "sp compiled ms": t["sp compiled"] * 1e3,
                               "compiled / eager": t["sp compiled"] / t["sp eager"],
                               "infer eager ms": t["sp eager infer"] * 1e3,
                               "infer compiled ms": t["sp compiled infer"] * 1e3,
                               "infer compiled / eager": t["sp compiled infer"] / t["sp eager infer"],
                               "first compiled step s": t["first compiled step"]})
        print_table(model_rows, ["what", "S", "P", "layers", "single eager ms", "sp eager ms", "sp compiled ms",
                                 "compiled / eager", "infer eager ms", "infer compiled ms", "infer compiled / eager",
                                 "first compiled step s"],
                    title=f"demo DiT training step (forward, loss, backward): eager vs torch.compile ({a.compiler})")
    if not a.quick:
        print(f"csv: {write_csv(rows + model_rows, 'bench_train')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
