"""Does olmpool's tiny model learn induction on the classic repeated-random-tokens task as fast as a minimal
attention model? Sequences: BOS, x1..xm, x1..xm with x uniform over an alphabet and m drawn per step from
[n/4, n] (so no fixed offset solves it); loss on the repeat after its first token.

    python induction_sanity.py minimal 256 64 4000 3e-3     # -> minimal.log
    python induction_sanity.py olmpool 256 64 4000 3e-3     # -> olmpool.log (tiny: 4 layers, d 128, RoPE 10K)
    python induction_sanity.py olmpool 256 64 4000 3e-3 lm  # -> olmpool_lm.log: the loss on every token

Columns: model, step, steps x 16 x 128 (the longest sequence: an upper bound; the mean sequence is 81
tokens, so about 0.63x that many tokens were seen), seconds, the batch's loss on the repeat (trained on, unless lm), chance."""
import sys, time, math, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))  # the repository root
import olmpool
torch.set_num_threads(1); torch.manual_seed(0)
which, V, n, B, steps, lr = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 16, int(sys.argv[4]), float(sys.argv[5])
all_tokens = len(sys.argv) > 6 and sys.argv[6] == "lm"  # the loss on every token, as in pretraining

class Minimal(nn.Module):  # 2 attention-only layers, learned absolute positions, d 128, 8 heads
    def __init__(s, V, T, d=128, h=8):
        super().__init__(); s.h = h
        s.emb, s.pos = nn.Embedding(V, d), nn.Embedding(T, d)
        s.qkv = nn.ModuleList([nn.Linear(d, 3 * d, bias=False) for _ in range(2)])
        s.o = nn.ModuleList([nn.Linear(d, d, bias=False) for _ in range(2)])
        s.ln = nn.ModuleList([nn.LayerNorm(d) for _ in range(3)]); s.head = nn.Linear(d, V, bias=False)
    def forward(s, x):
        T = x.shape[1]; r = s.emb(x) + s.pos(torch.arange(T))
        for i in range(2):
            q, k, v = s.qkv[i](s.ln[i](r)).view(x.shape[0], T, 3, s.h, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape[0], T, -1)
            r = r + s.o[i](a)
        return s.head(s.ln[2](r))

T = 2 * n + 1  # n is the longest half; each step draws its own (so no fixed offset solves it)
if which == "minimal":
    model = Minimal(V + 1, T)
else:
    cfg = olmpool.preset("G_pre_8kv_8k_14k", "tiny", vocab_size=V + 1, n_kv_heads=8, window=None, norm_placement="pre",
                         qk_norm="none", rope_theta=10000.0, attention_backend="sdpa", context_length=256)
    model = olmpool.Transformer(cfg, seed=0)
opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
start = time.time()
for step in range(1, steps + 1):
    for g in opt.param_groups: g["lr"] = lr * min(1, step / 100)
    m = int(torch.randint(n // 4, n + 1, ()))
    x = torch.randint(1, V + 1, (B, m)); x = torch.cat([torch.zeros(B, 1, dtype=torch.long), x, x], 1)
    logits = model(x[:, :-1])
    repeat = F.cross_entropy(logits[:, m + 1:].flatten(0, 1), x[:, m + 2:].flatten())  # the repeat after its 1st token
    loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) if all_tokens else repeat
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 250 == 0:
        print(which, step, step * B * (T - 1), round(time.time() - start), round(repeat.item(), 3), f"(chance {math.log(V):.2f})", flush=True)
