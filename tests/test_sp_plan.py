"""Plan types and validate_sp_plan: every malformed plan raises naming the offending key."""

from __future__ import annotations

import pytest
import torch.nn as nn

from sp_kernels import (
    SequenceParallelConfig,
    SequenceParallelInput,
    SequenceParallelJointInput,
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


# ---------------------------------------------------------------------------------------------
# vLLM-Omni's newer fields (clone_shard, shard_group) and list-valued input specs


def test_new_fields_have_vllm_omni_names_defaults_and_order():
    spec = SPI(1)
    assert (spec.clone_shard, spec.shard_group) == (False, None)
    assert SPO(1).shard_group is None
    # Positional order as in vLLM-Omni: split_dim, expected_dims, split_output, auto_pad, clone_shard, shard_group.
    full = SPI(1, 3, False, True, True, "video")
    assert (full.auto_pad, full.clone_shard, full.shard_group) == (True, True, "video")
    assert SPO(1, 3, "video") == SPO(gather_dim=1, expected_dims=3, shard_group="video")
    assert repr(SPI(1, shard_group="a")) == (
        "SequenceParallelInput(split_dim=1, expected_dims=None, split_output=False, auto_pad=False, "
        "clone_shard=False, shard_group='a')"
    )
    # PartialInput has no new fields in vLLM-Omni; keep it that way.
    assert not hasattr(SPP(1, text_len_source="txt_ids"), "shard_group")


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: SPI(1, clone_shard=1), TypeError, "SequenceParallelInput.clone_shard must be a bool, got 1"),
        (lambda: SPI(1, clone_shard="yes"), TypeError, "clone_shard must be a bool"),
        (lambda: SPI(1, shard_group=3), TypeError, "SequenceParallelInput.shard_group must be a str or None, got 3"),
        (lambda: SPI(1, shard_group=""), ValueError, "SequenceParallelInput.shard_group must be a non-empty name"),
        (lambda: SPO(1, shard_group=("a",)), TypeError, "SequenceParallelOutput.shard_group must be a str or None"),
        (lambda: SPO(1, shard_group=""), ValueError, "SequenceParallelOutput.shard_group must be a non-empty name"),
    ],
)
def test_new_field_type_checks(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_shard_group_plans_pass():
    # LTX-2-like: two sequences split under one key, each gathered by its own output with its group.
    validate_sp_plan(
        {
            "": {
                "hidden_states": SPI(1, expected_dims=3, auto_pad=True, shard_group="video"),
                "audio_hidden_states": SPI(1, expected_dims=3, auto_pad=True, shard_group="audio"),
            },
            # A group belongs to one split boundary: the rope, split at another key, takes another name.
            "rope": {
                0: SPI(1, expected_dims=3, split_output=True, auto_pad=True, shard_group="video_rope"),
                1: SPI(1, expected_dims=3, split_output=True, auto_pad=True),
            },
            "proj_out": SPO(1, expected_dims=3, shard_group="video"),
            "audio_proj_out": SPO(1, expected_dims=3, shard_group="audio"),
            "heads": [SPO(1, shard_group="video"), None, SPO(1, shard_group="audio")],
        }
    )
    # clone_shard alone needs nothing else (cosmos3-like).
    validate_sp_plan({"prep": {0: SPI(1, expected_dims=3, split_output=True, clone_shard=True)}})


@pytest.mark.parametrize(
    "plan, match",
    [
        (
            {"prep": {0: SPI(1, split_output=True, shard_group="image")}},
            "\\['prep'\\]\\[0\\]: shard_group='image' requires auto_pad=True",
        ),
        (
            {
                "a": {0: SPI(1, split_output=True, auto_pad=True, shard_group="image")},
                "b": {"x": SPI(1, auto_pad=True, shard_group="image")},
            },
            "\\['b'\\]\\['x'\\]: shard_group='image' is already used under _sp_plan\\['a'\\]",
        ),
        (
            {"": {"x": SPI(1, auto_pad=True, shard_group="video")}, "out": SPO(1, shard_group="vidoe")},
            "\\['out'\\]: SequenceParallelOutput\\(shard_group='vidoe'\\) gathers a group that no "
            "SequenceParallelInput of the plan declares \\(declared groups: \\['video'\\]\\)",
        ),
        (
            {"": {"x": SPI(1)}, "heads": [None, SPO(1, shard_group="g")]},
            "\\['heads'\\]\\[1\\]: SequenceParallelOutput\\(shard_group='g'\\)",
        ),
        (
            {"": {"rotary_emb": [SPI(0, auto_pad=False, shard_group="g")]}},
            "\\[''\\]\\['rotary_emb'\\]\\[0\\]: shard_group='g' requires auto_pad=True",
        ),
    ],
)
def test_shard_group_rules_name_the_key(plan, match):
    with pytest.raises(ValueError, match=match):
        validate_sp_plan(plan)


def test_same_group_twice_under_one_key_is_fine():
    # vLLM-Omni scopes a group to a split boundary (plan key), not to one spec.
    validate_sp_plan(
        {
            "prep": {
                0: SPI(1, split_output=True, auto_pad=True, shard_group="image"),
                1: SPI(0, split_output=True, auto_pad=True, shard_group="image"),
            },
            "blocks.*": {"mask": SPI(1, auto_pad=True, shard_group="blocks_mask")},
        }
    )


def test_list_valued_inputs_pass():
    validate_sp_plan(
        {
            "blocks.*": {
                # A tuple argument (cos, sin): element i is split by spec i.
                "image_rotary_emb": [SPI(0, expected_dims=2), SPI(0, expected_dims=2)],
            },
            "": {
                "hidden_states": SPI(1, expected_dims=3, auto_pad=True),
                "extras": (SPP(0, text_len_source="txt_ids", expected_dims=2), None, SPI(1, auto_pad=True)),
            },
            "proj_out": SPO(1, expected_dims=3),
        }
    )


@pytest.mark.parametrize(
    "plan, match",
    [
        ({"blk": {"rot": []}}, "\\['blk'\\]\\['rot'\\] is an empty list; expected one spec \\(or None\\) per element"),
        ({"blk": {"rot": ()}}, "\\['blk'\\]\\['rot'\\] is an empty tuple"),
        ({"blk": {"rot": [None, None]}}, "\\['blk'\\]\\['rot'\\] splits nothing: every element is None"),
        (
            {"blk": {0: [SPI(1, split_output=True)]}},
            "\\['blk'\\]\\[0\\]: an int key \\(output index\\) takes one spec with split_output=True, not a list",
        ),
        (
            {"blk": {"rot": [SPI(0), SPO(0)]}},
            "\\['blk'\\]\\['rot'\\]\\[1\\] must be a SequenceParallelInput, SequenceParallelPartialInput or None "
            "\\(element left alone\\), got SequenceParallelOutput",
        ),
        (
            {"blk": {"rot": [SPI(0), [SPI(0)]]}},
            "\\['blk'\\]\\['rot'\\]\\[1\\] must be .*got list \\(a list/tuple of specs cannot nest\\)",
        ),
        (
            {"blk": {"rot": [SequenceParallelJointInput()]}},
            "\\['blk'\\]\\['rot'\\]\\[0\\] must be .*got SequenceParallelJointInput",
        ),
        (
            {"blk": {"rot": [SPI(0), SPI(0, split_output=True)]}},
            "\\['blk'\\]\\['rot'\\]\\[1\\]: split_output=True is not allowed in a list of element specs",
        ),
        ({"blk": {"rot": [SPP(0, text_len_source="")]}}, "\\['blk'\\]\\['rot'\\]\\[0\\]: text_len_source is an empty"),
        (
            {"blk": [SPI(1), SPI(1)]},
            "\\['blk'\\] is a list; expected SequenceParallelOutput.*a list of input specs belongs inside the dict",
        ),
    ],
)
def test_malformed_list_inputs_name_the_key(plan, match):
    with pytest.raises(ValueError, match=match):
        validate_sp_plan(plan)


def test_instance_plan_is_read_like_ltx2():
    # LTX-2 builds its plan in __init__ (the class attribute is None); the instance attribute wins.
    class InstancePlan(nn.Module):
        _sp_plan = None

        def __init__(self):
            super().__init__()
            self._sp_plan = {"": {"x": SPI(1)}, "proj_out": SPO(1)}

    assert get_sp_plan_from_model(InstancePlan()) == {"": {"x": SPI(1)}, "proj_out": SPO(1)}
