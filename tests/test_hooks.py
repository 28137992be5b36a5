"""Single-process hook tests: key resolution, apply/remove round trip, bad input, world size 1."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
import torch.nn as nn

import sp_kernels
from sp_kernels import (
    SequenceParallelConfig,
    apply_sequence_parallel,
    is_sequence_parallel,
    remove_sequence_parallel,
)
from sp_kernels.plan.hooks import _resolve_key
from tests.plan_models import SPI, SPO, SPP, TinyDiT, build, make_inputs


def _hook_state(model: nn.Module) -> dict:
    """Every hook dict of every module, by identity of the hook functions."""
    out = {}
    for name, m in model.named_modules():
        out[name] = tuple(
            tuple(getattr(m, attr).keys())
            for attr in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                         "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
        ) + (type(m).forward is m.forward.__func__ if hasattr(m.forward, "__func__") else False,)
    return out


def test_resolve_every_key_form():
    model = build("wrapped")
    inner = model.inner
    assert _resolve_key(model, "") == [model]
    assert _resolve_key(model, "inner.blocks.0") == [inner.blocks[0]]
    assert _resolve_key(model, "inner.blocks.*") == list(inner.blocks)
    assert _resolve_key(model, "inner.blocks.*.norm") == [b.norm for b in inner.blocks]
    root = build("root")
    assert _resolve_key(root, "heads.main") == [root.heads["main"]]
    assert _resolve_key(root, "blocks.*.rope") == [b.rope for b in root.blocks]


@pytest.mark.parametrize(
    "key, match",
    [
        ("inner.blocks.7", "'inner.blocks.7': inner.blocks \\(ModuleList\\) has no submodule '7'; its submodules are \\['0', '1'\\]"),
        ("inner.nope", "'inner.nope': inner \\(TinyDiT\\) has no submodule 'nope'"),
        ("inner.*", "'inner.\\*': '\\*' needs a ModuleList, but inner is a TinyDiT"),
        ("inner.blocks.0.mlp.9", "has no submodule '9'"),
    ],
)
def test_resolve_errors_name_the_key(key, match):
    with pytest.raises(ValueError, match=match):
        _resolve_key(build("wrapped"), key)


def test_world_size_one_matches_plain_model_and_remove_restores():
    torch.manual_seed(0)
    model = build("dit")
    inputs = make_inputs("dit", seq=13)
    before = _hook_state(model)
    ref = model(**inputs)[0]
    assert apply_sequence_parallel(model) is model
    assert is_sequence_parallel(model)
    assert _hook_state(model) != before
    out = model(**inputs)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    remove_sequence_parallel(model)
    assert not is_sequence_parallel(model)
    assert _hook_state(model) == before
    torch.testing.assert_close(model(**inputs)[0], ref, rtol=0, atol=0)
    # Apply again after remove works.
    apply_sequence_parallel(model, SequenceParallelConfig())
    remove_sequence_parallel(model)
    assert _hook_state(model) == before


def test_apply_twice_and_remove_unapplied():
    model = build("dit")
    apply_sequence_parallel(model)
    with pytest.raises(RuntimeError, match="already applied to this TinyDiT; call remove_sequence_parallel"):
        apply_sequence_parallel(model)
    remove_sequence_parallel(model)
    with pytest.raises(ValueError, match="not applied to this TinyDiT"):
        remove_sequence_parallel(model)


@pytest.mark.parametrize(
    "plan, exc, match",
    [
        (None, ValueError, "Linear has no _sp_plan and no plan was given"),
        ({"blocks.9": SPO(1)}, ValueError, "'blocks.9': blocks \\(ModuleList\\) has no submodule '9'"),
        ({"blocks.0": {"hidden": SPI(1)}}, ValueError,
         "_sp_plan\\['blocks.0'\\] names parameter 'hidden', but Block.forward takes "
         "\\['hidden_states', 'cos', 'sin', 'temb'\\]"),
        ({"blocks.0": {"hidden_states": SPP(1, text_len_source="txt")}}, ValueError,
         "reads text_len_source 'txt', but Block.forward takes"),
        ({"blocks.0": {"hidden_states": SPI(1)}, "blocks.*": {"cos": SPI(1)}}, ValueError,
         "keys 'blocks.0' and 'blocks.\\*' both split the inputs of the same Block"),
        ({"rope": {0: SPI(1)}}, ValueError, "TinyDiT: _sp_plan\\['rope'\\]\\[0\\]: an int key"),
        ({"": SPO(1)}, ValueError, None),  # valid plan, but the config below is bad
    ],
)
def test_failed_apply_leaves_model_untouched(plan, exc, match):
    model = nn.Linear(2, 2) if match and "Linear" in match else build("dit")
    before = _hook_state(model)
    config = SequenceParallelConfig(ulysses_degree=2) if match is None else None
    with pytest.raises(RuntimeError if match is None else exc, match=match or "needs 2 ranks, but torch.distributed"):
        apply_sequence_parallel(model, config, plan)
    assert _hook_state(model) == before
    assert not is_sequence_parallel(model)


def test_bad_config_type():
    with pytest.raises(TypeError, match="config must be a SequenceParallelConfig, got dict"):
        apply_sequence_parallel(build("dit"), {"ulysses_degree": 1})  # type: ignore[arg-type]


def test_expected_dims_warns_once_and_strict_raises(caplog):
    model = build("dit")
    plan = {"blocks.*": {"hidden_states": SPI(1, expected_dims=4)}}
    apply_sequence_parallel(model, SequenceParallelConfig(), plan)
    inputs = make_inputs("dit", seq=8)
    with caplog.at_level(logging.WARNING, logger="sp_kernels"):
        model(**inputs)
        model(**inputs)
    msgs = [r.getMessage() for r in caplog.records if "expected a tensor with 4 dims" in r.getMessage()]
    assert len(msgs) == 1, msgs
    assert "_sp_plan['blocks.*']['hidden_states']: expected a tensor with 4 dims, got 3 dims (shape (2, 8, 16))" in msgs[0]
    remove_sequence_parallel(model)

    apply_sequence_parallel(model, SequenceParallelConfig(strict_dims=True), plan)
    with pytest.raises(ValueError, match="got 3 dims \\(shape \\(2, 8, 16\\)\\) and SequenceParallelConfig\\(strict_dims=True\\)"):
        model(**inputs)
    remove_sequence_parallel(model)
    assert not is_sequence_parallel(model)


def test_bad_runtime_values_name_key_and_parameter():
    model = build("dit")
    apply_sequence_parallel(model, plan={"blocks.0": {"temb": SPI(1)}})
    with pytest.raises(ValueError, match="_sp_plan\\['blocks.0'\\]\\['temb'\\]: split_dim=1 is out of range for shape \\(2,\\)"):
        model(x=torch.randn(2, 5, 4, dtype=torch.float64), temb=torch.randn(2, 16, dtype=torch.float64)[:, 0])
    remove_sequence_parallel(model)

    apply_sequence_parallel(model, plan={"rope": {3: SPI(1, split_output=True)}})
    with pytest.raises(ValueError, match="_sp_plan\\['rope'\\]\\[3\\]: output index out of range; the module returned tuple with 2 item"):
        model(**make_inputs("dit", 6))
    remove_sequence_parallel(model)

    apply_sequence_parallel(model, plan={"proj_out": [SPO(1), SPO(1)]})
    with pytest.raises(ValueError, match="_sp_plan\\['proj_out'\\] lists 2 outputs to gather, but the module returned Tensor"):
        model(**make_inputs("dit", 6))
    remove_sequence_parallel(model)


def test_parameter_hidden_in_star_args_raises():
    """A planned module wrapped as forward(*args, **kwargs) (e.g. compiled before apply) cannot show whether
    the planned parameter came positionally: raised, naming key and parameter, instead of leaving it unsharded."""

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    model = nn.Sequential(Wrapped())
    apply_sequence_parallel(model, plan={"0": {"hidden_states": SPI(1)}})
    x = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match=r"_sp_plan\['0'\]\['hidden_states'\]: Wrapped.forward takes \*args and got 1"):
        model(x)
    remove_sequence_parallel(model)


def test_context_is_per_forward_and_reset_on_exception():
    from sp_kernels.plan.context import running_context

    model = build("dit")
    apply_sequence_parallel(model)
    assert running_context() is None
    with pytest.raises(RuntimeError):
        model(x=torch.randn(2, 5, 3, dtype=torch.float64), temb=torch.randn(2, 16, dtype=torch.float64))
    assert running_context() is None
    model(**make_inputs("dit", 5))
    assert running_context() is None
    remove_sequence_parallel(model)


def test_top_level_exports():
    for name in (
        "SequenceParallelInput", "SequenceParallelOutput", "SequenceParallelPartialInput", "validate_sp_plan",
        "get_sp_plan_from_model", "sp_shard", "sp_gather", "sp_shard_with_padding", "SequenceParallelConfig",
        "init_sequence_parallel", "apply_sequence_parallel", "remove_sequence_parallel", "build_info",
    ):
        assert hasattr(sp_kernels, name), name
    assert TinyDiT._sp_plan["proj_out"].gather_dim == 1


def test_sharding_without_distributed_is_identity():
    x = torch.randn(2, 7, 3)
    assert sp_kernels.sp_shard(x, 1) is x
    shard, pad = sp_kernels.sp_shard_with_padding(x, 1)
    assert shard is x and pad == 0
    assert sp_kernels.sp_gather(x, 1) is x
    with pytest.raises(ValueError, match="sp_shard: dim=3 is out of range for a tensor of shape \\(2, 7, 3\\)"):
        sp_kernels.sp_shard(x, 3)


def test_deep_copy_of_an_applied_model_runs_its_own_weights():
    """The forward wrapper is bound to the module it sits on: a deep copy (an EMA copy, say) must not
    call the original's forward."""
    import copy

    class M(nn.Module):
        _sp_plan = {"": {"x": SPI(1)}, "lin": SPO(1)}

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x, scale: float = 1.0):
            return self.lin(x) * scale

    model = M()
    apply_sequence_parallel(model, SequenceParallelConfig())
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lin.weight.zero_()
        clone.lin.bias.zero_()
        x = torch.randn(1, 4, 3)
        assert model(x).abs().sum() > 0 and torch.equal(clone(x), torch.zeros(1, 4, 3))
    assert list(inspect.signature(model.forward).parameters) == ["x", "scale"]
    remove_sequence_parallel(model)
    assert "forward" not in model.__dict__
