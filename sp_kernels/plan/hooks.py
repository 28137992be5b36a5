"""Split/gather hooks that apply an ``_sp_plan`` to a model without touching its ``forward()``.

``apply_sequence_parallel`` resolves and checks the whole plan first (and, on several ranks, agrees
that every rank could), then registers torch module hooks; nothing is registered when anything is
wrong, and ``remove_sequence_parallel`` removes exactly what it added. A wrapper around the model's
forward gives every forward its own SPContext (the record of what was sharded, see context.py) and
runs the root's own splits and gathers inside it, so the context is reset however the forward ends.
An exception inside a sharded forward marks the SP state broken: another rank may be waiting in a
collective this one skipped, so later calls raise until SP is removed and applied again.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from ..distributed import parallel_state
from ..distributed.parallel_state import SequenceParallelConfig, SPState, get_sp_state, init_sequence_parallel
from .context import SPContext, layout_of, running_context, sp_forward_context
from .sharding import gather_and_trim, shard_and_record
from .specs import (
    SequenceParallelJointInput,
    SequenceParallelOutput,
    SequenceParallelPartialInput,
    validate_sp_plan,
)

logger = logging.getLogger("sp_kernels")

_APPLIED_ATTR = "_sp_kernels_applied"


@dataclass(eq=False)
class _Applied:
    state: SPState
    plan: dict
    owner: str = "model"
    handles: list[RemovableHandle] = field(default_factory=list)
    warned: set = field(default_factory=set)
    # The model's own forward before apply wrapped it (None: it had no instance attribute).
    forward_before: Any = None
    forward_wrapper: Any = None

    def context(self, key: str) -> SPContext:
        """The running forward's context. A planned submodule called on its own (outside a forward of
        the model) would shard its input and never gather it: refused."""
        ctx = running_context()
        if ctx is None or ctx.state is not self.state:
            raise RuntimeError(
                f"_sp_plan[{key!r}] of {self.owner} ran outside a forward of the {self.owner} sequence parallelism "
                "was applied to (a planned submodule called directly); its split would never be gathered and its "
                "attention would see one shard. Call the whole model, or remove_sequence_parallel(model) first"
            )
        return ctx

    def dims_mismatch(self, key: str, name: Any, expected: int, got: torch.Tensor, action: str) -> None:
        msg = (
            f"_sp_plan[{key!r}][{name!r}]: expected a tensor with {expected} dims, got {got.dim()} dims "
            f"(shape {tuple(got.shape)})"
        )
        if self.state.config.strict_dims:
            raise ValueError(msg + " and SequenceParallelConfig(strict_dims=True) is set")
        tag = (key, name, expected, got.dim())
        # dynamo cannot trace logging: a forward compiled before any eager one skips without the warning.
        if tag not in self.warned and not torch.compiler.is_compiling():
            self.warned.add(tag)
            logger.warning("%s; %s skipped (warned once)", msg, action)


# ---------------------------------------------------------------------------------------------
# Plan key resolution


def _resolve_key(model: nn.Module, key: str) -> list[nn.Module]:
    if key == "":
        return [model]
    modules = [model]
    path = "<root>"
    for atom in key.split("."):
        nxt: list[nn.Module] = []
        for m in modules:
            if atom == "*":
                if not isinstance(m, nn.ModuleList):
                    raise ValueError(
                        f"_sp_plan key {key!r}: '*' needs a ModuleList, but {path} is a {type(m).__name__}"
                    )
                nxt.extend(m)
                continue
            child = m._modules.get(atom) if atom in m._modules else getattr(m, atom, None)
            if not isinstance(child, nn.Module):
                children = list(m._modules)
                shown = children if len(children) <= 12 else children[:12] + ["..."]
                raise ValueError(
                    f"_sp_plan key {key!r}: {path} ({type(m).__name__}) has no submodule {atom!r}; "
                    f"its submodules are {shown}"
                )
            nxt.append(child)
        modules = nxt
        path = f"{path}.{atom}" if path != "<root>" else atom
    if not modules:
        raise ValueError(f"_sp_plan key {key!r} matches no module (the ModuleList under '*' is empty)")
    return modules


class Signature:
    """Where a named forward parameter sits: in kwargs, or at a position in args."""

    def __init__(self, module: nn.Module) -> None:
        sig = inspect.signature(module.forward)
        self.positions: dict[str, int] = {}
        self.names: list[str] = []
        self.var_kwargs = False
        # Index of *args, if any: a value passed there cannot be told by name.
        self.var_positional: int | None = None
        for i, (name, p) in enumerate(sig.parameters.items()):
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                self.positions[name] = i
            if p.kind == p.VAR_KEYWORD:
                self.var_kwargs = True
            if p.kind == p.VAR_POSITIONAL:
                self.var_positional = i
            elif p.kind != p.VAR_POSITIONAL:
                self.names.append(name)

    def knows(self, name: str) -> bool:
        return name in self.names or self.var_kwargs

    @staticmethod
    def put(args: list, kwargs: dict, where: str | int, value: Any) -> None:
        """Store ``value`` where ``get`` found the argument (a kwarg name or a position in ``args``)."""
        if isinstance(where, str):
            kwargs[where] = value
        else:
            args[where] = value

    def get(self, name: str, args: tuple, kwargs: dict) -> tuple[Any, str | int | None]:
        """(value, where): where is the kwarg name, the arg index, or None if not passed."""
        if name in kwargs:
            return kwargs[name], name
        pos = self.positions.get(name)
        if pos is not None and pos < len(args):
            return args[pos], pos
        return None, None


# ---------------------------------------------------------------------------------------------
# Output containers: tensor, tuple/list, dict/ModelOutput, dataclass


def _output_items(output: Any) -> list[Any]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return list(output)
    if isinstance(output, dict):
        # ModelOutput indexes its non-None fields; do the same for plain dicts.
        return [v for v in output.values() if v is not None]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [getattr(output, f.name) for f in dataclasses.fields(output) if getattr(output, f.name) is not None]
    return [output]


def _rebuild_output(output: Any, items: list[Any]) -> Any:
    if isinstance(output, torch.Tensor):
        return items[0]
    if isinstance(output, tuple):
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    if isinstance(output, list):
        return type(output)(items)
    if isinstance(output, dict):
        keys = [k for k, v in output.items() if v is not None]
        for k, v in zip(keys, items):
            output[k] = v
        return output
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        names = [f.name for f in dataclasses.fields(output) if getattr(output, f.name) is not None]
        for n, v in zip(names, items):
            setattr(output, n, v)
        return output
    return items[0]


def _describe(output: Any) -> str:
    n = len(_output_items(output))
    return f"{type(output).__name__} with {n} item(s)"


# ---------------------------------------------------------------------------------------------
# Split and gather


def _split_tensor(
    applied: _Applied, key: str, name: Any, spec: Any, x: Any, text_len: int = 0
) -> Any:
    if not isinstance(x, torch.Tensor):
        raise ValueError(
            f"_sp_plan[{key!r}][{name!r}]: expected a tensor to split, got {type(x).__name__}"
        )
    if spec.expected_dims is not None and x.dim() != spec.expected_dims:
        applied.dims_mismatch(key, name, spec.expected_dims, x, "split")
        return x
    if not -x.dim() <= spec.split_dim < x.dim():
        raise ValueError(
            f"_sp_plan[{key!r}][{name!r}]: split_dim={spec.split_dim} is out of range for shape {tuple(x.shape)}"
        )
    dim = spec.split_dim % x.dim()
    state = applied.state
    size = state.sp_size
    length = x.size(dim)
    if text_len > length:
        raise ValueError(
            f"_sp_plan[{key!r}][{name!r}]: the replicated prefix ({text_len} rows) is longer than dim {dim} "
            f"of shape {tuple(x.shape)}"
        )
    body = length - text_len
    if body % size != 0 and not spec.auto_pad:
        raise ValueError(
            f"_sp_plan[{key!r}][{name!r}]: length {body} of dim {dim} (shape {tuple(x.shape)}) is not divisible "
            f"by the sequence-parallel size {size}; set auto_pad=True in its SequenceParallelInput to pad it "
            "(attention then excludes the padding exactly)"
        )
    if size == 1:
        return x
    ctx = applied.context(key)
    group = getattr(spec, "shard_group", None)
    out = shard_and_record(x, dim, ctx, size, state.sp_rank, text_len, source=f"_sp_plan[{key!r}][{name!r}]")
    if group is not None:
        ctx.record_group(group, layout_of(out), f"_sp_plan[{key!r}][{name!r}]")  # type: ignore[arg-type]
    return out


def _split_value(applied: _Applied, key: str, name: Any, spec: Any, value: Any, sig: Signature, args, kwargs) -> Any:
    """Split one argument or output per its spec; a list of specs splits a list/tuple argument element-wise."""
    if isinstance(spec, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(spec):
            got = f"a {type(value).__name__} of {len(value)}" if isinstance(value, (list, tuple)) else (
                f"a {type(value).__name__}")
            raise ValueError(
                f"_sp_plan[{key!r}][{name!r}] lists {len(spec)} specs, so the argument must be a list or tuple of "
                f"{len(spec)} tensors (element i split by spec i); got {got}"
            )
        items = [
            v if s is None or v is None else _split_value(applied, key, f"{name}[{i}]", s, v, sig, args, kwargs)
            for i, (s, v) in enumerate(zip(spec, value))
        ]
        return _rebuild_output(value, items)
    if isinstance(spec, SequenceParallelJointInput):
        _record_joint(applied, key, name, spec, value)
        return value
    prefix = _text_len(key, name, spec, sig, args, kwargs) if isinstance(spec, SequenceParallelPartialInput) else 0
    return _split_tensor(applied, key, name, spec, value, prefix)


def _record_joint(applied: _Applied, key: str, name: Any, spec: SequenceParallelJointInput, x: Any) -> None:
    """Note the length of replicated joint tokens; the tensor itself passes untouched."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(
            f"_sp_plan[{key!r}][{name!r}]: SequenceParallelJointInput expects a tensor, got {type(x).__name__}"
        )
    if spec.expected_dims is not None and x.dim() != spec.expected_dims:
        applied.dims_mismatch(key, name, spec.expected_dims, x, "record as joint tokens")
        return
    if not -x.dim() <= spec.seq_dim < x.dim():
        raise ValueError(
            f"_sp_plan[{key!r}][{name!r}]: seq_dim={spec.seq_dim} is out of range for shape {tuple(x.shape)}"
        )
    if applied.state.sp_size > 1:
        applied.context(key).record_joint(
            x.size(spec.seq_dim % x.dim()), spec.joint_strategy, source=f"_sp_plan[{key!r}][{name!r}]"
        )


