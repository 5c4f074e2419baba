"""The Python API: a RunConfig built in Python is the same run as the task script's command line.

execute(RunConfig(...)) in this process and `python <script> <config.to_argv()>` in another must write
the same record (metrics, method info, key and config), for every scenario; from_argv and to_argv
are inverses; a value given in Python is checked as strictly as a flag.
"""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import forget_full_class_main
import forget_random_main
import forget_sub_class_main
import methods
import results
import runner
from common import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_PARAMS = {"full_class": forget_full_class_main.SSD_PARAMS, "sub_class": forget_sub_class_main.SSD_PARAMS,
                 "random": forget_random_main.SSD_PARAMS}
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def requests(tiny: Path, digits5: Path) -> dict:
    """One request per scenario, each with a non-default hyperparameter and a non-default run field."""
    return {
        "full_class": dict(method="ssd", hp=methods.SSDParams(alpha=5.0), forget_class="three", weights=tiny),
        "sub_class": dict(method="retrain", hp=methods.RetrainParams(retrain_epochs=1), dataset="digits5",
                          forget_class="one", weights=digits5, eval_batch_size=100),
        "random": dict(method="assd", hp=methods.AssdParams(importance_order="shuffled"), forget_fraction=0.02,
                       weights=tiny, model_seed=0),
    }


