"""Hugging Face interop: our logits equal transformers' for the same weights, into our code and out of it.

Every model is a tiny random one built here with transformers' own classes (nothing is downloaded).
Every parameter, norm gains included, is randomized so that a swapped norm or projection shows.
"""

import json
import shutil

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Olmo2Config, Olmo2ForCausalLM,
                          Olmo3Config, Olmo3ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import hf_export
import hf_interop
from checkpoint import architecture_differences, load_model, save_model
from hf_export import export_hf
from hf_interop import CheckpointError, load_hf, summary
from olmpool import Transformer, preset

# GQA (4 query heads, 2 kv heads), sequences of 24 tokens against windows of 5.
SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=32, rms_norm_eps=1e-6)
WINDOW = 5
L, G = "sliding_attention", "full_attention"
TOKENS = torch.randint(0, SHAPE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # logits are of order 1-3; measured differences are below 6e-6


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(model, seed=0):
    """Every parameter random: matrices N(0, 0.1), norm gains 1 + N(0, 0.2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if param.ndim == 1 else 0.1 * noise)
    return model.eval()


def hf_model(config_class, model_class, **overrides):
    """A random tiny transformers model, with eager attention: an explicit mask and softmax."""
    config = config_class(**(SHAPE | overrides))
    return randomize(model_class._from_config(config, attn_implementation="eager"))


def saved(model, path, **save_options):
    model.save_pretrained(path, safe_serialization=True, **save_options)
    return path


def edit_config(directory, **changes):
    """Rewrite config.json: a key set to None is deleted."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return directory


def relabel(source, target, model_type):
    """An OlmPool custom checkpoint: a stock folder whose config.json names a custom model_type."""
    shutil.copytree(source, target)
    return edit_config(target, model_type=model_type, architectures=[f"{model_type}ForCausalLM"])


def logits_of(model):
    with torch.no_grad():
        out = model(TOKENS)
    return getattr(out, "logits", out)


def assert_same_logits(ours, theirs):
    torch.testing.assert_close(logits_of(ours), logits_of(theirs), **TOLERANCE)


def reorder_blocks(model, order):
    """transformers' own attention, MLP and norms, composed as a `order` ("pre" | "post") block: the
    reference for OlmPool's custom classes, which no stock class computes. The first norm of a
    block belongs to attention, the second to the MLP, under either naming."""
    for layer in model.model.layers:
        if hasattr(layer, "input_layernorm"):
            first, second = layer.input_layernorm, layer.post_attention_layernorm
        else:
            first, second = layer.post_attention_layernorm, layer.post_feedforward_layernorm

        def forward(x, attention_mask=None, position_embeddings=None, layer=layer, first=first, second=second,
                    **kwargs):
            def attend(h):
                return layer.self_attn(hidden_states=h, attention_mask=attention_mask,
                                       position_embeddings=position_embeddings, **kwargs)[0]
            if order == "pre":
                h = x + attend(first(x))
                return h + layer.mlp(second(h))
            h = x + first(attend(x))
            return h + second(layer.mlp(h))

        layer.forward = forward
    return model


# Stock classes: raised theta, GQA, windows shorter than the sequence, YaRN, llama3 scaling.
OLMO3_ROPE = {G: {"rope_type": "default", "rope_theta": 8e6}, L: {"rope_type": "default", "rope_theta": 5e5}}
OLMO3_YARN = {G: {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "original_max_position_embeddings": 16},
              L: {"rope_type": "default", "rope_theta": 5e5}}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
THETA_8M, THETA_1M = ({"rope_type": "default", "rope_theta": theta} for theta in (8e6, 1e6))
STOCK = {
    "llama_theta_8M": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters=THETA_8M)),
    "llama_llama3_scaling": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters=LLAMA3)),
    "llama_linear_scaling": (LlamaConfig, LlamaForCausalLM,
                             dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0})),
    "qwen3_theta_1M": (Qwen3Config, Qwen3ForCausalLM, dict(rope_parameters=THETA_1M)),
    "qwen3_windows": (Qwen3Config, Qwen3ForCausalLM,
                      dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=[L, L, L, G])),
    "olmo2_theta_8M": (Olmo2Config, Olmo2ForCausalLM, dict(rope_parameters=THETA_8M)),
    "olmo3_windows_theta_per_type": (Olmo3Config, Olmo3ForCausalLM,
                                     dict(sliding_window=WINDOW, rope_parameters=OLMO3_ROPE)),
    "olmo3_windows_yarn_on_full_layers": (Olmo3Config, Olmo3ForCausalLM,
                                          dict(sliding_window=WINDOW, rope_parameters=OLMO3_YARN)),
}


