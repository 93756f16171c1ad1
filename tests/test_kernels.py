"""
Tests for kernels.py, the Triton sliding-window flash attention. They read as its specification.

On CPU they run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no
CUDA, before kernels is imported). Shapes stay small: the interpreter spends about 2 ms per program and
0.1 ms per loop iteration.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_kernels.py
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernels
from kernels import sliding_window_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# -----------------------------------------------------------------------------
# References

def reference_attention(q, k, v, window=None):
    """Plain PyTorch attention with an explicit (T, T) mask, computed in the inputs' dtype."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, T, D)
    query = torch.arange(T, device=q.device)[:, None]
    key = torch.arange(T, device=q.device)[None, :]
    W = T if window is None else window
    visible = (key <= query) & (query - key < W)  # the W keys ending at the query itself
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, T)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def outputs_and_grads(attention, q, k, v, grad_out):
    """(out, dq, dk, dv) of attention(q, k, v) for the upstream gradient grad_out."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def random_qkv(B, H, H_kv, T, D, dtype=torch.float32, seed=0):
    """q, k, v and an upstream gradient, drawn in float32 then cast, so every dtype sees the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, H, T, D), (B, H_kv, T, D), (B, H_kv, T, D), (B, H, T, D)]
    return [torch.randn(shape, generator=gen).to(DEVICE, dtype) for shape in shapes]


def assert_within_flash_attention_tolerance(name, kernel, plain, exact):
    """FlashAttention's rule: the kernel's error against the float64 answer is at most twice the error of
    plain PyTorch run in the same dtype, plus a small floor: twice the error of merely storing the exact
    answer in that dtype (as FlashAttention's tests do), plus 4e-6 for the fp32 rounding of dP - delta
    where the exact gradient is 0. With T = 1, dq and dk are exactly 0 and plain PyTorch hits 0 exactly,
    while the kernel's dP (a dot) and delta (a row sum) round differently: measured up to 1.3e-6 at D = 64."""
    kernel_error = (kernel.double() - exact).abs().max().item()
    plain_error = (plain.double() - exact).abs().max().item()
    floor = 2 * (exact.to(kernel.dtype).double() - exact).abs().max().item() + 4e-6
    assert kernel_error <= 2 * plain_error + floor, (
        f"{name}: kernel error {kernel_error:.2e} > 2 x plain PyTorch error {plain_error:.2e} + floor {floor:.2e}")


# -----------------------------------------------------------------------------
# Accuracy against float64

