"""The main job: one architecture through OlmPool's whole experiment, pretrain -> extend -> evaluate.

    ./run.sh                                   # = python experiment.py: the tiny default, CPU, minutes
    ./run.sh --qk_norm headwise --gqa 4        # train.py's flags pass through to every stage
    python experiment.py --steps 400 --samples 20

Each stage is the ordinary command, which resumes by itself, so the same line continues a run that
was interrupted and skips what is done. Everything goes into one folder, runs/NAME-experiment/ (or
--out), NAME as train.py names the run:
    pretrain/         python train.py ARGS --steps 1500               pretraining at length L
    extend-olmpool/   python extend.py --recipe olmpool --seq_len 4L  extension with ABF (the study's recipe)
    extend-none/      python extend.py --recipe none --seq_len 4L     the control: same training, RoPE unchanged
    eval/             evaluate.before_after(...)                      held-out loss and LongPPL at L and 4L, and
                                                                      RULER-style recall, for all three models
The table goes to the terminal and to eval/before_after.md (results.json and plots beside it).
Flags of its own: --recipe, --extend_steps, --samples, --tasks; --out and --steps (default 1500 here,
so that the default run fills a few CPU minutes) are read too; every other flag goes to train.py, and
the ones that must agree (--data --seed --data_seed --threads --device --compact_vocab) to extend.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import checkpoint
import data
import evaluate
import extend
import train

PRETRAIN_STEPS = 1500  # 768K tokens at the tiny default: about 3 minutes on 2 CPU cores
# train.py flags that extend.py must see too, so that both stages use the same data and machine.
SHARED_FLAGS = ("--data", "--seed", "--data_seed", "--threads", "--device", "--compact_vocab")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="experiment.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="olmpool", choices=[r for r in extend.RECIPES if r != "none"],
                        help="the extension recipe compared with the `none` control (default: %(default)s)")
    parser.add_argument("--extend_steps", type=int, default=150,
                        help="extension steps, 2 sequences of 4L each on CPU (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=10,
                        help="recall prompts per task and length (default: %(default)s)")
    parser.add_argument("--tasks", default="niah_single_1,niah_multikey_2",
                        help="RULER-style tasks for the recall columns (default: %(default)s)")
    return parser


def shared_flags(train_argv: list[str]) -> list[str]:
    """The SHARED_FLAGS (with their values) among train.py's arguments."""
    shared = []
    for i, word in enumerate(train_argv):
        name = word.split("=", 1)[0]
        if name in SHARED_FLAGS:
            shared += [word] if "=" in word else train_argv[i:i + 2]
    return shared


def run(command: list[str], what: str):
    print(f"\n=== {what}: {' '.join(command[1:])}", flush=True)
    status = subprocess.run(command).returncode
    if status != 0:
        raise SystemExit(f"error: {what} failed (exit status {status}); fix what it says above and rerun the same "
                         f"command: finished stages are kept")


def main(argv=None):
    own, train_argv = build_parser().parse_known_args(argv)
    if not any(word.split("=")[0] == "--steps" for word in train_argv):
        train_argv = [*train_argv, "--steps", str(PRETRAIN_STEPS)]
    train_args = train.parse_args(train_argv)  # refuses bad train.py flags before anything runs
    base = Path(train_args.out) if train_args.out else \
        train.REPO_DIR / "runs" / f"{train_args.name or train.run_name(train_args)}-experiment"
    python = sys.executable
    run([python, "train.py", *train_argv, "--out", str(base / "pretrain")], "1/3 pretrain")
    source = checkpoint.checkpoints_in(base / "pretrain")[-1]
    length = train_args.seq_len or train.model_config(train_args).context_length
    extended = {}
    for recipe in (own.recipe, "none"):
        out = base / f"extend-{recipe}"
        run([python, "extend.py", "--from", str(source), "--recipe", recipe, "--seq_len", str(4 * length),
             "--steps", str(own.extend_steps), "--out", str(out), *shared_flags(train_argv)], f"2/3 extend ({recipe})")
        extended[recipe] = checkpoint.checkpoints_in(out)[-1]
    train_args.init_from = str(source)  # so that data_dir picks the checkpoint's vocabulary, as the stages did
    folder = train.data_dir(train_args, train.Distributed())  # the data the run trained on (already prepared)
    print(f"\n=== 3/3 evaluate at {length} and {4 * length} tokens -> {base / 'eval'}", flush=True)
    checkpoints = {"pretrained": str(source), "extended": str(extended[own.recipe]),
                   "none control": str(extended["none"])}
    table = evaluate.before_after(checkpoints, folder, length, base / "eval", tasks=own.tasks.split(","),
                                  samples=own.samples, seed=train_args.seed)
    (base / "eval" / "before_after.md").write_text(table + "\n")
    print(f"\n(saved in {base / 'eval' / 'before_after.md'}; plots and every number beside it)")
    return table

if __name__ == "__main__":
    try:
        main()
    except (train.TrainError, data.DataError) as error:
        sys.exit(f"error: {error}")
