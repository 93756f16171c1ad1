"""The mini pool's analysis: the paper's statistics on the finished runs of sweep.py, with numpy.

Reads what the runs wrote (pretraining metrics, evaluate.py's results.json), makes one row per run,
and for each measure: R² against the count of harmful choices and the other predictors, each
choice's pairwise effect and its spread, the seed-to-seed spread, sinks, and the further findings
(extension budgets, early checkpoints); then writes analysis.json, analysis.md and the plots.
docs/sweep.md says what each number means and where the paper's figures come from.

`settings` below is sweep.Settings: the fields it reads, and long_context(), ext_len(),
choice_descriptions() and as_dict(). This module imports neither sweep.py nor torch.
"""

from __future__ import annotations

import itertools
import json
import shlex
import shutil
import time
from pathlib import Path

import numpy as np

import files


class AnalysisError(Exception):
    pass


# The authors' sink share: attention mass on the first 100 tokens from the query at position 4000
# (here the last position when shorter), averaged over layers and heads (evaluate.py's sink_first_100).
SINK_MEASURE = "sink_first_100"
CONTROL_EVAL_FOLDER = "eval-none"  # RUN/eval-none: the evaluation of sweep.py's --control_models extension
BEYOND = "the lengths beyond the longer pretraining context"
MEASURES = {  # name: (description, higher is better)
    "recall": (f"RULER-style recall x 100, mean over tasks and {BEYOND}", True),
    "loss": ("held-out loss (nats/token) at the extended length", False),
    "longppl": ("LongPPL at the extended length, key tokens from one evaluator for every model", False),
    "retrieval": ("recall after extension: the mean of needle recall and MQAR accuracy (probes, x 100) over "
                  f"{BEYOND}", True),
    "needle": (f"needle recall x 100 (probes: both answer tokens the argmax), mean over {BEYOND}", True),
    "mqar": (f"MQAR accuracy x 100 (probes: the asked-for values the argmax), mean over {BEYOND}", True),
    "copy": ("copy gain (probes: nats, the loss on a span's first occurrence minus on its second), mean over "
             f"{BEYOND}", True),
}
# evaluate.py's probe cells (results["probes"][label]["KIND/LENGTH"]): the measure of each kind and its field;
# retrieval is the mean of needle recall and MQAR accuracy at each length where both were measured.
PROBE_FIELDS = {"needle": "recall", "mqar": "accuracy", "copy": "gain"}
PROBES = (*PROBE_FIELDS, "retrieval")
LENGTH_MEANS = ("recall", *PROBES)  # the measures that are a mean over the lengths beyond the longer context
BY_LENGTH = ("recall", "loss", *PROBES)  # read by length from every evaluation: the row's MEASURE_by_length


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


def pairwise_effects(rows: list[dict], measure: str, choices=None) -> dict:
    """For each choice (by default those the rows record), the pairs of models that differ in that choice
    only: the effect (harmful level's measure minus the other's) per pair with the two models' names, and
    its mean, standard deviation, min and max over the pairs, i.e. the spread over the other choices'
    combinations, and how many pairs have a positive and a negative effect."""
    choices = tuple(rows[0]["choices"]) if choices is None and rows else tuple(choices or ())
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
            by_rest.setdefault(rest, {})[level] = (value, row.get("name"))
        pairs = [{"others": dict(zip(others, rest)), "effect": levels[1][0] - levels[0][0],
                  "harmful": levels[1][1], "other": levels[0][1]}
                 for rest, levels in sorted(by_rest.items()) if 0 in levels and 1 in levels]
        values = np.array([p["effect"] for p in pairs])
        effects[choice] = {"pairs": pairs, "n": len(pairs),
                           "mean": float(values.mean()) if len(values) else float("nan"),
                           "std": float(values.std()) if len(values) else float("nan"),
                           "min": float(values.min()) if len(values) else float("nan"),
                           "max": float(values.max()) if len(values) else float("nan"),
                           "positive": int((values > 0).sum()), "negative": int((values < 0).sum())}
    return effects


# ----------------------------------------------------------------------------------------------
# Reading the runs: one row per run

def last_val_loss(metrics: Path) -> float | None:
    """The pretraining run's last validation loss (a resumed run appends; the later line counts). A line
    that is not a whole record (torn by a crash or a full disk, cut mid-character) is skipped."""
    value = None
    if metrics.is_file():
        for record in files.read_json_lines(metrics):
            if "val_loss" in record:
                value = record["val_loss"]
    return value


