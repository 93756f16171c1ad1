"""Tests for the compact vocabulary (data.py's "Compact vocabulary" and its use in train.py): lossless
round trips, a mapping reproducible from the training split alone, checkpoints that carry their
mapping and refuse data in another, generation that decodes to text, and bits per byte."""

import itertools
import json
import math
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without a conftest
import compact_vocabulary  # noqa: E402
import data  # noqa: E402
import olmpool  # noqa: E402
import train  # noqa: E402
from settings import COMPACT_VOCAB_BY_SIZE  # noqa: E402

VOCAB = 512  # the smallest compact vocabulary: most tokens of any text are then spelled as bytes
SMALL = ["--d_model", "32", "--n_layers", "2", "--n_heads", "4", "--head_dim", "8", "--mlp_hidden", "64",
         "--seq_len", "16", "--batch_tokens", "64", "--micro_batch", "2", "--eval_every", "0",
         "--log_every", "100", "--peak_flops", "1e12", "--threads", "1"]
STDLIB = Path(sysconfig.get_paths()["stdlib"])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dolma2_corpus(tmp_path_factory):
    """A dolma2 folder: the built-in corpus cut to 300K tokens (enough for a val split)."""
    return data.prepare_builtin_corpus(tmp_path_factory.mktemp("corpus") / "builtin", max_tokens=300_000, progress=False)


@pytest.fixture(scope="module")
def compact_corpus(dolma2_corpus):
    return compact_vocabulary.compact_folder(dolma2_corpus, VOCAB, progress=False)


@pytest.fixture(scope="module")
def tokenizer(compact_corpus):
    return compact_vocabulary.tokenizer_for(compact_corpus)


def documents_of(folder, split):
    """The token-id documents of a split, each with its EOS."""
    manifest = data.read_manifest(folder)
    documents = []
    for record in manifest["splits"][split]["shards"]:
        shard = data.read_shard(folder / record["file"], vocab_size=manifest["tokenizer"]["vocab_size"])
        ends = list(shard.doc_starts[1:]) + [shard.tokens.size]
        documents += [shard.tokens[start:end].tolist() for start, end in zip(shard.doc_starts, ends)]
    return documents


# -----------------------------------------------------------------------------
# The tokenizer

@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_compact_round_trip_is_the_identity_for_any_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(st.text(alphabet=st.characters(min_codepoint=0x370)), min_size=1, max_size=4))
def test_characters_the_corpus_never_saw_round_trip_as_bytes(tokenizer, texts):
    # Greek and beyond: next to nothing of it is in a 512-id table built from Python's own text.
    for text, ids in zip(texts, tokenizer.encode_batch(texts)):
        assert tokenizer.decode(ids) == text
        assert len(ids) >= len(tokenizer.base.encode(text))  # compact ids only ever split dolma2's


def test_both_tokenizers_offer_one_interface(tokenizer):
    dolma2 = data.get_tokenizer()
    assert (dolma2.vocab_size, dolma2.eos_id, dolma2.pad_id) == (data.VOCAB_SIZE, data.EOS_ID, data.PAD_ID)
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id) == (VOCAB, 256, 257)
    assert tokenizer.name == f"dolma2-compact-{VOCAB}"
    # A frequent token keeps one id; a byte is its own id; a special decodes to its name as in dolma2.
    assert tokenizer.encode(" the") == [int(tokenizer.from_dolma2[279])] and tokenizer.from_dolma2[279] >= 258
    assert tokenizer.encode("\x07") == [7]
    assert tokenizer.decode([tokenizer.eos_id]) == dolma2.decode([dolma2.eos_id]) == "<|endoftext|>"


def test_an_id_beyond_the_vocabulary_is_refused_naming_it(tokenizer):
    with pytest.raises(data.DataError, match=f"token id {VOCAB + 3} is outside the compact vocabulary of {VOCAB} ids"):
        tokenizer.decode([65, VOCAB + 3])


# -----------------------------------------------------------------------------
# Folders and the mapping

