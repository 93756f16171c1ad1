"""Gate pilot for a CPU regime that retrieves: does retrieval form at tiny size on dense synthetic recall data, and when?

Two models, the one with no harmful choice and the one with all four, trained on sequences made of
associative-recall pairs (key value ... key value, second occurrence predictable by content) and
repeated random spans at random distances. A probe on held-out instances tracks, against tokens seen,
the recall accuracy (argmax of the value after a repeated key) and the copy gain (loss of a span's first
occurrence minus its second), at the training length and beyond.
"""
import argparse, json, math, sys, time
import numpy as np
import torch
import torch.nn.functional as F
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
import olmpool

V = 4096
KEYS, VALUES, NOISE = (16, 1024), (1024, 2048), (2048, 4096)


def set_alphabet(size):
    """Draw every synthetic id from [16, 16 + size): keys the first quarter, values the second, noise the rest."""
    global KEYS, VALUES, NOISE
    q = size // 4
    KEYS, VALUES, NOISE = (16, 16 + q), (16 + q, 16 + 2 * q), (16 + 2 * q, 16 + size)


def recall_sequence(rng, length, pairs):
    tokens = rng.integers(*NOISE, size=length)
    pairs = min(pairs, KEYS[1] - KEYS[0])  # distinct keys
    slots = np.sort(rng.choice(length // 2 - 1, size=2 * pairs, replace=False)) * 2 + 1
    keys = rng.choice(np.arange(*KEYS), size=pairs, replace=False)
    values = rng.integers(*VALUES, size=pairs)
    order = rng.permutation(np.repeat(np.arange(pairs), 2))
    seen, targets = set(), []
    for slot, i in zip(slots, order):
        tokens[slot], tokens[slot + 1] = keys[i], values[i]
        if i in seen:
            targets.append(slot + 1)  # the value after a repeated key: predictable from context only
        seen.add(i)
    tokens[0] = 0
    return tokens, targets


def copy_sequence(rng, length):
    tokens = rng.integers(*NOISE, size=length)
    span = int(rng.integers(8, 49))
    gap = int(rng.integers(0, length - 2 * span - 1))
    start = int(rng.integers(1, length - 2 * span - gap))
    segment = rng.integers(KEYS[0], VALUES[1], size=span)
    tokens[start:start + span] = segment
    second = start + span + gap
    tokens[second:second + span] = segment
    tokens[0] = 0
    return tokens, (start, second, span)


def dense_copy_sequence(rng, length):
    """Half the window is a few random segments, the other half the same segments in a shuffled order:
    every token of a repeated segment but its first is predictable by content, at random distances."""
    tokens = rng.integers(*NOISE, size=length)
    half = (length - 1) // 2
    count = int(rng.integers(2, 7))
    cuts = np.sort(rng.choice(np.arange(4, half - 3), size=count - 1, replace=False))
    bounds = list(zip([0, *cuts], [*cuts, half]))
    segments = [rng.integers(KEYS[0], NOISE[1], size=b - a) for a, b in bounds]
    tokens[1:1 + half] = np.concatenate(segments)
    tokens[1 + half:1 + 2 * half] = np.concatenate([segments[i] for i in rng.permutation(count)])
    tokens[0] = 0
    return tokens


def batch(rng, batch_size, length, data="sparse"):
    rows = []
    for b in range(batch_size):
        if data == "dense":
            rows.append(dense_copy_sequence(rng, length))
        elif b % 2 == 0:
            rows.append(recall_sequence(rng, length, int(rng.integers(4, max(5, length // 16))))[0])
        else:
            rows.append(copy_sequence(rng, length)[0])
    return torch.from_numpy(np.stack(rows)).long()


@torch.no_grad()
def probe(model, length, n=32, seed=12345):
    rng = np.random.default_rng(seed + length)
    model.eval()
    hits = total = 0
    gains = []
    for _ in range(n):
        tokens, targets = recall_sequence(rng, length, max(4, length // 16))
        logits = model(torch.from_numpy(tokens)[None].long())[0]
        predicted = logits.argmax(-1)
        for t in targets:
            hits += int(predicted[t - 1] == tokens[t]); total += 1
        tokens, (first, second, span) = copy_sequence(rng, length)
        x = torch.from_numpy(tokens)[None].long()
        losses = F.cross_entropy(model(x)[0, :-1], x[0, 1:], reduction="none")
        a = losses[first:first + span - 1].mean().item()   # predicting tokens first+1.. of the first copy
        b = losses[second:second + span - 1].mean().item()
        gains.append(a - b)
    model.train()
    return 100 * hits / max(total, 1), float(np.mean(gains))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["easy", "hard"], required=True)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--probe_every", type=int, default=250)
    p.add_argument("--theta", type=float, default=10000.0)
    p.add_argument("--data", choices=["sparse", "dense"], default="sparse",
                   help="sparse: recall pairs and one copied span among noise; dense: half of each window repeats")
    p.add_argument("--alphabet", type=int, default=4080, help="how many ids the synthetic tokens use")
    p.add_argument("--train_length", type=int, default=None,
                   help="train on windows this long (default: the model's context)")
    p.add_argument("--probe_lengths", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512, 1024, 2048])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1); torch.manual_seed(0)
    set_alphabet(a.alphabet)
    if a.model == "easy":
        config = olmpool.preset("G_pre_8kv_8k_14k", "tiny", vocab_size=V, n_kv_heads=8, window=None,
                                norm_placement="pre", qk_norm="none", rope_theta=a.theta, attention_backend="sdpa")
    else:
        config = olmpool.preset("H_post_LQK_32kv_8k_11k_SWA", "tiny", vocab_size=V, n_kv_heads=2,
                                rope_theta=a.theta, attention_backend="sdpa")
    import dataclasses
    if a.model == "hard":
        config = dataclasses.replace(config, context_length=128)
    L = a.train_length or config.context_length
    model = olmpool.Transformer(config, seed=0)
    print(olmpool.describe(config), flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    start, step, tokens = time.time(), 0, 0
    log = open(a.out, "w")
    while time.time() - start < a.minutes * 60:
        lr = a.lr * min(1.0, (step + 1) / 100)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch(rng, a.batch, L + 1, a.data)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
        step += 1; tokens += a.batch * L
        if step % a.probe_every == 0 or step == 1:
            row = {"step": step, "tokens": tokens, "seconds": round(time.time() - start), "loss": loss.item()}
            for length in a.probe_lengths:
                r, g = probe(model, length, n=16 if length < 2048 else 8)
                row[f"recall@{length}"], row[f"copy_gain@{length}"] = round(r, 1), round(g, 3)
            print(json.dumps(row), flush=True); log.write(json.dumps(row) + "\n"); log.flush()


if __name__ == "__main__":
    main()
