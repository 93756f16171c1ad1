"""The checkpoint folder: one writer and one reader, for train.py, extend.py, evaluate.py and hf_interop.py.

A checkpoint is a folder holding the model in two files anyone can read without running code:
    config.json          dataclasses.asdict(ModelConfig): the architecture, rebuilt by ModelConfig(**json)
    model.safetensors    Transformer.state_dict(), full tensors
train.py writes its training state beside them (train_state.json, written last, optimizer.pt or
dcp/, compact_vocab.json), and a run folder holds one step_NNNNNNN checkpoint per save
(docs/training.md describes the folder).

Other people's folders are read as JSON and safetensors only (read_config, read_weights,
load_model, load_source): nothing is unpickled, so a folder from anyone is safe to load. Only
resuming one's own run (load_checkpoint) reads optimizer.pt (tensors only) and dcp/. Errors are
CheckpointError, naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import compact_vocabulary
import data
from files import fsync_tree
from olmpool import ROPE_FIELDS, ModelConfig, Transformer, describe, rope_frequencies

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.json"  # train.py's, written last: its presence marks a step_N folder complete
STEP_PATTERN = re.compile(r"step_(\d+)$")
# Fields a fresh run may change on top of another checkpoint's weights: how positions are encoded
# and how far (what context extension changes), and the attention kernel.
INIT_FROM_MAY_CHANGE = ("attention_backend", "context_length", *ROPE_FIELDS)
# Fields that only say which layers are windowed, and how wide: one layer pattern has several
# spellings (two layers: global_every 2 or 4).
WINDOW_FIELDS = ("window", "global_every")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as asked; the message names the file, the key and the fix."""


# ----------------------------------------------------------------------------------------------
# Finding checkpoints in a run folder


def step_folder(run: Path, step: int) -> Path:
    return Path(run) / f"step_{step:07d}"


def step_folders(run: Path, *holding: str) -> list[tuple[int, Path]]:
    """(step, folder) of the step_N folders in a run folder that hold every file named, by step."""
    run = Path(run)
    found = [(int(m.group(1)), p) for p in run.glob("step_*") if (m := STEP_PATTERN.match(p.name))
             and all((p / name).is_file() for name in holding)] if run.is_dir() else []
    return sorted(found)


def checkpoints_in(run: Path) -> list[Path]:
    """Complete checkpoints in a run folder, oldest first: step_N folders whose train_state.json was written."""
    return [p for _, p in step_folders(run, STATE_FILE)]


def newest_checkpoint(path: Path) -> Path | None:
    """A checkpoint folder itself (it holds config.json), else a run folder's newest step_N that holds
    the model files (config.json and model.safetensors), else None."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    found = step_folders(path, CONFIG_FILE, WEIGHTS_FILE)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------------------------
# Writing


def write_model(folder: Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    """config.json and model.safetensors into an existing folder (train.py writes into a temporary
    folder that it renames when complete)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    write_config(folder, config)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})


def write_config(folder: Path, config: ModelConfig) -> None:
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")


def save_model(model: Transformer, folder: Path | str) -> None:
    """A model's checkpoint folder (created if needed): config.json and model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_model(folder, model.config, model.state_dict())


# ----------------------------------------------------------------------------------------------
# Reading


def read_json(path: Path, fix: str) -> dict:
    """A JSON object from path, or a CheckpointError saying what is wrong and `fix`."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found; {fix}")
    try:
        found = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); {fix}") from None
    if not isinstance(found, dict):
        raise CheckpointError(f"{path} is not a JSON object; {fix}")
    return found


def read_train_state(folder: Path) -> dict:
    """train.py's train_state.json of a checkpoint folder, or {} where there is none (save_model's folders)."""
    path = Path(folder) / STATE_FILE
    return read_json(path, "re-save the checkpoint, or delete the file") if path.is_file() else {}


