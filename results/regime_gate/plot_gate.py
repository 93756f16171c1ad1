"""The gate's curves in one figure: copy gain at the training length against tokens seen, every run.

    python results/regime_gate/plot_gate.py     # -> results/regime_gate/gate_curves.png
"""
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def copy_gain(row):
    """(the copy gain at the run's training length, that length): gate.py logs copy_gain@256 (its probe
    length), gate_mix.py copy@L for L the model's context (256, or 128 for the all-four model)."""
    for key in ("copy_gain@256", "copy@256", "copy@128"):
        if key in row:
            return row[key]
    return None


def induction_sanity(path):
    """(tokens, loss on the repeat) from an induction_sanity.py log; tokens counted as the log does."""
    points = [line.split() for line in path.read_text().splitlines() if line.startswith(("olmpool", "minimal"))]
    return [int(p[2]) for p in points], [float(p[4]) for p in points]


def main():
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for path in sorted(HERE.glob("*.jsonl")) + sorted((HERE / "synthetic_only").glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        points = [(r["tokens"] / 1e6, copy_gain(r)) for r in rows if copy_gain(r) is not None]
        if points:
            style = "--" if path.parent.name == "synthetic_only" else "-"
            left.plot(*zip(*points), style, marker=".", label=str(path.relative_to(HERE)))
    left.axhline(1.0, color="gray", lw=0.8, ls=":")
    left.text(0.1, 1.1, "the acceptance target: 1 nat", fontsize=8, color="gray")
    left.set(xlabel="tokens seen (millions)", ylabel="copy gain at L (nats)", ylim=(-0.3, 7.0),
             title="gate runs: copy gain at the training length")
    left.legend(fontsize=6.5, loc="upper left")
    for name in ("minimal", "olmpool", "olmpool_lm"):
        path = HERE / "sanity" / f"{name}.log"
        if path.is_file():
            tokens, loss = induction_sanity(path)
            right.plot([t / 1e6 for t in tokens], loss, marker=".", label=name)
    right.set(xlabel="steps x 16 x 128 (millions; about 0.63x that many tokens)", ylabel="loss on the repeat (nats)",
              title="induction sanity: a repeated random sequence, alphabet 256")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(HERE / "gate_curves.png", dpi=110)
    print(HERE / "gate_curves.png")


if __name__ == "__main__":
    main()