def read_eval(folder: Path, label: str) -> dict:
    """{recall: {length: mean score over tasks}, loss: {length: held-out loss}, longppl_self: {...},
    sink: {length: sink share}, needle, mqar, copy, retrieval: {length: probe measure}} from one evaluate.py
    results.json. A recall cell's mean is already x 100 (RULER's metrics score 0-100), as are needle recall and
    MQAR accuracy (probes.py), so they are taken as they are; a skipped probe cell (no field) is left out."""
    path = folder / "results.json"
    found = {"recall": {}, "loss": {}, "longppl_self": {}, "sink": {}, **{m: {} for m in PROBES}}
    if not path.is_file():
        return found
    results = json.loads(path.read_text())
    by_length = {}
    for key, cell in results.get("recall", {}).get(label, {}).items():
        task, length = key.rsplit("/", 1)
        if "mean" in cell:
            by_length.setdefault(int(length), []).append(cell["mean"])
    found["recall"] = {L: float(np.mean(v)) for L, v in sorted(by_length.items())}
    for length, cell in results.get("longppl", {}).get(label, {}).items():
        if "loss" in cell:
            found["loss"][int(length)] = cell["loss"]
            found["longppl_self"][int(length)] = cell.get("longppl")
    for length, cell in results.get("attention", {}).get(label, {}).items():
        per_layer = cell.get("per_layer", {}).get(SINK_MEASURE)
        if per_layer:
            found["sink"][int(length)] = float(np.mean(per_layer))
    for key, cell in results.get("probes", {}).get(label, {}).items():
        kind, length = key.rsplit("/", 1)
        if kind in PROBE_FIELDS and cell.get(PROBE_FIELDS[kind]) is not None:
            found[kind][int(length)] = float(cell[PROBE_FIELDS[kind]])
    found.update({kind: dict(sorted(found[kind].items())) for kind in PROBE_FIELDS})
    found["retrieval"] = {L: (v + found["mqar"][L]) / 2 for L, v in found["needle"].items() if L in found["mqar"]}
    return found


def beyond(by_length: dict, context: int) -> float | None:
    """The mean of a measure over the lengths beyond `context` (None where none was measured)."""
    values = [v for L, v in by_length.items() if L > context]
    return float(np.mean(values)) if values else None


def scores(found: dict, long_context: int, ext_len: int) -> dict:
    """One evaluation's measures: the held-out loss at the extended length, and recall and each probe measure
    as the mean over the lengths beyond the longer pretraining context."""
    return {"loss": found["loss"].get(ext_len), **{m: beyond(found[m], long_context) for m in LENGTH_MEANS}}


def collect(settings, runs: dict) -> list[dict]:
    """One row per run of {run key: (Architecture, seed, the run's folder)}: its choices, pretraining val
    loss, scores by length, the measures."""
    s, out = settings, Path(settings.out)
    long_context, ext_len = s.long_context(), s.ext_len()
    shared = {}
    path = out / "longppl" / "results.json"
    if path.is_file():
        shared = json.loads(path.read_text()).get("longppl", {})
    rows = []
    for key, (arch, seed, run_out) in runs.items():
        after, before = read_eval(run_out / "eval", arch.name), read_eval(run_out / "eval_before", arch.name)
        shared_cell = shared.get(key.replace("/", "@"), {}).get(str(ext_len), {})
        main = scores(after, long_context, ext_len)
        row = {"run": key, "name": arch.name, "seed": seed, "choices": arch.choices,
               "harmful_count": arch.harmful_count, "pretrain_context": arch.pretrain_context, "window": arch.window,
               "val_loss_pretrain": last_val_loss(run_out / "pretrain" / "metrics.jsonl"),
               **{f"{m}_by_length": after[m] for m in BY_LENGTH}, **main, "longppl": shared_cell.get("longppl"),
               "longppl_self": after["longppl_self"].get(ext_len),
               "sink": after["sink"].get(ext_len),
               "before": {m: before[m].get(long_context) for m in (*BY_LENGTH, "sink")}}
        for tag, folder in (("budgets", "eval_extend_b"), ("early", "eval_extend_p")):
            row[tag] = {int(sub.name[len(folder):]): scores(read_eval(sub, arch.name), long_context, ext_len)
                        for sub in sorted(run_out.glob(folder + "*"))}
        if (run_out / CONTROL_EVAL_FOLDER).is_dir():  # the same extension with the none recipe
            found = read_eval(run_out / CONTROL_EVAL_FOLDER, arch.name)
            row["control"] = {f"{m}_by_length": found[m] for m in BY_LENGTH}
        row["budgets"].setdefault(s.ext_steps, dict(main))
        row["early"].setdefault(s.steps, dict(main))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# The paper's analysis of the rows, one measure at a time

# The measure split where it arises, at L, the longer pretraining context: the three parts sum to the
# measure at the extended length (for recall and the probes: the mean beyond L).
PARTS = {
    "part_pretraining": "before extension, at L: the pretrained model",
    "part_extension": "extension, at L: the extended model minus the pretrained one",
    "part_length": "length-specific: the extended model at the extended length minus itself at L",
}
AVERAGED = (*MEASURES, "sink", "val_loss_pretrain", *PARTS, "sink_before")


