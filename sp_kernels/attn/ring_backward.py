"""Ring attention backward (and a ring forward that also returns the LSE the backward needs).

``ring_backward`` is the standard ring backward. Every rank keeps its queries ``q``, the final
merged ``out`` and ``lse`` of its rows and their gradient ``dout``. The K/V blocks travel around the
ring exactly as in the forward (ring.py: the next block's transfer posted before this step's
compute, waited after it, the same double receive buffers in ``SPState.ring_buffers``, the comm
stream on CUDA). At each step the rank recomputes the block's attention probabilities from
``q``, the block's K/V and the final LSE (local_backward.py) and

* adds the block's share of ``dq`` to a local fp32 accumulator (dq never travels);
* adds its queries' share of the block's ``dk``/``dv`` to that block's fp32 accumulator, which
  travels with the block: received from the previous rank (it has collected the shares of the
  ranks the block visited so far), updated, sent to the next. The accumulator of block ``b`` starts
  at rank ``b``, visits every rank once and comes home after R transfers (one more than K/V, which
  need R - 1). Its transfer at step i overlaps step i + 1's compute: the step's share is computed
  first, into a fresh tensor, and only then is the arriving accumulator waited for.

No host synchronization happens inside the loop (message sizes come from ``valid``, known on every
rank). Uneven shards (``valid``, rows per rank, some 0): empty messages are skipped on both ends, as
in the forward. Causal: naive rank order as in the forward -- rank r's queries see blocks 0..r
(block r with the causal mask), so a rank adds nothing to the blocks after its own but still
forwards their accumulators.

Joint (text) tokens, as the forward treats them: the joint K/V are attended once, outside the
ring, by this rank's sequence queries (unless causal "rear") and by the joint queries; the joint
queries also attend every ring block (unless causal "front"). Of the call in isolation, every rank
returns its partial share and the sum over the SP group is the full-sequence gradient (in a model the
gather's reduce-scatter makes it the SP-group average, plan/sharding.py). The sharded q/k/v gradients are complete on their own rank (nothing to sum);
the joint gradients are partial: rank r's ``djq``/``djk``/``djv`` hold what its own ``joint_dout``
(its copy of the replicated joint output's gradient) and its own sequence queries contribute.

``ring_forward`` is ring.py's ``ring_core`` loop (same protocol, buffers, merge modes) that also
returns the merged LSE of the sequence and joint rows. It exists because ring_core does not return
the LSE yet; once it does (see docs/attention.md, "Backward"), grad.py can call ring_core itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..distributed.comm import RingComm, StreamOrderedComm, check_comm_device, comm_stream
from ._alloc import new_buffer
from .call import Joint
from .local import lse_dtype
from .local_backward import block_attention_backward, select_backward_kernel
from .ring import RingEngine, _kv_view, default_engine, ring_buffers, ring_core

Tensor = torch.Tensor


def _grad_buffers(cache: dict, numel: int, dtype: torch.dtype, device: torch.device, stream: object | None):
    """The two flat dK/dV accumulator buffers (fp32, or fp64), kept in the same cache as the K/V buffers
    under their own key (the K/V pair of an fp32 ring has the key (float32, device))."""
    key = ("ring_grad", dtype, device)
    bufs = cache.get(key)
    if bufs is None or bufs[0].numel() < numel:
        bufs = (new_buffer((numel,), dtype, device), new_buffer((numel,), dtype, device))
        cache[key] = bufs
    if stream is not None:
        for b in bufs:
            b.record_stream(stream)  # type: ignore[arg-type]
    return bufs


def _flags(joint: Joint | None, causal: bool) -> tuple[bool, bool]:
    # Causal order is [joint | sequence] ("front") or [sequence | joint] ("rear") -- ring_core's rules.
    seq_sees_joint = joint is not None and not (causal and joint.strategy == "rear")
    joint_in_ring = joint is not None and not (causal and joint.strategy == "front")
    return seq_sees_joint, joint_in_ring


def _check(q: Tensor, k: Tensor, valid: list[int], comm: RingComm) -> None:
    R, rank = comm.size, comm.rank
    if len(valid) != R:
        raise ValueError(f"ring: got {len(valid)} block lengths for a ring of {R} ranks")
    n = q.shape[1]
    if n != valid[rank] or k.shape[1] != n:
        raise ValueError(
            f"ring: rank {rank} holds {n} query / {k.shape[1]} key rows but the exchanged block lengths say "
            f"{valid[rank]} (lengths {valid}); every rank must agree on the shard lengths"
        )


def _setup(q: Tensor, k: Tensor, v: Tensor, valid: list[int], comm: RingComm, cache: dict, engine: RingEngine):
    """(comm, stream, K/V buffers with this rank's block packed into the first) -- ring_core's setup."""
    B, n, _, D = q.shape
    Hkv = k.shape[2]
    stream = None
    check_comm_device(comm, q.device)
    if engine.comm_stream and q.device.type == "cuda":
        stream = comm_stream(q.device)
        comm = StreamOrderedComm(comm, stream)
    bufs = ring_buffers(cache, 2 * B * max(valid) * Hkv * D, k.dtype, k.device, stream)
    packed = _kv_view(bufs[0], B, n, Hkv, D)
    packed[0].copy_(k)
    packed[1].copy_(v)
    return comm, stream, bufs


def _drain(comm: RingComm, handles: list) -> None:
    # Posted but never waited transfers would write cached buffers later (and match the next call's
    # messages on the peer): drain them before the original error propagates.
    for h in handles:
        if h is not None:
            try:
                comm.wait(h)
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass


def ring_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    valid: list[int],
    comm: RingComm,
    scale: float,
    causal: bool,
    joint: Joint | None,
    cache: dict,
    engine: RingEngine | None = None,
    kernels: Sequence[str] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``ring_core`` returning ``(out_seq, lse_seq, out_joint, lse_joint)``: out in q's dtype, lse
    ``[B, Hq, rows]`` in fp32 (fp64 for fp64); rows without keys are 0 with LSE -inf."""
    B, n, Hq, D = q.shape
    acc = lse_dtype(q.dtype)
    out_seq = new_buffer((B, n, Hq, D), q.dtype, q.device)
    lse_seq = new_buffer((B, Hq, n), acc, q.device)
    out_joint = lse_joint = None
    if joint is not None:
        J = joint.query.shape[1]
        out_joint = new_buffer((B, J, Hq, D), q.dtype, q.device)
        lse_joint = new_buffer((B, Hq, J), acc, q.device)
    ring_core(q, k, v, valid=valid, comm=comm, scale=scale, causal=causal, joint=joint, out_seq=out_seq,
              out_joint=out_joint, cache=cache, engine=engine, out_lse=lse_seq, joint_lse=lse_joint, kernels=kernels)
    return out_seq, lse_seq, out_joint, lse_joint


def ring_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    *,
    valid: list[int],
    comm: RingComm,
    scale: float,
    causal: bool,
    joint: Joint | None = None,
    joint_out: Tensor | None = None,
    joint_lse: Tensor | None = None,
    joint_dout: Tensor | None = None,
    cache: dict | None = None,
    engine: RingEngine | None = None,
    kernels: Sequence[str] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(dq, dk, dv, djq, djk, djv)`` of this rank (joint grads None without ``joint``); see the module docstring.

    q/k/v/out/dout hold exactly ``valid[comm.rank]`` rows; ``lse`` ``[B, Hq, rows]`` is the final
    merged LSE (``ring_forward``'s); ``joint_out``/``joint_lse``/``joint_dout`` are this rank's joint
    output, its LSE and this rank's gradient of it. Gradients come back in the input dtype
    (accumulated in fp32, fp64 for fp64). ``engine`` None: fused_ring's default (the comm stream on CUDA).
    """
    if engine is None:
        engine = default_engine(device_type=q.device.type)
    cache = cache if cache is not None else {}
    _check(q, k, valid, comm)
    if joint is not None and (joint_out is None or joint_lse is None or joint_dout is None):
        raise ValueError("ring_backward: joint tokens need joint_out, joint_lse and joint_dout")
    # Before any communication: a configuration without a backward kernel raises on every rank alike.
    select_backward_kernel(q, k, v, causal, kernels)
    R, rank = comm.size, comm.rank
    B, n, Hq, D = q.shape
    Hkv = k.shape[2]
    acc = lse_dtype(q.dtype)
    seq_sees_joint, joint_in_ring = _flags(joint, causal)

    def grads(qq, kk, vv, oo, ll, dd, c):
        return block_attention_backward(qq, kk, vv, oo, ll, dd, scale=scale, causal=c, kernels=kernels, grad_dtype=acc)

    dq = torch.zeros((B, n, Hq, D), dtype=acc, device=q.device)
    djq = djk = djv = None
    if joint is not None:
        jq, jk, jv = joint.query, joint.key, joint.value
        djq = torch.zeros(jq.shape, dtype=acc, device=q.device)
        djk = torch.zeros(jk.shape, dtype=acc, device=q.device)
        djv = torch.zeros(jv.shape, dtype=acc, device=q.device)

    if R == 1:
        dk, dv = torch.zeros((B, n, Hkv, D), dtype=acc, device=q.device), torch.zeros(
            (B, n, Hkv, D), dtype=acc, device=q.device)
        _joint_local(grads, q, out, lse, dout, joint, joint_out, joint_lse, joint_dout, causal, seq_sees_joint,
                     dq, djq, djk, djv)
        if n:
            g = grads(q, k, v, out, lse, dout, causal)
            dq += g[0]
            dk += g[1]
            dv += g[2]
        if joint_in_ring and n:
            g = grads(joint.query, k, v, joint_out, joint_lse, joint_dout, False)  # type: ignore[union-attr]
            djq += g[0]  # type: ignore[operator]
            dk += g[1]
            dv += g[2]
        return _finish(q, k, dq, dk, dv, joint, djq, djk, djv)

    comm, stream, bufs = _setup(q, k, v, valid, comm, cache, engine)
    gbufs = _grad_buffers(cache, 2 * B * max(valid) * Hkv * D, acc, q.device, stream)
    kv_handle = g_handle = None
    try:
        for step in range(R):
            src = (rank - step) % R
            kv_handle = None
            if step < R - 1:
                nxt = (rank - step - 1) % R
                send = _kv_view(bufs[step % 2], B, valid[src], Hkv, D)
                recv = _kv_view(bufs[(step + 1) % 2], B, valid[nxt], Hkv, D)
                kv_handle = comm.post(send, recv)
            if step == 0:
                # The joint K/V block, outside the ring: computed while the first transfer is in flight.
                _joint_local(grads, q, out, lse, dout, joint, joint_out, joint_lse, joint_dout, causal,
                             seq_sees_joint, dq, djq, djk, djv)
                kb, vb = k, v
            else:
                kv = _kv_view(bufs[step % 2], B, valid[src], Hkv, D)
                kb, vb = kv[0], kv[1]
            # This step's shares of the block's dK/dV, computed before waiting for its accumulator.
            shares: list[tuple[Tensor, Tensor]] = []
            if valid[src] and n and (not causal or src <= rank):
                g = grads(q, kb, vb, out, lse, dout, causal and src == rank)
                dq += g[0]
                shares.append((g[1], g[2]))
            if joint_in_ring and valid[src]:
                g = grads(joint.query, kb, vb, joint_out, joint_lse, joint_dout, False)  # type: ignore[union-attr]
                djq += g[0]  # type: ignore[operator]
                shares.append((g[1], g[2]))
            accum = _kv_view(gbufs[step % 2], B, valid[src], Hkv, D)
            if step == 0:
                accum.zero_()
            else:
                done, g_handle = g_handle, None
                comm.wait(done)  # the accumulator of block src, from the previous rank
            for dkb, dvb in shares:
                accum[0].add_(dkb)
                accum[1].add_(dvb)
            # Send it on; receive the accumulator of the next step's block (after the last step: our own).
            nxt_block = (rank - step - 1) % R
            g_handle = comm.post(accum, _kv_view(gbufs[(step + 1) % 2], B, valid[nxt_block], Hkv, D))
            if kv_handle is not None:
                done, kv_handle = kv_handle, None
                comm.wait(done)
        done, g_handle = g_handle, None
        comm.wait(done)
    except BaseException:
        _drain(comm, [kv_handle, g_handle])
        raise
    home = _kv_view(gbufs[R % 2], B, n, Hkv, D)
    return _finish(q, k, dq, home[0], home[1], joint, djq, djk, djv)


def _joint_local(grads, q, out, lse, dout, joint, joint_out, joint_lse, joint_dout, causal, seq_sees_joint,
                 dq, djq, djk, djv) -> None:
    """The shares of the joint K/V block (attended outside the ring): sequence queries and joint queries."""
    if joint is None:
        return
    if seq_sees_joint and q.shape[1]:
        g = grads(q, joint.key, joint.value, out, lse, dout, False)
        dq += g[0]
        djk += g[1]
        djv += g[2]
    g = grads(joint.query, joint.key, joint.value, joint_out, joint_lse, joint_dout, causal)
    djq += g[0]
    djk += g[1]
    djv += g[2]


def _finish(q, k, dq, dk, dv, joint, djq, djk, djv):
    dt = q.dtype
    # copy=True: dk/dv may be views of the cached accumulator buffers, which the next call overwrites.
    out = (dq.to(dt), dk.to(k.dtype, copy=True), dv.to(k.dtype, copy=True))
    if joint is None:
        return (*out, None, None, None)
    return (*out, djq.to(dt), djk.to(dt), djv.to(dt))
