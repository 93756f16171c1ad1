"""A run's settings: one typed dataclass, its command line, its checks, and back to a command line.

`TrainConfig` holds every setting of a train.py run beside the architecture (`ModelConfig`, whose
every field is a flag too). Each field carries its flag's help text and --help group, so the
flags are built from the dataclass in one place (`add_flags`), the parsed flags become the
dataclass in one place (`from_namespace`, the only code that reads an argparse.Namespace), and a
TrainConfig is checked once, when it is made (`__post_init__`). extend.py's `ExtendConfig` and
experiment.py's `ExperimentConfig` are subclasses: the same settings with other defaults, plus
their own fields. `to_argv` writes settings back as flags, so a script that launches another
builds the command from these same definitions.

    settings = parse(TrainConfig, command_line(TrainConfig, "train.py", __doc__), ["--gqa", "4"])
    model_config(settings)  # the preset at its size, then the explicit model flags
    to_argv(settings)       # ["--gqa", "4"]: what differs from the defaults
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import checkpoint
import compact_vocabulary
import data
import olmpool
from olmpool import ModelConfig

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_PRESET = "H_post_LQK_32kv_8k_11k_SWA"  # Olmo 3 7B's architecture, the OlmPool "H" family
DEFAULT_SIZE = "tiny"  # trains on a laptop CPU in minutes
# Peak learning rate by size. 7B: OlmPool's 3e-4. Smaller models tolerate, and need, larger steps
# (the best rate falls roughly with width: GPT-3's table runs from 6e-4 at 125M to 1.2e-4 at 6.7B);
# tiny's 3e-3 trains stably on the built-in corpus (loss 11.6 -> ~5.5 in the default 100 steps of
# 512 tokens on dolma2; 9.0 -> ~6.1 on the compact 8192 vocabulary, val 3.3 bits/byte); the middle
# sizes are interpolations, still to be tuned.
LEARNING_RATES = {"tiny": 3e-3, "20m": 1e-3, "150m": 6e-4, "1b": 4e-4, "7b": 3e-4}
# Default global batch in sequences, by device: fixed, so that the data order never depends on the
# world size (pass --batch_tokens to compare runs across devices).
DEFAULT_SEQUENCES = {"cpu": 2, "cuda": 64}
# Compact vocabulary by size, for the built-in corpus (0: dolma2). 8192 ids keep 95% of its dolma2
# tokens whole and train ~10x the bytes of text per second of the full vocabulary at tiny
# (`python bench.py --vocab`); published sizes keep dolma2, as OlmPool does.
COMPACT_VOCAB_BY_SIZE = {"tiny": 8192}
LOSS_CHUNK = olmpool.LOSS_CHUNK  # positions per cross-entropy chunk (the model's chunked loss)
# The --help groups, in the order they appear.
MODEL, RUN, RECIPE, CHECKPOINTS = ("model", "run", "optimizer and schedule (OlmPool's recipe)",
                                   "checkpoints, evaluation and logging")


class TrainError(ValueError):
    """A problem with the user's run, flags or checkpoints; the message names it and the fix."""


def run_folder(name: str) -> Path:
    """Where a run goes when --out is not given: runs/NAME in the repository."""
    return REPO_DIR / "runs" / name


# ----------------------------------------------------------------------------------------------
# Fields that are flags


def setting(default, help: str, group: str, **flag) -> dataclasses.Field:
    """A field that is also a flag: its default, its help text, its --help group, and argparse's
    options beyond the type (choices, metavar; flag: another name than --FIELD)."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **flag})


def int_or_none(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def float_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


int_or_none.__name__, float_or_none.__name__ = "int or none", "float or none"  # argparse: "invalid int or none value"


def model_flag_help(field: dataclasses.Field) -> str:
    """A ModelConfig field's help: its one text, in olmpool.py (the field's metadata["help"])."""
    return field.metadata["help"]


def flag_type(hint) -> tuple[type, bool]:
    """(the type a flag parses, whether it also takes "none") of a field's type hint."""
    options = [option for option in typing.get_args(hint) if option is not type(None)]
    return (options[0], True) if options else (hint, False)