@st.composite
def attention_problems(draw):
    T = draw(st.integers(1, 96))
    H_kv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2]))
    return dict(
        B=draw(st.sampled_from([1, 2])), H=H_kv * group, H_kv=H_kv, T=T,
        D=draw(st.sampled_from([16, 32, 64])),
        window=draw(st.integers(1, T + 8) | st.none()),  # includes W = 1, W = T, W > T and causal
        block_m=draw(st.sampled_from([16, 32])), block_n=draw(st.sampled_from([16, 32])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=30, deadline=None, derandomize=True)
@given(attention_problems())
def test_outputs_and_gradients_match_float64_within_flash_attention_tolerance(problem):
    p = problem
    q, k, v, grad_out = random_qkv(p["B"], p["H"], p["H_kv"], p["T"], p["D"], seed=p["seed"])
    window, dtype = p["window"], p["dtype"]
    exact = outputs_and_grads(lambda *x: reference_attention(*x, window), q.double(), k.double(), v.double(),
                              grad_out.double())
    cast = [x.to(dtype) for x in (q, k, v, grad_out)]
    plain = outputs_and_grads(lambda *x: reference_attention(*x, window), *cast)
    kernel = outputs_and_grads(
        lambda *x: sliding_window_attention(*x, window=window, block_m=p["block_m"], block_n=p["block_n"]), *cast)
    assert kernel[0].dtype == dtype and kernel[0].shape == q.shape
    for name, kernel_value, plain_value, exact_value in zip(("out", "dq", "dk", "dv"), kernel, plain, exact):
        assert_within_flash_attention_tolerance(name, kernel_value, plain_value, exact_value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton interpreter's bf16 is broken; bf16 runs on GPU")
@pytest.mark.parametrize("window", [1, 100, 1000, None])
@pytest.mark.parametrize("H_kv", [2, 8])
def test_bf16_outputs_and_gradients_match_float64_within_flash_attention_tolerance(window, H_kv):
    q, k, v, grad_out = random_qkv(2, 8, H_kv, 1031, 128, seed=window or 0)
    exact = outputs_and_grads(lambda *x: reference_attention(*x, window), q.double(), k.double(), v.double(),
                              grad_out.double())
    cast = [x.to(torch.bfloat16) for x in (q, k, v, grad_out)]
    plain = outputs_and_grads(lambda *x: reference_attention(*x, window), *cast)
    kernel = outputs_and_grads(lambda *x: sliding_window_attention(*x, window=window), *cast)  # autotuned
    for name, kernel_value, plain_value, exact_value in zip(("out", "dq", "dk", "dv"), kernel, plain, exact):
        assert_within_flash_attention_tolerance(name, kernel_value, plain_value, exact_value)


# -----------------------------------------------------------------------------
# Semantics

@pytest.mark.parametrize("window", [1, 2, 5, 16, 17, 40])
def test_each_query_sees_exactly_the_last_window_keys(window):
    # With q = 0 every visible key scores the same, so each query averages the value rows it sees; with
    # v = identity, out[i, j] = 1 / min(i + 1, W) for the visible keys j and 0 for every other key.
    T = 32
    q = torch.zeros(1, 1, T, T, device=DEVICE)
    v = torch.eye(T, device=DEVICE).view(1, 1, T, T)
    out = sliding_window_attention(q, torch.randn_like(q), v, window=window)[0, 0]
    i = torch.arange(T, device=DEVICE)[:, None]
    j = torch.arange(T, device=DEVICE)[None, :]
    expected = torch.where((j <= i) & (j > i - window), 1.0 / torch.clamp(i + 1, max=window), 0.0)
    torch.testing.assert_close(out, expected.float(), rtol=1e-6, atol=1e-7)


def test_window_at_least_seq_len_equals_causal_attention():
    T = 45
    q, k, v, _ = random_qkv(1, 2, 1, T, 32)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1), is_causal=True)
    causal = sliding_window_attention(q, k, v, window=None)
    for window in (T, T + 1, 10 * T):
        torch.testing.assert_close(sliding_window_attention(q, k, v, window=window), causal, rtol=0, atol=0)
    torch.testing.assert_close(causal.double(), expected, rtol=1e-5, atol=1e-6)


