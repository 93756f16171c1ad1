"""The retrieval probes in the sweep: a --data folder that is a synthetic mix makes every evaluation stage probe at
its own lengths (and a plain folder leaves every command as it was), pool_analysis reads the probe cells of
evaluate.py's results.json into the rows, and the analysis led by a probe measure gives the effects, their parts
and the R² that the constructed pool was built to have.
"""

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import pool_analysis  # noqa: E402
import sweep  # noqa: E402
from sweep import Settings  # noqa: E402
from test_sweep import flags_of, without  # noqa: E402


def data_folder(folder: Path, recipe: dict | None) -> Path:
    """A folder with a manifest.json, with the synthetic recipe where one is given (what the plan reads)."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": "olmpool-token-shards", "splits": {},
                                                      **({"synthetic": recipe} if recipe else {})}))
    return folder


RECIPE = {"version": 1, "seq_len": 256, "ids": {"first": 258, "size": 1024}, "kinds": ["copy", "mqar", "needle"]}


def test_a_synthetic_mix_makes_every_evaluation_stage_probe_at_its_own_lengths_and_a_plain_folder_changes_nothing(
        tmp_path):
    mix, plain = data_folder(tmp_path / "mix", RECIPE), data_folder(tmp_path / "plain", None)
    base = Settings(out=tmp_path / "out", data=str(plain), seeds=(0, 1), budgets=(10,), early_steps=(100,),
                    control_models=("pre_8kv_256",), probe_count=8)
    plain_commands = {stage.key: stage.command for stage in sweep.plan(base)[0]}
    assert not any("--probe_lengths" in c or "probes" in " ".join(c) for c in plain_commands.values())
    missing = dataclasses.replace(base, data=str(tmp_path / "nowhere"))  # no manifest: no recipe, as before
    assert not any("--probe_lengths" in stage.command for stage in sweep.plan(missing)[0])
    stages = sweep.plan(dataclasses.replace(base, data=str(mix)))[0]
    assert [stage.key for stage in stages] == list(plain_commands)
    probed = set()
    for stage in stages:
        flags = flags_of(stage.command)
        unprobed = [part.replace(str(mix), str(plain)).removesuffix(",probes") for part in
                    without(stage.command, "--probe_lengths", "--probe_count")]
        assert unprobed == plain_commands[stage.key], stage.key  # nothing else moves
        if flags["script"] != "evaluate.py" or stage.key == "longppl":  # LongPPL's shared stage: one measure
            assert "--probe_lengths" not in flags and "probes" not in flags.get("--modes", ""), stage.key
            continue
        assert flags["--modes"].split(",") == ["recall", "longppl", "attention", "probes"], stage.key
        assert flags["--probe_lengths"] == flags["--lengths"] and flags["--probe_count"] == "8", stage.key
        probed.add(stage.key.split("/", 2)[2])
    assert probed == {"eval", "eval_before", "eval_extend_b10", "eval_extend_p100", "eval-none"}
    lengths = {flags_of(s.command)["--probe_lengths"] for s in stages if "--probe_lengths" in s.command}
    assert lengths == {"256", "256,512,1024,2048"}  # before extension at L; every other stage at L..8L
    assert sweep.build_parser().parse_args(["--probe_count", "8"]).probe_count == 8
    assert sweep.build_parser().parse_args([]).probe_count == 32
    with pytest.raises(sweep.SweepError, match="--probe_count 0 must be at least 1"):
        Settings(out=tmp_path, probe_count=0)


def probe_results(folder: Path, label: str, needle: dict, mqar: dict, copy: dict) -> None:
    """An evaluate.py results.json with probe cells (and one other model's, which must not be read)."""
    cells = {**{f"needle/{n}": {"n": 32, "recall": v, "se": 1.0} for n, v in needle.items()},
             **{f"mqar/{n}": {"n": 32, "accuracy": v, "se": 1.0} for n, v in mqar.items()},
             **{f"copy/{n}": {"n": 32, "gain": v, "se": 0.1} for n, v in copy.items()}}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"probes": {label: cells, "other": {"needle/256": {
        "n": 32, "recall": 99.0, "se": 0.0}}}}))


def test_read_eval_reads_needle_recall_mqar_accuracy_and_copy_gain_by_length_and_skips_skipped_cells(tmp_path):
    probe_results(tmp_path / "eval", "m", needle={512: 25.0, 256: 50.0}, mqar={256: 70.0, 512: 35.0, 1024: 10.0},
                  copy={256: 1.5, 512: 0.5})
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    results["probes"]["m"]["needle/1024"] = {"skipped": "the haystack is shorter than 1024", "n": 0}
    (tmp_path / "eval" / "results.json").write_text(json.dumps(results))
    found = pool_analysis.read_eval(tmp_path / "eval", "m")
    assert found["needle"] == {256: 50.0, 512: 25.0} and list(found["needle"]) == [256, 512]
    assert found["mqar"] == {256: 70.0, 512: 35.0, 1024: 10.0} and found["copy"] == {256: 1.5, 512: 0.5}
    assert found["retrieval"] == {256: 60.0, 512: 30.0}  # the mean of the two, where both were measured
    assert pool_analysis.read_eval(tmp_path / "none", "m")["needle"] == {}


