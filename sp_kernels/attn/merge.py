"""Merging partial attention results over disjoint key blocks, via their log-sum-exp.

For blocks a and b of the same queries: ``lse = max + log1p(exp(min - max))`` and
``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``, in fp32 (fp64 for fp64 inputs).
Not the sigmoid/logsigmoid chain: that needs more passes and loses precision when the two lse
differ a lot. -inf safe: a block with no keys (lse = -inf) contributes nothing, and two empty
blocks give lse = -inf and out = 0, never NaN.

fp32 accumulators go through the sp_kernels merge ops (sp_kernels/ops/merge.py: one fused pass,
native C++/CUDA or Triton); fp64, mixed dtypes and autograd use the eager torch implementation
there, which is the same math.

Layouts: out ``[B, S, H, D]``, lse ``[B, H, S]`` (see local.py).
"""

from __future__ import annotations

import torch

from ..ops.merge import (
    VALUE_DTYPES,
    lse_merge_,
    lse_merge_all,
    lse_merge_all_torch,
    lse_merge_torch_,
    merged_lse,
)

Tensor = torch.Tensor

__all__ = ["merge_all", "merge_into", "merged_lse"]


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _op_fits(out: Tensor, lse: Tensor) -> bool:
    """Whether the merge ops take this part: fp32 lse, a value dtype they support, head_dim stride 1."""
    return lse.dtype == torch.float32 and out.dtype in VALUE_DTYPES and (out.size(-1) <= 1 or out.stride(-1) == 1)


def merge_into(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """``(acc_out, acc_lse) <- merge((acc_out, acc_lse), (out, lse))`` in place; acc_* are fp32/fp64."""
    if acc_out.dtype == torch.float32 and _op_fits(acc_out, acc_lse) and _op_fits(out, lse):
        if not _needs_grad(acc_out, acc_lse, out, lse):
            lse_merge_(acc_out, acc_lse, out, lse)
            return
    lse_merge_torch_(acc_out, acc_lse, out, lse)


def merge_all(parts: list[tuple[Tensor, Tensor]], acc_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Merge partials in list order (a fixed order gives bitwise-identical results on every rank).

    Returns fresh ``(out, lse)`` in ``acc_dtype``; rows with no keys in any part are 0 with lse -inf.
    """
    if not parts:
        raise ValueError("merge_all needs at least one partial result")
    outs = [o for o, _ in parts]
    lses = [lse for _, lse in parts]
    fits = all(_op_fits(o, lse) for o, lse in parts) and all(o.dtype == outs[0].dtype for o in outs)
    if acc_dtype == torch.float32 and fits and not _needs_grad(*outs, *lses):
        return lse_merge_all(outs, lses, torch.float32)
    return lse_merge_all_torch(outs, lses, acc_dtype, acc_dtype)
