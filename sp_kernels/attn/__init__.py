"""``attention()``: one entry point for local and sequence-parallel attention.

Layout ``[batch, seq, heads, head_dim]`` (BSHD) for every tensor. Inside a sharded region the record
of what was sharded (context.py) decides what the inputs are (``read_roles``); sharded
self-attention runs on the configured backend, cross-attention to recorded sharded K/V all-gathers
them, and everything else is plain attention on the tensors given. ``backend="local"`` (or
``Attention(skip_sequence_parallel=True)``, vLLM-Omni's name) declares attention that must stay on
this rank, e.g. cross-attention to replicated tokens. Which backends exist, the degrees each runs
and their implementations: the table in sp_kernels/attn/backends.py. See docs/attention.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..distributed.parallel_state import SPState
from ..plan.context import ShardLayout, SPContext, current_context
from ..plan.sharding import _all_gather_cat, gather_rows
from .agreement import exchange_rows
from .backends import (
    BACKEND_NAMES,
    BACKENDS,
    BackendFn,
    backend_function,
    grad_backend_function,
    register_backend,
    registered_backends,
    resolve_backend,
)
from .call import AttentionCall, Joint, validate_inputs
from .compiled import compiled_attention
from .local import NoKernelError, block_attention, block_kernel_names, register_block_kernel
from .mask import attend_block, checksum, classify, describe, full_frame, normalize_mask

Tensor = torch.Tensor

__all__ = [
    "Attention",
    "AttentionCall",
    "BackendFn",
    "NoKernelError",
    "Roles",
    "Route",
    "attention",
    "block_attention",
    "block_kernel_names",
    "effective_mask",
    "register_backend",
    "register_block_kernel",
    "read_roles",
    "registered_backends",
    "resolve_backend",
    "route_call",
    "run_route",
    "sharded_attention",
]


def _join(query: Tensor, key: Tensor, value: Tensor, joint: Joint | None) -> tuple[Tensor, Tensor, Tensor]:
    if joint is None:
        return query, key, value
    front = joint.strategy == "front"
    return tuple(  # type: ignore[return-value]
        torch.cat([j, x] if front else [x, j], dim=1)
        for j, x in ((joint.query, query), (joint.key, key), (joint.value, value))
    )


def _local(
    query: Tensor, key: Tensor, value: Tensor, scale: float, causal: bool, joint: Joint | None,
    bias: Tensor | None = None,
) -> Tensor:
    """Attention on the tensors given (joint rows joined in strategy order); ``bias`` is an additive mask
    (attn/mask.py) over the joined keys (and queries, when it has a query dim)."""
    query, key, value = _join(query, key, value, joint)
    if bias is not None:
        _check_local_bias(bias, query.shape[1], key.shape[1])
        if bool((bias == 0).all()):
            bias = None
    if bias is None:
        out, _ = block_attention(query, key, value, softmax_scale=scale, causal=causal)
        return out.contiguous()
    if causal:
        raise ValueError(f"attention: an attention mask {list(bias.shape)} together with causal=True is not supported; "
                         "put the causal mask into attn_mask")
    out, _ = attend_block(query, key, value, scale, classify(bias))
    return out.contiguous()


def _check_local_bias(bias: Tensor, q_rows: int, k_rows: int) -> None:
    if bias.shape[-1] != k_rows or bias.shape[2] not in (1, q_rows):
        raise ValueError(
            f"attention: the mask (as [batch, heads, queries, keys]: {list(bias.shape)}) does not fit {q_rows} queries "
            f"over {k_rows} keys (joint tokens included); expected [.., 1 or {q_rows}, {k_rows}]"
        )


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


@dataclass(frozen=True)
class Roles:
    """What the record says about one attention call's inputs.

    ``query``: "sharded" (``q_layout`` when recorded, None for a shard nobody recorded, e.g. cut by
    hand) or "replicated". ``kv``: "same" (self-attention: K/V cut like the query), "replicated"
    (nothing sharded a sequence of that length: cross-attention to replicated tokens, attended
    locally) or "sharded" (another recorded sequence, ``kv_layout``: all-gathered first).
    """

    query: str
    q_layout: ShardLayout | None
    kv: str
    kv_layout: ShardLayout | None = None


def _unmatched(ctx: SPContext, rows: int, what: str) -> str:
    known = sorted({lay.local_rows for lay in ctx.layouts} | {
        lay.local_len + j.rows for lay in ctx.layouts for j in ctx.joints if not lay.prefix_len})
    return f"{what} has {rows} local rows, which matches no sequence sharded in this forward (local rows: {known})"


def read_roles(ctx: SPContext, q_rows: int, k_rows: int) -> Roles:
    """Decide, from the record of this forward (never from a cross-rank guess), what query and K/V are."""
    found = ctx.attention_layouts(q_rows)
    if len(found) > 1:
        desc = sorted((lay.true_len, lay.prefix_len, lay.suffix_len) for lay in found)
        raise ValueError(
            f"attention: {len(found)} sharded sequences of this forward explain {q_rows} local rows (true length, "
            f"replicated rows in front, behind: {desc}), so which rows are padding is ambiguous; pad the "
            "sequences to lengths that shard to different local lengths"
        )
    q_layout = found.pop() if found else None
    joint = ctx.joint_rows(q_rows)
    if q_layout is not None and joint is not None and (q_layout.pad or q_layout.prefix_len or q_layout.suffix_len):
        # Without padding either reading is exact (replicated rows attended as a shard see every key
        # sp_size times, which softmax weighs like once); with padding one of them drops real rows.
        raise ValueError(
            f"attention: the query's {q_rows} local rows match both the replicated joint tokens "
            f"({joint.source or 'SequenceParallelJointInput'}) and a padded shard ({q_layout.describe()}), so whether "
            "it is replicated is ambiguous; run attention among the replicated tokens with backend='local' "
            "(Attention(skip_sequence_parallel=True))"
        )
    if q_layout is not None:
        query = "sharded"
    elif joint is not None:
        query = "replicated"  # replicated joint tokens
    else:
        padded = [lay for lay in ctx.layouts if lay.pad]
        if padded:
            raise ValueError(
                f"attention: {_unmatched(ctx, q_rows, 'the query')}, while auto_pad padded one of them "
                f"({padded[0].describe()}): the padding rows could not be excluded. Sequences concatenated inside "
                "the model must be declared in the plan: replicated tokens joined to the shard as "
                "SequenceParallelJointInput, or shard the concatenation once (SequenceParallelPartialInput)"
            )
        query = "sharded"  # a shard nobody recorded (or replicated rows: exact either way without padding)
    if k_rows == q_rows:
        return Roles(query, q_layout, "same")
    kv_layout = ctx.layout_for_local(k_rows, "attention (key/value)")
    if kv_layout is not None:
        return Roles(query, q_layout, "sharded", kv_layout)
    if not ctx.layouts:
        raise ValueError(
            f"attention: key/value have {k_rows} rows but query has {q_rows}, and no split recorded what is sharded "
            "in this region, so whether key/value are replicated is unknown. For cross-attention against replicated "
            "tokens use backend='local'; shard sequences with sp_shard or a plan so that they are recorded."
        )
    return Roles(query, q_layout, "replicated")


def _check_degrees(name: str, state: SPState) -> None:
    u, r = state.ulysses_size, state.ring_size
    unmet = BACKENDS[name].unmet(u, r)
    if unmet is not None:
        raise ValueError(
            f"attention: backend {name!r} needs {unmet} == 1, but the SP state has ulysses_degree={u}, "
            f"ring_degree={r}; use backend='usp' or 'auto'"
        )


def _exchange(
    call: AttentionCall, name: str, refusal: str | BaseException | None, bias: Tensor | None = None
) -> list[tuple[int, ...]]:
    """Every SP rank's (local rows, valid rows, mask fields), exchanged together with the call's metadata
    (checked across ranks)."""
    state = call.state
    P, U = state.sp_size, state.ulysses_size
    mask = describe(bias) + [checksum(bias) if bias is not None else 0]
    rows = exchange_rows(call, state.host_group, list(BACKEND_NAMES), refusal, mask)
    present = [r[2] for r in rows]
    if len(set(present)) > 1:
        raise ValueError(
            f"attention (backend {name!r}): sp rank(s) {[i for i, p in enumerate(present) if p]} passed an attention "
            f"mask and rank(s) {[i for i, p in enumerate(present) if not p]} did not; every rank must pass one, or none"
        )
    if U > 1:
        for g in range(P // U):
            local = [rows[g * U + u][0] for u in range(U)]
            if len(set(local)) > 1:
                raise ValueError(
                    f"attention (backend {name!r}): the Ulysses all-to-all needs equal local lengths in a Ulysses "
                    f"group, got {local} on sp ranks {g * U}..{g * U + U - 1}; shard with auto_pad "
                    "(sp_shard(..., auto_pad=True) or SequenceParallelInput(auto_pad=True)) or use the ring backend"
                )
    return rows


def _with_full_mask(
    call: AttentionCall, bias: Tensor, rows: list[tuple[int, ...]], memo: dict | None
) -> AttentionCall:
    """``call`` with its mask in the full frame (a local-frame mask all-gathered over the SP group).

    Kept for the forward (models hand every layer the same mask), keyed by what every rank exchanged
    (each rank's mask shape and checksum, the rows, the joint tokens): every rank hits or misses alike,
    so they all take the all-gather of a local-frame mask, or none does."""
    state = call.state
    joint = call.joint
    J = joint.length if joint is not None else 0
    front = joint is None or joint.strategy == "front"
    key = (tuple(rows), J, front, str(bias.dtype), str(bias.device))
    memo = memo.setdefault("full_masks", {}) if memo is not None else {}
    if key not in memo:

        def gather(t: Tensor, dim: int) -> Tensor:
            return _all_gather_cat(t, dim, state.sp_group, state.sp_size, state.host_group)

        memo[key] = full_frame(bias, rows, joint=J, front=front, gather=gather)
    return dataclasses.replace(call, mask=memo[key])


def _gather_rows(t: Tensor, dim: int, layout: ShardLayout, state: SPState) -> Tensor:
    """The full sequence of a shard with ``layout`` on every rank (padding dropped); differentiable: a
    sharded K/V's gradient is the sum of every rank's queries' contributions (reduce-scatter)."""
    return gather_rows(t, dim, layout, state.sp_group, state.sp_size, state.sp_rank, state.host_group)


def _zero_padding_rows(out: Tensor, layout: ShardLayout | None, joint: Joint | None, state: SPState) -> Tensor:
    """auto_pad rows of a sharded query get defined zeros, as the SP backends write them."""
    if layout is None or not layout.pad:
        return out
    valid = layout.valid_rows(state.sp_rank)
    if valid < layout.local_len:
        lead = (joint.length if joint is not None and joint.strategy == "front" else 0) + layout.prefix_len
        if out.requires_grad:
            out = out.clone()  # the kernel saved its output for the backward: zero a copy, not it
        out[:, lead + valid : lead + layout.local_len].zero_()
    return out


def _mask_is_trivial(mask: Tensor) -> bool:
    """True when the mask excludes nothing (all True, or an additive mask of zeros)."""
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def effective_mask(mask: Tensor | None, ctx: SPContext | None) -> Tensor | None:
    """``mask``, or None when it excludes nothing. Judged once per forward and mask tensor (models hand
    every block the same mask; each judgement reads it back to the host). Per rank: a decision that
    steers a collective must be taken on data every rank shares."""
    if mask is None:
        return None
    if ctx is None:
        return None if _mask_is_trivial(mask) else mask
    memo = ctx.memo.setdefault("trivial_masks", {})
    # Inference tensors keep no version counter; an in-place edit of the mask within one forward is
    # then not seen (models build their masks once per forward and never edit them).
    version = -1 if mask.is_inference() else mask._version
    seen = memo.get(id(mask))
    if seen is None or seen[0] is not mask or seen[1] != version:
        seen = memo[id(mask)] = (mask, version, _mask_is_trivial(mask))
    return None if seen[2] else mask


@dataclass(frozen=True)
class Route:
    """Where one attention call runs, as the record of the forward decides it: ``roles`` None runs the call
    locally (no SP state, SP size 1, backend "local", or outside the sharded region); otherwise SP backend
    ``name`` of ``state`` with the inputs' ``roles``. Decided while tracing under torch.compile, and then
    handed to the compiled call's op (attn/compiled.py)."""

    name: str
    state: SPState | None = None
    roles: Roles | None = None


def route_call(query: Tensor, key: Tensor, backend: str | None) -> Route:
    """The route of an attention call with these inputs in the running forward."""
    ctx = current_context()
    state = ctx.state if ctx is not None else None
    name = resolve_backend(backend, state)
    if ctx is None or state is None or state.sp_size == 1 or name == "local" or not ctx.sharded:
        return Route(name, state)
    state.raise_if_broken("attention")
    return Route(name, state, read_roles(ctx, query.shape[1], key.shape[1]))


def sharded_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    joint: Joint | None,
    backend: str | None,
    mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    refusal: str | None = None,
) -> Tensor:
    """``attention()`` after input validation. ``mask`` (``attn_mask``: bool or additive, SDPA's semantics) and
    ``key_padding_mask`` (bool [B, K]) are applied by every backend (attn/mask.py: frames, kernel choice), and
    ``refusal`` (a reason this rank cannot run the call) is raised on every rank of a communicating call
    instead of on this rank alone (integrations use it). Under torch.compile the route is decided while
    tracing and the call runs as one op (attn/compiled.py), so the graph does not break here."""
    route = route_call(query, key, backend)
    if torch.compiler.is_compiling():
        return compiled_attention(route, query, key, value, scale=scale, causal=causal, joint=joint, mask=mask,
                                  key_padding_mask=key_padding_mask, refusal=refusal)
    ctx = current_context()
    return run_route(route, query, key, value, scale=scale, causal=causal, joint=joint, mask=mask,
                     key_padding_mask=key_padding_mask, refusal=refusal, memo=ctx.memo if ctx is not None else None)


