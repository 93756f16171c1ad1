"""The textbook task's gain in checkpoints of a run: held-out repeat documents (synthetic.repeat_document,
probe keys; a random sequence, then it again) after an EOS, as the copy probe reads copy documents; per
document the mean loss over the first occurrence minus over the second, each occurrence's first token left
out; then the mean over documents. Beside it, evaluate.py's copy probe (shuffled spans in corpus text).

    python repeat_gain.py DATA CKPT [CKPT ...]     # DATA: the mix whose synthetic ids the run trained on
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
import checkpoint, data, evaluate, probes, synthetic

data_dir, folders = Path(sys.argv[1]), sys.argv[2:]
ids = evaluate.resolve_probe_ids(data_dir, None)  # the mix's synthetic ids, as evaluate.py's probes take them
eos = data.read_manifest(data_dir)["tokenizer"]["eos_id"]
rng = np.random.default_rng(12345)
documents = [synthetic.repeat_document(rng, ids, int(rng.integers(32, 128)), probe=True) for _ in range(64)]
for folder in folders:
    model = checkpoint.load_model(folder).eval()
    gains = []
    for tokens, [(first, second, size)] in documents:
        text, shift = probes.with_separator(tokens, eos)
        losses = evaluate.token_losses(model, text)  # losses[i]: the loss of text position i + 1
        gains.append(float(losses[first + shift:first + shift + size - 1].mean()
                           - losses[second + shift:second + shift + size - 1].mean()))
    print(f"{folder}: repeat gain {np.mean(gains):.2f} ± {np.std(gains) / np.sqrt(len(gains)):.2f} nats (n={len(gains)})",
          flush=True)