def add_model_flags(group):
    """Every ModelConfig field as a flag; one given explicitly overrides the preset."""
    shown = olmpool.preset(DEFAULT_PRESET, DEFAULT_SIZE)
    hints = typing.get_type_hints(ModelConfig)
    for field in dataclasses.fields(ModelConfig):
        kind, nullable = flag_type(hints[field.name])
        parse = {int: int_or_none, float: float_or_none}[kind] if nullable else kind
        metavar = "MODE" if field.name in olmpool.CHOICES else "X" if kind is float else "N"
        group.add_argument(f"--{field.name}", type=parse, choices=olmpool.CHOICES.get(field.name),
                           default=argparse.SUPPRESS, metavar=metavar,
                           help=f"{model_flag_help(field)} [{getattr(shown, field.name)}]")


def add_flags(parser: argparse.ArgumentParser, kind: type) -> argparse.ArgumentParser:
    """A flag for each field of the settings dataclass `kind`, in its --help group; the `model`
    field stands for every ModelConfig field."""
    groups, hints = {}, typing.get_type_hints(kind)
    for field in dataclasses.fields(kind):
        title = field.metadata["group"]
        if title not in groups:
            description = (f"a preset at a size, then any field below [its value in {DEFAULT_PRESET} at "
                           f"{DEFAULT_SIZE}]" if title == MODEL else None)
            groups[title] = parser.add_argument_group(title, description)
        if field.name == "model":
            add_model_flags(groups[title])
            continue
        kind_, _ = flag_type(hints[field.name])
        options = dict(help=field.metadata["help"], default=field.default)
        if kind_ is bool:
            options["action"] = "store_true"
        else:
            options.update(type=kind_, metavar=field.metadata.get("metavar", "X" if kind_ is float else "N"),
                           choices=field.metadata.get("choices"))
            if options["choices"] is not None and "metavar" not in field.metadata:
                del options["metavar"]  # argparse shows the choices
        groups[title].add_argument(field.metadata.get("flag", f"--{field.name}"), dest=field.name, **options)
    return parser


def command_line(kind: type, prog: str, description: str) -> argparse.ArgumentParser:
    """The command line of a script whose settings are `kind`: its docstring, then its flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description, usage=f"python {prog} [--flag VALUE ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_flags(parser, kind)


def from_namespace(kind: type, namespace: argparse.Namespace):
    """The settings the parsed flags give: each field's flag, and the model flags given explicitly."""
    model = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(ModelConfig) if hasattr(namespace, f.name)}
    return kind(**{f.name: model if f.name == "model" else getattr(namespace, f.name)
                   for f in dataclasses.fields(kind)})


def parse(kind: type, parser: argparse.ArgumentParser, argv: list[str] | None = None, check=None):
    """The settings of argv, or argparse's exit naming the flag; `check(settings)` may refuse more
    (a ValueError), e.g. model_config, so that a bad switch fails now rather than after setting up."""
    namespace = parser.parse_args(argv)
    try:
        settings = from_namespace(kind, namespace)
        if check is not None:
            check(settings)
    except ValueError as error:  # TrainError and ModelConfig's errors name the flag and the fix
        parser.error(str(error))
    return settings


def to_argv(values, kind: type | None = None, only: tuple[str, ...] | None = None) -> list[str]:
    """The flags that give `values` back. Settings: every field (of `kind`, default their own
    class; of `only`, if given) that differs from kind's default, and every explicit model flag.
    A dict of fields: each one, in its order. None and False give no flag."""
    kind = kind or type(values)
    fields = {f.name: f for f in dataclasses.fields(kind)}
    pairs = list(values.items()) if isinstance(values, dict) else []
    for name, field in ({} if isinstance(values, dict) else fields).items():
        if only is not None and name not in only:
            continue
        if name == "model":  # each one given explicitly, "none" included
            pairs += [(key, "none" if value is None else value) for key, value in values.model.items()]
        elif getattr(values, name) != field.default:
            pairs.append((name, getattr(values, name)))
    argv = []
    for name, value in pairs:
        flag = fields[name].metadata.get("flag", f"--{name}") if name in fields else f"--{name}"
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def to_record(settings) -> dict:
    """The settings as train_state.json keeps them ("args"): each field, the model flags beside them."""
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name != "model"}
    return fields | settings.model


