"""Benchmark olmpool.py against Hugging Face transformers' Olmo 3 on the same architecture.

    python bench.py            # all three comparisons (about 5-10 minutes on 2 CPU cores)
    python bench.py --quick    # smaller lengths, fewer repeats: a smoke run
    python bench.py --train_gpu    # GPU only: train.py's tokens/s and MFU, ~1B preset, 8K context,
                                   # bf16 and torch.compile (one command, under 10 minutes)
    python bench.py --vocab        # tiny training on the built-in corpus: compact vocabulary vs
                                   # dolma2, tokens/s, bytes of text/s and peak memory (~2 minutes)

It prints, measured side by side in this one run:
1. training-step tokens/s at T = 512, ours / HF (forward, loss, backward, AdamW step);
2. prefill tokens/s and peak memory at T = 2K..16K with window 256: ours (chunked prefill into a
   KV cache whose windowed layers keep W - 1 keys) against HF's forward with its cache, each
   length measured in a fresh process so that peak memory (max RSS) is the run's own;
3. our training FLOP/s (window-aware count) over this machine's measured fp32 matmul rate;
4. greedy decode tokens/s after a 4K and a 16K-token prompt: olmpool.generate (KV cache whose
   windowed layers keep W - 1 keys) against transformers' generate (do_sample=False) on the same
   weights, decode time = generate(1 + N new tokens) - generate(1), so prefill cancels out
   (`python bench.py --decode` runs this section alone; on a GPU it runs there, in bf16).

The model is Olmo 3's architecture (post norm, layerwise QK norm, 3 local : 1 global layers) at a
CPU-friendly width; both sides get identical weights and inputs. Needs transformers (a dev
requirement). Every number comes from this run; nothing is hard-coded.
"""

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time

import torch

import files
import olmpool


def bench_config(window: int) -> olmpool.ModelConfig:
    return olmpool.preset("olmo3_like", size="20m", window=window, vocab_size=32_000, context_length=512)


def hf_model_from(model: olmpool.Transformer):
    """The same weights in transformers' Olmo3ForCausalLM, through hf_export's config and hf_interop's names."""
    from transformers import Olmo3Config, Olmo3ForCausalLM

    import hf_export
    import hf_interop

    hf_json = hf_export.hf_config_json(model.config, "olmo3", torch.float32)
    hf = Olmo3ForCausalLM(Olmo3Config(**hf_json, attn_implementation="sdpa"))
    names = hf_interop.hf_names(model.config, "olmo")
    hf.load_state_dict({names[k]: v for k, v in model.state_dict().items()})
    return hf


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    return timed_pair(fn, None, repeats)[0]


