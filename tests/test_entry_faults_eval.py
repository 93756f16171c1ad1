"""evaluate.py's entry faults (issue 19): one writer per --out, poisoned weights never scored, and every
flag that cannot run refused in one line before any model loads; an evaluation that computes no cell
is a failure, not an empty table with exit 0."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import data
import evaluate as ev
import files
from olmpool import ModelConfig, Transformer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    config = ModelConfig(vocab_size=100_352, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                         mlp_hidden=64, context_length=256, rope_theta=10_000.0)
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save_model(Transformer(config, seed=0), folder)
    return folder


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("heldout")
    from pydoc_data.topics import topics
    docs = [{"text": topics[name]} for name in sorted(topics)[:60]]
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    data.prepare([folder / "docs.jsonl"], folder / "prepared", val_fraction=0.5, progress=False)
    return folder / "prepared"


def refusal(argv: list[str], monkeypatch) -> str:
    """evaluate.main's one-line refusal of argv, checking that no model was loaded for it."""
    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded for a command that cannot run")
    monkeypatch.setattr(ev, "load_checkpoint", must_not_load)
    with pytest.raises(SystemExit) as exit_:
        ev.main(argv)
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("evaluate.py: ") and "\n" not in message, message
    return message


TINY_RECALL = ["--modes", "recall", "--tasks", "niah_single_1", "--lengths", "256", "--samples", "1",
               "--device", "cpu"]


# ----------------------------------------------------------------------------------------------
# One writer per --out


