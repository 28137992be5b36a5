"""sp_kernels for diffusers models: our hooks on a diffusers transformer, or our attention under diffusers' CP.

Two ways in, both importing diffusers only here (``import sp_kernels`` never imports it):

1. **Our sequence parallelism on a diffusers model** (recommended)::

       from sp_kernels import SequenceParallelConfig
       from sp_kernels.integrations.diffusers import enable_sequence_parallel, disable_sequence_parallel

       enable_sequence_parallel(pipe.transformer, SequenceParallelConfig(ulysses_degree=2, ring_degree=2))
       ...  # run the pipeline as usual, on every rank
       disable_sequence_parallel(pipe.transformer)  # restores the model exactly

   The plan is the model's own ``_sp_plan``, else sp_kernels' ready plan for its class (Flux, Flux2,
   Qwen-Image, Wan, LTX-Video, HunyuanVideo: see ``diffusers_plans``), else its ``_cp_plan``
   translated; ``plan=`` overrides (``plan="cp_plan"`` forces the translation). Our hooks shard
   and gather (auto_pad: any token count, exact; ``return_dict=True`` works), and every attention
   processor is pointed at the ``"sp_kernels"`` diffusers backend, which runs ``sp_kernels.attention``
   with ``config.attention_backend`` (ulysses, ring, usp, fused_ring, auto). Head counts not
   divisible by the Ulysses degree are padded. Nothing depends on ``transformers`` being imported.

2. **Drop-in under diffusers' own context parallelism**::

       import sp_kernels.integrations.diffusers  # registers "fused_ring", "sp_ulysses", "sp_usp"
       transformer.set_attention_backend("fused_ring")
       transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=4))

   diffusers keeps doing what it does around attention (its ``_cp_plan`` hooks shard and gather the
   sequence, its processors project q/k/v); at each attention call its dispatcher hands our backend the
   local shards and ``_parallel_config``, and the backend runs sp_kernels' ring / Ulysses / USP over
   diffusers' own process groups (the "ring" and "ulysses" dims of its device mesh, whose flattened
   order ``ring_rank * U + ulysses_rank`` is sp_kernels' sp_rank order). diffusers' templated ring
   instead all-gathers the whole KV and merges with the sigmoid chain; with ``fused_ring`` the KV
   travels block by block, overlapped with compute (see docs/attention.md). ``fused_ring`` needs
   ``ulysses_degree == 1``, ``sp_ulysses`` ``ring_degree == 1``, ``sp_usp`` takes any degrees.

Cross-attention: modules a ready plan names as cross-attention to replicated text stay local. When the
plan shards the text (diffusers' LTX ``_cp_plan``), the record of the forward decides instead: K/V of a
recorded sharded sequence are all-gathered (with their key mask) before local attention, K/V nothing
sharded are replicated. Under diffusers' own CP (path 2) K/V of another length are always gathered.

Attention masks (docs/attention.md, "Masks"): every backend applies the masks diffusers passes
(``[B, S_k]``-like key masks as ``[B, 1, 1, S_k]``, ``[B, 1, S_q, S_k]``, bool or additive), for any batch
and prompt lengths that differ within the batch. Inside sharded self-attention a processor builds its
mask over its own rows (Qwen-Image: ``[prompt mask | ones(local image rows)]``): that local-frame mask
is all-gathered; one over the full key sequence is used as it is. Prompts padded at their end in every
batch entry are still trimmed first (exact, and fewer tokens); the mask covers everything else, holes
included. A query row with no key left gives zeros.
Not supported under SP: dropout, ``return_lse``, backward.

diffusers bugs seen on CPU (diffusers 0.42.1), which only path 2 meets: ``enable_parallelism``
computes ``rank % torch.accelerator.device_count()``, which is 0 on a CPU-only machine, and its
expected_dims skip path calls ``logger.warning_once``, which exists only after transformers is
imported. The CPU tests of path 2 patch both (device count 1, ``warning_once = warning``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..attn import block_attention, effective_mask, sharded_attention
from ..attn.backends import BACKENDS as SP_BACKENDS
from ..attn.call import validate_inputs
from ..distributed.parallel_state import SequenceParallelConfig, SPState, default_group_timeout, device_of_group
from ..plan.context import ShardLayout, current_context, sp_forward_context
from ..plan.hooks import Signature, apply_sequence_parallel, is_sequence_parallel, remove_sequence_parallel
from .diffusers_plans import CROSS_ATTENTION, LOCAL_ATTENTION, PROMPT_MASKS, plan_source, translate_cp_plan

Tensor = torch.Tensor

# diffusers backend value -> (enum member name, sp_kernels backend). "sp_kernels" is the backend of
# enable_sequence_parallel: our hooks set the SP context and attention() picks the configured backend;
# "sp_kernels_local" is what it gives cross-attention to replicated text (always this rank only).
BACKENDS: dict[str, tuple[str, str | None]] = {
    "sp_kernels": ("SP_KERNELS", None),
    "sp_kernels_local": ("SP_KERNELS_LOCAL", "local"),
    "fused_ring": ("FUSED_RING", "fused_ring"),
    "sp_ulysses": ("SP_ULYSSES", "ulysses"),
    "sp_usp": ("SP_USP", "usp"),
}

__all__ = [
    "BACKENDS",
    "disable_sequence_parallel",
    "enable_sequence_parallel",
    "prepare",
    "register",
    "sp_state_for",
    "translate_cp_plan",
]


def _add_enum_member(cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add ``name = value`` to an existing str-Enum (diffusers validates backend names against it).

    Done the way EnumType builds members: a str instance of the class with ``_name_``/``_value_``,
    entered in the name and value maps and the ordered name list, then set as a class attribute
    (before it is in the map, which EnumType.__setattr__ would refuse as a reassignment).
    """
    existing = cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    if name in cls._member_map_:
        raise RuntimeError(f"{cls.__name__} already has a member {name} with another value")
    member = str.__new__(cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = cls  # type: ignore[attr-defined]
    member.__init__(value)
    if hasattr(cls, "_sort_order_") or hasattr(member, "_sort_order_"):
        member._sort_order_ = len(cls._member_names_)  # type: ignore[attr-defined]
    type.__setattr__(cls, name, member)
    cls._member_map_[name] = member
    cls._value2member_map_[value] = member
    cls._member_names_.append(name)
    return member


def sp_state_for(cp_config: Any) -> SPState:
    """An SPState over the process groups of a set-up diffusers ``ContextParallelConfig`` (cached on it)."""
    state = getattr(cp_config, "_sp_kernels_state", None)
    if state is not None:
        return state
    if torch.compiler.is_compiling():
        # Building it creates process groups and reads the mesh on the host: nothing a trace can hold.
        raise RuntimeError(
            "sp_kernels/diffusers: torch.compile traced the first attention of this context-parallel model; call "
            "sp_kernels.integrations.diffusers.prepare(model) on every rank after model.enable_parallelism(...) and "
            "before the first compiled forward (or run one forward uncompiled)"
        )
    if getattr(cp_config, "_flattened_mesh", None) is None:
        raise RuntimeError(
            "sp_kernels/diffusers: the ContextParallelConfig has no device mesh yet; call "
            "model.enable_parallelism(config=...) before running the model"
        )
    U, R = cp_config.ulysses_degree, cp_config.ring_degree
    flat = cp_config._flattened_mesh
    sp_group = flat.get_group()
    ranks = [int(r) for r in flat.mesh.flatten().tolist()]
    meta_group = None
    if device_of_group(sp_group).type != "cpu" and len(ranks) == dist.get_world_size():
        # Metadata exchanges (shapes, row counts) run on CPU tensors over gloo, so they never synchronize
        # the GPU. Created once, at the first attention, which every rank reaches together; new_group is
        # collective over the whole world, so only when the mesh is the world (with data-parallel
        # replicas the exchange stays on the SP group: correct, one host sync per call).
        meta_group = dist.new_group(ranks, backend="gloo", timeout=default_group_timeout())
    state = SPState(
        config=SequenceParallelConfig(ulysses_degree=U, ring_degree=R, attention_backend="auto"),
        sp_group=sp_group,
        meta_group=meta_group,
        ulysses_group=cp_config._ulysses_mesh.get_group() if U > 1 else None,
        ring_group=cp_config._ring_mesh.get_group() if R > 1 else None,
        # diffusers' mesh is ("ring", "ulysses"): flattened rank = ring_rank * U + ulysses_rank.
        sp_rank=cp_config._ring_local_rank * U + cp_config._ulysses_local_rank,
        sp_ranks=tuple(ranks),
    )
    cp_config._sp_kernels_state = state
    return state


def _with_lse(
    query: Tensor, key: Tensor, value: Tensor, scale: float | None, causal: bool, name: str, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Local attention that also returns the log-sum-exp (diffusers' ``return_lse``, [B, S, H])."""
    if mask is not None:
        raise NotImplementedError(f"sp_kernels/diffusers backend {name!r}: return_lse=True with an attention mask")
    out, lse = block_attention(query, key, value, softmax_scale=scale, causal=causal)
    return out, lse.transpose(1, 2)


def _make_backend(name: str) -> Callable[..., Any]:
    """The diffusers backend function for ``name``. diffusers passes only the arguments whose names
    appear in its signature, so the parameters are exactly its backend protocol."""
    ours = BACKENDS[name][1]

    def backend(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,  # GQA (fewer KV heads) is handled natively
        return_lse: bool = False,
        _parallel_config: Any = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if dropout_p:
            raise NotImplementedError(f"sp_kernels/diffusers backend {name!r}: dropout_p must be 0, got {dropout_p}")
        cp = _parallel_config.context_parallel_config if _parallel_config is not None else None
        drop_in = cp is not None and cp.ring_degree * cp.ulysses_degree > 1
        if ours is None and cp is not None:
            raise RuntimeError(
                "sp_kernels/diffusers backend 'sp_kernels' is driven by enable_sequence_parallel's hooks, but "
                "diffusers' own context parallelism (enable_parallelism) is active on this model; use one of "
                "them, or 'fused_ring' / 'sp_ulysses' / 'sp_usp' under diffusers' context parallelism"
            )
        if ours == "local" or (ours is not None and not drop_in):
            if return_lse:
                return _with_lse(query, key, value, scale, is_causal, name, effective_mask(attn_mask, None))
            sc, _ = validate_inputs(query, key, value, scale, None, None, None, "front")
            return sharded_attention(query, key, value, scale=sc, causal=is_causal, joint=None, backend="local",
                                     mask=attn_mask)
        sc, _ = validate_inputs(query, key, value, scale, None, None, None, "front")
        if ours is None:
            ctx = current_context()
            if return_lse:
                if ctx is not None and ctx.sharded and ctx.state.sp_size > 1:
                    raise NotImplementedError("sp_kernels/diffusers backend 'sp_kernels': return_lse=True under SP")
                return _with_lse(query, key, value, scale, is_causal, name, effective_mask(attn_mask, ctx))
            # The record of this forward decides self- vs cross-attention and whether K/V are sharded.
            return sharded_attention(query, key, value, scale=sc, causal=is_causal, joint=None, backend=None,
                                     mask=attn_mask)

        if return_lse:
            raise NotImplementedError(
                f"sp_kernels/diffusers backend {name!r}: return_lse=True under context parallelism is not supported"
            )
        U, R = cp.ulysses_degree, cp.ring_degree
        if SP_BACKENDS[ours].unmet(U, R) is not None:
            raise ValueError(
                f"sp_kernels/diffusers backend {name!r} cannot run ContextParallelConfig(ulysses_degree={U}, "
                f"ring_degree={R}); use 'fused_ring' for ring only, 'sp_ulysses' for Ulysses only, 'sp_usp' for both"
            )
        state = sp_state_for(cp)
        with sp_forward_context(state) as ctx:
            ctx.sharded = True
            if key.shape[1] != query.shape[1]:
                # diffusers' _cp_plan may or may not shard the text K/V came from: gather them either way.
                # Replicated K/V come back as sp_size copies, which attention weighs exactly like one.
                even = ShardLayout(true_len=key.shape[1] * state.sp_size, local_len=key.shape[1],
                                   sp_size=state.sp_size, source="diffusers' context-parallel text")
                ctx.record(even)
                return sharded_attention(query, key, value, scale=sc, causal=is_causal, joint=None, backend=ours,
                                         mask=attn_mask)
            # A mask over this rank's rows (diffusers builds them from the shard) is all-gathered by attention().
            return sharded_attention(query, key, value, scale=sc, causal=is_causal, joint=None, backend=ours,
                                     mask=attn_mask)

    backend.__name__ = f"sp_kernels_{name}_attention"
    return backend


def prepare(model: nn.Module) -> SPState:
    """Build sp_kernels' state for ``model``'s diffusers context parallelism (``enable_parallelism``) now
    rather than at its first attention, as torch.compile needs: the first compiled forward cannot create
    process groups. Collective when the groups are on GPUs: call it on every rank. Returns the state."""
    for m in model.modules():
        proc = getattr(m, "processor", None)
        pc = getattr(proc, "_parallel_config", None)
        cp = getattr(pc, "context_parallel_config", None)
        if cp is not None:
            return sp_state_for(cp)
    raise ValueError(
        f"prepare({type(model).__name__}): no attention processor has a context-parallel config; call "
        "model.enable_parallelism(config=...) first"
    )


def register() -> list[str]:
    """Add the sp_kernels backends to diffusers' attention dispatch (idempotent); returns their names."""
    from diffusers.models import attention_dispatch as ad

    names = []
    for value, (member_name, _) in BACKENDS.items():
        member = _add_enum_member(ad.AttentionBackendName, member_name, value)
        if member not in ad._AttentionBackendRegistry._backends:
            ad._AttentionBackendRegistry.register(member, constraints=None, supports_context_parallel=True)(
                _make_backend(value)
            )
        names.append(value)
    return names


# ---------------------------------------------------------------------------------------------
# enable_sequence_parallel / disable_sequence_parallel

_ENABLED_ATTR = "_sp_kernels_diffusers"


def _diffusers_version() -> str:
    import diffusers

    return getattr(diffusers, "__version__", "unknown")


def _attention_classes() -> tuple[type, ...]:
    """diffusers' attention module classes; a clear error when this diffusers lays them out differently."""
    try:
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention
    except ImportError as e:
        raise RuntimeError(
            f"sp_kernels.integrations.diffusers needs diffusers.models.attention.AttentionModuleMixin and "
            f"diffusers.models.attention_processor.Attention (diffusers >= 0.35); diffusers {_diffusers_version()} "
            f"has not: {e}"
        ) from e
    return (Attention, AttentionModuleMixin)


@dataclass(eq=False)
class _Enabled:
    source: str
    # (module path, attention module, its processor, the processor's backend before enable)
    routed: list[tuple[str, nn.Module, Any, Any]] = field(default_factory=list)
    # the backend each routed processor gets (same order)
    members: list[Any] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)  # our own root hooks (guard, prompt trim)


def _route_attention(model: nn.Module, cls: str) -> list[tuple[str, nn.Module, Any, Any]]:
    """Every diffusers attention module of ``model`` with its processor; refuses processors that do not
    go through diffusers' dispatcher (their attention would run unsharded-unaware: a wrong answer)."""
    classes = _attention_classes()
    local_only = tuple(p for k in type(model).__mro__ for p in LOCAL_ATTENTION.get(k.__name__, ()))
    routed, bad, cp_on = [], [], []
    for path, m in model.named_modules():
        if not isinstance(m, classes):
            continue
        proc = getattr(m, "processor", None)
        if proc is None or not hasattr(proc, "_attention_backend"):
            if local_only and path.startswith(local_only):
                continue
            bad.append(f"{path} ({type(proc).__name__})")
            continue
        if getattr(proc, "_parallel_config", None) is not None:
            cp_on.append(path)
        routed.append((path, m, proc, proc._attention_backend))
    ver = _diffusers_version()
    if bad:
        raise ValueError(
            f"enable_sequence_parallel({cls}): the attention processors of {bad[:4]}{' ...' if len(bad) > 4 else ''} "
            f"do not dispatch through diffusers' attention backends (no _attention_backend; diffusers {ver}), so "
            "sp_kernels cannot route their attention; set a processor that does (the model's default one)"
        )
    if cp_on:
        raise ValueError(
            f"enable_sequence_parallel({cls}): diffusers' own context parallelism is enabled on {cp_on[0]} (and "
            f"{len(cp_on) - 1} more); use either it (with backend 'fused_ring' / 'sp_ulysses' / 'sp_usp') or "
            "enable_sequence_parallel, not both"
        )
    if not routed:
        raise ValueError(
            f"enable_sequence_parallel({cls}): no diffusers attention module found (diffusers {ver}); "
            "for a plain nn.Module use sp_kernels.apply_sequence_parallel with sp_kernels.attention"
        )
    return routed


def _make_prompt_trim(model: nn.Module, text_name: str, mask_name: str) -> Callable:
    """Root pre-hook: drop the trailing prompt tokens that are padding in every batch entry (see
    diffusers_plans.PROMPT_MASKS for why the image output is unchanged)."""
    sig = Signature(model)

    def trim(module: nn.Module, args: tuple, kwargs: dict):
        if torch.compiler.is_compiling():
            # The trim reads the mask on the host (a graph break); masks are exact without it, only slower.
            return None
        text, text_at = sig.get(text_name, args, kwargs)
        mask, mask_at = sig.get(mask_name, args, kwargs)
        if not isinstance(text, torch.Tensor) or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return None
        used = mask.bool().any(dim=0).nonzero()
        keep = int(used.max()) + 1 if used.numel() else mask.shape[1]
        if keep == mask.shape[1] or text.dim() < 2 or text.shape[1] != mask.shape[1]:
            return None
        args = list(args)
        sig.put(args, kwargs, text_at, text[:, :keep])
        sig.put(args, kwargs, mask_at, mask[:, :keep])
        return tuple(args), kwargs

    return trim


def _is_cross_attention(model: nn.Module, path: str, module: nn.Module) -> bool:
    names = tuple(n for k in type(model).__mro__ for n in CROSS_ATTENTION.get(k.__name__, ()))
    return path.rsplit(".", 1)[-1] in names or getattr(module, "is_cross_attention", False) is True


# Forward parameters that carry the text context in diffusers transformers and blocks.
_TEXT_PARAMS = ("encoder_hidden_states",)


def _plan_shards_text(plan: dict) -> bool:
    """Whether the plan splits the text context anywhere (diffusers' LTX _cp_plan does): then cross-attention
    K/V are a sharded sequence, and the record (not a fixed local route) must decide them."""
    return any(isinstance(spec, dict) and any(name in _TEXT_PARAMS for name in spec) for spec in plan.values())


def _make_guard(enabled: _Enabled, cls: str) -> Callable:
    def guard(module: nn.Module, args: tuple) -> None:
        for (path, m, proc, _), member in zip(enabled.routed, enabled.members):
            if m.processor is not proc or proc._attention_backend != member:
                raise RuntimeError(
                    f"{cls}.{path}: its attention processor or backend was changed after enable_sequence_parallel "
                    "(set_attention_backend / set_attn_processor), so it would attend to its shard only; call "
                    "disable_sequence_parallel first, change it, then enable again"
                )

    return guard


def enable_sequence_parallel(
    transformer: nn.Module, config: SequenceParallelConfig, plan: dict | str | None = None
) -> nn.Module:
    """Run a diffusers transformer sequence-parallel with sp_kernels' hooks and attention backends.

    ``plan``: None (the model's ``_sp_plan``, else sp_kernels' ready plan for its class, else its
    ``_cp_plan`` translated), ``"cp_plan"`` (force the translation), or an ``_sp_plan`` dict.
    Collective (builds process groups): call on every rank, after ``torch.distributed`` is set up.
    On any error the model is left as it was. Returns ``transformer``.
    """
    cls = type(transformer).__name__
    ver = _diffusers_version()
    if not isinstance(config, SequenceParallelConfig):
        raise TypeError(f"enable_sequence_parallel: config must be a SequenceParallelConfig, got {type(config).__name__}")
    if getattr(transformer, _ENABLED_ATTR, None) is not None or is_sequence_parallel(transformer):
        raise RuntimeError(
            f"enable_sequence_parallel({cls}): sequence parallelism is already applied; call disable_sequence_parallel "
            "first"
        )
    if plan is None:
        found = plan_source(transformer)
        if found is None:
            raise ValueError(
                f"enable_sequence_parallel: {cls} has no _sp_plan and no _cp_plan (diffusers {ver}), and sp_kernels "
                "has no ready plan for it; pass plan={...} (docs/porting.md shows how to write one)"
            )
        source, plan = found
    elif isinstance(plan, str):
        if plan != "cp_plan":
            raise ValueError(f"enable_sequence_parallel: plan must be None, 'cp_plan' or a dict, got {plan!r}")
        cp_plan = getattr(type(transformer), "_cp_plan", None)
        if cp_plan is None:
            raise ValueError(f"enable_sequence_parallel: plan='cp_plan' but {cls} has no _cp_plan (diffusers {ver})")
        source, plan = f"{cls}._cp_plan (translated)", translate_cp_plan(cp_plan, owner=cls)
    elif isinstance(plan, dict):
        source = "the plan passed in"
    else:
        raise TypeError(f"enable_sequence_parallel: plan must be None, 'cp_plan' or a dict, got {type(plan).__name__}")

    routed = _route_attention(transformer, cls)
    text_sharded = _plan_shards_text(plan)
    register()
    from diffusers.models.attention_dispatch import AttentionBackendName

    sp_member, local_member = AttentionBackendName("sp_kernels"), AttentionBackendName("sp_kernels_local")
    enabled = _Enabled(source=source, routed=routed)
    for path, m, proc, _ in routed:
        cross = _is_cross_attention(transformer, path, m) and not text_sharded
        member = local_member if cross else sp_member
        enabled.members.append(member)
        proc._attention_backend = member
    try:
        apply_sequence_parallel(transformer, config, plan)
        # Registered last with prepend: they run before the plan's root hooks.
        enabled.handles.append(transformer.register_forward_pre_hook(_make_guard(enabled, cls), prepend=True))
        names = next((PROMPT_MASKS[k.__name__] for k in type(transformer).__mro__ if k.__name__ in PROMPT_MASKS), None)
        if names is not None:
            enabled.handles.append(transformer.register_forward_pre_hook(
                _make_prompt_trim(transformer, *names), prepend=True, with_kwargs=True))
    except Exception as e:
        for h in enabled.handles:
            h.remove()
        for _, _, proc, before in routed:
            proc._attention_backend = before
        if is_sequence_parallel(transformer):
            remove_sequence_parallel(transformer)
        if isinstance(e, ValueError):
            raise ValueError(f"enable_sequence_parallel({cls}, plan from {source}, diffusers {ver}): {e}") from e
        raise
    setattr(transformer, _ENABLED_ATTR, enabled)
    return transformer


def disable_sequence_parallel(transformer: nn.Module) -> nn.Module:
    """Undo ``enable_sequence_parallel``: hooks removed, every processor's backend restored."""
    enabled = getattr(transformer, _ENABLED_ATTR, None)
    if enabled is None:
        raise ValueError(
            f"disable_sequence_parallel: enable_sequence_parallel was not called on this {type(transformer).__name__}"
        )
    for h in enabled.handles:
        h.remove()
    remove_sequence_parallel(transformer)
    for _, _, proc, before in enabled.routed:
        proc._attention_backend = before
    delattr(transformer, _ENABLED_ATTR)
    return transformer


register()
