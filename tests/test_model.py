"""The model's specification: every property olmpool.py promises, one test each."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import olmpool
from olmpool import ModelConfig, Transformer, attention, count_parameters, preset

BACKENDS = ["sdpa", "flex", "triton"]


def tiny(**overrides) -> ModelConfig:
    """A small model with every switch on (post norm, layerwise QK norm, GQA, windows)."""
    base = dict(vocab_size=97, n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, mlp_hidden=48,
                window=5, context_length=32, attention_backend="naive")
    return ModelConfig(**(base | overrides))


def random_tokens(config, batch=2, length=24, seed=0):
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Attention backends all compute the naive reference


@st.composite
def attention_inputs(draw, max_len=40):
    B = draw(st.integers(1, 2))
    n_kv = draw(st.sampled_from([1, 2]))
    H = n_kv * draw(st.sampled_from([1, 2, 3]))
    T = draw(st.integers(1, max_len))
    D = draw(st.sampled_from([16, 32]))
    window = draw(st.one_of(st.none(), st.integers(1, T + 3)))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (H, n_kv, n_kv))
    return q, k, v, window


def attention_and_grads(backend, q, k, v, window, dtype=torch.float32, doc_ids=None):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, window, backend, doc_ids)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=dtype)).view_as(out))  # a fixed, varied dO
    return out, q.grad, k.grad, v.grad


@settings(max_examples=40)
@given(inputs=attention_inputs())
def test_sdpa_backend_equals_naive_outputs_and_gradients(inputs):
    q, k, v, window = inputs
    expected = attention_and_grads("naive", q, k, v, window, torch.float64)
    got = attention_and_grads("sdpa", q, k, v, window, torch.float64)
    for name, e, g in zip(("out", "dq", "dk", "dv"), expected, got):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-7, msg=f"sdpa {name} differs from naive")


@settings(max_examples=25)
@given(inputs=attention_inputs())
def test_flex_backend_equals_naive_outputs(inputs):
    """Gradients too where FlexAttention has a backward (not on CPU in torch 2.13)."""
    q, k, v, window = inputs
    if torch.cuda.is_available():
        q, k, v = q.cuda(), k.cuda(), v.cuda()
        expected = attention_and_grads("naive", q, k, v, window, torch.float64)
        got = attention_and_grads("flex", q, k, v, window, torch.float64)
    else:
        expected, got = [attention(q, k, v, window, "naive")], [attention(q, k, v, window, "flex")]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-7, msg="flex differs from naive")


@settings(max_examples=8)
@given(inputs=attention_inputs(max_len=24))
def test_triton_backend_equals_naive_outputs_and_gradients(inputs):
    q, k, v, window = inputs
    pytest.importorskip("triton", reason="triton is a dev requirement")
    expected = attention_and_grads("naive", q, k, v, window, torch.float32)
    got = attention_and_grads("triton", q, k, v, window, torch.float32)
    for name, e, g in zip(("out", "dq", "dk", "dv"), expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=f"triton {name} differs from naive")


@pytest.mark.parametrize("window", [1, 3, 7, 16, 100])
@pytest.mark.parametrize("length", [1, 15, 17, 50])
def test_windowed_sdpa_edge_cases_equal_naive(window, length):
    """W = 1, W >= T and T not a multiple of the chunk length, checked exhaustively."""
    g = torch.Generator().manual_seed(window * 100 + length)
    q, k, v = (torch.randn(1, h, length, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    expected = attention(q, k, v, window, "naive")
    torch.testing.assert_close(olmpool.windowed_sdpa(q, k, v, window), expected)
    torch.testing.assert_close(attention(q, k, v, window, "sdpa"), expected)


@pytest.mark.parametrize("window, cached", [(1, 0), (4, 1), (4, 3), (9, 8), (9, 5)])
def test_windowed_sdpa_with_cached_keys_equals_the_tail_of_full_attention(window, cached):
    """Chunked prefill: queries continue after `cached` keys kept from the previous chunk."""
    g = torch.Generator().manual_seed(window + cached)
    q, k, v = (torch.randn(1, h, 30, 16, generator=g, dtype=torch.float64) for h in (4, 1, 1))
    start = 12
    tail = olmpool.windowed_sdpa(q[:, :, start:], k[:, :, start - cached:], v[:, :, start - cached:], window, cached)
    # The same keys seen by the reference: the sequence from the first cached key onward.
    sub = slice(start - cached, None)
    expected = attention(q[:, :, sub], k[:, :, sub], v[:, :, sub], window, "naive")[:, :, cached:]
    torch.testing.assert_close(tail, expected)
    if cached >= window - 1:  # every key the tail needs is there: equal to attention over everything
        torch.testing.assert_close(tail, attention(q, k, v, window, "naive")[:, :, start:])


def test_window_of_one_returns_values():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    for backend in ["naive", "sdpa", "flex"]:
        torch.testing.assert_close(attention(q, k, v, 1, backend), v)


def test_window_counts_the_query_itself():
    """Window W: query i sees keys i - W < j <= i, exactly W keys once i >= W - 1."""
    mask = olmpool.visible(torch.arange(10)[:, None], torch.arange(10)[None, :], window=3)
    assert mask.sum(dim=1).tolist() == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]
    assert mask[5].nonzero().flatten().tolist() == [3, 4, 5]


def test_window_matches_hugging_face_sliding_window_convention():
    masking = pytest.importorskip("transformers.masking_utils")
    hf_mask = masking.sliding_window_causal_mask_function(3)
    ours = olmpool.visible(torch.arange(8)[:, None], torch.arange(8)[None, :], window=3)
    for q in range(8):
        for k in range(8):
            assert bool(hf_mask(0, 0, torch.tensor(q), torch.tensor(k))) == bool(ours[q, k]), (q, k)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_document_masking_equals_separate_documents(backend):
    """With doc_ids, a sequence of two documents gives the same outputs as each document alone."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 20, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    doc_ids = torch.tensor([[0] * 8 + [1] * 12])
    for window in [None, 5]:
        together = attention(q, k, v, window, backend, doc_ids)
        first = attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], window, "naive")
        second = attention(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], window, "naive")
        torch.testing.assert_close(together, torch.cat([first, second], dim=2))


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_model_backends_equal_naive(backend):
    config = tiny(n_layers=4)
    model = Transformer(config).requires_grad_(backend != "flex")  # flex has no CPU backward
    tokens = random_tokens(config, length=21)
    expected = model(tokens)
    model.config.attention_backend = backend
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)


