"""
Benchmark kernels.sliding_window_attention on one CUDA GPU against FlexAttention (sliding-window block
mask, torch.compile'd), PyTorch SDPA doing full causal attention, and flash-attn's window_size when it
imports. First checks our bf16 outputs and gradients against SDPA with an explicit sliding-window mask.

    python bench_kernels.py              # B=1, 32 heads, kv heads 8 and 32, head dim 128, W=4096, T=8K..64K
    python bench_kernels.py --quick      # T=8K and 16K, kv heads 8 only
    python bench_kernels.py --seq-lens 16384 --kv-heads 8 --window 1024

Time is the median of many runs measured with CUDA events. TFLOP/s counts only the (query, key) pairs a
sliding window keeps: forward = 4 * B * H * D * sum_i min(i + 1, W), backward = 2.5 x forward. SDPA does
the full causal work, so its TFLOP/s in these units shows how much the window saves, not its hardware
throughput. "x fastest" is time over the fastest method's time for that shape and pass. The table comes last.
The run stops starting new shapes after --budget-s seconds so it ends within 10 minutes on one H200.
Without a CUDA GPU it says so and exits with code 2.
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
    parser.add_argument("--quick", action="store_true", help="T = 8K and 16K with 8 kv heads only")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536],
                        help="sequence lengths T to time")
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[8, 32], help="kv head counts (GQA) to time")
    parser.add_argument("--heads", type=int, default=32, help="query heads H")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim D")
    parser.add_argument("--window", type=int, default=4096, help="window W: query i sees keys i - W < j <= i")
    parser.add_argument("--reps", type=int, default=30, help="timed runs per measurement (median reported)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="start no new shape after this many seconds (compiles and autotuning included)")
    args = parser.parse_args()
    if args.quick:
        args.seq_lens, args.kv_heads, args.reps = [8192, 16384], [8], 15
    return args


def window_flops(B, H, T, D, W):
    """Forward FLOPs of the visible pairs: two matmuls of 2 * D FLOPs each per (query, key) pair."""
    W = min(W, T)
    visible_pairs = T * W - W * (W - 1) // 2  # sum_i min(i + 1, W)
    return 4 * B * H * D * visible_pairs


def time_ms(fn, reps, max_seconds=4.0):
    """Median milliseconds of fn() over up to `reps` runs (at least 5), after two warm-up runs that
    also absorb compilation and autotuning."""
    for _ in range(2):
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

def make_ours(W):
    from kernels import sliding_window_attention
    return lambda q, k, v: sliding_window_attention(q, k, v, window=W)


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
# Correctness: our bf16 results against SDPA with an explicit sliding-window mask

def check_correctness(W, H, H_kv, D):
    """FlashAttention's tolerance rule with SDPA as the oracle: our bf16 error against fp32 SDPA is at most
    twice bf16 SDPA's error plus the bf16 rounding of the answer. True if all pass."""
    from kernels import sliding_window_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel
    T = min(W + W // 2 + 3, 8195)  # full windows, the ramp-up before them, a ragged tail; SDPA's mask is T x T
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, grad_out = (torch.randn(1, H, T, D, device="cuda", generator=gen) for _ in range(2))
    k, v = (torch.randn(1, H_kv, T, D, device="cuda", generator=gen) for _ in range(2))
    i = torch.arange(T, device="cuda")[:, None]
    j = torch.arange(T, device="cuda")[None, :]
    visible = (j <= i) & (i - j < W)

    def sdpa(q, k, v):
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=visible, enable_gqa=H_kv != H)

    def outputs_and_grads(attention, dtype):
        inputs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = attention(*inputs)
        return (out, *torch.autograd.grad(out, inputs, grad_out.to(dtype)))

    exact = outputs_and_grads(sdpa, torch.float32)
    plain = outputs_and_grads(sdpa, torch.bfloat16)
    ours = outputs_and_grads(lambda q, k, v: sliding_window_attention(q, k, v, window=W), torch.bfloat16)
    passed = True
    for name, o, p, e in zip(("out", "dq", "dk", "dv"), ours, plain, exact):
        our_error = (o.float() - e).abs().max().item()
        sdpa_error = (p.float() - e).abs().max().item()
        floor = 2 * (e.to(torch.bfloat16).float() - e).abs().max().item()
        ok = our_error <= 2 * sdpa_error + floor
        passed &= ok
        print(f"  {name}: ours {our_error:.2e}, bf16 SDPA {sdpa_error:.2e}, floor {floor:.2e}: "
              f"{'ok' if ok else 'FAILED'}")
    return passed


