"""fused_ring: numerics against the float64 reference on gloo (world sizes 1-4, the shapes of the
attention tests, both merge modes), and its structure: post of step i+1 -> compute of step i -> wait,
K+V in one message, two receive buffers allocated once, no host synchronization inside the loop,
buffer release, and the CUDA stream ordering (checked with a fake stream on CPU)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from sp_kernels.attn import ring
from sp_kernels.attn.call import AttentionCall
from sp_kernels.distributed.comm import StreamOrderedComm, TorchRingComm, check_comm_device
from sp_kernels.distributed.parallel_state import SequenceParallelConfig, init_sequence_parallel
from tests.attention_cases import case_failures, case_params, run_case
from tests.attention_reference import random_qkv, reference_attention
from tests.poison import poisoned
from tests.test_attention_dist import standard_cases


def run_fused_cases(cases: list[dict]) -> list[dict]:
    """Rank side: like attention_cases.run_cases, with each case's merge mode."""
    results = []
    with poisoned():
        for case in cases:
            ring.set_default_merge(case.get("merge"))
            try:
                results.append(run_case(case))
            except Exception as e:  # noqa: BLE001 - reported per case to the parent
                results.append({"error": f"{type(e).__name__}: {e}"})
            finally:
                ring.set_default_merge(None)
    return results


@functools.cache
def fused_cases(P: int) -> list[dict]:
    """Every ring-shaped case of the attention tests as fused_ring (both merges), USP and auto."""
    cases = []
    for case in standard_cases(P):
        if case["backend"] == "ring" or P == 1 and case["backend"] == "auto":
            for merge in ("step", "all"):
                cases.append({**case, "backend": "fused_ring", "degrees": (1, P), "merge": merge})
        elif case["backend"] in ("usp", "auto") and case["degrees"][1] > 1 and case["degrees"][0] > 1:
            cases.append({**case, "merge": "all"})  # USP's ring part runs the fused_ring engine
        elif case["backend"] == "auto" and case["degrees"] == (1, P):
            cases.append({**case, "merge": "all"})  # auto resolves to fused_ring here
    return cases


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_fused_cases_cover_dtypes(world_size):
    cases = fused_cases(world_size)
    assert {c["dtype"] for c in cases} >= {"float32", "bfloat16"} and len(cases) >= 30


@pytest.mark.parametrize("world_size,index", case_params(fused_cases, [1, 2, 3, 4]))
def test_fused_ring_matches_reference(rank_batch, world_size, index):
    cases = fused_cases(world_size)
    bad = case_failures(cases, rank_batch(run_fused_cases, world_size, cases), index)
    assert not bad, bad[0]


# --------------------------------------------------------------------------------------------
# Structure


class RecordingComm:
    """A RingComm that logs post/wait around a real TorchRingComm (so the numbers stay checked)."""

    def __init__(self, group, log: list) -> None:
        self.inner = TorchRingComm(group)
        self.rank, self.size, self.device_types = self.inner.rank, self.inner.size, self.inner.device_types
        self.log = log

    def post(self, send, recv):
        self.log.append(("post", send.numel(), recv.numel(), recv.data_ptr(), send.data_ptr()))
        return self.inner.post(send, recv)

    def wait(self, handle):
        self.inner.wait(handle)
        self.log.append(("wait",))


_SYNC_POINTS = [
    (torch.Tensor, "item"),
    (torch.Tensor, "tolist"),
    (torch.Tensor, "cpu"),
    (torch.Tensor, "numpy"),
    (torch.Tensor, "__bool__"),
    (torch.cuda, "synchronize"),
    (torch.cuda.Stream, "synchronize"),
    (torch.cuda.Event, "synchronize"),
]


