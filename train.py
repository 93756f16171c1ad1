"""Pretrain an OlmPool architecture: one CPU to many GPU nodes, exact and restartable.

Every architecture sees the same tokens in the same order from the same initial weights, so that
only the architecture differs, and a resumed run continues to the token. Every ModelConfig field
is a flag; a flag given explicitly overrides --preset at --size. docs/training.md describes the
recipe, the checkpoint folder, parallelism and the vocabulary.

    python train.py                                             # tiny default on the built-in corpus, CPU, minutes
    python train.py --qk_norm headwise --gqa 4                  # switches on top of the default preset
    python train.py --preset G_pre_8kv_8k_14k --size 20m --data data/mine --steps 2000
    torchrun --nproc_per_node 8 train.py --qk_norm headwise --gqa 4          # DDP over 8 GPUs
    torchrun --nproc_per_node 8 train.py --size 7b --preset H_post_LQK_32kv_8k_11k_SWA --fsdp --compile \\
        --activation_checkpointing --batch_tokens 4194304 --micro_batch 1 --lr 3e-4 --warmup 2000 \\
        --steps 34000 --save_every 1000 --keep_checkpoints 0 --resume auto        # the OlmPool 7B recipe
    # several nodes (the usual torchrun rendezvous; run the same line on every node):
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        --rdzv_id olmpool_j train.py --fsdp ... --out /mnt/nfs/runs/j --resume auto
    python train.py --resume auto ...                           # after preemption: the same command again
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import checkpoint
import compact_vocabulary
import data
import files
import memory
import olmpool
import stages
from checkpoint import INIT_FROM_MAY_CHANGE, CheckpointError, check_architecture
from files import FolderBusy
from olmpool import ModelConfig, Transformer
from progress import duration
from settings import (DEFAULT_SEQUENCES, LEARNING_RATES, LOSS_CHUNK, TrainConfig, TrainError, command_line,
                      compact_vocab_size, model_config, parse, run_folder, run_name, to_record)

# Dense bf16 peak FLOP/s by GPU name (NVIDIA datasheets, SXM parts); anything else: --peak_flops.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# Exit status after SIGTERM once the checkpoint is saved: 128 + SIGTERM, what a shell reports for a
# process ended by SIGTERM, so a scheduler tells "preempted, saved, resume me" (143) from "finished" (0).
PREEMPTED_EXIT_STATUS = 143
# Ctrl-C (SIGINT) is handled as SIGTERM (finish the step, save), and exits as a shell reports it: 128 + SIGINT.
INTERRUPTED_EXIT_STATUS = 130
SIGNAL_EXIT_STATUS = {signal.SIGTERM: PREEMPTED_EXIT_STATUS, signal.SIGINT: INTERRUPTED_EXIT_STATUS}


# ----------------------------------------------------------------------------------------------
# Messages, used throughout (errors are settings.TrainError, naming the value and the fix)


def log(env: Distributed, message: str):
    if env.is_main:
        print(message, flush=True)


# ----------------------------------------------------------------------------------------------
# 1. The command line: settings.TrainConfig's fields, every ModelConfig field among them


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags: one per TrainConfig field, with its help, in its group."""
    return command_line(TrainConfig, "train.py", __doc__)


def parse_args(argv=None) -> TrainConfig:
    """The run's settings, checked; model_config runs too, so that a bad switch fails now, with the
    flags' names, rather than after setting up."""
    return parse(TrainConfig, build_parser(), argv, check=model_config)


# ----------------------------------------------------------------------------------------------
# 2. Set-up: the processes and their memory


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
    stages.die_with_parent()  # a worker never outlives torchrun's agent (killed with -9 included)
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


def load_initial_weights(model: Transformer, source: str, config: ModelConfig):
    """--init_from: the weights of a checkpoint folder or hf:DIR (checkpoint.load_source), which must
    be config's architecture but for what a fresh run may change (INIT_FROM_MAY_CHANGE)."""
    try:
        loaded, _ = checkpoint.load_source(source, expected=config, allowed=INIT_FROM_MAY_CHANGE)
    except CheckpointError as error:
        raise TrainError(str(error)) from None
    model.load_state_dict(loaded.state_dict())


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
    source = checkpoint.parse_source(init_from)
    path = source.folder
    if not source.hf and (path / checkpoint.WEIGHTS_FILE).is_file():
        from safetensors import safe_open

        check_architecture(path, config, allowed=INIT_FROM_MAY_CHANGE)
        weights = path / checkpoint.WEIGHTS_FILE
        expected = {name: tuple(shard.shape) for name, shard in shards.items()}  # a DTensor's shape is the full one
        with safe_open(weights, "pt") as file:
            checkpoint.check_names(file.keys(), expected, weights)  # names first
            for name, shard in shards.items():
                tensor = file.get_tensor(name)
                checkpoint.check_weights({name: tensor}, {name: expected[name]}, weights)  # one at a time
                copy_into_shard(shard, tensor)
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


