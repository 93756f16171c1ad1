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
(4L: --extend_factor 4, the default; --extend_rope_factor F sets the recipe's RoPE factor.) A data folder
with synthetic retrieval documents (python data.py synthetic) adds the retrieval probes at L, 2L, 4L, 8L.
The table goes to the terminal and to eval/before_after.md (results.json and plots beside it).
Flags of its own: --recipe, --extend_steps, --extend_factor, --extend_rope_factor, --extend_data, --samples,
--tasks; --out and --steps
(default 1500 here, so that the default run fills a few CPU minutes) are read too; every other flag
goes to train.py, and the ones that must agree (--data --seed --data_seed --threads --device
--compact_vocab) to extend.py. --extend_data DIR gives the extensions their own folder (long
documents) in --data's vocabulary; evaluation stays on --data's held-out split.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import checkpoint
import compact_vocabulary
import data
import evaluate
import extend
import files
import ruler
import stages
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
    extend_steps: int = setting(150, "extension steps, 2 sequences of the extended length each on CPU (default: "
                                "%(default)s)", EXPERIMENT)
    extend_factor: int = setting(4, "extended length / L, also the longest evaluated length (default: %(default)s; "
                                 "OlmPool: 8, 8K -> 64K)", EXPERIMENT, metavar="N")
    extend_rope_factor: float | None = setting(None, "the recipe's RoPE factor (ABF: new base = the model's theta x F, "
                                               "OlmPool's x16; default: the recipe's own numbers)", EXPERIMENT,
                                               metavar="F")
    extend_data: str | None = setting(None, "the extensions' data folder, in --data's vocabulary (default: --data)",
                                      EXPERIMENT, metavar="DIR")
    samples: int = setting(10, "recall prompts per task and length (default: %(default)s)", EXPERIMENT)
    tasks: str = setting("niah_single_1,niah_multikey_2", "RULER-style tasks for the recall columns (default: "
                         "%(default)s)", EXPERIMENT, metavar="TASKS")


def run(command: list[str], what: str):
    """One stage as a child process that dies with this one (stages.die_with_parent: killed with -9
    included), so a rerun never writes beside an orphan."""
    print(f"\n=== {what}: {' '.join(command[1:])}", flush=True)
    stage = subprocess.Popen(command, preexec_fn=stages.die_with_parent)
    try:
        status = stage.wait()
    except KeyboardInterrupt:  # the terminal sent the stage Ctrl-C too: let it save and exit, then stop
        stage.wait()
        raise
    if status in (130, 143):  # the stage saved and stopped on Ctrl-C or SIGTERM
        raise KeyboardInterrupt
    if status != 0:
        raise SystemExit(f"error: {what} failed (exit status {status}); fix what it says above and rerun the same "
                         f"command: finished stages are kept")


def check(settings: ExperimentConfig):
    """Everything the stages will be given, checked before the first: train.py's settings (the
    parse), the architecture, and the recall tasks (ruler.parse_tasks, as evaluate.py reads them)."""
    model_config(settings)
    ruler.parse_tasks(settings.tasks)
    check_extension_data(settings)


def check_extension_data(settings: ExperimentConfig) -> None:
    """--extend_data is read by the pretrained model, so it must be in --data's vocabulary: compared here
    (compact_vocabulary's name and mapping of each folder) rather than by extend.py after pretraining."""
    folder = settings.extend_data
    if folder is None:
        return
    if not Path(folder).is_dir():
        raise TrainError(f"--extend_data {folder}: no such folder; pass a prepared data folder (data.py)")
    if not settings.data:
        raise TrainError(f"--extend_data {folder} needs --data: the pretraining folder whose vocabulary it shares")
    (ours, our_mapping), (theirs, their_mapping) = map(compact_vocabulary.vocabulary_name, (settings.data, folder))
    if our_mapping != their_mapping:
        raise TrainError(f"--data {settings.data} uses {ours}, but --extend_data {folder} uses {theirs}: the same ids "
                         f"would mean other text; prepare both folders in one vocabulary")
    if our_mapping is None and compact_vocab_size(settings):  # each folder would get its own compact mapping
        raise TrainError(f"--compact_vocab {settings.compact_vocab} would compact --data and --extend_data each on "
                         f"its own, into different mappings; pass folders already in one compact vocabulary")


def extension_stage(settings: ExperimentConfig, source: Path | str, recipe: str, length: int,
                    out: Path) -> extend.ExtendConfig:
    """The settings of one extend.py stage, made (and so checked: ExtendConfig's rules) as extend.py
    will make them: the extension's own fields, then the settings both stages share."""
    shared = {name: getattr(settings, name) for name in SHARED_SETTINGS}
    shared["data"] = settings.extend_data or settings.data  # the same vocabulary: check_extension_data
    rope = {"rope_factor": settings.extend_rope_factor} if settings.extend_rope_factor and recipe != "none" else {}
    return extend.ExtendConfig(source=str(source), recipe=recipe, seq_len=settings.extend_factor * length,
                               steps=settings.extend_steps, out=str(out), model=rope, **shared)


def extension_argv(stage: extend.ExtendConfig) -> list[str]:
    """The stage's own fields, then the shared ones as the stage holds them (its --data: --extend_data's)."""
    stage_fields = {"source": stage.source, "recipe": stage.recipe, "seq_len": stage.seq_len, "steps": stage.steps,
                    "out": stage.out, **stage.model}  # model: the recipe's RoPE factor, when one is given
    return [*to_argv(stage_fields, extend.ExtendConfig), *to_argv(stage, TrainConfig, only=SHARED_SETTINGS)]


def main(argv=None):
    settings = parse(ExperimentConfig, command_line(ExperimentConfig, "experiment.py", __doc__), argv,
                     check=check)  # refuses bad flags, for every stage, before anything runs
    base = Path(settings.out) if settings.out else run_folder(f"{settings.name or run_name(settings)}-experiment")
    length = settings.seq_len or model_config(settings).context_length
    for recipe in (settings.recipe, "none"):  # the extensions' settings, checked now rather than after pretraining
        extension_stage(settings, base / "pretrain", recipe, length, base / f"extend-{recipe}")
    files.lock_folder(base, "experiment.py")  # one job per folder; the kernel drops the lock with this process
    try:
        return stages_in(settings, base, length)
    finally:
        files.unlock_folder(base)


def stages_in(settings: ExperimentConfig, base: Path, length: int) -> str:
    """Pretrain, extend twice, evaluate: each stage the ordinary command, which skips what is done."""
    python = sys.executable
    pretrain = [*to_argv(dataclasses.replace(settings, out=None), TrainConfig), "--out", str(base / "pretrain")]
    run([python, "train.py", *pretrain], "1/3 pretrain")
    source = checkpoint.checkpoints_in(base / "pretrain")[-1]
    extended = {}
    for recipe in (settings.recipe, "none"):
        stage = extension_stage(settings, source, recipe, length, base / f"extend-{recipe}")
        run([python, "extend.py", *extension_argv(stage)], f"2/3 extend ({recipe})")
        extended[recipe] = checkpoint.checkpoints_in(Path(stage.out))[-1]
    # The data pretraining used (already prepared), in the vocabulary its stages used: its held-out split
    # is the evaluation's, whichever folder the extensions read.
    folder = train.data_dir(settings.data, compact_vocab_size(settings), train.Distributed())
    print(f"\n=== 3/3 evaluate at {length} and {settings.extend_factor * length} tokens -> {base / 'eval'}", flush=True)
    checkpoints = {"pretrained": str(source), "extended": str(extended[settings.recipe]),
                   "none control": str(extended["none"])}
    table = evaluate.before_after(checkpoints, folder, length, base / "eval", tasks=ruler.parse_tasks(settings.tasks),
                                  samples=settings.samples, seed=settings.seed, long_factor=settings.extend_factor)
    write_atomically(base / "eval" / "before_after.md", table + "\n")
    print(f"\n(saved in {base / 'eval' / 'before_after.md'}; plots and every number beside it)")
    return table


if __name__ == "__main__":
    try:
        main()
    except (TrainError, data.DataError, checkpoint.CheckpointError, files.FolderBusy, ruler.EvaluationError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # the stage running saved first (its own Ctrl-C handling); rerun to continue
        print("interrupted; rerun the same command to continue: finished stages are kept", file=sys.stderr)
        sys.exit(130)
