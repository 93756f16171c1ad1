r"""Evaluate checkpoints offline: RULER-style recall, LongPPL, attention sinks and retrieval probes, side by side.

    python evaluate.py runs/tiny hf:/models/Olmo-3-7B --lengths 4096,8192 --out eval/cmp
    python evaluate.py CKPT --lengths 256,1024 --tasks niah_single_1,niah_multikey_2 --samples 20 \
        --data data/builtin --short_context 128 --short_step 32        # toy lengths on a CPU
    python evaluate.py A B C --modes longppl --evaluator A --data data/long --lengths 32768
    python evaluate.py CKPT --data data/mix --lengths 256,1024   # a mix (synthetic.build_mix): probes too, at L..8L
    python evaluate.py CKPT --modes probes --data data/builtin_v8192 --probe_ids 7808,384 --probe_lengths 256,512
    python evaluate.py ... --out eval/cmp      # the same command again reuses every finished cell

A checkpoint is our folder (or a train.py run folder: its newest step) or hf:DIR, a local Hugging
Face folder. OUT gets results.json, results.md (the tables) and PNG plots. Every measure, its
definition and its source (RULER, HELMET, LongPPL, Zoology's MQAR, STRING): docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import compact_vocabulary
import data
import files
import olmpool
import probes
import ruler
import synthetic
# The tables, plots and before/after table (eval_report.py); evaluate.py's names for them, as callers know them
from eval_report import EFFECTIVE_THRESHOLD, before_after_table, cell, markdown_tables, plot, recall_summary  # noqa: F401
from progress import Progress
# EvaluationError: one error class for the evaluation's inputs, the prompts' included; RULER's scoring from ruler.py
from ruler import EvaluationError, cut_at_eos, mean_ci, score_samples  # noqa: F401

RESULTS_FILE = "results.json"
TABLES_FILE = "results.md"


# ----------------------------------------------------------------------------------------------
# Decoding: greedy through the KV cache, batched over prompts of equal token length

def model_generator(model: olmpool.Transformer, eos_id: int, chunk_size: int = 2048):
    """A generator function for `run_recall`: (prompts (B, T), max_new_tokens) -> B lists of new tokens."""
    def generate(prompts: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
        device = next(model.parameters()).device
        out = olmpool.generate(model, prompts.to(device), max_new_tokens, eos_id=eos_id, chunk_size=chunk_size)
        return [row.tolist() for row in out.cpu()]
    return generate


def decode_batches(samples: list[ruler.Sample], generate, batch_size: int, progress=None) -> list[list[int]]:
    """New tokens for every sample. Only prompts of equal length share a batch (no padding), so a
    sample's output never depends on its neighbours or on batch_size."""
    outputs: list[list[int] | None] = [None] * len(samples)
    by_length: dict[int, list[int]] = {}
    for i, sample in enumerate(samples):
        by_length.setdefault(len(sample.tokens), []).append(i)
    max_new = samples[0].max_new_tokens  # one task and length: one cap
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            prompts = torch.tensor([samples[i].tokens for i in chunk], dtype=torch.long)
            for i, new in zip(chunk, generate(prompts, max_new)):
                outputs[i] = list(new)
            if progress:
                progress.advance(len(chunk))
    return outputs


# ----------------------------------------------------------------------------------------------
# Attention rows for sampled queries, and the shares measured on them

