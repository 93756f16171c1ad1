"""Pretrain an OlmPool architecture: one CPU to many GPU nodes, exact and restartable.

OlmPool's control is that every model saw the same tokens in the same order from the same initial
weights, so that only the architecture differs. Here that holds by construction: the data order is
a function of (data, seq_len, global batch, seed) alone (data.TokenLoader), the weights are drawn on
the CPU from a seeded generator whatever the world size (olmpool.Transformer.init_weights), and a
resumed run continues to the token with the saved optimizer, loader and RNG states.

    python train.py                                             # tiny default on the built-in corpus, CPU, minutes
    python train.py --qk_norm headwise --gqa 4                  # switches on top of the default preset
    python train.py --preset G_pre_8kv_8k_14k --size 20m --data data/mine --steps 2000
    torchrun --nproc_per_node 8 train.py --qk_norm headwise --gqa 4          # DDP over 8 GPUs
    torchrun --nproc_per_node 8 train.py --size 7b --preset H_post_LQK_32kv_8k_11k_SWA --fsdp --compile \\
        --activation_checkpointing --batch_tokens 4194304 --micro_batch 1 --lr 3e-4 --warmup 2000 \\
        --steps 34000 --save_every 1000 --keep_checkpoints 0 --resume auto        # the OlmPool 7B recipe
    # several nodes (the usual torchrun rendezvous; run the same line on every node):
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        --rdzv_id olmpool_j train.py --fsdp ... --out /shared/runs/j --resume auto
    python train.py --resume auto ...                           # after preemption: the same command again

Every ModelConfig field is a flag; flags given explicitly override `--preset` at `--size`. The
recipe is OlmPool's (OLMo-core's pretraining scripts, ../shared/reference/olmpool.md): AdamW betas
(0.9, 0.95), weight decay 0.1 except on embeddings and 1-D parameters, z-loss 1e-5, gradient
clipping at 1.0, warmup then cosine, loss normalized by the global number of target tokens. Sizes
other than 7B use a larger learning rate (see LEARNING_RATES).

Parallelism: one process, or under torchrun DDP by default (NCCL on GPU, gloo on CPU) or FSDP2 by
`--fsdp` (fully_shard per block then the root; bf16 parameters with fp32 gradient reduction on
GPU, fp32 on CPU). bf16 autocast on GPU, fp32 on CPU. `--compile` compiles each block;
`--activation_checkpointing` recomputes each block's activations in the backward pass.

Checkpoints (OUT/step_0001000/, written under a temporary name, fsynced, renamed when complete):
    config.json         dataclasses.asdict(ModelConfig): the architecture, rebuilt by ModelConfig(**json)
    model.safetensors   olmpool.Transformer's state_dict, full fp32 tensors (with --fsdp: gathered on rank 0)
    optimizer.pt        AdamW's state_dict, read with torch.load(weights_only=True) (without --fsdp)
    dcp/                model and optimizer, sharded, via torch.distributed.checkpoint (with --fsdp)
    train_state.json    step, tokens seen, loader position, the arguments, RNG states, every file's size
    compact_vocab.json  the data's compact vocabulary, when it has one (compact_vocabulary.tokenizer_for reads it)
`--resume auto` continues from the newest intact checkpoint in --out (nothing there: a fresh
start), skipping damaged ones with a warning; resuming an older one moves the newer ones aside to
OUT/abandoned/. `--init_from DIR` (or `hf:DIR`, through hf_interop.py) only takes a checkpoint's
weights, from model.safetensors: nothing from another person's folder is unpickled (DCP's metadata
is a pickle, so only --resume, for one's own runs, reads dcp/). SIGTERM finishes the step, saves a
checkpoint and exits with status 143 (give the scheduler's grace period room for one step and one
save); a non-finite loss or gradient norm stops the run without saving. Every flag is checked
before any work (validate_run_args, check_run_fits, check_vocabulary). On a multi-node
run --out must be on a filesystem every node sees. OUT/metrics.jsonl gets one line per step (loss,
z_loss, lr, grad_norm, tokens_seen, tokens_per_s, mfu, peak_memory_gib, and when measured val_loss and
val_bits_per_byte); a
resumed run appends, so steps after its checkpoint appear twice and the later line is the one that
counts. On CPU, exact resume also needs the same thread count, which train_state.json records.

Vocabulary. The tiny size on the built-in corpus trains on a compact vocabulary (--compact_vocab,
data.py's "Compact vocabulary": 8192 ids, the bytes, EOS/pad and the corpus's most frequent dolma2
tokens; lossless), since dolma2's 100,352-row LM head is ~93% of a tiny model's FLOPs. Then seq_len
and tokens count compact tokens, and losses are nats per compact token; val_bits_per_byte compares
across vocabularies. Other sizes, and --data folders, keep their own vocabulary (dolma2 unless the
folder was prepared with --compact_vocab). A checkpoint refuses data in another vocabulary.

The file reads top to bottom, each part defined before its first use: 1. the command line,
2. set-up (the architecture, the processes, memory), 3. build (model, initial weights, optimizer,
schedule), 4. data, 5. one step of the loop (the loss, the optimizer step, evaluation, logging),
6. save and resume, 7. the run itself (`run`: set up, find the checkpoint to resume, prepare the
data, build, loop, saving as it goes) and `main`. The model files of a checkpoint (config.json,
model.safetensors) are written through checkpoint.py, whose readers extend.py, evaluate.py and
hf_interop.py share.

Reused by extend.py: build_parser, parse_args, model_config, run_name, lr_at, data_dir, log,
checkpoint_activations, model_loss_sums, load_initial_weights, and train(args, make_loaders=...,
checkpoint_extras=...), its two hooks (the long-document mix; the recipe in train_state.json). The
loss is chunked over positions (ChunkedCrossEntropy, --loss_chunk), so full (tokens x vocabulary)
fp32 logits never exist.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import pickle
import random
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import checkpoint
import compact_vocabulary
import data
import memory
import olmpool
from checkpoint import CheckpointError, checkpoints_in
from olmpool import ModelConfig, Transformer

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_PRESET = "H_post_LQK_32kv_8k_11k_SWA"  # Olmo 3 7B's architecture, the OlmPool "H" family
DEFAULT_SIZE = "tiny"  # trains on a laptop CPU in minutes
# Peak learning rate by size. 7B: OlmPool's 3e-4. Smaller models tolerate, and need, larger steps
# (the best rate falls roughly with width: GPT-3's table runs from 6e-4 at 125M to 1.2e-4 at 6.7B);
# tiny's 3e-3 trains stably on the built-in corpus (loss 11.6 -> ~5.5 in the default 100 steps of
# 512 tokens on dolma2; 9.0 -> ~6.1 on the compact 8192 vocabulary, val 3.3 bits/byte); the middle
# sizes are interpolations, still to be tuned.
LEARNING_RATES = {"tiny": 3e-3, "20m": 1e-3, "150m": 6e-4, "1b": 4e-4, "7b": 3e-4}
# Dense bf16 peak FLOP/s by GPU name (NVIDIA datasheets, SXM parts); anything else: --peak_flops.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# Default global batch in sequences, by device: fixed, so that the data order never depends on the
# world size (pass --batch_tokens to compare runs across devices).
DEFAULT_SEQUENCES = {"cpu": 2, "cuda": 64}
# Compact vocabulary by size, for the built-in corpus (0: dolma2). 8192 ids keep 95% of its dolma2
# tokens whole and train ~10x the bytes of text per second of the full vocabulary at tiny
# (`python bench.py --vocab`); published sizes keep dolma2, as OlmPool does.
COMPACT_VOCAB_BY_SIZE = {"tiny": 8192}
# Exit status after SIGTERM once the checkpoint is saved: 128 + SIGTERM, what a shell reports for a
# process ended by SIGTERM, so a scheduler tells "preempted, saved, resume me" (143) from "finished" (0).
PREEMPTED_EXIT_STATUS = 143
ABANDONED_FOLDER = "abandoned"  # OUT/abandoned/TIME/step_N: checkpoints of a branch given up by a rollback
LOSS_CHUNK = olmpool.LOSS_CHUNK  # --loss_chunk's default: the model's chunked loss's own


# ----------------------------------------------------------------------------------------------
# Errors and messages, used throughout


class TrainError(ValueError):
    """A problem with the user's run, flags or checkpoints; the message names it and the fix."""


