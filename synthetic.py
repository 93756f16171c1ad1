"""
Synthetic retrieval documents: the kinds of sequence in which a token is predictable only by finding
an earlier one, built at the token level so they fit any vocabulary and any length.

    copy     spans of random tokens that come back later, at random distances (induction)
    repeat   a random sequence, then the same sequence at once (the textbook induction task; opt-in)
    mqar     key-value pairs, then some of the keys again, each asking for its value
             (multi-query associative recall, Arora et al. 2023, arXiv 2312.04927)
    needle   one key-value "needle" in a haystack at a uniform depth, asked for at the end
             (a short template, so that prompt and answer fit the pretraining length)

Every generator takes a numpy Generator and returns the tokens with the positions a probe scores, so
a document is a pure function of its seed. The ids come from one block of the vocabulary
(`SyntheticIds`): three marker ids, then keys, values and filler. Training and probe instances are
disjoint by construction: an instance's key (its first two tokens, for a copied span) is a probe key
or a training key by a fixed rule on the ids (`is_probe_key`), and each side draws only its own.

`build_mix` (`python data.py synthetic ...`) writes a prepared folder whose train split mixes a corpus
with training instances, laid out for TokenLoader's windows or, with lengths="long", for extension;
`recipe_of(folder)` reads back what it mixed. docs/data.md, "Synthetic retrieval documents".
"""

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import data
from progress import Progress

PROBE_KEY_MODULUS = 7  # one key pair in 7 is held out for probes


@dataclass(frozen=True)
class SyntheticIds:
    """The block [first, first + size) of a vocabulary that synthetic tokens use: ids first, first+1,
    first+2 are the needle, value and query markers; the rest is split in thirds into keys, values
    and filler (filler fills space when no haystack text is given)."""
    first: int
    size: int

    def __post_init__(self):
        if self.first < 0 or self.size < 3 + 3 * 8:
            raise ValueError(f"a synthetic id block needs first >= 0 and at least 27 ids; got first={self.first}, "
                             f"size={self.size}")

    @property
    def needle_mark(self): return self.first

    @property
    def value_mark(self): return self.first + 1

    @property
    def query_mark(self): return self.first + 2

    def _third(self, i):
        start, third = self.first + 3, (self.size - 3) // 3
        return start + i * third, start + (i + 1) * third

    @property
    def keys(self): return self._third(0)

    @property
    def values(self): return self._third(1)

    @property
    def filler(self): return self._third(2)


def is_probe_key(a: int, b: int) -> bool:
    """Whether the key pair (a, b) belongs to probes (else to training): a fixed rule, so no probe
    instance can be a training instance."""
    return (a * 31 + b) % PROBE_KEY_MODULUS == 0