def timed_pair(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of each function, calls alternating so that drift in the machine's speed
    (other processes, clocks) falls on both alike; one warm-up call each."""
    functions = [f for f in (first, second) if f is not None]
    times = [[] for _ in functions]
    for f in functions:
        f()
    for _ in range(repeats):
        for f, record in zip(functions, times):
            start = time.perf_counter()
            f()
            record.append(time.perf_counter() - start)
    return tuple(statistics.median(t) for t in times) + (None,) * (2 - len(functions))


def training_step(forward, params, tokens):
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        logits = forward(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def compare_training(seq_len: int, batch: int, repeats: int) -> dict:
    model = olmpool.Transformer(bench_config(window=256))
    hf = hf_model_from(model)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same function before timing anything
        torch.testing.assert_close(model(tokens[:, :64]), hf(tokens[:, :64]).logits, rtol=1e-4, atol=1e-4)
    ours, theirs = timed_pair(training_step(model, model.parameters(), tokens),
                              training_step(lambda t: hf(t).logits, hf.parameters(), tokens), repeats)
    n = batch * seq_len
    flops = olmpool.flops_per_token(model.config, seq_len) * n / ours
    return dict(ours_tokens_s=n / ours, hf_tokens_s=n / theirs, ratio=theirs / ours, ours_flops=flops)


def prefill_worker(implementation: str, seq_len: int, window: int, queue):
    """Runs in a fresh process: builds one model, prefills a short prompt to warm up, then
    measures one prefill of seq_len tokens: seconds and peak memory above the model's own."""
    torch.manual_seed(0)
    model = olmpool.Transformer(bench_config(window=window))
    tokens = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))
    if implementation == "hf":
        hf = hf_model_from(model).eval()
        del model

        def run():
            with torch.no_grad():
                return hf(tokens, use_cache=True, logits_to_keep=1).logits[:, -1]
    else:
        def run():
            cache = olmpool.KVCache(model.config, 1, seq_len)
            return olmpool.prefill(model, tokens, cache, chunk_size=2048)
    short = tokens
    tokens = tokens[:, :256]
    run()  # warm-up: first-call allocations and kernel selection stay out of the timing
    tokens = short
    with PeakMemory() as memory:
        start = time.perf_counter()
        last_logits = run()
        seconds = time.perf_counter() - start
    queue.put(dict(seconds=seconds, peak_mib=memory.peak_mib, logits=last_logits.tolist()))


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every millisecond by a thread
    (torch releases the GIL inside its kernels, so the sampler keeps running)."""

    def __enter__(self):
        self.baseline, self.peak_mib, self.done = resident_mib(), 0.0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.001):
            self.peak_mib = max(self.peak_mib, resident_mib() - self.baseline)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak_mib = max(self.peak_mib, resident_mib() - self.baseline)


def measure_prefill(implementation: str, seq_len: int, window: int) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=prefill_worker, args=(implementation, seq_len, window, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def matmul_rate(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / timed(lambda: a @ b, repeats)


def time_generate(run, repeats: int) -> float:
    """Median seconds of run() (one warm-up call first), synchronized on a GPU."""
    def synced():
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return timed(synced, repeats)


def compare_decode(lengths: list[int], new_tokens: int, window: int, repeats: int) -> list[dict]:
    """Greedy decode tokens/s after a prompt of each length, ours against transformers' generate."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = olmpool.Transformer(bench_config(window=window))
    hf = hf_model_from(model).eval().to(device, dtype)
    model = model.eval().to(device, dtype)
    rows = []
    for T in lengths:
        prompt = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(2)).to(device)

        def ours(n):
            return olmpool.generate(model, prompt, max_new_tokens=n)

        def theirs(n):
            with torch.no_grad():
                out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0)
            return out[:, T:]

        same = torch.equal(ours(new_tokens).cpu(), theirs(new_tokens).cpu())
        ours_s = time_generate(lambda: ours(1 + new_tokens), repeats) - time_generate(lambda: ours(1), repeats)
        theirs_s = time_generate(lambda: theirs(1 + new_tokens), repeats) - time_generate(lambda: theirs(1), repeats)
        rows.append(dict(T=T, ours_tokens_s=new_tokens / ours_s, hf_tokens_s=new_tokens / theirs_s,
                         speedup=theirs_s / ours_s, same_tokens=same))
        print(f"{T:>6} {new_tokens / ours_s:>11.1f} {new_tokens / theirs_s:>9.1f} {theirs_s / ours_s:>7.2f}x"
              + ("" if same else "  (greedy tokens DIFFER)"), flush=True)
    return rows


def train_gpu(steps: int = 40) -> None:
    """Runs train.py on a ~1B preset at 8K context with compile and bf16; prints median tokens/s
    and MFU over the steps after compilation (train.py's own window-aware accounting)."""
    import subprocess
    import tempfile

    if not torch.cuda.is_available():
        sys.exit("bench.py --train_gpu needs a CUDA GPU; on CPU, `python bench.py` compares with transformers")
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "train.py", "--preset", "H_post_LQK_32kv_8k_11k_SWA", "--size", "1b",
                   "--seq_len", "8192", "--micro_batch", "1", "--batch_tokens", str(8 * 8192), "--steps", str(steps),
                   "--warmup", "5", "--compile", "--eval_every", "0", "--save_every", str(10 * steps),
                   "--keep_checkpoints", "1", "--log_every", "5", "--out", out]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
        records = files.read_json_lines(f"{out}/metrics.jsonl")
    settled = [r for r in records if r["step"] > 10]  # the first steps include compilation
    tokens_s = statistics.median(r["tokens_per_s"] for r in settled)
    mfu = statistics.median(r["mfu"] for r in settled if r["mfu"] is not None) if settled[0]["mfu"] else None
    print(f"\n~1B (H_post_LQK_32kv_8k_11k_SWA, 1b), T=8192, bf16, compile, {torch.cuda.get_device_name()}: "
          f"{tokens_s:,.0f} tokens/s, MFU {mfu:.1%} (goal >= 45% on an H100/H200)" if mfu else
          f"{tokens_s:,.0f} tokens/s (unknown GPU peak: MFU n/a)")


