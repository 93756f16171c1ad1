"""evaluate.py's reports: results.md's tables, the PNG plots and the main job's before/after table, all read
from the cells of results.json (evaluate.py computes them; docs/evaluation.md defines every number)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import ruler

EFFECTIVE_THRESHOLD = 85.6  # RULER: Llama-2-7B's mean at 4K


def cell(results: dict, mode: str, label: str, key: str):
    return results.get(mode, {}).get(label, {}).get(key)


def recall_summary(results: dict, label: str, tasks: list[str], lengths: list[int]) -> dict:
    """Per length, the plain mean over tasks that ran; the mean over lengths; the effective length."""
    per_length = {}
    for L in lengths:
        means = [c["mean"] for t in tasks if (c := cell(results, "recall", label, f"{t}/{L}")) and "mean" in c]
        per_length[L] = float(np.mean(means)) if means else None
    scored = [v for v in per_length.values() if v is not None]
    above = [L for L, v in per_length.items() if v is not None and v > EFFECTIVE_THRESHOLD]
    return {"per_length": per_length, "mean": float(np.mean(scored)) if scored else None,
            "effective_length": max(above) if above else None}


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_tables(results: dict, labels: list[str], lengths: list[int], tasks: list[str],
                    probe_lengths: list[int] = ()) -> str:
    """results.md: the deviations, then the recall, LongPPL, attention and probe tables for the cells that exist."""
    lines = [f"Deviations: {'; '.join(ruler.deviations(tasks))}.", ""]
    if any(cell(results, "recall", label, f"{t}/{L}") for label in labels for t in tasks for L in lengths):
        lines += recall_tables(results, labels, lengths, tasks)
    if any(cell(results, "longppl", label, str(L)) for label in labels for L in lengths):
        lines += longppl_table(results, labels, lengths)
    if any(cell(results, "attention", label, str(L)) for label in labels for L in lengths):
        lines += attention_table(results, labels, lengths)
    if has_probe_cells(results, labels, probe_lengths):
        lines += ["## Retrieval probes (probes.py)", ""] + probe_table(results, labels, probe_lengths) + [""]
    return "\n".join(lines)


def recall_tables(results: dict, labels: list[str], lengths: list[int], tasks: list[str]) -> list[str]:
    """Score per task and length, the per-length means, effective lengths, and attention on the needle."""
    lines = ["## Recall (score x100, mean ± 95% CI, n samples)", "",
             "| model | task | " + " | ".join(str(L) for L in lengths) + " |", "|---|---|" + "---|" * len(lengths)]
    for label in labels:
        for t in tasks:
            row = []
            for L in lengths:
                c = cell(results, "recall", label, f"{t}/{L}") or {}
                row.append("skipped" if "skipped" in c else "-" if "mean" not in c else
                           f"{c['mean']:.1f} ± {_fmt(c['ci95'])} (n={c['n']})")
            lines.append(f"| {label} | {t}{' *' if ruler.TASKS[t].deviation else ''} | " + " | ".join(row) + " |")
        summary = recall_summary(results, label, tasks, lengths)
        lines.append(f"| {label} | **mean** | " + " | ".join(_fmt(summary["per_length"][L]) for L in lengths) + " |")
    lines += ["", "| model | mean over lengths | effective length (> 85.6) |", "|---|---|---|"]
    for label in labels:
        summary = recall_summary(results, label, tasks, lengths)
        lines.append(f"| {label} | {_fmt(summary['mean'])} | {summary['effective_length'] or '-'} |")
    lines += ["", "`*` a deviation from the benchmark's definition (see above).", ""]
    short = [f"{label} {t} @ {L}: {c['oracle']:.1f}" for label in labels for t in tasks for L in lengths
             if (c := cell(results, "recall", label, f"{t}/{L}")) and c.get("oracle", 100.0) < 100.0]
    if short:
        lines += [f"An oracle (the answers, cut at the cap) scores below 100: {'; '.join(short)}.", ""]
    needle_rows = [(label, t, L, c["needle_attention"]) for label in labels for t in tasks for L in lengths
                   if (c := cell(results, "recall", label, f"{t}/{L}")) and "needle_attention" in c]
    if needle_rows:
        lines += ["## Attention on the needle (the answer-generating query)", "",
                  "| model | task | length | mass, mean over heads and layers | best head, mean over samples: "
                  "lift over uniform |", "|---|---|---|---|---|"]
        for label, t, L, c in needle_rows:
            lines.append(f"| {label} | {t} | {L} | {np.mean(c['mass_mean_per_layer']):.4f} | "
                         f"{c['best_head_lift']:.1f}x |")
        lines.append("")
    return lines


def longppl_table(results: dict, labels: list[str], lengths: list[int]) -> list[str]:
    """Held-out loss, perplexity and LongPPL per model and length."""
    note = next((c["settings"].get("note") for label in labels for L in lengths
                 if (c := cell(results, "longppl", label, str(L))) and "settings" in c), None)
    lines = ["## Held-out loss and LongPPL", ""] + ([f"LongPPL: {note}.", ""] if note else []) + [
        "| model | length | loss (nats/token) | perplexity | LongPPL | key tokens |", "|---|---|---|---|---|---|"]
    for label in labels:
        for L in lengths:
            c = cell(results, "longppl", label, str(L)) or {}
            if "loss" in c:
                own = " †" if c.get("evaluator_is_this_model") else ""
                lines.append(f"| {label} | {L} | {c['loss']:.3f} | {c['ppl']:.2f} | {_fmt(c['longppl'], 2)}{own} | "
                             f"{c['key_tokens']} |")
    evaluators = {c["settings"]["evaluator"] for label in labels for L in lengths
                  if (c := cell(results, "longppl", label, str(L))) and "settings" in c}
    lines += ["", f"Key tokens chosen by {', '.join(f'`{e}`' for e in sorted(evaluators))}"
              + (" (outside the compared models)" if evaluators.isdisjoint(labels) else "; † the evaluator itself: it "
                 "picked tokens its own loss is below 2 nats on, so its LongPPL is below e^2 = 7.39 by construction "
                 "(--evaluator outside the compared checkpoints avoids this)") + "."]
    return lines + [""]


def attention_table(results: dict, labels: list[str], lengths: list[int]) -> list[str]:
    """Sink, local and saturation shares per model and length, with the query each was measured at."""
    lines = ["## Attention (mean over layers and heads)", "",
             "| model | length | query | sink: first 1 | first 4 | first 100 | local 100 | saturated heads |",
             "|---|---|---|---|---|---|---|---|"]
    rules = []
    for label in labels:
        for L in lengths:
            c = cell(results, "attention", label, str(L)) or {}
            if "per_layer" in c:
                m = {k: float(np.mean(v)) for k, v in c["per_layer"].items()}
                lines.append(f"| {label} | {L} | {c['query_position']} | {m['sink_first_1']:.3f} | "
                             f"{m['sink_first_4']:.3f} | {m['sink_first_100']:.3f} | {m['local_100']:.3f} | "
                             f"{m['saturated']:.3f} |")
                rules.append(c.get("query_rule", "min(4000, T - 1)"))  # cells from before the rule was recorded
    return lines + ["", f"Query position: {'; '.join(dict.fromkeys(rules))}.", ""]


def save_plot(path: Path, draw) -> Path:
    """One 6 x 4 inch figure with a legend, at 120 dpi: draw(axes) plots the curves and labels the axes."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(6, 4))
    draw(axes)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def draw_score_vs_length(axes, results: dict, labels: list[str], lengths: list[int], tasks: list[str]) -> None:
    """Each model's mean recall over tasks against the length, with RULER's effective-length threshold."""
    for label in labels:
        per_length = recall_summary(results, label, tasks, lengths)["per_length"]
        points = [(L, v) for L, v in per_length.items() if v is not None]
        if points:
            axes.plot(*zip(*points), marker="o", label=label)
    axes.set(xscale="log", xlabel="length (tokens)", ylabel="mean recall score", ylim=(-2, 102),
             title=f"Recall, mean over {len(tasks)} tasks")
    axes.set_xticks(lengths, [str(L) for L in lengths])
    axes.axhline(EFFECTIVE_THRESHOLD, color="gray", linestyle=":", linewidth=1)


