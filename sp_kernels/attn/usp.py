"""USP (Ulysses x Ring): Ulysses all-to-all inside each Ulysses group, Ring across the ring group.

sp_rank = ring_rank * U + ulysses_rank (parallel_state), so Ulysses group ``g`` holds the shards
``g*U .. g*U+U-1`` -- a contiguous stretch of the sequence. After the all-to-all each rank has that
stretch (padding dropped) for its heads; that stretch is its ring block. Ring blocks may differ in
length (the padded tail), which the ring handles without padding.
"""

from __future__ import annotations

import torch

from ..distributed.comm import TorchRingComm
from ._alloc import new_buffer
from .call import AttentionCall, Joint
from .ring import ring_core
from .ulysses import gather_heads, scatter_heads

Tensor = torch.Tensor


def usp_attention(call: AttentionCall, valid: list[int]) -> Tensor:
    """``valid``: valid rows of every SP rank, in sp_rank order."""
    state = call.state
    U, R = state.ulysses_size, state.ring_size
    mine = valid[state.ring_rank * U : (state.ring_rank + 1) * U]
    ring_valid = [sum(valid[r * U : (r + 1) * U]) for r in range(R)]
    q, k, v, joint_heads, stage = scatter_heads(
        call, state.ulysses_group, state.ulysses_rank, mine, with_joint_rows=False
    )
    joint = None
    if call.joint is not None and joint_heads is not None:
        joint = Joint(*joint_heads, strategy=call.joint.strategy)
    J = joint.length if joint is not None else 0
    front = joint is None or joint.strategy == "front"
    S = q.shape[1]
    out = new_buffer((q.shape[0], J + S, q.shape[2], q.shape[3]), q.dtype, q.device)
    seq0 = J if front else 0
    out_joint = None
    if joint is not None:
        out_joint = out[:, :J] if front else out[:, S : S + J]
    ring_core(
        q,
        k,
        v,
        valid=ring_valid,
        comm=TorchRingComm(state.ring_group),
        scale=call.scale,
        causal=call.causal,
        joint=joint,
        out_seq=out[:, seq0 : seq0 + S],
        out_joint=out_joint,
        cache=state.ring_buffers,
        mask=call.mask,
    )
    return gather_heads(stage, out[:, seq0 : seq0 + S], out_joint, joint.strategy if joint is not None else "front")
