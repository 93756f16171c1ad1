"""probes.py: needle recall, MQAR accuracy and copy gain scored right on models whose answers are known (an
oracle, a uniform model, a copier), documents that are deterministic and hold probe keys only, and evaluate.py
running the probes on a mix folder, writing their cells and tables and resuming without recomputing."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

import checkpoint
import compact_vocabulary
import data
import evaluate as ev
import probes
import synthetic
from olmpool import ModelConfig, Transformer
from synthetic import SyntheticIds

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = SyntheticIds(600, 150)  # keys, values and filler of 49 ids each; 343 probe key pairs
VOCAB = IDS.first + IDS.size
EOS = 599
LENGTHS = probes.probe_lengths(64)  # 64, 128, 256, 512
CONFIDENCE = 30.0  # a stub's logit for the token it predicts: its loss is ~1e-10 nats when right, ~30 when wrong


def recipe_in_manifest(data_dir):
    """A stand-in for synthetic.recipe_of while the mix builder (synthetic.build_mix) is not on this branch: the
    manifest's "synthetic" record, or None."""
    return data.read_manifest(data_dir).get("synthetic")


@pytest.fixture(autouse=True)
def recipe_reader(monkeypatch):
    if not hasattr(synthetic, "recipe_of"):
        monkeypatch.setattr(synthetic, "recipe_of", recipe_in_manifest, raising=False)


@pytest.fixture(scope="module")
def haystack():
    """Text of ids below the synthetic block, so that no haystack token is a marker, key or value."""
    return np.random.default_rng(0).integers(0, IDS.first - 1, size=20_000)


class LogitStub(torch.nn.Module):
    """olmpool.Transformer's scoring surface (hidden_states, lm_head, parameters), whose hidden states are the
    logits themselves: logits_of(row (T,)) -> (T, VOCAB)."""

    def __init__(self, logits_of):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # parameters() names the device
        self.lm_head = torch.nn.Identity()
        self.logits_of = logits_of

    def hidden_states(self, tokens):
        return torch.stack([self.logits_of(row) for row in tokens])

    def forward(self, tokens):
        return self.lm_head(self.hidden_states(tokens))


def uniform_logits(row):
    return torch.zeros(len(row), VOCAB)


def oracle_logits(texts):
    """Knows the documents: at every position, all mass on the true next token of the text the row begins."""
    def logits_of(row):
        text = next(t for t in texts if torch.equal(t[:len(row)], row))
        logits = torch.zeros(len(row), VOCAB)
        logits[torch.arange(len(row)), text[1:len(row) + 1]] = CONFIDENCE
        return logits
    return logits_of


def copier_logits(row):
    """An induction head: at each position, the token that followed the latest earlier occurrence of the last two
    tokens, else of the last one; uniform where neither occurred."""
    tokens, logits = row.tolist(), torch.zeros(len(row), VOCAB)
    after_pair, after_one = {}, {}
    for p, token in enumerate(tokens):
        if p >= 1:
            after_one[tokens[p - 1]] = token
        if p >= 2:
            after_pair[(tokens[p - 2], tokens[p - 1])] = token
        guess = after_pair.get((tokens[p - 1], token)) if p >= 1 else None
        guess = after_one.get(token) if guess is None else guess
        if guess is not None:
            logits[p, guess] = CONFIDENCE
    return logits


def texts_of(documents):
    return [probes.with_separator(tokens, EOS)[0] for tokens, *_ in documents]


# ----------------------------------------------------------------------------------------------
# Scoring on models whose answers are known


def test_an_oracle_recalls_every_needle_and_mqar_value_and_a_uniform_model_scores_below_chance(haystack):
    L, n = 128, 6
    needles = texts_of(probes.needle_documents(IDS, L, n, 0, haystack))
    oracle = probes.needle_recall(LogitStub(oracle_logits(needles)), IDS, L, n, 0, haystack, EOS)
    assert oracle["recall"] == 100.0 and oracle["n"] == n and oracle["se"] == 0.0
    assert oracle["answer_log_prob"] == pytest.approx(0.0, abs=1e-6)
    mqars = texts_of(probes.mqar_documents(IDS, L, n, 0))
    answers = probes.mqar_accuracy(LogitStub(oracle_logits(mqars)), IDS, L, n, 0, EOS)
    assert answers["accuracy"] == 100.0 and answers["answers"] == n * probes.mqar_pairs(L, IDS)

    uniform = LogitStub(uniform_logits)  # argmax is id 0, never an answer: 0, below chance
    needle = probes.needle_recall(uniform, IDS, L, n, 0, haystack, EOS)
    assert needle["recall"] == 0.0 and needle["answer_log_prob"] == pytest.approx(-math.log(VOCAB))
    assert needle["chance"] == pytest.approx(100 / 49 ** 2) and needle["chance_per_token"] == pytest.approx(100 / 49)
    assert probes.mqar_accuracy(uniform, IDS, L, n, 0, EOS)["accuracy"] == 0.0
    copy = probes.copy_gain(uniform, IDS, L, n, 0, haystack, EOS)
    assert copy["gain"] == pytest.approx(0.0, abs=1e-6) and copy["first_loss"] == pytest.approx(math.log(VOCAB))


