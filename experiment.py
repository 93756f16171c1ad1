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

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import checkpoint
import data
import evaluate
import extend
import train
from files import write_atomically
from settings import (RUN, TrainConfig, TrainError, command_line, compact_vocab_size, model_config, parse,
                      run_folder, run_name, setting, to_argv)

PRETRAIN_STEPS = 1500  # 768K tokens at the tiny default: about 3 minutes on 2 CPU cores
# train.py settings that extend.py must share, so that both stages use the same data and machine.
SHARED_SETTINGS = ("data", "seed", "data_seed", "threads", "device", "compact_vocab")
EXPERIMENT = "experiment (what experiment.py adds to train.py's flags)"


@dataclass
class ExperimentConfig(TrainConfig):
    """train.py's settings for the pretraining stage (more steps by default), plus the other stages'."""
    steps: int = setting(PRETRAIN_STEPS, "pretraining steps (default: %(default)s)", RUN)
    recipe: str = setting("olmpool", "the extension recipe compared with the `none` control (default: %(default)s)",
                          EXPERIMENT, choices=tuple(r for r in extend.RECIPES if r != "none"))
    extend_steps: int = setting(150, "extension steps, 2 sequences of 4L each on CPU (default: %(default)s)",
                                EXPERIMENT)
    samples: int = setting(10, "recall prompts per task and length (default: %(default)s)", EXPERIMENT)
    tasks: str = setting("niah_single_1,niah_multikey_2", "RULER-style tasks for the recall columns (default: "
                         "%(default)s)", EXPERIMENT, metavar="TASKS")


def run(command: list[str], what: str):
    print(f"\n=== {what}: {' '.join(command[1:])}", flush=True)
    status = subprocess.run(command).returncode
    if status != 0:
        raise SystemExit(f"error: {what} failed (exit status {status}); fix what it says above and rerun the same "
                         f"command: finished stages are kept")


def main(argv=None):
    settings = parse(ExperimentConfig, command_line(ExperimentConfig, "experiment.py", __doc__), argv,
                     check=model_config)  # refuses bad train.py flags before anything runs
    base = Path(settings.out) if settings.out else run_folder(f"{settings.name or run_name(settings)}-experiment")
    python = sys.executable
    pretrain = [*to_argv(dataclasses.replace(settings, out=None), TrainConfig), "--out", str(base / "pretrain")]
    run([python, "train.py", *pretrain], "1/3 pretrain")
    source = checkpoint.checkpoints_in(base / "pretrain")[-1]
    length = settings.seq_len or model_config(settings).context_length
    extended = {}
    for recipe in (settings.recipe, "none"):
        out = base / f"extend-{recipe}"
        stage = to_argv({"source": str(source), "recipe": recipe, "seq_len": 4 * length, "steps": settings.extend_steps,
                         "out": str(out)}, extend.ExtendConfig)
        run([python, "extend.py", *stage, *to_argv(settings, TrainConfig, only=SHARED_SETTINGS)],
            f"2/3 extend ({recipe})")
        extended[recipe] = checkpoint.checkpoints_in(out)[-1]
    # The data the run trained on (already prepared), in the vocabulary its stages used.
    folder = train.data_dir(settings.data, compact_vocab_size(settings), train.Distributed())
    print(f"\n=== 3/3 evaluate at {length} and {4 * length} tokens -> {base / 'eval'}", flush=True)
    checkpoints = {"pretrained": str(source), "extended": str(extended[settings.recipe]),
                   "none control": str(extended["none"])}
    table = evaluate.before_after(checkpoints, folder, length, base / "eval", tasks=settings.tasks.split(","),
                                  samples=settings.samples, seed=settings.seed)
    write_atomically(base / "eval" / "before_after.md", table + "\n")
    print(f"\n(saved in {base / 'eval' / 'before_after.md'}; plots and every number beside it)")
    return table


if __name__ == "__main__":
    try:
        main()
    except (TrainError, data.DataError) as error:
        sys.exit(f"error: {error}")
