"""Ring attention: K/V blocks travel around the ring while each rank attends its queries to them.

Per step the next block's transfer is posted before this step's compute and waited after it
(``RingComm.post``/``wait``), K and V travel in one buffer, and partial results are merged in fp32
with the log1p form (merge.py). Receive buffers: two flat buffers per (dtype, device), sized to the
largest block and kept in ``state._cache`` across calls -- no allocation per step or per call once
warm. Shards of unequal length work without padding: every rank knows every block's length
(exchanged once per call, or derived from the recorded ShardLayout), so each message is sized
exactly and both ends agree on it. auto_pad rows are simply not part of any block.

Causal: NAIVE, not load-balanced. Blocks are in rank order, so rank r computes blocks 0..r (block
r with the causal mask) and skips the rest while still forwarding them; the last rank does R times
the work of the first. A zigzag/striped layout would balance it but needs a different sharding
than the hooks produce.

Joint (text) tokens: their K/V are attended once, outside the ring; their queries join the ring.
The joint partials are kept and merged in a fixed order (joint block, then ring blocks by source
rank), so the joint output is bitwise identical on every rank.
"""

from __future__ import annotations

import torch

from ..comm import RingComm, TorchRingComm
from ._alloc import new_buffer
from .call import AttentionCall, Joint
from .local import block_attention, lse_dtype
from .merge import merge_all, merge_into

Tensor = torch.Tensor


def _ring_buffers(cache: dict, numel: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    key = ("ring_kv", dtype, device)
    bufs = cache.get(key)
    if bufs is None or bufs[0].numel() < numel:
        bufs = (new_buffer((numel,), dtype, device), new_buffer((numel,), dtype, device))
        cache[key] = bufs
    return bufs


def _kv_view(flat: Tensor, B: int, rows: int, heads: int, D: int) -> Tensor:
    return flat[: 2 * B * rows * heads * D].view(2, B, rows, heads, D)


class _Accumulator:
    """Running merge of partial results for one block of queries."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.out: Tensor | None = None
        self.lse: Tensor | None = None

    def add(self, out: Tensor, lse: Tensor) -> None:
        if self.out is None:
            # Kernel outputs are fresh tensors, so taking them over (no copy when already fp32) is safe.
            self.out, self.lse = out.to(self.dtype), lse.to(self.dtype)
        else:
            merge_into(self.out, self.lse, out, lse)

    def write(self, dest: Tensor) -> None:
        if self.out is None:
            dest.zero_()
        else:
            dest.copy_(self.out)


def ring_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    lens: list[int],
    comm: RingComm,
    scale: float,
    causal: bool,
    joint: Joint | None,
    out_seq: Tensor,
    out_joint: Tensor | None,
    cache: dict,
) -> None:
    """Attention of this rank's queries over all ring blocks (+ joint tokens), written into the outputs.

    q/k/v hold exactly ``lens[comm.rank]`` rows (no padding). ``joint`` tensors have the same heads as
    q/k/v. ``out_seq`` ``[B, lens[rank], Hq, D]``, ``out_joint`` ``[B, J, Hq, D]`` (when joint).
    """
    R, rank = comm.size, comm.rank
    B, _, Hq, D = q.shape
    Hkv = k.shape[2]
    acc_dtype = lse_dtype(q.dtype)
    local = _Accumulator(acc_dtype)
    has_q = q.shape[1] > 0
    # Causal order is [joint | sequence] ("front") or [sequence | joint] ("rear"): joint queries in
    # front see no sequence keys, sequence queries see no rear joint keys.
    seq_sees_joint = joint is not None and not (causal and joint.strategy == "rear")
    joint_in_ring = joint is not None and not (causal and joint.strategy == "front")
    joint_parts: list[tuple[Tensor, Tensor]] = []
    if joint is not None:
        if seq_sees_joint and has_q:
            local.add(*block_attention(q, joint.key, joint.value, softmax_scale=scale))
        joint_parts.append(block_attention(joint.query, joint.key, joint.value, softmax_scale=scale, causal=causal))
    joint_by_src: dict[int, tuple[Tensor, Tensor]] = {}

    bufs: tuple[Tensor, Tensor] | None = None
    if R > 1:
        bufs = _ring_buffers(cache, 2 * B * max(lens) * Hkv * D, k.dtype, k.device)
        packed = _kv_view(bufs[0], B, lens[rank], Hkv, D)
        packed[0].copy_(k)
        packed[1].copy_(v)
    for step in range(R):
        src = (rank - step) % R
        handle = None
        if step < R - 1:
            assert bufs is not None
            nxt = (rank - step - 1) % R
            send = _kv_view(bufs[step % 2], B, lens[src], Hkv, D)
            recv = _kv_view(bufs[(step + 1) % 2], B, lens[nxt], Hkv, D)
            handle = comm.post(send, recv)
        if step == 0:
            kb, vb = k, v
        else:
            assert bufs is not None
            kv = _kv_view(bufs[step % 2], B, lens[src], Hkv, D)
            kb, vb = kv[0], kv[1]
        if lens[src] and has_q and (not causal or src <= rank):
            local.add(*block_attention(q, kb, vb, softmax_scale=scale, causal=causal and src == rank))
        if joint_in_ring and lens[src]:
            joint_by_src[src] = block_attention(joint.query, kb, vb, softmax_scale=scale)  # type: ignore[union-attr]
        if handle is not None:
            comm.wait(handle)
    local.write(out_seq)
    if joint is not None and out_joint is not None:
        parts = joint_parts + [joint_by_src[s] for s in sorted(joint_by_src)]
        out_joint.copy_(merge_all(parts, acc_dtype)[0])


def ring_attention(call: AttentionCall, lens: list[int], comm: RingComm | None = None) -> Tensor:
    """Pure ring over ``call.state.ring_group``; ``lens`` = valid rows of every ring rank."""
    state = call.state
    comm = comm if comm is not None else TorchRingComm(state.ring_group)
    q, k, v = call.query, call.key, call.value
    B, L, Hq, D = q.shape
    n = lens[comm.rank]
    joint = call.joint
    J = joint.length if joint is not None else 0
    front = joint is None or joint.strategy == "front"
    seq0 = J if front else 0
    result = new_buffer((B, J + L, Hq, D), q.dtype, q.device)
    result[:, seq0 + n : seq0 + L].zero_()  # auto_pad rows: defined zeros, never attended
    ring_core(
        q[:, :n],
        k[:, :n],
        v[:, :n],
        lens=lens,
        comm=comm,
        scale=call.scale,
        causal=call.causal,
        joint=joint,
        out_seq=result[:, seq0 : seq0 + n],
        out_joint=(result[:, :J] if front else result[:, L : L + J]) if joint is not None else None,
        cache=state._cache,
    )
    return result
