"""What every example shares: arguments, torch.distributed from torchrun, the transformer, sequence
parallelism, a denoising loop (or a diffusers pipeline), timing and the optional check.

Each ``examples/<family>.py`` describes its model family with a ``Family`` (its diffusers classes,
how its transformer is called, random inputs for the plain loop) and calls ``main(FAMILY)``.

Two ways to denoise:

- no ``--pipeline``: a plain flow-matching Euler loop, ``x <- x + (sigma_next - sigma) * v(x, sigma)``
  from ``sigma = 1`` to ``0``, on random latents and random text embeddings. Weights come from
  ``--model-path`` (a diffusers checkpoint: the transformer only), else random init of the class's
  default (full-size) config, or of sp_kernels' tiny config with ``--tiny``. ``--check`` also runs
  the loop without SP on every rank (the single-process result) and compares.
- ``--pipeline`` with ``--model-path``: the diffusers pipeline from that checkpoint, called as usual
  with its transformer SP-enabled; a step callback times the steps. Every rank runs the text
  encoders and the VAE (replicated); only the transformer is sequence-parallel.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from sp_kernels import SequenceParallelConfig
from sp_kernels.distributed.parallel_state import BACKEND_NAMES
from sp_kernels.testing.models.diffusers_tiny import FAMILIES, factor_tokens

# dtype -> |SP - single| allowed by --check on the final latents. Low precision: rounding differs
# between the SP and the single-process runs and grows over the steps; relative to max |single|.
ABS_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
LOW_PRECISION_REL_TOL = 0.05


@dataclass(frozen=True)
class Geometry:
    """The latent of one plain-loop run, in tokens: ``frames x height x width`` after patchifying."""

    batch: int
    frames: int
    height: int
    width: int
    text_tokens: int

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width


def token_positions(geo: Geometry) -> torch.Tensor:
    """[H*W, 2] float (row, col) of each token of one frame, row-major: the image part of position ids."""
    rows, cols = torch.meshgrid(torch.arange(geo.height), torch.arange(geo.width), indexing="ij")
    return torch.stack([rows, cols], dim=-1).reshape(-1, 2).float()


@dataclass(frozen=True)
class Family:
    """One model family: ``tiny`` names its entry in ``sp_kernels.testing.models.diffusers_tiny``."""

    tiny: str
    pipeline: str  # diffusers pipeline class, for --pipeline
    timestep_scale: float  # the transformer's timestep = sigma * timestep_scale (1 or 1000)
    # (transformer config, geometry, CPU generator) -> forward kwargs; "hidden_states" is the initial latent
    inputs: Callable[[Any, Geometry, torch.Generator], dict[str, Any]]
    video: bool = False
    pipeline_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        return FAMILIES[self.tiny].class_name


def parse_args(family: Family, argv: list[str] | None = None) -> argparse.Namespace:
    script = os.path.basename(sys.argv[0]) or f"{family.tiny}.py"
    p = argparse.ArgumentParser(
        prog=f"torchrun --nproc_per_node N examples/{script}",
        description=f"{family.class_name} with sp_kernels sequence parallelism (enable_sequence_parallel).",
    )
    src = p.add_argument_group("model")
    src.add_argument("--model-path", help="local diffusers checkpoint folder (the pipeline's, or the transformer's)")
    src.add_argument("--tiny", action="store_true", help="sp_kernels' tiny random-weight config (CPU-sized)")
    src.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config entry of the random init, e.g. num_layers=2 (repeatable)")
    src.add_argument("--pipeline", action="store_true", help="run the diffusers pipeline of --model-path")
    src.add_argument("--prompt", default="a red fox in the snow, photograph", help="--pipeline only")
    src.add_argument("--height", type=int, help="--pipeline: image height in pixels (default: the pipeline's)")
    src.add_argument("--width", type=int, help="--pipeline: image width in pixels (default: the pipeline's)")
    src.add_argument("--num-frames", type=int, help="--pipeline, video models: frames (default: the pipeline's)")
    src.add_argument("--output", help="--pipeline: rank 0 saves the result here (.png for images)")
    sp = p.add_argument_group("sequence parallelism")
    sp.add_argument("--backend", choices=[b for b in BACKEND_NAMES if b != "local"], default="auto")
    sp.add_argument("--ulysses", type=int, help="Ulysses degree (default: world size / ring degree)")
    sp.add_argument("--ring", type=int, help="ring degree (default: 1, or world size / Ulysses degree)")
    run = p.add_argument_group("run")
    run.add_argument("--steps", type=int, default=4)
    run.add_argument("--tokens", type=int, help="plain loop: latent tokens after patchifying (default 35 with "
                     "--tiny, which no SP size above 1 divides; 4096 otherwise)")
    run.add_argument("--latent-frames", type=int, default=1, help="plain loop, video models: latent frames")
    run.add_argument("--text-tokens", type=int, help="plain loop: prompt tokens (default 7 with --tiny, else 256)")
    run.add_argument("--batch", type=int, default=1)
    run.add_argument("--dtype", choices=["bfloat16", "float16", "float32", "float64"],
                     help="default: bfloat16 on GPU, float32 with --cpu")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--cpu", action="store_true", help="gloo on CPU instead of NCCL with one GPU per rank")
    run.add_argument("--check", action="store_true",
                     help="plain loop: also run without SP on every rank and compare (exit 1 over tolerance)")
    args = p.parse_args(argv)

    if args.pipeline and not args.model_path:
        p.error("--pipeline needs --model-path (a local diffusers checkpoint)")
    if args.pipeline and args.check:
        p.error("--check compares the plain loop; it is not available with --pipeline")
    if args.model_path and (args.tiny or args.config):
        p.error("--model-path loads the checkpoint's config; --tiny and --config are for random init")
    if not family.video and args.latent_frames != 1:
        p.error(f"{family.class_name} is an image model: --latent-frames must be 1")
    args.tokens = args.tokens or (35 if args.tiny else 4096)
    args.text_tokens = args.text_tokens or (7 if args.tiny else 256)
    if args.tokens % args.latent_frames:
        p.error(f"--tokens {args.tokens} is not a multiple of --latent-frames {args.latent_frames}")
    args.dtype = getattr(torch, args.dtype or ("float32" if args.cpu else "bfloat16"))
    try:
        args.config = dict(_config_item(item) for item in args.config)
    except ValueError as e:
        p.error(str(e))
    return args


def _config_item(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--config takes KEY=VALUE, got {item!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def init_distributed(cpu: bool) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; a single process without it."""
    if "RANK" not in os.environ:  # plain `python examples/x.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ["LOCAL_RANK"])
    timeout = datetime.timedelta(minutes=10)
    if cpu:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: pass --cpu to run on CPU with gloo")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    return dist.get_rank(), dist.get_world_size(), device


