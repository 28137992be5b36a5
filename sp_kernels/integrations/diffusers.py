"""sp_kernels attention as diffusers attention backends (drop-in for diffusers' context parallelism).

::

    import sp_kernels.integrations.diffusers  # registers "fused_ring", "sp_ulysses", "sp_usp"
    from diffusers import ContextParallelConfig

    transformer.set_attention_backend("fused_ring")
    transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=4))

diffusers keeps doing what it does around attention (its ``_cp_plan`` hooks shard and gather the
sequence, its processors project q/k/v); at each attention call its dispatcher hands our backend the
local shards and ``_parallel_config``, and the backend runs sp_kernels' ring / Ulysses / USP over
diffusers' own process groups (the "ring" and "ulysses" dims of its device mesh, whose flattened order
``ring_rank * U + ulysses_rank`` is sp_kernels' sp_rank order). diffusers' templated ring instead
all-gathers the whole KV and merges with the sigmoid chain; with ``fused_ring`` the KV travels
block by block, overlapped with compute (see docs/attention.md).

Backends (``AttentionBackendName`` members added at runtime, all ``supports_context_parallel``):

* ``fused_ring``: needs ``ulysses_degree == 1``;
* ``sp_ulysses``: needs ``ring_degree == 1``;
* ``sp_usp``: any degrees (Ulysses inside, fused ring across).

Without a parallel config (or a CP world of 1) every one of them is plain local attention through
sp_kernels' block kernel adapter. Not supported (clear errors): attention masks, dropout,
``return_lse`` under CP, and backward under CP (forward/inference only, like sp_kernels' SP backends).
Cross-attention against replicated tokens (key length != query length) runs locally.

diffusers bugs seen on CPU (diffusers 0.42.1), not ours: ``enable_parallelism`` computes
``rank % torch.accelerator.device_count()``, which is 0 on a CPU-only machine, and its
expected_dims skip path calls ``logger.warning_once``, which exists only after transformers is
imported. The CPU tests patch both (device count 1, ``warning_once = warning``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import torch

from ..attn import attention, block_attention
from ..attn.fused_ring import register as _register_fused_ring
from ..context import sp_forward_context
from ..parallel_state import SequenceParallelConfig, SPState

Tensor = torch.Tensor

# diffusers backend value -> (enum member name, sp_kernels backend, degrees it needs)
BACKENDS: dict[str, tuple[str, str]] = {
    "fused_ring": ("FUSED_RING", "fused_ring"),
    "sp_ulysses": ("SP_ULYSSES", "ulysses"),
    "sp_usp": ("SP_USP", "usp"),
}

__all__ = ["BACKENDS", "register", "sp_state_for"]


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
    if getattr(cp_config, "_flattened_mesh", None) is None:
        raise RuntimeError(
            "sp_kernels/diffusers: the ContextParallelConfig has no device mesh yet; call "
            "model.enable_parallelism(config=...) before running the model"
        )
    U, R = cp_config.ulysses_degree, cp_config.ring_degree
    flat = cp_config._flattened_mesh
    state = SPState(
        config=SequenceParallelConfig(ulysses_degree=U, ring_degree=R, attention_backend="auto"),
        sp_group=flat.get_group(),
        ulysses_group=cp_config._ulysses_mesh.get_group() if U > 1 else None,
        ring_group=cp_config._ring_mesh.get_group() if R > 1 else None,
        # diffusers' mesh is ("ring", "ulysses"): flattened rank = ring_rank * U + ulysses_rank.
        sp_rank=cp_config._ring_local_rank * U + cp_config._ulysses_local_rank,
        sp_ranks=tuple(int(r) for r in flat.mesh.flatten().tolist()),
    )
    cp_config._sp_kernels_state = state
    return state


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
        if attn_mask is not None:
            raise NotImplementedError(
                f"sp_kernels/diffusers backend {name!r}: attention masks are not supported (sp_kernels handles "
                "padding by layout, not masks); use diffusers' 'native' backend for masked attention"
            )
        if dropout_p:
            raise NotImplementedError(f"sp_kernels/diffusers backend {name!r}: dropout_p must be 0, got {dropout_p}")
        cp = _parallel_config.context_parallel_config if _parallel_config is not None else None
        if cp is None or cp.ring_degree * cp.ulysses_degree == 1 or key.shape[1] != query.shape[1]:
            out, lse = block_attention(query, key, value, softmax_scale=scale, causal=is_causal)
            return (out, lse.transpose(1, 2)) if return_lse else out
        if return_lse:
            raise NotImplementedError(
                f"sp_kernels/diffusers backend {name!r}: return_lse=True under context parallelism is not supported"
            )
        U, R = cp.ulysses_degree, cp.ring_degree
        if (ours == "fused_ring" and U > 1) or (ours == "ulysses" and R > 1):
            raise ValueError(
                f"sp_kernels/diffusers backend {name!r} cannot run ContextParallelConfig(ulysses_degree={U}, "
                f"ring_degree={R}); use 'fused_ring' for ring only, 'sp_ulysses' for Ulysses only, 'sp_usp' for both"
            )
        state = sp_state_for(cp)
        with sp_forward_context(state) as ctx:
            ctx.sharded = True
            return attention(query, key, value, softmax_scale=scale, causal=is_causal, backend=ours)

    backend.__name__ = f"sp_kernels_{name}_attention"
    return backend


def register() -> list[str]:
    """Add the sp_kernels backends to diffusers' attention dispatch (idempotent); returns their names."""
    from diffusers.models import attention_dispatch as ad

    _register_fused_ring()  # sp_kernels' own registry: "fused_ring" must be selectable by attention()
    names = []
    for value, (member_name, _) in BACKENDS.items():
        member = _add_enum_member(ad.AttentionBackendName, member_name, value)
        if member not in ad._AttentionBackendRegistry._backends:
            ad._AttentionBackendRegistry.register(member, constraints=None, supports_context_parallel=True)(
                _make_backend(value)
            )
        names.append(value)
    return names


register()
