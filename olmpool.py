"""OlmPool: one readable transformer with every attention switch of the OlmPool study.

The OlmPool study (Ai2, 2026; Bertsch et al., "Cracks in the Foundation") trained 26 comparable 7B
models that differ only in four attention choices, then extended each to 64K tokens. This file
builds any of them, and the Llama-3-, Olmo-3- and Qwen-3-like baselines, from one `ModelConfig`:

    block norm         pre (Llama)  |  post, the "reordered norm" of Olmo 2/3
    QK norm            none  |  layerwise (Olmo 2/3)  |  headwise (Qwen 3, Gemma 3)
    GQA                n_kv_heads < n_heads
    sliding window     3 local : 1 global layers, last layer global (Olmo 3)
    context            context_length (4K or 8K in pretraining)

Usage:
    from olmpool import ModelConfig, Transformer, preset
    config = preset("H_post_LQK_32kv_8k_11k_SWA", size="tiny")
    model = Transformer(config)
    logits = model(tokens)                          # (B, T, vocab_size)
    ce_sum, z_sum = model(tokens, targets=targets)  # loss sums in chunks: no (B, T, vocab) logits
    print(generate(model, prompt, max_new_tokens=20))

Semantics, each stated once here and pinned by a test:
- Window W: a query at position i sees the W keys j with i - W < j <= i (itself included), i.e.
  flash-attn `window_size=(W-1, 0)` and Hugging Face's `sliding_window=W`.
- QK norm: layerwise = RMSNorm over the whole projection (n_heads * head_dim values for q,
  n_kv_heads * head_dim for k) before the split into heads; headwise = RMSNorm over head_dim, one
  gain vector shared by all heads, after the split. Both act before RoPE.
- RoPE: the rotate-half (GPT-NeoX) layout: dimension d pairs with d + head_dim/2. This is what
  OLMo-core and Hugging Face use, so their q/k weights load without permutation. The tables are
  always computed in float32.

Only torch and the standard library are needed; `kernels.py` (Triton) is imported lazily when
`attention_backend="triton"`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# ----------------------------------------------------------------------------------------------
# Configuration: one field per switch


# The allowed values of every string switch with a closed set: ModelConfig's validation and
# train.py's parser both read CHOICES, so a new value is added here once.
NORM_PLACEMENTS = ("pre", "post")
QK_NORMS = ("none", "layerwise", "headwise")
ROPE_SCALINGS = ("none", "abf", "pi", "yarn", "llama3")
ROPE_SCALING_LAYERS = ("global", "all")
ATTENTION_BACKENDS = ("naive", "sdpa", "flex", "triton")
CHOICES: dict[str, tuple[str, ...]] = {
    "norm_placement": NORM_PLACEMENTS,
    "qk_norm": QK_NORMS,
    "rope_scaling": ROPE_SCALINGS,
    "rope_scaling_layers": ROPE_SCALING_LAYERS,
    "attention_backend": ATTENTION_BACKENDS,
}


def head_divisors(n_heads: int) -> list[int]:
    """The valid n_kv_heads for n_heads query heads, increasing: the divisors of n_heads (each is
    also a valid GQA ratio n_heads / n_kv_heads)."""
    return [d for d in range(1, n_heads + 1) if n_heads % d == 0]


def switch(default, help: str):
    """A ModelConfig field: its default and its one help text, which train.py's flag shows too."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    # Sizes. Defaults are the Olmo-3-7B-like shape (the OlmPool "H" family). dolma2 has 100,278 ids,
    # padded to a multiple of 128; train.py sets vocab_size from its data. OlmPool widens mlp_hidden
    # as n_kv_heads shrinks (11008-14336), keeping parameters roughly equal.
    vocab_size: int = switch(100_352, "vocabulary rows (dolma2: 100,278 padded)")
    n_layers: int = switch(32, "transformer blocks")
    d_model: int = switch(4096, "width of the residual stream")
    n_heads: int = switch(32, "query heads")
    n_kv_heads: int = switch(32, "key/value heads; fewer than n_heads is GQA")
    head_dim: int = switch(128, "width of one attention head")
    mlp_hidden: int = switch(11008, "SwiGLU width (OlmPool: 11008-14336)")

    # The four OlmPool switches (and the block norm that travels with QK norm). "pre" is
    # x + f(norm(x)); "post" is x + norm(f(x)). Windowed layers see W keys, themselves included.
    norm_placement: str = switch("post", '"pre" (Llama, Qwen 3) | "post" (Olmo 2/3)')
    qk_norm: str = switch("layerwise", '"none" (Llama) | "layerwise" (Olmo 2/3) | "headwise" (Qwen 3, Gemma 3)')
    window: int | None = switch(None, "local layers' window (Olmo 3: 4096); None: all global")
    # 0 leaves no global layer at all (every layer windowed, to study a model's reach).
    global_every: int = switch(4, "with a window, every 4th layer is global (3 local : 1 global) and so is the "
                                  "last; 0: no global layer")
    context_length: int = switch(8192, "pretraining length (OlmPool: 4096 or 8192)")

    # Positions. Scaling is how context extension stretches RoPE beyond context_length: "abf"
    # multiplies the base by the factor (OlmPool: 500K -> 8M), "pi" divides positions by it, "yarn"
    # interpolates by frequency (Olmo 3 at 64K), "llama3" steps per frequency (Llama 3.1).
    rope_theta: float = switch(500_000.0, "RoPE base (Llama 3, Olmo 3: 500K; Qwen 3: 1M)")
    rope_theta_local: float | None = switch(None, "RoPE base of windowed layers (Gemma 3: 10K)")
    rope_scaling: str = switch("none", '"none" | "abf" | "pi" | "yarn" | "llama3"')
    rope_factor: float = switch(1.0, "scaling factor (ABF 500K -> 8M: 16; YaRN: 8)")
    rope_scaling_layers: str = switch("global", 'scale "global" layers only (Olmo 3) or "all"')
    rope_original_context: int | None = switch(None, "the length scaling stretches from")
    yarn_beta_fast: float = switch(32.0, "YaRN: faster-turning frequencies are kept")
    yarn_beta_slow: float = switch(1.0, "YaRN: slower-turning ones are interpolated")
    yarn_attention_factor: float | None = switch(None, "YaRN: cos/sin scale; None: 0.1 ln(factor) + 1")
    llama3_low_freq_factor: float = switch(1.0, "llama3: longer wavelengths are divided")
    llama3_high_freq_factor: float = switch(4.0, "llama3: shorter wavelengths are kept")

    norm_eps: float = switch(1e-6, "RMSNorm eps (Olmo, Qwen: 1e-6; Llama: 1e-5)")
    attention_backend: str = switch("sdpa", '"naive" | "sdpa" | "flex" | "triton"; same math')

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(f"ModelConfig: {message}")

        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "mlp_hidden",
                     "context_length"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"{name}={value!r} must be a positive integer")
        check(self.n_heads % self.n_kv_heads == 0,
              f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}; "
              f"use one of {', '.join(map(str, head_divisors(self.n_heads)))}")
        check(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE; use e.g. 64 or 128")
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            check(value in allowed, f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")
        check(isinstance(self.global_every, int) and self.global_every >= 0,
              f"global_every={self.global_every!r} must be >= 0 (4 gives 3 local : 1 global; 0 no global layer)")
        check(self.window is None or (isinstance(self.window, int) and self.window >= 1),
              f"window={self.window!r} must be a positive number of keys, or None for no sliding window")
        check(self.rope_theta > 1, f"rope_theta={self.rope_theta} must be > 1 (Llama 3 uses 500000)")
        check(self.rope_theta_local is None or self.rope_theta_local > 1,
              f"rope_theta_local={self.rope_theta_local} must be > 1, or None to use rope_theta")
        check(self.rope_factor >= 1.0, f"rope_factor={self.rope_factor} must be >= 1 (1 leaves RoPE unchanged)")
        check(self.rope_original_context is None or self.rope_original_context >= 1,
              f"rope_original_context={self.rope_original_context} must be positive, or None for context_length")
        check(self.norm_eps > 0, f"norm_eps={self.norm_eps} must be positive (Olmo uses 1e-6)")
        # YaRN's ramp runs from the dimension that turns beta_fast times to the one that turns beta_slow
        # times; with fast <= slow it runs backwards, where transformers' ramp and ours part ways.
        check(self.rope_scaling != "yarn" or self.yarn_beta_fast > self.yarn_beta_slow,
              f"yarn_beta_fast={self.yarn_beta_fast} must exceed yarn_beta_slow={self.yarn_beta_slow} "
              f"(YaRN's defaults: 32 and 1)")

    @property
    def layer_windows(self) -> list[int | None]:
        """Each layer's window: None for global layers. Every `global_every`-th layer and the last are global."""
        if self.window is None:
            return [None] * self.n_layers
        if self.global_every == 0:
            return [self.window] * self.n_layers
        return [None if (i + 1) % self.global_every == 0 or i == self.n_layers - 1 else self.window
                for i in range(self.n_layers)]

    @property
    def original_context(self) -> int:
        return self.rope_original_context or self.context_length


# The fields that only say how RoPE is computed: its frequencies and attention scale on each layer
# kind (rope_frequencies). context_length joins them for YaRN, PI and llama3 when
# rope_original_context is None, since it is then the length they stretch from.
ROPE_FIELDS = ("rope_theta", "rope_theta_local", "rope_scaling", "rope_factor", "rope_scaling_layers",
               "rope_original_context", "yarn_beta_fast", "yarn_beta_slow", "yarn_attention_factor",
               "llama3_low_freq_factor", "llama3_high_freq_factor")


# ----------------------------------------------------------------------------------------------
# RoPE


def rope_frequencies(config: ModelConfig, is_global: bool, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim / 2,) in float32, and the factor that scales cos and sin.

    Each scaling method follows its published form (and Hugging Face's, for weight parity); every
    method with factor 1 is the identity.
    """
    theta = config.rope_theta if is_global or config.rope_theta_local is None else config.rope_theta_local
    scaled = config.rope_scaling != "none" and (is_global or config.rope_scaling_layers == "all")
    method, factor, dim = (config.rope_scaling if scaled else "none"), config.rope_factor, config.head_dim
    if method == "abf":  # adjusted base frequency (Xiong et al. 2023): a larger base, nothing else
        theta = theta * factor
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (theta ** exponents)
    attention_factor = 1.0
    if method == "pi":  # position interpolation (Chen et al. 2023): every frequency divided by factor
        inv_freq = inv_freq / factor
    elif method == "yarn":  # YaRN (Peng et al. 2023): interpolate only the slow frequencies
        def dim_for_rotations(rotations):  # the dimension whose frequency turns `rotations` times in context
            return dim * math.log(config.original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))
        low = max(math.floor(dim_for_rotations(config.yarn_beta_fast)), 0)
        high = min(math.ceil(dim_for_rotations(config.yarn_beta_slow)), dim - 1)
        ramp = (torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / max(high - low, 0.001)
        keep = 1 - ramp.clamp(0, 1)  # 1: extrapolate (keep), 0: interpolate (divide by factor)
        inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
        attention_factor = config.yarn_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    elif method == "llama3":  # Llama 3.1: long wavelengths / factor, short kept, smooth in between
        low_wavelen = config.original_context / config.llama3_low_freq_factor
        high_wavelen = config.original_context / config.llama3_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled_freq = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (config.original_context / wavelen - config.llama3_low_freq_factor) / (
            config.llama3_high_freq_factor - config.llama3_low_freq_factor)
        smoothed = (1 - smooth) * scaled_freq / factor + smooth * scaled_freq
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled_freq)
    return inv_freq, attention_factor


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0):
    """cos and sin tables (T, head_dim) in float32 for integer positions (T,)."""
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: d pairs with d + head_dim / 2
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by position, in float32, returning x's dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention: one function, four backends


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
            q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Which keys each query sees: causal, within the window, within the document. Broadcasts."""
    distance = q_pos - k_pos
    mask = distance >= 0
    if window is not None:
        mask = mask & (distance < window)
    if q_doc is not None:
        mask = mask & (q_doc == k_doc)
    return mask


def attention_naive(q, k, v, window, doc_ids=None):
    """The reference: an explicit (T, T) mask and softmax, K/V repeated per group. Tests only."""
    T = q.shape[-2]
    positions = torch.arange(T, device=q.device)
    mask = visible(positions[:, None], positions[None, :], window)  # (T, T)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])  # (B, 1, T, T)
    return masked_softmax_attention(q, k, v, mask)


def masked_softmax_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(D) + mask) v, computed in at least float32, K/V repeated per group."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.to(dtype)).to(q.dtype)


def attention_sdpa(q, k, v, window, doc_ids=None):
    """PyTorch SDPA, GQA without copying K/V. Windowed layers go through `windowed_sdpa`."""
    T = q.shape[-2]
    if window is not None and 2 * window < T and doc_ids is None:  # below 2W, bands save nothing
        return windowed_sdpa(q, k, v, window)
    if window is None or window >= T:
        if doc_ids is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        window = None
    positions = torch.arange(T, device=q.device)
    mask = visible(positions[:, None], positions[None, :], window)
    if doc_ids is not None:  # a dense (B, 1, T, T) mask: use `flex` for document masking at long T
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def windowed_sdpa(q, k, v, window: int, cached: int = 0):
    """Sliding-window attention in time and memory O(T * W), on any device.

    k and v may start `cached` positions before q (keys kept from earlier chunks, at most W - 1).
    Queries are cut into chunks of C = W / 2 positions; chunk c sees only the keys from
    C*c - (W - 1) to C*c + C - 1, a band of C + W - 1 keys gathered with `unfold` (SDPA copies it).
    One SDPA call handles every chunk, with a small (chunks, C, C + W - 1) mask.
    """
    B, H, T, D = q.shape
    # Work per query is C + W - 1 keys and the bands copy K and V (C + W - 1) / C times: W / 2
    # balances the two (measured at T = 16K, W = 256 on CPU: 25% faster than C = W).
    C = max(window // 2, 16)
    n_chunks = -(-T // C)
    pad_end = n_chunks * C - T
    band = C + window - 1
    # Pad keys/values at the front to W - 1 positions before q (seen by no query) and at the end
    # to whole chunks; then key index j sits at position j - (W - 1) relative to q's first.
    k = F.pad(k, (0, 0, window - 1 - cached, pad_end))
    v = F.pad(v, (0, 0, window - 1 - cached, pad_end))
    q = F.pad(q, (0, 0, 0, pad_end))
    H_kv = k.shape[1]
    # Chunks join the batch dimension: 4-D inputs reach SDPA's fused kernels (5-D ones do not).
    k_bands = k.unfold(2, band, C).permute(0, 2, 1, 4, 3).reshape(B * n_chunks, H_kv, band, D)
    v_bands = v.unfold(2, band, C).permute(0, 2, 1, 4, 3).reshape(B * n_chunks, H_kv, band, D)
    q_chunks = q.view(B, H, n_chunks, C, D).transpose(1, 2).reshape(B * n_chunks, H, C, D)
    chunk_start = torch.arange(n_chunks, device=q.device)[:, None, None] * C
    q_pos = chunk_start + torch.arange(C, device=q.device)[None, :, None]  # (chunks, C, 1)
    k_pos = chunk_start - (window - 1) + torch.arange(band, device=q.device)[None, None, :]  # (chunks, 1, band)
    mask = visible(q_pos, k_pos, window) & (k_pos >= -cached)  # (chunks, C, band)
    mask = mask[None, :, None].expand(B, n_chunks, 1, C, band).reshape(B * n_chunks, 1, C, band)
    out = F.scaled_dot_product_attention(q_chunks, k_bands, v_bands, attn_mask=mask, enable_gqa=True)
    return out.view(B, n_chunks, H, C, D).transpose(1, 2).reshape(B, H, n_chunks * C, D)[:, :, :T]


_flex_masks: dict = {}
_flex_compiled = None


def attention_flex(q, k, v, window, doc_ids=None):
    """FlexAttention with a block mask: blocks outside the window (or document) are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, _, T, _ = q.shape

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        if doc_ids is not None:
            keep = keep & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return keep

    key = (T, window, str(q.device))
    if doc_ids is not None:
        block_mask = create_block_mask(mask_mod, B, None, T, T, device=q.device)
    else:
        if key not in _flex_masks:
            _flex_masks[key] = create_block_mask(mask_mod, None, None, T, T, device=q.device)
        block_mask = _flex_masks[key]
    if q.is_cuda:  # eager FlexAttention materializes every score; compiled, it skips masked blocks
        global _flex_compiled
        _flex_compiled = _flex_compiled or torch.compile(flex_attention, dynamic=False)
        return _flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=True)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


def attention_triton(q, k, v, window, doc_ids=None):
    """The Triton kernel of kernels.py: skips blocks outside the window, O(T * W) work."""
    if doc_ids is not None:
        raise ValueError("attention_backend='triton' does not mask documents; use 'flex' or 'sdpa'")
    try:
        from kernels import sliding_window_attention
    except ModuleNotFoundError as error:
        if error.name != "kernels":  # kernels.py is there but needs triton: that message says so
            raise
        raise ModuleNotFoundError(
            "attention_backend='triton' needs kernels.py, the Triton kernel, importable beside olmpool.py; copy "
            "kernels.py from the OlmPool repository (it sits next to olmpool.py there) and `pip install triton`, "
            "or use attention_backend 'sdpa', 'flex' or 'naive', which need only torch and compute the same",
            name="kernels") from None

    return sliding_window_attention(q, k, v, window)


ATTENTION = {"naive": attention_naive, "sdpa": attention_sdpa, "flex": attention_flex, "triton": attention_triton}


def attention(q, k, v, window: int | None, backend: str = "sdpa", doc_ids: torch.Tensor | None = None):
    """Causal attention of q (B, H, T, D) over k, v (B, H_kv, T, D), each query seeing the last
    `window` keys (all if None), and only its own document if doc_ids (B, T) is given."""
    return ATTENTION[backend](q, k, v, window, doc_ids)


# ----------------------------------------------------------------------------------------------
# The loss: cross-entropy and z-loss in chunks of positions, so the logits never exist whole


LOSS_CHUNK = 4096  # positions per cross-entropy chunk: at most 4096 x 100,352 fp32 logits (1.6 GB) at once


class ChunkedCrossEntropy(torch.autograd.Function):
    """(summed cross-entropy, summed logsumexp^2) of logits = inputs @ weight.T (or of inputs, the
    logits themselves, when weight is None), chunk_size positions at a time, in fp32.

    Forward keeps only each position's logsumexp; backward recomputes one chunk's logits at a time,
    so the fp32 (positions x vocabulary) tensors (logits, softmax, their gradient) never exist
    beyond one chunk: 64K tokens x 100,352 in fp32 is 26 GB, a 4096-position chunk 1.6 GB. Targets
    below 0 are ignored. Gradients: d ce / d logits = softmax - onehot(target), d lse^2 / d logits
    = 2 lse softmax.
    """

    @staticmethod
    def forward(ctx, inputs, weight, targets, chunk_size):  # inputs (N, C) or logits (N, V); targets (N,)
        normalizers = torch.empty(inputs.shape[0], dtype=torch.float32, device=inputs.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=inputs.device)
        for start in range(0, inputs.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = ChunkedCrossEntropy.logits(inputs[rows], weight)  # (chunk, V) fp32
            normalizer = torch.logsumexp(logits, dim=-1)
            valid = targets[rows] >= 0
            target_logits = logits.gather(-1, targets[rows].clamp(min=0).unsqueeze(-1)).squeeze(-1)
            ce_sum += torch.where(valid, normalizer - target_logits, 0.0).sum()
            normalizers[rows] = torch.where(valid, normalizer, 0.0)
        ctx.save_for_backward(inputs, weight, targets, normalizers)
        ctx.chunk_size, ctx.compute_dtype = chunk_size, torch.get_autocast_dtype(inputs.device.type) \
            if torch.is_autocast_enabled(inputs.device.type) else None
        return torch.stack([ce_sum, normalizers.pow(2).sum()])

    @staticmethod
    def logits(inputs, weight, compute_dtype=None):
        if weight is None:
            return inputs.float()
        if compute_dtype is not None:  # backward runs outside autocast: match the forward's matmul precision
            inputs, weight = inputs.to(compute_dtype), weight.to(compute_dtype)
        return F.linear(inputs, weight).float()

    @staticmethod
    def backward(ctx, grad_sums):
        inputs, weight, targets, normalizers = ctx.saved_tensors
        grad_ce, grad_z = grad_sums[0], grad_sums[1]
        grad_inputs = torch.empty_like(inputs) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, inputs.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            logits = ChunkedCrossEntropy.logits(inputs[rows], weight, ctx.compute_dtype)  # (chunk, V)
            valid = (targets[rows] >= 0).float()
            softmax = torch.exp(logits - normalizers[rows].unsqueeze(-1))
            grad_logits = softmax * ((grad_ce + 2 * grad_z * normalizers[rows]) * valid).unsqueeze(-1)
            grad_logits.scatter_add_(-1, targets[rows].clamp(min=0).unsqueeze(-1), (-grad_ce * valid).unsqueeze(-1))
            if weight is None:
                grad_inputs[rows] = grad_logits.to(inputs.dtype)
                continue
            dtype = ctx.compute_dtype or inputs.dtype
            grad_logits = grad_logits.to(dtype)
            if grad_inputs is not None:
                grad_inputs[rows] = (grad_logits @ weight.to(dtype)).to(inputs.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ inputs[rows].to(dtype)).float()
        return grad_inputs, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def loss_sums(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and summed logsumexp^2 (the z-loss) over targets (B, T), in fp32, of
    logits (B, T, vocab) already computed (Transformer.forward with targets never makes them).

    One logsumexp serves both: cross-entropy = logsumexp(logits) - logits[target]. Computed in
    chunks of positions (ChunkedCrossEntropy), so no fp32 copy of all the logits is made; targets
    below 0 are ignored.
    """
    sums = ChunkedCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), None, targets.reshape(-1),
                                     chunk_size or LOSS_CHUNK)
    return sums[0], sums[1]


# ----------------------------------------------------------------------------------------------
# The model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # In float32 whatever the input dtype, as OLMo-core and Hugging Face do.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        self.window = config.layer_windows[layer]
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        q_size, kv_size = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.d_model, q_size, bias=False)
        self.k_proj = nn.Linear(config.d_model, kv_size, bias=False)
        self.v_proj = nn.Linear(config.d_model, kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, config.d_model, bias=False)
        if config.qk_norm == "layerwise":  # over the whole projection, before the split into heads
            self.q_norm, self.k_norm = RMSNorm(q_size, config.norm_eps), RMSNorm(kv_size, config.norm_eps)
        elif config.qk_norm == "headwise":  # over head_dim, one gain shared by all heads
            self.q_norm, self.k_norm = RMSNorm(config.head_dim, config.norm_eps), RMSNorm(config.head_dim, config.norm_eps)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """q (B, H, T, D) and k, v (B, H_kv, T, D): normed and rotated, as attention sees them."""
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, heads * D)
        if self.config.qk_norm == "layerwise":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.config.qk_norm == "headwise":
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq, attention_factor = rope_frequencies(self.config, self.window is None, x.device)
        cos, sin = rope_cos_sin(positions, inv_freq, attention_factor)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, positions, cache: KVCache | None = None, doc_ids=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, positions)
        if cache is None:
            out = attention(q, k, v, self.window, self.config.attention_backend, doc_ids)
        else:
            out = cache.attend(self.layer, q, k, v, positions)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.norm_placement = config.norm_placement
        self.attention = Attention(config, layer)
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        # True: keep only the block's input for the backward pass and recompute the rest there
        # (train.py's --activation_checkpointing): less memory, one more forward, same results.
        self.activation_checkpointing = False

    def forward(self, x, positions, cache=None, doc_ids=None):
        if self.activation_checkpointing:
            return torch.utils.checkpoint.checkpoint(self.sublayers, x, positions, cache, doc_ids,
                                                     use_reentrant=False)
        return self.sublayers(x, positions, cache, doc_ids)

    def sublayers(self, x, positions, cache=None, doc_ids=None):
        """x plus attention, then plus the MLP, each normed where the block's norm placement says."""
        attend = lambda h: self.attention(h, positions, cache, doc_ids)  # noqa: E731
        if self.norm_placement == "pre":  # Llama, Qwen 3: normalize each sublayer's input
            h = x + attend(self.attention_norm(x))
            return h + self.mlp(self.mlp_norm(h))
        else:  # "post", the reordered norm of Olmo 2/3: normalize each sublayer's output
            h = x + self.attention_norm(attend(x))
            return h + self.mlp_norm(self.mlp(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, seed: int | None = 0):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if seed is not None:
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02):
        """OLMo 2's initialization (initial_values), copied into the parameters on their device and dtype."""
        parameters = dict(self.named_parameters())
        for name, value in initial_values(self.config, seed, std):
            parameters[name].copy_(value.to(parameters[name].dtype))

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, doc_ids: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, loss_chunk: int | None = None):
        """Logits (B, T, vocab_size) for tokens (B, T); with targets (B, T), the loss sums instead.

        With a cache, tokens continue the sequence already in it (positions start at cache.length)
        and the cache is extended. doc_ids (B, T) restricts attention to within each document.
        targets: a (2,) fp32 tensor, the summed cross-entropy and the summed logsumexp^2 (the
        z-loss) over the targets >= 0 (`ce_sum, z_sum = model(tokens, targets=targets)`), computed
        loss_chunk positions at a time (ChunkedCrossEntropy) from the final-normed states and the
        LM head's weight, so the (tokens x vocabulary) logits never exist whole. The head's weight
        is read here, inside this forward, so FSDP2 (which gathers the root module's parameters for
        its forward), DDP and compile see an ordinary call. One tensor, not two views of it: FSDP2
        warns about a forward that returns views.
        """
        hidden = self.hidden_states(tokens, cache, doc_ids)  # (B, T, d_model)
        if targets is None:
            return self.lm_head(hidden)
        return ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight,
                                         targets.reshape(-1), loss_chunk or LOSS_CHUNK)

    def hidden_states(self, tokens, cache=None, doc_ids=None):
        """The final-normed states (B, T, d_model) the LM head reads: logits for chosen positions only."""
        B, T = tokens.shape
        start = 0 if cache is None else cache.length
        if cache is not None and doc_ids is not None:
            raise ValueError("doc_ids cannot be combined with a KV cache; decode one document at a time")
        positions = torch.arange(start, start + T, device=tokens.device)
        x = self.embed(tokens)  # (B, T, d_model)
        for block in self.layers:
            x = block(x, positions, cache, doc_ids)
        if cache is not None:
            cache.length += T
        return self.norm(x)


