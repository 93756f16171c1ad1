"""evaluate.py: recall through decoding and scoring, LongPPL's key tokens, attention shares, and the same
scores for a checkpoint and its Hugging Face export (ruler.py's prompts and metrics: test_ruler.py).

Models are tiny random ones with the dolma2 vocabulary; lengths are a few hundred tokens."""

import json
import math

import pytest
import torch

import checkpoint
import compact_vocabulary
import data
import evaluate as ev
import hf_export
import ruler
from olmpool import ModelConfig, Transformer, masked_softmax_attention, visible
from test_ruler import solve  # the oracle that reads each task's answer out of its prompt


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return data.get_tokenizer()


def tiny_model(window=None, seed=0) -> Transformer:
    config = ModelConfig(vocab_size=100_352, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                         mlp_hidden=64, window=window, global_every=2, context_length=256, rope_theta=10_000.0)
    return Transformer(config, seed=seed).eval()


# ----------------------------------------------------------------------------------------------
# An oracle scores 100, a constant model 0, through the same decoding and scoring path


def oracle_generator(tokenizer, separator=" "):
    """The answers read out of the prompt, joined by `separator`, cut at the generation cap it is given."""
    def generate(prompts, max_new_tokens):
        out = []
        for row in prompts.tolist():
            prompt = tokenizer.decode(row[1:])
            task = next(t for t, test in ORACLE_TASK_OF.items() if test(prompt))
            answer = " " + separator.join(solve(task, prompt).split(" "))
            out.append(tokenizer.encode(answer)[:max_new_tokens] + [getattr(tokenizer, "eos_id", data.EOS_ID)])
        return out
    return generate


ORACLE_TASK_OF = {"niah_single_1": lambda p: "special magic" in p, "vt": lambda p: "VAR " in p,
                  "cwe": lambda p: "numbered list" in p, "fwe": lambda p: "coded text" in p,
                  "json_kv": lambda p: "JSON data" in p}


def test_oracle_scores_100_and_a_constant_model_scores_0(tokenizer):
    tasks = ["niah_single_1", "niah_multikey_3", "niah_multiquery", "vt", "cwe", "fwe", "json_kv"]
    oracle = ev.run_recall(oracle_generator(tokenizer), tokenizer, tasks, [1500], samples=3, seed=1, batch_size=2)
    at = tokenizer.encode("@")[0]
    constant = ev.run_recall(lambda prompts, n: [[at] * n for _ in range(len(prompts))], tokenizer, tasks, [1500],
                             samples=3, seed=1)
    for task in tasks:
        assert oracle[task]["1500"]["scores"] == [100.0] * 3, (task, oracle[task]["1500"]["predictions"])
        assert constant[task]["1500"]["mean"] == 0.0


@pytest.fixture(scope="module")
def compact_tokenizer(tokenizer):
    """The smallest compact vocabulary (512 ids) from the most frequent dolma2 tokens of pydoc's text: most of
    an answer is then spelled byte by byte, in up to 1.7x dolma2's tokens."""
    from collections import Counter
    from pydoc_data.topics import topics
    bytes_and_specials = {tokenizer.encoding.encode_single_token(bytes([b])) for b in range(256)}
    bytes_and_specials |= set(data.SPECIAL_TOKENS.values())
    counts = Counter(tokenizer.encode(" ".join(topics[name] for name in sorted(topics))))
    frequent = [i for i, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if i not in bytes_and_specials]
    return compact_vocabulary.CompactTokenizer(frequent[:512 - data.FIRST_FREQUENT_ID])