@pytest.mark.parametrize("scenario", ["full_class", "sub_class", "random"])
def test_execute_in_process_and_the_script_with_to_argv_write_the_same_record(scenario, tiny_checkpoint,
                                                                            digits5_checkpoint, tmp_path):
    fields = requests(tiny_checkpoint / "model.pt", digits5_checkpoint / "model.pt")[scenario]
    config = runner.RunConfig(scenario, seed=2, device="cpu", wandb="disabled", results=str(tmp_path / "r.jsonl"),
                              importance_cache=str(tmp_path / "cache"), **{**fields, "weights": str(fields["weights"])})
    in_process = runner.execute(config)
    examples = results.load_examples(tmp_path / "r.jsonl", in_process["key"])
    (tmp_path / "r.jsonl").unlink()
    shutil.rmtree(tmp_path / "r.jsonl.examples")
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # the script must compute I_D again, not read it

    argv = config.to_argv()
    out = subprocess.run([sys.executable, runner.SCRIPTS[scenario], *argv], cwd=ROOT, env=CHILD_ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (by_script,) = results.read(tmp_path / "r.jsonl")
    assert by_script["key"] == in_process["key"]
    assert by_script["metrics"] == in_process["metrics"] and by_script["method_info"] == in_process["method_info"]
    assert by_script["config"] == json.loads(json.dumps(in_process["config"]))
    # the per-example side file: phi of the forget set and of its unseen counterpart, the same either way
    assert in_process["examples"] == by_script["examples"] == f"{in_process['key']}.npz"
    again = results.load_examples(tmp_path / "r.jsonl", by_script["key"])
    assert sorted(examples) == ["counterpart_idx", "forget_idx", "phi_counterpart", "phi_forget"]
    assert all((examples[k] == again[k]).all() for k in examples)
    m = in_process["metrics"]
    assert examples["phi_forget"].shape == examples["forget_idx"].shape == (m["n_forget_train"],)
    counterpart = m["n_forget_test"] if scenario != "random" else m["n_forget_test"] + m["n_retain_test"]
    assert examples["phi_counterpart"].shape == (counterpart,) and 0.0 <= m["loss_auc"] <= 1.0
    assert in_process["metrics"]["df"] is not None and in_process["times"]["method_s"] > 0
    # the command line is short: the defaults stay out of it, the non-defaults and the run's name are in
    assert "--eval-batch-size" not in argv or scenario == "sub_class"
    assert argv[:2] == ["--net", "resnet18"] and "--method" in argv and "--seed" in argv and "--device" in argv


def test_from_argv_inverts_to_argv():
    config = runner.RunConfig("random", method="finetune", hp=methods.FinetuneParams(finetune_lr=0.05), seed=7,
                              forget_count=30, forget_seed=5, batch_size=32, amp=True, importance_cache="",
                              separate_records=True, results="x/r.jsonl", wandb="offline", wandb_project="p",
                              device="cpu")
    argv = config.to_argv()
    assert "--no-importance-cache" not in argv and argv[argv.index("--importance-cache") + 1] == ""
    assert argv[argv.index("--forget-seed") + 1] == "5"
    assert runner.RunConfig.from_argv("random", argv, SCRIPT_PARAMS["random"]) == config.resolve()
    # the worker's path: plain JSON there and back
    assert runner.RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    unset = dataclasses.replace(config, forget_seed=None)
    assert "--forget-seed" not in unset.to_argv() and runner.RunConfig.from_dict(unset.to_dict()).forget_seed is None
    alpha_inf = runner.RunConfig("full_class", forget_class="3", hp=methods.SSDParams(alpha=float("inf")))
    assert runner.RunConfig.from_argv("full_class", alpha_inf.to_argv()) == alpha_inf.resolve()
    with pytest.raises(UserError, match="forget_class has no flag"):
        runner.RunConfig("random", forget_class="three").to_argv()


@pytest.mark.parametrize("scenario", ["full_class", "sub_class", "random"])
def test_python_and_the_command_line_have_the_same_defaults(scenario):
    required = {} if scenario == "random" else {"forget_class": "three"}
    flags = [] if scenario == "random" else ["--forget-class", "three"]
    for method in methods.REGISTRY:
        from_python = runner.RunConfig(scenario, method=method, **required).resolve(SCRIPT_PARAMS[scenario])
        assert runner.RunConfig.from_argv(scenario, flags + ["--method", method], SCRIPT_PARAMS[scenario]) == from_python
    # and the defaults the scripts share with the other entry points are the same values
    defaults = runner.parser_defaults(scenario)
    for name, (_, flag) in cli.SHARED_FLAGS.items():
        if name in defaults and name not in ("dataset",):
            assert defaults[name] == flag.get("default", False), name


def test_a_value_given_in_python_is_checked_like_a_flag():
    cases = {"seed (--seed): -1 is out of range": dict(seed=-1),
             r"batch_size \(--batch-size\): '64' is not an integer": dict(batch_size="64"),
             "alpha (--alpha): -1.0 is out of range": dict(hp=methods.SSDParams(alpha=-1.0)),
             "importance_order (--importance-order): 'random' is not one of paper, shuffled":
                 dict(hp=methods.SSDParams(importance_order="random")),
             "hp is a FinetuneParams, but ssd takes methods.SSDParams": dict(hp=methods.FinetuneParams()),
             "method (--method): 'sdd' is not one of": dict(method="sdd"),
             "unknown device 'gpu'": dict(device="gpu"),
             r"amp \(--amp\): 1 is not True or False": dict(amp=1),
             "forgetting takes forget_class, not forget_count": dict(forget_count=5),
             "not forget_count, forget_fraction or forget_seed": dict(forget_seed=1)}
    for message, fields in cases.items():
        with pytest.raises(UserError, match=re.escape(message) if "\\" not in message else message):
            runner.RunConfig("full_class", forget_class="three", **fields).resolve()
    with pytest.raises(UserError, match="full_class forgetting needs forget_class"):
        runner.RunConfig("full_class").resolve()
    with pytest.raises(UserError, match="exclude each other"):
        runner.RunConfig("random", forget_count=5, forget_fraction=0.1).resolve()
    with pytest.raises(UserError, match=re.escape("forget_seed (--forget-seed): -1 is out of range")):
        runner.RunConfig("random", forget_seed=-1).resolve()
    resolved = runner.RunConfig("full_class", forget_class=3, hp=methods.SSDParams(alpha=5)).resolve()
    assert resolved.forget_class == "3" and resolved.hp.alpha == 5.0 and isinstance(resolved.hp.alpha, float)


def test_an_int_alpha_in_python_is_the_same_run_as_the_flag(tiny_checkpoint, tmp_path):
    common = dict(forget_class="three", weights=str(tiny_checkpoint / "model.pt"), results=str(tmp_path / "r.jsonl"))
    python = runner.plan(runner.RunConfig("full_class", hp=methods.SSDParams(alpha=5), **common))
    flags = runner.plan(runner.RunConfig.from_argv("full_class", ["--alpha", "5", "--forget-class", "three",
                                                                  "--weights", common["weights"]]))
    assert python.key == flags.key


def test_forget_seed_draws_the_forget_set_and_joins_the_key_only_when_set(tiny_checkpoint, tmp_path):
    def planned(**fields) -> runner.Plan:
        where = dict(weights=str(tiny_checkpoint / "model.pt"), results=str(tmp_path / "r.jsonl"))
        return runner.plan(runner.RunConfig("random", forget_count=12, **{"seed": 3, **where, **fields}))

    unset, own, other = planned(), planned(forget_seed=3), planned(forget_seed=4)
    # without forget_seed the key is the one recorded before the field existed: the same fields, hashed alike
    assert "forget_seed" not in runner.COMMON_KEY
    before = [k for k in runner.COMMON_KEY + tuple(methods.REGISTRY["ssd"].param_names) if k != "forget_seed"]
    assert unset.key == results.run_key(unset.record_config, tuple(before))
    old_record = {k: v for k, v in unset.record_config.items() if k != "forget_seed"}  # as older records hold it
    assert runner.record_key(old_record) == unset.key
    # forget_seed=None draws with the run seed: the same samples as forget_seed=seed, under another key
    assert (unset.splits.forget_idx == own.splits.forget_idx).all() and unset.key != own.key
    # another forget seed, another forget set and another key, on the same original and run seed
    assert set(own.splits.forget_idx) != set(other.splits.forget_idx) and own.key != other.key
    assert len(own.splits.forget_idx) == len(other.splits.forget_idx) == 12
    assert runner.record_key(own.record_config) == own.key and runner.record_key(other.record_config) == other.key
    # the run seed no longer picks the samples once forget_seed is fixed
    assert (planned(forget_seed=4, seed=5).splits.forget_idx == other.splits.forget_idx).all()


def test_the_readme_python_snippet_runs(tmp_path, monkeypatch):
    import pretrain_model

    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(from runner import RunConfig, execute\n.*?)```", text, re.S).group(1)
    # the checkpoint the snippet's seed looks up, as the quick suite leaves it (narrower and shorter here)
    pretrain_model.main(["--dataset", "pairs100", "--width", "4", "--epochs", "1", "--milestones", "--seed", "1",
                         "--checkpoint-dir", str(tmp_path / "runs" / "pretrain"), "--device", "cpu"])
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    record = scope["record"]
    assert record["config"]["method"] == "ssd" and record["config"]["alpha"] == 5.0
    assert results.read(tmp_path / "runs" / "results.jsonl")[0]["key"] == record["key"]
    assert dataclasses.is_dataclass(scope["config"])
