"""The mini pool: OlmPool's controlled experiment at a size one machine can run.

Every run of a grid (the study's four choices at two levels each, on one base shape) is pretrained
(train.py), extended (extend.py) and evaluated (evaluate.py) with the same data, seeds and budgets,
each stage an ordinary resumable command; pool_analysis.py then writes the paper's analysis (tables,
plots) and an index of every stage. docs/sweep.md explains the grid, resume and the findings.

    python sweep.py --plan                                   # the 16-run grid's commands; runs nothing
    python sweep.py --out sweeps/mini --jobs 2 --threads 1   # run it (the same command resumes)
    python sweep.py --out sweeps/mini --presets G_pre_8kv_8k_14k,olmo3_like   # grid plus presets
    python sweep.py --out sweeps/mini --budgets 20,60,180 --early_steps 200,400   # the further findings
    python sweep.py --rope_theta 10000 --ext_rope_factor 16 --ext_data DIR ...  # ABF x16 from a 10K base, own data
    python sweep.py --control_models pre_8kv_256,pre_2kv_128 ...  # these runs extended with `none` too (the control)
    python sweep.py --out sweeps/mini --analyze_only --results results/mini_pool  # tables and plots only
    python sweep.py --from_rows results/mini_pool/analysis.json --results results/mini_pool  # committed rows
    python sweep.py --gpus 0,1,2,3 --size 20m ...            # one run per GPU
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import math
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import files
import pool_analysis
from stages import Stage, SweepError, decide, read_stamp, run_stage

CONTROL_TAG = "extend-none"  # RUN/extend-none: a --control_models run's extension with the none recipe


# ----------------------------------------------------------------------------------------------
# The grid: four choices, two levels each, the harmful level first (the study's finding, as the OlmPool
# blog post and paper state it; docs/reference.md). Everything else is the base preset's.

CHOICES = ("qk", "gqa", "swa", "ctx")
CHOICE_DESCRIPTIONS = {  # qk's depends on --qk_levels: qk_description
    "gqa": "GQA 4:1 (harmful) vs one kv head per query head",
    "swa": "sliding windows 3 local : 1 global (harmful) vs all global",
    "ctx": "shorter pretraining context (harmful) vs longer",
}


# The qk choice's two levels, harmful first, spelled as OlmPool's run names begin: the block norm (pre or
# post), then the QK norm if any (_LQK layerwise, _HQK headwise). The default, post_LQK against pre, is
# Olmo 3 against Llama and moves two switches at once; pre_LQK,pre moves QK norm alone (OlmPool's
# G_pre_LQK_8kv_8k_14k against G_pre_8kv_8k_14k) and pre_HQK,pre or post_HQK,post_LQK reach headwise QK norm.
QK_LEVELS = ("post_LQK", "pre")
QK_NORM_SUFFIXES = {"": "none", "_LQK": "layerwise", "_HQK": "headwise"}


def qk_level(level: str) -> tuple[str, str]:
    """(norm_placement, qk_norm) of a qk level: 'post_LQK' -> ('post', 'layerwise'), 'pre' -> ('pre', 'none')."""
    for placement in ("pre", "post"):
        suffix = level[len(placement):] if level.startswith(placement) else None
        if suffix in QK_NORM_SUFFIXES:
            return placement, QK_NORM_SUFFIXES[suffix]
    raise SweepError(f"--qk_levels: {level!r} is not a level; write the block norm (pre or post) and the QK norm "
                     f"if any (_LQK layerwise, _HQK headwise), e.g. --qk_levels pre_LQK,pre (QK norm alone)")


def check_qk_levels(levels: tuple[str, ...]) -> None:
    if len(levels) != 2 or qk_level(levels[0]) == qk_level(levels[1]):
        raise SweepError(f"--qk_levels {','.join(levels)}: give two different levels, the harmful first, e.g. "
                         f"--qk_levels pre_LQK,pre (QK norm alone) or pre_HQK,pre (headwise QK norm)")


def qk_description(levels: tuple[str, ...]) -> str:
    """What the qk choice compares, and a warning where its levels differ in both switches."""
    said = [f"{placement} norm, " + ("no QK norm" if qk_norm == "none" else f"{qk_norm} QK norm")
            for placement, qk_norm in map(qk_level, levels)]
    (harmful_placement, harmful_norm), (other_placement, other_norm) = map(qk_level, levels)
    both = harmful_placement != other_placement and harmful_norm != other_norm
    return f"{said[0]} (harmful) vs {said[1]}" + (" (TWO switches move at once: norm placement and QK norm; "
                                                  "--qk_levels pre_LQK,pre moves one)" if both else "")


@dataclass(frozen=True)
class Architecture:
    """One model of the pool: its name, the train.py flags that build it, and which choices it makes
    (1: the harmful level, 0: the other; None for a preset whose switch is neither level)."""
    name: str
    model_flags: tuple[str, ...]
    choices: dict = field(default_factory=dict, compare=False, hash=False)
    pretrain_context: int = 0
    window: int | None = None  # the local layers' window; None where every layer is global

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


def grid(base_preset: str = "H_post_LQK_32kv_8k_11k_SWA", size: str = "tiny", shape: dict | None = None,
         qk_levels: tuple[str, str] = QK_LEVELS) -> list[Architecture]:
    """The 16 combinations of the four choices on the base preset's shape at `size` (with `shape`'s fields
    overriding it: context_length is the longer pretraining context, window the local layers' width), the
    qk choice between `qk_levels` (harmful first)."""
    check_qk_levels(qk_levels)
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
        level = qk_levels[0] if qk else qk_levels[1]
        placement, qk_norm = qk_level(level)
        name = level + f"_{kv}kv_{context}" + ("_SWA" if swa else "")
        flags = ("--preset", base_preset, "--size", size, *shape_flags,
                 "--norm_placement", placement, "--qk_norm", qk_norm,
                 "--n_kv_heads", str(kv), "--window", str(window) if swa else "none",
                 "--global_every", "4", "--context_length", str(context))
        runs.append(Architecture(name, flags, dict(qk=qk, gqa=gqa, swa=swa, ctx=ctx), context,
                                 window if swa else None))
    return runs


def preset_architecture(name: str, size: str, base_preset: str = "H_post_LQK_32kv_8k_11k_SWA",
                        shape: dict | None = None, qk_levels: tuple[str, str] = QK_LEVELS) -> Architecture:
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
    choices = dict(qk=1 if norm == qk_level(qk_levels[0]) else 0 if norm == qk_level(qk_levels[1]) else None,
                   gqa=1 if ratio >= 4 else 0 if ratio == 1 else None, swa=1 if config.window else 0,
                   ctx=1 if config.context_length < long_context else 0)
    flags = ("--preset", name, "--size", size, *(item for k, v in overrides.items() for item in (f"--{k}", str(v))))
    return Architecture(name, flags, choices, config.context_length, config.window)


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
    rope_theta: float | None = None  # every run's pretraining RoPE base (None: each preset's own)
    recipe: str = "olmpool"
    ext_rope_factor: float | None = None  # extend.py --rope_factor: ABF's base = pretraining theta x this
    ext_data: str | None = None  # the extensions' folder, in data's vocabulary (None: data)
    control_models: tuple[str, ...] = ()  # runs extended a second time with the none recipe
    ext_factor: int = 8  # extended length = factor x the longer pretraining context (OlmPool: 8K -> 64K)
    ext_steps: int = 20
    ext_batch_sequences: int = 1
    eval_factors: tuple[int, ...] = (1, 2, 4, 8)  # evaluation lengths as multiples of the longer context
    tasks: str = "niah_single_1"
    samples: int = 10
    windows: int = 8
    probe_count: int = 32  # documents per probe kind and length, where --data is a synthetic mix (probes.py)
    budgets: tuple[int, ...] = ()
    budget_models: tuple[str, ...] = ()
    early_steps: tuple[int, ...] = ()
    early_models: tuple[str, ...] = ()
    longppl_evaluator: str | None = None
    threads: int = 1
    device: str = "cpu"
    extra_train: tuple[str, ...] = ()
    shape: dict = field(default_factory=dict)  # SHAPE_FIELDS set on the base preset for every run
    qk_levels: tuple[str, str] = QK_LEVELS  # the qk choice's levels, harmful first

    def __post_init__(self):
        if self.ext_steps < 1 or self.steps < 1:
            raise SweepError(f"--steps {self.steps} and --ext_steps {self.ext_steps} must be at least 1")
        for name, ok, wanted, example in SETTING_RULES:
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            if value is not None and (not all(ok(v) for v in values) or not values and name in NOT_EMPTY):
                raise SweepError(f"--{name} {shown(value)} must be {wanted}; e.g. --{name} {example}")
        check_qk_levels(self.qk_levels)
        if self.ext_rope_factor is not None and self.recipe == "none":
            raise SweepError(f"--ext_rope_factor {self.ext_rope_factor:g} with --recipe none: the control keeps RoPE "
                             f"unchanged; drop one (--control_models adds the control beside the recipe)")
        if self.rope_theta is not None and any(f.split("=")[0] == "--rope_theta" for f in self.extra_train):
            raise SweepError("--rope_theta and --extra_train '--rope_theta ...' both set the pretraining RoPE base; "
                             "give one of them")

    def long_context(self) -> int:
        return base_shape(self.base_preset, self.size, {k: v for k, v in self.shape.items() if v is not None}
                          ).context_length

    def ext_len(self) -> int:
        return self.ext_factor * self.long_context()

    def eval_lengths(self) -> list[int]:
        return [f * self.long_context() for f in self.eval_factors]

    def longppl_evaluator_name(self) -> str:
        """The run (or the checkpoint folder outside the grid) whose extended model picks LongPPL's key tokens:
        --longppl_evaluator, by default the run without a harmful choice."""
        runs = architectures(self)
        return self.longppl_evaluator or (representative(runs) or [r.name for r in runs])[0]

    def choice_descriptions(self) -> dict[str, str]:
        return {"qk": qk_description(self.qk_levels), **CHOICE_DESCRIPTIONS}

    def as_dict(self) -> dict:
        """The settings as JSON values, as the index and the analysis record them."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


