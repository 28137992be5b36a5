"""LTX-Video (LTXVideoTransformer3DModel) with sp_kernels sequence parallelism.

    torchrun --nproc_per_node 2 examples/ltx.py --cpu --tiny --steps 2 --check      # CPU, gloo
    torchrun --nproc_per_node 4 examples/ltx.py --model-path /ckpt/LTX-Video --pipeline \\
        --height 512 --width 768 --num-frames 121 --steps 50                         # GPU (has not run)

Self-attention over the video tokens (sharded); cross-attention to the text, with its mask, stays
local on every rank. The latent is [B, N, C] tokens with (num_frames, height, width) given
separately; timesteps 0..1000.
"""

import sys

import torch
from _common import Family, Geometry, main


def inputs(config, geo: Geometry, gen: torch.Generator) -> dict:
    return dict(
        hidden_states=torch.randn(geo.batch, geo.tokens, config.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(geo.batch, geo.text_tokens, config.caption_channels, generator=gen),
        encoder_attention_mask=torch.ones(geo.batch, geo.text_tokens, dtype=torch.long),
        num_frames=geo.frames,
        height=geo.height,
        width=geo.width,
    )


FAMILY = Family(tiny="ltx", pipeline="LTXPipeline", timestep_scale=1000.0, inputs=inputs, video=True)

if __name__ == "__main__":
    sys.exit(main(FAMILY))
