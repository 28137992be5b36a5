"""An independent attention reference and input builders shared by the attention tests.

The reference is plain softmax(Q K^T * scale) V over the full concatenated sequence in float64,
with its own mask and GQA handling: it shares no code with sp_kernels.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    causal: bool = False,
    joint: tuple[Tensor, Tensor, Tensor] | None = None,
    strategy: str = "front",
) -> Tensor:
    """Full-sequence float64 attention, BSHD; with joint tokens the rows are in strategy order."""
    if joint is not None:
        parts = list(zip(joint, (q, k, v)))
        q, k, v = (torch.cat([j, x] if strategy == "front" else [x, j], dim=1) for j, x in parts)
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[2] // k.shape[2]
    k = torch.repeat_interleave(k, group, dim=2)
    v = torch.repeat_interleave(v, group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        n = scores.shape[-1]
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)


def reference_lse(q: Tensor, k: Tensor, *, scale: float, causal: bool = False) -> Tensor:
    """[B, H, Sq] log-sum-exp of the scaled scores, float64."""
    group = q.shape[2] // k.shape[2]
    k = torch.repeat_interleave(k.double(), group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) * scale
    if causal:
        n = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.logsumexp(scores, dim=-1)


def random_qkv(
    seed: int, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Deterministic inputs: every rank building them from the same seed gets the same tensors."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, seq, kv_heads, head_dim, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)
