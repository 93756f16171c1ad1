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
        print(memory_plan(config, args))
        if args.measure:
            print(compare_with_measurement(config, args))
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
    for block in model.layers:
        block.activation_checkpointing = activation_checkpointing
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
