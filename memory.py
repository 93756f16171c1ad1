"""Memory of one training step, per process: what `extend.py --dry_run` plans for a GPU, what
`--measure` checks it against on this CPU, and what train.py's start-up check refuses.

    python extend.py --dry_run --size 7b --gpus 8 --fsdp --activation_checkpointing   # the plan per GPU
    python extend.py --dry_run --size tiny --measure       # the plan beside autograd's saved tensors

    from memory import plan_memory
    plan = plan_memory(config, seq_len=65536, micro_batch=1, gpus=8, fsdp=True, activation_checkpointing=True,
                       loss_chunk=4096)
    print(plan.total / 2**30, "GiB")

The plan counts AdamW in fp32 (parameters, gradients, two moments; sharded by FSDP), the
activations a block saves for backward as olmpool.py's block computes them (counted from
autograd's saved tensors, within 5% at small sizes), and the largest short-lived allocation on top.
It does not count allocator slack, communication buffers or the gradients of activations in
backward: on CPU the measured peak ran up to 22% above it.

train.py's refusal (activation_estimate) is a separate, coarser count; see its docstring.
"""

from __future__ import annotations

import dataclasses
import resource
from dataclasses import dataclass

import torch

import olmpool
from olmpool import ModelConfig, Transformer

GIB = 2**30


# ----------------------------------------------------------------------------------------------
# train.py's check before a run: activations that cannot fit


def activation_estimate(config: ModelConfig, micro_batch: int, seq_len: int, activation_checkpointing: bool,
                        mask_documents: bool, device_type: str) -> dict[str, float]:
    """Bytes one process holds for one micro-batch's backward pass, by part, for train.py's refusal
    of a run that cannot fit (weights, optimizer and temporaries come on top).

    Coarser than plan_memory: per layer, roughly the residual, norms, q/k/v, attention output and
    the MLP's three widths; and the logits with their gradient counted whole, (micro_batch, seq_len,
    vocab) in fp32 twice, although the chunked loss (olmpool.ChunkedCrossEntropy) holds one chunk
    of them at a time. At long sequences on small models that count decides the refusal.
    """
    B, T = micro_batch, seq_len
    element = 2 if device_type == "cuda" else 4  # bf16 autocast on GPU, fp32 on CPU
    parts = {"logits": 2 * B * T * config.vocab_size * 4}
    per_layer = B * T * (6 * config.d_model + 2 * (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
                         + 3 * config.mlp_hidden) * element
    stored_layers = 1 if activation_checkpointing else config.n_layers
    parts["layers"] = stored_layers * per_layer + (config.n_layers * B * T * config.d_model * element
                                                   if activation_checkpointing else 0)
    dense_scores = config.attention_backend == "naive" or (mask_documents and config.attention_backend == "sdpa")
    if dense_scores:  # a (T, T) mask or score matrix per head and layer
        parts["attention scores"] = stored_layers * B * config.n_heads * T * T * 4
    return parts


# ----------------------------------------------------------------------------------------------
# The plan per GPU (extend.py --dry_run)


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


def memory_plan(config: ModelConfig, seq_len: int, micro_batch: int, gpus: int, fsdp: bool,
                activation_checkpointing: bool, loss_chunk: int, gpu_memory: float) -> str:
    """--dry_run: the plan per GPU, whether it fits gpu_memory GiB, and what would if it does not."""
    kwargs = dict(seq_len=seq_len, micro_batch=micro_batch, gpus=gpus, fsdp=fsdp,
                  activation_checkpointing=activation_checkpointing, loss_chunk=loss_chunk)
    plan = plan_memory(config, **kwargs)
    budget = gpu_memory * GIB
    out = [f"memory plan per GPU: {olmpool.count_parameters(config) / 1e9:.2f}B parameters, sequence {seq_len:,}, "
           f"micro-batch {micro_batch}, {gpus} GPU(s), {'FSDP2' if fsdp else 'DDP (replicated)'}, "
           f"activation checkpointing {'on' if activation_checkpointing else 'off'}, bf16 activations, "
           f"attention backend {config.attention_backend}"]
    out += [f"  {name:52s} {size / GIB:8.2f} GiB  {why}" for name, size, why in plan.lines]
    fits = plan.total <= budget
    out.append(f"  {'total':52s} {plan.total / GIB:8.2f} GiB  of {gpu_memory:g} GiB: "
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
        cp = plan_memory(config, **(kwargs | dict(seq_len=seq_len // 8)))  # activations split over 8 ranks
        options.append(f"context parallelism of 8 as OlmPool did (activations / 8: ~"
                       f"{(cp.activations + cp.transient + plan.persistent) / GIB:.1f} GiB; not implemented here)")
        out.append("  would fit: " + "; ".join(options))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# The plan against a measurement on this CPU (extend.py --dry_run --measure)


def compare_with_measurement(config: ModelConfig, seq_len: int, micro_batch: int, activation_checkpointing: bool,
                             loss_chunk: int) -> str:
    """--measure: the plan in fp32 for one process against measure_peak on this CPU."""
    plan = plan_memory(config, seq_len, micro_batch, 1, False, activation_checkpointing, loss_chunk,
                       activation_bytes=4)
    measured = measure_peak(config, seq_len, micro_batch, activation_checkpointing, loss_chunk)
    planned_peak = plan.activations + max(plan.transients.values())
    return (f"measured on this CPU in fp32, one process, micro-batch {micro_batch} of {seq_len}:\n"
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
    torch.manual_seed(0)
    model = Transformer(config, seed=0)
    for block in model.layers:
        block.activation_checkpointing = activation_checkpointing
    tokens = torch.randint(0, config.vocab_size, (micro_batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.zeros(micro_batch, seq_len, dtype=torch.int32)
    doc_ids[:, seq_len // 2:] = 1  # two documents per row, so document masking is in play

    def loss_sums(length):
        return model(tokens[:, :length], doc_ids=doc_ids[:, :length], targets=tokens[:, 1:length + 1],
                     loss_chunk=loss_chunk)

    def step(length):
        (loss_sums(length)[0] / length).backward()  # [0]: the summed cross-entropy

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
        loss_sums(seq_len)
    saved = sum(storages.values())
    return {"saved_activations": saved, "peak_growth": after - before}
