"""shard_pad: cut one rank's shard out of a full sequence and pad it, in one pass.

``shard_pad(x, dim, start, length, pad_value)`` returns a new contiguous tensor ``y`` with
``y.size(dim) == length`` whose row ``i`` along ``dim`` is ``x``'s row ``start + i`` when that row
exists, else ``pad_value``. It replaces pad + chunk + contiguous (three passes) in
``sp_shard(..., auto_pad=True)``.

Native op: ``torch.ops.sp_kernels.shard_pad`` (schema in csrc/ops.cpp, checks in
csrc/shard_pad/shard_pad_prepare.cpp). The C++ library names this module in ``set_python_module`` so torch
imports it, and with it the fake impl and autograd formula, on demand.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._checks import integer
from ._registry import Autograd, Op, register_native

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


def _where(x: torch.Tensor) -> str:
    return f"(x of shape {tuple(x.shape)}, dtype {x.dtype})"


def _types(x: torch.Tensor, dim: int, start: int, length: int, pad_value: float) -> tuple:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"shard_pad: x must be a torch.Tensor, got {type(x).__name__}")
    for name, value in (("dim", dim), ("start", start), ("length", length)):
        integer("shard_pad", name, value, lambda: _where(x))
    if not isinstance(pad_value, numbers.Real):
        raise TypeError(f"shard_pad: pad_value must be a real number, got {type(pad_value).__name__} {_where(x)}")
    # Ints stay exact for the torch path (an int64 pad past 2**53); other reals become the schema's float.
    return x, dim, start, length, pad_value if isinstance(pad_value, int) else float(pad_value)


def _check(x: torch.Tensor, dim: int, start: int, length: int, pad_value: float) -> None:
    shape = tuple(x.shape)
    if x.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise ValueError(f"shard_pad: unsupported dtype {x.dtype} for x (supported: {names}); x has shape {shape}")
    ndim = x.dim()
    if ndim == 0:
        raise ValueError("shard_pad: x must have at least one dimension, got a 0-dim tensor")
    if not -ndim <= dim < ndim:
        raise ValueError(f"shard_pad: dim must be in [{-ndim}, {ndim}) for x of shape {shape}, got {dim}")
    if start < 0:
        raise ValueError(f"shard_pad: start must be >= 0, got {start} {_where(x)}")
    if length < 0:
        raise ValueError(f"shard_pad: length must be >= 0, got {length} {_where(x)}")
    if x.dtype == torch.bool:
        if pad_value not in (0, 1):
            raise ValueError(f"shard_pad: pad_value must be 0 or 1 for dtype bool, got {pad_value:g} {_where(x)}")
    elif not x.dtype.is_floating_point:
        info = torch.iinfo(x.dtype)
        if not (math.isfinite(pad_value) and float(pad_value).is_integer() and info.min <= pad_value <= info.max):
            raise ValueError(
                f"shard_pad: pad_value must be an integer in [{info.min}, {info.max}] for dtype {x.dtype}, "
                f"got {pad_value:g} {_where(x)}"
            )


def valid_rows(n: int, start: int, length: int) -> int:
    """Rows of the output that come from the input; the remaining ``length - valid_rows`` are padding."""
    return max(0, min(n - start, length))


def _out_shape(in_shape: torch.Size | tuple[int, ...], dim: int, length: int) -> list[int]:
    shape = list(in_shape)
    shape[dim] = length
    return shape


def shard_pad_reference(x: torch.Tensor, dim: int, start: int, length: int, pad_value: float = 0.0) -> torch.Tensor:
    """Pure-torch shard_pad (same semantics as the native op; differentiable through autograd).

    Allocates the output once and writes each part once, so it is also the fast path on devices
    without a native kernel. ``dim`` may be negative.
    """
    n_valid = valid_rows(x.size(dim), start, length)
    y = x.new_empty(_out_shape(x.shape, dim, length))
    y.narrow(dim, 0, n_valid).copy_(x.narrow(dim, min(start, x.size(dim)), n_valid))
    y.narrow(dim, n_valid, length - n_valid).fill_(pad_value)
    return y


def _fake(x: torch.Tensor, dim: int, start: int, length: int, pad_value: float) -> torch.Tensor:
    return x.new_empty(_out_shape(x.shape, dim, length))


def _setup_context(ctx, inputs, output) -> None:
    x, dim, start, length, _ = inputs
    ctx.x_shape = tuple(x.shape)
    ctx.dim = dim + x.dim() if dim < 0 else dim
    ctx.start = start
    ctx.length = length


def _backward(ctx, grad: torch.Tensor):
    # x's rows [start, start + n_valid) received grad's first n_valid rows; every other row of x
    # (before the shard, or past it) did not reach the output. One cat writes grad_x exactly once.
    dim = ctx.dim
    n = ctx.x_shape[dim]
    n_valid = valid_rows(n, ctx.start, ctx.length)
    before = min(ctx.start, n)
    after = n - before - n_valid

    def zeros(rows: int) -> torch.Tensor:
        return grad.new_zeros(_out_shape(ctx.x_shape, dim, rows))

    grad_x = torch.cat([zeros(before), grad.narrow(dim, 0, n_valid), zeros(after)], dim=dim)
    return grad_x, None, None, None, None


SHARD_PAD = Op(
    "shard_pad",
    types=_types,
    check=_check,
    reference=shard_pad_reference,
    fake=_fake,
    autograd=Autograd(_backward, _setup_context),
)


def shard_pad(x: torch.Tensor, dim: int, start: int, length: int, pad_value: float = 0.0) -> torch.Tensor:
    """Rows ``[start, start + length)`` of ``x`` along ``dim`` as a new contiguous tensor, rows past
    the end of ``x`` filled with ``pad_value``.

    ``dim`` may be negative; ``start`` and ``length`` must be >= 0 (``start`` may lie past the end,
    giving all padding). Supports float32/64, float16, bfloat16, integer types and bool, any strides.
    Uses the native kernel for ``x``'s device when one is registered, else a pure-torch fallback;
    ``SP_KERNELS_IMPL=native|torch`` forces one. Differentiable either way.
    """
    return SHARD_PAD(x, dim, start, length, pad_value)


NATIVE_OPS_REGISTERED = register_native(SHARD_PAD)
