"""Qwen-Image (QwenImageTransformer2DModel) with sp_kernels sequence parallelism.

    torchrun --nproc_per_node 2 examples/qwen_image.py --cpu --tiny --steps 2 --check   # CPU, gloo
    torchrun --nproc_per_node 4 examples/qwen_image.py --model-path /ckpt/Qwen-Image --pipeline \\
        --height 1328 --width 1328 --steps 50                                            # GPU (has not run)

[text | image] joint attention: image tokens sharded (with the image half of the rope table), the
text replicated as joint tokens. The latent is packed 2x2 tokens, [B, N, C]; ``img_shapes`` gives
the token grid; sigma in 0..1.
"""

import sys

import torch
from _common import Family, Geometry, main


def inputs(config, geo: Geometry, gen: torch.Generator) -> dict:
    return dict(
        hidden_states=torch.randn(geo.batch, geo.tokens, config.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(geo.batch, geo.text_tokens, config.joint_attention_dim, generator=gen),
        encoder_hidden_states_mask=torch.ones(geo.batch, geo.text_tokens, dtype=torch.long),
        img_shapes=[[(1, geo.height, geo.width)]] * geo.batch,
    )


FAMILY = Family(tiny="qwen", pipeline="QwenImagePipeline", timestep_scale=1.0, inputs=inputs)

if __name__ == "__main__":
    sys.exit(main(FAMILY))