def key_pairs_available(ids: SyntheticIds, probe: bool) -> int:
    """How many distinct key pairs one side of the split has: b runs over the keys with (31a + b) % 7 == 0
    (probe) for each a, so the count is exact without listing the pairs."""
    low, high = ids.keys
    a = np.arange(low, high)
    residue = (-31 * a) % PROBE_KEY_MODULUS  # the b that make (a, b) a probe pair: b % 7 == residue
    probe_pairs = int((((high - 1 - residue) // PROBE_KEY_MODULUS) - ((low - 1 - residue) // PROBE_KEY_MODULUS)).sum())
    return probe_pairs if probe else a.size * a.size - probe_pairs


def draw_key_pairs(rng, ids: SyntheticIds, count: int, probe: bool) -> np.ndarray:
    """count distinct key pairs (count, 2) from one side of the split."""
    available = key_pairs_available(ids, probe)
    if count > available:  # else the loop below would never end
        raise ValueError(f"{count} distinct {'probe' if probe else 'training'} key pairs asked of an id block with "
                         f"{available}; use a larger id block (size) or fewer pairs")
    pairs, seen = [], set()
    while len(pairs) < count:
        a, b = (int(x) for x in rng.integers(*ids.keys, size=2))
        if is_probe_key(a, b) == probe and (a, b) not in seen:
            seen.add((a, b)); pairs.append((a, b))
    return np.array(pairs, dtype=np.int64).reshape(count, 2)


def fill(rng, ids: SyntheticIds, length: int, haystack: np.ndarray | None) -> np.ndarray:
    """length filler tokens: a random stretch of the haystack text when given, else random filler ids."""
    if haystack is None:
        return rng.integers(*ids.filler, size=length)
    if haystack.size < length:
        raise ValueError(f"the haystack holds {haystack.size} tokens; a document of {length} needs more")
    start = int(rng.integers(0, haystack.size - length + 1))
    return np.array(haystack[start:start + length], dtype=np.int64)  # a copy: documents are written into it


COPY_MIN_LENGTH = 8  # a quarter of the document in spans, and a span has at least 2 tokens


def copy_document(rng, ids: SyntheticIds, length: int, probe: bool = False, haystack=None):
    """Random spans, then the same spans again in a shuffled order after filler: every token of a
    repeated span but its first is predictable by content alone, at distances spread over the
    document. Returns (tokens, spans) with spans [(first_start, second_start, span_length)]."""
    if length < COPY_MIN_LENGTH:
        raise ValueError(f"a copy document needs at least {COPY_MIN_LENGTH} tokens (a quarter of them in spans of 2 "
                         f"or more); got {length}")
    tokens = fill(rng, ids, length, haystack)
    total = int(rng.integers(length // 4, length // 2 + 1))   # tokens in spans, first occurrences
    count = int(rng.integers(1, max(1, total // 8) + 1))
    lengths = 2 + rng.multinomial(total - 2 * count, [1 / count] * count)  # each span >= 2 tokens, sum = total
    # Distinct heads: a span's second occurrence is then told apart from the others by its first two tokens.
    heads = draw_key_pairs(rng, ids, count, probe)
    spans = [np.r_[head, rng.integers(ids.keys[0], ids.values[1], size=n - 2)] for head, n in zip(heads, lengths)]
    first = int(rng.integers(0, length - 2 * total + 1))
    gap = int(rng.integers(0, length - 2 * total - first + 1))
    out, position = [], first
    for span in spans:
        out.append(position); tokens[position:position + span.size] = span; position += span.size
    position += gap
    result = []
    for i in rng.permutation(len(spans)):
        tokens[position:position + spans[i].size] = spans[i]
        result.append((out[i], position, spans[i].size)); position += spans[i].size
    return tokens, sorted(result)


REPEAT_MIN_LENGTH = 4  # a head of two tokens, twice


def repeat_document(rng, ids: SyntheticIds, length: int, probe: bool = False, haystack=None):
    """A random sequence of key and value ids, then the same sequence again at once: the textbook task on
    which induction heads form (Olsson et al. 2022, arXiv 2209.11895). Half of the document is predictable by
    content alone, at a distance (half its length) that varies with the length. An odd length starts with
    one filler id. Its head is a key pair of one side of the split, as a copied span's is; the haystack is
    not used. Returns (tokens, spans) as copy_document does: [(first_start, second_start, span_length)]."""
    if length < REPEAT_MIN_LENGTH:
        raise ValueError(f"a repeat document needs at least {REPEAT_MIN_LENGTH} tokens; got {length}")
    size, start = length // 2, length % 2
    span = np.r_[draw_key_pairs(rng, ids, 1, probe)[0], rng.integers(ids.keys[0], ids.values[1], size=size - 2)]
    tokens = np.r_[rng.integers(*ids.filler, size=start), span, span].astype(np.int64)
    return tokens, [(start, start + size, size)]


def mqar_document(rng, ids: SyntheticIds, length: int, pairs: int, probe: bool = False, haystack=None):
    """Key-value pairs (two-token keys, one-token values) at the start, then every key again at a
    random later place followed by its value. Returns (tokens, answer_positions): the positions of the
    asked-for values, each predictable only by finding its key's first occurrence."""
    if pairs < 1:
        raise ValueError(f"an MQAR document needs at least one key-value pair; got pairs={pairs}")
    if 6 * pairs + 1 > length:
        raise ValueError(f"{pairs} pairs need at least {6 * pairs + 1} tokens; the document has {length}")
    tokens = fill(rng, ids, length, haystack)
    keys = draw_key_pairs(rng, ids, pairs, probe)
    values = rng.integers(*ids.values, size=pairs)
    tokens[:3 * pairs] = np.c_[keys, values].reshape(-1)
    slots = np.sort(rng.choice((length - 3 * pairs) // 3, size=pairs, replace=False)) * 3 + 3 * pairs
    answers = []
    for slot, i in zip(slots, rng.permutation(pairs)):
        tokens[slot:slot + 3] = (*keys[i], values[i]); answers.append(int(slot) + 2)
    return tokens, answers


NEEDLE_LENGTH = 6  # needle_mark k1 k2 value_mark v1 v2
QUERY_LENGTH = 4   # query_mark k1 k2 value_mark, then the two value tokens are the answer


def needle_document(rng, ids: SyntheticIds, length: int, probe: bool = False, haystack=None,
                    distance: int | None = None):
    """A needle (needle_mark k1 k2 value_mark v1 v2) in the haystack, and at the end the question
    (query_mark k1 k2 value_mark) whose answer is v1 v2. distance (tokens from the needle's start to
    the question's start) defaults to uniform over what fits, so that every depth is trained and
    probed alike. Returns (tokens, answer_positions): the two positions of v1 v2 after the question."""
    space = length - QUERY_LENGTH - 2  # the last two tokens are the answer
    if space < NEEDLE_LENGTH:
        raise ValueError(f"a needle document needs at least {NEEDLE_LENGTH + QUERY_LENGTH + 2} tokens; got {length}")
    tokens = fill(rng, ids, length, haystack)
    if distance is None:
        distance = int(rng.integers(NEEDLE_LENGTH, space + 1))
    if not NEEDLE_LENGTH <= distance <= space:
        raise ValueError(f"needle distance {distance} is outside [{NEEDLE_LENGTH}, {space}] for length {length}")
    key = draw_key_pairs(rng, ids, 1, probe)[0]
    value = rng.integers(*ids.values, size=2)
    question = space
    start = question - distance
    tokens[start:start + NEEDLE_LENGTH] = (ids.needle_mark, *key, ids.value_mark, *value)
    tokens[question:question + QUERY_LENGTH + 2] = (ids.query_mark, *key, ids.value_mark, *value)
    return tokens, [question + QUERY_LENGTH, question + QUERY_LENGTH + 1]


# -----------------------------------------------------------------------------
# Pretraining mixes: a prepared corpus with synthetic documents among its train text
#
# build_mix writes a new prepared folder: the corpus's tokenizer record and compact-vocabulary file, its
# val split unchanged, and a train split in which a share of the tokens is synthetic documents. Layouts:
#   "window"  every synthetic document is seq_len tokens (the last one EOS) at a stream offset that is a
#             multiple of seq_len, so exactly one TokenLoader window (seq_len+1 tokens every seq_len) holds
#             it whole; the corpus stream fills the other windows, cut into pieces of seq_len tokens.
#   "long"    for context extension (LongDocumentMix, which samples by document): synthetic documents of
#             uniform lengths in [ceil(T/8), T] between whole corpus documents.
#   "packed"  as "window", but each synthetic window holds several documents of one kind, of lengths
#             log-uniform in [shortest, seq_len], each ending with EOS: read with train.py
#             --mask_documents, attention stays inside each, and a short context is searched (an
#             induction head's emergence time grows with that context: Musat et al. 2025, arXiv 2511.01033).
# Document boundaries: after every EOS and at the start of every synthetic document (so a corpus document
# that a synthetic one interrupts is recorded as two, the first without its EOS: TokenLoader's windows
# never see both sides of the cut, and --mask_documents, which reads EOS, is unaffected).

KINDS = ("copy", "mqar", "needle", "repeat")
DEFAULT_KINDS = ("copy", "mqar", "needle")  # what a mix holds unless asked: the kinds the probes measure
LAYOUTS = ("window", "long", "packed")
DEFAULT_SHORTEST = 32  # the packed layout's shortest document, EOS included
DEFAULT_IDS_SIZE = 1024
MIX_VERSION = 1
# Generator tokens (the EOS not counted) that the smallest document of each kind needs.
MIN_DOCUMENT = {"copy": COPY_MIN_LENGTH, "mqar": 7, "needle": NEEDLE_LENGTH + QUERY_LENGTH + 2,
                "repeat": REPEAT_MIN_LENGTH}
MQAR_TOKENS_PER_PAIR = 16  # Zoology's MQAR training configurations: 4 pairs in 64 tokens, 8 in 128, 16 in 256
FILLER = {"copy": "corpus train text", "mqar": "random filler ids", "needle": "corpus train text",
          "repeat": "none (one filler id when the length is odd)"}


def default_ids(tokenizer: dict, size: int = DEFAULT_IDS_SIZE) -> SyntheticIds:
    """The vocabulary's last `size` ids below its end-of-text and pad ids (a manifest's tokenizer record).
    A compact vocabulary orders its ids by frequency, so these are the corpus's rarest tokens: the
    markers, keys and values then hardly occur in text (on the built-in corpus the last 1,024 of 8,192
    ids are 0.8% of the tokens; its first frequent ids, 258-1281, are 46%, runs of spaces among them,
    so a value marker would sit in every indented line of a code haystack)."""
    end = tokenizer["vocab_size"]
    specials = [i for i in (tokenizer["eos_id"], tokenizer.get("pad_id")) if i is not None]
    while any(end - size <= i < end for i in specials):  # dolma2 keeps its specials at the top
        end = min(i for i in specials if end - size <= i < end)
    return SyntheticIds(max(end - size, 0), size)


def training_document(kind: str, rng, ids: SyntheticIds, length: int, haystack) -> np.ndarray:
    """One training instance (training keys only) of `length` tokens; the haystack fills copy and needle
    documents (FILLER), MQAR's filler is random filler ids."""
    if kind == "copy":
        return copy_document(rng, ids, length, haystack=haystack)[0]
    if kind == "repeat":
        return repeat_document(rng, ids, length)[0]
    if kind == "mqar":
        pairs = max(1, (length + 1) // MQAR_TOKENS_PER_PAIR)  # counted on the document with its EOS: 16 in 256
        return mqar_document(rng, ids, length, pairs)[0]
    return needle_document(rng, ids, length, haystack=haystack)[0]


@dataclass(frozen=True)
class MixPlan:
    """What a mix's synthetic documents are: document i is a pure function of (plan, i, haystack)."""
    seq_len: int
    share: float
    kinds: tuple
    ids: SyntheticIds
    seed: int = 0
    layout: str = "window"
    shortest: int = DEFAULT_SHORTEST  # the packed layout's shortest document, EOS included

    def length_range(self) -> tuple[int, int]:
        """Shortest and longest document, EOS included."""
        return (-(-self.seq_len // 8), self.seq_len) if self.layout == "long" else (self.seq_len, self.seq_len)

    def document_length(self, rng) -> int:
        """The first draw of a document's generator: its length, EOS included."""
        low, high = self.length_range()
        return int(rng.integers(low, high + 1)) if low < high else high

    def document(self, index: int, haystack, eos_id: int) -> tuple[str, np.ndarray]:
        """(kind, tokens ending with EOS) of synthetic document `index`: kinds in rotation, each document
        drawn from its own generator seeded by (seed, index)."""
        kind = self.kinds[index % len(self.kinds)]
        rng = np.random.default_rng([self.seed, index])
        if self.layout == "packed":
            return kind, self.packed_window(kind, rng, haystack, eos_id)
        return kind, self.ended_document(kind, rng, self.document_length(rng), haystack, eos_id)

    def ended_document(self, kind: str, rng, length: int, haystack, eos_id: int) -> np.ndarray:
        """One training document of `length` tokens, its last the EOS."""
        tokens = np.empty(length, dtype=np.int64)
        tokens[:-1] = training_document(kind, rng, self.ids, length - 1, haystack)
        tokens[-1] = eos_id
        return tokens

    def packed_window(self, kind: str, rng, haystack, eos_id: int) -> np.ndarray:
        """seq_len tokens: documents of one kind, lengths log-uniform in [shortest, seq_len] (the last one
        takes what is left, or absorbs a remainder shorter than `shortest`), each ending with EOS."""
        parts, left = [], self.seq_len
        while left > 0:
            size = int(round(np.exp(rng.uniform(np.log(self.shortest), np.log(self.seq_len)))))
            size = left if left - size < self.shortest else min(size, left)
            parts.append(self.ended_document(kind, rng, size, haystack, eos_id))
            left -= size
        return np.concatenate(parts)

    def document_count(self, corpus_tokens: int) -> int:
        """How many documents bring the synthetic tokens nearest to share / (1 - share) x the corpus tokens,
        so that the share is met to within one document."""
        target, tokens, count = self.share / (1 - self.share) * corpus_tokens, 0, 0
        while True:
            length = self.document_length(np.random.default_rng([self.seed, count]))
            if abs(tokens + length - target) >= abs(tokens - target):
                return count  # one more would overshoot the target by more than stopping here falls short
            tokens, count = tokens + length, count + 1


def check_plan(plan: MixPlan):
    """Refuse, in one line naming the fix, a plan that no corpus can make a mix of."""
    if not 0 < plan.share < 1:
        raise data.DataError(f"--share {plan.share} must be strictly between 0 and 1: the fraction of the train tokens "
                             f"that are synthetic, e.g. 0.5")
    unknown = [kind for kind in plan.kinds if kind not in KINDS]
    if unknown or not plan.kinds or len(set(plan.kinds)) != len(plan.kinds):
        raise data.DataError(f"--kinds {','.join(plan.kinds)}: give each of {', '.join(KINDS)} at most once, "
                             f"comma-separated (unknown: {unknown or 'none'})")
    if plan.layout not in LAYOUTS:
        raise data.DataError(f"lengths={plan.layout!r} is not one of {LAYOUTS}")
    if plan.layout == "packed" and not 2 <= plan.shortest <= plan.seq_len:
        raise data.DataError(f"--packed {plan.shortest}: the shortest packed document must be between 2 and "
                             f"--seq_len {plan.seq_len} tokens, e.g. --packed {DEFAULT_SHORTEST}")
    shortest = (plan.shortest if plan.layout == "packed" else plan.length_range()[0]) - 1  # its EOS aside
    unfit = [kind for kind in plan.kinds if MIN_DOCUMENT[kind] > shortest]
    if unfit:
        need = max(MIN_DOCUMENT[kind] for kind in plan.kinds) + 1  # tokens with the EOS
        least = 8 * (need - 1) + 1 if plan.layout == "long" else need  # the shortest document is ceil(T/8) long
        which = "shortest documents (seq_len/8)" if plan.layout == "long" else "documents"
        flag = f"--packed {need}" if plan.layout == "packed" else f"--seq_len {least}"
        given = f"--packed {plan.shortest}" if plan.layout == "packed" else f"--seq_len {plan.seq_len}"
        raise data.DataError(f"{given} makes {which} of {shortest + 1} tokens, too short for "
                             f"{' and '.join(unfit)} ({need} tokens, EOS included); use {flag} or more, "
                             f"or leave {' and '.join(unfit)} out of --kinds")


def check_ids(ids: SyntheticIds, tokenizer: dict, corpus_dir: Path):
    """Refuse an id block outside the corpus's vocabulary or holding its end-of-text or pad id."""
    first, end, vocab = ids.first, ids.first + ids.size, tokenizer["vocab_size"]
    if end > vocab:
        raise data.DataError(f"the synthetic ids [{first}, {end}) reach beyond the {vocab:,} ids of {corpus_dir}'s "
                             f"vocabulary; use --ids_size {max(vocab - first, 0)} or less, or a lower --ids_first")
    specials = [i for i in (tokenizer["eos_id"], tokenizer.get("pad_id")) if i is not None and first <= i < end]
    if specials:
        raise data.DataError(f"the synthetic ids [{first}, {end}) include {corpus_dir}'s end-of-text or pad id "
                             f"{specials[0]}, which would end documents; use --ids_first {max(specials) + 1} or a "
                             f"block that ends at or below {min(specials)}")


def plain_corpus(corpus_dir: Path) -> dict:
    """The manifest of a prepared folder that is not itself a mix and has train tokens."""
    manifest = data.read_manifest(corpus_dir)
    if manifest.get("synthetic"):
        raise data.DataError(f"{corpus_dir} is itself a synthetic mix; build from the plain corpus it was made "
                             f"from ({manifest['synthetic'].get('corpus', {}).get('folder', 'see its manifest')})")
    if not manifest["splits"].get("train", {}).get("tokens"):
        raise data.DataError(f"{corpus_dir} has no train tokens to mix with; prepare a corpus first "
                             f"(python data.py prepare ... or python data.py builtin --compact_vocab 8192)")
    return manifest


def read_corpus(corpus_dir: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """(manifest, the train split's stream, its document lengths) of a plain prepared folder."""
    manifest = plain_corpus(corpus_dir)
    data.missing_shards(corpus_dir, manifest, ["train"])
    vocab_size, streams, lengths = manifest["tokenizer"]["vocab_size"], [], []
    for record in manifest["splits"]["train"]["shards"]:
        shard = data.read_shard(corpus_dir / record["file"], vocab_size=vocab_size)
        starts = shard.doc_starts.astype(np.int64)
        streams.append(np.asarray(shard.tokens))
        lengths.append(np.diff(np.append(starts, shard.tokens.size)))
    return manifest, np.concatenate(streams), np.concatenate(lengths)


def synthetic_documents(plan: MixPlan, corpus_tokens: int, haystack, eos_id: int, progress: bool):
    """The mix's synthetic documents, [(kind, tokens)], in order (MixPlan.document_count of them)."""
    count = plan.document_count(corpus_tokens)
    if not count:
        raise data.DataError(f"--share {plan.share} of {corpus_tokens:,} corpus tokens makes no synthetic document of "
                             f"{plan.length_range()[0]}+ tokens; raise --share, or mix a larger corpus")
    meter = Progress(count, "synthetic documents", "documents", every=5.0, enabled=progress)
    documents = []
    for index in range(count):
        kind, tokens = plan.document(index, haystack, eos_id)
        documents.append((kind, tokens.astype(np.uint32)))  # the shards' type: no int64 copy of the split
        meter.advance()
    return documents


def corpus_pieces(corpus_lengths: np.ndarray, corpus_tokens: int, plan: MixPlan) -> np.ndarray:
    """Lengths of the corpus items placed between synthetic documents: the stream cut every seq_len
    tokens (window layout: every piece but the last fills a window), or whole documents (long)."""
    if plan.layout == "long":
        return corpus_lengths
    pieces = np.full(-(-corpus_tokens // plan.seq_len), plan.seq_len, dtype=np.int64)
    pieces[-1] = corpus_tokens - plan.seq_len * (pieces.size - 1)
    return pieces


def mix_layout(corpus_pieces: np.ndarray, synthetic_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(before, starts): synthetic document k goes just before corpus piece before[k], where the corpus
    text so far reaches the share of it that the synthetic text so far has reached (an even spread;
    the last corpus piece always comes last), and starts at stream offset starts[k]."""
    corpus_ends = np.cumsum(corpus_pieces).astype(np.float64)
    synthetic_ends = np.cumsum(synthetic_lengths).astype(np.float64)
    # the first piece j with corpus_ends[j] / C >= synthetic_ends[k] / S, in products (no division)
    before = np.searchsorted(corpus_ends * synthetic_ends[-1], synthetic_ends * corpus_ends[-1], side="left")
    corpus_before = np.concatenate([[0], np.cumsum(corpus_pieces)])[before]
    starts = corpus_before + np.cumsum(synthetic_lengths) - synthetic_lengths
    return before, starts.astype(np.int64)


class MixWriter:
    """Shards of about shard_tokens tokens, cut only at document boundaries, in a folder's vocabulary."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, vocab_size: int, eos_id: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.pending, self.pending_tokens, self.synthetic_starts = [], 0, []
        self.shards = []

    def add(self, tokens: np.ndarray, synthetic: bool):
        if synthetic:
            self.synthetic_starts.append(self.pending_tokens)
        self.pending.append(tokens)
        self.pending_tokens += tokens.size
        if self.pending_tokens >= self.shard_tokens and (synthetic or tokens[-1] == self.eos_id):
            self.flush()  # a shard ends only where a document does

    def flush(self):
        if not self.pending:
            return
        tokens = np.concatenate(self.pending)
        after_eos = np.flatnonzero(tokens[:-1] == self.eos_id) + 1
        doc_starts = np.union1d(np.union1d([0], after_eos), self.synthetic_starts).astype(np.uint64)
        name = f"{self.split}_{len(self.shards):06d}.bin"
        sha256 = data.write_shard(self.out_dir / name, tokens, doc_starts, vocab_size=self.vocab_size)
        self.shards.append({"file": name, "tokens": int(tokens.size), "documents": int(doc_starts.size),
                            "bytes": (self.out_dir / name).stat().st_size, "sha256": sha256})
        self.pending, self.pending_tokens, self.synthetic_starts = [], 0, []

    def close(self) -> dict:
        self.flush()
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": sum(s["documents"] for s in self.shards),
                "shards": self.shards}


def long_mix_share(corpus_lengths: np.ndarray, synthetic_lengths: np.ndarray, seq_len: int) -> float:
    """The synthetic share of the tokens LongDocumentMix serves at seq_len: it cuts documents into pieces of
    at most seq_len and serves its length buckets in fixed shares, so it is not the folder's share."""
    full, rest = corpus_lengths // seq_len, corpus_lengths % seq_len
    corpus = np.concatenate([np.full(int(full.sum()), seq_len), rest[rest > 0]])
    served, present = 0.0, 0.0
    for share, low, high in zip(data.LongDocumentMix.SHARES, (seq_len / 2, seq_len / 8, 0), (np.inf, seq_len / 2, seq_len / 8)):
        in_corpus = corpus[(corpus >= low) & (corpus < high)].sum()
        in_synthetic = synthetic_lengths[(synthetic_lengths >= low) & (synthetic_lengths < high)].sum()
        if in_corpus + in_synthetic:
            served += share * in_synthetic / (in_corpus + in_synthetic)
            present += share  # an empty bucket's share goes to the others, as in LongDocumentMix
    return float(served / present)


def write_mix(building: Path, corpus_dir: Path, plan: MixPlan, shard_tokens: int, progress: bool) -> dict:
    """Write the mix into the empty folder `building`; returns its manifest."""
    manifest, stream, corpus_lengths = read_corpus(corpus_dir)
    tokenizer = manifest["tokenizer"]
    eos_id = tokenizer["eos_id"]
    haystack = stream[stream != eos_id]  # corpus text without document ends: an EOS would cut the document
    if haystack.size < plan.seq_len:
        raise data.DataError(f"{corpus_dir}'s train split holds {haystack.size:,} text tokens, fewer than one "
                             f"document of --seq_len {plan.seq_len}; mix a larger corpus or use a shorter --seq_len")
    documents = synthetic_documents(plan, stream.size, haystack, eos_id, progress)
    synthetic_lengths = np.array([tokens.size for _, tokens in documents], dtype=np.int64)
    pieces = corpus_pieces(corpus_lengths, stream.size, plan)
    before, _ = mix_layout(pieces, synthetic_lengths)
    writer = MixWriter(building, "train", shard_tokens, tokenizer["vocab_size"], eos_id)
    piece_starts, k = np.concatenate([[0], np.cumsum(pieces)]), 0
    for j in range(pieces.size):
        while k < len(documents) and before[k] == j:
            writer.add(documents[k][1], synthetic=True)
            k += 1
        writer.add(stream[piece_starts[j]:piece_starts[j + 1]], synthetic=False)
    splits = {"train": writer.close()}
    for split, record in manifest["splits"].items():  # val (and any other split) unchanged, byte for byte
        if split != "train":
            for shard in record["shards"]:
                shutil.copyfile(corpus_dir / shard["file"], building / shard["file"])
            splits[split] = record
    if tokenizer.get("vocab_file"):
        shutil.copyfile(corpus_dir / tokenizer["vocab_file"], building / tokenizer["vocab_file"])
    recipe = mix_recipe(plan, documents, corpus_dir, manifest, stream.size, corpus_lengths)
    return data.write_manifest(building, splits, tokenizer=tokenizer, synthetic=recipe)


def mix_recipe(plan: MixPlan, documents, corpus_dir: Path, manifest: dict, corpus_tokens: int,
               corpus_lengths: np.ndarray) -> dict:
    """The manifest's "synthetic" record: enough to know what was mixed and which id block to probe with."""
    synthetic_lengths = np.array([tokens.size for _, tokens in documents], dtype=np.int64)
    synthetic_tokens = int(synthetic_lengths.sum())
    recipe = {"version": MIX_VERSION, "share": plan.share, "kinds": list(plan.kinds), "seq_len": plan.seq_len,
              "lengths": plan.layout, "ids": {"first": plan.ids.first, "size": plan.ids.size}, "seed": plan.seed,
              "documents": {kind: sum(k == kind for k, _ in documents) for kind in plan.kinds},
              "synthetic_tokens": synthetic_tokens, "corpus_tokens": corpus_tokens,
              "synthetic_share": synthetic_tokens / (synthetic_tokens + corpus_tokens),
              "document_lengths": list(plan.length_range()), "filler": {kind: FILLER[kind] for kind in plan.kinds},
              "mqar_tokens_per_pair": MQAR_TOKENS_PER_PAIR, "probe_key_modulus": PROBE_KEY_MODULUS,
              "corpus": {"folder": str(corpus_dir), "shards_sha256": hashlib.sha256(json.dumps(
                  [s["sha256"] for s in manifest["splits"]["train"]["shards"]]).encode()).hexdigest()}}
    if plan.layout == "packed":
        recipe["shortest"] = plan.shortest
    if plan.layout == "long":
        recipe["long_document_mix_share"] = long_mix_share(corpus_lengths, synthetic_lengths, plan.seq_len)
    return recipe


def build_mix(corpus_dir, out_dir, seq_len: int, share: float, kinds=DEFAULT_KINDS, ids: SyntheticIds | None = None,
              seed: int = 0, progress: bool = True, lengths: str = "window",
              shard_tokens: int = data.DEFAULT_SHARD_TOKENS, shortest: int = DEFAULT_SHORTEST) -> Path:
    """Write out_dir: corpus_dir with `share` of its train tokens synthetic retrieval documents (the layouts
    above; lengths "window" or "packed" (documents of `shortest` tokens and up) for pretraining at seq_len,
    "long" for extension at seq_len), val unchanged,
    the recipe in the manifest under "synthetic" (recipe_of). Built aside and swapped in whole under the
    folder's lock, so an interrupted build leaves out_dir as it was and the next one starts clean; the same
    arguments give the same bytes. Returns out_dir."""
    corpus_dir, out_dir, start = Path(corpus_dir), Path(out_dir), time.monotonic()
    tokenizer = plain_corpus(corpus_dir)["tokenizer"]
    plan = MixPlan(int(seq_len), float(share), tuple(kinds), ids or default_ids(tokenizer), int(seed), lengths,
                   int(shortest))
    check_plan(plan)  # all the refusals come before the folder is locked or anything is written
    check_ids(plan.ids, tokenizer, corpus_dir)
    if out_dir.resolve() == corpus_dir.resolve():
        raise data.DataError(f"--out {out_dir} is the corpus folder itself; pass a new folder, e.g. "
                             f"data/regime_L{seq_len}")
    if (out_dir / data.MANIFEST).is_file() and recipe_of(out_dir, check=False) is None:
        raise data.DataError(f"--out {out_dir} holds a prepared folder that is not a synthetic mix, and a build "
                             f"replaces the whole folder; pass a new folder")
    with data.built_aside(out_dir, "data.py synthetic") as building:
        manifest = write_mix(building, corpus_dir, plan, shard_tokens, progress)
    if progress:
        recipe = manifest["synthetic"]
        counts = ", ".join(f"{kind} {n:,}" for kind, n in recipe["documents"].items())
        print(f"synthetic mix {out_dir}: {sum(recipe['documents'].values()):,} documents ({counts}), "
              f"{recipe['synthetic_tokens']:,} of {manifest['splits']['train']['tokens']:,} train tokens "
              f"({recipe['synthetic_share']:.1%}); val as in {corpus_dir}; {time.monotonic() - start:.1f}s",
              file=sys.stderr)
    return out_dir


def recipe_of(data_dir, check: bool = True) -> dict | None:
    """The "synthetic" record of a mix's manifest (which id block to probe with, and the rest of the
    recipe), or None for a plain prepared folder. check=False reads the manifest without read_manifest's
    checks (for a folder about to be replaced)."""
    if check:
        return data.read_manifest(data_dir).get("synthetic")
    try:
        manifest = json.loads((Path(data_dir) / data.MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest.get("synthetic") if isinstance(manifest, dict) else None
