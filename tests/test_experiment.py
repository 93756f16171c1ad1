"""The main job (experiment.py, what ./run.sh runs): pretrain -> extend -> evaluate, shortened."""

import json
import sys
import sysconfig
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import compact_vocabulary  # noqa: E402
import data  # noqa: E402
import experiment  # noqa: E402

L = 32
TINY = ["--d_model", "32", "--n_layers", "2", "--n_heads", "4", "--head_dim", "8", "--mlp_hidden", "64",
        "--window", "8", "--global_every", "2", "--context_length", str(L), "--batch_tokens", str(4 * L),
        "--eval_every", "0", "--log_every", "1000", "--peak_flops", "1e12", "--threads", "1", "--regime", "text"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """200K tokens of the built-in corpus with a tenth held out, in a 512-id compact vocabulary."""
    out, sources = tmp_path_factory.mktemp("corpus"), []
    documents = data.builtin_documents(Path(sysconfig.get_paths()["stdlib"]), sources)
    data.write_corpus(documents, out / "dolma2", 0.1, data.DEFAULT_SHARD_TOKENS, sources, total_bytes=1,
                      max_tokens=200_000, progress=False)
    return compact_vocabulary.compact_folder(out / "dolma2", 512, out / "compact", progress=False)


def test_the_main_job_runs_every_stage_prints_one_table_and_resumes_without_redoing(corpus, tmp_path, capfd):
    argv = [*TINY, "--data", str(corpus), "--out", str(tmp_path / "job"), "--steps", "4", "--extend_steps", "2",
            "--samples", "1", "--tasks", "niah_single_1"]
    table = experiment.main(argv)
    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows == {"model", "pretrained", "extended", "none control"}
    assert f"loss @ {L} " in table and f"loss @ {4 * L} " in table
    job = tmp_path / "job"
    for recipe in ("olmpool", "none"):
        state = json.loads((job / f"extend-{recipe}" / "step_0000002" / "train_state.json").read_text())
        assert state["extension"]["recipe"] == recipe and state["extension"]["seq_len"] == 4 * L
    assert (job / "eval" / "before_after.md").read_text().strip() == table.strip()
    results = json.loads((job / "eval" / "results.json").read_text())
    capfd.readouterr()

    assert experiment.main(argv) == table  # the same command again: every stage is done already
    printed = capfd.readouterr().out
    assert printed.count("nothing to do") == 3  # pretraining and both extensions
    assert json.loads((job / "eval" / "results.json").read_text()).keys() == results.keys()


def test_the_extensions_read_extend_data_while_pretraining_and_evaluation_keep_data(corpus, tmp_path, monkeypatch):
    import shutil
    long_documents = shutil.copytree(corpus, tmp_path / "long")  # another folder in the same vocabulary
    commands, evaluated = [], {}
    stages_recorded(monkeypatch, commands, evaluated)  # no stage runs
    experiment.main([*TINY, "--data", str(corpus), "--extend_data", str(long_documents), "--out", str(tmp_path / "job"),
                     "--steps", "4", "--extend_steps", "2"])
    data_of = {command[1]: [] for command in commands}
    for command in commands:
        data_of[command[1]].append(command[command.index("--data") + 1])
    assert data_of == {"train.py": [str(corpus)], "extend.py": [str(long_documents)] * 2}
    assert evaluated["folder"] == corpus  # held-out loss on the pretraining folder's val split


def test_extend_data_in_another_vocabulary_is_refused_in_one_line_before_any_work(corpus, tmp_path, capsys):
    dolma2 = corpus.parent / "dolma2"  # the folder the compact one was made from
    for flags, said in ((["--data", str(corpus), "--extend_data", str(dolma2)], "the same ids would mean other text"),
                        (["--extend_data", str(corpus)], "needs --data"),
                        (["--data", str(dolma2), "--extend_data", str(dolma2), "--compact_vocab", "512"],
                         "each on its own, into different mappings"),
                        (["--data", str(corpus), "--extend_data", str(tmp_path / "nowhere")], "no such folder")):
        with pytest.raises(SystemExit):
            experiment.main([*TINY, *flags, "--out", str(tmp_path / "job")])
        assert said in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "job").exists()


def test_extend_factor_and_rope_factor_reach_the_recipe_only_and_set_the_evaluated_length(corpus, tmp_path, monkeypatch):
    commands, evaluated = [], {}
    stages_recorded(monkeypatch, commands, evaluated)
    experiment.main([*TINY, "--data", str(corpus), "--out", str(tmp_path / "job"), "--steps", "4", "--extend_steps", "2",
                     "--extend_factor", "8", "--extend_rope_factor", "16"])
    extensions = {c[c.index("--recipe") + 1]: c for c in commands if c[1] == "extend.py"}
    length = evaluated["length"]
    for recipe, command in extensions.items():
        assert command[command.index("--seq_len") + 1] == str(8 * length)
    assert extensions["olmpool"][extensions["olmpool"].index("--rope_factor") + 1] == "16.0"
    assert "--rope_factor" not in extensions["none"]  # the control keeps RoPE as it was
    train_command = next(c for c in commands if c[1] == "train.py")
    assert "--rope_factor" not in train_command  # pretraining is not scaled
    assert evaluated["long_factor"] == 8


