"""Issue 19's faults at the data and Hugging Face entry points: each ends in one line naming the problem and
the fix, a non-zero exit, and nothing lost or left behind.

data.py: a shard listed but missing, a manifest that is not one, out-of-vocabulary ids behind an updated
checksum, hidden folders of a failed or killed prepare, one writer per data folder. hf_interop.py: an index
that points outside its folder, a config.json of absurd size, poisoned or non-float weights, YaRN with
beta_fast <= beta_slow.
"""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Olmo3Config, Olmo3ForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import compact_vocabulary  # noqa: E402
import data  # noqa: E402
import hf_interop  # noqa: E402
from checkpoint import CheckpointError  # noqa: E402
from olmpool import ModelConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# data.py


def token_folder(folder, n_documents=40, length=50, shard_tokens=500):
    """A prepared folder of dolma2 ids in a few shards (no tokenizer needed)."""
    folder.mkdir(parents=True)
    writer = data.ShardWriter(folder, "train", shard_tokens)
    for d in range(n_documents):
        writer.add_document(list(range(1 + d * length, 1 + (d + 1) * length)))
    data.write_manifest(folder, {"train": writer.close()})
    return folder


def one_error_line(capsys, argv, code=1):
    """Run data.py's command line; it must exit with `code` and print only `error: ...` lines."""
    with pytest.raises(SystemExit) as stop:
        data.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == code, err
    assert err and all(line.startswith("error: ") for line in err.splitlines()), err
    return err


LOADERS = {
    "TokenLoader": lambda folder: data.TokenLoader(folder, "train", seq_len=16, global_batch_size=2),
    "LongDocumentMix": lambda folder: data.LongDocumentMix(folder, "train", seq_len=64, global_batch_size=2),
}


def refusal(capsys, entry, folder):
    """The one line with which `data.py verify` or a loader refuses folder."""
    if entry == "verify":
        return one_error_line(capsys, ["verify", str(folder)])
    with pytest.raises(data.DataError) as error:
        LOADERS[entry](folder)
    return str(error.value)


@pytest.mark.parametrize("entry", [*LOADERS, "verify"])
def test_a_shard_listed_in_the_manifest_but_missing_is_one_line_naming_it_and_the_fix(tmp_path, capsys, entry):
    folder = token_folder(tmp_path / "tokens")
    (folder / "train_000001.bin").unlink()
    message = refusal(capsys, entry, folder)
    assert "train_000001.bin is missing" in message and "data.py prepare" in message and "\n" not in message.strip()


MANIFESTS = {
    "not JSON": "{not json",
    "not an object": "[1, 2]",
    "no splits": json.dumps({"format": data.FORMAT_NAME, "format_version": data.FORMAT_VERSION,
                             "tokenizer": data.DOLMA2_RECORD}),
    "no tokenizer": json.dumps({"format": data.FORMAT_NAME, "format_version": data.FORMAT_VERSION, "splits": {}}),
    "a shard outside the folder": None,  # the real manifest with a file named ../x.bin
}


@pytest.mark.parametrize("entry", [*LOADERS, "verify"])
@pytest.mark.parametrize("case", MANIFESTS)
def test_a_manifest_that_is_not_one_is_one_line_for_the_loaders_and_verify(tmp_path, capsys, case, entry):
    folder = token_folder(tmp_path / "tokens")
    manifest_path = folder / data.MANIFEST
    if MANIFESTS[case] is None:
        manifest = json.loads(manifest_path.read_text())
        manifest["splits"]["train"]["shards"][0]["file"] = "../x.bin"
        manifest_path.write_text(json.dumps(manifest))
    else:
        manifest_path.write_text(MANIFESTS[case])
    message = refusal(capsys, entry, folder)
    assert str(manifest_path) in message and "data.py prepare" in message


