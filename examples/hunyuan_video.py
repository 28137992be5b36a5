"""HunyuanVideo (HunyuanVideoTransformer3DModel) with sp_kernels sequence parallelism.

    torchrun --nproc_per_node 2 examples/hunyuan_video.py --cpu --tiny --steps 2 --check   # CPU, gloo
    torchrun --nproc_per_node 8 examples/hunyuan_video.py --model-path /ckpt/HunyuanVideo --pipeline \\
        --height 720 --width 1280 --num-frames 129 --steps 50                               # GPU (has not run)

diffusers has no context-parallel plan for this model; sp_kernels' plan shards the tokens after the
patch embedder (and the rope table), and keeps the text replicated as joint tokens at the rear of
[image | text]. The latent is [B, C, F, H, W] (patch 2, temporal patch 1); timesteps 0..1000.
"""

import sys

import torch
from _common import Family, Geometry, main


def inputs(config, geo: Geometry, gen: torch.Generator) -> dict:
    p, pt = config.patch_size, config.patch_size_t
    kwargs = dict(
        hidden_states=torch.randn(geo.batch, config.in_channels, geo.frames * pt, geo.height * p, geo.width * p,
                                  generator=gen),
        encoder_hidden_states=torch.randn(geo.batch, geo.text_tokens, config.text_embed_dim, generator=gen),
        encoder_attention_mask=torch.ones(geo.batch, geo.text_tokens, dtype=torch.long),
        pooled_projections=torch.randn(geo.batch, config.pooled_projection_dim, generator=gen),
    )
    if config.guidance_embeds:
        kwargs["guidance"] = torch.full((geo.batch,), 6.0 * 1000.0)  # as HunyuanVideoPipeline scales it
    return kwargs


FAMILY = Family(tiny="hunyuan", pipeline="HunyuanVideoPipeline", timestep_scale=1000.0, inputs=inputs, video=True)

if __name__ == "__main__":
    sys.exit(main(FAMILY))
