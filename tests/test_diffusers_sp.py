"""enable_sequence_parallel on real diffusers models: tiny random-weight Flux, Flux2, Qwen-Image, Wan,
LTX-Video and HunyuanVideo on gloo ranks, under every backend, must equal the same model on one
process with diffusers' own attention (fp32, 1e-5), for token counts the SP size divides and does
not divide, with return_dict True and False; disable_sequence_parallel must restore the model exactly."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None,
    reason="diffusers is not installed (scripts/setup.sh installs it); the integration needs it",
)

FAMILIES = ("flux", "flux2", "qwen", "wan", "ltx", "hunyuan")
TOKENS = (24, 35)  # 24: divisible by 2, 3 and 4; 35: by none of them (auto_pad, exact)
TOL = 1e-5


def _degrees(backend: str, world: int) -> tuple[int, int]:
    """(ulysses, ring) for ``backend`` on ``world`` ranks; usp takes both dims where the world factors."""
    if backend == "ulysses":
        return world, 1
    if backend in ("ring", "fused_ring"):
        return 1, world
    return {2: (2, 1), 3: (1, 3), 4: (2, 2)}[world]


def _sp_cases(world: int, families: tuple[str, ...], backends: tuple[str, ...]) -> list[dict]:
    """Rank side: every (family, backend, tokens, return_dict) with one model per family, enabled and
    disabled again for each case (which also checks that disable restores it)."""
    from sp_kernels import SequenceParallelConfig
    from sp_kernels import attn as attn_pkg
    from sp_kernels.integrations.diffusers import disable_sequence_parallel, enable_sequence_parallel
    from sp_kernels.models import diffusers_tiny

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    calls: dict[str, int] = {}
    real = dict(attn_pkg._BACKENDS)

    def counting(name):
        def fn(call, valid):
            calls[name] = calls.get(name, 0) + 1
            return real[name](call, valid)
        return fn

    for name in real:
        attn_pkg._BACKENDS[name] = counting(name)
    results = []
    try:
        for family in families:
            model = diffusers_tiny.build(family, seed=5)
            backends_before = [getattr(m.processor, "_attention_backend", "x") for m in model.modules()
                               if hasattr(m, "processor")]
            for tokens in TOKENS:
                inputs = diffusers_tiny.make_inputs(family, tokens, text_tokens=7 if tokens % 2 else 8, seed=6)
                with torch.no_grad():
                    single = model(**inputs, return_dict=False)[0]
                for backend in backends:
                    U, R = _degrees(backend, world)
                    cfg = SequenceParallelConfig(ulysses_degree=U, ring_degree=R, attention_backend=backend)
                    for return_dict in (False, True):
                        calls.clear()
                        enable_sequence_parallel(model, cfg)
                        with torch.no_grad():
                            out = model(**inputs, return_dict=return_dict)
                        disable_sequence_parallel(model)
                        sp = out.sample if return_dict else out[0]
                        with torch.no_grad():
                            after = model(**inputs, return_dict=False)[0]
                        results.append({
                            "case": (family, backend, U, R, tokens, return_dict),
                            "shape_ok": sp.shape == single.shape,
                            "err": (sp - single).abs().max().item() if sp.shape == single.shape else float("inf"),
                            "restored": torch.equal(after, single),
                            "calls": dict(calls),
                        })
            backends_after = [getattr(m.processor, "_attention_backend", "x") for m in model.modules()
                              if hasattr(m, "processor")]
            results.append({"case": (family, "processors restored"), "ok": backends_before == backends_after})
    finally:
        attn_pkg._BACKENDS.clear()
        attn_pkg._BACKENDS.update(real)
    return results


def _check(per_rank: list[list[dict]], backends: tuple[str, ...]) -> None:
    failures = []
    for rank, results in enumerate(per_rank):
        for res in results:
            if "ok" in res:
                if not res["ok"]:
                    failures.append((rank, res))
                continue
            backend = res["case"][1]
            expected = {"usp" if backend == "usp" else backend}
            if not (res["shape_ok"] and res["err"] < TOL and res["restored"] and set(res["calls"]) == expected):
                failures.append((rank, res))
    assert not failures, failures[:6]
    assert len(per_rank[0]) == len(FAMILIES) * (1 + len(TOKENS) * len(backends) * 2)


BACKENDS = ("ulysses", "ring", "usp", "fused_ring")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_models_match_single_process(rank_pool, world):
    _check(rank_pool(world).run(_sp_cases, world, FAMILIES, BACKENDS), BACKENDS)