def read_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a checkpoint folder. A field added to ModelConfig since the save takes its
    default; a field this olmpool.py does not know, or a Hugging Face config.json, is refused."""
    path = Path(folder) / CONFIG_FILE
    saved = read_json(path, "an OlmPool checkpoint folder holds config.json (asdict(ModelConfig)) and "
                            "model.safetensors")
    if "model_type" in saved:
        raise CheckpointError(f"{path} is a Hugging Face config (model_type {saved['model_type']!r}); import it "
                              f"with hf_interop.load_hf or `hf_interop.py import`")
    unknown = sorted(set(saved) - {field.name for field in dataclasses.fields(ModelConfig)})
    if unknown:
        raise CheckpointError(f"{path}: unknown ModelConfig field(s) {', '.join(unknown)}; written by a newer "
                              f"olmpool.py? Update olmpool.py or remove the key")
    try:
        return ModelConfig(**saved)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} does not make a valid ModelConfig ({error}); pass an intact checkpoint "
                              f"folder") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors as a state dict (never a pickle: an FSDP-only folder is refused with the fix)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file() and (folder / "dcp").is_dir():
        raise CheckpointError(f"{folder} has no model.safetensors (only dcp/, an FSDP checkpoint from before train.py "
                              f"wrote model.safetensors beside it): it holds an FSDP checkpoint (dcp/), whose metadata "
                              f"is a pickle, which can run code, so weights are read from safetensors only. If the run "
                              f"is your own, resume it under torchrun with --fsdp --resume DIR for one more step (resume "
                              f"reads your own dcp/), then use the new checkpoint")
    if not path.is_file():
        raise CheckpointError(f"{path} not found; an OlmPool checkpoint folder holds it beside config.json")
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error type for any bad file
        raise CheckpointError(f"{path} is unreadable ({error}); pass an intact checkpoint folder") from None


def load_model(folder: Path | str, attention_backend: str | None = None) -> Transformer:
    """A Transformer from a checkpoint folder, in its stored dtype, after checking that every tensor
    config.json implies is there with its shape."""
    config = read_config(folder)
    if attention_backend is not None:
        config = dataclasses.replace(config, attention_backend=attention_backend)
    state = read_weights(folder)
    path = Path(folder) / WEIGHTS_FILE
    with torch.device("meta"):  # shapes only: the stored tensors are assigned below
        model = Transformer(config, seed=None)
    check_weights(state, {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}, path)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def check_names(names, expected, path: Path | str):
    """The tensor names of a weights file are those the config implies (check_weights' first test)."""
    for problem, keys in (("missing", sorted(set(expected) - set(names))),
                          ("unexpected", sorted(set(names) - set(expected)))):
        if keys:
            raise CheckpointError(f"{path}: {problem} tensor '{keys[0]}' ({len(keys)} in all); config.json and the "
                                  f"weights disagree")


def check_weights(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: Path | str):
    """Refuse weights that are not the model's where they enter (every loader calls this): a missing or
    unexpected name, a shape config.json does not imply, a tensor that is not floating point (a cast
    would silently change it), or any NaN or infinity (a poisoned checkpoint scored or trained on is a
    wrong result). Each as one CheckpointError naming the file and the tensor."""
    check_names(state, expected, path)
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(tensor.shape)}, config.json implies "
                                  f"{list(expected[name])}")
        check_values(name, tensor, path)


def check_values(name: str, tensor: torch.Tensor, path: Path | str):
    """One tensor of weights must be floating point (a cast would silently change it) and finite."""
    if not tensor.is_floating_point():
        raise CheckpointError(f"{path}: tensor '{name}' is {str(tensor.dtype).removeprefix('torch.')}, not a "
                              f"floating-point type; weights are float32, bfloat16 or float16")
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{path}: tensor '{name}' holds {bad} NaN or infinite value(s); these weights "
                              f"are poisoned: use an earlier checkpoint")


def weights_problem(folder: Path) -> str | None:
    """What makes a checkpoint's weights unusable (unreadable, not floating point, NaN or infinite),
    naming the file and tensor; None where they are good. Before a run calls a checkpoint good."""
    try:
        state = read_weights(folder)
        check_weights(state, {name: tuple(tensor.shape) for name, tensor in state.items()},
                      Path(folder) / WEIGHTS_FILE)
    except CheckpointError as error:
        return str(error)
    return None


# ----------------------------------------------------------------------------------------------
# Is it the same architecture?


