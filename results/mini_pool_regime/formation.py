"""Formation and placement of retrieval in a sweep's runs: the probes at each run's own pretraining
context on every pretraining checkpoint the sweep kept (one evaluate.py call per run), joined into one
table per run, then printed as the step at which each run formed retrieval.

    python results/mini_pool_regime/formation.py sweeps/regime \
        --data data/regime_L128 --out results/mini_pool_regime/batch1/formation.json \
        --placement results/mini_pool_regime/batch1/placement.md --plot results/mini_pool_regime/batch1/formation.png

A run counts as formed at the first checkpoint with MQAR >= 50% and copy gain >= 1 nat at its context (the
issue's copy bar; MQAR's chance is under 1%). --placement: which layer that retrieval rests on, by
results/regime_gate/extended/ablate_layers.py on each run's last pretraining checkpoint.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORMED = {"mqar_pct": 50.0, "copy_gain": 1.0}


def probe_run(pretrain: Path, data: str, length: int, out: Path) -> list[dict]:
    """Every step_* checkpoint of one pretraining folder through evaluate.py's probes at one length."""
    checkpoints = sorted(pretrain.glob("step_*"))
    cached = out / "results.json"
    if not cached.is_file() or set(json.loads(cached.read_text())["probes"]) != {c.name for c in checkpoints}:
        subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, checkpoints), "--labels",
                        ",".join(c.name for c in checkpoints), "--modes", "probes", "--lengths", str(length),
                        "--probe_lengths", str(length), "--probe_count", "32", "--data", data, "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL, env=os.environ | {"OMP_NUM_THREADS": "1"})
    found = json.loads((out / "results.json").read_text())["probes"]
    rows = []
    for name, cells in found.items():
        step = int(name.rsplit("_", 1)[1])
        rows.append({"step": step, "needle_pct": cells[f"needle/{length}"]["recall"],
                     "mqar_pct": cells[f"mqar/{length}"]["accuracy"],
                     "copy_gain": round(cells[f"copy/{length}"]["gain"], 3)})
    return sorted(rows, key=lambda r: r["step"])


def formed_at(rows: list[dict]) -> int | None:
    return next((r["step"] for r in rows if all(r[k] >= v for k, v in FORMED.items())), None)


def plot(table: dict, path: str, tokens_per_step: int = 1024) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for run, entry in table.items():
        tokens = [r["step"] * tokens_per_step / 1e6 for r in entry["checkpoints"]]
        for axis, key in zip(axes, ("needle_pct", "mqar_pct", "copy_gain")):
            axis.plot(tokens, [r[key] for r in entry["checkpoints"]], marker=".", label=f"{run} @ {entry['length']}")
    for axis, title in zip(axes, ("needle recall %", "MQAR accuracy %", "copy gain (nats)")):
        axis.set(title=title, xlabel="pretraining tokens (M)")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="the sweep's --out folder")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="the JSON table to write")
    parser.add_argument("--placement", help="also write the layer ablations of each run's last checkpoint here")
    parser.add_argument("--plot", help="also draw each run's needle, MQAR and copy gain against tokens (PNG)")
    args = parser.parse_args(argv)
    table, last_checkpoints = {}, {}
    for pretrain in sorted(Path(args.sweep).glob("runs/*/s*/pretrain")):
        run = f"{pretrain.parent.parent.name}/{pretrain.parent.name}"
        last_checkpoint = sorted(pretrain.glob("step_*"))[-1]
        length = json.loads((last_checkpoint / "config.json").read_text())["context_length"]
        rows = probe_run(pretrain, args.data, length, pretrain.parent / f"probes_{length}")
        table[run] = {"length": length, "formed_at_step": formed_at(rows), "checkpoints": rows}
        last_checkpoints[run] = last_checkpoint
        last = rows[-1]
        print(f"{run} (probed at {length}): formed at step {table[run]['formed_at_step']}; "
              f"last: needle {last['needle_pct']:.1f}%, MQAR {last['mqar_pct']:.1f}%, "
              f"copy gain {last['copy_gain']:.2f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(table, indent=1))
    if args.plot:
        plot(table, args.plot)
    if args.placement:  # one table per run, at its own context
        found = [subprocess.run([sys.executable, str(ROOT / "results/regime_gate/extended/ablate_layers.py"),
                                 str(last_checkpoints[run]), "--data", args.data, "--length", str(entry["length"])],
                                check=True, capture_output=True, text=True).stdout for run, entry in table.items()]
        Path(args.placement).write_text("\n".join(found))
        print("\n".join(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
