"""The attention backends: one table of the degrees each can run and where its implementation lives.

Config validation (parallel_state), ``attention()`` and its registry (attn), "auto" resolution and
the diffusers integration all read ``BACKENDS``; implementations are imported when first called, so
no backend depends on which module was imported first. Imports nothing of sp_kernels at module
level: parallel_state sits above it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..distributed.parallel_state import SPState

BackendFn = Callable[[Any, list[int]], Any]
"""A sequence-parallel backend: (AttentionCall, valid rows of every SP rank in sp_rank order) -> output."""


@dataclass(frozen=True)
class Backend:
    """One backend. ``needs_*``: degrees it cannot run otherwise; ``impl``: ``"module:function"``
    (module relative to sp_kernels.attn), None where ``attention()`` itself decides ("auto", "local")."""

    name: str
    impl: str | None
    summary: str
    needs_ulysses_1: bool = False
    needs_ring_1: bool = False
    needs_size_1: bool = False

    def unmet(self, ulysses_degree: int, ring_degree: int) -> str | None:
        """The degree these degrees set to more than the backend's 1 ("sequence_parallel_size",
        "ulysses_degree" or "ring_degree"), None when the backend runs them."""
        if self.needs_size_1 and ulysses_degree * ring_degree > 1:
            return "sequence_parallel_size"
        if self.needs_ulysses_1 and ulysses_degree != 1:
            return "ulysses_degree"
        if self.needs_ring_1 and ring_degree != 1:
            return "ring_degree"
        return None


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("auto", None, "the first backend of AUTO_ORDER that runs the degrees"),
        Backend("local", None, "attention on this rank's tensors only, no communication", needs_size_1=True),
        Backend("ulysses", ".ulysses:ulysses_attention", "all-to-all sequence <-> heads", needs_ring_1=True),
        Backend("ring", ".ring:ring_attention", "reference ring: current stream, running merge",
                needs_ulysses_1=True),
        Backend("usp", ".usp:usp_attention", "Ulysses inside each group x the fused_ring engine across"),
        Backend("fused_ring", ".ring:fused_ring_attention", "ring with transfers overlapped with compute",
                needs_ulysses_1=True),
    )
}
# Names accepted by SequenceParallelConfig.attention_backend / attention(backend=...). The order is
# part of the cross-rank metadata exchange (attn/agreement.py): append, never reorder.
BACKEND_NAMES = tuple(BACKENDS)
AUTO_ORDER = ("local", "ulysses", "fused_ring", "usp")
SP_BACKEND_NAMES = tuple(n for n, b in BACKENDS.items() if b.impl is not None)

_replaced: dict[str, BackendFn] = {}


def auto_backend(ulysses_degree: int, ring_degree: int) -> str:
    """The backend "auto" stands for at these degrees."""
    return next(n for n in AUTO_ORDER if BACKENDS[n].unmet(ulysses_degree, ring_degree) is None)


def resolve_backend(backend: str | None, state: SPState | None) -> str:
    """The backend that runs: ``backend`` or the state's configured one, with "auto" resolved."""
    name = backend if backend is not None else (state.config.attention_backend if state is not None else "local")
    if name not in BACKENDS:
        raise ValueError(f"attention: backend={name!r} is unknown; expected one of {list(BACKEND_NAMES)}")
    if name == "auto":
        name = state.config.resolved_backend() if state is not None else "local"
    return name


def backend_function(name: str) -> BackendFn:
    """The function that runs sequence-parallel backend ``name``: a replacement registered with
    ``register_backend``, else the table's implementation (bound at each call, so patches apply)."""
    fn = _replaced.get(name)
    if fn is not None:
        return fn
    impl = BACKENDS[name].impl
    if impl is None:
        raise ValueError(f"backend {name!r} has no implementation of its own; expected one of {list(SP_BACKEND_NAMES)}")
    module, attr = impl.split(":")
    return getattr(importlib.import_module(module, __package__), attr)


def register_backend(name: str, fn: BackendFn, *, replace: bool = False) -> None:
    """Replace the implementation of one of the sequence-parallel backends of the table (every one is
    registered from the start, so ``replace=True`` is needed); ``restore_backend`` undoes it."""
    if name not in SP_BACKEND_NAMES:
        raise ValueError(
            f"register_backend: {name!r} is not a backend name SequenceParallelConfig accepts; expected one of "
            f"{list(SP_BACKEND_NAMES)}"
        )
    if not replace:
        raise ValueError(f"register_backend: {name!r} is already registered (pass replace=True to override)")
    _replaced[name] = fn


def restore_backend(name: str) -> None:
    """Drop a replacement ``register_backend`` made: the table's implementation runs ``name`` again."""
    _replaced.pop(name, None)


def registered_backends() -> tuple[str, ...]:
    return ("local", *SP_BACKEND_NAMES)


# Differentiable implementations (attn/grad.py): what runs a backend when gradients are needed.
GRAD_IMPLS: dict[str, str] = {
    "ulysses": ".grad:ulysses_attention_grad",
    "ring": ".grad:ring_attention_grad",
    "usp": ".grad:usp_attention_grad",
    "fused_ring": ".grad:fused_ring_attention_grad",
}


def grad_backend_function(name: str) -> BackendFn:
    """The differentiable function of sequence-parallel backend ``name`` (same signature and result as
    ``backend_function``'s). A replacement registered with ``register_backend`` runs as is: whether it
    is differentiable is its own business."""
    fn = _replaced.get(name)
    if fn is not None:
        return fn
    impl = GRAD_IMPLS.get(name)
    if impl is None:
        raise ValueError(f"backend {name!r} has no differentiable implementation; expected one of {list(GRAD_IMPLS)}")
    module, attr = impl.split(":")
    return getattr(importlib.import_module(module, __package__), attr)
