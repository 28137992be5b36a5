"""Cross-rank agreement on an attention call, checked before any collective can hang on it.

Every rank of the SP group contributes one small int64 vector (shapes, dtype, options and its own
row counts) to ONE all-gather. Fields that must agree are compared on every rank, so a rank that
passes, say, a different head count makes *all* ranks raise the same ValueError instead of leaving
the others blocked in an all-to-all. The per-rank row counts come back too: the ring needs them
for shards of unequal length.

A rank that cannot run the call (``refusal``: a reason, or the exception it raises, e.g. a mask of
the wrong dtype) says so in the same exchange, so every rank raises instead of the others blocking.
Each rank's mask shape and a checksum of its content ride along (attn/mask.py decides the mask's
frame from them, and raises on every rank when ranks passed different full-frame masks).

Cost: one all-gather of ~16 int64 per call, over the SP state's host-side group (gloo, on CPU
tensors, even when the SP group is NCCL: no GPU synchronization). It cannot be switched off: the
exchange is what guarantees that ranks which disagree raise instead of computing on mismatched data.
"""

from __future__ import annotations

import struct

import torch
import torch.distributed as dist

from ..distributed.comm import all_gather_small
from .call import AttentionCall

_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Names of the fields every rank must agree on, in vector order; the last two are per-rank.
AGREED = (
    "batch",
    "query heads",
    "key/value heads",
    "head_dim",
    "dtype",
    "causal",
    "joint length",
    "joint strategy",
    "softmax scale",
    "backend",
    "layout true_len",
    "layout local_len",
    "layout sp_size",
    "gradients",
)
PER_RANK = ("local rows", "valid rows", "refused")
# Per rank after those: the mask (attn/mask.py ``describe``: present, batch, heads, queries, keys) and its checksum.
MASK_FIELDS = 6


def _code(value: object, table: list) -> int:
    return table.index(value) if value in table else -1


def _scale_bits(scale: float) -> int:
    return struct.unpack("<q", struct.pack("<d", scale))[0]


def _vector(call: AttentionCall, backend_names: list[str]) -> list[int]:
    q, k = call.query, call.key
    joint = call.joint
    layout = call.layout
    return [
        q.shape[0],
        q.shape[2],
        k.shape[2],
        q.shape[3],
        _code(q.dtype, _DTYPES),
        int(call.causal),
        joint.length if joint is not None else 0,
        ("front", "rear").index(joint.strategy) if joint is not None else -1,
        _scale_bits(call.scale),
        _code(call.backend, backend_names),
        layout.true_len if layout is not None else -1,
        layout.local_len if layout is not None else -1,
        layout.sp_size if layout is not None else -1,
        int(call.needs_grad()),
        q.shape[1],
        call.valid_rows(call.state.sp_rank),
    ]


def _show(field: str, value: int, backend_names: list[str]) -> str:
    if field == "backend":
        return repr(backend_names[value]) if 0 <= value < len(backend_names) else "an unregistered backend"
    if field == "dtype":
        return str(_DTYPES[value]) if 0 <= value < len(_DTYPES) else "unsupported dtype"
    if field == "softmax scale":
        return repr(struct.unpack("<d", struct.pack("<q", value))[0])
    if field == "joint strategy":
        return {0: "'front'", 1: "'rear'"}.get(value, "no joint tokens")
    if field == "gradients":
        return "needed" if value else "not needed"
    if field.startswith("layout") and value == -1:
        return "no layout"
    return str(value)


def exchange_rows(
    call: AttentionCall,
    group: dist.ProcessGroup | None,
    backend_names: list[str],
    refusal: str | BaseException | None = None,
    mask: list[int] | None = None,
) -> list[tuple[int, ...]]:
    """All-gather the call metadata over ``group`` (the SP group, in sp_rank order), check the agreed
    fields, and return every rank's (local rows, valid rows, *mask fields). Raises on every rank: ValueError
    when they disagree, NotImplementedError when a rank refused the call (``refusal``: its reason, or the
    exception that rank raises, e.g. a bad mask), while the others raise that rank(s) could not run it.
    ``mask``: this rank's ``MASK_FIELDS`` mask fields (zeros: no mask); compared by the caller."""
    mask = mask if mask is not None else [0] * MASK_FIELDS
    rows = all_gather_small(
        _vector(call, backend_names) + [int(refusal is not None)] + list(mask), group, "attention metadata"
    )
    n = len(AGREED)
    refused = [rank for rank, r in enumerate(rows) if r[n + 2]]
    if refused:
        if isinstance(refusal, BaseException):
            raise refusal
        raise NotImplementedError(
            refusal if refusal is not None else
            f"attention (backend {call.backend!r}): sp rank(s) {refused} cannot run this call (see the error there); "
            "every rank raises so that none waits in a collective"
        )
    problems = []
    for i, field in enumerate(AGREED):
        values = [r[i] for r in rows]
        if len(set(values)) > 1:
            per = ", ".join(f"rank {rank}: {_show(field, v, backend_names)}" for rank, v in enumerate(values))
            problems.append(f"{field} ({per})")
    if problems:
        raise ValueError(
            f"attention (backend {call.backend!r}): the ranks of the SP group disagree on "
            + "; ".join(problems)
            + ". Every rank must call attention with the same batch, heads, head_dim, dtype, options and "
            "joint tokens, on shards of the same sequence."
        )
    return [(r[n], r[n + 1], *r[n + 3 :]) for r in rows]
