"""The one way tests poison memory, so an element a kernel never writes fails the comparison.

``poisoned()`` makes every uninitialized allocation -- ``torch.empty`` in sp_kernels' Python, the
C++ ops' ``at::empty``, Triton launchers' outputs -- come filled with NaN (integers: their largest
value), through torch's deterministic mode (``fill_uninitialized_memory``). Destinations a test hands
to an op itself are made with ``nan_full``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


def nan_full(shape: Sequence[int], dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
