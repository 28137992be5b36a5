"""Python faces of the sp_kernels kernels.

Each op module validates arguments, picks an implementation (native C++/CUDA op when its kernel is
registered for the tensor's device, else triton or a pure-torch fallback with identical semantics;
``SP_KERNELS_IMPL`` forces one) and, when the native op exists, registers its fake impl (for
torch.compile) and autograd formula with torch.library.
"""

from __future__ import annotations

from ._dispatch import IMPL_ENV, IMPL_NAMES, requested_impl, select_impl
from .shard_pad import shard_pad

__all__ = ["IMPL_ENV", "IMPL_NAMES", "requested_impl", "select_impl", "shard_pad"]
