"""checkpoint.py: the one writer and reader of the checkpoint folder, and the one architecture comparison."""

import dataclasses
import json
import typing

import pytest
import torch

import checkpoint
import train
from checkpoint import CheckpointError, architecture_differences
from olmpool import ModelConfig, Transformer, preset

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> ModelConfig:
    return preset("H_post_LQK_32kv_8k_11k_SWA", "tiny", vocab_size=256, **overrides)


def test_a_saved_model_loads_back_bit_for_bit_with_its_config(tmp_path):
    model = Transformer(tiny(window=64), seed=3)
    checkpoint.save_model(model, tmp_path / "ours")
    back = checkpoint.load_model(tmp_path / "ours")
    assert back.config == model.config
    for (name, mine), (other, loaded) in zip(model.state_dict().items(), back.state_dict().items()):
        assert name == other and torch.equal(mine, loaded), name
    assert checkpoint.load_model(tmp_path / "ours", attention_backend="naive").config.attention_backend == "naive"


def test_read_config_refuses_a_hugging_face_config_and_unknown_fields_naming_the_fix(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="is a Hugging Face config.*hf_interop"):
        checkpoint.read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64, "flux_capacitor": 1}))
    with pytest.raises(CheckpointError, match="unknown ModelConfig field.*flux_capacitor"):
        checkpoint.read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64}))  # a field added later takes its default
    assert checkpoint.read_config(tmp_path) == dataclasses.replace(ModelConfig(), d_model=64)


def test_newest_checkpoint_is_the_highest_step_holding_the_model_files(tmp_path):
    model = Transformer(tiny(), seed=0)
    for step in (2, 10):
        checkpoint.save_model(model, checkpoint.step_folder(tmp_path, step))
    (checkpoint.step_folder(tmp_path, 30)).mkdir()  # no model files: not a checkpoint
    assert checkpoint.newest_checkpoint(tmp_path).name == "step_0000010"
    assert checkpoint.newest_checkpoint(tmp_path / "step_0000002").name == "step_0000002"
    assert checkpoint.newest_checkpoint(tmp_path / "step_0000030") is None


def test_a_layer_pattern_spelled_two_ways_is_one_architecture():
    two_layers = dict(n_layers=2, window=64)
    assert architecture_differences(tiny(**two_layers, global_every=2), tiny(**two_layers, global_every=4)) == []
    assert architecture_differences(tiny(window=64), tiny(window=32)) == ["window"]


def test_rope_spellings_differ_field_by_field_but_not_by_function():
    abf = tiny(rope_scaling="abf", rope_factor=16.0, rope_scaling_layers="all")
    base = tiny(rope_theta=abf.rope_theta * 16)
    assert set(architecture_differences(abf, base)) == {"rope_theta", "rope_scaling", "rope_factor",
                                                         "rope_scaling_layers"}  # resume is strict
    assert architecture_differences(abf, base, by_function=True) == []  # an export read back computes the same


def test_by_function_counts_a_context_length_that_moves_yarn_even_if_allowed():
    yarn = tiny(rope_scaling="yarn", rope_factor=8.0)
    longer = dataclasses.replace(yarn, context_length=4 * yarn.context_length)  # YaRN stretches from it
    assert architecture_differences(yarn, longer, ("context_length",), by_function=True) == ["context_length"]
    plain = tiny()
    assert architecture_differences(plain, dataclasses.replace(plain, context_length=1024), by_function=True) == []
    assert architecture_differences(yarn, longer, ("context_length",)) == []  # field by field: allowed is allowed


def test_every_model_flag_parses_the_type_its_field_declares():
    hints = typing.get_type_hints(ModelConfig)
    parser = train.build_parser()
    actions = {action.dest: action for action in parser._actions}
    for field in dataclasses.fields(ModelConfig):
        declared = hints[field.name]
        options = typing.get_args(declared)
        base = next(o for o in options if o is not type(None)) if options else declared
        parse = actions[field.name].type
        sample = {int: "3", float: "2.5", str: (field.default if isinstance(field.default, str) else "x")}[base]
        if base is float:
            assert parse(sample) == 2.5, field.name  # a float field written with an int default still takes 2.5
        else:
            assert parse(sample) == base(sample), field.name
        if type(None) in options:
            assert parse("none") is None, field.name
