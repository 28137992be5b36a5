"""``python -m sp_kernels.testing.demo``: run a small model under every SP backend and compare with one process.

For each backend (ulysses, ring, usp when the world size factors, auto; fused_ring too for the
diffusers models) and each shape (one of them with a token count no SP size divides), the model runs
on N ranks with sequence parallelism and the same model runs on one process. The table reports the
largest |SP - single| difference and the time per forward. Ranks are local processes: gloo on CPU,
or NCCL when there are at least N GPUs (one GPU per rank).

``--model dit`` (default) is sp_kernels' own small DiT under ``apply_sequence_parallel``;
``--model flux|flux2|qwen|wan|skyreels|ltx|hunyuan`` (``sp_kernels.testing.models.diffusers_tiny.FAMILIES``)
is the tiny random-weight diffusers transformer of that family (needs diffusers) under
``sp_kernels.integrations.diffusers.enable_sequence_parallel``, compared with the same model run by
diffusers' own attention on one process.

Tolerance of --check: float32 1e-4 and float64 1e-9 absolute; float16/bfloat16 compare both runs
with a float64 run of the same model: the SP error may be at most 4x the single-process error
(rounding differs between the two, so a fixed absolute bound would be either loose or flaky).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .launch import RankPool
from .models.diffusers_tiny import FAMILIES
from .models.dit import DiT, DiTConfig

TOKEN_SHAPES = "tokens"
ABS_TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
LOW_PRECISION_FACTOR = 4.0
MODELS = ("dit", *FAMILIES)
DIT_BACKENDS = ["ulysses", "ring", "usp", "auto"]
DIFFUSERS_BACKENDS = ["ulysses", "ring", "usp", "fused_ring", "auto"]
TEXT_TOKENS = 7  # prompt tokens of the diffusers models: replicated, any length works


@dataclass(frozen=True)
class Shape:
    """A latent (channels-first video) shape, or a token count when ``tokens`` is set."""

    batch: int
    frames: int = 0
    height: int = 0
    width: int = 0
    tokens: int = 0

    def label(self, cfg: DiTConfig | None = None) -> str:
        if self.tokens:
            return f"B{self.batch} tok{self.tokens}"
        return f"B{self.batch} {self.frames}x{self.height}x{self.width}"

    def num_tokens(self, cfg: DiTConfig | None = None) -> int:
        if self.tokens:
            return self.tokens
        pt, ph, pw = cfg.patch_size
        return (self.frames // pt) * (self.height // ph) * (self.width // pw)


def build_model(cfg: DiTConfig, seed: int, dtype: torch.dtype, device: torch.device) -> DiT:
    torch.manual_seed(seed)
    return DiT(cfg).to(device=device, dtype=dtype).eval()


def make_inputs(shape: Shape, cfg: DiTConfig, seed: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator().manual_seed(seed + 1)
    if shape.tokens:
        latent = torch.randn(shape.batch, shape.tokens, cfg.in_channels, generator=gen)
    else:
        latent = torch.randn(shape.batch, cfg.in_channels, shape.frames, shape.height, shape.width, generator=gen)
    timestep = torch.rand(shape.batch, generator=gen) * 1000
    text = torch.randn(shape.batch, 8, cfg.text_dim, generator=gen)
    return latent.to(device, dtype), timestep.to(device), text.to(device, dtype)


@dataclass(frozen=True)
class Workload:
    """What the demo runs: the model (``"dit"`` with its config, or a diffusers family), how to build
    it and its inputs, how to turn SP on and off, and how to read its output. Picklable: it travels to
    the ranks inside each run's spec."""

    model: str
    dit: dict[str, Any] = field(default_factory=dict)  # DiTConfig fields, for "dit"

    @property
    def is_dit(self) -> bool:
        return self.model == "dit"

    def describe(self) -> str:
        if self.is_dit:
            return f"DiT {self.dit}"
        fam = FAMILIES[self.model]
        return (f"diffusers {fam.class_name} (tiny random-weight config, {TEXT_TOKENS} text tokens) via "
                "enable_sequence_parallel; single process: diffusers' own attention")

    def dit_config(self) -> DiTConfig:
        return DiTConfig(**self.dit)

    def label(self, shape: Shape) -> str:
        return shape.label(self.dit_config() if self.is_dit else None)

    def num_tokens(self, shape: Shape) -> int:
        return shape.num_tokens(self.dit_config() if self.is_dit else None)

    def build(self, seed: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        if self.is_dit:
            return build_model(self.dit_config(), seed, dtype, device)
        from .models import diffusers_tiny

        return diffusers_tiny.build(self.model, seed, dtype).to(device)

    def inputs(self, shape: Shape, seed: int, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
        """(args, kwargs) of one forward."""
        if self.is_dit:
            return make_inputs(shape, self.dit_config(), seed, dtype, device), {}
        from .models import diffusers_tiny

        kwargs = diffusers_tiny.make_inputs(self.model, shape.tokens, TEXT_TOKENS, seed + 1, dtype)
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return (), {**kwargs, "return_dict": False}

    def forward(self, model: torch.nn.Module, inputs: tuple[tuple, dict]) -> torch.Tensor:
        out = model(*inputs[0], **inputs[1])
        return out if self.is_dit else out[0]

    def enable(self, model: torch.nn.Module, config: Any) -> None:
        if self.is_dit:
            from .. import apply_sequence_parallel

            apply_sequence_parallel(model, config)
        else:
            from ..integrations.diffusers import enable_sequence_parallel

            enable_sequence_parallel(model, config)

    def disable(self, model: torch.nn.Module) -> None:
        if self.is_dit:
            from .. import remove_sequence_parallel

            remove_sequence_parallel(model)
        else:
            from ..integrations.diffusers import disable_sequence_parallel

            disable_sequence_parallel(model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_forward(
    work: Workload, model: torch.nn.Module, inputs: tuple[tuple, dict], iters: int, device: torch.device, barrier: bool
) -> tuple[torch.Tensor, float]:
    """(output, median milliseconds per forward after one warm-up)."""
    with torch.inference_mode():
        out = work.forward(model, inputs)
        times = []
        for _ in range(iters):
            if barrier:
                dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            out = work.forward(model, inputs)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return out, sorted(times)[len(times) // 2]


def _device(kind: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")


class _OncePerProcess(logging.Filter):
    """Lets each distinct message through once in this process (every run applies SP anew, so the hooks'
    "warned once" would otherwise repeat once per run)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def _quiet_logs(diffusers_too: bool) -> None:
    sp_logger = logging.getLogger("sp_kernels")
    if not any(isinstance(f, _OncePerProcess) for f in sp_logger.filters):
        sp_logger.addFilter(_OncePerProcess())
    if diffusers_too:
        logging.getLogger("diffusers").setLevel(logging.ERROR)


def run_on_rank(spec: dict) -> dict:
    """One (backend, degrees, shape) run on this rank; rank 0 returns the gathered output."""
    from ..distributed.parallel_state import SequenceParallelConfig

    _quiet_logs(spec["quiet"])
    work: Workload = spec["work"]
    dtype = getattr(torch, spec["dtype"])
    device = _device(spec["device"])
    model = work.build(spec["seed"], dtype, device)
    u, r = spec["degrees"]
    config = SequenceParallelConfig(ulysses_degree=u, ring_degree=r, attention_backend=spec["backend"])
    work.enable(model, config)
    try:
        inputs = work.inputs(Shape(**spec["shape"]), spec["seed"], dtype, device)
        out, ms = timed_forward(work, model, inputs, spec["iters"], device, barrier=True)
    finally:
        work.disable(model)
    return {"out": out.cpu() if dist.get_rank() == 0 else None, "ms": ms, "resolved": config.resolved_backend()}


def _rank_fn():
    # Under `python -m` this module is __main__; ranks must import the function by its package name.
    if __name__ == "__main__":
        import importlib

        return importlib.import_module("sp_kernels.testing.demo").run_on_rank
    return run_on_rank


def backend_rows(world: int, backends: list[str]) -> list[tuple[str, tuple[int, int]]]:
    """(backend, (ulysses_degree, ring_degree)) rows for a world size."""
    usp = [(d, world // d) for d in range(2, world) if world % d == 0 and d >= world // d]
    rows = []
    for b in backends:
        if b == "ulysses":
            rows.append((b, (world, 1)))
        elif b in ("ring", "fused_ring"):
            rows.append((b, (1, world)))
        elif b == "usp":
            if usp:
                rows.append((b, usp[0]))
        elif b == "auto":
            rows.append((b, usp[0] if usp else (world, 1)))
        else:
            raise ValueError(f"unknown backend {b!r}; expected ulysses, ring, usp, fused_ring or auto")
    return rows


def _shapes(args: argparse.Namespace, world: int) -> list[Shape]:
    if args.seq_len:
        return [Shape(batch=args.batch, tokens=n) for n in args.seq_len]
    if args.model != "dit":
        # 12*world tokens: divisible by every SP size of this world; 12*world + 1: by none above 1.
        return [Shape(batch=1, tokens=12 * world), Shape(batch=1, tokens=12 * world + 1)]
    if args.frames or args.height or args.width:
        return [Shape(batch=args.batch, frames=args.frames or 1, height=args.height or 16, width=args.width or 16)]
    # The second latent gives 3*5*7 = 105 tokens and the token shape 257: no SP size above 1 divides them.
    return [
        Shape(batch=args.batch, frames=2, height=16, width=16),
        Shape(batch=args.batch, frames=3, height=10, width=14),
        Shape(batch=args.batch, tokens=257),
    ]


def _tolerance(dtype: torch.dtype, single_err64: float | None) -> float:
    if dtype in ABS_TOL:
        return ABS_TOL[dtype]
    assert single_err64 is not None
    return LOW_PRECISION_FACTOR * single_err64


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sp_kernels.testing.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="dit",
                   help="dit: sp_kernels' small DiT; the others: tiny diffusers models (needs diffusers)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", choices=["all", "ulysses", "ring", "usp", "fused_ring", "auto"], default="all",
                   help="all: ulysses, ring, usp, auto for dit; fused_ring too for the diffusers models")
    p.add_argument("--seq-len", type=int, action="append", help="token-sequence input of this length (repeatable)")
    p.add_argument("--frames", type=int, default=0, help="dit only")
    p.add_argument("--height", type=int, default=0, help="dit only")
    p.add_argument("--width", type=int, default=0, help="dit only")
    p.add_argument("--batch", type=int, default=1, help="dit only (the diffusers inputs have batch 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32")
    p.add_argument("--heads", type=int, default=4, help="dit only")
    p.add_argument("--kv-heads", type=int, default=None, help="dit only")
    p.add_argument("--head-dim", type=int, default=32, help="dit only")
    p.add_argument("--layers", type=int, default=2, help="dit only")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--check", action="store_true", help="exit 1 if any error exceeds the dtype's tolerance")
    return p


def _single_runs(work: Workload, shapes: list[Shape], args: argparse.Namespace, dtype: torch.dtype,
                 device: torch.device) -> dict[Shape, tuple]:
    """Single-process references (and float64 ones for the low-precision tolerance), per shape."""
    singles = {}
    for shape in shapes:
        model = work.build(args.seed, dtype, device)
        out, ms = timed_forward(work, model, work.inputs(shape, args.seed, dtype, device), args.iters, device,
                                barrier=False)
        err64 = ref64 = None
        if dtype not in ABS_TOL:
            model64 = work.build(args.seed, torch.float64, device)
            with torch.inference_mode():
                ref64 = work.forward(model64, work.inputs(shape, args.seed, torch.float64, device)).cpu()
            err64 = (out.cpu().double() - ref64).abs().max().item()
        singles[shape] = (out.cpu(), ms, err64, ref64)
    return singles


def main(argv: list[str] | None = None, pool: RankPool | None = None) -> int:
    """The demo; ``pool``: run on this RankPool (its world size) instead of starting one (tests)."""
    p = _parser()
    args = p.parse_args(argv)

    world = pool.world_size if pool is not None else args.world_size
    if args.model != "dit":
        if importlib.util.find_spec("diffusers") is None:
            p.error(f"--model {args.model} needs diffusers (pip install diffusers; scripts/setup.sh installs it); "
                    "--model dit runs without it")
        if args.batch != 1:
            p.error(f"--model {args.model}: the tiny diffusers inputs have batch 1 (got --batch {args.batch})")
        if args.frames or args.height or args.width:
            p.error(f"--model {args.model}: --frames/--height/--width are for the DiT; give token counts with --seq-len")
    use_cuda = args.device == "cuda" or (
        args.device == "auto" and pool is None and torch.cuda.is_available() and torch.cuda.device_count() >= world
    )
    if use_cuda and torch.cuda.device_count() < world:
        p.error(f"--device cuda needs {world} GPUs (one per rank: NCCL refuses two ranks on one GPU), found "
                f"{torch.cuda.device_count()}")
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    if args.model == "dit":
        cfg = DiTConfig(num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                        num_layers=args.layers)
        work = Workload("dit", asdict(cfg))
    else:
        work = Workload(args.model)
    default_backends = DIT_BACKENDS if work.is_dit else DIFFUSERS_BACKENDS
    rows = backend_rows(world, default_backends if args.backend == "all" else [args.backend])
    shapes = _shapes(args, world)
    if not rows:
        p.error(f"backend {args.backend!r} does not fit world size {world} (usp needs a world size with two factors > 1)")

    _quiet_logs(not work.is_dit)
    print(f"sp_kernels demo: {work.describe()}", flush=True)
    print(f"world size {world} ({'NCCL on GPUs' if use_cuda else 'gloo on CPU, 1 thread per rank'}), "
          f"dtype {args.dtype}, single-process runs use {torch.get_num_threads()} thread(s)", flush=True)

    singles = _single_runs(work, shapes, args, dtype, device)
    results = []
    total = len(rows) * len(shapes)
    owned = pool is None
    if owned:
        pool = RankPool(world, backend="nccl" if use_cuda else "gloo", timeout=600.0)
    try:
        i = 0
        for backend, degrees in rows:
            for shape in shapes:
                i += 1
                label, tokens = work.label(shape), work.num_tokens(shape)
                print(f"[{i}/{total}] {backend} U{degrees[0]}xR{degrees[1]} {label} ({tokens} tokens) ...", flush=True)
                spec = {"work": work, "dtype": args.dtype, "device": "cuda" if use_cuda else "cpu",
                        "seed": args.seed, "backend": backend, "degrees": degrees, "shape": asdict(shape),
                        "iters": args.iters, "quiet": not work.is_dit}
                res = pool.run(_rank_fn(), spec)
                single, single_ms, err64, ref64 = singles[shape]
                sp_out = res[0]["out"]
                err = (sp_out.double() - single.double()).abs().max().item()
                tol = _tolerance(dtype, err64)
                measured = err if ref64 is None else (sp_out.double() - ref64).abs().max().item()
                ok = math.isfinite(measured) and measured <= tol
                ms = max(r["ms"] for r in res)
                results.append((backend, res[0]["resolved"], degrees, label, tokens, err, measured, tol,
                                ms, single_ms, ok))
                print(f"    max |SP - single| = {err:.3g}, {ms:.1f} ms/forward ({'ok' if ok else 'FAIL'})", flush=True)
    finally:
        if owned:
            pool.close()

    print()
    head = f"{'backend':<16}{'world':>6}  {'shape':<18}{'tokens':>7}  {'dtype':<9}{'max|SP-single|':>15}"
    head += f"{'checked err':>13}{'tolerance':>11}{'SP ms':>9}{'1-proc ms':>11}  status"
    print(f"model: {args.model}")
    print(head)
    print("-" * len(head))
    for backend, resolved, (u, r), label, tokens, err, measured, tol, ms, single_ms, ok in results:
        name = backend if backend == resolved else f"{backend}->{resolved}"
        print(f"{name:<16}{u * r:>6}  {label:<18}{tokens:>7}  {args.dtype:<9}{err:>15.3g}{measured:>13.3g}{tol:>11.3g}"
              f"{ms:>9.1f}{single_ms:>11.1f}  {'ok' if ok else 'FAIL'}")
    if dtype not in ABS_TOL:
        print(f"\n{args.dtype}: 'checked err' is |SP - float64 model|, allowed up to {LOW_PRECISION_FACTOR:g}x the "
              "single-process |single - float64 model|.")
    failed = [r for r in results if not r[-1]]
    if args.check and failed:
        print(f"\n{len(failed)} run(s) exceed the tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
