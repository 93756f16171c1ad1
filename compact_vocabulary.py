"""
The compact vocabulary: a corpus's own small vocabulary on top of dolma2, lossless.

    python data.py builtin --compact_vocab 8192           # data/builtin_v8192: what `python train.py` trains on
    python data.py prepare corpus.jsonl --out data/mine --compact_vocab 8192
    python data.py compact data/mine --vocab_size 8192    # the compact copy of a dolma2 folder: data/mine_v8192

At the tiny size the LM head over dolma2's 100,352 ids is ~93% of the FLOPs and most of the memory
traffic. A compact vocabulary keeps the N most useful ids for one corpus:
    ids 0-255    the bytes 0x00-0xFF (dolma2's single-byte tokens land here too)
    256, 257     <|endoftext|> and <|pad|>
    258 ...      the most frequent other dolma2 ids of the folder's TRAINING split, most frequent
                 first (ties: the lower dolma2 id), so that N = 258 + how many were kept
Encoding is dolma2's BPE, then each id in the table becomes its compact id and any other id is
written as its bytes through the byte tokens. Decoding joins the bytes and decodes UTF-8 once at
the end, so text -> compact ids -> text is the identity (a token may hold part of a character).

The mapping is data.COMPACT_VOCAB_FILE in the data folder and in every checkpoint trained on it;
its `mapping_sha256` names it, and a checkpoint refuses data whose mapping differs. That file's
format and check live in data.py, whose loaders must refuse a missing or damaged one; this module
builds on data.py: the table, its tokenizer (tokenizer_for(folder) is how every script gets a
folder's tokenizer), compact copies of folders, and the checks between checkpoints and data.
"""

import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import data
import files

COMPACT_EOS_ID, COMPACT_PAD_ID = 256, 257  # then data.FIRST_FREQUENT_ID = 258, the first id of the table
MIN_COMPACT_VOCAB = 512


# -----------------------------------------------------------------------------
# Across vocabularies: the model's embedding rows, and a loss that compares

def padded_vocab_size(vocab_size, multiple=128):
    """The model's embedding rows for a vocabulary: a multiple of 128, as OLMo-core pads dolma2's 100,278
    ids to 100,352 (docs/data.md)."""
    return multiple * math.ceil(vocab_size / multiple)


def bits_per_byte(nats, n_bytes):
    """Summed cross-entropy (nats) over targets -> bits per byte of the text they stand for: comparable
    across vocabularies. = nats per token x tokens / bytes / ln 2; specials count no bytes."""
    if n_bytes <= 0:
        return float("nan")
    return float(nats) / (math.log(2) * n_bytes)


# -----------------------------------------------------------------------------
# The tokenizer

