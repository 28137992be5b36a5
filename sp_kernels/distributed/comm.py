"""Communication for the attention backends: all-to-all, small all-gathers, and the ring exchange.

The ring interface is deliberately two calls, so a recording implementation can stand in for the
torch.distributed one in structural tests (overlap: step i+1's ``post`` comes before step i's
compute, its ``wait`` after)::

    handle = comm.post(send_tensor, recv_buffer)   # send to the next rank, receive from the previous
    ...compute...
    comm.wait(handle)

On CUDA, ``StreamOrderedComm`` wraps any RingComm so the transfers run on a dedicated high-priority
stream, ordered against the compute stream by events only (no host synchronization).
"""

from __future__ import annotations

import zlib
from typing import Any, Protocol

import torch
import torch.distributed as dist

from .parallel_state import device_of_group, group_backends, group_rank, group_size

Tensor = torch.Tensor


def all_to_all(send: Tensor, group: dist.ProcessGroup | None, out: Tensor | None = None) -> Tensor:
    """Exchange chunk ``i`` of dim 0 (size = group size) with rank ``i``; returns the received chunks.

    ``out`` (contiguous, shaped like ``send``) receives in place, e.g. straight into a larger buffer.
    A group of size 1 returns ``send`` itself when no ``out`` is given.
    """
    size = group_size(group)
    if send.shape[0] != size:
        raise ValueError(f"all_to_all: dim 0 of the send buffer ({send.shape[0]}) must equal the group size {size}")
    if out is not None and (out.shape != send.shape or not out.is_contiguous()):
        raise ValueError(f"all_to_all: out must be contiguous with the send shape {tuple(send.shape)}")
    if size == 1:
        return send if out is None else out.copy_(send)
    send = send.contiguous()
    recv = out if out is not None else torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


