"""The sharded-region record: what splits tell gathers and attention.

One SPContext lives for one forward of a model that has SP applied (set by the model's forward
wrapper in a ContextVar, so two models, threads or re-entrant calls never see each other's state,
and reset even when the forward is interrupted). Intrusive users who call ``sp_shard`` without
``apply_sequence_parallel`` get a per-state default context, whose record is cleared when its last
sequence is gathered.

What is recorded, and how it is read:

* Every split records a ``ShardLayout`` (true length, local length, replicated rows around the
  shard) and tags the tensor it produced with it (``layout_of``). Layouts are values: two
  sequences cut the same way are one record, since every consumer treats them alike.
* A gather uses the tag of the tensor it gets when there is one, else the ONE recorded layout with
  that many local rows; two different layouts with that local length raise (which rows are padding
  would be a guess).
* Attention reads the query's layout the same way and decides K/V by the record, never by a
  cross-rank checksum: the query's own layout (self-attention), another recorded sequence
  (sharded cross-attention K/V: all-gathered), or, when nothing sharded a K/V of that length,
  replicated tokens (attended locally).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..distributed.parallel_state import SPState, get_sp_state


@dataclass(frozen=True)
class ShardLayout:
    """How one sequence was cut across the SP group.

    Rank ``i`` holds ``[prefix | rows i*local_len ... (i+1)*local_len) | suffix]`` of the sharded
    part, where the sharded part has ``true_len`` real rows padded at the end to
    ``local_len * sp_size`` rows. ``prefix_len`` / ``suffix_len`` rows are replicated on every rank
    (SequenceParallelPartialInput, or joint tokens of a SequenceParallelJointInput).
    ``source`` (plan key and parameter) only labels error messages.
    """

    true_len: int
    local_len: int
    sp_size: int
    prefix_len: int = 0
    suffix_len: int = 0
    source: str = field(default="", compare=False)

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

    def describe(self) -> str:
        where = f" from {self.source}" if self.source else ""
        extra = f", {self.prefix_len} replicated rows in front" if self.prefix_len else ""
        extra += f", {self.suffix_len} replicated rows behind" if self.suffix_len else ""
        return f"true length {self.true_len}, {self.local_len} rows per rank{extra}{where}"


_TAG = "_sp_kernels_layout"


def tag(tensor: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """Mark ``tensor`` as a shard with ``layout`` (read back by ``layout_of``)."""
    try:
        setattr(tensor, _TAG, layout)
    except (AttributeError, RuntimeError):  # tensors that take no attributes (e.g. under tracing)
        pass
    return tensor


def layout_of(tensor: object) -> ShardLayout | None:
    """The layout a split tagged ``tensor`` with, if it is a split's output itself."""
    return getattr(tensor, _TAG, None)


@dataclass(frozen=True)
class JointRecord:
    """Replicated rows joined to the shard inside the model (SequenceParallelJointInput)."""

    rows: int
    strategy: str
    source: str = field(default="", compare=False)