class CompactTokenizer:
    """A compact vocabulary (see above) over dolma2; the same interface as Tokenizer."""

    def __init__(self, dolma2_ids, base=None):
        base = base or data.get_tokenizer()
        ids = np.asarray(dolma2_ids, dtype=np.int64)
        single_bytes = np.array([base.encoding.encode_single_token(bytes([b])) for b in range(256)])
        problems = set(ids.tolist()) & (set(single_bytes.tolist()) | set(data.SPECIAL_TOKENS.values()))
        if len(set(ids.tolist())) != ids.size or problems or not all(base.id_bytes[i] for i in ids):
            raise data.DataError(f"a compact vocabulary lists each multi-byte dolma2 token at most once; these ids "
                                 f"are repeated, special, single bytes or unassigned: {sorted(problems)[:10]}; "
                                 f"{data.COMPACT_FIX}")
        self.base, self.dolma2_ids = base, ids
        self.vocab_size = data.FIRST_FREQUENT_ID + ids.size
        self.eos_id, self.pad_id = COMPACT_EOS_ID, COMPACT_PAD_ID
        self.name = f"dolma2-compact-{self.vocab_size}"
        self.mapping_sha256 = data.mapping_sha256(ids)
        # What each compact id decodes to; specials decode to their names, as dolma2's do.
        self.token_bytes = ([bytes([b]) for b in range(256)] + [b"<|endoftext|>", b"<|pad|>"]
                            + [base.id_bytes[i] for i in ids])
        # Text bytes per compact id, for bits per byte: specials stand for none.
        self.byte_lengths = np.array([len(t) for t in self.token_bytes], dtype=np.int64)
        self.byte_lengths[[COMPACT_EOS_ID, COMPACT_PAD_ID]] = 0
        # dolma2 id -> compact id, or -1 for ids written as their bytes.
        self.from_dolma2 = np.full(data.VOCAB_SIZE, -1, dtype=np.int64)
        self.from_dolma2[single_bytes] = np.arange(256)
        self.from_dolma2[[data.EOS_ID, data.PAD_ID]] = [COMPACT_EOS_ID, COMPACT_PAD_ID]
        self.from_dolma2[ids] = np.arange(data.FIRST_FREQUENT_ID, self.vocab_size)
        # All dolma2 tokens' bytes in one array, to spell out unlisted ids without a Python loop.
        self._all_bytes = np.frombuffer(b"".join(base.id_bytes), dtype=np.uint8)
        self._byte_offsets = np.cumsum(base.byte_lengths) - base.byte_lengths

    def convert(self, dolma2_ids):
        """(compact ids, where each dolma2 token's first compact id lands) for an array of dolma2 ids."""
        dolma2_ids = np.asarray(dolma2_ids, dtype=np.int64)
        compact = self.from_dolma2[dolma2_ids]
        listed = compact >= 0
        counts = np.where(listed, 1, self.base.byte_lengths[dolma2_ids])  # compact tokens per dolma2 token
        starts = np.cumsum(counts) - counts
        out = np.empty(int(counts.sum()), dtype=np.int64)
        out[starts[listed]] = compact[listed]
        spelled = np.flatnonzero(~listed)  # dolma2 tokens written byte by byte
        lengths = counts[spelled]
        token = np.repeat(np.arange(spelled.size), lengths)  # for each output byte: which spelled token
        within = np.arange(token.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[starts[spelled][token] + within] = self._all_bytes[self._byte_offsets[dolma2_ids[spelled]][token] + within]
        return out, starts

    def encode(self, text):
        return self.convert(self.base.encode(text))[0].tolist()

    def encode_batch(self, texts):
        return [self.convert(ids)[0].tolist() for ids in self.base.encode_batch(texts)]

    def decode(self, ids):
        ids = [int(i) for i in ids]
        beyond = [i for i in ids if not 0 <= i < self.vocab_size]
        if beyond:
            raise data.DataError(f"token id {beyond[0]} is outside the compact vocabulary of {self.vocab_size} ids "
                                 f"(a padded embedding row?); keep sampling below vocab_size, e.g. "
                                 f"logits[..., {self.vocab_size}:] = -inf")
        # errors="replace", as tiktoken decodes dolma2: only bytes that are not UTF-8 become U+FFFD.
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def manifest_record(self):
        return {"name": self.name, "base": "dolma2", "bpe": "cl100k_base", "bpe_sha256": data.CL100K_SHA256,
                "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "vocab_file": data.COMPACT_VOCAB_FILE, "mapping_sha256": self.mapping_sha256}


@functools.lru_cache(maxsize=8)
def compact_tokenizer(dolma2_ids):
    """One CompactTokenizer per mapping (dolma2_ids as a tuple), shared by everything that reads it."""
    return CompactTokenizer(dolma2_ids)


def tokenizer_for(folder):
    """The tokenizer a prepared data folder or a checkpoint folder was made with: the folder's
    compact vocabulary (COMPACT_VOCAB_FILE) when it has one, else dolma2. Training, extension,
    evaluation, generation and export all go through here so that they read the same mapping."""
    if folder is not None and (Path(folder) / data.COMPACT_VOCAB_FILE).exists():
        vocab = data.read_compact_vocab(Path(folder) / data.COMPACT_VOCAB_FILE)
        return compact_tokenizer(tuple(vocab["dolma2_ids"]))
    return data.get_tokenizer()


# -----------------------------------------------------------------------------
# The table: the train split's most frequent dolma2 ids

def check_compact_vocab_size(vocab_size):
    if vocab_size < MIN_COMPACT_VOCAB:
        raise data.DataError(f"a compact vocabulary of {vocab_size} ids is too small: it needs {data.FIRST_FREQUENT_ID} "
                             f"for bytes and specials; use at least {MIN_COMPACT_VOCAB}, e.g. 8192 (or 0 for dolma2)")
    if vocab_size >= data.VOCAB_SIZE:
        raise data.DataError(f"a compact vocabulary of {vocab_size} ids is no smaller than dolma2's {data.VOCAB_SIZE}; "
                             f"use fewer (e.g. 8192), or dolma2 itself (0)")


def train_token_counts(folder):
    """How often each dolma2 id occurs in the train split of a dolma2 folder (uint32 shards, chunked)."""
    manifest = data.read_manifest(folder)
    counts = np.zeros(data.VOCAB_SIZE, dtype=np.int64)
    for record in manifest["splits"]["train"]["shards"]:
        tokens = data.read_shard(Path(folder) / record["file"]).tokens
        for start in range(0, tokens.size, 1 << 24):
            counts += np.bincount(tokens[start:start + (1 << 24)], minlength=data.VOCAB_SIZE)
    return counts


def build_compact_vocab(folder, vocab_size):
    """The COMPACT_VOCAB_FILE contents for a dolma2 folder: its train split's most frequent ids. The
    same train split always gives the same file."""
    check_compact_vocab_size(vocab_size)
    base = data.get_tokenizer()
    counts = train_token_counts(folder)
    text_counts = counts.copy()
    text_counts[list(data.SPECIAL_TOKENS.values())] = 0  # EOS ends documents: structure, always in the vocabulary
    candidates = text_counts.copy()
    candidates[base.byte_lengths <= 1] = 0  # single bytes are ids 0-255 already
    order = np.lexsort((np.arange(data.VOCAB_SIZE), -candidates))  # most frequent first, then the lower id
    chosen = order[:vocab_size - data.FIRST_FREQUENT_ID]
    chosen = chosen[candidates[chosen] > 0]  # a small corpus may fill fewer slots: the vocabulary is then smaller
    covered = text_counts[base.byte_lengths == 1].sum() + candidates[chosen].sum()
    ids = [int(i) for i in chosen]
    return {"format": data.COMPACT_FORMAT, "version": 1, "base": "dolma2", "base_bpe_sha256": data.CL100K_SHA256,
            "vocab_size": data.FIRST_FREQUENT_ID + len(ids), "requested_vocab_size": vocab_size,
            "layout": "0-255: bytes 0x00-0xFF; 256: <|endoftext|>; 257: <|pad|>; 258+i: dolma2 id dolma2_ids[i]",
            "mapping_sha256": data.mapping_sha256(ids),
            "train_tokens": int(text_counts.sum()), "distinct_train_ids": int((text_counts > 0).sum()),
            "train_coverage": float(covered / max(text_counts.sum(), 1)),  # share of dolma2 train tokens kept whole
            "dolma2_ids": ids}


# -----------------------------------------------------------------------------
# Folders in a compact vocabulary

def shards_fingerprint(manifest):
    """What a compact copy was made from: the SHA-256s of all its source's shards, hashed."""
    return hashlib.sha256(json.dumps([s["sha256"] for split in sorted(manifest["splits"])
                                      for s in manifest["splits"][split]["shards"]]).encode()).hexdigest()


def compact_folder(source_dir, vocab_size, out_dir=None, progress=True):
    """Build (or reuse) the compact-vocabulary copy of a dolma2 folder: OUT/COMPACT_VOCAB_FILE from the
    train split, and every shard of every split rewritten in compact ids. Returns OUT (default SOURCE_vN)."""
    source_dir = Path(source_dir)
    out_dir = Path(out_dir) if out_dir else source_dir.with_name(f"{source_dir.name}_v{vocab_size}")
    source = data.read_manifest(source_dir)
    if source["tokenizer"].get("vocab_file"):
        raise data.DataError(f"{source_dir} already uses a compact vocabulary; build one from the dolma2 folder it "
                             f"came from")
    origin = {"folder": str(source_dir), "shards_sha256": shards_fingerprint(source), "requested_vocab_size": vocab_size}
    try:
        manifest = data.read_manifest(out_dir)
        if manifest.get("compact_of", {}).get("shards_sha256") == origin["shards_sha256"] and \
                manifest["compact_of"].get("requested_vocab_size") == vocab_size and all(
                (out_dir / s["file"]).is_file() and (out_dir / s["file"]).stat().st_size == s["bytes"]
                for split in manifest["splits"].values() for s in split["shards"]):
            return out_dir
    except (data.DataError, OSError, KeyError, json.JSONDecodeError):
        pass  # missing, partial or from other data: build it
    start = time.monotonic()
    with data.built_aside(out_dir, "data.py compact") as building:  # one writer; built aside, swapped in whole
        vocab = build_compact_vocab(source_dir, vocab_size)
        tokenizer = compact_tokenizer(tuple(vocab["dolma2_ids"]))
        splits, manifest = write_compact_shards(source, source_dir, building, vocab, tokenizer, origin)
    if progress:
        train_split = splits["train"]
        print(f"compact vocabulary {out_dir / data.COMPACT_VOCAB_FILE}: {tokenizer.vocab_size:,} ids keep "
              f"{vocab['train_coverage']:.1%} of {source_dir}'s {vocab['distinct_train_ids']:,} distinct train ids' "
              f"tokens whole; {train_split['tokens']:,} train tokens (dolma2: {source['splits']['train']['tokens']:,}), "
              f"{train_split['text_bytes'] / max(train_split['tokens'], 1):.2f} bytes of text per token; "
              f"{time.monotonic() - start:.1f}s", file=sys.stderr)
    return out_dir


def write_compact_shards(source, source_dir, out_dir, vocab, tokenizer, origin):
    """Write the vocabulary file, every shard of source rewritten in compact ids, and the manifest into
    out_dir; returns (splits, manifest)."""
    files.write_json_atomically(out_dir / data.COMPACT_VOCAB_FILE, vocab)
    splits = {}
    for split, record in source["splits"].items():
        shards, text_bytes = [], 0
        for shard_record in record["shards"]:
            shard = data.read_shard(source_dir / shard_record["file"])
            tokens, starts = tokenizer.convert(shard.tokens)
            doc_starts = starts[shard.doc_starts.astype(np.int64)] if shard.doc_starts.size else shard.doc_starts
            sha256 = data.write_shard(out_dir / shard_record["file"], tokens, doc_starts, vocab_size=tokenizer.vocab_size)
            text_bytes += int(tokenizer.byte_lengths[tokens].sum())
            shards.append({"file": shard_record["file"], "tokens": int(tokens.size), "documents": int(doc_starts.size),
                           "bytes": (out_dir / shard_record["file"]).stat().st_size, "sha256": sha256})
        splits[split] = {"tokens": sum(s["tokens"] for s in shards), "documents": record["documents"],
                         "shards": shards, "text_bytes": text_bytes}
    details = {k: v for k, v in source.items() if k not in ("format", "format_version", "tokenizer", "splits")}
    manifest = data.write_manifest(out_dir, splits, tokenizer=tokenizer.manifest_record(),
                                   **(details | {"compact_of": origin}))
    return splits, manifest


def prepare(inputs, out_dir, val_fraction=0.005, shard_tokens=data.DEFAULT_SHARD_TOKENS, progress=True,
            compact_vocab=0):
    """data.prepare, or with compact_vocab N into a compact vocabulary of N ids built from the train
    split (through a dolma2 folder beside out_dir, removed after). Returns the manifest."""
    if not compact_vocab:
        return data.prepare(inputs, out_dir, val_fraction, shard_tokens, progress)
    check_compact_vocab_size(compact_vocab)  # before the long part
    with data.one_writer(out_dir, "data.py prepare"):  # held through both steps: no other writer in between
        dolma2_dir = Path(out_dir).with_name(f".{Path(out_dir).name}.dolma2.tmp{os.getpid()}")
        try:
            data.prepare(inputs, dolma2_dir, val_fraction, shard_tokens, progress)
            compact_folder(dolma2_dir, compact_vocab, out_dir, progress=progress)
        finally:
            shutil.rmtree(dolma2_dir, ignore_errors=True)
    return data.read_manifest(out_dir)


def prepare_builtin_corpus(out_dir=data.DEFAULT_BUILTIN_DIR, max_tokens=data.BUILTIN_MAX_TOKENS, progress=True,
                           compact_vocab=0):
    """data.prepare_builtin_corpus, or with compact_vocab N also its compact copy OUT_vN (compact_folder),
    returned: what `python train.py` trains on at the tiny size."""
    folder = data.prepare_builtin_corpus(out_dir, max_tokens, progress)
    return compact_folder(folder, compact_vocab, progress=progress) if compact_vocab else folder


def folder_in_vocab(folder, compact_vocab=None, progress=True):
    """The folder to train on for --compact_vocab: None, the folder as it is; 0, it must be dolma2;
    N, it must be compact with N ids, or be dolma2 and get compacted into FOLDER_vN (reused after)."""
    folder = Path(folder)
    if compact_vocab is None:
        return folder
    path = folder / data.COMPACT_VOCAB_FILE
    if not path.is_file():
        return compact_folder(folder, compact_vocab, progress=progress) if compact_vocab else folder
    vocab = data.read_compact_vocab(path)
    if compact_vocab == vocab.get("requested_vocab_size", vocab["vocab_size"]):
        return folder
    build = "the dolma2 folder it was built from" if compact_vocab == 0 else \
        f"--compact_vocab {vocab.get('requested_vocab_size', vocab['vocab_size'])}, or the dolma2 folder it was built from"
    asked = "dolma2" if compact_vocab == 0 else f"{compact_vocab} ids"
    raise data.DataError(f"--compact_vocab {compact_vocab} asks for {asked}, but {folder} holds a compact vocabulary "
                         f"of {vocab['vocab_size']:,} ids ({path}); pass {build}")


# -----------------------------------------------------------------------------
# Checkpoints: the vocabulary they were trained in

def vocabulary_name(folder):
    """(a description naming the file, the mapping hash or None for dolma2) of a data or checkpoint folder."""
    path = Path(folder) / data.COMPACT_VOCAB_FILE
    if not path.exists():
        return f"dolma2 (no {data.COMPACT_VOCAB_FILE} in {folder})", None
    vocab = data.read_compact_vocab(path)
    return f"the compact vocabulary {path} ({vocab['vocab_size']:,} ids, mapping {vocab['mapping_sha256'][:12]})", \
        vocab["mapping_sha256"]


def check_extension_vocabulary(pretraining, extension, flag: str):
    """An extension's data folder must be in the pretraining folder's vocabulary: the pretrained model reads
    its ids. Refuses another mapping (data.DataError naming both files)."""
    (ours, our_mapping), (theirs, their_mapping) = map(vocabulary_name, (pretraining, extension))
    if our_mapping != their_mapping:
        raise data.DataError(f"--data {pretraining} uses {ours}, but {flag} {extension} uses {theirs}: the same ids "
                             f"would mean other text; prepare both folders in one vocabulary")


def check_same_vocabulary(checkpoint_dir, data_dir):
    """Refuse to train or evaluate a checkpoint on data tokenized with another mapping: its ids would
    mean other text. Names both files."""
    saved, saved_hash = vocabulary_name(checkpoint_dir)
    ours, our_hash = vocabulary_name(data_dir)
    if saved_hash != our_hash:
        raise data.DataError(f"{checkpoint_dir} was trained on {saved}, but the data {data_dir} uses {ours}: the same ids "
                             f"would mean other text. Use the data the checkpoint was trained on (train.py: --data FOLDER, "
                             f"or --compact_vocab 0 for dolma2's built-in corpus), or start a fresh run in another --out")


def copy_vocabulary(data_dir, checkpoint_dir):
    """Put the data's COMPACT_VOCAB_FILE (if any) into a checkpoint folder, so the checkpoint names its tokenizer."""
    path = Path(data_dir) / data.COMPACT_VOCAB_FILE
    if path.exists():
        shutil.copyfile(path, Path(checkpoint_dir) / data.COMPACT_VOCAB_FILE)
