"""Communication for the attention backends: all-to-all, small all-gathers, and the ring exchange.

The ring interface is deliberately two calls, so a recording implementation can stand in for the
torch.distributed one in structural tests (overlap: step i+1's ``post`` comes before step i's
compute, its ``wait`` after)::

    handle = comm.post(send_tensor, recv_buffer)   # send to the next rank, receive from the previous
    ...compute...
    comm.wait(handle)
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist

from .parallel_state import device_of_group, group_rank, group_size

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


def all_gather_small(values: list[int], group: dist.ProcessGroup | None) -> list[list[int]]:
    """All-gather a short list of ints (metadata); returns one list per rank of ``group``.

    On NCCL the tensor lives on the GPU, so reading the result is a host synchronization.
    """
    size = group_size(group)
    if size == 1:
        return [list(values)]
    device = device_of_group(group)
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = torch.empty(size * len(values), dtype=torch.int64, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)
    return out.view(size, len(values)).tolist()


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