def vocab_worker(folder: str, steps: int, threads: int, profile: bool, queue):
    """Runs in a fresh process (so that its peak memory is its own): train.py's tiny default on one
    data folder, its model vocabulary following the folder's; times `steps` optimizer steps after
    two warm-up steps and counts the UTF-8 bytes of text the trained-on targets stand for."""
    import resource
    from pathlib import Path

    import compact_vocabulary
    import train

    settings = train.parse_args(["--data", folder, "--threads", str(threads), "--steps", "1000", "--eval_every", "0"])
    torch.set_num_threads(threads)
    config = train.model_config(settings)
    env = train.Distributed()
    plan = train.batch_plan(settings, config, 1, "cpu")
    model, _ = train.build_model(config, settings, env)
    optimizer = train.build_optimizer(model, settings)
    loader, _ = train.build_loaders(settings, plan, env, Path(folder))
    byte_lengths = compact_vocabulary.tokenizer_for(folder).byte_lengths

    def step(i: int) -> tuple[int, float]:
        batch = loader.next_batch()
        result = train.train_step(model, optimizer, train.micro_batches(batch, plan, env.device), plan, settings, env,
                                  train.lr_at(i, settings), False)
        return int(byte_lengths[batch.targets.numpy()].sum()), result["loss"]

    for i in range(2):  # warm-up: first-call allocations stay out of the timing
        step(i)
    n_bytes, start = 0, time.perf_counter()
    for i in range(2, 2 + steps):
        n_bytes += step(i)[0]
    seconds = time.perf_counter() - start
    tokens = steps * plan.tokens
    result = dict(vocab=config.vocab_size, tokens_s=tokens / seconds, bytes_s=n_bytes / seconds,
                  bytes_per_token=n_bytes / tokens, gflop_per_token=olmpool.flops_per_token(config, plan.seq_len) / 1e9,
                  peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  parameters_m=sum(p.numel() for p in model.parameters()) / 1e6)
    if profile:  # where the time goes, over a few more steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profiler:
            for i in range(2 + steps, 5 + steps):
                step(i)
        events = [e for e in profiler.key_averages(group_by_input_shape=True) if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        result["profile"] = [(e.key, e.self_cpu_time_total / total) for e in
                             sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]]
        stages = {}
        for e in events:
            stage = vocab_stage(e.key, e.input_shapes, config.vocab_size)
            stages[stage] = stages.get(stage, 0) + e.self_cpu_time_total / total
        result["stages"] = sorted(stages.items(), key=lambda item: -item[1])
    queue.put(result)


def vocab_stage(op: str, input_shapes, vocab_size: int) -> str:
    """Which part of a training step an op belongs to, by its name and the shapes it worked on."""
    if any(vocab_size in shape for shape in input_shapes if isinstance(shape, (list, tuple))):
        return "LM head, embedding and loss (tensors with a vocab-size axis)"
    if "adam" in op.lower() or "zero_grad" in op or "clip" in op.lower() or op in ("aten::_foreach_norm", "aten::linalg_vector_norm"):
        return "optimizer, gradient clipping"
    if "scaled_dot_product" in op:
        return "attention (SDPA)"
    if op in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "other matmuls (QKV, output, MLP)"
    return "other: norms, RoPE, activations, copies"


def corpus_bytes_per_token(folder: str) -> float:
    """UTF-8 bytes of text per token over the whole train split (the timed steps see a sample of it)."""
    from pathlib import Path

    import compact_vocabulary
    import data

    manifest = data.read_manifest(folder)
    byte_lengths, n_bytes, n_tokens = compact_vocabulary.tokenizer_for(folder).byte_lengths, 0, 0
    for record in manifest["splits"]["train"]["shards"]:
        tokens = data.read_shard(Path(folder) / record["file"], vocab_size=manifest["tokenizer"]["vocab_size"]).tokens
        n_bytes, n_tokens = n_bytes + int(byte_lengths[tokens].sum()), n_tokens + tokens.size
    return n_bytes / n_tokens


