"""The ``_sp_plan`` types: where a model's sequence is split and where it is gathered.

Names, fields, defaults and semantics follow vLLM-Omni's ``vllm_omni/diffusion/distributed/sp_plan.py``
(a plan written for it ports by changing the import prefix); see docs/porting.md and
docs/vllm_omni_semantics.md. ``SequenceParallelJointInput`` is sp_kernels' own.

A plan maps module keys to specs::

    {
        "rope": {0: SequenceParallelInput(1, expected_dims=4, split_output=True), 1: ...},
        "blocks.0": {"hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3)},
        "": {"rotary_emb": [SequenceParallelInput(0, expected_dims=2), SequenceParallelInput(0, expected_dims=2)]},
        "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
    }

Keys: ``""`` (root), dotted paths through attributes, ModuleList indices and ModuleDict entries,
one ``*`` on a ModuleList meaning every element. Values: a dict of inputs, or the output spec (a
SequenceParallelOutput, or a list/tuple of them with None for outputs left alone).

In a dict of inputs, a str key names a forward parameter and an int key an element of the module's
output (``split_output=True``). A str key's value is one spec, or a list/tuple of specs for a
parameter that is itself a list/tuple of tensors: element ``i`` of the argument is split by spec
``i`` (None: left alone, an sp_kernels extension); the lengths must match at run time.

``shard_group`` names one global sequence (vLLM-Omni): every ``SequenceParallelInput`` of the group
must have ``auto_pad=True`` and sit under one plan key, and a ``SequenceParallelOutput`` with that
group trims its gather to that sequence's true length (models with several sequences, e.g. video and
audio). ``clone_shard=True`` asks for a shard with its own storage (sp_kernels' splits always copy).
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


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be a bool, got {value!r}")


def _check_group(owner: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"{owner}.shard_group must be a str or None, got {value!r}")
    if not value:
        raise ValueError(f"{owner}.shard_group must be a non-empty name (or None), got ''")


@dataclass(frozen=True)
class SequenceParallelInput:
    """Shard a tensor along ``split_dim`` across the SP group.

    ``split_output=False`` shards the named forward input before the module runs; ``True`` shards
    the module's output (the plan key is then the output index). ``expected_dims``: tensors of
    another rank are left alone (warned once; an error under ``strict_dims``). ``auto_pad``: a length
    not divisible by the SP size is padded at the end and the true length recorded, so gathers
    trim it and attention never sees the padding. ``clone_shard``: the shard gets its own
    contiguous storage instead of viewing the full input (vLLM-Omni; a single-rank input is
    returned unchanged). ``shard_group``: name of the global sequence this tensor belongs to; its
    true length is recorded under that name (requires ``auto_pad=True``) and a
    ``SequenceParallelOutput`` with the same group trims to it.
    """

    split_dim: int
    expected_dims: int | None = None
    split_output: bool = False
    auto_pad: bool = False
    clone_shard: bool = False
    shard_group: str | None = None

    def __post_init__(self) -> None:
        _check_dim("SequenceParallelInput", "split_dim", self.split_dim)
        _check_dim("SequenceParallelInput", "expected_dims", self.expected_dims, allow_none=True)
        if self.expected_dims is not None and not -self.expected_dims <= self.split_dim < self.expected_dims:
            raise ValueError(
                f"SequenceParallelInput.split_dim={self.split_dim} is out of range for expected_dims={self.expected_dims}"
            )
        _check_bool("SequenceParallelInput", "clone_shard", self.clone_shard)
        _check_group("SequenceParallelInput", self.shard_group)


@dataclass(frozen=True)
class SequenceParallelOutput:
    """All-gather a module output along ``gather_dim`` and drop the padding auto_pad added.

    ``shard_group``: trim to the true length recorded for that group (vLLM-Omni); None keeps the
    single-sequence behaviour.
    """

    gather_dim: int
    expected_dims: int | None = None
    shard_group: str | None = None

    def __post_init__(self) -> None:
        _check_dim("SequenceParallelOutput", "gather_dim", self.gather_dim)
        _check_dim("SequenceParallelOutput", "expected_dims", self.expected_dims, allow_none=True)
        if self.expected_dims is not None and not -self.expected_dims <= self.gather_dim < self.expected_dims:
            raise ValueError(
                f"SequenceParallelOutput.gather_dim={self.gather_dim} is out of range for "
                f"expected_dims={self.expected_dims}"
            )
        _check_group("SequenceParallelOutput", self.shard_group)


@dataclass(frozen=True)
class SequenceParallelPartialInput:
    """Shard only the part of ``split_dim`` after a replicated prefix (e.g. text before image).

    ``text_len_source``: the prefix length, as an int, or as the name of a forward parameter of the
    same module whose value gives it: a tensor's ``shape[0]`` (``txt_ids`` of shape ``[T, 3]`` gives
    ``T``; vLLM-Omni assumes batch size 1 here) or an int. A parameter that is missing or None is an
    error. The prefix stays on every rank; the rest is sharded (padded at the end if needed, like
    ``auto_pad``), and gathers rebuild ``[prefix | full rest]``.
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
                f"SequenceParallelPartialInput.text_len_source must be a parameter name or an int >= 0, got {src!r}"
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
# Element specs of a list/tuple-valued parameter (None: element left alone).
SequenceParallelInputList = (
    list[SequenceParallelInput | SequenceParallelPartialInput | None]
    | tuple[SequenceParallelInput | SequenceParallelPartialInput | None, ...]
)
SequenceParallelInputPlan = dict[str | int, AnySequenceParallelInput | SequenceParallelInputList]
SequenceParallelOutputPlan = (
    SequenceParallelOutput | list[SequenceParallelOutput | None] | tuple[SequenceParallelOutput | None, ...]
)
SequenceParallelModelPlan = dict[str, SequenceParallelInputPlan | SequenceParallelOutputPlan]

