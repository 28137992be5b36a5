"""LSE merge of partial attention results over disjoint key blocks.

For the same queries attended to blocks a and b, with outputs ``out_*`` ``[B, S, H, D]`` and
log-sum-exps ``lse_*`` ``[B, H, S]``::

    lse = hi + log1p(exp(lo - hi))            hi/lo = max/min(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

in fp32. A row whose parts are all ``-inf`` (no keys in any block) gets ``lse = -inf`` and
``out = 0``, never NaN; an empty block merged with a real one leaves the real one unchanged.

Ops (schemas in csrc/ops.cpp, contract in csrc/merge/merge.h):

- ``lse_merge_(acc_out, acc_lse, block_out, block_lse)``: per-step merge, in place into the fp32
  accumulator.
- ``lse_merge_out(acc_out, acc_lse, block_out, block_lse, out, lse)``: the same merge written into
  ``out`` (fp32/fp16/bf16) instead: the ring's last step writes its final output directly, saving
  the separate fp32 -> bf16 conversion pass.
- ``lse_merge_all(outs, lses, out_dtype)`` / ``lse_merge_all_out(outs, lses, out, lse)``: W-way
  merge of W partial results in one pass (max over W first), written in the requested dtype.

Inputs may have any strides over B, S, H (what attention kernels produce); head_dim must have
stride 1. Implementations: native C++ (CPU) / CUDA, Triton (CUDA, or CPU under
``TRITON_INTERPRET=1``), and pure torch (``lse_merge_torch_``/``lse_merge_all_torch``: the eager
log1p merge, also the reference the others are tested against). ``SP_KERNELS_IMPL`` forces one
for all four ops together (they are one family in sp_kernels/ops/_registry.py). No autograd: the merge policy at the end of this module
(``merge_into``, ``merge_all``) takes the torch implementation when gradients are needed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ._checks import same_device, tensor, typed
from ._registry import Op, candidates, in_fake_impl, register_native

Tensor = torch.Tensor

VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# torch implementation (the eager log1p merge; dtype-generic, also serves fp64 and autograd)
# ---------------------------------------------------------------------------------------------


def _weights(lse_part: Tensor, lse_total: Tensor) -> Tensor:
    # Where the total is -inf every part is -inf too: subtract 0 there so exp gives 0, not NaN.
    safe_total = lse_total.masked_fill(lse_total == _NEG_INF, 0.0)
    return torch.exp(lse_part - safe_total).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]


def merged_lse(lse_a: Tensor, lse_b: Tensor) -> Tensor:
    """``max + log1p(exp(min - max))``, -inf safe."""
    hi = torch.maximum(lse_a, lse_b)
    lo = torch.minimum(lse_a, lse_b)
    return hi + torch.log1p(torch.exp(lo - hi.masked_fill(hi == _NEG_INF, 0.0)))


def lse_merge_out_torch(
    acc_out: Tensor, acc_lse: Tensor, block_out: Tensor, block_lse: Tensor, out: Tensor, lse: Tensor
) -> None:
    """Eager merge of (acc, block) written into (out, lse); ``out`` may be ``acc_out`` (in place)."""
    total = merged_lse(acc_lse, block_lse)
    merged = acc_out * _weights(acc_lse, total)
    merged.addcmul_(block_out, _weights(block_lse, total))
    out.copy_(merged)
    lse.copy_(total)


def lse_merge_torch_(acc_out: Tensor, acc_lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Eager in-place merge: ``acc_out`` scaled and accumulated in place (no temporary of its size)."""
    total = merged_lse(acc_lse, block_lse)
    acc_out.mul_(_weights(acc_lse, total))
    acc_out.addcmul_(block_out, _weights(block_lse, total))
    acc_lse.copy_(total)


