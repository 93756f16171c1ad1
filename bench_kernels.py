"""
Benchmark kernels.sliding_window_attention on one CUDA GPU against FlexAttention (sliding-window block
mask, torch.compile'd), flash-attn's window_size when it imports, and PyTorch SDPA doing full causal attention.
Every shape is checked before it is timed: our bf16 outputs and gradients, computed at the timed shape
(the same compiled kernels and autotune key as the timings), against a float64 reference; a variant that fails
is not timed.

    python bench_kernels.py              # B=1, 32 heads, head dim 128, W=4096: T=32K first, then 64K, 16K
    python bench_kernels.py --quick      # T=32K with 8 kv heads only
    python bench_kernels.py --shapes 16384:8 65536:32 --window 1024

The check (FlashAttention's rule, as in tests/test_kernels.py): our bf16 error against float64 is at most twice
the error of plain PyTorch attention in bf16, plus twice the bf16 rounding of the exact answer. The float64
reference is dense attention on two slabs of the sequence, its start and its end, each W + 512 queries with
the keys their windows hold: exact there for the outputs and dq, and for dk, dv of the keys whose every
reader is in the slab (W + 512 keys at the end, 512 at the start). Two kv heads and their query heads.

Time is the median of up to --reps runs measured with CUDA events, after warm-up runs that absorb compiling
and autotuning. TFLOP/s counts only the (query, key) pairs a sliding window keeps:
forward = 4 * B * H * D * sum_i min(i + 1, W), forward + backward = 3.5 x forward. SDPA does the full causal
work, so its TFLOP/s in these units shows what the window saves, not its hardware throughput.
"Nx" is a method's time over the fastest peer's time for that shape and pass (our two variants, pointer loads
and tensor-descriptor (TMA) loads, are not each other's peers).
The run starts no new shape after --budget-s seconds (compiles and autotuning included) and lists what it
skipped and why; its table comes last. Without a CUDA GPU it says so and exits with code 2; exit code 1 if a
check failed.
"""

import argparse
import math
import os
import statistics
import sys
import time