def draw_sink_per_layer(axes, attention: list[tuple[str, int, dict]]) -> None:
    """The first token's share of the query's attention, per layer, for each (model, length) attention cell."""
    for label, L, c in attention:
        axes.plot(c["per_layer"]["sink_first_1"], marker="o", label=f"{label} @ {L}")
    axes.set(xlabel="layer", ylabel="attention on the first token", ylim=(0, 1),
             title="Sink share per layer (query inside the window)")


def draw_loss_by_position(axes, losses: list[tuple[str, int, dict]]) -> None:
    """Held-out loss by position bucket for each (model, length) LongPPL cell."""
    for label, L, c in losses:
        buckets = c["loss_by_position"]
        axes.plot([b["to"] for b in buckets], [b["loss"] for b in buckets], marker="o", label=f"{label} @ {L}")
    axes.set(xscale="log", xlabel="position (end of bucket)", ylabel="held-out loss (nats/token)",
             title="Loss by position")


def plot(results: dict, labels: list[str], lengths: list[int], tasks: list[str], out: Path) -> list[Path]:
    """score_vs_length.png, sink_per_layer.png and loss_by_position.png, for the cells that exist."""
    written = []
    if any(cell(results, "recall", label, f"{t}/{L}") for label in labels for t in tasks for L in lengths):
        written.append(save_plot(out / "score_vs_length.png",
                                 lambda axes: draw_score_vs_length(axes, results, labels, lengths, tasks)))
    attention = [(label, L, c) for label in labels for L in lengths
                 if (c := cell(results, "attention", label, str(L))) and "per_layer" in c]
    if attention:
        written.append(save_plot(out / "sink_per_layer.png", lambda axes: draw_sink_per_layer(axes, attention)))
    losses = [(label, L, c) for label in labels for L in lengths
              if (c := cell(results, "longppl", label, str(L))) and "loss_by_position" in c]
    if losses:
        written.append(save_plot(out / "loss_by_position.png", lambda axes: draw_loss_by_position(axes, losses)))
    return written