@dataclass(eq=False)
class SPContext:
    state: SPState
    # True from the first split until every recorded sequence was gathered; attention communicates only
    # while it is open (after the last gather every tensor is whole on every rank).
    sharded: bool = False
    # Distinct layouts, in record order.
    layouts: list[ShardLayout] = field(default_factory=list)
    gathered: list[ShardLayout] = field(default_factory=list)
    joints: list[JointRecord] = field(default_factory=list)
    # The default context of intrusive use forgets its record when the region closes (bounded, and a
    # later request of another length is not judged by an old one).
    transient: bool = False
    # Per-forward memo of integrations (e.g. which masks exclude nothing); dies with the context.
    memo: dict = field(default_factory=dict)
    # Layouts of named sequences (vLLM-Omni's shard_group): a gather naming its group needs no length match.
    groups: dict[str, ShardLayout] = field(default_factory=dict)
    gathered_groups: set[str] = field(default_factory=set)

    def record_group(self, name: str, layout: ShardLayout, source: str) -> None:
        known = self.groups.get(name)
        if known is not None and (known.true_len, known.local_len) != (layout.true_len, layout.local_len):
            raise ValueError(
                f"{source}: every tensor of shard_group={name!r} must have the same global sequence length, but "
                f"this forward split {known.true_len} rows ({known.source}) and {layout.true_len} rows"
            )
        self.groups.setdefault(name, layout)

    def group_layout(self, name: str, what: str) -> ShardLayout:
        layout = self.groups.get(name)
        if layout is None:
            raise RuntimeError(
                f"{what}: gather with shard_group={name!r}, but no split of that group ran in this forward "
                f"(recorded groups: {sorted(self.groups)}); check the plan's split keys"
            )
        return layout

    def record_joint(self, rows: int, strategy: str, source: str = "") -> None:
        rec = JointRecord(rows, strategy, source)
        if rows and rec not in self.joints:
            self.joints.append(rec)

    def record(self, layout: ShardLayout) -> None:
        if layout not in self.layouts:
            self.layouts.append(layout)
        if layout in self.gathered:
            self.gathered.remove(layout)
        self.sharded = True

    def layouts_with_rows(self, rows: int) -> list[ShardLayout]:
        return [lay for lay in self.layouts if lay.local_rows == rows]

    def layout_for_local(self, rows: int, what: str) -> ShardLayout | None:
        """The one recorded layout whose local tensors have ``rows`` rows; None when none has.
        Raises when different layouts have that many rows."""
        found = self.layouts_with_rows(rows)
        if len(found) > 1:
            raise ValueError(
                f"{what}: {len(found)} sequences sharded in this forward have {rows} local rows but different "
                f"layouts ({'; '.join(lay.describe() for lay in found)}), so which rows are padding is ambiguous. "
                "Give them lengths that shard to different local lengths, or lengths the SP size divides"
            )
        return found[0] if found else None

    def attention_layouts(self, rows: int) -> set[ShardLayout]:
        """Every layout that explains an attention input of ``rows`` local rows: recorded layouts of
        that many rows, and sharded layouts with the rows of a recorded joint input in front or behind."""
        found = set(self.layouts_with_rows(rows))
        for joint in self.joints:
            for layout in self.layouts:
                if layout.prefix_len or layout.suffix_len or layout.local_len + joint.rows != rows:
                    continue
                side = "prefix_len" if joint.strategy == "front" else "suffix_len"
                found.add(dataclasses.replace(layout, **{side: joint.rows}))
        return found

    def joint_rows(self, rows: int) -> JointRecord | None:
        return next((j for j in self.joints if j.rows == rows), None)

    def mark_gathered(self, layout: ShardLayout | None, group: str | None = None) -> None:
        """A gather of ``layout`` (None: an unrecorded even shard) ran; the region closes once every
        recorded sequence was gathered. Two sequences cut alike are one layout, so the first of their
        gathers would close it: naming them (shard_group) keeps it open until each group's gather."""
        if layout is not None and layout not in self.gathered:
            self.gathered.append(layout)
        if group is not None:
            self.gathered_groups.add(group)
        if all(lay in self.gathered for lay in self.layouts) and self.gathered_groups >= set(self.groups):
            self.sharded = False
            if self.transient:
                for record in (self.layouts, self.gathered, self.joints, self.groups, self.gathered_groups):
                    record.clear()


_CURRENT_CTX: contextvars.ContextVar[SPContext | None] = contextvars.ContextVar("sp_kernels_ctx", default=None)
# The contexts of SP forwards dynamo is tracing (it cannot trace ContextVar.set). Under torch.compile the
# record is read only while tracing: what the library's ops need at run time travels as their arguments.
_TRACED: list[SPContext] = []


def running_context() -> SPContext | None:
    """The context of the SP forward running in this thread/task, if any."""
    if _TRACED and torch.compiler.is_compiling():
        return _TRACED[-1]
    return _CURRENT_CTX.get()


def current_context() -> SPContext | None:
    """The context of the running SP forward, else the default context of the current SP state."""
    ctx = running_context()
    if ctx is not None:
        return ctx
    state = get_sp_state()
    if state is None:
        return None
    if state.default_context is None:
        state.default_context = SPContext(state=state, transient=True)
    return state.default_context


@contextlib.contextmanager
def sp_forward_context(state: SPState) -> Iterator[SPContext]:
    """A fresh context for one SP forward, current until the block exits however it exits (used by the
    model's forward wrapper, integrations and tests)."""
    ctx = SPContext(state=state)
    if torch.compiler.is_compiling():
        _TRACED.append(ctx)
        try:
            yield ctx
        finally:
            _TRACED.pop()
        return
    token = _CURRENT_CTX.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT_CTX.reset(token)