def test_an_oracle_cut_at_the_cap_scores_100_on_every_task_in_every_vocabulary(tokenizer, compact_tokenizer):
    # The answers listed with commas, as models list them. RULER's caps count dolma2-like tokens; vt's five names
    # so listed are 34 bytes, which the compact vocabulary spells in about as many tokens: past RULER's 30, so the
    # last name was cut.
    for vocabulary in (tokenizer, compact_tokenizer):
        cells = ev.run_recall(oracle_generator(vocabulary, separator=", "), vocabulary, list(ruler.TASKS), [2500],
                              samples=3, seed=2)
        for task in ruler.TASKS:
            assert cells[task]["2500"]["scores"] == [100.0] * 3, (vocabulary.name, task, cells[task]["2500"])
            assert cells[task]["2500"]["oracle"] == 100.0


def test_batched_greedy_decoding_equals_one_prompt_at_a_time(tokenizer):
    model = tiny_model()
    samples = ruler.build_samples("niah_single_1", 400, 3, 0, tokenizer, data.EOS_ID)
    for s in samples[1:]:
        s.tokens = s.tokens[:len(samples[0].tokens)]  # equal lengths, so they share one batch
    generate = ev.model_generator(model, data.EOS_ID)
    batched = ev.decode_batches(samples, generate, batch_size=3)
    single = ev.decode_batches(samples, generate, batch_size=1)
    assert batched == single


# ----------------------------------------------------------------------------------------------
# LongPPL: short-context losses and the key-token rule


def test_key_tokens_are_exactly_those_with_lsd_above_2_and_lcl_above_minus_2():
    nan = float("nan")
    #        position:  0    1    2    3    4    5    6    7     8    9
    full = torch.tensor([nan, 0.1, 0.1, 0.5, 0.5, 1.9, 2.0, 0.25, 1.0, 0.3])
    short = torch.tensor([nan, 9.0, 9.0, 2.5, 2.6, 4.0, 5.0, 2.25, 3.5, nan])
    # 1, 2: within the first short_context=3 tokens, never key. 3: LSD exactly 2, not above. 4: LSD 2.1 and
    # LCL -0.5: key. 5: LSD 2.1, LCL -1.9: key. 6: LCL exactly -2, not above. 7: LSD exactly 2. 8: LSD 2.5,
    # LCL -1: key. 9: no short-context loss.
    assert ev.select_key_tokens(full, short, short_context=3).tolist() == [4, 5, 8]


def test_short_context_loss_sees_only_its_blocks_window():
    model = tiny_model()
    tokens = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(3))
    C, step = 8, 4
    short = ev.short_context_losses(model, tokens, C, step)
    assert torch.isnan(short[:C]).all() and not torch.isnan(short[C:]).any()
    for p in (8, 11, 12, 27, 39):
        s = (p - C) // step * step  # the block's context starts here: between C and C + step - 1 tokens
        expected = ev.token_losses(model, tokens[s:p + 1])[-1]
        torch.testing.assert_close(short[p], expected)
    full = ev.token_losses(model, tokens)
    torch.testing.assert_close(short[C:12], ev.token_losses(model, tokens[:12])[C - 1:])  # block 0: context from 0
    assert full.shape == (39,)


# ----------------------------------------------------------------------------------------------
# Attention shares


def test_sink_local_and_saturation_shares_on_a_constructed_pattern():
    T, query = 200, 199
    rows = torch.zeros(3, 1, T)
    rows[0, 0, 0], rows[0, 0, 150] = 0.9, 0.1  # a sink head
    rows[1, 0] = 1 / T  # uniform
    rows[2, 0, 2], rows[2, 0, 98], rows[2, 0, 99], rows[2, 0, 199] = 0.25, 0.25, 0.25, 0.25
    torch.testing.assert_close(ev.sink_share(rows[:, 0], 1), torch.tensor([0.9, 0.005, 0.0]))
    torch.testing.assert_close(ev.sink_share(rows[:, 0], 4), torch.tensor([0.9, 0.02, 0.25]))
    torch.testing.assert_close(ev.sink_share(rows[:, 0], 100), torch.tensor([0.9, 0.5, 0.75]))
    # The 100 tokens before 199 are 99..198: the query itself (199) and 98 are outside.
    torch.testing.assert_close(ev.local_share(rows, [query])[:, 0], torch.tensor([0.1, 0.5, 0.25]))
    assert ev.saturated(rows[:, 0]).tolist() == [True, False, False]
    mass, uniform = ev.needle_mass(rows[:, 0], (150, 151), query)
    torch.testing.assert_close(mass, torch.tensor([0.1, 0.005, 0.0]))
    assert uniform == pytest.approx(1 / 200)


