"""The mini pool: OlmPool's controlled experiment at a size one machine can run, and the paper's analysis.

OlmPool pretrained 26 architectures on the same data from the same initial weights, extended each to
64K with the same recipe, and asked which architecture choices decide the long-context score. This
script runs that experiment as a plain loop over a grid (nanochat's runs/scaling_laws.sh in spirit):
every stage of every run is a normal, resumable command

    train.py  -> RUN/pretrain      pretraining (same data, seeds, init seed, token budget for every run)
    extend.py -> RUN/extend        context extension from the final checkpoint (same recipe and budget)
    evaluate.py -> RUN/eval        the extended model: recall by length, held-out loss, LongPPL, sinks
    evaluate.py -> RUN/eval_before the pretrained model at the longer pretraining length (before extension)
    evaluate.py -> OUT/longppl     every extended model on the same LongPPL key tokens (one evaluator)

then analyses the results with numpy (analysis.json, analysis.md, plots), and writes an index of every
run, stage, command and duration (index.json, index.md).

    python sweep.py --plan                                   # the 16-run grid's commands; runs nothing
    python sweep.py --out sweeps/mini --jobs 2 --threads 1   # run it (the same command resumes)
    python sweep.py --out sweeps/mini --presets G_pre_8kv_8k_14k,olmo3_like   # grid plus presets
    python sweep.py --out sweeps/mini --budgets 20,60,180 --early_steps 200,400   # the further findings
    python sweep.py --out sweeps/mini --analyze_only --results results/mini_pool  # tables and plots only
    python sweep.py --gpus 0,1,2,3 --size 20m ...            # one run per GPU

The grid: the four OlmPool choices, each at two levels, the first named being the one the study
found harmful for long context (../shared/reference/olmpool.md; the blog's "QK norm has the single
largest individual impact ... GQA and shorter pretraining context each cause smaller drops, and
sliding window attention costs about 1 point"):
    qk      post norm with layerwise QK norm (Olmo 2/3)  vs  pre norm without QK norm (Llama)
    gqa     4 query heads per key/value head             vs  one key/value head per query head
    swa     3 local : 1 global layers, the preset's window vs  every layer global
    ctx     the shorter pretraining context (4K / shrink) vs  the longer (8K / shrink)
Everything else comes from --base_preset at --size (default Olmo 3's shape), so the runs differ in
these switches only; the MLP width is kept (OlmPool widened it as kv heads shrank), so GQA runs have
slightly fewer parameters. Run names follow OlmPool's pattern: post_LQK_2kv_128_SWA, pre_8kv_256.

Resume: each stage writes a stamp (its exact command and the sha256 of its input checkpoint) into its
output folder. A stage whose stamp says done with the same command and inputs, and whose outputs
exist, is skipped; one whose command or input changed is wiped and rerun; an interrupted one is run
again with the same command, which train.py and extend.py continue (--resume auto) and evaluate.py
continues cell by cell. --threads and --device are not part of a stage's identity.

Further findings (the blog's three), each on a subset given by flags:
    --budgets S1,S2,...     extension steps, on --budget_models (default: 3 representative runs)
    --early_steps P1,...    extend from these pretraining steps too (checkpoints kept every
                            --save_every), on --early_models; rank correlation between points
    sinks                   always: sink share against the score, correlation, split by QK norm
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_DIR = Path(__file__).resolve().parent
STAMP_FILE = ".sweep_stage.json"
# Flags whose value does not change a stage's result beyond rounding (or at all): not part of its identity.
IDENTITY_FREE_FLAGS = ("--threads", "--device", "--log_every")


class SweepError(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# The grid: four choices, two levels each, the harmful level first

CHOICES = ("qk", "gqa", "swa", "ctx")
CHOICE_DESCRIPTIONS = {
    "qk": "post norm + layerwise QK norm (harmful) vs pre norm, no QK norm",
    "gqa": "GQA 4:1 (harmful) vs one kv head per query head",
    "swa": "sliding windows 3 local : 1 global (harmful) vs all global",
    "ctx": "shorter pretraining context (harmful) vs longer",
}


@dataclass(frozen=True)
class Architecture:
    """One model of the pool: its name, the train.py flags that build it, and which choices it makes
    (1: the harmful level, 0: the other; None for a preset whose switch is neither level)."""
    name: str
    model_flags: tuple[str, ...]
    choices: dict = field(default_factory=dict, compare=False, hash=False)
    pretrain_context: int = 0

    @property
    def harmful_count(self) -> int:
        return sum(1 for v in self.choices.values() if v == 1)


# The shape flags a sweep may set on top of the base preset (the same for every run).
SHAPE_FIELDS = ("n_layers", "d_model", "n_heads", "head_dim", "mlp_hidden", "context_length", "window")


def base_shape(base_preset: str, size: str, shape: dict | None = None):
    import olmpool
    if base_preset not in olmpool.PRESETS:
        raise SweepError(f"--base_preset {base_preset!r} is not a preset; `python olmpool.py` lists them "
                         f"(e.g. H_post_LQK_32kv_8k_11k_SWA)")
    shape = dict(shape or {})
    if "n_heads" in shape:
        shape["n_kv_heads"] = shape["n_heads"]  # the grid sets kv heads per run; the base must be valid
    try:
        return olmpool.preset(base_preset, size, **shape)
    except ValueError as error:
        raise SweepError(f"the base shape {shape} on {base_preset} at {size}: {error}") from None


def grid(base_preset: str = "H_post_LQK_32kv_8k_11k_SWA", size: str = "tiny", shape: dict | None = None
         ) -> list[Architecture]:
    """The 16 combinations of the four choices on the base preset's shape at `size` (with `shape`'s fields
    overriding it: context_length is the longer pretraining context, window the local layers' width)."""
    shape = {k: v for k, v in (shape or {}).items() if v is not None}
    base = base_shape(base_preset, size, shape)
    long_context = base.context_length
    window = base.window or long_context // 2  # the preset's window (OlmPool: 4096 at 8K)
    if long_context % 2:
        raise SweepError(f"the longer pretraining context {long_context} must be even (the shorter is half of it)")
    shape_flags = tuple(item for k in ("n_layers", "d_model", "n_heads", "head_dim", "mlp_hidden") if k in shape
                        for item in (f"--{k}", str(shape[k])))
    if base.n_heads % 4:
        raise SweepError(f"GQA 4:1 needs n_heads divisible by 4; {base_preset} at {size} has {base.n_heads}")
    runs = []
    for qk, gqa, swa, ctx in itertools.product((1, 0), repeat=4):
        kv = base.n_heads // 4 if gqa else base.n_heads
        context = long_context // 2 if ctx else long_context
        name = ("post_LQK" if qk else "pre") + f"_{kv}kv_{context}" + ("_SWA" if swa else "")
        flags = ("--preset", base_preset, "--size", size, *shape_flags,
                 "--norm_placement", "post" if qk else "pre", "--qk_norm", "layerwise" if qk else "none",
                 "--n_kv_heads", str(kv), "--window", str(window) if swa else "none",
                 "--global_every", "4", "--context_length", str(context))
        runs.append(Architecture(name, flags, dict(qk=qk, gqa=gqa, swa=swa, ctx=ctx), context))
    return runs


