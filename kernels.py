"""
Sliding-window causal flash attention in Triton: forward, backward and GQA in one file.

    from kernels import sliding_window_attention
    out = sliding_window_attention(q, k, v, window=4096)   # q (B, H, T, D); k, v (B, H_kv, T, D)

Semantics. Query i attends to the keys j with i - W < j <= i: W keys, itself included (FlashAttention's
`causal=True, window_size=(W - 1, 0)`). window=None, or W >= T, is plain causal attention; W = 1 returns v.
The softmax scale is 1/sqrt(D). H must be a multiple of H_kv: query head h reads kv head h // (H // H_kv),
by indexing, never by copying K and V. The output has q's dtype; every sum runs in fp32.

Layout. Each (batch, head) is a (T, D) matrix with dense rows, read where it lies: the model's (B, T, H, D)
projections viewed as (B, H, T, D) are not copied, and outputs and gradients keep their inputs' layout. Row
strides are compile-time constants (one compile per layout); only a head dim that is not dense forces a copy.
One program owns a block of BLOCK_M query rows (forward, dQ) or BLOCK_N key rows (dK/dV) of one head.

Softmax as in Triton's fused-attention tutorial: the running max is taken on raw scores, so scaling a score
and subtracting the max is one FMA before exp2. With use_tma=True the kernels load their tiles through tensor
descriptors (Hopper's bulk tensor copy engine) instead of pointers.

torch.compile: the forward and the backward are custom operators (`torch.library.triton_op` on a GPU, whose
kernels torch.compile sees and schedules), with autograd registered on them, so a compiled model keeps one
graph through attention.

What is skipped. The query block [m0, m0 + BLOCK_M) visits only the key blocks from
max(m0 - W + 1, 0) rounded down to BLOCK_N up to min(m0 + BLOCK_M, T): at most
ceil((W + BLOCK_M - 1) / BLOCK_N) + 1 blocks, so the work is O(T * W), not O(T^2). Blocks outside that
range are never loaded. Of the visited blocks only the edge ones (window edge, diagonal, ragged tail past T)
are masked; interior blocks, where every pair is visible, skip the mask. `_key_blocks` and `_query_blocks`
hold these bounds; `visited_key_blocks` and `visited_query_blocks` evaluate the very same functions in
Python, and `kernel_block_visits` counts what the kernels really visit, so the tests can pin the bound.

Backward, deterministic and without atomics (the FlexAttention layout): a preprocess computes
delta = rowsum(O * dO); one dK/dV program per (key block, kv head) loops over the query heads of its group;
one dQ program per (query block, query head). That is 7 block matmuls against FlashAttention 2's 5.

FLOPs, counting visible pairs only (what the benchmark reports):
    forward = 4 * B * H * D * sum_i min(i + 1, W) = 4 * B * H * D * (T * W - W * (W - 1) / 2) for T >= W
    backward = 2.5 * forward

Runs on CUDA GPUs (autotuned block sizes) and on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1 set before this module is imported; fixed 16 x 16 blocks; fp32 and fp16 only, since
the interpreter's bf16 is broken). Head dim must be a power of two from 16 to 256 on both: tl.arange needs
a power of two and 16-bit tl.dot on the GPU needs at least 16. Written for triton 3.7 (the CUDA torch wheel's
pin) and 3.9 (tested here): pointer arithmetic or tensor descriptors, no block pointers (removed in 3.9).
`python kernels_report.py` compiles every GPU config offline for sm_90a and reports registers, spills and
shared memory.
"""

import functools
import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["sliding_window_attention", "visited_key_blocks", "visited_query_blocks", "kernel_block_visits"]

# @triton.jit reads TRITON_INTERPRET when it decorates, so reading it once here agrees with the kernels.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRETER_BLOCK = 16  # the interpreter costs ~0.1 ms per loop iteration: small blocks keep tests quick
_LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) = exp2(x * log2(e)), and exp2 is cheaper


# -----------------------------------------------------------------------------
# Block-skipping bounds, shared by the kernels and by the Python visit counters below