def test_attention_rows_match_reference_attention_and_respect_the_window():
    model = tiny_model(window=6)
    tokens = torch.randint(0, 1000, (1, 30), generator=torch.Generator().manual_seed(0))
    queries = [0, 7, 29]
    rows = ev.attention_rows(model, tokens, queries)
    positions = torch.arange(30)
    q, k, _ = model.layers[0].attention.qkv(model.embed(tokens), positions)  # post norm: the block input itself
    mask = visible(positions[:, None], positions[None, :], model.layers[0].attention.window)
    reference = masked_softmax_attention(q, k, torch.eye(30).expand(1, 2, 30, 30), mask)[0]  # (H, T, T)
    torch.testing.assert_close(rows[0], reference[:, queries], rtol=1e-5, atol=1e-6)
    for layer, layer_rows in zip(model.layers, rows):
        torch.testing.assert_close(layer_rows.sum(-1), torch.ones(4, 3))
        if layer.attention.window == 6:
            assert layer_rows[:, 2, :29 - 5].abs().max() == 0  # query 29 sees keys 24..29 only


def test_the_sink_query_sits_inside_the_window_so_windowed_layers_see_the_first_tokens():
    # The authors' query (position 4,000) sits inside their 4,096-token window; the last position of a
    # longer text would see only the window behind it, so a windowed layer's sink share would be 0 by construction.
    model = tiny_model(window=16)  # layer 0 windowed (16 keys), layer 1 global
    tokens = torch.randint(0, 1000, (65,), generator=torch.Generator().manual_seed(1))
    cell = ev.run_attention(model, [tokens])
    assert cell["query_position"] == 15  # the window's last position: it sees keys 0..15
    assert all(share > 0 for share in cell["per_layer"]["sink_first_1"])
    assert cell["per_layer"]["sink_first_100"][0] == pytest.approx(1.0)  # all it sees lies in the first 100
    fixed = ev.run_attention(model, [tokens], query=40)  # one position for every model of a grid
    assert fixed["query_position"] == 40 and fixed["per_layer"]["sink_first_1"][0] == 0.0
    assert ev.run_attention(tiny_model(), [tokens])["query_position"] == 64  # no window: the last position


# ----------------------------------------------------------------------------------------------
# End to end: our checkpoint and its Hugging Face export score the same; a rerun resumes


@pytest.fixture(scope="module")
def heldout_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heldout")
    from pydoc_data.topics import topics
    docs = [{"text": topics[name]} for name in sorted(topics)]
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    data.prepare([folder / "docs.jsonl"], folder / "prepared", val_fraction=0.5, progress=False)
    return folder / "prepared"