def preset_architecture(name: str, size: str, base_preset: str = "H_post_LQK_32kv_8k_11k_SWA",
                        shape: dict | None = None) -> Architecture:
    """An OlmPool preset by name at the grid's shape: its own switches (kv ratio, MLP width, window,
    context, scaled like the grid's contexts), its choices read from its config (None where neither level)."""
    import olmpool
    if name not in olmpool.PRESETS:
        raise SweepError(f"--presets: unknown preset {name!r}; `python olmpool.py` lists them")
    shape = {k: v for k, v in (shape or {}).items() if v is not None}
    own = olmpool.preset(name, size)
    scale = base_shape(base_preset, size, shape).context_length / base_shape(base_preset, size).context_length
    overrides = {k: shape[k] for k in ("n_layers", "d_model", "n_heads", "head_dim") if k in shape}
    if "n_heads" in overrides:
        overrides["n_kv_heads"] = max(1, overrides["n_heads"] // (own.n_heads // own.n_kv_heads))
    if scale != 1:
        overrides["context_length"] = int(own.context_length * scale)
        if own.window:
            overrides["window"] = max(1, int(own.window * scale))
    config = olmpool.preset(name, size, **overrides)
    long_context = base_shape(base_preset, size, shape).context_length
    norm = (config.norm_placement, config.qk_norm)
    ratio = config.n_heads // config.n_kv_heads
    choices = dict(qk=1 if norm == ("post", "layerwise") else 0 if norm == ("pre", "none") else None,
                   gqa=1 if ratio >= 4 else 0 if ratio == 1 else None, swa=1 if config.window else 0,
                   ctx=1 if config.context_length < long_context else 0)
    flags = ("--preset", name, "--size", size, *(item for k, v in overrides.items() for item in (f"--{k}", str(v))))
    return Architecture(name, flags, choices, config.context_length)


# ----------------------------------------------------------------------------------------------
# Stages: commands, stamps, resume

@dataclass
class Stage:
    """One command of the sweep. Done when its stamp matches and `outputs` exist."""
    key: str  # unique, e.g. "post_LQK_2kv_128_SWA/s0/pretrain"
    command: list[str]
    out: Path
    outputs: list[Path]
    inputs: list[Path] = field(default_factory=list)  # checkpoints whose identity the stamp records
    after: list[str] = field(default_factory=list)  # keys of stages to finish first
    run: str | None = None  # the run (architecture/seed) it belongs to
    kind: str = ""


def identity_command(command: list[str]) -> list[str]:
    """The command without flags that do not change results (threads, device, logging) and their values,
    and with the interpreter's path as "python", so that a sweep moved to another checkout or venv resumes."""
    kept, skip = [], False
    for index, part in enumerate(command):
        if index == 0 and part == sys.executable:
            part = "python"
        if skip:
            skip = False
            continue
        if part in IDENTITY_FREE_FLAGS:
            skip = True
            continue
        kept.append(part)
    return kept


def checkpoint_identity(path: Path) -> str:
    """sha256 over a checkpoint's config.json and weights: the stage reruns when its input changed."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        file = Path(path) / name
        if not file.is_file():
            raise SweepError(f"input checkpoint {path} has no {name}; its stage did not finish (rerun the sweep)")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def stamp_of(stage: Stage) -> dict:
    return {"command": identity_command(stage.command),
            "inputs": {str(p): checkpoint_identity(p) for p in stage.inputs}}


def read_stamp(stage: Stage) -> dict | None:
    path = stage.out / STAMP_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a stamp cut short: treat the stage as of unknown provenance


def write_stamp(stage: Stage, stamp: dict, status: str, seconds: float | None = None) -> None:
    stage.out.mkdir(parents=True, exist_ok=True)
    record = dict(stamp, status=status, full_command=stage.command, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    if seconds is not None:
        record["seconds"] = seconds
    temporary = stage.out / (STAMP_FILE + ".tmp")
    temporary.write_text(json.dumps(record, indent=1))
    os.replace(temporary, stage.out / STAMP_FILE)


def decide(stage: Stage) -> str:
    """'skip' (done, same command and inputs), 'resume' (interrupted, same), 'fresh' (nothing there),
    'invalidated' (a previous result from another command or input: wiped before running), or 'waiting'
    (an input checkpoint does not exist yet)."""
    if not all((Path(p) / "model.safetensors").is_file() for p in stage.inputs):
        return "waiting"  # (--plan) an input stage has not finished
    stamp = read_stamp(stage)
    if stamp is None:
        return "invalidated" if stage.out.exists() and any(stage.out.iterdir()) else "fresh"
    wanted = stamp_of(stage)
    if stamp.get("command") != wanted["command"] or stamp.get("inputs") != wanted["inputs"]:
        return "invalidated"
    if stamp.get("status") == "done" and all(p.exists() for p in stage.outputs):
        return "skip"
    return "resume"


def run_stage(stage: Stage, env: dict, log_dir: Path) -> dict:
    """Run one stage (or skip it); returns its index record. Raises SweepError when the command fails."""
    decision = decide(stage)
    stamp_path = stage.out / STAMP_FILE
    if decision == "skip":
        record = json.loads(stamp_path.read_text())
        return {"key": stage.key, "decision": "skip", "seconds": record.get("seconds"), "command": stage.command}
    if decision == "invalidated":
        shutil.rmtree(stage.out)  # --resume auto would otherwise continue the old run
    stamp = stamp_of(stage)
    write_stamp(stage, stamp, "running")
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / (stage.key.replace("/", "__") + ".log")
    start = time.monotonic()
    with open(log, "a") as handle:
        handle.write(f"\n$ {' '.join(stage.command)}\n")
        handle.flush()
        done = subprocess.run(stage.command, cwd=REPO_DIR, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SweepError(f"{stage.key} failed (exit {done.returncode}); log {log}:\n" + "\n".join(tail))
    missing = [str(p) for p in stage.outputs if not p.exists()]
    if missing:
        raise SweepError(f"{stage.key} finished but did not write {missing}; log {log}")
    write_stamp(stage, stamp, "done", seconds)
    return {"key": stage.key, "decision": decision, "seconds": seconds, "command": stage.command}


# ----------------------------------------------------------------------------------------------
# The plan: every stage of every run

def step_dir(run_out: Path, step: int) -> Path:
    return run_out / f"step_{step:07d}"


@dataclass
class Settings:
    """What every run shares (the OlmPool control) and the sweep's own choices."""
    out: Path
    size: str = "tiny"
    base_preset: str = "H_post_LQK_32kv_8k_11k_SWA"
    presets: tuple[str, ...] = ()
    only: tuple[str, ...] = ()  # run names to keep (empty: all)
    seeds: tuple[int, ...] = (0,)
    data: str | None = None
    data_seed: int = 0
    steps: int = 250
    batch_sequences: int = 8  # at the longer pretraining context; the shorter one gets twice as many
    save_every: int = 50
    lr: float | None = None
    min_lr_ratio: float = 1.0  # OlmPool's pretraining LR never decayed: cosine planned for trillions, stopped at ~140B
    recipe: str = "olmpool"
    ext_factor: int = 8  # extended length = factor x the longer pretraining context (OlmPool: 8K -> 64K)
    ext_steps: int = 20
    ext_batch_sequences: int = 1
    eval_factors: tuple[int, ...] = (1, 2, 4, 8)  # evaluation lengths as multiples of the longer context
    tasks: str = "niah_single_1"
    samples: int = 10
    windows: int = 8
    budgets: tuple[int, ...] = ()
    budget_models: tuple[str, ...] = ()
    early_steps: tuple[int, ...] = ()
    early_models: tuple[str, ...] = ()
    longppl_evaluator: str | None = None
    threads: int = 1
    device: str = "cpu"
    extra_train: tuple[str, ...] = ()
    shape: dict = field(default_factory=dict)  # SHAPE_FIELDS set on the base preset for every run

    def long_context(self) -> int:
        return base_shape(self.base_preset, self.size, {k: v for k, v in self.shape.items() if v is not None}
                          ).context_length

    def ext_len(self) -> int:
        return self.ext_factor * self.long_context()

    def eval_lengths(self) -> list[int]:
        return [f * self.long_context() for f in self.eval_factors]


def architectures(settings: Settings) -> list[Architecture]:
    runs = grid(settings.base_preset, settings.size, settings.shape)
    runs += [preset_architecture(p, settings.size, settings.base_preset, settings.shape) for p in settings.presets]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise SweepError(f"two runs share a name in {names}; drop the duplicate preset")
    if settings.only:
        unknown = sorted(set(settings.only) - set(names))
        if unknown:
            raise SweepError(f"--only {unknown}: no such run; the runs are {', '.join(names)}")
        runs = [r for r in runs if r.name in settings.only]
    return runs


def representative(runs: list[Architecture]) -> list[str]:
    """Three runs for the further findings: no harmful choice (Llama-like), Olmo 3's combination (QK norm
    and windows at the longer context) and every harmful choice, as far as the runs hold them."""
    wanted = [dict(qk=0, gqa=0, swa=0, ctx=0), dict(qk=1, gqa=0, swa=1, ctx=0), dict(qk=1, gqa=1, swa=1, ctx=1)]
    return [next(r.name for r in runs if r.choices == w) for w in wanted if any(r.choices == w for r in runs)]


def python() -> str:
    return sys.executable


def run_folder(settings: Settings, arch: Architecture, seed: int) -> Path:
    """OUT/runs/NAME/sSEED: one run's stages, each in its own subfolder."""
    return Path(settings.out) / "runs" / arch.name / f"s{seed}"


def data_flags(settings: Settings) -> list[str]:
    return ["--data", str(settings.data)] if settings.data else []


def pretrain_stage(settings: Settings, arch: Architecture, seed: int) -> Stage:
    """train.py at the run's pretraining context, with the token budget per step every run shares."""
    s = settings
    run_key, pretrain_out = f"{arch.name}/s{seed}", run_folder(s, arch, seed) / "pretrain"
    tokens_per_step = s.batch_sequences * s.long_context()  # identical token budget for every run
    return Stage(f"{run_key}/pretrain", [
        python(), "train.py", *arch.model_flags, "--seq_len", str(arch.pretrain_context),
        "--micro_batch", str(tokens_per_step // arch.pretrain_context), *data_flags(s), "--steps", str(s.steps),
        "--batch_tokens", str(tokens_per_step), "--save_every", str(s.save_every), "--keep_checkpoints", "0",
        "--eval_every", str(s.steps), "--log_every", str(max(1, s.steps // 10)), "--threads", str(s.threads),
        "--device", s.device, "--min_lr_ratio", str(s.min_lr_ratio), *(["--lr", str(s.lr)] if s.lr else []),
        *s.extra_train, "--seed", str(seed), "--data_seed", str(s.data_seed + seed), "--out", str(pretrain_out)],
        out=pretrain_out, outputs=[step_dir(pretrain_out, s.steps) / "model.safetensors"], run=run_key,
        kind="pretrain")


def held_out_flags(settings: Settings) -> list[str]:
    """evaluate.py's flags for the held-out measures (loss, LongPPL, sinks), the same in every evaluation."""
    long_context = settings.long_context()
    return ["--windows", str(settings.windows), "--short_context", str(long_context // 2),
            "--short_step", str(max(1, long_context // 8)), "--device", settings.device, *data_flags(settings)]


def evaluate_stage(settings: Settings, arch: Architecture, seed: int, tag: str, checkpoint: Path, lengths: str,
                   after: str) -> Stage:
    """evaluate.py on one checkpoint of the run into RUN/tag: recall (unless --tasks none), loss, LongPPL, sinks."""
    s, run_key, eval_out = settings, f"{arch.name}/s{seed}", run_folder(settings, arch, seed) / tag
    if s.tasks in ("", "none"):
        modes, recall_flags = "longppl,attention", []
    else:
        modes, recall_flags = "recall,longppl,attention", ["--tasks", s.tasks, "--samples", str(s.samples)]
    return Stage(f"{run_key}/{tag}", [
        python(), "evaluate.py", str(checkpoint), "--labels", arch.name, "--lengths", lengths, "--modes", modes,
        *recall_flags, *held_out_flags(s), "--out", str(eval_out)],
        out=eval_out, outputs=[eval_out / "results.json"], inputs=[checkpoint], after=[after], run=run_key,
        kind="evaluate")


def extension_stages(settings: Settings, arch: Architecture, seed: int, tag: str, source_step: int,
                     steps: int) -> list[Stage]:
    """extend.py from pretraining's checkpoint at source_step for `steps` steps into RUN/tag, then its evaluation
    at every evaluation length into RUN/eval (the main extension) or RUN/eval_TAG."""
    s, run_key, run_out = settings, f"{arch.name}/s{seed}", run_folder(settings, arch, seed)
    source, ext_out, ext_len = step_dir(run_out / "pretrain", source_step), run_out / tag, s.ext_len()
    extend = Stage(f"{run_key}/{tag}", [
        python(), "extend.py", "--from", str(source), "--recipe", s.recipe,
        "--seq_len", str(ext_len), "--batch_tokens", str(s.ext_batch_sequences * ext_len),
        "--micro_batch", "1", "--steps", str(steps), "--save_every", str(steps), "--eval_every", "0",
        "--log_every", "10", "--held_out_documents", "0", "--threads", str(s.threads), "--device", s.device,
        *data_flags(s), "--seed", str(seed), "--data_seed", str(s.data_seed + seed), "--out", str(ext_out)],
        out=ext_out, outputs=[step_dir(ext_out, steps) / "model.safetensors"], inputs=[source],
        after=[f"{run_key}/pretrain"], run=run_key, kind="extend")
    eval_tag = "eval" if tag == "extend" else f"eval_{tag}"
    lengths = ",".join(map(str, s.eval_lengths()))
    return [extend, evaluate_stage(s, arch, seed, eval_tag, step_dir(ext_out, steps), lengths, f"{run_key}/{tag}")]


def run_stages(settings: Settings, arch: Architecture, seed: int, budget_models: list[str],
               early_models: list[str]) -> list[Stage]:
    """One run's stages: pretrain, extend and evaluate, evaluate before extension at the longer pretraining
    context, and the further findings' extensions (other budgets, earlier checkpoints) where the run takes part."""
    s = settings
    final = step_dir(run_folder(s, arch, seed) / "pretrain", s.steps)
    stages = [pretrain_stage(s, arch, seed), *extension_stages(s, arch, seed, "extend", s.steps, s.ext_steps),
              evaluate_stage(s, arch, seed, "eval_before", final, str(s.long_context()),
                             after=f"{arch.name}/s{seed}/pretrain")]
    if arch.name in budget_models:
        for steps in s.budgets:
            if steps != s.ext_steps:
                stages += extension_stages(s, arch, seed, f"extend_b{steps}", s.steps, steps)
    if arch.name in early_models:
        for step in s.early_steps:
            stages += extension_stages(s, arch, seed, f"extend_p{step}", step, s.ext_steps)
    return stages


def longppl_stage(settings: Settings, runs: list[Architecture], members: dict) -> Stage:
    """LongPPL on the same key tokens for every extended model: one evaluator picks them, by default the run
    without a harmful choice (the paper used a strong outside model; none is at hand offline)."""
    s, names = settings, [r.name for r in runs]
    extended = [(key, step_dir(run_folder(s, arch, seed) / "extend", s.ext_steps))
                for key, (arch, seed) in members.items()]
    evaluator_name = s.longppl_evaluator or (representative(runs) or names)[0]
    if evaluator_name not in names:
        raise SweepError(f"--longppl_evaluator {evaluator_name!r}: no such run; the runs are {', '.join(names)}")
    extended.sort(key=lambda item: not item[0].startswith(evaluator_name + "/"))  # evaluate.py's evaluator: the first
    longppl_out = Path(s.out) / "longppl"
    return Stage("longppl", [
        python(), "evaluate.py", *[str(c) for _, c in extended],
        "--labels", ",".join(k.replace("/", "@") for k, _ in extended),
        "--modes", "longppl", "--lengths", str(s.ext_len()), *held_out_flags(s), "--out", str(longppl_out)],
        out=longppl_out, outputs=[longppl_out / "results.json"], inputs=[c for _, c in extended],
        after=[f"{k}/extend" for k, _ in extended], run=None, kind="evaluate")


def further_finding_models(settings: Settings, runs: list[Architecture]) -> tuple[list[str], list[str]]:
    """The runs that take part in --budgets and --early_steps, after checking that those settings can hold."""
    s, names = settings, [r.name for r in runs]
    budget_models = list(s.budget_models) or representative(runs)
    early_models = list(s.early_models) or representative(runs)
    for flag, chosen in (("--budget_models", budget_models), ("--early_models", early_models)):
        unknown = sorted(set(chosen) - set(names))
        if unknown and (s.budgets if flag == "--budget_models" else s.early_steps):
            raise SweepError(f"{flag} {unknown}: no such run; the runs are {', '.join(names)}")
    return budget_models, early_models


def plan(settings: Settings) -> tuple[list[Stage], dict]:
    """Every stage, in dependency order, and {run key: (Architecture, seed)}."""
    s = settings
    for step in s.early_steps:
        if step % s.save_every or step >= s.steps:
            raise SweepError(f"--early_steps {step}: must be a multiple of --save_every {s.save_every} and below "
                             f"--steps {s.steps}, so that pretraining keeps that checkpoint")
    runs = architectures(s)
    budget_models, early_models = further_finding_models(s, runs)
    stages, members = [], {}
    for arch, seed in itertools.product(runs, s.seeds):
        members[f"{arch.name}/s{seed}"] = (arch, seed)
        stages += run_stages(s, arch, seed, budget_models, early_models)
    stages.append(longppl_stage(s, runs, members))
    return stages, members


# ----------------------------------------------------------------------------------------------
# Running the plan: several stages at once, each when the stages it needs are done

def stage_env(settings: Settings, slot: int, gpus: list[str]) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(settings.threads)  # evaluate.py has no --threads
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


def execute(stages: list[Stage], settings: Settings, jobs: int, gpus: list[str], log=print) -> list[dict]:
    """Run the stages, at most `jobs` at a time, each as soon as the stages it needs are done. A failed
    stage blocks only the stages that need it; the others go on (a long unattended sweep loses one run,
    not the night). Raises SweepError naming every failure at the end."""
    pending = {stage.key: stage for stage in stages}
    done_keys, failed_keys, records, failures = set(), set(), [], []
    free_slots = list(range(jobs))
    running = {}
    logs = Path(settings.out) / "logs"
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for stage in [st for st in pending.values() if any(a in failed_keys for a in st.after)]:
                failed_keys.add(stage.key)  # blocked by a failure upstream
                del pending[stage.key]
                log(f"[sweep] blocked {stage.key}")
            for stage in [st for st in pending.values() if all(a in done_keys for a in st.after)]:
                if decide(stage) == "skip":  # no slot needed
                    records.append(run_stage(stage, {}, logs))
                    done_keys.add(stage.key)
                    del pending[stage.key]
                    continue
                if not free_slots:
                    break
                slot = free_slots.pop(0)
                log(f"[sweep] start {stage.key}")
                running[pool.submit(run_stage, stage, stage_env(settings, slot, gpus), logs)] = (stage, slot)
                del pending[stage.key]
            if not running:
                if any(all(a in done_keys for a in st.after) for st in pending.values()):
                    continue  # skipped stages made others ready
                if pending:
                    raise SweepError(f"stages waiting on stages that never run: {sorted(pending)}")
                break
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                stage, slot = running.pop(future)
                free_slots.append(slot)
                try:
                    record = future.result()
                except SweepError as error:
                    failures.append(error)
                    failed_keys.add(stage.key)
                    log(f"[sweep] FAILED {stage.key}")
                    continue
                records.append(record)
                done_keys.add(stage.key)
                log(f"[sweep] done {stage.key} in {record['seconds']:.0f}s ({record['decision']})")
    if failures:
        raise SweepError(f"{len(failures)} stage(s) failed, {len(failed_keys) - len(failures)} blocked by them; "
                         f"the rest finished:\n" + "\n".join(str(f) for f in failures))
    return records


# ----------------------------------------------------------------------------------------------
# Statistics (numpy only)

def r_squared(x, y) -> float:
    """R² of the least-squares line y ~ a + b x, which is the square of Pearson's r; nan when x or y is constant."""
    return pearson(x, y) ** 2


def pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def ranks(values) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank (as Spearman's rho wants)."""
    values = np.asarray(values, float)
    order = np.argsort(values, kind="stable")
    result = np.empty(len(values))
    result[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        result[tied] = result[tied].mean()
    return result


def spearman(x, y) -> float:
    return pearson(ranks(x), ranks(y)) if len(x) >= 3 else float("nan")


def pairwise_effects(rows: list[dict], measure: str, choices=CHOICES) -> dict:
    """For each choice, the pairs of models that differ in that choice only: the effect (harmful level's
    measure minus the other's) per pair, and its mean, standard deviation, min and max over the pairs, i.e.
    the spread over the other choices' combinations."""
    effects = {}
    for choice in choices:
        others = [c for c in choices if c != choice]
        by_rest = {}
        for row in rows:
            level = row["choices"].get(choice)
            value = row.get(measure)
            if level not in (0, 1) or value is None or not np.isfinite(value) or \
                    any(row["choices"].get(c) not in (0, 1) for c in others):
                continue
            rest = tuple(row["choices"][c] for c in others)
            by_rest.setdefault(rest, {})[level] = value
        pairs = [{"others": dict(zip(others, rest)), "effect": levels[1] - levels[0]}
                 for rest, levels in sorted(by_rest.items()) if 0 in levels and 1 in levels]
        values = np.array([p["effect"] for p in pairs])
        effects[choice] = {"pairs": pairs, "n": len(pairs),
                           "mean": float(values.mean()) if len(values) else float("nan"),
                           "std": float(values.std()) if len(values) else float("nan"),
                           "min": float(values.min()) if len(values) else float("nan"),
                           "max": float(values.max()) if len(values) else float("nan")}
    return effects


# ----------------------------------------------------------------------------------------------
# Reading the results of one run

def last_val_loss(metrics: Path) -> float | None:
    """The pretraining run's last validation loss (a resumed run appends; the later line counts)."""
    value = None
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "val_loss" in record:
                value = record["val_loss"]
    return value


def read_eval(folder: Path, label: str) -> dict:
    """{recall: {length: mean score x 100 over tasks}, loss: {length: held-out loss}, longppl_self: {...},
    sink: {length: sink share}} from one evaluate.py results.json."""
    path = folder / "results.json"
    found = {"recall": {}, "loss": {}, "longppl_self": {}, "sink": {}}
    if not path.is_file():
        return found
    results = json.loads(path.read_text())
    by_length = {}
    for key, cell in results.get("recall", {}).get(label, {}).items():
        task, length = key.rsplit("/", 1)
        if "mean" in cell:
            by_length.setdefault(int(length), []).append(100 * cell["mean"])
    found["recall"] = {L: float(np.mean(v)) for L, v in sorted(by_length.items())}
    for length, cell in results.get("longppl", {}).get(label, {}).items():
        if "loss" in cell:
            found["loss"][int(length)] = cell["loss"]
            found["longppl_self"][int(length)] = cell.get("longppl")
    for length, cell in results.get("attention", {}).get(label, {}).items():
        per_layer = cell.get("per_layer", {}).get(SINK_MEASURE)
        if per_layer:
            found["sink"][int(length)] = float(np.mean(per_layer))
    return found


# The authors' sink share: attention mass on the first 100 tokens from the query at position 4000
# (here the last position when shorter), averaged over layers and heads (evaluate.py's sink_first_100).
SINK_MEASURE = "sink_first_100"
MEASURES = {  # name: (description, higher is better)
    "recall": ("RULER-style recall x 100, mean over tasks and the lengths beyond the longer pretraining context", True),
    "loss": ("held-out loss (nats/token) at the extended length", False),
    "longppl": ("LongPPL at the extended length, key tokens from one evaluator for every model", False),
}


def collect(settings: Settings, members: dict) -> list[dict]:
    """One row per run: its choices, pretraining val loss, scores by length, the measures."""
    s, out = settings, Path(settings.out)
    long_context, ext_len = s.long_context(), s.ext_len()
    shared = {}
    path = out / "longppl" / "results.json"
    if path.is_file():
        shared = json.loads(path.read_text()).get("longppl", {})
    rows = []
    for key, (arch, seed) in members.items():
        run_out = run_folder(s, arch, seed)
        after, before = read_eval(run_out / "eval", arch.name), read_eval(run_out / "eval_before", arch.name)
        beyond = [v for L, v in after["recall"].items() if L > long_context]
        shared_cell = shared.get(key.replace("/", "@"), {}).get(str(ext_len), {})
        row = {"run": key, "name": arch.name, "seed": seed, "choices": arch.choices,
               "harmful_count": arch.harmful_count, "pretrain_context": arch.pretrain_context,
               "val_loss_pretrain": last_val_loss(run_out / "pretrain" / "metrics.jsonl"),
               "recall_by_length": after["recall"], "loss_by_length": after["loss"],
               "recall": float(np.mean(beyond)) if beyond else None,
               "loss": after["loss"].get(ext_len), "longppl": shared_cell.get("longppl"),
               "longppl_self": after["longppl_self"].get(ext_len),
               "sink": after["sink"].get(ext_len),
               "before": {"recall": before["recall"].get(long_context), "loss": before["loss"].get(long_context),
                          "sink": before["sink"].get(long_context)}}
        for tag, folder in (("budgets", "eval_extend_b"), ("early", "eval_extend_p")):
            row[tag] = {}
            for sub in sorted(run_out.glob(folder + "*")):
                number = int(sub.name[len(folder):])
                found = read_eval(sub, arch.name)
                beyond = [v for L, v in found["recall"].items() if L > long_context]
                row[tag][number] = {"loss": found["loss"].get(ext_len),
                                    "recall": float(np.mean(beyond)) if beyond else None}
        row["budgets"].setdefault(s.ext_steps, {"loss": row["loss"], "recall": row["recall"]})
        row["early"].setdefault(s.steps, {"loss": row["loss"], "recall": row["recall"]})
        rows.append(row)
    return rows


def average_seeds(rows: list[dict], measure: str) -> tuple[list[dict], dict]:
    """Rows averaged over seeds per model, and the seed-to-seed spread (mean over models of the std)."""
    by_name = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    merged, spreads = [], []
    for name, group in by_name.items():
        row = dict(group[0], run=name, seeds=[r["seed"] for r in group])
        for key in ("recall", "loss", "longppl", "sink", "val_loss_pretrain"):
            values = [r[key] for r in group if r.get(key) is not None]
            row[key] = float(np.mean(values)) if values else None
        values = [r["before"].get(measure) for r in group if r["before"].get(measure) is not None]
        row["before"] = dict(group[0]["before"], **{measure: float(np.mean(values)) if values else None})
        seeds = [r[measure] for r in group if r.get(measure) is not None]
        if len(seeds) > 1:
            spreads.append(float(np.std(seeds, ddof=1)))
        merged.append(row)
    return merged, {"seed_std_mean": float(np.mean(spreads)) if spreads else None, "models_with_seeds": len(spreads)}


def analyze(rows: list[dict], measure: str, settings: Settings) -> dict:
    """The paper's analysis on the rows (one per run) for one measure."""
    description, higher_is_better = MEASURES[measure]
    merged, seeds = average_seeds(rows, measure)
    scored = [r for r in merged if r.get(measure) is not None]
    y = np.array([r[measure] for r in scored], float)
    column = lambda key: np.array([np.nan if r.get(key) is None else r[key] for r in scored], float)  # noqa: E731
    before = np.array([np.nan if r["before"].get(measure) is None else r["before"][measure] for r in scored], float)
    sinks = column("sink")
    qk = np.array([r["choices"].get("qk") for r in scored], dtype=object)
    sink_split = {}
    for level, label in ((1, "post + QK norm"), (0, "pre, no QK norm")):
        pick = qk == level
        measured = sinks[pick][np.isfinite(sinks[pick])]
        sink_split[label] = {"n": int(pick.sum()), "pearson": pearson(sinks[pick], y[pick]),
                             "sink_mean": float(measured.mean()) if len(measured) else None}
    model_spread = float(np.std(y, ddof=1)) if len(y) > 1 else None
    analysis = {
        "measure": measure, "description": description, "higher_is_better": higher_is_better,
        "models": len(scored),
        "r2": {"harmful_count": r_squared(column("harmful_count"), y),
               "pretraining_val_loss": r_squared(column("val_loss_pretrain"), y),
               "before_extension": r_squared(before, y),
               "sink_share": r_squared(sinks, y)},
        "paper_r2_7b": {"harmful_count": 0.67, "pretraining_val_loss": 0.29, "before_extension": 0.32,
                        "sink_share": 0.38},
        "pairwise": pairwise_effects(scored, measure),
        "sinks": {"pearson": pearson(sinks, y), "by_qk_norm": sink_split},
        "spread": {"between_models_std": model_spread, **seeds},
        "table": [{k: r.get(k) for k in ("name", "seeds", "choices", "harmful_count", "val_loss_pretrain",
                                           "recall", "loss", "longppl", "sink")} | {"before": r["before"][measure]}
                  for r in merged],
    }
    analysis["budgets"] = budget_analysis(rows, measure)
    analysis["early"] = early_analysis(rows, measure, settings.steps)
    return analysis


def budget_analysis(rows: list[dict], measure: str) -> dict:
    """Per extension budget, each subset model's measure and the best-worst gap (does it shrink?)."""
    table = {r["run"]: {str(b): v.get(measure) for b, v in sorted(r["budgets"].items())}
             for r in rows if len(r["budgets"]) > 1}
    budgets = sorted({int(b) for t in table.values() for b in t})
    gaps = {}
    for b in budgets:
        values = [t.get(str(b)) for t in table.values() if t.get(str(b)) is not None]
        gaps[str(b)] = float(max(values) - min(values)) if len(values) > 1 else None
    return {"table": table, "gap_by_budget": gaps}


def early_analysis(rows: list[dict], measure: str, final_step: int) -> dict:
    """Per pretraining step extended from, each subset model's measure; Spearman rho of each step's
    ranking against the final checkpoint's."""
    table = {r["run"]: {str(p): v.get(measure) for p, v in sorted(r["early"].items())}
             for r in rows if len(r["early"]) > 1}
    steps = sorted({int(p) for t in table.values() for p in t})
    models = list(table)
    final = [table[m].get(str(final_step)) for m in models]
    rho = {}
    for p in steps:
        values = [table[m].get(str(p)) for m in models]
        keep = [i for i in range(len(models)) if values[i] is not None and final[i] is not None]
        rho[str(p)] = spearman([values[i] for i in keep], [final[i] for i in keep]) if len(keep) >= 3 else None
    return {"table": table, "spearman_vs_final": rho}


# ----------------------------------------------------------------------------------------------
# Writing: tables, plots, index

def fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(analyses: dict, rows: list[dict], settings: Settings, primary: str) -> str:
    s = settings
    lines = [f"# Mini pool: {len({r['name'] for r in rows})} models at size {s.size}, seeds {list(s.seeds)}", "",
             f"Pretraining {s.steps} steps x {s.batch_sequences * s.long_context()} tokens; extension "
             f"({s.recipe}) to {s.ext_len()} tokens, {s.ext_steps} steps x {s.ext_batch_sequences} sequence(s). "
             f"Primary measure: **{primary}** ({MEASURES[primary][0]}).", "",
             "## Per model", "",
             "| model | seed | harmful | val loss (pretrain) | before: loss @" + str(s.long_context()) +
             " | recall by length | held-out loss by length | recall beyond pretraining | LongPPL | sink share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["harmful_count"], r["name"], r["seed"])):
        recall = ", ".join(f"{L}: {v:.0f}" for L, v in r["recall_by_length"].items()) or "–"
        loss = ", ".join(f"{L}: {v:.3f}" for L, v in r["loss_by_length"].items()) or "–"
        lines.append(f"| {r['name']} | {r['seed']} | {r['harmful_count']} | {fmt(r['val_loss_pretrain'])} | "
                     f"{fmt(r['before']['loss'])} | {recall} | {loss} | {fmt(r['recall'], 1)} | {fmt(r['longppl'])} | "
                     f"{fmt(r['sink'])} |")
    for measure, a in analyses.items():
        lines += ["", f"## {measure}: {a['description']} ({'higher' if a['higher_is_better'] else 'lower'} is better)",
                  "", f"{a['models']} models (seeds averaged). Spread between models (std): "
                  f"{fmt(a['spread']['between_models_std'])}; seed-to-seed (mean std over "
                  f"{a['spread']['models_with_seeds']} models): {fmt(a['spread']['seed_std_mean'])}.", "",
                  seed_verdict(a["spread"]), "",
                  "| R² of the measure against | here | paper (7B, HELMET-32K) |", "|---|---|---|"]
        for key, label in (("harmful_count", "count of harmful choices"), ("pretraining_val_loss", "pretraining loss"),
                           ("before_extension", "the same measure before extension"), ("sink_share", "sink share")):
            lines.append(f"| {label} | {fmt(a['r2'][key])} | {a['paper_r2_7b'][key]} |")
        lines += ["", "Pairwise: the measure of the model with the harmful level minus that of its twin with the "
                  "other level "
                  f"({'negative' if a['higher_is_better'] else 'positive'}: the harmful level is worse).", "",
                  "| choice (harmful level minus other) | pairs | mean effect | std over the others | min | max |",
                  "|---|---|---|---|---|---|"]
        for choice, e in a["pairwise"].items():
            lines.append(f"| {choice}: {CHOICE_DESCRIPTIONS[choice]} | {e['n']} | {fmt(e['mean'])} | {fmt(e['std'])} | "
                         f"{fmt(e['min'])} | {fmt(e['max'])} |")
        sinks = a["sinks"]
        lines += ["", f"Sinks: Pearson r of sink share ({SINK_MEASURE}) with {measure}: {fmt(sinks['pearson'])}; " +
                  "; ".join(f"{k}: r {fmt(v['pearson'])} over {v['n']} models, mean sink {fmt(v['sink_mean'])}"
                            for k, v in sinks["by_qk_norm"].items()) + "."]
        lines += finding_table("Gaps after more extension data: the measure by extension budget (steps)",
                               a["budgets"]["table"], "gap best - worst", a["budgets"]["gap_by_budget"])
        lines += finding_table("The ranking is set early: the measure after extending from each pretraining step",
                               a["early"]["table"], "Spearman rho vs the final step's ranking",
                               a["early"]["spearman_vs_final"])
    return "\n".join(lines) + "\n"


def finding_table(title: str, table: dict, summary_label: str, summary: dict) -> list[str]:
    """A further finding as a markdown table: one row per run, one column per point, and a summary row."""
    if not table:
        return []
    points = list(next(iter(table.values())))
    if all(v is None for t in table.values() for v in t.values()):
        return ["", f"{title}: not measured for these runs."]
    lines = ["", f"{title}:", "", "| run | " + " | ".join(points) + " |", "|---|" + "---|" * len(points)]
    lines += [f"| {run} | " + " | ".join(fmt(t.get(p)) for p in points) + " |" for run, t in table.items()]
    return lines + [f"| **{summary_label}** | " + " | ".join(fmt(summary.get(p)) for p in points) + " |"]


def seed_verdict(spread: dict) -> str:
    """Whether the differences between models stand out of the seed-to-seed noise (the issue's test for a
    second seed)."""
    between, seeds = spread.get("between_models_std"), spread.get("seed_std_mean")
    if seeds is None:
        return "One seed per model: rerun with `--seeds 0,1` to compare the spread between models with the seeds'."
    if between is not None and between == 0 and seeds == 0:
        return "Every model scores the same, on every seed: there is no difference to compare with the seed noise."
    ratio = between / seeds if between is not None and seeds > 0 else float("inf")
    return (f"The spread between models is {fmt(ratio, 1)}x the seed-to-seed spread: "
            + ("the differences between models stand out of the seed noise." if ratio >= 2 else
               "the differences between models are NOT clearly larger than the seed noise."))


def plots(analyses: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for measure, a in analyses.items():
        table = [r for r in a["table"] if r.get(measure) is not None]
        if not table:
            continue
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in table:
            qk = r["choices"].get("qk")
            axes[0].scatter(r["harmful_count"], r[measure], color="tab:red" if qk == 1 else "tab:blue")
            axes[0].annotate(r["name"], (r["harmful_count"], r[measure]), fontsize=6)
            if r.get("sink") is not None:
                axes[1].scatter(r["sink"], r[measure], color="tab:red" if qk == 1 else "tab:blue")
        axes[0].set(xlabel="count of harmful choices", ylabel=measure,
                    title=f"{measure} vs count (R² {fmt(a['r2']['harmful_count'], 2)}); red: QK norm")
        axes[1].set(xlabel=f"sink share ({SINK_MEASURE})", ylabel=measure,
                    title=f"sinks (r {fmt(a['sinks']['pearson'], 2)}); red: QK norm, blue: none")
        figure.tight_layout()
        path = out / f"{measure}_vs_count.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path.name)
        for key, xlabel in (("budgets", "extension steps"), ("early", "pretraining step extended from")):
            t = a[key]["table"]
            if not any(v is not None for values in t.values() for v in values.values()):
                continue  # not measured for these runs (LongPPL: only the main extension's)
            figure, axis = plt.subplots(figsize=(6, 4))
            for model, values in t.items():
                xs = [int(k) for k, v in values.items() if v is not None]
                axis.plot(xs, [values[str(x)] for x in xs], marker="o", label=model)
            axis.set(xlabel=xlabel, ylabel=measure, title=f"{measure} by {xlabel}")
            axis.legend(fontsize=6)
            figure.tight_layout()
            path = out / f"{measure}_by_{key}.png"
            figure.savefig(path, dpi=120)
            plt.close(figure)
            written.append(path.name)
    return written


def write_index(stages: list[Stage], records: list[dict], settings: Settings, command: list[str]) -> None:
    out = Path(settings.out)
    times = {r["key"]: r for r in records}
    entries = []
    for stage in stages:
        stamp = read_stamp(stage) or {}
        entries.append({"key": stage.key, "run": stage.run, "kind": stage.kind, "out": str(stage.out),
                        "status": stamp.get("status", "not run"), "seconds": stamp.get("seconds"),
                        "this_time": times.get(stage.key, {}).get("decision"), "command": stage.command})
    index = {"command": command, "machine": machine(), "settings": settings_dict(settings), "stages": entries}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    lines = [f"# Sweep index: {out}", "", f"Command: `{' '.join(command)}`", "", f"Machine: {index['machine']}", "",
             "| stage | status | seconds | this time | output |", "|---|---|---|---|---|"]
    lines += [f"| {e['key']} | {e['status']} | {fmt(e['seconds'], 0)} | {e['this_time'] or '–'} | {e['out']} |"
              for e in entries]
    (out / "index.md").write_text("\n".join(lines) + "\n")


def machine() -> str:
    try:
        import torch
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        torch_version = torch.__version__
    except Exception:  # noqa: BLE001 - the index is written even where torch cannot start
        device, torch_version = "unknown", "unknown"
    return f"{platform.node()}: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, " \
           f"{device}, python {platform.python_version()}, torch {torch_version}"


def settings_dict(settings: Settings) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()}


def write_analysis(settings: Settings, members: dict, primary: str, results_dir: Path | None,
                   command: list[str]) -> dict:
    out = Path(settings.out)
    rows = collect(settings, members)
    analyses = {m: analyze(rows, m, settings) for m in MEASURES
                if any(r.get(m) is not None for r in rows)}
    if primary not in analyses:
        raise SweepError(f"--measure {primary}: no run has it yet (finished runs: "
                         f"{sum(r['loss'] is not None for r in rows)}); run the sweep first or pick "
                         f"one of {sorted(analyses) or list(MEASURES)}")
    analyses = {primary: analyses[primary]} | analyses
    report = {"command": command, "machine": machine(), "settings": settings_dict(settings), "primary": primary,
              "rows": rows, "analyses": analyses}
    target = out / "analysis"
    target.mkdir(parents=True, exist_ok=True)
    (target / "analysis.json").write_text(json.dumps(report, indent=1, default=str))
    (target / "analysis.md").write_text(markdown(analyses, rows, settings, primary))
    plots(analyses, target)
    if results_dir is not None:  # the committed copy: small files only, never checkpoints
        results_dir = Path(results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        for file in target.iterdir():
            shutil.copy2(file, results_dir / file.name)
        for name in ("index.json", "index.md"):
            if (out / name).is_file():
                shutil.copy2(out / name, results_dir / name)
        index = json.loads((out / "index.json").read_text()) if (out / "index.json").is_file() else {}
        ran = index.get("command")
        text = (f"Analysis by\n\n```bash\n{' '.join(command)}\n```\n\non {machine()}, "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}.\n")
        if ran and ran != command:
            text = (f"Stages run by the last sweep command on {out}\n\n```bash\n{' '.join(ran)}\n```\n\non "
                    f"{index.get('machine')}.\n\n" + text)
        (results_dir / "COMMAND.md").write_text(text)
    return report


# ----------------------------------------------------------------------------------------------
# Command line

def integers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 20,60,180") from None


def names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p = parser.add_argument
    p("--out", default="sweeps/mini", help="the sweep's folder: runs/, logs/, index, analysis (default: sweeps/mini)")
    p("--size", default="tiny", help="olmpool size of every run (default: tiny)")
    p("--base_preset", default="H_post_LQK_32kv_8k_11k_SWA", help="shape the grid's switches act on")
    for name, help in (("n_layers", "layers"), ("d_model", "width"),
                       ("n_heads", "query heads (GQA 4:1 needs a multiple of 4)"),
                       ("head_dim", "head width"), ("mlp_hidden", "SwiGLU width"),
                       ("context_length", "the longer pretraining context; the shorter is half (OlmPool: 8192 / 4096)"),
                       ("window", "local layers' window (OlmPool: 4096)")):
        p(f"--{name}", type=int, help=f"{help}, for every run (default: the base preset's at --size)")
    p("--presets", type=names, default=(), help="comma-separated OlmPool presets to add to the 16-run grid")
    p("--only", type=names, default=(), help="comma-separated run names to keep (a subset of the grid)")
    p("--seeds", type=integers, default=(0,), help="init and data seeds; each seed runs the whole grid (default: 0)")
    p("--data", help="prepared data folder for every stage (default: train.py's built-in corpus, in its "
                     "compact vocabulary where train.py uses one at --size)")
    p("--steps", type=int, default=250, help="pretraining steps (default: 250)")
    p("--batch_sequences", type=int, default=8,
      help="pretraining batch in sequences of the longer context; every run gets the same tokens per step (default: 8)")
    p("--save_every", type=int, default=50, help="pretraining checkpoints kept every N steps (default: 50)")
    p("--lr", type=float, help="pretraining peak learning rate (default: train.py's for the size)")
    p("--min_lr_ratio", type=float, default=1.0,
      help="pretraining's final / peak lr (default: 1, a constant lr after warmup, as OlmPool's runs, whose "
           "cosine was planned for trillions of tokens and stopped at ~140B, never decayed)")
    p("--recipe", default="olmpool", help="extend.py's recipe (default: olmpool)")
    p("--ext_factor", type=int, default=8, help="extended length / the longer pretraining context (OlmPool: 8)")
    p("--ext_steps", type=int, default=20,
      help="extension steps (default: 20: 41K tokens, 8%% of pretraining's 512K at the defaults; OlmPool: 10B of 140B)")
    p("--ext_batch_sequences", type=int, default=1, help="extension batch in sequences (default: 1)")
    p("--eval_factors", type=integers, default=(1, 2, 4, 8),
      help="evaluation lengths as multiples of the longer pretraining context (default: 1,2,4,8)")
    p("--tasks", default="niah_single_1", help="evaluate.py recall tasks, or none (default: niah_single_1)")
    p("--samples", type=int, default=10, help="recall samples per task and length (default: 10)")
    p("--windows", type=int, default=8, help="held-out windows per length for loss, LongPPL, sinks (default: 8)")
    p("--budgets", type=integers, default=(), help="further finding: extension steps to compare, e.g. 20,40,120")
    p("--budget_models", type=names, default=(), help="runs for --budgets (default: 3 representative)")
    p("--early_steps", type=integers, default=(), help="further finding: pretraining steps to extend from")
    p("--early_models", type=names, default=(), help="runs for --early_steps (default: 3 representative)")
    p("--longppl_evaluator", help="run whose extended model picks LongPPL's key tokens for all (default: the run "
                                   "without a harmful choice)")
    p("--measure", default="loss", choices=list(MEASURES), help="the measure the analysis leads with (default: loss)")
    p("--jobs", type=int, default=1, help="stages at once (CPU); with --gpus, one per GPU")
    p("--threads", type=int, default=1, help="CPU threads per stage (default: 1)")
    p("--gpus", type=names, default=(), help="comma-separated GPU ids: one stage per GPU, on cuda")
    p("--extra_train", default="", help="more train.py flags for every pretraining run, as one string")
    p("--plan", action="store_true", help="print every stage, its command and whether it would run; run nothing")
    p("--analyze_only", action="store_true", help="only read finished results and write the analysis")
    p("--results", help="also copy the analysis, plots and index here (a folder to commit)")
    return parser


def default_data(size: str) -> str:
    """The built-in corpus as train.py would use it at this size (its compact vocabulary where train.py has
    one for the size), prepared once here so that every stage, evaluate.py included, names the same folder."""
    import inspect

    import data
    import settings
    compact = settings.COMPACT_VOCAB_BY_SIZE.get(size, 0)
    if compact and "compact_vocab" in inspect.signature(data.prepare_builtin_corpus).parameters:
        return str(data.prepare_builtin_corpus(compact_vocab=compact))
    return str(data.prepare_builtin_corpus())


def settings_from(args) -> Settings:
    if args.ext_steps < 1 or args.steps < 1:
        raise SweepError(f"--steps {args.steps} and --ext_steps {args.ext_steps} must be at least 1")
    # absolute, since every stage runs in the repository's folder whatever the caller's
    return Settings(out=Path(args.out).resolve(), size=args.size, base_preset=args.base_preset, presets=args.presets,
                    only=args.only, seeds=args.seeds,
                    data=str(Path(args.data).resolve()) if args.data else default_data(args.size),
                    steps=args.steps, min_lr_ratio=args.min_lr_ratio,
                    batch_sequences=args.batch_sequences, save_every=args.save_every, lr=args.lr, recipe=args.recipe,
                    ext_factor=args.ext_factor, ext_steps=args.ext_steps, ext_batch_sequences=args.ext_batch_sequences,
                    eval_factors=args.eval_factors, tasks=args.tasks, samples=args.samples, windows=args.windows,
                    budgets=args.budgets, budget_models=args.budget_models, early_steps=args.early_steps,
                    early_models=args.early_models, longppl_evaluator=args.longppl_evaluator, threads=args.threads,
                    device="cuda" if args.gpus else "cpu", extra_train=tuple(args.extra_train.split()),
                    shape={k: getattr(args, k) for k in SHAPE_FIELDS if getattr(args, k) is not None})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]
    try:
        settings = settings_from(args)
        stages, members = plan(settings)
        if args.plan:
            for stage in stages:
                print(f"[{decide(stage)}] {stage.key}\n    {' '.join(stage.command)}")
            return 0
        if not args.analyze_only:
            Path(settings.out).mkdir(parents=True, exist_ok=True)
            jobs = len(args.gpus) if args.gpus else max(1, args.jobs)
            records, failure = [], None
            try:
                records = execute(stages, settings, jobs, list(args.gpus))
            except SweepError as error:
                failure = error  # analyse what finished, then report the failures
            write_index(stages, records, settings, command)
        report = write_analysis(settings, members, args.measure, args.results, command)
        print((Path(settings.out) / "analysis" / "analysis.md").read_text())
        if not args.analyze_only and failure is not None:
            raise failure
        return 0 if report else 1
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