def _gather_tensor(applied: _Applied, key: str, index: int, spec: SequenceParallelOutput, x: Any) -> Any:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"_sp_plan[{key!r}] output {index}: expected a tensor to gather, got {type(x).__name__}")
    if spec.expected_dims is not None and x.dim() != spec.expected_dims:
        applied.dims_mismatch(key, f"output {index}", spec.expected_dims, x, "gather")
        return x
    if not -x.dim() <= spec.gather_dim < x.dim():
        raise ValueError(
            f"_sp_plan[{key!r}] output {index}: gather_dim={spec.gather_dim} is out of range for shape "
            f"{tuple(x.shape)}"
        )
    state = applied.state
    if state.sp_size == 1:
        return x
    ctx = applied.context(key)
    what = f"_sp_plan[{key!r}] output {index}"
    layout = ctx.group_layout(spec.shard_group, what) if spec.shard_group is not None else None
    return gather_and_trim(
        x, spec.gather_dim % x.dim(), ctx, state.sp_group, state.sp_size, state.sp_rank, what=what, strict=True,
        layout=layout, group_name=spec.shard_group,
    )


def _text_len(key: str, name: Any, spec: SequenceParallelPartialInput, sig: Signature, args, kwargs) -> int:
    src = spec.text_len_source
    if isinstance(src, int):
        return src
    value, where = sig.get(src, args, kwargs)
    if where is None or value is None:
        raise ValueError(
            f"_sp_plan[{key!r}][{name!r}]: text_len_source {src!r} was not passed to forward, so the replicated "
            "prefix length is unknown"
        )
    # vLLM-Omni's meaning: the length of the named tensor's first dim (its example: txt_ids [T, 3] -> T).
    if isinstance(value, torch.Tensor) and value.dim() >= 1:
        return value.size(0)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(
        f"_sp_plan[{key!r}][{name!r}]: text_len_source {src!r} is {type(value).__name__} "
        f"{tuple(value.shape) if isinstance(value, torch.Tensor) else value!r}; expected a tensor whose dim 0 is the "
        "prefix length (e.g. txt_ids [T, 3]) or an int >= 0"
    )


