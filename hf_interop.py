"""Hugging Face checkpoints in and out of OlmPool's `Transformer`.

    python hf_interop.py summary HF_DIR                          # what would load, and every assumption
    python hf_interop.py import HF_DIR --out CKPT_DIR [--rope_theta 8e6] [--window 4096] [--norm_placement post]
    python hf_interop.py export CKPT_DIR --out HF_DIR [--dtype bfloat16] [--model_type olmo3] [--no_tokenizer]

    from hf_interop import load_hf
    model, summary = load_hf("path/to/hf_dir")                   # (Transformer, one-screen summary)

This module is the import: a local Hugging Face folder's config.json becomes a ModelConfig step by step,
each assumption and override noted, then its safetensors are checked name by name and shape by shape
against that config. The export is hf_export.py, which builds on this module's tables (FAMILIES,
hf_names) and reads its own output back through inspect_hf; the command line above serves both.
Which model_type means which switches, and the release pitfalls handled here: docs/hf_interop.md.

Loading reads JSON and safetensors only: no pickle, no code from the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import data
from checkpoint import CheckpointError, check_weights, read_json, save_model
from olmpool import ModelConfig, Transformer, describe


# ----------------------------------------------------------------------------------------------
# What each model_type means


@dataclass(frozen=True)
class Family:
    base: str  # the stock model_type whose config conventions (windows, RoPE, defaults) apply
    norm_placement: str
    qk_norm: str
    custom: str = ""  # for OlmPool's custom classes: how the name was read


FAMILIES = {
    "llama": Family("llama", "pre", "none"),
    "qwen3": Family("qwen3", "pre", "headwise"),
    "olmo2": Family("olmo2", "post", "layerwise"),
    "olmo3": Family("olmo3", "post", "layerwise"),
    "olmo3_preorder": Family("olmo3", "pre", "layerwise", "'preorder' = pre norm; Olmo 3's layerwise QK norm"),
    "olmo3_preorder_headwise_qknorm": Family("olmo3", "pre", "headwise", "'preorder' = pre norm; headwise QK norm"),
    "olmo2_headwise_qknorm": Family("olmo2", "post", "headwise", "Olmo 2's post norm; headwise QK norm"),
    "llama3_qknorm": Family("llama", "pre", "layerwise", "Llama's pre norm; layerwise QK norm"),
    "llama3_reordered": Family("llama", "post", "none", "'reordered' = post norm; no QK norm"),
}
STOCK_CLASSES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
                 "olmo3": "Olmo3ForCausalLM"}

# transformers 5's class defaults, used where a config.json omits a key (and said so in the summary).
DEFAULTS = {
    "llama": dict(rope_theta=10_000.0, rms_norm_eps=1e-6, max_position_embeddings=2048),
    "qwen3": dict(rope_theta=10_000.0, rms_norm_eps=1e-6, max_position_embeddings=32768, head_dim=128,
                  sliding_window=4096, max_window_layers=28),
    "olmo2": dict(rope_theta=10_000.0, rms_norm_eps=1e-5, max_position_embeddings=2048),
    "olmo3": dict(rope_theta=500_000.0, rms_norm_eps=1e-5, max_position_embeddings=2048, sliding_window=4096),
}

# The two block norms under each naming: (before/after attention, before/after the MLP).
NORM_NAMES = {"llama": ("input_layernorm", "post_attention_layernorm"),
              "olmo": ("post_attention_layernorm", "post_feedforward_layernorm")}
GLOBAL, LOCAL = "full_attention", "sliding_attention"


def hf_names(config: ModelConfig, naming: str, tied: bool = False) -> dict[str, str]:
    """Our state_dict name -> the Hugging Face name, for a config and a norm naming ("llama" | "olmo")."""
    attention_norm, mlp_norm = NORM_NAMES[naming]
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not tied:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(config.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{ours}attention.{proj}.weight"] = f"{theirs}self_attn.{proj}.weight"
        if config.qk_norm != "none":
            for norm in ("q_norm", "k_norm"):
                names[f"{ours}attention.{norm}.weight"] = f"{theirs}self_attn.{norm}.weight"
        names[f"{ours}attention_norm.weight"] = f"{theirs}{attention_norm}.weight"
        names[f"{ours}mlp_norm.weight"] = f"{theirs}{mlp_norm}.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{ours}mlp.{proj}.weight"] = f"{theirs}mlp.{proj}.weight"
    return names


def _shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter shapes, from a model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = Transformer(config, seed=None)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Reading a folder: JSON and safetensors headers


def _weight_files(directory: Path) -> tuple[dict[str, str], str]:
    """{tensor name: file name} from model.safetensors or a sharded index, checking every shard exists."""
    index_path, single = directory / "model.safetensors.index.json", directory / "model.safetensors"
    if index_path.is_file():
        index = read_json(index_path, "re-download the checkpoint")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index_path}: key 'weight_map' is missing or empty (or maps a tensor to something "
                                  f"other than a file name); re-download the checkpoint")
        for shard in sorted(set(weight_map.values())):
            key = next(name for name, file in weight_map.items() if file == shard)
            outside = _outside(directory, shard)
            if outside:
                raise CheckpointError(f"{index_path}: weight_map maps '{key}' to {shard!r}, which {outside}; an index "
                                      f"may only name files of its own folder: re-download the checkpoint")
            if not (directory / shard).is_file():
                raise CheckpointError(f"{directory / shard} is missing: {index_path.name} maps '{key}' (and "
                                      f"{sum(f == shard for f in weight_map.values()) - 1} more tensors) to it; "
                                      f"download that shard into {directory}")
        return weight_map, f"{len(set(weight_map.values()))} shards"
    if single.is_file():
        if _outside(directory, single.name):
            raise CheckpointError(f"{single} {_outside(directory, single.name)}; copy the real file into {directory}")
        try:
            with safe_open(single, "pt") as file:
                return {name: single.name for name in file.keys()}, "1 file"
        except SafetensorError as error:
            raise CheckpointError(f"{single} is not a readable safetensors file ({error}); re-download it") from None
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = (f" ({', '.join(pickles)} are pickle files, which we never load since they can run code; convert "
            f"them to safetensors where you trust them)") if pickles else ""
    raise CheckpointError(f"{directory} has neither model.safetensors nor model.safetensors.index.json{hint}; "
                          f"save the model with save_pretrained(safe_serialization=True)")


def _outside(directory: Path, name) -> str | None:
    """Why the weight file `name` is not a file of directory (an absolute path, a '..', a symlink that leads
    out), or None. A Hugging Face cache snapshot (.../snapshots/REV/) may link into the repo's blobs/ folder."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return "is a path outside the folder"
    root, target = directory.resolve(), (directory / name).resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(target.is_relative_to(folder) for folder in allowed):
        return f"is a link that leads outside the folder (to {target})"
    return None


