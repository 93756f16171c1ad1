"""Extend a pretrained OlmPool model's context: the study's second stage, with its recipes.

OlmPool compares architectures after context extension: each pretrained model trains a little
longer at 64K tokens with its RoPE stretched, on a mix rich in long documents. This is train.py
with other settings (ExtendConfig: extension defaults, plus where the weights come from and the
recipe). docs/training.md gives each recipe's numbers and what a size changes.

    python train.py && python extend.py                 # CPU demo: the default run, extended to 4x its length
    python extend.py --from runs/X/step_0000100 --recipe olmo3
    python extend.py --from hf:HF_DIR --recipe olmpool   # a released OlmPool checkpoint, through hf_interop.py
    python extend.py --recipe none                       # the control: same training, RoPE unchanged
    torchrun --nproc_per_node 8 extend.py --from runs/X/step_0034000 --fsdp --activation_checkpointing \\
        --compile --attention_backend flex --data data/long   # OlmPool's recipe at 64K on 8 GPUs
    python extend.py --dry_run --size 7b --gpus 8 --fsdp --activation_checkpointing   # memory per GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import checkpoint
import data
import olmpool
import train
from checkpoint import ROPE_FIELDS, CheckpointError, Source
from olmpool import ModelConfig, Transformer
from settings import (LEARNING_RATES, LOSS_CHUNK, RECIPE, RUN, TrainConfig, TrainError, command_line,
                      compact_vocab_size, from_record, model_config, parse, run_folder, run_name, setting)

# ----------------------------------------------------------------------------------------------
# Recipes


@dataclass(frozen=True)
class Recipe:
    """How a recipe changes RoPE; the training numbers (EXTENSION_TRAINING) are shared."""
    description: str
    rope_scaling: str = "none"  # ModelConfig.rope_scaling
    rope_theta_target: float | None = None  # ABF: the new base; rope_factor = target / the source's theta
    rope_factor: float = 1.0  # YaRN's factor
    rope_scaling_layers: str = "global"
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0


RECIPES = {
    "olmpool": Recipe("ABF 500K -> 8M on every layer (OlmPool)", "abf", 8_000_000.0, rope_scaling_layers="all"),
    "olmpool_global": Recipe("ABF 500K -> 8M on global layers only (cookbook ablation)", "abf", 8_000_000.0,
                             rope_scaling_layers="global"),
    "olmo3": Recipe("YaRN x8 on global layers only (Olmo 3)", "yarn", rope_factor=8.0, rope_scaling_layers="global",
                    yarn_beta_fast=32.0, yarn_beta_slow=1.0),
    "none": Recipe("control: RoPE unchanged, the same training at the new length"),
}
# OlmPool's extension training at 7B (cookbook): 64K tokens, 64 sequences (4,194,304 tokens) per
# step, 10B tokens = 2385 steps, warmup 200 to 2.9952e-4 then linear to 0.
EXTENSION_TRAINING = dict(seq_len=65_536, sequences=64, steps=2385, warmup=200, lr=2.9952e-4, pretraining_lr=3e-4)
# The CPU demo: `python extend.py` after `python train.py` in a few minutes. 25 steps of 2 x 1024
# tokens are the 51,200 tokens of the default pretraining (100 steps of 2 x 256), so it takes about
# as long (the tiny model's cost per token is mostly its LM head, whatever the length).
CPU_DEMO = dict(length_factor=4, sequences=2, steps=25)


def extended_config(source: ModelConfig, recipe: str, seq_len: int, **overrides) -> ModelConfig:
    """The source architecture at context seq_len with the recipe's RoPE; overrides (ModelConfig
    fields) win over the recipe's numbers."""
    if recipe not in RECIPES:
        raise TrainError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    if source.rope_scaling != "none":
        raise TrainError(f"the source already scales RoPE ({source.rope_scaling} x{source.rope_factor:g}); extend "
                         f"from its pretraining checkpoint, or pass --rope_scaling none to keep only its theta")
    spec = RECIPES[recipe]
    fields = dict(context_length=seq_len)
    if spec.rope_scaling == "abf":
        fields.update(rope_scaling="abf", rope_factor=spec.rope_theta_target / source.rope_theta,
                      rope_scaling_layers=spec.rope_scaling_layers)
    elif spec.rope_scaling == "yarn":
        fields.update(rope_scaling="yarn", rope_factor=spec.rope_factor, rope_scaling_layers=spec.rope_scaling_layers,
                      rope_original_context=source.context_length, yarn_beta_fast=spec.yarn_beta_fast,
                      yarn_beta_slow=spec.yarn_beta_slow)
    return dataclasses.replace(source, **(fields | overrides))