# The sweep's own flags and the values they take: (flag, test, what it asks, an example); every value of
# a list must pass. Checked before anything runs; what the stages take is then checked by the stages' own
# parsers (check_stage_commands).
SETTING_RULES = [
    *[(name, lambda v: v >= 1, "at least 1", example) for name, example in (
        ("batch_sequences", 8), ("save_every", 50), ("ext_factor", 8), ("ext_batch_sequences", 1),
        ("eval_factors", "1,2,4,8"), ("samples", 10), ("windows", 8), ("probe_count", 32), ("budgets", "20,60,180"),
        ("early_steps", "100,200"), ("threads", 1))],
    ("seeds", lambda v: v >= 0, "0 or more", "0,1"),
    ("lr", lambda v: 0 < v < math.inf, "a positive finite number", 3e-3),
    ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]", 1.0),
    ("rope_theta", lambda v: 1 < v < math.inf, "a finite number above 1", 10000),
    ("ext_rope_factor", lambda v: 1 <= v < math.inf, "a finite number of at least 1 (1: RoPE unchanged)", 16),
]
NOT_EMPTY = ("seeds", "eval_factors")  # a sweep of no seed or no evaluation length runs nothing


def architectures(settings: Settings) -> list[Architecture]:
    runs = grid(settings.base_preset, settings.size, settings.shape, settings.qk_levels)
    runs += [preset_architecture(p, settings.size, settings.base_preset, settings.shape, settings.qk_levels)
             for p in settings.presets]
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