def mean_of(values) -> float | None:
    """The mean of the values that were measured; None where none was."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def with_parts(row: dict, measure: str, context: int) -> dict:
    """The row with the measure's parts at `context` (None where a term was not measured: LongPPL is
    measured at the extended length only) and the sink share before extension beside the one after."""
    by_length = row.get(f"{measure}_by_length", {}) if measure in BY_LENGTH else {}
    after, before, total = by_length.get(context), row["before"].get(measure), row.get(measure)
    minus = lambda a, b: None if a is None or b is None else a - b  # noqa: E731
    return dict(row, part_pretraining=before, part_extension=minus(after, before), part_length=minus(total, after),
                sink_before=row["before"].get("sink"))


def average_seeds(rows: list[dict], measure: str) -> tuple[list[dict], dict]:
    """Rows averaged over seeds per model, and the seed-to-seed spread (mean over models of the std)."""
    by_name = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    merged, spreads = [], []
    for name, group in by_name.items():
        row = dict(group[0], run=name, seeds=[r["seed"] for r in group])
        for key in AVERAGED:
            row[key] = mean_of(r.get(key) for r in group)
        row["before"] = {key: mean_of(r["before"].get(key) for r in group) for key in group[0]["before"]}
        seeds = [r[measure] for r in group if r.get(measure) is not None]
        if len(seeds) > 1:
            spreads.append(float(np.std(seeds, ddof=1)))
        merged.append(row)
    return merged, {"seed_std_mean": float(np.mean(spreads)) if spreads else None, "models_with_seeds": len(spreads)}


def effects_beside_seeds(runs: list[dict], models: list[dict], key: str) -> dict:
    """pairwise_effects of `key` over the seed-averaged models, each choice with the mean effect on every
    seed alone (pairs within one seed) and the std of those means over the seeds: the seed spread. Beside it
    the spread within pairs: each pair's effect per seed, its std over the seeds, the mean over the pairs.
    Where seeds split (one forms a skill, the other not) in different pairs, the seeds' means can agree while
    each pair swings; the spread within pairs shows that, the seed spread does not."""
    effects = pairwise_effects(models, key)
    seeds = sorted({r["seed"] for r in runs})
    by_seed = {s: pairwise_effects([r for r in runs if r["seed"] == s], key) for s in seeds}
    for choice, effect in effects.items():
        means = {str(s): by_seed[s][choice]["mean"] for s in seeds if by_seed[s].get(choice, {}).get("n")}
        effect["by_seed"] = means
        effect["seed_std"] = float(np.std(list(means.values()), ddof=1)) if len(means) > 1 else None
        per_pair = {}
        for s in seeds:
            for pair in by_seed[s].get(choice, {}).get("pairs", []):
                per_pair.setdefault(f"{pair['harmful']} - {pair['other']}", {})[str(s)] = pair["effect"]
        effect["pairs_by_seed"] = per_pair
        spreads = [np.std(list(v.values()), ddof=1) for v in per_pair.values() if len(v) > 1]
        effect["pair_seed_std"] = float(np.mean(spreads)) if spreads else None
    return effects


def swa_pairs(models: list[dict], effects: dict) -> dict:
    """The swa pairs split by what they test, with each group's mean effect for every key of `effects`
    ({key: pairwise effects}). A windowed model pretrained at a context no longer than its window saw every
    token on its windowed layers, as a global layer does: the pair's pretrained models are the same function
    at that length, and the pair tests only the windows met at extension (and at the longer lengths)."""
    by_name = {m["name"]: m for m in models}

    def extension_only(pair: dict) -> bool | None:
        windowed = by_name.get(pair["harmful"], {})
        return None if windowed.get("window") is None else windowed["pretrain_context"] <= windowed["window"]

    groups = {}
    for label, wanted in (("extension_only", True), ("pretraining_too", False)):
        pairs = [p for p in next(iter(effects.values()))["swa"]["pairs"] if extension_only(p) is wanted]
        if pairs:
            groups[label] = {"pairs": [f"{p['harmful']} - {p['other']}" for p in pairs], "n": len(pairs),
                             "mean": {key: mean_of(p["effect"] for p in e["swa"]["pairs"]
                                                   if extension_only(p) is wanted) for key, e in effects.items()}}
    return groups


def sink_analysis(runs: list[dict], models: list[dict], measure: str) -> dict:
    """Sink share against the measure, after extension (the extended models) and before it (the pretrained
    models, against the measure before extension): Pearson r over all models and within each level of qk
    and of swa, the mean sink share per level, and each choice's pairwise effect on the sink share."""
    found = {}
    for when, sink_key in (("after", "sink"), ("before", "sink_before")):
        sinks = np.array([np.nan if m.get(sink_key) is None else m[sink_key] for m in models], float)
        value = (lambda m: m.get(measure)) if when == "after" else (lambda m: m["before"].get(measure))
        y = np.array([np.nan if value(m) is None else value(m) for m in models], float)
        within = {}
        for choice, level in itertools.product(("qk", "swa"), (1, 0)):
            pick = np.array([m["choices"].get(choice) == level for m in models], bool)
            measured = sinks[pick][np.isfinite(sinks[pick])]
            within[f"{choice}={level}"] = {"n": int(pick.sum()), "pearson": pearson(sinks[pick], y[pick]),
                                           "sink_mean": float(measured.mean()) if len(measured) else None}
        found[when] = {"pearson": pearson(sinks, y), "within": within,
                       "effects": effects_beside_seeds(runs, models, sink_key)}
    return dict(found["after"], before=found["before"])