def test_a_compact_folder_holds_the_same_documents_as_its_dolma2_source(dolma2_corpus, compact_corpus, tokenizer):
    dolma2 = data.get_tokenizer()
    for split in ("train", "val"):
        source, compact = documents_of(dolma2_corpus, split), documents_of(compact_corpus, split)
        assert len(source) == len(compact) > 0
        for a, b in zip(source, compact):
            assert a[-1] == data.EOS_ID and b[-1] == tokenizer.eos_id and tokenizer.eos_id not in b[:-1]
            assert tokenizer.decode(b[:-1]) == dolma2.decode(a[:-1])
            assert b[:-1] == tokenizer.encode(dolma2.decode(a[:-1]))  # converting shards = encoding the text
    manifest = data.read_manifest(compact_corpus)
    assert manifest["tokenizer"]["mapping_sha256"] == tokenizer.mapping_sha256
    assert manifest["splits"]["train"]["tokens"] > data.read_manifest(dolma2_corpus)["splits"]["train"]["tokens"]


def test_mapping_and_coverage_are_reproducible_from_the_same_data(dolma2_corpus, compact_corpus, tmp_path):
    again = compact_vocabulary.compact_folder(dolma2_corpus, VOCAB, tmp_path / "again", progress=False)
    file = data.COMPACT_VOCAB_FILE
    assert (again / file).read_bytes() == (compact_corpus / file).read_bytes()
    shards = lambda folder: [s["sha256"] for s in data.read_manifest(folder)["splits"]["train"]["shards"]]
    assert shards(again) == shards(compact_corpus)
    # The coverage it states, recounted here: dolma2 train tokens (EOS aside) kept as one compact id.
    vocab = json.loads((again / file).read_text())
    tokens = np.concatenate([np.array(d[:-1]) for d in documents_of(dolma2_corpus, "train")])
    dolma2 = data.get_tokenizer()
    kept = np.isin(tokens, vocab["dolma2_ids"]) | (dolma2.byte_lengths[tokens] == 1)
    assert vocab["train_coverage"] == pytest.approx(kept.mean(), abs=1e-12)
    assert vocab["vocab_size"] == VOCAB


def test_the_table_ranks_train_ids_by_frequency_and_ignores_val(tmp_path):
    dolma2 = data.get_tokenizer()
    words = [dolma2.encode(w)[0] for w in (" alpha", " beta", " gamma", " delta")]
    assert all(dolma2.byte_lengths[w] > 1 for w in words)
    folder = tmp_path / "tokens"
    folder.mkdir()
    train_split, val_split = data.ShardWriter(folder, "train", 10**9), data.ShardWriter(folder, "val", 10**9)
    train_split.add_document([words[0]] * 5 + [words[1]] * 9 + [words[2]] * 5)  # beta, then alpha = gamma by id
    val_split.add_document([words[3]] * 100)  # frequent in val only: not in the table
    data.write_manifest(folder, {"train": train_split.close(), "val": val_split.close()})
    vocab = compact_vocabulary.build_compact_vocab(folder, VOCAB)
    assert vocab["dolma2_ids"] == [words[1], *sorted([words[0], words[2]])]
    assert vocab["vocab_size"] == 258 + 3  # a corpus with few distinct ids gives a smaller vocabulary
    assert vocab["train_coverage"] == 1.0


def test_a_damaged_or_missing_vocabulary_file_is_refused_naming_it(dolma2_corpus, tmp_path):
    folder = compact_vocabulary.compact_folder(dolma2_corpus, VOCAB, tmp_path / "damaged", progress=False)
    path = folder / data.COMPACT_VOCAB_FILE
    vocab = json.loads(path.read_text())
    vocab["dolma2_ids"][0], vocab["dolma2_ids"][1] = vocab["dolma2_ids"][1], vocab["dolma2_ids"][0]
    path.write_text(json.dumps(vocab))
    with pytest.raises(data.DataError, match=f"{path} is damaged"):
        data.TokenLoader(folder, "train", 16, 2)
    path.unlink()
    with pytest.raises(data.DataError, match=f"compact vocabulary {path}, which is missing"):
        data.read_manifest(folder)


def test_too_small_a_vocabulary_is_refused_with_the_minimum(dolma2_corpus, tmp_path):
    with pytest.raises(data.DataError, match="use at least 512"):
        compact_vocabulary.compact_folder(dolma2_corpus, 300, tmp_path / "small", progress=False)