def _make_split_pre_hook(applied: _Applied, key: str, specs: dict, sig: Signature) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        args = list(args)
        for name, spec in specs.items():
            value, where = sig.get(name, args, kwargs)
            if where is None and sig.var_positional is not None and len(args) > sig.var_positional:
                # e.g. a module wrapped as forward(*args, **kwargs) before apply: skipping would leave it unsharded.
                raise ValueError(
                    f"_sp_plan[{key!r}][{name!r}]: {type(module).__name__}.forward takes *args and got {len(args)} "
                    f"positional argument(s), so whether {name!r} is among them is unknown; pass {name!r} by keyword, "
                    "or apply sequence parallelism to the module before wrapping it"
                )
            if where is None or value is None:
                continue
            sig.put(args, kwargs, where, _split_value(applied, key, name, spec, value, sig, args, kwargs))
        return tuple(args), kwargs

    return hook


def _make_split_output_hook(applied: _Applied, key: str, specs: dict, sig: Signature) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
        items = _output_items(output)
        for index, spec in specs.items():
            if index >= len(items):
                raise ValueError(
                    f"_sp_plan[{key!r}][{index}]: output index out of range; the module returned "
                    f"{_describe(output)}"
                )
            if items[index] is not None:
                items[index] = _split_value(applied, key, index, spec, items[index], sig, args, kwargs)
        return _rebuild_output(output, items)

    return hook