def from_record(kind: type, saved: dict):
    """Settings from a train_state.json's "args", of any age: keys it does not know are left out,
    fields it lacks take their default."""
    names = {f.name for f in dataclasses.fields(kind)}
    model = {f.name: saved[f.name] for f in dataclasses.fields(ModelConfig) if f.name in saved}
    return kind(**{name: value for name, value in saved.items() if name in names and name != "model"}, model=model)


# ----------------------------------------------------------------------------------------------
# The settings of a train.py run


@dataclass
class TrainConfig:
    """A train.py run beside its architecture; each field is the flag of the same name."""
    # The architecture: a preset at a size, then explicit ModelConfig fields (model_config).
    preset: str = setting(DEFAULT_PRESET, "OlmPool preset, or llama3_like, olmo3_like, qwen3_like", MODEL,
                          metavar="NAME")
    size: str = setting(DEFAULT_SIZE, "the preset at this size (default: %(default)s)", MODEL,
                        choices=tuple(olmpool.SIZES))
    gqa: int | None = setting(None, "n_heads / n_kv_heads (mlp_hidden kept)", MODEL)
    swa: bool = setting(False, "OlmPool's windows (tiny: 128), 3 local : 1 global", MODEL)
    model: dict = dataclasses.field(default_factory=dict, metadata={"group": MODEL})  # ModelConfig fields given

    data: str | None = setting(None, "a `data.py prepare` folder (default: built-in)", RUN, metavar="DIR")
    compact_vocab: int | None = setting(None, "train on N ids (0: dolma2; built-in tiny: 8192)", RUN)
    out: str | None = setting(None, "checkpoints, metrics.jsonl (default: runs/NAME)", RUN, metavar="DIR")
    name: str | None = setting(None, "run name (default: preset, size, model flags)", RUN, metavar="NAME")
    seed: int = setting(0, "weight init and data order (default: %(default)s)", RUN)
    data_seed: int | None = setting(None, "data order only (default: --seed)", RUN)
    seq_len: int | None = setting(None, "tokens per sequence (default: context_length)", RUN)
    batch_tokens: int | None = setting(None, "global batch (default: 2 sequences on CPU, 64 GPU)", RUN)
    micro_batch: int | None = setting(None, "sequences per device per pass (default: 2 or 1)", RUN)
    steps: int = setting(100, "optimizer steps the schedule spans (default: %(default)s)", RUN)
    stop_at: int | None = setting(None, "save and stop after this step (time limits)", RUN, metavar="STEP")
    mask_documents: bool = setting(False, "attend only within each document", RUN)
    device: str = setting("auto", "auto: a GPU if any (default: %(default)s)", RUN, choices=("auto", "cpu", "cuda"))
    threads: int | None = setting(None, "CPU threads per process (default: torch's)", RUN)
    fsdp: bool = setting(False, "shard weights, gradients, optimizer (FSDP2)", RUN)
    compile: bool = setting(False, "torch.compile each block", RUN)
    activation_checkpointing: bool = setting(False, "recompute blocks in backward: less memory", RUN)
    loss_chunk: int = setting(LOSS_CHUNK, "positions per cross-entropy chunk (default: %(default)s)", RUN)

    lr: float | None = setting(None, "peak learning rate (default by --size: 3e-3 to 3e-4)", RECIPE)
    schedule: str = setting("cosine", "decay after warmup; wsd: at the end (default: %(default)s)", RECIPE,
                            choices=("cosine", "linear", "wsd"))
    warmup: int | None = setting(None, "warmup steps (default: 2000, or --steps / 10)", RECIPE)
    min_lr_ratio: float = setting(0.1, "final lr / peak lr (default: %(default)s)", RECIPE)
    decay_fraction: float = setting(0.2, "wsd: share of steps decaying (default: %(default)s)", RECIPE)
    weight_decay: float = setting(0.1, "AdamW's, not on embeddings, norms (default: %(default)s)", RECIPE)
    beta1: float = setting(0.9, "AdamW beta1 (default: %(default)s)", RECIPE)
    beta2: float = setting(0.95, "AdamW beta2 (default: %(default)s)", RECIPE)
    eps: float = setting(1e-8, "AdamW epsilon (default: %(default)s)", RECIPE)
    z_loss: float = setting(1e-5, "weight of logsumexp(logits)^2 (default: %(default)s)", RECIPE)
    grad_clip: float = setting(1.0, "clip the gradient norm to this (default: %(default)s)", RECIPE)

    save_every: int = setting(50, "checkpoint every N steps (default: %(default)s)", CHECKPOINTS)
    keep_checkpoints: int = setting(3, "keep the newest N; 0: all (default: %(default)s)", CHECKPOINTS)
    resume: str = setting("auto", "auto: the newest in --out, if any; never; or step_N", CHECKPOINTS,
                          metavar="auto|never|DIR")
    init_from: str | None = setting(None, "start from these weights only, at step 0", CHECKPOINTS,
                                    metavar="DIR|hf:DIR")
    eval_every: int = setting(50, "val loss every N steps; 0: never (default: %(default)s)", CHECKPOINTS)
    eval_batches: int = setting(4, "val batches per evaluation (default: %(default)s)", CHECKPOINTS)
    log_every: int = setting(10, "progress line every N steps (default: %(default)s)", CHECKPOINTS)
    peak_flops: float | None = setting(None, "a device's peak FLOP/s for MFU (default: known)", CHECKPOINTS)

    def __post_init__(self):
        """Refuse any run setting outside its range, naming the value and a valid one. Checks that
        need the model or the data come later: model_config, train.check_run_fits, check_vocabulary.
        A subclass's own fields follow FLAG_RULES too (extend.py's, experiment.py's)."""
        check_flags(self, RUN_FLAG_RULES + [rule for rule in FLAG_RULES if hasattr(self, rule[0])])