def test_model_triton_backend_equals_naive():
    pytest.importorskip("triton", reason="triton is a dev requirement")
    config = tiny(n_layers=4, head_dim=16, d_model=64)
    model = Transformer(config)
    tokens = random_tokens(config, batch=1, length=19)
    expected = model(tokens)
    model.config.attention_backend = "triton"
    torch.testing.assert_close(model(tokens), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# GQA and QK norm


def mha_reference(q, k, v):
    """Multi-head causal attention written head by head, with no GQA machinery at all."""
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for h in range(q.shape[1]):
        scores = q[:, h] @ k[:, h].transpose(-1, -2) / math.sqrt(q.shape[-1])
        heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, h])
    return torch.stack(heads, dim=1)


@pytest.mark.parametrize("backend", ["naive", "sdpa", "flex"])
def test_gqa_with_all_kv_heads_equals_mha(backend):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 11, 16, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, None, backend), mha_reference(q, k, v))


@pytest.mark.parametrize("qk_norm", ["none", "layerwise", "headwise"])
def test_gqa_equals_mha_with_kv_weights_repeated_per_group(qk_norm):
    gqa_config = tiny(n_heads=4, n_kv_heads=2, qk_norm=qk_norm)
    mha_config = tiny(n_heads=4, n_kv_heads=4, qk_norm=qk_norm)
    gqa, mha = Transformer(gqa_config), Transformer(mha_config, seed=None)
    groups, head_dim = 2, gqa_config.head_dim
    state = gqa.state_dict()
    for name, value in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (kv_heads * head_dim, d_model)
            heads = value.view(gqa_config.n_kv_heads, head_dim, -1)
            state[name] = heads.repeat_interleave(groups, dim=0).reshape(-1, value.shape[1])
        elif name.endswith("k_norm.weight") and qk_norm == "layerwise":
            state[name] = value.view(gqa_config.n_kv_heads, head_dim).repeat_interleave(groups, 0).flatten()
    mha.load_state_dict(state)
    tokens = random_tokens(gqa_config)
    torch.testing.assert_close(mha(tokens), gqa(tokens), rtol=1e-5, atol=1e-5)


