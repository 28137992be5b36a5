"""``attention()``: one entry point for local and sequence-parallel attention, and its backend registry.

Layout ``[batch, seq, heads, head_dim]`` (BSHD) for every tensor. Inside a sharded region (between
a split and its gather, see context.py) the configured backend communicates; outside it, or with
``backend="local"``, this is plain attention on the tensors given (``"local"`` is also the right
choice for cross-attention against replicated tokens inside a sharded region). See docs/attention.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..comm import all_gather_small
from ..context import ShardLayout, SPContext, current_context
from ..parallel_state import BACKEND_NAMES, SPState
from .agreement import check_enabled, exchange_rows
from .call import AttentionCall, Joint, validate_inputs
from .local import NoKernelError, block_attention, block_kernel_names, register_block_kernel
from .ring import ring_attention
from .ulysses import ulysses_attention
from .usp import usp_attention

Tensor = torch.Tensor
BackendFn = Callable[[AttentionCall, list[int]], Tensor]
"""A sequence-parallel backend: (call, valid rows of every SP rank in sp_rank order) -> output."""

__all__ = [
    "Attention",
    "AttentionCall",
    "NoKernelError",
    "attention",
    "block_attention",
    "block_kernel_names",
    "register_backend",
    "register_block_kernel",
    "registered_backends",
    "resolve_backend",
]


def _ulysses(call: AttentionCall, valid: list[int]) -> Tensor:
    return ulysses_attention(call, valid)


def _ring(call: AttentionCall, valid: list[int]) -> Tensor:
    return ring_attention(call, valid)


_BACKENDS: dict[str, BackendFn] = {"ulysses": _ulysses, "ring": _ring, "usp": usp_attention}
# Degrees each backend can run: (needs ulysses_degree == 1, needs ring_degree == 1).
_NEEDS = {"ulysses": (False, True), "ring": (True, False), "fused_ring": (True, False), "usp": (False, False)}


def register_backend(name: str, fn: BackendFn, *, replace: bool = False) -> None:
    """Register a sequence-parallel backend under one of the names SequenceParallelConfig accepts."""
    if name not in BACKEND_NAMES or name in ("auto", "local"):
        raise ValueError(
            f"register_backend: {name!r} is not a backend name SequenceParallelConfig accepts; expected one of "
            f"{[n for n in BACKEND_NAMES if n not in ('auto', 'local')]}"
        )
    if name in _BACKENDS and not replace:
        raise ValueError(f"register_backend: {name!r} is already registered (pass replace=True to override)")
    _BACKENDS[name] = fn


def registered_backends() -> tuple[str, ...]:
    return ("local", *_BACKENDS)


def resolve_backend(backend: str | None, state: SPState | None) -> str:
    """The backend that runs: ``backend`` or the state's configured one, with "auto" resolved."""
    name = backend if backend is not None else (state.config.attention_backend if state is not None else "local")
    if name not in BACKEND_NAMES:
        raise ValueError(f"attention: backend={name!r} is unknown; expected one of {list(BACKEND_NAMES)}")
    if name == "auto":
        name = state.config.resolved_backend() if state is not None else "local"
    return name


def _local(query: Tensor, key: Tensor, value: Tensor, scale: float, causal: bool, joint: Joint | None) -> Tensor:
    if joint is not None:
        front = joint.strategy == "front"
        query, key, value = (
            torch.cat([j, x] if front else [x, j], dim=1)
            for j, x in ((joint.query, query), (joint.key, key), (joint.value, value))
        )
    out, _ = block_attention(query, key, value, softmax_scale=scale, causal=causal)
    return out.contiguous()


