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
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import checkpoint
import data
import memory
import olmpool
import train
from checkpoint import Source
from olmpool import ROPE_FIELDS, ModelConfig, Transformer
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
    # (an absolute base: x16 from OlmPool's 500K, x800 from a 10K source; --rope_factor gives a ratio)
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
OLMPOOL_ABF_FACTOR = 8_000_000.0 / 500_000.0  # OlmPool's ABF as a ratio: 500K -> 8M is x16
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
    rope_theta_target: float | None = setting(None, "ABF: the new RoPE base (default: 8e6); or --rope_factor F: "
                                                    "the source's theta x F (OlmPool: 16)", EXTENSION)
    held_out_documents: int = setting(8, "then source vs extended loss on N val documents; 0: skip", EXTENSION)
    dry_run: bool = setting(False, "print the memory plan per GPU and exit", EXTENSION)
    gpus: int = setting(8, "--dry_run: GPUs to plan for (default: %(default)s)", EXTENSION)
    measure: bool = setting(False, "--dry_run: and measure a step on this CPU (small!)", EXTENSION)
    gpu_memory: float = setting(80.0, "--dry_run: GiB per GPU (default: %(default)s)", EXTENSION)


def build_parser() -> argparse.ArgumentParser:
    """extend.py's flags: train.py's, with the extension's defaults, then its own group."""
    return command_line(ExtendConfig, "extend.py", __doc__)


def parse_args(argv=None) -> ExtendConfig:
    return parse(ExtendConfig, build_parser(), argv, check=check_rope_flags)


def check_rope_flags(settings: ExtendConfig) -> None:
    """The RoPE change is said once: ABF's new base as a target (--rope_theta_target) or as a factor of
    the source's theta (--rope_factor, a ModelConfig flag: OlmPool's x16 whatever base the source had);
    and the control changes nothing. Checked when the flags are parsed, and again by resolve."""
    target, factor = settings.rope_theta_target, settings.model.get("rope_factor")
    scaling = RECIPES[settings.recipe].rope_scaling
    if target is not None and factor is not None:
        raise TrainError(f"--rope_theta_target {target:g} and --rope_factor {factor:g} both set the ABF base (a "
                         f"target, and a factor of the source's theta); give one of them")
    if target is not None and scaling != "abf":
        raise TrainError(f"--rope_theta_target applies to the ABF recipes (olmpool, olmpool_global), not "
                         f"{settings.recipe}; use --rope_factor there")
    if factor is not None and factor != 1 and scaling == "none":
        raise TrainError(f"--rope_factor {factor:g} with --recipe none: the control keeps RoPE unchanged; drop "
                         f"--rope_factor, or pick a recipe that scales RoPE (olmpool, olmpool_global, olmo3)")


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
    if filled["seq_len"] < source_config.context_length:
        raise TrainError(f"--seq_len {filled['seq_len']} is shorter than the source's context of "
                         f"{source_config.context_length} tokens: an extension lengthens it; pass --seq_len of at "
                         f"least {source_config.context_length} (e.g. {4 * source_config.context_length})")
    check_rope_flags(settings)
    given = dict(settings.model)  # an explicit --rope_factor: ABF's new base is the source's theta x it
    if settings.rope_theta_target is not None:
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
        rope = abf_line(settings, source_config, config, layers)
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


def abf_line(settings: ExtendConfig, source_config: ModelConfig, config: ModelConfig, layers: str) -> str:
    """ABF's factor and the base it gives, with the flag that set it; where the recipe's absolute base
    is not OlmPool's x16 of this source's theta (a 10K source: x800), a note saying how to keep x16."""
    spec, theta, factor = RECIPES[settings.recipe], source_config.rope_theta, config.rope_factor
    recipe_factor = spec.rope_theta_target / theta
    origin = ("--rope_theta_target" if settings.rope_theta_target is not None else
              "--rope_factor" if not math.isclose(factor, recipe_factor) else None)
    line = f"ABF: theta {theta:g} -> {theta * factor:g} (x{factor:g}{f', {origin}' if origin else ''}) on {layers}"
    if origin is None and not math.isclose(factor, OLMPOOL_ABF_FACTOR):
        line += (f"\n  note: x{factor:g} is the recipe's base {spec.rope_theta_target:g} over this source's theta "
                 f"{theta:g}; OlmPool's ABF is x{OLMPOOL_ABF_FACTOR:g} (500K -> 8M): --rope_factor "
                 f"{OLMPOOL_ABF_FACTOR:g} keeps that ratio")
    return line


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
        print(memory.memory_plan(config, settings.seq_len, settings.micro_batch, settings.gpus, settings.fsdp,
                                 settings.activation_checkpointing, settings.loss_chunk, settings.gpu_memory))
        if settings.measure:
            print(memory.compare_with_measurement(config, settings.seq_len, settings.micro_batch,
                                                  settings.activation_checkpointing, settings.loss_chunk))
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
    if summary["preempted"]:  # saved; the comparison waits for the finished run
        return summary
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
    train.run_main(extend, parse_args(argv))


if __name__ == "__main__":
    main()
