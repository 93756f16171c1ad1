"""The formation curves of probes.json (needle, MQAR and copy gain at L against tokens seen, one line per
seed) as formation.png:  python results/regime_main/vocab4096/plot.py"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
PANELS = (("needle_pct", "needle recall at L (%)"), ("mqar_pct", "MQAR accuracy at L (%)"),
          ("copy_gain", "copy gain at L (nats)"))

runs = json.loads((HERE / "probes.json").read_text())
figure, axes = plt.subplots(1, len(PANELS), figsize=(13, 3.6))
for axis, (field, title) in zip(axes, PANELS):
    for name, rows in runs.items():
        axis.plot([row["tokens_M"] for row in rows], [row[field] for row in rows], marker="o", label=name)
    axis.set(title=title, xlabel="pretraining tokens (M)")
    axis.grid(alpha=0.3)
axes[0].axhline(50, color="grey", linestyle="--", linewidth=1)  # the regime's targets at L
axes[2].axhline(1, color="grey", linestyle="--", linewidth=1)
axes[0].legend()
figure.suptitle("The default model in the 4,096-id vocabulary (retrieval regime, L = 128, 8 x 128 tokens per step)")
figure.tight_layout()
figure.savefig(HERE / "formation.png", dpi=110)
print(f"wrote {HERE / 'formation.png'}")
