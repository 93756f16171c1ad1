"""Gather the probes of runs' checkpoints (evaluate.py --modes probes ... --out RUN/probes_step_N) into one
table per run: python collect.py RUN [RUN ...] > probes.json; tokens = step x 1,024 (8 x 128 per step)."""
import json, sys
from pathlib import Path

table = {}
for run in map(Path, sys.argv[1:]):
    rows = []
    for folder in sorted(run.glob("probes_step_*")):
        [cells] = json.loads((folder / "results.json").read_text())["probes"].values()
        step = int(folder.name.rsplit("_", 1)[1])
        rows.append({"step": step, "tokens_M": round(step * 1024 / 1e6, 2),
                     "needle_pct": cells["needle/128"]["recall"], "mqar_pct": cells["mqar/128"]["accuracy"],
                     "copy_gain": round(cells["copy/128"]["gain"], 3)})
    table[run.name] = rows
print(json.dumps(table, indent=1))
