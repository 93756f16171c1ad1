"""Retrieval probes: does a model find an earlier token it needs? Three measures on synthetic documents
(synthetic.py) made with probe keys only, at lengths that fit the pretraining length L: L, 2L, 4L, 8L.

    needle   needle recall: % of documents whose two answer tokens (v1 v2 after the question) are both the
             model's argmax at the positions before them. The needle sits at a distance uniform over what
             fits (STRING, arXiv 2410.18745: long distances are the rarely trained ones, so every distance
             is probed alike), in held-out corpus text. Also the mean log-probability of the two answer
             tokens. Chance: 100 / |values|^2 for both tokens (100 / |values| per token) for a model that
             knows the answer is a value id but not which.
    mqar     MQAR accuracy (Zoology, Arora et al. 2023, arXiv 2312.04927): % of the asked-for values
             predicted by argmax, with max(4, length // 32) pairs (at most (length - 1) // 6, which fit,
             and at most the block's probe key pairs). Chance: 100 / |values|.
    copy     copy gain: mean loss (nats) on each span's first occurrence minus on its second, each span's
             first token left out of both (no model can predict it), per document, then averaged over
             documents. Chance: 0 for a model that does not use the first occurrence (the same tokens at
             random places); the acceptance target is at least 1 nat at L.

|values| is the size of the id block's value third (SyntheticIds.values). Scoring is teacher-forced: one
forward pass per document, no generation. Each document is preceded by the end-of-document token, the
separator the models saw before every document (as evaluate.py's held-out texts), so a document of
`length` tokens is read with exactly `length` inputs. Documents are a pure function of (seed, kind,
length, index): every model gets the same ones. Each result reports its n and a standard error (binomial
for needle recall, over documents for MQAR and copy gain).

The model is anything with olmpool.Transformer's scoring surface, as evaluate.token_losses reads it:
hidden_states(tokens (B, T)) -> (B, T, d), lm_head(states) -> logits, and parameters() (for the device).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import data
import evaluate
import synthetic
from synthetic import SyntheticIds

PROBE_KINDS = ("needle", "mqar", "copy")
LENGTH_FACTORS = (1, 2, 4, 8)  # the pretraining length L, and 2L, 4L, 8L
DEFAULT_COUNT = 32  # documents per kind and length
PROBE_VERSION = 1  # in every cell's settings: a change of the rules below recomputes the cells


def probe_lengths(train_length: int) -> list[int]:
    """L, 2L, 4L and 8L for a model pretrained at L."""
    return [factor * train_length for factor in LENGTH_FACTORS]


def probe_key_pairs(ids: SyntheticIds) -> int:
    """How many key pairs of the block are probe keys (synthetic.is_probe_key), counted over the block."""
    keys = np.arange(*ids.keys, dtype=np.int64)
    return int(((keys[:, None] * 31 + keys[None, :]) % synthetic.PROBE_KEY_MODULUS == 0).sum())


def mqar_pairs(length: int, ids: SyntheticIds) -> int:
    """MQAR's pairs at a length: max(4, length // 32), at most what fits ((length - 1) // 6) and at most
    the probe key pairs there are (distinct keys are drawn until found)."""
    return min(max(4, length // 32), (length - 1) // 6, probe_key_pairs(ids))


def probe_rng(seed: int, kind: str, length: int) -> np.random.Generator:
    """One generator per (seed, kind, length): document i is the same whatever the count or other lengths."""
    return np.random.default_rng([seed, PROBE_KINDS.index(kind), length])


def needle_documents(ids: SyntheticIds, length: int, count: int, seed: int, haystack) -> list[tuple]:
    """count (tokens, answer positions, distance) needle documents, the distance drawn uniform over what
    fits, as needle_document's default, but drawn here so that each result can report it."""
    rng = probe_rng(seed, "needle", length)
    space = length - synthetic.QUERY_LENGTH - 2  # needle_document's room before the question
    documents = []
    for _ in range(count):
        # None where no needle fits: needle_document then says so (ValueError)
        distance = int(rng.integers(synthetic.NEEDLE_LENGTH, space + 1)) if space >= synthetic.NEEDLE_LENGTH else None
        tokens, answers = synthetic.needle_document(rng, ids, length, probe=True, haystack=haystack, distance=distance)
        documents.append((tokens, answers, distance))
    return documents