import torch


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 32K with 8 kv heads only")
    parser.add_argument("--shapes", nargs="+", default=["32768:8", "65536:8", "32768:32", "16384:8"],
                        metavar="T:KV_HEADS", help="(sequence length, kv heads) pairs, timed in this order")
    parser.add_argument("--heads", type=int, default=32, help="query heads H")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim D")
    parser.add_argument("--window", type=int, default=4096, help="window W: query i sees keys i - W < j <= i")
    parser.add_argument("--no-tma", action="store_true",
                        help="time ours with pointer loads only (the TMA variant compiles its own configs)")
    parser.add_argument("--reps", type=int, default=20, help="timed runs per measurement (median reported)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="start no new shape after this many seconds (compiles and autotuning included)")
    args = parser.parse_args()
    if args.quick:
        args.shapes = ["32768:8"]
    try:
        args.shapes = [tuple(int(x) for x in shape.split(":")) for shape in args.shapes]
    except ValueError:
        parser.error(f"--shapes {args.shapes} must be T:KV_HEADS pairs, such as 32768:8")
    for T, H_kv in args.shapes:
        if H_kv < 1 or args.heads % H_kv:
            parser.error(f"kv heads {H_kv} must divide --heads {args.heads}")
    return args


def window_flops(B, H, T, D, W):
    """Forward FLOPs of the visible pairs: two matmuls of 2 * D FLOPs each per (query, key) pair."""
    W = min(W, T)
    visible_pairs = T * W - W * (W - 1) // 2  # sum_i min(i + 1, W)
    return 4 * B * H * D * visible_pairs


def time_ms(fn, reps, max_seconds=2.0):
    """Median milliseconds of fn() over up to `reps` runs (at least 5), after warm-up runs that also absorb
    compilation and autotuning."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times, started = [], time.perf_counter()
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if len(times) >= 5 and time.perf_counter() - started > max_seconds:
            break
    return statistics.median(times)


def short_error(error):
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text[:90] + ("..." if len(text) > 90 else "")


# -----------------------------------------------------------------------------
# The contenders. Each maker returns attention(q, k, v) for (B, H, T, D) q and (B, H_kv, T, D) k, v,
# or raises, which the table reports as that method's failure.

def make_ours(W, use_tma=False):
    from kernels import sliding_window_attention
    return lambda q, k, v: sliding_window_attention(q, k, v, window=W, use_tma=use_tma)


def make_flex(W, B, H, T):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def in_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < W)

    block_mask = create_block_mask(in_window, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cuda", _compile=True)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def make_sdpa_causal():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    # Never the math backend: it builds the T x T matrix, hundreds of GiB at T = 64K.
    fast_backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

    def attention(q, k, v):
        with sdpa_kernel(fast_backends):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    return attention


def make_flash_attn(W):
    """flash-attn 3 (Hopper) if installed, else flash-attn 2. Both take (B, T, H, D) tensors."""
    try:
        from flash_attn_interface import flash_attn_func
        name = "flash-attn 3"
    except ImportError:
        from flash_attn import flash_attn_func
        name = "flash-attn 2"

    def attention(q, k, v):  # q, k, v already (B, T, H, D): transposing is no part of what we time
        out = flash_attn_func(q, k, v, causal=True, window_size=(W - 1, 0))
        return out[0] if isinstance(out, tuple) else out  # some flash-attn 3 versions also return the lse
    return name, attention


# -----------------------------------------------------------------------------
# Correctness at the timed shape: our results on the whole sequence, float64 on two slabs of it

def dense_attention(q, k, v, W, query_start, key_start):
    """Attention of queries at positions query_start + i over keys at key_start + j, with an explicit
    sliding-window mask, in the inputs' dtype; q (B, H, Tq, D), k, v (B, H_kv, Tk, D)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    query = query_start + torch.arange(q.shape[2], device=q.device)[:, None]
    key = key_start + torch.arange(k.shape[2], device=q.device)[None, :]
    visible = (key <= query) & (query - key < W)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


def check_at_shape(ours, q, k, v, grad_out, W, margin=512):
    """Check our out, dq, dk, dv at this exact shape on slabs of W + margin queries; returns
    (passed, one line per slab and tensor). Plain PyTorch runs in the inputs' dtype (bf16 here)."""
    T, group, dtype = q.shape[2], q.shape[1] // k.shape[1], q.dtype
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    out = ours(*inputs)
    got = (out.detach(), *torch.autograd.grad(out, inputs, grad_out))
    del out, inputs
    kv_heads = sorted({0, k.shape[1] - 1})  # the first and last kv head, and every query head that reads them
    q_heads = [h for kv in kv_heads for h in range(kv * group, (kv + 1) * group)]
    span = min(T, W + margin)
    passed, lines = True, []
    for query_start in sorted({0, T - span}):
        key_start = max(query_start - W + 1, 0)
        query_end = query_start + span
        # Keys whose every reader (queries key .. key + W - 1, below T) lies in the slab get exact dk, dv.
        last_exact_key = T if query_end == T else query_end - W + 1
        exact_keys = slice(query_start - key_start, max(last_exact_key - key_start, query_start - key_start))
        pick = lambda x, heads, start, end: x[:, heads, start:end]
        slab = [pick(q, q_heads, query_start, query_end), pick(k, kv_heads, key_start, query_end),
                pick(v, kv_heads, key_start, query_end)]
        upstream = pick(grad_out, q_heads, query_start, query_end)

        def outputs_and_grads(dtype):
            xs = [x.to(dtype).requires_grad_() for x in slab]
            o = dense_attention(*xs, W, query_start, key_start)
            return (o.detach(), *torch.autograd.grad(o, xs, upstream.to(dtype)))

        exact, plain = outputs_and_grads(torch.float64), outputs_and_grads(dtype)
        ours_slab = (pick(got[0], q_heads, query_start, query_end), pick(got[1], q_heads, query_start, query_end),
                     pick(got[2], kv_heads, key_start, query_end), pick(got[3], kv_heads, key_start, query_end))
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            rows = exact_keys if name in ("dk", "dv") else slice(None)
            e, p, o = exact[i][:, :, rows], plain[i][:, :, rows], ours_slab[i][:, :, rows]
            if e.numel() == 0:
                continue
            our_error = (o.double() - e).abs().max().item()
            plain_error = (p.double() - e).abs().max().item()
            floor = 2 * (e.to(dtype).double() - e).abs().max().item()
            ok = our_error <= 2 * plain_error + floor and math.isfinite(our_error)
            passed &= ok
            lines.append(f"  queries {query_start}..{query_end - 1} {name}: ours {our_error:.2e}, "
                         f"plain PyTorch {plain_error:.2e}, floor {floor:.2e}: {'ok' if ok else 'FAILED'}")
    return passed, lines


# -----------------------------------------------------------------------------

def require_compiled_cuda():
    """Exit with code 2 unless a CUDA GPU is here and Triton compiles for it (not its slow interpreter)."""
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU; none is available here. (The CPU checks are "
              "TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py and python kernels_report.py)",
              file=sys.stderr)
        sys.exit(2)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the kernels would run in the slow interpreter; unset it.",
              file=sys.stderr)
        sys.exit(2)


