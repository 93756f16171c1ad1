"""Tests for synthetic.py: the three retrieval document kinds on constructed cases, the training/probe
split of keys, and build_mix (`python data.py synthetic`): deterministic bytes, the token share, one
TokenLoader window per synthetic document, val unchanged, the recipe, refusals, a clean restart after
an interruption, the long layout for LongDocumentMix, and a folder train.py trains on."""

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without a conftest
import compact_vocabulary  # noqa: E402
import data  # noqa: E402
import data_cli  # noqa: E402
import files  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
from synthetic import NEEDLE_LENGTH, QUERY_LENGTH, SyntheticIds, is_probe_key  # noqa: E402

IDS = SyntheticIds(258, 240)  # fits the test corpus's vocabulary of 512 ids
VOCAB = 512
EOS = compact_vocabulary.COMPACT_EOS_ID
SMALL = ["--d_model", "32", "--n_layers", "2", "--n_heads", "4", "--head_dim", "8", "--mlp_hidden", "64",
         "--batch_tokens", "64", "--micro_batch", "2", "--eval_every", "0", "--log_every", "100",
         "--peak_flops", "1e12", "--threads", "1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def rng(seed):
    return np.random.default_rng(seed)


# -----------------------------------------------------------------------------
# The generators

@settings(max_examples=100)
@given(st.integers(0, 2**32 - 1), st.integers(synthetic.REPEAT_MIN_LENGTH, 600), st.booleans())
def test_a_repeat_document_is_one_sequence_twice_with_a_head_of_one_side(seed, length, probe):
    tokens, spans = synthetic.repeat_document(rng(seed), IDS, length, probe=probe)
    assert tokens.shape == (length,)
    [(first, second, size)] = spans
    assert (first, second, size) == (length % 2, length % 2 + length // 2, length // 2)
    assert np.array_equal(tokens[first:second], tokens[second:])
    assert is_probe_key(*tokens[first:first + 2]) == probe
    assert np.all((tokens[first:] >= IDS.keys[0]) & (tokens[first:] < IDS.values[1]))
    assert np.all((tokens[:first] >= IDS.filler[0]) & (tokens[:first] < IDS.filler[1]))


@settings(max_examples=150)
@given(st.integers(0, 2**32 - 1), st.integers(synthetic.COPY_MIN_LENGTH, 600), st.booleans())
def test_copy_spans_come_back_equal_inside_the_document_with_distinct_heads_of_one_side(seed, length, probe):
    tokens, spans = synthetic.copy_document(rng(seed), IDS, length, probe=probe)
    assert tokens.shape == (length,)
    covered = []
    for first, second, size in spans:
        assert size >= 2 and 0 <= first and first + size <= second and second + size <= length
        assert np.array_equal(tokens[first:first + size], tokens[second:second + size])
        assert is_probe_key(*tokens[first:first + 2]) == probe
        covered += [range(first, first + size), range(second, second + size)]
    assert sum(len(r) for r in covered) == len({i for r in covered for i in r})  # no two occurrences overlap
    heads = [tuple(tokens[first:first + 2]) for first, _, _ in spans]
    assert len(set(heads)) == len(heads)
    assert length // 4 <= sum(size for _, _, size in spans) <= length // 2


@settings(max_examples=150)
@given(st.integers(0, 2**32 - 1), st.integers(1, 20), st.integers(0, 300), st.booleans())
def test_mqar_answers_are_the_values_of_distinct_keys_at_the_stated_positions(seed, pairs, extra, probe):
    length = 6 * pairs + 1 + extra
    tokens, answers = synthetic.mqar_document(rng(seed), IDS, length, pairs, probe=probe)
    assert tokens.shape == (length,) and len(answers) == pairs
    table = tokens[:3 * pairs].reshape(pairs, 3)
    keys = {(int(a), int(b)): int(v) for a, b, v in table}
    assert len(keys) == pairs  # distinct keys
    assert all(is_probe_key(a, b) == probe for a, b in keys)
    asked = set()
    for answer in answers:
        assert 3 * pairs + 2 <= answer < length
        key = (int(tokens[answer - 2]), int(tokens[answer - 1]))
        assert keys[key] == tokens[answer]
        asked.add(key)
    assert asked == set(keys)  # every key is asked for once
    filler = np.delete(tokens, np.r_[np.arange(3 * pairs), [a - k for a in answers for k in range(3)]])
    assert np.all((filler >= IDS.filler[0]) & (filler < IDS.filler[1]))


@settings(max_examples=150)
@given(st.integers(0, 2**32 - 1), st.integers(NEEDLE_LENGTH + QUERY_LENGTH + 2, 500), st.booleans(), st.data())
def test_needle_answer_follows_the_question_at_the_end_and_the_needle_sits_at_the_given_distance(seed, length, probe,
                                                                                                draw):
    space = length - QUERY_LENGTH - 2
    distance = draw.draw(st.integers(NEEDLE_LENGTH, space))
    tokens, answers = synthetic.needle_document(rng(seed), IDS, length, probe=probe, distance=distance)
    assert tokens.shape == (length,) and answers == [length - 2, length - 1]
    question, needle = space, space - distance
    k1, k2, v1, v2 = tokens[needle + 1], tokens[needle + 2], tokens[needle + 4], tokens[needle + 5]
    assert list(tokens[needle:needle + NEEDLE_LENGTH]) == [IDS.needle_mark, k1, k2, IDS.value_mark, v1, v2]
    assert list(tokens[question:]) == [IDS.query_mark, k1, k2, IDS.value_mark, v1, v2]
    assert is_probe_key(k1, k2) == probe


def test_needle_distance_is_uniform_over_what_fits_when_not_given():
    length = 40
    space = length - QUERY_LENGTH - 2
    distances = []
    for seed in range(3000):
        tokens, answers = synthetic.needle_document(rng(seed), IDS, length)
        needle = int(np.flatnonzero(tokens[:space] == IDS.needle_mark)[0])  # filler ids hold no marker
        distances.append(space - needle)
    counts = np.bincount(distances, minlength=space + 1)[NEEDLE_LENGTH:]
    assert min(distances) == NEEDLE_LENGTH and max(distances) == space
    expected = len(distances) / counts.size  # ~103 per distance: each within 5 standard deviations
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected))