def log(env: Distributed, message: str):
    if env.is_main:
        print(message, flush=True)


def warn(message: str):
    """Print a warning once per run (rank 0, or a process outside torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------------------------
# 1. The command line: every ModelConfig field is a flag, beside the run's own flags


def int_or_none(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def float_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


int_or_none.__name__, float_or_none.__name__ = "int or none", "float or none"  # argparse: "invalid int or none value"


# Every ModelConfig field is a flag, with this help. A field without a row here stops build_parser
# with a KeyError, so a new switch in olmpool.py cannot go missing from the command line.
MODEL_FLAG_HELP = {
    "vocab_size": "vocabulary rows (default: the data's; dolma2: 100,278 ids padded to 100,352)",
    "n_layers": "transformer blocks",
    "d_model": "width of the residual stream",
    "n_heads": "query heads",
    "n_kv_heads": "key/value heads; fewer than n_heads is GQA (Llama 3, Qwen 3: 8 of 32)",
    "head_dim": "width of one attention head",
    "mlp_hidden": "SwiGLU width; OlmPool widens it as n_kv_heads shrinks (11008-14336)",
    "norm_placement": '"pre": x + f(norm(x)) (Llama, Qwen 3); "post": x + norm(f(x)) (Olmo 2/3)',
    "qk_norm": '"none" (Llama) | "layerwise" (Olmo 2/3) | "headwise" (Qwen 3, Gemma 3)',
    "window": "sliding window of the local layers (Olmo 3: 4096); none: every layer global",
    "global_every": "with a window, every 4th layer is global (3 local : 1 global) and so is the last; "
                    "0: no global layer at all (every layer windowed, to study a model's reach)",
    "context_length": "pretraining sequence length (OlmPool: 4096 or 8192)",
    "rope_theta": "base of the RoPE frequencies (Llama 3, Olmo 3: 500K; Qwen 3: 1M)",
    "rope_theta_local": "RoPE base of the windowed layers (Gemma 3: 10K); none: rope_theta",
    "rope_scaling": '"abf" base x factor (OlmPool: 500K -> 8M) | "pi" positions / factor | "yarn" (Olmo 3 '
                    'at 64K) | "llama3" stepwise per frequency (Llama 3.1)',
    "rope_factor": "the scaling factor (ABF 16 for 500K -> 8M; YaRN and llama3: 8)",
    "rope_scaling_layers": "scale only the global layers (Olmo 3's YaRN) or all layers",
    "rope_original_context": "the context the scaling stretches from; none: context_length",
    "yarn_beta_fast": "YaRN: frequencies rotating more than this many times are kept",
    "yarn_beta_slow": "YaRN: frequencies rotating fewer times are fully interpolated",
    "yarn_attention_factor": "YaRN: cos/sin scale; none: 0.1 ln(factor) + 1",
    "llama3_low_freq_factor": "llama3: wavelengths above context / this are divided by the factor",
    "llama3_high_freq_factor": "llama3: wavelengths below context / this are kept",
    "norm_eps": "RMSNorm epsilon (Olmo, Qwen: 1e-6; Llama: 1e-5)",
    "attention_backend": '"naive" (reference) | "sdpa" | "flex" | "triton"; all compute the same',
}

# A flag's type is its field's default's; a field whose default is None (off) takes a number or "none".
NULLABLE_FLAG_TYPES = {"window": int_or_none, "rope_theta_local": float_or_none, "rope_original_context": int_or_none,
                       "yarn_attention_factor": float_or_none}


def add_model_flags(parser: argparse.ArgumentParser):
    model = parser.add_argument_group(
        "model", f"the architecture: --preset at --size, then any field below (default {DEFAULT_PRESET} at "
                 f"{DEFAULT_SIZE}; `python olmpool.py` lists the presets)")
    model.add_argument("--preset", default=DEFAULT_PRESET, metavar="NAME",
                       help="an OlmPool model (e.g. G_pre_8kv_8k_14k) or baseline (llama3_like, olmo3_like, qwen3_like)")
    model.add_argument("--size", default=DEFAULT_SIZE, choices=list(olmpool.SIZES),
                       help="the preset's switches at this size (default: %(default)s)")
    model.add_argument("--gqa", type=int, metavar="N",
                       help="grouped-query ratio n_heads / n_kv_heads: N query heads share each key/value head "
                            "(mlp_hidden unchanged; OlmPool's presets widen it as kv heads shrink)")
    model.add_argument("--swa", action="store_true",
                       help="sliding-window attention at OlmPool's width (4096 at 7B, scaled like the preset: "
                            "128 at tiny), 3 local : 1 global layers; --window W sets another width")
    shown = olmpool.preset(DEFAULT_PRESET, DEFAULT_SIZE)
    for field in dataclasses.fields(ModelConfig):  # a flag given explicitly overrides the preset
        kind = NULLABLE_FLAG_TYPES[field.name] if field.default is None else type(field.default)
        model.add_argument(f"--{field.name}", type=kind, choices=olmpool.CHOICES.get(field.name),
                           default=argparse.SUPPRESS, metavar=field.name.upper(),
                           help=f"{MODEL_FLAG_HELP[field.name]} [default preset: {getattr(shown, field.name)!r}]")


def add_run_flags(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("run")
    group.add_argument("--data", metavar="DIR", help="a folder made by `python data.py prepare` (default: the "
                       "built-in corpus, prepared into data/builtin on first use)")
    group.add_argument("--compact_vocab", type=int, metavar="N",
                       help="train on a compact vocabulary of N ids built from the data's train split (bytes, EOS/pad, "
                            "its most frequent dolma2 tokens; lossless): seq_len and losses then count compact tokens, "
                            "and val is also reported in bits per byte. 0: dolma2. With --data, a dolma2 folder is "
                            f"compacted into DIR_vN (default: {COMPACT_VOCAB_BY_SIZE} on the built-in corpus, else 0; "
                            "with --data, the folder's own vocabulary; with --init_from, the checkpoint's)")
    group.add_argument("--out", metavar="DIR", help="checkpoints and metrics.jsonl (default: runs/NAME)")
    group.add_argument("--name", help="run name (default: from the preset, size and model flags)")
    group.add_argument("--seed", type=int, default=0, help="weight init and data order (default: %(default)s)")
    group.add_argument("--data_seed", type=int, help="data order only (default: --seed); keep it fixed across "
                       "architectures so that they see the same tokens")
    group.add_argument("--seq_len", type=int, help="tokens per sequence (default: the config's context_length)")
    group.add_argument("--batch_tokens", type=int,
                       help=f"global batch in tokens, a multiple of seq_len (default: {DEFAULT_SEQUENCES['cpu']} sequences "
                            f"on CPU, so that `python train.py` takes minutes; {DEFAULT_SEQUENCES['cuda']} on GPU, which split "
                            f"over up to 32 GPUs; OlmPool 7B: 4194304)")
    group.add_argument("--micro_batch", type=int, help="sequences per device per forward pass; gradient "
                       "accumulation makes up the rest of the global batch (default: 2 if it divides each process's "
                       "share of the global batch, else 1, so that any world size dividing the batch runs)")
    group.add_argument("--steps", type=int, default=100, help="optimizer steps the schedule spans (default: %(default)s)")
    group.add_argument("--stop_at", type=int, metavar="STEP", help="save and stop after this step, leaving the "
                       "schedule as --steps plans it (for time-limited jobs)")
    group.add_argument("--mask_documents", action="store_true", help="attend only within each document (doc_ids "
                       "to the model; use --attention_backend flex at long seq_len)")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: the local GPU under torchrun, or cuda:0, else the CPU (default: %(default)s)")
    group.add_argument("--threads", type=int, help="CPU threads per process (default: torch's, the physical cores; "
                       "fewer on a busy machine; a resumed run keeps its first run's number, so its sums match exactly)")
    group.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP2)")
    group.add_argument("--compile", action="store_true", help="torch.compile each block")
    group.add_argument("--activation_checkpointing", action="store_true",
                       help="recompute each block's activations in the backward pass: less memory, ~1/3 more compute")
    group.add_argument("--loss_chunk", type=int, default=LOSS_CHUNK, metavar="POSITIONS",
                       help="cross-entropy over this many positions at a time, so (tokens x vocabulary) fp32 logits "
                            "never exist at once (default: %(default)s; results do not depend on it)")


def add_recipe_flags(parser: argparse.ArgumentParser):
    recipe = parser.add_argument_group("optimizer and schedule (OlmPool's recipe)")
    recipe.add_argument("--lr", type=float, help=f"peak learning rate (default by --size: {LEARNING_RATES})")
    recipe.add_argument("--schedule", choices=("cosine", "linear", "wsd"), default="cosine",
                        help="after warmup: cosine or linear decay to --min_lr_ratio, or wsd: constant, then a "
                             "linear decay over the last --decay_fraction of the steps (default: %(default)s)")
    recipe.add_argument("--warmup", type=int,
                        help="linear warmup steps (default: OlmPool's 2000, or a tenth of --steps if fewer)")
    recipe.add_argument("--min_lr_ratio", type=float, default=0.1, help="final lr / peak lr (default: %(default)s)")
    recipe.add_argument("--decay_fraction", type=float, default=0.2,
                        help="wsd: share of steps spent decaying (default: %(default)s)")
    recipe.add_argument("--weight_decay", type=float, default=0.1,
                        help="AdamW decay, not on embeddings and norms (default: %(default)s)")
    recipe.add_argument("--beta1", type=float, default=0.9)
    recipe.add_argument("--beta2", type=float, default=0.95)
    recipe.add_argument("--eps", type=float, default=1e-8)
    recipe.add_argument("--z_loss", type=float, default=1e-5, help="weight of logsumexp(logits)^2, which keeps the "
                        "softmax normalizer near 1 (PaLM; default: %(default)s)")
    recipe.add_argument("--grad_clip", type=float, default=1.0,
                        help="clip the global gradient norm to this (default: %(default)s)")


def add_checkpoint_flags(parser: argparse.ArgumentParser):
    checkpoints = parser.add_argument_group("checkpoints, evaluation and logging")
    checkpoints.add_argument("--save_every", type=int, default=50,
                             help="checkpoint every N steps (default: %(default)s; OlmPool: 1000)")
    checkpoints.add_argument("--keep_checkpoints", type=int, default=3,
                             help="keep the newest K, 0 keeps all (default: %(default)s)")
    checkpoints.add_argument("--resume", metavar="auto|never|DIR", default="auto",
                             help="auto: continue from the newest complete checkpoint in --out, if any, so the same "
                                  "command resumes after preemption; never: refuse an --out that holds checkpoints; "
                                  "or a checkpoint folder (default: %(default)s). Resuming a checkpoint older than "
                                  "the newest in --out is a rollback: the newer ones (another branch) move to "
                                  "OUT/abandoned/TIME/, never deleted, so --resume auto then continues the branch "
                                  "resumed; a damaged checkpoint is skipped by auto (with a warning) and refused "
                                  "by name")
    checkpoints.add_argument("--init_from", metavar="DIR|hf:DIR",
                             help="start from these weights (a checkpoint folder's model.safetensors, or a Hugging "
                                  "Face folder via hf_interop.py) with a fresh optimizer and step 0; a checkpoint found "
                                  "by --resume wins. Only safetensors are read: nothing here is unpickled")
    checkpoints.add_argument("--eval_every", type=int, default=50, help="validation loss every N steps and at the "
                             "end; 0: never (default: %(default)s)")
    checkpoints.add_argument("--eval_batches", type=int, default=4,
                             help="global batches of the val split per evaluation, spread evenly over it (default: %(default)s)")
    checkpoints.add_argument("--log_every", type=int, default=10,
                             help="print a progress line every N steps (default: %(default)s)")
    checkpoints.add_argument("--peak_flops", type=float, help="peak FLOP/s of one device for MFU (default: a table of "
                             "GPUs; on CPU a matmul measured at start)")


# Run flags and the values they take: (flag, test, what the test asks, an example). A flag that is
# None was not given and takes its default. Checked before any work, so a bad value never trains,
# never writes a checkpoint and never fails halfway through a run.
RUN_FLAG_RULES = [
    *[(name, lambda v: v >= 1, "a positive integer", example) for name, example in (
        ("micro_batch", 1), ("batch_tokens", 4096), ("seq_len", 256), ("steps", 100), ("stop_at", 50),
        ("save_every", 50), ("log_every", 10), ("eval_batches", 4), ("threads", 1))],
    *[(name, lambda v: v >= 0, "a non-negative integer", example) for name, example in (
        ("eval_every", 50), ("keep_checkpoints", 3), ("warmup", 2000), ("seed", 0), ("data_seed", 0))],
    ("lr", lambda v: 0 < v < math.inf, "a positive finite number", 3e-4),
    ("grad_clip", lambda v: v > 0, "positive (inf: no clipping)", 1.0),
    ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]", 0.1),
    ("decay_fraction", lambda v: 0 < v <= 1, "in (0, 1]", 0.2),
    ("weight_decay", lambda v: 0 <= v < math.inf, "a non-negative finite number", 0.1),
    ("beta1", lambda v: 0 <= v < 1, "in [0, 1)", 0.9),
    ("beta2", lambda v: 0 <= v < 1, "in [0, 1)", 0.95),
    ("eps", lambda v: 0 < v < math.inf, "a positive finite number", 1e-8),
    ("z_loss", lambda v: 0 <= v < math.inf, "a non-negative finite number", 1e-5),
    ("peak_flops", lambda v: 0 < v < math.inf, "a positive finite number of FLOP/s", 989e12),
]


def validate_run_args(args):
    """Refuse any run flag outside its range, naming the value and a valid one (TrainError). Checks
    that need the model or the data are in check_run_fits (memory) and check_vocabulary."""
    for name, ok, wanted, example in RUN_FLAG_RULES:
        value = getattr(args, name, None)
        if value is not None and not ok(value):  # nan fails every comparison, so it is refused too
            raise TrainError(f"--{name} {value} must be {wanted}; e.g. --{name} {example}")
    if getattr(args, "out", None) and Path(args.out).exists() and not Path(args.out).is_dir():
        raise TrainError(f"--out {args.out} is a file; pass a folder for checkpoints and metrics.jsonl")
    resume = getattr(args, "resume", "auto")
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        raise TrainError(f"--resume {resume} is neither auto, never, nor a folder; pass a step_N folder written "
                         f"by train.py, or --resume auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    add_run_flags(parser)
    add_recipe_flags(parser)
    add_checkpoint_flags(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_run_args(args)
        model_config(args)  # fail now, with the flags' names, rather than after setting up
    except (TrainError, ValueError) as error:
        parser.error(str(error))
    return args


# ----------------------------------------------------------------------------------------------
# 2. Set-up: the architecture, the run's name, the processes and their memory


def compact_vocab_size(args) -> int | None:
    """--compact_vocab, else its default: None (the folder's own vocabulary) with --data; with
    --init_from, the vocabulary of the weights (a Hugging Face folder's: dolma2); else
    COMPACT_VOCAB_BY_SIZE on the built-in corpus."""
    if getattr(args, "compact_vocab", None) is not None:
        return args.compact_vocab
    if getattr(args, "data", None):
        return None
    if init_from := getattr(args, "init_from", None):
        path = Path(init_from) / data.COMPACT_VOCAB_FILE
        if init_from.startswith("hf:") or not path.is_file():
            return 0
        vocab = data.read_compact_vocab(path)
        return vocab.get("requested_vocab_size", vocab["vocab_size"])
    return COMPACT_VOCAB_BY_SIZE.get(args.size, 0)


def data_vocab_size(args) -> int | None:
    """Ids of the compact vocabulary this run's data will use, or None for dolma2 (the preset's)."""
    requested = compact_vocab_size(args)
    if requested:
        compact_vocabulary.check_compact_vocab_size(requested)  # at parse time, naming the minimum
    if getattr(args, "data", None) and (Path(args.data) / data.COMPACT_VOCAB_FILE).is_file():
        return data.read_compact_vocab(Path(args.data) / data.COMPACT_VOCAB_FILE)["vocab_size"]
    return requested or None  # a folder about to be compacted holds at most `requested` ids


def model_config(args) -> ModelConfig:
    """--preset at --size, then every model flag given explicitly, --swa and --gqa. A new --n_heads
    keeps the preset's GQA ratio unless --gqa or --n_kv_heads says otherwise."""
    fields = [field.name for field in dataclasses.fields(ModelConfig)]
    overrides = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    base = olmpool.preset(args.preset, args.size)
    if args.swa and "window" not in overrides:
        overrides["window"] = 4096 // olmpool.SIZES[args.size]["shrink"]
    n_heads = overrides.get("n_heads", base.n_heads)
    if args.gqa is not None:
        if "n_kv_heads" in overrides:
            raise TrainError(f"--gqa {args.gqa} and --n_kv_heads {overrides['n_kv_heads']} both set the key/value "
                             f"heads; give one of them")
        valid = olmpool.head_divisors(n_heads)  # the GQA ratios, as the n_kv_heads, divide n_heads
        if args.gqa not in valid:
            raise TrainError(f"--gqa {args.gqa} does not divide n_heads={n_heads}; use one of {', '.join(map(str, valid))}")
        overrides["n_kv_heads"] = n_heads // args.gqa
    elif "n_heads" in overrides and "n_kv_heads" not in overrides:  # keep the preset's GQA ratio, a switch
        overrides["n_kv_heads"] = max(1, n_heads // (base.n_heads // base.n_kv_heads))
    if "vocab_size" not in overrides and (vocab := data_vocab_size(args)):  # the model's vocabulary is the data's
        overrides["vocab_size"] = compact_vocabulary.padded_vocab_size(vocab)
    return olmpool.preset(args.preset, args.size, **overrides)


def run_name(args) -> str:
    """preset-size plus each explicit model flag, so two ablations never share a folder by accident."""
    parts = [args.preset, args.size]
    parts += [f"gqa{args.gqa}"] if args.gqa is not None else []
    parts += ["swa"] if args.swa else []
    parts += [f"vocab{args.compact_vocab}"] if getattr(args, "compact_vocab", None) is not None else []
    parts += [f"{field.name}={getattr(args, field.name)}" for field in dataclasses.fields(ModelConfig)
              if hasattr(args, field.name)]
    return "-".join(parts)


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device: str = "auto") -> Distributed:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU), or run as one process."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise TrainError("--device cuda but torch sees no GPU; use --device cpu or auto")
    if "RANK" not in os.environ:
        return Distributed(device=torch.device("cuda", 0) if use_cuda else torch.device("cpu"))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if use_cuda:
        device_ = torch.device("cuda", local_rank)
        torch.cuda.set_device(device_)
        dist.init_process_group("nccl", device_id=device_)
    else:
        device_ = torch.device("cpu")
        dist.init_process_group("gloo")
    return Distributed(rank, local_rank, world_size, device_)