@torch.no_grad()
def attention_rows(model: olmpool.Transformer, tokens: torch.Tensor, query_positions: list[int]) -> list[torch.Tensor]:
    """Per layer, the attention weights (H, Q, T) of the queries at query_positions over all T keys.

    The layer's own q and k (normed, rotated: Attention.qkv), softmax in float32 over what each
    query sees; the forward pass itself runs as usual, so memory stays O(T) per layer."""
    T = tokens.shape[1]
    positions = torch.arange(T, device=tokens.device)
    queries = torch.tensor(query_positions, device=tokens.device)
    x = model.embed(tokens)  # (1, T, d_model)
    rows = []
    for block in model.layers:
        attention = block.attention
        attention_input = block.attention_norm(x) if block.norm_placement == "pre" else x
        q, k, _ = attention.qkv(attention_input, positions)  # (1, H, T, D), (1, H_kv, T, D)
        q = q[0, :, queries].float()  # (H, Q, D)
        k = k[0].float().repeat_interleave(attention.n_heads // attention.n_kv_heads, dim=0)  # (H, T, D)
        scores = q @ k.transpose(1, 2) / math.sqrt(attention.head_dim)  # (H, Q, T)
        mask = olmpool.visible(queries[:, None], positions[None, :], attention.window)  # (Q, T)
        rows.append(scores.masked_fill(~mask, float("-inf")).softmax(dim=-1))
        x = block(x, positions)
    return rows


def sink_share(rows: torch.Tensor, first: int) -> torch.Tensor:
    """Mass each (head, query) puts on the first `first` positions: rows (..., T) -> (...)."""
    return rows[..., :first].sum(-1)


def local_share(rows: torch.Tensor, query_positions: list[int], span: int = 100) -> torch.Tensor:
    """Mass on the `span` tokens before each query (the query itself excluded): rows (H, Q, T) -> (H, Q)."""
    T = rows.shape[-1]
    keys = torch.arange(T, device=rows.device)
    q = torch.tensor(query_positions, device=rows.device)[:, None]
    band = (keys[None, :] < q) & (keys[None, :] >= q - span)  # (Q, T)
    return (rows * band).sum(-1)


def saturated(rows: torch.Tensor, threshold: float = 0.8) -> torch.Tensor:
    """Whether each (head, query)'s largest weight exceeds threshold: rows (..., T) -> bool (...)."""
    return rows.amax(-1) > threshold


def needle_mass(rows: torch.Tensor, span: tuple[int, int], query_position: int) -> tuple[torch.Tensor, float]:
    """Mass (H,) of the query's row (H, T) on the needle tokens [start, end), and uniform's share."""
    start, end = span
    return rows[:, start:end].sum(-1), (end - start) / (query_position + 1)


def needle_token_span(sample: ruler.Sample, tokenizer, needle: str) -> tuple[int, int]:
    """Token positions [start, end) of a needle sentence in the sample's tokens (+1: the leading EOS)."""
    at = sample.prompt.index(needle)
    start = 1 + len(tokenizer.encode(sample.prompt[:at]))
    end = 1 + len(tokenizer.encode(sample.prompt[:at + len(needle)]))
    return start, end


# ----------------------------------------------------------------------------------------------
# Losses: full context, short context (LongPPL), key tokens

@torch.no_grad()
def token_losses(model: olmpool.Transformer, tokens: torch.Tensor, chunk: int = 1024, skip: int = 0) -> torch.Tensor:
    """Loss (natural log) of each token given all tokens before it: tokens (T,) -> (T - 1 - skip,), the
    losses of positions 1 + skip .. T - 1.

    The LM head runs on `chunk` positions at a time (a 64K x 100K logit matrix would be 25 GB), and
    not at all on the `skip` first positions, whose losses the caller does not want."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    hidden = model.hidden_states(tokens[None, :-1])[0]  # (T - 1, d_model)
    losses = [F.cross_entropy(model.lm_head(hidden[s:s + chunk]).float(), tokens[1 + s:1 + s + chunk], reduction="none")
              for s in range(skip, hidden.shape[0], chunk)]
    return torch.cat(losses).cpu()


@torch.no_grad()
def short_context_losses(model: olmpool.Transformer, tokens: torch.Tensor, short_context: int, step: int) -> torch.Tensor:
    """LongPPL's short-context losses: token p in block [s + C, s + C + step) sees only tokens s..p-1.

    Returns (T,) with NaN before position C (= short_context), which are never key tokens."""
    T = tokens.shape[0]
    out = torch.full((T,), float("nan"))
    for s in range(0, max(T - short_context, 0), step):
        end = min(s + short_context + step, T)
        out[s + short_context:end] = token_losses(model, tokens[s:end], skip=short_context - 1)
    return out


def select_key_tokens(full: torch.Tensor, short: torch.Tensor, short_context: int,
                      lsd_threshold: float = 2.0, lcl_threshold: float = -2.0) -> torch.Tensor:
    """LongPPL's key tokens (positions of a (T,) loss vector indexed by token position): LSD > 2 and LCL > -2.

    full[p], short[p]: the loss of token p with the full and the short context (NaN where undefined).
    LSD = short - full; LCL = -full. Positions below short_context are never key tokens."""
    positions = torch.arange(full.shape[0])
    chosen = (positions >= short_context) & ((short - full) > lsd_threshold) & (-full > lcl_threshold)
    return positions[chosen & ~torch.isnan(short) & ~torch.isnan(full)]


def heldout_windows(data_dir, length: int, count: int) -> list[torch.Tensor]:
    """`count` windows of length + 1 tokens spread evenly over a prepared folder's whole val split (--heldout
    windows): they cut documents anywhere and may span several.

    Evenly spread, not the first ones: on the built-in corpus the first 2,048 val tokens (pydoc prose
    and ctypes) score 0.65 nats worse than the split as a whole, so a prefix misstates held-out loss."""
    loader = data.TokenLoader(data_dir, "val", seq_len=length, global_batch_size=1)
    starts = np.linspace(0, loader.n_windows - 1, num=min(count, loader.n_windows)).round().astype(int)
    return [torch.from_numpy(loader._tokens(int(w) * length, length + 1).astype(np.int64)) for w in starts]


def heldout_documents(data_dir, length: int, count: int, min_length: int = 0) -> list[torch.Tensor]:
    """Up to `count` val documents of at least max(length, min_length) tokens, evenly spread over those, each
    read from its start: the end-of-document token before it (the separator the models saw before every
    document) and its first `length` tokens. As LongPPL's authors read theirs (whole documents of a minimum
    length, cut to the maximum from the start), so no text starts mid-document or runs into the next one.
    With min_length the longest length of a table, every length reads the same documents: the loss at 2,048
    minus the loss at 256 is then more context on the same texts, not other texts."""
    documents, eos_id = val_documents(data_dir)
    shortest = max(length, min_length)
    long_enough = [(tokens, start) for tokens, start, size in documents if size >= shortest]
    if not long_enough:
        raise data.DataError(f"the val split of {data_dir} has no document of {shortest} tokens or more to read whole; "
                             f"pass shorter --lengths (or --heldout_min_length), --heldout windows (windows across "
                             f"documents), or --data a folder of long documents (python data.py prepare "
                             f"my_long_texts/ --out data/long)")
    picks = np.linspace(0, len(long_enough) - 1, num=min(count, len(long_enough))).round().astype(int)
    return [torch.from_numpy(np.concatenate([[eos_id], tokens[start:start + length]]).astype(np.int64))
            for tokens, start in (long_enough[i] for i in picks)]


def val_documents(data_dir) -> tuple[list[tuple[np.ndarray, int, int]], int]:
    """([(the shard's tokens, where a val document starts, its length before its EOS)], the EOS id)."""
    manifest = data.read_manifest(data_dir)
    if "val" not in manifest["splits"]:
        raise data.DataError(f"{data_dir} has no val split; prepare it with a val fraction (python data.py prepare)")
    tokenizer, documents = manifest["tokenizer"], []
    for record in manifest["splits"]["val"]["shards"]:
        shard = data.read_shard(Path(data_dir) / record["file"], vocab_size=tokenizer["vocab_size"])
        starts = shard.doc_starts.astype(np.int64)
        ends = np.append(starts[1:], shard.tokens.size) - 1  # each document ends with its own EOS
        documents += [(shard.tokens, int(start), int(end - start)) for start, end in zip(starts, ends)]
    return documents, tokenizer["eos_id"]


# ----------------------------------------------------------------------------------------------
# Checkpoints

def resolve_checkpoint(spec: str) -> str:
    """Our folder, a train.py run folder (its newest complete step_N), or hf:DIR (checkpoint.find_source)."""
    try:
        return str(checkpoint.find_source(spec, flag=""))
    except checkpoint.CheckpointError as error:
        raise EvaluationError(str(error)) from None


def checkpoint_fingerprint(spec: str) -> str:
    """Size and modification time of the weight files: cells of a rewritten checkpoint are recomputed."""
    return checkpoint.parse_source(spec).fingerprint()


def load_checkpoint(spec: str, device: str, dtype: torch.dtype | None):
    """(model, tokenizer, description) for our folder or hf:DIR (checkpoint.load_source), in the stored
    dtype or `dtype`; the tokenizer from compact_vocabulary.tokenizer_for."""
    source = checkpoint.parse_source(spec)
    try:
        model, summary = checkpoint.load_source(source, dtype=dtype, flag="")
    except checkpoint.CheckpointError as error:
        raise EvaluationError(str(error)) from None
    tokenizer = compact_vocabulary.tokenizer_for(source.folder)
    if source.hf and not 100_278 <= model.config.vocab_size <= 100_352 and not hasattr(tokenizer, "eos_id"):
        print(f"warning: {spec} has vocab_size {model.config.vocab_size}, not dolma2's 100,278 (padded to 100,352), yet "
              f"evaluate.py reads it with dolma2 (compact_vocabulary.tokenizer_for); its scores are meaningless unless it uses "
              f"dolma2", file=sys.stderr)
    vocab = getattr(tokenizer, "vocab_size", None) or getattr(getattr(tokenizer, "encoding", None), "n_vocab", None)
    if vocab is not None and vocab > model.config.vocab_size:
        raise EvaluationError(f"{spec}: its tokenizer has {vocab} ids but the model only {model.config.vocab_size}; "
                              f"is this checkpoint's tokenizer ({data.COMPACT_VOCAB_FILE}) missing from its folder?")
    return model.to(device).eval(), tokenizer, summary


def tokenizer_identity(tokenizer) -> str:
    vocab = getattr(tokenizer, "vocab_size", None) or getattr(getattr(tokenizer, "encoding", None), "n_vocab", None)
    return f"{getattr(tokenizer, 'name', type(tokenizer).__name__)}/{vocab}"


# ----------------------------------------------------------------------------------------------
# Results: one JSON file, cells reused when their settings match

def load_results(out: Path) -> dict:
    path = out / RESULTS_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise EvaluationError(f"{path} is not valid JSON ({error}); remove it or choose another --out") from None
    return {"recall": {}, "longppl": {}, "attention": {}, "models": {}, "runs": []}


def save_results(out: Path, results: dict) -> None:
    """results.json written whole (never half a file), NaN written as NaN (allow_nan), as it always was."""
    out.mkdir(parents=True, exist_ok=True)
    files.write_json_atomically(out / RESULTS_FILE, results, indent=1, allow_nan=True)


def put(results: dict, mode: str, label: str, key: str, value: dict) -> None:
    results.setdefault(mode, {}).setdefault(label, {})[key] = value


# ----------------------------------------------------------------------------------------------
# The three modes

def run_recall(generate, tokenizer, tasks: list[str], lengths: list[int], samples: int, seed: int,
               batch_size: int = 8, eos_id: int | None = None, model: olmpool.Transformer | None = None,
               needle_samples: int = 2, done=None, progress: Progress | None = None) -> dict:
    """Recall cells {task: {length: cell}} for one model. `generate` is a model_generator or any function
    (prompts (B, T), max_new_tokens) -> B lists of new tokens (an oracle in the tests). With `model`,
    NIAH cells also measure attention on the needle. `done(task, length)` returns a cell to reuse or None.

    Generation caps are RULER's, widened for a vocabulary that spells the answers in more tokens than dolma2
    (ruler.generation_cap); each cell reports the cap and the score of an oracle cut at it."""
    eos_id = getattr(tokenizer, "eos_id", data.EOS_ID) if eos_id is None else eos_id
    cells: dict = {}
    for task_name in tasks:
        for length in lengths:
            previous = done(task_name, length) if done else None
            if previous is not None:
                cells.setdefault(task_name, {})[str(length)] = previous
                if progress:
                    progress.advance(samples)
                continue
            try:
                batch = ruler.build_samples(task_name, length, samples, seed, tokenizer, eos_id,
                                            reference=data.get_tokenizer())
            except EvaluationError as error:
                cells.setdefault(task_name, {})[str(length)] = {"skipped": str(error), "n": 0}
                if progress:
                    progress.advance(samples)
                continue
            result = score_samples(batch, decode_batches(batch, generate, batch_size, progress), tokenizer, eos_id)
            if model is not None and ruler.TASKS[task_name].kind == "niah":
                result["needle_attention"] = measure_needle_attention(model, tokenizer, batch[:needle_samples])
            cells.setdefault(task_name, {})[str(length)] = result
    return cells


def measure_needle_attention(model, tokenizer, samples: list[ruler.Sample]) -> dict:
    """Mass the answer-generating query (the prompt's last position) puts on the answer's needle, per layer
    (mean and max over heads), and its lift over uniform attention."""
    per_layer_mean, per_layer_max, lifts = [], [], []
    device = next(model.parameters()).device
    for sample in samples:
        tokens = torch.tensor([sample.tokens], device=device)
        query = len(sample.tokens) - 1
        spans = [needle_token_span(sample, tokenizer, n) for n in sample.needles]
        rows = attention_rows(model, tokens, [query])
        means, maxes = [], []
        for layer_rows in rows:
            mass = sum(needle_mass(layer_rows[:, 0], span, query)[0] for span in spans)  # (H,)
            means.append(float(mass.mean()))
            maxes.append(float(mass.max()))
        uniform = sum(end - start for start, end in spans) / (query + 1)
        per_layer_mean.append(means)
        per_layer_max.append(maxes)
        lifts.append(max(maxes) / uniform)
    return {"samples": len(samples), "mass_mean_per_layer": np.mean(per_layer_mean, 0).tolist(),
            "mass_max_per_layer": np.mean(per_layer_max, 0).tolist(), "best_head_lift": float(np.mean(lifts))}


def run_losses(model, windows: list[torch.Tensor], key_tokens: list[list[int]] | None, buckets: int = 8) -> dict:
    """Held-out loss, perplexity, LongPPL on the given key tokens, and loss by position bucket."""
    all_losses, documents = [], []  # documents: (LongPPL, key tokens) of each text with key tokens
    for i, window in enumerate(windows):
        losses = token_losses(model, window)  # positions 1..T-1
        all_losses.append(losses)
        if key_tokens is not None and key_tokens[i]:
            documents.append((math.exp(float(losses[torch.tensor(key_tokens[i]) - 1].mean())), len(key_tokens[i])))
    stacked = torch.stack(all_losses)  # (n, T - 1)
    mean_loss = float(stacked.mean())
    edges = np.linspace(0, stacked.shape[1], buckets + 1).astype(int)
    by_bucket = [{"from": int(edges[b]) + 1, "to": int(edges[b + 1]), "loss": float(stacked[:, edges[b]:edges[b + 1]].mean())}
                 for b in range(buckets)]
    return {"windows": len(windows), "tokens": int(stacked.numel()), "loss": mean_loss, "ppl": math.exp(mean_loss),
            "longppl": longppl_over_documents(documents), "key_tokens": sum(n for _, n in documents),
            "loss_by_position": by_bucket}


def longppl_over_documents(documents: list[tuple[float, int]]) -> float | None:
    """LongPPL over documents as PKU-ML/LongPPL's perplexity.py aggregates it: each document's LongPPL (exp of its
    mean key-token loss) weighted by its key tokens in log space, exp(sum n_d log L_d / sum n_d), which is exp of
    the mean loss over all key tokens. Documents without key tokens do not count; None if none has any."""
    weight = sum(n for _, n in documents)
    return math.exp(sum(n * math.log(longppl) for longppl, n in documents) / weight) if weight else None


def find_key_tokens(evaluator, windows: list[torch.Tensor], short_context: int, step: int,
                    progress: Progress | None = None) -> list[list[int]]:
    keys = []
    for window in windows:
        full = torch.cat([torch.tensor([float("nan")]), token_losses(evaluator, window)])  # indexed by position
        short = short_context_losses(evaluator, window, short_context, step)
        keys.append(select_key_tokens(full, short, short_context).tolist())
        if progress:
            progress.advance()
    return keys


SINK_QUERY = 4000  # the OlmPool authors' query position, inside their 4,096-token window (docs/evaluation.md)


def sink_query_position(config: olmpool.ModelConfig, text_length: int, query_at: int = SINK_QUERY) -> int:
    """The query whose attention run_attention measures in a text of `text_length` tokens: position 4,000 as the
    authors', but at most the last position and at most the smallest window's last position W - 1. A query
    past W - 1 cannot reach the first tokens on a windowed layer, so its sink share there would be 0 by
    construction: it would measure the window, not the sink."""
    windows = [w for w in config.layer_windows if w is not None]
    return min([query_at, text_length - 1] + [w - 1 for w in windows])


def run_attention(model, windows: list[torch.Tensor], query: int | None = None) -> dict:
    """Sink (first 1, 4, 100 tokens), local (100 before) and saturation, per layer and head, averaged over windows.

    query: one position for every model (e.g. to compare windowed and global models at one place), capped at
    the last position; None: sink_query_position's rule for this model."""
    device = next(model.parameters()).device
    T = windows[0].shape[0]
    rule = "min(4000, T - 1, smallest window - 1)" if query is None else f"{query} (given), at most T - 1"
    query = sink_query_position(model.config, T) if query is None else min(query, T - 1)
    sums = None
    for window in windows:
        rows = attention_rows(model, window[None].to(device), [query])
        measures = {
            "sink_first_1": [sink_share(r[:, 0], 1) for r in rows],
            "sink_first_4": [sink_share(r[:, 0], 4) for r in rows],
            "sink_first_100": [sink_share(r[:, 0], 100) for r in rows],
            "local_100": [local_share(r, [query])[:, 0] for r in rows],
            "saturated": [saturated(r[:, 0]).float() for r in rows],
        }
        if sums is None:
            sums = {k: [v.clone() for v in layers] for k, layers in measures.items()}
        else:
            for k, layers in measures.items():
                sums[k] = [a + b for a, b in zip(sums[k], layers)]
    per_head = {k: [(v / len(windows)).tolist() for v in layers] for k, layers in sums.items()}
    per_layer = {k: [float(np.mean(h)) for h in layers] for k, layers in per_head.items()}
    return {"query_position": query, "query_rule": rule, "windows": len(windows), "per_layer": per_layer,
            "per_head": per_head}


# ----------------------------------------------------------------------------------------------
# The whole evaluation, resumable

def versions() -> dict:
    import platform
    found = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        import subprocess
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
        found["olmpool_commit"] = commit.stdout.strip() or None
    except OSError:
        found["olmpool_commit"] = None
    return found


MAX_LENGTH = 1 << 20  # longest --lengths taken: 16x OlmPool's 64K extension; beyond it a typo, not a context


MODES = ("recall", "longppl", "attention", "probes")
DEFAULT_MODES = ("recall", "longppl", "attention")  # and probes, when --data holds a synthetic recipe


def check_flags(modes: list[str], tasks: list[str], samples: int, windows: int, batch_size: int, device: str | None,
                data_dir, probe_count: int = 1) -> None:
    """Refuse the command line's modes, tasks, counts, device and --data before any model loads, naming the fix."""
    if not modes or set(modes) - set(MODES):
        raise EvaluationError(f"--modes {','.join(modes)!r}: name one or more of {', '.join(MODES)}")
    if "recall" in modes and not tasks:
        raise EvaluationError(f"--tasks names no task; choose from {', '.join(ruler.TASK_GROUPS)} or a task")
    for flag, value in (("--samples", samples), ("--windows", windows), ("--batch_size", batch_size),
                        ("--probe_count", probe_count)):
        if value < 1:
            raise EvaluationError(f"{flag} {value} must be at least 1, e.g. {flag} 8")
    check_device(device)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise EvaluationError(f"--data {data_dir}: no such folder; pass a prepared folder (python data.py prepare "
                              f"TEXTS --out DIR), e.g. data/builtin")
    if data_dir is not None:
        data.read_manifest(data_dir)  # a folder that is not a prepared one: DataError


def check_device(device: str | None) -> None:
    """--device is cpu, cuda or cuda:N, and a GPU is there for cuda."""
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise EvaluationError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N")
    if device and device.startswith("cuda") and int(device[5:] or 0) >= torch.cuda.device_count():
        raise EvaluationError(f"--device {device}: no such GPU here ({torch.cuda.device_count()} found); use --device "
                              f"cpu, or leave it out")


def check_inputs(checkpoints: dict[str, str], lengths: list[int], modes, data_dir, short_context: int,
                 short_step: int) -> None:
    """Refuse what cannot run before any model loads, naming the flag to change."""
    if not checkpoints:
        raise EvaluationError("no checkpoint given; pass at least one folder or hf:DIR")
    if not lengths:
        raise EvaluationError("--lengths names no length; give comma-separated lengths, e.g. 4096,8192")
    for length in lengths:
        if length < 2:
            raise EvaluationError(f"--lengths: {length} is too short; use lengths of at least a few hundred tokens")
        if length > MAX_LENGTH:
            raise EvaluationError(f"--lengths: {length} is beyond {MAX_LENGTH:,} tokens, the longest evaluate.py "
                                  f"takes; use the lengths the models were trained for and a few times more")
    needs_data = {"longppl", "attention", "probes"} & set(modes)
    if needs_data and data_dir is None:
        raise EvaluationError(f"modes {sorted(needs_data)} read held-out text: pass --data DIR (a prepared folder "
                              f"with a val split, e.g. data/builtin), or use --modes recall")
    if short_step < 1 or short_context < 1:
        raise EvaluationError(f"--short_context {short_context} and --short_step {short_step} must be positive")


def heldout_settings(data_dir, windows: int, heldout: str, min_length: int) -> dict:
    """What the held-out texts depend on (LongPPL and attention cells with others are recomputed)."""
    settings = {"data": str(data_dir), "windows": windows}
    if heldout != "windows":  # windows were the only way once: their cells keep the settings they were saved with
        settings["heldout"] = heldout
        settings["min_length"] = min_length  # which documents every length reads
    return settings


def longppl_settings(heldout: dict, short_context: int, short_step: int, evaluator: str,
                     evaluator_fingerprint: str) -> dict:
    """What LongPPL's key tokens and cells depend on; those saved with other settings are recomputed."""
    settings = {**heldout, "short_context": short_context, "short_step": short_step,
                "evaluator": evaluator, "evaluator_fingerprint": evaluator_fingerprint}
    if short_context != 4096 or short_step != 1024:
        settings["note"] = (f"short context {short_context} stepped by {short_step} "
                            f"(LongPPL's published 4096 / 1024 scaled down for these lengths)")
    return settings


def resolve_evaluator(checkpoints: dict[str, str], evaluator: str | None) -> tuple[str, str]:
    """(name, checkpoint) of the model that picks LongPPL's key tokens: one of the compared checkpoints by its
    label, or a checkpoint outside them (our folder or hf:DIR), whose own LongPPL is then not reported. An
    evaluator among the compared models picks tokens on which its own loss is below 2 nats, so its LongPPL is
    below e^2 by construction; LongPPL's authors use a strong model outside the comparison. Default: the first."""
    evaluator = evaluator or next(iter(checkpoints))
    if evaluator in checkpoints:
        return evaluator, checkpoints[evaluator]
    try:
        return evaluator, resolve_checkpoint(evaluator)
    except EvaluationError as error:
        raise EvaluationError(f"--evaluator {evaluator!r} is neither one of the checkpoints' labels {list(checkpoints)} "
                              f"nor a checkpoint outside them: {error}") from None


def check_reads_data(name: str, model_tokenizer: str, data_dir) -> None:
    """Refuse a model whose tokenizer is not the one the held-out data was prepared with."""
    data_tokenizer = tokenizer_identity(compact_vocabulary.tokenizer_for(data_dir))
    if model_tokenizer != data_tokenizer:
        raise EvaluationError(f"{name} reads {model_tokenizer} tokens but {data_dir} was prepared with "
                              f"{data_tokenizer}; prepare the held-out data with this checkpoint's tokenizer")


def find_missing_key_tokens(results: dict, out: Path, evaluator_spec: str, evaluator: str, lengths: list[int],
                            held_out, ppl_settings: dict, device: str, dtype: torch.dtype | None,
                            progress: bool) -> None:
    """LongPPL's key tokens at each length not yet found with `ppl_settings` (which also give the short context,
    its step and the window count), from the one evaluator model, saved after each length."""
    missing = [L for L in lengths if results.get("key_tokens", {}).get(str(L), {}).get("settings") != ppl_settings]
    if not missing:
        return
    model, tokenizer, _ = load_checkpoint(evaluator_spec, device, dtype)
    check_reads_data(evaluator, tokenizer_identity(tokenizer), ppl_settings["data"])
    meter = Progress(len(missing) * ppl_settings["windows"], f"key tokens ({evaluator})", enabled=progress)
    for L in missing:
        try:
            keys = find_key_tokens(model, held_out(L), ppl_settings["short_context"], ppl_settings["short_step"], meter)
            results.setdefault("key_tokens", {})[str(L)] = {"settings": ppl_settings, "positions": keys}
        except data.DataError as error:
            results.setdefault("key_tokens", {})[str(L)] = {"settings": ppl_settings, "skipped": str(error)}
        save_results(out, results)


def fill_cell(results: dict, out: Path, mode: str, label: str, key: str, settings: dict, compute) -> None:
    """Run compute() for this cell unless results hold one made with the same settings; save it at once, so that
    a stopped evaluation resumes from the next cell."""
    previous = cell(results, mode, label, key)
    if previous and previous.get("settings") == settings:
        return
    result = compute()
    result["settings"] = settings
    put(results, mode, label, key, result)
    save_results(out, results)


def recall_cells(results: dict, out: Path, label: str, model, tokenizer, tasks: list[str], lengths: list[int],
                 samples: int, seed: int, batch_size: int, identity: dict, progress: bool) -> None:
    """Every (task, length) recall cell of one model, each saved when done; cells with the same settings are reused."""
    cell_settings = {"seed": seed, "samples": samples, **identity}
    if tokenizer_identity(tokenizer) != tokenizer_identity(data.get_tokenizer()):
        cell_settings["answer_caps"] = "widened"  # beyond RULER's (ruler.generation_cap): older cells are redone

    def done(task, length):
        previous = cell(results, "recall", label, f"{task}/{length}")
        return previous if previous and previous.get("settings") == cell_settings else None

    meter = Progress(len(tasks) * len(lengths) * samples, f"recall ({label})", enabled=progress)
    eos_id = getattr(tokenizer, "eos_id", data.EOS_ID)
    for task in tasks:
        for length in lengths:
            cells = run_recall(model_generator(model, eos_id), tokenizer, [task], [length], samples, seed,
                               batch_size, eos_id, model, done=done, progress=meter)
            result = cells[task][str(length)]
            result["settings"] = cell_settings
            put(results, "recall", label, f"{task}/{length}", result)
            save_results(out, results)


def longppl_cell(model, label: str, model_tokenizer: str, ppl_settings: dict, key_tokens: dict, held_out,
                 length: int) -> dict:
    """Held-out loss and LongPPL of one model at one length, on the evaluator's key tokens (or why they are missing)."""
    check_reads_data(label, model_tokenizer, ppl_settings["data"])
    if "skipped" in key_tokens:
        return {"skipped": key_tokens["skipped"]}
    result = run_losses(model, held_out(length), key_tokens.get("positions"))
    if label == ppl_settings["evaluator"]:
        result["evaluator_is_this_model"] = True  # it picked its own key tokens: LongPPL below e^2 by construction
    return result


def heldout_cells(results: dict, out: Path, label: str, model, identity: dict, lengths: list[int], modes,
                  ppl_settings: dict, attention_settings: dict, held_out, sink_query: int | None) -> None:
    """One model's LongPPL and attention cells at each length, each saved when done; finished cells are reused."""
    model_tokenizer = results["models"][label]["tokenizer"]
    for length in lengths:
        if "longppl" in modes:
            key_tokens = results.get("key_tokens", {}).get(str(length), {})
            fill_cell(results, out, "longppl", label, str(length), {**ppl_settings, **identity},
                      lambda: longppl_cell(model, label, model_tokenizer, ppl_settings, key_tokens, held_out, length))
        if "attention" in modes:
            fill_cell(results, out, "attention", label, str(length), {**attention_settings, **identity},
                      lambda: attention_cell(model, held_out, length, sink_query))


def attention_cell(model, held_out, length: int, query: int | None) -> dict:
    """Sinks, local share and saturation of one model at one length (or why the held-out text cannot give them)."""
    try:
        return run_attention(model, held_out(length), query)
    except data.DataError as error:
        return {"skipped": str(error)}


def resolve_probe_ids(data_dir, probe_ids: tuple[int, int] | None) -> synthetic.SyntheticIds:
    """The id block the probes draw from: probe_ids (first, size) when given, else the data folder's synthetic
    recipe's (synthetic.recipe_of: the block the mix trained on)."""
    if probe_ids is not None:
        first, size = probe_ids
    elif (recipe := synthetic.recipe_of(data_dir)) is not None:
        first, size = recipe["ids"]["first"], recipe["ids"]["size"]
    else:
        raise EvaluationError(f"--modes probes: {data_dir} has no synthetic recipe (a folder of synthetic.build_mix) "
                              f"to take the synthetic ids from; pass --probe_ids FIRST,SIZE")
    try:
        return synthetic.SyntheticIds(first, size)
    except ValueError as error:
        raise EvaluationError(f"--probe_ids {first},{size}: {error}") from None


def probe_plan(modes, data_dir, lengths: list[int], seed: int, probe_lengths: list[int] | None,
               probe_ids: tuple[int, int] | None, probe_count: int | None) -> dict | None:
    """What the probes run, resolved before any model loads (None without the probes mode): their lengths, the
    settings their cells are reused for, the end-of-document id and a reader of the haystack (the val split)."""
    if "probes" not in modes:
        return None
    ids = resolve_probe_ids(data_dir, probe_ids)
    settings = {"data": str(data_dir), "ids": {"first": ids.first, "size": ids.size},
                "count": probe_count or probes.DEFAULT_COUNT, "seed": seed, "version": probes.PROBE_VERSION}
    return {"lengths": list(probe_lengths or lengths), "settings": settings,
            "eos_id": data.read_manifest(data_dir)["tokenizer"]["eos_id"],
            "haystack": functools.cache(lambda: probes.heldout_haystack(data_dir))}  # read once, for every model


def probe_cells(results: dict, out: Path, label: str, model, identity: dict, plan: dict, progress: bool) -> None:
    """One model's probe cells ({kind}/{length}), each saved when done; cells with the same settings are reused."""
    settings, ids = plan["settings"], synthetic.SyntheticIds(**plan["settings"]["ids"])
    meter = Progress(len(probes.PROBE_KINDS) * len(plan["lengths"]), f"probes ({label})", enabled=progress)

    def compute(kind: str, length: int) -> dict:
        check_reads_data(label, results["models"][label]["tokenizer"], settings["data"])  # the haystack's tokens
        return probes.run_probe(kind, model, ids, length, settings["count"], settings["seed"], plan["haystack"](),
                                plan["eos_id"])

    for length in plan["lengths"]:
        for kind in probes.PROBE_KINDS:
            fill_cell(results, out, "probes", label, f"{kind}/{length}", {**settings, **identity},
                      lambda: compute(kind, length))
            meter.advance()


def write_reports(results: dict, out: Path, labels: list[str], lengths: list[int], tasks: list[str],
                  probe_lengths: list[int] = ()) -> None:
    """results.json with the deviations named, results.md's tables and the plots."""
    results["deviations"] = ruler.deviations(tasks)
    save_results(out, results)
    (out / TABLES_FILE).write_text(markdown_tables(results, labels, lengths, tasks, probe_lengths))
    plot(results, labels, lengths, tasks, out)


def evaluate(checkpoints: dict[str, str], lengths: list[int], out, tasks: list[str] | None = None,
             modes=("recall", "longppl", "attention"), samples: int = 20, seed: int = 0, data_dir=None,
             evaluator: str | None = None, short_context: int = 4096, short_step: int = 1024, windows: int = 8,
             batch_size: int = 8, device: str | None = None, dtype: torch.dtype | None = None,
             command: list[str] | None = None, progress: bool = True, sink_query: int | None = None,
             heldout: str = "documents", heldout_min_length: int | None = None, probe_lengths: list[int] | None = None,
             probe_ids: tuple[int, int] | None = None, probe_count: int | None = None) -> dict:
    """Evaluate {label: checkpoint} at each length; results.json, results.md and plots in `out`. Resumes.

    evaluator: a label, or a checkpoint outside the compared ones, whose model picks LongPPL's key tokens
    (resolve_evaluator; default: the first checkpoint). sink_query: the attention query's position for every
    model (default: inside each model's window). heldout: "documents" (whole val documents, read from their
    start) or "windows" (windows of the val stream) for LongPPL and attention; `windows` is how many;
    heldout_min_length: documents of at least this many tokens at every length (default: the longest length
    some val document reaches: every length reads the same documents). probes: probes.py at probe_lengths
    (default: lengths), probe_count documents each (None: probes.DEFAULT_COUNT), on the synthetic ids
    probe_ids (first, size), by default the data folder's recipe's (synthetic.recipe_of)."""
    out = Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tasks = ruler.TASK_GROUPS["exact"] if tasks is None else tasks
    check_inputs(checkpoints, lengths, modes, data_dir, short_context, short_step)
    plan = probe_plan(modes, data_dir, lengths, seed, probe_lengths, probe_ids, probe_count)  # None without probes
    checkpoints = {label: resolve_checkpoint(spec) for label, spec in checkpoints.items()}
    evaluator, evaluator_spec = resolve_evaluator(checkpoints, evaluator)
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"--out {out} is a file; pass a folder for results.json, results.md and the plots")
    files.lock_folder(out, "evaluate.py")  # one writer per --out: a second evaluation into it is refused
    results = load_results(out)
    results["runs"].append({"command": command or sys.argv, "versions": versions(), "seed": seed, "samples": samples,
                            "lengths": lengths, "tasks": tasks, "modes": list(modes), "device": device,
                            "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    min_length = heldout_min_length or longest_heldout_length(data_dir, lengths, modes, heldout)
    texts = heldout_settings(data_dir, windows, heldout, min_length)
    ppl_settings = longppl_settings(texts, short_context, short_step, evaluator, checkpoint_fingerprint(evaluator_spec))
    attention_settings = {**texts, "query": "in window" if sink_query is None else sink_query}
    held_out = heldout_reader(data_dir, heldout, windows, min_length)
    check_heldout(held_out, data_dir, lengths, modes)

    # LongPPL's key tokens first, from the one evaluator, so every model is scored on the same tokens.
    if "longppl" in modes:
        find_missing_key_tokens(results, out, evaluator_spec, evaluator, lengths, held_out, ppl_settings,
                                device, dtype, progress)

    for label, spec in checkpoints.items():
        identity = {"checkpoint": spec, "fingerprint": checkpoint_fingerprint(spec)}  # cells reused for the same weights
        model, tokenizer, summary = load_checkpoint(spec, device, dtype)
        results["models"][label] = {"checkpoint": spec, "summary": summary, "tokenizer": tokenizer_identity(tokenizer),
                                    "parameters": sum(p.numel() for p in model.parameters())}
        print(f"[{label}] {spec}", file=sys.stderr)
        if "recall" in modes:
            recall_cells(results, out, label, model, tokenizer, tasks, lengths, samples, seed, batch_size, identity,
                         progress)
        heldout_cells(results, out, label, model, identity, lengths, modes, ppl_settings, attention_settings,
                      held_out, sink_query)
        if plan:
            probe_cells(results, out, label, model, identity, plan, progress)
        del model
    write_reports(results, out, list(checkpoints), lengths, tasks, plan["lengths"] if plan else ())
    check_computed(results, list(checkpoints), lengths, tasks, modes, out, plan["lengths"] if plan else ())
    return results


def heldout_reader(data_dir, heldout: str, windows: int, min_length: int):
    """held_out(length) -> the held-out texts at that length, read once per length for every model."""
    if heldout == "documents":
        return functools.cache(lambda length: heldout_documents(data_dir, length, windows, min_length))
    return functools.cache(lambda length: heldout_windows(data_dir, length, windows))


def longest_heldout_length(data_dir, lengths: list[int], modes, heldout: str) -> int:
    """The longest of the lengths that some val document reaches: by default every length reads documents of
    at least this many tokens, so all of a table's lengths read the same texts (longer ones are skipped)."""
    if heldout != "documents" or data_dir is None or not {"longppl", "attention"} & set(modes):
        return max(lengths)
    try:
        longest = max((size for _, _, size in val_documents(data_dir)[0]), default=0)
    except data.DataError:  # no val split: check_heldout says why
        return max(lengths)
    return max([length for length in lengths if length <= longest], default=max(lengths))


def check_heldout(held_out, data_dir, lengths: list[int], modes) -> None:
    """Refuse, before any model loads, val shards that do not read (ids beyond the vocabulary, a bad header:
    data.DataError), and an evaluation of held-out text only where no length has any."""
    if not {"longppl", "attention"} & set(modes):
        return
    manifest = data.read_manifest(data_dir)
    for record in manifest["splits"].get("val", {}).get("shards", []):
        data.read_shard(Path(data_dir) / record["file"], vocab_size=manifest["tokenizer"]["vocab_size"])
    reasons = []
    for length in lengths if "recall" not in modes else []:
        try:
            held_out(length)
            return
        except data.DataError as error:
            reasons.append(str(error))
    if reasons:
        raise EvaluationError(f"no length of --lengths {','.join(map(str, lengths))} has held-out text: {reasons[-1]}")


def check_computed(results: dict, labels: list[str], lengths: list[int], tasks: list[str], modes, out: Path,
                   probe_lengths: list[int] = ()) -> None:
    """An evaluation in which no cell could be computed (every length too long for the held-out text or the
    tasks, or unreadable val shards) is a failure, not an empty table: EvaluationError naming the first reason."""
    cells = [cell(results, "recall", label, f"{t}/{L}") for label in labels for t in tasks for L in lengths
             if "recall" in modes]
    cells += [cell(results, mode, label, str(L)) for mode in ("longppl", "attention") if mode in modes
              for label in labels for L in lengths]
    cells += [cell(results, "probes", label, f"{kind}/{L}") for kind in probes.PROBE_KINDS for label in labels
              for L in probe_lengths]
    measures = ("mean", "loss", "per_layer", "recall", "accuracy", "gain")  # what a computed cell of each mode holds
    if any(c and any(m in c for m in measures) for c in cells):
        return
    reason = next((c["skipped"] for c in cells if c and "skipped" in c), "no cell was run")
    raise EvaluationError(f"no cell could be computed ({reason}); {out / TABLES_FILE} is empty: choose other --lengths, "
                          f"--tasks or --data")


# ----------------------------------------------------------------------------------------------
# The main job's before/after table

def before_after(checkpoints: dict[str, str], data_dir, train_length: int, out, tasks: list[str] | None = None,
                 samples: int = 20, seed: int = 0, evaluator: str | None = None, windows: int = 8,
                 batch_size: int = 8, device: str | None = None, progress: bool = True,
                 probe_count: int | None = None, long_factor: int = 4) -> str:
    """Evaluate {label: checkpoint} (e.g. pretrained, extended, none control) at the pretraining length L and
    long_factor x L (the extended length), and return (and print) one markdown table: held-out loss, LongPPL and recall at both lengths. When the
    data folder holds a synthetic recipe (a mix that trained retrieval), a second table beside it: needle
    recall, MQAR accuracy and copy gain at L, 2L, 4L and 8L (probes.py, probe_count documents each, default 32).

    LongPPL's short context scales to L / 2 stepped by L / 8, and its key tokens come from `evaluator`
    (default: the label "extended" if present, else the first). Resumes through results.json in `out`."""
    L = train_length
    lengths = [L, long_factor * L]
    tasks = ["niah_single_1", "niah_multikey_2"] if tasks is None else tasks
    evaluator = evaluator or ("extended" if "extended" in checkpoints else next(iter(checkpoints)))
    probing = synthetic.recipe_of(data_dir) is not None
    results = evaluate(checkpoints, lengths, out, tasks=tasks,
                       modes=("recall", "longppl", "attention") + (("probes",) if probing else ()),
                       samples=samples, seed=seed, data_dir=data_dir, evaluator=evaluator,
                       short_context=max(L // 2, 1), short_step=max(L // 8, 1), windows=windows,
                       batch_size=batch_size, device=device, progress=progress, probe_lengths=probes.probe_lengths(L),
                       probe_count=probe_count,
                       command=[sys.argv[0], "before_after", json.dumps(checkpoints), str(data_dir), str(L)])
    table = before_after_table(results, list(checkpoints), lengths, tasks, probes.probe_lengths(L) if probing else ())
    print(table)
    return table


# ----------------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = parser.add_argument
    flag("checkpoints", nargs="+", help="our checkpoint or run folders, or hf:DIR")
    flag("--labels", help="comma-separated names for the checkpoints (default: their paths)")
    flag("--lengths", default="4096,8192,16384,32768,65536", help="comma-separated lengths in tokens")
    flag("--tasks", default="exact", help=f"comma-separated tasks or groups ({', '.join(ruler.TASK_GROUPS)}): "
                                          f"{', '.join(ruler.TASKS)}")
    flag("--modes", help="any of recall, longppl, attention, probes (default: the first three, and probes when --data "
                         "holds a synthetic recipe: a mix of synthetic.build_mix)")
    flag("--samples", type=int, default=100, help="samples per task and length (RULER 500, HELMET 100)")
    flag("--seed", type=int, default=0, help="prompts are a function of the seed, task, length and index")
    flag("--out", default="eval", help="folder for results.json, results.md and the plots")
    flag("--data", help="prepared data folder whose val split gives held-out text (longppl, attention)")
    flag("--windows", type=int, default=8, help="held-out documents (or windows) per length (longppl, attention)")
    flag("--evaluator", help="the model that picks LongPPL's key tokens: a checkpoint's label, or a checkpoint "
                             "outside them (folder or hf:DIR), as LongPPL's authors use (default: the first)")
    flag("--heldout", choices=["documents", "windows"], default="documents",
         help="LongPPL and attention read whole val documents from their start (default), "
              "or windows of the val stream that cut documents anywhere")
    flag("--heldout_min_length", type=int,
         help="with --heldout documents: read documents of at least this many tokens at every length (default: the "
              "longest of --lengths some val document reaches, so every length reads the same documents; give "
              "evaluations you compare the same value)")
    flag("--short_context", type=int, default=4096, help="LongPPL's short context (published: 4096)")
    flag("--short_step", type=int, default=1024, help="LongPPL's block per short context (published: 1024)")
    flag("--sink_query", type=int, help="position of the query whose attention is measured, the same for every "
                                        "model (default: 4000, at most the last position and each model's window - 1)")
    flag("--batch_size", type=int, default=8, help="prompts decoded together (equal lengths only)")
    flag("--probe_lengths", help="comma-separated lengths of the retrieval probes (default: the recipe's training "
                                 "length L times 1, 2, 4, 8; without a recipe, --lengths)")
    flag("--probe_ids", help="FIRST,SIZE: the synthetic id block the probes draw from (default: the recipe's)")
    flag("--probe_count", type=int, default=probes.DEFAULT_COUNT, help="probe documents per kind and length")
    flag("--device", help="cpu or cuda (default: cuda when available)")
    flag("--dtype", choices=["float32", "bfloat16", "float16"],
         help="cast the models (default: as stored; bfloat16 is the usual choice on a GPU)")
    return parser


def arguments(argv: list[str] | None = None) -> dict:
    """evaluate()'s keyword arguments from the command line, every flag checked (check_flags) before any
    model loads: an EvaluationError naming the flag and the fix. sweep.py checks its stages' flags here."""
    args = build_parser().parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise EvaluationError(f"--lengths {args.lengths!r}: give comma-separated integers, e.g. 4096,8192") from None
    labels = args.labels.split(",") if args.labels else list(args.checkpoints)
    if len(labels) != len(args.checkpoints) or len(set(labels)) != len(labels):
        raise EvaluationError(f"--labels: give {len(args.checkpoints)} distinct names, one per checkpoint")
    modes = [m.strip() for m in (args.modes or ",".join(DEFAULT_MODES)).split(",") if m.strip()]
    tasks = ruler.parse_tasks(args.tasks)
    check_flags(modes, tasks, args.samples, args.windows, args.batch_size, args.device, args.data, args.probe_count)
    if args.modes is None and args.data is not None and synthetic.recipe_of(args.data) is not None:
        modes.append("probes")  # a mix that trains retrieval: measure it by default
    probe_lengths, probe_ids = probe_arguments(modes, args.data, args.probe_lengths, args.probe_ids)
    if args.heldout_min_length is not None and (args.heldout_min_length < 1 or args.heldout != "documents"):
        raise EvaluationError(f"--heldout_min_length {args.heldout_min_length}: give a positive number of tokens, "
                              f"with --heldout documents (windows have no documents to choose)")
    if args.sink_query is not None and args.sink_query < 0:
        raise EvaluationError(f"--sink_query {args.sink_query} must be a position (0 or more), or leave it out")
    check_inputs(dict(zip(labels, args.checkpoints)), lengths, modes, args.data, args.short_context, args.short_step)
    return dict(checkpoints=dict(zip(labels, args.checkpoints)), lengths=lengths, out=args.out, tasks=tasks,
                modes=modes, samples=args.samples, seed=args.seed, data_dir=args.data, evaluator=args.evaluator,
                short_context=args.short_context, short_step=args.short_step, windows=args.windows,
                batch_size=args.batch_size, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
                sink_query=args.sink_query, heldout=args.heldout,
                heldout_min_length=args.heldout_min_length, probe_lengths=probe_lengths, probe_ids=probe_ids,
                probe_count=args.probe_count)


def comma_integers(text: str, flag: str, example: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EvaluationError(f"{flag} {text!r}: give comma-separated integers, e.g. {example}") from None


def probe_arguments(modes: list[str], data_dir, lengths_text: str | None,
                    ids_text: str | None) -> tuple[list[int] | None, tuple[int, int] | None]:
    """--probe_lengths (default: the recipe's training length times 1, 2, 4, 8, else None: --lengths) and
    --probe_ids as (first, size), checked; both None without the probes mode."""
    if "probes" not in modes:
        return None, None
    ids = comma_integers(ids_text, "--probe_ids", "8000,192") if ids_text else None
    if ids is not None and len(ids) != 2:
        raise EvaluationError(f"--probe_ids {ids_text!r}: give FIRST,SIZE, e.g. 8000,192")
    if ids is not None:
        resolve_probe_ids(data_dir, tuple(ids))  # a block synthetic.py can use, or EvaluationError now
    if lengths_text:
        lengths = comma_integers(lengths_text, "--probe_lengths", "256,512,1024,2048")
    else:
        recipe = synthetic.recipe_of(data_dir) if data_dir is not None else None
        lengths = probes.probe_lengths(recipe["seq_len"]) if recipe and recipe.get("seq_len") else None
    if lengths is not None and (not lengths or not all(2 <= L <= MAX_LENGTH for L in lengths)):
        raise EvaluationError(f"--probe_lengths {lengths_text!r}: give lengths from 2 to {MAX_LENGTH:,}, e.g. 256,512")
    return lengths, tuple(ids) if ids else None


def main(argv: list[str] | None = None) -> None:
    try:
        kwargs = arguments(argv)
        evaluate(**kwargs, command=[sys.executable] + sys.argv)
    except (EvaluationError, data.DataError, checkpoint.CheckpointError, files.FolderBusy) as error:
        sys.exit(f"evaluate.py: {error}")
    except KeyboardInterrupt:  # every finished cell is in results.json already: the same command resumes
        print("evaluate.py: interrupted; the same command continues from the cells it finished", file=sys.stderr)
        sys.exit(130)
    print((Path(kwargs["out"]) / TABLES_FILE).read_text())


if __name__ == "__main__":
    main()