def test_the_loader_masks_documents_at_the_compact_eos(compact_corpus, tokenizer):
    loader = data.TokenLoader(compact_corpus, "train", 64, 8, mask_documents=True)
    documents_ended = 0
    for batch in itertools.islice(loader.validation_batches(), 20):  # stream order: pydoc's short topics come first
        ends = (batch.inputs == tokenizer.eos_id).int()
        expected = torch.zeros_like(ends)
        expected[:, 1:] = ends[:, :-1].cumsum(1)
        assert torch.equal(batch.doc_ids, expected)
        documents_ended += int(ends.sum())
    assert documents_ended > 0


# -----------------------------------------------------------------------------
# train.py: the default, checkpoints, the refusal, generation, bits per byte

def test_the_tiny_default_trains_on_a_compact_vocabulary_and_published_sizes_on_dolma2(dolma2_corpus):
    config = lambda *flags: train.model_config(train.parse_args(list(flags)))
    assert config().vocab_size == 8192 == COMPACT_VOCAB_BY_SIZE["tiny"]
    assert config("--size", "20m").vocab_size == config("--compact_vocab", "0").vocab_size == 100_352
    assert config("--data", str(dolma2_corpus)).vocab_size == 100_352  # a folder keeps its own vocabulary
    assert config("--compact_vocab", "1000").vocab_size == 1024  # padded to a multiple of 128
    assert "--compact_vocab" in train.build_parser().format_help()


@pytest.fixture(scope="module")
def checkpoint(compact_corpus, tmp_path_factory):
    """Two steps of the small model on the compact corpus."""
    out = tmp_path_factory.mktemp("compact_run")
    return train.train(train.parse_args([*SMALL, "--data", str(compact_corpus), "--out", str(out), "--steps", "2"]))


@pytest.fixture(scope="module")
def other_mapping(tmp_path_factory):
    """Same vocabulary size, another corpus (email's sources), so another mapping."""
    folder = tmp_path_factory.mktemp("email") / "email"
    compact_vocabulary.prepare([str(STDLIB / "email" / "*.py")], folder, val_fraction=0.2, progress=False, compact_vocab=VOCAB)
    return folder


def test_a_checkpoint_carries_the_datas_mapping(checkpoint, compact_corpus):
    folder = checkpoint["checkpoint"]
    assert (folder / data.COMPACT_VOCAB_FILE).read_bytes() == (compact_corpus / data.COMPACT_VOCAB_FILE).read_bytes()
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == VOCAB
    assert compact_vocabulary.tokenizer_for(folder).mapping_sha256 == compact_vocabulary.tokenizer_for(compact_corpus).mapping_sha256


def test_a_checkpoint_trained_with_one_mapping_refuses_data_prepared_with_another(checkpoint, other_mapping,
                                                                                  dolma2_corpus, tmp_path):
    folder = checkpoint["checkpoint"]
    assert data.read_manifest(other_mapping)["tokenizer"]["vocab_size"] == VOCAB  # the architecture alone would pass
    ours, theirs = folder / data.COMPACT_VOCAB_FILE, other_mapping / data.COMPACT_VOCAB_FILE
    for flags in (["--init_from", str(folder), "--out", str(tmp_path / "init")],   # its weights
                  ["--out", str(checkpoint["out"])]):                              # resuming it
        with pytest.raises(data.DataError) as error:
            train.train(train.parse_args([*SMALL, "--data", str(other_mapping), "--steps", "3", *flags]))
        assert str(ours) in str(error.value) and str(theirs) in str(error.value), error.value
    with pytest.raises(data.DataError, match=f"dolma2 \\(no {data.COMPACT_VOCAB_FILE} in {dolma2_corpus}\\)"):
        compact_vocabulary.check_same_vocabulary(folder, dolma2_corpus)