def build_model(config: ModelConfig, settings: TrainConfig, env: Distributed) -> tuple[nn.Module, Transformer]:
    """(the model to train, possibly wrapped; the olmpool.Transformer inside it).

    Weights are drawn on the CPU by olmpool's seeded init, so every world size starts from identical
    weights. With --fsdp the model is built on the meta device, sharded, and then each rank fills
    its shards one parameter at a time (fill_shards): no rank holds more than one full parameter at
    once (the 1.6 GB embedding at 7B), rather than a full fp32 copy of the model (30 GB).
    """
    on_meta = bool(settings.fsdp)
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        model = Transformer(config, seed=None if on_meta else settings.seed)
    if not on_meta:
        if settings.init_from:
            load_initial_weights(model, settings.init_from, config)
        model.to(env.device)
    # Order as in torchtitan: activation checkpointing, then compile, then sharding, all per block.
    for block in model.layers:
        block.activation_checkpointing = settings.activation_checkpointing  # olmpool.Block recomputes in backward
        if settings.compile:
            block.compile()  # in place: parameter names, and so checkpoints, are unchanged
    if settings.fsdp:
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
        fill_shards(model, config, settings.seed, settings.init_from)
        return model, model
    if env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids), model
    return model, model


def peak_lr(settings: TrainConfig) -> float:
    return settings.lr if settings.lr is not None else LEARNING_RATES[settings.size]