def test_haystack_fills_copy_and_needle_documents_with_a_stretch_of_it():
    haystack = np.arange(10_000, 11_000)
    tokens, spans = synthetic.copy_document(rng(1), IDS, 200, haystack=haystack)
    in_spans = np.zeros(200, bool)
    for first, second, size in spans:
        in_spans[first:first + size] = in_spans[second:second + size] = True
    rest = np.flatnonzero(~in_spans)
    assert np.all(np.diff(tokens[rest]) == np.diff(rest))  # consecutive haystack tokens where no span is
    tokens, _ = synthetic.needle_document(rng(2), IDS, 100, haystack=haystack, distance=50)
    assert tokens[0] >= 10_000 and np.all(np.diff(tokens[:30]) == 1)


@pytest.mark.parametrize("make, problem", [
    (lambda: synthetic.copy_document(rng(0), IDS, synthetic.COPY_MIN_LENGTH - 1), "at least 8 tokens"),
    (lambda: synthetic.mqar_document(rng(0), IDS, 60, 10), "at least 61 tokens"),
    (lambda: synthetic.mqar_document(rng(0), IDS, 60, 0), "at least one"),
    (lambda: synthetic.needle_document(rng(0), IDS, NEEDLE_LENGTH + QUERY_LENGTH + 1), "at least 12 tokens"),
    (lambda: synthetic.needle_document(rng(0), IDS, 50, distance=45), "outside [6, 44]"),
    (lambda: synthetic.needle_document(rng(0), IDS, 50, haystack=np.arange(30)), "holds 30 tokens"),
    (lambda: synthetic.draw_key_pairs(rng(0), SyntheticIds(0, 27), 20, probe=True), "use a larger id block"),
    (lambda: SyntheticIds(258, 26), "at least 27 ids"),
])
def test_impossible_sizes_are_refused_with_the_numbers(make, problem):
    with pytest.raises(ValueError, match=problem.replace("[", r"\[")):
        make()


@pytest.mark.parametrize("ids", [SyntheticIds(0, 27), SyntheticIds(258, 240), SyntheticIds(7168, 1024)])
def test_key_pairs_available_counts_each_side_of_the_split_exactly(ids):
    keys = range(*ids.keys)
    probe = sum(is_probe_key(a, b) for a in keys for b in keys)
    assert synthetic.key_pairs_available(ids, probe=True) == probe
    assert synthetic.key_pairs_available(ids, probe=False) == len(keys) ** 2 - probe
    assert probe == pytest.approx(len(keys) ** 2 / synthetic.PROBE_KEY_MODULUS, rel=0.05)