def architecture_differences(a: ModelConfig, b: ModelConfig, allowed: tuple[str, ...] = (),
                             by_function: bool = False) -> list[str]:
    """The ModelConfig fields, but `allowed`, in which a and b differ. One layer pattern has several
    spellings, so window and global_every count only when the layers' windows differ.

    by_function: the question is whether a and b compute the same function (an export read back), so
    the RoPE fields and context_length (the length YaRN, PI and llama3 stretch from, when
    rope_original_context is None) count only when some layer's frequencies or attention scale
    differ, and then whichever of them differ count even if `allowed`."""
    differing = [f.name for f in dataclasses.fields(ModelConfig)
                 if f.name not in allowed and getattr(a, f.name) != getattr(b, f.name)]
    if a.layer_windows == b.layer_windows:
        differing = [name for name in differing if name not in WINDOW_FIELDS]
    if by_function:
        rope_group = ROPE_FIELDS + ("context_length",)
        differing = [name for name in differing if name not in rope_group]
        if not same_rope(a, b):
            differing += [name for name in rope_group if getattr(a, name) != getattr(b, name)]
    return differing


def same_rope(a: ModelConfig, b: ModelConfig) -> bool:
    """Whether every layer kind the two configs have (global; local if any layer is windowed)
    computes the same RoPE frequencies and attention scale."""
    has_local = any(w is not None for w in a.layer_windows + b.layer_windows)
    for is_global in (True, False) if has_local else (True,):
        (freq_a, scale_a), (freq_b, scale_b) = rope_frequencies(a, is_global), rope_frequencies(b, is_global)
        if not torch.equal(freq_a, freq_b) or scale_a != scale_b:
            return False
    return True


def check_architecture(path: Path, config: ModelConfig, allowed: tuple[str, ...] = ("attention_backend",)):
    """Refuse a checkpoint whose config.json differs from config in any field but `allowed`."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} not found: {path} is not a train.py checkpoint folder")
    try:
        saved = read_config(path)
    except CheckpointError as error:
        raise CheckpointError(f"{file} is not a config written by train.py ({error}); pass an intact train.py "
                              f"checkpoint folder, or hf:DIR for a Hugging Face folder") from None
    differing = architecture_differences(saved, config, allowed)
    if differing:
        changes = ", ".join(f"{k}: checkpoint {getattr(saved, k)!r}, this run {getattr(config, k)!r}"
                            for k in differing)
        flags = " ".join(f"--{k} {getattr(saved, k)}" for k in differing)
        raise CheckpointError(f"{file} is a different architecture ({changes}). Rerun with the checkpoint's flags "
                              f"({flags}), or train this architecture in another --out")


# ----------------------------------------------------------------------------------------------
# Sources: a model as a command line names it (our folder, a run folder, or hf:DIR)


@dataclass(frozen=True)
class Source:
    """A model's folder: ours (config.json + model.safetensors), or with `hf` a Hugging Face folder,
    which hf_interop.py reads. str() gives it back as a command line names it."""
    folder: Path
    hf: bool = False

    def __str__(self) -> str:
        return f"hf:{self.folder}" if self.hf else str(self.folder)

    def train_state(self) -> dict:
        """train.py's train_state.json beside the weights, or {} (a Hugging Face folder, save_model's)."""
        return {} if self.hf else read_train_state(self.folder)

    def fingerprint(self) -> str:
        """Size and modification time of the weight files: what changes when the weights are rewritten."""
        stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(self.folder.glob("*.safetensors"))]
        return json.dumps(stats)


def as_given(flag: str, source) -> str:
    """How a message names a source: with the flag that gave it (--from DIR), if any."""
    return f"{flag} {source}" if flag else str(source)


def parse_source(spec: str | Path) -> Source:
    """The one reader of the hf: prefix: "hf:DIR" is a Hugging Face folder, anything else our folder,
    as written (find_source resolves a run folder). Reads nothing."""
    text = str(spec)
    return Source(Path(text[3:]), hf=True) if text.startswith("hf:") else Source(Path(text))


def find_source(spec: str | Path, flag: str = "--from") -> Source:
    """One model's folder: hf:DIR, a checkpoint folder, or a run folder's newest checkpoint holding
    the model files. A folder without config.json is refused naming `flag` (the spec's flag) and the fix."""
    source = parse_source(spec)
    if source.hf:
        if not (source.folder / CONFIG_FILE).is_file():
            raise CheckpointError(f"{as_given(flag, source)}: no {source.folder / CONFIG_FILE}; hf:DIR names a "
                                  f"local Hugging Face model folder")
        return source
    folder = newest_checkpoint(source.folder) or source.folder
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{as_given(flag, folder)}: no config.json there; pass a checkpoint folder "
                              f"(runs/X/step_N), a run folder holding some, or hf:DIR for a Hugging Face folder")
    return Source(folder)


