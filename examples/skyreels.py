"""SkyReels-V2 (SkyReelsV2Transformer3DModel, Wan's architecture) with sp_kernels sequence parallelism.

    torchrun --nproc_per_node 2 examples/skyreels.py --cpu --tiny --steps 2 --check   # CPU, gloo
    torchrun --nproc_per_node 8 examples/skyreels.py --model-path /ckpt/SkyReels-V2-T2V-14B-540P-Diffusers \\
        --pipeline --height 544 --width 960 --num-frames 97 --steps 50                # GPU (has not run)

Same inputs as Wan (examples/wan.py). Diffusion-forcing mode passes a block-causal attention mask,
which the sequence-parallel backends refuse with a clear error; the plain T2V/I2V modes are supported.
"""

import sys

from _common import Family, main
from wan import inputs

FAMILY = Family(tiny="skyreels", pipeline="SkyReelsV2Pipeline", timestep_scale=1000.0, inputs=inputs, video=True)

if __name__ == "__main__":
    sys.exit(main(FAMILY))