# ----------------------------------------------------------------------------------------------
# The settings: train.py's, with the extension's defaults, plus its own


EXTENSION = "extension (what extend.py adds to train.py's flags)"


@dataclass
class ExtendConfig(TrainConfig):
    """train.py's settings with the extension's defaults (None: the recipe's number for the size or
    device, filled in by resolve), plus where the weights come from, the recipe and --dry_run."""
    seq_len: int | None = setting(None, f"extended length (default: {EXTENSION_TRAINING['seq_len']:,} / shrink; CPU: "
                                        f"{CPU_DEMO['length_factor']}x)", RUN)
    micro_batch: int | None = setting(1, "sequences per device per pass (default: 1, fits 64K)", RUN)
    steps: int | None = setting(None, f"optimizer steps (default: OlmPool's {EXTENSION_TRAINING['steps']}; CPU: "
                                      f"{CPU_DEMO['steps']})", RUN)
    mask_documents: bool = setting(True, "attend only within each document (always here)", RUN)
    lr: float | None = setting(None, "peak lr (default: the source's last lr x 2.9952/3)", RECIPE)
    schedule: str = setting("linear", "decay after warmup; wsd: at the end (default: %(default)s)", RECIPE,
                            choices=("cosine", "linear", "wsd"))
    warmup: int | None = setting(None, f"warmup steps (default: {EXTENSION_TRAINING['warmup']}, or --steps / 10)",
                                 RECIPE)
    min_lr_ratio: float = setting(0.0, "final lr / peak lr (default: %(default)s)", RECIPE)

    source: str | None = setting(None, "checkpoint, run folder or hf:DIR (default: train.py's)", EXTENSION,
                                 flag="--from", metavar="DIR|hf:DIR")
    recipe: str = setting("olmpool", "olmpool (ABF 500K -> 8M, every layer), olmpool_global (global layers), "
                                     "olmo3 (YaRN x8), none (control) (default: %(default)s)", EXTENSION,
                          choices=tuple(RECIPES), metavar="NAME")
    rope_theta_target: float | None = setting(None, "ABF: the new RoPE base (default: 8e6)", EXTENSION)
    held_out_documents: int = setting(8, "then source vs extended loss on N val documents; 0: skip", EXTENSION)
    dry_run: bool = setting(False, "print the memory plan per GPU and exit", EXTENSION)
    gpus: int = setting(8, "--dry_run: GPUs to plan for (default: %(default)s)", EXTENSION)
    measure: bool = setting(False, "--dry_run: and measure a step on this CPU (small!)", EXTENSION)
    gpu_memory: float = setting(80.0, "--dry_run: GiB per GPU (default: %(default)s)", EXTENSION)


def build_parser() -> argparse.ArgumentParser:
    """extend.py's flags: train.py's, with the extension's defaults, then its own group."""
    return command_line(ExtendConfig, "extend.py", __doc__)


def parse_args(argv=None) -> ExtendConfig:
    return parse(ExtendConfig, build_parser(), argv)


# ----------------------------------------------------------------------------------------------
# The source and what it gives: the size, the learning rate, the extended config


def default_source() -> Path:
    """The newest checkpoint of the run `python train.py` makes with no arguments."""
    run = run_folder(run_name(TrainConfig()))
    found = checkpoint.checkpoints_in(run) if run.is_dir() else []
    if not found:
        raise TrainError(f"no checkpoint in {run}, where `python train.py` with no arguments saves its run; make one "
                         f"with `python train.py` (a few minutes on CPU), or pass --from runs/X/step_N or --from hf:DIR")
    return found[-1]


def resolve_source(spec: str | None) -> tuple[Source, ModelConfig, dict]:
    """(the source --from names, its ModelConfig, what its train_state.json says or {})."""
    source = checkpoint.find_source(spec if spec is not None else default_source(), flag="--from")
    return source, checkpoint.source_config(source, flag="--from"), source.train_state()


