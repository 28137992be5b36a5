"""Ulysses: all-to-all from sequence-sharded to head-sharded, attention on the full sequence, and back.

Shapes inside a Ulysses group of P ranks, local shard ``[B, S_loc, H, D]``:

* ``pack_qkv`` writes q, k and v of every destination into ONE send buffer
  ``[P, B, S_loc, hq + 2*nkv, D]`` (chunk r = rank r's heads), so one all-to-all carries all three.
* ``exchange_qkv`` runs the all-to-all and turns the received ``[P, B, S_loc, ...]`` into ``[B, rows, hq + 2*nkv, D]`` with the
  auto_pad rows dropped: attention sees exactly the true sequence (plus joint rows), maskless.
* ``pack_out``/``unpack_out`` do the reverse for the output; joint (text) output rows ride along in
  every destination's chunk, so each rank gets the joint output of all heads from the same exchange.

Heads: ``hq = ceil(Hq / P)`` query heads per rank, zero-padded and dropped after when P does not
divide Hq. KV heads: each rank receives the KV heads its query heads use (``assign_heads``); with
fewer KV heads than ranks (MQA / narrow GQA) KV heads are replicated into several chunks.

Padding rows sit at the end of the global sequence (ShardLayout), so valid rows are a prefix of the
rank-ordered concatenation: ``exchange_qkv`` keeps the first S rows and never copies a padding row.

The copies are the one-pass ``sp_kernels::pack_qkv / unpack_qkv / pack_out / unpack_out`` ops
(sp_kernels/ops/pack.py: native C++/CUDA, Triton, or the pure-torch reference implementation).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..distributed.comm import all_to_all
from ..ops import pack as pack_ops
from ..ops.merge import lse_merge_all_torch
from ._alloc import new_buffer
from .call import AttentionCall, Joint
from .local import block_attention, lse_dtype
from .mask import FullMask, attend_block

Tensor = torch.Tensor


@dataclass(frozen=True)
class HeadAssignment:
    """How Hq query heads and Hkv KV heads are spread over P ranks."""

    size: int  # P
    heads: int  # Hq
    kv_heads: int  # Hkv
    q_local: int  # hq: query heads per rank (the last ranks may hold zero padding heads)
    kv_local: int  # nkv: KV heads per rank; local GQA group = hq // nkv
    kv_index: tuple[int, ...] | None  # P * nkv global KV heads in chunk order; None: 0..Hkv-1 in order

    def q_range(self, rank: int) -> tuple[int, int]:
        lo = min(self.heads, rank * self.q_local)
        return lo, min(self.heads, lo + self.q_local)

    def kv_of(self, rank: int) -> list[int]:
        if self.kv_index is None:
            return list(range(rank * self.kv_local, (rank + 1) * self.kv_local))
        return list(self.kv_index[rank * self.kv_local : (rank + 1) * self.kv_local])


@functools.lru_cache(maxsize=256)
def assign_heads(heads: int, kv_heads: int, size: int) -> HeadAssignment:
    """Smallest per-rank KV head set such that local query head j uses local KV head j // (hq / nkv)."""
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    hq = math.ceil(heads / size)
    group = heads // kv_heads
    # KV head of every (rank, local query head); None for zero padding heads, which may use any KV head.
    wanted = [[(r * hq + j) // group if r * hq + j < heads else None for j in range(hq)] for r in range(size)]

    def kv_lists(g: int) -> list[list[int]] | None:
        """Per rank, the KV head of each run of g local query heads, if every run shares one."""
        lists = []
        for w in wanted:
            heads_of_rank = []
            for i in range(hq // g):
                real = {x for x in w[i * g : (i + 1) * g] if x is not None}
                if len(real) > 1:
                    return None
                heads_of_rank.append(real.pop() if real else 0)
            lists.append(heads_of_rank)
        return lists

    # The largest run length that works; g = 1 (one KV head per query head) always does.
    g = max(d for d in range(1, hq + 1) if hq % d == 0 and kv_lists(d) is not None)
    nkv = hq // g
    index = tuple(h for lst in kv_lists(g) or [] for h in lst)
    identity = index == tuple(range(kv_heads))
    return HeadAssignment(size, heads, kv_heads, hq, nkv, None if identity else index)


def _check_prefix(valid: list[int], local_len: int) -> None:
    # auto_pad pads only at the end, so ranks are full, then at most one partial, then empty.
    seen_short = False
    for v in valid:
        if seen_short and v:
            raise AssertionError(f"padding must sit at the end of the sequence; valid rows per rank {valid}")
        if v < local_len:
            seen_short = True


def _rows(t: Tensor | None) -> Tensor | None:
    """``t`` itself when its [heads, D] rows are contiguous (what the pack ops need), else a copy;
    batch/token strides may be anything (slices of fused projections pass without a copy)."""
    if t is None:
        return None
    D = t.shape[3]
    if (t.shape[3] <= 1 or t.stride(3) == 1) and (t.shape[2] <= 1 or t.stride(2) == D):
        return t
    return t.contiguous()


def _kv_index(plan: HeadAssignment) -> list[int]:
    """The KV head table of the pack op: P * nkv global KV heads in chunk order."""
    return list(plan.kv_index) if plan.kv_index is not None else list(range(plan.size * plan.kv_local))


def pack_qkv(q: Tensor, k: Tensor, v: Tensor, plan: HeadAssignment) -> Tensor:
    """One send buffer ``[P, B, S_loc, hq + 2*nkv, D]`` for q, k and v, written in one pass by the
    ``sp_kernels::pack_qkv`` op (its torch implementation, ``ops.pack.pack_qkv_torch``, is the reference)."""
    return pack_ops.pack_qkv(_rows(q), _rows(k), _rows(v), plan.size, _kv_index(plan))


def slice_joint(joint: Joint, plan: HeadAssignment, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's heads of the replicated joint tokens (query heads zero-padded like the sequence)."""
    jq, jk, jv = joint.query, joint.key, joint.value
    lo, hi = plan.q_range(rank)
    if hi - lo == plan.q_local:
        q_loc = jq[:, :, lo:hi]
    else:
        q_loc = torch.zeros(jq.shape[0], jq.shape[1], plan.q_local, jq.shape[3], dtype=jq.dtype, device=jq.device)
        q_loc[:, :, : hi - lo] = jq[:, :, lo:hi]
    kv = plan.kv_of(rank)
    if kv == list(range(kv[0], kv[0] + len(kv))):
        return q_loc, jk[:, :, kv[0] : kv[0] + len(kv)], jv[:, :, kv[0] : kv[0] + len(kv)]
    return q_loc, jk[:, :, kv], jv[:, :, kv]


def exchange_qkv(
    send: Tensor,
    group: dist.ProcessGroup | None,
    plan: HeadAssignment,
    valid: list[int],
    joint_local: tuple[Tensor, Tensor, Tensor] | None = None,
    strategy: str = "front",
) -> tuple[Tensor, Tensor, Tensor]:
    """All-to-all of the packed ``[P, B, S_loc, hq+2nkv, D]`` and unpack into q, k, v ``[B, rows, h, D]``
    (views of one buffer), the padding rows dropped.

    rows = sum(valid) (+ joint rows, in strategy order, when ``joint_local`` is given). With B == 1
    the received chunks already are consecutive sequence rows, so they are received straight into
    their final place: no unpack copy (joint rows, when present, are written next to them).
    """
    P, B, S_loc, width, D = send.shape
    hq, n = plan.q_local, plan.kv_local
    _check_prefix(valid, S_loc)
    S = sum(valid)
    J = 0 if joint_local is None else joint_local[0].shape[1]
    if B == 1 and J == 0:
        buf = all_to_all(send, group).view(1, P * S_loc, width, D)[:, :S]
    elif B == 1:
        # Received straight into place (no unpack pass); only the joint rows are written next to them.
        seq0 = J if strategy == "front" else 0
        rows = max(seq0 + P * S_loc, S + J)  # rear joint rows overwrite the padding rows after S
        full = new_buffer((B, rows, width, D), send.dtype, send.device)
        all_to_all(send, group, out=full[:, seq0 : seq0 + P * S_loc].view(P, 1, S_loc, width, D))
        jq, jk, jv = joint_local
        j0 = 0 if strategy == "front" else S
        full[:, j0 : j0 + J, :hq].copy_(jq)
        full[:, j0 : j0 + J, hq : hq + n].copy_(jk)
        full[:, j0 : j0 + J, hq + n :].copy_(jv)
        buf = full[:, : S + J]
    else:
        # B > 1: chunks are [B, S_loc] blocks; one pass reorders them, drops the padding rows and
        # writes the joint rows in strategy order.
        jq, jk, jv = (_rows(t) for t in joint_local) if joint_local is not None else (None, None, None)
        buf = pack_ops.unpack_qkv(all_to_all(send, group), S, jq, jk, jv, strategy == "front")
    return buf[:, :, :hq], buf[:, :, hq : hq + n], buf[:, :, hq + n :]


def pack_out(
    out_seq: Tensor, out_joint: Tensor | None, plan: HeadAssignment, valid: list[int], local_len: int, strategy: str
) -> Tensor:
    """Attention output (this rank's heads) -> send ``[P, B, J + S_loc, hq, D]``.

    Chunk r holds rank r's shard rows (zero where rank r has padding) and, in strategy order, all
    joint rows: every rank needs the joint output of every head. ``valid`` must describe padding
    at the end only (checked by exchange_qkv), so rank r's rows are ``[r*S_loc, r*S_loc + valid[r])``.
    """
    B, S, hq, D = out_seq.shape
    P = plan.size
    if B == 1 and out_joint is None and S == P * local_len and out_seq.is_contiguous():
        return out_seq.view(P, 1, local_len, hq, D)  # already the send layout: no copy
    return pack_ops.pack_out(_rows(out_seq), _rows(out_joint), P, local_len, strategy == "front")


def unpack_out(recv: Tensor, plan: HeadAssignment) -> Tensor:
    """``[P, B, rows, hq, D]`` -> ``[B, rows, Hq, D]`` (padding heads dropped), one pass."""
    return pack_ops.unpack_out(recv.contiguous(), plan.heads)


@dataclass(frozen=True)
class UlyssesStage:
    """What the head-sharded side of a Ulysses exchange needs to send the output back."""

    plan: HeadAssignment
    valid: list[int]  # valid rows of each member's shard, in group order
    local_len: int
    group: dist.ProcessGroup | None
    rank: int


def scatter_heads(
    call: AttentionCall, group: dist.ProcessGroup | None, rank: int, valid: list[int], with_joint_rows: bool
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None, UlyssesStage]:
    """Sequence-sharded q/k/v -> head-sharded over the whole group sequence.

    Returns (q, k, v, joint heads of this rank or None, stage). With ``with_joint_rows`` the joint
    rows are already placed inside q/k/v in strategy order (and the returned joint is None).
    """
    plan = assign_heads(call.query.shape[2], call.key.shape[2], len(valid))
    joint_local = slice_joint(call.joint, plan, rank) if call.joint is not None else None
    send = pack_qkv(call.query, call.key, call.value, plan)
    strategy = call.joint.strategy if call.joint is not None else "front"
    inline = joint_local if with_joint_rows else None
    q, k, v = exchange_qkv(send, group, plan, valid, inline, strategy)
    stage = UlyssesStage(plan, valid, call.query.shape[1], group, rank)
    return q, k, v, (None if with_joint_rows else joint_local), stage


def gather_heads(stage: UlyssesStage, out_seq: Tensor, out_joint: Tensor | None, strategy: str) -> Tensor:
    """Head-sharded output -> ``[B, joint + S_loc, Hq, D]`` in strategy order on this rank's shard."""
    send = pack_out(out_seq, out_joint, stage.plan, stage.valid, stage.local_len, strategy)
    return unpack_out(all_to_all(send, stage.group), stage.plan)


def _masked(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: FullMask) -> Tensor:
    """Attention over ``[joint | seq]`` (or ``[seq | joint]``) under the full-frame mask. One block; but when
    the whole mask needs a masked kernel while the joint and the sequence keys alone would each take the
    maskless ones (a prompt padded at its end: an end cut in the joint keys, nothing in the sequence),
    two maskless blocks merged by their LSE."""
    whole = mask.block(None, (0, k.shape[1]))
    if whole is None or whole.bias is None or mask.joint == 0 or mask.bias.shape[2] != 1:
        return attend_block(q, k, v, scale, whole)[0]
    spans = (mask.joint_span(), mask.seq_span(0, mask.seq))
    parts = [mask.block(None, span) for span in spans]
    if any(p is not None and p.bias is not None for p in parts):
        return attend_block(q, k, v, scale, whole)[0]
    outs = [attend_block(q, k[:, a:b], v[:, a:b], scale, p) for (a, b), p in zip(spans, parts)]
    # The eager merge: a rare path (one extra pass), and fp64-exact for fp64 inputs.
    return lse_merge_all_torch([o for o, _ in outs], [lse for _, lse in outs], q.dtype, lse_dtype(q.dtype))[0]


def ulysses_attention(call: AttentionCall, valid: list[int]) -> Tensor:
    """Pure Ulysses over ``call.state.ulysses_group``; ``valid`` = valid rows of each member."""
    state = call.state
    q, k, v, _, stage = scatter_heads(call, state.ulysses_group, state.ulysses_rank, valid, with_joint_rows=True)
    S = sum(valid)
    if call.mask is not None:
        # Every key of the call is here, in the full frame's order: the whole mask applies.
        out = _masked(q, k, v, call.scale, call.mask)
    else:
        out, _ = block_attention(q, k, v, softmax_scale=call.scale, causal=call.causal)
    if call.joint is None:
        return gather_heads(stage, out, None, "front")
    J = call.joint.length
    front = call.joint.strategy == "front"
    out_seq = out[:, J : J + S] if front else out[:, :S]
    out_joint = out[:, :J] if front else out[:, S : S + J]
    return gather_heads(stage, out_seq, out_joint, call.joint.strategy)