def hf_interop_for(source: Source, flag: str):
    """hf_interop, imported here since it imports this module; its absence named with the fix."""
    try:
        import hf_interop
    except ImportError:
        raise CheckpointError(f"{as_given(flag, source)} needs hf_interop.py beside train.py to read Hugging Face "
                              f"folders, and it is not there; convert the folder to a checkpoint elsewhere and pass "
                              f"{as_given(flag, 'DIR')}") from None
    return hf_interop


def source_config(source: Source, flag: str = "--from") -> ModelConfig:
    """The architecture of a source without reading its weights (a Hugging Face folder: its
    config.json and the safetensors headers, hf_interop.inspect_hf)."""
    reader = hf_interop_for(source, flag).inspect_hf if source.hf else None
    try:
        return reader(source.folder).config if reader else read_config(source.folder)
    except ValueError as error:  # hf_interop's and read_config's errors name the file and the fix
        raise CheckpointError(f"{as_given(flag, source)}: {error}") from None


def load_source(spec: str | Path | Source, expected: ModelConfig | None = None, allowed: tuple[str, ...] = (),
                dtype: torch.dtype | None = None, flag: str = "--init_from") -> tuple[Transformer, str]:
    """(model, summary) of one model's weights: our checkpoint folder through load_model, or hf:DIR
    through hf_interop.load_hf (summary: its import notes; ours: olmpool.describe), in the stored
    dtype, or in `dtype`. With `expected`, the source must be that architecture but for the fields
    `allowed` (a fresh run on other weights: INIT_FROM_MAY_CHANGE). Errors are CheckpointError,
    naming the file, `flag` (where the spec came from; "" for none) and the fix.

    The one loader of "DIR or hf:DIR" (train.py --init_from, extend.py --from, evaluate.py). The
    spec is taken as written: find_source(spec) first resolves a run folder to its newest
    checkpoint and refuses a folder without config.json. The Source either gives has .folder (where
    the tokenizer or compact_vocab.json lies), .hf, .train_state() and .fingerprint() (the weight
    files' sizes and times, to notice a rewritten checkpoint); str(source) is its spec again, and
    source_config(source) reads the architecture without the weights.
    """
    source = spec if isinstance(spec, Source) else parse_source(spec)
    if source.hf:
        try:
            model, summary = hf_interop_for(source, flag).load_hf(str(source.folder), dtype=dtype)
        except ValueError as error:  # hf_interop's errors name the file and the fix
            raise CheckpointError(f"{as_given(flag, source)}: {error}") from None
        differing = architecture_differences(model.config, expected, allowed) if expected else []
        if differing:
            flags = " ".join(f"--{k} {getattr(model.config, k)}" for k in differing)
            raise CheckpointError(f"{source.folder}/config.json is a different architecture in "
                                  f"{', '.join(differing)}; rerun with {flags}\n{summary}")
        return model, summary
    if expected is not None:
        check_architecture(source.folder, expected, allowed)
    # Only safetensors (read_weights): sources are other people's folders, and DCP's .metadata (like
    # any torch.save file) is a pickle, which can run code when loaded.
    model = load_model(source.folder)
    return (model if dtype is None else model.to(dtype)), describe(model.config)


# ----------------------------------------------------------------------------------------------
# Save and resume a train.py run: checkpoints written atomically, found, checked and read back.
# Every process calls these; rank 0 writes the shared files, and every rank meets at the barriers.