def _check_layer_count(directory: Path, n_layers, headers: dict) -> None:
    """A num_hidden_layers the weights cannot hold, refused before anything is built for it (a model of
    200,000 layers takes minutes to build even on the meta device); the finer checks come in _check_tensors."""
    present = len({k.split(".")[2] for k in headers if k.startswith("model.layers.")})
    if isinstance(n_layers, int) and n_layers > present:
        raise CheckpointError(f"{directory}: tensor 'model.layers.{present}.self_attn.q_proj.weight' (and every tensor of "
                              f"layers {present}-{n_layers - 1}) is missing from the weights; config.json says "
                              f"num_hidden_layers={n_layers} but the weights have {present} layers; fix "
                              f"num_hidden_layers or find the missing weights")


def _tensor_headers(directory: Path, files: dict[str, str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} from the safetensors headers, without reading any tensor data."""
    headers = {}
    for file_name in sorted(set(files.values())):
        try:
            with safe_open(directory / file_name, "pt") as file:
                present = set(file.keys())
                for name in (n for n, f in files.items() if f == file_name):
                    if name not in present:
                        raise CheckpointError(f"{directory / file_name} lacks '{name}', which "
                                              f"model.safetensors.index.json places there; re-download the shard")
                    tensor_slice = file.get_slice(name)
                    headers[name] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
        except SafetensorError as error:
            raise CheckpointError(f"{directory / file_name} is not a readable safetensors file ({error}); "
                                  f"re-download it") from None
    return headers


# ----------------------------------------------------------------------------------------------
# config.json -> ModelConfig


@dataclass(frozen=True)
class Rope:
    """One layer type's RoPE in ModelConfig's terms."""
    theta: float
    scaling: str = "none"  # ModelConfig.rope_scaling, never "abf" (an ABF base is just a larger theta)
    factor: float = 1.0
    original_context: int | None = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_attention_factor: float | None = None
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0

    def same_scaling(self, other: Rope) -> bool:
        return dataclasses.replace(self, theta=0.0) == dataclasses.replace(other, theta=0.0)

    def text(self) -> str:
        return f"theta {self.theta:g}" + ("" if self.scaling == "none" else f", {self.scaling} x{self.factor:g}")


HF_ROPE_TYPES = {"default": "none", "linear": "pi", "yarn": "yarn", "llama3": "llama3"}


def _rope_from_hf(params: dict, theta: float, where: str, max_positions: int) -> Rope:
    """A transformers rope_parameters dict (one layer type) as a Rope; errors for what we cannot compute."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in HF_ROPE_TYPES:
        raise CheckpointError(f"config.json: {where} has rope_type {rope_type!r}, which OlmPool does not implement; "
                              f"supported: {', '.join(HF_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"config.json: {where} has partial_rotary_factor {params['partial_rotary_factor']}; "
                              f"OlmPool rotates the whole head (1.0)")
    scaling = HF_ROPE_TYPES[rope_type]
    if scaling == "none":
        return Rope(theta)
    original = int(params.get("original_max_position_embeddings") or max_positions)
    factor = params.get("factor")
    if factor is None and scaling == "yarn":  # as transformers: the ratio of the two contexts
        factor = max_positions / original
    if factor is None:
        raise CheckpointError(f"config.json: {where} (rope_type {rope_type!r}) lacks key 'factor'; add it")
    if scaling == "pi":
        return Rope(theta, "pi", float(factor))
    if scaling == "llama3":
        missing = [key for key in ("low_freq_factor", "high_freq_factor") if key not in params]
        if missing:
            raise CheckpointError(f"config.json: {where} (rope_type 'llama3') lacks {', '.join(missing)}; "
                                  f"Llama 3.1 uses 1.0 and 4.0")
        return Rope(theta, "llama3", float(factor), original, llama3_low_freq_factor=float(params["low_freq_factor"]),
                    llama3_high_freq_factor=float(params["high_freq_factor"]))
    if params.get("truncate", True) is False:
        raise CheckpointError(f"config.json: {where} has truncate false; OlmPool's YaRN always truncates "
                              f"(floor/ceil) the correction range, as transformers does by default")
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None and mscale and mscale_all_dim and factor > 1:  # DeepSeek's form, as transformers
        attention_factor = (0.1 * mscale * math.log(factor) + 1) / (0.1 * mscale_all_dim * math.log(factor) + 1)
    beta_fast, beta_slow = (params.get(key) for key in ("beta_fast", "beta_slow"))  # 0 is a value, not "unset"
    return Rope(theta, "yarn", float(factor), original, 32.0 if beta_fast is None else float(beta_fast),
                1.0 if beta_slow is None else float(beta_slow),
                None if attention_factor is None else float(attention_factor))


def _check_layer_types(layer_types, n_layers: int) -> None:
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        raise CheckpointError(f"config.json: layer_types must list one type per layer ({n_layers}), "
                              f"got {layer_types!r}; fix it, or delete it and pass global_every")
    unknown = sorted({t for t in layer_types if t not in (GLOBAL, LOCAL)})
    if unknown:
        raise CheckpointError(f"config.json: layer_types contains {', '.join(map(repr, unknown))}; "
                              f"only '{GLOBAL}' and '{LOCAL}' are supported")


def _layer_pattern(layer_types: list, n_layers: int) -> int:
    """global_every for layer types with some sliding layer (0: all sliding); an error if irregular."""
    is_global = [t == GLOBAL for t in layer_types]
    if not any(is_global):
        return 0
    every = is_global.index(True) + 1
    if is_global != [(i + 1) % every == 0 or i == n_layers - 1 for i in range(n_layers)]:
        pattern = "".join("G" if g else "L" for g in is_global)
        raise CheckpointError(
            f"config.json: layer_types has global layers {[i for i, g in enumerate(is_global) if g]} "
            f"(pattern {pattern}, G full_attention, L sliding_attention), which ModelConfig cannot express: it "
            f"makes every global_every-th layer global and the last one too, or (global_every=0) none. Pass "
            f"global_every (--global_every) to impose such a pattern, or window=0 to make every layer global")
    return every


@dataclass
class ImportPlan:
    """What a Hugging Face folder becomes: the ModelConfig its config.json maps onto, which stored tensor is
    which of ours, and every assumption made. Read from config.json and the safetensors headers alone."""
    directory: Path
    model_type: str
    config: ModelConfig
    names: dict[str, str]  # ours -> HF
    files: dict[str, str]  # HF tensor name -> file
    tied: bool
    notes: list[str]
    layout: str  # "1 file" | "N shards"
    stored_dtype: str
    tokenizer: str = ""  # whether the folder's tokenizer.json gives dolma2's ids (tokenizer_check)


@dataclass
class ConfigJsonReader:
    """A Hugging Face config.json being read into ModelConfig fields: the JSON dict, the family whose
    conventions and defaults apply, and the notes (each default used, each assumption and override) in order."""
    path: Path  # the config.json, named in every error
    hf_json: dict
    family: Family
    notes: list[str]

    @property
    def model_type(self) -> str:
        return self.hf_json["model_type"]

    @property
    def defaults(self) -> dict:
        return DEFAULTS[self.family.base]

    def value(self, key: str, default_ok: bool = True):
        """config.json's value for key; if missing or null, transformers' default (said so in the notes) where
        default_ok and the stock class has one, else an error naming the key."""
        if key in self.hf_json and self.hf_json[key] is not None:
            return self.hf_json[key]
        if not default_ok or key not in self.defaults:
            raise CheckpointError(f"{self.path}: key '{key}' is missing; add it (see the "
                                  f"{STOCK_CLASSES[self.family.base].replace('ForCausalLM', 'Config')} documentation)")
        self.notes.append(f"config.json has no {key}: used transformers' default {self.defaults[key]}")
        return self.defaults[key]


def _read_config_json(directory: Path) -> ConfigJsonReader:
    """config.json, and the family its model_type names: block norm, QK norm, and the stock class whose
    conventions (windows, RoPE, defaults) apply."""
    path = directory / "config.json"
    hf_json = read_json(path, "a Hugging Face checkpoint folder holds config.json beside its *.safetensors; "
                               "download it with the weights")
    if "model_type" not in hf_json:
        hint = (" (this looks like an OlmPool checkpoint folder: export it with `hf_interop.py export`, or load it "
                "with load_model)") if "n_layers" in hf_json else ""
        raise CheckpointError(f"{path}: key 'model_type' is missing{hint}; set it to one of {', '.join(FAMILIES)}")
    model_type = hf_json["model_type"]
    if model_type not in FAMILIES:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported; supported: "
                              f"{', '.join(FAMILIES)}. If it has one of their architectures, set model_type to it")
    family = FAMILIES[model_type]
    notes = [f"model_type '{model_type}' is an OlmPool custom class, read as: {family.custom}"] if family.custom else []
    return ConfigJsonReader(path, hf_json, family, notes)


