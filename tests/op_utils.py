"""Helpers shared by the op tests: which aten/custom ops a call dispatches, and forcing an impl."""

from __future__ import annotations

import pytest
from torch.utils._python_dispatch import TorchDispatchMode


class OpRecorder(TorchDispatchMode):
    """Records the name of every op dispatched inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def force_impl(monkeypatch: pytest.MonkeyPatch, forced: str | None) -> None:
    """Set SP_KERNELS_IMPL to ``forced`` (None: automatic selection) for one test."""
    if forced is None:
        monkeypatch.delenv("SP_KERNELS_IMPL", raising=False)
    else:
        monkeypatch.setenv("SP_KERNELS_IMPL", forced)
