"""Extend a pretrained OlmPool model's context: the study's second stage, with its recipes.

OlmPool compares architectures *after* context extension: each pretrained model is trained a little
longer at 64K tokens with its RoPE stretched, on a mix rich in long documents. This script is
train.py with another configuration (torchtitan's "same trainer, different config"): the same
parser, model, loop, checkpoints, torchrun/FSDP2/compile/activation checkpointing and --resume
auto; it adds only what differs: where the weights come from, the recipe's RoPE and schedule,
the long-document mix (data.LongDocumentMix), and a memory plan (--dry_run).

    python train.py && python extend.py                 # CPU demo: the default run, extended to 4x its length
    python extend.py --from runs/X/step_0000100 --recipe olmo3
    python extend.py --from hf:HF_DIR --recipe olmpool   # a released OlmPool checkpoint, through hf_interop.py
    python extend.py --recipe none                       # the control: same training, RoPE unchanged
    torchrun --nproc_per_node 8 extend.py --from runs/X/step_0034000 --fsdp --activation_checkpointing \\
        --compile --attention_backend flex --data data/long   # OlmPool's recipe at 64K on 8 GPUs
    python extend.py --dry_run --size 7b --gpus 8 --fsdp --activation_checkpointing   # memory per GPU

Recipes (../shared/reference/olmpool.md, "Extension recipe", from OLMo's cookbook; every number is
a flag and all are printed at start):
    olmpool         ABF: RoPE theta 500,000 -> 8,000,000 on every layer, sliding ones too
    olmpool_global  the same ABF on global (full-attention) layers only (the cookbook's ablation)
    olmo3           YaRN factor 8, beta_fast 32, beta_slow 1, original context = pretraining length,
                    on global layers only (Olmo 3's own recipe)
    none            the control: the same training at the new length with RoPE unchanged, which
                    separates what the RoPE change adds from what long-sequence training adds
All share OlmPool's training: 65,536-token sequences, batch 64 sequences, 2385 steps (10B tokens),
warmup 200 steps to 2.9952e-4 then linear decay to 0, AdamW as in pretraining with a fresh state
(the trainer state is not restored), intra-document masking, the long-document mix.

Sizes scale as in train.py: a size divides lengths by its shrink factor (tiny 32, 20m 8, 150m 4,
1b and 7b 1), so the default sequence is 65,536 / shrink; batch (64 sequences) and steps (2385)
stay, so the token budget shrinks with the length. The peak learning rate is the rate the source
ended pretraining at times OlmPool's extension/pretraining ratio (2.9952e-4 / 3e-4): OlmPool never
decayed its pretraining rate, so its extension continued at it. On CPU, where the point
is a demonstration in minutes, the defaults are 4x the source's pretraining length, 2 sequences
per batch and 25 steps (as many tokens as the default `python train.py`).

The extended checkpoint is a train.py checkpoint: config.json carries the new context_length and
RoPE fields, train_state.json adds "extension" (recipe, source, source step, lengths), and the
source's compact vocabulary file, if any, is copied along. `hf_interop.py export` writes its RoPE
per layer type, which transformers reads as ours.
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
import memory
import olmpool
import train
from olmpool import ModelConfig, Transformer
from train import TrainError

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
ROPE_FIELDS = ("rope_scaling", "rope_factor", "rope_scaling_layers", "rope_original_context", "yarn_beta_fast",
               "yarn_beta_slow")


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
# The command line: train.py's, plus one group


def build_parser() -> argparse.ArgumentParser:
    parser = train.build_parser()
    parser.prog, parser.description = "extend.py", __doc__
    group = parser.add_argument_group("extension (what extend.py adds to train.py's flags)")
    group.add_argument("--from", dest="source", metavar="DIR|hf:DIR",
                       help="the pretrained weights: a train.py checkpoint (step_N) or run folder (its newest "
                            "checkpoint), or hf:DIR, a Hugging Face folder through hf_interop.py (default: the "
                            "newest checkpoint of the default `python train.py` run)")
    group.add_argument("--recipe", choices=list(RECIPES), default="olmpool",
                       help="; ".join(f"{name}: {r.description}" for name, r in RECIPES.items()) + " (default: %(default)s)")
    group.add_argument("--rope_theta_target", type=float, help="ABF recipes: the new RoPE base (default: 8,000,000); "
                       "--rope_factor sets the ratio instead")
    group.add_argument("--held_out_documents", type=int, default=8,
                       help="at the end, the loss of the source and the extended model on up to this many val "
                            "documents of at least seq_len tokens; 0: skip (default: %(default)s)")
    group.add_argument("--dry_run", action="store_true",
                       help="print the memory plan per GPU for --preset/--size (or --from), --seq_len, --gpus, "
                            "--micro_batch, --fsdp, --activation_checkpointing and exit")
    group.add_argument("--gpus", type=int, default=8, help="--dry_run: GPUs to plan for (default: %(default)s)")
    group.add_argument("--measure", action="store_true",
                       help="--dry_run: also run one forward and backward of this model on this CPU in fp32 and print "
                            "the measured saved activations and peak memory growth beside the plan's (small sizes!)")
    group.add_argument("--gpu_memory", type=float, default=80.0,
                       help="--dry_run: GiB per GPU (default: %(default)s, an H100 or A100 80GB)")
    # Changed defaults: None means "the recipe's number, scaled for the size or device" (resolve()).
    parser.set_defaults(steps=None, micro_batch=1, schedule="linear", min_lr_ratio=0.0, mask_documents=True,
                        resume="auto")
    for action in parser._actions:  # say so in --help
        if action.dest == "steps":
            action.help = (f"optimizer steps (default: OlmPool's {EXTENSION_TRAINING['steps']}, 10B tokens at 7B; "
                           f"{CPU_DEMO['steps']} on CPU)")
        elif action.dest == "seq_len":
            action.help = (f"the extended length (default: {EXTENSION_TRAINING['seq_len']:,} divided by the size's "
                           f"shrink; on CPU {CPU_DEMO['length_factor']}x the source's pretraining length)")
        elif action.dest == "lr":
            action.help = (f"peak learning rate (default: the source's last learning rate x "
                           f"{EXTENSION_TRAINING['lr']} / {EXTENSION_TRAINING['pretraining_lr']}, OlmPool's ratio; "
                           f"train.py's rate for the size if unknown)")
        elif action.dest == "warmup":
            action.help = f"warmup steps (default: OlmPool's {EXTENSION_TRAINING['warmup']}, or a tenth of --steps if fewer)"
        elif action.dest == "micro_batch":
            action.help = "sequences per device per forward pass (default: 1, what fits at 64K)"
    return parser


def default_source() -> Path:
    """The newest checkpoint of the run `python train.py` makes with no arguments."""
    run = train.REPO_DIR / "runs" / train.run_name(train.parse_args([]))
    found = checkpoint.checkpoints_in(run) if run.is_dir() else []
    if not found:
        raise TrainError(f"no checkpoint in {run}, where `python train.py` with no arguments saves its run; make one "
                         f"with `python train.py` (a few minutes on CPU), or pass --from runs/X/step_N or --from hf:DIR")
    return found[-1]


def resolve_source(text: str | None) -> tuple[str, ModelConfig, dict]:
    """(--init_from value, the source's ModelConfig, what train_state.json says about it or {})."""
    if text is None:
        path = default_source()
    elif text.startswith("hf:"):
        import hf_interop

        try:
            return text, hf_interop.inspect_hf(text[3:]).config, {}
        except ValueError as error:
            raise TrainError(f"--from {text}: {error}") from None
    else:
        path = checkpoint.newest_checkpoint(text) or Path(text)  # a run folder: its newest checkpoint
    if not (path / checkpoint.CONFIG_FILE).is_file():
        raise TrainError(f"--from {path}: no config.json there; pass a checkpoint folder (runs/X/step_N), a run "
                         f"folder holding some, or hf:DIR for a Hugging Face folder")
    try:
        config = checkpoint.read_config(path)
    except checkpoint.CheckpointError as error:
        raise TrainError(f"--from {path}: {error}") from None
    return str(path), config, checkpoint.read_train_state(path)


def size_of(config: ModelConfig, state: dict) -> str:
    """The train.py size a source was trained at: from its arguments, else by width (7b if none fits)."""
    if state.get("args", {}).get("size") in olmpool.SIZES:
        return state["args"]["size"]
    return next((name for name, shape in olmpool.SIZES.items() if shape["d_model"] == config.d_model), "7b")


def source_final_lr(state: dict, size: str) -> float:
    """The learning rate of the source's last step (train_state.json's arguments), else train.py's
    peak rate for the size. OlmPool's pretraining never decayed (stopped at ~140B tokens of a
    trillions-long cosine), so its extension's 2.9952e-4 continues at the rate pretraining ended."""
    saved = state.get("args")
    if saved and state.get("step"):
        try:
            return train.lr_at(state["step"] - 1, argparse.Namespace(**saved))
        except (AttributeError, TypeError, KeyError):
            pass  # a checkpoint from an older train.py: fall back
    return train.LEARNING_RATES[size]


def resolve(args, source_config: ModelConfig, source_state: dict, device_type: str) -> ModelConfig:
    """Fill the recipe's defaults into args (in place) and return the extended ModelConfig."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig) if hasattr(args, f.name)}
    args.size = size_of(source_config, source_state)
    shrink = olmpool.SIZES[args.size]["shrink"]
    cpu = device_type == "cpu"
    if args.seq_len is None:
        args.seq_len = (CPU_DEMO["length_factor"] * source_config.context_length if cpu
                        else EXTENSION_TRAINING["seq_len"] // shrink)
    if args.batch_tokens is None:
        args.batch_tokens = (CPU_DEMO["sequences"] if cpu else EXTENSION_TRAINING["sequences"]) * args.seq_len
    if args.steps is None:
        args.steps = CPU_DEMO["steps"] if cpu else EXTENSION_TRAINING["steps"]
    if args.warmup is None:
        args.warmup = min(EXTENSION_TRAINING["warmup"], max(1, args.steps // 10))
    if args.lr is None:
        args.lr = source_final_lr(source_state, args.size) * EXTENSION_TRAINING["lr"] / EXTENSION_TRAINING["pretraining_lr"]
    if args.rope_theta_target is not None and RECIPES[args.recipe].rope_scaling != "abf":
        raise TrainError(f"--rope_theta_target applies to the ABF recipes (olmpool, olmpool_global), not "
                         f"{args.recipe}; use --rope_factor there")
    if args.rope_theta_target is not None and "rope_factor" not in given:
        given["rope_factor"] = args.rope_theta_target / source_config.rope_theta
    try:
        config = extended_config(source_config, args.recipe, args.seq_len, **given)
    except ValueError as error:
        raise TrainError(str(error)) from None
    for field in dataclasses.fields(ModelConfig):  # train.model_config(args) then rebuilds exactly this
        setattr(args, field.name, getattr(config, field.name))
    args.gqa, args.swa = None, False
    return config


def describe_recipe(args, source: str, source_config: ModelConfig, config: ModelConfig) -> str:
    spec = RECIPES[args.recipe]
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
        f"recipe {args.recipe}: {spec.description}",
        f"  source {source}: context {source_config.context_length}, size {args.size}",
        f"  RoPE: {rope}",
        f"  sequence {args.seq_len} ({args.seq_len / source_config.context_length:g}x), batch "
        f"{args.batch_tokens // args.seq_len} sequences = {args.batch_tokens:,} tokens, {args.steps} steps = "
        f"{args.steps * args.batch_tokens:,} tokens",
        f"  lr: warmup {args.warmup} steps to {args.lr:.5g}, then {args.schedule} to {args.lr * args.min_lr_ratio:g}; "
        f"AdamW betas ({args.beta1}, {args.beta2}), weight decay {args.weight_decay}, z-loss {args.z_loss}, clip "
        f"{args.grad_clip}; a fresh optimizer",
        f"  data: long-document mix, intra-document masking; cross-entropy in chunks of {args.loss_chunk} positions"])


# ----------------------------------------------------------------------------------------------
# Data: the long-document mix in train.py's loader slot


def mix_loaders(args, plan: train.BatchPlan, env: train.Distributed, folder: Path):
    seed = args.data_seed if args.data_seed is not None else args.seed
    common = dict(seq_len=plan.seq_len, global_batch_size=plan.sequences, rank=env.rank, world_size=env.world_size,
                  seed=seed)
    train_loader = data.LongDocumentMix(folder, "train", planned_tokens=args.steps * plan.tokens, **common)
    train.log(env, train_loader.describe())
    val_loader = None
    if args.eval_every:
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
def held_out_loss(model: Transformer, documents: torch.Tensor, chunk: int = train.LOSS_CHUNK) -> float:
    """Mean cross-entropy over every position of whole val documents (one document per row)."""
    model.eval()
    total = 0.0
    for row in documents:
        batch = data.Batch(row[None, :-1], row[None, 1:])
        total += train.model_loss_sums(model, batch, chunk)[0].item()
    return total / max(1, documents.shape[0] * (documents.shape[1] - 1))


# ----------------------------------------------------------------------------------------------
# The run


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def extend(args) -> dict:
    """Extend as args say (train.train with the recipe's config and the mix); returns train.train's
    summary plus "held_out": {"source": loss, "extended": loss} when measured."""
    device_type = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if args.dry_run and args.source is None:  # plan for a preset at a size; the plan is per GPU
        source, source_config, source_state = f"{args.preset} at {args.size}", train.model_config(args), \
            {"args": {"size": args.size}}
        device_type = "cuda"
    else:
        source, source_config, source_state = resolve_source(args.source)
    config = resolve(args, source_config, source_state, "cuda" if args.dry_run else device_type)
    if args.dry_run:
        print(describe_recipe(args, source, source_config, config))
        print(memory.memory_plan(config, args.seq_len, args.micro_batch, args.gpus, args.fsdp,
                                 args.activation_checkpointing, args.loss_chunk, args.gpu_memory))
        if args.measure:
            print(memory.compare_with_measurement(config, args.seq_len, args.micro_batch,
                                                  args.activation_checkpointing, args.loss_chunk))
        return {}
    args.init_from = source
    name = Path(source.removeprefix("hf:"))
    run = name.parent.name if name.name.startswith("step_") else name.name
    args.out = args.out or str(train.REPO_DIR / "runs" / f"{run}-extend-{args.recipe}-{args.seq_len}")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        print(describe_recipe(args, source, source_config, config), flush=True)
    extras = {"train_state": {"extension": {
        "recipe": args.recipe, "source": source, "source_step": source_state.get("step"),
        "pretraining_context": source_config.context_length, "seq_len": args.seq_len,
        "rope": {k: getattr(config, k) for k in ("rope_theta", *ROPE_FIELDS)}}}}
    summary = train.train(args, make_loaders=mix_loaders, checkpoint_extras=extras)
    if args.held_out_documents and rank0 and summary.get("checkpoint") and "RANK" not in os.environ:
        summary["held_out"] = compare_held_out(args, source, source_config, config, Path(summary["checkpoint"]))
    return summary


def compare_held_out(args, source: str, source_config: ModelConfig, config: ModelConfig, checkpoint: Path) -> dict:
    """Loss at the new length on whole val documents: the source as it was, and the extended model."""
    folder = train.data_dir(args, train.Distributed())  # the data the extension trained on, in its vocabulary
    documents = held_out_documents(folder, args.seq_len, args.held_out_documents)
    if not len(documents):
        print(f"held-out: no val document of {args.seq_len + 1} tokens in {folder}; skipped")
        return {}
    before = Transformer(dataclasses.replace(source_config, context_length=args.seq_len), seed=None)
    train.load_initial_weights(before, source, before.config)
    after = Transformer(config, seed=None)
    train.load_initial_weights(after, str(checkpoint), config)
    losses = {"source": held_out_loss(before, documents), "extended": held_out_loss(after, documents)}
    print(f"held-out loss on {len(documents)} val documents of {args.seq_len} tokens: source (RoPE unchanged, not "
          f"trained at this length) {losses['source']:.4f} -> extended ({args.recipe}) {losses['extended']:.4f}")
    return losses


def main(argv=None):
    args = parse_args(argv)
    try:
        extend(args)
    except (TrainError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