def test_collect_makes_the_probe_measures_the_mean_beyond_the_pretraining_length_before_and_after(tmp_path):
    settings = Settings(out=tmp_path, only=("pre_8kv_256",), control_models=("pre_8kv_256",))  # L = 256, to 2048
    arch = sweep.architectures(settings)[0]
    run_out = sweep.run_folder(settings, arch, 0)
    lengths = (256, 512, 1024, 2048)
    probe_results(run_out / "eval", arch.name, dict(zip(lengths, (80.0, 60.0, 40.0, 20.0))),
                  dict(zip(lengths, (90.0, 70.0, 50.0, 30.0))), dict(zip(lengths, (2.0, 1.0, 0.5, 0.0))))
    probe_results(run_out / "eval_before", arch.name, {256: 90.0}, {256: 100.0}, {256: 3.0})
    probe_results(run_out / "eval-none", arch.name, {2048: 5.0}, {2048: 15.0}, {2048: 0.25})
    [row] = pool_analysis.collect(settings, {f"{arch.name}/s0": (arch, 0, run_out)})
    assert (row["needle"], row["mqar"], row["copy"]) == pytest.approx((40.0, 50.0, 0.5))  # over 512, 1024, 2048
    assert row["retrieval"] == pytest.approx(45.0) and row["retrieval_by_length"][256] == pytest.approx(85.0)
    assert row["before"]["retrieval"] == pytest.approx(95.0) and row["before"]["copy"] == pytest.approx(3.0)
    assert row["budgets"][settings.ext_steps]["retrieval"] == pytest.approx(45.0)
    assert row["control"]["retrieval_by_length"] == {2048: 10.0}
    again = pool_analysis.rows_from_json(json.loads(json.dumps([row])))[0]  # analysis.json's string keys
    assert again["needle_by_length"] == row["needle_by_length"] and again["control"] == row["control"]
    control = pool_analysis.control_analysis([row])["pre_8kv_256"]["retrieval"][2048]
    assert (control["recipe"], control["control"], control["gap"]) == pytest.approx((25.0, 10.0, 15.0))


def probe_pool_rows() -> list[dict]:
    """The grid on two seeds, probed at L = 256 and 2048 only (the mean beyond L is the value at 2048). ctx costs
    20 points before extension, gqa 10 in the extension at L, and at 2048 qk costs 30 (needle) and 10 (MQAR),
    swa 8 and 4; seed 1 scores 2 points more everywhere (no effect moves with the seed)."""
    rows = []
    for arch, seed in itertools.product(sweep.grid(), (0, 1)):
        c, offset = arch.choices, 2.0 * seed
        before = {"needle": 80 - 20 * c["ctx"] + offset, "mqar": 60 - 20 * c["ctx"] + offset}
        at_256 = {k: v - 10 * c["gqa"] for k, v in before.items()}
        at_2048 = {"needle": at_256["needle"] - 30 * c["qk"] - 8 * c["swa"],
                   "mqar": at_256["mqar"] - 10 * c["qk"] - 4 * c["swa"]}
        by_length = {k: {256: at_256[k], 2048: at_2048[k]} for k in ("needle", "mqar")}
        by_length["retrieval"] = {n: (by_length["needle"][n] + by_length["mqar"][n]) / 2 for n in (256, 2048)}
        rows.append({"run": f"{arch.name}/s{seed}", "name": arch.name, "seed": seed, "choices": c,
                     "harmful_count": arch.harmful_count, "pretrain_context": arch.pretrain_context,
                     "window": arch.window, "val_loss_pretrain": 2 + 0.1 * c["ctx"] + 0.05 * c["qk"],
                     "recall_by_length": {}, "loss_by_length": {}, "copy_by_length": {},
                     **{f"{k}_by_length": v for k, v in by_length.items()}, "recall": None, "loss": None,
                     "longppl": None, "copy": None, **{k: v[2048] for k, v in by_length.items()}, "sink": 0.1,
                     "before": {"recall": None, "loss": None, "copy": None, **before,
                                "retrieval": (before["needle"] + before["mqar"]) / 2, "sink": 0.2},
                     "budgets": {}, "early": {}})
    return rows


