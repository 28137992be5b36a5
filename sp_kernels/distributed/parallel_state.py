"""Sequence-parallel configuration and the Ulysses x Ring process groups.

Rank layout inside one SP group of size P = U * R (U = ulysses_degree, R = ring_degree):
``sp_rank = ring_rank * U + ulysses_rank``. Ulysses groups are therefore contiguous ranks (the
all-to-all stays inside a node), ring groups are strided. When the world is larger than P, the
world is cut into consecutive SP groups (data-parallel replicas, e.g. CFG parallel).

Process groups are a property of (parent ranks, degrees, timeout) only, so every config that
differs in nothing else (``attention_backend``, ``strict_dims``) shares them; each config still
gets its own ``SPState`` (its own buffers, default context and ``broken`` flag). Every group the library creates
gets the library timeout, and ``destroy_sequence_parallel`` destroys all of them.

Setup is checked locally first and then agreed on (``agree_on_setup``): a rank that fails alone
makes every rank raise instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import numbers
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..attn.backends import BACKEND_NAMES, BACKENDS, auto_backend

# torch's own default when nothing better can be read (torch.distributed.constants.default_pg_timeout).
_TORCH_DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class SequenceParallelConfig:
    """What to build: degrees, attention backend, dimension strictness and the groups' timeout.

    ``timeout``: None (the default process group's timeout, i.e. what ``init_process_group(timeout=)``
    set), a number of seconds > 0, or a ``datetime.timedelta`` > 0; stored as given. It bounds every
    collective on the groups the library creates, so a rank that raises and stays alive makes the
    others raise after ``timeout`` instead of hanging for torch's 30-minute default.
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    attention_backend: str = "auto"
    strict_dims: bool = False
    timeout: float | datetime.timedelta | None = None

    def __post_init__(self) -> None:
        for name in ("ulysses_degree", "ring_degree"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SequenceParallelConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.attention_backend, str) or self.attention_backend not in BACKEND_NAMES:
            raise ValueError(
                f"SequenceParallelConfig.attention_backend={self.attention_backend!r} is not a known backend; "
                f"expected one of {list(BACKEND_NAMES)}"
            )
        if not isinstance(self.strict_dims, bool):
            # A truthy string such as "no" would silently mean True.
            raise TypeError(
                f"SequenceParallelConfig.strict_dims must be a bool (True or False), got {self.strict_dims!r} "
                f"({type(self.strict_dims).__name__})"
            )
        _check_timeout(self.timeout)
        b, u, r = self.attention_backend, self.ulysses_degree, self.ring_degree
        unmet = BACKENDS[b].unmet(u, r)
        if unmet == "sequence_parallel_size":
            raise ValueError(
                f"attention_backend={b!r} cannot run a sharded sequence (ulysses_degree={u}, ring_degree={r}): "
                "attention would only see the local shard; use 'auto'"
            )
        if unmet is not None:
            raise ValueError(f"attention_backend={b!r} needs {unmet} == 1 (got {unmet}={getattr(self, unmet)}); use 'usp'")

    @property
    def sequence_parallel_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    def resolved_backend(self) -> str:
        """The backend "auto" stands for at these degrees."""
        if self.attention_backend != "auto":
            return self.attention_backend
        return auto_backend(self.ulysses_degree, self.ring_degree)

    def timeout_delta(self) -> datetime.timedelta:
        """The effective timeout of the groups built for this config (None -> the default group's)."""
        if self.timeout is None:
            return default_group_timeout()
        if isinstance(self.timeout, datetime.timedelta):
            return self.timeout
        return datetime.timedelta(seconds=float(self.timeout))


def _check_timeout(value: object) -> None:
    if value is None:
        return
    if isinstance(value, datetime.timedelta):
        if value <= datetime.timedelta(0):
            raise ValueError(f"SequenceParallelConfig.timeout must be a positive duration, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            "SequenceParallelConfig.timeout must be None (the default process group's timeout), a number of "
            f"seconds > 0 or a datetime.timedelta, got {value!r} ({type(value).__name__})"
        )
    if not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"SequenceParallelConfig.timeout must be a finite number of seconds > 0, got {value!r}")


