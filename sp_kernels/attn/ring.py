"""Ring attention, both ring backends: K/V blocks travel around the ring while each rank attends its
queries to them.

One loop (``ring_core``) serves both; a ``RingEngine`` says how it runs:

* ``"ring"`` (``ring_attention``, ``REFERENCE_ENGINE``): the simple reference -- transfers issued on
  the current stream, partial results merged into a running fp32 accumulator after every step.
* ``"fused_ring"`` (``fused_ring_attention``, ``default_engine()``): communication hidden behind
  compute. On CUDA every K+V transfer goes on a dedicated high-priority stream
  (``comm.comm_stream``), ordered against compute with events only: step i+1's transfer is in
  flight while step i's block attention runs, and the host never synchronizes inside the loop.
  Partial results are merged per step into one fp32 accumulator (``merge="step"``: the
  in-place pair merge op) or kept and merged once at the end (``merge="all"``: one W-way merge, W
  partial outputs of memory). On CPU/gloo the same code path runs: ``batch_isend_irecv`` returns
  async work handles, so the exchange overlaps the block attention there too. USP uses this engine
  for its ring part. The merge mode defaults to ``DEFAULT_MERGE[device type]`` ("step" on CPU,
  measured faster by benchmarks/bench_ring.py; "all" on CUDA, predicted faster by
  docs/performance.md); ``SP_KERNELS_RING_MERGE=step|all`` or ``set_default_merge`` override it.

Per step the next block's transfer is posted before this step's compute and waited after it
(``RingComm.post``/``wait``), K and V travel in one buffer, and partial results are merged in fp32
with the log1p form (merge.py). Receive buffers: two flat buffers per (dtype, device), sized to the
largest block and kept in the SP state (``SPState.ring_buffers``) across calls -- no allocation per
step or per call once warm; ``release_ring_buffers`` (or ``remove_sequence_parallel``) frees them.
Shards of unequal length work without padding: every rank knows every block's length (exchanged
once per call, or derived from the recorded ShardLayout), so each message is sized exactly and both
ends agree on it. auto_pad rows are simply not part of any block.

Causal: NAIVE, not load-balanced. Blocks are in rank order, so rank r computes blocks 0..r (block
r with the causal mask) and skips the rest while still forwarding them; the last rank does R times
the work of the first. A zigzag/striped layout would balance it but needs a different sharding
than the hooks produce.

Joint (text) tokens: their K/V are attended once, outside the ring; their queries join the ring.
The joint partials are kept and merged in a fixed order (joint block, then ring blocks by source
rank), so the joint output is bitwise identical on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..distributed.comm import RingComm, StreamOrderedComm, TorchRingComm, check_comm_device, comm_stream
from ..distributed.parallel_state import SPState, get_sp_state
from ..ops.merge import merge_all, merge_into
from ._alloc import new_buffer
from .call import AttentionCall, Joint
from .local import block_attention, lse_dtype
from .mask import BlockMask, FullMask, attend_block

Tensor = torch.Tensor
MERGE_MODES = ("step", "all")


@dataclass(frozen=True)
class RingEngine:
    """How ``ring_core`` runs. ``merge``: "step" (per-step in-place merge) or "all" (keep the W
    partials, one W-way merge at the end). ``comm_stream``: on CUDA, issue transfers on a dedicated
    high-priority stream (ignored on CPU, where gloo's async work handles give the overlap)."""

    merge: str = "step"
    comm_stream: bool = False

    def __post_init__(self) -> None:
        if self.merge not in MERGE_MODES:
            raise ValueError(f"RingEngine.merge={self.merge!r} is unknown; expected one of {list(MERGE_MODES)}")


REFERENCE_ENGINE = RingEngine(merge="step", comm_stream=False)

# fused_ring's merge mode per device type: the faster of the two where measured (CPU: "step", 1-2% ahead
# in benchmarks/bench_ring.py), the one the performance model predicts elsewhere (CUDA: "all" moves
# 4-5x fewer bytes; docs/performance.md) until a GPU run measures it. Env / set_default_merge() override.
MERGE_ENV = "SP_KERNELS_RING_MERGE"
DEFAULT_MERGE = {"cpu": "step", "cuda": "all"}
_merge_override: str | None = None


def set_default_merge(mode: str | None) -> None:
    """Set the merge mode fused_ring uses ("step" or "all"); None restores env/default."""
    global _merge_override
    if mode is not None and mode not in MERGE_MODES:
        raise ValueError(f"set_default_merge: {mode!r} is unknown; expected one of {list(MERGE_MODES)} or None")
    _merge_override = mode


def default_engine(merge: str | None = None, device_type: str = "cuda") -> RingEngine:
    """The engine of fused_ring and of USP's ring part: comm stream on CUDA, the chosen merge mode."""
    if merge is None:
        merge = _merge_override if _merge_override is not None else (
            os.environ.get(MERGE_ENV, "") or DEFAULT_MERGE.get(device_type, "all"))
    if merge not in MERGE_MODES:
        raise ValueError(f"fused_ring merge mode {merge!r} is unknown (see {MERGE_ENV}); expected one of {list(MERGE_MODES)}")
    return RingEngine(merge=merge, comm_stream=True)


def release_ring_buffers(state: SPState | None = None) -> int:
    """Free the cached ring receive buffers of ``state`` (default: the current SP state).

    Returns the number of buffer pairs dropped. The next ring call allocates them again.
    """
    state = state if state is not None else get_sp_state()
    return state.release_buffers() if state is not None else 0


def ring_buffers(
    cache: dict, numel: int, dtype: torch.dtype, device: torch.device, stream: object | None = None
) -> tuple[Tensor, Tensor]:
    """The two flat receive buffers (at least ``numel`` elements each) in ``cache`` (an SP state's
    ``ring_buffers``: (dtype, device) -> pair), allocated once and reused."""
    key = (dtype, device)
    bufs = cache.get(key)
    if bufs is None or bufs[0].numel() < numel:
        bufs = (new_buffer((numel,), dtype, device), new_buffer((numel,), dtype, device))
        cache[key] = bufs
    if stream is not None:
        # The comm stream reads/writes them: the caching allocator must not hand their memory to another
        # tensor (once released) before that stream's last use has finished. Every call, not only at
        # allocation: the reference engine may have allocated them without a stream. (Host-side only.)
        for b in bufs:
            b.record_stream(stream)  # type: ignore[arg-type]
    return bufs


def _kv_view(flat: Tensor, B: int, rows: int, heads: int, D: int) -> Tensor:
    return flat[: 2 * B * rows * heads * D].view(2, B, rows, heads, D)


class _MergeStep:
    """Per-step merge into one fp32 running accumulator (``merge_into``, the lse_merge_ op when present)."""

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

    def write(self, dest: Tensor, dest_lse: Tensor | None = None) -> None:
        if self.out is None:
            dest.zero_()
            if dest_lse is not None:
                dest_lse.fill_(float("-inf"))
        else:
            dest.copy_(self.out)
            if dest_lse is not None:
                dest_lse.copy_(self.lse)


class _MergeAll:
    """Keep every partial (bf16 out + fp32 lse, as the kernel returned them) and merge once at the end."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.parts: list[tuple[Tensor, Tensor]] = []

    def add(self, out: Tensor, lse: Tensor) -> None:
        self.parts.append((out, lse))

    def write(self, dest: Tensor, dest_lse: Tensor | None = None) -> None:
        if not self.parts:
            dest.zero_()
            if dest_lse is not None:
                dest_lse.fill_(float("-inf"))
            return
        if len(self.parts) == 1:
            dest.copy_(self.parts[0][0])
            lse = self.parts[0][1]
        else:
            lse = merge_all(self.parts, self.dtype, dest=dest)[1]
        if dest_lse is not None:
            dest_lse.copy_(lse)


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    mask: BlockMask | None,
    causal: bool | None = None,
    kernels: Sequence[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """One block: ``block_attention`` (looked up here, so tests can wrap it) without a mask, else ``attend_block``."""
    if mask is not None:
        return attend_block(q, k, v, scale, mask)
    extra = {} if kernels is None else {"kernels": kernels}
    if causal is None:
        return block_attention(q, k, v, softmax_scale=scale, **extra)
    return block_attention(q, k, v, softmax_scale=scale, causal=causal, **extra)


def ring_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    valid: list[int],
    comm: RingComm,
    scale: float,
    causal: bool,
    joint: Joint | None,
    out_seq: Tensor,
    out_joint: Tensor | None,
    cache: dict,
    engine: RingEngine | None = None,
    mask: FullMask | None = None,
    out_lse: Tensor | None = None,
    joint_lse: Tensor | None = None,
    kernels: Sequence[str] | None = None,
) -> None:
    """Attention of this rank's queries over all ring blocks (+ joint tokens), written into the outputs.
    ``cache`` keeps the receive buffers across calls (``ring_buffers``).

    q/k/v hold exactly ``valid[comm.rank]`` rows (no padding). ``joint`` tensors have the same heads as
    q/k/v. ``out_seq`` ``[B, valid[rank], Hq, D]``, ``out_joint`` ``[B, J, Hq, D]`` (when joint).
    ``engine`` None means the fused_ring default (``default_engine()``): USP calls this
    without one, so its ring part is fused_ring. ``mask``: the call's mask in the full frame (ring block
    ``src`` holds sequence rows ``sum(valid[:src])`` on); each block attends with its slice of it, and a
    query row that the slice excludes entirely contributes lse -inf (nothing) to the merge.
    ``out_lse`` ``[B, Hq, valid[rank]]`` / ``joint_lse`` ``[B, Hq, J]``: when given, the merged LSE is
    written there too (the backward recomputes from it; rows without keys get -inf). ``kernels``:
    restrict the block kernels (the backward needs ones that have a backward).
    """
    if engine is None:
        engine = default_engine(device_type=q.device.type)
    R, rank = comm.size, comm.rank
    if len(valid) != R:
        raise ValueError(f"ring: got {len(valid)} block lengths for a ring of {R} ranks")
    B, n, Hq, D = q.shape
    if n != valid[rank] or k.shape[1] != n:
        raise ValueError(
            f"ring: rank {rank} holds {n} query / {k.shape[1]} key rows but the exchanged block lengths say "
            f"{valid[rank]} (lengths {valid}); every rank must agree on the shard lengths"
        )
    Hkv = k.shape[2]
    acc_dtype = lse_dtype(q.dtype)
    local = _MergeAll(acc_dtype) if engine.merge == "all" else _MergeStep(acc_dtype)
    has_q = n > 0
    # Causal order is [joint | sequence] ("front") or [sequence | joint] ("rear"): joint queries in
    # front see no sequence keys, sequence queries see no rear joint keys.
    seq_sees_joint = joint is not None and not (causal and joint.strategy == "rear")
    joint_in_ring = joint is not None and not (causal and joint.strategy == "front")
    joint_parts: list[tuple[Tensor, Tensor]] = []
    joint_by_src: dict[int, tuple[Tensor, Tensor]] = {}
    starts = [sum(valid[:r]) for r in range(R)]

    # Every block's mask is classified before the loop: classifying reads the mask back to the host,
    # which inside the loop would stall the overlap of transfers and compute on a GPU.
    blocks: dict[tuple[str, int | None], BlockMask | None] = {}
    if mask is not None:
        for who, rows in (("q", mask.seq_span(starts[rank], n)), ("joint", mask.joint_span())):
            blocks[who, None] = mask.block(rows, mask.joint_span())
            for src in range(R):
                blocks[who, src] = mask.block(rows, mask.seq_span(starts[src], valid[src]))

    def blk(who: str, src: int | None) -> BlockMask | None:
        """The mask of ``who``'s queries ("q" or "joint") over ring block ``src`` (None: the joint block)."""
        return blocks.get((who, src))

    stream = None
    if R > 1:
        check_comm_device(comm, q.device)
        if engine.comm_stream and q.device.type == "cuda":
            stream = comm_stream(q.device)
            comm = StreamOrderedComm(comm, stream)
        bufs = ring_buffers(cache, 2 * B * max(valid) * Hkv * D, k.dtype, k.device, stream)
        packed = _kv_view(bufs[0], B, n, Hkv, D)
        packed[0].copy_(k)
        packed[1].copy_(v)
    handle = None
    try:
        for step in range(R):
            src = (rank - step) % R
            handle = None
            if step < R - 1:
                nxt = (rank - step - 1) % R
                send = _kv_view(bufs[step % 2], B, valid[src], Hkv, D)
                recv = _kv_view(bufs[(step + 1) % 2], B, valid[nxt], Hkv, D)
                handle = comm.post(send, recv)
            if step == 0 and joint is not None:
                # Joint K/V are local: computed while the first transfer is already in flight.
                if seq_sees_joint and has_q:
                    local.add(*_attend(q, joint.key, joint.value, scale, blk("q", None), kernels=kernels))
                joint_parts.append(
                    _attend(joint.query, joint.key, joint.value, scale, blk("joint", None), causal, kernels)
                )
            if step == 0:
                kb, vb = k, v
            else:
                kv = _kv_view(bufs[step % 2], B, valid[src], Hkv, D)
                kb, vb = kv[0], kv[1]
            if valid[src] and has_q and (not causal or src <= rank):
                local.add(*_attend(q, kb, vb, scale, blk("q", src), causal and src == rank, kernels))
            if joint_in_ring and valid[src]:
                joint_by_src[src] = _attend(joint.query, kb, vb, scale, blk("joint", src), kernels=kernels)  # type: ignore[union-attr]
            if handle is not None:
                done, handle = handle, None
                comm.wait(done)
    except BaseException:
        # A transfer posted but never waited for would still write the cached receive buffer later,
        # and its peer would match it against the next call's messages: drain it before re-raising.
        if handle is not None:
            try:
                comm.wait(handle)
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
        raise
    local.write(out_seq, out_lse)
    if joint is not None and out_joint is not None:
        parts = joint_parts + [joint_by_src[s] for s in sorted(joint_by_src)]
        lse = merge_all(parts, acc_dtype, dest=out_joint)[1]
        if joint_lse is not None:
            joint_lse.copy_(lse)