def test_an_analysis_led_by_retrieval_gives_the_hand_computed_effects_parts_and_r2(tmp_path):
    settings = Settings(out=tmp_path, seeds=(0, 1))
    a = pool_analysis.analyze(probe_pool_rows(), "retrieval", settings)
    assert a["higher_is_better"] is True and a["models"] == 16
    effects = {choice: e["mean"] for choice, e in a["pairwise"].items()}
    assert effects == pytest.approx(dict(qk=-20, gqa=-10, swa=-6, ctx=-20))  # needle and MQAR's mean
    assert all(a["pairwise"][c]["negative"] == 8 and a["pairwise"][c]["seed_std"] == 0 for c in effects)
    parts = {part: {choice: e["mean"] for choice, e in a["parts"][part].items()} for part in pool_analysis.PARTS}
    assert parts["part_pretraining"] == pytest.approx(dict(qk=0, gqa=0, swa=0, ctx=-20))
    assert parts["part_extension"] == pytest.approx(dict(qk=0, gqa=-10, swa=0, ctx=0))
    assert parts["part_length"] == pytest.approx(dict(qk=-20, gqa=0, swa=-6, ctx=0))
    # y = 70 - 20 qk - 10 gqa - 6 swa - 20 ctx over independent choices of variance 1/4: var(y) = 936 / 4,
    # cov(y, count) = -56 / 4, var(count) = 1; the pretraining loss 2 + 0.1 ctx + 0.05 qk: cov -3 / 4, var 0.0125 / 4
    assert a["r2"]["harmful_count"] == pytest.approx(14 ** 2 / 234)
    assert a["r2"]["pretraining_val_loss"] == pytest.approx(0.75 ** 2 / (0.003125 * 234))
    # r keeps the sign R² drops: both covariances are negative, so the measure falls as each predictor grows
    assert a["r"]["harmful_count"] == pytest.approx(-14 / 234 ** 0.5)
    assert a["r"]["pretraining_val_loss"] == pytest.approx(-0.75 / (0.003125 * 234) ** 0.5)
    assert a["parts_r2_count"]["part_length"] == pytest.approx(6.5 ** 2 / 109)
    assert a["parts_r2_count"]["part_pretraining"] == pytest.approx(0.25)
    needle = pool_analysis.analyze(probe_pool_rows(), "needle", settings)
    assert {c: e["mean"] for c, e in needle["pairwise"].items()} == pytest.approx(dict(qk=-30, gqa=-10, swa=-8, ctx=-20))
    assert needle["r2"]["harmful_count"] == pytest.approx(17 ** 2 / 366)
    mqar = pool_analysis.analyze(probe_pool_rows(), "mqar", settings)
    assert mqar["pairwise"]["qk"]["mean"] == pytest.approx(-10) and mqar["pairwise"]["swa"]["mean"] == pytest.approx(-4)


def test_the_analysis_written_with_retrieval_first_names_it_and_reads_its_rows_back(tmp_path):
    settings = Settings(out=tmp_path / "runs", seeds=(0, 1))
    rows = pool_analysis.rows_from_json(json.loads(json.dumps(probe_pool_rows())))
    assert sweep.build_parser().parse_args(["--measure", "retrieval"]).measure == "retrieval"
    report = pool_analysis.write_analysis(settings, rows, "retrieval", ["sweep.py"], "here", tmp_path)
    assert list(report["analyses"])[:1] == ["retrieval"] and {"needle", "mqar"} <= set(report["analyses"])
    assert "copy" not in report["analyses"] and "loss" not in report["analyses"]  # not measured: no section
    assert report["analyses"]["retrieval"]["r2"]["harmful_count"] == pytest.approx(14 ** 2 / 234)
    text = (tmp_path / "analysis" / "analysis.md").read_text()
    assert "Primary measure: **retrieval** (recall after extension" in text
    assert "## retrieval: recall after extension" in text and "(higher is better)" in text
    assert "| qk: " in text and "-20.000 ± 0.000 (worse in 8/8)" in text  # the total and the length-specific part
    assert "## Retrieval probes per model" in text
    assert "| count of harmful choices | 0.838 | -0.92 | 0.67 |" in text  # R², then r with its sign
    assert "| pre_8kv_256 | 0 | 256: 80, 2048: 80 | 256: 60, 2048: 60 | – | 70.0 | 70.0 |" in text
    assert (tmp_path / "analysis" / "retrieval_vs_count.png").is_file()
    assert "## Retrieval probes" not in pool_analysis.markdown({}, [dict(r, needle_by_length={}, mqar_by_length={})
                                                                   for r in rows], settings, "retrieval")
    assert np.isfinite(report["analyses"]["needle"]["r2"]["pretraining_val_loss"])
