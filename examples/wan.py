"""Wan 2.x (WanTransformer3DModel) with sp_kernels sequence parallelism.

    torchrun --nproc_per_node 2 examples/wan.py --cpu --tiny --steps 2 --check      # CPU, gloo
    torchrun --nproc_per_node 8 examples/wan.py --model-path /ckpt/Wan2.1-T2V-14B-Diffusers --pipeline \\
        --height 480 --width 832 --num-frames 81 --steps 50                          # GPU (has not run)

Wan attends over video tokens only; the text enters by cross-attention, which stays local on every
rank. The latent is [B, C, F, H, W] (patchified inside the model, patch (1, 2, 2)); timesteps 0..1000.
"""

import sys

import torch
from _common import Family, Geometry, main


def inputs(config, geo: Geometry, gen: torch.Generator) -> dict:
    pt, ph, pw = config.patch_size
    return dict(
        hidden_states=torch.randn(geo.batch, config.in_channels, geo.frames * pt, geo.height * ph, geo.width * pw,
                                  generator=gen),
        encoder_hidden_states=torch.randn(geo.batch, geo.text_tokens, config.text_dim, generator=gen),
    )


FAMILY = Family(tiny="wan", pipeline="WanPipeline", timestep_scale=1000.0, inputs=inputs, video=True)

if __name__ == "__main__":
    sys.exit(main(FAMILY))