def _make_gather_hook(applied: _Applied, key: str, specs: list) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
        items = _output_items(output)
        if len(specs) > 1 and len(specs) != len(items):
            raise ValueError(
                f"_sp_plan[{key!r}] lists {len(specs)} outputs to gather, but the module returned {_describe(output)}"
            )
        for i, spec in enumerate(specs):
            if spec is not None and items[i] is not None:
                items[i] = _gather_tensor(applied, key, i, spec, items[i])
        return _rebuild_output(output, items)

    return hook


# ---------------------------------------------------------------------------------------------
# apply / remove


def _default_config() -> SequenceParallelConfig:
    state = get_sp_state()
    if state is not None:
        return state.config
    if dist.is_available() and dist.is_initialized():
        return SequenceParallelConfig(ulysses_degree=dist.get_world_size())
    return SequenceParallelConfig()


def _resolve_plan(model: nn.Module, plan: dict) -> list[tuple[str, nn.Module, Any, Signature]]:
    """Every (key, module, spec, signature) of ``plan``; raises, naming the key, before anything is touched."""
    cls = type(model).__name__
    try:
        validate_sp_plan(plan)
    except ValueError as e:
        raise ValueError(f"{cls}: {e}") from e
    resolved: list[tuple[str, nn.Module, Any, Signature]] = []
    split_owner: dict[int, str] = {}
    for key, spec in plan.items():
        for m in _resolve_key(model, key):
            sig = Signature(m)
            if isinstance(spec, dict):
                for name, item in spec.items():
                    if isinstance(name, str) and not sig.knows(name):
                        raise ValueError(
                            f"{cls}: _sp_plan[{key!r}] names parameter {name!r}, but "
                            f"{type(m).__name__}.forward takes {sig.names}"
                        )
                    src = getattr(item, "text_len_source", None)
                    if isinstance(src, str) and not sig.knows(src):
                        raise ValueError(
                            f"{cls}: _sp_plan[{key!r}][{name!r}] reads text_len_source {src!r}, but "
                            f"{type(m).__name__}.forward takes {sig.names}"
                        )
                if id(m) in split_owner:
                    raise ValueError(
                        f"{cls}: _sp_plan keys {split_owner[id(m)]!r} and {key!r} both split the inputs of the same "
                        f"{type(m).__name__}; it would be sharded twice"
                    )
                split_owner[id(m)] = key
            resolved.append((key, m, spec, sig))
    return resolved