def test_headwise_qk_norm_equals_layerwise_with_one_head():
    headwise = Transformer(tiny(n_heads=1, n_kv_heads=1, head_dim=16, qk_norm="headwise"))
    layerwise = Transformer(tiny(n_heads=1, n_kv_heads=1, head_dim=16, qk_norm="layerwise"), seed=None)
    layerwise.load_state_dict(headwise.state_dict())
    for block in headwise.layers:  # gains that differ from 1, so the norm's axis matters
        block.attention.q_norm.weight.data.uniform_(0.5, 1.5)
    layerwise.load_state_dict(headwise.state_dict())
    tokens = random_tokens(headwise.config)
    torch.testing.assert_close(layerwise(tokens), headwise(tokens))


def test_headwise_and_layerwise_qk_norm_differ_with_many_heads():
    """The axis matters: with several heads the two norms give different models."""
    headwise = Transformer(tiny(qk_norm="headwise"))
    layerwise = Transformer(tiny(qk_norm="layerwise"), seed=None)
    state = headwise.state_dict()
    for name in list(state):
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            state[name] = layerwise.state_dict()[name].fill_(1.0)
    layerwise.load_state_dict(state)
    tokens = random_tokens(headwise.config)
    assert not torch.allclose(layerwise(tokens), headwise(tokens), atol=1e-4)


def test_norm_placement_changes_the_function_with_the_same_weights():
    pre, post = Transformer(tiny(norm_placement="pre")), Transformer(tiny(norm_placement="post"))
    post.load_state_dict(pre.state_dict())
    tokens = random_tokens(pre.config)
    assert not torch.allclose(pre(tokens), post(tokens), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Causality and locality


@pytest.mark.parametrize("overrides", [dict(), dict(window=None), dict(norm_placement="pre", qk_norm="headwise")])
def test_future_tokens_never_change_past_logits(overrides):
    config = tiny(attention_backend="sdpa", **overrides)
    model = Transformer(config)
    tokens = random_tokens(config, length=20)
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % config.vocab_size
    torch.testing.assert_close(model(changed)[:, :12], model(tokens)[:, :12])
    assert not torch.allclose(model(changed)[:, 12:], model(tokens)[:, 12:])


def test_tokens_beyond_reach_have_no_effect_and_tokens_within_do():
    """All layers windowed: a logit at t depends on tokens t - n_layers * (W - 1) .. t only."""
    config = tiny(window=4, global_every=0, n_layers=3, attention_backend="sdpa")
    assert config.layer_windows == [4, 4, 4]
    model = Transformer(config)
    reach = config.n_layers * (config.window - 1)  # 9 positions back
    tokens = random_tokens(config, batch=1, length=30)
    t = 25
    base = model(tokens)[0, t]
    beyond, within = tokens.clone(), tokens.clone()
    beyond[0, t - reach - 1] = (beyond[0, t - reach - 1] + 1) % config.vocab_size
    within[0, t - reach] = (within[0, t - reach] + 1) % config.vocab_size
    torch.testing.assert_close(model(beyond)[0, t], base, rtol=0, atol=0)
    assert not torch.allclose(model(within)[0, t], base)


def test_layer_pattern_is_three_local_to_one_global_with_last_layer_global():
    config = tiny(n_layers=10, window=8)
    assert config.layer_windows == [8, 8, 8, None, 8, 8, 8, None, 8, None]
    assert [i for i, w in enumerate(preset("olmo3_like").layer_windows) if w is None] == list(range(3, 32, 4))


# ----------------------------------------------------------------------------------------------
# RoPE


SCALINGS = [dict(rope_scaling="none"), dict(rope_scaling="abf", rope_factor=16.0),
            dict(rope_scaling="pi", rope_factor=4.0), dict(rope_scaling="yarn", rope_factor=8.0),
            dict(rope_scaling="llama3", rope_factor=8.0)]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_scaling"])
def test_rope_is_relative(scaling):
    """Shifting every position by the same amount leaves every q.k score unchanged."""
    config = tiny(head_dim=32, rope_theta=10_000.0, **scaling)
    inv_freq, factor = olmpool.rope_frequencies(config, is_global=True)
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 16, 32, generator=g), torch.randn(1, 2, 16, 32, generator=g)
    scores = []
    for shift in (0, 1000):
        cos, sin = olmpool.rope_cos_sin(torch.arange(16) + shift, inv_freq, factor)
        scores.append(olmpool.apply_rope(q, cos, sin) @ olmpool.apply_rope(k, cos, sin).transpose(-1, -2))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-3)  # float32 angles near 1000