def test_window_of_one_returns_v_and_sends_the_gradient_to_v_only():
    q, k, v, grad_out = random_qkv(2, 4, 2, 37, 16)
    out, dq, dk, dv = outputs_and_grads(lambda *x: sliding_window_attention(*x, window=1), q, k, v, grad_out)
    torch.testing.assert_close(out, v.repeat_interleave(2, 1), rtol=0, atol=0)
    # Each query's softmax has one entry, so its output does not move with q or k.
    torch.testing.assert_close(dq, torch.zeros_like(dq), rtol=0, atol=1e-5)
    torch.testing.assert_close(dk, torch.zeros_like(dk), rtol=0, atol=1e-5)
    torch.testing.assert_close(dv, grad_out.view(2, 2, 2, 37, 16).sum(2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", [7, 30, None])
def test_results_do_not_depend_on_block_sizes(window):
    q, k, v, grad_out = random_qkv(1, 2, 1, 83, 32)
    results = {
        (block_m, block_n): outputs_and_grads(
            lambda *x: sliding_window_attention(*x, window=window, block_m=block_m, block_n=block_n),
            q, k, v, grad_out)
        for block_m, block_n in [(16, 16), (16, 32), (32, 16), (64, 32)]
    }
    baseline = results[(16, 16)]
    for blocks, values in results.items():
        for name, value, expected in zip(("out", "dq", "dk", "dv"), values, baseline):
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=f"{name} with blocks {blocks}")


def test_gqa_equals_mha_with_kv_heads_repeated():
    q, k, v, grad_out = random_qkv(1, 6, 2, 50, 16)
    gqa = outputs_and_grads(lambda *x: sliding_window_attention(*x, window=12), q, k, v, grad_out)
    mha = outputs_and_grads(lambda *x: sliding_window_attention(*x, window=12),
                            q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), grad_out)
    torch.testing.assert_close(gqa[0], mha[0], rtol=0, atol=0)  # same arithmetic, only the kv index differs
    torch.testing.assert_close(gqa[1], mha[1], rtol=0, atol=0)
    # A shared kv head's gradient is the sum over the query heads that read it.
    torch.testing.assert_close(gqa[2], mha[2].view(1, 2, 3, 50, 16).sum(2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gqa[3], mha[3].view(1, 2, 3, 50, 16).sum(2), rtol=1e-5, atol=1e-6)


def test_non_contiguous_inputs_give_the_same_result():
    # The model hands over (B, T, H, D) tensors transposed to (B, H, T, D): strided views.
    q, k, v, grad_out = random_qkv(1, 4, 2, 40, 16)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    assert not strided[0].is_contiguous()
    expected = outputs_and_grads(lambda *x: sliding_window_attention(*x, window=9), q, k, v, grad_out)
    actual = outputs_and_grads(lambda *x: sliding_window_attention(*x, window=9), *strided, grad_out)
    for name, value, reference in zip(("out", "dq", "dk", "dv"), actual, expected):
        torch.testing.assert_close(value, reference, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("T, window, H_kv", [(45, 7, 2), (33, None, 1)])
def test_tensor_descriptor_loads_give_the_pointer_loads_results(T, window, H_kv):
    # use_tma changes only how tiles reach the three kernels (rows past T read as zeros either way), so
    # outputs and gradients equal the float64-tested pointer path exactly; strided (model layout) inputs.
    q, k, v, grad_out = random_qkv(1, 2, H_kv, T, 16, dtype=torch.float16)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    pointers = outputs_and_grads(lambda *x: sliding_window_attention(*x, window=window), q, k, v, grad_out)
    descriptors = outputs_and_grads(lambda *x: sliding_window_attention(*x, window=window, use_tma=True),
                                    q, k, v, grad_out)
    for name, value, reference in zip(("out", "dq", "dk", "dv"), descriptors, pointers):
        torch.testing.assert_close(value, reference, rtol=0, atol=0, msg=name)


class AtenCallRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ATen ops called outside the kernels' custom operators (whose insides it does not see)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def test_model_layout_is_read_in_place_and_kept_for_outputs_and_gradients():
    # Olmpool's Attention hands over (B, T, H, D) projections viewed as (B, H, T, D). Copying them to
    # (B, H, T, D) memory costs a pass over q, k, v per layer; the output in (B, T, H, D) memory makes the
    # model's transpose back a free view.
    q, k, v, grad_out = random_qkv(1, 4, 2, 24, 16)
    model_layout = [x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v)]
    with AtenCallRecorder() as recorder:
        out = sliding_window_attention(*model_layout, window=5)
    copies = [call for call in recorder.calls if any(op in call for op in ("clone", "copy", "contiguous"))]
    assert copies == [] and any("olmpool" in call for call in recorder.calls), recorder.calls
    assert out.transpose(1, 2).is_contiguous()
    grads = torch.autograd.grad(out, model_layout, grad_out.transpose(1, 2).contiguous().transpose(1, 2))
    assert [g.stride() for g in grads] == [x.stride() for x in model_layout]  # saved inputs were not copied


def test_torch_compile_traces_forward_and_backward_in_one_graph_with_eager_results():
    # fullgraph=True raises on any graph break. On CPU the interpreter's kernels are opaque custom ops and
    # aot_eager is the backend; on a GPU inductor compiles the graph around the Triton kernels.
    q, k, v, grad_out = random_qkv(1, 4, 2, 40, 16)
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    compiled = torch.compile(lambda *x: sliding_window_attention(*x, window=9), fullgraph=True, backend=backend)
    expected = outputs_and_grads(lambda *x: sliding_window_attention(*x, window=9), q, k, v, grad_out)
    actual = outputs_and_grads(compiled, q, k, v, grad_out)
    for name, value, reference in zip(("out", "dq", "dk", "dv"), actual, expected):
        torch.testing.assert_close(value, reference, rtol=0, atol=0, msg=name)


GPU_TRACE_SCRIPT = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
import kernels
assert not kernels._INTERPRET
with FakeTensorMode():  # fake CUDA tensors need no GPU
    q = torch.empty(1, 4, 64, 16, device="cuda", dtype=torch.bfloat16)
    k = torch.empty(1, 2, 64, 16, device="cuda", dtype=torch.bfloat16)

def forward_and_backward(q, k, v):
    out, lse = kernels._forward_op(q, k, v, 16, None, None, use_tma)
    return kernels._backward_op(out, q, k, v, out, lse, 16, None, None, use_tma)

for use_tma in (False, True):
    graph = make_fx(dispatch_functionalize(forward_and_backward), tracing_mode="fake")(q, k, k)
    print(" ".join(str(node.target) for node in graph.graph.nodes))
"""


def test_gpu_custom_ops_trace_into_their_four_triton_kernels():
    # What torch.compile's AOTAutograd does with the GPU build of the ops (torch.library.triton_op), traced
    # here with fake CUDA tensors in a process without the interpreter: the graph must hold the kernels
    # themselves (forward, delta, dK/dV, dQ), not an opaque call that inductor cannot schedule; with either
    # kind of load in the forward.
    import os
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    result = subprocess.run([sys.executable, "-c", GPU_TRACE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    targets = result.stdout.split()
    assert targets.count("triton_kernel_wrapper_functional") == 2 * 4, result.stdout  # pointer and TMA loads
    assert not any("olmpool" in target for target in targets), result.stdout


# -----------------------------------------------------------------------------
# Nothing past T, nothing from the future

@pytest.mark.parametrize("window", [5, 24, None])
def test_future_tokens_never_leak_into_a_prefix(window):
    long_T, T = 90, 53  # T is no multiple of the block size, so the prefix has a ragged tail
    q, k, v, grad_out = random_qkv(1, 2, 1, long_T, 16)
    grad_out[:, :, T:] = 0  # the loss reads only the prefix's outputs
    long = outputs_and_grads(lambda *x: sliding_window_attention(*x, window=window), q, k, v, grad_out)
    prefix = outputs_and_grads(lambda *x: sliding_window_attention(*x, window=window),
                               *(x[:, :, :T] for x in (q, k, v, grad_out)))
    for name, long_value, prefix_value in zip(("out", "dq", "dk", "dv"), long, prefix):
        torch.testing.assert_close(long_value[:, :, :T], prefix_value, rtol=1e-6, atol=1e-6, msg=name)
    # Keys past the prefix feed no prefix output, so they get no gradient.
    assert long[2][:, :, T:].abs().max() == 0 and long[3][:, :, T:].abs().max() == 0


def poisoned_past_the_end(x, pad=4096):
    """x in a contiguous buffer followed by NaNs: any read past the last row of the last head is NaN."""
    storage = torch.full((x.numel() + pad,), float("nan"), dtype=x.dtype, device=x.device)
    storage[: x.numel()] = x.flatten()
    return storage[: x.numel()].view_as(x)


@pytest.mark.parametrize("T", [1, 21, 47])
def test_nan_past_the_end_of_the_tensors_never_reaches_outputs_or_gradients(T):
    # One head, so every block that hangs over T reaches into the NaNs.
    q, k, v, grad_out = random_qkv(1, 1, 1, T, 16)
    poisoned = [poisoned_past_the_end(x) for x in (q, k, v, grad_out)]
    assert all(x.is_contiguous() for x in poisoned)  # so the kernel reads these buffers, not copies
    clean = outputs_and_grads(lambda *x: sliding_window_attention(*x, window=8), q, k, v, grad_out)
    dirty = outputs_and_grads(lambda *x: sliding_window_attention(*x, window=8), *poisoned)
    for name, dirty_value, clean_value in zip(("out", "dq", "dk", "dv"), dirty, clean):
        assert torch.isfinite(dirty_value).all(), name
        torch.testing.assert_close(dirty_value, clean_value, rtol=0, atol=0, msg=name)


# -----------------------------------------------------------------------------
# Work grows with T * W, not T^2

def causal_block_pairs(T, rows_block, cols_block):
    """Block pairs a causal kernel without a window would visit."""
    return sum(math.ceil(min(m0 + rows_block, T) / cols_block) for m0 in range(0, T, rows_block))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(T=st.integers(1, 5000), window=st.integers(1, 6000), block_m=st.sampled_from([16, 32, 64, 128]),
       block_n=st.sampled_from([16, 32, 64, 128]))
def test_visited_blocks_stay_within_the_window_bound(T, window, block_m, block_n):
    W = min(window, T)
    forward_pairs = kernels.visited_key_blocks(T, window, block_m, block_n)
    assert forward_pairs <= math.ceil(T / block_m) * (math.ceil((W + block_m - 1) / block_n) + 1)
    assert forward_pairs <= causal_block_pairs(T, block_m, block_n)
    dkdv_pairs = kernels.visited_query_blocks(T, window, block_m, block_n)
    assert dkdv_pairs <= math.ceil(T / block_n) * (math.ceil((W + block_n - 1) / block_m) + 1)


def test_small_windows_visit_far_fewer_blocks_than_causal():
    T, W = 8192, 256
    for block_m, block_n in [(64, 64), (128, 64), (32, 128)]:
        causal = causal_block_pairs(T, block_m, block_n)
        assert kernels.visited_key_blocks(T, W, block_m, block_n) < causal / 10
        assert kernels.visited_query_blocks(T, W, block_m, block_n) < causal_block_pairs(T, block_n, block_m) / 10
        assert kernels.visited_key_blocks(T, None, block_m, block_n) == causal  # no window: the causal triangle


@pytest.mark.parametrize("T, window, block_m, block_n", [
    (100, 20, 16, 16), (100, 20, 32, 16), (100, 20, 16, 32), (131, 1, 16, 16), (64, None, 16, 32), (150, 40, 32, 32),
])
def test_kernels_visit_exactly_the_counted_blocks(T, window, block_m, block_n):
    # Each kernel program counts its own loop iterations; they must agree with the bound formulas.
    visits = kernels.kernel_block_visits(T, window, block_m, block_n, device=DEVICE)
    assert visits["fwd"] == visits["dq"] == kernels.visited_key_blocks(T, window, block_m, block_n)
    assert visits["dkdv"] == kernels.visited_query_blocks(T, window, block_m, block_n)


# -----------------------------------------------------------------------------
# Errors that speak to the user

@pytest.mark.parametrize("shapes, kwargs, message", [
    (((1, 4, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16)), {}, "does not divide q's 4 heads; use one of"),
    (((1, 4, 8, 16), (1, 2, 9, 16), (1, 2, 9, 16)), {}, "must agree in batch, seq_len and head_dim"),
    (((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 32)), {}, "k and v must have the same shape"),
    (((4, 8, 16), (4, 8, 16), (4, 8, 16)), {}, r"must be \(batch, heads, seq_len, head_dim\)"),
    (((1, 2, 8, 24), (1, 2, 8, 24), (1, 2, 8, 24)), {}, "head_dim=24 is not supported"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"window": 0}, "window=0 must be None"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"window": 2.5}, "window=2.5 must be None"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"block_m": 24}, "block_m=24 must be a power of two"),
])
def test_invalid_inputs_raise_clear_errors(shapes, kwargs, message):
    q, k, v = (torch.randn(shape, device=DEVICE) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        sliding_window_attention(q, k, v, **kwargs)


def test_tensor_descriptors_refuse_misaligned_inputs():
    q = torch.randn(1, 2, 8, 17, device=DEVICE)[..., 1:]  # head dim 16, but rows 17 floats apart
    with pytest.raises(ValueError, match="use_tma=True needs q 16-byte aligned"):
        sliding_window_attention(q, q, q, use_tma=True)


def test_mixed_dtypes_raise_a_clear_error():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="must share one dtype"):
        sliding_window_attention(q, q.half(), q.half())


# -----------------------------------------------------------------------------
# The benchmark's check at the timed shape can fail

def test_benchmark_check_passes_the_kernel_and_fails_a_window_off_by_one():
    # bench_kernels.check_at_shape compares float64 slabs with results computed on the whole sequence;
    # a kernel with a wrong window must fail it, or the timed shapes are not really checked.
    import bench_kernels
    T, W = 72, 20  # slabs of W + 16 queries: the start (0..35) and the end (36..71)
    q, k, v, grad_out = random_qkv(1, 4, 2, T, 16, dtype=torch.float16)
    passed, lines = bench_kernels.check_at_shape(lambda *x: sliding_window_attention(*x, window=W),
                                                 q, k, v, grad_out, W, margin=16)
    assert passed, "\n".join(lines)
    assert len(lines) == 8  # two slabs, four tensors each
    passed, _ = bench_kernels.check_at_shape(lambda *x: sliding_window_attention(*x, window=W + 1),
                                             q, k, v, grad_out, W, margin=16)
    assert not passed
