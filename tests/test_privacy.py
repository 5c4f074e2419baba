"""privacy.py end to end on a tiny table: N originals, N reference retrains, N ceiling retrains and N
unlearned models per method, from the per-example files the runs wrote; a second call runs nothing."""
import json

import experiments
import privacy
import pytest
from common import UserError

TINY = experiments.Table("full_class", "resnet18", "digits", ["three"],
                         ["--width", "4", "--image-size", "16", "--epochs", "2", "--milestones", "1"])


def test_many_models_find_the_original_out_and_reuse_every_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(experiments.TABLES, "tiny_full", TINY)
    monkeypatch.setitem(experiments.EMBEDDED_TABLES, "tiny_full", TINY)
    argv = ["cpu", "--table", "tiny_full", "--methods", "baseline retrain", "--n-models", "3",
            "--results", str(tmp_path / "r.jsonl"), "--checkpoint-dir", str(tmp_path / "ck"),
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


@pytest.mark.parametrize("argv, match", [(["--n-models", "2"], "too few"),
                                         (["--table", "pairs10_random_resnet"], "needs a class table"),
                                         (["--table", "nope"], "unknown table")])
def test_bad_requests_are_refused_before_any_run(argv, match):
    with pytest.raises(UserError, match=match):
        privacy.parse_args(argv)