@triton.jit
def _key_blocks(m0, T, W, BLOCK_M, BLOCK_N):
    """Key blocks the query block [m0, m0 + BLOCK_M) visits: starts in [lo, hi), step BLOCK_N.
    Blocks starting in [mid_lo, mid_hi) are interior: every (query, key) pair there is visible."""
    lo = max(m0 - W + 1, 0) // BLOCK_N * BLOCK_N  # the oldest query's first key, rounded down to a block
    hi = min(m0 + BLOCK_M, T)  # one past the newest query's last key (causal)
    mid_lo = (max(m0 + BLOCK_M - W, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N  # newest query sees the first key
    mid_hi = min(m0 + 1, T) // BLOCK_N * BLOCK_N  # oldest query sees the last key, and the block ends by T
    mid_lo = min(mid_lo, hi)  # mid_lo >= lo and mid_hi <= hi always; these two keep lo <= mid_lo <= mid_hi <= hi
    mid_hi = max(mid_hi, mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _query_blocks(n0, T, W, BLOCK_M, BLOCK_N):
    """Query blocks that can see the key block [n0, n0 + BLOCK_N): starts in [lo, hi), step BLOCK_M.
    Blocks starting in [mid_lo, mid_hi) are interior: every (query, key) pair there is visible."""
    lo = n0 // BLOCK_M * BLOCK_M  # the block holding query n0, the first that sees key n0 (causal)
    hi = min(n0 + BLOCK_N - 1 + W, T)  # one past the last query whose window still holds the last key
    mid_lo = (n0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # oldest query sees the last key
    mid_hi = min(n0 + W, T) // BLOCK_M * BLOCK_M  # newest query sees the first key, and the block ends by T
    mid_lo = min(mid_lo, hi)
    mid_hi = max(mid_hi, mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _visible(q_idx, k_idx, T, W):
    """True where query q_idx may attend to key k_idx (any broadcastable shapes)."""
    return (k_idx <= q_idx) & (q_idx - k_idx < W) & (q_idx < T)


@triton.jit
def _head(base, batch, head, stride_batch, stride_head):
    """Pointer to the (T, HEAD_DIM) matrix of one (batch, head); int64 since B * H * T * D can pass 2^31."""
    return base + tl.cast(batch, tl.int64) * stride_batch + tl.cast(head, tl.int64) * stride_head


@triton.jit
def _load_rows(base, rows, T, stride_t, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """Rows `rows` of a (T, HEAD_DIM) matrix whose rows are stride_t apart (H * D for the model's
    (B, T, H, D) layout, D for a contiguous (B, H, T, D) one); with MASKED, rows at or past T read as zeros.
    The kernels take row strides as constexprs: a run-time row stride costs enough registers to spill
    (kernels_report.py, triton 3.9: 16-68 B in four forward configs), a compile-time one a compile per layout."""
    ptrs = base + rows[:, None] * stride_t + tl.arange(0, HEAD_DIM)[None, :]
    if MASKED:
        x = tl.load(ptrs, mask=rows[:, None] < T, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store_rows(base, rows, T, stride_t, x, HEAD_DIM: tl.constexpr):
    """Store x into rows `rows` < T of a (T, HEAD_DIM) matrix whose rows are stride_t apart."""
    ptrs = base + rows[:, None] * stride_t + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=rows[:, None] < T)


@triton.jit
def _row_source(base, T, stride_t: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                USE_TMA: tl.constexpr):
    """What _load_tile reads BLOCK-row tiles from: the (T, HEAD_DIM) matrix at base, as a pointer or, with
    USE_TMA, as a tensor descriptor (Hopper's bulk tensor copy engine; rows past T read as zeros)."""
    if USE_TMA:
        source = tl.make_tensor_descriptor(base, shape=[T, HEAD_DIM], strides=[stride_t, 1],
                                           block_shape=[BLOCK, HEAD_DIM])
    else:
        source = base
    return source


@triton.jit
def _load_tile(source, start, T, stride_t: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
               MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows start .. start + BLOCK - 1 of a _row_source; rows at or past T read as zeros where MASKED."""
    if USE_TMA:
        x = source.load([start, 0])
    else:
        x = _load_rows(source, start + tl.arange(0, BLOCK), T, stride_t, HEAD_DIM, MASKED)
    return x


@triton.jit
def _load_vector(base, idx, T, MASKED: tl.constexpr):
    """Entries `idx` of a length-T vector; with MASKED, entries at or past T read as zeros."""
    if MASKED:
        x = tl.load(base + idx, mask=idx < T, other=0.0)
    else:
        x = tl.load(base + idx)
    return x


# -----------------------------------------------------------------------------
# Forward

@triton.jit
def _fwd_blocks(acc, m_i, l_i, visits, q, K, V, offs_m, lo, hi, T, W, qk_scale, stride_kt, stride_vt,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Online softmax over the key blocks starting in [lo, hi). The running max m_i is in log2 units
    (scaled scores); the row max is taken on the raw scores, so scaling and subtracting it is one FMA,
    as in Triton's fused-attention tutorial."""
    for n in range(lo, hi, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, n, T, stride_kt, HEAD_DIM, BLOCK_N, MASKED, USE_TMA)  # (BLOCK_N, HEAD_DIM)
        v = _load_tile(V, n, T, stride_vt, HEAD_DIM, BLOCK_N, MASKED, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # raw scores (BLOCK_M, BLOCK_N)
        if MASKED:
            s = tl.where(_visible(offs_m[:, None], offs_n[None, :], T, W), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # max commutes with the positive scale
        # At the window's edge a row can see no key of this block yet: exp2(-inf - -inf) would be NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * qk_scale - m_safe[:, None])  # one FMA per score
        alpha = tl.exp2(m_i - m_safe)  # rescales what was summed under the old running max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        visits += 1
    return acc, m_i, l_i, visits


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, VISITS, qk_scale, T, W, H, GROUP,
              stride_qb, stride_qh, stride_qt: tl.constexpr, stride_kb, stride_kh, stride_kt: tl.constexpr,
              stride_vb, stride_vh, stride_vt: tl.constexpr, stride_ob, stride_oh, stride_ot: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_PRECISION: tl.constexpr, COUNT_VISITS: tl.constexpr, USE_TMA: tl.constexpr = False):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)  # batch * H + query head
    batch, head = bh // H, bh % H
    kv_head = head // GROUP  # GQA by indexing, not copying
    K = _row_source(_head(K, batch, kv_head, stride_kb, stride_kh), T, stride_kt, HEAD_DIM, BLOCK_N, USE_TMA)
    V = _row_source(_head(V, batch, kv_head, stride_vb, stride_vh), T, stride_vt, HEAD_DIM, BLOCK_N, USE_TMA)
    Q = _row_source(_head(Q, batch, head, stride_qb, stride_qh), T, stride_qt, HEAD_DIM, BLOCK_M, USE_TMA)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = _load_tile(Q, m0, T, stride_qt, HEAD_DIM, BLOCK_M, True, USE_TMA)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the scaled scores
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(scaled score - running max)
    visits = 0

    # Window edge, interior (no mask), then diagonal and ragged tail.
    lo, mid_lo, mid_hi, hi = _key_blocks(m0, T, W, BLOCK_M, BLOCK_N)
    acc, m_i, l_i, visits = _fwd_blocks(acc, m_i, l_i, visits, q, K, V, offs_m, lo, mid_lo, T, W, qk_scale,
                                        stride_kt, stride_vt, HEAD_DIM, BLOCK_N, DOT_PRECISION, True, USE_TMA)
    acc, m_i, l_i, visits = _fwd_blocks(acc, m_i, l_i, visits, q, K, V, offs_m, mid_lo, mid_hi, T, W, qk_scale,
                                        stride_kt, stride_vt, HEAD_DIM, BLOCK_N, DOT_PRECISION, False, USE_TMA)
    acc, m_i, l_i, visits = _fwd_blocks(acc, m_i, l_i, visits, q, K, V, offs_m, mid_hi, hi, T, W, qk_scale,
                                        stride_kt, stride_vt, HEAD_DIM, BLOCK_N, DOT_PRECISION, True, USE_TMA)

    # Every query row < T sees at least itself; only the rows past T (never stored) can end with l_i = 0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    _store_rows(_head(O, batch, head, stride_ob, stride_oh), offs_m, T, stride_ot, acc / l_safe[:, None], HEAD_DIM)
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_safe), mask=offs_m < T)  # log2 units
    if COUNT_VISITS:
        tl.store(VISITS + bh * tl.num_programs(0) + tl.program_id(0), visits)


# -----------------------------------------------------------------------------
# Backward: delta preprocess, dK/dV, dQ

@triton.jit
def _attn_bwd_delta(O, DO, DELTA, T, H, stride_ob, stride_oh, stride_ot: tl.constexpr,
                    stride_dob, stride_doh, stride_dot: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d O_id * dO_id, the row term of the softmax backward: dS = P * (dP - delta)."""
    bh = tl.program_id(1)
    batch, head = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_rows(_head(O, batch, head, stride_ob, stride_oh), offs_m, T, stride_ot, HEAD_DIM, True)
    do = _load_rows(_head(DO, batch, head, stride_dob, stride_doh), offs_m, T, stride_dot, HEAD_DIM, True)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1),
             mask=offs_m < T)


@triton.jit
def _dkdv_blocks(dk, dv, visits, k, v, Q, DO, LSE, DELTA, offs_n, lo, hi, T, W, qk_scale, stride_qt, stride_dot,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks starting in [lo, hi) of one query head.
    Works on transposed scores (keys along rows) so the results land in dK and dV's own layout."""
    for m in range(lo, hi, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)
        q = _load_tile(Q, m, T, stride_qt, HEAD_DIM, BLOCK_M, MASKED, USE_TMA)  # (BLOCK_M, HEAD_DIM)
        do = _load_tile(DO, m, T, stride_dot, HEAD_DIM, BLOCK_M, MASKED, USE_TMA)
        lse = _load_vector(LSE, offs_m, T, MASKED)
        delta = _load_vector(DELTA, offs_m, T, MASKED)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # raw scores, transposed (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])  # the forward's probabilities, from its logsumexp: one FMA
        if MASKED:
            p_t = tl.where(_visible(offs_m[None, :], offs_n[:, None], T, W), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # dV = P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (dO V^T)^T
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)  # dK = dS^T Q (scale applied later)
        visits += 1
    return dk, dv, visits


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, VISITS, qk_scale, sm_scale, T, W, H, GROUP,
                   stride_qb, stride_qh, stride_qt: tl.constexpr, stride_kb, stride_kh, stride_kt: tl.constexpr,
                   stride_vb, stride_vh, stride_vt: tl.constexpr, stride_dob, stride_doh, stride_dot: tl.constexpr,
                   stride_dkb, stride_dkh, stride_dkt: tl.constexpr, stride_dvb, stride_dvh, stride_dvt: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, COUNT_VISITS: tl.constexpr, USE_TMA: tl.constexpr = False):
    n0 = tl.program_id(0) * BLOCK_N
    kv_bh = tl.program_id(1)  # batch * H_kv + kv head
    H_KV = H // GROUP
    batch = kv_bh // H_KV
    kv_head = kv_bh % H_KV

    offs_n = n0 + tl.arange(0, BLOCK_N)
    K = _row_source(_head(K, batch, kv_head, stride_kb, stride_kh), T, stride_kt, HEAD_DIM, BLOCK_N, USE_TMA)
    V = _row_source(_head(V, batch, kv_head, stride_vb, stride_vh), T, stride_vt, HEAD_DIM, BLOCK_N, USE_TMA)
    k = _load_tile(K, n0, T, stride_kt, HEAD_DIM, BLOCK_N, True, USE_TMA)  # (BLOCK_N, HEAD_DIM)
    v = _load_tile(V, n0, T, stride_vt, HEAD_DIM, BLOCK_N, True, USE_TMA)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    visits = 0

    lo, mid_lo, mid_hi, hi = _query_blocks(n0, T, W, BLOCK_M, BLOCK_N)
    # The query heads sharing this kv head add into the same dK, dV: summed here, so no atomics are needed.
    for head in range(kv_head * GROUP, (kv_head + 1) * GROUP):
        q_head = _row_source(_head(Q, batch, head, stride_qb, stride_qh), T, stride_qt, HEAD_DIM, BLOCK_M, USE_TMA)
        do_head = _row_source(_head(DO, batch, head, stride_dob, stride_doh), T, stride_dot, HEAD_DIM, BLOCK_M,
                              USE_TMA)
        row_off = (tl.cast(batch, tl.int64) * H + head) * T
        dk, dv, visits = _dkdv_blocks(dk, dv, visits, k, v, q_head, do_head, LSE + row_off, DELTA + row_off,
                                      offs_n, lo, mid_lo, T, W, qk_scale, stride_qt, stride_dot,
                                      HEAD_DIM, BLOCK_M, DOT_PRECISION, True, USE_TMA)
        dk, dv, visits = _dkdv_blocks(dk, dv, visits, k, v, q_head, do_head, LSE + row_off, DELTA + row_off,
                                      offs_n, mid_lo, mid_hi, T, W, qk_scale, stride_qt, stride_dot,
                                      HEAD_DIM, BLOCK_M, DOT_PRECISION, False, USE_TMA)
        dk, dv, visits = _dkdv_blocks(dk, dv, visits, k, v, q_head, do_head, LSE + row_off, DELTA + row_off,
                                      offs_n, mid_hi, hi, T, W, qk_scale, stride_qt, stride_dot,
                                      HEAD_DIM, BLOCK_M, DOT_PRECISION, True, USE_TMA)

    _store_rows(_head(DK, batch, kv_head, stride_dkb, stride_dkh), offs_n, T, stride_dkt, dk * sm_scale, HEAD_DIM)
    _store_rows(_head(DV, batch, kv_head, stride_dvb, stride_dvh), offs_n, T, stride_dvt, dv, HEAD_DIM)
    if COUNT_VISITS:
        tl.store(VISITS + kv_bh * tl.num_programs(0) + tl.program_id(0), visits)


@triton.jit
def _dq_blocks(dq, visits, q, do, lse, delta, K, V, offs_m, lo, hi, T, W, qk_scale, stride_kt, stride_vt,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
               MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks starting in [lo, hi)."""
    for n in range(lo, hi, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, n, T, stride_kt, HEAD_DIM, BLOCK_N, MASKED, USE_TMA)  # (BLOCK_N, HEAD_DIM)
        v = _load_tile(V, n, T, stride_vt, HEAD_DIM, BLOCK_N, MASKED, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # raw scores (BLOCK_M, BLOCK_N)
        p = tl.exp2(s * qk_scale - lse[:, None])  # one FMA per score
        if MASKED:
            p = tl.where(_visible(offs_m[:, None], offs_n[None, :], T, W), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)  # dQ = dS K (scale applied later)
        visits += 1
    return dq, visits


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, VISITS, qk_scale, sm_scale, T, W, H, GROUP,
                 stride_qb, stride_qh, stride_qt: tl.constexpr, stride_kb, stride_kh, stride_kt: tl.constexpr,
                 stride_vb, stride_vh, stride_vt: tl.constexpr, stride_dob, stride_doh, stride_dot: tl.constexpr,
                 stride_dqb, stride_dqh, stride_dqt: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, COUNT_VISITS: tl.constexpr, USE_TMA: tl.constexpr = False):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)  # batch * H + query head
    batch, head = bh // H, bh % H
    K = _row_source(_head(K, batch, head // GROUP, stride_kb, stride_kh), T, stride_kt, HEAD_DIM, BLOCK_N, USE_TMA)
    V = _row_source(_head(V, batch, head // GROUP, stride_vb, stride_vh), T, stride_vt, HEAD_DIM, BLOCK_N, USE_TMA)
    Q = _row_source(_head(Q, batch, head, stride_qb, stride_qh), T, stride_qt, HEAD_DIM, BLOCK_M, USE_TMA)
    DO = _row_source(_head(DO, batch, head, stride_dob, stride_doh), T, stride_dot, HEAD_DIM, BLOCK_M, USE_TMA)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = _load_tile(Q, m0, T, stride_qt, HEAD_DIM, BLOCK_M, True, USE_TMA)
    do = _load_tile(DO, m0, T, stride_dot, HEAD_DIM, BLOCK_M, True, USE_TMA)
    lse = _load_vector(LSE + bh.to(tl.int64) * T, offs_m, T, True)
    delta = _load_vector(DELTA + bh.to(tl.int64) * T, offs_m, T, True)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    visits = 0

    lo, mid_lo, mid_hi, hi = _key_blocks(m0, T, W, BLOCK_M, BLOCK_N)  # the forward's blocks
    dq, visits = _dq_blocks(dq, visits, q, do, lse, delta, K, V, offs_m, lo, mid_lo, T, W, qk_scale,
                            stride_kt, stride_vt, HEAD_DIM, BLOCK_N, DOT_PRECISION, True, USE_TMA)
    dq, visits = _dq_blocks(dq, visits, q, do, lse, delta, K, V, offs_m, mid_lo, mid_hi, T, W, qk_scale,
                            stride_kt, stride_vt, HEAD_DIM, BLOCK_N, DOT_PRECISION, False, USE_TMA)
    dq, visits = _dq_blocks(dq, visits, q, do, lse, delta, K, V, offs_m, mid_hi, hi, T, W, qk_scale,
                            stride_kt, stride_vt, HEAD_DIM, BLOCK_N, DOT_PRECISION, True, USE_TMA)

    _store_rows(_head(DQ, batch, head, stride_dqb, stride_dqh), offs_m, T, stride_dqt, dq * sm_scale, HEAD_DIM)
    if COUNT_VISITS:
        tl.store(VISITS + bh * tl.num_programs(0) + tl.program_id(0), visits)


# -----------------------------------------------------------------------------
# Launching: fixed blocks on the interpreter or when asked for, autotuned otherwise on a GPU

# (BLOCK_M, BLOCK_N, num_warps, num_stages), fitted to Hopper (sm_90a: 227 KB of shared memory a block, 255
# registers a thread) by `python kernels_report.py`, which compiles each offline with the triton the CUDA torch
# wheel pins (3.7.1) and reports registers, spills and shared memory: none of these spills. Few on purpose:
# each is compiled and timed once per autotune key. Small blocks waste less at the window's edge (useful work
# per visited block is about W / (W + BLOCK_M)). dK/dV keeps four (BLOCK_N, HEAD_DIM) tiles live (k, v and
# their fp32 gradients): only 8 warps with small query blocks fit them without spilling.
_GPU_CONFIGS = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
    "dkdv": [(16, 128, 8, 3), (32, 64, 8, 3), (32, 64, 8, 2), (16, 64, 8, 3)],  # BLOCK_N keys per program
    "dq": [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],  # BLOCK_M queries per program
}
_GPU_DEFAULT_BLOCK = 64  # the other block size when only one of block_m, block_n is given
_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}


@functools.cache
def _autotuned(name, max_tile):
    """The kernel wrapped in triton.autotune over the configs whose BLOCK_M * BLOCK_N <= max_tile.
    Built on first GPU use: autotune needs a driver."""
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in _GPU_CONFIGS[name] if bm * bn <= max_tile]
    key = ["T", "W", "GROUP", "HEAD_DIM", "stride_qt", "stride_kt", "USE_TMA"]
    return triton.autotune(configs, key=key)(_KERNELS[name])


def _max_tile(dtype, head_dim):
    # Exact fp32 products run on CUDA cores: big tiles take minutes to compile, so fp32 (a checking mode,
    # not a fast one) gets the smallest. Head dim 256 fills shared memory beyond 64 x 64 tiles.
    if dtype == torch.float32:
        return 64 * 32
    return 64 * 64 if head_dim > 128 else 128 * 128


def _run(kernel, grid, kernel_args, kwargs):
    """Launch through torch.library.wrap_triton, so that torch.compile traces the kernel inside the ops below.
    The interpreter cannot run on the fake tensors torch.compile traces with, and wrap_triton leaves
    interpreted kernels unwrapped: there, tracing gets the outputs' shapes and strides only."""
    if _INTERPRET and any(isinstance(a, torch.Tensor) and torch._subclasses.fake_tensor.is_fake(a) for a in kernel_args):
        return
    torch.library.wrap_triton(kernel)[grid](*kernel_args, **kwargs)


def _launch(name, T, batch_heads, block_m, block_n, max_tile, kernel_args, constexprs):
    """Run kernel `name` on a grid (row blocks, batch_heads). The forward and dQ kernels tile the
    queries (BLOCK_M rows per program); dK/dV tiles the keys (BLOCK_N rows)."""
    tile = "BLOCK_N" if name == "dkdv" else "BLOCK_M"
    on_gpu = not _INTERPRET
    if on_gpu and block_m is None and block_n is None:
        grid = lambda meta: (triton.cdiv(T, meta[tile]), batch_heads)
        _run(_autotuned(name, max_tile), grid, kernel_args, constexprs)
        return
    default = _GPU_DEFAULT_BLOCK if on_gpu else _INTERPRETER_BLOCK
    blocks = {"BLOCK_M": block_m or default, "BLOCK_N": block_n or default}
    # The tutorial's rule: 8 warps only for 128 x 128 tiles and up.
    launch_options = {"num_warps": 8 if blocks["BLOCK_M"] * blocks["BLOCK_N"] >= 128 * 128 else 4} if on_gpu else {}
    grid = (triton.cdiv(T, blocks[tile]), batch_heads)
    _run(_KERNELS[name], grid, kernel_args, {**blocks, **constexprs, **launch_options})


def _dot_precision(dtype):
    # fp32 inputs ask for fp32 products: a GPU would otherwise use TF32, ~1e-3 relative error.
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(x):
    """(batch, head, row) strides of a (B, H, T, D) tensor; its head dim must be dense."""
    return x.stride(0), x.stride(1), x.stride(2)


def _rows_addressable(x):
    """x as the kernels can read it: head dim dense, and row offsets (row * stride) within int32.
    Any (B, H, T, D) tensor that is a transpose of a contiguous (B, T, H, D) one passes as it is, uncopied."""
    T = x.shape[2]
    if x.stride(3) != 1 or abs(x.stride(2)) * (T + 256) >= 2**31 or x.stride(2) < 0:
        return x.contiguous()
    return x


@functools.cache
def _allocate_descriptor_memory_with_torch():
    """Tensor descriptors made inside a kernel live in global memory that Triton asks its allocator for."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _forward(q, k, v, W, block_m, block_n, visits=None, use_tma=False):
    B, H, T, D = q.shape
    if use_tma and not _INTERPRET:
        _allocate_descriptor_memory_with_torch()
    group = H // k.shape[1]
    o = torch.empty_like(q)  # q's layout when q is dense: (B, T, H, D) memory stays (B, T, H, D)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    sm_scale = 1.0 / math.sqrt(D)
    kernel_args = (q, k, v, o, lse, visits, sm_scale * _LOG2E, T, W, H, group,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o))
    constexprs = dict(HEAD_DIM=D, DOT_PRECISION=_dot_precision(q.dtype), COUNT_VISITS=visits is not None,
                      USE_TMA=use_tma)
    _launch("fwd", T, B * H, block_m, block_n, _max_tile(q.dtype, D), kernel_args, constexprs)
    return o, lse


def _backward(do, q, k, v, o, lse, W, block_m, block_n, visits_dkdv=None, visits_dq=None, use_tma=False):
    B, H, T, D = q.shape
    if use_tma and not _INTERPRET:
        _allocate_descriptor_memory_with_torch()
    H_kv = k.shape[1]
    group = H // H_kv
    sm_scale = 1.0 / math.sqrt(D)
    do = _rows_addressable(do)
    delta = torch.empty_like(lse)
    delta_block = block_m or (64 if not _INTERPRET else _INTERPRETER_BLOCK)
    _run(_attn_bwd_delta, (triton.cdiv(T, delta_block), B * H), (o, do, delta, T, H, *_strides(o), *_strides(do)),
         dict(HEAD_DIM=D, BLOCK_M=delta_block))

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    shared = dict(HEAD_DIM=D, DOT_PRECISION=_dot_precision(q.dtype), USE_TMA=use_tma)
    _launch("dkdv", T, B * H_kv, block_m, block_n, _max_tile(q.dtype, D),
            (q, k, v, do, lse, delta, dk, dv, visits_dkdv, sm_scale * _LOG2E, sm_scale, T, W, H, group,
             *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv)),
            dict(shared, COUNT_VISITS=visits_dkdv is not None))
    _launch("dq", T, B * H, block_m, block_n, _max_tile(q.dtype, D),
            (q, k, v, do, lse, delta, dq, visits_dq, sm_scale * _LOG2E, sm_scale, T, W, H, group,
             *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq)),
            dict(shared, COUNT_VISITS=visits_dq is not None))
    return dq, dk, dv


def _custom_op(name):
    """Register fn as the custom operator olmpool::name, which torch.compile traces without a graph break.
    On a GPU it is a torch.library.triton_op: torch.compile sees the kernels themselves (wrap_triton) and can
    schedule them. The interpreter cannot run on the fake tensors tracing uses, and wrap_triton leaves
    interpreted kernels unwrapped, so a triton_op there would trace into a graph without its kernels (garbage
    outputs, measured); under TRITON_INTERPRET the same function is an opaque torch.library.custom_op instead,
    with itself as the fake (shapes and strides only: _run skips the kernels on fake tensors)."""
    def register(fn):
        if not _INTERPRET:
            return torch.library.triton_op(f"olmpool::{name}", fn, mutates_args=())
        op = torch.library.custom_op(f"olmpool::{name}", fn, mutates_args=())
        op.register_fake(fn)
        return op
    return register


@_custom_op("sliding_window_attention_forward")
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block_m: int | None,
                block_n: int | None, use_tma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, logsumexp in log2 units (B, H, T) fp32) of sliding-window attention; window already <= T."""
    return _forward(q, k, v, window, block_m, block_n, use_tma=use_tma)


@_custom_op("sliding_window_attention_backward")
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, window: int, block_m: int | None, block_n: int | None,
                 use_tma: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for the upstream gradient grad_out of the forward's out."""
    return _backward(grad_out, q, k, v, out, lse, window, block_m, block_n, use_tma=use_tma)


def _save_for_backward(ctx, inputs, output):
    q, k, v, window, block_m, block_n, use_tma = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.config = (window, block_m, block_n, use_tma)


def _gradients(ctx, grad_out, grad_lse):
    # The logsumexp is an auxiliary output: the public function never returns it, so grad_lse is unused.
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out, q, k, v, out, lse, *ctx.config)
    return dq, dk, dv, None, None, None, None


_forward_op.register_autograd(_gradients, setup_context=_save_for_backward)


# -----------------------------------------------------------------------------
# Public API

def _check_block(name, value):
    if value is not None and (value < 16 or value & (value - 1)):
        raise ValueError(f"{name}={value} must be a power of two >= 16 (tl.dot needs 16 on the GPU)")


def _check_inputs(q, k, v, window, block_m, block_n):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, seq_len, head_dim), got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (B, H, T, D), (B_kv, H_kv, T_kv, D_kv) = q.shape, k.shape
    if (B, T, D) != (B_kv, T_kv, D_kv):
        raise ValueError(f"q {tuple(q.shape)} and k, v {tuple(k.shape)} must agree in batch, seq_len and head_dim")
    if H_kv == 0 or H % H_kv:
        divisors = [n for n in range(1, H + 1) if H % n == 0]
        raise ValueError(f"k, v have {H_kv} heads, which does not divide q's {H} heads; use one of {divisors}")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"head_dim={D} is not supported: use a power of two from 16 to 256")
    if T < 1:
        raise ValueError("seq_len must be at least 1")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one dtype of float32, float16, bfloat16; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if not _INTERPRET and q.device.type != "cuda":
        raise ValueError("sliding_window_attention needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                         "kernels is imported to run on CPU")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} must be None (causal) or an int >= 1 (keys seen, itself included)")
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)


def _effective_window(T, window):
    """W >= T, or None, is causal: every window longer than the sequence behaves as W = T."""
    return T if window is None else min(window, T)


def sliding_window_attention(q, k, v, window: int | None = None, block_m: int | None = None,
                             block_n: int | None = None, use_tma: bool = False) -> torch.Tensor:
    """Causal attention where query i sees keys i - window < j <= i; differentiable.

    q: (B, H, T, D); k, v: (B, H_kv, T, D) with H % H_kv == 0. Returns (B, H, T, D) in q's dtype.
    block_m, block_n override the query and key block sizes (powers of two >= 16); by default they are
    autotuned on a GPU (64 for the one not given when only one is) and 16 on the interpreter.
    use_tma loads the q, k, v, dO tiles of all three kernels through tensor descriptors (Hopper's bulk tensor
    copy engine) instead of pointers: same arithmetic, same results; off until a GPU run says it is faster.
    """
    _check_inputs(q, k, v, window, block_m, block_n)
    W = _effective_window(q.shape[2], window)
    q, k, v = (_rows_addressable(x) for x in (q, k, v))  # no copy for the model's transposed (B, T, H, D) views
    if use_tma:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.data_ptr() % 16 or any(stride * x.element_size() % 16 for stride in x.stride()[:3]):
                raise ValueError(f"use_tma=True needs {name} 16-byte aligned with strides of 16-byte multiples "
                                 f"(tensor descriptors); got strides {x.stride()}: pass use_tma=False")
    return _forward_op(q, k, v, W, block_m, block_n, bool(use_tma))[0]


def visited_key_blocks(T: int, window: int | None, block_m: int, block_n: int) -> int:
    """(query block, key block) pairs that the forward and dQ kernels visit for one head."""
    W = _effective_window(T, window)
    pairs = 0
    for m0 in range(0, T, block_m):
        lo, mid_lo, mid_hi, hi = _key_blocks.fn(m0, T, W, block_m, block_n)
        pairs += sum(len(range(a, b, block_n)) for a, b in ((lo, mid_lo), (mid_lo, mid_hi), (mid_hi, hi)))
    return pairs


def visited_query_blocks(T: int, window: int | None, block_m: int, block_n: int) -> int:
    """(key block, query block) pairs that the dK/dV kernel visits for one query head."""
    W = _effective_window(T, window)
    pairs = 0
    for n0 in range(0, T, block_n):
        lo, mid_lo, mid_hi, hi = _query_blocks.fn(n0, T, W, block_m, block_n)
        pairs += sum(len(range(a, b, block_m)) for a, b in ((lo, mid_lo), (mid_lo, mid_hi), (mid_hi, hi)))
    return pairs


def kernel_block_visits(T: int, window: int | None, block_m: int, block_n: int, head_dim: int = 16,
                        device: str = "cpu") -> dict:
    """Run the three kernels once on random (1, 1, T, head_dim) inputs, each program counting the blocks
    its loops really visit; returns the totals {"fwd", "dkdv", "dq"} to compare with the formulas above."""
    q, k, v, do = torch.randn(4, 1, 1, T, head_dim, device=device)
    W = _effective_window(T, window)
    counts = {name: torch.full((triton.cdiv(T, block),), -1, dtype=torch.int32, device=device)
              for name, block in (("fwd", block_m), ("dkdv", block_n), ("dq", block_m))}
    o, lse = _forward(q, k, v, W, block_m, block_n, visits=counts["fwd"])
    _backward(do, q, k, v, o, lse, W, block_m, block_n, visits_dkdv=counts["dkdv"], visits_dq=counts["dq"])
    return {name: int(c.sum()) for name, c in counts.items()}
