"""Flux.1 (FluxTransformer2DModel) with sp_kernels sequence parallelism.

    torchrun --nproc_per_node 2 examples/flux.py --cpu --tiny --steps 2 --check     # CPU, gloo
    torchrun --nproc_per_node 4 examples/flux.py --model-path /ckpt/FLUX.1-dev --pipeline \\
        --height 1024 --width 1024 --steps 28                                        # GPU (has not run)

Flux's blocks attend over [text | image]: sp_kernels shards the image tokens (and img_ids, so rope
stays aligned) and keeps the text replicated as joint tokens. The latent is already packed into
tokens, [B, N, C]; the transformer takes sigma in 0..1 (it scales by 1000 itself).
"""

import sys

import torch
from _common import Family, Geometry, main, token_positions


def inputs(config, geo: Geometry, gen: torch.Generator) -> dict:
    pos = token_positions(geo)
    img_ids = torch.cat([torch.zeros(len(pos), 1), pos], dim=1)  # [N, 3] (0, row, col), as FluxPipeline
    guidance = torch.full((geo.batch,), 3.5) if config.guidance_embeds else None  # FLUX.1-dev; schnell: none
    return dict(
        hidden_states=torch.randn(geo.batch, geo.tokens, config.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(geo.batch, geo.text_tokens, config.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(geo.batch, config.pooled_projection_dim, generator=gen),
        img_ids=img_ids,
        txt_ids=torch.zeros(geo.text_tokens, 3),
        guidance=guidance,
    )


FAMILY = Family(tiny="flux", pipeline="FluxPipeline", timestep_scale=1.0, inputs=inputs)

if __name__ == "__main__":
    sys.exit(main(FAMILY))