def analyze(rows: list[dict], measure: str, settings) -> dict:
    """The paper's analysis on the rows (one per run) for one measure."""
    description, higher_is_better = MEASURES[measure]
    runs = [with_parts(r, measure, settings.long_context()) for r in rows]
    merged, seeds = average_seeds(runs, measure)
    scored = [r for r in merged if r.get(measure) is not None]
    y = np.array([r[measure] for r in scored], float)
    column = lambda key: np.array([np.nan if r.get(key) is None else r[key] for r in scored], float)  # noqa: E731
    before = np.array([np.nan if r["before"].get(measure) is None else r["before"][measure] for r in scored], float)
    effects = {key: effects_beside_seeds(runs, scored, key) for key in (measure, *PARTS)}
    predictors = {"harmful_count": column("harmful_count"), "pretraining_val_loss": column("val_loss_pretrain"),
                  "before_extension": before, "sink_share": column("sink")}
    # Pearson's r keeps the sign that R² (its square) drops: whether the measure rises or falls with each predictor
    r = {key: pearson(x, y) for key, x in predictors.items()}
    analysis = {
        "measure": measure, "description": description, "higher_is_better": higher_is_better,
        "models": len(scored),
        "r2": {key: value ** 2 for key, value in r.items()}, "r": r,
        "paper_r2_7b": {"harmful_count": 0.67, "pretraining_val_loss": 0.29, "before_extension": 0.32,
                        "sink_share": 0.38},
        "pairwise": effects[measure],
        "parts": {part: effects[part] for part in PARTS},
        "parts_r2_count": {part: r_squared(column("harmful_count"), column(part)) for part in PARTS},
        "swa_pairs": swa_pairs(scored, effects),
        "sinks": sink_analysis(runs, scored, measure),
        "spread": {"between_models_std": float(np.std(y, ddof=1)) if len(y) > 1 else None, **seeds},
        "table": [{k: r.get(k) for k in ("name", "seeds", "choices", "harmful_count", "val_loss_pretrain",
                                           *MEASURES, "sink", *PARTS)}
                  | {"before": r["before"].get(measure)} for r in merged],
    }
    analysis["budgets"] = budget_analysis(rows, measure)
    analysis["early"] = early_analysis(rows, measure, settings.steps)
    return analysis


def finding_by_model(rows: list[dict], key: str, measure: str) -> tuple[dict, dict]:
    """A further finding (key: "budgets" or "early") over seed-averaged models, for the models whose runs
    have more than one point: {model: {point: the measure's mean over seeds}} and {point: the seed-to-seed
    std, mean over the models measured on more than one seed}."""
    values = {}
    for row in rows:
        if len(row[key]) > 1:
            for point, measured in row[key].items():
                values.setdefault(row["name"], {}).setdefault(int(point), []).append(measured.get(measure))
    points = sorted({p for by_point in values.values() for p in by_point})
    table, spreads = {}, {p: [] for p in points}
    for model, by_point in values.items():
        table[model] = {}
        for p in points:
            seeds = [v for v in by_point.get(p, []) if v is not None]
            table[model][str(p)] = float(np.mean(seeds)) if seeds else None
            if len(seeds) > 1:
                spreads[p].append(float(np.std(seeds, ddof=1)))
    return table, {str(p): float(np.mean(s)) if s else None for p, s in spreads.items()}


def budget_analysis(rows: list[dict], measure: str) -> dict:
    """Per extension budget, each subset model's measure (mean over seeds) and the best-worst gap between
    those means (does it shrink?), beside the seed-to-seed spread."""
    table, seed_std = finding_by_model(rows, "budgets", measure)
    gaps = {}
    for b in seed_std:
        values = [t[b] for t in table.values() if t.get(b) is not None]
        gaps[b] = float(max(values) - min(values)) if len(values) > 1 else None
    return {"table": table, "seed_std": seed_std, "gap_by_budget": gaps}


def early_analysis(rows: list[dict], measure: str, final_step: int) -> dict:
    """Per pretraining step extended from, each subset model's measure (mean over seeds); Spearman rho of
    each earlier step's ranking of the models against the final checkpoint's (the reference, not compared
    with itself)."""
    table, seed_std = finding_by_model(rows, "early", measure)
    models = list(table)
    final = [table[m].get(str(final_step)) for m in models]
    rho = {}
    for p in seed_std:
        if int(p) == final_step:
            continue
        values = [table[m].get(p) for m in models]
        keep = [i for i in range(len(models)) if values[i] is not None and final[i] is not None]
        rho[p] = spearman([values[i] for i in keep], [final[i] for i in keep]) if len(keep) >= 3 else None
    return {"table": table, "seed_std": seed_std, "spearman_vs_final": rho}


# ----------------------------------------------------------------------------------------------
# The none control: the recipe's RoPE change against the same training at the new length alone

CONTROL_MEASURES = {m: f"{m}_by_length" for m in BY_LENGTH}  # measure: its key by length


def control_cell(recipe: list[float], control: list[float]) -> dict:
    """One model at one length over its seeds (paired: seed s's recipe and control share a pretraining).
    gap = recipe - control; seed_std, the measure's seed-to-seed std (pooled over recipe and control),
    as the rest of the analysis measures seed noise; gap_std, the std of the per-seed gaps."""
    recipe, control = np.asarray(recipe, float), np.asarray(control, float)
    n, gap = len(recipe), float(np.mean(recipe - control))
    seed_std = float(np.sqrt((np.var(recipe, ddof=1) + np.var(control, ddof=1)) / 2)) if n >= 2 else None
    return {"n": n, "recipe": float(np.mean(recipe)), "control": float(np.mean(control)), "gap": gap,
            "seed_std": seed_std, "gap_std": float(np.std(recipe - control, ddof=1)) if n >= 2 else None,
            "gap_over_seed_std": gap / seed_std if seed_std else None}