@contextlib.contextmanager
def held_by_another_process(folder: Path, what: str):
    """Another live process holds folder's lock (files.lock_folder) during the block: yields its pid; killed after."""
    holder = subprocess.Popen([sys.executable, "-c", "import files, sys, time; files.lock_folder(sys.argv[1], "
                               "sys.argv[2]); print('held', flush=True); time.sleep(60)", str(folder), what],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_evaluation_into_a_held_out_folder_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(
        tmp_path, tiny_checkpoint, monkeypatch):
    out = tmp_path / "eval"
    with held_by_another_process(out, "evaluate.py") as holder:
        start = time.monotonic()
        message = refusal([str(tiny_checkpoint), *TINY_RECALL, "--out", str(out)], monkeypatch)
        assert time.monotonic() - start < 5
        assert f"in use by process {holder}" in message and not (out / "results.json").exists()
    monkeypatch.undo()
    ev.main([str(tiny_checkpoint), *TINY_RECALL, "--out", str(out)])  # the kernel dropped the dead holder's lock
    assert (out / "results.json").is_file()
    files.unlock_folder(out)


# ----------------------------------------------------------------------------------------------
# Poisoned weights


@pytest.mark.parametrize("poison", ["nan", "inf", "int32"])
def test_poisoned_weights_end_in_one_line_naming_the_tensor_and_are_never_scored(tmp_path, tiny_checkpoint, poison):
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "poisoned"
    shutil.copytree(tiny_checkpoint, folder)
    state = load_file(folder / "model.safetensors")
    name = next(n for n in state if "embed" in n)
    if poison == "int32":
        state[name] = state[name].to(torch.int32)
    else:
        state[name][0, 0] = float(poison)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(SystemExit) as exit_:
        ev.main([str(folder), *TINY_RECALL, "--out", str(tmp_path / "eval")])
    message = exit_.value.code
    assert isinstance(message, str) and "\n" not in message and name in message
    cells = json.loads((tmp_path / "eval" / "results.json").read_text()) if (tmp_path / "eval" / "results.json").exists() \
        else {"recall": {}}
    assert not cells["recall"]


# ----------------------------------------------------------------------------------------------
# Flags that cannot run: one line, before any model loads


FLAG_FAULTS = {
    "windows 0": (["--modes", "longppl", "--windows", "0"], "--windows 0"),
    "batch_size 0": (["--batch_size", "0"], "--batch_size 0"),
    "samples 0": (["--samples", "0"], "--samples 0"),
    "device bogus": (["--device", "bogus"], "--device 'bogus'"),
    "tasks bogus": (["--tasks", "bogus"], "unknown task 'bogus'"),
    "tasks none": (["--tasks", ","], "--tasks names no task"),
    "modes none": (["--modes", ","], "--modes"),
    "lengths beyond any": (["--lengths", "1000000000"], "--lengths: 1000000000 is beyond"),
    "lengths not numbers": (["--lengths", "4k"], "--lengths '4k'"),
    "missing data": (["--modes", "longppl", "--data", "{tmp}/no_such_data"], "no such folder"),
    "data not prepared": (["--modes", "longppl", "--data", "{tmp}"], "not a prepared data folder"),
    "out a file": (["--out", "{tmp}/a_file"], "is a file"),
}


@pytest.mark.parametrize("case", list(FLAG_FAULTS))
def test_each_flag_that_cannot_run_is_refused_in_one_line_before_any_model_loads(case, tmp_path, tiny_checkpoint,
                                                                                 monkeypatch):
    flags, expected = FLAG_FAULTS[case]
    (tmp_path / "a_file").write_text("not a folder")
    argv = [str(tiny_checkpoint), *TINY_RECALL, "--out", str(tmp_path / "eval"),
            *[f.replace("{tmp}", str(tmp_path)) for f in flags]]
    message = refusal(argv, monkeypatch)
    assert expected in message
    assert not (tmp_path / "eval" / "results.json").exists()


def test_lengths_beyond_every_held_out_document_are_refused_before_any_model_loads(tmp_path, tiny_checkpoint,
                                                                                   heldout, monkeypatch):
    for heldout_kind in ("documents", "windows"):
        message = refusal([str(tiny_checkpoint), "--modes", "longppl,attention", "--lengths", "500000", "--data",
                           str(heldout), "--heldout", heldout_kind, "--device", "cpu", "--out", str(tmp_path / "e")],
                          monkeypatch)
        assert "no length of --lengths 500000 has held-out text" in message


def test_out_of_vocabulary_ids_in_a_val_shard_are_refused_not_an_empty_table(tmp_path, tiny_checkpoint, heldout,
                                                                             monkeypatch):
    folder = tmp_path / "data"
    shutil.copytree(heldout, folder)
    manifest = data.read_manifest(folder)
    shard = folder / manifest["splits"]["val"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    n_documents = data.HEADER.unpack(raw[:data.HEADER.size])[4]
    at = data.HEADER.size + 8 * n_documents
    raw[at:at + 4] = (2 ** 32 - 1).to_bytes(4, "little")
    shard.write_bytes(bytes(raw))
    for modes in ("longppl", "recall,longppl,attention"):  # refused, not skipped beside the recall cells
        message = refusal([str(tiny_checkpoint), "--modes", modes, "--tasks", "niah_single_1", "--lengths", "64",
                           "--data", str(folder), "--device", "cpu", "--short_context", "16", "--short_step", "8",
                           "--out", str(tmp_path / "e")], monkeypatch)
        assert "beyond the vocabulary" in message


def test_recall_at_lengths_no_task_fits_fails_instead_of_an_empty_table(tmp_path, tiny_checkpoint):
    with pytest.raises(SystemExit) as exit_:
        ev.main([str(tiny_checkpoint), "--modes", "recall", "--tasks", "niah_single_1", "--lengths", "8",
                 "--samples", "1", "--device", "cpu", "--out", str(tmp_path / "eval")])
    message = exit_.value.code
    assert isinstance(message, str) and "\n" not in message and "no cell could be computed" in message
    assert (tmp_path / "eval" / "results.json").is_file()  # what ran is kept
    assert os.path.getsize(tmp_path / "eval" / "results.json") > 0


def test_ctrl_c_ends_in_one_line_and_exit_130_with_the_finished_cells_kept(tmp_path, tiny_checkpoint, monkeypatch,
                                                                            capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "recall_cells", interrupted)
    with pytest.raises(SystemExit) as exit_:
        ev.main([str(tiny_checkpoint), *TINY_RECALL, "--out", str(tmp_path / "eval")])
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("evaluate.py: interrupted")
