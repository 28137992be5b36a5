"""Drop-in for diffusers: ``set_attention_backend("fused_ring")`` + diffusers' own ``enable_parallelism``
runs sp_kernels' ring over diffusers' process groups; a tiny random-weight Flux (joint attention) and
Wan (cross-attention to text whose K/V diffusers may or may not shard: gathered either way) on gloo
must equal the same model on one process (diffusers' native SDPA, no sp_kernels code) at fp32."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None,
    reason="diffusers is not installed (scripts/setup.sh installs it); the drop-in integration needs it",
)

def _dropin_cases(cases: list[tuple], compile_blocks: bool = False) -> list[dict]:
    """Rank side: for each (family, backend, ring_degree, ulysses_degree[, "holes"]) run the model on one process
    with diffusers' native attention, then under diffusers' context parallelism with our backend. "holes": a
    batch of two prompts of different lengths whose masks have holes (tests/test_diffusers_masks.py).
    ``return_dict=False``: diffusers' CP output hook rejects its own output dataclass at a root key.
    ``compile_blocks``: the parallel run under diffusers' regional compilation (compile_repeated_blocks,
    fullgraph=True, aot_eager), its graph breaks counted (tests/test_compile.py)."""
    import logging

    import diffusers
    import torch.distributed as dist

    import sp_kernels.integrations.diffusers as integration
    from sp_kernels.distributed.comm import TorchRingComm
    from sp_kernels.testing.models import diffusers_tiny

    # diffusers' own CPU bugs (see the integration's docstring): rank % device_count() with 0 devices,
    # and logger.warning_once, which only exists once transformers is imported.
    real_count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(1, real_count())
    had_once = hasattr(logging.Logger, "warning_once")
    if not had_once:
        logging.Logger.warning_once = logging.Logger.warning  # type: ignore[attr-defined]
    counts = {"ring": 0}
    real_post = TorchRingComm.post

    def post(self, send, recv):
        counts["ring"] += 1
        return real_post(self, send, recv)

    TorchRingComm.post = post
    results = []
    try:
        integration.register()
        for family, backend, ring_degree, ulysses_degree, *extra in cases:
            if extra:
                from tests.test_diffusers_masks import batched_inputs

                inputs = batched_inputs(family, 24, 8)
            else:
                inputs = diffusers_tiny.make_inputs(family, 16 if family == "flux" else 24, text_tokens=8, seed=3)
            with torch.no_grad():
                model = diffusers_tiny.build(family, seed=11)
                single = model(**inputs, return_dict=False)[0]
                model.set_attention_backend(backend)
                local = model(**inputs, return_dict=False)[0]  # our backend without parallelism: local attention
                model.enable_parallelism(config=diffusers.ContextParallelConfig(ring_degree=ring_degree,
                                                                                ulysses_degree=ulysses_degree))
                if compile_blocks:
                    integration.prepare(model)
                    torch._dynamo.reset()
                    torch._dynamo.utils.counters.clear()
                    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
                counts["ring"] = 0
                sp = model(**inputs, return_dict=False)[0]
            results.append({
                "err": (sp - single).abs().max().item(),
                "local_err": (local - single).abs().max().item(),
                "shape_ok": sp.shape == single.shape,
                "posts": counts["ring"],
                "version": diffusers.__version__,
                "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
            })
            dist.barrier()
    finally:
        TorchRingComm.post = real_post
        torch.accelerator.device_count = real_count
        if not had_once:
            del logging.Logger.warning_once
    return results


@pytest.mark.parametrize("world_size", [2, 4])
def test_dropin_matches_single_process(rank_pool, world_size):
    cases = [(f, "fused_ring", world_size, 1) for f in ("flux", "wan")] + [
        (f, "sp_ulysses", 1, world_size) for f in ("flux", "wan")]
    if world_size == 4:
        cases.append(("flux", "sp_usp", 2, 2))
    per_rank = rank_pool(world_size).run(_dropin_cases, cases)
    for i, (_, backend, ring_degree, _) in enumerate(cases):
        for rank, res in enumerate(r[i] for r in per_rank):
            assert res["shape_ok"], (backend, rank)
            assert res["local_err"] < 1e-5, (backend, rank, res)
            assert res["err"] < 1e-5, (backend, rank, res)
            # Our ring really ran (R - 1 transfers per attention call, 2 attention layers).
            assert (res["posts"] > 0) == (ring_degree > 1), (backend, rank, res)
            if ring_degree > 1:
                assert res["posts"] == 2 * (ring_degree - 1), (backend, rank, res)


def test_dropin_prompt_masks_with_holes(rank_pool):
    """Qwen-Image under diffusers' own CP (its _cp_plan shards the prompt and its mask too): the mask each
    rank's processor builds over its rows is all-gathered with the keys (issue 15)."""
    cases = [("qwen", "fused_ring", 2, 1, "holes"), ("qwen", "sp_ulysses", 1, 2, "holes")]
    per_rank = rank_pool(2).run(_dropin_cases, cases)
    for i, case in enumerate(cases):
        for rank, res in enumerate(r[i] for r in per_rank):
            assert res["shape_ok"] and res["err"] < 1e-5 and res["local_err"] < 1e-5, (case, rank, res)


