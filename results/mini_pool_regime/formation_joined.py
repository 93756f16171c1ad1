"""Every batch's formation curves in one figure: MQAR accuracy, needle recall and copy gain at each run's own
pretraining context against the tokens it had seen, one colour per model, solid for seed 0 and dashed for
seed 1. A windowed model that shared its twin's pretraining has the twin's curves, so it is drawn once,
under both names. Sharing is read from the curves themselves: models whose every checkpoint of every seed
probed alike (copy gain to three decimals included), which different weights do not plausibly do.

    python results/mini_pool_regime/formation_joined.py results/mini_pool_regime/batch*/formation.json \
        --plot results/mini_pool_regime/formation_joined.png
"""
import argparse
import json
import sys
from pathlib import Path

TOKENS_PER_STEP = 1024  # the regime's batch: 8 sequences of 128 tokens, or 16 of 64
MEASURES = (("mqar_pct", "MQAR accuracy %"), ("needle_pct", "needle recall %"), ("copy_gain", "copy gain (nats)"))


def curves_by_model(tables: list[dict]) -> dict[str, dict]:
    """{label: {seed: checkpoints}} over the tables; models whose every seed has identical checkpoints
    (a shared pretraining) fold into one label, "a = b"."""
    models: dict[str, dict] = {}
    for table in tables:
        for run, entry in table.items():
            model, seed = run.split("/")
            if seed in models.setdefault(model, {}):
                raise SystemExit(f"error: {run} is in two tables; pass each batch's formation.json once")
            models[model][seed] = entry["checkpoints"]
    folded: dict[str, dict] = {}
    for model, seeds in models.items():
        twin = next((label for label, theirs in folded.items() if theirs == seeds), None)
        if twin is None:
            folded[model] = seeds
        else:
            folded[f"{twin} = {model}"] = folded.pop(twin)
    return folded


def plot(curves: dict[str, dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 3, figsize=(16, 5))
    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20").colors  # the whole grid folds to 12
    for colour, (label, seeds) in zip(colours, sorted(curves.items())):
        for seed, checkpoints in sorted(seeds.items()):
            tokens = [c["step"] * TOKENS_PER_STEP / 1e6 for c in checkpoints]
            for axis, (key, _) in zip(axes, MEASURES):
                axis.plot(tokens, [c[key] for c in checkpoints], color=colour, linestyle="-" if seed == "s0" else "--",
                          marker=".", label=label if seed == "s0" else None)
    for axis, (_, title) in zip(axes, MEASURES):
        axis.set(title=f"{title} at the run's own context", xlabel="pretraining tokens (M)")
    axes[0].legend(fontsize=7, title="solid: seed 0, dashed: seed 1", title_fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tables", nargs="+", help="formation.json of each batch (formation.py --out)")
    parser.add_argument("--plot", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    curves = curves_by_model([json.loads(Path(p).read_text()) for p in args.tables])
    plot(curves, args.plot)
    print(f"{len(curves)} models' curves (shared pretrainings drawn once) -> {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
