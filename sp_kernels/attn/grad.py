"""Differentiable versions of the SP attention backends (ring, fused_ring, ulysses, usp).

Each ``*_attention_grad(call, valid)`` takes what the backend functions of the backend table take
(an ``AttentionCall`` and the valid rows per rank) and returns the same ``[B, J + S_local, Hq, D]``
result, differentiable with respect to ``call.query/key/value`` and the joint tensors. Of one call
in isolation, each rank's gradients are its partial share and their sum over the SP group is the
full-sequence gradient (sharded q/k/v: complete on their own rank; replicated joint tensors: partial on
every rank); in a model, the gather's reduce-scatter (plan/sharding.py) scales the upstream gradients so
that the SP-group average of every gradient is the full one. Every rank of the groups involved must run
the backward (it communicates).

* Ulysses: composed of differentiable pieces -- the pack ops (their torch.library autograd formulas,
  ops/pack.py), ``all_to_all_autograd`` (its own transpose, distributed/comm.py) and ``BlockAttention``
  (block_attention forward, ``block_attention_backward`` backward, local_backward.py).
* Ring / fused_ring: ``RingAttention``, an autograd.Function whose forward is the ring loop with the
  LSE kept (ring_backward.ring_forward) and whose backward is ``ring_backward``.
* USP: the Ulysses pieces around ``RingAttention`` over the ring group.

``attention()`` runs these when autograd records the call (the backend table's ``grad_impl``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..distributed.comm import RingComm, TorchRingComm, all_to_all_autograd
from ..ops import pack as pack_ops
from .call import AttentionCall, Joint
from .local_backward import NoBackwardKernelError, block_attention_grad, unsupported
from .ring import REFERENCE_ENGINE, RingEngine, default_engine
from .ring_backward import ring_backward, ring_forward
from .ulysses import HeadAssignment, _check_prefix, _kv_index, _rows, assign_heads, slice_joint

Tensor = torch.Tensor


@dataclass(frozen=True)
class RingParams:
    """The non-tensor arguments of one ring call."""

    valid: list[int]
    comm: RingComm
    scale: float
    causal: bool
    strategy: str
    cache: dict
    engine: RingEngine
    kernels: tuple[str, ...] | None
    backend: str


class RingAttention(torch.autograd.Function):
    """Ring attention of unpadded blocks: ``(out_seq, out_joint)`` (``out_joint`` empty without joint)."""

    @staticmethod
    def forward(ctx, q, k, v, jq, jk, jv, p: RingParams):  # type: ignore[override]
        joint = Joint(jq, jk, jv, p.strategy) if jq is not None else None
        out, lse, out_j, lse_j = ring_forward(
            q, k, v, valid=p.valid, comm=p.comm, scale=p.scale, causal=p.causal, joint=joint, cache=p.cache,
            engine=p.engine, kernels=p.kernels,
        )
        ctx.p = p
        ctx.has_joint = joint is not None
        ctx.save_for_backward(q, k, v, out, lse, jq, jk, jv, out_j, lse_j)
        ctx.set_materialize_grads(False)
        if out_j is None:
            out_j = q.new_zeros((0,))
            ctx.mark_non_differentiable(out_j)
        return out, out_j

    @staticmethod
    def backward(ctx, dout, dout_j):  # type: ignore[override]
        p: RingParams = ctx.p
        q, k, v, out, lse, jq, jk, jv, out_j, lse_j = ctx.saved_tensors
        joint = Joint(jq, jk, jv, p.strategy) if ctx.has_joint else None
        if dout is None:
            dout = torch.zeros_like(out)
        if joint is not None and dout_j is None:
            dout_j = torch.zeros_like(out_j)
        try:
            dq, dk, dv, djq, djk, djv = ring_backward(
                q, k, v, out, lse, dout, valid=p.valid, comm=p.comm, scale=p.scale, causal=p.causal, joint=joint,
                joint_out=out_j, joint_lse=lse_j, joint_dout=dout_j, cache=p.cache, engine=p.engine,
                kernels=p.kernels,
            )
        except NoBackwardKernelError as e:
            raise unsupported(p.backend, e) from e
        return dq, dk, dv, djq, djk, djv, None


def ring_block_grad(
    q: Tensor, k: Tensor, v: Tensor, joint: Joint | None, p: RingParams
) -> tuple[Tensor, Tensor | None]:
    """``RingAttention`` on unpadded blocks: (out_seq, out_joint or None)."""
    jq, jk, jv = (joint.query, joint.key, joint.value) if joint is not None else (None, None, None)
    out, out_j = RingAttention.apply(q, k, v, jq, jk, jv, p)
    return out, (out_j if joint is not None else None)


def _assemble(out_seq: Tensor, out_joint: Tensor | None, L: int, strategy: str) -> Tensor:
    """``[B, J + L, H, D]`` in strategy order, the auto_pad rows (after the n valid rows) zero."""
    B, n, H, D = out_seq.shape
    parts = [out_seq]
    if L > n:
        parts.append(out_seq.new_zeros((B, L - n, H, D)))
    if out_joint is not None:
        parts = [out_joint, *parts] if strategy == "front" else [*parts, out_joint]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def run_ring_grad(
    call: AttentionCall,
    valid: list[int],
    comm: RingComm | None,
    engine: RingEngine,
    *,
    backend: str,
    kernels: Sequence[str] | None = None,
) -> Tensor:
    """ring.run_ring, differentiable."""
    state = call.state
    comm = comm if comm is not None else TorchRingComm(state.ring_group)
    q, k, v = call.query, call.key, call.value
    L = q.shape[1]
    if len(valid) != comm.size:
        raise ValueError(f"ring: got {len(valid)} shard lengths for a ring of {comm.size} ranks")
    n = valid[comm.rank]
    if n > L:
        raise ValueError(f"ring: rank {comm.rank} has {L} rows but its shard length is {n} (lengths {valid})")
    strategy = call.joint.strategy if call.joint is not None else "front"
    p = RingParams(list(valid), comm, call.scale, call.causal, strategy, state.ring_buffers, engine,
                   None if kernels is None else tuple(kernels), backend)
    out, out_j = ring_block_grad(q[:, :n], k[:, :n], v[:, :n], call.joint, p)
    return _assemble(out, out_j, L, strategy)


def ring_attention_grad(call: AttentionCall, valid: list[int], comm: RingComm | None = None, *,
                        kernels: Sequence[str] | None = None) -> Tensor:
    """The "ring" backend (reference engine), differentiable."""
    return run_ring_grad(call, valid, comm, REFERENCE_ENGINE, backend="ring", kernels=kernels)


def fused_ring_attention_grad(call: AttentionCall, valid: list[int], comm: RingComm | None = None, *,
                              merge: str | None = None, kernels: Sequence[str] | None = None) -> Tensor:
    """The "fused_ring" backend, differentiable."""
    engine = default_engine(merge, call.query.device.type)
    return run_ring_grad(call, valid, comm, engine, backend="fused_ring", kernels=kernels)


# ---------------------------------------------------------------------------------------------
# Ulysses pieces, differentiable


@dataclass(frozen=True)
class UlyssesGradStage:
    plan: HeadAssignment
    valid: list[int]
    local_len: int
    group: dist.ProcessGroup | None


def scatter_heads_grad(
    call: AttentionCall, group: dist.ProcessGroup | None, rank: int, valid: list[int], with_joint_rows: bool
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None, UlyssesGradStage]:
    """ulysses.scatter_heads, differentiable (pack_qkv -> all-to-all -> unpack_qkv, always through the ops)."""
    plan = assign_heads(call.query.shape[2], call.key.shape[2], len(valid))
    _check_prefix(valid, call.query.shape[1])
    joint_local = slice_joint(call.joint, plan, rank) if call.joint is not None else None
    send = pack_ops.pack_qkv(_rows(call.query), _rows(call.key), _rows(call.value), plan.size, _kv_index(plan))
    recv = all_to_all_autograd(send, group)
    front = call.joint is None or call.joint.strategy == "front"
    jq, jk, jv = (_rows(t) for t in joint_local) if (with_joint_rows and joint_local) else (None, None, None)
    buf = pack_ops.unpack_qkv(recv, sum(valid), jq, jk, jv, front)
    hq, nkv = plan.q_local, plan.kv_local
    stage = UlyssesGradStage(plan, list(valid), call.query.shape[1], group)
    q, k, v = buf[:, :, :hq], buf[:, :, hq : hq + nkv], buf[:, :, hq + nkv :]
    return q, k, v, (None if with_joint_rows else joint_local), stage


def gather_heads_grad(stage: UlyssesGradStage, out_seq: Tensor, out_joint: Tensor | None, strategy: str) -> Tensor:
    """ulysses.gather_heads, differentiable (pack_out -> all-to-all -> unpack_out)."""
    jo = _rows(out_joint) if out_joint is not None else None
    send = pack_ops.pack_out(_rows(out_seq), jo, stage.plan.size, stage.local_len, strategy == "front")
    return pack_ops.unpack_out(all_to_all_autograd(send, stage.group).contiguous(), stage.plan.heads)


def ulysses_attention_grad(call: AttentionCall, valid: list[int], *, kernels: Sequence[str] | None = None) -> Tensor:
    """The "ulysses" backend, differentiable."""
    state = call.state
    q, k, v, _, stage = scatter_heads_grad(call, state.ulysses_group, state.ulysses_rank, valid, True)
    out = block_attention_grad(q, k, v, scale=call.scale, causal=call.causal, kernels=kernels, backend="ulysses")
    S = sum(valid)
    if call.joint is None:
        return gather_heads_grad(stage, out, None, "front")
    J = call.joint.length
    front = call.joint.strategy == "front"
    out_seq = out[:, J : J + S] if front else out[:, :S]
    out_joint = out[:, :J] if front else out[:, S : S + J]
    return gather_heads_grad(stage, out_seq, out_joint, call.joint.strategy)


def usp_attention_grad(call: AttentionCall, valid: list[int], *, kernels: Sequence[str] | None = None) -> Tensor:
    """The "usp" backend (Ulysses x ring, the ring part on fused_ring's engine), differentiable."""
    state = call.state
    U, R = state.ulysses_size, state.ring_size
    mine = valid[state.ring_rank * U : (state.ring_rank + 1) * U]
    ring_valid = [sum(valid[r * U : (r + 1) * U]) for r in range(R)]
    q, k, v, joint_heads, stage = scatter_heads_grad(call, state.ulysses_group, state.ulysses_rank, mine, False)
    joint = Joint(*joint_heads, strategy=call.joint.strategy) if call.joint is not None and joint_heads else None
    strategy = joint.strategy if joint is not None else "front"
    p = RingParams(ring_valid, TorchRingComm(state.ring_group), call.scale, call.causal, strategy,
                   state.ring_buffers, default_engine(device_type=q.device.type),
                   None if kernels is None else tuple(kernels), "usp")
    out, out_j = ring_block_grad(q, k, v, joint, p)
    return gather_heads_grad(stage, out, out_j, strategy)


# backend name -> differentiable implementation, with the backend table's signature (call, valid).
GRAD_BACKENDS = {
    "ring": ring_attention_grad,
    "fused_ring": fused_ring_attention_grad,
    "ulysses": ulysses_attention_grad,
    "usp": usp_attention_grad,
}
