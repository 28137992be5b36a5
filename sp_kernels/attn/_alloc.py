"""The one allocation point of the attention layer's outputs and buffers.

Uninitialized on purpose (every element is written by a kernel or a copy). Tests poison it the way they
poison every other allocation, through torch's deterministic mode (``fill_uninitialized_memory``,
tests/poison.py), and count calls to it to check that the ring loop allocates nothing once warm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def new_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=device)
