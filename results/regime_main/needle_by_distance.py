"""Needle recall split by how far the needle sits from the question: within the local layers' window
(a windowed layer can reach it) or beyond it (only a global layer can). Reads evaluate.py's results.json,
whose needle cells keep each document's hit and distance.

    python results/regime_main/needle_by_distance.py results/regime_main/formed_s0/results.json --window 128
"""
import argparse
import json


def split(cell: dict, window: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(hits, documents) for needles nearer than `window` tokens, and for the rest."""
    near = [hit for hit, distance in zip(cell["hits"], cell["distances"]) if distance < window]
    far = [hit for hit, distance in zip(cell["hits"], cell["distances"]) if distance >= window]
    return (sum(near), len(near)), (sum(far), len(far))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="evaluate.py results.json files")
    parser.add_argument("--window", type=int, default=128, help="the local layers' window in tokens (default: 128)")
    args = parser.parse_args(argv)
    print(f"| results | model | length | needle within {args.window} | beyond {args.window} |")
    print("|---|---|---|---|---|")
    for path in args.results:
        probes = json.load(open(path))["probes"]
        for model, cells in probes.items():
            for key, cell in cells.items():
                kind, length = key.split("/")
                if kind != "needle":
                    continue
                (near, n_near), (far, n_far) = split(cell, args.window)
                print(f"| {path} | {model} | {length} | {near}/{n_near} | {far}/{n_far} |")


if __name__ == "__main__":
    main()