def _shape_fields(reader: ConfigJsonReader, attention_backend: str) -> dict:
    """ModelConfig's shapes, norms and context length: keys every model needs, else transformers' defaults."""
    hf_json, family = reader.hf_json, reader.family
    for key, bad in (("hidden_act", lambda v: v not in (None, "silu")), ("attention_bias", bool), ("mlp_bias", bool)):
        if bad(hf_json.get(key)):
            raise CheckpointError(f"{reader.path}: {key}={hf_json[key]!r}, but OlmPool's blocks are SwiGLU "
                                  f"(silu) without biases; this checkpoint cannot be imported")
    n_layers, d_model, n_heads = (reader.value(key, default_ok=False)
                                  for key in ("num_hidden_layers", "hidden_size", "num_attention_heads"))
    head_dim = hf_json.get("head_dim") or (reader.value("head_dim") if "head_dim" in reader.defaults
                                           else d_model // n_heads)
    return dict(vocab_size=reader.value("vocab_size", default_ok=False), n_layers=n_layers, d_model=d_model,
                n_heads=n_heads, n_kv_heads=hf_json.get("num_key_value_heads") or n_heads, head_dim=head_dim,
                mlp_hidden=reader.value("intermediate_size", default_ok=False),
                norm_eps=float(reader.value("rms_norm_eps")), norm_placement=family.norm_placement,
                qk_norm=family.qk_norm, attention_backend=attention_backend,
                context_length=int(reader.value("max_position_embeddings")))


def _stock_windows(reader: ConfigJsonReader, n_layers: int) -> tuple[int | None, list | None]:
    """(sliding_window, layer_types) as config.json gives them, read by the family's conventions."""
    hf_json, family = reader.hf_json, reader.family
    sliding_window, layer_types = hf_json.get("sliding_window"), hf_json.get("layer_types")
    if family.base == "olmo3" and "sliding_window" not in hf_json:
        sliding_window = reader.value("sliding_window")
    if family.base == "qwen3":
        if not hf_json.get("use_sliding_window", False):
            if sliding_window is not None and LOCAL in (layer_types or []):
                reader.notes.append("use_sliding_window is false: layers typed sliding_attention are global, "
                                    "as in transformers")
            sliding_window, layer_types = None, None
        elif layer_types is None:
            first = hf_json.get("max_window_layers", reader.defaults["max_window_layers"])
            layer_types = [LOCAL if i >= first else GLOBAL for i in range(n_layers)]
    elif sliding_window is not None and family.base in ("llama", "olmo2") and not family.custom:
        reader.notes.append(f"config.json sets sliding_window {sliding_window}, which transformers' "
                            f"{STOCK_CLASSES[family.base]} ignores; applied here (window=0 drops it)")
    return sliding_window, layer_types


def _window_fields(reader: ConfigJsonReader, n_layers: int, window: int | None, global_every: int | None) -> dict:
    """ModelConfig's window and global_every from sliding_window and layer_types, after the overrides;
    {} for a model without sliding windows."""
    sliding_window, layer_types = _stock_windows(reader, n_layers)
    assumed = "assumed 3 local : 1 global, last layer global (OLMo-core's pattern)"
    if window is not None:
        reader.notes.append(f"window overridden: {window or 'none'} (config.json: {sliding_window or 'none'})")
    if global_every is not None:
        reader.notes.append(f"global_every overridden: {global_every}")
    if layer_types is not None:
        _check_layer_types(layer_types, n_layers)
    if window == 0:
        return {}
    if layer_types is not None and LOCAL in layer_types:
        if sliding_window is None and window is None:
            raise CheckpointError(f"{reader.path}: layer_types marks layers sliding_attention but "
                                  f"sliding_window is null; pass window=W (--window W), or window=0 for no window")
        every = global_every if global_every is not None else _layer_pattern(layer_types, n_layers)
        return dict(window=int(window or sliding_window), global_every=every)
    if window or (layer_types is None and sliding_window is not None):
        if global_every is None:
            reason = "layer_types missing" if layer_types is None else "no layer was sliding in config.json"
            if reader.family.base == "olmo3" and n_layers % 4 and layer_types is None:
                assumed += "; transformers would make the last layer sliding"
            reader.notes.append(f"{reason}: {assumed}")
        return dict(window=int(window or sliding_window), global_every=4 if global_every is None else global_every)
    return {}


def _stored_rope_parameters(reader: ConfigJsonReader) -> tuple[dict[str, dict], dict[str, str], bool]:
    """Each layer type's rope_parameters as config.json stores them (nested per type, one dict for all, or the
    old rope_scaling), where each was read (for errors), and whether they were nested per type."""
    rope_parameters = reader.hf_json.get("rope_parameters")
    if isinstance(rope_parameters, dict) and (GLOBAL in rope_parameters or LOCAL in rope_parameters):
        per_type = {t: dict(rope_parameters.get(t) or {}) for t in (GLOBAL, LOCAL)}
        return per_type, {t: f"rope_parameters.{t}" for t in (GLOBAL, LOCAL)}, True
    old = reader.hf_json.get("rope_scaling")
    old_format = bool(old and not rope_parameters)
    shared = dict(old) if old_format else dict(rope_parameters or {})
    per_type = {GLOBAL: shared, LOCAL: dict(shared)}
    where = {t: "rope_scaling" if old_format else "rope_parameters" for t in (GLOBAL, LOCAL)}
    if old_format and reader.family.base == "olmo3":  # Olmo3Config puts rope_scaling on full layers
        per_type[LOCAL] = {"rope_type": "default"}
        reader.notes.append("rope_scaling (old format) applied to full_attention layers only, as Olmo3Config does")
    return per_type, where, False


def _layer_type_ropes(reader: ConfigJsonReader, per_type: dict[str, dict], where: dict[str, str],
                      rope_theta: float | None, windowed: bool, max_positions: int) -> dict[str, Rope]:
    """Each layer type's Rope. Its theta: the rope_theta override, else config.json's flat rope_theta, which
    wins over a disagreeing one in rope_parameters (docs/hf_interop.md says why), else the stored one."""
    flat_theta = reader.hf_json.get("rope_theta")
    ropes = {}
    for layer_type, params in per_type.items():
        matters = layer_type == GLOBAL or windowed  # sliding layers' RoPE matters only with windows
        stored = params.get("rope_theta")
        if rope_theta is not None:
            theta = rope_theta
        elif flat_theta is not None:
            theta = flat_theta
            if matters and stored is not None and float(stored) != float(flat_theta):
                reader.notes.append(f"config.json: flat rope_theta {flat_theta:g} disagrees with "
                                    f"{where[layer_type]}.rope_theta {stored:g} (which transformers uses); "
                                    f"used {flat_theta:g}")
            elif matters and stored is None and reader.family.base == "olmo3" and layer_type == LOCAL:
                reader.notes.append(f"flat rope_theta {flat_theta:g} applied to sliding layers too (transformers' "
                                    f"Olmo3Config would use {reader.defaults['rope_theta']:g} there)")
        else:
            theta = stored if stored is not None else reader.value("rope_theta")
        ropes[layer_type] = _rope_from_hf(params, float(theta), where[layer_type], max_positions)
    if rope_theta is not None:
        reader.notes.append(f"rope_theta overridden: {rope_theta:g} on every layer")
    return ropes


def _rope_fields(reader: ConfigJsonReader, fields: dict, rope_theta: float | None) -> dict:
    """ModelConfig's RoPE fields from each layer type's RoPE; fields (so far) give the window and context."""
    per_type, where, nested = _stored_rope_parameters(reader)
    max_positions = fields["context_length"]
    ropes = _layer_type_ropes(reader, per_type, where, rope_theta, "window" in fields, max_positions)
    global_rope, local_rope = ropes[GLOBAL], ropes[LOCAL]
    rope_fields = dict(rope_theta=global_rope.theta, rope_scaling=global_rope.scaling, rope_factor=global_rope.factor,
                       yarn_beta_fast=global_rope.yarn_beta_fast, yarn_beta_slow=global_rope.yarn_beta_slow,
                       yarn_attention_factor=global_rope.yarn_attention_factor,
                       llama3_low_freq_factor=global_rope.llama3_low_freq_factor,
                       llama3_high_freq_factor=global_rope.llama3_high_freq_factor)
    if fields.get("window"):  # the local layers' RoPE matters
        if local_rope.theta != global_rope.theta:
            rope_fields["rope_theta_local"] = local_rope.theta
        if local_rope.scaling != "none" and global_rope.scaling == "none":
            raise CheckpointError(f"config.json: {where[LOCAL]} scales RoPE ({local_rope.text()}) but "
                                  f"{where[GLOBAL]} does not; ModelConfig scales global layers, or all layers")
        if local_rope.scaling != "none" and not local_rope.same_scaling(global_rope):
            raise CheckpointError(f"config.json: {where[LOCAL]} ({local_rope.text()}) and {where[GLOBAL]} "
                                  f"({global_rope.text()}) scale RoPE differently; ModelConfig applies one scaling "
                                  f"to the global layers or to all layers")
        rope_fields["rope_scaling_layers"] = "all" if local_rope.scaling != "none" else "global"
    elif global_rope.scaling != "none":
        rope_fields["rope_scaling_layers"] = "global" if nested else "all"  # every layer is global: the same model
    original = global_rope.original_context
    if original is not None and original != max_positions:
        rope_fields["rope_original_context"] = original
    return rope_fields


def _model_config(reader: ConfigJsonReader, fields: dict, norm_placement: str | None) -> ModelConfig:
    """The ModelConfig the fields make, after the norm_placement override; an error if it is not a valid model."""
    if norm_placement is not None:
        if norm_placement != reader.family.norm_placement:
            reader.notes.append(f"norm_placement overridden: {norm_placement} (model_type '{reader.model_type}' "
                                f"says {reader.family.norm_placement})")
        fields = fields | {"norm_placement": norm_placement}
    reader.notes[:] = list(dict.fromkeys(reader.notes))  # each once, in order
    try:
        return ModelConfig(**fields)
    except ValueError as error:
        raise CheckpointError(f"{reader.path} does not make a valid model: {error}") from None


def _norm_naming(directory: Path, reader: ConfigJsonReader, headers: dict) -> str:
    """How the weights name the two block norms (a NORM_NAMES key): the stock class's naming, or for
    OlmPool's custom classes, whichever naming the stored tensors use."""
    if not reader.family.custom:
        return "llama" if reader.family.base in ("llama", "qwen3") else "olmo"
    has_input = "model.layers.0.input_layernorm.weight" in headers
    has_feedforward = "model.layers.0.post_feedforward_layernorm.weight" in headers
    naming = "llama" if has_input else "olmo"
    if has_input == has_feedforward:
        raise CheckpointError(f"{directory}: the weights of model_type '{reader.model_type}' name their block norms "
                              f"neither model.layers.0.input_layernorm/post_attention_layernorm (Llama) nor "
                              f"model.layers.0.post_attention_layernorm/post_feedforward_layernorm (Olmo) alone; "
                              f"cannot tell which norm is which")
    first, second = NORM_NAMES[naming]
    reader.notes.append(f"weights use {naming.capitalize()} norm names: {first} for attention, {second} for the MLP")
    return naming


def _tied_embeddings(reader: ConfigJsonReader, headers: dict) -> bool:
    """Whether lm_head is the embedding (tie_word_embeddings), noting a stored lm_head that is then ignored."""
    tied = bool(reader.hf_json.get("tie_word_embeddings", False))
    if tied:
        ignored = " (the stored lm_head.weight is ignored, as transformers does)" if "lm_head.weight" in headers else ""
        reader.notes.append(f"tie_word_embeddings: lm_head copied from model.embed_tokens{ignored}")
    return tied


# The config.json keys each of our tensors' shape depends on, to name them when they disagree.
_SHAPE_KEYS = {"embed": "vocab_size, hidden_size", "lm_head": "vocab_size, hidden_size",
               "q_proj": "num_attention_heads, head_dim", "o_proj": "num_attention_heads, head_dim",
               "k_proj": "num_key_value_heads, head_dim", "v_proj": "num_key_value_heads, head_dim",
               "q_norm": "the QK norm kind (model_type), head_dim", "k_norm": "the QK norm kind (model_type), head_dim",
               "mlp.": "intermediate_size", "norm": "hidden_size"}


def _check_tensors(directory, model_type, config, names, files, headers, tied, notes):
    """Every expected tensor present with its shape; nothing unexpected. Errors name the file and the key."""
    where = lambda name: directory / files.get(name, "model.safetensors")  # noqa: E731
    missing = [(ours, hf) for ours, hf in names.items() if hf not in headers]
    if missing:
        ours, hf = missing[0]
        layers_present = {int(k.split(".")[2]) for k in headers if k.startswith("model.layers.")}
        if ours.startswith("layers.") and int(ours.split(".")[1]) >= len(layers_present):
            fix = (f"config.json says num_hidden_layers={config.n_layers} but the weights have "
                   f"{len(layers_present)} layers; fix num_hidden_layers or find the missing weights")
        elif hf == "lm_head.weight":
            fix = "if the model ties its embeddings, set tie_word_embeddings true in config.json"
        elif ".self_attn.q_norm" in hf or ".self_attn.k_norm" in hf:
            fix = (f"model_type '{model_type}' has {config.qk_norm} QK norm but the weights have none; "
                   f"use a model_type without QK norm (llama, llama3_reordered)")
        else:
            fix = "the weights are incomplete or of another architecture; re-download them or fix model_type"
        others = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{directory}: tensor '{hf}'{others} is missing from the weights; {fix}")
    ignorable = {k for k in headers if k.endswith("rotary_emb.inv_freq") or (tied and k == "lm_head.weight")}
    if any(k.endswith("rotary_emb.inv_freq") for k in ignorable):
        notes.append("ignored stored rotary_emb.inv_freq buffers (recomputed from config.json)")
    unexpected = sorted(set(headers) - set(names.values()) - ignorable)
    if unexpected:
        key = unexpected[0]
        parts = key.split(".")
        if key.startswith("model.layers.") and int(parts[2]) >= config.n_layers:
            fix = (f"the weights have more layers than config.json's num_hidden_layers={config.n_layers}; "
                   f"fix num_hidden_layers")
        elif "q_norm" in key or "k_norm" in key:
            fix = (f"the weights have QK norm but model_type '{model_type}' has none; use a model_type with "
                   f"QK norm (e.g. llama3_qknorm for pre norm, olmo2 for post norm)")
        elif key.endswith(".bias"):
            fix = "OlmPool's layers have no biases; this checkpoint cannot be imported"
        else:
            fix = "the weights are of another architecture than model_type says; fix model_type"
        others = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{where(key)}: unexpected tensor '{key}'{others}; {fix}")
    expected = _shapes(config)  # after the names: a model is built for them (on the meta device)
    for ours, hf in names.items():
        shape, want = headers[hf][0], expected[ours]
        if shape != want:
            part = next((p for p in ("q_norm", "k_norm", "q_proj", "k_proj", "v_proj", "o_proj", "mlp.", "embed",
                                     "lm_head") if p in ours), "norm")
            raise CheckpointError(f"{where(hf)}: tensor '{hf}' has shape {list(shape)}, but config.json "
                                  f"({_SHAPE_KEYS[part]}) implies {list(want)}; config.json and the weights disagree: "
                                  f"fix config.json or use the weights it was written for")


# ----------------------------------------------------------------------------------------------
# The folder's tokenizer: does it give dolma2's ids?


# What the tokenizer check in the import summary encodes: letters, digits, contractions, whitespace
# runs, CRLF, non-Latin scripts, emoji, code, and every special token.
TOKENIZER_PROBE = ("Hello world! It's 2026; they'll pay 1234567 €.\n\n\tdef f(x):  return x**2  \r\n"
                   "  Ünïcödé 日本語のテキスト, русский текст, 😀👍🏽   trailing   \n"
                   + "".join(data.SPECIAL_TOKENS))


def tokenizer_check(directory) -> str:
    """One line for the import summary: does the folder's tokenizer.json give dolma2's ids?"""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        others = sorted(p.name for p in directory.glob("*") if p.name in ("tokenizer.model", "vocab.json",
                                                                           "merges.txt", "tokenizer_config.json"))
        return (f"no tokenizer.json{' (has ' + ', '.join(others) + ', not checked)' if others else ''}; OlmPool "
                f"encodes with dolma2, right only if the model was trained with it")
    try:
        from tokenizers import Tokenizer
        theirs = Tokenizer.from_file(str(path))
    except ImportError:
        return "tokenizer.json not checked: the `tokenizers` package is missing (pip install tokenizers)"
    except Exception as error:  # tokenizers raises its own exception types for unreadable files
        return f"tokenizer.json could not be read ({error}); not checked against dolma2"
    try:
        dolma2 = data.get_tokenizer().encoding
    except data.DataError as error:
        return f"tokenizer.json not checked against dolma2: {error}"
    wrong_specials = {token: theirs.token_to_id(token) for token, id_ in data.SPECIAL_TOKENS.items()
                      if theirs.token_to_id(token) != id_}
    got, want = theirs.encode(TOKENIZER_PROBE, add_special_tokens=False).ids, dolma2.encode(TOKENIZER_PROBE,
                                                                                            allowed_special="all")
    if not wrong_specials and got == want:
        return (f"tokenizer.json gives dolma2's ids (checked on a {len(want)}-token probe text and the "
                f"{len(data.SPECIAL_TOKENS)} special tokens)")
    problems = []
    if wrong_specials:
        problems.append("special tokens " + ", ".join(f"{t} -> {i}" for t, i in wrong_specials.items())
                        + " (dolma2: " + ", ".join(f"{data.SPECIAL_TOKENS[t]}" for t in wrong_specials) + ")")
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        problems.append(f"a probe text encodes differently from token {first} on ({got[first:first + 4]} vs "
                        f"dolma2's {want[first:first + 4]})")
    return (f"tokenizer.json DISAGREES with dolma2 ids: {'; '.join(problems)}. OlmPool's data, evaluation and "
            f"generation use dolma2: fine-tune or evaluate this model with its own tokenizer")


# ----------------------------------------------------------------------------------------------
# The whole folder: plan, summary, load


def inspect_hf(directory, rope_theta: float | None = None, window: int | None = None,
               global_every: int | None = None, norm_placement: str | None = None,
               attention_backend: str = "sdpa") -> ImportPlan:
    """Read config.json and the safetensors headers (no tensor data) and check them against each other.

    config.json becomes ModelConfig fields step by step, each step adding its assumptions and overrides to the
    notes in order; then the weights are checked against that config, name by name and shape by shape."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a folder; give the folder holding config.json and the weights")
    reader = _read_config_json(directory)  # model_type: whose conventions and defaults apply
    fields = _shape_fields(reader, attention_backend)
    files, layout = _weight_files(directory)
    headers = _tensor_headers(directory, files)
    _check_layer_count(directory, fields["n_layers"], headers)
    fields |= _window_fields(reader, fields["n_layers"], window, global_every)
    fields |= _rope_fields(reader, fields, rope_theta)
    config = _model_config(reader, fields, norm_placement)

    # The weights: which norm naming, tied embeddings, then every name and shape against the config.
    naming = _norm_naming(directory, reader, headers)
    tied = _tied_embeddings(reader, headers)
    names = hf_names(config, naming, tied)
    _check_tensors(directory, reader.model_type, config, names, files, headers, tied, reader.notes)
    integers = [hf for hf in names.values() if not headers[hf][1].startswith(("F", "BF"))]
    if integers:  # a cast would silently turn them into other weights (checkpoint.check_weights says the same)
        raise CheckpointError(f"{directory / files[integers[0]]}: tensor '{integers[0]}' is stored as "
                              f"{headers[integers[0]][1]}, not a floating-point type; weights are float32, "
                              f"bfloat16 or float16")
    stored = headers[names["embed.weight"]][1]
    stored_dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}.get(stored, stored)
    return ImportPlan(directory, reader.model_type, config, names, files, tied, reader.notes, layout, stored_dtype,
                      tokenizer_check(directory))


def _summary(plan: ImportPlan, dtype: torch.dtype | None) -> str:
    loaded = plan.stored_dtype if dtype is None else str(dtype).removeprefix("torch.")
    header = (f"{plan.directory} (model_type '{plan.model_type}', {plan.layout}, stored {plan.stored_dtype}, "
              f"loaded {loaded})")
    notes = [f"  - {note}" for note in plan.notes] or ["  - none: everything read from config.json"]
    return "\n".join([header, describe(plan.config), "assumptions and overrides:", *notes,
                      f"tokenizer: {plan.tokenizer}"])


def summary(directory, **overrides) -> str:
    """The one-screen summary load_hf would return, without reading any tensor data."""
    return _summary(inspect_hf(directory, **overrides), None)


def load_hf(directory, rope_theta: float | None = None, window: int | None = None, global_every: int | None = None,
            norm_placement: str | None = None, attention_backend: str = "sdpa",
            dtype: torch.dtype | None = torch.float32) -> tuple[Transformer, str]:
    """A Transformer from a local Hugging Face folder, and a summary of the architecture and every assumption.

    Overrides (each reported in the summary): rope_theta for every layer; window W for the sliding
    layers (0: no window); global_every, the pattern of global layers; norm_placement "pre" | "post".
    dtype None keeps the stored dtype.
    """
    plan = inspect_hf(directory, rope_theta, window, global_every, norm_placement, attention_backend)
    state = {}
    by_file: dict[str, list[str]] = {}
    for ours, hf in plan.names.items():
        by_file.setdefault(plan.files[hf], []).append(ours)
    for file_name, ours_names in by_file.items():
        with safe_open(plan.directory / file_name, "pt") as file:
            for ours in ours_names:
                state[ours] = file.get_tensor(plan.names[ours])
    # Before any cast: an int32 tensor cast to float, or NaN and inf weights, would import as a broken model.
    check_weights(state, {ours: shape for ours, shape in _shapes(plan.config).items() if ours in state},
                  plan.directory)
    if plan.tied:
        state["lm_head.weight"] = state["embed.weight"].clone()
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    with torch.device("meta"):
        model = Transformer(plan.config, seed=None)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), _summary(plan, dtype)


# ----------------------------------------------------------------------------------------------
# Command line


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    """summary, import and export, the first two with the overrides of what config.json says."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=(
        "examples:\n  python hf_interop.py summary HF_DIR\n"
        "  python hf_interop.py import HF_DIR --out CKPT_DIR --rope_theta 8000000\n"
        "  python hf_interop.py export CKPT_DIR --out HF_DIR --dtype bfloat16"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def overrides(sub):
        sub.add_argument("--rope_theta", type=float, help="RoPE base for every layer, overriding config.json "
                                                          "(e.g. 8000000 for OlmPool's extended models)")
        sub.add_argument("--window", type=int, help="sliding window W of the local layers; 0: no sliding window")
        sub.add_argument("--global_every", type=int, help="every k-th layer (and the last) global; 0: none global")
        sub.add_argument("--norm_placement", choices=("pre", "post"), help="block norm, overriding the model_type")

    show = commands.add_parser("summary", help="print the architecture a Hugging Face folder loads as, and every "
                                               "assumption; reads no tensor data")
    show.add_argument("hf_dir")
    overrides(show)
    into = commands.add_parser("import", help="convert a Hugging Face folder into our checkpoint folder")
    into.add_argument("hf_dir")
    into.add_argument("--out", required=True, help="new folder for config.json (ModelConfig) + model.safetensors")
    into.add_argument("--dtype", choices=DTYPES, help="convert the weights (default: keep the stored dtype)")
    overrides(into)
    out = commands.add_parser("export", help="convert our checkpoint folder into a stock Hugging Face class")
    out.add_argument("checkpoint_dir")
    out.add_argument("--out", required=True, help="new folder for config.json + model.safetensors")
    out.add_argument("--dtype", choices=DTYPES, help="convert the weights (default: keep the stored dtype)")
    out.add_argument("--model_type", choices=STOCK_CLASSES, help="the class to write (default: the one that matches; "
                                                                  "olmo3 also fits post-norm models without windows)")
    out.add_argument("--no_tokenizer", action="store_true", help="write no tokenizer files (default: the dolma2 "
                                                                 "tokenizer, when the vocabulary holds its ids)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export":
            # hf_export builds on this module, so only the command line, which serves both, reaches up to it.
            import hf_export
            print(hf_export.export_hf(args.checkpoint_dir, args.out, DTYPES.get(args.dtype), args.model_type,
                                      tokenizer=False if args.no_tokenizer else None))
            return
        kwargs = dict(rope_theta=args.rope_theta, window=args.window, global_every=args.global_every,
                      norm_placement=args.norm_placement)
        if args.command == "summary":
            print(summary(args.hf_dir, **kwargs))
            return
        out_dir = Path(args.out)
        if out_dir.exists() and any(out_dir.iterdir()):
            raise CheckpointError(f"{out_dir} is not empty; import into a new or empty folder")
        model, text = load_hf(args.hf_dir, dtype=DTYPES.get(args.dtype), **kwargs)
        save_model(model, out_dir)
        print(f"{text}\nwrote {out_dir}")
    except CheckpointError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
