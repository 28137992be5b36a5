"""Merging partial attention results over disjoint key blocks, via their log-sum-exp.

For blocks a and b of the same queries: ``lse = max + log1p(exp(min - max))`` and
``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``, in fp32 (fp64 for fp64 inputs).
Not the sigmoid/logsigmoid chain: that needs more passes and loses precision when the two lse
differ a lot. -inf safe: a block with no keys (lse = -inf) contributes nothing, and two empty
blocks give lse = -inf and out = 0, never NaN.

Layouts: out ``[B, S, H, D]``, lse ``[B, H, S]`` (see local.py).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
_NEG_INF = float("-inf")


def _weights(lse_part: Tensor, lse_total: Tensor) -> Tensor:
    # Where the total is -inf every part is -inf too: subtract 0 there so exp gives 0, not NaN.
    safe_total = lse_total.masked_fill(lse_total == _NEG_INF, 0.0)
    return torch.exp(lse_part - safe_total).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]


def merged_lse(lse_a: Tensor, lse_b: Tensor) -> Tensor:
    hi = torch.maximum(lse_a, lse_b)
    lo = torch.minimum(lse_a, lse_b)
    return hi + torch.log1p(torch.exp(lo - hi.masked_fill(hi == _NEG_INF, 0.0)))


def merge_into(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """``(acc_out, acc_lse) <- merge((acc_out, acc_lse), (out, lse))`` in place; acc_* are fp32/fp64."""
    total = merged_lse(acc_lse, lse)
    acc_out.mul_(_weights(acc_lse, total))
    acc_out.addcmul_(out, _weights(lse, total))
    acc_lse.copy_(total)


def merge_all(parts: list[tuple[Tensor, Tensor]], acc_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Merge partials in list order (a fixed order gives bitwise-identical results on every rank)."""
    if not parts:
        raise ValueError("merge_all needs at least one partial result")
    out0, lse0 = parts[0]
    acc_out = out0.to(acc_dtype, copy=True)
    acc_lse = lse0.to(acc_dtype, copy=True)
    for out, lse in parts[1:]:
        merge_into(acc_out, acc_lse, out, lse)
    return acc_out, acc_lse