def _backend_timeout(group: dist.ProcessGroup) -> datetime.timedelta | None:
    """The timeout a group was created with, read from its per-device backends' options."""
    try:
        devices = list(getattr(group, "_device_types", ()) or ())
    except (RuntimeError, AttributeError):
        devices = []
    for device in devices:
        try:
            backend = group._get_backend(device)
        except (RuntimeError, AttributeError, ValueError):
            continue
        timeout = getattr(getattr(backend, "options", None), "_timeout", None)
        if isinstance(timeout, datetime.timedelta):
            return timeout
    return None


def default_group_timeout() -> datetime.timedelta:
    """The default process group's timeout (what ``init_process_group(timeout=...)`` set).

    ``new_group`` does not inherit it (it falls back to torch's 30-minute constant), hence this. Read
    through torch internals that moved between releases, each guarded; when none answers, torch's
    default for the backend, which is what a group created without a timeout gets anyway.
    """
    c10d = dist.distributed_c10d
    if not (dist.is_available() and dist.is_initialized()):
        return getattr(c10d, "default_pg_timeout", _TORCH_DEFAULT_TIMEOUT)
    try:
        pg = c10d._get_default_group()
    except (RuntimeError, AttributeError, ValueError):
        pg = None
    if pg is not None:
        timeout = _backend_timeout(pg)
        if timeout is not None:
            return timeout
    world = getattr(c10d, "_world", None)
    for name in ("pg_default_timeout", "default_pg_timeout"):
        timeout = getattr(world, name, None)
        if isinstance(timeout, datetime.timedelta):
            return timeout
    getter = getattr(c10d, "_get_default_timeout", None)
    if getter is not None:
        try:
            return getter(dist.get_backend())
        except (RuntimeError, ValueError, TypeError):
            pass
    return getattr(c10d, "default_pg_timeout", _TORCH_DEFAULT_TIMEOUT)


_STATE_SERIAL = itertools.count(1)
_STATES_BY_KEY: weakref.WeakValueDictionary[str, SPState] = weakref.WeakValueDictionary()


def state_for_key(key: str, where: str) -> SPState:
    """The SP state named ``key`` (``SPState.key``); raises, naming ``where``, when it no longer exists."""
    state = _STATES_BY_KEY.get(key)
    if state is None:
        raise RuntimeError(
            f"{where}: the sequence-parallel state {key!r} this call was compiled with no longer exists (sequence "
            "parallelism was removed or destroyed since); compile the model again after applying it"
        )
    return state


@dataclass(eq=False)
class SPState:
    """The process groups of one initialized SP configuration, seen from this rank.

    ``None`` groups mean size 1 (no communication): a single process needs no torch.distributed.
    ``broken`` is set (``mark_broken``) when an error left a sharded region half done: another rank
    may be waiting in a collective this one skipped, so the groups must not be used again.
    """

    config: SequenceParallelConfig
    sp_group: dist.ProcessGroup | None = None
    ulysses_group: dist.ProcessGroup | None = None
    ring_group: dist.ProcessGroup | None = None
    # Same ranks as sp_group over gloo when sp_group is not host-side (NCCL): metadata checks run on
    # the host there, so they never synchronize the GPU. None when sp_group itself is host-side.
    meta_group: dist.ProcessGroup | None = None
    sp_rank: int = 0
    # Global ranks of this rank's SP group, in sp_rank order.
    sp_ranks: tuple[int, ...] = (0,)
    broken: str | None = None
    # What attention keeps across calls. ``default_context``: the SPContext of attention outside any
    # SP forward (context.py; typed loosely, context imports this module). ``ring_buffers``: the ring
    # receive buffers, (dtype, device) -> two flat tensors (attn/ring.py).
    default_context: Any = field(default=None, repr=False)
    ring_buffers: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )
    # Names this state for torch.compile: a compiled graph calls the library's ops with it (a str is a
    # constant to dynamo, a state is not); ``state_for_key`` finds the state back while it lives.
    key: str = field(default_factory=lambda: f"sp{next(_STATE_SERIAL)}", repr=False)

    def __post_init__(self) -> None:
        _STATES_BY_KEY[self.key] = self

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

    def release_buffers(self) -> int:
        """Free the ring receive buffers (the next ring call allocates them again); returns how many pairs."""
        n = len(self.ring_buffers)
        self.ring_buffers.clear()
        return n

    def mark_broken(self, reason: str) -> None:
        """Refuse further use of this state; the first reason is kept (later errors are its fallout)."""
        if not isinstance(reason, str):
            raise TypeError(f"SPState.mark_broken: reason must be a str, got {type(reason).__name__}")
        if self.broken is None:
            self.broken = reason

    def raise_if_broken(self, where: str) -> None:
        """Raise a RuntimeError naming ``where`` when ``mark_broken`` was called."""
        if self.broken is not None:
            raise RuntimeError(
                f"{where}: sequence parallelism is unusable after an earlier error in a sharded region "
                f"({self.broken}); call remove_sequence_parallel(model) and apply again, or "
                "destroy_sequence_parallel() and init again"
            )


