"""Faults and bad input in train.py and data.py: nothing a checkpoint holds is unpickled by
--init_from, a rollback loses nothing, every flag is checked before work, damaged checkpoints are
skipped by name, a failed prepare leaves the old folder whole, and SIGKILL at any moment resumes
to the same weights.

Small models and few steps throughout (see test_train.SMALL); processes only where they are the point.
"""

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoint  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from test_train import SMALL, assert_same_weights, run, weights  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return data.prepare_builtin_corpus(tmp_path_factory.mktemp("faults_corpus"), max_tokens=300_000, progress=False)


def step_names(out):
    return [p.name for p in checkpoint.checkpoints_in(out)]


# ----------------------------------------------------------------------------------------------
# Nothing from someone else's folder is unpickled


class RunsCode:
    """Unpickling this creates a file: what a crafted checkpoint would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_init_from_never_unpickles_a_crafted_dcp_metadata_file(corpus, tmp_path):
    source = run(corpus, tmp_path / "source", "--steps", "1")["checkpoint"]
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    shutil.copy(source / "config.json", crafted / "config.json")  # an FSDP-looking folder: config.json and dcp/
    (crafted / "dcp").mkdir()
    (crafted / "dcp" / ".metadata").write_bytes(pickle.dumps(RunsCode(tmp_path / "ran")))
    pickle.loads(pickle.dumps(RunsCode(tmp_path / "live")))  # the payload is live: loading it runs the command
    assert (tmp_path / "live").exists()
    with pytest.raises(train.TrainError, match=r"has no model.safetensors \(only dcp/.*safetensors only"):
        run(corpus, tmp_path / "out", "--steps", "1", "--init_from", str(crafted))
    assert not (tmp_path / "ran").exists()
    assert not checkpoint.checkpoints_in(tmp_path / "out") if (tmp_path / "out").exists() else True


# ----------------------------------------------------------------------------------------------
# A rollback keeps both branches, and --resume auto follows the one chosen


def test_a_rollback_moves_the_abandoned_branch_aside_and_auto_continues_the_chosen_one(corpus, tmp_path):
    out = tmp_path / "run"
    run(corpus, out, "--steps", "8", "--save_every", "2", "--keep_checkpoints", "0")
    old = {name: weights(out / name) for name in step_names(out)}
    assert list(old) == ["step_0000002", "step_0000004", "step_0000006", "step_0000008"]
    shutil.copytree(out / "step_0000002", tmp_path / "copy_of_step_2")
    # The new branch: back to step 2 with a lower learning rate, keeping 2 checkpoints.
    branch = ["--steps", "8", "--save_every", "2", "--keep_checkpoints", "2", "--lr", "1e-3"]
    run(corpus, out, *branch, "--resume", str(out / "step_0000002"), "--stop_at", "4")
    assert step_names(out) == ["step_0000002", "step_0000004"]  # the new step 4, and where it branched
    [aside] = (out / checkpoint.ABANDONED_FOLDER).iterdir()
    for name in ("step_0000004", "step_0000006", "step_0000008"):  # kept whole, not deleted
        assert_same_weights(weights(aside / name), old[name])
    assert not torch.equal(weights(out / "step_0000004")["embed.weight"], old["step_0000004"]["embed.weight"])
    resumed = run(corpus, out, *branch, "--resume", "auto", "--stop_at", "6")
    assert list(resumed["losses"]) == [5, 6]  # from the new step 4; the old branch's step 8 would train nothing
    reference = run(corpus, tmp_path / "reference", *branch, "--resume", str(tmp_path / "copy_of_step_2"),
                    "--stop_at", "6")
    assert_same_weights(weights(resumed["checkpoint"]), weights(reference["checkpoint"]))
    # And back to the first branch: its step 6 returns to out, the second branch's step 6 goes aside.
    run(corpus, out, "--steps", "8", "--save_every", "2", "--resume", str(aside / "step_0000006"), "--stop_at", "6")
    assert step_names(out) == ["step_0000004", "step_0000006"]  # (the second branch pruned step 2)
    assert_same_weights(weights(out / "step_0000006"), old["step_0000006"])
    assert len(list((out / checkpoint.ABANDONED_FOLDER).glob("*/step_0000006"))) == 1  # the second branch's


# ----------------------------------------------------------------------------------------------
# Every flag is checked before any work


BAD_FLAGS = [  # (flags, what the message must say)
    (["--micro_batch", "-1"], "--micro_batch -1 must be a positive integer; e.g. --micro_batch 1"),
    (["--micro_batch", "0"], "--micro_batch 0 must be a positive integer"),
    (["--batch_tokens", "-64"], "--batch_tokens -64 must be a positive integer"),
    (["--batch_tokens", "0"], "--batch_tokens 0 must be a positive integer"),
    (["--seq_len", "0"], "--seq_len 0 must be a positive integer"),
    (["--steps", "0"], "--steps 0 must be a positive integer"),
    (["--stop_at", "0"], "--stop_at 0 must be a positive integer"),
    (["--save_every", "0"], "--save_every 0 must be a positive integer"),
    (["--log_every", "0"], "--log_every 0 must be a positive integer"),
    (["--eval_every", "2", "--eval_batches", "0"], "--eval_batches 0 must be a positive integer"),
    (["--keep_checkpoints", "-1"], "--keep_checkpoints -1 must be a non-negative integer"),
    (["--warmup", "-5"], "--warmup -5 must be a non-negative integer"),
    (["--grad_clip", "-1"], "--grad_clip -1.0 must be positive"),
    (["--min_lr_ratio", "1.5"], "--min_lr_ratio 1.5 must be in [0, 1]"),
    (["--lr", "-1"], "--lr -1.0 must be a positive finite number; e.g. --lr 0.0003"),
    (["--lr", "nan"], "--lr nan must be a positive finite number"),
    (["--beta2", "1"], "--beta2 1.0 must be in [0, 1)"),
    (["--resume", "no/such/folder"], "--resume no/such/folder is neither auto, never, nor a folder"),
    # Refused once the model and the data are known, still before any step:
    (["--vocab_size", "32000"], "--vocab_size 32000 is smaller than the 100,278 ids of"),
    (["--seq_len", "1000000", "--batch_tokens", "2000000"], "--seq_len 1000000 with --micro_batch 2 needs at least"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(flags) for flags, _ in BAD_FLAGS])
def test_a_bad_flag_is_refused_with_its_value_and_fix_before_any_checkpoint(corpus, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit:
        train.main([*SMALL, "--data", str(corpus), "--out", str(out), "--steps", "3", "--save_every", "1", *flags])
    assert exit.value.code in (1, 2)
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not out.exists() or not list(out.glob("step_*"))


def test_a_window_at_least_the_sequence_is_allowed_and_said_once(corpus, tmp_path, capsys):
    run(corpus, tmp_path, "--steps", "1", "--window", "32")  # seq_len 16
    printed = capsys.readouterr().out
    assert printed.count("note: window 32 >= seq_len 16") == 1


# ----------------------------------------------------------------------------------------------
# The headline command runs with defaults on two CPU processes, with the one-process losses


def test_default_micro_batch_fits_any_world_size_dividing_the_batch():
    config = train.model_config(train.parse_args([]))
    for world_size, micro_batch in ((1, 2), (2, 1)):  # the CPU default of 2 sequences
        plan = train.batch_plan(train.parse_args([]), config, world_size, "cpu")
        assert (plan.micro_batch, plan.accumulation) == (micro_batch, 1)
    for world_size in (1, 2, 4, 8, 16, 32, 64):  # the GPU default of 64 sequences
        plan = train.batch_plan(train.parse_args([]), config, world_size, "cuda")
        assert plan.micro_batch * plan.accumulation * world_size == 64


def test_the_headline_command_runs_on_two_cpu_processes_with_the_losses_of_one(corpus, tmp_path):
    # The defaults otherwise: the tiny preset, the global batch of 2 sequences, the default micro-batch
    # (sequences of 64 rather than 256 tokens: a step of the 100K-vocabulary head costs 4x less).
    flags = ["--qk_norm", "headwise", "--gqa", "4", "--data", str(corpus), "--steps", "2", "--seq_len", "64",
             "--eval_every", "0", "--threads", "1", "--peak_flops", "1e12", "--device", "cpu"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *flags, "--out", str(tmp_path / "two")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es) x micro-batch 1" in done.stdout
    two = {m["step"]: m["loss"] for m in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines())}
    one = train.train(train.parse_args([*flags, "--out", str(tmp_path / "one")]))["losses"]
    assert two.keys() == one.keys() == {1, 2}
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints: auto skips them by name, an explicit one is refused by name


@pytest.fixture(scope="module")
def three_steps(corpus, tmp_path_factory):
    """A run that saved every step of 3, and its last weights."""
    out = tmp_path_factory.mktemp("three_steps") / "run"
    run(corpus, out, "--steps", "3", "--save_every", "1", "--keep_checkpoints", "0")
    return out, weights(out / "step_0000003")


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGE = {
    "model.safetensors": cut_in_half,
    "optimizer.pt": cut_in_half,
    "config.json": lambda path: path.write_text('{"d_model": 32, '),
    "train_state.json": lambda path: path.write_text("garbage"),
}


@pytest.mark.parametrize("damaged_file", DAMAGE)
def test_a_damaged_newest_checkpoint_is_skipped_by_name_and_the_intact_one_resumes_exactly(
        corpus, three_steps, tmp_path, capsys, damaged_file):
    original, last_weights = three_steps
    out = tmp_path / "run"
    shutil.copytree(original, out)
    DAMAGE[damaged_file](out / "step_0000003" / damaged_file)
    with pytest.raises(train.TrainError, match=f"--resume {out / 'step_0000003'} is damaged: "
                                               f"{out / 'step_0000003' / damaged_file}"):
        run(corpus, out, "--steps", "3", "--resume", str(out / "step_0000003"))
    capsys.readouterr()
    resumed = run(corpus, out, "--steps", "3", "--resume", "auto")
    warning = capsys.readouterr().err
    assert f"skipping damaged checkpoint step_0000003: {out / 'step_0000003' / damaged_file}" in warning
    assert list(resumed["losses"]) == [3]  # from step 2
    assert_same_weights(weights(resumed["checkpoint"]), last_weights)
    assert len(list((out / checkpoint.ABANDONED_FOLDER).glob("*/step_0000003"))) == 1  # the damaged one, kept


def test_checkpoint_files_are_fsynced_before_the_rename(corpus, tmp_path, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: renamed.append((len(synced), str(a))) or real_replace(a, b))
    run(corpus, tmp_path, "--steps", "1")
    [(synced_before, temporary)] = [(n, a) for n, a in renamed if ".tmp_step_0000001" in a]
    for name in ("model.safetensors", "optimizer.pt", "config.json", "train_state.json", ""):
        assert str(Path(temporary) / name).rstrip("/") in synced[:synced_before], name


# ----------------------------------------------------------------------------------------------
# Exit statuses and the non-finite stop


def test_a_non_finite_gradient_norm_is_named_as_such(corpus, tmp_path, monkeypatch):
    real_step = train.train_step

    def infinite_gradient(*args, **kwargs):
        result = real_step(*args, **kwargs)
        return result | {"grad_norm": float("inf"), "finite": False}

    monkeypatch.setattr(train, "train_step", infinite_gradient)
    with pytest.raises(train.TrainError, match=r"non-finite gradient norm at step 1 \(loss \d"):
        run(corpus, tmp_path, "--steps", "2")


# ----------------------------------------------------------------------------------------------
# SIGKILL at random moments, several times, then the same final weights


def test_sigkill_at_random_moments_resumes_to_the_weights_of_an_uninterrupted_run(corpus, tmp_path):
    flags = [*SMALL, "--data", str(corpus), "--steps", "10", "--save_every", "1", "--keep_checkpoints", "2"]
    out = tmp_path / "killed"
    chance = random.Random(15)
    for _ in range(3):
        lines = (out / "metrics.jsonl").read_text().count("\n") if (out / "metrics.jsonl").exists() else 0
        process = subprocess.Popen([sys.executable, "train.py", *flags, "--out", str(out)], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        # Once it has trained two steps of its own (so saved one), kill it at a random moment of the
        # next ones: steps, saves and fsyncs take tens of milliseconds each here, so kills land in all.
        while process.poll() is None and ((out / "metrics.jsonl").read_text().count("\n")
                                          if (out / "metrics.jsonl").exists() else 0) < lines + 2:
            assert time.time() < deadline
            time.sleep(0.01)
        time.sleep(chance.uniform(0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert checkpoint.checkpoints_in(out), "no round got as far as a checkpoint"
    finished = run(corpus, out, "--steps", "10", "--save_every", "1", "--keep_checkpoints", "2", "--resume", "auto")
    reference = run(corpus, tmp_path / "reference", "--steps", "10", "--save_every", "5")
    assert finished["step"] == reference["step"] == 10
    assert_same_weights(weights(finished["checkpoint"]), weights(reference["checkpoint"]))


# ----------------------------------------------------------------------------------------------
# data.py: input errors with positions, a failed prepare changes nothing, verify catches a flipped token


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_invalid_utf8_in_a_jsonl_line_is_refused_naming_file_line_and_byte(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match=rf"{source}:2 is not UTF-8 \(byte 13 of the line"):
        data.prepare([source], tmp_path / "out", progress=False)


def test_a_failed_re_prepare_leaves_the_old_folder_identical_and_loadable(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(40)))
    out = tmp_path / "prepared"
    data.prepare([good], out, val_fraction=0.1, progress=False)
    before = folder_bytes(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "more text"}\n' * 5 + b"not json\n")
    with pytest.raises(data.DataError, match=rf"{bad}:6 is not valid JSON"):
        data.prepare([tmp_path / "good.jsonl", bad], out, val_fraction=0.1, progress=False)
    assert folder_bytes(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left aside
    assert data.TokenLoader(out, "train", 8, 2).next_batch().inputs.shape == (2, 8)
    with pytest.raises(data.DataError, match="holds files prepare did not write \\(notes.txt\\)"):
        (out / "notes.txt").write_text("mine")
        data.prepare([good], out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_flipped_token_fails_data_py_verify_naming_the_shard(tmp_path, capsys):
    source = tmp_path / "text.txt"
    source.write_text("a few words of text, " * 50)
    out = tmp_path / "prepared"
    data.prepare([source], out, val_fraction=0, progress=False)
    data.main(["verify", str(out)])  # intact: exits normally
    assert "all 1 shard(s) match" in capsys.readouterr().out
    shard = out / "train_000000.bin"
    raw = bytearray(shard.read_bytes())
    n_documents = data.HEADER.unpack(bytes(raw[:data.HEADER.size]))[4]
    raw[data.HEADER.size + 8 * n_documents] ^= 1  # the first token's lowest bit: still a valid id
    shard.write_bytes(bytes(raw))
    assert data.read_shard(shard).tokens.size  # size and header still pass; only the hash tells
    with pytest.raises(SystemExit) as exit:
        data.main(["verify", str(out)])
    assert exit.value.code == 1
    assert f"error: {shard} has SHA-256" in capsys.readouterr().err