def mqar_documents(ids: SyntheticIds, length: int, count: int, seed: int) -> list[tuple]:
    """count (tokens, answer positions) MQAR documents of mqar_pairs(length) pairs, in random filler ids
    (no haystack text: the keys, values and filler are then all the document holds, as in Zoology)."""
    rng = probe_rng(seed, "mqar", length)
    return [synthetic.mqar_document(rng, ids, length, mqar_pairs(length, ids), probe=True) for _ in range(count)]


def copy_documents(ids: SyntheticIds, length: int, count: int, seed: int, haystack) -> list[tuple]:
    """count (tokens, spans) copy documents, spans [(first_start, second_start, span_length)]."""
    rng = probe_rng(seed, "copy", length)
    return [synthetic.copy_document(rng, ids, length, probe=True, haystack=haystack) for _ in range(count)]


def with_separator(tokens: np.ndarray, eos_id: int | None) -> tuple[torch.Tensor, int]:
    """The document after the end-of-document token (none when eos_id is None), and the shift of its positions."""
    if eos_id is None:
        return torch.from_numpy(np.asarray(tokens, dtype=np.int64)), 0
    return torch.from_numpy(np.concatenate([[eos_id], tokens]).astype(np.int64)), 1


@torch.no_grad()
def answer_predictions(model, tokens: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's argmax at each answer position and the log-probability it gives the true token there,
    teacher-forced: one pass over the tokens before the last answer, the LM head only where an answer is
    predicted (the position before it), as token_losses reads the model."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    hidden = model.hidden_states(tokens[None, :max(positions)])[0]  # (last answer, d)
    before = torch.tensor(positions, device=device) - 1
    logits = model.lm_head(hidden[before]).float()  # (answers, vocab)
    log_probs = logits.log_softmax(-1).gather(-1, tokens[positions][:, None])[:, 0]
    return logits.argmax(-1).cpu(), log_probs.cpu()


def binomial_se(hits: list[bool]) -> float:
    """Standard error (x100) of a % of n independent hits."""
    p = float(np.mean(hits))
    return 100 * math.sqrt(p * (1 - p) / len(hits))


def standard_error(values: list[float]) -> float | None:
    """Standard error of the mean over documents (None for one)."""
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def needle_recall(model, ids: SyntheticIds, length: int, count: int, seed: int, haystack, eos_id) -> dict:
    """Needle recall at one length: % of documents with both answer tokens the argmax, and their mean log-prob."""
    hits, log_probs, distances = [], [], []
    for tokens, answers, distance in needle_documents(ids, length, count, seed, haystack):
        text, shift = with_separator(tokens, eos_id)
        positions = [p + shift for p in answers]
        predicted, log_prob = answer_predictions(model, text, positions)
        hits.append(bool((predicted == text[positions]).all()))
        log_probs.append(float(log_prob.mean()))
        distances.append(distance)
    values = ids.values[1] - ids.values[0]
    return {"n": count, "recall": 100 * float(np.mean(hits)), "se": binomial_se(hits),
            "answer_log_prob": float(np.mean(log_probs)), "chance": 100 / values ** 2,
            "chance_per_token": 100 / values, "hits": hits, "distances": distances}


def mqar_accuracy(model, ids: SyntheticIds, length: int, count: int, seed: int, eos_id) -> dict:
    """MQAR accuracy at one length: % of the asked-for values that are the argmax, pooled over documents
    (each has the same pairs); its standard error over the documents' own accuracies."""
    per_document, right = [], 0
    for tokens, answers in mqar_documents(ids, length, count, seed):
        text, shift = with_separator(tokens, eos_id)
        positions = [p + shift for p in answers]
        predicted, _ = answer_predictions(model, text, positions)
        correct = int((predicted == text[positions]).sum())
        right += correct
        per_document.append(100 * correct / len(positions))
    pairs = mqar_pairs(length, ids)
    spread = standard_error(per_document)
    return {"n": count, "pairs": pairs, "answers": count * pairs, "accuracy": 100 * right / (count * pairs),
            "se": spread, "chance": 100 / (ids.values[1] - ids.values[0]), "per_document": per_document}


def copy_gain(model, ids: SyntheticIds, length: int, count: int, seed: int, haystack, eos_id) -> dict:
    """Copy gain at one length: per document, the mean loss over the spans' first occurrences minus over
    their second, each span's first token left out of both; then the mean over documents."""
    gains, firsts, seconds = [], [], []
    for tokens, spans in copy_documents(ids, length, count, seed, haystack):
        text, shift = with_separator(tokens, eos_id)
        losses = evaluate.token_losses(model, text)  # losses[i]: the loss of text position i + 1
        first = torch.cat([losses[start + shift:start + shift + n - 1] for start, _, n in spans])
        second = torch.cat([losses[start + shift:start + shift + n - 1] for _, start, n in spans])
        firsts.append(float(first.mean()))
        seconds.append(float(second.mean()))
        gains.append(firsts[-1] - seconds[-1])
    return {"n": count, "gain": float(np.mean(gains)), "se": standard_error(gains),
            "first_loss": float(np.mean(firsts)), "second_loss": float(np.mean(seconds)), "gains": gains,
            "chance": 0.0}


def run_probe(kind: str, model, ids: SyntheticIds, length: int, count: int = DEFAULT_COUNT, seed: int = 0,
              haystack=None, eos_id: int | None = None) -> dict:
    """One probe at one length (a cell of evaluate.py's "probes" mode), or why it cannot run there
    ({"skipped": reason, "n": 0}: a haystack shorter than the length, a model whose vocabulary lacks the ids)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)  # a test's stand-in model has none
    try:
        if vocab is not None and ids.first + ids.size > vocab:
            raise ValueError(f"the synthetic ids [{ids.first}, {ids.first + ids.size}) are beyond the model's "
                             f"{vocab}-id vocabulary")
        if kind == "needle":
            return needle_recall(model, ids, length, count, seed, haystack, eos_id)
        if kind == "mqar":
            return mqar_accuracy(model, ids, length, count, seed, eos_id)
        if kind == "copy":
            return copy_gain(model, ids, length, count, seed, haystack, eos_id)
    except ValueError as error:  # synthetic.py's: a document that does not fit the length or the haystack
        return {"skipped": str(error), "n": 0}
    raise ValueError(f"no probe {kind!r}; the probes are {', '.join(PROBE_KINDS)}")


def run_probes(model, ids: SyntheticIds, lengths: list[int], count: int = DEFAULT_COUNT, seed: int = 0,
               haystack=None, eos_id: int | None = None) -> dict:
    """Every probe at every length: {kind: {str(length): result}}."""
    return {kind: {str(length): run_probe(kind, model, ids, length, count, seed, haystack, eos_id)
                   for length in lengths} for kind in PROBE_KINDS}


def heldout_haystack(data_dir) -> np.ndarray:
    """The val split's tokens, the held-out corpus text that needle and copy documents are written into:
    the shard itself (memory-mapped) when there is one, else the shards joined."""
    manifest = data.read_manifest(data_dir)
    if "val" not in manifest["splits"]:
        raise data.DataError(f"{data_dir} has no val split for the probes' haystack; prepare it with a val fraction")
    shards = [data.read_shard(Path(data_dir) / record["file"], vocab_size=manifest["tokenizer"]["vocab_size"]).tokens
              for record in manifest["splits"]["val"]["shards"]]
    return shards[0] if len(shards) == 1 else np.concatenate(shards)