def teardown_distributed(env: Distributed):
    if dist.is_initialized():
        dist.destroy_process_group()


def cpu_threads(threads: int | None, resume_dir: Path | None) -> int:
    """Threads for CPU math: --threads, else torch's default. The count changes the order of float
    sums, so a resumed run reuses the count it started with. On a shared machine, threads beyond the
    idle cores spin at every barrier (2 threads ran 3x slower than 1 with one core busy): pass
    --threads there."""
    if threads:
        return threads
    if resume_dir and "threads" in (saved := checkpoint.read_train_state(resume_dir)):
        return saved["threads"]
    return torch.get_num_threads()  # torch's default (physical cores), or OMP_NUM_THREADS (torchrun sets 1)


def device_memory_bytes(env: Distributed) -> tuple[int, str]:
    """(bytes one process may use, what the number is)."""
    if env.device.type == "cuda":
        total = torch.cuda.get_device_properties(env.device).total_memory
        return total, f"{torch.cuda.get_device_name(env.device)} has {total / 2**30:.0f} GiB"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return total // local, f"this machine has {total / 2**30:.0f} GiB of memory" + (
        f", {total / local / 2**30:.0f} GiB for each of its {local} processes" if local > 1 else "")


def check_run_fits(config: ModelConfig, plan: BatchPlan, env: Distributed, activation_checkpointing: bool,
                   mask_documents: bool, warmup: int | None, steps: int):
    """Refuse, before building anything, a micro-batch whose activations alone exceed the device's
    memory (memory.activation_estimate: a sure out-of-memory, or hours of swapping), with the
    estimate; note a warmup as long as the run, and a window no shorter than the sequence, once
    (allowed: its local layers then attend like global ones)."""
    parts = memory.activation_estimate(config, plan.micro_batch, plan.seq_len, activation_checkpointing,
                                       mask_documents, env.device.type)
    available, where = device_memory_bytes(env)
    if sum(parts.values()) > available:
        detail = ", ".join(f"{name} {size / 2**30:.1f}" for name, size in parts.items())
        raise TrainError(f"--seq_len {plan.seq_len} with --micro_batch {plan.micro_batch} needs at least "
                         f"{sum(parts.values()) / 2**30:.0f} GiB of activations per process ({detail} GiB), but "
                         f"{where}; lower --micro_batch (accumulation keeps the global batch) or --seq_len")
    if warmup is not None and warmup >= steps:
        log(env, f"note: --warmup {warmup} >= --steps {steps}: the learning rate rises for the whole run "
                 f"and never decays")
    if config.window is not None and config.window >= plan.seq_len:
        log(env, f"note: window {config.window} >= seq_len {plan.seq_len}: every layer sees the whole sequence, so "
                 f"this run trains the local layers as global ones (the window acts beyond {config.window} tokens)")