TRAIN_STATE_KEYS = ("step", "tokens_seen", "loader", "fsdp", "rng")
ABANDONED_FOLDER = "abandoned"  # OUT/abandoned/TIME/step_N: checkpoints of a branch given up by a rollback


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def warn(message: str):
    """Print a warning once per run (rank 0, or a process outside torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def count(value, least: int) -> bool:
    """An int (not a bool, which JSON's true would give) of at least `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


# What each key of train_state.json must hold: (test, what it asks). A step of "abc" or -5 would
# crash a resume, or silently train other steps than asked.
TRAIN_STATE_RULES = {
    "step": (lambda v: count(v, 0), "a non-negative integer"),
    "tokens_seen": (lambda v: count(v, 0), "a non-negative integer"),
    "loader": (lambda v: isinstance(v, dict), "an object (the loader's position)"),
    "fsdp": (lambda v: isinstance(v, bool), "true or false"),
    "rng": (lambda v: isinstance(v, dict), "an object (the generators' states)"),
    "world_size": (lambda v: count(v, 1), "a positive integer"),
    "threads": (lambda v: count(v, 1), "a positive integer"),
}


def train_state_problem(state_file: Path, state) -> str | None:
    """What is wrong in a train_state.json's content, naming the file and the key (None: nothing):
    every key TRAIN_STATE_KEYS lists is there, each key holds what TRAIN_STATE_RULES asks, and a
    step_N folder's step is N."""
    if not isinstance(state, dict):
        return f"{state_file} is not a train state (a JSON object with {', '.join(TRAIN_STATE_KEYS)})"
    missing = [key for key in TRAIN_STATE_KEYS if key not in state]
    if missing:
        return (f"{state_file} is not a train state: key '{missing[0]}' is missing (it needs "
                f"{', '.join(TRAIN_STATE_KEYS)})")
    for key, (ok, wanted) in TRAIN_STATE_RULES.items():
        if key in state and not ok(state[key]):
            return f"{state_file}: key '{key}' is {json.dumps(state[key])}, not {wanted}"
    named = STEP_PATTERN.match(state_file.parent.name)
    if named and int(named.group(1)) != state["step"]:
        return f"{state_file}: key 'step' is {state['step']}, but the folder is {state_file.parent.name}"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """What is damaged in a checkpoint folder, naming the file (None: intact). Cheap: the JSON files
    parse, every file has the size train_state.json recorded at save time (older checkpoints: the
    weights' and optimizer's files exist), and model.safetensors' header covers the file. (Whether
    config.json is this run's architecture is check_architecture's question.)"""
    state_file, config_file = path / STATE_FILE, path / CONFIG_FILE
    parsed = {}
    for file in (state_file, config_file):
        try:
            parsed[file] = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            return f"{file} is unreadable ({error})"
    state, config = parsed[state_file], parsed[config_file]
    problem = train_state_problem(state_file, state)
    if problem is not None:
        return problem
    if not isinstance(config, dict):
        return f"{config_file} is not a config (a JSON object of ModelConfig fields)"
    expected = state.get("files") or {name: None for name in (
        ["dcp/.metadata"] if state["fsdp"] else [WEIGHTS_FILE, "optimizer.pt"])}
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if size is not None and file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, but {size} were written (truncated or overwritten)"
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(weights, "pt"):
                pass
        except Exception as error:  # safetensors raises its own error type for any bad header
            return f"{weights} is unreadable ({error})"
    return None


def newest_intact(out: Path) -> Path | None:
    """The newest checkpoint in out that checkpoint_problem finds intact, warning of each damaged one
    skipped (None: out holds no checkpoint)."""
    existing = checkpoints_in(out) if out.is_dir() else []
    damage = []
    for path in reversed(existing):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        damage.append(problem)
        warn(f"warning: skipping damaged checkpoint {path.name}: {problem}")
    if damage:
        raise CheckpointError(f"every checkpoint in {out} is damaged ({'; '.join(damage)}); move the folder "
                              f"away to start afresh, or pass another --out")
    return None


def find_resume(resume: str, out: Path) -> Path | None:
    """The checkpoint --resume names: auto, the newest intact one in out (None there: a fresh start);
    never, None (refusing an out that holds checkpoints); else the folder given, if intact."""
    if resume == "auto":
        return newest_intact(out)
    if resume == "never":
        existing = checkpoints_in(out) if out.is_dir() else []
        if existing:
            raise CheckpointError(f"{out} already holds checkpoints (newest {existing[-1].name}); continue that run "
                                  f"with --resume auto (the default), or start another with a different --out or "
                                  f"--name")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume} is neither auto, never, nor a folder; pass a step_N folder written "
                              f"by train.py, or --resume auto")
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {path}: no {path / STATE_FILE}, so not a complete checkpoint; pass a step_N "
                              f"folder, or --resume auto")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"--resume {path} is damaged: {problem}; pass another step_N folder, or --resume auto "
                              f"(which takes the newest intact checkpoint in --out)")
    return path


