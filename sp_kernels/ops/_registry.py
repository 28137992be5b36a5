"""The op registry: every sp_kernels op is declared once, as an :class:`Op`.

From that declaration come the op's call path (argument checks, implementation choice, the call),
its ``SP_KERNELS_IMPL`` candidates, and its torch.library fake / autograd registrations.

Argument checks, per op:

* ``types``: Python type checks and cheap normalisation, run on every call. The schema cannot give
  the faces' errors (a float ``start`` is a TypeError naming the argument; a bool is no int).
* ``check``: every other check, with the messages of the C++ ``TORCH_CHECK``s. It runs before the
  torch and Triton implementations, inside the fake impl, and after a native call failed, to turn the
  C++ error into the Python face's (ValueError / TypeError, Python shapes and dtype names). Native
  calls that pass skip it: their C++ checks already ran, so the common path pays for one set.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from . import _ext
from ._dispatch import IMPL_ENV, INTERPRET_ENV, select_impl, triton_unavailable_reason

Tensor = torch.Tensor
NAMESPACE = _ext.NAMESPACE


@dataclass(frozen=True)
class Autograd:
    """A native op's autograd formula, in torch.library.register_autograd's terms."""

    backward: Callable[..., Any]
    setup_context: Callable[..., None]


class Op:
    """One sp_kernels op: ``Op(...)(*args)`` with ``args`` in schema order runs it.

    ``family`` names ops that choose one implementation together (the merge ops share their native
    kernels' availability and one ``SP_KERNELS_IMPL`` error text); it defaults to the op's name.
    ``grad_takes_torch``: Triton has no backward, so a call that needs gradients takes the
    differentiable torch implementation -- or the native op when it is the choice and has an
    ``autograd`` formula (registered with torch.library.register_autograd).
    """

    def __init__(
        self,
        name: str,
        *,
        reference: Callable[..., Any],
        check: Callable[..., None],
        fake: Callable[..., Any],
        types: Callable[..., tuple[Any, ...]] | None = None,
        triton: Callable[..., Any] | None = None,
        autograd: Autograd | None = None,
        family: str | None = None,
        grad_takes_torch: bool = False,
    ) -> None:
        self.name = name
        self.schema = f"{NAMESPACE}::{name}"
        self.reference = reference
        self.check = check
        self.fake = fake
        self.types = types
        self.triton = triton
        self.autograd = autograd
        self.family = family or name
        self.grad_takes_torch = grad_takes_torch
        self.native: Callable[..., Any] | None = None  # the OpOverload, once registered
        _FAMILIES.setdefault(self.family, []).append(self)

    def __repr__(self) -> str:
        return f"Op({self.schema})"

    def __call__(self, *args: Any) -> Any:
        if self.types is not None:
            args = self.types(*args)
        impl = self._choose(args)
        if impl == "native":
            if torch.compiler.is_compiling():
                # Traced once: the same errors as eager, before the fake impl sees the arguments.
                self.check(*args)
                return self.native(*args)
            try:
                return self.native(*args)
            except RuntimeError as native_error:
                self._explain(native_error, args)
                raise
        self.check(*args)
        if impl == "triton":
            return self.triton(*args)
        return self.reference(*args)

    def _choose(self, args: tuple[Any, ...]) -> str:
        impl = impl_for(self.family, _device_type(args[0]))
        if self.grad_takes_torch and torch.is_grad_enabled():
            for a in args:  # a loop, not any(): this runs on every call
                if isinstance(a, Tensor) and a.requires_grad:
                    # The native op differentiates through its registered formula; Triton has none.
                    native_grad = impl == "native" and self.native is not None and self.autograd is not None
                    return "native" if native_grad else "torch"
        return impl

    def _explain(self, native_error: RuntimeError, args: tuple[Any, ...]) -> None:
        try:
            self.check(*args)
        except (TypeError, ValueError) as exc:
            raise exc from native_error

    def _fake(self, *args: Any) -> Any:
        token = _IN_FAKE.set(True)
        try:
            self.check(*args)
        finally:
            _IN_FAKE.reset(token)
        return self.fake(*args)


_FAMILIES: dict[str, list[Op]] = {}
_IN_FAKE: ContextVar[bool] = ContextVar("sp_kernels_in_fake_impl", default=False)


def in_fake_impl() -> bool:
    """Whether an op's check runs inside its fake impl (fake or meta tensors: shapes, no storage)."""
    return _IN_FAKE.get()


def _device_type(first: Tensor | Sequence[Tensor]) -> str:
    # The first argument of every op is a tensor or a non-empty list of them (the faces check that).
    return (first if isinstance(first, Tensor) else first[0]).device.type


def candidates(family: str, device_type: str) -> dict[str, str | None]:
    """``select_impl``'s candidates for ``family`` on ``device_type``: name -> None, or why not."""
    ops = _FAMILIES[family]
    if all(_ext.has_native_kernel(op.name, device_type) for op in ops):
        native = None
    elif not _ext.load():
        native = f"the native extension sp_kernels._C is not available ({_ext.native_error()})"
    else:
        kernels = "kernels" if len(ops) > 1 else "kernel"
        native = f"the native extension has no {family} {kernels} for device type {device_type!r}"
    found: dict[str, str | None] = {"native": native}
    if any(op.triton is not None for op in ops):
        found["triton"] = triton_unavailable_reason(device_type)
    found["torch"] = None
    return found


@torch.compiler.assume_constant_result
def impl_for(family: str, device_type: str) -> str:
    """The implementation ``family`` uses on ``device_type``.

    A constant for torch.compile: the dispatcher queries behind it cannot be traced, and the choice
    cannot change within one process except through SP_KERNELS_IMPL, read at trace time.
    """
    environ = os.environ
    return _chosen(family, device_type, environ.get(IMPL_ENV, ""), environ.get(INTERPRET_ENV, ""))


@functools.lru_cache(maxsize=256)
def _chosen(family: str, device_type: str, _impl_env: str, _interpret_env: str) -> str:
    # Every op call asks, and building the candidates costs more than a small kernel's launch on a
    # GPU (3.5 us uncached, 1.8 us cached: docs/kernels.md). What decides the answer apart from the
    # arguments: the two environment variables in the key, and extension state that is fixed once the
    # module imported (kernels are registered at import, never after). A refusal raises, uncached.
    return select_impl(family, device_type, candidates(family, device_type))


def register_native(*ops: Op) -> bool:
    """Register the fake impls and autograd formulas of ``ops`` with torch.library.

    Called at the top level of the module that declares ``ops``: torch attributes the fake impls to
    the caller's module and checks it against the ``set_python_module`` of csrc/ops.cpp. False
    (nothing registered) unless the native extension defines every one of them.
    """
    if not (_ext.load() and all(hasattr(torch.ops.sp_kernels, op.name) for op in ops)):
        return False
    for op in ops:
        torch.library.register_fake(op.schema, op._fake, _stacklevel=2)
        if op.autograd is not None:
            torch.library.register_autograd(op.schema, op.autograd.backward, setup_context=op.autograd.setup_context)
        op.native = getattr(torch.ops.sp_kernels, op.name).default
    return True