def control_analysis(rows: list[dict]) -> dict:
    """{model: {measure: {length: control_cell}}} for the runs with a none control (sweep.py
    --control_models), over the seeds where both the recipe and the control have the measure."""
    table = {}
    for name in sorted({r["name"] for r in rows if r.get("control")}):
        runs = [r for r in rows if r["name"] == name and r.get("control")]
        for measure, key in CONTROL_MEASURES.items():
            lengths = sorted({length for r in runs for length in r["control"].get(key, {})})
            for length in lengths:
                pairs = [(r.get(key, {}).get(length), r["control"][key].get(length)) for r in runs]
                pairs = [pair for pair in pairs if None not in pair]
                if pairs:
                    table.setdefault(name, {}).setdefault(measure, {})[length] = control_cell(*zip(*pairs))
    return table


def control_table(control: dict, settings) -> list[str]:
    """The markdown section of control_analysis, or nothing where no run has a control."""
    if not control:
        return []
    lines = ["", f"## The none control: {settings.recipe} against the same extension with RoPE unchanged", "",
             "Each model of --control_models, extended again with the `none` recipe (the same data, steps and "
             "seeds); means over seeds. gap = recipe - control (loss: below 0, the recipe helps; recall and the "
             "probes: above 0). "
             "seed std: the measure's seed-to-seed std (pooled over recipe and control); gap / seed std near 2 or "
             "more stands out of the seed noise; gap std: the spread of the per-seed (paired) gaps.", "",
             "| model | measure | length | seeds | recipe | control | gap | seed std | gap / seed std | gap std |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, by_measure in control.items():
        for measure, by_length in by_measure.items():
            lines += [f"| {name} | {measure} | {length} | {c['n']} | {fmt(c['recipe'])} | {fmt(c['control'])} | "
                      f"{fmt(c['gap'])} | {fmt(c['seed_std'])} | {fmt(c['gap_over_seed_std'], 1)} | "
                      f"{fmt(c['gap_std'])} |" for length, c in by_length.items()]
    return lines


# ----------------------------------------------------------------------------------------------
# Writing: tables, plots, the analysis folder

def fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def signed(value, digits=2) -> str:
    """A correlation with its sign always shown; '–' when there is none."""
    return fmt(value) if value is None or not np.isfinite(value) else f"{value:+.{digits}f}"


def regime_settings(settings) -> bool:
    """Whether the sweep set the extension's data or a RoPE base or factor (not OlmPool's defaults)."""
    return any(x is not None for x in (settings.ext_data, settings.rope_theta, settings.ext_rope_factor))


def data_and_rope(settings) -> str:
    """Which folders each stage read, and the RoPE bases: what the stage commands say, in one line."""
    s = settings
    factor = (f"--rope_factor {s.ext_rope_factor:g} (ABF: the pretraining base x {s.ext_rope_factor:g})"
              if s.ext_rope_factor is not None else "the recipe's own numbers")
    base = f"{s.rope_theta:g}" if s.rope_theta is not None else "each preset's own"
    return (f"Data: pretraining and held-out evaluation {s.data}; extension {s.ext_data or 'the same'}. RoPE: "
            f"pretraining base {base}; extension {s.recipe}, {factor}.")


def markdown(analyses: dict, rows: list[dict], settings, primary: str) -> str:
    s = settings
    lines = [f"# Mini pool: {len({r['name'] for r in rows})} models at size {s.size}, seeds {list(s.seeds)}", "",
             f"Pretraining {s.steps} steps x {s.batch_sequences * s.long_context()} tokens; extension "
             f"({s.recipe}) to {s.ext_len()} tokens, {s.ext_steps} steps x {s.ext_batch_sequences} sequence(s). "
             f"Primary measure: **{primary}** ({MEASURES[primary][0]}).", "",
             *([data_and_rope(s), ""] if regime_settings(s) else []), "## Per model", "",
             "| model | seed | harmful | val loss (pretrain) | before: loss @" + str(s.long_context()) +
             " | recall by length | held-out loss by length | recall beyond pretraining | LongPPL | sink share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["harmful_count"], r["name"], r["seed"])):
        recall = ", ".join(f"{L}: {v:.0f}" for L, v in r["recall_by_length"].items()) or "–"
        loss = ", ".join(f"{L}: {v:.3f}" for L, v in r["loss_by_length"].items()) or "–"
        lines.append(f"| {r['name']} | {r['seed']} | {r['harmful_count']} | {fmt(r['val_loss_pretrain'])} | "
                     f"{fmt(r['before']['loss'])} | {recall} | {loss} | {fmt(r['recall'], 1)} | {fmt(r['longppl'])} | "
                     f"{fmt(r['sink'])} |")
    lines += probes_table(rows, s)
    for measure, a in analyses.items():
        lines += measure_section(a, settings)
    return "\n".join(lines + control_table(control_analysis(rows), settings)) + "\n"


def probes_table(rows: list[dict], settings) -> list[str]:
    """Each run's retrieval probes by length after extension, and retrieval before and after it; nothing where
    no run was probed (--data not a synthetic mix)."""
    if not any(r.get(f"{m}_by_length") for r in rows for m in PROBE_FIELDS):
        return []
    L = settings.long_context()

    def by_length(row: dict, measure: str, digits: int) -> str:
        return ", ".join(f"{n}: {v:.{digits}f}" for n, v in row.get(f"{measure}_by_length", {}).items()) or "–"

    lines = ["", "## Retrieval probes per model", "", "Needle recall and MQAR accuracy x 100, copy gain in nats "
             "(probes.py, the same documents for every model); retrieval: the mean of needle recall and MQAR "
             f"accuracy, before extension at L = {L} and after it over the lengths beyond L.", "",
             "| model | seed | needle recall by length | MQAR accuracy by length | copy gain by length | "
             f"before: retrieval @{L} | retrieval beyond pretraining |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["harmful_count"], r["name"], r["seed"])):
        lines.append(f"| {r['name']} | {r['seed']} | {by_length(r, 'needle', 0)} | {by_length(r, 'mqar', 0)} | "
                     f"{by_length(r, 'copy', 3)} | {fmt(r['before'].get('retrieval'), 1)} | "
                     f"{fmt(r.get('retrieval'), 1)} |")
    return lines


def measure_section(a: dict, settings) -> list[str]:
    """One measure's section: spreads, R², the pairwise effects and where they arise, the SWA pairs, sinks
    and the further findings."""
    s, measure = settings, a["measure"]
    lines = ["", f"## {measure}: {a['description']} ({'higher' if a['higher_is_better'] else 'lower'} is better)",
             "", f"{a['models']} models (seeds averaged). Spread between models (std): "
             f"{fmt(a['spread']['between_models_std'])}; seed-to-seed (mean std over "
             f"{a['spread']['models_with_seeds']} models): {fmt(a['spread']['seed_std_mean'])}.", "",
             seed_verdict(a["spread"]), "",
             "| R² of the measure against | here | r here (its sign: the direction) | paper's R² (7B, HELMET-32K) |",
             "|---|---|---|---|"]
    for key, label in (("harmful_count", "count of harmful choices"), ("pretraining_val_loss", "pretraining loss"),
                       ("before_extension", "the same measure before extension"), ("sink_share", "sink share")):
        lines.append(f"| {label} | {fmt(a['r2'][key])} | {signed(a['r'][key])} | {a['paper_r2_7b'][key]} |")
    lines += effects_table(a, s.choice_descriptions()) + parts_table(a, s) + swa_lines(a, s) + sinks_table(a, s)
    if measure == "longppl":
        lines += longppl_evaluator_lines(a, s)
    budgets, early = a["budgets"], a["early"]
    lines += finding_table("Gaps after more extension data: the measure by extension budget (steps), each "
                           "model's mean over its seeds", budgets["table"],
                           [("gap best - worst (between the means)", budgets["gap_by_budget"]),
                            ("seed-to-seed std (mean over models)", budgets["seed_std"])])
    lines += finding_table(f"The ranking is set early: the measure after extending from each pretraining step, "
                           f"each model's mean over its seeds ({len(early['table'])} models)", early["table"],
                           [(f"Spearman rho vs the final step's ranking (step {s.steps}: the reference)",
                             early["spearman_vs_final"]),
                            ("seed-to-seed std (mean over models)", early["seed_std"])])
    return lines


def effect_cell(effect: dict, higher_is_better: bool | None) -> str:
    """mean ± seed spread (in how many pairs the harmful level is worse; with None: higher)."""
    count, word = ((effect["positive"], "higher") if higher_is_better is None else
                   (effect["negative" if higher_is_better else "positive"], "worse"))
    return f"{fmt(effect['mean'])} ± {fmt(effect.get('seed_std'))} ({word} in {count}/{effect['n']})"


def effects_table(a: dict, descriptions: dict) -> list[str]:
    better = "negative" if a["higher_is_better"] else "positive"
    lines = ["", "Pairwise: the measure of the model with the harmful level minus that of its twin with the other "
             f"level, over seed-averaged models ({better}: the harmful level is worse). Seed spread: the std over "
             "seeds of the mean effect computed on each seed alone. Within pairs: each pair's effect per seed, its "
             "std over the seeds, the mean over the pairs (large beside a small seed spread: the seeds disagree "
             "pair by pair and agree only on average).", "",
             "| choice (harmful level minus other) | pairs | mean effect | seed spread | within pairs | "
             "harmful worse in | std over the others | min | max |", "|---|---|---|---|---|---|---|---|---|"]
    for choice, e in a["pairwise"].items():
        worse = e["negative" if a["higher_is_better"] else "positive"]
        lines.append(f"| {choice}: {descriptions[choice]} | {e['n']} | {fmt(e['mean'])} | {fmt(e.get('seed_std'))} | "
                     f"{fmt(e.get('pair_seed_std'))} | {worse}/{e['n']} | {fmt(e['std'])} | {fmt(e['min'])} | "
                     f"{fmt(e['max'])} |")
    return lines


def parts_table(a: dict, settings) -> list[str]:
    """Each effect beside its parts: before extension, the extension at L, and the length-specific part."""
    L, extended = settings.long_context(), settings.ext_len()
    title = "Where each effect arises"
    if not any(e["n"] for part in a["parts"].values() for e in part.values()):
        return ["", f"{title}: not measured for {a['measure']} (no value at the pretraining length {L})."]
    descriptions, higher = settings.choice_descriptions(), a["higher_is_better"]
    lines = ["", f"{title}: the measure at {extended} = before extension (the pretrained model at L = {L}) + "
             f"extension (the extended model at {L} minus the pretrained one) + length-specific (the extended model "
             f"at {extended} minus itself at {L}). Each cell: mean effect ± seed spread (pairs where the harmful "
             "level is worse).", "",
             f"| choice | total | before extension, at {L} | extension, at {L} | "
             f"length-specific: {extended} minus {L} |",
             "|---|---|---|---|---|"]
    for choice, e in a["pairwise"].items():
        lines.append(f"| {choice}: {descriptions[choice]} | {effect_cell(e, higher)} | " +
                     " | ".join(effect_cell(a["parts"][part][choice], higher) for part in PARTS) + " |")
    return lines + ["| **R² against the count of harmful choices** | " + fmt(a["r2"]["harmful_count"]) + " | " +
                    " | ".join(fmt(a["parts_r2_count"][part]) for part in PARTS) + " |"]


def swa_lines(a: dict, settings) -> list[str]:
    """Which SWA pairs test only the windows met at extension, and each group's effect and parts."""
    groups = a["swa_pairs"]
    if "extension_only" not in groups:
        return []
    said = {label: f"{fmt(g['mean'][a['measure']])} (" + ", ".join(
        f"{name} {fmt(g['mean'][part])}" for part, name in zip(PARTS, ("before extension", "extension",
                                                                      "length-specific"))) + ")"
            for label, g in groups.items()}
    only = groups["extension_only"]
    lines = ["", f"SWA pairs that test only the windows met at extension ({only['n']} of "
             f"{sum(g['n'] for g in groups.values())}: {', '.join(only['pairs'])}): the windowed model was pretrained "
             "at a context no longer than its window, so its windowed layers saw every token, as global ones do, "
             "and the pair's pretrained models are the same function at that length. Their mean effect: "
             f"{said['extension_only']}."]
    if "pretraining_too" in groups:
        lines[-1] += f" The other {groups['pretraining_too']['n']} pairs, windows in pretraining too: " \
                     f"{said['pretraining_too']}."
    return lines


def longppl_evaluator_lines(a: dict, settings) -> list[str]:
    """Who chose LongPPL's key tokens and, where that was one of the compared runs, the bias it brings."""
    evaluator = settings.longppl_evaluator_name()
    if evaluator not in {row["name"] for row in a["table"]}:
        return ["", f"LongPPL's key tokens were chosen by `{evaluator}`, a checkpoint outside the compared models."]
    without = {}
    for choice, e in a["pairwise"].items():
        kept = [p["effect"] for p in e["pairs"] if evaluator not in (p["harmful"], p["other"])]
        without[choice] = f"{choice} {fmt(mean_of(kept))} over {len(kept)} pairs"
    return ["", f"LongPPL's key tokens were chosen by {evaluator}/s{settings.seeds[0]}, one of the compared runs: "
            "under its own weights every key token has a loss below 2, so its LongPPL is capped at e² (7.39), and "
            f"each pair that holds {evaluator} leans its way. Mean effects without those pairs: "
            f"{', '.join(without.values())}. A checkpoint outside the grid (--longppl_evaluator FOLDER) has no "
            "such bias."]


def sinks_table(a: dict, settings) -> list[str]:
    """Sink share against the measure, before and after extension, within each level of qk and swa."""
    sinks, L, extended = a["sinks"], settings.long_context(), settings.ext_len()
    harmful, other = settings.qk_levels
    labels = {"qk=1": f"qk {harmful}", "qk=0": f"qk {other}", "swa=1": "windowed", "swa=0": "all global"}
    lines = ["", f"Sinks ({SINK_MEASURE}: attention on the first 100 tokens from the query at min(4000, T - 1, "
             "smallest window - 1), evaluate.py's rule: inside every layer's reach, as the authors' 4,000 inside "
             "4,096). A windowed model's query sits at window - 1, where the first 100 tokens are most of what it "
             "sees, an all-global model's at T - 1: read the share within each swa level.", "",
             f"| sink share | after extension, at {extended} | before extension, at {L} |", "|---|---|---|",
             f"| Pearson r with {a['measure']} (before: with {a['measure']} before extension), all models | "
             f"{fmt(sinks['pearson'])} | {fmt(sinks['before']['pearson'])} |"]
    for key, label in labels.items():
        after, before = sinks["within"][key], sinks["before"]["within"][key]
        lines.append(f"| r within {label} ({after['n']} models); mean sink share | {fmt(after['pearson'])}; "
                     f"{fmt(after['sink_mean'])} | {fmt(before['pearson'])}; {fmt(before['sink_mean'])} |")
    for choice in ("qk", "swa"):
        lines.append(f"| {choice}'s effect on the sink share (± seed spread; pairs where it is higher) | "
                     f"{effect_cell(sinks['effects'][choice], None)} | "
                     f"{effect_cell(sinks['before']['effects'][choice], None)} |")
    return lines


def finding_table(title: str, table: dict, summaries: list[tuple[str, dict]]) -> list[str]:
    """A further finding as a markdown table: one row per model, one column per point, and summary rows."""
    if not table:
        return []
    points = list(next(iter(table.values())))
    if all(v is None for t in table.values() for v in t.values()):
        return ["", f"{title}: not measured for these runs."]
    lines = ["", f"{title}:", "", "| model | " + " | ".join(points) + " |", "|---|" + "---|" * len(points)]
    lines += [f"| {model} | " + " | ".join(fmt(t.get(p)) for p in points) + " |" for model, t in table.items()]
    return lines + [f"| **{label}** | " + " | ".join(fmt(summary.get(p)) for p in points) + " |"
                    for label, summary in summaries]


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
            axis.set(xlabel=xlabel, ylabel=measure, title=f"{measure} by {xlabel}, mean over seeds")
            axis.legend(fontsize=6)
            figure.tight_layout()
            path = out / f"{measure}_by_{key}.png"
            figure.savefig(path, dpi=120)
            plt.close(figure)
            written.append(path.name)
    return written


def rows_from_json(rows: list[dict]) -> list[dict]:
    """Rows as collect makes them, from an analysis.json (JSON spells the lengths and steps as strings)."""
    integer_keys = lambda mapping: {int(k): v for k, v in mapping.items()}  # noqa: E731
    rows = [dict(row, **{key: integer_keys(row[key]) for key in row if key.endswith("_by_length") or
                         key in ("budgets", "early")}) for row in rows]
    return [dict(row, control={key: integer_keys(v) for key, v in row["control"].items()}) if "control" in row
            else row for row in rows]


def write_analysis(settings, rows: list[dict], primary: str, command: list[str], machine: str, out: Path,
                   results_dir: Path | None = None, rows_from: dict | None = None) -> dict:
    """The analysis of the rows into OUT/analysis (analysis.json, analysis.md, plots), and with results_dir
    a copy there with the sweep's index and COMMAND.md. rows_from: where rows read from an earlier
    analysis.json came from (its file, and the command and machine that collected them)."""
    analyses = {m: analyze(rows, m, settings) for m in MEASURES
                if any(r.get(m) is not None for r in rows)}
    if primary not in analyses:
        raise AnalysisError(f"--measure {primary}: no run has it yet (finished runs: "
                            f"{sum(r['loss'] is not None for r in rows)}); run the sweep first or pick "
                            f"one of {sorted(analyses) or list(MEASURES)}")
    analyses = {primary: analyses[primary]} | analyses
    report = {"command": command, "machine": machine, "settings": settings.as_dict(), "primary": primary,
              **({"rows_from": rows_from} if rows_from else {}), "rows": rows, "analyses": analyses,
              **({"control": control} if (control := control_analysis(rows)) else {})}
    target = Path(out) / "analysis"
    target.mkdir(parents=True, exist_ok=True)
    # NaN stands for an undefined statistic (a constant column); default=str for any stray value
    files.write_atomically(target / "analysis.json", json.dumps(report, indent=1, default=str))
    files.write_atomically(target / "analysis.md", markdown(analyses, rows, settings, primary))
    plots(analyses, target)
    if results_dir is not None:
        copy_results(Path(out), Path(results_dir), command, machine, rows_from)
    return report


def copy_results(out: Path, results_dir: Path, command: list[str], machine: str, rows_from: dict | None) -> None:
    """The committed copy: the analysis, plots and index (small files only, never checkpoints) and
    COMMAND.md, which says which commands made them, on which machines."""
    results_dir.mkdir(parents=True, exist_ok=True)
    for file in (out / "analysis").iterdir():
        shutil.copy2(file, results_dir / file.name)
    for name in ("index.json", "index.md"):
        if (out / name).is_file():
            shutil.copy2(out / name, results_dir / name)
    index = json.loads((out / "index.json").read_text()) if (out / "index.json").is_file() else {}
    ran = index.get("command")
    # shlex.join quotes an argument with spaces (--extra_train "--warmup 100"), so a line can be pasted
    text = (f"Analysis by\n\n```bash\n{shlex.join(command)}\n```\n\non {machine}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}.\n")
    if ran and ran != command:
        text = (f"Stages run by the last sweep command on {out}\n\n```bash\n{shlex.join(ran)}\n```\n\non "
                f"{index.get('machine')}.\n\n" + text)
    if rows_from:
        text = (f"Rows read from {rows_from['file']}, collected from the runs by\n\n```bash\n"
                f"{shlex.join(rows_from['command'] or [])}\n```\n\non {rows_from['machine']}.\n\n" + text)
    files.write_atomically(results_dir / "COMMAND.md", text)
