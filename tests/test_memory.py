"""Tests for memory.py: the plan per GPU says what fits, and its saved activations are autograd's."""

import pytest

import extend
import memory
import olmpool
from olmpool import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# --dry_run


def test_the_7b_plan_at_64k_on_8_gpus_needs_fsdp_and_says_what_fits(capsys):
    config = extend.extended_config(olmpool.preset("H_post_LQK_32kv_8k_11k_SWA", "7b", attention_backend="flex"),
                                    "olmpool", 65536)
    plan = memory.plan_memory(config, 65536, 1, 8, fsdp=True, activation_checkpointing=True, loss_chunk=4096)
    assert plan.total < 80 * 2**30
    text = memory.memory_plan(config, seq_len=65536, micro_batch=1, gpus=8, fsdp=False, activation_checkpointing=False,
                              loss_chunk=4096, gpu_memory=80.0)  # DDP, no checkpointing
    assert "does NOT fit" in text and "--fsdp --activation_checkpointing" in text
    for line in ("parameters", "gradients", "optimizer", "saved activations", "largest transient"):
        assert line in text


def test_the_planned_saved_activations_match_autograds_within_5_percent():
    config = ModelConfig(vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16,
                         mlp_hidden=192, window=64, context_length=512)
    measured = memory.measure_peak(config, 512, 1, activation_checkpointing=False, loss_chunk=4096)
    planned = memory.plan_memory(config, 512, 1, 1, False, False, 4096, activation_bytes=4).activations
    assert measured["saved_activations"] == pytest.approx(planned, rel=0.05)
