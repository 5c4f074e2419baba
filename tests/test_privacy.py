"""privacy.py end to end on tiny tables: N originals, N reference retrains, N ceiling retrains and N
unlearned models per method, from the per-example files the runs wrote; a second call runs nothing.
A random request forgets the same samples in all of its models."""
import json

import experiments
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
    # 3 originals' baselines, 3 reference retrains, 3 retrains as the method, 3 ceiling retrains
    assert "privacy: 12 runs, 0 already done, 12 to run" in capsys.readouterr().out
    assert privacy.main(argv) == 0
    assert "privacy: 12 runs, 12 already done, 0 to run" in capsys.readouterr().out
    again = json.loads((tmp_path / "p.json").read_text())
    assert again["requests"] == first["requests"]


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
