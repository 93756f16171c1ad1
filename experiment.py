"""The main job: one architecture through OlmPool's whole experiment, pretrain -> extend -> evaluate.

    ./run.sh                                   # = python experiment.py: the tiny default, CPU, ~30 minutes
    ./run.sh --qk_norm headwise --gqa 4        # train.py's flags pass through to every stage
    ./run.sh --regime text --steps 400         # the earlier regime: plain text, L = 256, a few minutes

Two regimes, each a set of default flags that the flags you give override:
    retrieval (the default)  the built-in corpus in a compact vocabulary of 4,096 ids, mixed with 90% synthetic
                             retrieval documents (copy spans, key-value recall, a needle; python data.py
                             synthetic), packed under a document mask, built once in data/; L = 128, RoPE
                             theta 10,000, 12,000 steps of 8 x 128 tokens (12.3M), then extension to 8L with
                             ABF x16 on long documents for 420 steps of 2 x 8L (about 7% of pretraining's
                             tokens): the probes show retrieval at L and what extension does to it beyond L
    text                     the built-in corpus only, L = 256, theta 500,000, 1,500 steps of 2 x 256, extension
                             to 4L: loss and LongPPL only (tiny models on text use ~16 tokens of context)

Each stage is the ordinary command, which resumes by itself, so the same line continues a run that
was interrupted and skips what is done. Everything goes into one folder, runs/NAME-retrieval/ (in the
text regime runs/NAME-experiment/; or --out), NAME as train.py names the run from the flags given:
    pretrain/         python train.py ARGS                            pretraining at length L
    extend-olmpool/   python extend.py --recipe olmpool --seq_len kL  extension with ABF (the study's recipe)
    extend-none/      python extend.py --recipe none --seq_len kL     the control: same training, RoPE unchanged
    eval/             evaluate.before_after(...)                      held-out loss and LongPPL at L and kL,
                                                                      RULER-style recall, and on a synthetic mix
                                                                      the retrieval probes at L, 2L, 4L, 8L
(k: --extend_factor; --extend_rope_factor F sets the recipe's RoPE factor.)
The table goes to the terminal and to eval/before_after.md (results.json and plots beside it).
Flags of its own: --regime, --recipe, --extend_steps, --extend_factor, --extend_rope_factor, --extend_data,
--samples, --tasks; --out and --steps are read too; every other flag
goes to train.py, and the ones that must agree (--data --seed --data_seed --threads --device
--compact_vocab) to extend.py. --extend_data DIR gives the extensions their own folder (long
documents) in --data's vocabulary; evaluation stays on --data's held-out split. In the retrieval regime
--data replaces the built mixes (give --extend_data with it, or the extensions read --data too).
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
import synthetic
import train
from files import write_atomically
from settings import (RUN, TrainConfig, TrainError, command_line, compact_vocab_size, model_config, parse,
                      run_folder, run_name, setting, to_argv)

PRETRAIN_STEPS = 1500  # the text regime's: 768K tokens at the tiny default, about 3 minutes on 2 CPU cores
REGIMES = ("retrieval", "text")
# The retrieval regime's flags, put before the ones given (the last of a flag wins). Measured in
# results/regime_gate/, results/regime_main/ and README "The main job's two regimes": on this mix in the
# 4,096-id vocabulary the default model formed retrieval at L after 5.1-6.1M, 8.2-9.2M and 10.2-11.3M
# tokens in three seeds of four (the fourth had not by 12.3M); emergence slows with the context searched
# (Musat et al. 2025, arXiv 2511.01033), hence L = 128. Theta 10,000 is above the smallest base that still
# retrieves at 128-256 tokens (Men et al. 2024, arXiv 2405.14591: ~8.6e3 at 256), so ABF x16 (-> 160,000) is
# a real change by 8L; OlmPool extends 8K -> 64K (x8) with about 7% of pretraining's tokens: 420 steps of
# 2 x 1,024 = 860K of 12.3M.
RETRIEVAL_FLAGS = ("--context_length", "128", "--rope_theta", "10000", "--mask_documents", "--batch_tokens", "1024",
                   "--micro_batch", "8", "--steps", "12000", "--warmup", "100", "--schedule", "wsd",
                   "--extend_factor", "8", "--extend_rope_factor", "16", "--extend_steps", "420")
# The compact vocabulary of the regime's mixes, unless --compact_vocab (or --init_from's weights) says
# otherwise. At tiny the unembedding and its softmax dominate: 4,096 ids train 1.7x the tokens per second
# of 8,192 (10.5K against 6.2K on 2 cores), and retrieval formed in fewer tokens too (8,192 ids: 11.3-12.3M
# in one seed, none by 19.5M in the other; results/regime_main/vocab4096/).
RETRIEVAL_COMPACT_VOCAB = 4096
RETRIEVAL_SHARE = 0.9      # of pretraining's tokens synthetic (the gate's dense mix); its documents 32 tokens and up
EXTENSION_SHARE = 0.5      # of the long extension mix's
# train.py settings that extend.py must share, so that both stages use the same data and machine.
SHARED_SETTINGS = ("data", "seed", "data_seed", "threads", "device", "compact_vocab")
EXPERIMENT = "experiment (what experiment.py adds to train.py's flags)"


@dataclass
class ExperimentConfig(TrainConfig):
    """train.py's settings for the pretraining stage (more steps by default), plus the other stages'."""
    steps: int = setting(PRETRAIN_STEPS, "pretraining steps (default: 12000 in the retrieval regime, %(default)s in "
                         "the text regime)", RUN)
    regime: str = setting("retrieval", "retrieval: a synthetic retrieval mix, L 128 (about 30 minutes on 2 cores); text: "
                          "the built-in text, L 256 (minutes); the docstring above lists each one's flags (default: "
                          "%(default)s)", EXPERIMENT, choices=REGIMES)
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
    try:
        compact_vocabulary.check_extension_vocabulary(settings.data, folder, "--extend_data")
    except data.DataError as error:
        raise TrainError(str(error)) from None
    dolma2 = compact_vocabulary.vocabulary_name(folder)[1] is None  # both folders: checked equal above
    if dolma2 and compact_vocab_size(settings):  # each folder would get its own compact mapping
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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = command_line(ExperimentConfig, "experiment.py", __doc__)
    asked = parse(ExperimentConfig, parser, argv)  # the flags as given: the regime, and the run's name
    regime_flags = list(RETRIEVAL_FLAGS) if asked.regime == "retrieval" else []
    settings = parse(ExperimentConfig, parser, regime_flags + argv,
                     check=check)  # refuses bad flags, for every stage, before anything runs
    suffix = "retrieval" if settings.regime == "retrieval" else "experiment"
    base = Path(settings.out) if settings.out else run_folder(f"{asked.name or run_name(asked)}-{suffix}")
    length = settings.seq_len or model_config(settings).context_length
    for recipe in (settings.recipe, "none"):  # the extensions' settings, checked now rather than after pretraining
        extension_stage(settings, base / "pretrain", recipe, length, base / f"extend-{recipe}")
    files.lock_folder(base, "experiment.py")  # one job per folder; the kernel drops the lock with this process
    try:
        return stages_in(settings, base, length)
    finally:
        files.unlock_folder(base)


def retrieval_data(settings: ExperimentConfig, length: int) -> ExperimentConfig:
    """The retrieval regime without --data: its two mixes, built once beside the built-in corpus (about a
    minute; a folder already built is reused if it holds the same recipe), as --data and --extend_data."""
    if settings.regime != "retrieval" or settings.data:
        return settings
    given = settings.compact_vocab is not None or settings.init_from  # else the regime's own vocabulary
    corpus = train.data_dir(None, compact_vocab_size(settings) if given else RETRIEVAL_COMPACT_VOCAB,
                            train.Distributed())
    long = settings.extend_factor * length
    mixes = {"data": (corpus.with_name(f"{corpus.name}_retrieval_L{length}"), length, RETRIEVAL_SHARE, "packed"),
             "extend_data": (corpus.with_name(f"{corpus.name}_retrieval_long_{long}"), long, EXTENSION_SHARE, "long")}
    vocab = data.read_manifest(corpus)["tokenizer"]
    # The vocabulary's rarest ids, an eighth of them at most (512 of the compact 4,096): markers and keys
    # that text never uses (results/regime_gate/).
    ids = synthetic.default_ids(vocab, min(synthetic.DEFAULT_IDS_SIZE, vocab["vocab_size"] // 8))
    folders = {}
    for field, (folder, seq_len, share, layout) in mixes.items():
        recipe = synthetic.recipe_of(folder, check=False)  # None: no folder (or not a mix: build_mix refuses)
        wanted = {"seq_len": seq_len, "share": share, "lengths": layout, "kinds": list(synthetic.DEFAULT_KINDS),
                  "ids": {"first": ids.first, "size": ids.size}}
        if recipe is not None and any(recipe.get(key) != value for key, value in wanted.items()):
            raise data.DataError(f"{folder} holds another synthetic mix than the retrieval regime's {wanted}; remove "
                                 f"it, or pass --data (and --extend_data) to train on it")
        if recipe is None:
            print(f"\n=== 0/3 data: the retrieval regime's {layout} mix for length {seq_len} -> {folder}", flush=True)
            synthetic.build_mix(corpus, folder, seq_len, share, ids=ids, lengths=layout)
        folders[field] = str(folder)
    # The mixes carry the corpus's compact vocabulary: the stages read it from them.
    return dataclasses.replace(settings, compact_vocab=None, **folders)


def stages_in(settings: ExperimentConfig, base: Path, length: int) -> str:
    """(Build the regime's data,) pretrain, extend twice, evaluate: each stage the ordinary command, which
    skips what is done."""
    settings = retrieval_data(settings, length)
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