@pytest.mark.parametrize("case", STOCK)
def test_stock_checkpoint_imports_with_transformers_logits(tmp_path, case):
    config_class, model_class, overrides = STOCK[case]
    theirs = hf_model(config_class, model_class, **overrides)
    ours, text = load_hf(saved(theirs, tmp_path / "hf"))
    assert_same_logits(ours, theirs)
    assert "none: everything read from config.json" in text


def test_olmo3_import_reads_windows_per_layer_theta_and_global_yarn(tmp_path):
    theirs = hf_model(Olmo3Config, Olmo3ForCausalLM, sliding_window=WINDOW, rope_parameters=OLMO3_YARN | {
        L: {"rope_type": "default", "rope_theta": 1e4}})
    ours, text = load_hf(saved(theirs, tmp_path / "hf"))
    config = ours.config
    assert (config.window, config.global_every, config.layer_windows) == (WINDOW, 4, [WINDOW] * 3 + [None])
    assert (config.rope_theta, config.rope_theta_local) == (5e5, 1e4)
    assert (config.rope_scaling, config.rope_factor, config.rope_scaling_layers, config.original_context) == (
        "yarn", 4.0, "global", 16)
    assert "yarn x4 on global layers from 16" in text
    assert_same_logits(ours, theirs)


def test_sharded_checkpoint_and_the_naive_backend_give_the_same_logits(tmp_path):
    theirs = hf_model(Olmo3Config, Olmo3ForCausalLM, sliding_window=WINDOW, rope_parameters=OLMO3_YARN)
    directory = saved(theirs, tmp_path / "hf", max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").is_file()
    ours, text = load_hf(directory, attention_backend="naive")
    assert "shards" in text
    assert_same_logits(ours, theirs)


def test_tied_embeddings_are_copied_into_lm_head(tmp_path):
    theirs = hf_model(LlamaConfig, LlamaForCausalLM, tie_word_embeddings=True)
    ours, text = load_hf(saved(theirs, tmp_path / "hf"))
    assert torch.equal(ours.lm_head.weight, ours.embed.weight)
    assert ours.lm_head.weight.data_ptr() != ours.embed.weight.data_ptr()  # a copy, not a shared tensor
    assert "tie_word_embeddings: lm_head copied from model.embed_tokens" in text
    assert_same_logits(ours, theirs)


def test_dtype_none_keeps_the_stored_dtype(tmp_path):
    theirs = hf_model(Qwen3Config, Qwen3ForCausalLM).to(torch.bfloat16)
    ours, text = load_hf(saved(theirs, tmp_path / "hf"), dtype=None)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert "stored bfloat16, loaded bfloat16" in text


# ----------------------------------------------------------------------------------------------
# OlmPool's custom classes: read from their names, checked against transformers' modules


def test_olmo3_preorder_headwise_qknorm_equals_stock_qwen3_with_windows(tmp_path):
    theirs = hf_model(Qwen3Config, Qwen3ForCausalLM, use_sliding_window=True, sliding_window=WINDOW,
                      layer_types=[L, L, L, G])
    directory = relabel(saved(theirs, tmp_path / "qwen3"), tmp_path / "custom", "olmo3_preorder_headwise_qknorm")
    ours, text = load_hf(directory)
    assert (ours.config.norm_placement, ours.config.qk_norm, ours.config.window) == ("pre", "headwise", WINDOW)
    assert "OlmPool custom class" in text and "Llama norm names" in text
    assert_same_logits(ours, theirs)


CUSTOM = {  # model_type: (stock class it is built from, its overrides, block order, switches expected)
    "olmo3_preorder": (Olmo3Config, Olmo3ForCausalLM, dict(sliding_window=WINDOW), "pre", ("pre", "layerwise")),
    "llama3_qknorm": (Olmo2Config, Olmo2ForCausalLM, {}, "pre", ("pre", "layerwise")),
    "olmo2_headwise_qknorm": (Qwen3Config, Qwen3ForCausalLM, {}, "post", ("post", "headwise")),
    "llama3_reordered": (LlamaConfig, LlamaForCausalLM, {}, "post", ("post", "none")),
}


@pytest.mark.parametrize("model_type", CUSTOM)
def test_custom_model_type_equals_transformers_modules_in_its_block_order(tmp_path, model_type):
    config_class, model_class, overrides, order, switches = CUSTOM[model_type]
    theirs = hf_model(config_class, model_class, **overrides)
    directory = relabel(saved(theirs, tmp_path / "stock"), tmp_path / "custom", model_type)
    ours, text = load_hf(directory)
    assert (ours.config.norm_placement, ours.config.qk_norm) == switches
    assert f"model_type '{model_type}' is an OlmPool custom class" in text
    assert_same_logits(ours, reorder_blocks(theirs, order))


# ----------------------------------------------------------------------------------------------
# The release's pitfalls and the overrides for them


def olmo3_folder(tmp_path, **overrides):
    theirs = hf_model(Olmo3Config, Olmo3ForCausalLM, **({"sliding_window": WINDOW} | overrides))
    return theirs, saved(theirs, tmp_path / "hf")


def same_weights_as(model, config_class, model_class, **overrides):
    """A transformers model with another config and `model`'s weights."""
    other = model_class._from_config(config_class(**(SHAPE | overrides)), attn_implementation="eager")
    other.load_state_dict(model.state_dict())
    return other.eval()


def test_flat_rope_theta_beside_per_type_values_wins_on_every_layer(tmp_path):
    theirs, directory = olmo3_folder(tmp_path)  # rope_parameters: 500000 on both layer types
    edit_config(directory, rope_theta=8_000_000)
    ours, text = load_hf(directory)
    assert (ours.config.rope_theta, ours.config.rope_theta_local) == (8e6, None)
    assert "flat rope_theta 8e+06 disagrees with rope_parameters.full_attention.rope_theta 500000" in text
    reference = same_weights_as(theirs, Olmo3Config, Olmo3ForCausalLM, sliding_window=WINDOW,
                                rope_parameters={G: {"rope_type": "default", "rope_theta": 8e6},
                                                 L: {"rope_type": "default", "rope_theta": 8e6}})
    assert_same_logits(ours, reference)


def test_flat_rope_theta_alone_reaches_sliding_layers_too(tmp_path):
    _, directory = olmo3_folder(tmp_path)
    edit_config(directory, rope_parameters=None, rope_theta=8_000_000)
    ours, text = load_hf(directory)
    assert (ours.config.rope_theta, ours.config.rope_theta_local) == (8e6, None)
    assert "applied to sliding layers too (transformers' Olmo3Config would use 500000 there)" in text


def test_missing_layer_types_assume_three_local_one_global(tmp_path):
    theirs, directory = olmo3_folder(tmp_path)
    edit_config(directory, layer_types=None)
    ours, text = load_hf(directory)
    assert "layer_types missing: assumed 3 local : 1 global, last layer global" in text
    assert_same_logits(ours, theirs)  # transformers' default for 4 layers is the same pattern


def test_sliding_window_in_a_llama_config_is_applied_and_reported(tmp_path):
    theirs = hf_model(LlamaConfig, LlamaForCausalLM)
    directory = edit_config(saved(theirs, tmp_path / "hf"), sliding_window=WINDOW)
    ours, text = load_hf(directory)
    assert ours.config.layer_windows == [WINDOW] * 3 + [None]
    assert "which transformers' LlamaForCausalLM ignores; applied here" in text
    ours, text = load_hf(directory, window=0)
    assert ours.config.window is None and "window overridden: none" in text
    assert_same_logits(ours, theirs)


def test_theta_override_takes_effect_and_is_reported(tmp_path):
    theirs, directory = olmo3_folder(tmp_path)
    ours, text = load_hf(directory, rope_theta=8e6)
    assert "rope_theta overridden: 8e+06 on every layer" in text and "RoPE theta 8e+06" in text
    reference = same_weights_as(theirs, Olmo3Config, Olmo3ForCausalLM, sliding_window=WINDOW,
                                rope_parameters={G: {"rope_type": "default", "rope_theta": 8e6},
                                                 L: {"rope_type": "default", "rope_theta": 8e6}})
    assert_same_logits(ours, reference)


@pytest.mark.parametrize("window, layer_types", [(3, [L, L, L, G]), (0, [G, G, G, G])])
def test_window_override_takes_effect_and_is_reported(tmp_path, window, layer_types):
    theirs, directory = olmo3_folder(tmp_path)
    ours, text = load_hf(directory, window=window)
    assert f"window overridden: {window or 'none'} (config.json: {WINDOW})" in text
    reference = same_weights_as(theirs, Olmo3Config, Olmo3ForCausalLM, sliding_window=window or 32,
                                layer_types=layer_types)
    assert_same_logits(ours, reference)


def test_norm_override_reads_a_mislabelled_post_norm_model(tmp_path):
    theirs = hf_model(LlamaConfig, LlamaForCausalLM)
    ours, text = load_hf(saved(theirs, tmp_path / "hf"), norm_placement="post")
    assert "norm_placement overridden: post (model_type 'llama' says pre)" in text and "norm post" in text
    assert_same_logits(ours, reorder_blocks(theirs, "post"))


def test_irregular_layer_types_fail_naming_the_pattern_unless_global_every_is_given(tmp_path):
    _, directory = olmo3_folder(tmp_path, layer_types=[L, G, L, G])
    edit_config(directory, layer_types=[L, G, L, L])
    with pytest.raises(CheckpointError, match=r"layer_types has global layers \[1\] \(pattern LGLL.*global_every"):
        load_hf(directory)
    ours, text = load_hf(directory, global_every=2)
    assert ours.config.layer_windows == [WINDOW, None, WINDOW, None] and "global_every overridden: 2" in text


# ----------------------------------------------------------------------------------------------
# Export: transformers loads what we write, with our logits; and back again, bit for bit


def ours(name, **overrides):
    return randomize(Transformer(preset(name, size="tiny", vocab_size=97, **overrides)))


EXPORTS = {  # id: (preset, overrides, model_type asked for, model_type written)
    "llama": ("G_pre_8kv_8k_14k", {}, None, "llama"),
    "llama_llama3_scaling": ("G_pre_8kv_8k_14k", dict(rope_scaling="llama3", rope_factor=8.0, rope_theta=1e4,
                                                       rope_original_context=16), None, "llama"),
    "llama_pi": ("G_pre_8kv_8k_14k", dict(rope_scaling="pi", rope_factor=4.0), None, "llama"),
    "qwen3": ("K_post_HQK_8kv_12k", dict(rope_theta=1e6), None, "qwen3"),
    "qwen3_windows_abf_all": ("K_post_HQK_8kv_12k", dict(window=WINDOW, rope_scaling="abf", rope_factor=16.0,
                                                         rope_scaling_layers="all"), None, "qwen3"),
    "olmo2_abf": ("B_post_LQK_32kv_4k_11k", dict(rope_scaling="abf", rope_factor=16.0), None, "olmo2"),
    "olmo3_without_windows": ("B_post_LQK_32kv_4k_11k", {}, "olmo3", "olmo3"),
    "olmo3_yarn_global": ("H_post_LQK_32kv_8k_11k_SWA", dict(window=WINDOW, context_length=64, rope_scaling="yarn",
                                                             rope_factor=4.0, rope_original_context=16), None, "olmo3"),
    "olmo3_abf_all_local_theta": ("C_post_LQK_8kv_8k_13k_SWA", dict(window=WINDOW, rope_scaling="abf", rope_factor=16.0,
                                                                    rope_scaling_layers="all", rope_theta_local=1e4),
                                  None, "olmo3"),
}


@pytest.mark.parametrize("case", EXPORTS)
def test_export_loads_in_transformers_with_our_logits_and_imports_back_bit_for_bit(tmp_path, case):
    name, overrides, asked, written = EXPORTS[case]
    model = ours(name, **overrides)
    export_hf(model, tmp_path / "hf", model_type=asked)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == written
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager", dtype=torch.float32)
    assert type(theirs).__name__ == hf_interop.STOCK_CLASSES[written]
    assert_same_logits(model, theirs.eval())
    back, _ = load_hf(tmp_path / "hf")
    assert architecture_differences(model.config, back.config, hf_export.ROUND_TRIP_MAY_CHANGE, by_function=True) == []
    for (name, mine), (other_name, returned) in zip(model.state_dict().items(), back.state_dict().items()):
        assert name == other_name and torch.equal(mine, returned), name


def test_bfloat16_round_trip_through_our_checkpoint_folder_and_the_command_line(tmp_path, capsys):
    model = ours("H_post_LQK_32kv_8k_11k_SWA", window=WINDOW).to(torch.bfloat16)
    save_model(model, tmp_path / "ours")
    hf_interop.main(["export", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")])
    assert "as Olmo3ForCausalLM (bfloat16)" in capsys.readouterr().out
    hf_interop.main(["summary", str(tmp_path / "hf"), "--rope_theta", "8e6"])
    assert "rope_theta overridden: 8e+06" in capsys.readouterr().out
    hf_interop.main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    assert "stored bfloat16, loaded bfloat16" in capsys.readouterr().out
    back = load_model(tmp_path / "back")
    assert back.config == model.config
    for (name, mine), (_, returned) in zip(model.state_dict().items(), back.state_dict().items()):
        assert returned.dtype == torch.bfloat16 and torch.equal(mine, returned), name


def test_command_line_help_documents_the_three_commands(capsys):
    with pytest.raises(SystemExit):
        hf_interop.main(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in ("import", "export", "summary"))
    with pytest.raises(SystemExit, match="error: .*config.json not found"):
        hf_interop.main(["summary", "."])


@pytest.mark.parametrize("name, overrides, model_type, message", [
    ("G_pre_LQK_8kv_8k_14k", {}, None, "pre norm with layerwise QK norm.*custom model_type 'llama3_qknorm'"),
    ("H_pre_LQK_32kv_8k_11k_SWA", dict(window=WINDOW), None, "custom model_type 'olmo3_preorder'"),
    ("G_pre_8kv_8k_14k", dict(norm_placement="post"), None, "post norm with no QK norm.*'llama3_reordered'"),
    ("H_post_HQK_32kv_8k_11k_SWA", {}, None, "post norm with headwise QK norm.*'olmo2_headwise_qknorm'"),
    ("F_pre_8kv_8k_14k_SWA", dict(window=WINDOW), None, "LlamaForCausalLM has no sliding window"),
    ("K_post_HQK_8kv_12k", dict(window=WINDOW, rope_scaling="yarn", rope_factor=4.0), None,
     "Qwen3ForCausalLM applies one RoPE to every layer.*'olmo3_preorder_headwise_qknorm'"),
    ("H_post_LQK_32kv_8k_11k_SWA", dict(window=WINDOW), "olmo2", "Olmo2ForCausalLM has no sliding window.*Olmo3"),
    ("K_post_HQK_8kv_12k", {}, "llama", "LlamaForCausalLM is pre norm with none QK norm.*Qwen3ForCausalLM"),
])
def test_export_without_a_stock_class_fails_naming_the_nearest_option(tmp_path, name, overrides, model_type, message):
    with pytest.raises(CheckpointError, match=message):
        export_hf(ours(name, **overrides), tmp_path / "hf", model_type=model_type)
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------------------------
# Broken folders: each error names the file, the key and the fix


@pytest.fixture
def llama_folder(tmp_path):
    return saved(hf_model(LlamaConfig, LlamaForCausalLM), tmp_path / "hf")


def test_missing_config_json_is_named(llama_folder):
    (llama_folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"hf/config.json not found; .* holds config.json"):
        load_hf(llama_folder)


def test_unknown_model_type_lists_the_supported_ones(llama_folder):
    edit_config(llama_folder, model_type="mistral")
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'mistral' is not supported; supported: llama"):
        load_hf(llama_folder)


def test_missing_shard_names_the_index_the_shard_and_a_key(tmp_path):
    directory = saved(hf_model(LlamaConfig, LlamaForCausalLM), tmp_path / "hf", max_shard_size="100KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    shard = sorted(set(index.values()))[-1]
    (directory / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"{shard} is missing: model.safetensors.index.json maps "
                                              rf"'[^']+' \(and \d+ more tensors\) to it; download that shard"):
        load_hf(directory)


def test_shape_mismatch_names_the_file_the_tensor_and_the_config_key(llama_folder):
    edit_config(llama_folder, intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"hf/model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has "
                                              r"shape \[96, 64\], but config.json \(intermediate_size\) implies "
                                              r"\[128, 64\]; .* fix config.json"):
        load_hf(llama_folder)


@pytest.mark.parametrize("layers, message", [
    (5, r"tensor 'model.layers.4.* is missing .* num_hidden_layers=5 but the weights have 4 layers"),
    (3, r"model.safetensors: unexpected tensor 'model.layers.3.* more layers than .* num_hidden_layers=3"),
])
def test_layer_count_disagreeing_with_the_weights_is_named(llama_folder, layers, message):
    edit_config(llama_folder, num_hidden_layers=layers)
    with pytest.raises(CheckpointError, match=message):
        load_hf(llama_folder)


def test_qk_norm_weights_under_a_model_type_without_it_are_named(tmp_path):
    directory = saved(hf_model(Olmo2Config, Olmo2ForCausalLM), tmp_path / "hf")
    edit_config(directory, model_type="llama3_reordered")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.self_attn.k_norm.weight'.*"
                                              r"model_type 'llama3_reordered' has none"):
        load_hf(directory)


def test_invalid_json_pickles_and_our_own_folder_are_refused_with_the_fix(tmp_path, llama_folder):
    (llama_folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        summary(llama_folder)
    pickled = tmp_path / "pickled"
    shutil.copytree(llama_folder, pickled)
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"} | SHAPE))
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin are pickle files, which we never load"):
        load_hf(pickled)
    save_model(ours("G_pre_8kv_8k_14k"), tmp_path / "ours")
    with pytest.raises(CheckpointError, match="looks like an OlmPool checkpoint folder: export it"):
        load_hf(tmp_path / "ours")
    with pytest.raises(CheckpointError, match="is a Hugging Face config"):
        load_model(pickled)
    (tmp_path / "ours" / "model.safetensors").unlink()
    (tmp_path / "ours" / "dcp").mkdir()
    with pytest.raises(CheckpointError, match=r"holds an FSDP checkpoint \(dcp/\), whose metadata is a pickle"):
        export_hf(tmp_path / "ours", tmp_path / "hf_out")


def test_summary_reads_no_tensor_data_and_matches_load(tmp_path):
    _, directory = olmo3_folder(tmp_path, rope_parameters=OLMO3_YARN)
    _, text = load_hf(directory)
    assert summary(directory) == text  # stored float32, loaded float32 either way
    assert len(text.splitlines()) < 25
