"""Gate on the regime's own data: the built-in corpus (compact 8,192-id vocabulary) mixed with synthetic.py's
retrieval documents (copy spans at random distances, MQAR, a short-template needle), one sequence per step.

A probe on held-out instances (probe keys only, haystack from the corpus's val split) tracks, against tokens
seen: needle recall (both answer tokens the argmax), MQAR accuracy, the copy gain (loss on a span's first
occurrence minus its second, each span's first token left out), and the corpus val loss at L, at L and 4L.

    python results/regime_gate/gate_mix.py --model easy --minutes 50 --out easy_mix.jsonl
"""
import argparse, dataclasses, json, shutil, sys, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import checkpoint, data, olmpool, synthetic  # noqa: E402

KINDS = ("copy", "mqar", "needle")


def corpus(split):
    folder = ROOT / "data" / "builtin_v8192"
    manifest = data.read_manifest(folder)
    record = manifest["splits"][split]["shards"][0]
    return np.asarray(data.read_shard(folder / record["file"], vocab_size=8192).tokens, dtype=np.int64)


def document(rng, kind, ids, length, probe, haystack):
    if kind == "copy":
        tokens, spans = synthetic.copy_document(rng, ids, length, probe=probe, haystack=haystack)
        return tokens, spans
    if kind == "mqar":
        return synthetic.mqar_document(rng, ids, length, pairs=max(4, length // 32), probe=probe)
    return synthetic.needle_document(rng, ids, length, probe=probe, haystack=haystack)


def packed_documents(rng, train, ids, length, shortest):
    """Synthetic documents of lengths log-uniform in [shortest, length], packed into one row of `length`
    tokens, with each token's document index (attention stays inside a document)."""
    tokens, doc_ids, left = [], [], length
    while left > 0:
        size = int(round(np.exp(rng.uniform(np.log(shortest), np.log(length)))))
        size = left if left - size < shortest else min(size, left)
        tokens.append(document(rng, KINDS[int(rng.integers(3))], ids, size, False, train)[0])
        doc_ids.append(np.full(size, len(doc_ids)))
        left -= size
    return np.concatenate(tokens), np.concatenate(doc_ids)


def batch(rng, train, ids, size, length, share, shortest=0):
    """(tokens (size, length), doc_ids or None): each row synthetic with probability share, else corpus text.
    With shortest > 0 a synthetic row packs short documents (doc_ids keep attention inside each)."""
    rows, docs = [], []
    for _ in range(size):
        synthetic_row = rng.random() < share
        if synthetic_row and shortest:
            tokens, doc_ids = packed_documents(rng, train, ids, length, shortest)
        elif synthetic_row:
            tokens, doc_ids = document(rng, KINDS[int(rng.integers(3))], ids, length, False, train)[0], np.zeros(length)
        else:
            start = int(rng.integers(0, train.size - length))
            tokens, doc_ids = train[start:start + length], np.zeros(length)
        rows.append(tokens); docs.append(doc_ids)
    return torch.from_numpy(np.stack(rows)).long(), (torch.from_numpy(np.stack(docs)).long() if shortest else None)


@torch.no_grad()
def probe(model, ids, length, val, n, seed=12345):
    rng = np.random.default_rng(seed + length)
    model.eval()
    row = {}
    for kind in KINDS:
        scores = []
        for _ in range(n):
            tokens, where = document(rng, kind, ids, length, True, val)
            x = torch.from_numpy(tokens)[None]
            logits = model(x)[0]
            if kind == "copy":
                losses = F.cross_entropy(logits[:-1], x[0, 1:], reduction="none")
                # target of position p-1 is token p: a span [s, s+n) has predictable tokens s+1..s+n-1
                first = torch.cat([losses[a:a + m - 1] for a, b, m in where]).mean()
                second = torch.cat([losses[b:b + m - 1] for a, b, m in where]).mean()
                scores.append((first - second).item())
            else:
                hits = [int(logits[p - 1].argmax() == tokens[p]) for p in where]
                scores.append(100.0 * (min(hits) if kind == "needle" else np.mean(hits)))
        row[f"{kind}@{length}"] = round(float(np.mean(scores)), 3)
    windows = [val[i * length:(i + 1) * length + 1] for i in range(min(8, val.size // (length + 1)))]
    x = torch.from_numpy(np.stack(windows))
    row[f"val@{length}"] = round(F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).item(), 3)
    model.train()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["easy", "hard"], required=True)
    p.add_argument("--minutes", type=float, default=50)
    p.add_argument("--batch", type=int, default=1, help="sequences of the model's context per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--theta", type=float, default=10000.0)
    p.add_argument("--share", type=float, default=0.5, help="synthetic share of sequences")
    p.add_argument("--ids_first", type=int, default=258, help="first id of the synthetic block (258: the most "
                   "frequent corpus tokens; 7168: the rarest 1,024)")
    p.add_argument("--ids_size", type=int, default=1024, help="size of the synthetic id block")
    p.add_argument("--probe_every", type=int, default=2000)
    p.add_argument("--probe_n", type=int, default=16)
    p.add_argument("--short_docs", type=int, default=0,
                   help="pack synthetic rows with documents of log-uniform lengths from this many tokens to L, "
                        "attention masked to each (0: one document per row)")
    p.add_argument("--context", type=int, default=None,
                   help="pretraining length L (default: easy 256, hard 128); the batch keeps 256 x --batch tokens")
    p.add_argument("--kv_heads", type=int, default=None, help="key/value heads (default: easy 8, hard 2)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the initial weights and the data order (0: the committed gate runs)")
    p.add_argument("--out", required=True)
    p.add_argument("--export", metavar="DIR", default=None,
                   help="write the run's model (from --out's state file) as a checkpoint folder that extend.py and "
                        "evaluate.py read, with the compact vocabulary beside it, then exit")
    a = p.parse_args()
    torch.set_num_threads(1); torch.manual_seed(a.seed)
    if a.model == "easy":   # no harmful choice: pre norm, no QK norm, 8 kv heads, all global, L 256
        config = olmpool.preset("G_pre_8kv_8k_14k", "tiny", vocab_size=8192, n_kv_heads=8, window=None,
                                norm_placement="pre", qk_norm="none", rope_theta=a.theta, attention_backend="sdpa")
    else:                   # all four: post norm + layerwise QK norm, 2 kv heads, windows of 128, L 128
        config = olmpool.preset("H_post_LQK_32kv_8k_11k_SWA", "tiny", vocab_size=8192, n_kv_heads=2,
                                rope_theta=a.theta, attention_backend="sdpa")
        config = dataclasses.replace(config, context_length=128)
    if a.context:
        config = dataclasses.replace(config, context_length=a.context)
    if a.kv_heads:
        config = dataclasses.replace(config, n_kv_heads=a.kv_heads)
    L = config.context_length
    batch_size = a.batch * 256 // L  # the same tokens per step for both models
    ids = synthetic.SyntheticIds(a.ids_first, a.ids_size)
    train, val = corpus("train"), corpus("val")
    model = olmpool.Transformer(config, seed=a.seed)
    print(olmpool.describe(config), f"\nbatch {batch_size} x {L}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(a.seed)
    step, tokens, spent = 0, 0, 0.0
    state_file = Path(a.out).with_suffix(".state.pt")
    if state_file.is_file():  # continue where the last call stopped (this script's own file)
        state = torch.load(state_file, weights_only=True)
        model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"])
        rng.bit_generator.state = json.loads(state["rng"])
        step, tokens, spent = state["step"], state["tokens"], state["seconds"]
        print(f"resumed at step {step}", flush=True)
    if a.export:
        if not step:
            raise SystemExit(f"--export: no state file {state_file} to export; run the gate first")
        checkpoint.save_model(model, a.export)
        shutil.copy(ROOT / "data" / "builtin_v8192" / "compact_vocab.json", a.export)
        print(f"exported step {step} ({tokens:,} tokens) to {a.export}")
        return
    start, log = time.time() - spent, open(a.out, "a" if step else "w")
    while time.time() - start < a.minutes * 60:
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 100)
        x, doc_ids = batch(rng, train, ids, batch_size, L + 1, a.share, a.short_docs)
        targets = x[:, 1:].clone()
        if doc_ids is not None:  # a document's last token does not predict the next document's first
            targets[doc_ids[:, 1:] != doc_ids[:, :-1]] = -100
            doc_ids = doc_ids[:, :-1]
        loss = F.cross_entropy(model(x[:, :-1], doc_ids=doc_ids).flatten(0, 1), targets.flatten())
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
        step += 1; tokens += batch_size * L
        if step % a.probe_every == 0 or step == 1:
            row = {"step": step, "tokens": tokens, "seconds": round(time.time() - start), "loss": round(loss.item(), 3)}
            for length in (L, 4 * L):
                row.update(probe(model, ids, length, val, a.probe_n))
            print(json.dumps(row), flush=True); log.write(json.dumps(row) + "\n"); log.flush()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": json.dumps(rng.bit_generator.state),
                        "step": step, "tokens": tokens, "seconds": time.time() - start}, state_file)


if __name__ == "__main__":
    main()
