"""The mini pool in the retrieval regime runs in batches, one session's compute each (a batch's runs
pretrain, extend and evaluate on a machine that does not keep them). Each batch commits its sweep's
analysis.json; this joins their rows into one analysis.json that `sweep.py --from_rows` analyses:

    python results/mini_pool_regime/merge_rows.py results/mini_pool_regime/batch*/analysis.json \
        --out runs/mini_pool_regime/analysis.json
    python sweep.py --from_rows runs/mini_pool_regime/analysis.json --out runs/mini_pool_regime \
        --results results/mini_pool_regime

The batches must agree on every setting but their own selection (--only, --seeds, --control_models,
the LongPPL evaluator); a run found in two batches is refused. LongPPL is dropped from the joined rows:
each batch's key tokens were picked by a model of that batch, so its values do not compare across them.
"""
import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
import files  # noqa: E402

# The settings that say which runs a batch ran, not how every run was made.
SELECTION = ("out", "only", "seeds", "control_models", "longppl_evaluator")


def merge(reports: list[dict], names: list[str]) -> dict:
    """One analysis.json's worth of rows and settings from several batches' reports."""
    shared = {k: v for k, v in reports[0]["settings"].items() if k not in SELECTION}
    for name, report in zip(names[1:], reports[1:]):
        theirs = {k: v for k, v in report["settings"].items() if k not in SELECTION}
        differ = sorted(k for k in shared.keys() | theirs.keys() if shared.get(k) != theirs.get(k))
        if differ:
            raise SystemExit(f"error: {name} was run with other settings than {names[0]} ({', '.join(differ)}); "
                             f"a joined analysis needs every batch made alike")
    rows, seen = [], {}
    for name, report in zip(names, reports):
        for row in report["rows"]:
            if row["run"] in seen:
                raise SystemExit(f"error: run {row['run']} is in both {seen[row['run']]} and {name}; keep one")
            seen[row["run"]] = name
            rows.append(row | {"longppl": None})
    union = lambda key: sorted({v for r in reports for v in r["settings"][key]})  # noqa: E731
    settings = shared | {"out": "merged", "only": sorted({r["name"] for r in rows}), "seeds": union("seeds"),
                         "control_models": union("control_models"), "longppl_evaluator": None}
    return {"command": ["merge_rows.py", *names], "machine": platform.node(), "settings": settings,
            "primary": reports[0]["primary"], "rows": rows,
            "rows_from": {"file": ", ".join(names), "command": ["sweep.py (one command per batch; see each "
                                                               "batch's COMMAND.md)"],
                          "machine": "; ".join(sorted({str(r.get("machine")) for r in reports}))}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("batches", nargs="+", help="each batch's analysis.json")
    parser.add_argument("--out", required=True, help="the joined analysis.json to write")
    args = parser.parse_args(argv)
    reports = [json.loads(Path(p).read_text()) for p in args.batches]
    joined = merge(reports, args.batches)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    files.write_atomically(Path(args.out), json.dumps(joined, indent=1))
    print(f"{len(joined['rows'])} runs from {len(reports)} batches -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
