"""Choosing an op's implementation: native (C++/CUDA), triton, or the pure-torch fallback.

``SP_KERNELS_IMPL`` forces one implementation for every op (tests and benchmarks compare them);
unset or ``auto`` takes the first available in priority order. Forcing an implementation that an op
or device lacks is an error that says why, never a silent fallback.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

IMPL_ENV = "SP_KERNELS_IMPL"
IMPL_NAMES = ("native", "triton", "torch")


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
