"""Sequence-parallel configuration and the Ulysses x Ring process groups.

Rank layout inside one SP group of size P = U * R (U = ulysses_degree, R = ring_degree):
``sp_rank = ring_rank * U + ulysses_rank``. Ulysses groups are therefore contiguous ranks (the
all-to-all stays inside a node), ring groups are strided. When the world is larger than P, the
world is cut into consecutive SP groups (data-parallel replicas, e.g. CFG parallel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# Names accepted by SequenceParallelConfig.attention_backend / attention(backend=...).
BACKEND_NAMES = ("auto", "local", "ulysses", "ring", "usp", "fused_ring")


@dataclass(frozen=True)
class SequenceParallelConfig:
    ulysses_degree: int = 1
    ring_degree: int = 1
    attention_backend: str = "auto"
    strict_dims: bool = False

    def __post_init__(self) -> None:
        for name in ("ulysses_degree", "ring_degree"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SequenceParallelConfig.{name} must be an int >= 1, got {value!r}")
        if self.attention_backend not in BACKEND_NAMES:
            raise ValueError(
                f"SequenceParallelConfig.attention_backend={self.attention_backend!r} is not a known backend; "
                f"expected one of {list(BACKEND_NAMES)}"
            )
        b, u, r = self.attention_backend, self.ulysses_degree, self.ring_degree
        if b == "ulysses" and r > 1:
            raise ValueError(f"attention_backend='ulysses' needs ring_degree == 1 (got ring_degree={r}); use 'usp'")
        if b in ("ring", "fused_ring") and u > 1:
            raise ValueError(
                f"attention_backend={b!r} needs ulysses_degree == 1 (got ulysses_degree={u}); use 'usp'"
            )
        if b == "local" and u * r > 1:
            raise ValueError(
                f"attention_backend='local' cannot run a sharded sequence (ulysses_degree={u}, ring_degree={r}): "
                "attention would only see the local shard; use 'auto'"
            )

    @property
    def sequence_parallel_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    def resolved_backend(self) -> str:
        """The backend "auto" stands for at these degrees."""
        if self.attention_backend != "auto":
            return self.attention_backend
        if self.sequence_parallel_size == 1:
            return "local"
        if self.ring_degree == 1:
            return "ulysses"
        if self.ulysses_degree == 1:
            return "fused_ring"
        return "usp"


@dataclass(eq=False)
class SPState:
    """The process groups of one initialized SP configuration, seen from this rank.

    ``None`` groups mean size 1 (no communication): a single process needs no torch.distributed.
    """

    config: SequenceParallelConfig
    sp_group: dist.ProcessGroup | None = None
    ulysses_group: dist.ProcessGroup | None = None
    ring_group: dist.ProcessGroup | None = None
    # Same ranks as sp_group over gloo when sp_group is not gloo (NCCL): metadata checks run on the
    # host there, so they never synchronize the GPU. None when sp_group itself is host-side.
    meta_group: dist.ProcessGroup | None = None
    sp_rank: int = 0
    # Global ranks of this rank's SP group, in sp_rank order.
    sp_ranks: tuple[int, ...] = (0,)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def sp_size(self) -> int:
        return self.config.sequence_parallel_size

    @property
    def host_group(self) -> dist.ProcessGroup | None:
        """The group to exchange small host-side metadata over (same ranks as sp_group)."""
        return self.meta_group if self.meta_group is not None else self.sp_group

    @property
    def ulysses_size(self) -> int:
        return self.config.ulysses_degree

    @property
    def ring_size(self) -> int:
        return self.config.ring_degree

    @property
    def ulysses_rank(self) -> int:
        return self.sp_rank % self.config.ulysses_degree

    @property
    def ring_rank(self) -> int:
        return self.sp_rank // self.config.ulysses_degree


_STATES: dict[tuple, SPState] = {}
_CURRENT: SPState | None = None


def _group_key(config: SequenceParallelConfig, group: dist.ProcessGroup | None) -> tuple:
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else None
    return (config.ulysses_degree, config.ring_degree, ranks)


def init_sequence_parallel(
    config: SequenceParallelConfig, group: dist.ProcessGroup | None = None
) -> SPState:
    """Build the Ulysses x Ring groups for ``config`` from ``group`` (default: the whole world).

    Collective over ``group``: every rank of it must call this with the same config. Groups are
    cached per (degrees, parent ranks), so calling it again with the same config is cheap and makes
    that state current again.
    """
    global _CURRENT
    if not isinstance(config, SequenceParallelConfig):
        raise TypeError(f"init_sequence_parallel expects a SequenceParallelConfig, got {type(config).__name__}")
    P, U, R = config.sequence_parallel_size, config.ulysses_degree, config.ring_degree
    if not dist.is_available() or not dist.is_initialized():
        if P != 1:
            raise RuntimeError(
                f"SequenceParallelConfig(ulysses_degree={U}, ring_degree={R}) needs {P} ranks, but "
                "torch.distributed is not initialized; call torch.distributed.init_process_group first"
            )
        state = SPState(config=config)
        _CURRENT = state
        return state

    parent = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(parent)
    if world % P != 0:
        raise ValueError(
            f"ulysses_degree * ring_degree = {U} * {R} = {P} does not divide the world size {world} "
            f"of the parent group; expected a world size that is a multiple of {P}"
        )
    key = _group_key(config, parent)
    cached = _STATES.get(key)
    if cached is not None and cached.config == config:
        _CURRENT = cached
        return cached

    parent_ranks = dist.get_process_group_ranks(parent)
    me = dist.get_rank()
    my_index = parent_ranks.index(me)
    # new_group is collective over the whole world: every rank creates every group, in one order.
    sp_group = ulysses_group = ring_group = meta_group = None
    sp_ranks: tuple[int, ...] = (me,)
    host_side = dist.get_backend(parent) == "gloo"
    for start in range(0, world, P):
        block = parent_ranks[start : start + P]
        g = dist.new_group(block) if P > 1 else None
        mg = dist.new_group(block, backend="gloo") if P > 1 and not host_side else None
        if me in block:
            sp_group, meta_group, sp_ranks = g, mg, tuple(block)
        for r in range(R):
            uranks = block[r * U : (r + 1) * U]
            ug = dist.new_group(uranks) if U > 1 else None
            if me in uranks:
                ulysses_group = ug
        for u in range(U):
            rranks = block[u::U]
            rg = dist.new_group(rranks) if R > 1 else None
            if me in rranks:
                ring_group = rg
    state = SPState(
        config=config,
        sp_group=sp_group,
        ulysses_group=ulysses_group,
        ring_group=ring_group,
        meta_group=meta_group,
        sp_rank=my_index % P,
        sp_ranks=sp_ranks,
    )
    _STATES[key] = state
    _CURRENT = state
    return state


def get_sp_state() -> SPState | None:
    """The most recently initialized SP state of this process, if any."""
    return _CURRENT


def destroy_sequence_parallel() -> None:
    """Forget every SP state (the process groups are destroyed with the default group)."""
    global _CURRENT
    _STATES.clear()
    _CURRENT = None


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def device_of_group(group: dist.ProcessGroup | None) -> torch.device:
    """The device collectives of ``group`` run on (cuda for NCCL, else cpu)."""
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
