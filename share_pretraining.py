"""A windowed model's pretraining, taken from its all-global twin when the windows change nothing there.

A sliding window of W tokens reaches every earlier token of a sequence of at most W tokens, so a model
pretrained at a context no longer than its window computes, at every step, what the same model with
every layer global computes: same loss, same gradients, same weights (OlmPool's 4K models and their
4,096-token windows; the mini pool's 64-token models and their 64-token windows). Only beyond that
context, at extension and in evaluations at longer lengths, do the two differ. So the sweep pretrains
the all-global twin once and gives the windowed model the twin's checkpoints with the window set in
their config: every step_N folder, weights and optimizer state as they are (hard links where the
file system allows), config.json and train_state.json rewritten, and the run's metrics.jsonl.

    python share_pretraining.py RUNS/pre_8kv_64/s0/pretrain --window 64 --out RUNS/pre_8kv_64_SWA/s0/pretrain

On one CPU machine the two trainings are the same bytes (tests/test_share_pretraining.py trains both and
compares them); on a GPU, whose kernels need not be deterministic, sharing picks one sample of the
run-to-run noise for both, which leaves the pair differing in the windows alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import checkpoint
import files
from olmpool import ModelConfig


class ShareError(ValueError):
    """A twin whose checkpoints cannot stand for the windowed model's; the message says why and what to do."""


def windowed_config(step: Path, window: int) -> ModelConfig:
    """The windowed model's config at one of the twin's checkpoints, after checking that the windows would
    change nothing there."""
    problem = checkpoint.checkpoint_problem(step)
    if problem is not None:
        raise ShareError(f"{problem}; rerun the twin's pretraining")
    config = checkpoint.read_config(step)
    if config.window is not None:
        raise ShareError(f"{step} has windows of {config.window}; the twin must have every layer global")
    trained_on = json.loads((step / checkpoint.STATE_FILE).read_text()).get("args", {}).get("seq_len")
    longest = max(config.context_length, trained_on or 0)
    if longest > window:
        raise ShareError(f"{step} was pretrained on {longest} tokens, beyond the window of {window}: there the "
                         f"windows change the model, so it needs its own pretraining")
    return dataclasses.replace(config, window=window)


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # checkpoints are written once, never in place: a link is as good as a copy
    except OSError:  # another file system, or one without links
        shutil.copy2(source, target)


def share_checkpoint(step: Path, out: Path, config: ModelConfig) -> Path:
    """OUT/step_N from the twin's step_N with `config` (windowed_config's): built in a temporary folder,
    renamed into place when complete."""
    final, temporary = out / step.name, out / f".tmp_{step.name}"
    shutil.rmtree(temporary, ignore_errors=True)  # left by a share that was killed
    temporary.mkdir(parents=True)
    state = json.loads((step / checkpoint.STATE_FILE).read_text())
    for item in step.iterdir():
        if item.is_dir():  # an FSDP checkpoint's dcp/
            shutil.copytree(item, temporary / item.name, copy_function=link_or_copy)
        elif item.name not in (checkpoint.CONFIG_FILE, checkpoint.STATE_FILE):
            link_or_copy(item, temporary / item.name)
    checkpoint.write_config(temporary, config)
    state["args"] = state.get("args", {}) | {"window": config.window, "out": str(out.resolve())}
    state["shared_from"] = str(step.resolve())
    written = temporary / checkpoint.CONFIG_FILE
    state["files"] = state.get("files", {}) | {written.name: written.stat().st_size}  # what resume checks
    (temporary / checkpoint.STATE_FILE).write_text(json.dumps(state) + "\n")  # last: marks the folder complete
    files.fsync_tree(temporary)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    return final


def share(source: Path, out: Path, window: int) -> list[Path]:
    """Every checkpoint of the twin's run folder `source` into `out`, with `window`; returns the new folders."""
    steps = checkpoint.checkpoints_in(source)
    if not steps:
        raise ShareError(f"{source} holds no complete checkpoint; pretrain the all-global twin first")
    configs = {step: windowed_config(step, window) for step in steps}  # every one checked before anything is written
    files.lock_folder(out, "share_pretraining.py")
    names = {step.name for step in steps}
    for _, stale in checkpoint.step_folders(out):  # left by a share of another run: not this twin's
        if stale.name not in names:
            shutil.rmtree(stale)
    shared = [share_checkpoint(step, out, config) for step, config in configs.items()]
    if (source / "metrics.jsonl").is_file():
        files.write_atomically(out / "metrics.jsonl", (source / "metrics.jsonl").read_bytes())
    files.fsync_tree(out, files=False)
    return shared


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Used by sweep.py for the windowed runs pretrained within their window.")
    parser.add_argument("source", type=Path, help="the all-global twin's pretraining folder (its step_N checkpoints)")
    parser.add_argument("--window", type=int, required=True, help="the windowed model's window, at least the "
                        "twin's pretraining context")
    parser.add_argument("--out", type=Path, required=True, help="the windowed model's pretraining folder")
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error(f"--window {args.window} must be a positive number of tokens, e.g. --window 64")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        shared = share(args.source, args.out, args.window)
    except (ShareError, checkpoint.CheckpointError, files.FolderBusy) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(shared)} checkpoint(s) of {args.source} shared into {args.out} with windows of {args.window}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
