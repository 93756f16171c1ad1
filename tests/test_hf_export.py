"""Exported folders run in the Hugging Face ecosystem as they are: our token ids from AutoTokenizer,
our greedy continuations from AutoModelForCausalLM, our log-likelihoods from lm-evaluation-harness.

One tiny random model with dolma2's vocabulary is exported once for the module. Nothing is
downloaded: the tokenizer is built from the cl100k file data.py reads, and lm-evaluation-harness runs
offline on a JSONL file and a task YAML written here.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

import data
import hf_export
import hf_interop
from checkpoint import save_model
from hf_export import export_hf
from hf_interop import CheckpointError, load_hf, summary
from olmpool import Transformer, generate, preset

# Olmo 3's switches (post norm, layerwise QK norm, windows), as small as a dolma2 vocabulary allows:
# the two embeddings are 2 x 100,352 x 32 floats (26 MB), the rest is a few thousand parameters.
TINY = dict(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, mlp_hidden=64, window=8, global_every=2)
PRESET = "H_post_LQK_32kv_8k_11k_SWA"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model():
    """Random weights, larger than the initialisation's, so that greedy choices are far from ties."""
    model = Transformer(preset(PRESET, size="tiny", **TINY), seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if param.ndim == 1 else 0.3 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our model, the folder export_hf wrote for it)."""
    model = tiny_model()
    folder = tmp_path_factory.mktemp("export") / "hf"
    export_hf(model, folder)
    return model, folder


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return AutoTokenizer.from_pretrained(exported[1])


def dolma2_ids(text):
    """What the exported tokenizer must give: dolma2's ids, with special-token text special (see
    hf_export's tokenizer section); ordinary text gives exactly data.Tokenizer.encode's ids."""
    ids = data.get_tokenizer().encoding.encode(text, allowed_special="all")
    if not any(token in text for token in data.SPECIAL_TOKENS):
        assert ids == data.get_tokenizer().encode(text)
    return ids


# ----------------------------------------------------------------------------------------------
# The folder and its tokenizer


def test_export_writes_a_complete_folder_with_dolma2_special_tokens(exported, hf_tokenizer):
    _, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
         "README.md"])
    assert (hf_tokenizer.eos_token, hf_tokenizer.eos_token_id) == ("<|endoftext|>", data.EOS_ID)
    assert (hf_tokenizer.pad_token, hf_tokenizer.pad_token_id) == ("<|pad|>", data.PAD_ID)
    assert hf_tokenizer.bos_token is None and hf_tokenizer("Hello").input_ids == [9906]  # nothing added around text
    assert all(hf_tokenizer.convert_tokens_to_ids(t) == i for t, i in data.SPECIAL_TOKENS.items())
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (data.EOS_ID, data.PAD_ID)
    card = (folder / "README.md").read_text()
    assert "Olmo3ForCausalLM" in card and "block norm: post" in card and "QK norm: layerwise" in card
    assert "sliding window: 8 tokens on 1 of 2 layers" in card and "2 query, 1 key/value (GQA)" in card


SPECIAL_AND_NEAR = [*data.SPECIAL_TOKENS, "<|endoftext|", "<|endof", "|>", "<|", "<|PAD|>"]
WHITESPACE = " \t\n\r\x0b\x0c\x85\xa0\u1680\u2003\u2028\u2029\u3000"
pieces = st.one_of(
    st.text(max_size=16),  # arbitrary unicode (hypothesis leaves out lone surrogates, which UTF-8 cannot hold)
    st.text(alphabet=WHITESPACE, min_size=1, max_size=12),  # whitespace runs, Unicode spaces, CR/LF mixes
    st.sampled_from(SPECIAL_AND_NEAR),
    st.from_regex(r"[0-9]{1,9}", fullmatch=True),  # cl100k splits digits in threes
    st.sampled_from(["'s", "'LL", "'Ve", " hello", "  world", "\r\n", "é", "日本語", "😀", "\u200d", "x" * 40]),
)


@settings(max_examples=300)
@given(text=st.lists(pieces, max_size=10).map("".join))
def test_exported_tokenizer_gives_our_ids_on_arbitrary_text(hf_tokenizer, text):
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert ids == dolma2_ids(text)
    assert hf_tokenizer.decode(ids) == text


def builtin_validation_documents(max_tokens=60_000):
    """The built-in corpus's validation documents (those data.is_val_document sends to val, in the
    corpus's order; about its whole val split), read as text without preparing the corpus."""
    stdlib, documents, tokens = Path(sysconfig.get_paths()["stdlib"]), [], 0
    for _, text, _ in data.builtin_documents(stdlib, []):
        if data.is_val_document(text, data.BUILTIN_VAL_FRACTION):
            documents.append(text)
            tokens += len(text) // 4
            if tokens >= max_tokens:
                break
    return documents