def compare_vocabularies(vocab_sizes: list[int], steps: int, rounds: int, threads: int) -> dict:
    """Tiny training tokens/s, bytes/s and peak memory: dolma2 against each compact vocabulary, on
    the built-in corpus. Rounds alternate the configurations so that drift in the machine's speed
    falls on all alike; the median round counts."""
    import compact_vocabulary
    import data

    folders = {"dolma2": str(data.prepare_builtin_corpus())}
    for size in vocab_sizes:
        folders[f"compact {size}"] = str(compact_vocabulary.prepare_builtin_corpus(compact_vocab=size))
    context = mp.get_context("spawn")
    runs = {name: [] for name in folders}
    for round_ in range(rounds):
        for name, folder in folders.items():
            queue = context.Queue()
            profile = round_ == rounds - 1 and name == f"compact {vocab_sizes[0]}"
            process = context.Process(target=vocab_worker, args=(folder, steps, threads, profile, queue))
            process.start()
            runs[name].append(queue.get())
            process.join()
    results = {}
    for name, measured in runs.items():
        middle = sorted(measured, key=lambda r: r["bytes_s"])[len(measured) // 2]
        middle["corpus_bytes_per_token"] = corpus_bytes_per_token(folders[name])
        results[name] = middle | {"peak_gib": max(r["peak_gib"] for r in measured),
                                  "profile": next((r["profile"] for r in measured if "profile" in r), None),
                                  "stages": next((r["stages"] for r in measured if "stages" in r), None)}
    return results


def print_vocabularies(results: dict, steps: int, rounds: int, threads: int):
    full = results["dolma2"]
    print(f"tiny (H_post_LQK_32kv_8k_11k_SWA), built-in corpus, 512 tokens/step, {threads} thread(s), median of {rounds} "
          f"rounds of {steps} steps, each run in a fresh process")
    print(f"{'vocabulary':>14} {'model vocab':>11} {'params M':>8} {'GFLOP/tok':>9} {'tokens/s':>9} {'bytes/tok':>9} "
          f"{'bytes/s':>9} {'bytes/s x':>9} {'peak GiB':>8} {'corpus bytes/tok':>16} {'x at corpus mix':>15}")
    for name, r in results.items():
        at_corpus_mix = r["tokens_s"] * r["corpus_bytes_per_token"] / (full["tokens_s"] * full["corpus_bytes_per_token"])
        print(f"{name:>14} {r['vocab']:>11,} {r['parameters_m']:>8.1f} {r['gflop_per_token']:>9.4f} {r['tokens_s']:>9,.0f} "
              f"{r['bytes_per_token']:>9.2f} {r['bytes_s']:>9,.0f} {r['bytes_s'] / full['bytes_s']:>8.2f}x {r['peak_gib']:>8.2f} "
              f"{r['corpus_bytes_per_token']:>16.2f} {at_corpus_mix:>14.2f}x")
    print("   bytes/s: bytes of text the timed steps' targets stand for; x at corpus mix: tokens/s ratio x the train\n"
          "   split's bytes per token, as over a whole epoch. Goal: compact >= 5x dolma2's bytes/s at the tiny size")
    profiled = next(((name, r["profile"]) for name, r in results.items() if r.get("profile")), None)
    if profiled:
        print(f"\nwhere the time goes ({profiled[0]}, self CPU time of 3 profiled steps), by part:")
        for key, share in results[profiled[0]]["stages"]:
            print(f"   {share:6.1%}  {key}")
        print("and by op:")
        for key, share in profiled[1]:
            print(f"   {share:6.1%}  {key}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    description = "\n\n".join(__doc__.split("\n\n")[:2])  # the launch lines; what each section measures stays below
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="lengths up to 4K and fewer repeats (a smoke run)")
    parser.add_argument("--window", type=int, default=256, help="sliding window of the prefill comparison")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--train_gpu", action="store_true", help="GPU: train.py tokens/s and MFU, ~1B at 8K context")
    parser.add_argument("--vocab", action="store_true", help="CPU: tiny training, compact vocabulary vs dolma2 "
                        "(tokens/s, bytes of text/s, peak memory)")
    parser.add_argument("--vocab_sizes", type=int, nargs="+", default=[8192], metavar="N",
                        help="--vocab: compact vocabularies to compare with dolma2 (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="--vocab: timed steps per run (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="--vocab: alternating rounds (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="--vocab: CPU threads (default: %(default)s, "
                        "for a shared machine)")
    parser.add_argument("--decode", action="store_true", help="only section 4: greedy decode tokens/s at 4K and 16K")
    parser.add_argument("--new_tokens", type=int, default=32, help="tokens decoded per measurement (section 4)")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.train_gpu:
        return train_gpu()
    if args.vocab:
        rounds = 2 if args.quick else args.rounds
        results = compare_vocabularies(args.vocab_sizes, args.steps, rounds, args.threads)
        print_vocabularies(results, args.steps, rounds, args.threads)
        write_results(args.json, results)
        return
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("bench.py compares against Hugging Face transformers: pip install -r requirements-dev.txt")
    if args.decode:
        return decode_section(args.quick, args.window, args.new_tokens, args.json, {})

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model: olmo3_like 20m, vocab 32000")
    print(olmpool.describe(bench_config(args.window)), "\n")
    results = {}
    train = training_section(args.quick, results)
    prefill_section(args.quick, args.window, results)
    flops_section(train, results)
    decode_section(args.quick, args.window, args.new_tokens, args.json, results)


def write_results(path: str | None, results: dict) -> None:
    """--json: the results of this run, where asked."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


def training_section(quick: bool, results: dict) -> dict:
    """1. training-step tokens/s, ours against HF."""
    train = compare_training(seq_len=512, batch=4, repeats=2 if quick else 10)
    results["training"] = train
    print(f"1. training step at T=512 (batch 4): ours {train['ours_tokens_s']:.0f} tokens/s, "
          f"HF {train['hf_tokens_s']:.0f} tokens/s, ours/HF = {train['ratio']:.2f}  (goal >= 1.0)\n")
    return train


def prefill_section(quick: bool, window: int, results: dict) -> None:
    """2. prefill tokens/s and peak memory at each length, each cell a fresh process."""
    lengths = [2048, 4096] if quick else [2048, 4096, 8192, 16384]
    rows = []
    print(f"2. prefill, window {window}, batch 1 (each cell a fresh process)")
    print(f"{'T':>6} {'ours tok/s':>11} {'HF tok/s':>9} {'speed x':>8} {'ours MiB':>9} {'HF MiB':>8} {'memory':>7}")
    for T in lengths:
        ours, theirs = measure_prefill("ours", T, window), measure_prefill("hf", T, window)
        agree = torch.allclose(torch.tensor(ours["logits"]), torch.tensor(theirs["logits"]), rtol=1e-3, atol=1e-3)
        row = dict(T=T, ours_tokens_s=T / ours["seconds"], hf_tokens_s=T / theirs["seconds"],
                   speedup=theirs["seconds"] / ours["seconds"], ours_peak_mib=ours["peak_mib"],
                   hf_peak_mib=theirs["peak_mib"], memory_ratio=ours["peak_mib"] / max(theirs["peak_mib"], 1e-9),
                   last_logits_agree=agree)
        rows.append(row)
        print(f"{T:>6} {row['ours_tokens_s']:>11.0f} {row['hf_tokens_s']:>9.0f} {row['speedup']:>7.2f}x "
              f"{row['ours_peak_mib']:>9.0f} {row['hf_peak_mib']:>8.0f} {row['memory_ratio']:>6.2f}x"
              + ("" if agree else "  (last logits DIFFER)"))
    results["prefill"] = rows
    print(f"   goal at 16K: speed >= 3x HF, memory <= 0.5x HF\n")


def flops_section(train: dict, results: dict) -> None:
    """3. our training FLOP/s over this machine's fp32 matmul rate."""
    peak = matmul_rate()
    results["matmul_flops"] = peak
    print(f"3. training FLOP/s (window-aware): {train['ours_flops'] / 1e9:.1f} GFLOP/s; fp32 matmul rate "
          f"{peak / 1e9:.1f} GFLOP/s; ratio {train['ours_flops'] / peak:.2f}")


def decode_section(quick: bool, window: int, new_tokens: int, json_path: str | None, results: dict) -> None:
    """4. greedy decode tokens/s after each prompt length; the last section, so it writes --json."""
    lengths = [4096] if quick else [4096, 16384]
    print(f"\n4. greedy decode after a prompt of T tokens, window {window}, batch 1, {new_tokens} new tokens "
          f"({'cuda, bf16' if torch.cuda.is_available() else 'cpu, fp32'})")
    print(f"{'T':>6} {'ours tok/s':>11} {'HF tok/s':>9} {'speed x':>8}")
    results["decode"] = compare_decode(lengths, new_tokens, window, repeats=1 if quick else 3)
    print("   goal: ours faster than transformers' generate at 4K and 16K (speed x > 1)")
    write_results(json_path, results)


if __name__ == "__main__":
    main()