def test_a_copier_recalls_needles_and_mqar_values_and_gains_on_second_occurrences_at_every_length(haystack):
    copier = LogitStub(copier_logits)
    results = probes.run_probes(copier, IDS, LENGTHS, count=4, seed=1, haystack=haystack, eos_id=EOS)
    for L in map(str, LENGTHS):
        assert results["needle"][L]["recall"] == 100.0, L
        assert results["mqar"][L]["accuracy"] == 100.0, L
        assert results["copy"][L]["gain"] > 1.0, (L, results["copy"][L])  # the acceptance target, met by copying
    assert probes.copy_gain(LogitStub(uniform_logits), IDS, 64, 4, 1, haystack, EOS)["gain"] == pytest.approx(0, abs=1e-6)


def test_copy_gain_averages_each_spans_tokens_but_its_first_over_both_occurrences(monkeypatch, haystack):
    # The loss of text position i is i itself: the gain is then a difference of mean positions, known exactly.
    monkeypatch.setattr(ev, "token_losses", lambda model, text: torch.arange(1, len(text), dtype=torch.float64))
    for eos_id, shift in ((EOS, 1), (None, 0)):
        documents = probes.copy_documents(IDS, 128, 3, 2, haystack)
        expected = []
        for _, spans in documents:
            first = [start + shift + i for start, _, n in spans for i in range(1, n)]
            second = [start + shift + i for _, start, n in spans for i in range(1, n)]
            expected.append(np.mean(first) - np.mean(second))
        result = probes.copy_gain(None, IDS, 128, 3, 2, haystack, eos_id)
        assert result["gains"] == pytest.approx(expected) and result["gain"] == pytest.approx(np.mean(expected))


# ----------------------------------------------------------------------------------------------
# Documents: deterministic, probe keys only, sized to the length


def test_documents_are_a_function_of_seed_kind_length_and_index_and_scores_repeat(haystack):
    first = probes.needle_documents(IDS, 256, 4, 0, haystack)
    again = probes.needle_documents(IDS, 256, 2, 0, haystack)
    assert all(np.array_equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(first, again))  # a prefix of the count
    assert not np.array_equal(first[0][0], probes.needle_documents(IDS, 256, 1, 1, haystack)[0][0])  # another seed
    model = Transformer(ModelConfig(vocab_size=VOCAB, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, head_dim=8,
                                    mlp_hidden=32, context_length=64), seed=0).eval()
    once = probes.run_probes(model, IDS, [64, 128], count=3, seed=0, haystack=haystack, eos_id=EOS)
    assert probes.run_probes(model, IDS, [64, 128], count=3, seed=0, haystack=haystack, eos_id=EOS) == once


def test_every_probe_document_draws_probe_keys_only(haystack):
    for L in LENGTHS:
        for tokens, answers, _ in probes.needle_documents(IDS, L, 8, 0, haystack):
            question = answers[0] - synthetic.QUERY_LENGTH
            assert synthetic.is_probe_key(*tokens[question + 1:question + 3])
        for tokens, _ in probes.mqar_documents(IDS, L, 8, 0):
            keys = tokens[:3 * probes.mqar_pairs(L, IDS)].reshape(-1, 3)[:, :2]
            assert all(synthetic.is_probe_key(a, b) for a, b in keys)
        for tokens, spans in probes.copy_documents(IDS, L, 8, 0, haystack):
            assert all(synthetic.is_probe_key(*tokens[start:start + 2]) for start, _, _ in spans)


def test_mqar_pairs_scale_with_the_length_within_what_fits_and_the_probe_keys_there_are():
    assert [probes.mqar_pairs(L, IDS) for L in (32, 256, 2048)] == [4, 8, 64]
    assert probes.mqar_pairs(20, IDS) == 3  # 6 pairs' tokens + 1 must fit
    smallest = SyntheticIds(0, 27)  # 8 keys: 64 pairs, of which few are probe keys
    assert probes.mqar_pairs(4096, smallest) == probes.probe_key_pairs(smallest) < 64
    assert probes.probe_key_pairs(IDS) == sum(synthetic.is_probe_key(a, b) for a in range(*IDS.keys)
                                              for b in range(*IDS.keys))


def test_a_probe_that_cannot_run_says_why(haystack):
    uniform = LogitStub(uniform_logits)
    assert "haystack" in probes.run_probe("copy", uniform, IDS, 512, 2, 0, haystack[:100], EOS)["skipped"]
    assert "at least" in probes.run_probe("needle", uniform, IDS, 8, 2, 0, haystack, EOS)["skipped"]
    small = Transformer(ModelConfig(vocab_size=512, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, head_dim=8,
                                    mlp_hidden=32, context_length=64), seed=0)
    assert "vocabulary" in probes.run_probe("mqar", small, IDS, 64, 2, 0, haystack, EOS)["skipped"]