_INPUT_TYPES = (SequenceParallelInput, SequenceParallelPartialInput, SequenceParallelJointInput)
_LIST_ELEMENT_TYPES = (SequenceParallelInput, SequenceParallelPartialInput)


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


def _check_partial_source(where: str, item: Any) -> None:
    if isinstance(item, SequenceParallelPartialInput) and isinstance(item.text_len_source, str):
        if not item.text_len_source:
            raise ValueError(f"{where}: text_len_source is an empty parameter name")


def _validate_input_list(where: str, name: Any, items: list | tuple) -> list[tuple[str, SequenceParallelInput]]:
    """Check a list/tuple of element specs; return (where, spec) of its SequenceParallelInputs."""
    kind = type(items).__name__
    if isinstance(name, int):
        raise ValueError(
            f"{where}: an int key (output index) takes one spec with split_output=True, not a {kind}; "
            "a list of specs is for a forward parameter that is a list/tuple of tensors"
        )
    if not items:
        raise ValueError(f"{where} is an empty {kind}; expected one spec (or None) per element of the argument")
    found = []
    for i, el in enumerate(items):
        at = f"{where}[{i}]"
        if el is None:
            continue
        if not isinstance(el, _LIST_ELEMENT_TYPES):
            raise ValueError(
                f"{at} must be a SequenceParallelInput, SequenceParallelPartialInput or None (element left "
                f"alone), got {type(el).__name__}"
                + (" (a list/tuple of specs cannot nest)" if isinstance(el, (list, tuple)) else "")
            )
        if el.split_output:
            raise ValueError(
                f"{at}: split_output=True is not allowed in a list of element specs (the list splits the elements "
                "of a forward argument); shard outputs with int keys"
            )
        _check_partial_source(at, el)
        if isinstance(el, SequenceParallelInput):
            found.append((at, el))
    if not found and all(el is None for el in items):
        raise ValueError(f"{where} splits nothing: every element is None")
    return found


