"""Tests for sweep.py: the grid and its names, the OlmPool control in every planned command (same data,
seeds, init seed, budgets, recipe), resume (skip, rerun on a changed command or input, continue an
interrupted stage), the statistics on constructed tables with known answers, and a 2-model sweep run
end to end through train.py, extend.py and evaluate.py.
"""

import dataclasses
import itertools
import json
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import pool_analysis  # noqa: E402
import stages  # noqa: E402
import sweep  # noqa: E402
from sweep import Settings, Stage  # noqa: E402

# What the grid's commands may differ in: the four switches, and what follows from the context.
SWITCH_FLAGS = {"--norm_placement", "--global_every", "--qk_norm", "--n_kv_heads", "--window", "--context_length",
                "--seq_len", "--micro_batch", "--out", "--from"}


def flags_of(command: list[str]) -> dict:
    """{--flag: value} of a command (the script's name under 'script')."""
    flags, i = {"script": command[1]}, 2
    while i < len(command):
        if command[i].startswith("--") and i + 1 < len(command) and not command[i + 1].startswith("--"):
            flags[command[i]] = command[i + 1]
            i += 2
        elif command[i].startswith("--"):
            flags[command[i]] = True
            i += 1
        else:
            flags.setdefault("positional", []).append(command[i])
            i += 1
    return flags


# ----------------------------------------------------------------------------------------------
# Planning


def test_the_grid_is_the_16_combinations_of_the_four_choices_with_olmpool_style_names():
    runs = sweep.grid("H_post_LQK_32kv_8k_11k_SWA", "tiny")
    assert len(runs) == 16
    assert {tuple(r.choices[c] for c in sweep.CHOICES) for r in runs} == set(itertools.product((0, 1), repeat=4))
    assert len({r.name for r in runs}) == 16
    names = {r.name: r for r in runs}
    worst, best = names["post_LQK_2kv_128_SWA"], names["pre_8kv_256"]  # tiny: 8 heads, contexts 256 / 128
    assert worst.choices == dict(qk=1, gqa=1, swa=1, ctx=1) and worst.harmful_count == 4
    assert best.choices == dict(qk=0, gqa=0, swa=0, ctx=0) and best.harmful_count == 0
    flags = flags_of(["python", "train.py", *worst.model_flags])
    assert (flags["--norm_placement"], flags["--qk_norm"], flags["--n_kv_heads"], flags["--window"],
            flags["--context_length"]) == ("post", "layerwise", "2", "128", "128")
    flags = flags_of(["python", "train.py", *best.model_flags])
    assert (flags["--norm_placement"], flags["--qk_norm"], flags["--n_kv_heads"], flags["--window"],
            flags["--context_length"]) == ("pre", "none", "8", "none", "256")


def test_presets_join_the_grid_with_their_choices_read_from_their_config():
    llama = sweep.preset_architecture("G_pre_8kv_8k_14k", "tiny")
    assert llama.choices == dict(qk=0, gqa=1, swa=0, ctx=0) and llama.name == "G_pre_8kv_8k_14k"
    olmo3 = sweep.preset_architecture("H_post_LQK_32kv_8k_11k_SWA", "tiny")
    assert olmo3.choices == dict(qk=1, gqa=0, swa=1, ctx=0)
    qwen = sweep.preset_architecture("K_post_HQK_8kv_12k", "tiny")
    assert qwen.choices["qk"] is None  # headwise QK norm is neither of the grid's two levels
    with pytest.raises(sweep.SweepError, match="unknown preset"):
        sweep.preset_architecture("no_such_model", "tiny")


def test_every_run_gets_the_same_data_seeds_token_budget_and_recipe(tmp_path):
    settings = Settings(out=tmp_path, seeds=(0,), data="data/x", presets=("G_pre_8kv_8k_14k",))
    stages, members = sweep.plan(settings)
    assert len(members) == 17
    by_kind = {}
    for stage in stages:
        if stage.run is not None:
            kind = "shared" if stage.command[1] == "share_pretraining.py" else stage.key.split("/")[-1]
            by_kind.setdefault(kind, []).append(flags_of(stage.command))
    # The 4 windowed runs at the shorter context (128, their window) take their all-global twin's pretraining.
    assert {k: len(v) for k, v in by_kind.items()} == {"pretrain": 13, "shared": 4, "extend": 17, "eval": 17,
                                                       "eval_before": 17}
    for kind, commands in by_kind.items():
        shared = [{k: v for k, v in c.items() if k not in SWITCH_FLAGS and k not in ("--preset", "--labels",
                                                                                     "positional")}
                  for c in commands]
        assert all(s == shared[0] for s in shared), kind
    for flags in by_kind["pretrain"]:
        assert flags["--seed"] == "0" and flags["--data_seed"] == "0" and flags["--data"] == "data/x"
        assert flags["--batch_tokens"] == str(8 * 256)  # tokens per step identical whatever the context
        assert int(flags["--micro_batch"]) * int(flags["--seq_len"]) == 8 * 256
    for flags in by_kind["extend"]:
        assert flags["--recipe"] == "olmpool" and flags["--seq_len"] == str(8 * 256)


def test_a_second_seed_repeats_the_grid_with_its_own_seed_and_folders(tmp_path):
    stages, members = sweep.plan(Settings(out=tmp_path, seeds=(0, 1), only=("pre_8kv_256",)))
    pretrain = [flags_of(s.command) for s in stages if s.key.endswith("/pretrain")]
    assert [(f["--seed"], f["--data_seed"]) for f in pretrain] == [("0", "0"), ("1", "1")]
    assert len({f["--out"] for f in pretrain}) == 2


