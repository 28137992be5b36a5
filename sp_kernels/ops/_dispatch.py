"""Choosing an op's implementation: native (C++/CUDA), triton, or the pure-torch fallback.

``SP_KERNELS_IMPL`` forces one implementation for every op (tests and benchmarks compare them);
unset or ``auto`` takes the first available in priority order. Forcing an implementation that an op
or device lacks is an error that says why, never a silent fallback.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

IMPL_ENV = "SP_KERNELS_IMPL"
IMPL_NAMES = ("native", "triton", "torch")
INTERPRET_ENV = "TRITON_INTERPRET"  # Triton's own switch: its interpreter runs kernels on CPU tensors


def requested_impl() -> str | None:
    """The implementation forced by ``SP_KERNELS_IMPL``, or None for automatic selection."""
    value = os.environ.get(IMPL_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in IMPL_NAMES:
        raise ValueError(f"{IMPL_ENV} must be one of auto, {', '.join(IMPL_NAMES)}; got {value!r}")
    return value


def select_impl(op_name: str, device_type: str, candidates: Mapping[str, str | None]) -> str:
    """Pick an implementation of ``op_name`` for ``device_type``.

    ``candidates`` maps implementation name -> None when usable, else the reason it is not, in
    priority order (first usable wins unless one is forced).
    """
    forced = requested_impl()
    if forced is not None:
        reason = candidates.get(forced, f"{op_name} has no {forced} implementation")
        if reason is not None:
            raise RuntimeError(f"{IMPL_ENV}={forced} but {op_name} cannot use it on {device_type}: {reason}")
        return forced
    for name, reason in candidates.items():
        if reason is None:
            return name
    reasons = "; ".join(f"{name}: {reason}" for name, reason in candidates.items())
    raise RuntimeError(f"no implementation of {op_name} is available on {device_type} ({reasons})")


def triton_unavailable_reason(device_type: str) -> str | None:
    """None when the Triton kernels can run on ``device_type``, else why not.

    Called on every op call (through the ops' candidate lists), so the device test comes first and
    the import check, which is slow and cannot change within a process, runs at most once: on CPU
    without the interpreter triton is never imported at all.
    """
    if not (device_type == "cuda" or (device_type == "cpu" and os.environ.get(INTERPRET_ENV, "0") == "1")):
        return f"triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), not on {device_type!r}"
    return _triton_import_error()


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a missing or broken triton install is "unavailable", with the reason
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None