def initial_values(config: ModelConfig, seed: int = 0, std: float = 0.02):
    """Yield (name, value) for each parameter of Transformer(config), in named_parameters() order:
    OLMo 2's initialization, every matrix from N(0, std) truncated at 3 std, every norm weight 1.

    The values are float32 on the CPU, drawn parameter by parameter from one generator seeded with
    seed, so the weights are the same on any device and any number of processes: a sharded model
    keeps its part of each full value as it comes (train.fill_shards), holding one at a time.
    """
    with torch.device("meta"):  # the names and shapes only, without memory
        shapes = [(name, p.shape) for name, p in Transformer(config, seed=None).named_parameters()]
    generator = torch.Generator().manual_seed(seed)
    for name, shape in shapes:
        if len(shape) == 1:
            yield name, torch.ones(shape)
        else:
            value = torch.empty(shape)
            nn.init.trunc_normal_(value, 0.0, std, -3 * std, 3 * std, generator=generator)
            yield name, value


# ----------------------------------------------------------------------------------------------
# Inference: a KV cache of plain tensors, chunked prefill, and generation


class KVCache:
    """Keys and values of every layer, as plain tensors.

    Global layers keep every position in a buffer allocated up front (max_length). Windowed layers
    keep only their last W - 1 keys, all a future query can see besides itself, so their memory is
    O(W) whatever the length. Attention over the cache runs through SDPA whatever the backend
    (the `naive` backend keeps its explicit reference).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, device=None, dtype=torch.float32):
        self.config, self.max_length, self.length = config, max_length, 0
        shape = (batch_size, config.n_kv_heads, max_length, config.head_dim)
        self.keys, self.values = [], []
        for window in config.layer_windows:
            if window is None:
                self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
                self.values.append(torch.zeros(shape, device=device, dtype=dtype))
            else:  # grows to W - 1 positions, then rolls
                self.keys.append(torch.zeros(shape[:2] + (0, shape[3]), device=device, dtype=dtype))
                self.values.append(torch.zeros(shape[:2] + (0, shape[3]), device=device, dtype=dtype))

    def attend(self, layer: int, q, k, v, positions):
        """Store this chunk's k, v (the storage step of this layer's kind), then attend q (positions
        `positions`) over every key it can see, in one attention call."""
        T = q.shape[2]
        if self.length + T > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {self.length + T} requested. "
                             f"Create the cache with a larger max_length")
        window = self.config.layer_windows[layer]
        if window is None:
            k, v = self.store_global(layer, k, v)
        else:
            k, v = self.store_windowed(layer, k, v, window)
        return self.attend_over(q, k, v, positions, window)

    def store_global(self, layer: int, k, v):
        """Write the chunk at its positions; return every key and value so far (B, H_kv, length + T, D)."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def store_windowed(self, layer: int, k, v, window: int):
        """Return the kept keys followed by the chunk's (B, H_kv, <= W - 1 + T, D); keep the last W - 1."""
        k = torch.cat([self.keys[layer], k], dim=2)
        v = torch.cat([self.values[layer], v], dim=2)
        keep = min(window - 1, k.shape[2])
        self.keys[layer] = k[:, :, k.shape[2] - keep:]
        self.values[layer] = v[:, :, v.shape[2] - keep:]
        return k, v

    def attend_over(self, q, k, v, positions, window: int | None):
        """Attend q (B, H, T, D) over k, v (B, H_kv, S, D): the S keys up to and including q's last position."""
        T, S = q.shape[2], k.shape[2]
        backend = self.config.attention_backend
        if window is not None and T > window and backend != "naive":
            return windowed_sdpa(q, k, v, window, cached=S - T)  # a long chunk: O(T * W)
        if window is None and backend != "naive":
            # Causal with an offset, built in one pass in the additive form SDPA uses: this (T, S)
            # matrix is the largest tensor of a long prefill. Row i sees keys up to i + S - T.
            mask = torch.full((T, S), float("-inf"), device=q.device, dtype=q.dtype).triu_(S - T + 1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        end = self.length + T  # the cache's length grows only after the last layer
        k_pos = torch.arange(end - S, end, device=q.device)
        mask = visible(positions[:, None], k_pos[None, :], window)  # (T, S): one chunk by its keys
        if backend == "naive":
            return masked_softmax_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@torch.no_grad()
def prefill(model: Transformer, tokens: torch.Tensor, cache: KVCache, chunk_size: int = 2048) -> torch.Tensor:
    """Feed tokens (B, T) through the cache chunk by chunk; logits (B, vocab) of the last position.

    No step builds more than a (chunk_size x T) mask, so a 64K-token prompt fits in memory.
    """
    for start in range(0, tokens.shape[1], chunk_size):
        hidden = model.hidden_states(tokens[:, start:start + chunk_size], cache)
    return model.lm_head(hidden[:, -1])  # only the last position: a chunk's logits can be gigabytes


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, eos_id: int | None = None, chunk_size: int = 2048,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue prompt (B, T): greedy when temperature is 0, else sampled (optionally top-k).

    Returns the new tokens (B, <= max_new_tokens); stops early when every row has produced eos_id.
    """
    B, T = prompt.shape
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, B, T + max_new_tokens, prompt.device, dtype)
    logits = prefill(model, prompt, cache, chunk_size)
    new_tokens, finished = [], torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        if temperature == 0:
            token = logits.argmax(dim=-1)
        else:
            logits = logits.float() / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        new_tokens.append(token)
        if eos_id is not None:
            finished |= token == eos_id
            if finished.all():
                break
        logits = model(token[:, None], cache)[:, -1]
    return torch.stack(new_tokens, dim=1)


# ----------------------------------------------------------------------------------------------
# Presets: the 26 OlmPool models at their release names, the three baselines, and smaller sizes

# name: (norm, qk_norm, n_kv_heads, context, mlp_hidden, sliding window). The architecture comes from
# the table in the paper's appendix (Bertsch et al. 2026; transcribed in docs/reference.md). Where a name
# disagrees with that table (H_post_LQK_8kv_4k_11k_SWA has MLP 13312; K_post_HQK_8kv_12k is pre-norm,
# as its Hugging Face class says), the table wins. "_fp8" marks pretraining with float8 linears,
# which changes numerics but not the architecture.
_OLMPOOL = {
    "A_post_HQK_8kv_8k_13k_SWA_fp8": ("post", "headwise", 8, 8192, 13312, True),
    "B_post_LQK_32kv_4k_11k_SWA": ("post", "layerwise", 32, 4096, 11008, True),
    "C_post_LQK_8kv_8k_13k_SWA": ("post", "layerwise", 8, 8192, 13312, True),
    "H_post_LQK_8kv_4k_11k_SWA": ("post", "layerwise", 8, 4096, 13312, True),
    "D_post_LQK_8kv_8k_13k_SWA": ("post", "layerwise", 8, 8192, 13312, True),
    "G_post_LQK_8kv_4k_14k_SWA": ("post", "layerwise", 8, 4096, 14336, True),
    "D_post_LQK_8kv_8k_13k_SWA_fp8": ("post", "layerwise", 8, 8192, 13312, True),
    "E_post_LQK_32kv_8k_11k_SWA_fp8": ("post", "layerwise", 32, 8192, 11008, True),
    "B_post_LQK_32kv_4k_11k": ("post", "layerwise", 32, 4096, 11008, False),
    "F_pre_8kv_8k_14k_SWA": ("pre", "none", 8, 8192, 14336, True),
    "G_pre_8kv_8k_14k_SWA": ("pre", "none", 8, 8192, 14336, True),
    "H_pre_LQK_32kv_8k_11k_SWA": ("pre", "layerwise", 32, 8192, 11008, True),
    "H_post_LQK_32kv_8k_11k_SWA_fp8": ("post", "layerwise", 32, 8192, 11008, True),
    "K_post_HQK_8kv_12k": ("pre", "headwise", 8, 8192, 12288, False),
    "H_post_HQK_32kv_8k_11k_SWA": ("post", "headwise", 32, 8192, 11008, True),
    "H_post_LQK_32kv_4k_11k": ("post", "layerwise", 32, 4096, 11008, False),
    "H_post_LQK_32kv_8k_11k_SWA": ("post", "layerwise", 32, 8192, 11008, True),  # = Olmo 3 7B
    "G_post_LQK_8kv_8k_14k": ("post", "layerwise", 8, 8192, 14336, False),
    "H_post_LQK_32kv_8k_11k": ("post", "layerwise", 32, 8192, 11008, False),
    "G_pre_4kv_8k_14k": ("pre", "none", 4, 8192, 14336, False),
    "G_pre_8kv_4k_14k": ("pre", "none", 8, 4096, 14336, False),
    "G_pre_LQK_8kv_8k_14k": ("pre", "layerwise", 8, 8192, 14336, False),
    "G_pre_8kv_8k_14k": ("pre", "none", 8, 8192, 14336, False),  # = Llama 3 8B
    "H_pre_32kv_8k_11k_SWA": ("pre", "none", 32, 8192, 11008, True),
    "I_pre_32kv_8k_12k": ("pre", "none", 32, 8192, 12288, False),
    "J_pre_16kv_8k_14k": ("pre", "none", 16, 8192, 14336, False),  # best; OLMo-core's code has MLP 13312
}

# Baselines at their 7B/8B shapes with the OlmPool vocabulary, so that only the architecture differs.
_BASELINES = {
    "llama3_like": dict(norm_placement="pre", qk_norm="none", n_kv_heads=8, mlp_hidden=14336, norm_eps=1e-5),
    "olmo3_like": dict(norm_placement="post", qk_norm="layerwise", n_kv_heads=32, mlp_hidden=11008,
                       window=4096),
    # 32 layers as in OlmPool's table (OLMo-core's constructor has 36: unresolved in our sources).
    "qwen3_like": dict(norm_placement="pre", qk_norm="headwise", n_kv_heads=8, mlp_hidden=12288),
}


def _olmpool_config(norm, qk_norm, kv, context, mlp, swa) -> dict:
    return dict(norm_placement=norm, qk_norm=qk_norm, n_kv_heads=kv, context_length=context, mlp_hidden=mlp,
                window=4096 if swa else None, norm_eps=1e-5 if norm == "pre" and qk_norm == "none" else 1e-6)


PRESETS: dict[str, dict] = {name: _olmpool_config(*spec) for name, spec in _OLMPOOL.items()} | _BASELINES

# Smaller sizes keep a preset's switches: the GQA ratio, the MLP-to-width ratio, and the ratio of
# window to context (both divided by `shrink`). Counts are of non-embedding parameters at MHA.
SIZES: dict[str, dict] = {
    "tiny": dict(n_layers=4, d_model=128, n_heads=8, head_dim=16, shrink=32),  # tests and CPU demos
    "20m": dict(n_layers=8, d_model=512, n_heads=8, head_dim=64, shrink=8),  # ~25M
    "150m": dict(n_layers=12, d_model=1024, n_heads=16, head_dim=64, shrink=4),  # ~150M
    "1b": dict(n_layers=16, d_model=2048, n_heads=16, head_dim=128, shrink=1),  # ~0.8B (+0.4B embeddings)
    "7b": dict(n_layers=32, d_model=4096, n_heads=32, head_dim=128, shrink=1),  # the published shapes
}


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.3)
    return f"did you mean {', '.join(close)}?" if close else f"choose from {', '.join(choices)}"


def preset(name: str, size: str = "7b", **overrides) -> ModelConfig:
    """The config of an OlmPool model or baseline, at a size; keyword overrides apply last."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; {_suggest(name, PRESETS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; {_suggest(size, SIZES)}")
    switches = dict(PRESETS[name])
    shape = dict(SIZES[size])
    shrink = shape.pop("shrink")
    gqa_ratio = 32 // switches["n_kv_heads"]  # every 7B preset has 32 query heads
    mlp_ratio = switches["mlp_hidden"] / 4096
    multiple = 32 if size == "tiny" else 64
    if size != "7b":
        switches["n_kv_heads"] = max(1, shape["n_heads"] // gqa_ratio)
        switches["mlp_hidden"] = multiple * math.ceil(mlp_ratio * shape["d_model"] / multiple)
    switches["context_length"] = switches.get("context_length", 8192) // shrink
    if switches.get("window"):
        switches["window"] //= shrink
    return ModelConfig(**(switches | shape | overrides))


# ----------------------------------------------------------------------------------------------
# Counting: parameters and FLOPs from the config alone, and a one-screen summary


def count_parameters(config: ModelConfig, embeddings: bool = True) -> int:
    """Parameter count from the config alone (equals sum(p.numel()) of the built model)."""
    q_size, kv_size = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    attention = config.d_model * (q_size + 2 * kv_size) + q_size * config.d_model
    qk_norm = {"none": 0, "layerwise": q_size + kv_size, "headwise": 2 * config.head_dim}[config.qk_norm]
    mlp = 3 * config.d_model * config.mlp_hidden
    per_layer = attention + qk_norm + mlp + 2 * config.d_model
    total = config.n_layers * per_layer + config.d_model  # final norm
    if embeddings:
        total += 2 * config.vocab_size * config.d_model  # untied input embedding and LM head
    return total


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length seq_len, counting windows.

    Matmuls: 6 per weight (the LM head included, the embedding lookup not). Attention: 12 per
    (head dim x key) pair per query head, where a query at position i sees min(W, i + 1) keys,
    averaged over the sequence: so sliding windows are credited only with the work they do.
    """
    matmul_params = count_parameters(config, embeddings=False) + config.vocab_size * config.d_model
    attention = 0.0
    for window in config.layer_windows:
        w = seq_len if window is None else min(window, seq_len)
        mean_keys = (seq_len * w - w * (w - 1) / 2) / seq_len  # mean over i of min(w, i + 1)
        attention += 12 * config.n_heads * config.head_dim * mean_keys
    return 6 * matmul_params + attention


def describe(config: ModelConfig) -> str:
    """A one-screen summary of an architecture."""
    windows = config.layer_windows
    n_global = sum(w is None for w in windows)
    attention = "all layers global" if config.window is None else (
        f"window {config.window} on {len(windows) - n_global} layers, {n_global} global")
    scaling = "none" if config.rope_scaling == "none" else (
        f"{config.rope_scaling} x{config.rope_factor:g} on {config.rope_scaling_layers} layers "
        f"from {config.original_context}")
    return "\n".join([
        f"layers {config.n_layers}, d_model {config.d_model}, heads {config.n_heads} (kv {config.n_kv_heads}), "
        f"head_dim {config.head_dim}, MLP {config.mlp_hidden}, vocab {config.vocab_size}",
        f"norm {config.norm_placement}, QK norm {config.qk_norm}, eps {config.norm_eps:g}",
        f"attention: {attention}; context {config.context_length}; backend {config.attention_backend}",
        f"RoPE theta {config.rope_theta:g}" + (f" (local {config.rope_theta_local:g})" if config.rope_theta_local else "")
        + f", scaling {scaling}",
        f"parameters {count_parameters(config) / 1e9:.3f}B "
        f"({count_parameters(config, embeddings=False) / 1e9:.3f}B without embeddings)",
    ])


if __name__ == "__main__":
    print(f"{'preset':34s} {'params':>8s} {'GFLOP/token @ctx':>17s}")
    for name in PRESETS:
        config = preset(name)
        print(f"{name:34s} {count_parameters(config) / 1e9:7.2f}B {flops_per_token(config, config.context_length) / 1e9:17.1f}")
