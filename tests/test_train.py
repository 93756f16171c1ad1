"""Tests for train.py: the OlmPool control (same init, same data), exact resume, one process equals
many, checkpoints that refuse the wrong architecture, and errors that name the fix.

Runs in-process where it can (a step of the small model below takes a fraction of a second) and
through torchrun (gloo, CPU) where processes are the point.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without a conftest
import data  # noqa: E402
import extend  # noqa: E402
import olmpool  # noqa: E402
import settings  # noqa: E402
import train  # noqa: E402
from checkpoint import checkpoints_in  # noqa: E402

# A small model (the vocabulary stays dolma2's 100,352) on short sequences: 64 tokens per step.
SMALL = ["--d_model", "32", "--n_layers", "2", "--n_heads", "4", "--head_dim", "8", "--mlp_hidden", "64",
         "--seq_len", "16", "--batch_tokens", "64", "--micro_batch", "2", "--eval_every", "0",
         "--log_every", "100", "--peak_flops", "1e12", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The built-in corpus cut to 300K tokens: enough for a val split of one document."""
    return data.prepare_builtin_corpus(tmp_path_factory.mktemp("corpus"), max_tokens=300_000, progress=False)


def run(corpus, out, *flags):
    """train.train in this process; returns its summary."""
    return train.train(train.parse_args([*SMALL, "--data", str(corpus), "--out", str(out), *flags]))


