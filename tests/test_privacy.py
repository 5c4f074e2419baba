"""privacy.py end to end on tiny tables: N originals, N reference retrains, N ceiling retrains and N
unlearned models per method, from the per-example files the runs wrote; a second call runs nothing.
A random request forgets the same samples in all of its models."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import experiments
import make_tables
import models
import privacy
import pytest
import results
import runner
from common import UserError

TINY_PRETRAIN = ["--width", "4", "--image-size", "16", "--epochs", "2", "--milestones", "1"]
TINY = experiments.Table("full_class", "resnet18", "digits", ["three"], TINY_PRETRAIN)
# split seeds as the verdict suite's random table has them: privacy.py runs each original with its own
# seed instead, and the forget seed draws the samples
TINY_RANDOM = experiments.Table("random", "resnet18", "digits", [None], TINY_PRETRAIN, ["--forget-count", "12"],
                                split_seeds=[7, 8])


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """One checkpoint folder for the module: both tables train the same three originals."""
    return tmp_path_factory.mktemp("originals")


@pytest.fixture()
def tiny_tables(monkeypatch):
    for name, table in (("tiny_full", TINY), ("tiny_random", TINY_RANDOM)):
        monkeypatch.setitem(experiments.TABLES, name, table)
        monkeypatch.setitem(experiments.EMBEDDED_TABLES, name, table)


def test_many_models_find_the_original_out_and_reuse_every_run(tmp_path, originals, tiny_tables, capsys):
    argv = ["cpu", "--table", "tiny_full", "--methods", "baseline retrain", "--n-models", "3",
            "--results", str(tmp_path / "r.jsonl"), "--checkpoint-dir", str(originals),
            "--logs", str(tmp_path / "logs"), "--out", str(tmp_path / "p.json")]
    assert privacy.main(argv) == 0
    first = json.loads((tmp_path / "p.json").read_text())
    (request,) = first["requests"]
    assert (request["table"], request["forget"], request["n_models"], request["seeds"]) == ("tiny_full", "three", 3,
                                                                                            [1, 2, 3])
    assert set(request["methods"]) == {"baseline", "retrain", "reference retrain"}
    baseline, retrain = request["methods"]["baseline"], request["methods"]["retrain"]
    # the originals trained on the class and the retrains never saw it: their phi never overlap, so every
    # example's epsilon is capped and F is 0, and the attack separates them
    assert baseline["forgetting_quality"] == 0.0 and baseline["ulira_auc"] > 0.9
    # retrains against other retrains overlap: the method `retrain` scores above the original on both counts
    assert retrain["forgetting_quality"] > baseline["forgetting_quality"] and retrain["ulira_auc"] < baseline["ulira_auc"]
    assert retrain["loss_auc_sd"] is not None and request["methods"]["reference retrain"]["loss_auc_mean"] is not None
    assert retrain["ceiling"] == baseline["ceiling"] and 0.0 <= retrain["forgetting_quality"] <= 1.0
    assert retrain["ulira_auc_ceiling"] == baseline["ulira_auc_ceiling"] < baseline["ulira_auc"]
    # 3 originals' baselines, 3 reference retrains, 3 retrains as the method, 3 ceiling retrains
    assert "privacy: 12 runs, 0 already done, 12 to run" in capsys.readouterr().out
    assert privacy.main(argv) == 0
    assert "privacy: 12 runs, 12 already done, 0 to run" in capsys.readouterr().out
    again = json.loads((tmp_path / "p.json").read_text())
    assert again["requests"] == first["requests"]
    # the verdict of these runs, rendered at the end, carries the privacy columns under the records' table name
    verdict = (tmp_path / "p-tables" / "tables.md").read_text().split("### digits_full_resnet")[0]
    header, rule, *rows = [re.split(r"(?<!\\)\|", line) for line in verdict.splitlines() if line.startswith("|")]
    assert all(len(row) == len(header) for row in rows)
    by_method = {row[1].strip(): row for row in rows}
    column = header.index(" U-LiRA AUC ")
    assert header[column - 1] == " F / ceiling "
    assert float(by_method["baseline"][column]) == pytest.approx(baseline["ulira_auc"], abs=0.005)
    assert float(by_method["retrain"][column]) == pytest.approx(retrain["ulira_auc"], abs=0.005)


def test_a_random_request_forgets_the_same_samples_in_every_model(tmp_path, originals, tiny_tables):
    argv = ["cpu", "--table", "tiny_random", "--methods", "baseline", "--n-models", "3", "--forget-seeds", "1",
            "--results", str(tmp_path / "r.jsonl"), "--checkpoint-dir", str(originals),
            "--logs", str(tmp_path / "logs"), "--out", str(tmp_path / "p.json")]
    assert privacy.main(argv) == 0
    (request,) = json.loads((tmp_path / "p.json").read_text())["requests"]
    assert (request["table"], request["forget"], request["n_models"], request["seeds"]) == ("tiny_random", "seed 1",
                                                                                            3, [1, 2, 3])
    assert set(request["methods"]) == {"baseline", "reference retrain"}
    assert request["methods"]["baseline"]["ulira_auc"] is not None
    # 3 baselines, 3 reference retrains and 3 ceiling retrains, on the originals' own seeds (not the split seeds)
    records = results.read(tmp_path / "r.jsonl")
    assert len(records) == 9 and {r["config"]["model_seed"] for r in records} == {1, 2, 3}
    assert {r["config"]["seed"] for r in records} == {1, 2, 3, 20_001, 20_002, 20_003}
    assert all(r["config"]["forget_seed"] == 1 and r["config"]["forget_count"] == 12 for r in records)
    # the samples forget seed 1 draws, which a lone run with run seed 1 draws as well
    alone = runner.plan(runner.RunConfig("random", forget_count=12, seed=1, checkpoint_dir=str(originals),
                                         results=str(tmp_path / "alone.jsonl")))
    for r in records:
        forgotten = results.load_examples(tmp_path / "r.jsonl", r["key"])["forget_idx"]
        assert sorted(forgotten) == sorted(alone.splits.forget_idx)


def test_forget_seeds_name_the_random_requests():
    assert privacy.parse_args(["--table", "pairs10_random_resnet"]).forget_seeds == [1]
    assert privacy.parse_args(["--table", "pairs10_random_resnet", "--forget-seeds", "3,1 3"]).forget_seeds == [3, 1]
    assert privacy.parse_args(["--table", "pairs100_full_resnet"]).forget_seeds is None


@pytest.mark.parametrize("argv, match", [(["--n-models", "2"], "too few"),
                                         (["--table", "pairs10_random_resnet", "--classes", "07"],
                                          "--classes is for class tables"),
                                         (["--table", "pairs100_full_resnet", "--forget-seeds", "1"],
                                          "--forget-seeds is for random tables"),
                                         (["--table", "pairs10_random_resnet", "--forget-seeds", "1 x"],
                                          "not a list of non-negative integers"),
                                         (["--table", "nope"], "unknown table")])
def test_bad_requests_are_refused_before_any_run(argv, match):
    with pytest.raises(UserError, match=match):
        privacy.parse_args(argv)


def test_privacy_columns_are_means_over_requests(tmp_path):
    numbers = lambda f, auc: {"f_over_ceiling": f, "ulira_auc": auc, "ulira_auc_ceiling": auc - 0.1}  # noqa: E731
    request = {"table": "mine", "n_models": 16, "scenario": "full_class", "net": "resnet18", "dataset": "pairs100"}
    (tmp_path / "p.json").write_text(json.dumps({"requests": [
        {**request, "forget": "07", "methods": {"ssd": numbers(0.2, 0.9), "retrain": numbers(1.1, 0.5)}},
        {**request, "forget": "18", "methods": {"ssd": numbers(0.4, 0.7), "retrain": numbers(0.9, 0.4)}}]}))
    found = make_tables.load_privacy([str(tmp_path / "p.json")])
    assert set(found) == {"pairs100_full_resnet"} and len(found["pairs100_full_resnet"]["ssd"]) == 2
    assert make_tables._privacy_cells(found["pairs100_full_resnet"]["ssd"]) == ("0.30", "0.80")
    assert make_tables._privacy_cells(found["pairs100_full_resnet"]["retrain"]) == ("1.00", "0.45")
    assert make_tables._privacy_cells([]) == ("n/a", "n/a")
    assert make_tables._privacy_mean(found["pairs100_full_resnet"]["ssd"], "ulira_auc_ceiling") == "0.70"
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="cannot be read"):
        make_tables.load_privacy([str(tmp_path / "bad.json")])


def test_the_privacy_suite_runs_through_privacy_py(tmp_path):
    env = {**os.environ, "VENV": str(Path(sys.executable).parents[1])}
    root = Path(__file__).resolve().parents[1]
    run = lambda *argv, **extra: subprocess.run(["bash", "MAIN_run_experiments.sh", *argv], cwd=root,  # noqa: E731
                                                capture_output=True, text=True, env={**env, **extra}, timeout=120)
    assert "--n-models" in run("--suite", "privacy", "--help").stdout
    assert "--n-models" in run("--help", SUITE="privacy").stdout
    assert "--n-models" not in run("--suite", "quick", "--help").stdout
    with pytest.raises(UserError, match="runs through privacy.py"):
        experiments.main(["--suite", "privacy", "--results", str(tmp_path / "r.jsonl")])
    # its originals are 16x16 in a folder of their own; the pairs' usual 32x32 ones are refused there
    args = privacy.parse_args([])
    assert args.checkpoint_dir == experiments.PRIVACY_CHECKPOINTS and args.out == "runs/privacy-seeds1-16.json"
    suite = experiments.PRIVACY_TABLES["pairs100_full_resnet"]
    assert suite.classes == ["07", "18"] and suite.pretrain_flags[-2:] == ["--image-size", "16"]
    folder = tmp_path / "resnet18-pairs100-seed1"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"")
    (folder / "meta.json").write_text(json.dumps({"net": "resnet18", "dataset": "pairs100", "seed": 1,
                                                  "model_spec": models.make_spec("resnet18", 100, 32, 16)}))
    driver = experiments.parse_args(["--suite", "privacy", "--seeds", "1", "--checkpoint-dir", str(tmp_path),
                                     "--results", str(tmp_path / "r.jsonl"), "--logs", str(tmp_path / "logs")])
    with pytest.raises(UserError, match="trained at image size 32, but table pairs100_full_resnet pretrains at 16"):
        experiments.pretrain_commands(driver, experiments.select_tables(driver))
    assert experiments.pretrain_commands(driver, {"pairs100_full_resnet": experiments.TABLES["pairs100_full_resnet"]}) \
        == {}
