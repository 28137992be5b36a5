"""The ``_sp_plan`` types: where a model's sequence is split and where it is gathered.

Names and semantics follow vLLM-Omni (a plan written for it ports by changing the import prefix);
see docs/porting.md and DESIGN.md section 1.

A plan maps module keys to specs::

    {
        "rope": {0: SequenceParallelInput(1, expected_dims=4, split_output=True), 1: ...},
        "blocks.0": {"hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3)},
        "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
    }

Keys: ``""`` (root), dotted paths through attributes, ModuleList indices and ModuleDict entries,
one ``*`` on a ModuleList meaning every element. Values: a dict of inputs (str key = forward
parameter, int key = element of the output tuple with ``split_output=True``), or the output spec
(a SequenceParallelOutput, or a list/tuple of them with None for outputs left alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn


def _check_dim(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {value!r}")


@dataclass(frozen=True)
class SequenceParallelInput:
    """Shard a tensor along ``split_dim`` across the SP group.

    ``split_output=False`` shards the named forward input before the module runs; ``True`` shards
    the module's output (the plan key is then the output index). ``expected_dims``: tensors of
    another rank are left alone (warned once; an error under ``strict_dims``). ``auto_pad``: a length
    not divisible by the SP size is padded at the end and the true length recorded, so gathers
    trim it and attention never sees the padding.
    """

    split_dim: int
    expected_dims: int | None = None
    split_output: bool = False
    auto_pad: bool = False

    def __post_init__(self) -> None:
        _check_dim("SequenceParallelInput", "split_dim", self.split_dim)
        _check_dim("SequenceParallelInput", "expected_dims", self.expected_dims, allow_none=True)
        if self.expected_dims is not None and not -self.expected_dims <= self.split_dim < self.expected_dims:
            raise ValueError(
                f"SequenceParallelInput.split_dim={self.split_dim} is out of range for expected_dims={self.expected_dims}"
            )


@dataclass(frozen=True)
class SequenceParallelOutput:
    """All-gather a module output along ``gather_dim`` and drop the padding auto_pad added."""

    gather_dim: int
    expected_dims: int | None = None

    def __post_init__(self) -> None:
        _check_dim("SequenceParallelOutput", "gather_dim", self.gather_dim)
        _check_dim("SequenceParallelOutput", "expected_dims", self.expected_dims, allow_none=True)
        if self.expected_dims is not None and not -self.expected_dims <= self.gather_dim < self.expected_dims:
            raise ValueError(
                f"SequenceParallelOutput.gather_dim={self.gather_dim} is out of range for "
                f"expected_dims={self.expected_dims}"
            )


@dataclass(frozen=True)
class SequenceParallelPartialInput:
    """Shard only the part of ``split_dim`` after a replicated prefix (e.g. text before image).

    ``text_len_source``: the prefix length, as an int or as the name of a forward parameter whose
    dim 1 (a tensor [B, T, ...]) or value (an int) gives it. The prefix stays on every rank; the
    rest is sharded (padded at the end if needed, like ``auto_pad``), and gathers rebuild
    ``[prefix | full rest]``.
    """

    split_dim: int
    text_len_source: str | int
    expected_dims: int | None = None
    split_output: bool = False

    def __post_init__(self) -> None:
        _check_dim("SequenceParallelPartialInput", "split_dim", self.split_dim)
        _check_dim("SequenceParallelPartialInput", "expected_dims", self.expected_dims, allow_none=True)
        src = self.text_len_source
        if isinstance(src, bool) or not isinstance(src, (str, int)) or (isinstance(src, int) and src < 0):
            raise TypeError(
                "SequenceParallelPartialInput.text_len_source must be a parameter name or an int >= 0, "
                f"got {src!r}"
            )

    @property
    def auto_pad(self) -> bool:
        return True


JOINT_STRATEGIES = ("front", "rear")


@dataclass(frozen=True)
class SequenceParallelJointInput:
    """A replicated input whose rows the model joins to the sharded sequence before attention.

    MM-DiT blocks (Flux, Qwen-Image, HunyuanVideo) concatenate text tokens with the image tokens
    inside the attention processor. Sharding the text as well (what diffusers' ``_cp_plan`` does)
    is exact only when both lengths divide the SP size: with auto_pad, padding rows would land in the
    middle of the concatenation. This spec keeps the text whole on every rank and records its length
    along ``seq_dim``, so attention takes those rows as joint tokens (computed once against the whole
    sharded sequence, identical on every rank) -- exact for any text length.
    ``joint_strategy``: "front" when the model puts them before the sharded rows, "rear" after.
    Nothing is sharded or gathered; with ``split_output=True`` the int key names an output.
    """

    seq_dim: int = 1
    joint_strategy: str = "front"
    expected_dims: int | None = None
    split_output: bool = False

    def __post_init__(self) -> None:
        _check_dim("SequenceParallelJointInput", "seq_dim", self.seq_dim)
        _check_dim("SequenceParallelJointInput", "expected_dims", self.expected_dims, allow_none=True)
        if self.joint_strategy not in JOINT_STRATEGIES:
            raise ValueError(
                f"SequenceParallelJointInput.joint_strategy must be one of {JOINT_STRATEGIES}, "
                f"got {self.joint_strategy!r}"
            )
        if self.expected_dims is not None and not -self.expected_dims <= self.seq_dim < self.expected_dims:
            raise ValueError(
                f"SequenceParallelJointInput.seq_dim={self.seq_dim} is out of range for "
                f"expected_dims={self.expected_dims}"
            )


AnySequenceParallelInput = SequenceParallelInput | SequenceParallelPartialInput | SequenceParallelJointInput
SequenceParallelInputPlan = dict[str | int, AnySequenceParallelInput]
SequenceParallelOutputPlan = (
    SequenceParallelOutput | list[SequenceParallelOutput | None] | tuple[SequenceParallelOutput | None, ...]
)
SequenceParallelModelPlan = dict[str, SequenceParallelInputPlan | SequenceParallelOutputPlan]

_INPUT_TYPES = (SequenceParallelInput, SequenceParallelPartialInput, SequenceParallelJointInput)


def _validate_key(key: Any) -> None:
    if not isinstance(key, str):
        raise ValueError(f"_sp_plan keys must be strings (module paths), got {key!r} of type {type(key).__name__}")
    if key == "":
        return
    atoms = key.split(".")
    if any(a == "" for a in atoms):
        raise ValueError(f"_sp_plan key {key!r} has an empty path component; expected e.g. 'blocks.0' or 'blocks.*'")
    if atoms.count("*") > 1 or any("*" in a and a != "*" for a in atoms):
        raise ValueError(f"_sp_plan key {key!r}: '*' may appear once, as a whole path component (e.g. 'blocks.*')")


def _validate_inputs(key: str, spec: dict) -> None:
    if not spec:
        raise ValueError(f"_sp_plan[{key!r}] is an empty dict; expected at least one input or output index")
    for name, item in spec.items():
        where = f"_sp_plan[{key!r}][{name!r}]"
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            raise ValueError(f"{where}: inner keys must be parameter names (str) or output indices (int)")
        if not isinstance(item, _INPUT_TYPES):
            raise ValueError(
                f"{where} must be a SequenceParallelInput, SequenceParallelPartialInput or "
                f"SequenceParallelJointInput, got {type(item).__name__}"
                + (" (outputs are gathered by a SequenceParallelOutput as the whole value)"
                   if isinstance(item, SequenceParallelOutput) else "")
            )
        if isinstance(name, int):
            if name < 0:
                raise ValueError(f"{where}: output index must be >= 0, got {name}")
            if not item.split_output:
                raise ValueError(
                    f"{where}: an int key indexes the module's output tuple and requires split_output=True"
                )
        elif item.split_output:
            raise ValueError(
                f"{where}: split_output=True shards an output and needs an int key (the output index); "
                f"a str key names a forward parameter"
            )
        if isinstance(item, SequenceParallelPartialInput) and isinstance(item.text_len_source, str):
            if not item.text_len_source:
                raise ValueError(f"{where}: text_len_source is an empty parameter name")


def validate_sp_plan(plan: Any) -> None:
    """Raise ValueError, naming the offending key, if ``plan`` is not a well-formed ``_sp_plan``."""
    if not isinstance(plan, dict):
        raise ValueError(f"_sp_plan must be a dict mapping module keys to specs, got {type(plan).__name__}")
    for key, spec in plan.items():
        _validate_key(key)
        if isinstance(spec, dict):
            _validate_inputs(key, spec)
        elif isinstance(spec, SequenceParallelOutput):
            pass
        elif isinstance(spec, (list, tuple)):
            if not spec or not all(s is None or isinstance(s, SequenceParallelOutput) for s in spec):
                raise ValueError(
                    f"_sp_plan[{key!r}] is a {type(spec).__name__}; expected SequenceParallelOutput or None "
                    f"per output index (at least one SequenceParallelOutput), got {spec!r}"
                )
            if all(s is None for s in spec):
                raise ValueError(f"_sp_plan[{key!r}] gathers nothing: every element is None")
        else:
            raise ValueError(
                f"_sp_plan[{key!r}] must be a dict of inputs or a SequenceParallelOutput (or a list of them), "
                f"got {type(spec).__name__}"
            )


def get_sp_plan_from_model(model: nn.Module) -> SequenceParallelModelPlan | None:
    """The model's ``_sp_plan`` class attribute, validated; None when it has none."""
    plan = getattr(model, "_sp_plan", None)
    if plan is None:
        return None
    try:
        validate_sp_plan(plan)
    except ValueError as e:
        raise ValueError(f"{type(model).__name__}._sp_plan is invalid: {e}") from e
    return plan
