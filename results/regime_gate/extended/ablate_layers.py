"""Which layer's attention a model's retrieval at L rests on: the probes at one length with each
layer's attention output zeroed in turn (the block keeps its residual stream and its MLP).

    python results/regime_gate/extended/ablate_layers.py runs/gate_s1/model runs/gate_s2f/model \
        --data data/regime_L128 --length 128

Prints one row per model and ablated layer (none: the intact model), with each layer's window.
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import checkpoint, data, evaluate, probes  # noqa: E402


def zero_output(module, inputs, output):
    return torch.zeros_like(output)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", required=True, help="the mix whose recipe names the synthetic ids and whose val "
                        "split is the haystack")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--count", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ids = evaluate.resolve_probe_ids(args.data, None)  # the mix's synthetic ids, as evaluate.py's probes take them
    eos_id = data.read_manifest(args.data)["tokenizer"]["eos_id"]
    haystack = probes.heldout_haystack(args.data)
    print(f"| model | attention zeroed in | needle % @ {args.length} | MQAR % | copy gain (nats) |")
    print("|---|---|---|---|---|")
    for path in args.checkpoints:
        model = checkpoint.load_model(path)
        windows = model.config.layer_windows
        for layer in [None, *range(len(model.layers))]:
            hook = None if layer is None else model.layers[layer].attention.register_forward_hook(zero_output)
            with torch.no_grad():
                cells = {kind: probes.run_probe(kind, model, ids, args.length, args.count, 0, haystack, eos_id)
                         for kind in ("needle", "mqar", "copy")}
            if hook is not None:
                hook.remove()
            where = "none" if layer is None else f"layer {layer} ({'global' if windows[layer] is None else f'window {windows[layer]}'})"
            print(f"| {path} | {where} | {cells['needle']['recall']:.1f} | {cells['mqar']['accuracy']:.1f} | "
                  f"{cells['copy']['gain']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
