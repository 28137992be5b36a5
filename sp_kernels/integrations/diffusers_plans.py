"""Sequence-parallel plans for diffusers transformers: ready plans, and diffusers' ``_cp_plan`` translated.

Plain data plus a translation; nothing here imports diffusers (``translate_cp_plan`` reads the
attributes of diffusers' ContextParallelInput/Output objects, whatever their class).

Why ready plans exist for models that ship a ``_cp_plan``: diffusers shards the text tokens as well
as the image tokens of MM-DiT models (Flux, Flux2, Qwen-Image) and of cross-attention (LTX). Both are
concatenated or attended inside the attention processor, so when a length is not divisible by the
SP size, padding would land in the middle of the joint sequence (or the cross-attention would need a
distributed softmax over text). Our plans keep text replicated and declare it as joint tokens
(SequenceParallelJointInput): attention computes it once against the whole sharded image sequence,
exact for any image and text length. Text is about 1-5% of the tokens of these models, so the
replicated text projections cost little.
"""

from __future__ import annotations

from typing import Any

from ..plan.specs import (
    SequenceParallelInput,
    SequenceParallelJointInput,
    SequenceParallelModelPlan,
    SequenceParallelOutput,
    validate_sp_plan,
)

__all__ = ["CROSS_ATTENTION", "LOCAL_ATTENTION", "PLANS", "PROMPT_MASKS", "plan_source", "translate_cp_plan"]


def _split(dim: int, dims: int, output: bool = False) -> SequenceParallelInput:
    return SequenceParallelInput(split_dim=dim, expected_dims=dims, split_output=output, auto_pad=True)


_GATHER = SequenceParallelOutput(gather_dim=1, expected_dims=3)

# Keyed by class name (no diffusers import needed to look one up).
PLANS: dict[str, SequenceParallelModelPlan] = {
    # Flux.1: text and image streams meet in every attention as [text | image]; rope comes from
    # cat(txt_ids, img_ids), so sharding img_ids keeps it aligned with the local image rows.
    "FluxTransformer2DModel": {
        "": {
            "hidden_states": _split(1, 3),
            "encoder_hidden_states": SequenceParallelJointInput(seq_dim=1, joint_strategy="front", expected_dims=3),
            "img_ids": _split(0, 2),
        },
        "proj_out": _GATHER,
    },
    # Flux.2: ids are [B, N, 4]; after the double blocks the model concatenates [text | image] and
    # slices the text off by its (replicated, hence full) length before proj_out.
    "Flux2Transformer2DModel": {
        "": {
            "hidden_states": _split(1, 3),
            "encoder_hidden_states": SequenceParallelJointInput(seq_dim=1, joint_strategy="front", expected_dims=3),
            "img_ids": _split(1, 3),
        },
        "proj_out": _GATHER,
    },
    # Qwen-Image: pos_embed returns (image freqs [N, D], text freqs [T, D]); only the first is sharded.
    # modulate_index (edit models with zero_cond_t) is built inline per image token, so it is sharded
    # where each block receives it. diffusers' plan splits hidden_states at transformer_blocks.0 and
    # modulate_index at transformer_blocks.*, i.e. block 0 twice; here the image enters sharded at the root.
    "QwenImageTransformer2DModel": {
        "": {
            "hidden_states": _split(1, 3),
            "encoder_hidden_states": SequenceParallelJointInput(seq_dim=1, joint_strategy="front", expected_dims=3),
        },
        "transformer_blocks.*": {"modulate_index": _split(1, 2)},
        "pos_embed": {0: _split(0, 2, output=True)},
        "proj_out": _GATHER,
    },
    # Wan: self-attention over video tokens only, cross-attention to replicated text (local). Same cut
    # as diffusers' plan, with auto_pad; timestep is per token for Wan 2.2 TI2V ([B, N]).
    "WanTransformer3DModel": {
        "": {"timestep": _split(1, 2)},
        "rope": {0: _split(1, 4, output=True), 1: _split(1, 4, output=True)},
        "blocks.0": {"hidden_states": _split(1, 3)},
        "proj_out": _GATHER,
    },
    # SkyReels-V2 (Wan architecture, no _cp_plan in diffusers): Wan's cut. Its diffusion-forcing mode
    # passes a block-causal attention mask, which the SP backends refuse with a clear error.
    "SkyReelsV2Transformer3DModel": {
        "rope": {0: _split(1, 4, output=True), 1: _split(1, 4, output=True)},
        "blocks.0": {"hidden_states": _split(1, 3)},
        "proj_out": _GATHER,
    },
    # LTX-Video: cross-attention to the text (with its mask) stays local on every rank; diffusers
    # shards the text and its mask too, which needs attention across ranks for the cross-attention.
    "LTXVideoTransformer3DModel": {
        "": {"hidden_states": _split(1, 3)},
        "rope": {0: _split(1, 3, output=True), 1: _split(1, 3, output=True)},
        "proj_out": _GATHER,
    },
    # HunyuanVideo (no _cp_plan in diffusers): tokens exist only after the patch embedder; rope is
    # ([N, D], [N, D]); blocks attend over [image | text]. The text refiner's self-attention over the
    # replicated text runs locally (attention over exactly the joint rows).
    "HunyuanVideoTransformer3DModel": {
        "": {"encoder_hidden_states": SequenceParallelJointInput(seq_dim=1, joint_strategy="rear", expected_dims=3)},
        "x_embedder": {0: _split(1, 3, output=True)},
        "rope": {0: _split(0, 2, output=True), 1: _split(0, 2, output=True)},
        "proj_out": _GATHER,
    },
}