def warmup_steps(settings: TrainConfig) -> int:
    return settings.warmup if settings.warmup is not None else min(2000, max(1, settings.steps // 10))


def build_optimizer(model: nn.Module, settings: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: none on embeddings (OLMo 2) and 1-D norm gains."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or name.endswith("embed.weight") else decay).append(param)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused: one kernel for all parameters, on GPU and CPU alike (4x the default on CPU).
    return torch.optim.AdamW(groups, lr=peak_lr(settings), betas=(settings.beta1, settings.beta2), eps=settings.eps,
                             fused=True)


def lr_at(step: int, settings: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then settings.schedule."""
    lr, warmup, steps = peak_lr(settings), warmup_steps(settings), settings.steps
    lr_min = lr * settings.min_lr_ratio
    if step < warmup:
        return lr * (step + 1) / warmup
    if settings.schedule == "wsd":  # warmup-stable-decay: decay only over the final stretch
        decay_steps = max(1, round(settings.decay_fraction * steps))
        progress = max(0.0, (step - (steps - decay_steps)) / decay_steps)
        return lr - (lr - lr_min) * min(progress, 1.0)
    progress = min((step - warmup) / max(1, steps - warmup), 1.0)
    if settings.schedule == "linear":
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


def batch_plan(settings: TrainConfig, config: ModelConfig, world_size: int, device_type: str = "cpu") -> BatchPlan:
    seq_len = settings.seq_len or config.context_length
    batch_tokens = settings.batch_tokens or DEFAULT_SEQUENCES[device_type] * seq_len
    if batch_tokens % seq_len:
        raise TrainError(f"--batch_tokens {batch_tokens} is not a whole number of sequences of seq_len={seq_len}; "
                         f"use a multiple of {seq_len}, e.g. {max(1, round(batch_tokens / seq_len)) * seq_len}")
    sequences = batch_tokens // seq_len
    micro_batch = settings.micro_batch
    if micro_batch is None:
        micro_batch = default_micro_batch(sequences, world_size)
    per_step = world_size * micro_batch
    if sequences % per_step:
        raise TrainError(f"a global batch of {sequences} sequences ({batch_tokens} tokens / seq_len {seq_len}) does "
                         f"not split into {world_size} processes x --micro_batch {micro_batch}; use --batch_tokens "
                         f"a multiple of {per_step * seq_len}, or a --micro_batch that divides {sequences // world_size}"
                         if sequences % world_size == 0 else
                         f"a global batch of {sequences} sequences does not split over {world_size} processes; use "
                         f"--batch_tokens a multiple of {per_step * seq_len}")
    return BatchPlan(seq_len, sequences, micro_batch, sequences // per_step)


def data_dir(folder: str | None, compact_vocab: int | None, env: Distributed) -> Path:
    """--data's folder, else the built-in corpus, in the compact vocabulary of compact_vocab ids (None:
    the folder's own; settings.compact_vocab_size), built on first use."""
    def prepared(progress: bool) -> Path:
        if folder:
            return compact_vocabulary.folder_in_vocab(folder, compact_vocab, progress=progress)
        return compact_vocabulary.prepare_builtin_corpus(progress=progress, compact_vocab=compact_vocab)
    if env.is_main:  # one process tokenizes; the others find it ready after the barrier
        prepared(progress=True)
    env.barrier()
    return prepared(progress=False)


def check_vocabulary(init_from: str | None, config: ModelConfig, folder: Path, resume_dir: Path | None):
    """The model must cover the data's ids, and a checkpoint must come from data in the same vocabulary."""
    for source in (resume_dir, init_from):  # first: a mismatch explains a size difference too
        if source and not checkpoint.parse_source(source).hf:
            compact_vocabulary.check_same_vocabulary(source, folder)
    in_use = data.read_manifest(folder)["tokenizer"]["vocab_size"]
    if config.vocab_size < in_use:
        raise TrainError(f"--vocab_size {config.vocab_size} is smaller than the {in_use:,} ids of {folder}'s vocabulary; "
                         f"leave --vocab_size out (it follows the data) or give at least {compact_vocabulary.padded_vocab_size(in_use)}")


def build_loaders(settings: TrainConfig, plan: BatchPlan, env: Distributed, folder: Path):
    """(train loader, val loader or None). The global batch, not the per-rank one, fixes the order."""
    seed = settings.data_seed if settings.data_seed is not None else settings.seed
    common = dict(seq_len=plan.seq_len, global_batch_size=plan.sequences, rank=env.rank, world_size=env.world_size,
                  seed=seed, mask_documents=settings.mask_documents)
    train_loader = data.TokenLoader(folder, "train", **common)
    val_loader = None
    if settings.eval_every:
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


def train_step(model, optimizer, batches: list[data.Batch], plan: BatchPlan, settings: TrainConfig, env: Distributed,
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
            with autocast(env.device, settings.fsdp):
                ce, z = model_loss_sums(model, batch, settings.loss_chunk)
            ((ce + settings.z_loss * z) * scale).backward()
        ce_sum += ce.detach().double()
        z_sum += z.detach().double()
    # One all-reduce carries the losses and whether any rank received SIGTERM.
    totals = torch.stack([ce_sum, z_sum, torch.tensor(float(stop_requested), device=env.device, dtype=torch.float64)])
    if env.world_size > 1:
        dist.all_reduce(totals)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
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


def open_metrics(path: Path):
    """metrics.jsonl opened to append whole lines, unbuffered, so each record is one write. A torn last
    line (a run killed or out of disk mid-write: no newline at the end) is dropped first, with a
    warning, so that the next record is not glued onto it; every complete line is kept."""
    size = path.stat().st_size if path.is_file() else 0
    if size:
        with open(path, "rb+") as file:
            file.seek(max(0, size - 2**20))  # a torn line is part of one record: the tail holds it
            tail = file.read()
            if not tail.endswith(b"\n"):
                keep = size - len(tail) + tail.rfind(b"\n") + 1
                file.truncate(keep)
                print(f"warning: dropped the torn last line of {path} ({size - keep} bytes without a newline, "
                      f"from a run stopped mid-write)", file=sys.stderr, flush=True)
    return open(path, "ab", buffering=0)


class Meter:
    """Per step: tokens/s, window-aware MFU, peak memory, ETA. Rank 0 appends a JSON line to
    OUT/metrics.jsonl every step and prints a progress line when asked."""

    def __init__(self, out: Path, config: ModelConfig, plan: BatchPlan, steps: int, given_peak_flops: float | None,
                 env: Distributed):
        self.plan, self.env, self.steps = plan, env, steps
        self.flops = olmpool.flops_per_token(config, plan.seq_len)  # counts only the keys a window lets in
        self.peak, self.peak_source = peak_flops(given_peak_flops, env.device)
        self.file = open_metrics(out / "metrics.jsonl") if env.is_main else None
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
        self.file.write((json.dumps(record) + "\n").encode())  # one write of the whole line (unbuffered)
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
# 6. Save and resume: checkpoint.py writes, finds and reads the folders; here is what a run records


@dataclass
class Training:
    """What the loop works on and saves: the model to train (possibly wrapped) and the Transformer
    inside it, its optimizer, the batch plan, the loaders and the run's folder."""
    model: nn.Module
    transformer: Transformer
    optimizer: torch.optim.Optimizer
    plan: BatchPlan
    train_loader: data.TokenLoader
    val_loader: data.TokenLoader | None
    out: Path


def run_out(settings: TrainConfig) -> Path:
    """The run's folder: --out, else runs/NAME (settings.run_folder)."""
    if settings.out and Path(settings.out).exists() and not Path(settings.out).is_dir():
        raise TrainError(f"--out {settings.out} is a file; pass a folder for checkpoints and metrics.jsonl")
    return Path(settings.out) if settings.out else run_folder(settings.name or run_name(settings))


def save(training: Training, step: int, tokens_seen: int, settings: TrainConfig, env: Distributed,
         extras: dict) -> Path:
    """OUT/step_N through checkpoint.save_checkpoint; train_state.json records the step, the tokens
    seen, the loader's position, how it was run, the settings ("args") and `extras`."""
    state = {"step": step, "tokens_seen": tokens_seen, "loader": training.train_loader.state_dict(),
             "fsdp": settings.fsdp, "world_size": env.world_size, "threads": torch.get_num_threads(),
             "args": to_record(settings)}
    return checkpoint.save_checkpoint(training.out, training.model, training.transformer, training.optimizer, state,
                                      extras, training.train_loader.data_dir, settings.keep_checkpoints)


def resume(training: Training, resume_dir: Path | None, settings: TrainConfig, env: Distributed) -> tuple[int, int]:
    """(step, tokens seen) of the checkpoint resumed, with everything it holds restored; (0, 0) for none."""
    if resume_dir is None:
        return 0, 0
    return checkpoint.load_checkpoint(resume_dir, training.model, training.transformer, training.optimizer,
                                      training.train_loader, settings.fsdp, env.device)


# ----------------------------------------------------------------------------------------------
# 7. The run: set up, build, load data, loop, save


class Preemption:
    """SIGTERM's flag, and Ctrl-C's (SIGINT, handled the same way: no KeyboardInterrupt midway through
    a step or a save). The handler only records the request: the loop finishes its step, every rank
    learns of it through train_step's all-reduce, and the run saves and exits with status 143 (130
    after SIGINT). Under torchrun a Ctrl-C reaches every rank (the terminal signals the whole group)."""

    def __init__(self):
        self.requested = False
        self.signal: int | None = None  # the first signal received

    def request(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # Ctrl-C twice (e.g. during a long set-up): stop now
            raise KeyboardInterrupt
        self.requested = True
        self.signal = self.signal or signum

    @property
    def name(self) -> str:
        return "SIGINT (Ctrl-C)" if self.signal == signal.SIGINT else "SIGTERM"

    @property
    def exit_status(self) -> int:
        return SIGNAL_EXIT_STATUS.get(self.signal, PREEMPTED_EXIT_STATUS)


def describe_run(settings: TrainConfig, env: Distributed, config: ModelConfig, plan: BatchPlan, folder: Path,
                 train_loader: data.TokenLoader, meter: Meter, out: Path, resume_dir: Path | None, step: int):
    """The run's opening lines: the model, the data, the batch and the schedule."""
    log(env, olmpool.describe(config))
    log(env, f"data {folder}: {train_loader.n_tokens:,} train tokens ({data.read_manifest(folder)['tokenizer']['name']}, "
             f"model vocab {config.vocab_size:,}), {train_loader.steps_per_epoch} steps per epoch")
    features = [f"{torch.get_num_threads()} thread(s)" if env.device.type == "cpu" else "",
                "FSDP" if settings.fsdp else "DDP" if env.world_size > 1 else "",
                "compiled" if settings.compile else "",
                "activation checkpointing" if settings.activation_checkpointing else ""]
    log(env, f"batch: {plan.sequences} sequences of {plan.seq_len} = {plan.tokens:,} tokens per step = {env.world_size} "
             f"process(es) x micro-batch {plan.micro_batch} x {plan.accumulation} accumulation; device {env.device}"
             + "".join(f", {feature}" for feature in features if feature))
    log(env, f"{settings.steps} steps, lr {peak_lr(settings):g} ({settings.schedule}, {warmup_steps(settings)} "
             f"warmup), "
             f"{meter.flops / 1e9:.3f} GFLOP/token, MFU vs {meter.peak_source}; out {out}"
             + (f"; resumed from {resume_dir} at step {step}" if resume_dir else ""))


def non_finite_error(result: dict, step: int, lr: float, last_saved: Path | None) -> TrainError:
    """The error that stops a run whose loss or gradient norm is not finite (nothing saved)."""
    kept = "no checkpoint was saved yet"
    if last_saved:  # good only if its weights are finite (one resumed or saved may not be: say so)
        problem = checkpoint.weights_problem(last_saved)
        kept = f"the last good checkpoint is {last_saved}" if problem is None else \
            f"and the last checkpoint is not good either ({problem})"
    quantity = "loss" if not math.isfinite(result["loss"]) else "gradient norm"
    return TrainError(f"non-finite {quantity} at step {step} (loss {result['loss']}, grad norm "
                      f"{result['grad_norm']}); stopped without saving, {kept}. Lower --lr (now "
                      f"{lr:g} at this step) or lengthen --warmup, then --resume auto")


def report_end(env: Distributed, losses: dict, first_step: int, step: int, last_step: int,
               stopped_by: Preemption | None, resume_dir: Path | None, last_saved: Path | None, start_time: float):
    """The run's closing line: nothing to do, preempted, or the loss from first to last step."""
    if step >= last_step and not losses:
        log(env, f"nothing to do: {resume_dir} is at step {step}, and this run stops at step {last_step}")
    if stopped_by:
        log(env, f"{stopped_by.name}: saved {last_saved} at step {step}; continue with the same command and "
                 f"--resume auto (exit status {stopped_by.exit_status})")
    if losses:
        recent = [losses[s] for s in sorted(losses)[-10:]]
        log(env, f"done: loss {losses[first_step]:.4f} at step {first_step} -> {losses[step]:.4f} at step {step} "
                 f"(mean of the last {len(recent)}: {sum(recent) / len(recent):.4f}), "
                 f"{time.perf_counter() - start_time:.0f}s; checkpoint {last_saved}")


def run(settings: TrainConfig, env: Distributed, preemption: Preemption, make_loaders, extras: dict) -> dict:
    """The run on one rank: set up, build, data, the loop, a checkpoint every --save_every steps."""
    # One writer per run folder, first: a second run into it stops here. Rank 0 holds the lock; the
    # other ranks write nothing there before rank 0's first save, after barriers rank 0 passes only
    # holding it (a rank that stops makes torchrun stop the others).
    out = run_out(settings)
    if env.is_main:
        files.lock_folder(out, "train.py")
    try:
        return build_and_loop(settings, env, preemption, make_loaders, extras, out)
    finally:
        files.unlock_folder(out)


def build_and_loop(settings: TrainConfig, env: Distributed, preemption: Preemption, make_loaders, extras: dict,
                   out: Path) -> dict:
    """In the locked run folder: set up, resume, build, load the data, then the loop."""
    # Set up: the architecture, the batch, and where the run resumes from.
    config = model_config(settings)
    plan = batch_plan(settings, config, env.world_size, env.device.type)
    check_run_fits(config, plan, env, settings.activation_checkpointing, settings.mask_documents, settings.warmup,
                   settings.steps)
    resume_dir = checkpoint.set_aside_other_branch(out, checkpoint.find_resume(settings.resume, out))
    if env.device.type == "cpu":
        torch.set_num_threads(cpu_threads(settings.threads, resume_dir))
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the few fp32 matmuls left outside bf16

    # Build, with the data's vocabulary checked before any weights are loaded.
    folder = data_dir(settings.data, compact_vocab_size(settings), env)
    check_vocabulary(settings.init_from, config, folder, resume_dir)
    model, transformer = build_model(config, settings, env)
    training = Training(model, transformer, build_optimizer(model, settings), plan,
                        *make_loaders(settings, plan, env, folder), out)
    step, tokens_seen = resume(training, resume_dir, settings, env)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    meter = Meter(out, config, plan, settings.steps, settings.peak_flops, env)
    describe_run(settings, env, config, plan, folder, training.train_loader, meter, out, resume_dir, step)
    return loop(training, meter, step, tokens_seen, resume_dir, settings, env, preemption, extras)


def loop(training: Training, meter: Meter, step: int, tokens_seen: int, resume_dir: Path | None,
         settings: TrainConfig, env: Distributed, preemption: Preemption, extras: dict) -> dict:
    """The loop: one optimizer step, its record, an evaluation and a checkpoint when due."""
    plan, val_loader = training.plan, training.val_loader
    losses, val_losses, last_saved = {}, {}, resume_dir
    last_step = min(settings.steps, settings.stop_at if settings.stop_at is not None else settings.steps)
    start_time, first_step = time.perf_counter(), step + 1
    stopping = False  # agreed by every rank through train_step's all-reduce, so all stop at one step
    try:
        while step < last_step and not stopping:
            step_start = time.perf_counter()
            lr = lr_at(step, settings)
            batches = micro_batches(training.train_loader.next_batch(), plan, env.device)
            result = train_step(training.model, training.optimizer, batches, plan, settings, env, lr,
                                preemption.requested)
            if not result["finite"]:
                raise non_finite_error(result, step + 1, lr, last_saved)
            step += 1
            tokens_seen += plan.tokens
            stopping = result["stop"]
            losses[step] = result["loss"]
            record = meter.record(step, lr, result, tokens_seen, time.perf_counter() - step_start)
            if val_loader is not None and (step % settings.eval_every == 0 or step == last_step):
                record.update(evaluate_losses(training.model, val_loader, plan, env, settings.eval_batches,
                                              settings.loss_chunk, settings.fsdp))
                val_losses[step] = record["val_loss"]
            meter.write(record, show=step % settings.log_every == 0 or step in (first_step, last_step)
                        or "val_loss" in record, steps_left=last_step - step)
            if step % settings.save_every == 0 or step == last_step or stopping:
                last_saved = save(training, step, tokens_seen, settings, env, extras)
    finally:
        meter.close()
    report_end(env, losses, first_step, step, last_step, preemption if stopping else None, resume_dir, last_saved,
               start_time)
    return {"losses": losses, "val_losses": val_losses, "checkpoint": last_saved, "step": step, "out": training.out,
            "preempted": stopping, "exit_status": preemption.exit_status if stopping else 0}


def train(settings: TrainConfig, make_loaders=None, train_state_extras: dict | None = None) -> dict:
    """Train as settings say; returns {"losses": {step: loss}, "val_losses": {step: loss}, "checkpoint":
    path, "preempted": whether SIGTERM stopped it (after saving)}.

    extend.py's hooks: make_loaders(settings, plan, env, folder) -> (train loader, val loader or None)
    replaces build_loaders; train_state_extras adds fields to every train_state.json.
    """
    env = setup_distributed(settings.device)
    preemption = Preemption()
    previous_handlers = {signum: signal.signal(signum, preemption.request) for signum in SIGNAL_EXIT_STATUS}
    previous_threads = torch.get_num_threads()
    try:
        return run(settings, env, preemption, make_loaders or build_loaders, train_state_extras or {})
    except CheckpointError as error:  # checkpoint.py's errors name the file and the fix; here they stop the run
        raise TrainError(str(error)) from None
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        torch.set_num_threads(previous_threads)
        teardown_distributed(env)


def run_main(work, settings) -> None:
    """A script's main: `work(settings)` (train or extend.extend), each fault in one line and its exit
    status; a preempted run exits with its signal's status so a scheduler requeues it."""
    try:
        summary = work(settings)
    except (TrainError, CheckpointError, data.DataError, FolderBusy) as error:
        rank = os.environ.get("RANK")
        print(f"error{f' (rank {rank})' if rank not in (None, '0') else ''}: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # outside the loop's handler, or a second Ctrl-C: what was saved is whole
        print("interrupted (Ctrl-C); every checkpoint saved is whole: rerun the same command to continue",
              file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_STATUS)
    if summary.get("preempted"):  # saved, not finished: requeue (143 after SIGTERM, 130 after Ctrl-C)
        sys.exit(summary["exit_status"])


def main(argv=None):
    run_main(train, parse_args(argv))


if __name__ == "__main__":
    main()
