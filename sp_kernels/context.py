"""The sharded-region context: what hooks and sp_shard/sp_gather tell attention.

One SPContext lives for one forward of a model that has SP applied (set by the root hook in a
ContextVar, so two models, threads or re-entrant calls never see each other's state). Intrusive
users who call ``sp_shard`` without ``apply_sequence_parallel`` get a per-state default context.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

from .parallel_state import SPState, get_sp_state


@dataclass(frozen=True)
class ShardLayout:
    """How one sequence was cut across the SP group.

    Rank ``i`` holds ``[prefix | rows i*local_len ... (i+1)*local_len) | suffix]`` of the sharded
    part, where the sharded part has ``true_len`` real rows padded at the end to
    ``local_len * sp_size`` rows. ``prefix_len`` / ``suffix_len`` rows are replicated on every rank
    (SequenceParallelPartialInput, or joint tokens of a SequenceParallelJointInput).
    """

    true_len: int
    local_len: int
    sp_size: int
    prefix_len: int = 0
    suffix_len: int = 0

    @property
    def local_rows(self) -> int:
        """Rows of a local tensor with this layout, replicated rows included."""
        return self.prefix_len + self.local_len + self.suffix_len

    @property
    def padded_len(self) -> int:
        return self.local_len * self.sp_size

    @property
    def pad(self) -> int:
        return self.padded_len - self.true_len

    def valid_rows(self, sp_rank: int) -> int:
        """Real (non-padding) rows of the sharded part that ``sp_rank`` holds."""
        return max(0, min(self.local_len, self.true_len - sp_rank * self.local_len))


@dataclass(eq=False)
class SPContext:
    state: SPState
    # True between a split and the gather that ends it: attention communicates only then.
    sharded: bool = False
    # Most recent layout first; looked up by the local length a tensor has along its seq dim.
    layouts: list[ShardLayout] = field(default_factory=list)
    # (rows, joint_strategy) of replicated joint inputs (SequenceParallelJointInput) seen so far.
    joints: list[tuple[int, str]] = field(default_factory=list)

    def record_joint(self, rows: int, strategy: str) -> None:
        if rows and (rows, strategy) not in self.joints:
            self.joints.insert(0, (rows, strategy))

    def record(self, layout: ShardLayout) -> None:
        if layout in self.layouts:
            self.layouts.remove(layout)
        self.layouts.insert(0, layout)

    def layout_for_local(self, local_total: int) -> ShardLayout | None:
        """The layout of a local tensor with ``local_total`` rows (prefix included), if recorded."""
        for layout in self.layouts:
            if layout.local_rows == local_total:
                return layout
        return None

    def attention_layouts(self, rows: int) -> set[ShardLayout]:
        """Every layout that explains an attention input of ``rows`` local rows: recorded layouts of
        that many rows, and sharded layouts with the rows of a recorded joint input in front or behind."""
        found = {layout for layout in self.layouts if layout.local_rows == rows}
        for joint_rows, strategy in self.joints:
            for layout in self.layouts:
                if layout.prefix_len or layout.suffix_len or layout.local_len + joint_rows != rows:
                    continue
                side = "prefix_len" if strategy == "front" else "suffix_len"
                found.add(dataclasses.replace(layout, **{side: joint_rows}))
        return found

    def layout_for_gathered(self, gathered_rows: int) -> ShardLayout | None:
        """The layout whose padded sharded part has ``gathered_rows`` rows."""
        for layout in self.layouts:
            if layout.padded_len == gathered_rows:
                return layout
        return None


_CURRENT_CTX: contextvars.ContextVar[SPContext | None] = contextvars.ContextVar("sp_kernels_ctx", default=None)


def current_context() -> SPContext | None:
    """The context of the running SP forward, else the default context of the current SP state."""
    ctx = _CURRENT_CTX.get()
    if ctx is not None:
        return ctx
    state = get_sp_state()
    if state is None:
        return None
    default = state._cache.get("default_context")
    if default is None:
        default = state._cache["default_context"] = SPContext(state=state)
    return default


@contextlib.contextmanager
def sp_forward_context(state: SPState) -> Iterator[SPContext]:
    """A fresh context for one SP forward (used by the root hook and by tests)."""
    ctx = SPContext(state=state)
    token = _CURRENT_CTX.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT_CTX.reset(token)


def enter_context(state: SPState) -> contextvars.Token:
    return _CURRENT_CTX.set(SPContext(state=state))


def exit_context(token: contextvars.Token) -> None:
    _CURRENT_CTX.reset(token)