def _agree(error: BaseException | None, config: object, what: str) -> None:
    """Raise on every rank when setup failed on any (a rank that raised alone would leave the others
    waiting in the process-group creation that follows)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Over the world with its own timeout (the SP timeout bounds the SP groups' collectives only).
        parallel_state.agree_on_setup(error, None, what)
    elif error is not None:
        raise error


def apply_sequence_parallel(
    model: nn.Module, config: SequenceParallelConfig | None = None, plan: dict | None = None
) -> nn.Module:
    """Register the split/gather hooks of ``plan`` (default: ``model._sp_plan``) on ``model``.

    ``config`` defaults to the current SP state's config, else Ulysses over the whole world.
    Collective when it has to build process groups: call it on every rank. Everything that can be
    checked locally is checked first; when it fails on any rank, every rank raises (and the model
    is left untouched): an invalid plan, unknown module key or parameter, degrees that do not fit
    the world, or SP already applied.
    """
    cls = type(model).__name__
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_sequence_parallel expects an nn.Module, got {cls}")
    if config is None:
        config = _default_config()
    error: BaseException | None = None
    resolved: list[tuple[str, nn.Module, Any, Signature]] = []
    try:
        if not isinstance(config, SequenceParallelConfig):
            raise TypeError(f"config must be a SequenceParallelConfig, got {type(config).__name__}")
        if getattr(model, _APPLIED_ATTR, None) is not None:
            raise RuntimeError(
                f"sequence parallelism is already applied to this {cls}; call remove_sequence_parallel(model) first"
            )
        if plan is None:
            plan = getattr(model, "_sp_plan", None)
            if plan is None:
                raise ValueError(f"{cls} has no _sp_plan and no plan was given to apply_sequence_parallel")
        resolved = _resolve_plan(model, plan)
    except Exception as e:  # noqa: BLE001 - handed to every rank by _agree
        error = e
    _agree(error, config, f"apply_sequence_parallel({cls})")

    state = init_sequence_parallel(config)
    applied = _Applied(state=state, plan=plan, owner=cls)
    root_pre: list[Callable] = []
    root_post: list[Callable] = []
    try:
        for key, m, spec, sig in resolved:
            hooks: list[tuple[str, Callable]] = []
            if isinstance(spec, dict):
                # List-valued entries (a list/tuple argument) are inputs: vLLM-Omni allows them under str keys only.
                outs = {k: v for k, v in spec.items() if not isinstance(v, (list, tuple)) and v.split_output}
                ins = {k: v for k, v in spec.items() if k not in outs}
                if ins:
                    hooks.append(("pre", _make_split_pre_hook(applied, key, ins, sig)))
                if outs:
                    hooks.append(("post", _make_split_output_hook(applied, key, outs, sig)))
            else:
                specs = [spec] if isinstance(spec, SequenceParallelOutput) else list(spec)
                hooks.append(("post", _make_gather_hook(applied, key, specs)))
            for kind, hook in hooks:
                if m is model:
                    # The root's own splits and gathers run inside the forward wrapper, where the context lives.
                    (root_pre if kind == "pre" else root_post).append(hook)
                elif kind == "pre":
                    applied.handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    applied.handles.append(m.register_forward_hook(hook, with_kwargs=True))
        _wrap_forward(model, applied, root_pre, root_post)
    except BaseException:
        for h in applied.handles:
            h.remove()
        _unwrap_forward(model, applied)
        raise
    setattr(model, _APPLIED_ATTR, applied)
    return model


def _wrap_forward(model: nn.Module, applied: _Applied, root_pre: list[Callable], root_post: list[Callable]) -> None:
    """Give every forward its own context, set before the root's splits and reset however the forward
    ends: torch runs forward hooks marked always_call only on Exception, so a KeyboardInterrupt would
    leave a hook-managed context behind (and later attention would communicate).

    The wrapper is a method bound to the model, calling the previous forward on the module it is bound
    to: a deep copy of the model (an EMA copy, say) then runs its own weights, not the original's."""
    before = model.__dict__.get("forward")
    cls = type(model).__name__
    state = applied.state

    def previous(self: nn.Module) -> Callable:
        if before is None:
            return type(self).forward.__get__(self)
        return before.__func__.__get__(self) if isinstance(before, types.MethodType) else before

    @functools.wraps(type(model).forward if before is None else before)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        orig = previous(self)
        if applied.forward_wrapper is None:  # removed while someone else's wrapper sat on top of ours
            return orig(*args, **kwargs)
        state.raise_if_broken(f"{cls}.forward")
        with sp_forward_context(state):
            try:
                for hook in root_pre:
                    changed = hook(self, args, kwargs)
                    if changed is not None:
                        args, kwargs = changed
                output = orig(*args, **kwargs)
                for hook in root_post:
                    changed = hook(self, args, kwargs, output)
                    if changed is not None:
                        output = changed
                return output
            except BaseException as e:
                if state.sp_size > 1:
                    # Even before its first collective: the other ranks may already wait in one, and this rank's
                    # next forward would be matched against it.
                    state.mark_broken(f"{type(e).__name__} inside a forward of {cls}: {e}")
                raise

    applied.forward_before = before
    applied.forward_wrapper = types.MethodType(forward, model)
    model.forward = applied.forward_wrapper