def move_aside(out: Path, others: list[Path]) -> Path:
    """Move checkpoints to a new OUT/abandoned/TIME/ (never deleting them); returns that folder."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = out / ABANDONED_FOLDER / stamp
    for attempt in range(1, 1000):  # two rollbacks within a second get two folders
        if not aside.exists():
            break
        aside = out / ABANDONED_FOLDER / f"{stamp}_{attempt}"
    aside.mkdir(parents=True)
    for path in others:
        os.replace(path, aside / path.name)
    return aside


def set_aside_other_branch(out: Path, resume_dir: Path | None) -> Path | None:
    """A rollback (resuming a checkpoint older than the newest in out) starts a new branch: move the
    other branch's checkpoints (every one at or after the resumed step but the resumed one) to
    OUT/abandoned/TIME/, so that pruning never deletes the new branch and --resume auto follows it.
    A checkpoint resumed from OUT/abandoned/ moves back into out. Returns where resume_dir now is."""
    if resume_dir is None or not out.is_dir():
        return resume_dir
    resumed_step = int(read_train_state(resume_dir)["step"])
    # Complete or not (a save would overwrite an incomplete one), sorted by step.
    others = [p for step, p in step_folders(out) if step >= resumed_step and p.resolve() != resume_dir.resolve()]
    barrier()  # every rank has chosen resume_dir before anything moves
    if others and is_main_process():
        aside = move_aside(out, others)
        warn(f"rollback to {resume_dir}: moved {', '.join(p.name for p in others)} (the abandoned branch) to "
             f"{aside}; nothing was deleted")
    back = out / resume_dir.name
    returning = (out / ABANDONED_FOLDER).resolve() in resume_dir.resolve().parents
    if returning and is_main_process():  # back to a branch set aside earlier: auto must find it in out
        os.replace(resume_dir, back)
        warn(f"moved {resume_dir} back to {back}, the branch this run continues")
    barrier()
    return back if returning else resume_dir


def rng_state() -> dict:
    """Every generator's state as JSON lists. Training draws no random numbers today (no dropout; the
    loader's order is seeded separately), but whatever is added later resumes exactly."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state().tolist(), "python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), position, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def write_weights_and_optimizer(folder: Path, model, transformer: Transformer, optimizer, fsdp: bool):
    """config.json and model.safetensors (write_model, on rank 0), and the optimizer: one
    optimizer.pt, or with FSDP every rank's shards of model and optimizer in dcp/."""
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder / "dcp")
        # The weights again, gathered into full tensors on rank 0, in safetensors: a file anyone can
        # load without unpickling (DCP's metadata is a pickle), for --init_from and hf_interop.
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if is_main_process():
            write_model(folder, transformer.config, full)
        del full
    elif is_main_process():
        write_model(folder, transformer.config, transformer.state_dict())
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")


def save_checkpoint(out: Path, model, transformer: Transformer, optimizer, state: dict, extras: dict,
                    data_dir: Path, keep_checkpoints: int) -> Path:
    """Write OUT/step_N (N = state["step"]) atomically: everything goes into a temporary folder,
    fsynced, renamed when complete. train_state.json is `state` (train.py's: step, tokens seen,
    loader, settings; state["fsdp"] says how the weights are saved), the RNG states, the time, every
    other file's size (which resume checks), then `extras` (extend.py's recipe); it is written last."""
    final = step_folder(out, state["step"])
    temporary = out / f".tmp_{final.name}"
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException  # DCP's: a BaseException, wrapping each rank's

    try:
        if is_main_process():
            shutil.rmtree(temporary, ignore_errors=True)  # left by a run killed mid-save
            temporary.mkdir(parents=True)
        barrier()
        write_weights_and_optimizer(temporary, model, transformer, optimizer, state["fsdp"])
        if is_main_process():
            write_train_state(temporary, state, extras, data_dir)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temporary, final)
            fsync_tree(out, files=False)  # the rename itself
    except (OSError, RuntimeError, SafetensorError, CheckpointException) as error:  # disk full, often wrapped
        raise CheckpointError(save_failure(out, temporary, final, transformer, optimizer, state["fsdp"],
                                           error)) from None
    if is_main_process() and keep_checkpoints > 0:
        for old in checkpoints_in(out)[:-keep_checkpoints]:
            shutil.rmtree(old)
    barrier()
    return final