def test_compact_vocab_flag_and_a_folder_of_another_vocabulary_are_refused(compact_corpus):
    with pytest.raises(data.DataError, match=f"--compact_vocab 0 asks for dolma2, but {compact_corpus} holds"):
        compact_vocabulary.folder_in_vocab(compact_corpus, 0)
    with pytest.raises(data.DataError, match=f"pass --compact_vocab {VOCAB}"):
        compact_vocabulary.folder_in_vocab(compact_corpus, 1024)
    assert compact_vocabulary.folder_in_vocab(compact_corpus, VOCAB) == compact_corpus


def test_generation_through_a_compact_vocab_model_decodes_to_valid_text(checkpoint):
    from safetensors.torch import load_file

    folder = checkpoint["checkpoint"]
    model = olmpool.Transformer(olmpool.ModelConfig(**json.loads((folder / "config.json").read_text())), seed=None)
    model.load_state_dict(load_file(folder / "model.safetensors"))
    tokenizer = compact_vocabulary.tokenizer_for(folder)
    prompt = "def naïve(x):"
    generated = olmpool.generate(model.eval(), torch.tensor([tokenizer.encode(prompt)]), max_new_tokens=40,
                                 temperature=1.0, generator=torch.Generator().manual_seed(0))[0].tolist()
    assert len(generated) == 40 and max(generated) < tokenizer.vocab_size
    text = tokenizer.decode(tokenizer.encode(prompt) + generated)
    assert text.startswith(prompt)
    text.encode("utf-8")  # a str with no lone surrogates: valid text (stray bytes became U+FFFD)
    assert tokenizer.decode(tokenizer.encode(text)) == text


class UniformModel(torch.nn.Module):
    """Equal logits over V ids: the cross-entropy of every target is exactly ln V."""

    def __init__(self, vocab_size):
        super().__init__()
        self.lm_head = torch.nn.Linear(1, vocab_size, bias=False)
        torch.nn.init.zeros_(self.lm_head.weight)

    def forward(self, inputs, doc_ids=None, targets=None, loss_chunk=None):  # olmpool.Transformer's signature
        logits = self.lm_head(torch.zeros(*inputs.shape, 1))
        return logits if targets is None else torch.stack(olmpool.loss_sums(logits, targets, loss_chunk))


def test_bits_per_byte_is_nats_per_token_times_tokens_over_bytes_over_ln2(tmp_path):
    # By hand: 6 tokens at 2 nats each over 4 bytes of text = 12 nats / 4 bytes = 3 nats/byte.
    assert compact_vocabulary.bits_per_byte(12.0, 4) == pytest.approx(3 / math.log(2))
    # Through train.py's evaluation: ASCII val text, so that the bytes of any run of targets are the
    # length of their decoded text (EOS stands for no text).
    dolma2 = data.get_tokenizer()
    folder = tmp_path / "hand"
    folder.mkdir()
    splits = {split: data.ShardWriter(folder, split, 10**9) for split in ("train", "val")}
    for i in range(20):
        splits["train"].add_document(dolma2.encode(f"def f{i}(x):\n    return x * {i}\n"))
        splits["val"].add_document(dolma2.encode(f"The zebra number {i} quietly jumped."))
    data.write_manifest(folder, {split: writer.close() for split, writer in splits.items()})
    compact = compact_vocabulary.compact_folder(folder, VOCAB, progress=False)
    tokenizer = compact_vocabulary.tokenizer_for(compact)
    args = train.parse_args([*SMALL, "--data", str(compact), "--eval_batches", "2"])
    plan = train.BatchPlan(seq_len=16, sequences=4, micro_batch=2, accumulation=2)
    loader = data.TokenLoader(compact, "val", 16, 4)
    losses = train.evaluate_losses(UniformModel(VOCAB), loader, plan, train.Distributed(), args.eval_batches)
    tokens = 2 * plan.tokens
    stream = torch.cat([batch.targets.reshape(-1) for batch in loader.validation_batches(2)]).tolist()  # what it read
    assert len(stream) == tokens
    text_bytes = len(tokenizer.decode([t for t in stream if t != tokenizer.eos_id]).encode("utf-8"))
    assert losses["val_loss"] == pytest.approx(math.log(VOCAB), rel=1e-6)  # logsumexp in fp32
    assert losses["val_bits_per_byte"] == pytest.approx(losses["val_loss"] * tokens / text_bytes / math.log(2), rel=1e-9)
