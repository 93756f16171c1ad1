"""Which of the needle's two answer tokens a model misses at L: the share of probe documents whose v1,
whose v2 (after the true v1), and whose both are the argmax.

    python results/regime_main/vocab4096/needle_tokens.py CHECKPOINT --data data/builtin_v4096_retrieval_L128
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import checkpoint, data, evaluate, probes  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("checkpoint")
parser.add_argument("--data", required=True, help="the mix whose recipe names the ids; its val split is the haystack")
parser.add_argument("--length", type=int, default=128)
parser.add_argument("--count", type=int, default=64)
args = parser.parse_args()
torch.set_num_threads(1)
model = checkpoint.load_model(args.checkpoint).eval()
ids = evaluate.resolve_probe_ids(args.data, None)  # the mix's synthetic ids, as evaluate.py's probes take them
eos_id = data.read_manifest(args.data)["tokenizer"]["eos_id"]
right = torch.zeros(3)
for tokens, answers, _ in probes.needle_documents(ids, args.length, args.count, 0, probes.heldout_haystack(args.data)):
    text, shift = probes.with_separator(tokens, eos_id)
    positions = [p + shift for p in answers]
    with torch.no_grad():
        predicted, _ = probes.answer_predictions(model, text, positions)
    hit = predicted == text[positions]
    right += torch.tensor([float(hit[0]), float(hit[1]), float(hit.all())])
share = 100 * right / args.count
print(f"{args.checkpoint}: v1 {share[0]:.1f}%, v2 {share[1]:.1f}%, both {share[2]:.1f}% of {args.count} documents at {args.length}")