def _unwrap_forward(model: nn.Module, applied: _Applied) -> None:
    wrapper, applied.forward_wrapper = applied.forward_wrapper, None
    if wrapper is None or model.__dict__.get("forward") is not wrapper:
        return  # not wrapped, or wrapped again on top of ours: ours is now a pass-through
    if applied.forward_before is None:
        del model.forward
    else:
        model.forward = applied.forward_before


def remove_sequence_parallel(model: nn.Module) -> nn.Module:
    """Remove every hook ``apply_sequence_parallel`` registered; the model runs exactly as before.

    After an error inside a sharded region the SP state is broken (its process groups may have seen
    a collective that another rank skipped); removing forgets that state, so the next apply builds
    fresh groups.
    """
    applied = getattr(model, _APPLIED_ATTR, None)
    if applied is None:
        raise ValueError(f"sequence parallelism is not applied to this {type(model).__name__}; nothing to remove")
    for h in applied.handles:
        h.remove()
    _unwrap_forward(model, applied)
    applied.state.release_buffers()
    if applied.state.broken is not None:
        parallel_state.discard_state(applied.state)
    delattr(model, _APPLIED_ATTR)
    return model


def is_sequence_parallel(model: nn.Module) -> bool:
    return getattr(model, _APPLIED_ATTR, None) is not None