def test_registration_and_lazy_import():
    # Importing sp_kernels must not import diffusers; the integration module does.
    code = (
        "import sys, sp_kernels, sp_kernels.attn, sp_kernels.integrations; assert 'diffusers' not in sys.modules;"
        "import sp_kernels.integrations.diffusers as d; assert 'diffusers' in sys.modules;"
        "from diffusers.models.attention_dispatch import AttentionBackendName as A, _AttentionBackendRegistry as R;"
        "assert [A(n).value for n in d.BACKENDS] == list(d.BACKENDS);"
        "assert all(R._is_context_parallel_available(A(n)) for n in d.BACKENDS);"
        "assert d.register() == list(d.BACKENDS) and len([m for m in A if m.value == 'fused_ring']) == 1;"
        "from sp_kernels.attn import registered_backends; assert 'fused_ring' in registered_backends()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unsupported_arguments_raise(monkeypatch):
    from types import SimpleNamespace

    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    import sp_kernels.integrations.diffusers as diffusers_integration
    from sp_kernels.distributed.parallel_state import SequenceParallelConfig, SPState

    fn = _AttentionBackendRegistry._backends[AttentionBackendName("fused_ring")]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 2, 8, generator=gen) for _ in range(3))
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    mask[..., -2:] = False
    cp = SimpleNamespace(context_parallel_config=SimpleNamespace(ring_degree=2, ulysses_degree=1))
    # A state without process groups: a refusal travels through the (here one-rank) agreement exchange,
    # which is how every rank of a real group raises it together. (Masks run under context parallelism
    # since issue 15: tests/test_diffusers_masks.py.)
    state = SPState(config=SequenceParallelConfig(ring_degree=2))
    monkeypatch.setattr(diffusers_integration, "sp_state_for", lambda cp_config: state)
    with pytest.raises(NotImplementedError, match="return_lse"):
        fn(q, k, v, return_lse=True, _parallel_config=cp)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        fn(q, k, v, dropout_p=0.1)

    def sdpa(mask=None):
        args = (t.transpose(1, 2).double() for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(*args, attn_mask=mask).transpose(1, 2).float()

    out, lse = fn(q, k, v, return_lse=True)  # no parallel config: local attention with its lse [B, S, H]
    assert torch.allclose(out, sdpa(), atol=1e-6) and lse.shape == (1, 5, 2)
    # A mask that excludes keys runs locally (exact); one that excludes nothing is dropped.
    assert torch.allclose(fn(q, k, v, attn_mask=mask), sdpa(mask), atol=1e-6)
    assert torch.allclose(fn(q, k, v, attn_mask=torch.zeros(1, 1, 1, 5)), sdpa(), atol=1e-6)
    assert torch.allclose(fn(q, k, v, attn_mask=torch.ones(1, 1, 1, 5, dtype=torch.bool),
                             _parallel_config=None), sdpa(), atol=1e-6)