def sp_config(args: argparse.Namespace, world: int) -> SequenceParallelConfig:
    u, r = args.ulysses, args.ring
    if u is None and r is None:  # the backend's own dimension takes the whole world
        u, r = (1, world) if args.backend in ("ring", "fused_ring") else (world, 1)
    elif u is None:
        u = world // r
    elif r is None:
        r = world // u
    if u * r != world:
        raise SystemExit(f"--ulysses {u} x --ring {r} = {u * r} must equal the world size {world}")
    try:
        return SequenceParallelConfig(ulysses_degree=u, ring_degree=r, attention_backend=args.backend)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def build_transformer(family: Family, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The transformer from --model-path, else random init (same weights on every rank: seeded)."""
    import diffusers

    cls = getattr(diffusers, family.class_name)
    if args.model_path:
        sub = "transformer" if os.path.isdir(os.path.join(args.model_path, "transformer")) else None
        model = cls.from_pretrained(args.model_path, subfolder=sub, torch_dtype=args.dtype)
        return model.to(device).eval()
    config = dict(FAMILIES[family.tiny].config) if args.tiny else {}
    config.update(args.config)
    torch.manual_seed(args.seed)
    with torch.device(device):  # a full-size model is initialised where it will run
        model = cls(**config)
    return model.to(args.dtype).eval()


def make_inputs(family: Family, model: torch.nn.Module, args: argparse.Namespace,
                device: torch.device) -> dict[str, Any]:
    """Random latents and text embeddings for the plain loop: identical on every rank (seeded, on CPU)."""
    h, w = factor_tokens(args.tokens // args.latent_frames, 2)
    geo = Geometry(args.batch, args.latent_frames, h, w, args.text_tokens)
    kwargs = family.inputs(model.config, geo, torch.Generator().manual_seed(args.seed + 1))
    return {k: (v.to(device, args.dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor)
            else v for k, v in kwargs.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def euler_loop(family: Family, model: torch.nn.Module, inputs: dict[str, Any], steps: int,
               device: torch.device, barrier: bool) -> tuple[torch.Tensor, list[float]]:
    """Flow-matching Euler from sigma 1 to 0; (final latent, milliseconds per step)."""
    cond = dict(inputs)
    x = cond.pop("hidden_states")
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    times = []
    with torch.inference_mode():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((x.shape[0],), sigma * family.timestep_scale, device=device, dtype=x.dtype)
            if barrier:
                dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            v = model(hidden_states=x, timestep=t, **cond, return_dict=False)[0]
            x = x + (sigma_next - sigma) * v
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return x, times


def _slowest_rank(times: list[float], device: torch.device) -> list[float]:
    """Per step, the time of the slowest rank (a step ends when every rank has its shard)."""
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _report(rank: int, label: str, times: list[float]) -> None:
    if rank != 0 or not times:
        return
    steady = sorted(times[1:] or times)
    print(f"{label}: {len(times)} steps, " + ", ".join(f"{t:.1f}" for t in times) + " ms; "
          f"median {steady[len(steady) // 2]:.1f} ms/step (after the first)", flush=True)


def _check(rank: int, dtype: torch.dtype, sp: torch.Tensor, single: torch.Tensor) -> bool:
    err = (sp.double() - single.double()).abs().max().item()
    tol = ABS_TOL.get(dtype, LOW_PRECISION_REL_TOL * max(1.0, single.double().abs().max().item()))
    ok = math.isfinite(err) and err <= tol
    errs = torch.tensor([err if math.isfinite(err) else float("inf")], dtype=torch.float64, device=sp.device)
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    ok_all = torch.tensor([int(ok)], device=sp.device)
    dist.all_reduce(ok_all, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"check: max |SP - single process| over ranks = {errs.item():.3g} (tolerance {tol:.3g}, "
              f"{str(dtype).removeprefix('torch.')}): {'ok' if ok_all.item() else 'FAIL'}", flush=True)
    return bool(ok_all.item())


def run_pipeline(family: Family, args: argparse.Namespace, config: SequenceParallelConfig, rank: int,
                 device: torch.device) -> None:
    """The checkpoint's diffusers pipeline with its transformer SP-enabled; steps timed by a callback."""
    import diffusers

    from sp_kernels.integrations.diffusers import enable_sequence_parallel

    pipe = getattr(diffusers, family.pipeline).from_pretrained(args.model_path, torch_dtype=args.dtype).to(device)
    enable_sequence_parallel(pipe.transformer, config)
    starts: list[float] = []
    times: list[float] = []

    def first_forward(module, args_, kwargs_):  # the first step starts at the first transformer call
        if not starts:
            _sync(device)
            starts.append(time.perf_counter())

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        _sync(device)
        now = time.perf_counter()
        times.append((now - starts[-1]) * 1e3)
        starts.append(now)
        return callback_kwargs

    handle = pipe.transformer.register_forward_pre_hook(first_forward, with_kwargs=True)
    call = dict(family.pipeline_defaults)
    call.update({k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None})
    if family.video and args.num_frames is not None:
        call["num_frames"] = args.num_frames
    try:
        out = pipe(prompt=args.prompt, num_inference_steps=args.steps, callback_on_step_end=on_step_end,
                   generator=torch.Generator().manual_seed(args.seed), **call)
    finally:
        handle.remove()
    _report(rank, f"{family.pipeline} under SP", _slowest_rank(times, device))
    if args.output and rank == 0:
        result = out.frames[0] if family.video else out.images[0]
        if family.video:
            from diffusers.utils import export_to_video

            export_to_video(result, args.output)
        else:
            result.save(args.output)
        print(f"saved {args.output}", flush=True)


def main(family: Family, argv: list[str] | None = None) -> int:
    args = parse_args(family, argv)
    if importlib.util.find_spec("diffusers") is None:
        raise SystemExit("error: the examples need diffusers (pip install diffusers; scripts/setup.sh installs it)")
    from sp_kernels.integrations.diffusers import enable_sequence_parallel

    rank, world, device = init_distributed(args.cpu)
    if rank != 0:  # the same warnings on every rank: rank 0 says them
        logging.getLogger("sp_kernels").setLevel(logging.ERROR)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        config = sp_config(args, world)
        if rank == 0:
            source = args.model_path or ("tiny config" if args.tiny else "default (full-size) config") + ", random init"
            print(f"{family.class_name} ({source}) on {world} rank(s), {device.type}, "
                  f"{str(args.dtype).removeprefix('torch.')}; SP: ulysses {config.ulysses_degree} x ring "
                  f"{config.ring_degree}, backend {args.backend} -> {config.resolved_backend()}", flush=True)
        if args.pipeline:
            run_pipeline(family, args, config, rank, device)
            return 0

        model = build_transformer(family, args, device)
        inputs = make_inputs(family, model, args, device)
        if rank == 0:
            print(f"plain flow-matching Euler loop: batch {args.batch}, {args.tokens} latent tokens "
                  f"({args.latent_frames} frame(s)), {args.text_tokens} text tokens, {args.steps} steps", flush=True)
        single = None
        if args.check:
            single, single_times = euler_loop(family, model, inputs, args.steps, device, barrier=False)
            _report(rank, "single process (every rank, no SP)", _slowest_rank(single_times, device))
        enable_sequence_parallel(model, config)
        latents, times = euler_loop(family, model, inputs, args.steps, device, barrier=True)
        _report(rank, f"SP on {world} rank(s)", _slowest_rank(times, device))
        if single is not None and not _check(rank, args.dtype, latents, single):
            return 1
        return 0
    finally:
        dist.destroy_process_group()