def test_exported_tokenizer_gives_our_ids_on_the_builtin_validation_split(hf_tokenizer):
    documents = builtin_validation_documents()
    assert len(documents) >= 5
    ours = data.get_tokenizer().encode_batch(documents)
    theirs = hf_tokenizer(documents, add_special_tokens=False).input_ids
    for mine, other in zip(ours, theirs):
        first = next((i for i, (a, b) in enumerate(zip(other, mine)) if a != b), min(len(other), len(mine)))
        assert other == mine, f"from token {first}: {other[first:first + 4]}, ours {mine[first:first + 4]}"
    assert sum(map(len, ours)) > 30_000


# ----------------------------------------------------------------------------------------------
# The model in transformers and in lm-evaluation-harness


def test_greedy_generate_from_a_text_prompt_equals_ours_token_for_token(exported, hf_tokenizer):
    model, folder = exported
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = "def fibonacci(n):\n    \"\"\"The n-th Fibonacci number.\"\"\"\n   "  # longer than the window of 8
    prompt_ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    assert prompt_ids[0].tolist() == data.get_tokenizer().encode(prompt)
    with torch.no_grad():
        their_new = theirs.generate(prompt_ids, max_new_tokens=16, do_sample=False)[0, prompt_ids.shape[1]:]
    our_new = generate(model, prompt_ids, max_new_tokens=16, eos_id=data.EOS_ID)[0]
    assert len(our_new) == 16 and their_new.tolist() == our_new.tolist()


DOCS = [  # contexts end without whitespace, so lm-eval does not move any into the continuation
    {"context": "The capital of France is", "continuation": " Paris"},
    {"context": "def add(a, b):\n    return", "continuation": " a + b  # sum\n"},
    {"context": "Ünïcödé and 日本語:", "continuation": " 1234567 😀"},
]
TASK_YAML = """\
task: olmpool_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
"""


def our_loglikelihood(model, context, continuation):
    """log P(continuation | context) and whether it is the greedy continuation, tokenized as lm-eval does:
    the continuation's tokens are those of context + continuation after the context's."""
    tokenizer = data.get_tokenizer()
    context_ids, whole = tokenizer.encode(context), tokenizer.encode(context + continuation)
    assert whole[:len(context_ids)] == context_ids
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]))[0, len(context_ids) - 1:]
    targets = torch.tensor(whole[len(context_ids):])
    logprobs = logits.double().log_softmax(-1)
    return logprobs[torch.arange(len(targets)), targets].sum().item(), bool((logits.argmax(-1) == targets).all())


def test_lm_evaluation_harness_offline_gives_our_loglikelihoods(exported, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a dev requirement: pip install -r "
                                          "requirements-dev.txt")
    model, folder = exported
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "olmpool_tiny.yaml").write_text(TASK_YAML.format(docs=docs))
    # Offline, with every cache in tmp_path: a download attempt fails instead of succeeding quietly.
    env = os.environ | dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                            HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
               "--device", "cpu", "--batch_size", "1", "--tasks", "olmpool_tiny",
               "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "out"), "--log_samples"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = [json.loads(line) for path in (tmp_path / "out").rglob("samples_olmpool_tiny_*.jsonl")
               for line in path.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(DOCS)))
    for sample in samples:
        doc = DOCS[sample["doc_id"]]
        loglikelihood, is_greedy = sample["resps"][0][0]  # [[["-12.3", "False"]]]: one request per doc
        expected, expected_greedy = our_loglikelihood(model, doc["context"], doc["continuation"])
        assert float(loglikelihood) == pytest.approx(expected, rel=1e-5, abs=1e-4), doc
        assert is_greedy == str(expected_greedy)


# ----------------------------------------------------------------------------------------------
# Our checkpoint folders, and the import summary's tokenizer line


@pytest.fixture(scope="module")
def checkpoint(exported, tmp_path_factory):
    """Our checkpoint folder of the exported model, with a train_state.json as train.py writes."""
    folder = tmp_path_factory.mktemp("checkpoint") / "step_0000007"
    save_model(exported[0], folder)
    (folder / "train_state.json").write_text(json.dumps(
        {"step": 7, "tokens_seen": 7168, "args": {"preset": PRESET, "size": "tiny", "lr": 3e-3}}))
    return folder