@dataclass(eq=False)
class _Groups:
    """The groups built for one (parent ranks, U, R, timeout), shared by every config with those."""

    key: tuple
    sp_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    meta_group: dist.ProcessGroup | None
    sp_rank: int
    sp_ranks: tuple[int, ...]
    # Every group this rank is a member of, destroyed with this set.
    owned: list = field(default_factory=list)
    states: dict = field(default_factory=dict)

    def any_broken(self) -> bool:
        return any(s.broken is not None for s in self.states.values())


_GROUPS: dict[tuple, _Groups] = {}
_CURRENT: SPState | None = None


# ---------------------------------------------------------------------------------------------
# Which devices a group communicates

# Devices a backend named alone (``init_process_group("nccl")``) serves; "undefined" is what
# ``init_process_group()`` without a backend records on old torch without a backend config.
_BACKEND_DEVICES: dict[str, dict[str, str]] = {
    "gloo": {"cpu": "gloo"},
    "nccl": {"cuda": "nccl"},
    "xccl": {"xpu": "xccl"},
    "mpi": {"cpu": "mpi"},
    "ucc": {"cpu": "ucc", "cuda": "ucc"},
    "undefined": {"cpu": "gloo", "cuda": "nccl"},
}


def parse_backend_config(text: str) -> dict[str, str]:
    """``"cpu:gloo,cuda:nccl"`` -> ``{"cpu": "gloo", "cuda": "nccl"}``; a bare name -> the devices it serves.

    An unknown bare name (a custom backend) gives ``{}``: what it serves is not knowable from its name.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_backend_config: expected a backend string, got {type(text).__name__}")
    text = text.strip().lower()
    if ":" not in text:
        return dict(_BACKEND_DEVICES.get(text, {}))
    out: dict[str, str] = {}
    for part in text.split(","):
        device, sep, name = part.strip().partition(":")
        if not sep or not device.strip() or not name.strip():
            raise ValueError(
                f"parse_backend_config: malformed entry {part!r} in {text!r}; expected 'device:backend' pairs "
                "separated by commas, e.g. 'cpu:gloo,cuda:nccl'"
            )
        out[device.strip()] = name.strip()
    return out


def _backend_text(group: dist.ProcessGroup) -> str:
    getter = getattr(dist, "get_backend_config", None)
    if getter is not None:
        try:
            text = getter(group)
            if text:
                return str(text)
        except (RuntimeError, ValueError, AttributeError, KeyError, TypeError):
            pass
    return str(dist.get_backend(group))


def group_backends(group: dist.ProcessGroup) -> dict[str, str]:
    """Device type -> backend name for the tensors ``group`` can communicate.

    gloo counts for cpu only: torch registers it for cuda too, but only some gloo collectives take
    CUDA tensors (through the host); the all-to-all and ring exchanges need the device's own backend.
    """
    backends = parse_backend_config(_backend_text(group))
    if not backends:
        # A backend unknown by name: ask the group which device types it registered.
        name = str(dist.get_backend(group)).lower()
        try:
            backends = {d.type: name for d in getattr(group, "_device_types", ())}
        except (RuntimeError, AttributeError):
            backends = {}
    return {device: name for device, name in backends.items() if not (name == "gloo" and device != "cpu")}


def device_of_group(
    group: dist.ProcessGroup | None, tensor_device: torch.device | str | None = None
) -> torch.device:
    """The device collectives of ``group`` run on.

    With ``tensor_device``: that device when the group has a backend for its type (e.g. cuda on a
    ``"cpu:gloo,cuda:nccl"`` group), else a ValueError. Without: cuda when the group has a cuda
    backend and CUDA is available (or cuda is all it has), else cpu. ``None`` groups (size 1)
    communicate nothing: the tensor's device, else cpu.
    """
    if tensor_device is not None:
        tensor_device = torch.device(tensor_device)
    if group is None:
        return tensor_device if tensor_device is not None else torch.device("cpu")
    backends = group_backends(group)
    if tensor_device is not None:
        if tensor_device.type in backends:
            return tensor_device
        served = sorted(backends) or ["(unknown)"]
        hint = "'cpu:gloo,cuda:nccl'" if tensor_device.type in ("cpu", "cuda") else f"'{tensor_device.type}:<backend>'"
        raise ValueError(
            f"the process group (backend {_backend_text(group)!r}) has no backend for {tensor_device.type} tensors: "
            f"it communicates {', '.join(served)} tensors; move the tensors to a device it serves or create the "
            f"process group with a backend for {tensor_device.type} (e.g. {hint})"
        )
    if "cuda" in backends and (torch.cuda.is_available() or "cpu" not in backends):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cuda")
    if "cpu" in backends or not backends:
        return torch.device("cpu")
    return torch.device(sorted(backends)[0])


def _host_device(group: dist.ProcessGroup) -> torch.device:
    """cpu when ``group`` can carry CPU tensors (no GPU synchronization), else its own device."""
    return torch.device("cpu") if "cpu" in group_backends(group) else device_of_group(group)


# ---------------------------------------------------------------------------------------------
# Agreement


class SetupError(RuntimeError):
    """Setup failed on other ranks of the group; ``failed`` maps global rank -> "Type: message"."""

    def __init__(self, message: str, failed: dict[int, str]):
        super().__init__(message)
        self.failed = failed


# Fixed payload size: one all_gather of equal-sized tensors, no size exchange first.
_AGREE_BYTES = 1024
_AGREE_MSG_CHARS = 400


def _summary(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _AGREE_MSG_CHARS else text[: _AGREE_MSG_CHARS - 3] + "..."


def _encode(payload: dict) -> bytes:
    data = json.dumps(payload).encode()
    while len(data) > _AGREE_BYTES - 4 and payload.get("error"):
        payload = dict(payload, error=payload["error"][: max(0, len(payload["error"]) // 2 - 3)] + "...")
        data = json.dumps(payload).encode()
    if len(data) > _AGREE_BYTES - 4:
        raise RuntimeError(f"agree_on_setup: payload of {len(data)} bytes does not fit {_AGREE_BYTES - 4}")
    return len(data).to_bytes(4, "little") + data + bytes(_AGREE_BYTES - 4 - len(data))


def _decode(raw: bytes) -> dict:
    n = int.from_bytes(raw[:4], "little")
    return json.loads(raw[4 : 4 + n].decode())


def _as_timedelta(timeout: float | datetime.timedelta | None) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0:
        raise ValueError(f"agree_on_setup: timeout must be None, seconds > 0 or a timedelta, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def _exchange(
    error: BaseException | None,
    group: dist.ProcessGroup | None,
    what: str,
    extra: dict | None = None,
    timeout: float | datetime.timedelta | None = None,
) -> list[dict]:
    """Share every rank's failure (and ``extra``) over ``group``; raise on every rank if any failed.

    Returns the per-rank payloads (group-rank order) when none failed.
    """
    if not isinstance(what, str):
        raise TypeError(f"agree_on_setup: what must be a str, got {type(what).__name__}")
    if error is not None and not isinstance(error, BaseException):
        # Still take part in the exchange: the other ranks are already waiting in it.
        error = TypeError(f"agree_on_setup: error must be an exception or None, got {type(error).__name__}")
    wait_for = _as_timedelta(timeout)
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return [dict(extra or {})]
    if group is not None and not isinstance(group, dist.ProcessGroup):
        # GroupMember.NON_GROUP_MEMBER (an int) on ranks outside a subgroup: they take no part.
        raise ValueError(
            f"{what}: this rank ({dist.get_rank()}) is not a member of the group it was given ({group!r}); "
            "only the group's ranks take part in its setup"
        )
    pg = group if group is not None else dist.group.WORLD
    ranks = dist.get_process_group_ranks(pg)
    payload = dict(extra or {})
    payload["error"] = _summary(error) if error is not None else None
    if len(ranks) == 1:
        if error is not None:
            raise error
        return [payload]

    device = _host_device(pg)
    mine = torch.frombuffer(bytearray(_encode(payload)), dtype=torch.uint8).to(device)
    parts = [torch.empty_like(mine) for _ in ranks]
    try:
        work = dist.all_gather(parts, mine, group=pg, async_op=True)
        if wait_for is not None:
            work.wait(wait_for)
        else:
            work.wait()
    except Exception as e:  # noqa: BLE001 - a timeout or a broken connection, reported with context
        reason = (
            f"{what}: the ranks {ranks} did not all reach the setup agreement"
            + (f" within {wait_for.total_seconds():g}s" if wait_for is not None else "")
            + f" (a rank raised before it or is stuck elsewhere): {type(e).__name__}: {e}"
        )
        if error is not None:
            if hasattr(error, "add_note"):
                error.add_note(reason)
            raise error from None
        raise RuntimeError(reason) from e
    payloads = [_decode(bytes(p.cpu().tolist())) for p in parts]
    failed = {ranks[i]: p["error"] for i, p in enumerate(payloads) if p.get("error") is not None}
    if failed:
        listing = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failed.items()))
        if error is not None:
            others = {r: m for r, m in failed.items() if r != dist.get_rank()}
            if others and hasattr(error, "add_note"):
                error.add_note(f"{what} also failed on other ranks: {listing}")
            raise error
        raise SetupError(
            f"{what} failed on rank(s) {sorted(failed)} of the group {ranks}, so it was not done on this rank "
            f"either: {listing}",
            failed,
        )
    return payloads


def agree_on_setup(
    error: BaseException | None,
    group: dist.ProcessGroup | None = None,
    what: str = "setup",
    *,
    timeout: float | datetime.timedelta | None = None,
) -> None:
    """Make a setup step fail on every rank of ``group`` (default: the world) when it failed on any.

    Collective over ``group``: every rank calls it after its local checks, with its own exception or
    None. If any rank failed, the failing ranks re-raise their own exception and the others raise a
    ``SetupError`` (a RuntimeError) naming the failed ranks and their messages. ``timeout`` bounds the
    wait for the other ranks (default: the group's own timeout); when it expires the group may hold
    a pending exchange and should not be used for collectives again. Without torch.distributed or
    on a group of one rank it just raises ``error`` if given.
    """
    _exchange(error, group, what, None, timeout)


# ---------------------------------------------------------------------------------------------
# init / destroy


def _parent_of(group: object) -> tuple[dist.ProcessGroup, tuple[int, ...]]:
    """The parent group and its ranks; refuses what would make new_group hang, before any collective."""
    if group is None:
        pg = dist.group.WORLD
    elif isinstance(group, dist.ProcessGroup):
        pg = group
    else:
        raise TypeError(
            f"init_sequence_parallel: group must be a torch.distributed ProcessGroup or None, got {group!r} "
            f"({type(group).__name__}); ranks outside a subgroup hold GroupMember.NON_GROUP_MEMBER and must not "
            "call it with that group"
        )
    ranks = tuple(dist.get_process_group_ranks(pg))
    world = dist.get_world_size()
    if len(ranks) != world:
        # new_group is collective over the whole world (and its use_local_synchronization mode
        # desynchronizes torch's group counter, so a later world-wide new_group hangs): building SP
        # groups from a strict subgroup would hang the ranks outside it.
        raise ValueError(
            f"init_sequence_parallel: the parent group has ranks {list(ranks)} but the world has {world} ranks; "
            "SP groups can only be built from the whole world (torch.distributed.new_group is collective over "
            "every rank). Call init_sequence_parallel(config) on every rank without group=: the world is cut "
            "into consecutive SP groups of ulysses_degree * ring_degree ranks"
        )
    return pg, ranks


def _config_summary(config: SequenceParallelConfig, timeout: datetime.timedelta) -> str:
    return (
        f"ulysses_degree={config.ulysses_degree}, ring_degree={config.ring_degree}, "
        f"timeout={timeout.total_seconds():g}s"
    )


def _destroy(g: dist.ProcessGroup) -> None:
    try:
        dist.destroy_process_group(g)
    except (ValueError, RuntimeError, AssertionError, KeyError):
        pass  # already gone with the default group (destroy_process_group() came first)


def _drop_groups(groups: _Groups, reason: str) -> None:
    """Destroy ``groups`` and mark every state over them broken (a model may still hold one)."""
    global _CURRENT
    _GROUPS.pop(groups.key, None)
    for state in groups.states.values():
        state.mark_broken(reason)
        if state is _CURRENT:
            _CURRENT = None
    groups.states.clear()
    if dist.is_available() and dist.is_initialized():
        for g in groups.owned:
            _destroy(g)
    groups.owned.clear()


def ring_group_pg_options(
    backend: str, timeout: datetime.timedelta | None = None, nccl_options: object | None = None
) -> object | None:
    """``pg_options`` for the ring groups' ``new_group``: NCCL options with a high-priority stream when
    ``backend`` (the parent group's, e.g. ``"nccl"`` or ``"cpu:gloo,cuda:nccl"``) runs NCCL for CUDA
    tensors; None otherwise (gloo, custom backends, torch builds without NCCL), so those groups are
    created exactly as before.

    Why: fused_ring issues its transfers from a high-priority comm stream, but ProcessGroupNCCL runs
    its send/recv kernels on its own pool stream, whose priority comes from these options alone
    (``TORCH_NCCL_HIGH_PRIORITY=1`` is the process-wide alternative). At normal priority, NCCL's
    kernels queue behind the attention blocks they are meant to overlap.

    ``nccl_options``: the options class (tests inject a stand-in); default ``ProcessGroupNCCL.Options``.
    ``timeout`` is copied into the options because torch warns when they disagree with new_group's.
    """
    try:
        backends = parse_backend_config(backend)
    except (TypeError, ValueError):
        return None
    if backends.get("cuda") != "nccl":
        return None
    if nccl_options is None:
        if not (dist.is_available() and dist.is_nccl_available()):
            return None
        nccl_options = getattr(getattr(dist, "ProcessGroupNCCL", None), "Options", None)
        if nccl_options is None:
            return None
    try:
        opts = nccl_options(is_high_priority_stream=True)  # type: ignore[operator]
    except TypeError:  # a build whose Options takes no keyword: set the attribute instead
        try:
            opts = nccl_options()  # type: ignore[operator]
            opts.is_high_priority_stream = True
        except (TypeError, AttributeError, RuntimeError):
            return None
    if getattr(opts, "is_high_priority_stream", None) is not True:
        return None
    if timeout is not None:
        try:
            opts._timeout = timeout
        except (AttributeError, TypeError):
            pass
    return opts


def _build_groups(
    key: tuple, parent_ranks: tuple[int, ...], config: SequenceParallelConfig, timeout: datetime.timedelta,
    parent: dist.ProcessGroup,
) -> _Groups:
    P, U, R = config.sequence_parallel_size, config.ulysses_degree, config.ring_degree
    me = dist.get_rank()
    world = len(parent_ranks)
    # Metadata stays on the host: a separate gloo group when the parent's default device is not cpu.
    host_side = device_of_group(parent).type == "cpu"
    sp_group = ulysses_group = ring_group = meta_group = None
    sp_ranks: tuple[int, ...] = (me,)
    owned: list = []

    def make(ranks: list[int], **kwargs) -> dist.ProcessGroup:
        g = dist.new_group(ranks, timeout=timeout, **kwargs)
        if me in ranks:
            owned.append(g)
        return g

    # Ring groups only: their p2p kernels are what fused_ring overlaps with attention. The same
    # options on every rank (one backend string, one torch), so every rank builds the same groups.
    ring_backend = _backend_text(parent) if R > 1 else ""

    def ring_kwargs() -> dict:
        # A fresh Options object per group: torch writes the group's ranks and name into the one it
        # is given and the group keeps a reference to it, so one object must not serve two groups.
        opts = ring_group_pg_options(ring_backend, timeout)
        return {"pg_options": opts} if opts is not None else {}

    # new_group is collective over the whole world: every rank creates every group, in one order.
    for start in range(0, world, P):
        block = list(parent_ranks[start : start + P])
        g = make(block) if P > 1 else None
        mg = make(block, backend="gloo") if P > 1 and not host_side else None
        if me in block:
            sp_group, meta_group, sp_ranks = g, mg, tuple(block)
        for r in range(R):
            uranks = block[r * U : (r + 1) * U]
            ug = make(uranks) if U > 1 else None
            if me in uranks:
                ulysses_group = ug
        for u in range(U):
            rranks = block[u::U]
            rg = make(rranks, **ring_kwargs()) if R > 1 else None
            if me in rranks:
                ring_group = rg
    return _Groups(
        key=key,
        sp_group=sp_group,
        ulysses_group=ulysses_group,
        ring_group=ring_group,
        meta_group=meta_group,
        sp_rank=parent_ranks.index(me) % P,
        sp_ranks=sp_ranks,
        owned=owned,
    )


def init_sequence_parallel(
    config: SequenceParallelConfig, group: dist.ProcessGroup | None = None
) -> SPState:
    """Build the Ulysses x Ring groups for ``config`` from ``group`` (default: the whole world).

    Collective over the world: every rank must call this with the same degrees and timeout. The
    config is checked on each rank first; then the ranks agree, so a rank whose config is invalid,
    does not fit the world or differs from the others' makes every rank raise instead of hanging.
    ``group`` may only be the world (or a group of all its ranks); a strict subgroup is refused
    before any collective.

    Groups are cached per (parent ranks, degrees, timeout): configs differing only in
    ``attention_backend`` / ``strict_dims`` share them (each config has its own SPState, and calling
    again with the same config returns that state). When the cached state (or another over the same
    groups) is broken on any rank, or any rank lacks the groups, every rank builds fresh groups and
    returns a fresh, unbroken state; the old states stay broken.
    """
    global _CURRENT
    if not (dist.is_available() and dist.is_initialized()):
        if not isinstance(config, SequenceParallelConfig):
            raise TypeError(
                f"init_sequence_parallel expects a SequenceParallelConfig, got {type(config).__name__}"
            )
        P, U, R = config.sequence_parallel_size, config.ulysses_degree, config.ring_degree
        if P != 1:
            raise RuntimeError(
                f"SequenceParallelConfig(ulysses_degree={U}, ring_degree={R}) needs {P} ranks, but "
                "torch.distributed is not initialized; call torch.distributed.init_process_group first"
            )
        state = SPState(config=config)
        _CURRENT = state
        return state

    parent, parent_ranks = _parent_of(group)
    error: Exception | None = None
    summary = None
    rebuild = True
    timeout = default_group_timeout()
    key: tuple = ()
    try:
        if not isinstance(config, SequenceParallelConfig):
            raise TypeError(
                f"init_sequence_parallel expects a SequenceParallelConfig, got {type(config).__name__}"
            )
        P, U, R = config.sequence_parallel_size, config.ulysses_degree, config.ring_degree
        world = len(parent_ranks)
        if world % P != 0:
            raise ValueError(
                f"ulysses_degree * ring_degree = {U} * {R} = {P} does not divide the world size {world} "
                f"of the parent group; expected a world size that is a multiple of {P}"
            )
        timeout = config.timeout_delta()
        key = (parent_ranks, U, R, timeout)
        summary = _config_summary(config, timeout)
        cached = _GROUPS.get(key)
        rebuild = cached is None or cached.any_broken()
    except Exception as e:  # noqa: BLE001 - handed to every rank by the agreement
        error = e
    payloads = _exchange(
        # Bounded by the parent group's own timeout, not the SP one: a short SP timeout must not expire
        # while another rank still waits out its own failed SP collective (and this exchange would then
        # leave the parent group out of step).
        error, parent, "init_sequence_parallel", {"config": summary, "rebuild": rebuild}, None
    )
    configs = [p["config"] for p in payloads]
    if len(set(configs)) > 1:
        listing = "; ".join(f"rank {parent_ranks[i]}: {c}" for i, c in enumerate(configs))
        raise ValueError(
            "init_sequence_parallel: the ranks passed different degrees or timeouts, so they would build "
            f"different process groups: {listing}; every rank must pass the same config"
        )
    if any(p["rebuild"] for p in payloads):
        old = _GROUPS.get(key)
        if old is not None:
            _drop_groups(old, "its process groups were rebuilt by a later init_sequence_parallel after an error")
        _GROUPS[key] = _build_groups(key, parent_ranks, config, timeout, parent)
    groups = _GROUPS[key]
    state = groups.states.get(config)
    if state is None:
        state = groups.states[config] = SPState(
            config=config,
            sp_group=groups.sp_group,
            ulysses_group=groups.ulysses_group,
            ring_group=groups.ring_group,
            meta_group=groups.meta_group,
            sp_rank=groups.sp_rank,
            sp_ranks=groups.sp_ranks,
        )
    _CURRENT = state
    return state


def get_sp_state() -> SPState | None:
    """The most recently initialized SP state of this process, if any."""
    return _CURRENT


def discard_state(state: SPState) -> None:
    """Forget ``state`` (e.g. after ``remove_sequence_parallel``).

    A broken state's groups may hold a collective another rank skipped, so they are destroyed with
    it, and every other state over them is marked broken; the next ``init_sequence_parallel`` builds
    fresh groups on every rank (the ranks agree on that). Local: no collective.
    """
    global _CURRENT
    if state is _CURRENT:
        _CURRENT = None
    for groups in list(_GROUPS.values()):
        if groups.states.get(state.config) is not state:
            continue
        if state.broken is not None:
            _drop_groups(groups, f"another state over the same process groups broke ({state.broken})")
        else:
            del groups.states[state.config]


def destroy_sequence_parallel() -> None:
    """Destroy every process group the library created and forget every SP state.

    States still held (e.g. by a model with SP applied) are marked broken, so using them raises a
    clear error instead of reaching a destroyed group. Call it on every rank (NCCL communicators
    may be torn down collectively).
    """
    global _CURRENT
    for groups in list(_GROUPS.values()):
        _drop_groups(groups, "its process groups were destroyed by destroy_sequence_parallel()")
    _GROUPS.clear()
    _CURRENT = None


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def group_name(group: dist.ProcessGroup | None) -> str:
    """The c10d name of ``group`` ("" for None: no communication), the form the library's ops take it in
    (a str is a constant to torch.compile, a process group is not)."""
    return "" if group is None else group.group_name


def group_by_name(name: str) -> dist.ProcessGroup | None:
    """The process group ``group_name`` named (None for "")."""
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(name)
    except (LookupError, ValueError, RuntimeError) as e:
        raise RuntimeError(
            f"sp_kernels: process group {name!r} no longer exists (destroyed since the call was traced or compiled): {e}"
        ) from e