def test_out_of_vocabulary_ids_behind_an_updated_checksum_fail_verify_as_the_loader(tmp_path, capsys):
    folder = token_folder(tmp_path / "tokens")
    shard = folder / "train_000000.bin"
    raw = bytearray(shard.read_bytes())
    raw[-8:-4] = (data.VOCAB_SIZE + 7).to_bytes(4, "little")  # the token before the last EOS
    shard.write_bytes(bytes(raw))
    manifest = json.loads((folder / data.MANIFEST).read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
    (folder / data.MANIFEST).write_text(json.dumps(manifest))
    message = one_error_line(capsys, ["verify", str(folder)])
    assert len(message.splitlines()) == 1
    assert str(shard) in message and f"the largest is {data.VOCAB_SIZE + 7}" in message
    assert f"beyond the vocabulary of {data.VOCAB_SIZE}" in message
    with pytest.raises(data.DataError) as error:
        LOADERS["TokenLoader"](folder)
    assert str(error.value) == message.removeprefix("error: ").strip()  # the loader and verify agree


@pytest.fixture
def text_input(tmp_path):
    path = tmp_path / "input" / "text.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"text": f"document {i}: " + "some words of text " * 30}) + "\n"
                            for i in range(60)))
    return path


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_folders_a_killed_prepare_left_aside_are_cleared_by_the_next_writer(tmp_path, text_input):
    out = tmp_path / "prepared"
    for name in (".prepared.preparing-999999", ".prepared.dolma2.tmp999999"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_000000.bin").write_bytes(b"half")
    data.prepare([text_input], out, val_fraction=0.1, progress=False)
    assert hidden(tmp_path) == []
    assert data.TokenLoader(out, "train", 8, 2).next_batch().inputs.shape == (2, 8)


@pytest.mark.parametrize("where", ["tokenizing", "compacting"])
def test_a_prepare_that_fails_midway_leaves_no_hidden_folder_and_no_output(tmp_path, text_input, monkeypatch, where):
    def fail(*args, **kwargs):
        raise OSError("injected failure")

    if where == "tokenizing":
        monkeypatch.setattr(data.ShardWriter, "flush", fail)
    else:
        monkeypatch.setattr(compact_vocabulary, "write_compact_shards", fail)
    with pytest.raises(OSError, match="injected failure"):
        compact_vocabulary.prepare([text_input], tmp_path / "prepared", 0.1, progress=False, compact_vocab=512)
    assert hidden(tmp_path) == [] and not (tmp_path / "prepared").exists()


def test_sigterm_during_prepare_removes_what_it_built_and_exits_143(tmp_path, text_input):
    script = ("import os, signal, sys; import data\n"
              "data.ShardWriter.flush = lambda self: os.kill(os.getpid(), signal.SIGTERM)\n"
              "data.main(['prepare', sys.argv[1], '--out', sys.argv[2], '--quiet'])\n")
    done = subprocess.run([sys.executable, "-c", script, str(text_input), str(tmp_path / "prepared")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert hidden(tmp_path) == [] and not (tmp_path / "prepared").exists()


@pytest.fixture
def lock_holder():
    """Another process that holds files.lock_folder of a folder until it is killed."""
    holders = []

    def hold(folder):
        holder = subprocess.Popen([sys.executable, "-c", "import files, sys, time; files.lock_folder(sys.argv[1], "
                                   "'a test'); print('locked', flush=True); time.sleep(60)", str(folder)],
                                  cwd=REPO, stdout=subprocess.PIPE, text=True)
        holders.append(holder)
        assert holder.stdout.readline().strip() == "locked"
        return holder

    yield hold
    for holder in holders:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", ["prepare", "compact", "builtin"])
def test_a_second_writer_of_a_data_folder_is_refused_naming_the_first_and_a_killed_one_blocks_nothing(
        tmp_path, text_input, capsys, lock_holder, command):
    out = tmp_path / "out"
    argv = {"prepare": ["prepare", str(text_input), "--out", str(out), "--quiet"],
            "compact": ["compact", str(tmp_path / "dolma2"), "--vocab_size", "512", "--out", str(out), "--quiet"],
            "builtin": ["builtin", "--out", str(out), "--max_tokens", "20000"]}[command]
    if command == "compact":
        data.prepare([text_input], tmp_path / "dolma2", val_fraction=0.1, progress=False)
    holder = lock_holder(out)
    start = time.monotonic()
    message = one_error_line(capsys, argv)
    assert time.monotonic() - start < 5
    assert f"in use by process {holder.pid} (a test)" in message and len(message.splitlines()) == 1
    holder.kill()
    holder.wait()
    data.main(argv)  # the kernel dropped the killed holder's lock
    assert data.read_manifest(out)["splits"]["train"]["tokens"] > 0


def test_the_lock_goes_with_the_folder_swapped_in(tmp_path, text_input):
    out = tmp_path / "prepared"
    data.prepare([text_input], out, val_fraction=0.1, progress=False)
    with data.one_writer(out, "a test"):  # held across a second prepare's swap (re-entrant)
        data.prepare([text_input], out, val_fraction=0.1, progress=False)
        holder = subprocess.run([sys.executable, "-c", "import files, sys; files.lock_folder(sys.argv[1], 'x')",
                                 str(out)], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert holder.returncode != 0 and f"in use by process {os.getpid()}" in holder.stderr


# ----------------------------------------------------------------------------------------------
# hf_interop.py

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=32, rms_norm_eps=1e-6)


def hf_folder(path, max_shard_size=None, config_class=LlamaConfig, model_class=LlamaForCausalLM, **overrides):
    torch.manual_seed(0)
    model = model_class(config_class(**(SHAPE | overrides)))
    options = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **options)
    return path


def import_fails(capsys, hf_dir, out):
    """`hf_interop.py import` exits with one error line and writes nothing."""
    with pytest.raises(SystemExit) as stop:
        hf_interop.main(["import", str(hf_dir), "--out", str(out)])
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message and not out.exists()
    return message


@pytest.mark.parametrize("how", ["../other", "absolute", "symlink"])
def test_an_index_that_points_outside_its_folder_is_refused(tmp_path, capsys, how):
    directory = hf_folder(tmp_path / "hf", max_shard_size="100KB")
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "other").mkdir()
    moved = tmp_path / "other" / shard
    (directory / shard).rename(moved)
    if how == "symlink":
        (directory / shard).symlink_to(moved)
    else:
        name = f"../other/{shard}" if how == "../other" else str(moved)
        index["weight_map"] = {k: name if v == shard else v for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the folder"):
        hf_interop.load_hf(directory)
    assert "outside the folder" in import_fails(capsys, directory, tmp_path / "ours")


def test_a_config_with_200000_layers_is_refused_in_well_under_a_second(tmp_path):
    directory = hf_folder(tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 200_000}))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="num_hidden_layers=200000 but the weights have 2 layers"):
        hf_interop.summary(directory)
    assert time.monotonic() - start < 1.0


