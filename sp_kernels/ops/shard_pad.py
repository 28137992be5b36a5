"""shard_pad: cut one rank's shard out of a full sequence and pad it, in one pass.

``shard_pad(x, dim, start, length, pad_value)`` returns a new contiguous tensor ``y`` with
``y.size(dim) == length`` whose row ``i`` along ``dim`` is ``x``'s row ``start + i`` when that row
exists, else ``pad_value``. It replaces pad + chunk + contiguous (three passes) in
``sp_shard(..., auto_pad=True)``.

Native op: ``torch.ops.sp_kernels.shard_pad`` (schema in csrc/ops.cpp). This module registers its
fake impl and autograd formula; the C++ library names this module in ``set_python_module`` so torch
imports it on demand.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _ext
from ._dispatch import select_impl

OP_NAME = "shard_pad"
QUALNAME = "sp_kernels::shard_pad"

SUPPORTED_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _validate(x: torch.Tensor, dim: int, start: int, length: int, pad_value: float) -> int:
    """Checks every argument before any kernel runs; returns ``dim`` made non-negative."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"shard_pad: x must be a torch.Tensor, got {type(x).__name__}")
    shape = tuple(x.shape)
    where = f"(x of shape {shape}, dtype {x.dtype})"
    if x.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise ValueError(f"shard_pad: unsupported dtype {x.dtype} for x of shape {shape} (supported: {names})")
    if x.dim() == 0:
        raise ValueError("shard_pad: x must have at least one dimension, got a 0-dim tensor")
    for name, value in (("dim", dim), ("start", start), ("length", length)):
        if not _is_int(value):
            raise TypeError(f"shard_pad: {name} must be an int, got {type(value).__name__} {where}")
    ndim = x.dim()
    if not -ndim <= dim < ndim:
        raise ValueError(f"shard_pad: dim must be in [{-ndim}, {ndim}) for x of shape {shape}, got {dim}")
    if start < 0:
        raise ValueError(f"shard_pad: start must be >= 0, got {start} {where}")
    if length < 0:
        raise ValueError(f"shard_pad: length must be >= 0, got {length} {where}")
    if not isinstance(pad_value, numbers.Real):
        raise TypeError(f"shard_pad: pad_value must be a real number, got {type(pad_value).__name__} {where}")
    if x.dtype == torch.bool:
        if pad_value not in (0, 1):
            raise ValueError(f"shard_pad: pad_value must be 0 or 1 for dtype bool, got {pad_value} {where}")
    elif not x.dtype.is_floating_point:
        info = torch.iinfo(x.dtype)
        if not (math.isfinite(pad_value) and float(pad_value).is_integer() and info.min <= pad_value <= info.max):
            raise ValueError(
                f"shard_pad: pad_value must be an integer in [{info.min}, {info.max}] for dtype {x.dtype}, "
                f"got {pad_value} {where}"
            )
    return dim + ndim if dim < 0 else dim


def valid_rows(n: int, start: int, length: int) -> int:
    """Rows of the output that come from the input; the remaining ``length - valid_rows`` are padding."""
    return max(0, min(n - start, length))


def shard_pad_reference(x: torch.Tensor, dim: int, start: int, length: int, pad_value: float = 0.0) -> torch.Tensor:
    """Pure-torch shard_pad (same semantics as the native op; differentiable through autograd).

    Allocates the output once and writes each part once, so it is also the fast path on devices
    without a native kernel. ``dim`` must already be non-negative.
    """
    n_valid = valid_rows(x.size(dim), start, length)
    shape = list(x.shape)
    shape[dim] = length
    y = x.new_empty(shape)
    y.narrow(dim, 0, n_valid).copy_(x.narrow(dim, min(start, x.size(dim)), n_valid))
    y.narrow(dim, n_valid, length - n_valid).fill_(pad_value)
    return y


def _candidates(device_type: str) -> dict[str, str | None]:
    if _ext.has_native_kernel(OP_NAME, device_type):
        native = None
    elif not _ext.load():
        native = f"the native extension sp_kernels._C is not available ({_ext.native_error()})"
    else:
        native = f"the native extension has no {OP_NAME} kernel for device type {device_type!r}"
    return {"native": native, "torch": None}


@torch.compiler.assume_constant_result
def _impl_for(device_type: str) -> str:
    # A constant for torch.compile: the dispatcher queries behind it cannot be traced, and the
    # choice cannot change within one process except through SP_KERNELS_IMPL, read at trace time.
    return select_impl(OP_NAME, device_type, _candidates(device_type))


def shard_pad(x: torch.Tensor, dim: int, start: int, length: int, pad_value: float = 0.0) -> torch.Tensor:
    """Rows ``[start, start + length)`` of ``x`` along ``dim`` as a new contiguous tensor, rows past
    the end of ``x`` filled with ``pad_value``.

    ``dim`` may be negative; ``start`` and ``length`` must be >= 0 (``start`` may lie past the end,
    giving all padding). Supports float32/64, float16, bfloat16, integer types and bool, any strides.
    Uses the native kernel for ``x``'s device when one is registered, else a pure-torch fallback;
    ``SP_KERNELS_IMPL=native|torch`` forces one. Differentiable either way.
    """
    dim = _validate(x, dim, start, length, pad_value)
    if _impl_for(x.device.type) == "native":
        return torch.ops.sp_kernels.shard_pad.default(x, dim, start, length, float(pad_value))
    return shard_pad_reference(x, dim, start, length, pad_value)


def _shard_pad_fake(x: torch.Tensor, dim: int, start: int, length: int, pad_value: float) -> torch.Tensor:
    ndim = x.dim()
    torch._check(ndim > 0, lambda: "shard_pad: x must have at least one dimension, got a 0-dim tensor")
    torch._check(-ndim <= dim < ndim, lambda: f"shard_pad: dim must be in [{-ndim}, {ndim}), got {dim}")
    torch._check(start >= 0, lambda: f"shard_pad: start must be >= 0, got {start}")
    torch._check(length >= 0, lambda: f"shard_pad: length must be >= 0, got {length}")
    shape = list(x.shape)
    shape[dim] = length
    return x.new_empty(shape)


def _setup_context(ctx, inputs, output) -> None:
    x, dim, start, length, _ = inputs
    ctx.x_shape = tuple(x.shape)
    ctx.dim = dim + x.dim() if dim < 0 else dim
    ctx.start = start
    ctx.length = length


def _shard_pad_backward(ctx, grad: torch.Tensor):
    # x's rows [start, start + n_valid) received grad's first n_valid rows; every other row of x
    # (before the shard, or past it) did not reach the output. One cat writes grad_x exactly once.
    dim = ctx.dim
    n = ctx.x_shape[dim]
    n_valid = valid_rows(n, ctx.start, ctx.length)
    before = min(ctx.start, n)
    after = n - before - n_valid

    def zeros(rows: int) -> torch.Tensor:
        shape = list(ctx.x_shape)
        shape[dim] = rows
        return grad.new_zeros(shape)

    grad_x = torch.cat([zeros(before), grad.narrow(dim, 0, n_valid), zeros(after)], dim=dim)
    return grad_x, None, None, None, None


def _register_native_op() -> bool:
    if not (_ext.load() and hasattr(torch.ops.sp_kernels, OP_NAME)):
        return False
    torch.library.register_fake(QUALNAME, _shard_pad_fake)
    torch.library.register_autograd(QUALNAME, _shard_pad_backward, setup_context=_setup_context)
    return True


NATIVE_OP_REGISTERED = _register_native_op()
