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

import json
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
MEASURES = {  # name: (description, higher is better)
    "recall": ("RULER-style recall x 100, mean over tasks and the lengths beyond the longer pretraining context", True),
    "loss": ("held-out loss (nats/token) at the extended length", False),
    "longppl": ("LongPPL at the extended length, key tokens from one evaluator for every model", False),
}


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
    only: the effect (harmful level's measure minus the other's) per pair, and its mean, standard deviation,
    min and max over the pairs, i.e. the spread over the other choices' combinations."""
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
# Reading the runs: one row per run

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
    """{recall: {length: mean score over tasks}, loss: {length: held-out loss}, longppl_self: {...},
    sink: {length: sink share}} from one evaluate.py results.json. A recall cell's mean is already x 100
    (RULER's metrics score 0-100), so it is taken as it is."""
    path = folder / "results.json"
    found = {"recall": {}, "loss": {}, "longppl_self": {}, "sink": {}}
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
    return found


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


# ----------------------------------------------------------------------------------------------
# The paper's analysis of the rows, one measure at a time

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


def analyze(rows: list[dict], measure: str, settings) -> dict:
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
# Writing: tables, plots, the analysis folder

def fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(analyses: dict, rows: list[dict], settings, primary: str) -> str:
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
    descriptions = settings.choice_descriptions()
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
            lines.append(f"| {choice}: {descriptions[choice]} | {e['n']} | {fmt(e['mean'])} | {fmt(e['std'])} | "
                         f"{fmt(e['min'])} | {fmt(e['max'])} |")
        sinks = a["sinks"]
        lines += ["", f"Sinks: Pearson r of sink share ({SINK_MEASURE}) with {measure}: {fmt(sinks['pearson'])}; " +
                  "; ".join(f"{k}: r {fmt(v['pearson'])} over {v['n']} models, mean sink {fmt(v['sink_mean'])}"
                            for k, v in sinks["by_qk_norm"].items()) + "."]
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
    return "\n".join(lines) + "\n"


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
            axis.set(xlabel=xlabel, ylabel=measure, title=f"{measure} by {xlabel}")
            axis.legend(fontsize=6)
            figure.tight_layout()
            path = out / f"{measure}_by_{key}.png"
            figure.savefig(path, dpi=120)
            plt.close(figure)
            written.append(path.name)
    return written


def write_analysis(settings, rows: list[dict], primary: str, results_dir: Path | None, command: list[str],
                   machine: str) -> dict:
    """The analysis of the rows into OUT/analysis (analysis.json, analysis.md, plots), and with results_dir
    a copy there with the sweep's index and COMMAND.md (the command and the machine)."""
    out = Path(settings.out)
    analyses = {m: analyze(rows, m, settings) for m in MEASURES
                if any(r.get(m) is not None for r in rows)}
    if primary not in analyses:
        raise AnalysisError(f"--measure {primary}: no run has it yet (finished runs: "
                         f"{sum(r['loss'] is not None for r in rows)}); run the sweep first or pick "
                         f"one of {sorted(analyses) or list(MEASURES)}")
    analyses = {primary: analyses[primary]} | analyses
    report = {"command": command, "machine": machine, "settings": settings.as_dict(), "primary": primary,
              "rows": rows, "analyses": analyses}
    target = out / "analysis"
    target.mkdir(parents=True, exist_ok=True)
    # NaN stands for an undefined statistic (a constant column); default=str for any stray value
    files.write_atomically(target / "analysis.json", json.dumps(report, indent=1, default=str))
    files.write_atomically(target / "analysis.md", markdown(analyses, rows, settings, primary))
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
        text = (f"Analysis by\n\n```bash\n{' '.join(command)}\n```\n\non {machine}, "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}.\n")
        if ran and ran != command:
            text = (f"Stages run by the last sweep command on {out}\n\n```bash\n{' '.join(ran)}\n```\n\non "
                    f"{index.get('machine')}.\n\n" + text)
        files.write_atomically(results_dir / "COMMAND.md", text)
    return report