# ----------------------------------------------------------------------------------------------
# evaluate.py: the probes mode on a mix folder, its tables, and a rerun that recomputes nothing

L = 32
RECIPE = {"share": 0.5, "kinds": ["copy", "mqar", "needle"], "seq_len": L, "ids": {"first": 384, "size": 128},
          "seed": 0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A prepared folder of pydoc's help topics in a 512-id compact vocabulary, and its copy with a synthetic
    recipe in the manifest (a mix folder as synthetic.build_mix records it; its shards are the corpus's here)."""
    root = tmp_path_factory.mktemp("probe_data")
    from pydoc_data.topics import topics
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": topics[name]}) for name in sorted(topics)))
    data.prepare([root / "docs.jsonl"], root / "dolma2", val_fraction=0.5, progress=False)
    plain = compact_vocabulary.compact_folder(root / "dolma2", 512, root / "plain", progress=False)
    mix = root / "mix"
    shutil.copytree(plain, mix)
    manifest = json.loads((mix / data.MANIFEST).read_text())
    (mix / data.MANIFEST).write_text(json.dumps({**manifest, "synthetic": RECIPE}))
    return plain, mix


@pytest.fixture(scope="module")
def tiny_checkpoint(folders, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model = Transformer(ModelConfig(vocab_size=512, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                                    mlp_hidden=64, context_length=L), seed=0)
    checkpoint.save_model(model, folder)
    shutil.copy(folders[1] / data.COMPACT_VOCAB_FILE, folder / data.COMPACT_VOCAB_FILE)  # it reads the folder's ids
    return folder


def test_before_after_on_a_mix_reports_the_probes_at_L_to_8L_and_a_rerun_recomputes_nothing(
        folders, tiny_checkpoint, tmp_path, monkeypatch):
    _, mix = folders
    kwargs = dict(tasks=["niah_single_1"], samples=1, windows=1, device="cpu", progress=False, probe_count=4)
    table = ev.before_after({"pretrained": str(tiny_checkpoint)}, mix, L, tmp_path / "eval", **kwargs)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    for length in probes.probe_lengths(L):
        for kind, measure in (("needle", "recall"), ("mqar", "accuracy"), ("copy", "gain")):
            result = results["probes"]["pretrained"][f"{kind}/{length}"]
            assert result["n"] == 4 and measure in result and result["settings"]["ids"] == RECIPE["ids"]
    assert "| pretrained | needle recall % |" in table and "| pretrained | copy gain (nats) |" in table
    assert "| model | probe | 32 | 64 | 128 | 256 |" in table and f"loss @ {L} " in table
    assert "## Retrieval probes" in (tmp_path / "eval" / "results.md").read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished probe cell was recomputed")
    monkeypatch.setattr(probes, "run_probe", must_not_run)
    assert ev.before_after({"pretrained": str(tiny_checkpoint)}, mix, L, tmp_path / "eval", **kwargs) == table


def test_the_command_line_probes_a_mix_by_default_and_a_plain_folder_only_when_asked(folders, tiny_checkpoint,
                                                                                      tmp_path):
    plain, mix = folders
    base = [str(tiny_checkpoint), "--lengths", "32", "--device", "cpu"]
    found = ev.arguments([*base, "--data", str(mix)])
    assert found["modes"] == ["recall", "longppl", "attention", "probes"]
    assert found["probe_lengths"] == [32, 64, 128, 256] and found["probe_ids"] is None
    assert "probes" not in ev.arguments([*base, "--data", str(plain)])["modes"]
    asked = ev.arguments([*base, "--data", str(plain), "--modes", "probes", "--probe_ids", "384,128",
                          "--probe_lengths", "32,64", "--probe_count", "2"])
    results = ev.evaluate(**{**asked, "progress": False, "out": tmp_path / "eval"})
    assert set(results["probes"][str(tiny_checkpoint)]) == {f"{k}/{n}" for k in probes.PROBE_KINDS for n in (32, 64)}
    assert "needle recall %" in (tmp_path / "eval" / "results.md").read_text()
    with pytest.raises(ev.EvaluationError, match="--probe_ids FIRST,SIZE"):
        ev.evaluate(**{**ev.arguments([*base, "--data", str(plain), "--modes", "probes"]), "out": tmp_path / "other"})
    for wrong in ("384", "384,8"):  # not FIRST,SIZE; a block too small for markers, keys, values and filler
        with pytest.raises(ev.EvaluationError, match="--probe_ids"):
            ev.arguments([*base, "--data", str(plain), "--modes", "probes", "--probe_ids", wrong])


def test_probe_documents_leave_an_int64_haystack_as_it_was(haystack):
    # a document is written into the stretch of haystack it filled from: that stretch must be a copy
    before = haystack.copy()
    probes.needle_documents(IDS, 256, 4, 0, haystack)
    probes.copy_documents(IDS, 256, 4, 0, haystack)
    assert haystack.dtype == np.int64 and np.array_equal(haystack, before)