def write_train_state(temporary: Path, state: dict, extras: dict, data_dir: Path):
    """The rest of a checkpoint being saved, on rank 0: the tokenizer, then train_state.json (last:
    it marks the folder complete), and everything fsynced."""
    compact_vocabulary.copy_vocabulary(data_dir, temporary)  # the checkpoint names its tokenizer
    files = {str(p.relative_to(temporary)): p.stat().st_size for p in sorted(temporary.rglob("*")) if p.is_file()}
    recorded = state | {"rng": rng_state(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}
    recorded |= extras
    # A plain write: the folder is renamed into place whole (write_atomically's rename is not needed).
    (temporary / STATE_FILE).write_text(json.dumps(recorded) + "\n")  # last: marks it complete
    fsync_tree(temporary)  # on disk before the rename, so a power cut never leaves a renamed, empty file


def size_text(n_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024


def save_failure(out: Path, temporary: Path, final: Path, transformer, optimizer, fsdp: bool, error) -> str:
    """After a failed save (a full disk, most often): remove the partial folder, and say how much
    space the checkpoint needs (what it was writing: the weights, twice under FSDP, and the
    optimizer's state) against what is free, and the fix."""
    def tensor_bytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
    written = sum(p.stat().st_size for p in temporary.rglob("*") if p.is_file()) if temporary.is_dir() else 0
    if is_main_process():
        shutil.rmtree(temporary, ignore_errors=True)
    needed = tensor_bytes(transformer.state_dict().values()) * (2 if fsdp else 1) + tensor_bytes(
        value for per_parameter in optimizer.state.values() for value in per_parameter.values())
    free = shutil.disk_usage(out).free if out.is_dir() else 0
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (f"saving {final} failed ({reason}); the checkpoint needs about {size_text(max(needed, written))} "
            f"({size_text(written)} written before the failure, removed again), and {out} has {size_text(free)} "
            f"free: free space there (or lower --keep_checkpoints), or pass another --out, then --resume auto")


def check_local_shards(state: dict, path: Path):
    """This rank's shards of an FSDP checkpoint (dcp/) are finite floating-point tensors (names and
    shapes are the model's own: DCP loads into them)."""
    for name, tensor in state.items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if torch.is_tensor(local):
            check_values(name, local, path)


def load_checkpoint(path: Path, model, transformer: Transformer, optimizer, loader, fsdp: bool,
                    device: torch.device) -> tuple[int, int]:
    """Restore weights, optimizer, loader position and RNG from `path`; returns (step, tokens seen)."""
    check_architecture(path, transformer.config)
    state = read_train_state(path)
    if state["fsdp"] != bool(fsdp):
        raise CheckpointError(f"{path} was saved {'with' if state['fsdp'] else 'without'} --fsdp; resume it the "
                              f"same way")
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        saved = {"model": model_state, "optimizer": optimizer_state}
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            dcp.load(saved, checkpoint_id=path / "dcp")  # reshards to this world size
        except CheckpointException as error:  # a BaseException: one line, not a traceback
            raise CheckpointError(f"{path / 'dcp'} is damaged ({str(error).splitlines()[0]}); resume another "
                                  f"checkpoint with --resume DIR, or move {path} away and use --resume auto") from None
        check_local_shards(saved["model"], path / "dcp")
        set_state_dict(model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"])
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        file = path / WEIGHTS_FILE
        try:
            state_dict = load_file(file)
            check_weights(state_dict, {name: tuple(t.shape) for name, t in transformer.state_dict().items()}, file)
            transformer.load_state_dict(state_dict)
            file = path / "optimizer.pt"  # one's own run's file, and still never unpickled beyond tensors
            optimizer.load_state_dict(torch.load(file, map_location=device, weights_only=True))
        except CheckpointError:  # check_weights': names the tensor already
            raise
        except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as error:
            raise CheckpointError(f"{file} is damaged ({str(error).splitlines()[0]}); resume another checkpoint "
                                  f"with --resume DIR, or move {path} away and use --resume auto") from None
    for key, restore in (("loader", loader.load_state_dict), ("rng", set_rng_state)):
        try:
            restore(state[key])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            raise CheckpointError(f"{path / STATE_FILE}: key '{key}' is damaged ({type(error).__name__}: {error}); "
                                  f"resume another checkpoint with --resume DIR, or --resume auto") from None
    return state["step"], state["tokens_seen"]