def number(value: float) -> str:
    """A float as a flag value, short where that is exact: 16.0 -> 16, 1e6 -> 1e+06, 0.1234567 whole."""
    return f"{value:g}" if float(f"{value:g}") == value else repr(value)


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
        *(["--rope_theta", number(s.rope_theta)] if s.rope_theta else []), *s.extra_train, "--seed", str(seed),
        "--data_seed", str(s.data_seed + seed), "--out", str(pretrain_out)],
        out=pretrain_out, outputs=[step_dir(pretrain_out, s.steps) / "model.safetensors"], run=run_key,
        kind="pretrain")


def pretraining_twin(arch: Architecture, candidates: list[Architecture]) -> Architecture | None:
    """The all-global model whose pretraining a windowed one shares (share_pretraining.py): the grid's model
    with the same flags but no windows, where the windows reach every token of the pretraining context."""
    if arch.window is None or arch.pretrain_context > arch.window or "--window" not in arch.model_flags:
        return None
    flags = list(arch.model_flags)
    flags[flags.index("--window") + 1] = "none"
    return next((c for c in candidates if list(c.model_flags) == flags), None)


def shared_pretrain_stage(settings: Settings, arch: Architecture, twin: Architecture, seed: int) -> Stage:
    """The twin's pretraining checkpoints, copied with the windows set: the same function, so the same run."""
    run_key, out = f"{arch.name}/s{seed}", run_folder(settings, arch, seed) / "pretrain"
    source = run_folder(settings, twin, seed) / "pretrain"
    return Stage(f"{run_key}/pretrain", [python(), "share_pretraining.py", str(source), "--window", str(arch.window),
                                         "--out", str(out)],
                 out=out, outputs=[step_dir(out, settings.steps) / "model.safetensors"],
                 inputs=[step_dir(source, settings.steps)], after=[f"{twin.name}/s{seed}/pretrain"], run=run_key,
                 kind="pretrain")