def allow_flex_recompiles():
    """Flex recompiles per shape; the default limit (8) would send later shapes to eager, which is T^2 memory."""
    import torch._dynamo as dynamo
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo.config, limit):
            setattr(dynamo.config, limit, 64)


def print_setup(shapes, B, H, D, W, no_tma, budget_s):
    """The device and versions, and how much compiling the run is about to do."""
    import kernels
    import triton
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"B={B} H={H} D={D} W={W}, bf16", flush=True)
    configs = sum(len(kernels._GPU_CONFIGS[name]) for name in ("fwd", "dkdv", "dq"))
    groups = len({H // H_kv for _, H_kv in shapes})
    print(f"plan: {len(shapes)} shapes; on a cold cache ours compiles {configs} configs per variant "
          f"({1 if no_tma else 2}) and per kv group ({groups}); Flex compiles per shape; budget "
          f"{budget_s:.0f} s", flush=True)


def check_ours(ours, q, k, v, grad_out, W, shape):
    """Check each of our variants against float64 at this shape, printing the result; {name: passed}."""
    correct = {}
    for name, attention in ours.items():
        check_began = time.perf_counter()
        try:
            correct[name], lines = check_at_shape(attention, q, k, v, grad_out, W)
        except Exception as error:
            correct[name], lines = False, [f"  check failed to run: {short_error(error)}"]
        print(f"{shape} {name}: check against float64 {'passed' if correct[name] else 'FAILED'} "
              f"({time.perf_counter() - check_began:.0f} s, compiling and autotuning included)", flush=True)
        print("\n".join(lines), flush=True)
        torch.cuda.empty_cache()
    return correct


def contenders_at_shape(ours, q, k, v, grad_out, W):
    """(name, make, inputs, upstream) for every method, and why flash-attn is missing (None if it is not)."""
    B, H, T, _ = q.shape
    contenders = [(name, lambda attention=attention: attention, (q, k, v), grad_out)
                  for name, attention in ours.items()]
    contenders += [("flex_attention", lambda: make_flex(W, B, H, T), (q, k, v), grad_out),
                   ("sdpa full causal", make_sdpa_causal, (q, k, v), grad_out)]
    bthd = [x.transpose(1, 2).contiguous() for x in (q, k, v, grad_out)]  # flash-attn's (B, T, H, D), made untimed
    try:
        name, flash = make_flash_attn(W)
    except Exception as error:
        return contenders, f"flash-attn: not installed ({short_error(error)})"
    contenders.append((name, lambda: flash, tuple(bthd[:3]), bthd[3]))
    return contenders, None


def time_forward_and_backward(attention, inputs, upstream, reps):
    """[forward, forward + backward]: the median milliseconds of each, or why it failed."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    results = []
    for backward in (False, True):
        def step():
            out = attention(*inputs)
            if backward:
                torch.autograd.grad(out, inputs, upstream)
        try:
            results.append(time_ms(step, reps))
        except Exception as error:
            results.append(f"failed: {short_error(error)}")
        torch.cuda.empty_cache()
    return results


def bench_shape(B, H, T, H_kv, D, W, no_tma, reps):
    """Check our variants at one shape, then time every method but a variant of ours that failed its check.
    Returns the table's rows (T, H_kv, method, forward, forward + backward), the skipped lines and whether
    our checks passed."""
    shape = f"T={T} kv={H_kv}"
    gen = torch.Generator(device="cuda").manual_seed(T + H_kv)
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(B, H_kv, T, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    grad_out = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    ours = {"ours (triton)": make_ours(W)}
    if not no_tma:
        ours["ours, TMA loads"] = make_ours(W, use_tma=True)
    correct = check_ours(ours, q, k, v, grad_out, W, shape)

    contenders, flash_missing = contenders_at_shape(ours, q, k, v, grad_out, W)
    skipped = [f"{shape} {flash_missing}"] if flash_missing else []
    rows = []
    for name, make, inputs, upstream in contenders:
        if name in correct and not correct[name]:
            rows.append((T, H_kv, name, "not timed: check failed", "-"))
            continue
        try:
            attention = make()
        except Exception as error:
            rows.append((T, H_kv, name, f"failed: {short_error(error)}", "-"))
            continue
        results = time_forward_and_backward(attention, inputs, upstream, reps)
        rows.append((T, H_kv, name, *results))
        shown = [f"{r:.2f} ms" if isinstance(r, float) else r for r in results]
        print(f"{shape} {name}: forward {shown[0]}, forward + backward {shown[1]}", flush=True)
    return rows, skipped, all(correct.values())


def main():
    args = parse_args()
    require_compiled_cuda()
    allow_flex_recompiles()
    B, H, D, W = 1, args.heads, args.head_dim, args.window
    began = time.perf_counter()
    print_setup(args.shapes, B, H, D, W, args.no_tma, args.budget_s)
    rows, skipped, all_correct = [], [], True  # rows: (T, H_kv, method, fwd_ms | text, fwd_bwd_ms | text)
    for T, H_kv in args.shapes:
        if time.perf_counter() - began > args.budget_s:
            skipped.append(f"T={T} kv={H_kv}: time budget --budget-s {args.budget_s:.0f} spent before it started")
            continue
        shape_rows, shape_skipped, correct = bench_shape(B, H, T, H_kv, D, W, args.no_tma, args.reps)
        rows, skipped, all_correct = rows + shape_rows, skipped + shape_skipped, all_correct and correct
        torch.cuda.empty_cache()  # the shape's tensors are freed once bench_shape returns

    print_table(rows, B, H, D, W)
    for line in skipped:
        print(f"skipped: {line}")
    print(f"checks against float64: {'all passed' if all_correct else 'FAILED'}; "
          f"total {time.perf_counter() - began:.0f} s")
    sys.exit(0 if all_correct else 1)


def is_ours(method):
    return method.startswith("ours")


def print_table(rows, B, H, D, W):
    def cell(value, flops, best_peer):
        if not isinstance(value, float):
            return f"{value}"[:38]
        ratio = f"{value / best_peer:5.2f}x" if best_peer else "    -"
        return f"{value:8.2f} ms {flops / value / 1e9:5.0f} TFLOP/s {ratio}"

    print(f"\nsliding-window attention, bf16, B={B} H={H} D={D} W={W}. TFLOP/s counts window-visible pairs only "
          f"(forward + backward = 3.5 x forward); Nx = time / the fastest peer's time (our two are not peers)")
    print(f"{'T':>6} {'kv':>3} {'method':<18} {'forward':<38} {'forward + backward':<38}")
    for T, H_kv in dict.fromkeys((row[0], row[1]) for row in rows):
        group = [row for row in rows if row[:2] == (T, H_kv)]
        forward_flops = window_flops(B, H, T, D, W)
        for _, _, name, fwd, fwd_bwd in group:
            peers = [row for row in group if row[2] != name and not (is_ours(name) and is_ours(row[2]))]
            best_peer = [min((row[3 + i] for row in peers if isinstance(row[3 + i], float)), default=None)
                         for i in range(2)]
            print(f"{T:>6} {H_kv:>3} {name:<18} {cell(fwd, forward_flops, best_peer[0]):<38} "
                  f"{cell(fwd_bwd, 3.5 * forward_flops, best_peer[1]):<38}")
    print("targets: ours forward >= 400 TFLOP/s at T=32768, W=4096, D=128, and within 1.10x of the best peer")


if __name__ == "__main__":
    main()
