"""Export: an OlmPool model as the stock transformers class that computes the same function.

    python hf_interop.py export CKPT_DIR --out HF_DIR [--dtype bfloat16] [--model_type olmo3] [--no_tokenizer]

    from hf_export import export_hf
    export_hf(model, "path/to/out")                              # a folder transformers, lm-eval, vLLM run as is

The folder holds config.json, model.safetensors, the dolma2 tokenizer (tokenizer.json and
tokenizer_config.json, built offline from the cl100k file data.py reads), generation_config.json and a
model card (README.md). Every export is read back with hf_interop.inspect_hf, the importer: the same
function, or the mapping here has a bug. Which class each architecture becomes: docs/hf_interop.md.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import checkpoint
import data
from checkpoint import CheckpointError, load_model
from files import write_atomically, write_json_atomically
from hf_interop import FAMILIES, GLOBAL, HF_ROPE_TYPES, LOCAL, STOCK_CLASSES, ImportPlan, hf_names, inspect_hf
from olmpool import PRESETS, SIZES, ModelConfig, Transformer, describe, preset


# ----------------------------------------------------------------------------------------------
# Export: ModelConfig -> the stock class that computes the same function


def _rope_to_hf(config: ModelConfig, is_global: bool) -> dict:
    """One layer type's RoPE as transformers' rope_parameters; ABF becomes a larger rope_theta."""
    theta = config.rope_theta if is_global or config.rope_theta_local is None else config.rope_theta_local
    scaled = config.rope_scaling != "none" and (is_global or config.rope_scaling_layers == "all")
    method = config.rope_scaling if scaled else "none"
    if method == "abf":
        theta, method = theta * config.rope_factor, "none"
    params = {"rope_type": {v: k for k, v in HF_ROPE_TYPES.items()}[method], "rope_theta": float(theta)}
    if method != "none":
        params["factor"] = float(config.rope_factor)
    if method in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = config.original_context
    if method == "yarn":
        params.update(beta_fast=float(config.yarn_beta_fast), beta_slow=float(config.yarn_beta_slow))
        if config.yarn_attention_factor is not None:
            params["attention_factor"] = float(config.yarn_attention_factor)
    if method == "llama3":
        params.update(low_freq_factor=float(config.llama3_low_freq_factor),
                      high_freq_factor=float(config.llama3_high_freq_factor))
    return params


def stock_model_type(config: ModelConfig, model_type: str | None = None) -> str:
    """The stock transformers model_type that computes this config's function; an error naming the nearest
    option when none does. model_type asks for one ("olmo3" for a post-norm model without windows)."""
    switches = (config.norm_placement, config.qk_norm)
    windowed = config.window is not None
    windows = f"window={config.window} on {sum(w is not None for w in config.layer_windows)} layers"
    custom = {("pre", "layerwise"): "olmo3_preorder" if windowed else "llama3_qknorm",
              ("post", "none"): "llama3_reordered", ("post", "headwise"): "olmo2_headwise_qknorm"}
    if switches in custom:
        raise CheckpointError(
            f"no stock transformers class has {config.norm_placement} norm with "
            f"{'no' if config.qk_norm == 'none' else config.qk_norm} QK norm (Llama: pre/none, Qwen3: pre/headwise, "
            f"Olmo2/Olmo3: post/layerwise). The nearest is OlmPool's custom model_type '{custom[switches]}', which "
            f"stock transformers cannot load; keep this model in OlmPool's format")
    automatic = {("pre", "none"): "llama", ("pre", "headwise"): "qwen3",
                 ("post", "layerwise"): "olmo3" if windowed else "olmo2"}[switches]
    chosen = model_type or automatic
    if chosen not in STOCK_CLASSES:
        raise CheckpointError(f"model_type {chosen!r} is not a stock class we export; choose from "
                              f"{', '.join(STOCK_CLASSES)}")
    if FAMILIES[chosen].norm_placement != config.norm_placement or FAMILIES[chosen].qk_norm != config.qk_norm:
        raise CheckpointError(f"{STOCK_CLASSES[chosen]} is {FAMILIES[chosen].norm_placement} norm with "
                              f"{FAMILIES[chosen].qk_norm} QK norm; this model is {config.norm_placement} / "
                              f"{config.qk_norm}: use {STOCK_CLASSES[automatic]}")
    if windowed and chosen in ("llama", "olmo2"):
        nearest = ("no stock class has pre norm, no QK norm and sliding windows; exporting with window=None "
                   "would change every output beyond the window") if chosen == "llama" else "use Olmo3ForCausalLM"
        raise CheckpointError(f"{STOCK_CLASSES[chosen]} has no sliding window ({windows}); {nearest}")
    if windowed and chosen == "qwen3" and _rope_to_hf(config, True) != _rope_to_hf(config, False):
        raise CheckpointError(
            f"Qwen3ForCausalLM applies one RoPE to every layer, but this model's global layers use "
            f"{_rope_to_hf(config, True)} and its sliding layers {_rope_to_hf(config, False)} "
            f"(rope_theta_local, or scaling on global layers only). No stock class has pre norm, headwise QK norm "
            f"and per-layer-type RoPE; the nearest is OlmPool's custom 'olmo3_preorder_headwise_qknorm'")
    if chosen == "llama" and config.d_model % config.n_heads:
        raise CheckpointError(f"LlamaConfig requires hidden_size ({config.d_model}) divisible by num_attention_heads "
                              f"({config.n_heads}) even with an explicit head_dim; no stock class fits this shape")
    return chosen


def hf_config_json(config: ModelConfig, model_type: str, dtype: torch.dtype) -> dict:
    """The Hugging Face config.json dict, for a stock class (see stock_model_type), of our ModelConfig."""
    types = [GLOBAL if w is None else LOCAL for w in config.layer_windows]
    hf_json = {
        "architectures": [STOCK_CLASSES[model_type]], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.context_length, "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0, "use_cache": True,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if model_type == "olmo3":
        hf_json["rope_parameters"] = {GLOBAL: _rope_to_hf(config, True), LOCAL: _rope_to_hf(config, False)}
        # Olmo3Model builds the sliding mask even when no layer uses it, so it needs a value.
        hf_json.update(sliding_window=config.window or config.context_length, layer_types=types)
    else:
        hf_json["rope_parameters"] = _rope_to_hf(config, True)
    if model_type == "qwen3":
        hf_json.update(use_sliding_window=config.window is not None, sliding_window=config.window,
                       max_window_layers=config.n_layers, layer_types=types)
    if model_type == "llama":
        hf_json["mlp_bias"] = False
    return hf_json


# What an exported folder may say differently and still compute the same function: the kernel (the
# RoPE fields and context_length are compared by the frequencies they give, by_function).
ROUND_TRIP_MAY_CHANGE = ("attention_backend",)


def export_hf(model_or_checkpoint_dir, out_dir, dtype: torch.dtype | None = None,
              model_type: str | None = None, tokenizer: bool | None = None) -> str:
    """Write a folder the Hugging Face ecosystem runs as it is: config.json + model.safetensors for the
    stock transformers class that computes the same function, the dolma2 tokenizer (tokenizer.json,
    tokenizer_config.json), generation_config.json, and a model card (README.md).

    Takes a Transformer or our checkpoint folder; dtype None keeps the model's. tokenizer None writes the
    tokenizer when the vocabulary holds dolma2's 100,278 ids (not for toy vocabularies); False never.
    Returns a summary. Raises, naming the nearest option, when no stock class computes the same function,
    and refuses a checkpoint with a compact vocabulary (its ids are not dolma2's).
    """
    model, source, train_state = model_or_checkpoint_dir, None, None
    if not isinstance(model, Transformer):
        source = Path(model_or_checkpoint_dir)
        refuse_compact_vocabulary(source)
        model = load_model(source)
        train_state = checkpoint.read_train_state(source) or None
    config = model.config
    chosen = stock_model_type(config, model_type)
    with_tokenizer = _with_tokenizer(config, tokenizer)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} is not empty; export into a new or empty folder, so that no stale "
                              f"shard or config is left beside the new ones")
    dtype = dtype or next(model.parameters()).dtype
    card = model_card(config, chosen, str(source.resolve()) if source else None, train_state, with_tokenizer)
    _write_folder(model, out_dir, chosen, dtype, with_tokenizer, card)
    plan = _read_back(config, out_dir, chosen, with_tokenizer)
    written = "config.json, model.safetensors, " + (
        "tokenizer.json, tokenizer_config.json, generation_config.json, " if with_tokenizer else
        f"no tokenizer ({'toy vocabulary' if tokenizer is None else 'tokenizer=False'}), ")
    return (f"wrote {out_dir} as {STOCK_CLASSES[chosen]} ({str(dtype).removeprefix('torch.')}): {written}"
            f"{MODEL_CARD}\n{describe(plan.config)}\ntokenizer: {plan.tokenizer}")


def _with_tokenizer(config: ModelConfig, tokenizer: bool | None) -> bool:
    """Whether to write the tokenizer files (None: when the vocabulary holds dolma2's ids); the tokenizer
    is built (or fails) here, before anything is written."""
    if tokenizer and config.vocab_size < data.VOCAB_SIZE:
        raise CheckpointError(f"vocab_size {config.vocab_size} is smaller than dolma2's {data.VOCAB_SIZE} ids, so this "
                              f"model was not trained with dolma2; export it without the tokenizer (tokenizer=False)")
    with_tokenizer = config.vocab_size >= data.VOCAB_SIZE if tokenizer is None else tokenizer
    if with_tokenizer:
        dolma2_hf_tokenizer()
    return with_tokenizer


def _write_folder(model: Transformer, out_dir: Path, model_type: str, dtype: torch.dtype, with_tokenizer: bool,
                  card: str) -> None:
    """config.json, the weights under the stock class's names, the tokenizer files and the model card."""
    config = model.config
    names = hf_names(config, "llama" if model_type in ("llama", "qwen3") else "olmo")
    state = {names[name]: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in model.state_dict().items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_json = hf_config_json(config, model_type, dtype)
    if with_tokenizer:  # so that tools reading only config.json (not generation_config.json) stop at EOS too
        hf_json.update(eos_token_id=data.EOS_ID, pad_token_id=data.PAD_ID)
    write_json_atomically(out_dir / "config.json", hf_json, indent=2)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    if with_tokenizer:
        export_tokenizer(out_dir, model_max_length=config.context_length)
        write_json_atomically(out_dir / GENERATION_CONFIG, generation_config(), indent=2)
    write_atomically(out_dir / MODEL_CARD, card)


def _read_back(config: ModelConfig, out_dir: Path, model_type: str, with_tokenizer: bool) -> ImportPlan:
    """The written folder read back with the importer (its ImportPlan): the same function, or the mapping
    above has a bug."""
    plan = inspect_hf(out_dir, attention_backend=config.attention_backend)
    differences = checkpoint.architecture_differences(config, plan.config, ROUND_TRIP_MAY_CHANGE, by_function=True)
    if differences:
        found = "; ".join(f"{k}: {getattr(config, k)} vs {getattr(plan.config, k)}" for k in differences)
        raise AssertionError(f"export of {model_type} does not round-trip: {found}")
    if with_tokenizer and "gives dolma2's ids" not in plan.tokenizer:
        raise AssertionError(f"the exported tokenizer does not round-trip: {plan.tokenizer}")
    return plan


# ----------------------------------------------------------------------------------------------
# The dolma2 tokenizer as Hugging Face files, and the model card
#
# tokenizer.json is written with the `tokenizers` library from the same cl100k_base file that
# data.py's tiktoken tokenizer reads (data.find_cl100k_file, SHA-256 checked): the vocabulary is the
# file's ranks, the split regex is data.CL100K_PATTERN (in tokenizers' dialect, HF_SPLIT_PATTERN), and
# dolma2's special tokens keep their ids.
# Special-token text is special here, as every Hugging Face tokenizer treats it (and tiktoken's
# encode(text, allowed_special="all")): "<|endoftext|>" in a string becomes id 100257. data.Tokenizer
# .encode is ordinary encoding (a document must not forge a boundary), so the two agree exactly on
# text without special-token strings, which is all text OlmPool trains on.

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# cl100k's split regex in tokenizers' regex dialect (Oniguruma, Ruby syntax), where `{1,3}+` is not possessive
# but "one or more runs of 1-3 digits", which would keep "2026" whole where tiktoken splits "202", "6".
# A greedy {1,3} ends its alternative, so it matches what the possessive one does.
HF_SPLIT_PATTERN = data.CL100K_PATTERN.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")
assert HF_SPLIT_PATTERN != data.CL100K_PATTERN, "data.CL100K_PATTERN changed: review HF_SPLIT_PATTERN"
GENERATION_CONFIG = "generation_config.json"
MODEL_CARD = "README.md"


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each of the 256 bytes as a printable character (the printable
    Latin-1 bytes as themselves, the rest shifted past 255), which tokenizer.json's BPE vocabulary uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(256 + shifted)
            shifted += 1
    return characters


@functools.cache
def dolma2_hf_tokenizer():
    """dolma2 as a `tokenizers.Tokenizer`: byte-level BPE with cl100k's ranks as ids and merges.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank, and
    returns a piece that is itself a token whole. So every split of a token into two tokens is a
    merge whose priority is the token's rank, and ignore_merges takes whole pieces as they are.
    """
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise CheckpointError("exporting the tokenizer needs the `tokenizers` package: `pip install tokenizers` "
                              "(it comes with transformers), or export with tokenizer=False (--no_tokenizer)") from None
    try:
        ranks = data.load_bpe_ranks(data.find_cl100k_file())
    except (data.DataError, OSError) as error:
        raise CheckpointError(f"cannot build the dolma2 tokenizer: {error}; or export with tokenizer=False "
                              f"(--no_tokenizer)") from None
    alphabet = _byte_to_unicode()
    text = lambda token: "".join(alphabet[byte] for byte in token)  # noqa: E731
    merges = []  # (rank of the merged token, rank of the left piece, rank of the right piece, left, right)
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort(key=lambda merge: merge[:3])
    vocab = {text(token): rank for token, rank in ranks.items()} | data.SPECIAL_TOKENS
    tokenizer = Tokenizer(models.BPE(vocab, [(text(left), text(right)) for *_, left, right in merges],
                                     ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(HF_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    # Already in the vocabulary with dolma2's ids, so adding them only makes them special (matched whole).
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in data.SPECIAL_TOKENS])
    return tokenizer


def export_tokenizer(out_dir, model_max_length: int) -> None:
    """Write tokenizer.json and tokenizer_config.json: dolma2 with EOS <|endoftext|> and pad <|pad|>, no BOS
    (OlmPool's documents are separated by EOS alone), nothing added around the text."""
    out_dir = Path(out_dir)
    write_atomically(out_dir / "tokenizer.json", dolma2_hf_tokenizer().to_str(pretty=True))
    eos = {id_: token for token, id_ in data.SPECIAL_TOKENS.items()}[data.EOS_ID]
    pad = {id_: token for token, id_ in data.SPECIAL_TOKENS.items()}[data.PAD_ID]
    tokenizer_config = {
        # The class that loads tokenizer.json as it is; a model-specific class (Qwen2Tokenizer for qwen3)
        # could rebuild the pre-tokenizer from its own defaults.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": eos, "pad_token": pad, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {str(id_): {"content": token, "special": True, "lstrip": False, "rstrip": False,
                                            "normalized": False, "single_word": False}
                                 for token, id_ in sorted(data.SPECIAL_TOKENS.items(), key=lambda item: item[1])},
    }
    write_json_atomically(out_dir / "tokenizer_config.json", tokenizer_config, indent=2)


def generation_config() -> dict:
    """generation_config.json: stop at <|endoftext|>, pad with <|pad|>, greedy unless asked otherwise."""
    return {"bos_token_id": None, "eos_token_id": data.EOS_ID, "pad_token_id": data.PAD_ID, "do_sample": False}


def _matching_presets(config: ModelConfig) -> list[str]:
    """`preset(name, size=...)` calls whose architecture (shapes, switches, window) equals config's; RoPE
    and context length are left out, since extension changes them."""
    fields = ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "mlp_hidden",
              "norm_placement", "qk_norm", "norm_eps", "global_every")
    found = []
    for size in SIZES:
        for name in PRESETS:
            candidate = preset(name, size=size)
            same_window = (candidate.window is None) == (config.window is None)
            if same_window and all(getattr(candidate, f) == getattr(config, f) for f in fields):
                found.append(f"preset('{name}', size='{size}')")
    return found


def model_card(config: ModelConfig, model_type: str, source: str | None = None,
               train_state: dict | None = None, tokenizer: bool = True) -> str:
    """README.md for an exported folder: the architecture switches, the matching presets, the
    training and extension recipe (from the checkpoint's train_state.json when there is one), the source."""
    block = "x + f(norm(x)), as Llama" if config.norm_placement == "pre" else "x + norm(f(x)), as Olmo 2/3"
    heads = "GQA" if config.n_kv_heads < config.n_heads else "MHA"
    window = "none, every layer global"
    if config.window is not None:
        local = sum(w is not None for w in config.layer_windows)
        pattern = f"every {config.global_every}th and the last global" if config.global_every else "none global"
        window = f"{config.window} tokens on {local} of {config.n_layers} layers ({pattern})"
    rope = f"theta {config.rope_theta:g}" + (f", local {config.rope_theta_local:g}" if config.rope_theta_local else "")
    if config.rope_scaling != "none":
        rope += (f", {config.rope_scaling} x{config.rope_factor:g} on {config.rope_scaling_layers} layers from "
                 f"{config.original_context} tokens")
    switches = [f"- block norm: {config.norm_placement} ({block})", f"- QK norm: {config.qk_norm}",
                f"- attention heads: {config.n_heads} query, {config.n_kv_heads} key/value ({heads})",
                f"- sliding window: {window}", f"- context length: {config.context_length}", f"- RoPE: {rope}"]
    presets = _matching_presets(config)
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [olmpool]", "---", "",
        f"# OlmPool model exported as {STOCK_CLASSES[model_type]}", "",
        "An OlmPool (Ai2's study of attention choices for long-context extension) model, written by OlmPool's "
        "`hf_interop.py export` as a stock transformers class that computes the same logits.", "",
        "## Architecture", "", *switches, "", "```", describe(config), "```", "",
        "Preset: " + (", ".join(presets) if presets else "none of OlmPool's presets has this architecture") + ".", "",
        "## Tokenizer", "",
        ("dolma2 (OLMo 2/3): cl100k_base BPE with <|endoftext|> = 100257 (EOS, ends every document), "
         "<|pad|> = 100277, the FIM tokens and <|endofprompt|>; no BOS token. Special-token text in an input "
         "string becomes the special id." if tokenizer else
         "No tokenizer files were exported: encode text with the tokenizer this model was trained with."), "",
        "## Training and extension", "",
    ]
    if train_state:
        args = train_state.get("args", {})
        lines += [f"step {train_state.get('step')}, {train_state.get('tokens_seen')} tokens seen, saved "
                  f"{train_state.get('saved_at', 'at an unknown time')}. Arguments of the run:", "",
                  "```json", json.dumps(args, indent=2, sort_keys=True), "```", ""]
    else:
        lines += ["No train_state.json beside the weights: the recipe is not recorded in the source checkpoint.", ""]
    lines += ["## Source", "", f"{source or 'a Transformer in memory (no checkpoint folder)'}", ""]
    return "\n".join(lines)


def refuse_compact_vocabulary(checkpoint_dir) -> None:
    """A checkpoint trained on a compact vocabulary (data.COMPACT_VOCAB_FILE) numbers its tokens its own way."""
    path = Path(checkpoint_dir) / data.COMPACT_VOCAB_FILE
    if path.exists():
        raise CheckpointError(
            f"{path}: this checkpoint uses a compact vocabulary, so its token ids are not dolma2's; exported with "
            f"the dolma2 tokenizer it would read every text as the wrong tokens and give plausible garbage. Map its "
            f"embedding and lm_head rows back to dolma2 ids (one row per dolma2 id) and export that checkpoint, "
            f"or evaluate it with OlmPool's own tools, which read {data.COMPACT_VOCAB_FILE}")