def torchrun(corpus, out, *flags, nproc=2, timeout=240):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "train.py", *SMALL, "--data", str(corpus), "--out", str(out), *flags]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(checkpoint):
    return load_file(Path(checkpoint) / "model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ----------------------------------------------------------------------------------------------
# The command line


def test_help_lists_every_model_switch_with_olmpools_comment(capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(["--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split()) + " "  # argparse wraps lines to the terminal
    for field in olmpool.ModelConfig.__dataclass_fields__:
        assert f"--{field} " in text, field
    for flag in ("--preset", "--size", "--gqa", "--swa", "--fsdp", "--compile", "--resume", "--init_from", "torchrun"):
        assert flag in text
    assert '"headwise" (Qwen 3, Gemma 3)' in text  # the help of --qk_norm is the field's comment
    assert "every 4th layer is global (3 local : 1 global) and so is the last; 0: no global layer" in text


def test_explicit_flags_override_the_preset_and_gqa_sets_kv_heads():
    config = train.model_config(train.parse_args(["--preset", "llama3_like", "--qk_norm", "headwise", "--gqa", "4"]))
    assert (config.norm_placement, config.qk_norm, config.n_heads, config.n_kv_heads) == ("pre", "headwise", 8, 2)
    assert train.model_config(train.parse_args(["--preset", "llama3_like", "--swa"])).window == 4096 // 32
    assert train.model_config(train.parse_args(["--window", "none"])).window is None
    assert train.model_config(train.parse_args(["--window", "64", "--n_layers", "3"])).layer_windows == [64, 64, None]


def test_settings_written_back_as_flags_parse_to_the_same_settings():
    for flags in ([], ["--qk_norm", "headwise", "--gqa", "4", "--window", "none", "--steps", "7", "--mask_documents",
                       "--lr", "1e-3", "--init_from", "hf:/x", "--peak_flops", "1e12"]):
        parsed = train.parse_args(flags)
        assert train.parse_args(settings.to_argv(parsed)) == parsed
    assert settings.to_argv({"source": "/a", "seq_len": 64, "fsdp": True, "lr": None}, extend.ExtendConfig) == [
        "--from", "/a", "--seq_len", "64", "--fsdp"]


def test_saved_settings_of_any_age_read_back_with_defaults_for_what_they_lack():
    saved = settings.to_record(train.parse_args(["--gqa", "2", "--steps", "9", "--d_model", "64"]))
    assert settings.from_record(settings.TrainConfig, saved) == train.parse_args(["--gqa", "2", "--steps", "9",
                                                                                   "--d_model", "64"])
    older = settings.from_record(settings.TrainConfig, {"steps": 9, "a_flag_since_removed": 1})
    assert older == settings.TrainConfig(steps=9)


def test_gqa_that_does_not_divide_n_heads_is_refused_naming_the_valid_values(capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(["--gqa", "3"])
    assert exit.value.code == 2
    assert "--gqa 3 does not divide n_heads=8; use one of 1, 2, 4, 8" in capsys.readouterr().err


def test_a_bad_value_of_a_model_switch_is_refused_naming_the_choices(capsys):
    with pytest.raises(SystemExit):
        train.main(["--qk_norm", "rowwise"])
    assert "invalid choice: 'rowwise'" in capsys.readouterr().err


def test_a_global_batch_that_does_not_split_is_refused_with_the_numbers():
    config = olmpool.preset("llama3_like", "tiny")
    with pytest.raises(train.TrainError, match=r"--batch_tokens 1000 is not a whole number of sequences of seq_len=256"):
        train.batch_plan(train.parse_args(["--batch_tokens", "1000"]), config, 1)
    with pytest.raises(train.TrainError, match=r"8 sequences .* does not split into 4 processes x --micro_batch 4; "
                                               r"use --batch_tokens a multiple of 4096, or a --micro_batch that divides 2"):
        train.batch_plan(train.parse_args(["--batch_tokens", "2048", "--micro_batch", "4"]), config, 4)
    plan = train.batch_plan(train.parse_args(["--batch_tokens", "4096", "--micro_batch", "2"]), config, 2)
    assert (plan.sequences, plan.accumulation, plan.tokens) == (16, 4, 4096)
    # The default fits `torchrun --nproc_per_node 8 train.py` on GPUs, and minutes on one CPU.
    assert train.batch_plan(train.parse_args([]), config, 8, "cuda").accumulation == 4
    assert train.batch_plan(train.parse_args([]), config, 1, "cpu").tokens == 512


def test_schedules_warm_up_then_decay_to_the_floor():
    args = train.parse_args(["--lr", "1.0", "--steps", "100", "--warmup", "10", "--min_lr_ratio", "0.1"])
    assert [train.lr_at(s, args) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert train.lr_at(55, args) == pytest.approx(0.55)  # cosine: halfway between peak and floor midway
    assert train.lr_at(99, args) == pytest.approx(0.1, abs=1e-3)
    args.schedule = "linear"
    assert train.lr_at(55, args) == pytest.approx(0.55) and train.lr_at(100, args) == pytest.approx(0.1)
    args.schedule, args.decay_fraction = "wsd", 0.2
    assert [train.lr_at(s, args) for s in (10, 50, 80)] == [1.0, 1.0, 1.0]
    assert train.lr_at(90, args) == pytest.approx(0.55) and train.lr_at(100, args) == pytest.approx(0.1)


def test_weight_decay_spares_embeddings_and_norms():
    args = train.parse_args([*SMALL, "--preset", "qwen3_like"])
    model = olmpool.Transformer(train.model_config(args), seed=None)
    decayed, spared = train.build_optimizer(model, args).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and spared["weight_decay"] == 0.0
    assert {names[id(p)] for p in spared["params"]} == {n for n, p in model.named_parameters()
                                                         if p.ndim == 1 or n == "embed.weight"}
    assert "lm_head.weight" in {names[id(p)] for p in decayed["params"]}
    assert decayed["betas"] == (0.9, 0.95)


# ----------------------------------------------------------------------------------------------
# The OlmPool control: the same data and the same initial weights


def test_data_order_depends_on_neither_the_architecture_nor_the_world_size(corpus):
    def batches(flags, rank=0, world_size=1):
        args = train.parse_args([*SMALL, "--data", str(corpus), *flags])
        plan = train.batch_plan(args, train.model_config(args), world_size)
        loader, _ = train.build_loaders(args, plan, train.Distributed(rank=rank, world_size=world_size), corpus)
        return [loader.next_batch().inputs for _ in range(3)]

    llama = batches(["--preset", "llama3_like"])
    qwen_gqa = batches(["--preset", "qwen3_like", "--qk_norm", "layerwise", "--gqa", "2", "--swa"])
    assert all(torch.equal(a, b) for a, b in zip(llama, qwen_gqa))
    ranks = [batches(["--preset", "llama3_like"], rank, 2) for rank in (0, 1)]
    for step, batch in enumerate(llama):  # rank r holds rows r, r+2, ... of the same global batch
        assert torch.equal(batch[0::2], ranks[0][step]) and torch.equal(batch[1::2], ranks[1][step])
    assert not torch.equal(llama[0], batches(["--data_seed", "1"])[0])


INIT_SCRIPT = """
import sys, torch, train
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
out, flags = sys.argv[1], sys.argv[2:]
env = train.setup_distributed("cpu")
for mode in ("ddp", "fsdp"):
    args = train.parse_args(flags + (["--fsdp"] if mode == "fsdp" else []))
    model, inner = train.build_model(train.model_config(args), args, env)
    if mode == "fsdp":  # every rank holds shards; gather the full tensors
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.module.state_dict()
    if state:
        torch.save(state, f"{out}/{mode}_rank{env.rank}.pt")
train.teardown_distributed(env)
"""


def test_initial_weights_do_not_depend_on_the_world_size(tmp_path):
    script = tmp_path / "init.py"
    script.write_text(INIT_SCRIPT)
    flags = SMALL[:10] + ["--preset", "qwen3_like", "--seed", "7"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path), *flags], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    single = olmpool.Transformer(train.model_config(train.parse_args(flags)), seed=7).state_dict()
    for name in ("ddp_rank0", "ddp_rank1", "fsdp_rank0"):
        assert_same_weights(torch.load(tmp_path / f"{name}.pt", weights_only=True), single)
    other_seed = olmpool.Transformer(train.model_config(train.parse_args(flags)), seed=8).state_dict()
    assert not torch.equal(single["embed.weight"], other_seed["embed.weight"])


# ----------------------------------------------------------------------------------------------
# Exact resume


def test_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run(corpus, tmp_path):
    whole = run(corpus, tmp_path / "whole", "--steps", "6", "--save_every", "1", "--keep_checkpoints", "2")
    assert [p.name for p in checkpoints_in(tmp_path / "whole")] == ["step_0000005", "step_0000006"]
    half = run(corpus, tmp_path / "split", "--steps", "6", "--stop_at", "3")
    assert half["step"] == 3 and (tmp_path / "split" / "step_0000003" / "optimizer.pt").is_file()
    rest = run(corpus, tmp_path / "split", "--steps", "6", "--resume", "auto")
    assert [rest["losses"][s] for s in (4, 5, 6)] == [whole["losses"][s] for s in (4, 5, 6)]
    assert_same_weights(weights(rest["checkpoint"]), weights(whole["checkpoint"]))
    resumed = torch.load(rest["checkpoint"] / "optimizer.pt", weights_only=True)
    uninterrupted = torch.load(whole["checkpoint"] / "optimizer.pt", weights_only=True)
    for index, state in uninterrupted["state"].items():
        assert all(torch.equal(state[k], resumed["state"][index][k]) for k in state)
    saved = json.loads((rest["checkpoint"] / "train_state.json").read_text())
    assert (saved["step"], saved["tokens_seen"]) == (6, 6 * 64)


def test_sigterm_saves_a_checkpoint_that_resumes_exactly(corpus, tmp_path):
    out = tmp_path / "preempted"
    process = subprocess.Popen([sys.executable, "train.py", *SMALL, "--data", str(corpus), "--out", str(out),
                                "--steps", "200", "--save_every", "1000"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == train.PREEMPTED_EXIT_STATUS == 143, stderr  # saved, not finished: requeue
    [checkpoint] = checkpoints_in(out)
    stopped = json.loads((checkpoint / "train_state.json").read_text())["step"]
    assert 1 <= stopped < 200 and "SIGTERM" in stdout
    resumed = run(corpus, out, "--steps", "200", "--resume", "auto", "--stop_at", str(stopped + 2))
    reference = run(corpus, tmp_path / "reference", "--steps", "200", "--stop_at", str(stopped + 2))
    assert resumed["losses"] == {s: reference["losses"][s] for s in (stopped + 1, stopped + 2)}
    assert_same_weights(weights(resumed["checkpoint"]), weights(reference["checkpoint"]))


# ----------------------------------------------------------------------------------------------
# One process or many


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    """The reference: one process, global batch of 4 sequences in micro-batches of 2."""
    return run(corpus, tmp_path_factory.mktemp("one"), "--steps", "4")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_give_the_losses_of_one_and_resume_on_any_world_size(corpus, tmp_path, one_process, mode):
    # Same global batch, split over 2 ranks of one micro-batch each: only the order of float sums
    # differs, so losses agree to rtol 1e-5. Weights agree to atol 1e-5 (lr is 3e-3): AdamW divides
    # by sqrt(v), which magnifies rounding where a gradient is nearly zero.
    # Two steps under torchrun, then the other two resumed: DDP's checkpoint (full tensors) by one
    # process, FSDP's (sharded, DCP) by torchrun again.
    fsdp = ["--fsdp"] if mode == "fsdp" else []
    torchrun(corpus, tmp_path, "--steps", "4", "--stop_at", "2", *fsdp)
    if mode == "fsdp":
        torchrun(corpus, tmp_path, "--steps", "4", "--resume", "auto", *fsdp)
    else:
        run(corpus, tmp_path, "--steps", "4", "--resume", "auto")
    losses = {m["step"]: m["loss"] for m in metrics(tmp_path)}
    assert losses.keys() == one_process["losses"].keys()
    for step, loss in one_process["losses"].items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    checkpoint = tmp_path / "step_0000004"
    assert (checkpoint / ("dcp" if mode == "fsdp" else "model.safetensors")).exists()
    # Read the weights back the way --init_from does, from either layout.
    config = olmpool.ModelConfig(**json.loads((checkpoint / "config.json").read_text()))
    model = olmpool.Transformer(config, seed=None)
    train.load_initial_weights(model, str(checkpoint), config)
    for name, tensor in weights(one_process["checkpoint"]).items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Checkpoints and the errors around them


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):
    """A finished one-step run of the default preset (post norm, layerwise QK norm)."""
    return run(corpus, tmp_path_factory.mktemp("one_step"), "--steps", "1")["checkpoint"]


def test_a_checkpoint_is_a_self_describing_folder(checkpoint):
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json", "model.safetensors", "optimizer.pt",
                                                            "train_state.json"]
    config = olmpool.ModelConfig(**json.loads((checkpoint / "config.json").read_text()))
    model = olmpool.Transformer(config, seed=None)
    model.load_state_dict(weights(checkpoint))  # names and shapes are olmpool.Transformer's
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert {"step", "tokens_seen", "loader", "args", "rng"} <= state.keys()
    assert not list(checkpoint.parent.glob(".tmp*"))


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_file_fields_and_fix(corpus, checkpoint):
    out = checkpoint.parent
    with pytest.raises(train.TrainError) as error:
        run(corpus, out, "--steps", "2", "--resume", "auto", "--qk_norm", "headwise", "--gqa", "2")
    message = str(error.value)
    assert str(checkpoint / "config.json") in message
    assert "n_kv_heads: checkpoint 4, this run 2" in message
    assert "qk_norm: checkpoint 'layerwise', this run 'headwise'" in message
    assert "--n_kv_heads 4 --qk_norm layerwise" in message and "another --out" in message
    with pytest.raises(train.TrainError, match=r"config.json is a different architecture \(d_model"):
        run(corpus, out.parent / "fresh", "--init_from", str(checkpoint), "--d_model", "64")


def test_the_same_command_again_resumes_and_resume_never_refuses(corpus, checkpoint):
    again = run(corpus, checkpoint.parent, "--steps", str(json.loads(
        (checkpoint / "train_state.json").read_text())["step"]))
    assert again["losses"] == {}  # already at its last step: nothing to train
    with pytest.raises(train.TrainError, match="already holds checkpoints .* --resume auto"):
        run(corpus, checkpoint.parent, "--steps", "2", "--resume", "never")


def test_init_from_takes_the_weights_and_nothing_else(corpus, checkpoint, tmp_path):
    args = train.parse_args([*SMALL, "--init_from", str(checkpoint), "--rope_theta", "8e6"])  # a new base is fine
    model, inner = train.build_model(train.model_config(args), args, train.Distributed())
    assert_same_weights(inner.state_dict(), weights(checkpoint))
    summary = run(corpus, tmp_path, "--init_from", str(checkpoint), "--steps", "1")
    assert list(summary["losses"]) == [1]  # step 0 again: a fresh optimizer and schedule


def test_init_from_hugging_face_goes_through_hf_interop(monkeypatch, checkpoint):
    args = train.parse_args([*SMALL, "--init_from", "hf:/models/x"])
    config = train.model_config(args)
    monkeypatch.setitem(sys.modules, "hf_interop", None)  # as if hf_interop.py were absent
    with pytest.raises(train.TrainError, match="needs hf_interop.py"):
        train.build_model(config, args, train.Distributed())
    source = olmpool.Transformer(config, seed=3)
    calls = []
    fake = types.SimpleNamespace(load_hf=lambda path, dtype=None: calls.append(path) or (source, "summary"))
    monkeypatch.setitem(sys.modules, "hf_interop", fake)
    model, inner = train.build_model(config, args, train.Distributed())
    assert calls == ["/models/x"]
    assert_same_weights(inner.state_dict(), source.state_dict())


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    # A learning rate of 1e30 makes the second step's logits overflow.
    with pytest.raises(train.TrainError, match=r"non-finite loss at step 2 .* the last good checkpoint is "
                                               r".*step_0000001"):
        run(corpus, tmp_path, "--steps", "5", "--save_every", "1", "--lr", "1e30")
    assert [p.name for p in checkpoints_in(tmp_path)] == ["step_0000001"]


def test_activation_checkpointing_changes_memory_not_results(corpus, tmp_path):
    plain = run(corpus, tmp_path / "plain", "--steps", "2")
    recomputed = run(corpus, tmp_path / "recomputed", "--steps", "2", "--activation_checkpointing")
    assert plain["losses"] == recomputed["losses"]
    assert_same_weights(weights(plain["checkpoint"]), weights(recomputed["checkpoint"]))


def test_compile_changes_speed_not_losses_or_checkpoint_names(corpus, tmp_path):
    # One block, so inductor compiles one graph (tens of seconds on a CPU); fused kernels round
    # differently, hence rtol 1e-4 rather than equality.
    plain = run(corpus, tmp_path / "plain", "--n_layers", "1", "--steps", "2")
    try:
        compiled = run(corpus, tmp_path / "compiled", "--n_layers", "1", "--steps", "2", "--compile")
    finally:
        torch._dynamo.reset()
    assert compiled["losses"] == pytest.approx(plain["losses"], rel=1e-4)
    assert weights(compiled["checkpoint"]).keys() == weights(plain["checkpoint"]).keys()


def test_metrics_record_throughput_mfu_memory_and_validation_loss(corpus, tmp_path):
    summary = run(corpus, tmp_path, "--steps", "2", "--eval_every", "2", "--eval_batches", "2", "--mask_documents")
    first, second = metrics(tmp_path)
    for key in ("loss", "z_loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "mfu", "peak_memory_gib"):
        assert isinstance(second[key], float | int), key
    assert "val_loss" not in first and second["val_loss"] == summary["val_losses"][2] > 0
    assert second["tokens_seen"] == 128 and 10 < first["loss"] < 12  # about ln(100352) = 11.5 at init


def test_run_sh_sets_up_the_venv_and_runs_the_main_job():
    script = REPO / "run.sh"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash") and os.access(script, os.X_OK)
    assert "requirements.txt" in text and 'exec .venv/bin/python experiment.py "$@"' in text  # tests/test_experiment.py
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_init_from_an_exported_hugging_face_folder_takes_the_same_weights(checkpoint, tmp_path):
    """The real round trip: our checkpoint out through hf_interop to Olmo3's format, and back in."""
    hf_export = pytest.importorskip("hf_export")
    hf_export.export_hf(checkpoint, tmp_path / "hf")
    args = train.parse_args([*SMALL, "--init_from", f"hf:{tmp_path / 'hf'}"])
    model, inner = train.build_model(train.model_config(args), args, train.Distributed())
    assert_same_weights(inner.state_dict(), weights(checkpoint))
