"""enable_sequence_parallel on real diffusers models: tiny random-weight Flux, Flux2, Qwen-Image, Wan,
SkyReels-V2, LTX-Video and HunyuanVideo on gloo ranks, under every backend, must equal the same model on one
process with diffusers' own attention (fp32, 1e-5), for token counts the SP size divides and does
not divide, with return_dict True and False, and (Qwen-Image, HunyuanVideo) prompts padded the way
pipelines pad them; disable_sequence_parallel must restore the model exactly."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from tests.attention_cases import sp_degrees

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None,
    reason="diffusers is not installed (scripts/setup.sh installs it); the integration needs it",
)

FAMILIES = ("flux", "flux2", "qwen", "wan", "skyreels", "ltx", "hunyuan")
TOKENS = (24, 35)  # 24: divisible by 2, 3 and 4; 35: by none of them (auto_pad, exact)
TOL = 1e-5


def _sp_cases(world: int, families: tuple[str, ...], backends: tuple[str, ...]) -> list[dict]:
    """Rank side: every (family, backend, tokens, return_dict) with one model per family, enabled and
    disabled again for each case (which also checks that disable restores it)."""
    from sp_kernels import SequenceParallelConfig
    from sp_kernels.attn.backends import SP_BACKEND_NAMES, backend_function, register_backend, restore_backend
    from sp_kernels.integrations.diffusers import disable_sequence_parallel, enable_sequence_parallel
    from sp_kernels.testing.models import diffusers_tiny

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    # Wan's plan splits a per-token timestep [B, N] (Wan 2.2); the tiny model's [B] is skipped with a warning.
    logging.getLogger("sp_kernels").setLevel(logging.ERROR)
    calls: dict[str, int] = {}
    real = {name: backend_function(name) for name in SP_BACKEND_NAMES}

    def counting(name):
        def fn(call, valid):
            calls[name] = calls.get(name, 0) + 1
            return real[name](call, valid)
        return fn

    for name in real:
        register_backend(name, counting(name), replace=True)
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
                    U, R = sp_degrees(backend, world)
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
        for name in real:
            restore_backend(name)
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


def _bad_input_cases() -> dict:
    """Rank side (2 ranks): errors that must name the model class, the key and the diffusers version
    and leave the model as it was; the translated _cp_plan path; the routing guard."""
    import diffusers

    from sp_kernels import SequenceParallelConfig, SequenceParallelInput, is_sequence_parallel
    from sp_kernels.integrations.diffusers import disable_sequence_parallel, enable_sequence_parallel
    from sp_kernels.testing.models import diffusers_tiny

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    cfg = SequenceParallelConfig(ring_degree=2, attention_backend="ring")
    out: dict = {"version": diffusers.__version__}

    def state(model):
        return [getattr(m.processor, "_attention_backend", "x") for m in model.modules() if hasattr(m, "processor")]

    def attempt(model, plan, inputs=None):
        before = state(model)
        try:
            enable_sequence_parallel(model, cfg, plan=plan)
            if inputs is not None:
                with torch.no_grad():
                    model(**inputs, return_dict=False)
            return None
        except Exception as e:  # noqa: BLE001 - the test inspects it
            return {"type": type(e).__name__, "msg": str(e), "untouched": state(model) == before
                    and not is_sequence_parallel(model)}

    flux = diffusers_tiny.build("flux", seed=1)
    out["missing_key"] = attempt(flux, {"nope.0": {"hidden_states": SequenceParallelInput(1, auto_pad=True)}})
    out["bad_plan_string"] = attempt(flux, "cp")
    qwen = diffusers_tiny.build("qwen", seed=1)
    out["qwen_cp_plan"] = attempt(qwen, "cp_plan")  # splits transformer_blocks.0 twice

    # diffusers' own plan, translated: exact when both text and image lengths divide the SP size ...
    inputs = diffusers_tiny.make_inputs("flux", 24, text_tokens=8, seed=2)
    with torch.no_grad():
        single = flux(**inputs, return_dict=False)[0]
        enable_sequence_parallel(flux, cfg, plan="cp_plan")
        sp = flux(**inputs, return_dict=False)[0]
    out["cp_plan_err"] = (sp - single).abs().max().item()
    # ... and refused (padding would sit mid-sequence) rather than wrong when the text does not divide.
    try:
        with torch.no_grad():
            flux(**diffusers_tiny.make_inputs("flux", 24, text_tokens=7, seed=2), return_dict=False)
        out["cp_plan_uneven"] = None
    except ValueError as e:
        out["cp_plan_uneven"] = str(e)
    # Re-routing attention behind our back is caught before the forward runs.
    flux.set_attention_backend("native")
    try:
        with torch.no_grad():
            flux(**inputs, return_dict=False)
        out["guard"] = None
    except RuntimeError as e:
        out["guard"] = str(e)
    try:
        enable_sequence_parallel(flux, cfg)
        out["twice"] = None
    except RuntimeError as e:
        out["twice"] = str(e)
    disable_sequence_parallel(flux)
    flux.reset_attention_backend()
    # A prompt mask with a hole (not trailing padding) cannot be trimmed away: the mask path applies it (issue 15).
    qwen = diffusers_tiny.build("qwen", seed=1)
    holed = diffusers_tiny.make_inputs("qwen", 24, text_tokens=8, seed=2)
    holed["encoder_hidden_states_mask"][:, 2] = 0
    with torch.no_grad():
        want = qwen(**holed, return_dict=False)[0]
    out["masked_hole"] = attempt(qwen, None, holed)
    with torch.no_grad():
        out["masked_hole_err"] = (qwen(**holed, return_dict=False)[0] - want).abs().max().item()
    if is_sequence_parallel(qwen):
        disable_sequence_parallel(qwen)
    with torch.no_grad():
        out["restored"] = torch.equal(flux(**inputs, return_dict=False)[0], single)
    return out


def _ltx_cp_plan_cases(world: int) -> list[dict]:
    """Rank side: LTX-Video under its own _cp_plan, which shards the text context (and its mask) too, so
    cross-attention K/V are a sharded sequence: they must be gathered, not attended locally."""
    from sp_kernels import SequenceParallelConfig
    from sp_kernels.integrations.diffusers import disable_sequence_parallel, enable_sequence_parallel
    from sp_kernels.testing.models import diffusers_tiny

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    model = diffusers_tiny.build("ltx", seed=3)
    results = []
    for tokens, text in ((24, 8), (35, 7)):  # divisible by 2 and 4 / by no world size (auto_pad)
        inputs = diffusers_tiny.make_inputs("ltx", tokens, text_tokens=text, seed=4)
        if tokens == 35:
            inputs["encoder_attention_mask"][:, -2:] = 0  # a prompt mask with padded tokens: gathered with K/V
        with torch.no_grad():
            single = model(**inputs, return_dict=False)[0]
        for backend in ("ulysses", "fused_ring"):
            U, R = sp_degrees(backend, world)
            enable_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=U, ring_degree=R,
                                                                   attention_backend=backend), plan="cp_plan")
            try:
                with torch.no_grad():
                    sp = model(**inputs, return_dict=False)[0]
            finally:
                disable_sequence_parallel(model)
            results.append({"case": (tokens, text, backend), "err": (sp - single).abs().max().item()})
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_ltx_cp_plan_sharded_text_exact(rank_pool, world):
    for results in rank_pool(world).run(_ltx_cp_plan_cases, world):
        for res in results:
            assert res["err"] < TOL, res


def test_bad_input_and_translated_cp_plan(rank_pool):
    for res in rank_pool(2).run(_bad_input_cases):
        ver = res["version"]
        missing = res["missing_key"]
        assert missing and missing["type"] == "ValueError" and missing["untouched"], missing
        assert all(s in missing["msg"] for s in ("FluxTransformer2DModel", "'nope.0'", ver)), missing
        assert res["bad_plan_string"]["type"] == "ValueError" and res["bad_plan_string"]["untouched"]
        qwen = res["qwen_cp_plan"]
        assert qwen and qwen["untouched"] and "QwenImageTransformer2DModel" in qwen["msg"] and ver in qwen["msg"], qwen
        assert "transformer_blocks" in qwen["msg"], qwen
        assert res["cp_plan_err"] < TOL, res
        assert res["cp_plan_uneven"] and "matches no sequence sharded" in res["cp_plan_uneven"], res
        assert res["guard"] and "changed after enable_sequence_parallel" in res["guard"], res
        assert res["twice"] and "already applied" in res["twice"], res
        assert res["restored"]
        assert res["masked_hole"] is None and res["masked_hole_err"] < TOL, res


def test_errors_without_ranks(monkeypatch):
    import diffusers
    from diffusers.models.attention_processor import Attention
    from diffusers.models.modeling_utils import ModelMixin

    import sp_kernels.integrations.diffusers as integration
    from sp_kernels import SequenceParallelConfig, SequenceParallelInput, SequenceParallelOutput

    class NoPlan(ModelMixin):
        def __init__(self):
            super().__init__()
            self.attn = Attention(16, heads=2, dim_head=8)  # legacy processor: calls SDPA itself

        def forward(self, hidden_states):
            return self.attn(hidden_states)

    cfg = SequenceParallelConfig(ulysses_degree=2)
    with pytest.raises(ValueError, match=rf"NoPlan has no _sp_plan and no _cp_plan \(diffusers {diffusers.__version__}"):
        integration.enable_sequence_parallel(NoPlan(), cfg)
    plan = {"": {"hidden_states": SequenceParallelInput(1, auto_pad=True)}, "attn": SequenceParallelOutput(1)}
    with pytest.raises(ValueError, match=r"attn \(AttnProcessor2_0\).*do not dispatch through diffusers"):
        integration.enable_sequence_parallel(NoPlan(), cfg, plan=plan)
    with pytest.raises(ValueError, match="enable_sequence_parallel was not called"):
        integration.disable_sequence_parallel(NoPlan())
    with pytest.raises(TypeError, match="SequenceParallelConfig"):
        integration.enable_sequence_parallel(NoPlan(), {"ulysses_degree": 2})
    # A diffusers whose attention modules live elsewhere: a clear error with its version.
    import diffusers.models.attention as attention_mod

    monkeypatch.delattr(attention_mod, "AttentionModuleMixin")
    with pytest.raises(RuntimeError, match=rf"AttentionModuleMixin.*diffusers {diffusers.__version__}"):
        integration.enable_sequence_parallel(NoPlan(), cfg, plan=plan)


def test_plans_are_valid_and_translation():
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    from sp_kernels import SequenceParallelInput, SequenceParallelOutput, validate_sp_plan
    from sp_kernels.integrations.diffusers_plans import PLANS, translate_cp_plan
    from sp_kernels.testing.models.diffusers_tiny import FAMILIES

    assert {f.class_name for f in FAMILIES.values()} <= set(PLANS)
    for plan in PLANS.values():
        validate_sp_plan(plan)
    cp = {"": {"x": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
          "rope": {0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True)},
          "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}
    assert translate_cp_plan(cp) == {
        "": {"x": SequenceParallelInput(1, 3, False, auto_pad=True)},
        "rope": {0: SequenceParallelInput(1, 4, True, auto_pad=True)},
        "proj_out": SequenceParallelOutput(1, 3),
    }
    with pytest.raises(ValueError, match=r"Model._cp_plan\['rope'\]\[0\]: expected ContextParallelInput"):
        translate_cp_plan({"rope": {0: SequenceParallelOutput(1)}}, owner="Model")
