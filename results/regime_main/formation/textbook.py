"""What slows the formation of induction in the main job's model? The textbook task (a random sequence
of m tokens, then the same sequence again; m drawn per step from [n/4, n], 16 sequences per step, the loss
on every token) with one factor changed at a time from the sanity check that formed in ~3.6M tokens
(results/regime_gate/sanity/olmpool_lm.log: the easy model, a vocabulary of 257, an alphabet of 256):

    python textbook.py --model easy    --vocab 257  --alphabet 256   # the sanity check again
    python textbook.py --model default --vocab 257  --alphabet 256   # the main job's model (post norm,
                                                                     #   layerwise QK norm, windows of 128)
    python textbook.py --model default --vocab 8192 --alphabet 680   # the regime's vocabulary and key/value ids
    python textbook.py --model default --vocab 257  --alphabet 256 --no_bos   # no token common to every start
    python textbook.py --model default --vocab 257  --alphabet 256 --packed   # packed and masked as the mix is
    python textbook.py --model default --vocab 8192 --alphabet 680 --packed --text data/builtin_v8192  # 10% text

Prints every 250 steps: step, tokens seen (the actual sequence lengths), seconds, the batch's loss on the
repeat after its first token, and ln(alphabet) (no copying)."""
import argparse, math, sys, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
import olmpool
import synthetic

MODELS = {  # the two ends of the gate (results/regime_gate/README.md), as the tiny preset's switches
    "easy": dict(n_kv_heads=8, window=None, norm_placement="pre", qk_norm="none"),
    "default": dict(n_kv_heads=8, window=128, norm_placement="post", qk_norm="layerwise"),
}
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", choices=MODELS, default="default")
parser.add_argument("--vocab", type=int, default=257, help="the model's vocabulary size")
parser.add_argument("--alphabet", type=int, default=256, help="sequence ids drawn uniformly from the vocabulary's last A ids")
parser.add_argument("--longest", type=int, default=64, help="n: the longest sequence before its repeat")
parser.add_argument("--steps", type=int, default=4000)
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--no_bos", action="store_true", help="start each sequence with a random id of the alphabet "
                    "instead of id 0, so that no token is the same at every sequence's start (an attention sink)")
parser.add_argument("--packed", action="store_true", help="as train.py reads the regime's mix: each row of 2n+1 "
                    "tokens packs documents (x x EOS, id 0 the EOS) of lengths log-uniform in [n/2, 2n+1], attention "
                    "kept inside each (--mask_documents), the EOS belonging to the document it ends")
parser.add_argument("--text", type=Path, default=None, help="a prepared corpus (e.g. data/builtin_v8192, whose "
                    "vocabulary --vocab must be) whose train text fills --text_share of the rows, as in the regime's mix")
parser.add_argument("--text_share", type=float, default=0.1)
args = parser.parse_args()
if not 0 < args.alphabet < args.vocab:
    parser.error(f"--alphabet {args.alphabet} must be in (0, --vocab {args.vocab}): id 0 is the sequence start")

torch.set_num_threads(1); torch.manual_seed(args.seed)
config = olmpool.preset("G_pre_8kv_8k_14k", "tiny", vocab_size=args.vocab, rope_theta=10000.0, attention_backend="sdpa",
                        context_length=2 * args.longest + 1, **MODELS[args.model])
model = olmpool.Transformer(config, seed=args.seed)
decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
other = [p for n, p in model.named_parameters() if p.ndim < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                        lr=args.lr, betas=(0.9, 0.95))
start, tokens, batch, low = time.time(), 0, 16, args.vocab - args.alphabet
generator = np.random.default_rng(args.seed)


text = eos = None
if args.text:
    manifest, text, _ = synthetic.read_corpus(args.text)
    eos = manifest["tokenizer"]["eos_id"]
    if manifest["tokenizer"]["vocab_size"] != args.vocab:
        parser.error(f"--text {args.text} has a vocabulary of {manifest['tokenizer']['vocab_size']}; give it as --vocab")


def with_text(x, doc_ids, is_repeat):
    """Each row, with probability --text_share, replaced by a window of the corpus's train text (its documents
    masked apart at its EOS ids when doc_ids are used)."""
    for row in np.flatnonzero(generator.random(batch) < args.text_share):
        start = int(generator.integers(0, text.size - x.shape[1]))
        window = torch.from_numpy(text[start:start + x.shape[1]].astype(np.int64))
        x[row], is_repeat[row] = window, False
        if doc_ids is not None:
            doc_ids[row, 1:] = torch.cumsum(window[:-1] == eos, 0)
            doc_ids[row, 0] = 0
    return x, doc_ids, is_repeat


def packed_rows(length: int):
    """(tokens, doc_ids, repeat) of `batch` rows of `length`: repeat marks the tokens of a second occurrence
    after its first, the ones predictable only by copying."""
    rows, docs, repeats = [], [], []
    for _ in range(batch):
        row, doc, repeat, left, documents = [], [], [], length, 0
        while left > 0:
            size = int(round(np.exp(generator.uniform(np.log(args.longest // 2), np.log(length)))))
            size = left if left - size < args.longest // 2 else min(size, left)
            half, odd = (size - 1) // 2, (size - 1) % 2
            x = generator.integers(low, args.vocab, size=half)
            row += [*generator.integers(low, args.vocab, size=odd), *x, *x, 0]
            repeat += [False] * (odd + half + 1) + [True] * (half - 1) + [False]
            doc += [documents] * size
            documents += 1
            left -= size
        rows.append(row); docs.append(doc); repeats.append(repeat)
    return torch.tensor(rows), torch.tensor(docs), torch.tensor(repeats)


for step in range(1, args.steps + 1):
    for group in opt.param_groups:
        group["lr"] = args.lr * min(1, step / 100)
    if args.packed:
        x, doc_ids, is_repeat = packed_rows(2 * args.longest + 1)
        if text is not None:
            x, doc_ids, is_repeat = with_text(x, doc_ids, is_repeat)
        logits = model(x[:, :-1], doc_ids=doc_ids[:, :-1])
        tokens += x.numel() - batch
    else:
        m = int(torch.randint(args.longest // 4, args.longest + 1, ()))
        x = torch.randint(low, args.vocab, (batch, m))
        first = torch.randint(low, args.vocab, (batch, 1)) if args.no_bos else torch.zeros(batch, 1, dtype=torch.long)
        x = torch.cat([first, x, x], 1)
        is_repeat = torch.zeros_like(x, dtype=torch.bool); is_repeat[:, m + 2:] = True
        if text is not None:
            x, _, is_repeat = with_text(x, None, is_repeat)
        logits = model(x[:, :-1])
        tokens += batch * 2 * m
    loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 250 == 0:
        repeat = F.cross_entropy(logits[is_repeat[:, 1:]], x[:, 1:][is_repeat[:, 1:]]).item()
        print(args.model, step, tokens, round(time.time() - start), round(repeat, 3),
              f"(no copying: {math.log(args.alphabet):.2f})", flush=True)