def lse_merge_all_torch(
    outs: Sequence[Tensor], lses: Sequence[Tensor], out_dtype: torch.dtype, acc_dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Eager W-way merge: fold the parts in list order into an ``acc_dtype`` accumulator."""
    acc_out = outs[0].to(acc_dtype, copy=True)
    acc_lse = lses[0].to(acc_dtype, copy=True)
    # Rows with no keys anywhere are 0 for every W, W = 1 included (a fold would keep part 0's values).
    acc_out.mul_(_weights(acc_lse, acc_lse))
    for o, lse in zip(outs[1:], lses[1:]):
        lse_merge_torch_(acc_out, acc_lse, o, lse)
    return acc_out.to(out_dtype), acc_lse


# ---------------------------------------------------------------------------------------------
# argument checks (messages as csrc/merge/merge.h's, in Python's spelling)
# ---------------------------------------------------------------------------------------------


def _check_out(op: str, name: str, t: Tensor, shape: tuple[int, ...] | None, like: str, fp32: bool) -> None:
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D [B, S, H, D], got shape {tuple(t.shape)}")
    if fp32 and t.dtype != torch.float32:
        raise ValueError(f"{op}: {name} must be float32 (the fp32 accumulator), got {t.dtype}")
    if not fp32 and t.dtype not in VALUE_DTYPES:
        raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {list(shape)} like {like}, got {list(t.shape)}")
    if t.size(3) > 1 and t.stride(3) != 1:
        raise ValueError(
            f"{op}: {name} must have stride 1 in its last (head_dim) dimension, got strides {tuple(t.stride())}"
        )


def _check_lse(op: str, name: str, t: Tensor, shape: tuple[int, ...], like: str) -> None:
    if t.dtype != torch.float32:
        raise ValueError(f"{op}: {name} must be float32, got {t.dtype}")
    B, S, H, _ = shape
    if tuple(t.shape) != (B, H, S):
        raise ValueError(f"{op}: {name} must have shape [B, H, S] = {[B, H, S]} to match {like}, got {list(t.shape)}")


def _overlaps(a: Tensor, b: Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    # Same storage: compare the byte extents each view touches (conservative, as at::assert_no_overlap).
    def extent(t: Tensor) -> tuple[int, int]:
        lo = t.storage_offset() * t.element_size()
        span = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
        return lo, lo + (span + 1) * t.element_size()

    (a0, a1), (b0, b1) = extent(a), extent(b)
    return a0 < b1 and b0 < a1


def _check_memory(op: str, pairs: Sequence[tuple[str, Tensor, str, Tensor]], written: dict[str, Tensor]) -> None:
    # Storage pointers exist neither while torch.compile traces nor in a fake impl; there the checks
    # are left to the native op's TORCH_CHECKs (merge.h), which run with the real tensors.
    if torch.compiler.is_compiling() or in_fake_impl():
        return
    for na, a, nb, b in pairs:
        if _overlaps(a, b):
            raise ValueError(f"{op}: {na} and {nb} overlap in memory; the merge reads one while writing the other")
    for name, t in written.items():
        if torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(
                f"{op}: {name} has overlapping elements (an expanded or broadcast view) and cannot be written"
            )


def _check_pair(op: str, acc_out: Tensor, acc_lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[int, ...]:
    _check_out(op, "acc_out", acc_out, None, "", fp32=True)
    shape = tuple(acc_out.shape)
    _check_lse(op, "acc_lse", acc_lse, shape, "acc_out")
    _check_out(op, "block_out", block_out, shape, "acc_out", fp32=False)
    _check_lse(op, "block_lse", block_lse, shape, "acc_out")
    for name, t in (("acc_lse", acc_lse), ("block_out", block_out), ("block_lse", block_lse)):
        same_device(op, name, t, acc_out, "acc_out")
    return shape


def _check_dest(op: str, out: Tensor, lse: Tensor, shape: tuple[int, ...], ref: Tensor, ref_name: str) -> None:
    _check_out(op, "out", out, shape, ref_name, fp32=False)
    _check_lse(op, "lse", lse, shape, ref_name)
    same_device(op, "out", out, ref, ref_name)
    same_device(op, "lse", lse, ref, ref_name)


def _check_merge_(acc_out: Tensor, acc_lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    op = "lse_merge_"
    _check_pair(op, acc_out, acc_lse, block_out, block_lse)
    pairs = [
        ("acc_out", acc_out, "block_out", block_out),
        ("acc_lse", acc_lse, "block_lse", block_lse),
        ("acc_out", acc_out, "acc_lse", acc_lse),
    ]
    _check_memory(op, pairs, {"acc_out": acc_out, "acc_lse": acc_lse})


def _check_merge_out(
    acc_out: Tensor, acc_lse: Tensor, block_out: Tensor, block_lse: Tensor, out: Tensor, lse: Tensor
) -> None:
    op = "lse_merge_out"
    shape = _check_pair(op, acc_out, acc_lse, block_out, block_lse)
    _check_dest(op, out, lse, shape, acc_out, "acc_out")
    pairs = [
        ("out", out, "acc_out", acc_out),
        ("out", out, "block_out", block_out),
        ("lse", lse, "acc_lse", acc_lse),
        ("lse", lse, "block_lse", block_lse),
        ("out", out, "lse", lse),
    ]
    _check_memory(op, pairs, {"out": out, "lse": lse})


def _check_nonempty(op: str, outs: Sequence[Tensor]) -> None:
    if not outs:
        raise ValueError(f"{op}: outs must hold at least one partial output, got an empty list")


def _check_ways(op: str, outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[int, ...]:
    _check_nonempty(op, outs)
    if len(outs) != len(lses):
        raise ValueError(f"{op}: outs and lses must have the same length, got {len(outs)} and {len(lses)}")
    _check_out(op, "outs[0]", outs[0], None, "", fp32=False)
    shape = tuple(outs[0].shape)
    for i, (o, lse) in enumerate(zip(outs, lses)):
        _check_out(op, f"outs[{i}]", o, shape, "outs[0]", fp32=False)
        if o.dtype != outs[0].dtype:
            raise ValueError(
                f"{op}: outs[{i}] has dtype {o.dtype} but outs[0] has {outs[0].dtype} "
                "(all partial outputs must share one dtype)"
            )
        _check_lse(op, f"lses[{i}]", lse, shape, "outs[0]")
        same_device(op, f"outs[{i}]", o, outs[0], "outs[0]")
        same_device(op, f"lses[{i}]", lse, outs[0], "outs[0]")
    return shape


def _check_merge_all(outs: Sequence[Tensor], lses: Sequence[Tensor], out_dtype: torch.dtype) -> None:
    op = "lse_merge_all"
    _check_ways(op, outs, lses)
    if out_dtype not in VALUE_DTYPES:
        raise ValueError(f"{op}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")


def _check_merge_all_out(outs: Sequence[Tensor], lses: Sequence[Tensor], out: Tensor, lse: Tensor) -> None:
    op = "lse_merge_all_out"
    shape = _check_ways(op, outs, lses)
    _check_dest(op, out, lse, shape, outs[0], "outs[0]")
    pairs = [("out", out, f"outs[{i}]", o) for i, o in enumerate(outs)]
    pairs += [("lse", lse, f"lses[{i}]", x) for i, x in enumerate(lses)]
    _check_memory(op, pairs + [("out", out, "lse", lse)], {"out": out, "lse": lse})


def _as_parts(op: str, name: str, parts: Sequence[Tensor] | Tensor, dim: int) -> list[Tensor]:
    if isinstance(parts, torch.Tensor):
        if parts.dim() != dim:
            raise ValueError(f"{op}: {name} given as one tensor must be {dim}-D (W first), got {tuple(parts.shape)}")
        return list(parts.unbind(0))  # views: no copy
    if not isinstance(parts, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list of tensors or one stacked tensor, got {type(parts).__name__}")
    return [tensor(op, f"{name}[{i}]", t) for i, t in enumerate(parts)]


# ---------------------------------------------------------------------------------------------
# Triton glue, the W-way merge into fresh tensors, fake impls
# ---------------------------------------------------------------------------------------------


def _triton():
    from .triton import merge as triton_merge

    return triton_merge


def _merge_pair_triton_(acc_out: Tensor, acc_lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    _triton().merge_pair(acc_out, acc_lse, block_out, block_lse, acc_out, acc_lse)


def _merge_pair_triton_out(acc_out, acc_lse, block_out, block_lse, out, lse) -> None:
    _triton().merge_pair(acc_out, acc_lse, block_out, block_lse, out, lse)


def _merge_ways_triton(outs: Sequence[Tensor], lses: Sequence[Tensor], out: Tensor, lse: Tensor) -> None:
    _triton().merge_ways(outs, lses, out, lse)


def _merge_ways_torch(outs: Sequence[Tensor], lses: Sequence[Tensor], out: Tensor, lse: Tensor) -> None:
    merged, merged_lse_ = lse_merge_all_torch(outs, lses, out.dtype)
    out.copy_(merged)
    lse.copy_(merged_lse_)


def _new_dest(outs: Sequence[Tensor], lses: Sequence[Tensor], out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    B, S, H, D = outs[0].shape
    return outs[0].new_empty((B, S, H, D), dtype=out_dtype), lses[0].new_empty((B, H, S))


def _into_new(merge_into):
    """``lse_merge_all`` from an ``lse_merge_all_out`` implementation: the same pass into fresh tensors."""

    def merge(outs: Sequence[Tensor], lses: Sequence[Tensor], out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        out, lse = _new_dest(outs, lses, out_dtype)
        merge_into(outs, lses, out, lse)
        return out, lse

    return merge


def _no_result(*args) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# the ops and their public faces
# ---------------------------------------------------------------------------------------------

_FAMILY = "lse_merge"
LSE_MERGE_ = Op(
    "lse_merge_",
    family=_FAMILY,
    types=typed("lse_merge_", acc_out=tensor, acc_lse=tensor, block_out=tensor, block_lse=tensor),
    check=_check_merge_,
    reference=lse_merge_torch_,
    triton=_merge_pair_triton_,
    fake=_no_result,
)
LSE_MERGE_OUT = Op(
    "lse_merge_out",
    family=_FAMILY,
    types=typed(
        "lse_merge_out", acc_out=tensor, acc_lse=tensor, block_out=tensor, block_lse=tensor, out=tensor, lse=tensor
    ),
    check=_check_merge_out,
    reference=lse_merge_out_torch,
    triton=_merge_pair_triton_out,
    fake=_no_result,
)
LSE_MERGE_ALL = Op(
    "lse_merge_all",
    family=_FAMILY,
    check=_check_merge_all,
    reference=_into_new(_merge_ways_torch),
    triton=_into_new(_merge_ways_triton),
    fake=_new_dest,
)
LSE_MERGE_ALL_OUT = Op(
    "lse_merge_all_out",
    family=_FAMILY,
    check=_check_merge_all_out,
    reference=_merge_ways_torch,
    triton=_merge_ways_triton,
    fake=_no_result,
)
OPS = ("lse_merge_", "lse_merge_out", "lse_merge_all", "lse_merge_all_out")

# Benchmarks ask this of the family by device (benchmarks/bench_merge.py).
_candidates = functools.partial(candidates, _FAMILY)


def lse_merge_(acc_out: Tensor, acc_lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """``(acc_out, acc_lse) <- merge((acc_out, acc_lse), (block_out, block_lse))`` in place.

    ``acc_out`` fp32 ``[B, S, H, D]``, ``acc_lse`` fp32 ``[B, H, S]``; ``block_out`` fp32/fp16/bf16
    ``[B, S, H, D]``, ``block_lse`` fp32 ``[B, H, S]``. Any strides over B, S, H; head_dim stride 1.
    """
    LSE_MERGE_(acc_out, acc_lse, block_out, block_lse)


def lse_merge_out(
    acc_out: Tensor, acc_lse: Tensor, block_out: Tensor, block_lse: Tensor, out: Tensor, lse: Tensor
) -> None:
    """``(out, lse) <- merge((acc_out, acc_lse), (block_out, block_lse))``; the accumulator is not modified.

    ``out`` fp32/fp16/bf16 (the final output dtype: one pass instead of merge + convert), ``lse`` fp32.
    Destinations must not overlap the inputs.
    """
    LSE_MERGE_OUT(acc_out, acc_lse, block_out, block_lse, out, lse)


def lse_merge_all(
    outs: Sequence[Tensor] | Tensor,
    lses: Sequence[Tensor] | Tensor,
    out_dtype: torch.dtype = torch.float32,
    *,
    out: Tensor | None = None,
    lse: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """W-way merge of partial results in one pass -> ``(out [B, S, H, D] in out_dtype, lse [B, H, S] fp32)``.

    ``outs``: a list of W ``[B, S, H, D]`` tensors of one dtype (fp32/fp16/bf16) or one ``[W, B, S, H, D]``
    tensor; ``lses``: W fp32 ``[B, H, S]`` or one ``[W, B, H, S]``. With ``out``/``lse`` given (both),
    writes into them (any B/S/H strides, e.g. a slice of a larger result) and ``out_dtype`` is ignored.
    """
    op = "lse_merge_all"
    out_list = _as_parts(op, "outs", outs, 5)
    lse_list = _as_parts(op, "lses", lses, 4)
    _check_nonempty(op, out_list)  # the implementation is chosen by outs[0]'s device
    if (out is None) != (lse is None):
        raise ValueError(f"{op}: give both out and lse, or neither")
    if out is None:
        return LSE_MERGE_ALL(out_list, lse_list, out_dtype)
    tensor(op, "out", out)
    tensor(op, "lse", lse)
    LSE_MERGE_ALL_OUT(out_list, lse_list, out, lse)
    return out, lse


NATIVE_OPS_REGISTERED = register_native(LSE_MERGE_, LSE_MERGE_OUT, LSE_MERGE_ALL, LSE_MERGE_ALL_OUT)


# ---------------------------------------------------------------------------------------------
# the merge policy: the one place that decides which implementation merges partial results
# ---------------------------------------------------------------------------------------------
# The ops take fp32 accumulators and lses, value dtypes in VALUE_DTYPES with head_dim stride 1, and
# have no backward; anything else (fp64, mixed part dtypes, tensors that need gradients) takes the
# eager torch merge above, which is the same math.


def _op_fits(out: Tensor, lse: Tensor) -> bool:
    return lse.dtype == torch.float32 and out.dtype in VALUE_DTYPES and (out.size(-1) <= 1 or out.stride(-1) == 1)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def merge_into(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """``(acc_out, acc_lse) <- merge((acc_out, acc_lse), (out, lse))`` in place; acc_* are fp32/fp64."""
    if (
        acc_out.dtype == torch.float32
        and _op_fits(acc_out, acc_lse)
        and _op_fits(out, lse)
        and not _needs_grad(acc_out, acc_lse, out, lse)
    ):
        lse_merge_(acc_out, acc_lse, out, lse)
    else:
        lse_merge_torch_(acc_out, acc_lse, out, lse)


def merge_all(
    parts: Sequence[tuple[Tensor, Tensor]], acc_dtype: torch.dtype, *, dest: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Merge partials ``(out, lse)`` in list order (a fixed order gives bitwise-identical results on
    every rank) -> ``(out, lse)``; rows with no keys in any part are 0 with lse -inf.

    Without ``dest`` the result is fresh, in ``acc_dtype``. With ``dest`` (any B/S/H strides, e.g. a
    slice of the final output) the merge is written straight into it in dest's dtype -- one W-way
    pass and no fp32 intermediate when the op takes the parts.
    """
    if not parts:
        raise ValueError("merge_all needs at least one partial result")
    outs = [o for o, _ in parts]
    lses = [lse for _, lse in parts]
    fits = (
        acc_dtype == torch.float32
        and all(_op_fits(o, lse) for o, lse in parts)
        and all(o.dtype == outs[0].dtype for o in outs)
        and not _needs_grad(*outs, *lses)
    )
    if dest is None:
        return lse_merge_all(outs, lses, torch.float32) if fits else lse_merge_all_torch(outs, lses, acc_dtype, acc_dtype)
    if fits and dest.dtype in VALUE_DTYPES and (dest.shape[-1] <= 1 or dest.stride(-1) == 1):
        B, S, H, _ = dest.shape
        lse = torch.empty((B, H, S), dtype=torch.float32, device=dest.device)  # small scratch (no D)
        return lse_merge_all(outs, lses, out=dest, lse=lse)
    merged, lse = lse_merge_all_torch(outs, lses, acc_dtype, acc_dtype)
    dest.copy_(merged)
    return dest, lse
