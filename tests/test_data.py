"""Tests for data.py: the tokenizer, the shard format, prepare, the built-in corpus and the loader."""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import torch
from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without a conftest
import data  # noqa: E402

EOS = data.EOS_ID


@pytest.fixture(scope="module")
def tokenizer():
    return data.get_tokenizer()


# -----------------------------------------------------------------------------
# Tokenizer

@settings(max_examples=300, deadline=None)
@given(st.text())
def test_decode_inverts_encode_for_any_text(text):
    tokenizer = data.get_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text


KNOWN_CL100K_IDS = {  # from cl100k_base as published by OpenAI (tiktoken README and cookbook)
    "hello world": [15339, 1917],
    "Hello, world!": [9906, 11, 1917, 0],
    "tiktoken is great!": [83, 1609, 5963, 374, 2294, 0],
    " the": [279],
    "\n": [198],
}


def test_known_strings_get_their_cl100k_ids(tokenizer):
    for text, ids in KNOWN_CL100K_IDS.items():
        assert tokenizer.encode(text) == ids, text


SAMPLES = [
    "hello world",
    "def f(x):\n    return x ** 2  # squares\n\n\n",
    "Ünïcödé, 中文, emoji 🙂, tabs\tand  spaces   ",
    "I'll say it's 12345678 o'clock, THEY'RE late",
    "<|endoftext|> typed in a document is just text",
    open(data.__file__).read(),
]


def test_ids_equal_tiktokens_own_cl100k_built_from_the_same_file(tokenizer, monkeypatch):
    # Let tiktoken's own cl100k_base() recipe read the shipped file instead of downloading it,
    # so its regex, its parser and its hash check are compared with ours.
    local = data.find_cl100k_file()

    def read_local(blobpath, expected_hash=None):
        assert blobpath.endswith("/cl100k_base.tiktoken")
        contents = local.read_bytes()
        assert hashlib.sha256(contents).hexdigest() == expected_hash
        return contents

    monkeypatch.setattr(tiktoken.load, "read_file_cached", read_local)
    from tiktoken_ext import openai_public
    reference = tiktoken.Encoding(**openai_public.cl100k_base())
    assert reference._mergeable_ranks == data.load_bpe_ranks(local)
    assert {**reference._special_tokens, "<|pad|>": data.PAD_ID} == data.SPECIAL_TOKENS
    assert openai_public.cl100k_base()["pat_str"] == data.CL100K_PATTERN
    for text in SAMPLES:
        assert tokenizer.encode(text) == reference.encode_ordinary(text)


def test_special_token_ids_are_dolma2s(tokenizer):
    assert (data.EOS_ID, data.PAD_ID, data.VOCAB_SIZE) == (100257, 100277, 100278)
    assert tokenizer.encoding.n_vocab == data.VOCAB_SIZE
    expected = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276, "<|pad|>": 100277}
    for text, token_id in expected.items():
        assert tokenizer.encoding.encode_single_token(text) == token_id
        assert tokenizer.decode([token_id]) == text


def test_special_tokens_in_text_are_encoded_as_ordinary_text(tokenizer):
    ids = tokenizer.encode("a <|endoftext|> b <|pad|>")
    assert not set(ids) & set(data.SPECIAL_TOKENS.values())
    assert tokenizer.decode(ids) == "a <|endoftext|> b <|pad|>"


def test_bpe_file_with_the_wrong_hash_is_refused_naming_file_and_fix(tmp_path):
    corrupt = tmp_path / "cl100k_base.tiktoken"
    raw = bytearray(data.find_cl100k_file().read_bytes())
    raw[100] ^= 1
    corrupt.write_bytes(bytes(raw))
    with pytest.raises(data.DataError) as error:
        data.load_bpe_ranks(corrupt)
    assert str(corrupt) in str(error.value)
    assert data.CL100K_SHA256 in str(error.value)
    assert "pip install" in str(error.value)


# -----------------------------------------------------------------------------
# prepare and the shard format

def read_documents_of_split(folder, split):
    """Decode every document of a split, checking each shard's stored document starts on the way."""
    tokenizer, documents = data.get_tokenizer(), []
    for record in data.read_manifest(folder)["splits"][split]["shards"]:
        shard = data.read_shard(folder / record["file"])
        tokens = np.asarray(shard.tokens)
        assert tokens[-1] == EOS
        starts = np.concatenate([[0], np.flatnonzero(tokens == EOS)[:-1] + 1])
        assert shard.doc_starts.tolist() == starts.tolist()
        documents += [tokenizer.decode(piece) for piece in np.split(tokens, starts[1:])]
    return [d.removesuffix("<|endoftext|>") for d in documents]