# -----------------------------------------------------------------------------

def main():
    args = parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU; none is available here. "
              "(The CPU tests are: TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py)", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the kernels would run in the slow interpreter; unset it.",
              file=sys.stderr)
        sys.exit(2)
    import torch._dynamo as dynamo

    # Flex recompiles per shape; the default limit (8) would send later shapes to eager, which is T^2 memory.
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo.config, limit):
            setattr(dynamo.config, limit, 64)

    B, H, D, W = 1, args.heads, args.head_dim, args.window
    began = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B={B} H={H} D={D} W={W}, bf16")

    correct = True
    for H_kv in args.kv_heads:
        print(f"correctness against SDPA with a sliding-window mask, kv heads {H_kv}:")
        try:
            correct &= check_correctness(W, H, H_kv, D)
        except Exception as error:  # report and go on to the timings
            print(f"  check failed to run: {short_error(error)}")
            correct = False

    rows = []  # (T, H_kv, method, fwd_ms | error, fwd_bwd_ms | error)
    for T in args.seq_lens:
        for H_kv in args.kv_heads:
            if time.perf_counter() - began > args.budget_s:
                rows.append((T, H_kv, "(all)", "skipped: time budget", "skipped: time budget"))
                continue
            q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(B, H_kv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2))
            grad_out = torch.randn_like(q)
            q_bthd, k_bthd, v_bthd = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))

            contenders = [("ours (triton)", lambda: make_ours(W), (q, k, v), grad_out),
                          ("flex_attention", lambda: make_flex(W, B, H, T), (q, k, v), grad_out),
                          ("sdpa full causal", make_sdpa_causal, (q, k, v), grad_out)]
            flash_missing = None
            try:
                name, flash = make_flash_attn(W)
                contenders.append((name, lambda: flash, (q_bthd, k_bthd, v_bthd),
                                   grad_out.transpose(1, 2).contiguous()))
            except Exception as error:
                flash_missing = (T, H_kv, "flash-attn", f"not available: {short_error(error)}", "-")

            for name, make, inputs, upstream in contenders:
                results = []
                try:
                    attention = make()
                except Exception as error:
                    rows.append((T, H_kv, name, f"failed: {short_error(error)}", "-"))
                    continue
                for backward in (False, True):
                    def step():
                        out = attention(*inputs)
                        if backward:
                            torch.autograd.grad(out, inputs, upstream)
                    try:
                        results.append(time_ms(step, args.reps))
                    except Exception as error:
                        results.append(f"failed: {short_error(error)}")
                    torch.cuda.empty_cache()
                rows.append((T, H_kv, name, *results))
                shown = [f"{r:.2f} ms" if isinstance(r, float) else r for r in results]
                print(f"T={T} kv={H_kv} {name}: forward {shown[0]}, forward + backward {shown[1]}", flush=True)
            if flash_missing:
                rows.append(flash_missing)
            del q, k, v, q_bthd, k_bthd, v_bthd, grad_out
            torch.cuda.empty_cache()

    print_table(rows, B, H, D, W)
    print(f"correctness check: {'passed' if correct else 'FAILED'}; total {time.perf_counter() - began:.0f} s")
    sys.exit(0 if correct else 1)


def print_table(rows, B, H, D, W):
    def cell(value, flops, fastest):
        if not isinstance(value, float):
            return f"{value}"
        return f"{value:9.2f} ms {flops / value / 1e9:6.0f} TFLOP/s {value / fastest:5.2f}x"

    print(f"\nsliding-window attention, bf16, B={B} H={H} D={D} W={W}; TFLOP/s counts window-visible pairs "
          f"only (backward = 2.5 x forward); Nx = time / fastest")
    print(f"{'T':>6} {'kv':>3} {'method':<18} {'forward':<40} {'forward + backward':<40}")
    for T, H_kv in dict.fromkeys((row[0], row[1]) for row in rows):
        group = [row for row in rows if row[:2] == (T, H_kv)]
        forward_flops = window_flops(B, H, T, D, W)
        fastest = [min((row[3 + i] for row in group if isinstance(row[3 + i], float)), default=None)
                   for i in range(2)]
        for _, _, name, fwd, fwd_bwd in group:
            print(f"{T:>6} {H_kv:>3} {name:<18} {cell(fwd, forward_flops, fastest[0]):<40} "
                  f"{cell(fwd_bwd, 3.5 * forward_flops, fastest[1]):<40}")


if __name__ == "__main__":
    main()