def stages_recorded(monkeypatch, commands: list, evaluated: dict):
    """experiment.main with every stage recorded rather than run, and what evaluate.before_after is given."""
    def evaluate(checkpoints, folder, length, out, **options):
        evaluated.update(options, length=length, folder=Path(folder))
        Path(out).mkdir(parents=True, exist_ok=True)
        return "| model |"
    monkeypatch.setattr(experiment, "run", lambda command, what: commands.append(command))
    monkeypatch.setattr(experiment.checkpoint, "checkpoints_in", lambda folder: [Path(folder) / "step_0000004"])
    monkeypatch.setattr(experiment.evaluate, "before_after", evaluate)


def flag(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_the_retrieval_regime_is_the_default_and_a_set_of_flags_that_given_flags_override(corpus, tmp_path,
                                                                                         monkeypatch):
    commands, evaluated = [], {}
    stages_recorded(monkeypatch, commands, evaluated)
    given = [f for f in TINY if f not in ("--regime", "text")]
    experiment.main([*given, "--micro_batch", "4", "--data", str(corpus), "--out", str(tmp_path / "job"),
                     "--steps", "4"])
    pretrain = next(c for c in commands if c[1] == "train.py")
    assert "--mask_documents" in pretrain and flag(pretrain, "--schedule") == "wsd" and flag(pretrain, "--warmup") == "100"
    assert flag(pretrain, "--rope_theta") == "10000.0"
    assert flag(pretrain, "--steps") == "4" and flag(pretrain, "--context_length") == str(L)  # given: theirs win
    extensions = {flag(c, "--recipe"): c for c in commands if c[1] == "extend.py"}
    assert {flag(c, "--seq_len") for c in extensions.values()} == {str(8 * L)}
    assert {flag(c, "--steps") for c in extensions.values()} == {"420"}
    assert flag(extensions["olmpool"], "--rope_factor") == "16.0" and "--rope_factor" not in extensions["none"]
    assert evaluated["long_factor"] == 8

    commands.clear()
    experiment.main([*TINY, "--data", str(corpus), "--out", str(tmp_path / "text")])  # --regime text: none of it
    pretrain = next(c for c in commands if c[1] == "train.py")
    assert "--mask_documents" not in pretrain and flag(pretrain, "--steps") == str(experiment.PRETRAIN_STEPS)
    assert flag(pretrain, "--rope_theta") is None and evaluated["long_factor"] == 4


def test_without_data_the_retrieval_regime_builds_its_two_mixes_once_beside_the_corpus(corpus, tmp_path,
                                                                                      monkeypatch, capsys):
    import shutil
    builtin = shutil.copytree(corpus, tmp_path / "builtin_v512")
    vocabularies = []  # the compact vocabulary asked of the built-in corpus

    def data_dir(folder, vocab, env):
        vocabularies.append(None if folder else vocab)
        return Path(folder) if folder else builtin
    monkeypatch.setattr(experiment.train, "data_dir", data_dir)
    commands, evaluated = [], {}
    stages_recorded(monkeypatch, commands, evaluated)
    given = [f for f in TINY if f not in ("--regime", "text")]
    argv = [*given, "--micro_batch", "4", "--out", str(tmp_path / "job"), "--steps", "4"]
    experiment.main(argv)
    pretraining, extension = tmp_path / f"builtin_v512_retrieval_L{L}", tmp_path / f"builtin_v512_retrieval_long_{8 * L}"
    assert {flag(c, "--data") for c in commands if c[1] == "train.py"} == {str(pretraining)}
    assert {flag(c, "--data") for c in commands if c[1] == "extend.py"} == {str(extension)}
    assert evaluated["folder"] == pretraining  # its val split is the corpus's, unchanged
    packed, long = experiment.synthetic.recipe_of(pretraining), experiment.synthetic.recipe_of(extension)
    assert (packed["lengths"], packed["seq_len"], packed["share"]) == ("packed", L, experiment.RETRIEVAL_SHARE)
    assert (long["lengths"], long["seq_len"], long["share"]) == ("long", 8 * L, experiment.EXTENSION_SHARE)
    assert compact_vocabulary.vocabulary_name(pretraining)[1] == compact_vocabulary.vocabulary_name(builtin)[1]
    assert experiment.RETRIEVAL_COMPACT_VOCAB in vocabularies  # the regime's own, not the size's default

    def no_second_build(*args, **kwargs):
        raise AssertionError("a built mix is reused")
    monkeypatch.setattr(experiment.synthetic, "build_mix", no_second_build)
    commands.clear()
    experiment.main(argv)
    assert {flag(c, "--data") for c in commands if c[1] == "train.py"} == {str(pretraining)}

    shutil.rmtree(extension)  # another mix where the regime's should be: refused, not replaced
    monkeypatch.undo()
    monkeypatch.setattr(experiment.train, "data_dir", data_dir)
    stages_recorded(monkeypatch, commands, evaluated)
    ids = experiment.synthetic.default_ids(data.read_manifest(builtin)["tokenizer"], 64)
    experiment.synthetic.build_mix(builtin, extension, 8 * L, 0.3, ids=ids, lengths="long", progress=False)
    with pytest.raises(data.DataError, match="holds another synthetic mix"):
        experiment.main(argv)

    other_ids = experiment.synthetic.default_ids(data.read_manifest(builtin)["tokenizer"], 32)  # the rest as wanted
    experiment.synthetic.build_mix(builtin, extension, 8 * L, experiment.EXTENSION_SHARE, ids=other_ids,
                                   lengths="long", progress=False)
    with pytest.raises(data.DataError, match="holds another synthetic mix"):
        experiment.main(argv)

    vocabularies.clear()
    with pytest.raises(data.DataError):
        experiment.main([*argv, "--compact_vocab", "512"])
    assert vocabularies[0] == 512  # --compact_vocab given: the corpus in it