# ----------------------------------------------------------------------------------------------
# 3. Build: the same initial weights on any number of processes, then wrapped for parallelism


# Fields a fresh run may change on top of another checkpoint's weights: how positions are encoded
# and how far (what context extension changes), and the attention kernel.
INIT_FROM_MAY_CHANGE = ("attention_backend", "context_length", "rope_theta", "rope_theta_local", "rope_scaling",
                        "rope_factor", "rope_scaling_layers", "rope_original_context", "yarn_beta_fast",
                        "yarn_beta_slow", "yarn_attention_factor", "llama3_low_freq_factor", "llama3_high_freq_factor")


def check_architecture(path: Path, config: ModelConfig, allowed: tuple[str, ...] = ("attention_backend",)):
    """Refuse a checkpoint whose config.json differs from config in any field but `allowed`
    (checkpoint.architecture_differences: the one comparison every script uses)."""
    file = path / checkpoint.CONFIG_FILE
    if not file.is_file():
        raise TrainError(f"{file} not found: {path} is not a train.py checkpoint folder")
    try:
        saved = checkpoint.read_config(path)
    except CheckpointError as error:
        raise TrainError(f"{file} is not a config written by train.py ({error}); pass an intact train.py checkpoint "
                         f"folder, or hf:DIR for a Hugging Face folder") from None
    differing = checkpoint.architecture_differences(saved, config, allowed)
    if differing:
        changes = ", ".join(f"{k}: checkpoint {getattr(saved, k)!r}, this run {getattr(config, k)!r}"
                            for k in differing)
        flags = " ".join(f"--{k} {getattr(saved, k)}" for k in differing)
        raise TrainError(f"{file} is a different architecture ({changes}). Rerun with the checkpoint's flags "
                         f"({flags}), or train this architecture in another --out")


def hf_weights(source: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict of hf:DIR (a Hugging Face folder, through hf_interop.load_hf), after checking
    that it is config's architecture but for what --init_from may change."""
    try:
        import hf_interop
    except ImportError:
        raise TrainError(f"--init_from {source} needs hf_interop.py beside train.py to read Hugging Face "
                         f"folders, and it is not there; convert the folder to a checkpoint elsewhere and "
                         f"pass --init_from DIR") from None
    try:
        hf_model, summary = hf_interop.load_hf(source[3:])
    except ValueError as error:  # hf_interop's errors name the file and the fix
        raise TrainError(f"--init_from {source}: {error}") from None
    differing = checkpoint.architecture_differences(hf_model.config, config, INIT_FROM_MAY_CHANGE)
    if differing:
        flags = " ".join(f"--{k} {getattr(hf_model.config, k)}" for k in differing)
        raise TrainError(f"{source[3:]}/config.json is a different architecture in {', '.join(differing)}; "
                         f"rerun with {flags}\n{summary}")
    return hf_model.state_dict()


def load_initial_weights(model: Transformer, source: str, config: ModelConfig):
    """--init_from: a checkpoint folder's model.safetensors, or hf:DIR through hf_interop.load_hf."""
    if source.startswith("hf:"):
        model.load_state_dict(hf_weights(source, config))
        return
    path = Path(source)
    check_architecture(path, config, allowed=INIT_FROM_MAY_CHANGE)
    # Only safetensors (checkpoint.read_weights): --init_from reads other people's folders, and DCP's
    # .metadata (like any torch.save file) is a pickle, which can run code when loaded.
    try:
        model.load_state_dict(checkpoint.read_weights(path))
    except CheckpointError as error:
        raise TrainError(str(error)) from None


@torch.no_grad()
def copy_into_shard(param: torch.Tensor, full: torch.Tensor):
    """Write this rank's part of the full value `full` into the FSDP2-sharded parameter `param` (a
    DTensor): DTensor's own split, computed locally with no communication."""
    from torch.distributed.tensor import distribute_tensor

    mine = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None).to_local()
    param.to_local().copy_(mine)