POISONS = {
    "nan": lambda t: t.clone().index_fill_(0, torch.tensor([1]), math.nan),
    "inf": lambda t: t.clone().index_fill_(0, torch.tensor([0]), math.inf),
    "int32": lambda t: t.to(torch.int32),
}


@pytest.mark.parametrize("poison", POISONS)
def test_nan_inf_or_integer_weights_are_refused_naming_the_tensor(tmp_path, capsys, poison):
    directory = hf_folder(tmp_path / "hf")
    state = load_file(directory / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    state[name] = POISONS[poison](state[name])
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor '(model\.)?layers.1.mlp.down_proj.weight' (holds \d+ NaN or "
                                              r"infinite|is stored as I32, not a floating-point type)"):
        hf_interop.load_hf(directory)
    assert "layers.1.mlp.down_proj.weight" in import_fails(capsys, directory, tmp_path / "ours")


def test_yarn_with_beta_fast_not_above_beta_slow_is_refused_by_model_config_and_the_import(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"yarn_beta_fast=1.0 must exceed yarn_beta_slow=32.0"):
        ModelConfig(vocab_size=97, n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, mlp_hidden=96, rope_scaling="yarn",
                    rope_factor=4.0, yarn_beta_fast=1.0, yarn_beta_slow=32.0)
    yarn = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 1.0, "beta_slow": 32.0}
    directory = hf_folder(tmp_path / "hf", config_class=Olmo3Config, model_class=Olmo3ForCausalLM,
                          sliding_window=5, rope_parameters={"full_attention": yarn, "sliding_attention": yarn})
    message = import_fails(capsys, directory, tmp_path / "ours")
    assert "yarn_beta_fast=1.0 must exceed yarn_beta_slow=32.0" in message