# -----------------------------------------------------------------------------
# A small corpus in a compact vocabulary of VOCAB ids

def write_corpus(folder, train_lengths, val_lengths=(300, 500), seed=0):
    """A prepared folder in a compact vocabulary of VOCAB ids whose documents are random text ids."""
    folder.mkdir(parents=True)
    base = data.get_tokenizer()
    dolma2_ids = [i for i in range(256, data.EOS_ID) if base.byte_lengths[i] > 1][:VOCAB - data.FIRST_FREQUENT_ID]
    tokenizer = compact_vocabulary.compact_tokenizer(tuple(dolma2_ids))
    files.write_json_atomically(folder / data.COMPACT_VOCAB_FILE, {
        "format": data.COMPACT_FORMAT, "version": 1, "base": "dolma2", "base_bpe_sha256": data.CL100K_SHA256,
        "vocab_size": VOCAB, "mapping_sha256": data.mapping_sha256(dolma2_ids), "dolma2_ids": dolma2_ids})
    generator, splits = rng(seed), {}
    text_ids = np.r_[0:EOS, data.FIRST_FREQUENT_ID:VOCAB]
    for split, lengths in (("train", train_lengths), ("val", val_lengths)):
        documents = [np.r_[generator.choice(text_ids, size=n - 1), EOS] for n in lengths]
        tokens = np.concatenate(documents)
        starts = np.cumsum([0] + [d.size for d in documents[:-1]])
        name = f"{split}_000000.bin"
        sha256 = data.write_shard(folder / name, tokens, starts, vocab_size=VOCAB)
        splits[split] = {"tokens": int(tokens.size), "documents": len(documents), "shards": [
            {"file": name, "tokens": int(tokens.size), "documents": len(documents),
             "bytes": (folder / name).stat().st_size, "sha256": sha256}]}
    data.write_manifest(folder, splits, tokenizer=tokenizer.manifest_record())
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    lengths = rng(7).integers(20, 3000, size=40)  # ~60K train tokens in documents of every length
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus", lengths)


def build(corpus, out, seq_len=64, share=0.5, **options):
    return synthetic.build_mix(corpus, out, seq_len, share, ids=options.pop("ids", IDS), progress=False, **options)


@pytest.fixture(scope="module")
def mix(corpus, tmp_path_factory):
    return build(corpus, tmp_path_factory.mktemp("mix") / "mix")


def corpus_stream(corpus):
    _, stream, lengths = synthetic.read_corpus(corpus)
    return stream, lengths


def placed_documents(corpus, folder):
    """[(kind, tokens, stream offset)] of a mix's synthetic documents, regenerated from its recipe."""
    recipe = synthetic.recipe_of(folder)
    ids = SyntheticIds(recipe["ids"]["first"], recipe["ids"]["size"])
    plan = synthetic.MixPlan(recipe["seq_len"], recipe["share"], tuple(recipe["kinds"]), ids, recipe["seed"],
                             recipe["lengths"], recipe.get("shortest", synthetic.DEFAULT_SHORTEST))
    stream, lengths = corpus_stream(corpus)
    haystack = stream[stream != EOS]
    documents = [plan.document(i, haystack, EOS) for i in range(sum(recipe["documents"].values()))]
    pieces = synthetic.corpus_pieces(lengths, stream.size, plan)
    _, starts = synthetic.mix_layout(pieces, np.array([d.size for _, d in documents]))
    return [(kind, tokens, int(start)) for (kind, tokens), start in zip(documents, starts)]


def train_stream(folder):
    manifest = data.read_manifest(folder)
    shards = [data.read_shard(folder / s["file"], vocab_size=VOCAB) for s in manifest["splits"]["train"]["shards"]]
    return np.concatenate([s.tokens for s in shards]), shards


def file_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


# -----------------------------------------------------------------------------
# build_mix

def test_the_same_arguments_give_the_same_bytes_and_another_seed_other_ones(corpus, mix, tmp_path):
    assert file_bytes(build(corpus, tmp_path / "again")) == file_bytes(mix)
    other = file_bytes(build(corpus, tmp_path / "other", seed=1))
    assert other["train_000000.bin"] != file_bytes(mix)["train_000000.bin"]


