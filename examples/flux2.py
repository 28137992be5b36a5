"""Flux.2 (Flux2Transformer2DModel) with sp_kernels sequence parallelism.

    torchrun --nproc_per_node 2 examples/flux2.py --cpu --tiny --steps 2 --check    # CPU, gloo
    torchrun --nproc_per_node 8 examples/flux2.py --model-path /ckpt/FLUX.2-dev --pipeline \\
        --height 1024 --width 1024 --steps 50                                        # GPU (has not run)

As Flux.1: [text | image] joint attention, image tokens sharded with their [B, N, 4] position ids,
text replicated as joint tokens; sigma in 0..1.
"""

import sys

import torch
from _common import Family, Geometry, main, token_positions


def inputs(config, geo: Geometry, gen: torch.Generator) -> dict:
    pos = token_positions(geo)
    # ids are (t, h, w, l): the image along (h, w), the text along l
    img_ids = torch.cat([torch.zeros(len(pos), 1), pos, torch.zeros(len(pos), 1)], dim=1)
    txt_ids = torch.zeros(geo.text_tokens, 4)
    txt_ids[:, 3] = torch.arange(geo.text_tokens)
    return dict(
        hidden_states=torch.randn(geo.batch, geo.tokens, config.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(geo.batch, geo.text_tokens, config.joint_attention_dim, generator=gen),
        img_ids=img_ids.expand(geo.batch, -1, -1),
        txt_ids=txt_ids.expand(geo.batch, -1, -1),
        guidance=torch.full((geo.batch,), 4.0) if config.guidance_embeds else None,
    )


FAMILY = Family(tiny="flux2", pipeline="Flux2Pipeline", timestep_scale=1.0, inputs=inputs)

if __name__ == "__main__":
    sys.exit(main(FAMILY))