def _validate_inputs(key: str, spec: dict) -> list[tuple[str, SequenceParallelInput]]:
    if not spec:
        raise ValueError(f"_sp_plan[{key!r}] is an empty dict; expected at least one input or output index")
    inputs: list[tuple[str, SequenceParallelInput]] = []
    for name, item in spec.items():
        where = f"_sp_plan[{key!r}][{name!r}]"
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            raise ValueError(f"{where}: inner keys must be parameter names (str) or output indices (int)")
        if isinstance(item, (list, tuple)):
            inputs.extend(_validate_input_list(where, name, item))
            continue
        if not isinstance(item, _INPUT_TYPES):
            raise ValueError(
                f"{where} must be a SequenceParallelInput, SequenceParallelPartialInput or "
                f"SequenceParallelJointInput (or a list/tuple of them for a list-valued parameter), "
                f"got {type(item).__name__}"
                + (
                    " (outputs are gathered by a SequenceParallelOutput as the whole value)"
                    if isinstance(item, SequenceParallelOutput)
                    else ""
                )
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
        _check_partial_source(where, item)
        if isinstance(item, SequenceParallelInput):
            inputs.append((where, item))
    return inputs


def _validate_groups(
    inputs: list[tuple[str, str, SequenceParallelInput]], outputs: list[tuple[str, SequenceParallelOutput]]
) -> None:
    """shard_group rules (vLLM-Omni): auto_pad=True, one plan key per group; gathers name a declared group."""
    owners: dict[str, str] = {}
    for key, where, item in inputs:
        group = item.shard_group
        if group is None:
            continue
        if not item.auto_pad:
            raise ValueError(
                f"{where}: shard_group={group!r} requires auto_pad=True (the group records the sequence's true "
                "length, which only auto_pad splits record)"
            )
        owner = owners.setdefault(group, key)
        if owner != key:
            raise ValueError(
                f"{where}: shard_group={group!r} is already used under _sp_plan[{owner!r}]; a group names the "
                "sequence of one split boundary, use a distinct name per plan key"
            )
    for where, out in outputs:
        if out.shard_group is not None and out.shard_group not in owners:
            declared = sorted(owners)
            raise ValueError(
                f"{where}: SequenceParallelOutput(shard_group={out.shard_group!r}) gathers a group that no "
                f"SequenceParallelInput of the plan declares (declared groups: {declared})"
            )


def validate_sp_plan(plan: Any) -> None:
    """Raise ValueError, naming the offending key, if ``plan`` is not a well-formed ``_sp_plan``."""
    if not isinstance(plan, dict):
        raise ValueError(f"_sp_plan must be a dict mapping module keys to specs, got {type(plan).__name__}")
    inputs: list[tuple[str, str, SequenceParallelInput]] = []
    outputs: list[tuple[str, SequenceParallelOutput]] = []
    for key, spec in plan.items():
        _validate_key(key)
        if isinstance(spec, dict):
            inputs.extend((key, where, item) for where, item in _validate_inputs(key, spec))
        elif isinstance(spec, SequenceParallelOutput):
            outputs.append((f"_sp_plan[{key!r}]", spec))
        elif isinstance(spec, (list, tuple)):
            if not spec or not all(s is None or isinstance(s, SequenceParallelOutput) for s in spec):
                hint = (
                    "; a list of input specs belongs inside the dict, under the parameter name it splits"
                    if any(isinstance(s, _INPUT_TYPES) for s in spec)
                    else ""
                )
                raise ValueError(
                    f"_sp_plan[{key!r}] is a {type(spec).__name__}; expected SequenceParallelOutput or None "
                    f"per output index (at least one SequenceParallelOutput), got {spec!r}{hint}"
                )
            if all(s is None for s in spec):
                raise ValueError(f"_sp_plan[{key!r}] gathers nothing: every element is None")
            outputs.extend((f"_sp_plan[{key!r}][{i}]", s) for i, s in enumerate(spec) if s is not None)
        else:
            raise ValueError(
                f"_sp_plan[{key!r}] must be a dict of inputs or a SequenceParallelOutput (or a list of them), "
                f"got {type(spec).__name__}"
            )
    _validate_groups(inputs, outputs)


def get_sp_plan_from_model(model: nn.Module) -> SequenceParallelModelPlan | None:
    """The model's ``_sp_plan`` (class or instance attribute), validated; None when it has none."""
    plan = getattr(model, "_sp_plan", None)
    if plan is None:
        return None
    try:
        validate_sp_plan(plan)
    except ValueError as e:
        raise ValueError(f"{type(model).__name__}._sp_plan is invalid: {e}") from e
    return plan