@settings(max_examples=8)
@given(st.floats(0.05, 0.95), st.sampled_from([16, 64, 200]), st.sampled_from(["window", "long"]))
def test_the_synthetic_share_is_met_to_within_one_document(corpus, tmp_path_factory, share, seq_len, lengths):
    if lengths == "long" and seq_len < 104:
        seq_len = 104  # the shortest long document (seq_len/8) must hold a needle
    folder = build(corpus, tmp_path_factory.mktemp("share") / "mix", seq_len, share, lengths=lengths)
    recipe, manifest = synthetic.recipe_of(folder), data.read_manifest(folder)
    corpus_tokens = data.read_manifest(corpus)["splits"]["train"]["tokens"]
    assert recipe["corpus_tokens"] == corpus_tokens
    assert manifest["splits"]["train"]["tokens"] == corpus_tokens + recipe["synthetic_tokens"]
    assert abs(recipe["synthetic_tokens"] - share / (1 - share) * corpus_tokens) <= seq_len
    assert abs(recipe["synthetic_share"] - share) <= seq_len / manifest["splits"]["train"]["tokens"]


def test_every_synthetic_document_fills_exactly_one_tokenloader_window(corpus, mix):
    seq_len = synthetic.recipe_of(mix)["seq_len"]
    loader = data.TokenLoader(mix, "train", seq_len, 1, mask_documents=True)
    batches = list(loader.validation_batches())  # every window, in stream order
    rows = np.stack([np.r_[b.inputs[0].numpy(), b.targets[0, -1].item()] for b in batches])  # (windows, T+1)
    doc_ids = np.stack([b.doc_ids[0].numpy() for b in batches])
    placed = placed_documents(corpus, mix)
    assert len(placed) > 100
    for kind, tokens, start in placed:
        assert start % seq_len == 0 and tokens.size == seq_len and tokens[-1] == EOS
        whole = np.flatnonzero((rows[:, :seq_len] == tokens).all(1)).tolist() + \
            np.flatnonzero((rows[:, 1:] == tokens).all(1)).tolist()
        assert whole == [start // seq_len]
        assert not doc_ids[start // seq_len].any()  # with --mask_documents, one document: all of its window


def test_corpus_text_fills_the_other_windows_in_order_and_documents_end_where_they_did(corpus, mix):
    stream, shards = train_stream(mix)
    placed = placed_documents(corpus, mix)
    synthetic_positions = np.zeros(stream.size, bool)
    for _, tokens, start in placed:
        synthetic_positions[start:start + tokens.size] = True
    assert np.array_equal(stream[~synthetic_positions], corpus_stream(corpus)[0])  # the corpus, unchanged
    starts = shards[0].doc_starts.astype(np.int64)
    assert set(start for _, _, start in placed) <= set(starts.tolist())  # a synthetic document is a document
    after_eos = np.flatnonzero(stream[:-1] == EOS) + 1
    assert set(after_eos.tolist()) <= set(starts.tolist()) and starts[0] == 0


def test_val_and_the_vocabulary_are_the_corpus_ones_unchanged(corpus, mix):
    source, mixed = data.read_manifest(corpus), data.read_manifest(mix)
    assert mixed["splits"]["val"] == source["splits"]["val"] and mixed["tokenizer"] == source["tokenizer"]
    for name in ("val_000000.bin", data.COMPACT_VOCAB_FILE):
        assert (mix / name).read_bytes() == (corpus / name).read_bytes()
    assert data_cli.verify(mix) == []


def test_the_manifest_records_the_recipe_and_a_plain_folder_none(corpus, mix):
    recipe = synthetic.recipe_of(mix)
    assert synthetic.recipe_of(corpus) is None
    assert {k: recipe[k] for k in ("share", "kinds", "seq_len", "ids", "seed", "lengths")} == {
        "share": 0.5, "kinds": ["copy", "mqar", "needle"], "seq_len": 64, "ids": {"first": 258, "size": 240},
        "seed": 0, "lengths": "window"}
    counts = recipe["documents"]
    assert sum(counts.values()) * 64 == recipe["synthetic_tokens"] and max(counts.values()) - min(counts.values()) <= 1
    assert recipe["corpus"]["folder"] == str(corpus)


def test_no_training_document_of_a_mix_holds_a_probe_key_where_a_key_goes(corpus, mix):
    stream, _ = train_stream(mix)
    haystack = corpus_stream(corpus)[0]
    haystack = haystack[haystack != EOS]
    pairs = 64 // synthetic.MQAR_TOKENS_PER_PAIR
    seen = dict.fromkeys(synthetic.DEFAULT_KINDS, 0)
    for index, (kind, tokens, start) in enumerate(placed_documents(corpus, mix)):
        document = stream[start:start + tokens.size]
        if kind == "needle":  # the question: query_mark k1 k2 value_mark v1 v2 EOS
            assert document[-7] == IDS.query_mark
            keys = [document[-6:-4]]
        elif kind == "mqar":
            keys = list(document[:3 * pairs].reshape(pairs, 3)[:, :2])
        else:  # the spans copy_document reports for this document's generator (a window's length takes no draw)
            again, spans = synthetic.copy_document(np.random.default_rng([0, index]), IDS, 63, haystack=haystack)
            assert np.array_equal(again, document[:-1])
            keys = [document[first:first + 2] for first, _, _ in spans]
        assert keys and not any(is_probe_key(int(a), int(b)) for a, b in keys)
        seen[kind] += 1
    assert min(seen.values()) > 50


def test_a_repeat_mix_holds_sequences_twice_with_training_heads_and_is_left_out_by_default(corpus, mix, tmp_path):
    repeats = build(corpus, tmp_path / "repeats", kinds=("repeat",))
    stream, _ = train_stream(repeats)
    documents = placed_documents(corpus, repeats)
    for kind, tokens, start in documents:
        body = stream[start:start + tokens.size - 1]  # the EOS last
        half, odd = body.size // 2, body.size % 2
        assert kind == "repeat" and np.array_equal(body[odd:odd + half], body[odd + half:])
        assert not is_probe_key(int(body[odd]), int(body[odd + 1]))
    assert len(documents) > 50
    assert synthetic.recipe_of(mix)["kinds"] == list(synthetic.DEFAULT_KINDS) == ["copy", "mqar", "needle"]


def test_a_mix_written_in_several_shards_holds_the_same_stream(corpus, mix, tmp_path):
    folder = build(corpus, tmp_path / "sharded", shard_tokens=5_000)
    manifest = data.read_manifest(folder)
    assert len(manifest["splits"]["train"]["shards"]) > 5
    assert np.array_equal(train_stream(folder)[0], train_stream(mix)[0])
    assert synthetic.recipe_of(folder) == synthetic.recipe_of(mix)


def test_the_long_layout_puts_whole_documents_of_t_over_8_to_t_tokens_between_whole_corpus_documents(corpus, tmp_path):
    seq_len = 256
    folder = build(corpus, tmp_path / "long", seq_len, 0.4, lengths="long")
    recipe = synthetic.recipe_of(folder)
    stream, shards = train_stream(folder)
    starts = shards[0].doc_starts.astype(np.int64)
    lengths = np.diff(np.append(starts, stream.size))
    placed = placed_documents(corpus, folder)
    by_start = dict(zip(starts.tolist(), lengths.tolist()))
    sizes = [tokens.size for _, tokens, _ in placed]
    assert min(sizes) >= seq_len / 8 and max(sizes) <= seq_len and max(sizes) - min(sizes) > seq_len / 2
    for _, tokens, start in placed:
        assert by_start[start] == tokens.size and np.array_equal(stream[start:start + tokens.size], tokens)
    corpus_lengths = corpus_stream(corpus)[1]
    synthetic_starts = {start for _, _, start in placed}
    assert [n for s, n in zip(starts, lengths) if s not in synthetic_starts] == corpus_lengths.tolist()
    loader = data.LongDocumentMix(folder, "train", seq_len, 2)
    whole = {(int(s), int(n)) for s, n in zip(loader.piece_start, loader.piece_length)}
    assert all((start, tokens.size) in whole for _, tokens, start in placed)  # one piece each
    assert 0 < recipe["long_document_mix_share"] < 1 and recipe["lengths"] == "long"


def test_an_interrupted_build_leaves_the_folder_as_it_was_and_the_next_starts_clean(corpus, mix, tmp_path,
                                                                                     monkeypatch):
    out = tmp_path / "mix"
    build(corpus, out, seed=1)
    before = file_bytes(out)
    writes = []

    def interrupted(*args, **kwargs):
        writes.append(args)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(data, "write_shard", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build(corpus, out)
    assert writes and file_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix"]  # nothing left aside
    build(corpus, out)
    assert file_bytes(out) == file_bytes(mix)


@pytest.mark.parametrize("options, problem", [
    (dict(share=0.0), "--share 0.0 must be strictly between 0 and 1"),
    (dict(share=1.0), "--share 1.0 must be strictly between 0 and 1"),
    (dict(ids=SyntheticIds(258, 1024)), r"reach beyond the 512 ids .* use --ids_size 254 or less"),
    (dict(ids=SyntheticIds(200, 100)), "include .* end-of-text or pad id 256.* --ids_first 258"),
    (dict(seq_len=12), "--seq_len 12 makes documents of 12 tokens, too short for needle .* --seq_len 13 or more"),
    (dict(seq_len=12, kinds=("copy", "mqar")), None),
    (dict(seq_len=96, lengths="long"), "shortest documents .* --seq_len 97 or more"),
    (dict(kinds=("copy", "recall")), "unknown: \\['recall'\\]"),
])
def test_bad_arguments_are_refused_in_one_line_naming_the_fix(corpus, tmp_path, options, problem):
    out = tmp_path / "mix"
    if problem is None:
        build(corpus, out, **options)
        return
    with pytest.raises(data.DataError, match=problem) as refused:
        build(corpus, out, **options)
    assert "\n" not in str(refused.value) and not out.exists()


def test_a_missing_corpus_a_mix_as_corpus_and_a_plain_folder_as_out_are_refused(corpus, mix, tmp_path):
    with pytest.raises(data.DataError, match="has no manifest.json"):
        build(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(data.DataError, match="is itself a synthetic mix"):
        build(mix, tmp_path / "out")
    with pytest.raises(data.DataError, match="is the corpus folder itself"):
        build(corpus, corpus)
    plain = write_corpus(tmp_path / "plain", [100, 200])
    with pytest.raises(data.DataError, match="not a synthetic mix"):
        build(corpus, plain)
    assert synthetic.recipe_of(plain) is None


def test_the_command_line_builds_a_mix_and_reports_errors_in_one_line(corpus, mix, tmp_path, capsys):
    out = tmp_path / "cli"
    data_cli.main(["synthetic", str(corpus), "--out", str(out), "--seq_len", "64", "--ids_first", "258", "--ids_size", "240",
                   "--quiet"])
    assert file_bytes(out) == file_bytes(mix)
    data_cli.main(["synthetic", str(corpus), "--out", str(tmp_path / "long"), "--seq_len", "128", "--share", "0.25",
                   "--kinds", "needle,mqar", "--ids_first", "300", "--ids_size", "100", "--seed", "3", "--long"])
    recipe = synthetic.recipe_of(tmp_path / "long")
    assert (recipe["kinds"], recipe["ids"], recipe["seed"], recipe["lengths"], recipe["share"]) == (
        ["needle", "mqar"], {"first": 300, "size": 100}, 3, "long", 0.25)
    assert "synthetic mix" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        data_cli.main(["synthetic", str(corpus), "--out", str(tmp_path / "bad"), "--seq_len", "64", "--ids_size", "10"])
    assert exit.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --ids_size 10: a synthetic id block needs first >= 0 and at least 27 ids; got "
        "first=502, size=10; e.g. --ids_size 1024"]


def test_the_help_names_every_flag_with_its_default():
    text = data_cli.build_parser().format_help()
    section = text[text.index("--- python data.py synthetic ---"):]
    options = {block.split()[0]: " ".join(block.split()) for block in re.split(r"\n  (?=-)", section)[1:]}
    for flag, default in [("--share", "0.5"), ("--kinds", "copy,mqar,needle"), ("--ids_first", "the vocabulary's last"),
                          ("--ids_size", "1024"), ("--seed", "0"), ("--long", "one window each")]:
        assert f"(default: {default}" in options[flag], options[flag]
    assert {"--out", "--seq_len", "--quiet"} <= set(options)


def test_train_py_trains_on_a_mix_with_documents_masked(corpus, tmp_path):
    folder = build(corpus, tmp_path / "mix32", seq_len=32, kinds=("copy", "mqar", "needle"))
    result = train.train(train.parse_args([*SMALL, "--seq_len", "32", "--data", str(folder), "--out",
                                           str(tmp_path / "run"), "--steps", "2", "--mask_documents"]))
    assert len(result["losses"]) == 2 and all(math.isfinite(loss) for loss in result["losses"].values())


def test_the_recipe_says_what_share_long_document_mix_serves(corpus, tmp_path):
    folder = build(corpus, tmp_path / "long", 256, 0.4, lengths="long")
    placed = {(start, tokens.size) for _, tokens, start in placed_documents(corpus, folder)}
    loader = data.LongDocumentMix(folder, "train", 256, 8)
    served = synthetic_served = 0
    for _ in range(400):  # some passes over the long pieces
        for row in loader.next_batch_segments():
            for piece, _, length in row:
                served += length
                synthetic_served += length * ((int(loader.piece_start[piece]), int(loader.piece_length[piece])) in placed)
    predicted = synthetic.recipe_of(folder)["long_document_mix_share"]
    assert abs(synthetic_served / served - predicted) < 0.02 and predicted < 0.4  # no synthetic document is short


def test_a_second_writer_of_the_mix_folder_is_refused_naming_the_first(corpus, tmp_path):
    out = tmp_path / "mix"
    holder = subprocess.Popen([sys.executable, "-c", "import files, sys, time; files.lock_folder(sys.argv[1], 'a test'); "
                               "print('locked', flush=True); time.sleep(60)", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(data.DataError, match=f"in use by process {holder.pid} \\(a test\\)"):
            build(corpus, out)
    finally:
        holder.kill()
        holder.wait()
    build(corpus, out)  # the kernel dropped the killed holder's lock
    assert synthetic.recipe_of(out)["seq_len"] == 64


def test_the_default_id_block_is_the_vocabularys_rarest_ids_below_its_specials(corpus, tmp_path):
    compact = {"vocab_size": 8192, "eos_id": 256, "pad_id": 257}  # ids ordered by frequency: the last are rarest
    assert synthetic.default_ids(compact) == SyntheticIds(7168, 1024)
    dolma2 = {"vocab_size": 100278, "eos_id": 100257, "pad_id": 100277}  # specials at the top: the block ends below
    assert synthetic.default_ids(dolma2) == SyntheticIds(100257 - 1024, 1024)
    assert synthetic.default_ids({"vocab_size": 512, "eos_id": 256, "pad_id": 257}, 240) == SyntheticIds(272, 240)
    data_cli.main(["synthetic", str(corpus), "--out", str(tmp_path / "default"), "--seq_len", "64", "--ids_size", "240",
                   "--quiet"])  # the test corpus's vocabulary: 512 ids, EOS and pad at 256 and 257
    assert synthetic.recipe_of(tmp_path / "default")["ids"] == {"first": 272, "size": 240}


def test_a_packed_window_holds_short_documents_each_ending_with_eos_and_masked_apart(corpus, tmp_path, capsys):
    folder = tmp_path / "packed"
    data_cli.main(["synthetic", str(corpus), "--out", str(folder), "--seq_len", "64", "--ids_first", "258",
                   "--ids_size", "240", "--packed", "16", "--quiet"])
    recipe = synthetic.recipe_of(folder)
    assert (recipe["lengths"], recipe["shortest"]) == ("packed", 16)
    loader = data.TokenLoader(folder, "train", 64, 1, mask_documents=True)
    batches = list(loader.validation_batches())
    rows = np.stack([np.r_[b.inputs[0].numpy(), b.targets[0, -1].item()] for b in batches])
    doc_ids = np.stack([b.doc_ids[0].numpy() for b in batches])
    placed = placed_documents(corpus, folder)
    assert len(placed) > 100
    sizes = []
    for kind, tokens, start in placed:
        window = start // 64
        assert start % 64 == 0 and tokens.size == 64 and np.array_equal(rows[window, :64], tokens)
        ends = np.flatnonzero(tokens == EOS)
        assert ends[-1] == 63  # the window ends with its last document
        lengths = np.diff(np.r_[-1, ends])
        sizes += lengths.tolist()
        assert lengths.min() >= 16  # no document shorter than --packed
        assert len(set(doc_ids[window].tolist())) == ends.size  # --mask_documents keeps them apart
    assert min(sizes) < 32 and max(sizes) > 32  # lengths spread over [16, 64]
    for flags, said in ((["--packed", "16", "--long"], "two layouts"), (["--packed", "8"], "--packed 13 or more")):
        with pytest.raises(SystemExit):
            data_cli.main(["synthetic", str(corpus), "--out", str(tmp_path / "bad"), "--seq_len", "64",
                           "--ids_first", "258", "--ids_size", "240", *flags])
        assert said in capsys.readouterr().err
