"""The DiT under apply_sequence_parallel against the same model on one process, and the demo CLI."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sp_kernels.testing.demo import Shape, backend_rows, build_model, make_inputs
from sp_kernels.testing.models.dit import DiT, DiTConfig, RotaryEmbedding, apply_rope
from tests.poison import poisoned

ROOT = Path(__file__).resolve().parents[1]


def _model_cases(cases: list[dict]) -> list[dict]:
    """Rank side: for each case run the model with and without SP; count the collectives attention used."""
    import sp_kernels.attn.ulysses as uly
    from sp_kernels import apply_sequence_parallel, remove_sequence_parallel
    from sp_kernels.distributed.comm import TorchRingComm
    from sp_kernels.distributed.parallel_state import SequenceParallelConfig

    counts = {"a2a": 0, "ring": 0}
    real_a2a, real_post = uly.all_to_all, TorchRingComm.post

    def a2a(send, group, out=None):
        counts["a2a"] += 1
        return real_a2a(send, group, out=out)

    def post(self, send, recv):
        counts["ring"] += 1
        return real_post(self, send, recv)

    uly.all_to_all, TorchRingComm.post = a2a, post
    results = []
    try:
        with poisoned():
            for case in cases:
                cfg = DiTConfig(**case["model"])
                dtype = getattr(torch, case["dtype"])
                model = build_model(cfg, 3, dtype, torch.device("cpu"))
                inputs = make_inputs(Shape(**case["shape"]), cfg, 3, dtype, torch.device("cpu"))
                with torch.inference_mode():
                    single = model(*inputs)
                    u, r = case["degrees"]
                    apply_sequence_parallel(model, SequenceParallelConfig(u, r, attention_backend=case["backend"]))
                    counts.update(a2a=0, ring=0)
                    try:
                        sp = model(*inputs)
                    finally:
                        remove_sequence_parallel(model)
                results.append({"err": (sp.double() - single.double()).abs().max().item(), "finite": bool(sp.isfinite().all()),
                                "shape_ok": sp.shape == single.shape, **counts})
    finally:
        uly.all_to_all, TorchRingComm.post = real_a2a, real_post
    return results


@functools.cache
def model_cases(P: int) -> list[dict]:
    shapes = [Shape(batch=1, frames=3, height=10, width=14), Shape(batch=2, tokens=4 * P + 1)]
    models = [dict(num_layers=2), dict(num_layers=1, num_heads=6, num_kv_heads=2, head_dim=16)]
    cases = []
    for backend, degrees in backend_rows(P, ["ulysses", "ring", "usp", "auto"]):
        for shape in shapes:
            for model in models:
                cases.append(dict(backend=backend, degrees=degrees, shape=shape.__dict__, model=model, dtype="float32"))
    return cases


def _model_params() -> list:
    def name(P: int, i: int, c: dict) -> str:
        shape = ",".join(f"{k}={v}" for k, v in c["shape"].items() if v)
        model = ",".join(f"{k}={v}" for k, v in c["model"].items())
        return f"P{P}-{i}-{c['backend']}-{c['degrees'][0]}x{c['degrees'][1]}-{shape}-{model}"

    return [pytest.param(P, i, id=name(P, i, c)) for P in (2, 3, 4) for i, c in enumerate(model_cases(P))]


@pytest.mark.parametrize("world_size,index", _model_params())
def test_dit_under_sp_matches_single_process(rank_batch, world_size, index):
    cases = model_cases(world_size)
    case = cases[index]
    layers = case["model"]["num_layers"]
    u, r = case["degrees"]
    for rank_res in (results[index] for results in rank_batch(_model_cases, world_size, cases)):
        assert rank_res["finite"] and rank_res["shape_ok"], case
        assert rank_res["err"] < 1e-5, (case, rank_res["err"])
        # SP really ran: Ulysses exchanges twice per block, the ring R-1 times per block.
        assert rank_res["a2a"] == (2 * layers if u > 1 else 0), (case, rank_res)
        assert rank_res["ring"] == ((r - 1) * layers if r > 1 else 0), (case, rank_res)


def test_rope_tables_and_rotation():
    cos, sin = RotaryEmbedding(16, 10000.0)((2, 3, 4))
    assert cos.shape == sin.shape == (1, 24, 1, 16)
    assert torch.allclose(cos**2 + sin**2, torch.ones_like(cos))
    x = torch.randn(2, 24, 3, 16)
    y = apply_rope(x, cos, sin)
    # A rotation keeps norms, and position 0 is the identity.
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.allclose(y[:, 0], x[:, 0])
    # Relative positions: <R_m q, R_n k> depends on m - n only (1-D case).
    cos1, sin1 = RotaryEmbedding(16, 10000.0)((10,))
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rq = apply_rope(q.expand(1, 10, 1, 16), cos1, sin1)
    rk = apply_rope(k.expand(1, 10, 1, 16), cos1, sin1)
    dots = (rq[0, :, 0, None, :] * rk[0, None, :, 0, :]).sum(-1)
    assert torch.allclose(dots[3, 1], dots[8, 6], atol=1e-5) and torch.allclose(dots[2, 5], dots[4, 7], atol=1e-5)


def test_dit_plan_and_errors():
    assert set(DiT._sp_plan) == {"rope", "blocks.0", "proj_out"}
    with pytest.raises(ValueError, match="latent"):
        DiT(DiTConfig(num_layers=1))(torch.randn(2, 3), torch.zeros(2), torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7, 10000.0)


def test_backend_plan_rows():
    assert backend_rows(2, ["ulysses", "ring", "usp", "auto"]) == [("ulysses", (2, 1)), ("ring", (1, 2)),
                                                                   ("auto", (2, 1))]
    assert backend_rows(4, ["usp", "auto"]) == [("usp", (2, 2)), ("auto", (2, 2))]
    assert backend_rows(8, ["usp"]) == [("usp", (4, 2))]
    with pytest.raises(ValueError, match="unknown backend"):
        backend_rows(2, ["nope"])


def test_demo_cli_runs_and_checks():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "sp_kernels.testing.demo", "--world-size", "2", "--seq-len", "21", "--layers", "1",
           "--iters", "1", "--backend", "all", "--check"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "[1/3] ulysses U2xR1 B1 tok21 (21 tokens)" in out
    for name in ("ulysses", "ring", "auto->ulysses"):
        assert any(line.startswith(name + " ") and line.rstrip().endswith("ok") for line in out.splitlines()), out
    assert dist.is_available()