def before_after_table(results: dict, labels: list[str], lengths: list[int], tasks: list[str],
                       probe_lengths: list[int] = ()) -> str:
    """Held-out loss, LongPPL and recall at L and 4L per model; then, where the probes ran, their table at
    probe_lengths (L, 2L, 4L, 8L)."""
    L, L4 = lengths
    header = (f"| model | loss @ {L} | loss @ {L4} | LongPPL @ {L} | LongPPL @ {L4} | recall @ {L} | recall @ {L4} |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for label in labels:
        ppl = {n: cell(results, "longppl", label, str(n)) or {} for n in lengths}
        recall = recall_summary(results, label, tasks, lengths)["per_length"]
        lines.append(f"| {label} | {_fmt(ppl[L].get('loss'), 3)} | {_fmt(ppl[L4].get('loss'), 3)} | "
                     f"{_fmt(ppl[L].get('longppl'), 2)} | {_fmt(ppl[L4].get('longppl'), 2)} | "
                     f"{_fmt(recall[L])} | {_fmt(recall[L4])} |")
    evaluator = next((c["settings"]["evaluator"] for n in lengths
                      if (c := results.get("key_tokens", {}).get(str(n))) and "settings" in c), "-")
    note = next((c["settings"].get("note") for n in lengths
                 if (c := results.get("key_tokens", {}).get(str(n))) and "settings" in c), None)
    own = (" (one of the compared models: its own LongPPL is below e^2 by construction)" if evaluator in labels
           else " (outside the compared models)" if evaluator != "-" else "")
    lines += ["", f"Loss: held-out nats/token. LongPPL key tokens chosen by `{evaluator}`{own}"
              + (f"; {note}" if note else "") + f". Recall: mean of {', '.join(tasks)} (x100; "
              + "; ".join(ruler.deviations(tasks)) + ")."]
    if has_probe_cells(results, labels, probe_lengths):
        lines += [""] + probe_table(results, labels, probe_lengths)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The retrieval probes (probes.py): one row per model and probe, one column per length

PROBE_ROWS = (("needle", "needle recall %", "recall", 1), ("mqar", "MQAR accuracy %", "accuracy", 1),
              ("copy", "copy gain (nats)", "gain", 2))  # (kind, row name, the cell's measure, digits)


def has_probe_cells(results: dict, labels: list[str], lengths: list[int]) -> bool:
    return any(cell(results, "probes", label, f"{kind}/{L}") for label in labels for kind, *_ in PROBE_ROWS
               for L in lengths)


def probe_entry(c: dict | None, measure: str, digits: int) -> str:
    """One table entry: the measure ± its standard error (n documents), "skipped" or "-"."""
    if not c or measure not in c:
        return "skipped" if c and "skipped" in c else "-"
    spread = f" ± {c['se']:.{digits}f}" if c.get("se") is not None else ""
    return f"{c[measure]:.{digits}f}{spread} (n={c['n']})"


def probe_table(results: dict, labels: list[str], lengths: list[int]) -> list[str]:
    """Needle recall, MQAR accuracy and copy gain per model at each length, and the chance levels."""
    lines = ["| model | probe | " + " | ".join(str(L) for L in lengths) + " |", "|---|---|" + "---|" * len(lengths)]
    for label in labels:
        for kind, name, measure, digits in PROBE_ROWS:
            entries = [probe_entry(cell(results, "probes", label, f"{kind}/{L}"), measure, digits) for L in lengths]
            lines.append(f"| {label} | {name} | " + " | ".join(entries) + " |")
    found = {kind: c for label in labels for kind, *_ in PROBE_ROWS for L in lengths
             if (c := cell(results, "probes", label, f"{kind}/{L}")) and "chance" in c}
    needle, mqar = found.get("needle", {}), found.get("mqar", {})
    chance = ([f"needle {needle['chance']:.3g}% (both answer tokens; {needle['chance_per_token']:.3g}% each)"]
              if needle else []) + ([f"MQAR {mqar['chance']:.3g}%"] if mqar else []) + ["copy gain 0"]
    pairs = {L: c["pairs"] for label in labels for L in lengths
             if (c := cell(results, "probes", label, f"mqar/{L}")) and "pairs" in c}  # the same for every model
    return lines + ["", "Probes: ± one standard error; n documents per length, probe keys only. Chance: "
                    + "; ".join(chance) + ". MQAR pairs, max(4, length // 32): "
                    + (", ".join(f"{n} at {L}" for L, n in pairs.items()) or "-")
                    + ". Copy gain: loss on each span's first occurrence minus its second (first token left out);"
                    " target >= 1 nat at L."]