def test_checkpoint_and_its_hf_export_score_identically_and_rerun_resumes(tmp_path, heldout_folder, monkeypatch):
    model = tiny_model()
    ours = tmp_path / "ours"
    checkpoint.save_model(model, ours)
    hf_export.export_hf(model, tmp_path / "exported")
    kwargs = dict(lengths=[256, 512], tasks=["niah_single_1"], samples=2, seed=0, data_dir=heldout_folder,
                  short_context=64, short_step=32, windows=1, device="cpu", progress=False)
    results = ev.evaluate({"ours": str(ours), "exported": f"hf:{tmp_path / 'exported'}"}, out=tmp_path / "eval",
                          **kwargs)
    for L in ("256", "512"):
        a, b = results["recall"]["ours"][f"niah_single_1/{L}"], results["recall"]["exported"][f"niah_single_1/{L}"]
        assert a["n"] == 2 and a["predictions"] == b["predictions"] and a["scores"] == b["scores"]
        la, lb = results["longppl"]["ours"][L], results["longppl"]["exported"][L]
        assert la["loss"] == pytest.approx(lb["loss"], rel=1e-5) and la["key_tokens"] == lb["key_tokens"]
        assert results["attention"]["ours"][L]["per_layer"]["sink_first_1"] == pytest.approx(
            results["attention"]["exported"][L]["per_layer"]["sink_first_1"], rel=1e-4)
    for name in ("results.json", "results.md", "score_vs_length.png", "sink_per_layer.png", "loss_by_position.png"):
        assert (tmp_path / "eval" / name).is_file()
    assert "RULER-offline (1 of 13 tasks)" in (tmp_path / "eval" / "results.md").read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")
    monkeypatch.setattr(ruler, "build_samples", must_not_run)
    monkeypatch.setattr(ev, "run_losses", must_not_run)
    monkeypatch.setattr(ev, "run_attention", must_not_run)
    monkeypatch.setattr(ev, "find_key_tokens", must_not_run)
    again = ev.evaluate({"ours": str(ours), "exported": f"hf:{tmp_path / 'exported'}"}, out=tmp_path / "eval", **kwargs)
    assert again["recall"]["ours"] == results["recall"]["ours"]
    table = ev.before_after_table(again, ["ours", "exported"], [256, 512], ["niah_single_1"])
    assert "\n| ours |" in table and "\n| exported |" in table and "LongPPL @ 512" in table


def test_an_evaluator_outside_the_compared_models_picks_the_key_tokens_and_is_not_reported(tmp_path, heldout_folder):
    models = {name: tiny_model(seed=seed) for seed, name in enumerate(["a", "b", "outside"])}
    for name, model in models.items():
        checkpoint.save_model(model, tmp_path / name)
    kwargs = dict(lengths=[256], modes=("longppl",), data_dir=heldout_folder, short_context=64, short_step=32,
                  windows=2, device="cpu", progress=False)
    compared = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}
    results = ev.evaluate(compared, out=tmp_path / "eval", evaluator=str(tmp_path / "outside"), **kwargs)
    assert set(results["longppl"]) == {"a", "b"}  # the evaluator's own LongPPL is not among the compared
    texts = ev.heldout_documents(heldout_folder, 256, 2)
    assert results["key_tokens"]["256"]["positions"] == ev.find_key_tokens(models["outside"], texts, 64, 32)
    assert results["key_tokens"]["256"]["settings"]["evaluator"] == str(tmp_path / "outside")
    assert not any(c.get("evaluator_is_this_model") for cells in results["longppl"].values() for c in cells.values())
    inside = ev.evaluate(compared, out=tmp_path / "eval_inside", evaluator="a", **kwargs)
    assert inside["longppl"]["a"]["256"]["evaluator_is_this_model"] is True  # flagged: its LongPPL is biased
    assert "evaluator_is_this_model" not in inside["longppl"]["b"]["256"]
    with pytest.raises(ev.EvaluationError, match="neither one of the checkpoints' labels"):
        ev.evaluate(compared, out=tmp_path / "eval_none", evaluator=str(tmp_path / "missing"), **kwargs)


def test_longppl_weights_each_documents_log_longppl_by_its_key_tokens_as_the_official_code(monkeypatch):
    # PKU-ML/LongPPL perplexity.py: exp(sum n_d log LongPPL_d / sum n_d) over documents with key tokens.
    monkeypatch.setattr(ev, "token_losses", lambda model, text: text[1:].double())  # loss of token p: its value
    texts = [torch.tensor([0, 1, 1, 1]), torch.tensor([0, 3, 3, 3]), torch.tensor([0, 5, 5, 5])]
    result = ev.run_losses(None, texts, [[1], [1, 2, 3], []])  # LongPPL e^1 on 1 key token, e^3 on 3, none
    assert result["longppl"] == pytest.approx(math.exp((1 * 1 + 3 * 3) / 4)) and result["key_tokens"] == 4
    assert ev.longppl_over_documents([(math.e, 1), (math.e ** 3, 3)]) == pytest.approx(math.exp(2.5))
    assert ev.longppl_over_documents([]) is None