def check_flags(settings, rules: list[tuple]):
    """Refuse the first setting outside its rule's range, naming its flag, the value and an example."""
    for name, ok, wanted, example in rules:
        value = getattr(settings, name)
        if value is not None and not ok(value):  # nan fails every comparison, so it is refused too
            raise TrainError(f"--{name} {value} must be {wanted}; e.g. --{name} {example}")


# Run flags and the values they take: (flag, test, what the test asks, an example). A flag that is
# None was not given and takes its default. Checked before any work, so a bad value never trains,
# never writes a checkpoint and never fails halfway through a run.
RUN_FLAG_RULES = [
    *[(name, lambda v: v >= 1, "a positive integer", example) for name, example in (
        ("micro_batch", 1), ("batch_tokens", 4096), ("seq_len", 256), ("steps", 100), ("stop_at", 50),
        ("save_every", 50), ("log_every", 10), ("eval_batches", 4), ("threads", 1))],
    *[(name, lambda v: v >= 0, "a non-negative integer", example) for name, example in (
        ("eval_every", 50), ("keep_checkpoints", 3), ("warmup", 2000), ("seed", 0), ("data_seed", 0))],
    ("lr", lambda v: 0 < v < math.inf, "a positive finite number", 3e-4),
    ("grad_clip", lambda v: v > 0, "positive (inf: no clipping)", 1.0),
    ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]", 0.1),
    ("decay_fraction", lambda v: 0 < v <= 1, "in (0, 1]", 0.2),
    ("weight_decay", lambda v: 0 <= v < math.inf, "a non-negative finite number", 0.1),
    ("beta1", lambda v: 0 <= v < 1, "in [0, 1)", 0.9),
    ("beta2", lambda v: 0 <= v < 1, "in [0, 1)", 0.95),
    ("eps", lambda v: 0 < v < math.inf, "a positive finite number", 1e-8),
    ("z_loss", lambda v: 0 <= v < math.inf, "a non-negative finite number", 1e-5),
    ("peak_flops", lambda v: 0 < v < math.inf, "a positive finite number of FLOP/s", 989e12),
]