def size_of(config: ModelConfig, state: dict) -> str:
    """The train.py size a source was trained at: from its arguments, else by width (7b if none fits)."""
    if state.get("args", {}).get("size") in olmpool.SIZES:
        return state["args"]["size"]
    return next((name for name, shape in olmpool.SIZES.items() if shape["d_model"] == config.d_model), "7b")


def source_final_lr(state: dict, size: str) -> float:
    """The learning rate of the source's last step (train_state.json's settings; a setting an older
    train.py did not record takes its default, the size the one found), else train.py's peak rate for
    the size. OlmPool's pretraining never decayed (stopped at ~140B tokens of a trillions-long
    cosine), so its extension's 2.9952e-4 continues at the rate pretraining ended."""
    saved = state.get("args")
    if saved and state.get("step"):
        return train.lr_at(state["step"] - 1, from_record(TrainConfig, {"size": size} | saved))
    return LEARNING_RATES[size]


def training_defaults(settings: ExtendConfig, size: str, source_config: ModelConfig, source_state: dict,
                      cpu: bool) -> dict:
    """The run settings left to the recipe (None), scaled for the size or, on CPU, the demo's."""
    seq_len = settings.seq_len
    if seq_len is None:
        seq_len = (CPU_DEMO["length_factor"] * source_config.context_length if cpu
                   else EXTENSION_TRAINING["seq_len"] // olmpool.SIZES[size]["shrink"])
    steps = settings.steps
    if steps is None:
        steps = CPU_DEMO["steps"] if cpu else EXTENSION_TRAINING["steps"]
    filled = dict(size=size, seq_len=seq_len, steps=steps, batch_tokens=settings.batch_tokens,
                  warmup=settings.warmup, lr=settings.lr)
    if filled["batch_tokens"] is None:
        filled["batch_tokens"] = (CPU_DEMO["sequences"] if cpu else EXTENSION_TRAINING["sequences"]) * seq_len
    if filled["warmup"] is None:
        filled["warmup"] = min(EXTENSION_TRAINING["warmup"], max(1, steps // 10))
    if filled["lr"] is None:
        filled["lr"] = (source_final_lr(source_state, size) * EXTENSION_TRAINING["lr"]
                        / EXTENSION_TRAINING["pretraining_lr"])
    return filled


def resolve(settings: ExtendConfig, source_config: ModelConfig, source_state: dict,
            device_type: str) -> tuple[ExtendConfig, ModelConfig]:
    """(the settings with the recipe's defaults filled in, the extended ModelConfig). The settings'
    model is that config, every field given, so that train.py's model_config gives it back."""
    filled = training_defaults(settings, size_of(source_config, source_state), source_config, source_state,
                               device_type == "cpu")
    given = dict(settings.model)
    if settings.rope_theta_target is not None and RECIPES[settings.recipe].rope_scaling != "abf":
        raise TrainError(f"--rope_theta_target applies to the ABF recipes (olmpool, olmpool_global), not "
                         f"{settings.recipe}; use --rope_factor there")
    if settings.rope_theta_target is not None and "rope_factor" not in given:
        given["rope_factor"] = settings.rope_theta_target / source_config.rope_theta
    try:
        config = extended_config(source_config, settings.recipe, filled["seq_len"], **given)
    except ValueError as error:
        raise TrainError(str(error)) from None
    return dataclasses.replace(settings, **filled, model=dataclasses.asdict(config), gqa=None, swa=False), config


def describe_recipe(settings: ExtendConfig, source: Source | str, source_config: ModelConfig,
                    config: ModelConfig) -> str:
    s = settings
    spec = RECIPES[s.recipe]
    layers = {"all": "every layer", "global": "global layers only"}[config.rope_scaling_layers]
    if config.rope_scaling == "abf":
        rope = (f"ABF: theta {source_config.rope_theta:g} -> {source_config.rope_theta * config.rope_factor:g} "
                f"(x{config.rope_factor:g}) on {layers}")
    elif config.rope_scaling == "yarn":
        rope = (f"YaRN x{config.rope_factor:g}, beta_fast {config.yarn_beta_fast:g}, beta_slow "
                f"{config.yarn_beta_slow:g}, original context {config.original_context}, attention factor "
                f"{olmpool.rope_frequencies(config, True)[1]:.4f}, on {layers}")
    elif config.rope_scaling == "none":
        rope = f"unchanged (theta {config.rope_theta:g})"
    else:
        rope = f"{config.rope_scaling} x{config.rope_factor:g} on {layers}"
    return "\n".join([
        f"recipe {s.recipe}: {spec.description}",
        f"  source {source}: context {source_config.context_length}, size {s.size}",
        f"  RoPE: {rope}",
        f"  sequence {s.seq_len} ({s.seq_len / source_config.context_length:g}x), batch "
        f"{s.batch_tokens // s.seq_len} sequences = {s.batch_tokens:,} tokens, {s.steps} steps = "
        f"{s.steps * s.batch_tokens:,} tokens",
        f"  lr: warmup {s.warmup} steps to {s.lr:.5g}, then {s.schedule} to {s.lr * s.min_lr_ratio:g}; "
        f"AdamW betas ({s.beta1}, {s.beta2}), weight decay {s.weight_decay}, z-loss {s.z_loss}, clip "
        f"{s.grad_clip}; a fresh optimizer",
        f"  data: long-document mix, intra-document masking; cross-entropy in chunks of {s.loss_chunk} positions"])


# ----------------------------------------------------------------------------------------------
# Data: the long-document mix in train.py's loader slot


def mix_loaders(settings: TrainConfig, plan: train.BatchPlan, env: train.Distributed, folder: Path):
    seed = settings.data_seed if settings.data_seed is not None else settings.seed
    common = dict(seq_len=plan.seq_len, global_batch_size=plan.sequences, rank=env.rank, world_size=env.world_size,
                  seed=seed)
    train_loader = data.LongDocumentMix(folder, "train", planned_tokens=settings.steps * plan.tokens, **common)
    train.log(env, train_loader.describe())
    val_loader = None
    if settings.eval_every:
        try:
            val_loader = data.LongDocumentMix(folder, "val", **common)
        except data.DataError as error:
            train.log(env, f"warning: no validation loss: {error}")
    return train_loader, val_loader


def held_out_documents(folder: Path, length: int, limit: int) -> torch.Tensor:
    """The first length+1 tokens of up to `limit` val documents at least that long, (n, length+1)."""
    manifest = data.read_manifest(folder)
    rows = []
    for record in manifest["splits"].get("val", {}).get("shards", []):
        shard = data.read_shard(Path(folder) / record["file"], vocab_size=manifest["tokenizer"]["vocab_size"])
        starts = shard.doc_starts.astype(np.int64)
        ends = np.append(starts[1:], shard.tokens.size)
        for start, end in zip(starts, ends):
            if end - start >= length + 1 and len(rows) < limit:
                rows.append(np.asarray(shard.tokens[start:start + length + 1], dtype=np.int64))
    return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, length + 1, dtype=torch.int64)


@torch.no_grad()
def held_out_loss(model: Transformer, documents: torch.Tensor, chunk: int = LOSS_CHUNK) -> float:
    """Mean cross-entropy over every position of whole val documents (one document per row)."""
    model.eval()
    total = 0.0
    for row in documents:
        batch = data.Batch(row[None, :-1], row[None, 1:])
        total += train.model_loss_sums(model, batch, chunk)[0].item()
    return total / max(1, documents.shape[0] * (documents.shape[1] - 1))


# ----------------------------------------------------------------------------------------------
# The run


def default_out(source: Source, settings: ExtendConfig) -> Path:
    """runs/RUN-extend-RECIPE-LENGTH, RUN the source's run folder (or its own folder's name)."""
    name = source.folder
    run = name.parent.name if name.name.startswith("step_") else name.name
    return run_folder(f"{run}-extend-{settings.recipe}-{settings.seq_len}")


def extend(settings: ExtendConfig) -> dict:
    """Extend as settings say (train.train with the recipe's config and the mix); returns train.train's
    summary plus "held_out": {"source": loss, "extended": loss} when measured."""
    device_type = "cuda" if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()) \
        else "cpu"
    if settings.dry_run and settings.source is None:  # plan for a preset at a size; the plan is per GPU
        source, source_config, source_state = f"{settings.preset} at {settings.size}", model_config(settings), \
            {"args": {"size": settings.size}}
        device_type = "cuda"
    else:
        source, source_config, source_state = resolve_source(settings.source)
    settings, config = resolve(settings, source_config, source_state, "cuda" if settings.dry_run else device_type)
    if settings.dry_run:
        print(describe_recipe(settings, source, source_config, config))
        print(memory_plan(config, settings))
        if settings.measure:
            print(compare_with_measurement(config, settings))
        return {}
    settings = dataclasses.replace(settings, init_from=str(source),
                                   out=settings.out or str(default_out(source, settings)))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        print(describe_recipe(settings, source, source_config, config), flush=True)
    extras = {"extension": {
        "recipe": settings.recipe, "source": str(source), "source_step": source_state.get("step"),
        "pretraining_context": source_config.context_length, "seq_len": settings.seq_len,
        "rope": {k: getattr(config, k) for k in ROPE_FIELDS}}}
    summary = train.train(settings, make_loaders=mix_loaders, train_state_extras=extras)
    if settings.held_out_documents and rank0 and summary.get("checkpoint") and "RANK" not in os.environ:
        summary["held_out"] = compare_held_out(settings, source, source_config, config, Path(summary["checkpoint"]))
    return summary


def compare_held_out(settings: ExtendConfig, source: Source, source_config: ModelConfig, config: ModelConfig,
                     extended: Path) -> dict:
    """Loss at the new length on whole val documents: the source as it was, and the extended model."""
    folder = train.data_dir(settings.data, compact_vocab_size(settings), train.Distributed())  # what it trained on
    documents = held_out_documents(folder, settings.seq_len, settings.held_out_documents)
    if not len(documents):
        print(f"held-out: no val document of {settings.seq_len + 1} tokens in {folder}; skipped")
        return {}
    before = Transformer(dataclasses.replace(source_config, context_length=settings.seq_len), seed=None)
    train.load_initial_weights(before, str(source), before.config)
    after = Transformer(config, seed=None)
    train.load_initial_weights(after, str(extended), config)
    losses = {"source": held_out_loss(before, documents), "extended": held_out_loss(after, documents)}
    print(f"held-out loss on {len(documents)} val documents of {settings.seq_len} tokens: source (RoPE unchanged, "
          f"not trained at this length) {losses['source']:.4f} -> extended ({settings.recipe}) "
          f"{losses['extended']:.4f}")
    return losses


def main(argv=None):
    settings = parse_args(argv)
    try:
        extend(settings)
    except (TrainError, CheckpointError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------------------------
# --dry_run: the memory plan per GPU


GIB = 2**30


@dataclass
class MemoryPlan:
    """Bytes per GPU of one training step, by what holds them (see memory_plan)."""
    lines: list  # (name, bytes, why)
    persistent: int  # parameters, gradients, optimizer
    activations: int  # saved for backward at the end of the forward pass
    transient: int  # the largest short-lived allocation on top
    transients: dict

    @property
    def total(self) -> int:
        return self.persistent + self.activations + self.transient


def saved_bytes_per_token_per_layer(config: ModelConfig, activation_bytes: int, document_masks: bool,
                                    backend: str, seq_len: int) -> int:
    """What one block saves for backward, per token, as olmpool's block computes it (s = activation_bytes).

    Counted from autograd's saved tensors on CPU (measure_peak): each RMSNorm keeps its fp32 input,
    the fp32 normalized value and its output (2 x (8 + s) d for the two block norms); attention
    keeps the rotated q and k, v, its output, the reshaped output the o_proj reads (3 s q_size +
    2 s kv_size), a float32 logsumexp per head and the layer's RoPE cos/sin tables (8 head_dim); a
    QK norm adds its fp32 input and normalized value (8 (q_size + kv_size)); SwiGLU keeps gate, up,
    silu(gate) and their product (4 s F). SDPA with document masks keeps a dense additive mask (s
    bytes per key, T keys per token) per layer: at 64K, use the flex backend instead.
    """
    s, d, F = activation_bytes, config.d_model, config.mlp_hidden
    q_size, kv_size = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    qk_norm = 8 * (q_size + kv_size) if config.qk_norm != "none" else 0
    per_token = (2 * (8 + s) * d + 3 * s * q_size + 2 * s * kv_size + 4 * config.n_heads + 8 * config.head_dim
                 + qk_norm + 4 * s * F)
    if document_masks and backend == "sdpa":
        per_token += s * seq_len
    return per_token


def plan_memory(config: ModelConfig, seq_len: int, micro_batch: int, gpus: int, fsdp: bool,
                activation_checkpointing: bool, loss_chunk: int, activation_bytes: int = 2,
                document_masks: bool = True) -> MemoryPlan:
    """Memory of one process: AdamW in fp32 (parameters, gradients, two moments), activations in
    activation_bytes (bf16: 2 on GPU), one micro-batch of seq_len tokens."""
    P = olmpool.count_parameters(config)
    block = P - olmpool.count_parameters(dataclasses.replace(config, n_layers=config.n_layers - 1)) if config.n_layers > 1 \
        else P - 2 * config.vocab_size * config.d_model - config.d_model
    root = P - block * config.n_layers  # embeddings, LM head, final norm
    shards = gpus if fsdp else 1
    tokens = micro_batch * seq_len
    s = activation_bytes
    per_layer = saved_bytes_per_token_per_layer(config, s, document_masks, config.attention_backend, seq_len)
    outside = (8 + s) * config.d_model + 4  # the final norm (its output is what the chunked loss keeps), logsumexp
    lines = [("parameters (fp32)", 4 * P // shards, f"{P / 1e9:.2f}B x 4 bytes" + (f" / {gpus} shards" if fsdp else "")),
             ("gradients (fp32)", 4 * P // shards, "same as the parameters"),
             ("optimizer (AdamW, fp32)", 8 * P // shards, "two moments per parameter")]
    persistent = 16 * P // shards
    if activation_checkpointing:
        saved = tokens * (s * config.d_model * config.n_layers + outside)
        why = f"each block's input only: {s} x d_model x {config.n_layers} layers x {tokens:,} tokens"
    else:
        saved = tokens * (per_layer * config.n_layers + outside)
        why = f"{per_layer:,} bytes per token per layer x {config.n_layers} layers x {tokens:,} tokens"
    lines.append(("saved activations", saved, why))
    transients = {
        "recomputed block (checkpointing)": tokens * per_layer if activation_checkpointing else 0,
        "MLP backward": 3 * s * config.mlp_hidden * tokens,  # gradients of gate, up and their product
        "attention mask (sdpa, dense)": micro_batch * seq_len * seq_len * 2
        if document_masks and config.attention_backend == "sdpa" else 0,
        "loss chunk": 3 * 4 * min(loss_chunk, tokens) * config.vocab_size,  # fp32 logits, softmax, gradient
        "FSDP gathered block (+prefetch) and its gradient": 3 * s * block if fsdp else 0,
        "FSDP gathered root (embeddings, LM head)": 2 * s * root if fsdp else 0,
    }
    # The gathered parameters coexist with whichever compute transient is largest.
    gathered = transients["FSDP gathered block (+prefetch) and its gradient"] + \
        transients["FSDP gathered root (embeddings, LM head)"]
    compute = max(v for k, v in transients.items() if not k.startswith("FSDP"))
    largest = max((k for k in transients if not k.startswith("FSDP")), key=transients.get)
    lines.append((f"largest transient: {largest}", compute, "the biggest short-lived allocation of the step"))
    if fsdp:
        lines.append(("FSDP all-gathered parameters", gathered, f"one block ({block / 1e6:.0f}M) x2 for prefetch, its "
                      f"gradient, and the root ({root / 1e6:.0f}M), in {s}-byte precision"))
    return MemoryPlan(lines, persistent, saved, compute + gathered, transients)


def memory_plan(config: ModelConfig, args) -> str:
    """--dry_run: the plan per GPU, whether it fits --gpu_memory, and what would if it does not."""
    kwargs = dict(seq_len=args.seq_len, micro_batch=args.micro_batch, gpus=args.gpus, fsdp=args.fsdp,
                  activation_checkpointing=args.activation_checkpointing, loss_chunk=args.loss_chunk)
    plan = plan_memory(config, **kwargs)
    budget = args.gpu_memory * GIB
    out = [f"memory plan per GPU: {olmpool.count_parameters(config) / 1e9:.2f}B parameters, sequence {args.seq_len:,}, "
           f"micro-batch {args.micro_batch}, {args.gpus} GPU(s), {'FSDP2' if args.fsdp else 'DDP (replicated)'}, "
           f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}, bf16 activations, "
           f"attention backend {config.attention_backend}"]
    out += [f"  {name:52s} {size / GIB:8.2f} GiB  {why}" for name, size, why in plan.lines]
    fits = plan.total <= budget
    out.append(f"  {'total':52s} {plan.total / GIB:8.2f} GiB  of {args.gpu_memory:g} GiB: "
               f"{'fits' if fits else 'does NOT fit'} (without context parallelism; allocator slack, communication "
               f"buffers and backward's activation gradients are not counted: on CPU the measured peak ran up to "
               f"22% above the plan, so keep ~20% free)")
    if not fits:
        options = []
        for name, change in (("--fsdp", dict(fsdp=True)), ("--activation_checkpointing", dict(activation_checkpointing=True)),
                             ("--fsdp --activation_checkpointing", dict(fsdp=True, activation_checkpointing=True)),
                             ("--micro_batch 1", dict(micro_batch=1)), ("--gpus 16", dict(gpus=16, fsdp=True)),
                             ("--gpus 32", dict(gpus=32, fsdp=True))):
            total = plan_memory(config, **(kwargs | change)).total
            if total <= budget and change != {k: kwargs[k] for k in change}:
                options.append(f"{name} ({total / GIB:.1f} GiB)")
        cp = plan_memory(config, **(kwargs | dict(seq_len=args.seq_len // 8)))  # activations split over 8 ranks
        options.append(f"context parallelism of 8 as OlmPool did (activations / 8: ~"
                       f"{(cp.activations + cp.transient + plan.persistent) / GIB:.1f} GiB; not implemented here)")
        out.append("  would fit: " + "; ".join(options))
    return "\n".join(out)


def compare_with_measurement(config: ModelConfig, args) -> str:
    """--measure: the plan in fp32 for one process against measure_peak on this CPU."""
    plan = plan_memory(config, args.seq_len, args.micro_batch, 1, False, args.activation_checkpointing,
                       args.loss_chunk, activation_bytes=4)
    measured = measure_peak(config, args.seq_len, args.micro_batch, args.activation_checkpointing, args.loss_chunk)
    planned_peak = plan.activations + max(plan.transients.values())
    return (f"measured on this CPU in fp32, one process, micro-batch {args.micro_batch} of {args.seq_len}:\n"
            f"  saved activations (autograd's saved tensors): measured {measured['saved_activations'] / 2**20:.1f} MiB, "
            f"planned {plan.activations / 2**20:.1f} MiB ({plan.activations / measured['saved_activations'] - 1:+.1%})\n"
            f"  peak RSS growth over one forward and backward: measured {measured['peak_growth'] / 2**20:.1f} MiB, "
            f"planned activations + largest transient {planned_peak / 2**20:.1f} MiB "
            f"({planned_peak / max(1, measured['peak_growth']) - 1:+.1%})")


def measure_peak(config: ModelConfig, seq_len: int, micro_batch: int, activation_checkpointing: bool,
                 loss_chunk: int) -> dict:
    """Measured on this CPU, in fp32: (a) the bytes saved for backward (autograd's saved-tensor hooks,
    each storage once) and (b) the growth of the process's peak RSS over one forward and backward
    at seq_len, after a short warm-up step has allocated gradients. Compare with plan_memory(...,
    activation_bytes=4): (a) with its saved activations, (b) with activations + largest transient."""
    import resource

    torch.manual_seed(0)
    model = Transformer(config, seed=0)
    if activation_checkpointing:
        for block in model.layers:
            train.checkpoint_activations(block)
    tokens = torch.randint(0, config.vocab_size, (micro_batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.zeros(micro_batch, seq_len, dtype=torch.int32)
    doc_ids[:, seq_len // 2:] = 1  # two documents per row, so document masking is in play

    def step(length):
        batch = data.Batch(tokens[:, :length], tokens[:, 1:length + 1], doc_ids[:, :length])
        ce, z = train.model_loss_sums(model, batch, loss_chunk)
        (ce / length).backward()

    step(16)  # gradients exist from here on (not set to None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step(seq_len)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    storages, parameters = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        if tensor.is_floating_point() and tensor.untyped_storage().data_ptr() not in parameters:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        batch = data.Batch(tokens[:, :seq_len], tokens[:, 1:], doc_ids)
        train.model_loss_sums(model, batch, loss_chunk)
    saved = sum(storages.values())
    return {"saved_activations": saved, "peak_growth": after - before}


if __name__ == "__main__":
    main()