@pytest.fixture
def corpus(tmp_path):
    """A small corpus of every input kind; returns (inputs, the documents they hold)."""
    source = tmp_path / "source"
    (source / "notes" / ".hidden").mkdir(parents=True)
    rows = [f"Document {i}: the quick brown fox, {i * 'ünïcödé '}<|endoftext|> is text here" for i in range(40)]
    (source / "rows.jsonl").write_text("\n".join(json.dumps({"text": r, "id": i}) for i, r in enumerate(rows)) + "\n\n")
    (source / "story.txt").write_text("Once upon a time.\n\nThe end.\n")
    (source / "notes" / "a.md").write_text("# Notes\n\n- one\n- two\n")
    (source / "notes" / "b.rst").write_text("Title\n=====\n\nBody.\n")
    (source / "notes" / "image.png").write_bytes(b"\x89PNG\r\n")      # not a text suffix: skipped
    (source / "notes" / ".hidden" / "x.txt").write_text("secret")      # hidden: skipped
    (source / "globbed_1.txt").write_text("first globbed file")
    (source / "globbed_2.txt").write_text("second globbed file")
    inputs = [source / "rows.jsonl", source / "story.txt", source / "notes", str(source / "globbed_*.txt")]
    documents = rows + ["Once upon a time.\n\nThe end.\n", "# Notes\n\n- one\n- two\n", "Title\n=====\n\nBody.\n",
                        "first globbed file", "second globbed file"]
    return inputs, documents


def test_prepare_round_trips_every_document_of_every_input_kind(corpus, tmp_path):
    inputs, documents = corpus
    out = tmp_path / "out"
    manifest = data.prepare(inputs, out, val_fraction=0.2, shard_tokens=200, progress=False)
    train, val = read_documents_of_split(out, "train"), read_documents_of_split(out, "val")
    assert sorted(train + val) == sorted(documents)
    assert train == [d for d in documents if d in train]  # input order kept within a split
    assert val and train
    assert len(manifest["splits"]["train"]["shards"]) > 1
    assert manifest["splits"]["train"]["documents"] == len(train)
    assert [s["documents"] for s in manifest["sources"]] == [40, 1, 1, 1, 1, 1]


def test_prepare_is_deterministic_and_splits_by_document_text_alone(corpus, tmp_path):
    inputs, _ = corpus
    first = data.prepare(inputs, tmp_path / "first", val_fraction=0.2, progress=False)
    again = data.prepare(inputs, tmp_path / "again", val_fraction=0.2, progress=False)
    assert first["splits"] == again["splits"]
    reordered = data.prepare(inputs[::-1], tmp_path / "reordered", val_fraction=0.2, progress=False)
    assert sorted(read_documents_of_split(tmp_path / "first", "val")) == \
        sorted(read_documents_of_split(tmp_path / "reordered", "val"))
    assert reordered["splits"]["val"]["tokens"] == first["splits"]["val"]["tokens"]


def test_prepare_into_a_used_folder_leaves_no_stale_shards(corpus, tmp_path):
    inputs, _ = corpus
    out = tmp_path / "out"
    data.prepare(inputs, out, val_fraction=0.2, shard_tokens=100, progress=False)
    manifest = data.prepare(inputs[1:], out, val_fraction=0.2, progress=False)
    listed = {s["file"] for split in manifest["splits"].values() for s in split["shards"]}
    assert {p.name for p in out.glob("*.bin")} == listed


@pytest.fixture
def shard_path(tmp_path):
    path = tmp_path / "train_000000.bin"
    data.write_shard(path, np.array([5, 6, 7, EOS, 8, EOS]), [0, 4])
    return path


def test_a_written_shard_reads_back(shard_path):
    shard = data.read_shard(shard_path)
    assert shard.tokens.tolist() == [5, 6, 7, EOS, 8, EOS]
    assert shard.doc_starts.tolist() == [0, 4]


def test_truncated_shard_is_refused_naming_file_and_fix(shard_path):
    shard_path.write_bytes(shard_path.read_bytes()[:-4])
    with pytest.raises(data.DataError, match="truncated") as error:
        data.read_shard(shard_path)
    assert str(shard_path) in str(error.value) and "data.py prepare" in str(error.value)
    shard_path.write_bytes(b"OLMP")  # cut inside the header
    with pytest.raises(data.DataError, match="truncated"):
        data.read_shard(shard_path)


