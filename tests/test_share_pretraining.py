"""share_pretraining.py: a windowed model pretrained within its window is its all-global twin, byte for byte.

The sweep counts on it (sweep.pretraining_twin): these train both models and compare, then check that
a shared checkpoint reads, resumes and is refused where the windows would have changed the model.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoint  # noqa: E402
import data  # noqa: E402
import share_pretraining  # noqa: E402
import train  # noqa: E402

# A small model on sequences of 16 tokens, with windows of 16 on 3 of 4 layers (or none).
SMALL = ["--d_model", "32", "--n_layers", "4", "--n_heads", "4", "--n_kv_heads", "2", "--head_dim", "8",
         "--mlp_hidden", "64", "--context_length", "16", "--seq_len", "16", "--global_every", "4",
         "--batch_tokens", "64", "--micro_batch", "2", "--eval_every", "4", "--eval_batches", "1", "--log_every", "100",
         "--peak_flops", "1e12", "--threads", "1", "--steps", "6", "--save_every", "2"]
CHECKPOINT_FILES = ("config.json", "model.safetensors", "optimizer.pt", "compact_vocab.json")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return data.prepare_builtin_corpus(tmp_path_factory.mktemp("corpus"), max_tokens=300_000, progress=False)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """The all-global twin and the windowed model, each pretrained by train.py."""
    root = tmp_path_factory.mktemp("runs")
    for name, window in (("global", "none"), ("windowed", "16")):
        train.train(train.parse_args([*SMALL, "--window", window, "--stop_at", "4", "--data", str(corpus),
                                      "--out", str(root / name)]))
    return root


def files_of(step: Path) -> dict:
    return {name: (step / name).read_bytes() for name in CHECKPOINT_FILES if (step / name).is_file()}


def test_the_twins_pretraining_with_the_window_set_is_the_windowed_models_own_byte_for_byte(trained, tmp_path):
    shared = share_pretraining.share(trained / "global", tmp_path / "shared", window=16)
    own = checkpoint.checkpoints_in(trained / "windowed")
    assert [p.name for p in shared] == [p.name for p in own] == ["step_0000002", "step_0000004"]
    for ours, theirs in zip(shared, own):
        assert files_of(ours) == files_of(theirs)  # config.json included: the window is set, nothing else moves
        assert checkpoint.checkpoint_problem(ours) is None
        state = json.loads((ours / checkpoint.STATE_FILE).read_text())
        assert state["args"]["window"] == 16 and state["shared_from"] == str((trained / "global" / ours.name).resolve())
    assert checkpoint.read_config(shared[-1]).layer_windows == checkpoint.read_config(own[-1]).layer_windows
    losses = lambda run: [(r["step"], r.get("loss"), r.get("val_loss")) for r in  # noqa: E731
                          map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert losses(tmp_path / "shared") == losses(trained / "windowed")


def test_a_shared_run_resumes_as_its_own(trained, corpus, tmp_path):
    share_pretraining.share(trained / "global", tmp_path / "shared", window=16)
    shutil.copytree(trained / "windowed", tmp_path / "own")
    for out in (tmp_path / "shared", tmp_path / "own"):  # on to the last step, from step 4
        train.train(train.parse_args([*SMALL, "--window", "16", "--data", str(corpus), "--out", str(out)]))
    assert files_of(tmp_path / "shared" / "step_0000006") == files_of(tmp_path / "own" / "step_0000006")


def test_sharing_is_refused_where_the_windows_would_have_changed_the_model(trained, tmp_path):
    with pytest.raises(share_pretraining.ShareError, match="beyond the window of 8"):
        share_pretraining.share(trained / "global", tmp_path / "a", window=8)
    with pytest.raises(share_pretraining.ShareError, match="must have every layer global"):
        share_pretraining.share(trained / "windowed", tmp_path / "b", window=16)
    with pytest.raises(share_pretraining.ShareError, match="no complete checkpoint"):
        share_pretraining.share(tmp_path / "nothing", tmp_path / "c", window=16)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything is written


def test_the_command_line_names_the_fault_in_one_line(trained, tmp_path, capsys):
    assert share_pretraining.main([str(trained / "global"), "--window", "8", "--out", str(tmp_path / "x")]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("error:") and "needs its own pretraining" in said[0]
    with pytest.raises(SystemExit):
        share_pretraining.main([str(trained / "global"), "--window", "0", "--out", str(tmp_path / "y")])
    assert "--window 0 must be a positive number" in capsys.readouterr().err