def test_findings_add_stages_only_for_their_subset_and_early_steps_must_be_kept_checkpoints(tmp_path):
    settings = Settings(out=tmp_path, budgets=(10, 20, 80), early_steps=(100, 200))
    stages, _ = sweep.plan(settings)
    keys = {s.key for s in stages}
    subset = sweep.representative(sweep.grid())
    assert subset == ["pre_8kv_256", "post_LQK_8kv_256_SWA", "post_LQK_2kv_128_SWA"]
    for name in subset:
        assert {f"{name}/s0/extend_b10", f"{name}/s0/extend_b80", f"{name}/s0/extend_p100"} <= keys
        assert f"{name}/s0/extend_b20" not in keys  # 20 is the main extension's budget
    assert not any(k.startswith("pre_2kv_256/s0/extend_") for k in keys)
    early = next(s for s in stages if s.key == "pre_8kv_256/s0/extend_p100")
    assert flags_of(early.command)["--from"].endswith("pretrain/step_0000100")
    with pytest.raises(sweep.SweepError, match="multiple of --save_every"):
        sweep.plan(Settings(out=tmp_path, early_steps=(125,)))


def without(command: list[str], *flags: str) -> list[str]:
    """The command without these flags and their values."""
    kept, skip = [], False
    for part in command:
        if skip or part in flags:
            skip = not skip and part in flags
            continue
        kept.append(part)
    return kept


def test_the_regimes_rope_base_factor_and_extension_data_reach_their_stages_and_nothing_else_moves(tmp_path):
    plain = Settings(out=tmp_path, data="data/x", budgets=(10,), early_steps=(100,), only=("pre_8kv_256",))
    regime = dataclasses.replace(plain, rope_theta=10_000.0, ext_rope_factor=16.0, ext_data="data/long")
    plain_commands = {stage.key: stage.command for stage in sweep.plan(plain)[0]}
    assert not any({"--rope_theta", "--rope_factor"} & set(c) for c in plain_commands.values())  # as before
    stages = sweep.plan(regime)[0]
    assert [stage.key for stage in stages] == list(plain_commands)
    for stage in stages:
        flags = flags_of(stage.command)
        if flags["script"] == "train.py":  # the base every run pretrains at; extend.py reads it from the checkpoint
            assert flags["--rope_theta"] == "10000" and flags["--data"] == "data/x"
        elif flags["script"] == "extend.py":  # the main extension, the budgets' and the early checkpoints'
            assert flags["--rope_factor"] == "16" and flags["--data"] == "data/long" and "--rope_theta" not in flags
        else:  # every evaluation keeps the pretraining folder's held-out split
            assert flags["--data"] == "data/x" and "--rope_factor" not in flags
        plain_command = [part.replace("data/long", "data/x") for part in without(stage.command, "--rope_theta",
                                                                                  "--rope_factor")]
        assert plain_command == plain_commands[stage.key], stage.key
    assert {s.key.split("/")[-1] for s in stages if s.command[1] == "extend.py"} == {"extend", "extend_b10",
                                                                                      "extend_p100"}


def test_control_models_add_a_none_extension_and_its_evaluation_for_each_seed_beside_the_recipe(tmp_path):
    settings = Settings(out=tmp_path, seeds=(0, 1), ext_rope_factor=16.0, only=("pre_8kv_256", "pre_2kv_256"),
                        control_models=("pre_8kv_256",))
    stages = {stage.key: stage for stage in sweep.plan(settings)[0]}
    assert sorted(k for k in stages if "none" in k) == [f"pre_8kv_256/s{seed}/{tag}" for seed in (0, 1)
                                                        for tag in ("eval-none", "extend-none")]
    for seed in (0, 1):
        run = f"pre_8kv_256/s{seed}"
        control, recipe = stages[f"{run}/extend-none"], stages[f"{run}/extend"]
        assert flags_of(control.command)["--recipe"] == "none" and "--rope_factor" not in control.command
        assert without(control.command, "--recipe", "--out") == without(recipe.command, "--recipe", "--rope_factor",
                                                                         "--out")  # same data, steps, seeds
        assert control.out == recipe.out.parent / "extend-none" and control.inputs == recipe.inputs
        assert control.after == recipe.after and control.kind == "extend"
        evaluation = stages[f"{run}/eval-none"]
        assert evaluation.after == [f"{run}/extend-none"] and evaluation.out == recipe.out.parent / "eval-none"
        assert flags_of(evaluation.command)["positional"] == [str(sweep.step_dir(control.out, settings.ext_steps))]
        assert without(evaluation.command, "--out")[3:] == without(stages[f"{run}/eval"].command, "--out")[3:]
    with pytest.raises(sweep.SweepError, match=r"--control_models \['nope'\]: no such run"):
        sweep.plan(dataclasses.replace(settings, control_models=("nope",)))


def test_a_windowed_run_within_its_window_takes_its_all_global_twins_pretraining(tmp_path):
    # tiny: contexts 256 and 128, windows of 128. At 128 the windows reach every token (share_pretraining.py).
    settings = Settings(out=tmp_path, seeds=(0, 1), only=("post_LQK_2kv_128_SWA", "post_LQK_2kv_256_SWA"))
    stages = {stage.key: stage for stage in sweep.plan(settings)[0]}
    for seed in (0, 1):
        shared, twin = stages[f"post_LQK_2kv_128_SWA/s{seed}/pretrain"], stages[f"post_LQK_2kv_128/s{seed}/pretrain"]
        assert flags_of(twin.command)["script"] == "train.py" and flags_of(twin.command)["--window"] == "none"
        assert flags_of(shared.command) == {"script": "share_pretraining.py", "positional": [str(twin.out)],
                                            "--window": "128", "--out": str(shared.out)}
        assert shared.after == [twin.key] and shared.inputs == [sweep.step_dir(twin.out, settings.steps)]
        assert shared.kind == "pretrain" and shared.out == tmp_path / "runs" / "post_LQK_2kv_128_SWA" / f"s{seed}" / \
            "pretrain"
        assert flags_of(stages[f"post_LQK_2kv_256_SWA/s{seed}/pretrain"].command)["script"] == "train.py"  # beyond
    # the twin is pretrained for it alone: no extension or evaluation of its own, and only once per seed
    assert sorted(k for k in stages if k.startswith("post_LQK_2kv_128/")) == ["post_LQK_2kv_128/s0/pretrain",
                                                                             "post_LQK_2kv_128/s1/pretrain"]
    both = [stage.key for stage in sweep.plan(dataclasses.replace(settings, only=("post_LQK_2kv_128_SWA",
                                                                                  "post_LQK_2kv_128")))[0]]
    assert sorted(k for k in both if k.startswith("post_LQK_2kv_128/s0/")) == [  # in the grid: its own run, once
        f"post_LQK_2kv_128/s0/{tag}" for tag in ("eval", "eval_before", "extend", "pretrain")]
    assert sweep.pretraining_twin(sweep.preset_architecture("olmo3_like", "tiny"), sweep.grid()) is None


