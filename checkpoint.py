"""The checkpoint folder: one writer and one reader, for train.py, extend.py, evaluate.py and hf_interop.py.

A checkpoint is a folder holding the model in two files anyone can read without running code:
    config.json          dataclasses.asdict(ModelConfig): the architecture, rebuilt by ModelConfig(**json)
    model.safetensors    Transformer.state_dict(), full tensors
train.py writes its training state beside them (train_state.json, written last, optimizer.pt or
dcp/, compact_vocab.json), and a run folder holds one step_NNNNNNN checkpoint per save.

Only JSON and safetensors are read here: nothing is unpickled, so a folder from anyone is safe to
load. Errors are CheckpointError, naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from olmpool import ModelConfig, Transformer, rope_frequencies

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.json"  # train.py's, written last: its presence marks a step_N folder complete
STEP_PATTERN = re.compile(r"step_(\d+)$")
# Fields that only say how RoPE is computed: two configs that differ in them alone but compute the
# same frequencies on every layer (e.g. ABF x16 of 500K, and a base of 8M) compute one function.
ROPE_FIELDS = ("rope_theta", "rope_theta_local", "rope_scaling", "rope_factor", "rope_scaling_layers",
               "rope_original_context", "yarn_beta_fast", "yarn_beta_slow", "yarn_attention_factor",
               "llama3_low_freq_factor", "llama3_high_freq_factor")
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
    (folder / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})


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
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    for problem, keys in (("missing", sorted(set(expected) - set(state))),
                          ("unexpected", sorted(set(state) - set(expected)))):
        if keys:
            raise CheckpointError(f"{path}: {problem} tensor '{keys[0]}' ({len(keys)} in all); config.json and the "
                                  f"weights disagree")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(tensor.shape)}, config.json implies "
                                  f"{list(expected[name])}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


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