# The same for the fields a subclass adds (extend.ExtendConfig, experiment.ExperimentConfig), checked
# when the settings have them.
FLAG_RULES = [
    *[(name, lambda v: v >= 1, "a positive integer", example) for name, example in (
        ("gpus", 8), ("extend_steps", 150), ("samples", 10))],
    ("held_out_documents", lambda v: v >= 0, "a non-negative integer (0: skip)", 8),
    ("gpu_memory", lambda v: 0 < v < math.inf, "a positive finite number of GiB", 80),
    ("rope_theta_target", lambda v: 0 < v < math.inf, "a positive finite number", 8e6),
]


# ----------------------------------------------------------------------------------------------
# What the settings make: the architecture and the run's name


def compact_vocab_size(settings: TrainConfig) -> int | None:
    """--compact_vocab, else its default: None (the folder's own vocabulary) with --data; with
    --init_from, the vocabulary of the weights (a Hugging Face folder's: dolma2); else
    COMPACT_VOCAB_BY_SIZE on the built-in corpus."""
    if settings.compact_vocab is not None:
        return settings.compact_vocab
    if settings.data:
        return None
    if settings.init_from:
        source = checkpoint.parse_source(settings.init_from)
        path = source.folder / data.COMPACT_VOCAB_FILE
        if source.hf or not path.is_file():
            return 0
        vocab = data.read_compact_vocab(path)
        return vocab.get("requested_vocab_size", vocab["vocab_size"])
    return COMPACT_VOCAB_BY_SIZE.get(settings.size, 0)


def data_vocab_size(settings: TrainConfig) -> int | None:
    """Ids of the compact vocabulary this run's data will use, or None for dolma2 (the preset's)."""
    requested = compact_vocab_size(settings)
    if requested:
        compact_vocabulary.check_compact_vocab_size(requested)  # at parse time, naming the minimum
    if settings.data and (Path(settings.data) / data.COMPACT_VOCAB_FILE).is_file():
        return data.read_compact_vocab(Path(settings.data) / data.COMPACT_VOCAB_FILE)["vocab_size"]
    return requested or None  # a folder about to be compacted holds at most `requested` ids


def model_config(settings: TrainConfig) -> ModelConfig:
    """--preset at --size, then every model flag given explicitly, --swa and --gqa. A new --n_heads
    keeps the preset's GQA ratio unless --gqa or --n_kv_heads says otherwise."""
    overrides = dict(settings.model)
    base = olmpool.preset(settings.preset, settings.size)
    if settings.swa and "window" not in overrides:
        overrides["window"] = 4096 // olmpool.SIZES[settings.size]["shrink"]
    n_heads = overrides.get("n_heads", base.n_heads)
    if settings.gqa is not None:
        if "n_kv_heads" in overrides:
            raise TrainError(f"--gqa {settings.gqa} and --n_kv_heads {overrides['n_kv_heads']} both set the "
                             f"key/value heads; give one of them")
        valid = olmpool.head_divisors(n_heads)  # the GQA ratios, as the n_kv_heads, divide n_heads
        if settings.gqa not in valid:
            raise TrainError(f"--gqa {settings.gqa} does not divide n_heads={n_heads}; use one of "
                             f"{', '.join(map(str, valid))}")
        overrides["n_kv_heads"] = n_heads // settings.gqa
    elif "n_heads" in overrides and "n_kv_heads" not in overrides:  # keep the preset's GQA ratio, a switch
        overrides["n_kv_heads"] = max(1, n_heads // (base.n_heads // base.n_kv_heads))
    if "vocab_size" not in overrides and (vocab := data_vocab_size(settings)):  # the model's vocabulary is the data's
        overrides["vocab_size"] = compact_vocabulary.padded_vocab_size(vocab)
    return olmpool.preset(settings.preset, settings.size, **overrides)


def run_name(settings: TrainConfig) -> str:
    """preset-size plus each explicit model flag, so two ablations never share a folder by accident."""
    parts = [settings.preset, settings.size]
    parts += [f"gqa{settings.gqa}"] if settings.gqa is not None else []
    parts += ["swa"] if settings.swa else []
    parts += [f"vocab{settings.compact_vocab}"] if settings.compact_vocab is not None else []
    parts += [f"{field.name}={settings.model[field.name]}" for field in dataclasses.fields(ModelConfig)
              if field.name in settings.model]
    return "-".join(parts)