def run_ring(call: AttentionCall, valid: list[int], comm: RingComm | None, engine: RingEngine) -> Tensor:
    """A pure ring over ``call.state.ring_group`` with ``engine``; ``valid`` = valid rows of every ring rank (in ring order)."""
    state = call.state
    comm = comm if comm is not None else TorchRingComm(state.ring_group)
    q, k, v = call.query, call.key, call.value
    B, L, Hq, D = q.shape
    if len(valid) != comm.size:
        raise ValueError(f"ring: got {len(valid)} shard lengths for a ring of {comm.size} ranks")
    n = valid[comm.rank]
    if n > L:
        raise ValueError(f"ring: rank {comm.rank} has {L} rows but its shard length is {n} (lengths {valid})")
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
        valid=valid,
        comm=comm,
        scale=call.scale,
        causal=call.causal,
        joint=joint,
        out_seq=result[:, seq0 : seq0 + n],
        out_joint=(result[:, :J] if front else result[:, L : L + J]) if joint is not None else None,
        cache=state.ring_buffers,
        engine=engine,
        mask=call.mask,
    )
    return result


def ring_attention(call: AttentionCall, valid: list[int], comm: RingComm | None = None) -> Tensor:
    """The "ring" backend: the reference engine (current stream, running merge)."""
    return run_ring(call, valid, comm, REFERENCE_ENGINE)


def fused_ring_attention(
    call: AttentionCall, valid: list[int], comm: RingComm | None = None, *, merge: str | None = None
) -> Tensor:
    """The "fused_ring" backend over ``call.state.ring_group``; ``valid`` = valid rows of every ring rank (in ring order)."""
    return run_ring(call, valid, comm, default_engine(merge, call.query.device.type))