def test_held_out_documents_are_read_whole_from_their_start_and_never_run_into_the_next(tmp_path, tokenizer):
    documents = [text for i in range(8) for text in (f"A short note, number {i}.",
                                                      " ".join(f"w{i}x{j}" for j in range(60)))]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in documents))
    data.prepare([tmp_path / "docs.jsonl"], tmp_path / "prepared", val_fraction=0.5, progress=False)
    L = 64
    long_val = [t for t in documents if data.is_val_document(t, 0.5) and len(tokenizer.encode(t)) >= L]
    texts = ev.heldout_documents(tmp_path / "prepared", L, count=100)
    assert len(texts) == len(long_val) > 0
    for text, document in zip(texts, long_val):
        # the separator the models saw before every document, then the document's first L tokens
        assert text.tolist() == [data.EOS_ID] + tokenizer.encode(document)[:L]
    assert len(ev.heldout_documents(tmp_path / "prepared", L, count=1)) == 1
    with pytest.raises(data.DataError, match="--heldout windows"):
        ev.heldout_documents(tmp_path / "prepared", 10_000, 1)


def test_every_length_of_a_table_reads_the_same_documents(tmp_path, tokenizer):
    # Documents of 20 to 160 words: read at 64 tokens alone, short ones would be among them; read as part of
    # a table that goes to 256, each text at 64 is the first 64 tokens of a text at 256, so the difference
    # between the lengths is more context on the same text, not other text.
    documents = [" ".join(f"w{i}x{j}" for j in range(20 * (1 + i % 8))) for i in range(40)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in documents))
    data.prepare([tmp_path / "docs.jsonl"], tmp_path / "prepared", val_fraction=0.5, progress=False)
    folder = tmp_path / "prepared"
    alone = ev.heldout_documents(folder, 64, count=100)
    at_256 = ev.heldout_documents(folder, 256, count=100)
    at_64 = ev.heldout_documents(folder, 64, count=100, min_length=256)
    assert len(alone) > len(at_256) == len(at_64) > 0  # the shorter length alone reads other documents too
    assert [text.tolist() for text in at_64] == [text[:65].tolist() for text in at_256]  # EOS, then 64 tokens
    # the default: the longest length of the table that some val document reaches (10,000 none does)
    assert ev.longest_heldout_length(folder, [64, 256, 10_000], ["longppl"], "documents") == 256
    assert ev.longest_heldout_length(folder, [64, 256, 10_000], ["longppl"], "windows") == 10_000
    with pytest.raises(ev.EvaluationError, match="--heldout_min_length"):
        ev.arguments(["ckpt", "--heldout", "windows", "--heldout_min_length", "256"])


def test_per_length_means_and_the_effective_length_follow_ruler():
    means = {"a/4096": 90.0, "b/4096": 95.0, "a/8192": 80.0, "b/8192": 90.0, "a/16384": 88.0, "b/16384": 86.0}
    results = {"recall": {"m": {key: {"mean": value, "n": 2} for key, value in means.items()}}}
    summary = ev.recall_summary(results, "m", ["a", "b"], [4096, 8192, 16384])
    assert summary["per_length"] == {4096: 92.5, 8192: 85.0, 16384: 87.0}  # 85.0 is not above 85.6
    assert summary["mean"] == pytest.approx((92.5 + 85.0 + 87.0) / 3)
    assert summary["effective_length"] == 16384  # the longest length above 85.6


def test_confidence_interval_is_the_normal_approximation():
    mean, half_width = ev.mean_ci([0.0, 100.0, 100.0, 100.0])
    assert mean == 75.0 and half_width == pytest.approx(1.96 * 50.0 / 2)
    assert ev.mean_ci([100.0]) == (100.0, None)
