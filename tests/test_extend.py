"""Tests for extend.py and what it adds to train.py and data.py: each recipe's RoPE at hand-checked
frequencies, weights carried unchanged, the long-document mix's proportions and resume, FSDP2's
meta-device init on 2 processes, export to transformers, and a short extension on CPU. (The
chunked cross-entropy is tested in test_model.py, the memory plan in test_memory.py.)
"""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import compact_vocabulary  # noqa: E402
import data  # noqa: E402
import extend  # noqa: E402
import hf_export  # noqa: E402
import olmpool  # noqa: E402
import train  # noqa: E402
from olmpool import ModelConfig, Transformer, rope_frequencies  # noqa: E402

# A small pretraining run: dolma2's vocabulary, 2 layers (one windowed, one global), context L = 32.
L = 32
PRETRAIN = ["--d_model", "32", "--n_layers", "2", "--n_heads", "4", "--head_dim", "8", "--mlp_hidden", "64",
            "--window", "8", "--global_every", "2", "--context_length", str(L), "--batch_tokens", str(8 * L),
            "--micro_batch", "4", "--eval_every", "0", "--log_every", "1000", "--peak_flops", "1e12", "--threads", "1"]
# Its extension to 4L: 2 sequences per step, one per micro-batch.
EXTEND = ["--seq_len", str(4 * L), "--batch_tokens", str(2 * 4 * L), "--micro_batch", "1", "--eval_every", "0",
          "--log_every", "1000", "--peak_flops", "1e12", "--threads", "1", "--held_out_documents", "8"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The built-in corpus's first 300K tokens, with a tenth of the documents held out (not the
    built-in 2%), so that several val documents reach 4L tokens."""
    import sysconfig
    out, sources = tmp_path_factory.mktemp("corpus"), []
    documents = data.builtin_documents(Path(sysconfig.get_paths()["stdlib"]), sources)
    data.write_corpus(documents, out, 0.1, data.DEFAULT_SHARD_TOKENS, sources, total_bytes=1, max_tokens=300_000,
                      progress=False)
    return out


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    summary = train.train(train.parse_args([*PRETRAIN, "--data", str(corpus), "--out", str(out), "--steps", "40",
                                            "--lr", "1e-2"]))
    return summary["checkpoint"]


def run_extension(corpus, source, out, *flags):
    return extend.extend(extend.parse_args([*EXTEND, "--data", str(corpus), "--from", str(source), "--out", str(out),
                                            *flags]))


def source_config(**overrides):
    return ModelConfig(**(dict(vocab_size=128, n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                                mlp_hidden=64, window=8, context_length=L) | overrides))


# ----------------------------------------------------------------------------------------------
# Recipes: RoPE at hand-checked frequencies, and nothing else changed


def test_every_recipe_changes_only_rope_and_length():
    source = source_config()
    for recipe in extend.RECIPES:
        extended = extend.extended_config(source, recipe, 4 * L)
        changed = {k for k, v in dataclasses.asdict(extended).items() if v != getattr(source, k)}
        assert changed <= {"context_length", *extend.ROPE_FIELDS}, recipe
        assert extended.context_length == 4 * L
    assert extend.extended_config(source, "none", 4 * L) == dataclasses.replace(source, context_length=4 * L)


@pytest.mark.parametrize("recipe", list(extend.RECIPES))
def test_a_recipe_with_factor_one_gives_exactly_the_original_logits(recipe):
    source = Transformer(source_config(), seed=3)
    extended = Transformer(extend.extended_config(source.config, recipe, 4 * L, rope_factor=1.0), seed=None)
    extended.load_state_dict(source.state_dict())
    tokens = torch.randint(0, 128, (2, 4 * L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(source(tokens), extended(tokens))


def test_abf_to_8m_multiplies_theta_by_16_on_every_layer_or_only_global_ones():
    source = ModelConfig(window=4096)  # the 7B shape: theta 500,000, head_dim 128
    original = rope_frequencies(source, True)[0]
    for recipe, windowed_changes in (("olmpool", True), ("olmpool_global", False)):
        config = extend.extended_config(source, recipe, 65536)
        assert config.rope_factor == 16.0
        for is_global in (True, False):
            inv_freq, attention_factor = rope_frequencies(config, is_global)
            assert attention_factor == 1.0
            if is_global or windowed_changes:
                # by hand: pair i turns at theta^(-2i/128); theta x16 divides it by 16^(2i/128)
                assert inv_freq[0].item() == 1.0
                assert inv_freq[32].item() == pytest.approx(1 / math.sqrt(8e6), rel=1e-6)  # 3.5355e-4
                assert (original[32] / inv_freq[32]).item() == pytest.approx(4.0, rel=1e-6)  # 16^(1/2)
                assert (original[63] / inv_freq[63]).item() == pytest.approx(16 ** (126 / 128), rel=1e-5)
            else:
                assert torch.equal(inv_freq, original)


def test_yarn_x8_keeps_fast_frequencies_divides_slow_ones_and_scales_attention_by_1_2079():
    source = ModelConfig(window=4096)
    config = extend.extended_config(source, "olmo3", 65536)
    assert (config.rope_factor, config.yarn_beta_fast, config.yarn_beta_slow, config.original_context) == (8, 32, 1, 8192)
    original = rope_frequencies(source, True)[0]
    inv_freq, attention_factor = rope_frequencies(config, True)
    assert attention_factor == pytest.approx(0.1 * math.log(8) + 1) and round(attention_factor, 4) == 1.2079
    # By hand: pair i turns 8192 * theta^(-2i/128) / (2 pi) times in the original context; 32 turns
    # at i = 18.08, 1 turn at i = 34.98. Below 18 kept, from 35 on divided by 8, a ramp between.
    for i in (0, 10, 17):
        assert inv_freq[i] == original[i]
    for i in (35, 50, 63):
        assert inv_freq[i].item() == pytest.approx(original[i].item() / 8, rel=1e-6)
    assert original[26] / 8 < inv_freq[26] < original[26]
    windowed, factor = rope_frequencies(config, False)
    assert torch.equal(windowed, original) and factor == 1.0  # global-only scope: sliding layers untouched


def test_an_already_extended_source_and_an_unknown_recipe_are_refused_naming_the_fix():
    with pytest.raises(train.TrainError, match="pretraining checkpoint"):
        extend.extended_config(source_config(rope_scaling="yarn", rope_factor=8.0), "olmpool", 4 * L)
    with pytest.raises(train.TrainError, match="choose from olmpool"):
        extend.extended_config(source_config(), "abf", 4 * L)


def resolved_from(source: ModelConfig, *flags) -> ModelConfig:
    """The extended config extend.py makes from `source` with these flags (no checkpoint read)."""
    return extend.resolve(extend.parse_args([*EXTEND, *flags]), source, {}, "cpu")[1]


def test_abf_can_be_a_factor_of_the_sources_theta_so_a_10k_model_gets_olmpools_x16_not_x800():
    small_base = source_config(rope_theta=10_000.0)
    by_factor = resolved_from(small_base, "--rope_factor", "16")
    assert (by_factor.rope_scaling, by_factor.rope_factor, by_factor.rope_scaling_layers) == ("abf", 16.0, "all")
    inv_freq = rope_frequencies(by_factor, True)[0]  # pair i turns at (10K x 16)^(-2i/8)
    assert inv_freq[2].item() == pytest.approx(160_000.0 ** (-4 / 8), rel=1e-6)
    assert resolved_from(small_base).rope_factor == 800.0  # no flag: the recipe's absolute 8e6, as before
    assert resolved_from(small_base, "--rope_theta_target", "160000").rope_factor == 16.0
    assert resolved_from(source_config(), "--recipe", "olmo3", "--rope_factor", "4").rope_factor == 4.0  # YaRN
    olmpool_source = source_config(rope_theta=500_000.0)  # OlmPool's own: 500K -> 8M, x16, with or without it
    assert resolved_from(olmpool_source) == resolved_from(olmpool_source, "--rope_factor", "16")


def test_a_target_and_a_factor_together_or_a_factor_on_the_control_are_refused_in_one_line(capsys):
    for flags, said in ((["--rope_factor", "16", "--rope_theta_target", "8e6"], "--rope_theta_target 8e+06 and "
                         "--rope_factor 16 both set the ABF base"),
                        (["--recipe", "none", "--rope_factor", "16"], "the control keeps RoPE unchanged")):
        with pytest.raises(SystemExit):
            extend.parse_args([*EXTEND, *flags])
        assert said in capsys.readouterr().err.splitlines()[-1]
    both = dataclasses.replace(extend.parse_args(EXTEND), rope_theta_target=8e6, model={"rope_factor": 16.0})
    with pytest.raises(train.TrainError, match="give one of them"):  # settings made in code are checked too
        extend.resolve(both, source_config(), {}, "cpu")


def test_the_plan_states_the_abf_factor_the_base_it_gives_and_the_flag_that_set_it(capsys):
    def plan(*flags) -> str:
        extend.extend(extend.parse_args(["--dry_run", "--size", "tiny", "--gpus", "1", *flags]))
        return capsys.readouterr().out
    assert "RoPE: ABF: theta 500000 -> 8e+06 (x16) on every layer\n" in plan()  # today's line, unchanged
    assert "RoPE: ABF: theta 10000 -> 160000 (x16, --rope_factor) on every layer" in plan(
        "--rope_theta", "10000", "--rope_factor", "16")
    unscaled = plan("--rope_theta", "10000")
    assert "theta 10000 -> 8e+06 (x800) on every layer" in unscaled
    assert "OlmPool's ABF is x16 (500K -> 8M): --rope_factor 16 keeps that ratio" in unscaled


# ----------------------------------------------------------------------------------------------
# The long-document mix

T = 64
BUCKET_TOKEN = {0: 11, 1: 22, 2: 33}  # every token of a document says its bucket (long, medium, short)


@pytest.fixture(scope="module")
def bucket_corpus(tmp_path_factory):
    """Documents of known lengths, each made of its bucket's token: long 32-64 (and 64-192, cut into
    pieces), medium 8-31, short 2-7 (lengths include the EOS)."""
    out = tmp_path_factory.mktemp("buckets")
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 120), ("val", 30)):
        writer = data.ShardWriter(out, split, shard_tokens=2000)
        for i in range(n):
            kind = i % 3
            length = int(rng.integers(*{0: (32, 65), 1: (8, 32), 2: (2, 8)}[kind]))
            writer.add_document([BUCKET_TOKEN[kind]] * (length - 1))
        writer.add_document([BUCKET_TOKEN[0]] * (3 * T - 1))  # a 3T document: three long pieces
        splits[split] = writer.close()
    data.write_manifest(out, splits)
    return out


def test_the_mix_serves_half_long_a_sixth_medium_a_third_short_within_two_percent(bucket_corpus):
    mix = data.LongDocumentMix(bucket_corpus, "train", T, global_batch_size=4, seed=1)
    assert [ids.size for ids in mix.bucket_pieces][0] >= 40  # the 3T document counts three long pieces
    counts = {kind: 0 for kind in BUCKET_TOKEN}
    kind_of = {token: kind for kind, token in BUCKET_TOKEN.items()}
    for _ in range(100):  # 25,600 tokens: the short bucket (~200 tokens) repeats many times
        batch = mix.next_batch()
        assert batch.doc_ids is not None and batch.inputs.shape == (4, T)
        for row, ids in zip(batch.inputs.tolist(), batch.doc_ids.tolist()):
            for doc in set(ids):  # a piece (or its part in this row): its tokens say its bucket
                tokens = [t for t, i in zip(row, ids) if i == doc]
                kinds = {kind_of[t] for t in tokens if t != data.EOS_ID}
                if kinds:  # a lone EOS that ends a piece begun in the row before: at most one per row
                    counts[kinds.pop()] += len(tokens)
    total = sum(counts.values())
    shares = [counts[k] / total for k in (0, 1, 2)]
    # Tolerance: the shares hold to within one piece (<= 64 tokens) at any point, and a row's first
    # token (the previous row's last) counts twice: 2% of 25,600 tokens is ample.
    assert shares[0] == pytest.approx(0.5, abs=0.02) and shares[1] == pytest.approx(1 / 6, abs=0.02)
    assert shares[2] == pytest.approx(1 / 3, abs=0.02)
    assert "repeated" in data.LongDocumentMix(bucket_corpus, "train", T, 4, planned_tokens=100 * 4 * T).describe()


def test_the_mix_masks_each_piece_and_rows_continue_one_another(bucket_corpus):
    mix = data.LongDocumentMix(bucket_corpus, "train", T, global_batch_size=2, seed=0)
    first, second = mix.next_batch(), mix.next_batch()
    for batch in (first, second):
        row, ids = batch.inputs[0], batch.doc_ids[0]
        # a new doc_id exactly where the previous token was an EOS or a piece boundary
        assert (torch.diff(ids) >= 0).all() and (torch.diff(ids) <= 1).all()
        eos_before = torch.nonzero(row[:-1] == data.EOS_ID).flatten() + 1
        assert all(ids[p] == ids[p - 1] + 1 for p in eos_before.tolist())
    assert torch.equal(first.targets[1, -1], second.inputs[0, 0])  # rows overlap by one token, as in TokenLoader


def test_the_mix_resumes_to_the_piece_and_never_depends_on_the_world_size(bucket_corpus):
    whole = data.LongDocumentMix(bucket_corpus, "train", T, global_batch_size=4, seed=5)
    batches = [whole.next_batch() for _ in range(12)]
    resumed = data.LongDocumentMix(bucket_corpus, "train", T, global_batch_size=4, seed=5)
    for _ in range(5):
        resumed.next_batch()
    state = json.loads(json.dumps(resumed.state_dict()))  # through train_state.json
    fresh = data.LongDocumentMix(bucket_corpus, "train", T, global_batch_size=4, seed=5)
    fresh.load_state_dict(state)
    assert state["piece"] is not None  # mid-document: the piece and the offset within it
    for expected in batches[5:]:
        got = fresh.next_batch()
        assert torch.equal(got.inputs, expected.inputs) and torch.equal(got.doc_ids, expected.doc_ids)
    rank1 = data.LongDocumentMix(bucket_corpus, "train", T, global_batch_size=4, rank=1, world_size=2, seed=5)
    assert torch.equal(rank1.next_batch().inputs, batches[0].inputs[1::2])
    other_seed = data.LongDocumentMix(bucket_corpus, "train", T, global_batch_size=4, seed=6)
    assert not torch.equal(other_seed.next_batch().inputs, batches[0].inputs)
    with pytest.raises(data.DataError, match="seq_len"):
        data.LongDocumentMix(bucket_corpus, "train", 2 * T, global_batch_size=4, seed=5).load_state_dict(state)


def test_a_corpus_without_long_documents_is_refused_naming_data_py_prepare(tmp_path):
    writer = data.ShardWriter(tmp_path, "train", shard_tokens=1000)
    for _ in range(20):
        writer.add_document([5, 6, 7])
    data.write_manifest(tmp_path, {"train": writer.close()})
    with pytest.raises(data.DataError, match="data.py prepare"):
        data.LongDocumentMix(tmp_path, "train", 1024, global_batch_size=2)


# ----------------------------------------------------------------------------------------------
# The extension run


def test_no_default_checkpoint_says_how_to_make_one(monkeypatch, tmp_path):
    monkeypatch.setattr("settings.REPO_DIR", tmp_path)
    with pytest.raises(train.TrainError, match="python train.py"):
        extend.default_source()


def test_extension_starts_from_the_source_weights_and_records_recipe_and_source(corpus, pretrained, tmp_path):
    summary = run_extension(corpus, pretrained, tmp_path / "ext", "--recipe", "olmo3", "--steps", "1",
                            "--held_out_documents", "0")
    checkpoint = Path(summary["checkpoint"])
    config = json.loads((checkpoint / "config.json").read_text())
    assert (config["context_length"], config["rope_scaling"], config["rope_factor"],
            config["rope_original_context"]) == (4 * L, "yarn", 8.0, L)
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["extension"]["recipe"] == "olmo3" and state["extension"]["source"] == str(pretrained)
    assert state["loader"]["kind"] == "long_document_mix"
    # step 0: every weight is the source's (build_model with the resolved args, before any step)
    args = extend.parse_args([*EXTEND, "--data", str(corpus), "--from", str(pretrained), "--recipe", "olmo3"])
    args, config = extend.resolve(args, *extend.resolve_source(str(pretrained))[1:], "cpu")
    args = dataclasses.replace(args, init_from=str(pretrained))
    model, _ = train.build_model(config, args, train.Distributed())
    from safetensors.torch import load_file
    for name, tensor in load_file(Path(pretrained) / "model.safetensors").items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_extended_checkpoint_keeps_the_sources_compact_vocabulary(corpus, tmp_path):
    compact = compact_vocabulary.compact_folder(corpus, 512, tmp_path / "compact", progress=False)
    source = train.train(train.parse_args([*PRETRAIN, "--data", str(compact), "--out", str(tmp_path / "pre"),
                                           "--steps", "1"]))["checkpoint"]
    summary = run_extension(compact, source, tmp_path / "ext", "--steps", "1", "--held_out_documents", "0")
    vocabulary = (Path(source) / data.COMPACT_VOCAB_FILE).read_bytes()
    assert vocabulary == (compact / data.COMPACT_VOCAB_FILE).read_bytes()
    assert (Path(summary["checkpoint"]) / data.COMPACT_VOCAB_FILE).read_bytes() == vocabulary
    with pytest.raises(data.DataError, match="would mean other text"):  # and refuses data in another vocabulary
        run_extension(corpus, source, tmp_path / "ext_dolma2", "--steps", "1", "--held_out_documents", "0")


def test_export_of_an_extended_checkpoint_loads_in_transformers_with_our_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    source = Transformer(source_config(vocab_size=97, rope_theta=500_000.0), seed=4)
    for recipe in ("olmpool", "olmo3"):
        config = extend.extended_config(source.config, recipe, 4 * L)
        model = Transformer(config, seed=None)
        model.load_state_dict(source.state_dict())
        hf_export.export_hf(model, tmp_path / recipe)
        written = json.loads((tmp_path / recipe / "config.json").read_text())
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / recipe, attn_implementation="eager",
                                                      dtype=torch.float32).eval()
        read = theirs.config.rope_parameters
        if recipe == "olmpool":  # 8M on both layer types, as transformers reads it
            assert read["full_attention"]["rope_theta"] == read["sliding_attention"]["rope_theta"] == 8_000_000
            assert "rope_theta" not in written  # no flat value for transformers to override
        else:
            assert read["full_attention"]["rope_type"] == "yarn" and read["sliding_attention"]["rope_type"] == "default"
        tokens = torch.randint(0, 97, (2, 4 * L), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(theirs(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)


def test_extending_to_4l_beats_the_unextended_model_at_4l_and_the_none_control_is_reported(corpus, pretrained,
                                                                                           tmp_path, capsys):
    extended = run_extension(corpus, pretrained, tmp_path / "olmpool", "--recipe", "olmpool", "--steps", "12")
    control = run_extension(corpus, pretrained, tmp_path / "none", "--recipe", "none", "--steps", "12")
    held_out = extended["held_out"]
    with capsys.disabled():
        print(f"\nheld-out loss at 4L={4 * L} on {8} val documents: unextended {held_out['source']:.4f}, "
              f"olmpool {held_out['extended']:.4f}, none (control) {control['held_out']['extended']:.4f}")
    assert held_out["extended"] < held_out["source"]
    assert control["held_out"]["source"] == held_out["source"]  # the same documents and source model


# ----------------------------------------------------------------------------------------------
# FSDP2 on meta: the same weights and first losses as one process


def test_fsdp_on_meta_gives_the_weights_and_first_losses_of_one_process(corpus, pretrained, tmp_path):
    one = run_extension(corpus, pretrained, tmp_path / "one", "--steps", "2", "--held_out_documents", "0")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "extend.py",
               *EXTEND, "--data", str(corpus), "--from", str(pretrained), "--out", str(tmp_path / "two"),
               "--steps", "2", "--fsdp", "--held_out_documents", "0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([one["losses"][1], one["losses"][2]], rel=1e-5)
    # Weights after two steps (sharded DCP checkpoint read back whole) agree as well.
    config = ModelConfig(**json.loads((tmp_path / "two" / "step_0000002" / "config.json").read_text()))
    two = Transformer(config, seed=None)
    train.load_initial_weights(two, str(tmp_path / "two" / "step_0000002"), config)
    from safetensors.torch import load_file
    for name, tensor in load_file(Path(one["checkpoint"]) / "model.safetensors").items():
        torch.testing.assert_close(two.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)