@pytest.mark.parametrize("method", ["abf", "pi", "yarn", "llama3"])
def test_every_rope_scaling_with_factor_one_is_the_identity(method):
    plain = olmpool.rope_frequencies(tiny(head_dim=64), is_global=True)
    scaled = olmpool.rope_frequencies(tiny(head_dim=64, rope_scaling=method, rope_factor=1.0), is_global=True)
    torch.testing.assert_close(scaled[0], plain[0], rtol=0, atol=0)
    assert scaled[1] == plain[1] == 1.0


def test_rope_scaling_applies_to_global_layers_only_unless_asked():
    config = tiny(head_dim=64, rope_scaling="yarn", rope_factor=8.0)
    plain = olmpool.rope_frequencies(tiny(head_dim=64), is_global=True)[0]
    assert torch.equal(olmpool.rope_frequencies(config, is_global=False)[0], plain)
    assert not torch.equal(olmpool.rope_frequencies(config, is_global=True)[0], plain)
    config_all = tiny(head_dim=64, rope_scaling="yarn", rope_factor=8.0, rope_scaling_layers="all")
    assert not torch.equal(olmpool.rope_frequencies(config_all, is_global=False)[0], plain)


def test_rope_pairs_dimension_d_with_d_plus_half():
    """The rotate-half layout: position 1 rotates the pair (x[d], x[d + D/2]) by angle inv_freq[d]."""
    config = tiny(head_dim=8)
    inv_freq, _ = olmpool.rope_frequencies(config, is_global=True)
    x = torch.zeros(1, 1, 1, 8)
    x[..., 1] = 1.0  # the unit vector of dimension 1; its partner is dimension 5
    cos, sin = olmpool.rope_cos_sin(torch.tensor([1]), inv_freq)
    rotated = olmpool.apply_rope(x, cos, sin).flatten()
    angle = inv_freq[1]
    expected = torch.zeros(8)
    expected[1], expected[5] = torch.cos(angle), torch.sin(angle)
    torch.testing.assert_close(rotated, expected)