@contextlib.contextmanager
def sync_detector(log: list) -> Iterator[None]:
    """Every host-synchronizing call (on CUDA) appends ("sync", name) to ``log`` while active."""
    saved = [(owner, name, getattr(owner, name)) for owner, name in _SYNC_POINTS]

    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            log.append(("sync", name))
            return fn(*args, **kwargs)

        return wrapper

    for owner, name, fn in saved:
        setattr(owner, name, wrap(name, fn))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _fused_structure(valid: list[int], merge: str, joint_len: int) -> dict:
    from sp_kernels.attn.call import Joint
    from sp_kernels.attn.ring import fused_ring_attention, release_ring_buffers

    P, rank = dist.get_world_size(), dist.get_rank()
    state = init_sequence_parallel(SequenceParallelConfig(ring_degree=P, attention_backend="fused_ring"))
    release_ring_buffers(state)
    B, H, D = 2, 2, 8
    q, k, v = random_qkv(7, B, sum(valid), H, H, D, torch.float64)
    jq, jk, jv = random_qkv(8, B, joint_len, H, H, D, torch.float64)
    joint = Joint(jq, jk, jv, "front") if joint_len else None
    start, n = sum(valid[:rank]), valid[rank]
    log: list[tuple] = []
    allocs: list[tuple] = []
    real_block, real_new, real_core = ring.block_attention, ring.new_buffer, ring.ring_core

    def recording_block(q_, k_, v_, **kw):
        log.append(("compute", k_.shape[1]))
        return real_block(q_, k_, v_, **kw)

    in_loop = [False]

    def counting_new(shape, dtype, device):
        if in_loop[0]:  # the output tensor is allocated once per call outside the loop, by design
            allocs.append(tuple(shape))
        return real_new(shape, dtype, device)

    def guarded_core(*args, **kwargs):
        log.append(("loop",))
        in_loop[0] = True
        try:
            with sync_detector(log):
                real_core(*args, **kwargs)
        finally:
            in_loop[0] = False
        log.append(("end",))

    ring.block_attention, ring.new_buffer, ring.ring_core = recording_block, counting_new, guarded_core
    outs, allocs_per_call = [], []
    try:
        for _ in range(3):  # three calls: buffers allocated in the first only
            n_alloc = len(allocs)
            call = AttentionCall(q[:, start : start + n], k[:, start : start + n], v[:, start : start + n],
                                 0.3, False, joint, "fused_ring", state, None)
            outs.append(fused_ring_attention(call, valid, comm=RecordingComm(state.ring_group, log), merge=merge))
            allocs_per_call.append(allocs[n_alloc:])
        cached = sorted(str(key) for key in state.ring_buffers)
        released = release_ring_buffers(state)  # what remove_sequence_parallel does too
        after = sorted(str(key) for key in state.ring_buffers)
    finally:
        ring.block_attention, ring.new_buffer, ring.ring_core = real_block, real_new, real_core
    ref = reference_attention(q, k, v, scale=0.3, joint=(jq, jk, jv) if joint_len else None)
    ref = torch.cat([ref[:, :joint_len], ref[:, joint_len + start : joint_len + start + n]], dim=1)
    err = max(((o - ref).abs().max().item() if o.numel() else 0.0) for o in outs)
    return {"log": log, "err": err, "allocs": allocs_per_call, "cached": cached, "after": after,
            "released": released}


def _split_calls(log: list) -> list[list]:
    calls, cur = [], None
    for e in log:
        if e[0] == "loop":
            cur = []
        elif e[0] == "end":
            calls.append(cur)
            cur = None
        elif cur is not None:
            cur.append(e)
    return calls


@pytest.mark.parametrize("merge,joint_len", [("step", 0), ("all", 3)])
def test_fused_ring_structure(rank_pool, merge, joint_len):
    P = 4
    valid = [3, 0, 5, 2]
    per_rank = rank_pool(P).run(_fused_structure, valid, merge, joint_len)
    B, H, D = 2, 2, 8
    for rank, res in enumerate(per_rank):
        assert res["err"] < 1e-12, (rank, res["err"])
        calls = _split_calls(res["log"])
        assert len(calls) == 3
        assert not [e for c in calls for e in c if e[0] == "sync"], "host synchronization inside the ring loop"
        # The two receive buffers (and only they) are allocated in the first call, none after.
        big = 2 * B * max(valid) * H * D
        assert res["allocs"][0] == [(big,), (big,)] and res["allocs"][1] == [] and res["allocs"][2] == [], res["allocs"]
        for events in calls:
            posts = [i for i, e in enumerate(events) if e[0] == "post"]
            waits = [i for i, e in enumerate(events) if e[0] == "wait"]
            assert len(posts) == len(waits) == P - 1
            # Step 0's transfer is posted before any compute (joint blocks included).
            assert events[0][0] == "post"
            for step, (p, w) in enumerate(zip(posts, waits)):
                src, nxt = (rank - step) % P, (rank - step - 1) % P
                assert p < w and (step == 0 or waits[step - 1] < p)
                # One message carries K and V of exactly the forwarded block; the received one likewise.
                assert events[p][1] == 2 * B * valid[src] * H * D and events[p][2] == 2 * B * valid[nxt] * H * D
                computes = [e[1] for e in events[p:w] if e[0] == "compute"]
                expect = [valid[src]] * (bool(valid[src] and valid[rank]) + bool(joint_len and valid[src]))
                if step == 0 and joint_len:
                    expect = [joint_len] * (1 + bool(valid[rank])) + expect
                assert sorted(computes) == sorted(expect), (rank, step, computes, expect)
                if step + 2 < P:
                    between = events[w + 1 : posts[step + 1]]
                    assert not [e for e in between if e[0] == "compute"], "compute outside a post/wait window"
            # The last step has nothing left to receive: its compute follows the last wait.
            last = (rank + 1) % P
            tail = [e[1] for e in events[waits[-1] + 1 :] if e[0] == "compute"]
            assert tail == [valid[last]] * (bool(valid[last] and valid[rank]) + bool(joint_len and valid[last]))
        # Receives alternate between two buffers, the same ones in every call.
        recv_ptrs = [e[3] for c in calls for e in c if e[0] == "post" and e[2]]
        assert 1 <= len(set(recv_ptrs)) <= 2
        assert [e[3] for e in calls[0] if e[0] == "post"] == [e[3] for e in calls[2] if e[0] == "post"]
        assert res["released"] == 1 and res["cached"] and not res["after"], res