def test_model_card_names_the_preset_the_recipe_and_the_source(checkpoint, tmp_path):
    export_hf(checkpoint, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert str(checkpoint.resolve()) in card and "step 7, 7168 tokens seen" in card and '"lr": 0.003' in card
    assert "none of OlmPool's presets has this architecture" in card  # TINY is smaller than any preset size
    full = hf_export.model_card(preset(PRESET, size="tiny"), "olmo3")
    assert f"preset('{PRESET}', size='tiny')" in full and "size='7b'" not in full


def test_compact_vocabulary_checkpoint_is_refused_naming_the_file_and_the_fix(checkpoint, tmp_path):
    compact = tmp_path / "compact"
    shutil.copytree(checkpoint, compact, copy_function=os.link)
    (compact / data.COMPACT_VOCAB_FILE).write_text(json.dumps({"dolma2_ids": [0, 1, 2]}))
    with pytest.raises(CheckpointError, match=r"compact_vocab.json: .*compact vocabulary, so its token ids are not "
                                              r"dolma2's.*Map its embedding and lm_head rows back to dolma2 ids"):
        export_hf(compact, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_missing_cl100k_file_is_named_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(data.BPE_FILE_ENV, str(tmp_path / "nowhere.tiktoken"))
    with pytest.raises(CheckpointError, match=r"cannot build the dolma2 tokenizer: .*nowhere.tiktoken.*--no_tokenizer"):
        hf_export.dolma2_hf_tokenizer.__wrapped__()  # uncached: the module's tokenizer may be built already


def test_toy_vocabulary_exports_without_a_tokenizer_unless_asked(tmp_path):
    model = Transformer(preset(PRESET, size="tiny", vocab_size=97, **TINY))
    text = export_hf(model, tmp_path / "toy")
    assert "no tokenizer (toy vocabulary)" in text and not (tmp_path / "toy" / "tokenizer.json").exists()
    with pytest.raises(CheckpointError, match="vocab_size 97 is smaller than dolma2's 100278 ids"):
        export_hf(model, tmp_path / "asked", tokenizer=True)


def with_edited_tokenizer(folder, copy, edit):
    """A copy of folder (hard links, no 40 MB copy) whose tokenizer.json is edited: a new file, never the original."""
    shutil.copytree(folder, copy, copy_function=os.link, ignore=shutil.ignore_patterns("tokenizer.json"))
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    edit(tokenizer)
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    return copy


def swap_hello_and_world(tokenizer):
    vocab = tokenizer["model"]["vocab"]
    vocab["Hello"], vocab["Ġworld"] = vocab["Ġworld"], vocab["Hello"]


def move_pad(tokenizer):
    tokenizer["model"]["vocab"]["<|pad|>"] = 100300
    for added in tokenizer["added_tokens"]:
        if added["content"] == "<|pad|>":
            added["id"] = 100300


def test_import_summary_says_whether_the_tokenizer_gives_dolma2_ids(exported, tmp_path):
    _, folder = exported
    assert "tokenizer: tokenizer.json gives dolma2's ids" in summary(folder)
    loaded, text = load_hf(folder)  # a folder with tokenizer files imports as before
    assert torch.equal(loaded.lm_head.weight, exported[0].lm_head.weight) and "gives dolma2's ids" in text
    for name, edit, message in [("words", swap_hello_and_world, r"probe text encodes differently from token 0 on "
                                                                r"\(\[1917, 9906"),
                                ("pad", move_pad, r"special tokens <\|pad\|> -> 100300 \(dolma2: 100277\)")]:
        text = summary(with_edited_tokenizer(folder, tmp_path / name, edit))
        assert "tokenizer: tokenizer.json DISAGREES with dolma2 ids" in text
        assert re.search(message, text), text
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, copy_function=os.link, ignore=shutil.ignore_patterns("tokenizer*"))
    assert "tokenizer: no tokenizer.json; OlmPool encodes with dolma2" in summary(bare)


def test_command_line_no_tokenizer_leaves_the_tokenizer_files_out(checkpoint, tmp_path, capsys):
    hf_interop.main(["export", str(checkpoint), "--out", str(tmp_path / "hf"), "--no_tokenizer"])
    assert "no tokenizer" in capsys.readouterr().out
    left_out = (*hf_export.TOKENIZER_FILES, hf_export.GENERATION_CONFIG)
    assert not any((tmp_path / "hf" / name).exists() for name in left_out)
    assert "No tokenizer files were exported" in (tmp_path / "hf" / "README.md").read_text()
