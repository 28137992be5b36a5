"""Ring structure: transfer posted before the step's compute and waited after, K+V in one message of
exactly the block's size, two receive buffers reused across steps and calls."""

from __future__ import annotations

import torch
import torch.distributed as dist

from sp_kernels.attn import ring
from sp_kernels.attn.call import AttentionCall
from sp_kernels.distributed.comm import TorchRingComm
from sp_kernels.distributed.parallel_state import SequenceParallelConfig, init_sequence_parallel
from tests.attention_reference import random_qkv, reference_attention


class RecordingComm(TorchRingComm):
    def __init__(self, group, log):
        super().__init__(group)
        self.log = log

    def post(self, send, recv):
        self.log.append(("post", send.numel(), recv.numel(), recv.untyped_storage().data_ptr()))
        return super().post(send, recv)

    def wait(self, handle):
        super().wait(handle)
        self.log.append(("wait",))


def _ring_structure(valid: list[int]) -> dict:
    P, rank = dist.get_world_size(), dist.get_rank()
    state = init_sequence_parallel(SequenceParallelConfig(ring_degree=P))
    B, H, D = 2, 2, 8
    q, k, v = random_qkv(5, B, sum(valid), H, H, D, torch.float64)
    start = sum(valid[:rank])
    n = valid[rank]
    log: list[tuple] = []
    real_block = ring.block_attention

    def recording_block(q_, k_, v_, **kw):
        log.append(("compute", k_.shape[1]))
        return real_block(q_, k_, v_, **kw)

    ring.block_attention = recording_block
    try:
        outs = []
        for _ in range(2):  # two calls: buffers must be reused, not reallocated
            call = AttentionCall(q[:, start : start + n], k[:, start : start + n], v[:, start : start + n],
                                 0.3, False, None, "ring", state, None)
            outs.append(ring.ring_attention(call, valid, comm=RecordingComm(state.ring_group, log)))
    finally:
        ring.block_attention = real_block
    ref = reference_attention(q, k, v, scale=0.3)[:, start : start + n]
    return {"log": log, "err": max((o - ref).abs().max().item() for o in outs) if n else 0.0}


def test_ring_posts_before_compute_and_reuses_buffers(rank_pool):
    P = 4
    valid = [3, 0, 5, 2]
    per_rank = rank_pool(P).run(_ring_structure, valid)
    B, H, D = 2, 2, 8
    for rank, res in enumerate(per_rank):
        assert res["err"] < 1e-12, (rank, res["err"])
        log = res["log"]
        half = len(log) // 2
        assert log[:half] and [e[0] for e in log[:half]] == [e[0] for e in log[half:]]  # same shape both calls
        events = log[:half]
        posts = [i for i, e in enumerate(events) if e[0] == "post"]
        waits = [i for i, e in enumerate(events) if e[0] == "wait"]
        assert len(posts) == len(waits) == P - 1
        for step, (p, w) in enumerate(zip(posts, waits)):
            src = (rank - step) % P
            nxt = (rank - step - 1) % P
            # The message carries K and V of exactly the block being forwarded / received.
            assert events[p][1] == 2 * B * valid[src] * H * D and events[p][2] == 2 * B * valid[nxt] * H * D
            computes = [e for e in events[p:w] if e[0] == "compute"]
            # Step `step` computes on block src (skipped when it is empty) between its post and its wait.
            assert computes == ([("compute", valid[src])] if valid[src] and valid[rank] else [])
        # Two receive buffers, alternating, the same ones in the second call.
        ptrs = [e[3] for e in log if e[0] == "post"]
        assert len(set(ptrs)) <= 2 and ptrs[: P - 1] == ptrs[P - 1 :]