def test_foreign_file_is_refused_naming_file_and_fix(shard_path):
    shard_path.write_bytes(b"PK\x03\x04 a zip file, not tokens" * 4)
    with pytest.raises(data.DataError, match="not an OlmPool token shard") as error:
        data.read_shard(shard_path)
    assert str(shard_path) in str(error.value) and "data.py prepare" in str(error.value)


def test_unknown_format_version_is_refused_naming_file_and_fix(shard_path):
    raw = bytearray(shard_path.read_bytes())
    raw[8:12] = (2).to_bytes(4, "little")
    shard_path.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="format version 2") as error:
        data.read_shard(shard_path)
    assert str(shard_path) in str(error.value) and "data.py prepare" in str(error.value)


def test_token_id_beyond_the_vocabulary_is_refused_naming_file_and_fix(shard_path):
    raw = bytearray(shard_path.read_bytes())
    raw[-8:-4] = (data.VOCAB_SIZE + 5).to_bytes(4, "little")  # the token before the last EOS
    shard_path.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="beyond the vocabulary") as error:
        data.read_shard(shard_path)
    message = str(error.value)
    assert str(shard_path) in message and str(data.VOCAB_SIZE + 5) in message and "position 4" in message
    assert "data.py prepare" in message


def test_writing_a_token_id_beyond_the_vocabulary_is_refused(tmp_path):
    with pytest.raises(data.DataError, match="beyond the vocabulary"):
        data.write_shard(tmp_path / "bad.bin", [1, data.VOCAB_SIZE], [0])
    assert not list(tmp_path.iterdir())


def test_empty_corpus_is_refused_naming_the_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n\n{"text": "   "}\n')
    with pytest.raises(data.DataError, match="empty corpus") as error:
        data.prepare([tmp_path / "empty.txt", tmp_path / "blank.jsonl"], tmp_path / "out", progress=False)
    assert "empty.txt" in str(error.value) and "blank.jsonl" in str(error.value)


def test_jsonl_line_without_text_is_refused_naming_file_and_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(data.DataError, match='"text" field') as error:
        data.prepare([rows], tmp_path / "out", progress=False)
    assert f"{rows}:2" in str(error.value)
    rows.write_text('{"text": "fine"}\n{"text": "fine",\n')
    with pytest.raises(data.DataError, match="not valid JSON") as error:
        data.prepare([rows], tmp_path / "out", progress=False)
    assert f"{rows}:2" in str(error.value)


def test_input_that_matches_nothing_is_refused_naming_it(tmp_path):
    with pytest.raises(data.DataError, match="matches no file") as error:
        data.prepare([str(tmp_path / "missing_*.txt")], tmp_path / "out", progress=False)
    assert "missing_*.txt" in str(error.value)


def test_folder_without_a_manifest_is_refused_with_the_prepare_command(tmp_path):
    with pytest.raises(data.DataError, match="data.py prepare"):
        data.TokenLoader(tmp_path, "train", seq_len=4, global_batch_size=1)


def test_command_line_help_documents_both_commands_and_the_format(capsys):
    with pytest.raises(SystemExit):
        data.main(["--help"])
    text = capsys.readouterr().out
    for needle in ["prepare", "builtin", "--val_fraction", "--shard_tokens", "--max_tokens", "magic", "JSONL"]:
        assert needle in text


def test_command_line_prepare_writes_a_folder_and_reports_errors(corpus, tmp_path, capsys):
    inputs, _ = corpus
    data.main(["prepare", *map(str, inputs), "--out", str(tmp_path / "cli"), "--quiet"])
    assert (tmp_path / "cli" / data.MANIFEST).is_file()
    with pytest.raises(SystemExit) as stop:
        data.main(["prepare", str(tmp_path / "nothing.txt"), "--out", str(tmp_path / "cli2")])
    assert stop.value.code == 1 and "matches no file" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# The built-in corpus