def _split_replicated(
    query: Tensor, key: Tensor, value: Tensor, joint: Joint | None, layout: ShardLayout
) -> tuple[Tensor, Tensor, Tensor, Joint]:
    """Replicated rows around the shard (a SequenceParallelPartialInput prefix, or the joint tokens of
    a SequenceParallelJointInput) become joint tokens, merged with any joint tensors passed in."""
    if layout.prefix_len:
        side, n, strategy = "in front of", layout.prefix_len, "front"
        rep = tuple(t[:, :n] for t in (query, key, value))
        seq = tuple(t[:, n:] for t in (query, key, value))
    else:
        side, n, strategy = "behind", layout.suffix_len, "rear"
        rep = tuple(t[:, -n:] for t in (query, key, value))
        seq = tuple(t[:, :-n] for t in (query, key, value))
    if joint is not None and joint.strategy != strategy:
        raise ValueError(
            f"attention: the input has {n} replicated rows {side} the shard (recorded by the plan), so the joint "
            f"tensors passed in cannot use joint_strategy={joint.strategy!r}; use joint_strategy={strategy!r}"
        )
    if joint is not None:
        # Output row order stays [passed joint | input rows] for "front", [input rows | passed joint] for "rear".
        pairs = zip((joint.query, joint.key, joint.value), rep)
        rep = tuple(torch.cat([j, r] if strategy == "front" else [r, j], dim=1) for j, r in pairs)
    return seq[0], seq[1], seq[2], Joint(rep[0], rep[1], rep[2], strategy)


def _replicated(query: Tensor, key: Tensor, state: SPState) -> bool:
    """Whether every SP rank holds the same q and k (collective; every rank takes this path together,
    since layouts and joint lengths are the same on all of them). Asked only when the row count fits
    both the replicated joint tokens and a rank's shard, which shapes alone cannot tell apart."""
    sums = torch.stack([t.double().sum() for t in (query, key)] + [t.double().square().sum() for t in (query, key)])
    mine = sums.cpu().view(torch.int64).tolist()
    return all(other == mine for other in all_gather_small(mine, state.host_group))


def _find_layout(ctx: SPContext, rows: int) -> ShardLayout | None:
    """The layout of an attention input with ``rows`` local rows; two candidates would be a guess, and
    none while padded sequences exist would attend padding rows."""
    found = ctx.attention_layouts(rows)
    if len(found) > 1:
        desc = sorted((lay.true_len, lay.prefix_len, lay.suffix_len) for lay in found)
        raise ValueError(
            f"attention: {len(found)} sharded sequences of this forward explain {rows} local rows (true length, "
            f"replicated rows in front, behind: {desc}), so which rows are padding is ambiguous; pad the "
            "sequences to lengths that shard to different local lengths"
        )
    if found:
        return found.pop()
    padded = [lay for lay in ctx.layouts if lay.pad]
    if padded:
        known = sorted({lay.local_rows for lay in ctx.layouts} | {
            lay.local_len + n for lay in ctx.layouts for n, _ in ctx.joints if not lay.prefix_len})
        raise ValueError(
            f"attention: the local sequence has {rows} rows, which matches no sharded sequence of this forward "
            f"(local rows of the recorded layouts: {known}), while auto_pad padded one of them (true length "
            f"{padded[0].true_len}, {padded[0].pad} padding rows): the padding rows could not be excluded. "
            "Sequences concatenated inside the model must be declared in the plan: replicated tokens joined to "
            "the shard as SequenceParallelJointInput, or shard the concatenation once (SequenceParallelPartialInput)"
        )
    return None


def _check_degrees(name: str, state: SPState) -> None:
    needs_u1, needs_r1 = _NEEDS.get(name, (False, False))
    u, r = state.ulysses_size, state.ring_size
    if (needs_u1 and u != 1) or (needs_r1 and r != 1):
        want = "ulysses_degree == 1" if needs_u1 else "ring_degree == 1"
        raise ValueError(
            f"attention: backend {name!r} needs {want}, but the SP state has ulysses_degree={u}, ring_degree={r}; "
            "use backend='usp' or 'auto'"
        )