# ----------------------------------------------------------------------------------------------
# Inference: KV cache and chunked prefill


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("overrides", [dict(), dict(window=None), dict(window=1), dict(n_kv_heads=1, window=3)])
def test_kv_cache_decoding_and_chunked_prefill_equal_full_forward(backend, overrides):
    config = tiny(attention_backend=backend, **overrides)
    model = Transformer(config)
    tokens = random_tokens(config, length=23)  # much longer than the window of 5
    full = model(tokens)
    cache = olmpool.KVCache(config, 2, max_length=23)
    prefix = olmpool.prefill(model, tokens[:, :13], cache, chunk_size=4)
    torch.testing.assert_close(prefix, full[:, 12], rtol=1e-5, atol=1e-5)
    for t in range(13, 23):  # then one token at a time
        torch.testing.assert_close(model(tokens[:, t:t + 1], cache)[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def test_windowed_layers_cache_only_their_last_keys():
    config = tiny(window=5)
    model = Transformer(config)
    cache = olmpool.KVCache(config, 2, max_length=40)
    olmpool.prefill(model, random_tokens(config, length=40), cache, chunk_size=7)
    for window, keys in zip(config.layer_windows, cache.keys):
        assert keys.shape[2] == (40 if window is None else window - 1)


def test_generate_greedy_equals_argmax_of_full_forward():
    config = tiny(attention_backend="sdpa")
    model = Transformer(config)
    prompt = random_tokens(config, batch=2, length=9)
    new = olmpool.generate(model, prompt, max_new_tokens=6, chunk_size=4)
    sequence = prompt
    for _ in range(6):  # the slow way: a full forward per token
        sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new, sequence[:, 9:])


def test_generate_sampling_is_reproducible_with_a_generator_and_respects_top_k():
    config = tiny(attention_backend="sdpa")
    model = Transformer(config)
    prompt = random_tokens(config, batch=1, length=5)
    runs = [olmpool.generate(model, prompt, 8, temperature=1.0, top_k=1,
                             generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], olmpool.generate(model, prompt, 8))  # top-1 sampling is greedy


# ----------------------------------------------------------------------------------------------
# Presets, parameters, FLOPs, validation


@pytest.mark.parametrize("kv, mlp, billions", [(32, 11008, 7.30), (8, 14336, 7.80), (8, 13312, 7.40)])
def test_published_parameter_counts(kv, mlp, billions):
    config = ModelConfig(n_kv_heads=kv, mlp_hidden=mlp, vocab_size=100_352)
    assert abs(count_parameters(config) / 1e9 - billions) / billions < 0.005


def test_every_olmpool_preset_matches_its_published_count():
    published = {11008: 7.30, 14336: 7.80, 13312: 7.40}  # SITE's table, by MLP width at 8 or 32 kv
    for name, (_, _, kv, _, mlp, _) in olmpool._OLMPOOL.items():
        config = preset(name)
        assert config.n_kv_heads == kv and config.mlp_hidden == mlp, name
        if (kv, mlp) in [(32, 11008), (8, 14336), (8, 13312)]:
            assert abs(count_parameters(config) / 1e9 - published[mlp]) / published[mlp] < 0.005, name
    assert len(olmpool._OLMPOOL) == 26


@pytest.mark.parametrize("name", ["olmo3_like", "G_pre_4kv_8k_14k", "K_post_HQK_8kv_12k"])
@pytest.mark.parametrize("size", ["tiny", "20m"])
def test_smaller_sizes_keep_the_switches_and_count_exactly(name, size):
    big, small = preset(name), preset(name, size)
    for switch in ("norm_placement", "qk_norm", "rope_theta", "norm_eps"):
        assert getattr(small, switch) == getattr(big, switch)
    assert (small.window is None) == (big.window is None)
    assert small.n_heads // small.n_kv_heads == min(big.n_heads // big.n_kv_heads, small.n_heads)
    if big.window:
        assert small.window / small.context_length == big.window / big.context_length
    model = Transformer(small, seed=None)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(small)


def test_unknown_preset_suggests_the_closest_names():
    with pytest.raises(ValueError, match="did you mean.*H_post_LQK_32kv_8k_11k_SWA"):
        preset("H_post_LQK_32kv_8k_11K_SWA")
    with pytest.raises(ValueError, match="unknown size '7B'.*7b"):
        preset("olmo3_like", size="7B")


def test_flops_count_only_the_keys_each_query_sees():
    config = tiny(window=3, n_layers=4)
    T = 10
    matmuls = 6 * (count_parameters(config, embeddings=False) + config.vocab_size * config.d_model)
    keys = sum(sum(min(i + 1, w or T) for i in range(T)) for w in config.layer_windows)  # brute force
    expected = matmuls + 12 * config.n_heads * config.head_dim * keys / T
    assert olmpool.flops_per_token(config, T) == pytest.approx(expected)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_heads=32, n_kv_heads=3), "n_kv_heads=3 does not divide n_heads=32; use one of 1, 2, 4, 8, 16, 32"),
    (dict(qk_norm="per_head"), "qk_norm='per_head' is not one of 'none', 'layerwise', 'headwise'"),
    (dict(norm_placement="sandwich"), "norm_placement='sandwich' is not one of 'pre', 'post'"),
    (dict(window=0), "window=0 must be a positive number of keys, or None"),
    (dict(rope_scaling="ntk"), "rope_scaling='ntk' is not one of"),
    (dict(rope_factor=0.5), "rope_factor=0.5 must be >= 1"),
    (dict(head_dim=7), "head_dim=7 must be even"),
    (dict(attention_backend="flash"), "attention_backend='flash' is not one of"),
])
def test_bad_configs_fail_fast_naming_the_value_and_the_fix(overrides, message):
    with pytest.raises(ValueError) as error:
        tiny(**overrides)
    assert message in str(error.value)