class _AllToAll(torch.autograd.Function):
    """all_to_all with a backward: the exchange is its own transpose (the gradient of received chunk
    ``i`` goes back to rank ``i``, where it is the gradient of that rank's send chunk for this rank)."""

    @staticmethod
    def forward(ctx, send: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return all_to_all(send, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return all_to_all(grad.contiguous(), ctx.group), None


def all_to_all_autograd(send: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``all_to_all`` that autograd differentiates: its backward is the all-to-all of the gradients
    (same split, which for equal chunks is the transposed one). Every rank of ``group`` must run the
    backward too (the backward is a collective). A group of size 1 returns ``send`` unchanged."""
    size = group_size(group)
    if size == 1:
        if send.shape[0] != 1:
            raise ValueError(f"all_to_all: dim 0 of the send buffer ({send.shape[0]}) must equal the group size 1")
        return send
    return _AllToAll.apply(send, group)


# Every metadata exchange has this many int64 slots, so two ranks that reached DIFFERENT exchanges
# (inputs that differ across ranks steered them apart) still match sizes and can tell, instead of gloo
# aborting the process on a size mismatch.
SMALL_SLOTS = 40


def all_gather_small(values: list[int], group: dist.ProcessGroup | None, what: str = "metadata") -> list[list[int]]:
    """All-gather a short list of ints (metadata); returns one list per rank of ``group``.

    Raises on every rank when the ranks are not in the same exchange (``what`` names it). On NCCL
    the tensor lives on the GPU, so reading the result is a host synchronization.
    """
    size = group_size(group)
    if size == 1:
        return [list(values)]
    if len(values) > SMALL_SLOTS - 2:
        raise ValueError(f"all_gather_small: {len(values)} values do not fit {SMALL_SLOTS - 2} slots")
    tag = zlib.crc32(what.encode())
    padded = [tag, len(values), *values] + [0] * (SMALL_SLOTS - 2 - len(values))
    device = device_of_group(group)
    mine = torch.tensor(padded, dtype=torch.int64, device=device)
    out = torch.empty(size * SMALL_SLOTS, dtype=torch.int64, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)
    rows = out.view(size, SMALL_SLOTS).tolist()
    if any(r[0] != tag or r[1] != len(values) for r in rows):
        raise RuntimeError(
            f"sp_kernels: the ranks reached different collectives (this rank: {what}); their inputs or plans "
            "differ, so they took different paths. Every rank must run the same model on inputs of the same shape"
        )
    return [r[2 : 2 + len(values)] for r in rows]


class RingComm(Protocol):
    """A ring exchange: each rank sends to ``(rank + 1) % size`` and receives from ``(rank - 1) % size``."""

    rank: int
    size: int

    def post(self, send: Tensor, recv: Tensor) -> Any: ...

    def wait(self, handle: Any) -> None: ...


class TorchRingComm:
    """RingComm over torch.distributed ``batch_isend_irecv``.

    Empty tensors are not sent: both ends derive the message sizes from the same exchanged lengths,
    so they skip the same messages (and NCCL rejects an empty batch).
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = group_rank(group)
        self.size = group_size(group)
        # The device types the group can send ("cpu:gloo,cuda:nccl" serves both), for clear errors.
        self.device_types = frozenset(group_backends(group)) if group is not None else None
        if group is not None:
            self._next = dist.get_global_rank(group, (self.rank + 1) % self.size)
            self._prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def post(self, send: Tensor, recv: Tensor) -> list:
        if self.size == 1:
            raise RuntimeError("TorchRingComm.post on a ring of size 1: there is nobody to exchange with")
        ops = []
        if send.numel():
            ops.append(dist.P2POp(dist.isend, send, self._next, self.group))
        if recv.numel():
            ops.append(dist.P2POp(dist.irecv, recv, self._prev, self.group))
        return dist.batch_isend_irecv(ops) if ops else []

    def wait(self, handle: list) -> None:
        for work in handle:
            work.wait()


def check_comm_device(comm: object, device: torch.device) -> None:
    """Raise a clear ValueError when the tensors live where the communicator cannot send them.

    gloo crashes on CUDA tensors and NCCL cannot send CPU tensors; a comm without ``device_types``
    (a test double) accepts anything.
    """
    want = getattr(comm, "device_types", None)
    if want is not None and device.type not in want:
        raise ValueError(
            f"ring: the tensors are on {device} but the ring process group communicates {sorted(want)} tensors; "
            f"move the tensors there or build the group with a backend for {device.type} "
            f"({'nccl' if device.type == 'cuda' else 'gloo'}, e.g. init_process_group('cpu:gloo,cuda:nccl'))"
        )


_COMM_STREAMS: dict[torch.device, object] = {}


def comm_stream(device: torch.device) -> torch.cuda.Stream:
    """The dedicated high-priority communication stream of a CUDA device (created once per device)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"comm_stream: a communication stream needs a CUDA device, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _COMM_STREAMS.get(device)
    if stream is None:
        # priority=-1: the transfers' small kernels are scheduled ahead of queued attention blocks,
        # so the next step's KV is not starved by the compute it is meant to hide behind.
        stream = _COMM_STREAMS[device] = torch.cuda.Stream(device=device, priority=-1)
    return stream  # type: ignore[return-value]


class StreamOrderedComm:
    """A RingComm whose transfers run on ``stream``, ordered against the current (compute) stream.

    ``post``: the comm stream first waits (an event, not the host) for everything queued on the
    compute stream so far -- the send buffer was written there (packing or the previous receive)
    and the receive buffer was last read there (the previous step's attention). ``wait``: the comm
    stream waits for the transfer, then the compute stream waits for the comm stream (events again),
    so the next step's attention reads completed data. The host never blocks.
    """

    def __init__(self, inner: RingComm, stream: torch.cuda.Stream) -> None:
        self.inner = inner
        self.stream = stream
        self.rank = inner.rank
        self.size = inner.size
        self.device_types = getattr(inner, "device_types", None)

    def _check(self, t: Tensor) -> None:
        if t.device.type != "cuda" or t.device.index != self.stream.device.index:
            raise ValueError(
                f"StreamOrderedComm: tensor on {t.device} but the communication stream is on {self.stream.device}; "
                "the ring's tensors, stream and process group must share one CUDA device"
            )

    def post(self, send: Tensor, recv: Tensor) -> Any:
        self._check(send)
        self._check(recv)
        self.stream.wait_stream(torch.cuda.current_stream(send.device))
        with torch.cuda.stream(self.stream):
            return self.inner.post(send, recv)

    def wait(self, handle: Any) -> None:
        with torch.cuda.stream(self.stream):
            # NCCL's Work.wait() makes the *current* stream (here the comm stream) wait; no host block.
            self.inner.wait(handle)
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