def control_results(folder: Path, label: str, loss: dict, recall: dict) -> None:
    """An evaluate.py results.json with held-out loss and recall by length."""
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "longppl": {label: {str(length): {"loss": value, "longppl": value} for length, value in loss.items()}},
        "recall": {label: {f"niah_single_1/{length}": {"mean": value, "n": 1} for length, value in recall.items()}}}))


def test_the_control_table_sets_each_gap_against_the_seed_spread_on_a_constructed_pool(tmp_path):
    # recipe loss 3 + e, control 3.5 + e + d: gap -0.5 + (-d); seed std pooled over (0.1, 0.12); recall gap 50
    settings = Settings(out=tmp_path, seeds=(0, 1, 2), only=("pre_8kv_256", "pre_2kv_256"),
                        control_models=("pre_8kv_256",))
    arch = {a.name: a for a in sweep.architectures(settings)}
    runs = {}
    for seed, e, d, recall in ((0, 0.1, 0.02, 50.0), (1, 0.0, 0.0, 60.0), (2, -0.1, -0.02, 70.0)):
        for name in arch:
            run_out = sweep.run_folder(settings, arch[name], seed)
            control_results(run_out / "eval", name, {256: 2.0, 2048: 3 + e}, {2048: recall})
            if name == "pre_8kv_256":
                control_results(run_out / "eval-none", name, {256: 2.0, 2048: 3.5 + e + d}, {2048: 10.0})
            runs[f"{name}/s{seed}"] = (arch[name], seed, run_out)
    rows = pool_analysis.collect(settings, runs)
    assert sum("control" in row for row in rows) == 3  # the runs without a control have no such key
    control = pool_analysis.control_analysis(pool_analysis.rows_from_json(json.loads(json.dumps(rows))))
    assert set(control) == {"pre_8kv_256"}
    loss = control["pre_8kv_256"]["loss"][2048]
    assert (loss["n"], loss["recipe"], loss["control"], loss["gap"]) == pytest.approx((3, 3.0, 3.5, -0.5))
    assert loss["seed_std"] == pytest.approx(np.sqrt((0.1 ** 2 + 0.12 ** 2) / 2))
    assert loss["gap_over_seed_std"] == pytest.approx(-0.5 / np.sqrt(0.0122)) and loss["gap_std"] == pytest.approx(0.02)
    assert control["pre_8kv_256"]["loss"][256]["gap"] == 0 and control["pre_8kv_256"]["loss"][256]["seed_std"] == 0
    assert control["pre_8kv_256"]["loss"][256]["gap_over_seed_std"] is None  # no spread: no ratio
    recall = control["pre_8kv_256"]["recall"][2048]
    assert (recall["gap"], recall["seed_std"]) == pytest.approx((50.0, np.sqrt(50)))
    text = pool_analysis.markdown({}, rows, settings, "loss")
    assert "## The none control: olmpool against the same extension with RoPE unchanged" in text
    assert "| pre_8kv_256 | loss | 2048 | 3 | 3.000 | 3.500 | -0.500 | 0.110 | -4.5 | 0.020 |" in text
    assert "| pre_8kv_256 | recall | 2048 | 3 | 60.000 | 10.000 | 50.000 | 7.071 | 7.1 | 10.000 |" in text
    assert "## The none control" not in pool_analysis.markdown({}, [r for r in rows if "control" not in r],
                                                             settings, "loss")


