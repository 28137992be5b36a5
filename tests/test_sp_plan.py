"""Plan types and validate_sp_plan: every malformed plan raises naming the offending key."""

from __future__ import annotations

import pytest
import torch.nn as nn

from sp_kernels import (
    SequenceParallelConfig,
    SequenceParallelInput,
    SequenceParallelOutput,
    SequenceParallelPartialInput,
    get_sp_plan_from_model,
    validate_sp_plan,
)

SPI, SPO, SPP = SequenceParallelInput, SequenceParallelOutput, SequenceParallelPartialInput


def test_valid_plans_pass():
    validate_sp_plan({})
    validate_sp_plan(
        {
            "": {"hidden_states": SPI(1, expected_dims=3, auto_pad=True)},
            "rope": {0: SPI(1, expected_dims=4, split_output=True), 1: SPI(1, 4, True)},
            "blocks.0": {"x": SPI(1)},
            "blocks.*.attn": {"y": SPP(1, text_len_source="enc")},
            "outputs.main": SPO(1, expected_dims=3),
            "proj": [SPO(1), None],
            "unified": {0: SPP(1, text_len_source=7, split_output=True)},
        }
    )


def test_dataclasses_are_frozen_and_keep_vllm_omni_names():
    spec = SPI(split_dim=1, expected_dims=3, split_output=False, auto_pad=True)
    with pytest.raises(AttributeError):
        spec.split_dim = 2  # type: ignore[misc]
    assert SPO(gather_dim=1, expected_dims=3).gather_dim == 1
    assert SPP(split_dim=1, text_len_source="txt", expected_dims=3, split_output=False).text_len_source == "txt"


@pytest.mark.parametrize(
    "plan, match",
    [
        ([("a", SPO(1))], "must be a dict"),
        ({1: SPO(1)}, "keys must be strings"),
        ({"blocks..0": SPO(1)}, "'blocks..0' has an empty path component"),
        ({"blocks.*.*": SPO(1)}, "'blocks.\\*.\\*': '\\*' may appear once"),
        ({"blocks.a*": SPO(1)}, "'blocks.a\\*': '\\*' may appear once"),
        ({"rope": {0: SPI(1)}}, "\\['rope'\\]\\[0\\]: an int key .* requires split_output=True"),
        ({"rope": {"x": SPI(1, split_output=True)}}, "\\['rope'\\]\\['x'\\]: split_output=True .* needs an int key"),
        ({"rope": {-1: SPI(1, split_output=True)}}, "output index must be >= 0"),
        ({"blk": {"x": SPO(1)}}, "\\['blk'\\]\\['x'\\] must be a SequenceParallelInput.*outputs are gathered"),
        ({"blk": {}}, "\\['blk'\\] is an empty dict"),
        ({"blk": {1.5: SPI(1)}}, "inner keys must be parameter names"),
        ({"proj": [None, None]}, "\\['proj'\\] gathers nothing"),
        ({"proj": [SPI(1)]}, "\\['proj'\\] is a list; expected SequenceParallelOutput"),
        ({"proj": "gather"}, "\\['proj'\\] must be a dict of inputs or a SequenceParallelOutput"),
    ],
)
def test_invalid_plans_name_the_key(plan, match):
    with pytest.raises(ValueError, match=match):
        validate_sp_plan(plan)


def test_spec_field_checks():
    with pytest.raises(TypeError, match="split_dim must be an int"):
        SPI("1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split_dim=3 is out of range for expected_dims=3"):
        SPI(3, expected_dims=3)
    with pytest.raises(ValueError, match="gather_dim=-4 is out of range for expected_dims=3"):
        SPO(-4, expected_dims=3)
    with pytest.raises(TypeError, match="text_len_source must be a parameter name or an int >= 0"):
        SPP(1, text_len_source=-2)
    with pytest.raises(TypeError, match="text_len_source"):
        SPP(1, text_len_source=None)  # type: ignore[arg-type]


def test_get_sp_plan_from_model():
    class WithPlan(nn.Module):
        _sp_plan = {"": {"x": SPI(1)}}

    class BadPlan(nn.Module):
        _sp_plan = {"": {"x": SPO(1)}}

    assert get_sp_plan_from_model(WithPlan()) == WithPlan._sp_plan
    assert get_sp_plan_from_model(nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="BadPlan._sp_plan is invalid: _sp_plan\\[''\\]\\['x'\\]"):
        get_sp_plan_from_model(BadPlan())


def test_config_checks():
    cfg = SequenceParallelConfig(ulysses_degree=2, ring_degree=3)
    assert cfg.sequence_parallel_size == 6
    assert cfg.resolved_backend() == "usp"
    assert SequenceParallelConfig(ulysses_degree=4).resolved_backend() == "ulysses"
    assert SequenceParallelConfig(ring_degree=4).resolved_backend() == "fused_ring"
    assert SequenceParallelConfig().resolved_backend() == "local"
    with pytest.raises(ValueError, match="ulysses_degree must be an int >= 1, got 0"):
        SequenceParallelConfig(ulysses_degree=0)
    with pytest.raises(ValueError, match="ring_degree must be an int >= 1, got 2.0"):
        SequenceParallelConfig(ring_degree=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attention_backend='flash' is not a known backend"):
        SequenceParallelConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="'ulysses' needs ring_degree == 1 .*use 'usp'"):
        SequenceParallelConfig(ulysses_degree=2, ring_degree=2, attention_backend="ulysses")
    with pytest.raises(ValueError, match="'ring' needs ulysses_degree == 1"):
        SequenceParallelConfig(ulysses_degree=2, attention_backend="ring")
    with pytest.raises(ValueError, match="'local' cannot run a sharded sequence"):
        SequenceParallelConfig(ulysses_degree=2, attention_backend="local")
