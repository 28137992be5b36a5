"""The "fused_ring" backend: ring attention with the communication hidden behind compute.

Same loop as the reference ring (``ring.ring_core``; shared so both stay exact for the same cases:
unequal shards, auto_pad, joint tokens, causal), run with a ``RingEngine`` that

* on CUDA issues every K+V transfer on a dedicated high-priority stream (``comm.comm_stream``),
  ordered against compute with events only: step i+1's transfer is in flight while step i's block
  attention runs, and the host never synchronizes inside the loop;
* merges partial results either per step into one fp32 accumulator (``merge="fused"``: the fused
  in-place merge op) or keeps the W partials and merges once at the end (``merge="deferred"``:
  one W-way merge, W partial outputs of memory);
* packs K and V into one buffer per step and reuses two receive buffers across steps and calls
  (cached in the SP state, freed by ``release_ring_buffers`` or ``remove_sequence_parallel``).

On CPU/gloo the same code path runs: ``batch_isend_irecv`` returns async work handles, so the
exchange overlaps the block attention there too. USP uses this engine for its ring part.

The merge mode defaults to ``DEFAULT_MERGE[device type]`` (fused on CPU, measured faster by
benchmarks/bench_ring.py; deferred on CUDA, predicted faster by docs/performance.md); ``SP_KERNELS_RING_MERGE=fused|deferred`` or ``set_default_merge`` override it.
"""

from __future__ import annotations

import torch

from ..comm import RingComm
from ..parallel_state import SPState, get_sp_state
from . import ring
from .call import AttentionCall
from .ring import DEFAULT_MERGE, MERGE_ENV, default_engine, set_default_merge

Tensor = torch.Tensor

__all__ = [
    "DEFAULT_MERGE",
    "MERGE_ENV",
    "default_engine",
    "fused_ring_attention",
    "register",
    "release_ring_buffers",
    "set_default_merge",
]


def fused_ring_attention(
    call: AttentionCall, lens: list[int], comm: RingComm | None = None, *, merge: str | None = None
) -> Tensor:
    """The "fused_ring" backend over ``call.state.ring_group``; ``lens`` = valid rows of every ring rank."""
    return ring.run_ring(call, lens, comm, default_engine(merge, call.query.device.type))


def release_ring_buffers(state: SPState | None = None) -> int:
    """Free the cached ring receive buffers of ``state`` (default: the current SP state).

    Returns the number of buffer pairs dropped. The next ring call allocates them again.
    """
    state = state if state is not None else get_sp_state()
    if state is None:
        return 0
    return ring.release_ring_buffers(state._cache)


def _backend(call: AttentionCall, valid: list[int]) -> Tensor:
    return fused_ring_attention(call, valid)


def register() -> None:
    """Register "fused_ring" in the attention registry when it is missing (a replacement someone
    registered on purpose stays)."""
    from . import _BACKENDS, register_backend

    if "fused_ring" not in _BACKENDS:
        register_backend("fused_ring", _backend)


# Importing this module registers the backend. attn/__init__ must import it only after its registry
# exists (at its end): a partial import would fail loudly here rather than leave "fused_ring" missing.
register()