def test_builtin_corpus_prepares_from_python_itself_and_is_reused(tmp_path):
    out = data.prepare_builtin_corpus(tmp_path / "builtin", max_tokens=100_000, progress=False)
    manifest = data.read_manifest(out)
    tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    assert 100_000 <= tokens < 150_000
    assert manifest["sources"][0]["path"].endswith("topics.py")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    data.prepare_builtin_corpus(out, max_tokens=100_000, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    loader = data.TokenLoader(out, "train", seq_len=64, global_batch_size=4)
    assert loader.next_batch().inputs.shape == (4, 64)


def test_builtin_corpus_is_rebuilt_when_asked_for_more(tmp_path):
    out = data.prepare_builtin_corpus(tmp_path / "builtin", max_tokens=20_000, progress=False)
    small = data.read_manifest(out)["splits"]["train"]["tokens"]
    data.prepare_builtin_corpus(out, max_tokens=60_000, progress=False)
    assert data.read_manifest(out)["splits"]["train"]["tokens"] > small


# -----------------------------------------------------------------------------
# The loader

def write_token_folder(folder, documents, shard_tokens=10**9):
    """A prepared folder whose train split holds these token-id documents (EOS added)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = data.ShardWriter(folder, "train", shard_tokens)
    for document in documents:
        writer.add_document(document)
    data.write_manifest(folder, {"train": writer.close()})
    return folder


def numbered_documents(n_documents=20, length=97):
    """Documents of distinct ids, so every window of the stream is recognisable."""
    return [list(range(1 + d * length, 1 + (d + 1) * length)) for d in range(n_documents)]


@pytest.fixture
def token_folder(tmp_path):
    return write_token_folder(tmp_path / "tokens", numbered_documents())


def stream_of(documents):
    return [t for document in documents for t in document + [EOS]]


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
                                    for x, y in zip(a, b))


def test_same_seed_gives_same_batches_and_another_seed_others(token_folder):
    make = lambda seed: data.TokenLoader(token_folder, "train", seq_len=16, global_batch_size=8, seed=seed)
    assert same_batches(take(make(0), 20), take(make(0), 20))
    assert not same_batches(take(make(0), 5), take(make(1), 5))


def test_an_epoch_serves_distinct_windows_of_the_stream_with_targets_shifted_by_one(token_folder):
    loader = data.TokenLoader(token_folder, "train", seq_len=16, global_batch_size=8)
    stream = stream_of(numbered_documents())
    windows = {tuple(stream[i * 16:i * 16 + 17]) for i in range((len(stream) - 1) // 16)}
    served = []
    for batch in take(loader, loader.steps_per_epoch):
        assert batch.inputs.dtype == batch.targets.dtype == torch.int64
        assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
        served += [tuple(row) + (last,) for row, last in zip(batch.inputs.tolist(), batch.targets[:, -1].tolist())]
    assert len(set(served)) == len(served) == loader.steps_per_epoch * 8
    assert set(served) <= windows


def test_rank_rows_interleave_into_the_single_process_global_batch(token_folder):
    reference = take(data.TokenLoader(token_folder, "train", seq_len=16, global_batch_size=8), 4)
    for world_size in (1, 2, 4):
        ranks = [take(data.TokenLoader(token_folder, "train", seq_len=16, global_batch_size=8, rank=r,
                                       world_size=world_size), 4) for r in range(world_size)]
        for step, expected in enumerate(reference):
            merged = torch.empty_like(expected.inputs)
            for rank in range(world_size):
                assert ranks[rank][step].inputs.shape == (8 // world_size, 16)
                merged[rank::world_size] = ranks[rank][step].inputs
            assert torch.equal(merged, expected.inputs)


def test_batches_do_not_depend_on_how_the_stream_is_sharded(tmp_path):
    one = write_token_folder(tmp_path / "one", numbered_documents())
    many = write_token_folder(tmp_path / "many", numbered_documents(), shard_tokens=150)
    assert len(data.read_manifest(many)["splits"]["train"]["shards"]) > 5
    make = lambda folder: data.TokenLoader(folder, "train", seq_len=16, global_batch_size=8, mask_documents=True)
    a, b = take(make(one), 20), take(make(many), 20)
    assert same_batches(a, b)
    assert all(torch.equal(x.doc_ids, y.doc_ids) for x, y in zip(a, b))


@pytest.mark.parametrize("steps_before_saving", [5, 14, 15])  # mid-epoch, last step, epoch boundary
def test_state_dict_resumes_exactly_including_across_an_epoch_boundary(token_folder, steps_before_saving):
    make = lambda: data.TokenLoader(token_folder, "train", seq_len=16, global_batch_size=8, seed=3)
    original = make()
    assert original.steps_per_epoch == 15
    take(original, steps_before_saving)
    state = json.loads(json.dumps(original.state_dict()))  # what a checkpoint stores
    expected = take(original, 6)
    resumed = make()
    resumed.load_state_dict(state)
    assert same_batches(take(resumed, 6), expected)


def test_a_state_resumes_on_another_world_size(token_folder):
    single = data.TokenLoader(token_folder, "train", seq_len=16, global_batch_size=8)
    take(single, 7)
    state = single.state_dict()
    expected = single.next_batch()
    rank1 = data.TokenLoader(token_folder, "train", seq_len=16, global_batch_size=8, rank=1, world_size=2)
    rank1.load_state_dict(state)
    assert torch.equal(rank1.next_batch().inputs, expected.inputs[1::2])


def test_each_epoch_is_reshuffled_deterministically(token_folder):
    loader = data.TokenLoader(token_folder, "train", seq_len=16, global_batch_size=8)
    first_epoch = take(loader, 15)
    assert loader.state_dict()["epoch"] == 1
    second_epoch = take(loader, 15)
    assert not same_batches(first_epoch, second_epoch)
    again = data.TokenLoader(token_folder, "train", seq_len=16, global_batch_size=8)
    again.load_state_dict({**loader.state_dict(), "epoch": 1, "step": 0})
    assert same_batches(take(again, 15), second_epoch)


def test_a_state_from_other_data_or_settings_is_refused(token_folder, tmp_path):
    loader = data.TokenLoader(token_folder, "train", seq_len=16, global_batch_size=8)
    state = loader.state_dict()
    other_data = write_token_folder(tmp_path / "other", numbered_documents(n_documents=21))
    with pytest.raises(data.DataError, match="data_fingerprint"):
        data.TokenLoader(other_data, "train", seq_len=16, global_batch_size=8).load_state_dict(state)
    with pytest.raises(data.DataError, match="seq_len=16"):
        data.TokenLoader(token_folder, "train", seq_len=32, global_batch_size=8).load_state_dict(state)
    with pytest.raises(data.DataError, match="seed"):
        data.TokenLoader(token_folder, "train", seq_len=16, global_batch_size=8, seed=1).load_state_dict(state)


def test_doc_ids_count_the_documents_ended_before_each_position(tmp_path):
    folder = write_token_folder(tmp_path / "docs", [[11, 12, 13], [14, 15], [16, 17, 18, 19]])
    loader = data.TokenLoader(folder, "train", seq_len=11, global_batch_size=1, mask_documents=True)
    batch = next(loader.validation_batches())
    assert batch.inputs.tolist() == [[11, 12, 13, EOS, 14, 15, EOS, 16, 17, 18, 19]]
    assert batch.doc_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]]
    assert batch.doc_ids.dtype == torch.int32
    assert data.TokenLoader(folder, "train", seq_len=11, global_batch_size=1).next_batch().doc_ids is None


def test_validation_batches_are_the_same_on_every_call_and_leave_the_state_alone(token_folder):
    loader = data.TokenLoader(token_folder, "train", seq_len=16, global_batch_size=8)
    take(loader, 3)
    state = loader.state_dict()
    first, second = list(loader.validation_batches(4)), list(loader.validation_batches(4))
    assert len(first) == 4 and same_batches(first, second)
    assert loader.state_dict() == state
    stream = stream_of(numbered_documents())
    assert first[0].inputs[1].tolist() == stream[16:32]  # in stream order, no shuffle


def test_a_few_validation_batches_are_spread_over_the_whole_split(token_folder):
    loader = data.TokenLoader(token_folder, "train", seq_len=16, global_batch_size=2)
    every = list(loader.validation_batches())
    assert len(every) == loader.steps_per_epoch >= 4
    picked = list(loader.validation_batches(2))
    middle = loader.steps_per_epoch // 2
    assert same_batches(picked, [every[0], every[middle]])


def test_global_batch_that_does_not_split_over_the_world_size_is_refused(token_folder):
    with pytest.raises(data.DataError, match="multiple of 4"):
        data.TokenLoader(token_folder, "train", seq_len=16, global_batch_size=6, world_size=4)


def test_data_too_small_for_one_global_batch_is_refused_with_the_numbers(token_folder):
    with pytest.raises(data.DataError, match="too few for one global batch of 64 sequences") as error:
        data.TokenLoader(token_folder, "train", seq_len=64, global_batch_size=64)
    assert "1,960 tokens" in str(error.value) and "prepare more data" in str(error.value)


def test_truncated_shard_is_refused_by_the_loader_too(token_folder):
    shard = token_folder / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(data.DataError, match="truncated"):
        data.TokenLoader(token_folder, "train", seq_len=16, global_batch_size=8)