# Module path prefixes, per class, whose attention only ever sees replicated tokens (text refiners),
# so a processor that bypasses diffusers' backend dispatch is harmless there.
LOCAL_ATTENTION: dict[str, tuple[str, ...]] = {
    "HunyuanVideoTransformer3DModel": ("context_embedder.",),
}

# Module names (last path component), per class, of cross-attention to replicated text: always local.
# The backend cannot tell cross- from self-attention by shape when the text happens to have as many
# tokens as a rank's shard, so known models name them; for others a different key length decides.
CROSS_ATTENTION: dict[str, tuple[str, ...]] = {
    "WanTransformer3DModel": ("attn2",),
    "SkyReelsV2Transformer3DModel": ("attn2",),
    "LTXVideoTransformer3DModel": ("attn2",),
}

# (prompt tokens parameter, its key-padding mask parameter), per class, for models whose prompt
# padding reaches joint attention over the sharded sequence as a mask. Pipelines pad prompts (e.g.
# HunyuanVideo to 256 tokens); the padded tokens are masked as keys everywhere (joint attention, the
# text refiner, pooling) and never reach an image token, so dropping the trailing columns that are
# padding in every batch entry leaves the image output unchanged, and the mask becomes all-valid.
PROMPT_MASKS: dict[str, tuple[str, str]] = {
    "HunyuanVideoTransformer3DModel": ("encoder_hidden_states", "encoder_attention_mask"),
    "QwenImageTransformer2DModel": ("encoder_hidden_states", "encoder_hidden_states_mask"),
}


def translate_cp_plan(cp_plan: Any, *, auto_pad: bool = True, owner: str = "model") -> SequenceParallelModelPlan:
    """diffusers' ``_cp_plan`` in sp_kernels' plan types.

    ContextParallelInput(split_dim, expected_dims, split_output) -> SequenceParallelInput with
    ``auto_pad`` (default True: lengths not divisible by the SP size are padded and excluded exactly);
    ContextParallelOutput(gather_dim, expected_dims) -> SequenceParallelOutput. The key grammar is
    the same. Raises ValueError naming the key for anything else.
    """
    if not isinstance(cp_plan, dict):
        raise ValueError(f"{owner}._cp_plan must be a dict, got {type(cp_plan).__name__}")

    def output(key: str, spec: Any) -> SequenceParallelOutput | None:
        if spec is None:
            return None
        if type(spec).__name__ != "ContextParallelOutput" or not hasattr(spec, "gather_dim"):
            raise ValueError(
                f"{owner}._cp_plan[{key!r}]: expected ContextParallelOutput, got {type(spec).__name__}"
            )
        return SequenceParallelOutput(gather_dim=spec.gather_dim, expected_dims=spec.expected_dims)

    plan: dict[str, Any] = {}
    for key, spec in cp_plan.items():
        if isinstance(spec, dict):
            inputs = {}
            for name, item in spec.items():
                if type(item).__name__ != "ContextParallelInput" or not hasattr(item, "split_dim"):
                    raise ValueError(
                        f"{owner}._cp_plan[{key!r}][{name!r}]: expected ContextParallelInput, got {type(item).__name__}"
                    )
                inputs[name] = SequenceParallelInput(
                    split_dim=item.split_dim,
                    expected_dims=item.expected_dims,
                    split_output=bool(item.split_output),
                    auto_pad=auto_pad,
                )
            plan[key] = inputs
        elif isinstance(spec, (list, tuple)):
            plan[key] = type(spec)(output(key, s) for s in spec)
        else:
            plan[key] = output(key, spec)
    try:
        validate_sp_plan(plan)
    except ValueError as e:
        raise ValueError(f"{owner}._cp_plan does not translate to a valid _sp_plan: {e}") from e
    return plan


def plan_source(model: Any) -> tuple[str, SequenceParallelModelPlan] | None:
    """(where it came from, plan) for ``model``: its own ``_sp_plan``, our ready plan for its class, or
    its translated ``_cp_plan``, in that order; None when there is none."""
    cls = type(model)
    own = getattr(cls, "_sp_plan", None)
    if own is not None:
        validate_sp_plan(own)
        return f"{cls.__name__}._sp_plan", own
    for klass in cls.__mro__:
        if klass.__name__ in PLANS:
            return f"sp_kernels' plan for {klass.__name__}", PLANS[klass.__name__]
    cp_plan = getattr(cls, "_cp_plan", None)
    if cp_plan is not None:
        return f"{cls.__name__}._cp_plan (translated)", translate_cp_plan(cp_plan, owner=cls.__name__)
    return None