def run_route(
    route: Route,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    joint: Joint | None,
    mask: Tensor | None,
    key_padding_mask: Tensor | None,
    refusal: str | None,
    memo: dict | None,
    needs_grad: bool | None = None,
) -> Tensor:
    """Run an attention call on its route. ``memo``: the forward's memo (full-frame masks kept across its
    layers; None keeps nothing). ``needs_grad``: whether the call is differentiated, for what is refused
    under autograd (None: read it from the inputs; the compiled forward op passes what was traced, since
    its own inputs never require grad and its backward is a separate op)."""
    name, state, roles = route.name, route.state, route.roles

    def normalized() -> Tensor | None:
        bias = normalize_mask(mask, key_padding_mask, batch=query.shape[0], heads=query.shape[2], dtype=query.dtype,
                              device=query.device)
        if bias is not None and causal:
            raise ValueError(
                f"attention: an attention mask (as [batch, heads, queries, keys]: {list(bias.shape)}) together with "
                "causal=True is not supported; put the causal mask into attn_mask"
            )
        return bias

    if roles is None or state is None:
        if refusal is not None:
            raise NotImplementedError(refusal)
        return _local(query, key, value, scale, causal, joint, normalized())
    state.raise_if_broken("attention")
    if roles.kv != "same" or roles.query == "replicated":
        # K/V whole on every rank after (at most) one all-gather: this rank's queries attend locally.
        if causal:
            raise ValueError("attention: causal=True needs self-attention over one sequence; got cross-attention")
        if refusal is not None and roles.kv != "sharded":
            raise NotImplementedError(refusal)
        bias = normalized()
        if roles.kv == "sharded":
            try:
                layout = roles.kv_layout
                key, value = (_gather_rows(t, 1, layout, state) for t in (key, value))  # type: ignore[arg-type]
                # A key mask is a shard too; gathered whether or not this rank's part excludes anything,
                # so every rank takes the same collectives and judges the same full mask.
                if bias is not None and bias.shape[-1] == layout.local_rows and layout.local_rows != 1:  # type: ignore[union-attr]
                    bias = _gather_rows(bias.contiguous(), 3, layout, state)  # type: ignore[arg-type]
            except BaseException as e:
                state.mark_broken(f"{type(e).__name__} while gathering sharded key/value: {e}")
                raise
            if refusal is not None:
                raise NotImplementedError(refusal)
        out = _local(query, key, value, scale, causal, joint, bias)
        return _zero_padding_rows(out, roles.q_layout, joint, state)
    reason: str | BaseException | None = refusal
    bias = None
    try:
        bias = normalized()
    except (TypeError, ValueError) as e:
        # Raised through the agreement exchange, so that the other ranks raise too instead of waiting.
        reason = reason if reason is not None else e

    _check_degrees(name, state)
    layout = roles.q_layout
    if layout is not None and layout.sp_size != state.sp_size:
        raise ValueError(
            f"attention: the recorded shard layout is for {layout.sp_size} ranks but the SP group has {state.sp_size}"
        )
    if layout is not None and (layout.prefix_len or layout.suffix_len):
        query, key, value, joint = _split_replicated(query, key, value, joint, layout)
    call = AttentionCall(query, key, value, scale, causal, joint, name, state, layout)
    recorded = call.needs_grad()  # autograd records this very call: the differentiable implementation runs
    if needs_grad is None:
        needs_grad = recorded
    if needs_grad and bias is not None and reason is None:
        # Refused through the exchange, so every rank raises (the differentiable backends take no mask).
        reason = NotImplementedError(
            f"attention (backend {name!r}): an attention mask under autograd is not supported yet (the backward "
            "takes no mask); run the masked call under torch.no_grad(), or without a mask"
        )
    try:
        rows = _exchange(call, name, reason, bias)
        if bias is not None:
            call = _with_full_mask(call, bias, rows, memo)
        run = grad_backend_function(name) if recorded else backend_function(name)
        return run(call, [r[1] for r in rows])
    except BaseException as e:
        # Another rank may now wait in a collective this one left: later calls must not cross with it.
        state.mark_broken(f"{type(e).__name__} in {name} attention: {e}")
        raise


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
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v over the full (sharded) sequence plus optional joint tokens.

    Returns ``[B, J + S_local, Hq, D]``: joint rows first for ``joint_strategy="front"``, last for
    ``"rear"``; the joint rows are identical on every rank. Differentiable under every backend (attn/grad.py).

    Inside a sharded region the record of this forward (context.py) decides what the inputs are:
    a query with a sharded sequence's local length is that shard; K/V with the query's length are
    cut like it (self-attention), K/V with another recorded sequence's length are that sequence
    (all-gathered, then attended locally), and K/V of a length nothing sharded are replicated
    (attended locally). Replicated K/V that happen to have exactly the query's local length cannot
    be told from self-attention: declare such cross-attention with ``backend="local"``.

    Masks (docs/attention.md, "Masks"), SDPA's semantics: ``key_padding_mask`` bool ``[B, K]`` (True = attend);
    ``attn_mask`` bool (True = attend) or additive float, broadcastable to ``[B, Hq, Q, K]``. The key axis is
    the full key sequence of the call, joint tokens included, in strategy order: over the global sequence
    (the same mask on every rank) or over this rank's rows only (all-gathered). A query row that attends
    to no key gives zeros (SDPA: NaN). Not with ``causal=True``.
    """
    scale, joint = validate_inputs(query, key, value, softmax_scale, joint_query, joint_key, joint_value, joint_strategy)
    return sharded_attention(query, key, value, scale=scale, causal=causal, joint=joint, backend=backend,
                             mask=attn_mask, key_padding_mask=key_padding_mask)


class Attention(nn.Module):
    """``attention()`` with its options stored, for model code; agnostic of heads and head_dim.

    ``skip_sequence_parallel=True`` (vLLM-Omni's flag for cross-attention to replicated tokens) is
    ``backend="local"``: this layer never communicates.
    """

    def __init__(
        self,
        *,
        softmax_scale: float | None = None,
        causal: bool = False,
        backend: str | None = None,
        joint_strategy: str = "front",
        skip_sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(skip_sequence_parallel, bool):
            raise TypeError(f"Attention: skip_sequence_parallel must be a bool, got {skip_sequence_parallel!r}")
        if skip_sequence_parallel and backend not in (None, "local"):
            raise ValueError(f"Attention: skip_sequence_parallel=True runs locally, but backend={backend!r} was given")
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.backend = "local" if skip_sequence_parallel else backend
        self.joint_strategy = joint_strategy

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        joint_query: Tensor | None = None,
        joint_key: Tensor | None = None,
        joint_value: Tensor | None = None,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
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
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
        )

    def extra_repr(self) -> str:
        return f"causal={self.causal}, backend={self.backend!r}, joint_strategy={self.joint_strategy!r}"

