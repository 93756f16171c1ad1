"""Issue 19's faults at train.py's, extend.py's and experiment.py's entry points: one writer per run
folder, stages that die with their parent, weights checked where they enter, Ctrl-C as SIGTERM, a
full disk during a save, a torn metrics.jsonl, a malformed train_state.json, a missing shard, and
the flags of extend.py and experiment.py checked before any work. Each ends in one line naming the
problem and the fix, with a non-zero exit and nothing lost.

Small models and few steps (test_train.SMALL); processes only where they are the point.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoint  # noqa: E402
import data  # noqa: E402
import experiment  # noqa: E402
import extend  # noqa: E402
import files  # noqa: E402
import train  # noqa: E402
from test_train import SMALL, run, weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PYTHON = sys.executable


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return data.prepare_builtin_corpus(tmp_path_factory.mktemp("entry_corpus"), max_tokens=300_000, progress=False)


@pytest.fixture(scope="module")
def two_steps(corpus, tmp_path_factory):
    """A run folder that saved steps 1 and 2."""
    out = tmp_path_factory.mktemp("two_steps") / "run"
    run(corpus, out, "--steps", "2", "--save_every", "1", "--keep_checkpoints", "0", "--context_length", "16")
    return out


def one_error_line(text: str) -> str:
    """The one line an entry point printed on stderr for a fault (no traceback)."""
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1, text
    return lines[0]


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for(condition, seconds: float, process=None):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline and (process is None or process.poll() is None), \
            process.communicate() if process is not None and process.poll() is not None else "timed out"
        time.sleep(0.05)


def start_train(corpus, out, *flags):
    return subprocess.Popen([PYTHON, "train.py", *SMALL, "--data", str(corpus), "--out", str(out), *flags], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def has_metrics(out):
    return lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0


# ----------------------------------------------------------------------------------------------
# 1. One writer per run folder


def test_a_second_train_py_into_one_folder_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(
        corpus, tmp_path):
    out = tmp_path / "run"
    holder = start_train(corpus, out, "--steps", "100000", "--save_every", "100000")
    try:
        wait_for(has_metrics(out), 120, holder)
        holder.send_signal(signal.SIGSTOP)  # holding the lock, without taking the CPU the second run needs
        start = time.time()
        second = subprocess.run([PYTHON, "train.py", *SMALL, "--data", str(corpus), "--out", str(out), "--steps", "3"],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        took = time.time() - start
        assert second.returncode == 1
        line = one_error_line(second.stderr)
        assert f"is in use by process {holder.pid} (train.py)" in line and "choose another folder" in line
        assert took < 30, took  # refused, not queued behind the stopped holder; room for a loaded machine's start
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    assert not checkpoint.checkpoints_in(out)
    assert run(corpus, out, "--steps", "1")["step"] == 1  # the kernel dropped the killed holder's lock


def test_experiment_py_refuses_a_base_folder_another_process_holds(corpus, tmp_path, monkeypatch):
    base = tmp_path / "job"
    holder = subprocess.Popen([PYTHON, "-c", f"import files, time; files.lock_folder({str(base)!r}, 'experiment.py'); "
                               f"print('held', flush=True); time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(experiment, "run", lambda *a: pytest.fail("a stage started"))
        with pytest.raises(files.FolderBusy, match=f"in use by process {holder.pid} \\(experiment.py\\)"):
            experiment.main([*SMALL, "--data", str(corpus), "--out", str(base), "--steps", "2"])
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------------------------
# 2. A stage dies with its parent


def test_a_stage_of_experiment_py_ends_when_its_parent_is_killed_with_sigkill(tmp_path):
    child_pid = tmp_path / "child.pid"
    child = f"import os, time; open({str(child_pid)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = subprocess.Popen([PYTHON, "-c", textwrap.dedent(f"""
        import sys, experiment
        experiment.run([sys.executable, "-c", {child!r}], "a stage")""")], cwd=REPO)
    try:
        wait_for(lambda: child_pid.is_file() and child_pid.read_text(), 60, parent)
        pid = int(child_pid.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.time() + 5
        while alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not alive(pid), "the stage outlived experiment.py"
    finally:
        if child_pid.is_file() and child_pid.read_text() and alive(int(child_pid.read_text())):
            os.kill(int(child_pid.read_text()), signal.SIGKILL)


def test_train_py_workers_ask_to_die_with_torchruns_agent(monkeypatch):
    asked = []
    monkeypatch.setattr(train.stages, "die_with_parent", lambda: asked.append(True))
    monkeypatch.setattr(train.dist, "init_process_group", lambda *a, **k: None)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    train.setup_distributed("cpu")
    assert asked == [True]


# ----------------------------------------------------------------------------------------------
# 3. Weights checked where they enter: resume, --init_from, extend --from


def poison(name: str):
    """Damage model.safetensors of a checkpoint folder in one way; returns the tensor the error names."""
    def change(folder):
        state = load_file(folder / "model.safetensors")
        tensor = "embed.weight" if "embed.weight" in state else sorted(state)[0]
        if name == "nan":
            state[tensor][0, 0] = float("nan")
        elif name == "inf":
            state[tensor][0, 0] = float("inf")
        elif name == "int32":
            state[tensor] = state[tensor].to(torch.int32)
        elif name == "missing":
            tensor = sorted(state)[-1]
            del state[tensor]
        elif name == "extra":
            tensor = "extra.weight"
            state[tensor] = torch.zeros(2)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return tensor
    return change


POISONS = {"nan": "NaN or infinite", "inf": "NaN or infinite", "int32": "int32, not a floating-point type",
           "missing": "missing tensor", "extra": "unexpected tensor"}


def refresh_sizes(folder):
    """train_state.json's recorded sizes updated, so that only the weights' content is wrong (a
    checkpoint written so, not one damaged on disk)."""
    state = json.loads((folder / "train_state.json").read_text())
    state["files"]["model.safetensors"] = (folder / "model.safetensors").stat().st_size
    (folder / "train_state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("kind", POISONS)
def test_poisoned_weights_are_refused_by_resume_naming_the_tensor(corpus, two_steps, tmp_path, kind):
    out = tmp_path / "run"
    shutil.copytree(two_steps, out)
    tensor = poison(kind)(out / "step_0000002")
    refresh_sizes(out / "step_0000002")
    with pytest.raises(train.TrainError, match="model.safetensors: ") as error:
        run(corpus, out, "--steps", "3", "--context_length", "16", "--resume", str(out / "step_0000002"))
    assert f"tensor '{tensor}'" in str(error.value) and POISONS[kind] in str(error.value)


@pytest.mark.parametrize("kind", POISONS)
def test_poisoned_weights_are_refused_by_init_from_and_extend_from_naming_the_tensor(
        corpus, two_steps, tmp_path, capsys, kind):
    source = tmp_path / "source"
    shutil.copytree(two_steps / "step_0000002", source)
    tensor = poison(kind)(source)
    with pytest.raises(train.TrainError, match="model.safetensors: ") as error:
        run(corpus, tmp_path / "init", "--steps", "1", "--init_from", str(source))
    assert f"tensor '{tensor}'" in str(error.value) and POISONS[kind] in str(error.value)
    with pytest.raises(SystemExit) as exit:
        extend.main([*SMALL, "--data", str(corpus), "--from", str(source), "--seq_len", "64", "--batch_tokens", "128",
                     "--micro_batch", "1", "--steps", "1", "--out", str(tmp_path / "ext"), "--held_out_documents", "0"])
    assert exit.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"tensor '{tensor}'" in line and POISONS[kind] in line, line


def test_poisoned_weights_are_refused_by_fsdp_init_from_naming_the_tensor(corpus, two_steps, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(two_steps / "step_0000002", source)
    tensor = poison("nan")(source)
    done = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py",
                           *SMALL, "--data", str(corpus), "--out", str(tmp_path / "run"), "--steps", "1", "--fsdp",
                           "--device", "cpu", "--init_from", str(source)], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode != 0
    assert f"error: {source / 'model.safetensors'}: tensor '{tensor}' holds 1 NaN" in done.stderr, done.stderr[-3000:]


def test_another_architecture_is_refused_by_init_from_naming_the_field(corpus, two_steps, tmp_path):
    with pytest.raises(train.TrainError, match="is a different architecture \\(d_model: checkpoint 32, this run 48"):
        run(corpus, tmp_path / "init", "--steps", "1", "--d_model", "48",
            "--init_from", str(two_steps / "step_0000002"))


def test_a_non_finite_checkpoint_is_never_called_the_last_good_one(two_steps, tmp_path):
    saved = tmp_path / "step_0000002"
    shutil.copytree(two_steps / "step_0000002", saved)
    good = train.non_finite_error({"loss": float("nan"), "grad_norm": 1.0}, 3, 1e-3, saved)
    assert f"the last good checkpoint is {saved}" in str(good)
    poison("nan")(saved)
    bad = str(train.non_finite_error({"loss": float("nan"), "grad_norm": 1.0}, 3, 1e-3, saved))
    assert "last good checkpoint" not in bad and "not good either" in bad and "embed.weight" in bad


# ----------------------------------------------------------------------------------------------
# 4. Ctrl-C behaves as SIGTERM: the step finishes, a checkpoint is saved, exit 130


def test_ctrl_c_saves_a_checkpoint_and_exits_130_without_a_traceback(corpus, tmp_path):
    out = tmp_path / "run"
    process = start_train(corpus, out, "--steps", "100000", "--save_every", "100000")
    wait_for(has_metrics(out), 120, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == train.INTERRUPTED_EXIT_STATUS == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    [saved] = checkpoint.checkpoints_in(out)
    assert "SIGINT (Ctrl-C): saved" in stdout and checkpoint.checkpoint_problem(saved) is None


def test_ctrl_c_under_torchrun_saves_on_every_rank_without_a_keyboardinterrupt(corpus, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                "train.py", *SMALL, "--micro_batch", "1", "--data", str(corpus), "--out", str(out),
                                "--steps", "100000", "--save_every", "100000", "--device", "cpu"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(has_metrics(out), 120, process)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group gets it
    stdout, stderr = process.communicate(timeout=120)
    assert "KeyboardInterrupt" not in stderr, stderr[-3000:]  # (torchrun's own agent reports the signal its way)
    [saved] = checkpoint.checkpoints_in(out)
    assert "SIGINT (Ctrl-C): saved" in stdout and checkpoint.checkpoint_problem(saved) is None


def test_a_preempted_extension_exits_with_the_signals_status_and_skips_the_comparison(
        corpus, two_steps, tmp_path, monkeypatch):
    summary = {"preempted": True, "exit_status": train.INTERRUPTED_EXIT_STATUS,
               "checkpoint": two_steps / "step_0000002"}
    monkeypatch.setattr(train, "train", lambda *a, **k: summary)
    monkeypatch.setattr(extend, "compare_held_out", lambda *a: pytest.fail("compared a run not finished"))
    with pytest.raises(SystemExit) as exit:
        extend.main([*SMALL, "--data", str(corpus), "--from", str(two_steps / "step_0000002"), "--seq_len", "64",
                     "--batch_tokens", "128", "--micro_batch", "1", "--steps", "1", "--out", str(tmp_path / "ext")])
    assert exit.value.code == 130


# ----------------------------------------------------------------------------------------------
# 5. A full disk during a save


def torch_save_failing_at(step: int, error: Exception):
    real = torch.save

    def save(obj, path, *args, **kwargs):
        if f"step_{step:07d}" in str(path):
            Path(path).write_bytes(b"\0" * 1000)  # part of the file, as a full disk leaves it
            raise error
        return real(obj, path, *args, **kwargs)
    return save


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                   RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                                                "failed writing file data/0: file write failed")],
                         ids=["ENOSPC", "wrapped by torch"])
def test_a_save_that_fails_removes_its_partial_folder_and_says_how_much_space_it_needs(
        corpus, tmp_path, monkeypatch, capsys, error):
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", torch_save_failing_at(2, error))
    with pytest.raises(SystemExit) as exit:
        train.main([*SMALL, "--data", str(corpus), "--out", str(out), "--steps", "3", "--save_every", "1"])
    assert exit.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"saving {out / 'step_0000002'} failed" in line and "the checkpoint needs about" in line
    assert "free space there" in line and "MiB" in line
    assert [p.name for p in checkpoint.checkpoints_in(out)] == ["step_0000001"]  # the one before is whole
    assert not list(out.glob(".tmp_*"))


# ----------------------------------------------------------------------------------------------
# 6. metrics.jsonl: whole lines, and a torn last line neither glued onto nor fatal


def test_a_torn_last_metrics_line_is_dropped_before_the_next_record_and_skipped_by_readers(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    run(corpus, out, "--steps", "2", "--stop_at", "1")
    metrics = out / "metrics.jsonl"
    with open(metrics, "a") as file:
        file.write('{"step": 2, "loss": 5.1')  # a run stopped mid-write
    assert [r["step"] for r in files.read_json_lines(metrics)] == [1]
    run(corpus, out, "--steps", "2")
    assert "dropped the torn last line" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]


# ----------------------------------------------------------------------------------------------
# 7. A malformed train_state.json: refused by --resume DIR, skipped by --resume auto


MALFORMED = {"step abc": ("step", "abc"), "step -5": ("step", -5), "no tokens_seen": ("tokens_seen", None),
             "step of another folder": ("step", 1)}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_train_state_is_refused_naming_file_and_key_and_skipped_by_auto(
        corpus, two_steps, tmp_path, capsys, case):
    key, value = MALFORMED[case]
    out = tmp_path / "run"
    shutil.copytree(two_steps, out)
    state_file = out / "step_0000002" / "train_state.json"
    state = json.loads(state_file.read_text())
    state.pop(key) if value is None else state.update({key: value})
    state_file.write_text(json.dumps(state))
    with pytest.raises(train.TrainError, match=f"--resume {out / 'step_0000002'} is damaged: {state_file}.*'{key}'"):
        run(corpus, out, "--steps", "3", "--context_length", "16", "--resume", str(out / "step_0000002"))
    capsys.readouterr()
    resumed = run(corpus, out, "--steps", "3", "--context_length", "16", "--resume", "auto")
    assert f"skipping damaged checkpoint step_0000002: {state_file}" in capsys.readouterr().err
    assert list(resumed["losses"]) == [2, 3]  # from step 1


# ----------------------------------------------------------------------------------------------
# 8. A shard listed in the manifest but missing


def test_a_missing_shard_ends_train_and_extend_in_one_line(corpus, two_steps, tmp_path, capsys):
    folder = tmp_path / "data"
    shutil.copytree(corpus, folder)
    manifest = data.read_manifest(folder)
    shard = folder / manifest["splits"]["train"]["shards"][0]["file"]
    shard.unlink()
    with pytest.raises(SystemExit) as exit:
        train.main([*SMALL, "--data", str(folder), "--out", str(tmp_path / "run"), "--steps", "1"])
    assert exit.value.code == 1
    assert shard.name in one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit:
        extend.main([*SMALL, "--data", str(folder), "--from", str(two_steps / "step_0000002"), "--seq_len", "64",
                     "--batch_tokens", "128", "--micro_batch", "1", "--steps", "1", "--out", str(tmp_path / "ext")])
    assert exit.value.code == 1
    assert shard.name in one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------
# 9. extend.py's flags, checked before any work


BAD_EXTEND_FLAGS = [
    (["--seq_len", "8"], "--seq_len 8 is shorter than the source's context of 16 tokens"),
    (["--held_out_documents", "-1"], "--held_out_documents -1 must be a non-negative integer"),
    (["--dry_run", "--gpus", "0"], "--gpus 0 must be a positive integer"),
    (["--dry_run", "--gpu_memory", "-1"], "--gpu_memory -1.0 must be a positive finite number of GiB"),
]


@pytest.mark.parametrize("flags, message", BAD_EXTEND_FLAGS, ids=[" ".join(f) for f, _ in BAD_EXTEND_FLAGS])
def test_a_bad_extend_flag_is_refused_in_one_line_before_any_work(corpus, two_steps, tmp_path, capsys, flags, message):
    out = tmp_path / "ext"
    with pytest.raises(SystemExit) as exit:
        extend.main([*SMALL, "--data", str(corpus), "--from", str(two_steps / "step_0000002"), "--out", str(out),
                     "--steps", "1", *flags])
    assert exit.value.code in (1, 2)
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# 10. experiment.py's flags, and what it passes to the stages, checked before the first stage


BAD_EXPERIMENT_FLAGS = [
    (["--tasks", "bogus"], "--tasks: unknown task 'bogus'"),
    (["--samples", "0"], "--samples 0 must be a positive integer"),
    (["--extend_steps", "0"], "--extend_steps 0 must be a positive integer"),
]


@pytest.mark.parametrize("flags, message", BAD_EXPERIMENT_FLAGS, ids=[" ".join(f) for f, _ in BAD_EXPERIMENT_FLAGS])
def test_a_bad_experiment_flag_is_refused_before_pretraining(corpus, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(experiment, "run", lambda *a: pytest.fail("a stage started"))
    with pytest.raises(SystemExit) as exit:
        experiment.main([*SMALL, "--data", str(corpus), "--out", str(tmp_path / "job"), *flags])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "job").exists()