def held_out_flags(settings: Settings) -> list[str]:
    """evaluate.py's flags for the held-out measures (loss, LongPPL, sinks), the same in every evaluation: the
    same documents at every length and stage (before and after extension, at L and at the extended length)."""
    long_context = settings.long_context()
    return ["--windows", str(settings.windows), "--heldout_min_length", str(settings.ext_len()),
            "--short_context", str(long_context // 2),
            "--short_step", str(max(1, long_context // 8)), "--device", settings.device, *data_flags(settings)]


def synthetic_recipe(data_dir) -> dict | None:
    """A mix folder's recipe (synthetic.recipe_of's, read with json: synthetic imports torch); None for a plain one."""
    try:
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text()) if data_dir else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # no folder or manifest: no recipe (data.py says why)
        return None
    return (manifest.get("synthetic") or None) if isinstance(manifest, dict) else None


def evaluate_stage(settings: Settings, arch: Architecture, seed: int, tag: str, checkpoint: Path, lengths: str,
                   after: str) -> Stage:
    """evaluate.py on one checkpoint of the run into RUN/tag: recall (unless --tasks none), loss, LongPPL, sinks, and
    where --data is a synthetic mix the retrieval probes at the stage's own lengths (every run probed alike)."""
    s, run_key, eval_out = settings, f"{arch.name}/s{seed}", run_folder(settings, arch, seed) / tag
    if s.tasks in ("", "none"):
        modes, recall_flags = "longppl,attention", []
    else:
        modes, recall_flags = "recall,longppl,attention", ["--tasks", s.tasks, "--samples", str(s.samples)]
    probing = ["--probe_lengths", lengths, "--probe_count", str(s.probe_count)] if synthetic_recipe(s.data) else []
    return Stage(f"{run_key}/{tag}", [
        python(), "evaluate.py", str(checkpoint), "--labels", arch.name, "--lengths", lengths, "--modes",
        modes + (",probes" if probing else ""), *recall_flags, *probing, *held_out_flags(s), "--out", str(eval_out)],
        out=eval_out, outputs=[eval_out / "results.json"], inputs=[checkpoint], after=[after], run=run_key,
        kind="evaluate")


def extension_stages(settings: Settings, arch: Architecture, seed: int, tag: str, source_step: int,
                     steps: int) -> list[Stage]:
    """extend.py from pretraining's checkpoint at source_step for `steps` steps into RUN/tag, then its evaluation
    at every evaluation length into RUN/eval (the main extension), RUN/eval-none (the control) or RUN/eval_TAG.
    The control (tag CONTROL_TAG) is the same command with the none recipe: RoPE unchanged, no factor."""
    s, run_key, run_out = settings, f"{arch.name}/s{seed}", run_folder(settings, arch, seed)
    source, ext_out, ext_len = step_dir(run_out / "pretrain", source_step), run_out / tag, s.ext_len()
    factor = ["--rope_factor", number(s.ext_rope_factor)] if s.ext_rope_factor is not None else []
    recipe = ["--recipe", "none"] if tag == CONTROL_TAG else ["--recipe", s.recipe, *factor]
    extend = Stage(f"{run_key}/{tag}", [
        python(), "extend.py", "--from", str(source), *recipe,
        "--seq_len", str(ext_len), "--batch_tokens", str(s.ext_batch_sequences * ext_len),
        "--micro_batch", "1", "--steps", str(steps), "--save_every", str(steps), "--eval_every", "0",
        "--log_every", "10", "--held_out_documents", "0", "--threads", str(s.threads), "--device", s.device,
        *(["--data", s.ext_data] if s.ext_data else data_flags(s)), "--seed", str(seed),
        "--data_seed", str(s.data_seed + seed), "--out", str(ext_out)],
        out=ext_out, outputs=[step_dir(ext_out, steps) / "model.safetensors"], inputs=[source],
        after=[f"{run_key}/pretrain"], run=run_key, kind="extend")
    eval_tag = {"extend": "eval", CONTROL_TAG: pool_analysis.CONTROL_EVAL_FOLDER}.get(tag, f"eval_{tag}")
    lengths = ",".join(map(str, s.eval_lengths()))
    return [extend, evaluate_stage(s, arch, seed, eval_tag, step_dir(ext_out, steps), lengths, f"{run_key}/{tag}")]


def run_stages(settings: Settings, arch: Architecture, seed: int, budget_models: list[str],
               early_models: list[str], twin: Architecture | None = None) -> list[Stage]:
    """One run's stages: pretrain (or share the twin's pretraining), extend and evaluate, evaluate before extension
    at the longer pretraining context, and the further findings' extensions (other budgets, earlier checkpoints)
    where the run takes part."""
    s = settings
    final = step_dir(run_folder(s, arch, seed) / "pretrain", s.steps)
    pretraining = shared_pretrain_stage(s, arch, twin, seed) if twin else pretrain_stage(s, arch, seed)
    stages = [pretraining, *extension_stages(s, arch, seed, "extend", s.steps, s.ext_steps),
              evaluate_stage(s, arch, seed, "eval_before", final, str(s.long_context()),
                             after=f"{arch.name}/s{seed}/pretrain")]
    if arch.name in budget_models:
        for steps in s.budgets:
            if steps != s.ext_steps:
                stages += extension_stages(s, arch, seed, f"extend_b{steps}", s.steps, steps)
    if arch.name in early_models:
        for step in s.early_steps:
            stages += extension_stages(s, arch, seed, f"extend_p{step}", step, s.ext_steps)
    if arch.name in s.control_models:  # the main extension again, RoPE unchanged
        stages += extension_stages(s, arch, seed, CONTROL_TAG, s.steps, s.ext_steps)
    return stages


def outside_checkpoint(spec: str) -> str | None:
    """A checkpoint outside the grid given to --longppl_evaluator (our folder or hf:DIR), absolute since
    every stage runs in the repository's folder; None where spec names no folder."""
    folder = Path(spec.removeprefix("hf:")).resolve()
    if not folder.is_dir():
        return None
    return ("hf:" if spec.startswith("hf:") else "") + str(folder)


def longppl_stage(settings: Settings, runs: list[Architecture], members: dict) -> Stage:
    """LongPPL on the same key tokens for every extended model: one evaluator picks them, evaluate.py's first
    checkpoint. By default the run without a harmful choice, whose own LongPPL that choice caps (the analysis
    says so); LongPPL's authors use a strong model outside the compared ones, which --longppl_evaluator
    takes as a checkpoint folder (labelled "evaluator")."""
    s, names = settings, [r.name for r in runs]
    extended = [(key, step_dir(run_folder(s, arch, seed) / "extend", s.ext_steps))
                for key, (arch, seed) in members.items()]
    evaluator_name = s.longppl_evaluator_name()
    outside = None if evaluator_name in names else outside_checkpoint(evaluator_name)
    if evaluator_name not in names and outside is None:
        raise SweepError(f"--longppl_evaluator {evaluator_name!r}: no such run; the runs are {', '.join(names)}; "
                         f"or give a checkpoint folder outside the grid (our folder or hf:DIR)")
    extended.sort(key=lambda item: not item[0].startswith(evaluator_name + "/"))  # evaluate.py's evaluator: the first
    checkpoints = [str(c) for _, c in extended]
    labels = [k.replace("/", "@") for k, _ in extended]
    inputs = [c for _, c in extended]
    if outside is not None:
        checkpoints, labels = [outside, *checkpoints], ["evaluator", *labels]
        if (Path(outside) / "model.safetensors").is_file():  # our folder: the stamp records its weights too
            inputs = [Path(outside), *inputs]
    longppl_out = Path(s.out) / "longppl"
    return Stage("longppl", [
        python(), "evaluate.py", *checkpoints, "--labels", ",".join(labels),
        "--modes", "longppl", "--lengths", str(s.ext_len()), *held_out_flags(s), "--out", str(longppl_out)],
        out=longppl_out, outputs=[longppl_out / "results.json"], inputs=inputs,
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
    unknown = sorted(set(s.control_models) - {r.name for r in runs})
    if unknown:
        raise SweepError(f"--control_models {unknown}: no such run; the runs are {', '.join(r.name for r in runs)}")
    everything = architectures(dataclasses.replace(s, only=()))
    twins = {arch.name: pretraining_twin(arch, everything) for arch in runs}
    stages, members = [], {}
    for arch, seed in itertools.product(runs, s.seeds):
        members[f"{arch.name}/s{seed}"] = (arch, seed)
        twin = twins[arch.name]
        if twin and twin not in runs and f"{twin.name}/s{seed}/pretrain" not in {st.key for st in stages}:
            stages.append(pretrain_stage(s, twin, seed))  # pretrained for its windowed twin alone
        stages += run_stages(s, arch, seed, budget_models, early_models, twin)
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


def block_dependents(pending: dict, failed_keys: set, log) -> None:
    """Drop the pending stages that need a failed or blocked one, down the whole chain (pretrain ->
    extend -> its evaluation), so that none is left waiting for a stage that never runs."""
    while blocked := [st for st in pending.values() if any(a in failed_keys for a in st.after)]:
        for stage in blocked:
            failed_keys.add(stage.key)  # blocked by a failure upstream
            del pending[stage.key]
            log(f"[sweep] blocked {stage.key}")


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
            block_dependents(pending, failed_keys, log)
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


def write_index(stages: list[Stage], records: list[dict], settings: Settings, command: list[str]) -> None:
    out = Path(settings.out)
    times = {r["key"]: r for r in records}
    entries = []
    for stage in stages:
        stamp = read_stamp(stage) or {}
        entries.append({"key": stage.key, "run": stage.run, "kind": stage.kind, "out": str(stage.out),
                        "status": stamp.get("status", "not run"), "seconds": stamp.get("seconds"),
                        "this_time": times.get(stage.key, {}).get("decision"), "command": stage.command})
    index = {"command": command, "machine": machine(), "settings": settings.as_dict(), "stages": entries}
    files.write_json_atomically(out / "index.json", index)
    lines = [f"# Sweep index: {out}", "", f"Command: `{shlex.join(command)}`", "", f"Machine: {index['machine']}", "",
             pool_analysis.data_and_rope(settings), "", "| stage | status | seconds | this time | output |",
             "|---|---|---|---|---|"]
    lines += [f"| {e['key']} | {e['status']} | {pool_analysis.fmt(e['seconds'], 0)} | {e['this_time'] or '–'} | "
              f"{e['out']} |" for e in entries]
    files.write_atomically(out / "index.md", "\n".join(lines) + "\n")


def machine() -> str:
    try:
        import torch
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        torch_version = torch.__version__
    except Exception:  # noqa: BLE001 - the index is written even where torch cannot start
        device, torch_version = "unknown", "unknown"
    return f"{platform.node()}: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, " \
           f"{device}, python {platform.python_version()}, torch {torch_version}"


# ----------------------------------------------------------------------------------------------
# Command line

def integers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 20,60,180") from None


def names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def shown(value) -> str:
    """A default as the flag spells it: 1,2,4,8 for a tuple."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def build_parser() -> argparse.ArgumentParser:
    """The flags; each one that is a Settings field has its name and takes its default from Settings."""
    d = Settings(out=Path("sweeps/mini"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(parser.add_argument, d)
    add_sweep_flags(parser.add_argument, d)
    return parser


def add_run_flags(p, d: Settings) -> None:
    """The grid and what every run shares: shape, data, seeds, budgets, recipe, evaluation."""
    p("--out", default="sweeps/mini", help="the sweep's folder: runs/, logs/, index, analysis (default: sweeps/mini)")
    p("--size", default=d.size, help=f"olmpool size of every run (default: {d.size})")
    p("--base_preset", default=d.base_preset, help="shape the grid's switches act on")
    for name, help in (("n_layers", "layers"), ("d_model", "width"),
                       ("n_heads", "query heads (GQA 4:1 needs a multiple of 4)"),
                       ("head_dim", "head width"), ("mlp_hidden", "SwiGLU width"),
                       ("context_length", "the longer pretraining context; the shorter is half (OlmPool: 8192 / 4096)"),
                       ("window", "local layers' window (OlmPool: 4096)")):
        p(f"--{name}", type=int, help=f"{help} of every run (default: the base preset's)")
    p("--qk_levels", type=names, default=d.qk_levels,
      help=f"the qk choice's levels, harmful first: pre/post, then _LQK/_HQK for layerwise/headwise QK norm "
           f"(default: {shown(d.qk_levels)}, two switches; pre_LQK,pre moves QK norm alone)")
    p("--presets", type=names, default=d.presets, help="OlmPool presets to add to the grid (comma-separated)")
    p("--only", type=names, default=d.only, help="the runs to keep, by name (comma-separated)")
    p("--seeds", type=integers, default=d.seeds,
      help=f"init and data seeds; each seed runs the whole grid (default: {shown(d.seeds)})")
    p("--data", help="prepared data folder for every stage (default: train.py's built-in corpus, in its "
                     "compact vocabulary where train.py uses one at --size)")
    p("--steps", type=int, default=d.steps, help=f"pretraining steps (default: {d.steps})")
    p("--batch_sequences", type=int, default=d.batch_sequences, help="pretraining batch in sequences of the longer "
      f"context; every run gets the same tokens per step (default: {d.batch_sequences})")
    p("--save_every", type=int, default=d.save_every,
      help=f"pretraining checkpoints kept every N steps (default: {d.save_every})")
    p("--lr", type=float, help="pretraining peak learning rate (default: train.py's for the size)")
    p("--min_lr_ratio", type=float, default=d.min_lr_ratio,
      help=f"pretraining's final / peak lr (default: {d.min_lr_ratio:g}, a constant lr after warmup, as OlmPool's "
           "runs, whose cosine was planned for trillions of tokens and stopped at ~140B, never decayed)")
    p("--rope_theta", type=float, help="RoPE base of every pretraining run; each extension starts from its "
                                        "checkpoint's (default: each preset's, 500K)")
    p("--ext_data", help="prepared data folder for every extension stage, in --data's vocabulary; evaluation "
                         "stays on --data's held-out split (default: --data)")
    p("--recipe", default=d.recipe, help=f"extend.py's recipe (default: {d.recipe})")
    p("--ext_rope_factor", type=float, help="extend.py --rope_factor F: ABF's new base = the pretraining base x F "
      "(16: OlmPool's 500K -> 8M ratio from any base); YaRN's factor for olmo3 (default: the recipe's own numbers)")
    p("--ext_factor", type=int, default=d.ext_factor,
      help=f"extended length / the longer pretraining context (default: {d.ext_factor}; OlmPool: 8)")
    p("--ext_steps", type=int, default=d.ext_steps, help=f"extension steps (default: {d.ext_steps}: 41K tokens, 8%% "
      "of pretraining's 512K at the defaults; OlmPool: 10B of 140B)")
    p("--ext_batch_sequences", type=int, default=d.ext_batch_sequences,
      help=f"extension batch in sequences (default: {d.ext_batch_sequences})")
    p("--eval_factors", type=integers, default=d.eval_factors,
      help=f"evaluation lengths as multiples of the longer pretraining context (default: {shown(d.eval_factors)})")
    p("--tasks", default=d.tasks, help=f"evaluate.py recall tasks, or none (default: {d.tasks})")
    p("--samples", type=int, default=d.samples, help=f"recall samples per task and length (default: {d.samples})")
    p("--windows", type=int, default=d.windows,
      help=f"held-out windows per length for loss, LongPPL, sinks (default: {d.windows})")
    p("--probe_count", type=int, default=d.probe_count, help="retrieval probe documents per kind and length, where "
      f"--data is a synthetic mix: its evaluations probe at their lengths (default: {d.probe_count})")


def add_sweep_flags(p, d: Settings) -> None:
    """The further findings, and how this command runs: analysis, jobs, devices, what it writes."""
    p("--budgets", type=integers, default=d.budgets, help="further finding: extension steps to compare, e.g. 20,40,120")
    p("--budget_models", type=names, default=d.budget_models, help="runs for --budgets (default: 3 representative)")
    p("--early_steps", type=integers, default=d.early_steps, help="further finding: pretraining steps to extend from")
    p("--early_models", type=names, default=d.early_models, help="runs for --early_steps (default: 3 representative)")
    p("--control_models", type=names, default=d.control_models, help="runs whose extension is repeated with "
      "--recipe none (RoPE unchanged; same data, steps, seeds) into RUN/extend-none, RUN/eval-none (default: none)")
    p("--longppl_evaluator", help="run whose extended model picks LongPPL's key tokens for all, or a checkpoint "
                                   "folder outside the grid (our folder or hf:DIR; default: the run without a "
                                   "harmful choice)")
    p("--measure", default="loss", choices=list(pool_analysis.MEASURES),
      help="the measure the analysis leads with (default: loss)")
    p("--jobs", type=int, default=1, help="stages at once (CPU); with --gpus, one per GPU")
    p("--threads", type=int, default=d.threads, help=f"CPU threads per stage (default: {d.threads})")
    p("--gpus", type=names, default=(), help="comma-separated GPU ids: one stage per GPU, on cuda")
    p("--extra_train", default=" ".join(d.extra_train),
      help="more train.py flags for every pretraining run, as one string")
    p("--plan", action="store_true", help="print every stage, its command and whether it would run; run nothing")
    p("--analyze_only", action="store_true", help="only read finished results and write the analysis")
    p("--from_rows", help="analyse the rows an earlier analysis.json holds, with the settings it records (this "
                          "command's --out, --measure, --results); no run is read or run")
    p("--results", help="also copy the analysis, plots and index here (a folder to commit)")


@dataclass(frozen=True)
class Invocation:
    """What this command does with the settings: the flags that are not a run's settings."""
    plan: bool
    analyze_only: bool
    from_rows: str | None
    results: str | None
    measure: str
    jobs: int
    gpus: tuple[str, ...]


def default_data(size: str) -> str:
    """The built-in corpus as train.py would use it at this size (its compact vocabulary where train.py has
    one for the size), prepared once here so that every stage, evaluate.py included, names the same folder."""
    import compact_vocabulary
    import settings
    return str(compact_vocabulary.prepare_builtin_corpus(compact_vocab=settings.COMPACT_VOCAB_BY_SIZE.get(size, 0)))


def settings_from_flags(flags: dict) -> tuple[Settings, Invocation]:
    """Settings and Invocation from the parsed flags ({flag name: value}, named as their fields), with the
    values derived from flags computed here and nowhere else: absolute paths (every stage runs in the
    repository's folder, whatever the caller's), the device from --gpus, --extra_train split into flags,
    the shape fields gathered, and the built-in corpus where --data is not given."""
    flags = dict(flags)
    invocation = Invocation(**{f.name: flags.pop(f.name) for f in dataclasses.fields(Invocation)})
    if invocation.jobs < 1:
        raise SweepError(f"--jobs {invocation.jobs} must be at least 1; e.g. --jobs 2")
    if Path(flags["out"]).exists() and not Path(flags["out"]).is_dir():
        raise SweepError(f"--out {flags['out']} is a file; pass a folder for the sweep's runs, logs and analysis")
    if flags["data"] and not Path(flags["data"]).is_dir() and not invocation.from_rows:
        raise SweepError(f"--data {flags['data']}: no such folder; pass a prepared folder (python data.py prepare "
                         f"TEXTS --out DIR), or leave it out for the built-in corpus")
    if flags["ext_data"] and not Path(flags["ext_data"]).is_dir() and not invocation.from_rows:
        raise SweepError(f"--ext_data {flags['ext_data']}: no such folder; pass a prepared folder in --data's "
                         f"vocabulary, or leave it out to extend on --data")
    shape = {k: value for k in SHAPE_FIELDS if (value := flags.pop(k)) is not None}
    folders = {k: str(Path(flags[k]).resolve()) if flags[k] else None for k in ("data", "ext_data")}
    settings = Settings(**flags | folders | {"out": Path(flags["out"]).resolve(),
                                             "device": "cuda" if invocation.gpus else "cpu",
                                             "extra_train": tuple(flags["extra_train"].split()), "shape": shape})
    if settings.data is None and not invocation.from_rows:  # prepared (a minute) once the flags are known good
        settings = dataclasses.replace(settings, data=default_data(settings.size))
    if settings.ext_data and not invocation.from_rows:
        check_ext_data(settings.data, settings.ext_data)
    return settings, invocation


def check_ext_data(pretraining: str, extension: str) -> None:
    """--ext_data is read by extend.py with the pretrained models' ids: it must be a prepared folder in --data's
    vocabulary (compact_vocabulary's name and mapping of each folder), checked before any stage runs."""
    import compact_vocabulary
    import data
    try:
        compact_vocabulary.check_extension_vocabulary(pretraining, extension, "--ext_data")
        data.read_manifest(extension)
    except data.DataError as error:  # no manifest, an unreadable vocabulary file
        raise SweepError(f"--ext_data {extension}: {error}") from None


def run_folders(settings: Settings, members: dict) -> dict:
    """{run key: (Architecture, seed, its folder)}, as pool_analysis.collect reads the runs."""
    return {key: (arch, seed, run_folder(settings, arch, seed)) for key, (arch, seed) in members.items()}


def settings_from_record(record: dict) -> Settings:
    """Settings as an index.json or analysis.json records them (JSON lists back to tuples); a field the
    record lacks takes its default, which is what a sweep before that field ran with."""
    names = {f.name for f in dataclasses.fields(Settings)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in names}
    return Settings(**values | {"out": Path(values["out"])})


def analyse_rows(source: Path, out: Path, invocation: Invocation, command: list[str]) -> int:
    """--from_rows: the analysis of the rows an earlier analysis.json holds, with the settings it records,
    into OUT/analysis (and --results). The plan fills in what older rows lack (the windows)."""
    try:
        report = json.loads(source.read_text())
        settings = settings_from_record(report["settings"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SweepError(f"--from_rows {source}: not an analysis.json a sweep wrote ({type(error).__name__}: {error}); "
                         f"pass OUT/analysis/analysis.json of a finished sweep") from None
    windows = {arch.name: arch.window for arch in architectures(settings)}
    rows = [{"window": windows.get(row["name"]), **row} for row in pool_analysis.rows_from_json(report["rows"])]
    rows_from = report.get("rows_from") or {"file": str(source), "command": report.get("command"),
                                            "machine": report.get("machine")}
    pool_analysis.write_analysis(settings, rows, invocation.measure, command, machine(), out, invocation.results,
                                 rows_from)
    print((out / "analysis" / "analysis.md").read_text())
    return 0


def check_stage_commands(stages: list[Stage]) -> None:
    """Every stage's flags through its own script's checks (train.py's and extend.py's settings, evaluate.py's
    flag checks), before the first stage starts: a value the sweep passes on that a stage would refuse
    fails now, in one line, not after pretraining. Imports torch (the stages' modules); `import sweep` does not."""
    import contextlib
    import io

    import evaluate
    import extend
    import share_pretraining
    import train
    parsers = {"train.py": train.parse_args, "extend.py": extend.parse_args, "evaluate.py": evaluate.arguments,
               "share_pretraining.py": share_pretraining.parse_args}
    for stage in stages:
        script = stage.command[1]
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
                parsers[script](stage.command[2:])
        except SystemExit:  # argparse's refusal: its last line names the flag
            complaint = (said.getvalue().strip().splitlines() or ["its flags are refused"])[-1]
            raise SweepError(f"{stage.key}: {complaint.removeprefix('error: ')}; nothing was run") from None
        except (ValueError, OSError) as error:  # evaluate.py's EvaluationError, data.DataError, an unreadable file
            raise SweepError(f"{stage.key}: {script}: {error}; nothing was run") from None


def run_and_analyse(settings: Settings, invocation: Invocation, stages: list[Stage], members: dict,
                    command: list[str]) -> int:
    """Run the stages (unless --analyze_only), then the analysis. A failed stage is reported first, with its
    command and log; the analysis follows only where some run has the measure, and the exit is 1."""
    failure = None
    if not invocation.analyze_only:
        check_stage_commands(stages)
        jobs = len(invocation.gpus) if invocation.gpus else invocation.jobs
        records = []
        try:
            records = execute(stages, settings, jobs, list(invocation.gpus))
        except SweepError as error:
            failure = error
            print(f"error: {error}", file=sys.stderr, flush=True)
        write_index(stages, records, settings, command)
    rows = pool_analysis.collect(settings, run_folders(settings, members))
    if failure is not None and not any(r.get(invocation.measure) is not None for r in rows):
        print(f"error: no analysis: no run has --measure {invocation.measure} (see the failures above)",
              file=sys.stderr)
        return 1
    report = pool_analysis.write_analysis(settings, rows, invocation.measure, command, machine(), settings.out,
                                          invocation.results)
    print((Path(settings.out) / "analysis" / "analysis.md").read_text())
    return 1 if failure is not None or not report else 0


def main(argv=None) -> int:
    flags = vars(build_parser().parse_args(argv))
    command = [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]
    settings = None
    try:
        settings, invocation = settings_from_flags(flags)
        if not invocation.plan:
            files.lock_folder(settings.out, "sweep.py")  # one sweep per --out, for the whole run
        if invocation.from_rows:
            return analyse_rows(Path(invocation.from_rows), settings.out, invocation, command)
        stages, members = plan(settings)
        if invocation.plan:
            for stage in stages:
                print(f"[{decide(stage)}] {stage.key}\n    {' '.join(stage.command)}")
            return 0
        return run_and_analyse(settings, invocation, stages, members, command)
    except (SweepError, pool_analysis.AnalysisError, files.FolderBusy) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the stages got the same Ctrl-C, saved and stopped; stamps make a rerun resume
        print("error: interrupted; the same command resumes every unfinished stage", file=sys.stderr)
        return 130
    finally:
        if settings is not None:
            files.unlock_folder(settings.out)


if __name__ == "__main__":
    sys.exit(main())