def test_init_is_seeded_and_truncated():
    a, b, c = Transformer(tiny(), seed=1), Transformer(tiny(), seed=1), Transformer(tiny(), seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc)
            assert pa.abs().max() <= 0.06 + 1e-7 and 0.015 < pa.std() < 0.025, name
        else:
            assert torch.all(pa == 1), name


def test_import_needs_only_torch():
    import subprocess
    import sys

    code = ("import sys, olmpool; bad = [m for m in ('triton', 'transformers', 'safetensors', 'kernels') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=olmpool.__file__.rsplit("/", 1)[0])
    assert result.returncode == 0, result.stdout + result.stderr


def test_initial_values_are_a_fresh_transformers_parameters_name_by_name():
    for config in (tiny(), tiny(qk_norm="headwise", norm_placement="pre"), tiny(qk_norm="none", n_layers=1)):
        for seed in (0, 7):
            model = Transformer(config, seed=seed)
            values = list(olmpool.initial_values(config, seed))
            assert [name for name, _ in values] == [name for name, _ in model.named_parameters()]
            for (name, value), parameter in zip(values, model.parameters()):
                assert torch.equal(value, parameter), (name, seed)


def test_every_config_field_has_one_help_text_for_its_flag():
    for field in dataclasses.fields(ModelConfig):
        assert field.metadata["help"].strip(), field.name
    assert '"headwise" (Qwen 3, Gemma 3)' in ModelConfig.__dataclass_fields__["qk_norm"].metadata["help"]


def test_rope_fields_are_exactly_the_fields_that_change_rope():
    yarn = tiny(head_dim=32, context_length=4096, rope_scaling="yarn", rope_factor=8.0)
    llama3 = dataclasses.replace(yarn, rope_scaling="llama3")
    changes = {"rope_theta": (yarn, 1e6), "rope_theta_local": (yarn, 1e4), "rope_scaling": (yarn, "pi"),
               "rope_factor": (yarn, 4.0), "rope_scaling_layers": (yarn, "all"), "rope_original_context": (yarn, 512),
               "yarn_beta_fast": (yarn, 8.0), "yarn_beta_slow": (yarn, 0.25), "yarn_attention_factor": (yarn, 1.5),
               "llama3_low_freq_factor": (llama3, 2.0), "llama3_high_freq_factor": (llama3, 8.0)}
    assert tuple(changes) == olmpool.ROPE_FIELDS

    def rope(config):  # both layer kinds: frequencies and attention scale
        return [(f.tolist(), scale) for f, scale in (olmpool.rope_frequencies(config, g) for g in (True, False))]

    for name, (config, value) in changes.items():
        assert rope(dataclasses.replace(config, **{name: value})) != rope(config), name


# ----------------------------------------------------------------------------------------------
# The loss: chunked cross-entropy equals the full one


def full_loss_sums(logits, targets):
    """The reference: full fp32 logits, ignored targets (< 0) dropped."""
    logits = logits.float()
    valid = targets >= 0
    normalizer = torch.logsumexp(logits, dim=-1)
    target_logits = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return ((normalizer - target_logits) * valid).sum(), (normalizer.pow(2) * valid).sum()


@settings(max_examples=40)
@given(n=st.integers(1, 40), vocab=st.integers(2, 50), width=st.integers(1, 12), chunk=st.integers(1, 50),
       ignored=st.lists(st.booleans(), min_size=40, max_size=40), seed=st.integers(0, 2**16))
def test_chunked_cross_entropy_equals_the_full_one_in_value_and_gradient(n, vocab, width, chunk, ignored, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width, generator=generator, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(vocab, width, generator=generator).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=generator)
    targets[torch.tensor(ignored[:n])] = -100
    z_weight = 0.37

    ce, z = full_loss_sums(hidden @ weight.T, targets)
    (ce + z_weight * z).backward()
    expected = ce.detach(), z.detach(), hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    sums = olmpool.ChunkedCrossEntropy.apply(hidden, weight, targets, chunk)  # from hidden states and the LM head
    (sums[0] + z_weight * sums[1]).backward()
    torch.testing.assert_close(sums[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums[1], expected[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, expected[3], rtol=1e-5, atol=1e-5)

    logits = (hidden @ weight.T).detach().reshape(1, n, vocab).requires_grad_()  # from logits: olmpool.loss_sums
    ce, z = olmpool.loss_sums(logits, targets.reshape(1, n), chunk_size=chunk)
    (ce + z_weight * z).backward()
    reference = logits.detach().clone().requires_grad_()
    ce_full, z_full = full_loss_sums(reference, targets.reshape(1, n))
    (ce_full + z_weight * z_full).backward()
    torch.testing.assert_close(ce, ce_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad, reference.grad, rtol=1e-5, atol=1e-6)


def test_the_models_chunked_loss_equals_the_loss_of_its_logits():
    model = Transformer(ModelConfig(vocab_size=300, n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                                    mlp_hidden=64, window=8, context_length=32), seed=1)
    tokens = torch.randint(0, 300, (2, 41), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    ce, z = model(inputs, targets=targets, loss_chunk=7)
    ce.backward()
    chunked = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    ce_full, z_full = full_loss_sums(model(inputs), targets)
    ce_full.backward()
    torch.testing.assert_close(ce, ce_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, z_full, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():  # float32 sums in another order: error scales with the largest entry
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-4, atol=1e-6 * max(scale, 1.0), msg=name)
    assert type(model.lm_head).forward is torch.nn.Linear.forward and "forward" not in vars(model.lm_head)


def test_activation_checkpointing_keeps_names_losses_and_gradients_exactly():
    config = tiny(attention_backend="sdpa")
    tokens = random_tokens(config, length=25)
    results = []
    for checkpointing in (False, True):
        model = Transformer(config, seed=3)
        for block in model.layers:
            block.activation_checkpointing = checkpointing
        ce, z = model(tokens[:, :-1], targets=tokens[:, 1:], loss_chunk=5)
        (ce + 1e-4 * z).backward()
        results.append((ce, z, {name: p.grad for name, p in model.named_parameters()}, model.state_dict().keys()))
    (ce, z, grads, keys), (ce_ac, z_ac, grads_ac, keys_ac) = results
    assert torch.equal(ce, ce_ac) and torch.equal(z, z_ac) and list(keys) == list(keys_ac)
    for name in grads:
        assert torch.equal(grads[name], grads_ac[name]), name


# ----------------------------------------------------------------------------------------------
# olmpool.py alone: torch and the standard library only


ALONE = """
import olmpool, torch
config = olmpool.preset("H_post_LQK_32kv_8k_11k_SWA", size="tiny", n_layers=2)
model = olmpool.Transformer(config)
tokens = torch.randint(0, config.vocab_size, (1, 12))
print("logits", tuple(model(tokens).shape))
model.config.attention_backend = "triton"
try:
    model(tokens)
except ModuleNotFoundError as error:
    print("triton:", error)
"""


def test_olmpool_py_copied_alone_runs_a_forward_and_the_triton_backend_says_where_kernels_py_is(tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    shutil.copy(olmpool.__file__, tmp_path / "olmpool.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", ALONE], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "logits (1, 12, 100352)" in done.stdout
    triton_line = done.stdout.split("triton:", 1)[1]
    for words in ("kernels.py", "beside olmpool.py", "'sdpa', 'flex' or 'naive'"):
        assert words in triton_line, triton_line