def _bad_inputs() -> dict:
    from sp_kernels.attn.ring import fused_ring_attention

    P = dist.get_world_size()
    state = init_sequence_parallel(SequenceParallelConfig(ring_degree=P, attention_backend="fused_ring"))
    q = torch.randn(1, 4, 2, 8)
    out = {}
    try:  # every rank is told a length for itself that does not match what it holds
        call = AttentionCall(q, q, q, 0.5, False, None, "fused_ring", state, None)
        fused_ring_attention(call, [5] * P)
        out["valid"] = "no error"
    except ValueError as e:
        out["valid"] = str(e)
    try:
        fused_ring_attention(AttentionCall(q, q, q, 0.5, False, None, "fused_ring", state, None), [4] * (P + 1))
        out["count"] = "no error"
    except ValueError as e:
        out["count"] = str(e)
    return out


def test_fused_ring_bad_inputs_raise(rank_pool):
    for res in rank_pool(2).run(_bad_inputs):
        assert "shard length" in res["valid"] or "block lengths" in res["valid"], res
        assert "2 ranks" in res["count"] or "ring of 2" in res["count"], res


def test_device_mismatch_raises():
    class NcclLike:
        rank, size, device_types = 0, 2, frozenset({"cuda"})

    with pytest.raises(ValueError, match=r"on cpu but the ring process group communicates \['cuda'\] tensors"):
        check_comm_device(NcclLike(), torch.device("cpu"))
    check_comm_device(NcclLike(), torch.device("cuda", 0))  # matching: no error

    class FakeStream:
        device = torch.device("cuda", 1)

    comm = StreamOrderedComm(NcclLike(), FakeStream())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="communication stream is on cuda:1"):
        comm.post(torch.zeros(2), torch.zeros(2))


def test_stream_ordering_with_fake_cuda(monkeypatch):
    """StreamOrderedComm's CUDA protocol, with torch.cuda's stream calls faked on CPU: the comm stream
    waits for compute before issuing, the transfer is issued and waited *inside* the comm stream, and
    compute waits for the comm stream after -- all through wait_stream (events), never the host."""
    log: list = []

    class FakeStream:
        def __init__(self, name: str) -> None:
            self.name, self.device = name, torch.device("cuda", 0)

        def wait_stream(self, other) -> None:
            log.append(("wait_stream", self.name, other.name))

    compute, side = FakeStream("compute"), FakeStream("comm")
    current = [compute]

    @contextlib.contextmanager
    def use(stream):
        current.append(stream)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", use)

    class Inner:
        rank, size, device_types = 0, 2, frozenset({"cuda"})

        def post(self, send, recv):
            log.append(("post", current[-1].name))
            return "h"

        def wait(self, handle):
            log.append(("wait", current[-1].name, handle))

    comm = StreamOrderedComm(Inner(), side)  # type: ignore[arg-type]
    t = torch.empty(4, device="meta")
    monkeypatch.setattr(comm, "_check", lambda t: None)  # meta tensors stand in for CUDA ones
    h = comm.post(t, t)
    log.append(("compute", current[-1].name))
    comm.wait(h)
    assert log == [
        ("wait_stream", "comm", "compute"),
        ("post", "comm"),
        ("compute", "compute"),
        ("wait", "comm", "h"),
        ("wait_stream", "compute", "comm"),
    ]


def test_auto_picks_fused_ring():
    from sp_kernels.attn import resolve_backend
    from sp_kernels.distributed.parallel_state import SPState

    state = SPState(config=SequenceParallelConfig(ring_degree=2))
    assert resolve_backend(None, state) == "fused_ring"
    assert resolve_backend("fused_ring", state) == "fused_ring"
    with pytest.raises(ValueError, match="unknown"):
        ring.default_engine("bogus")
    with pytest.raises(ValueError, match="unknown"):
        ring.set_default_merge("bogus")


def test_buffers_recorded_on_the_comm_stream(monkeypatch):
    """Every call that uses the comm stream marks both receive buffers as used by it (so the caching
    allocator keeps their memory until that stream is done), also when another engine allocated them."""
    recorded: list = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: recorded.append((self.data_ptr(), stream)))
    cache: dict = {}
    a = ring.ring_buffers(cache, 16, torch.float32, torch.device("cpu"))  # reference engine: no stream
    assert recorded == []
    b = ring.ring_buffers(cache, 8, torch.float32, torch.device("cpu"), stream="comm")
    assert [x.data_ptr() for x in a] == [x.data_ptr() for x in b]  # reused, not reallocated
    assert recorded == [(a[0].data_ptr(), "comm"), (a[1].data_ptr(), "comm")]
    assert list(cache) == [(torch.float32, torch.device("cpu"))]
