"""sweep.py's entry faults (issue 19): one sweep per --out, stages that die with the sweep, every flag
(its own and what it passes to the stages) checked before the first stage, a failed stage reported
before any analysis, and metrics.jsonl read past a torn line."""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import files  # noqa: E402
import pool_analysis  # noqa: E402
import sweep  # noqa: E402
from sweep import Settings, Stage  # noqa: E402
from test_entry_faults_eval import held_by_another_process  # noqa: E402

TINY = ["--n_layers", "2", "--d_model", "32", "--n_heads", "4", "--head_dim", "8", "--mlp_hidden", "64",
        "--context_length", "32", "--window", "16", "--only", "pre_4kv_32", "--steps", "4", "--save_every", "4",
        "--ext_factor", "4", "--ext_steps", "2", "--eval_factors", "1,4", "--samples", "1", "--windows", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import data
    return data.prepare_builtin_corpus(tmp_path_factory.mktemp("corpus"), max_tokens=100_000, progress=False)


@pytest.fixture
def nothing_runs(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a stage was launched")
    monkeypatch.setattr(sweep, "execute", must_not_run)


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie waiting for its reaper counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# ----------------------------------------------------------------------------------------------
# One sweep per --out


def test_a_second_sweep_into_the_same_out_is_refused_naming_the_holder_but_plan_is_not(tmp_path, corpus, capsys,
                                                                                       nothing_runs):
    out = tmp_path / "sweep"
    with held_by_another_process(out, "sweep.py") as holder:
        start = time.monotonic()
        assert sweep.main(["--out", str(out), *TINY, "--data", str(corpus)]) == 1
        assert time.monotonic() - start < 5
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and f"in use by process {holder}" in error
        assert sweep.main(["--plan", "--out", str(out), *TINY, "--data", str(corpus)]) == 0  # --plan writes nothing
    files.lock_folder(out, "test")  # the kernel dropped the dead holder's lock
    files.unlock_folder(out)


# ----------------------------------------------------------------------------------------------
# Stages die with the sweep


def test_a_stage_dies_when_the_sweep_running_it_is_killed(tmp_path):
    pid_file = tmp_path / "stage.pid"
    stage_script = "import os, pathlib, sys, time; pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); time.sleep(60)"
    parent_script = (
        "import sys, sweep\n"
        "from pathlib import Path\n"
        f"out = Path({str(tmp_path / 'out')!r})\n"
        f"stage = sweep.Stage('a/sleep', [sys.executable, '-c', {stage_script!r}, {str(pid_file)!r}], out, "
        "[out / 'never'])\n"
        "sweep.execute([stage], sweep.Settings(out=out), jobs=1, gpus=[], log=lambda *_: None)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_script], cwd=REPO)
    stage_pid = None
    try:
        assert wait_for(lambda: pid_file.is_file() and pid_file.read_text(), 20), "the stage never started"
        stage_pid = int(pid_file.read_text())
        assert alive(stage_pid)
        parent.kill()
        parent.wait()
        assert wait_for(lambda: not alive(stage_pid), 5), "the stage outlived the sweep that ran it"
    finally:
        parent.kill()
        if stage_pid and alive(stage_pid):
            os.kill(stage_pid, 9)


# ----------------------------------------------------------------------------------------------
# Every flag checked before the first stage


SWEEP_FLAG_FAULTS = {
    "recipe bogus": (["--recipe", "bogus"], "--recipe"),
    "ext_factor 0": (["--ext_factor", "0"], "--ext_factor 0"),
    "budgets 0": (["--budgets", "0"], "--budgets 0"),
    "eval_factors 0": (["--eval_factors", "0"], "--eval_factors 0"),
    "windows 0": (["--windows", "0"], "--windows 0"),
    "tasks bogus": (["--tasks", "bogus"], "unknown task 'bogus'"),
    "samples 0": (["--samples", "0"], "--samples 0"),
    "threads 0": (["--threads", "0"], "--threads 0"),
    "save_every 0": (["--save_every", "0"], "--save_every 0"),
    "seeds -1": (["--seeds", "-1"], "--seeds -1"),
    "lr -1": (["--lr", "-1"], "--lr -1"),
    "batch_sequences 0": (["--batch_sequences", "0"], "--batch_sequences 0"),
    "missing data": (["--data", "{tmp}/no_such_data"], "no such folder"),
    "data not prepared": (["--data", "{tmp}"], "not a prepared data folder"),
    "extra_train unknown flag": (["--extra_train=--bogus 1"], "unrecognized arguments: --bogus 1"),
    "extra_train bad value": (["--extra_train=--lr -1"], "--lr -1"),
    "out a file": (["--out", "{tmp}/a_file"], "is a file"),
    "jobs 0": (["--jobs", "0"], "--jobs 0"),
    "from_rows missing": (["--from_rows", "{tmp}/no_analysis.json"], "not an analysis.json"),
    "from_rows not one": (["--from_rows", "{tmp}/a_file"], "not an analysis.json"),
    "rope_theta 1": (["--rope_theta", "1"], "--rope_theta 1.0 must be a finite number above 1"),
    "rope_theta twice": (["--rope_theta", "1e4", "--extra_train=--rope_theta 1e4"], "both set the pretraining RoPE"),
    "ext_rope_factor 0.5": (["--ext_rope_factor", "0.5"], "--ext_rope_factor 0.5 must be a finite number of at"),
    "ext_rope_factor on none": (["--recipe", "none", "--ext_rope_factor", "16"], "the control keeps RoPE unchanged"),
    "control_models unknown": (["--control_models", "nope"], "--control_models ['nope']: no such run"),
    "ext_data missing": (["--ext_data", "{tmp}/no_such_data"], "--ext_data {tmp}/no_such_data: no such folder"),
    "ext_data not prepared": (["--ext_data", "{tmp}"], "not a prepared data folder"),
    "ext_data other vocabulary": (["--ext_data", "{tmp}/compact"], "the same ids would mean other text"),
}


def compact_vocabulary_folder(folder: Path) -> Path:
    """A folder holding only a valid compact vocabulary file: another vocabulary than dolma2's."""
    import json

    import data
    ids = list(range(1000, 1100))
    folder.mkdir()
    (folder / data.COMPACT_VOCAB_FILE).write_text(json.dumps({
        "format": data.COMPACT_FORMAT, "version": 1, "base_bpe_sha256": data.CL100K_SHA256, "dolma2_ids": ids,
        "vocab_size": data.FIRST_FREQUENT_ID + len(ids), "mapping_sha256": data.mapping_sha256(ids)}))
    return folder


@pytest.mark.parametrize("case", list(SWEEP_FLAG_FAULTS))
def test_each_bad_flag_is_refused_in_one_line_before_any_stage_runs(case, tmp_path, corpus, capsys, nothing_runs):
    flags, expected = SWEEP_FLAG_FAULTS[case]
    (tmp_path / "a_file").write_text("not a folder")
    compact_vocabulary_folder(tmp_path / "compact")
    expected = expected.replace("{tmp}", str(tmp_path))
    argv = ["--out", str(tmp_path / "sweep"), *TINY, "--data", str(corpus),
            *[f.replace("{tmp}", str(tmp_path)) for f in flags]]
    assert sweep.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and expected in error, error
    assert not (tmp_path / "sweep" / "runs").exists()


# ----------------------------------------------------------------------------------------------
# A failed stage is reported, with its command and log, before any analysis


def test_a_failed_stage_is_reported_with_its_command_and_log_before_the_analysis(tmp_path, corpus, capsys,
                                                                                 monkeypatch):
    fail = Stage("a/fail", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "f",
                 [tmp_path / "f" / "never"])
    with pytest.raises(sweep.SweepError) as failure:
        sweep.execute([fail], Settings(out=tmp_path), jobs=1, gpus=[], log=lambda *_: None)
    assert shlex.join(fail.command) in str(failure.value)  # quoted as a shell would need it, to paste and rerun
    assert str(tmp_path / "logs" / "a__fail.log") in str(failure.value)

    def failing_execute(*args, **kwargs):
        raise failure.value
    monkeypatch.setattr(sweep, "execute", failing_execute)
    assert sweep.main(["--out", str(tmp_path / "sweep"), *TINY, "--data", str(corpus)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: 1 stage(s) failed") and "a/fail failed (exit 3)" in error and "boom" in error
    assert error.index("a/fail failed") < error.index("no analysis")
    assert (tmp_path / "sweep" / "index.json").is_file()


def test_a_failure_blocks_the_whole_chain_after_it_and_is_still_reported_with_its_log(tmp_path):
    fail = Stage("a/pretrain", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "f",
                 [tmp_path / "f" / "never"])
    extend = Stage("a/extend", [sys.executable, "-c", "pass"], tmp_path / "x", [tmp_path / "x" / "x"],
                   after=["a/pretrain"])
    evaluate = Stage("a/eval", [sys.executable, "-c", "pass"], tmp_path / "e", [tmp_path / "e" / "x"],
                     after=["a/extend"])
    with pytest.raises(sweep.SweepError, match=r"(?s)1 stage\(s\) failed, 2 blocked.*a/pretrain failed \(exit 3\)"
                                               r".*a__pretrain.log.*boom"):
        sweep.execute([fail, extend, evaluate], Settings(out=tmp_path), jobs=1, gpus=[], log=lambda *_: None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "e").exists()


def test_ctrl_c_ends_the_sweep_in_one_line_and_exit_130(tmp_path, corpus, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sweep, "execute", interrupted)
    assert sweep.main(["--out", str(tmp_path / "sweep"), *TINY, "--data", str(corpus)]) == 130
    assert capsys.readouterr().err.strip() == "error: interrupted; the same command resumes every unfinished stage"


# ----------------------------------------------------------------------------------------------
# metrics.jsonl: a torn last line is skipped


def test_the_last_val_loss_skips_a_torn_line_cut_mid_character(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 2, "val_loss": 3.0}\n5\n{"step": 3, "val_loss": 2.5, "note": "\xe2\x82')
    assert pool_analysis.last_val_loss(metrics) == 3.0
    metrics.write_bytes(b'{"step": 2, "val_loss": 3.0}\n{"step": 3, "val_lo{"step": 4, "val_loss": 2.0}\n')
    assert pool_analysis.last_val_loss(metrics) == 3.0
