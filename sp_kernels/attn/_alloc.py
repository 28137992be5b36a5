"""Output/scratch allocation with an optional NaN poison, so tests catch rows a kernel never wrote.

``SP_KERNELS_POISON=1`` fills every buffer allocated here with NaN (integers: their max value)
before a kernel or a copy writes it. Off by default: the fill is a full extra pass over memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def poison_enabled() -> bool:
    return os.environ.get("SP_KERNELS_POISON", "0") == "1"


def new_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    buf = torch.empty(tuple(shape), dtype=dtype, device=device)
    if poison_enabled():
        if buf.is_floating_point():
            buf.fill_(float("nan"))
        else:
            buf.fill_(torch.iinfo(dtype).max)
    return buf
