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
    (module relative to sp_kernels.attn), None where ``attention()`` itself decides ("auto", "local");
    ``grad_impl``: the differentiable implementation (attn/grad.py) that runs when gradients are needed."""

    name: str
    impl: str | None
    summary: str
    needs_ulysses_1: bool = False
    needs_ring_1: bool = False
    needs_size_1: bool = False
    grad_impl: str | None = None

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
        Backend("ulysses", ".ulysses:ulysses_attention", "all-to-all sequence <-> heads", needs_ring_1=True,
                grad_impl=".grad:ulysses_attention_grad"),
        Backend("ring", ".ring:ring_attention", "reference ring: current stream, running merge",
                needs_ulysses_1=True, grad_impl=".grad:ring_attention_grad"),
        Backend("usp", ".usp:usp_attention", "Ulysses inside each group x the fused_ring engine across",
                grad_impl=".grad:usp_attention_grad"),
        Backend("fused_ring", ".ring:fused_ring_attention", "ring with transfers overlapped with compute",
                needs_ulysses_1=True, grad_impl=".grad:fused_ring_attention_grad"),
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


def grad_backend_function(name: str) -> BackendFn:
    """The differentiable function of sequence-parallel backend ``name`` (same signature and result as
    ``backend_function``'s). A replacement registered with ``register_backend`` runs as is: whether it
    is differentiable is its own business."""
    fn = _replaced.get(name)
    if fn is not None:
        return fn
    impl = BACKENDS[name].grad_impl if name in BACKENDS else None
    if impl is None:
        have = [n for n, b in BACKENDS.items() if b.grad_impl]
        raise ValueError(f"backend {name!r} has no differentiable implementation; expected one of {have}")
    module, attr = impl.split(":")
    return getattr(importlib.import_module(module, __package__), attr)
