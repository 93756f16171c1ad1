"""Recipe against the `none` control beyond L, beside the seed-to-seed spread, from the main job's
results.json of each seed (experiment.py's eval/). The issue's test: at 4L-8L the two differ by more
than 3x the seed spread, in recall or held-out loss, whichever way it falls.

    python results/regime_main/compare.py results/regime_main/seed0/results.json results/regime_main/seed1/results.json

Spread of a measure: the larger, over the two models, of |seed 0 - seed 1|. Difference: recipe minus
control, averaged over seeds (and each seed's beside it)."""
import json
import sys

MEASURES = {"needle": ("needle recall %", "recall"), "mqar": ("MQAR accuracy %", "accuracy"),
            "copy": ("copy gain (nats)", "gain")}


def values(results: dict, model: str) -> dict:
    out = {}
    for key, cell in results["probes"][model].items():
        kind, length = key.split("/")
        name, field = MEASURES[kind]
        out[(name, int(length))] = cell[field]
    for length, cell in results["longppl"][model].items():
        out[("held-out loss (nats)", int(length))] = cell["loss"]
    return out


def main(paths):
    seeds = [json.load(open(path)) for path in paths]
    recipe = [values(r, "extended") for r in seeds]
    control = [values(r, "none control") for r in seeds]
    print("| measure | length | recipe (per seed) | control (per seed) | recipe - control (per seed) | mean | "
          "seed spread | |mean| / spread |")
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted(recipe[0], key=lambda k: (k[0], k[1])):
        diffs = [r[key] - c[key] for r, c in zip(recipe, control)]
        spread = max(abs(recipe[0][key] - recipe[1][key]), abs(control[0][key] - control[1][key]))
        mean = sum(diffs) / len(diffs)
        ratio = abs(mean) / spread if spread else float("inf")
        fmt = (lambda x: f"{x:.3f}") if "nats" in key[0] else (lambda x: f"{x:.1f}")
        print(f"| {key[0]} | {key[1]} | {' / '.join(fmt(r[key]) for r in recipe)} | "
              f"{' / '.join(fmt(c[key]) for c in control)} | {' / '.join(fmt(d) for d in diffs)} | {fmt(mean)} | "
              f"{fmt(spread)} | {ratio:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
