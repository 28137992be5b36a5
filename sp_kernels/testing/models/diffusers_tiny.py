"""Tiny random-weight diffusers transformers and their inputs, for tests, the demo and the examples.

One entry per model family: the diffusers class, a config small enough for a CPU (sizes after
diffusers' own tests), and an input builder that makes exactly ``image_tokens``
sequence tokens (after patchifying) and ``text_tokens`` prompt tokens. Importing this module does
not import diffusers; ``build`` does.

Attention heads are 3 in every config, so no Ulysses degree of 2 or 4 divides them (the head
padding path), and 3 does (the plain path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FAMILIES", "TinyFamily", "build", "factor_tokens", "make_inputs"]


def factor_tokens(tokens: int, parts: int) -> tuple[int, ...]:
    """A grid of ``parts`` sides whose product is ``tokens``: (1, ..., 1, a, b) with a <= b, a as close
    to sqrt(tokens) as divisors allow (image-like layouts; any token count works, primes as 1 x n)."""
    a = max(d for d in range(1, int(tokens**0.5) + 1) if tokens % d == 0)
    return (1,) * (parts - 2) + (a, tokens // a)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _padded_prompt_mask(t: int) -> torch.Tensor:
    """A prompt padded the way pipelines pad it: the last two of ``t`` tokens are padding (t > 2)."""
    mask = torch.ones(1, t, dtype=torch.long)
    if t > 2:
        mask[:, -2:] = 0
    return mask


def _flux_inputs(n: int, t: int, seed: int) -> dict[str, Any]:
    g = _gen(seed)
    return dict(
        hidden_states=torch.randn(1, n, 4, generator=g),
        encoder_hidden_states=torch.randn(1, t, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.7]),
        img_ids=torch.randn(n, 3, generator=g),
        txt_ids=torch.randn(t, 3, generator=g),
    )


def _flux2_inputs(n: int, t: int, seed: int) -> dict[str, Any]:
    g = _gen(seed)
    return dict(
        hidden_states=torch.randn(1, n, 4, generator=g),
        encoder_hidden_states=torch.randn(1, t, 32, generator=g),
        timestep=torch.tensor([0.7]),
        img_ids=torch.randn(1, n, 4, generator=g),
        txt_ids=torch.randn(1, t, 4, generator=g),
        guidance=torch.tensor([3.5]),
    )


def _qwen_inputs(n: int, t: int, seed: int) -> dict[str, Any]:
    g = _gen(seed)
    _, h, w = factor_tokens(n, 3)
    return dict(
        hidden_states=torch.randn(1, n, 16, generator=g),
        encoder_hidden_states=torch.randn(1, t, 16, generator=g),
        encoder_hidden_states_mask=_padded_prompt_mask(t),
        timestep=torch.tensor([0.7]),
        img_shapes=[(1, h, w)],
    )


def _wan_inputs(n: int, t: int, seed: int) -> dict[str, Any]:
    g = _gen(seed)
    f, h, w = factor_tokens(n, 3)
    return dict(
        hidden_states=torch.randn(1, 4, f, 2 * h, 2 * w, generator=g),  # patch (1, 2, 2)
        encoder_hidden_states=torch.randn(1, t, 16, generator=g),
        timestep=torch.tensor([700]),
    )


def _ltx_inputs(n: int, t: int, seed: int) -> dict[str, Any]:
    g = _gen(seed)
    f, h, w = factor_tokens(n, 3)
    mask = torch.ones(1, t, dtype=torch.long)
    mask[:, -1] = 0  # a padded prompt token: the local cross-attention takes the mask
    return dict(
        hidden_states=torch.randn(1, n, 8, generator=g),
        encoder_hidden_states=torch.randn(1, t, 16, generator=g),
        timestep=torch.tensor([700]),
        encoder_attention_mask=mask,
        num_frames=f,
        height=h,
        width=w,
    )


def _hunyuan_inputs(n: int, t: int, seed: int) -> dict[str, Any]:
    g = _gen(seed)
    f, h, w = factor_tokens(n, 3)
    return dict(
        hidden_states=torch.randn(1, 4, f, 2 * h, 2 * w, generator=g),  # patch 2, patch_t 1
        timestep=torch.tensor([700]),
        encoder_hidden_states=torch.randn(1, t, 16, generator=g),
        encoder_attention_mask=_padded_prompt_mask(t),
        pooled_projections=torch.randn(1, 8, generator=g),
        guidance=torch.tensor([3500.0]),
    )


# Wan and SkyReels-V2 share the architecture (and so the tiny config).
_WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=12, in_channels=4, out_channels=4,
                   text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


@dataclass(frozen=True)
class TinyFamily:
    name: str
    class_name: str  # in diffusers
    config: dict[str, Any]
    inputs: Callable[[int, int, int], dict[str, Any]]
    output_is_tokens: bool  # the model returns [B, tokens, C] (else a latent video/image)


FAMILIES: dict[str, TinyFamily] = {
    f.name: f
    for f in (
        TinyFamily(
            "flux", "FluxTransformer2DModel",
            dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=3, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
            _flux_inputs, True,
        ),
        TinyFamily(
            "flux2", "Flux2Transformer2DModel",
            dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=3, joint_attention_dim=32, timestep_guidance_channels=32, mlp_ratio=2.0,
                 axes_dims_rope=(4, 4, 4, 4)),
            _flux2_inputs, True,
        ),
        TinyFamily(
            "qwen", "QwenImageTransformer2DModel",
            dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4)),
            _qwen_inputs, True,
        ),
        TinyFamily(
            "wan", "WanTransformer3DModel",
            _WAN_CONFIG,
            _wan_inputs, False,
        ),
        TinyFamily(
            "skyreels", "SkyReelsV2Transformer3DModel",
            _WAN_CONFIG,
            _wan_inputs, False,
        ),
        TinyFamily(
            "ltx", "LTXVideoTransformer3DModel",
            dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=3,
                 attention_head_dim=16, cross_attention_dim=48, num_layers=2, caption_channels=16),
            _ltx_inputs, True,
        ),
        TinyFamily(
            "hunyuan", "HunyuanVideoTransformer3DModel",
            dict(in_channels=4, out_channels=4, num_attention_heads=3, attention_head_dim=8, num_layers=1,
                 num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
                 text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)),
            _hunyuan_inputs, False,
        ),
    )
}


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The tiny random-weight model of ``family`` (deterministic for a seed), in eval mode."""
    import diffusers

    spec = _family(family)
    torch.manual_seed(seed)
    model = getattr(diffusers, spec.class_name)(**spec.config)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def make_inputs(
    family: str, image_tokens: int, text_tokens: int = 7, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Forward kwargs of ``family``'s tiny model with exactly ``image_tokens`` sequence tokens."""
    inputs = _family(family).inputs(image_tokens, text_tokens, seed)
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def _family(family: str) -> TinyFamily:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family]