def fake_checkpoint(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def copy_stage(tmp_path, source: Path, text: str) -> Stage:
    """A stage that copies its input's weights and a text into out/result.txt, counting its runs."""
    out = tmp_path / "out"
    script = (f"import pathlib, sys; o = pathlib.Path({str(out)!r}); o.mkdir(exist_ok=True); "
              f"(o / 'result.txt').write_bytes(pathlib.Path({str(source)!r}, 'model.safetensors').read_bytes() "
              f"+ sys.argv[1].encode()); c = o.parent / 'count'; "
              f"c.write_text(str(int(c.read_text()) + 1 if c.exists() else 1))")
    return Stage("run/copy", [sys.executable, "-c", script, text, "--threads", "1"], out, [out / "result.txt"],
                 [source])


def test_a_finished_stage_is_skipped_and_reruns_when_its_command_or_input_changes(tmp_path):
    source = fake_checkpoint(tmp_path / "ckpt", b"weights-1")
    count = lambda: int((tmp_path / "count").read_text())  # noqa: E731
    stage = copy_stage(tmp_path, source, "a")
    assert sweep.decide(stage) == "fresh"
    assert sweep.run_stage(stage, None, tmp_path / "logs")["decision"] == "fresh" and count() == 1
    assert sweep.decide(stage) == "skip"
    assert sweep.run_stage(stage, None, tmp_path / "logs")["decision"] == "skip" and count() == 1
    # --threads is not part of the identity
    stage.command[-1] = "2"
    assert sweep.decide(stage) == "skip"
    # another command: the old output is wiped and the stage reruns
    (stage.out / "stale.txt").write_text("from the old command")
    stage = copy_stage(tmp_path, source, "b")
    assert sweep.decide(stage) == "invalidated"
    sweep.run_stage(stage, None, tmp_path / "logs")
    assert count() == 2 and not (stage.out / "stale.txt").exists()
    assert (stage.out / "result.txt").read_bytes() == b"weights-1b"
    # the same command on changed input weights reruns too
    fake_checkpoint(source, b"weights-2")
    assert sweep.decide(stage) == "invalidated"
    sweep.run_stage(stage, None, tmp_path / "logs")
    assert count() == 3 and (stage.out / "result.txt").read_bytes() == b"weights-2b"
    # an output that went missing reruns the same command (resume)
    (stage.out / "result.txt").unlink()
    assert sweep.decide(stage) == "resume"


def test_an_interrupted_stage_is_continued_and_a_folder_without_a_stamp_is_redone(tmp_path):
    source = fake_checkpoint(tmp_path / "ckpt", b"w")
    stage = copy_stage(tmp_path, source, "a")
    stages.write_stamp(stage, stages.stamp_of(stage), "running")
    (stage.out / "partial.txt").write_text("kept for --resume auto")
    assert sweep.decide(stage) == "resume"
    sweep.run_stage(stage, None, tmp_path / "logs")
    assert (stage.out / "partial.txt").exists() and sweep.decide(stage) == "skip"
    other = Stage("x", [sys.executable, "-c", "pass"], tmp_path / "unknown", [tmp_path / "unknown" / "r"])
    other.out.mkdir()
    (other.out / "leftover").write_text("?")
    assert sweep.decide(other) == "invalidated"


def test_a_failing_stage_names_its_log_blocks_what_needs_it_and_lets_the_other_runs_finish(tmp_path):
    fail = Stage("a/fail", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "f",
                 [tmp_path / "f" / "never"])
    needs_it = Stage("a/next", [sys.executable, "-c", "pass"], tmp_path / "n", [tmp_path / "n" / "x"], after=["a/fail"])
    script = f"import pathlib; pathlib.Path({str(tmp_path / 'o' / 'done')!r}).write_text('ok')"
    other = Stage("b/ok", [sys.executable, "-c", script], tmp_path / "o", [tmp_path / "o" / "done"])
    with pytest.raises(sweep.SweepError, match=r"(?s)1 stage\(s\) failed, 1 blocked.*a/fail failed \(exit 3\).*boom"):
        sweep.execute([fail, needs_it, other], Settings(out=tmp_path), jobs=1, gpus=[], log=lambda *_: None)
    assert (tmp_path / "o" / "done").read_text() == "ok" and not (tmp_path / "n").exists()


# ----------------------------------------------------------------------------------------------
# Statistics on constructed tables


def constructed_rows(score):
    return [{"choices": dict(zip(sweep.CHOICES, levels)), "harmful_count": sum(levels), "y": score(*levels)}
            for levels in itertools.product((0, 1), repeat=4)]


def test_r_squared_is_one_for_a_line_and_two_thirds_with_an_orthogonal_term():
    rows = constructed_rows(lambda qk, gqa, swa, ctx: 2.0 * (qk + gqa + swa + ctx) + 1)
    assert pool_analysis.r_squared([r["harmful_count"] for r in rows], [r["y"] for r in rows]) == pytest.approx(1.0)
    # var(count) = 4 x 1/4 = 1; qk - gqa is uncorrelated with the count and has variance 1/2: R² = 1 / 1.5
    rows = constructed_rows(lambda qk, gqa, swa, ctx: (qk + gqa + swa + ctx) + (qk - gqa))
    assert pool_analysis.r_squared([r["harmful_count"] for r in rows], [r["y"] for r in rows]) == pytest.approx(2 / 3)
    assert np.isnan(pool_analysis.r_squared([1, 1, 1, 1], [1, 2, 3, 4]))


def test_pairwise_effects_give_each_choices_mean_and_spread_over_the_others():
    # qk's effect is 3 without windows and 7 with them (an interaction); gqa's is 1 everywhere
    rows = constructed_rows(lambda qk, gqa, swa, ctx: 3 * qk + gqa + 2 * swa + 0.5 * ctx + 4 * qk * swa)
    effects = pool_analysis.pairwise_effects(rows, "y")
    assert effects["qk"]["n"] == 8
    assert (effects["qk"]["mean"], effects["qk"]["std"], effects["qk"]["min"], effects["qk"]["max"]) == \
        pytest.approx((5, 2, 3, 7))
    assert (effects["gqa"]["mean"], effects["gqa"]["std"]) == pytest.approx((1, 0))
    assert (effects["swa"]["mean"], effects["swa"]["std"]) == pytest.approx((4, 2))
    assert effects["ctx"]["mean"] == pytest.approx(0.5)
    # a pair with a missing model is left out, not counted as zero
    rows = [r for r in rows if r["choices"] != dict(qk=1, gqa=0, swa=0, ctx=0)]
    assert pool_analysis.pairwise_effects(rows, "y")["qk"]["n"] == 7


def test_spearman_is_one_for_any_monotone_map_and_handles_ties():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert pool_analysis.spearman(x, [np.exp(v) for v in x]) == pytest.approx(1.0)
    assert pool_analysis.spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    assert list(pool_analysis.ranks([10, 20, 20, 30])) == [1.0, 2.5, 2.5, 4.0]


# ----------------------------------------------------------------------------------------------
# A 2-model sweep, end to end

TINY = ["--n_layers", "2", "--d_model", "32", "--n_heads", "4", "--head_dim", "8", "--mlp_hidden", "64",
        "--context_length", "32", "--window", "16"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import data
    return data.prepare_builtin_corpus(tmp_path_factory.mktemp("corpus"), max_tokens=300_000, progress=False)


def test_a_two_model_sweep_runs_end_to_end_resumes_and_writes_index_analysis_and_results(corpus, tmp_path):
    out, results = tmp_path / "sweep", tmp_path / "results"
    argv = ["--out", str(out), *TINY, "--only", "pre_4kv_32,post_LQK_1kv_16_SWA", "--data", str(corpus),
            "--steps", "4", "--save_every", "4", "--batch_sequences", "2", "--ext_factor", "4", "--ext_steps", "2",
            "--eval_factors", "1,4", "--tasks", "none", "--windows", "2", "--jobs", "2", "--results", str(results)]
    assert sweep.main(argv) == 0
    index = json.loads((out / "index.json").read_text())
    # 9 stages of the two runs and the pretraining of post_LQK_1kv_16, whose windowed twin takes it (16 <= 16)
    assert {e["status"] for e in index["stages"]} == {"done"} and len(index["stages"]) == 10
    assert (out / "runs" / "post_LQK_1kv_16_SWA" / "s0" / "pretrain" / "step_0000004" / "model.safetensors"
            ).read_bytes() == (out / "runs" / "post_LQK_1kv_16" / "s0" / "pretrain" / "step_0000004" /
                               "model.safetensors").read_bytes()
    report = json.loads((results / "analysis.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"pre_4kv_32", "post_LQK_1kv_16_SWA"}
    for row in rows.values():
        assert np.isfinite(row["val_loss_pretrain"]) and np.isfinite(row["loss"]) and np.isfinite(row["sink"])
        assert set(row["loss_by_length"]) == {32, 128} or set(row["loss_by_length"]) == {"32", "128"}
        assert np.isfinite(row["before"]["loss"])
    assert rows["post_LQK_1kv_16_SWA"]["harmful_count"] == 4 and rows["pre_4kv_32"]["harmful_count"] == 0
    assert (results / "loss_vs_count.png").is_file() and (results / "analysis.md").is_file()
    assert " ".join(argv) in (results / "COMMAND.md").read_text()
    # the same command again runs nothing
    assert sweep.main(argv) == 0
    index = json.loads((out / "index.json").read_text())
    assert {e["this_time"] for e in index["stages"]} == {"skip"}


def test_a_regime_sweep_extends_by_a_factor_on_its_own_data_with_a_none_control_and_resumes(corpus, tmp_path):
    out, long_documents = tmp_path / "sweep", shutil.copytree(corpus, tmp_path / "long")  # one vocabulary
    argv = ["--out", str(out), *TINY, "--only", "pre_4kv_32", "--data", str(corpus), "--steps", "4",
            "--save_every", "4", "--batch_sequences", "2", "--ext_factor", "4", "--ext_steps", "2",
            "--eval_factors", "1,4", "--tasks", "none", "--windows", "2", "--jobs", "2", "--rope_theta", "10000",
            "--ext_rope_factor", "16", "--ext_data", str(long_documents), "--control_models", "pre_4kv_32"]
    assert sweep.main(argv) == 0
    index = json.loads((out / "index.json").read_text())
    assert {e["status"] for e in index["stages"]} == {"done"} and len(index["stages"]) == 7
    run = out / "runs" / "pre_4kv_32" / "s0"
    config = lambda stage: json.loads(next((run / stage).glob("step_*/config.json")).read_text())  # noqa: E731
    assert config("pretrain")["rope_theta"] == 10_000
    extended, control = config("extend"), config("extend-none")
    assert (extended["rope_theta"], extended["rope_scaling"], extended["rope_factor"]) == (10_000, "abf", 16)
    assert (control["rope_theta"], control["rope_scaling"]) == (10_000, "none")
    for stage, folder in (("pretrain", corpus), ("extend", long_documents), ("extend-none", long_documents)):
        state = json.loads(next((run / stage).glob("step_*/train_state.json")).read_text())
        assert state["args"]["data"] == str(folder), stage
    report = json.loads((out / "analysis" / "analysis.json").read_text())
    assert set(report["control"]["pre_4kv_32"]["loss"]) == {"32", "128"}
    assert all(np.isfinite(c["control"]) for c in report["control"]["pre_4kv_32"]["loss"].values())
    analysis = (out / "analysis" / "analysis.md").read_text()
    assert "## The none control" in analysis and f"extension {long_documents}" in analysis
    assert f"extension {long_documents}. RoPE: pretraining base 10000; extension olmpool, --rope_factor 16" in \
        (out / "index.md").read_text()
    assert sweep.main(argv) == 0  # the same command again runs nothing, the control included
    assert {e["this_time"] for e in json.loads((out / "index.json").read_text())["stages"]} == {"skip"}


def test_the_analysis_of_a_constructed_pool_recovers_its_r2_effects_findings_and_writes_tables_and_plots(tmp_path):
    settings = Settings(out=tmp_path, steps=250, ext_steps=20)
    rows = []
    for arch in sweep.grid():
        c = arch.choices
        loss = 3 + 0.5 * c["qk"] + 0.1 * c["gqa"] + 0.2 * c["swa"] + 0.05 * c["ctx"]
        for seed, noise in ((0, 0.01), (1, -0.01)):  # seeds differ by 0.02: std 0.0141 per model
            rows.append({"run": f"{arch.name}/s{seed}", "name": arch.name, "seed": seed, "choices": c,
                         "harmful_count": arch.harmful_count, "pretrain_context": arch.pretrain_context,
                         "val_loss_pretrain": 2.0 + 0.01 * c["ctx"], "recall_by_length": {}, "loss_by_length": {},
                         "recall": None, "loss": loss + noise, "longppl": None, "sink": 0.5 - 0.2 * c["qk"],
                         "before": {"loss": 2.5, "recall": None, "sink": None},
                         # budgets: the gap between models stays; early: the ranking is the final one's
                         "budgets": {20: {"loss": loss + noise}, 80: {"loss": loss + noise - 0.3}} if seed == 0
                         and arch.name in sweep.representative(sweep.grid()) else {20: {"loss": loss + noise}},
                         "early": {250: {"loss": loss + noise}, 100: {"loss": 2 * loss}} if seed == 0
                         and arch.name in sweep.representative(sweep.grid()) else {250: {"loss": loss + noise}}})
    analysis = pool_analysis.analyze(rows, "loss", settings)
    assert analysis["models"] == 16
    assert analysis["pairwise"]["qk"]["mean"] == pytest.approx(0.5) and analysis["pairwise"]["qk"]["std"] < 1e-9
    assert analysis["pairwise"]["swa"]["mean"] == pytest.approx(0.2)
    # qk alone moves the sinks, and the loss through it: sink share explains 0.25 / (0.25 + 0.01 + 0.04 + 0.0025)
    assert analysis["r2"]["sink_share"] == pytest.approx(0.25 / 0.3025)
    assert analysis["sinks"]["pearson"] == pytest.approx(-np.sqrt(0.25 / 0.3025))
    assert np.isnan(analysis["r2"]["before_extension"])  # a constant says nothing
    assert analysis["spread"]["seed_std_mean"] == pytest.approx(0.02 / np.sqrt(2))
    assert analysis["budgets"]["gap_by_budget"]["20"] == pytest.approx(analysis["budgets"]["gap_by_budget"]["80"])
    assert analysis["early"]["spearman_vs_final"]["100"] == pytest.approx(1.0)
    text = pool_analysis.markdown({"loss": analysis}, rows, settings, "loss")
    assert "| count of harmful choices |" in text and "Spearman" in text and "post_LQK_2kv_128_SWA" in text
    assert "stand out of the seed noise" in text  # between-model std 0.15 vs seed std 0.014
    assert set(pool_analysis.plots({"loss": analysis}, tmp_path)) == {"loss_vs_count.png", "loss_by_budgets.png",
                                                             "loss_by_early.png"}


# ----------------------------------------------------------------------------------------------
# The method (issue 22): each fault on a constructed case whose answer is known


def test_a_recall_cell_of_50_percent_reads_50(tmp_path):
    # evaluate.py's recall cells hold the mean score already x 100 (RULER's metrics return 0-100)
    results = {"recall": {"m": {"niah_single_1/512": {"mean": 50.0, "n": 2},
                                "niah_single_2/512": {"mean": 100.0, "n": 2},
                                "niah_single_1/1024": {"skipped": "too short", "n": 0}}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert pool_analysis.read_eval(tmp_path, "m")["recall"] == {512: 75.0}


def test_the_qk_choice_can_move_one_switch_with_headwise_qk_norm_as_a_level(tmp_path):
    runs = sweep.grid("H_post_LQK_32kv_8k_11k_SWA", "tiny", qk_levels=("pre_HQK", "pre"))
    assert {"pre_HQK_2kv_128_SWA", "pre_8kv_256"} <= {r.name for r in runs} and len(runs) == 16
    for run in runs:
        flags = flags_of(["python", "train.py", *run.model_flags])
        assert flags["--norm_placement"] == "pre"
        assert flags["--qk_norm"] == ("headwise" if run.choices["qk"] else "none")
    # a qk pair's pretraining commands differ in --qk_norm only (and their output folders)
    settings = Settings(out=tmp_path, qk_levels=("pre_HQK", "pre"), only=("pre_HQK_8kv_256", "pre_8kv_256"))
    a, b = [flags_of(s.command) for s in sweep.plan(settings)[0] if s.key.endswith("/pretrain")]
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {"--qk_norm", "--out"}
    assert "headwise QK norm" in settings.choice_descriptions()["qk"]
    assert "two switches" not in settings.choice_descriptions()["qk"].lower()
    # the default (Olmo 3 against Llama) moves two, and every table that names the choice says so
    assert "two switches" in Settings(out=tmp_path).choice_descriptions()["qk"].lower()
    assert sweep.preset_architecture("qwen3_like", "tiny", qk_levels=("pre_HQK", "pre")).choices["qk"] == 1
    for wrong in (("middle", "pre"), ("pre", "pre"), ("post_LQK",)):
        with pytest.raises(sweep.SweepError, match="pre_LQK,pre"):
            Settings(out=tmp_path, qk_levels=wrong)


def finding_rows(points: dict) -> list[dict]:
    """Rows of three models on two seeds with only the further findings: {(model, seed): {point: loss}}."""
    return [{"run": f"{name}/s{seed}", "name": name, "seed": seed,
             "budgets": {p: {"loss": v} for p, v in by_point.items()},
             "early": {p: {"loss": v} for p, v in by_point.items()}} for (name, seed), by_point in points.items()]


def test_budget_gaps_and_early_rankings_are_over_seed_averaged_models_and_the_final_step_is_only_the_reference():
    # single runs spread 1.0 to 3.0 at step 20; the models' seed means are 2.0, 2.1 and 2.5
    rows = finding_rows({("a", 0): {20: 1.0, 100: 5.0, 250: 1.0}, ("a", 1): {20: 3.0, 100: 1.0, 250: 3.0},
                         ("b", 0): {20: 2.0, 100: 4.0, 250: 2.0}, ("b", 1): {20: 2.2, 100: 4.0, 250: 2.2},
                         ("c", 0): {20: 2.5, 100: 6.0, 250: 2.5}, ("c", 1): {20: 2.5, 100: 6.0, 250: 2.5}})
    budgets = pool_analysis.budget_analysis(rows, "loss")
    assert set(budgets["table"]) == {"a", "b", "c"} and budgets["table"]["a"]["20"] == pytest.approx(2.0)
    assert budgets["gap_by_budget"]["20"] == pytest.approx(0.5)  # not 2.0, the spread of single runs
    early = pool_analysis.early_analysis(rows, "loss", final_step=250)
    # seed means at step 100: 3, 4, 6, ranked as the final 2.0, 2.1, 2.5 (single runs would not be: a/s0 is 5.0)
    assert early["spearman_vs_final"]["100"] == pytest.approx(1.0)
    assert "250" not in early["spearman_vs_final"]  # the final step is not compared with itself
    assert early["seed_std"]["100"] == pytest.approx(np.std([5.0, 1.0], ddof=1) / 3)


def decomposed_pool_rows() -> list[dict]:
    """The grid on two seeds, the loss built from known parts: ctx acts before extension (+0.3), gqa in
    the extension at L = 256 (+0.1), swa at the extended length only (+0.2, +0.3 where the windowed model was
    pretrained at 128 = its window), and qk on seed 1 only (+0.04)."""
    rows = []
    for arch, seed in itertools.product(sweep.grid(), (0, 1)):
        c = arch.choices
        before = 3 + 0.3 * c["ctx"]
        at_256 = before + 0.1 * c["gqa"]
        at_2048 = at_256 + (0.2 + 0.1 * c["ctx"]) * c["swa"] + 0.04 * c["qk"] * seed
        rows.append({"run": f"{arch.name}/s{seed}", "name": arch.name, "seed": seed, "choices": c,
                     "harmful_count": arch.harmful_count, "pretrain_context": arch.pretrain_context,
                     "window": arch.window, "val_loss_pretrain": before, "recall_by_length": {},
                     "loss_by_length": {256: at_256, 2048: at_2048}, "recall": None, "loss": at_2048,
                     "longppl": None, "sink": 0.1, "before": {"loss": before, "recall": None, "sink": 0.2},
                     "budgets": {}, "early": {}})
    return rows


def test_seeds_that_split_in_different_pairs_agree_on_average_and_the_spread_within_pairs_says_so():
    """Seed 0 loses 80 points in the qk pair at gqa=0 and none at gqa=1; seed 1 the other way round. The
    seeds' mean effects agree (seed spread 0); each pair's two seeds differ by 80 (std 80/sqrt 2)."""
    recall = {("a00", 0): 80, ("a10", 0): 0, ("a01", 0): 50, ("a11", 0): 50,
              ("a00", 1): 50, ("a10", 1): 50, ("a01", 1): 80, ("a11", 1): 0}
    runs = [{"name": name, "seed": seed, "choices": {"qk": int(name[1]), "gqa": int(name[2])}, "retrieval": value}
            for (name, seed), value in recall.items()]
    models = [{"name": name, "choices": {"qk": int(name[1]), "gqa": int(name[2])},
               "retrieval": np.mean([recall[name, 0], recall[name, 1]])} for name in ("a00", "a10", "a01", "a11")]
    effects = pool_analysis.effects_beside_seeds(runs, models, "retrieval")
    qk = effects["qk"]
    assert qk["mean"] == -40 and qk["by_seed"] == {"0": -40, "1": -40} and qk["seed_std"] == 0
    assert qk["pairs_by_seed"] == {"a10 - a00": {"0": -80, "1": 0}, "a11 - a01": {"0": 0, "1": -80}}
    assert qk["pair_seed_std"] == pytest.approx(80 / np.sqrt(2))
    gqa = effects["gqa"]  # gqa: a01 - a00, a11 - a10
    assert gqa["pairs_by_seed"] == {"a01 - a00": {"0": -30, "1": 30}, "a11 - a10": {"0": 50, "1": -50}}
    assert gqa["pair_seed_std"] == pytest.approx((60 + 100) / 2 / np.sqrt(2))


def test_each_effect_is_split_where_it_arises_with_its_seed_spread_and_the_swa_pairs_that_test_only_extension(
        tmp_path):
    settings = Settings(out=tmp_path)
    analysis = pool_analysis.analyze(decomposed_pool_rows(), "loss", settings)
    parts = {part: {choice: e["mean"] for choice, e in analysis["parts"][part].items()} for part in pool_analysis.PARTS}
    assert parts["part_pretraining"] == pytest.approx(dict(qk=0, gqa=0, swa=0, ctx=0.3))
    assert parts["part_extension"] == pytest.approx(dict(qk=0, gqa=0.1, swa=0, ctx=0))
    assert parts["part_length"] == pytest.approx(dict(qk=0.02, gqa=0, swa=0.25, ctx=0.05))
    assert analysis["pairwise"]["ctx"]["mean"] == pytest.approx(0.35)  # the parts add up to the effect
    qk = analysis["pairwise"]["qk"]
    assert qk["by_seed"] == pytest.approx({"0": 0.0, "1": 0.04})
    assert qk["seed_std"] == pytest.approx(0.04 / np.sqrt(2)) and analysis["pairwise"]["gqa"]["seed_std"] == 0
    # windowed models pretrained at 128 with window 128 saw every token in pretraining, as global ones
    only, too = analysis["swa_pairs"]["extension_only"], analysis["swa_pairs"]["pretraining_too"]
    assert only["n"] == 4 and all("_128_SWA - " in pair for pair in only["pairs"]) and too["n"] == 4
    assert (only["mean"]["loss"], too["mean"]["loss"]) == pytest.approx((0.3, 0.2))
    text = pool_analysis.markdown({"loss": analysis}, decomposed_pool_rows(), settings, "loss")
    assert "Where each effect arises" in text and "test only the windows met at extension (4 of 8" in text
    assert "0.350 ± 0.000 (worse in 8/8)" in text  # ctx: every pair, both seeds alike


def test_the_analysis_is_regenerated_from_the_rows_an_earlier_analysis_json_holds(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "window"} for row in decomposed_pool_rows()]  # an older file
    ran = ["sweep.py", "--out", "runs/x", "--extra_train", "--mask_documents --warmup 100"]
    earlier = {"command": ran, "machine": "an earlier machine",
               "settings": Settings(out=tmp_path / "runs").as_dict(), "rows": rows}
    (tmp_path / "analysis.json").write_text(json.dumps(earlier))
    argv = ["--from_rows", str(tmp_path / "analysis.json"), "--out", str(tmp_path / "new"),
            "--results", str(tmp_path / "results")]
    assert sweep.main(argv) == 0
    report = json.loads((tmp_path / "results" / "analysis.json").read_text())
    loss = report["analyses"]["loss"]
    assert loss["parts"]["part_pretraining"]["ctx"]["mean"] == pytest.approx(0.3)
    assert loss["swa_pairs"]["extension_only"]["n"] == 4  # the windows come from the plan
    assert report["rows_from"]["machine"] == "an earlier machine"
    command_md = (tmp_path / "results" / "COMMAND.md").read_text()
    assert "an earlier machine" in command_md
    # each command is written quoted, so pasting it back gives the same arguments
    written = [block.split("\n")[1] for block in command_md.split("```bash")[1:]]
    assert [shlex.split(line) for line in written] == [ran, [shlex.split(written[1])[0], *argv]]
    assert (tmp_path / "results" / "loss_vs_count.png").is_file()


def mini_pool_regime_script(name: str):
    """A script of results/mini_pool_regime/ (a folder, not a package) loaded as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, REPO / "results/mini_pool_regime" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batches_run_on_separate_machines_join_into_the_analysis_of_the_whole_grid(tmp_path):
    merge_rows = mini_pool_regime_script("merge_rows")
    rows = decomposed_pool_rows()
    names = sorted({r["name"] for r in rows})

    def batch(folder, chosen, **settings):
        record = {"command": ["sweep.py"], "machine": folder, "primary": "loss",
                  "settings": Settings(out=tmp_path / folder, only=tuple(chosen), seeds=(0, 1), **settings).as_dict(),
                  "rows": [dict(r, longppl=1.0) for r in rows if r["name"] in chosen]}
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "analysis.json").write_text(json.dumps(record))
        return str(tmp_path / folder / "analysis.json")

    first, second = batch("a", names[:6]), batch("b", names[6:])
    assert merge_rows.main([first, second, "--out", str(tmp_path / "joined.json")]) == 0
    assert sweep.main(["--from_rows", str(tmp_path / "joined.json"), "--out", str(tmp_path / "new")]) == 0
    report = json.loads((tmp_path / "new" / "analysis" / "analysis.json").read_text())
    whole = pool_analysis.analyze(rows, "loss", Settings(out=tmp_path, seeds=(0, 1)))
    def means(analysis):
        return {(part, c): e["mean"] for part in pool_analysis.PARTS for c, e in analysis["parts"][part].items()}
    assert means(report["analyses"]["loss"]) == pytest.approx(means(whole))
    assert report["analyses"]["loss"]["pairwise"]["qk"]["by_seed"] == pytest.approx(whole["pairwise"]["qk"]["by_seed"])
    assert len(report["rows"]) == 32 and all(r["longppl"] is None for r in report["rows"])  # batch-local key tokens
    with pytest.raises(SystemExit, match="is in both"):
        merge_rows.main([first, batch("c", names[:1]), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match=r"other settings .*\(steps\)"):
        merge_rows.main([first, batch("d", names[6:], steps=300), "--out", str(tmp_path / "x.json")])


def test_the_batches_formation_curves_draw_a_shared_pretraining_once_and_refuse_a_run_given_twice(tmp_path):
    formation_joined = mini_pool_regime_script("formation_joined")

    def curve(needle):
        checkpoints = [{"step": s, "needle_pct": needle * s, "mqar_pct": 1.0, "copy_gain": 0.1} for s in (1, 2)]
        return {"length": 64, "formed_at_step": None, "checkpoints": checkpoints}
    first = {"a/s0": curve(1), "a/s1": curve(2), "b/s0": curve(3), "b/s1": curve(4)}
    second = {"a_SWA/s0": curve(1), "a_SWA/s1": curve(2), "c/s0": curve(1), "c/s1": curve(5)}
    folded = formation_joined.curves_by_model([first, second])
    # a_SWA has every seed of a: one curve under both names; c shares one seed's curve only, so it stays
    assert sorted(folded) == ["a = a_SWA", "b", "c"]
    assert folded["a = a_SWA"]["s1"] == curve(2)["checkpoints"]
    tables = [tmp_path / "1.json", tmp_path / "2.json"]
    for table, content in zip(tables, (first, second)):
        table.write_text(json.dumps(content))
    assert formation_joined.main([*map(str, tables), "--plot", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="a/s0 is in two tables"):
        formation_joined.main([str(tables[0]), str(tables[0]), "--plot", str(tmp_path / "g.png")])


def test_longppl_key_tokens_can_come_from_an_evaluator_outside_the_grid_and_one_inside_is_reported(tmp_path):
    outside = fake_checkpoint(tmp_path / "strong", b"w")
    stages, _ = sweep.plan(Settings(out=tmp_path, longppl_evaluator=str(outside)))
    longppl = next(s for s in stages if s.key == "longppl")
    flags = flags_of(longppl.command)
    assert flags["positional"][0] == str(outside) and flags["--labels"].split(",")[0] == "evaluator"
    assert len(flags["positional"]) == 17 and Path(outside) in longppl.inputs
    # the default picks one of the compared runs: the analysis names it and the effects without its pairs
    settings = Settings(out=tmp_path, seeds=(0, 1))
    rows = [dict(row, longppl=row["loss"]) for row in decomposed_pool_rows()]
    text = pool_analysis.markdown({"longppl": pool_analysis.analyze(rows, "longppl", settings)}, rows, settings,
                                  "longppl")
    assert "chosen by pre_8kv_256/s0, one of the compared runs" in text
    assert "ctx 0.357 over 7 pairs" in text  # without pre_8kv_128 - pre_8kv_256: (4 x 0.4 + 3 x 0.3) / 7


def test_importing_sweep_and_its_analysis_does_not_import_torch():
    import subprocess
    code = "import sys, sweep, pool_analysis; sys.exit('torch' in sys.modules)"  # --plan's imports stay light
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
