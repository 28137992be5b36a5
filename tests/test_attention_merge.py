"""LSE merge: equals attention over the union of key blocks, -inf safe, order-stable."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sp_kernels.attn.local import block_attention
from sp_kernels.ops.merge import merge_all, merge_into, merged_lse
from tests.attention_reference import random_qkv, reference_attention, reference_lse


@settings(max_examples=25, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 12), min_size=1, max_size=5),
    heads=st.sampled_from([(2, 2), (4, 1), (6, 3)]),
    seed=st.integers(0, 10**6),
)
def test_merging_blocks_equals_full_attention(cuts, heads, seed):
    """Split the keys into blocks (some empty), attend each, merge: same as one attention."""
    total = sum(cuts)
    if total == 0:
        cuts = cuts + [3]
        total = 3
    q, _, _ = random_qkv(seed, 2, 7, heads[0], heads[1], 16, torch.float64)
    _, k, v = random_qkv(seed + 1, 2, total, heads[0], heads[1], 16, torch.float64)
    parts, start = [], 0
    for n in cuts:
        parts.append(block_attention(q, k[:, start : start + n], v[:, start : start + n], softmax_scale=0.4))
        start += n
    out, lse = merge_all(parts, torch.float64)
    torch.testing.assert_close(out, reference_attention(q, k, v, scale=0.4), atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, reference_lse(q, k, scale=0.4), atol=1e-12, rtol=0)


def test_all_empty_blocks_give_zero_not_nan():
    acc = torch.zeros(1, 3, 2, 4)
    acc_lse = torch.full((1, 2, 3), float("-inf"))
    merge_into(acc, acc_lse, torch.zeros(1, 3, 2, 4), torch.full((1, 2, 3), float("-inf")))
    assert torch.equal(acc, torch.zeros_like(acc)) and torch.isneginf(acc_lse).all()
    # An empty block merged with a real one leaves the real one unchanged.
    out = torch.randn(1, 3, 2, 4)
    lse = torch.randn(1, 2, 3)
    merge_into(acc, acc_lse, out, lse)
    assert torch.equal(acc, out) and torch.equal(acc_lse, lse)


def test_merge_is_stable_for_far_apart_lse():
    # exp(lse) overflows fp32 here; the log1p form never exponentiates a large number.
    a, b = torch.tensor([[[300.0]]]), torch.tensor([[[-300.0]]])
    assert torch.isclose(merged_lse(a, b), a).all()
    assert torch.isclose(merged_lse(torch.tensor([[[5.0]]]), torch.tensor([[[5.0]]])), torch.tensor(5.0 + 0.6931471805599453))
    acc = torch.ones(1, 1, 1, 2)
    acc_lse = a.clone()
    merge_into(acc, acc_lse, torch.full((1, 1, 1, 2), 7.0), b)
    assert torch.isfinite(acc).all() and torch.allclose(acc, torch.ones_like(acc))


def test_bf16_partials_merge_in_fp32():
    q, k, v = random_qkv(11, 1, 64, 2, 2, 32, torch.bfloat16)
    parts = [block_attention(q, k[:, i : i + 16], v[:, i : i + 16]) for i in range(0, 64, 16)]
    out, lse = merge_all(parts, torch.float32)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    ref = reference_attention(q, k, v, scale=32**-0.5)
    single, _ = block_attention(q, k, v)
    err = (out.to(torch.bfloat16).double() - ref).abs().max().item()
    assert err <= 3 * (single.double() - ref).abs().max().item()


def test_merge_all_needs_parts():
    with pytest.raises(ValueError, match="at least one"):
        merge_all([], torch.float32)