@torch.no_grad()
def fill_shards(model: Transformer, config: ModelConfig, seed: int, init_from: str | None):
    """Weights for a model built on meta and sharded by FSDP2, identical to a one-process run's.

    Fresh: olmpool.initial_values draws the full values Transformer.init_weights would, one
    parameter at a time, and each rank keeps its shard. --init_from: a checkpoint's tensors, read one
    at a time from model.safetensors (a Hugging Face folder is read whole, once, on the CPU).
    """
    shards = dict(model.named_parameters())
    if not init_from:
        for name, value in olmpool.initial_values(config, seed):
            copy_into_shard(shards[name], value)
        return
    path = Path(init_from)
    if not init_from.startswith("hf:") and (path / checkpoint.WEIGHTS_FILE).is_file():
        from safetensors import safe_open

        check_architecture(path, config, allowed=INIT_FROM_MAY_CHANGE)
        with safe_open(path / checkpoint.WEIGHTS_FILE, "pt") as file:
            missing = sorted(set(shards) - set(file.keys()))
            if missing:
                raise TrainError(f"{path / checkpoint.WEIGHTS_FILE} lacks {', '.join(missing[:3])}; pass a "
                                 f"checkpoint of this architecture")
            for name, shard in shards.items():
                copy_into_shard(shard, file.get_tensor(name))
        return
    full = Transformer(config, seed=None)  # hf: read whole on the CPU, then split
    load_initial_weights(full, init_from, config)
    state = full.state_dict()
    for name, shard in shards.items():
        copy_into_shard(shard, state[name])


def autocast(device: torch.device, fsdp: bool):
    """bf16 autocast on GPU; under FSDP the MixedPrecisionPolicy casts instead. fp32 on CPU."""
    if device.type == "cuda" and not fsdp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(config: ModelConfig, args, env: Distributed) -> tuple[nn.Module, Transformer]:
    """(the model to train, possibly wrapped; the olmpool.Transformer inside it).

    Weights are drawn on the CPU by olmpool's seeded init, so every world size starts from identical
    weights. With --fsdp the model is built on the meta device, sharded, and then each rank fills
    its shards one parameter at a time (fill_shards): no rank holds more than one full parameter at
    once (the 1.6 GB embedding at 7B), rather than a full fp32 copy of the model (30 GB).
    """
    on_meta = bool(args.fsdp)
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        model = Transformer(config, seed=None if on_meta else args.seed)
    if not on_meta:
        if args.init_from:
            load_initial_weights(model, args.init_from, config)
        model.to(env.device)
    # Order as in torchtitan: activation checkpointing, then compile, then sharding, all per block.
    for block in model.layers:
        block.activation_checkpointing = args.activation_checkpointing  # olmpool.Block recomputes in backward
        if args.compile:
            block.compile()  # in place: parameter names, and so checkpoints, are unchanged
    if args.fsdp:
        if not dist.is_initialized():
            raise TrainError("--fsdp needs a process group: launch with torchrun, e.g. "
                             "`torchrun --nproc_per_node 1 train.py --fsdp ...`")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        if env.device.type == "cuda":  # bf16 compute and all-gathers, fp32 gradient reduction (torchtitan)
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:  # CPU: fp32 throughout
            policy = MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)  # the root: embeddings, final norm, LM head
        model.to_empty(device=env.device)
        fill_shards(model, config, args.seed, args.init_from)
        return model, model
    if env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids), model
    return model, model


def peak_lr(args) -> float:
    return args.lr if args.lr is not None else LEARNING_RATES[args.size]