def _valid_rows(call: AttentionCall, name: str) -> list[int]:
    """Valid rows of every SP rank; exchanged (and the call checked across ranks) when needed."""
    state = call.state
    P, U = state.sp_size, state.ulysses_size
    layout = call.layout
    needs_lengths = layout is None and name != "ulysses"
    if check_enabled() or needs_lengths:
        rows = exchange_rows(call, state.host_group, list(BACKEND_NAMES))
        if U > 1:
            for g in range(P // U):
                local = [rows[g * U + u][0] for u in range(U)]
                if len(set(local)) > 1:
                    raise ValueError(
                        f"attention (backend {name!r}): the Ulysses all-to-all needs equal local lengths in a Ulysses "
                        f"group, got {local} on sp ranks {g * U}..{g * U + U - 1}; shard with auto_pad "
                        "(sp_shard(..., auto_pad=True) or SequenceParallelInput(auto_pad=True)) or use the ring backend"
                    )
        return [valid for _, valid in rows]
    if layout is not None:
        return [layout.valid_rows(r) for r in range(P)]
    return [call.query.shape[1]] * P


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    backend: str | None = None,
    joint_query: Tensor | None = None,
    joint_key: Tensor | None = None,
    joint_value: Tensor | None = None,
    joint_strategy: str = "front",
) -> Tensor:
    """softmax(q k^T * scale) v over the full (sharded) sequence plus optional joint tokens.

    Returns ``[B, J + S_local, Hq, D]``: joint rows first for ``joint_strategy="front"``, last for
    ``"rear"``; the joint rows are identical on every rank. Forward only under SP (no autograd).
    """
    scale, joint = validate_inputs(query, key, value, softmax_scale, joint_query, joint_key, joint_value, joint_strategy)
    ctx = current_context()
    state = ctx.state if ctx is not None else None
    name = resolve_backend(backend, state)
    if ctx is None or state is None or not ctx.sharded or state.sp_size == 1 or name == "local":
        return _local(query, key, value, scale, causal, joint)

    if name not in _BACKENDS:
        raise ValueError(
            f"attention: backend {name!r} is not registered yet; registered: {list(registered_backends())}"
        )
    _check_degrees(name, state)
    if key.shape[1] != query.shape[1]:
        raise ValueError(
            f"attention: key/value have {key.shape[1]} rows but query has {query.shape[1]}; sequence-parallel "
            "backends need self-attention over the sharded sequence. For cross-attention against replicated "
            "tokens use backend='local'."
        )
    grads = [t for t in (query, key, value, joint_query, joint_key, joint_value) if t is not None and t.requires_grad]
    if grads and torch.is_grad_enabled():
        raise NotImplementedError(
            "attention: sequence-parallel backends are forward-only (no backward yet); run under torch.no_grad() "
            "or torch.inference_mode()"
        )
    rows = query.shape[1]
    if any(rows == n for n, _ in ctx.joints) and (
        not ctx.attention_layouts(rows) or _replicated(query, key, state)
    ):
        # Replicated joint tokens attending among themselves (a text refiner): the same on every rank.
        return _local(query, key, value, scale, causal, joint)
    layout = _find_layout(ctx, rows)
    if layout is not None and layout.sp_size != state.sp_size:
        raise ValueError(
            f"attention: the recorded shard layout is for {layout.sp_size} ranks but the SP group has {state.sp_size}"
        )
    if layout is not None and (layout.prefix_len or layout.suffix_len):
        query, key, value, joint = _split_replicated(query, key, value, joint, layout)
    call = AttentionCall(query, key, value, scale, causal, joint, name, state, layout)
    return _BACKENDS[name](call, _valid_rows(call, name))


class Attention(nn.Module):
    """``attention()`` with its options stored, for model code; agnostic of heads and head_dim."""

    def __init__(
        self,
        *,
        softmax_scale: float | None = None,
        causal: bool = False,
        backend: str | None = None,
        joint_strategy: str = "front",
    ) -> None:
        super().__init__()
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.backend = backend
        self.joint_strategy = joint_strategy

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        joint_query: Tensor | None = None,
        joint_key: Tensor | None = None,
        joint_value: Tensor | None = None,
    ) -> Tensor:
        return attention(
            query,
            key,
            value,
            softmax_scale=self.softmax_scale,
            causal=self.causal,
            backend=self.backend,
            joint_query=joint_query,
            joint_key=joint_key,
            joint_value=joint_value,
            joint_strategy=self.joint_strategy,
        )

    def extra_repr(self) -> str:
        return f"causal={self.causal}, backend={self.backend!r}, joint_strategy={self.joint_strategy!r}"


# Registers "fused_ring" in the registry above; at the end because fused_ring imports register_backend.
from . import fused_ring  # noqa: E402,F401