def warmup_steps(args) -> int:
    return args.warmup if args.warmup is not None else min(2000, max(1, args.steps // 10))


def build_optimizer(model: nn.Module, args) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: none on embeddings (OLMo 2) and 1-D norm gains."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or name.endswith("embed.weight") else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused: one kernel for all parameters, on GPU and CPU alike (4x the default on CPU).
    return torch.optim.AdamW(groups, lr=peak_lr(args), betas=(args.beta1, args.beta2), eps=args.eps, fused=True)


def lr_at(step: int, args) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then args.schedule."""
    lr, warmup, steps = peak_lr(args), warmup_steps(args), args.steps
    lr_min = lr * args.min_lr_ratio
    if step < warmup:
        return lr * (step + 1) / warmup
    if args.schedule == "wsd":  # warmup-stable-decay: decay only over the final stretch
        decay_steps = max(1, round(args.decay_fraction * steps))
        progress = max(0.0, (step - (steps - decay_steps)) / decay_steps)
        return lr - (lr - lr_min) * min(progress, 1.0)
    progress = min((step - warmup) / max(1, steps - warmup), 1.0)
    if args.schedule == "linear":
        return lr - (lr - lr_min) * progress
    return lr_min + (lr - lr_min) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# 4. Data: the same global batches whatever the world size or architecture


@dataclass
class BatchPlan:
    seq_len: int
    sequences: int  # per global batch
    micro_batch: int
    accumulation: int  # micro-batches per device per step

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq_len


def default_micro_batch(sequences: int, world_size: int) -> int:
    """2 when it divides each process's share of the global batch, else 1: the default never stops a
    world size that divides the batch (2 CPU processes share the CPU default of 2 sequences)."""
    share = sequences // world_size if sequences % world_size == 0 else sequences
    return 2 if share % 2 == 0 else 1


def batch_plan(args, config: ModelConfig, world_size: int, device_type: str = "cpu") -> BatchPlan:
    seq_len = args.seq_len or config.context_length
    batch_tokens = args.batch_tokens or DEFAULT_SEQUENCES[device_type] * seq_len
    if batch_tokens % seq_len:
        raise TrainError(f"--batch_tokens {batch_tokens} is not a whole number of sequences of seq_len={seq_len}; "
                         f"use a multiple of {seq_len}, e.g. {max(1, round(batch_tokens / seq_len)) * seq_len}")
    sequences = batch_tokens // seq_len
    micro_batch = args.micro_batch if args.micro_batch is not None else default_micro_batch(sequences, world_size)
    per_step = world_size * micro_batch
    if sequences % per_step:
        raise TrainError(f"a global batch of {sequences} sequences ({batch_tokens} tokens / seq_len {seq_len}) does "
                         f"not split into {world_size} processes x --micro_batch {micro_batch}; use --batch_tokens "
                         f"a multiple of {per_step * seq_len}, or a --micro_batch that divides {sequences // world_size}"
                         if sequences % world_size == 0 else
                         f"a global batch of {sequences} sequences does not split over {world_size} processes; use "
                         f"--batch_tokens a multiple of {per_step * seq_len}")
    return BatchPlan(seq_len, sequences, micro_batch, sequences // per_step)


def data_dir(args, env: Distributed) -> Path:
    """The data folder, in the vocabulary --compact_vocab asks for (built on first use)."""
    def prepared(progress: bool) -> Path:
        if args.data:
            return compact_vocabulary.folder_in_vocab(args.data, args.compact_vocab, progress=progress)
        return compact_vocabulary.prepare_builtin_corpus(progress=progress, compact_vocab=compact_vocab_size(args))
    if env.is_main:  # one process tokenizes; the others find it ready after the barrier
        prepared(progress=True)
    env.barrier()
    return prepared(progress=False)


def check_vocabulary(init_from: str | None, config: ModelConfig, folder: Path, resume_dir: Path | None):
    """The model must cover the data's ids, and a checkpoint must come from data in the same vocabulary."""
    for source in (resume_dir, init_from):  # first: a mismatch explains a size difference too
        if source and not str(source).startswith("hf:"):
            compact_vocabulary.check_same_vocabulary(source, folder)
    in_use = data.read_manifest(folder)["tokenizer"]["vocab_size"]
    if config.vocab_size < in_use:
        raise TrainError(f"--vocab_size {config.vocab_size} is smaller than the {in_use:,} ids of {folder}'s vocabulary; "
                         f"leave --vocab_size out (it follows the data) or give at least {compact_vocabulary.padded_vocab_size(in_use)}")


def build_loaders(args, plan: BatchPlan, env: Distributed, folder: Path):
    """(train loader, val loader or None). The global batch, not the per-rank one, fixes the order."""
    seed = args.data_seed if args.data_seed is not None else args.seed
    common = dict(seq_len=plan.seq_len, global_batch_size=plan.sequences, rank=env.rank, world_size=env.world_size,
                  seed=seed, mask_documents=args.mask_documents)
    train_loader = data.TokenLoader(folder, "train", **common)
    val_loader = None
    if args.eval_every:
        try:
            val_loader = data.TokenLoader(folder, "val", **common)
        except data.DataError as error:
            log(env, f"warning: no validation loss: {error}")
    return train_loader, val_loader


def micro_batches(batch: data.Batch, plan: BatchPlan, device) -> list[data.Batch]:
    """This rank's rows of the global batch, in micro-batches of plan.micro_batch."""
    size = plan.micro_batch
    return [data.Batch(batch.inputs[i:i + size], batch.targets[i:i + size],
                       None if batch.doc_ids is None else batch.doc_ids[i:i + size]).to(device)
            for i in range(0, batch.inputs.shape[0], size)]


# ----------------------------------------------------------------------------------------------
# 5. One step of the loop: the loss, the optimizer step, evaluation, and what is logged


def model_loss_sums(model, batch: data.Batch, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, summed logsumexp^2) of the model on batch: olmpool.Transformer.forward
    with targets, which computes them in chunks of positions so the logits never exist whole."""
    sums = model(batch.inputs, doc_ids=batch.doc_ids, targets=batch.targets, loss_chunk=chunk_size)
    return sums[0], sums[1]


def train_step(model, optimizer, batches: list[data.Batch], plan: BatchPlan, args, env: Distributed,
               lr: float, stop_requested: bool) -> dict:
    """Forward and backward over this rank's micro-batches; clip; step unless the loss is not finite.

    The objective is (sum of cross-entropy + z_loss * sum of logsumexp^2) / (targets in the global
    batch): every target counts once, however the batch is split (the loader never pads). DDP and
    FSDP average gradients over ranks, so each rank's part is scaled up by the world size.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    global_targets = plan.tokens
    scale = env.world_size / global_targets
    ce_sum = torch.zeros((), device=env.device, dtype=torch.float64)
    z_sum = torch.zeros((), device=env.device, dtype=torch.float64)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        # DDP: reduce gradients once, after the last micro-batch. FSDP reduces each one, which keeps
        # gradients sharded between micro-batches (memory is why one uses FSDP).
        sync = model.no_sync() if (not last and isinstance(model, nn.parallel.DistributedDataParallel)) \
            else contextlib.nullcontext()
        with sync:
            with autocast(env.device, args.fsdp):
                ce, z = model_loss_sums(model, batch, args.loss_chunk)
            ((ce + args.z_loss * z) * scale).backward()
        ce_sum += ce.detach().double()
        z_sum += z.detach().double()
    # One all-reduce carries the losses and whether any rank received SIGTERM.
    totals = torch.stack([ce_sum, z_sum, torch.tensor(float(stop_requested), device=env.device, dtype=torch.float64)])
    if env.world_size > 1:
        dist.all_reduce(totals)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    loss, z_loss = (totals[0] / global_targets).item(), (totals[1] / global_targets).item()
    grad_norm = grad_norm.item()
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:  # a non-finite step is never applied, so the weights stay those of the last good step
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "z_loss": z_loss, "grad_norm": grad_norm, "finite": finite, "stop": totals[2].item() > 0}


@torch.no_grad()
def evaluate_losses(model, loader: data.TokenLoader, plan: BatchPlan, env: Distributed, batches: int,
                    loss_chunk: int | None = None, fsdp: bool = False) -> dict:
    """Over `batches` global batches spread over the val split: val_loss, the mean cross-entropy
    in nats per token of the data's vocabulary, and val_bits_per_byte, the same sum over the UTF-8
    bytes of text its targets stand for (compact_vocabulary.bits_per_byte), which compares across vocabularies."""
    model.eval()
    byte_lengths = torch.from_numpy(compact_vocabulary.tokenizer_for(loader.data_dir).byte_lengths)
    sums = torch.zeros(2, device=env.device, dtype=torch.float64)  # nats, bytes of this rank's targets
    targets = 0
    for batch in loader.validation_batches(batches):
        sums[1] += byte_lengths[batch.targets].sum().item()
        for micro in micro_batches(batch, plan, env.device):
            with autocast(env.device, fsdp):
                sums[0] += model_loss_sums(model, micro, loss_chunk)[0].double()
        targets += plan.tokens
    if env.world_size > 1:
        dist.all_reduce(sums)
    model.train()
    nats, n_bytes = sums.tolist()
    return {"val_loss": nats / targets, "val_bits_per_byte": compact_vocabulary.bits_per_byte(nats, n_bytes)}


@functools.cache
def cpu_matmul_flops() -> float:
    """FLOP/s of an fp32 1024^3 matmul on this CPU: the best of a few, as MFU's denominator on CPU."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * 1024**3 / (time.perf_counter() - start))
    return best


def peak_flops(given: float | None, device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the number came from): --peak_flops if given, else a GPU's
    datasheet, else a matmul measured on this CPU."""
    if given:
        return given, "--peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value, f"{name} bf16 datasheet"
        return None, f"unknown GPU {name}: pass --peak_flops for MFU"
    value = cpu_matmul_flops()
    return value, f"measured fp32 matmul, {value / 1e9:.0f} GFLOP/s"


def peak_memory_gib(env: Distributed) -> float:
    if env.device.type == "cuda":
        return torch.cuda.max_memory_allocated(env.device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


class Meter:
    """Per step: tokens/s, window-aware MFU, peak memory, ETA. Rank 0 appends a JSON line to
    OUT/metrics.jsonl every step and prints a progress line when asked."""

    def __init__(self, out: Path, config: ModelConfig, plan: BatchPlan, steps: int, given_peak_flops: float | None,
                 env: Distributed):
        self.plan, self.env, self.steps = plan, env, steps
        self.flops = olmpool.flops_per_token(config, plan.seq_len)  # counts only the keys a window lets in
        self.peak, self.peak_source = peak_flops(given_peak_flops, env.device)
        self.file = open(out / "metrics.jsonl", "a") if env.is_main else None
        self.timed_from = None  # (time, step) at the end of the first step, which pays for warm-up and compiling

    def record(self, step: int, lr: float, result: dict, tokens_seen: int, seconds: float) -> dict:
        if self.timed_from is None:
            self.timed_from = (time.perf_counter(), step)
        tokens_per_s = self.plan.tokens / seconds
        mfu = self.flops * tokens_per_s / (self.peak * self.env.world_size) if self.peak else None
        return {"step": step, "loss": result["loss"], "z_loss": result["z_loss"], "lr": lr,
                "grad_norm": result["grad_norm"], "tokens_seen": tokens_seen, "tokens_per_s": tokens_per_s,
                "mfu": mfu, "peak_memory_gib": peak_memory_gib(self.env), "step_time_s": seconds}

    def write(self, record: dict, show: bool, steps_left: int):
        if not self.file:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if show:
            timed_steps = record["step"] - self.timed_from[1]
            eta = duration((time.perf_counter() - self.timed_from[0]) / timed_steps * steps_left) if timed_steps else "?"
            mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a"
            val = f" | val {record['val_loss']:.4f} ({record['val_bits_per_byte']:.3f} bits/byte)" if "val_loss" in record else ""
            print(f"step {record['step']}/{self.steps} | loss {record['loss']:.4f}{val} | lr {record['lr']:.2e} | grad norm "
                  f"{record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | MFU {mfu} | mem "
                  f"{record['peak_memory_gib']:.2f} GiB | ETA {eta}", flush=True)

    def close(self):
        if self.file:
            self.file.close()


# ----------------------------------------------------------------------------------------------
# 6. Save and resume: checkpoints written atomically, found, checked and read back


CHECKPOINT_KEYS = ("step", "tokens_seen", "loader", "fsdp", "rng")


def checkpoint_problem(path: Path) -> str | None:
    """What is damaged in a checkpoint folder, naming the file (None: intact). Cheap: the JSON files
    parse, every file has the size train_state.json recorded at save time (older checkpoints: the
    weights' and optimizer's files exist), and model.safetensors' header covers the file. (Whether
    config.json is this run's architecture is check_architecture's question.)"""
    state_file, config_file = path / checkpoint.STATE_FILE, path / checkpoint.CONFIG_FILE
    parsed = {}
    for file in (state_file, config_file):
        try:
            parsed[file] = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            return f"{file} is unreadable ({error})"
    state, config = parsed[state_file], parsed[config_file]
    if not isinstance(state, dict) or not all(key in state for key in CHECKPOINT_KEYS):
        return f"{state_file} is not a train state (it needs {', '.join(CHECKPOINT_KEYS)})"
    if not isinstance(config, dict):
        return f"{config_file} is not a config (a JSON object of ModelConfig fields)"
    expected = state.get("files") or {name: None for name in (
        ["dcp/.metadata"] if state["fsdp"] else [checkpoint.WEIGHTS_FILE, "optimizer.pt"])}
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if size is not None and file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, but {size} were written (truncated or overwritten)"
    weights = path / checkpoint.WEIGHTS_FILE
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(weights, "pt"):
                pass
        except Exception as error:  # safetensors raises its own error type for any bad header
            return f"{weights} is unreadable ({error})"
    return None


def find_resume(resume: str, out: Path) -> Path | None:
    """The checkpoint --resume names: auto, the newest intact one in out (None there: a fresh start);
    never, None (refusing an out that holds checkpoints); else the folder given, if intact."""
    if resume == "never":
        existing = checkpoints_in(out) if out.is_dir() else []
        if existing:
            raise TrainError(f"{out} already holds checkpoints (newest {existing[-1].name}); continue that run with "
                             f"--resume auto (the default), or start another with a different --out or --name")
        return None
    if resume == "auto":
        existing = checkpoints_in(out) if out.is_dir() else []
        damage = []
        for path in reversed(existing):  # the newest intact one; damaged ones are named and skipped
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            damage.append(problem)
            warn(f"warning: skipping damaged checkpoint {path.name}: {problem}")
        if damage:
            raise TrainError(f"every checkpoint in {out} is damaged ({'; '.join(damage)}); move the folder "
                             f"away to start afresh, or pass another --out")
        return None
    path = Path(resume)
    if not (path / checkpoint.STATE_FILE).is_file():
        raise TrainError(f"--resume {path}: no {path / checkpoint.STATE_FILE}, so not a complete checkpoint; "
                         f"pass a step_N folder, or --resume auto")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TrainError(f"--resume {path} is damaged: {problem}; pass another step_N folder, or --resume auto "
                         f"(which takes the newest intact checkpoint in --out)")
    return path


def set_aside_other_branch(out: Path, resume_dir: Path | None, env: Distributed) -> Path | None:
    """A rollback (resuming a checkpoint older than the newest in out) starts a new branch: move the
    other branch's checkpoints (every one at or after the resumed step but the resumed one) to
    OUT/abandoned/TIME/, so that pruning never deletes the new branch and --resume auto follows it.
    A checkpoint resumed from OUT/abandoned/ moves back into out. Returns where resume_dir now is."""
    if resume_dir is None or not out.is_dir():
        return resume_dir
    resumed_step = int(checkpoint.read_train_state(resume_dir)["step"])
    # Complete or not (a save would overwrite an incomplete one), sorted by step.
    others = [p for step, p in checkpoint.step_folders(out) if step >= resumed_step
              and p.resolve() != resume_dir.resolve()]
    env.barrier()  # every rank has chosen resume_dir before anything moves
    if others and env.is_main:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = out / ABANDONED_FOLDER / stamp
        for attempt in range(1, 1000):  # two rollbacks within a second get two folders
            if not aside.exists():
                break
            aside = out / ABANDONED_FOLDER / f"{stamp}_{attempt}"
        aside.mkdir(parents=True)
        for path in others:
            os.replace(path, aside / path.name)
        warn(f"rollback to {resume_dir}: moved {', '.join(p.name for p in others)} (the abandoned branch) to "
             f"{aside}; nothing was deleted")
    back = out / resume_dir.name
    returning = (out / ABANDONED_FOLDER).resolve() in resume_dir.resolve().parents
    if returning and env.is_main:  # back to a branch set aside earlier: auto must find it in out
        os.replace(resume_dir, back)
        warn(f"moved {resume_dir} back to {back}, the branch this run continues")
    env.barrier()
    return back if returning else resume_dir


def rng_state() -> dict:
    """Every generator's state as JSON lists. Training draws no random numbers today (no dropout; the
    loader's order is seeded separately), but whatever is added later resumes exactly."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state().tolist(), "python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), position, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def fsync_tree(folder: Path, files: bool = True):
    """fsync every file under folder (if files) and every folder, so that what was written is on disk."""
    inside = sorted(folder.rglob("*")) if files else []
    paths = [p for p in inside if p.is_file()] + [p for p in inside if p.is_dir()] + [folder]
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_weights_and_optimizer(folder: Path, model, transformer: Transformer, optimizer, fsdp: bool,
                                env: Distributed):
    """config.json and model.safetensors (checkpoint.write_model, on rank 0), and the optimizer: one
    optimizer.pt, or with FSDP every rank's shards of model and optimizer in dcp/."""
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder / "dcp")
        # The weights again, gathered into full tensors on rank 0, in safetensors: a file anyone can
        # load without unpickling (DCP's metadata is a pickle), for --init_from and hf_interop.
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.is_main:
            checkpoint.write_model(folder, transformer.config, full)
        del full
    elif env.is_main:
        checkpoint.write_model(folder, transformer.config, transformer.state_dict())
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")


def save_checkpoint(out: Path, step: int, tokens_seen: int, model, transformer: Transformer, optimizer,
                    loader: data.TokenLoader, args, env: Distributed, extras: dict | None = None) -> Path:
    """Write OUT/step_N atomically: everything goes into a temporary folder, fsynced, renamed when
    complete. train_state.json, written last, records every other file's size, which resume checks."""
    final = checkpoint.step_folder(out, step)
    temporary = out / f".tmp_{final.name}"
    if env.is_main:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a run killed mid-save
        temporary.mkdir(parents=True)
    env.barrier()
    write_weights_and_optimizer(temporary, model, transformer, optimizer, args.fsdp, env)
    if env.is_main:
        compact_vocabulary.copy_vocabulary(loader.data_dir, temporary)  # the checkpoint names its tokenizer
        files = {str(p.relative_to(temporary)): p.stat().st_size for p in sorted(temporary.rglob("*")) if p.is_file()}
        state = {"step": step, "tokens_seen": tokens_seen, "loader": loader.state_dict(), "fsdp": args.fsdp,
                 "world_size": env.world_size, "threads": torch.get_num_threads(),
                 "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                 "rng": rng_state(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}
        state.update((extras or {}).get("train_state", {}))  # extend.py: the recipe and its source
        (temporary / checkpoint.STATE_FILE).write_text(json.dumps(state) + "\n")  # last: marks it complete
        fsync_tree(temporary)  # on disk before the rename, so a power cut never leaves a renamed, empty file
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        fsync_tree(out, files=False)  # the rename itself
        if args.keep_checkpoints > 0:
            for old in checkpoints_in(out)[:-args.keep_checkpoints]:
                shutil.rmtree(old)
    env.barrier()
    return final


def load_checkpoint(path: Path, model, transformer: Transformer, optimizer, loader: data.TokenLoader, fsdp: bool,
                    device: torch.device) -> tuple[int, int]:
    """Restore weights, optimizer, loader position and RNG from `path`; returns (step, tokens seen)."""
    check_architecture(path, transformer.config)
    state = checkpoint.read_train_state(path)
    if state["fsdp"] != bool(fsdp):
        raise TrainError(f"{path} was saved {'with' if state['fsdp'] else 'without'} --fsdp; resume it the same way")
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        saved = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(saved, checkpoint_id=path / "dcp")  # reshards to this world size
        set_state_dict(model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"])
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        file = path / checkpoint.WEIGHTS_FILE
        try:
            transformer.load_state_dict(load_file(file))
            file = path / "optimizer.pt"  # one's own run's file, and still never unpickled beyond tensors
            optimizer.load_state_dict(torch.load(file, map_location=device, weights_only=True))
        except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as error:
            raise TrainError(f"{file} is damaged ({str(error).splitlines()[0]}); resume another checkpoint "
                             f"with --resume DIR, or move {path} away and use --resume auto") from None
    loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"])
    return state["step"], state["tokens_seen"]


# ----------------------------------------------------------------------------------------------
# 7. The run: set up, build, load data, loop, save


class Preemption:
    """SIGTERM's flag. The handler only records the request: the loop finishes its step, every rank
    learns of it through train_step's all-reduce, and the run saves and exits with status 143."""

    def __init__(self):
        self.requested = False

    def request(self, signum, frame):
        self.requested = True


def describe_run(args, env: Distributed, config: ModelConfig, plan: BatchPlan, folder: Path,
                 train_loader: data.TokenLoader, meter: Meter, out: Path, resume_dir: Path | None, step: int):
    """The run's opening lines: the model, the data, the batch and the schedule."""
    log(env, olmpool.describe(config))
    log(env, f"data {folder}: {train_loader.n_tokens:,} train tokens ({data.read_manifest(folder)['tokenizer']['name']}, "
             f"model vocab {config.vocab_size:,}), {train_loader.steps_per_epoch} steps per epoch")
    features = [f"{torch.get_num_threads()} thread(s)" if env.device.type == "cpu" else "",
                "FSDP" if args.fsdp else "DDP" if env.world_size > 1 else "", "compiled" if args.compile else "",
                "activation checkpointing" if args.activation_checkpointing else ""]
    log(env, f"batch: {plan.sequences} sequences of {plan.seq_len} = {plan.tokens:,} tokens per step = {env.world_size} "
             f"process(es) x micro-batch {plan.micro_batch} x {plan.accumulation} accumulation; device {env.device}"
             + "".join(f", {feature}" for feature in features if feature))
    log(env, f"{args.steps} steps, lr {peak_lr(args):g} ({args.schedule}, {warmup_steps(args)} warmup), "
             f"{meter.flops / 1e9:.3f} GFLOP/token, MFU vs {meter.peak_source}; out {out}"
             + (f"; resumed from {resume_dir} at step {step}" if resume_dir else ""))


def non_finite_error(result: dict, step: int, lr: float, last_saved: Path | None) -> TrainError:
    """The error that stops a run whose loss or gradient norm is not finite (nothing saved)."""
    kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved yet"
    quantity = "loss" if not math.isfinite(result["loss"]) else "gradient norm"
    return TrainError(f"non-finite {quantity} at step {step} (loss {result['loss']}, grad norm "
                      f"{result['grad_norm']}); stopped without saving, {kept}. Lower --lr (now "
                      f"{lr:g} at this step) or lengthen --warmup, then --resume auto")


def report_end(env: Distributed, losses: dict, first_step: int, step: int, last_step: int, stopping: bool,
               resume_dir: Path | None, last_saved: Path | None, start_time: float):
    """The run's closing line: nothing to do, preempted, or the loss from first to last step."""
    if step >= last_step and not losses:
        log(env, f"nothing to do: {resume_dir} is at step {step}, and this run stops at step {last_step}")
    if stopping:
        log(env, f"SIGTERM: saved {last_saved} at step {step}; continue with the same command and --resume auto "
                 f"(exit status {PREEMPTED_EXIT_STATUS})")
    if losses:
        recent = [losses[s] for s in sorted(losses)[-10:]]
        log(env, f"done: loss {losses[first_step]:.4f} at step {first_step} -> {losses[step]:.4f} at step {step} "
                 f"(mean of the last {len(recent)}: {sum(recent) / len(recent):.4f}), "
                 f"{time.perf_counter() - start_time:.0f}s; checkpoint {last_saved}")


def run(args, env: Distributed, preemption: Preemption, make_loaders, checkpoint_extras: dict | None) -> dict:
    """The run on one rank: set up, build, data, the loop, a checkpoint every --save_every steps."""
    # Set up: the architecture, the batch, and where the run lives and resumes from.
    config = model_config(args)
    plan = batch_plan(args, config, env.world_size, env.device.type)
    check_run_fits(config, plan, env, args.activation_checkpointing, args.mask_documents, args.warmup, args.steps)
    out = Path(args.out or REPO_DIR / "runs" / (args.name or run_name(args)))
    resume_dir = set_aside_other_branch(out, find_resume(args.resume, out), env)
    if env.device.type == "cpu":
        torch.set_num_threads(cpu_threads(args.threads, resume_dir))
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the few fp32 matmuls left outside bf16

    # Build, with the data's vocabulary checked before any weights are loaded.
    folder = data_dir(args, env)
    check_vocabulary(args.init_from, config, folder, resume_dir)
    model, transformer = build_model(config, args, env)
    optimizer = build_optimizer(model, args)
    train_loader, val_loader = make_loaders(args, plan, env, folder)
    step, tokens_seen = 0, 0
    if resume_dir:
        step, tokens_seen = load_checkpoint(resume_dir, model, transformer, optimizer, train_loader, args.fsdp,
                                            env.device)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    meter = Meter(out, config, plan, args.steps, args.peak_flops, env)
    describe_run(args, env, config, plan, folder, train_loader, meter, out, resume_dir, step)

    # The loop: one optimizer step, its record, an evaluation and a checkpoint when due.
    losses, val_losses, last_saved = {}, {}, resume_dir
    last_step = min(args.steps, args.stop_at if args.stop_at is not None else args.steps)
    start_time, first_step = time.perf_counter(), step + 1
    stopping = False  # agreed by every rank through train_step's all-reduce, so all stop at one step
    try:
        while step < last_step and not stopping:
            step_start = time.perf_counter()
            lr = lr_at(step, args)
            batches = micro_batches(train_loader.next_batch(), plan, env.device)
            result = train_step(model, optimizer, batches, plan, args, env, lr, preemption.requested)
            if not result["finite"]:
                raise non_finite_error(result, step + 1, lr, last_saved)
            step += 1
            tokens_seen += plan.tokens
            stopping = result["stop"]
            losses[step] = result["loss"]
            record = meter.record(step, lr, result, tokens_seen, time.perf_counter() - step_start)
            if val_loader is not None and (step % args.eval_every == 0 or step == last_step):
                record.update(evaluate_losses(model, val_loader, plan, env, args.eval_batches, args.loss_chunk,
                                              args.fsdp))
                val_losses[step] = record["val_loss"]
            meter.write(record, show=step % args.log_every == 0 or step in (first_step, last_step)
                        or "val_loss" in record, steps_left=last_step - step)
            if step % args.save_every == 0 or step == last_step or stopping:
                last_saved = save_checkpoint(out, step, tokens_seen, model, transformer, optimizer, train_loader, args,
                                             env, extras=checkpoint_extras)
    finally:
        meter.close()
    report_end(env, losses, first_step, step, last_step, stopping, resume_dir, last_saved, start_time)
    return {"losses": losses, "val_losses": val_losses, "checkpoint": last_saved, "step": step, "out": out,
            "preempted": stopping}


def train(args, make_loaders=None, checkpoint_extras: dict | None = None) -> dict:
    """Train as args say; returns {"losses": {step: loss}, "val_losses": {step: loss}, "checkpoint": path,
    "preempted": whether SIGTERM stopped it (after saving)}.

    extend.py's hooks: make_loaders(args, plan, env, folder) -> (train loader, val loader or None)
    replaces build_loaders; checkpoint_extras {"train_state": dict} adds fields to every train_state.json.
    """
    validate_run_args(args)  # again, for callers that build args without parse_args
    env = setup_distributed(args.device)
    preemption = Preemption()
    previous_handler = signal.signal(signal.SIGTERM, preemption.request)
    previous_threads = torch.get_num_threads()
    try:
        return run(args, env, preemption, make_loaders or build_loaders, checkpoint_extras)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        torch.set_num_threads(previous_threads)
        teardown_distributed(env)


def main(argv=None):
    args = parse_args(argv)
    try:
        summary = train(args)
    except (TrainError, data.DataError) as error:
        rank = os.environ.get("RANK")
        print(f"error{f' (rank {rank})' if rank not in (None, '0') else ''}: {error}", file=sys.stderr)
        sys.exit(1)
    if summary["preempted"]:  # saved, but not finished: a scheduler should requeue, not call it done
        sys.exit(PREEMPTED_EXIT_STATUS)


if __name__ == "__main__":
    main()

