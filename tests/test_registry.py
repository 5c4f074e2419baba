"""The method registry: hyperparameters beside their method, flags generated from them, run keys that
hold only what defines a run, and results written under the earlier key rule still counting as done."""
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import cli
import experiments
import methods
import runner
from common import UserError
from conftest import SSD_PARAMS, plan_argv, run_argv

ROOT = Path(__file__).resolve().parents[1]
FLAGS = {"full_class": ["--forget-class", "three"], "sub_class": ["--forget-class", "three", "--dataset", "digits5"],
         "random": ["--forget-count", "12"]}


@pytest.fixture
def add_toy_method(monkeypatch):
    """Registers, when called, a method with one hyperparameter exactly as methods.py registers its own;
    the registry is restored afterwards."""
    monkeypatch.setattr(methods, "REGISTRY", dict(methods.REGISTRY))

    def add():
        @dataclass
        class ToyParams:
            toy_scale: float = methods.hyper(0.5, "toy: factor applied to every weight")

        @methods.register(ToyParams)
        def toy(model, splits, hp, ctx):
            for p in model.parameters():
                p.data.mul_(hp.toy_scale)
            return model, {"scaled": hp.toy_scale}

    return add


def argv_for(ckpt: Path, tmp_path: Path, scenario: str, method: str, *extra: str) -> list[str]:
    return ["--weights", str(ckpt / "model.pt"), "--results", str(tmp_path / "r.jsonl"), "--device", "cpu",
            "--wandb", "disabled", "--importance-cache", str(tmp_path / "cache"), "--method", method,
            *FLAGS[scenario], *extra]


def test_a_new_method_gets_its_flag_everywhere_and_changes_no_existing_key(add_toy_method, tiny_checkpoint,
                                                                          tmp_path):
    before = {(s, m): plan_argv(s, argv_for(tiny_checkpoint, tmp_path, s, m)).key
              for s in ("full_class", "random") for m in ("baseline", "ssd", "finetune", "unsir")}
    add_toy_method()
    for scenario in FLAGS:
        assert "--toy-scale" in cli.forget_parser(scenario, runner.parser_defaults(scenario)).format_help()
    after = {(s, m): plan_argv(s, argv_for(tiny_checkpoint, tmp_path, s, m)).key for s, m in before}
    assert after == before


def test_a_toy_method_runs_end_to_end_with_its_own_hyperparameter(add_toy_method, tiny_checkpoint, tmp_path):
    add_toy_method()
    record = run_argv("full_class", argv_for(tiny_checkpoint, tmp_path, "full_class", "toy", "--toy-scale", "0.25"))
    assert record["config"]["toy_scale"] == 0.25 and record["method_info"] == {"scaled": 0.25}
    assert "alpha" not in record["config"] and "finetune_lr" not in record["config"]
    other = plan_argv("full_class", argv_for(tiny_checkpoint, tmp_path, "full_class", "toy", "--toy-scale", "0.5"))
    assert other.key != record["key"]  # the method's own hyperparameter is part of its key
    ignored = plan_argv("full_class", argv_for(tiny_checkpoint, tmp_path, "full_class", "toy", "--toy-scale", "0.25",
                                               "--finetune-lr", "9"))
    assert ignored.key == record["key"]  # another method's flag is not
    python = runner.plan(runner.RunConfig("full_class", method="toy", hp=methods.REGISTRY["toy"].params(0.25),
                                          weights=str(tiny_checkpoint / "model.pt"), forget_class="three",
                                          results=str(tmp_path / "r.jsonl")))
    assert python.key == record["key"]  # and a config built in Python is the same run


def _old_rule_record(p: runner.Plan) -> dict:
    """A results line as the suite wrote it before: every flag in the config, and the key a hash of the
    whole config minus the fields that say where a run happens."""
    scenario = p.config.scenario
    flags = vars(cli.forget_parser(scenario, runner.parser_defaults(scenario)).parse_args(p.config.to_argv()))
    del flags["separate_records"]  # a flag added since
    config = {"scenario": scenario, **flags, "forget_class": p.record_config["forget_class"],
              "checkpoint_sha256": p.record_config["checkpoint_sha256"], "model_spec": p.record_config["model_spec"],
              "split_hash": p.record_config["split_hash"], "recipe": p.record_config["recipe"]}
    where = {"device", "results", "data_dir", "wandb", "wandb_project", "importance_cache", "force", "checkpoint_dir",
             "workers", "weights", "eval_batch_size", "no_download", "deterministic"}
    defining = {k: v for k, v in config.items() if k not in where}
    key = hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return {"key": key, "config": config, "metrics": {"df": 0.0}, "times": {"method_s": 1.0}}


def test_results_written_under_the_old_key_rule_still_count_as_done(add_toy_method, tiny_checkpoint, tmp_path):
    argv = ["cpu", "--table", "digits_full_resnet", "--seeds", "0", "--methods", "baseline ssd finetune",
            "--results", str(tmp_path / "r.jsonl"), "--checkpoint-dir", str(tiny_checkpoint.parent),
            "--classes", "three one", "--extra", "--wandb disabled"]
    args = experiments.parse_args(argv)
    runs = experiments.expand(args, experiments.select_tables(args))
    assert len(runs) == 6
    planned = [runner.plan(r.config) for r in runs]
    old = [_old_rule_record(p) for p in planned]
    assert all(o["key"] != p.key for o, p in zip(old, planned))  # the rule did change
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(o) + "\n" for o in old))
    add_toy_method()
    assert experiments.todo(args, runs) == []  # a new method's flag: still nothing to redo
    for r in runs:
        assert runner.execute(r.config)["key"] in {o["key"] for o in old}  # skipped: the old record comes back


def test_a_net_missing_from_ssd_params_is_an_error_for_ssd_methods_only(tiny_checkpoint, tmp_path):
    no_resnet = {"vit": (5.0, 1.0)}
    with pytest.raises(UserError, match=r"forget_full_class_main\.py has no SSD_PARAMS entry for net 'resnet18'"):
        plan_argv("full_class", argv_for(tiny_checkpoint, tmp_path, "full_class", "ssd"), no_resnet)
    assert plan_argv("full_class", argv_for(tiny_checkpoint, tmp_path, "full_class", "baseline"), no_resnet).key
    explicit = plan_argv("full_class", argv_for(tiny_checkpoint, tmp_path, "full_class", "ssd", "--alpha", "3",
                                                "--lambda", "1"), no_resnet)
    assert (explicit.config.hp.alpha, explicit.config.hp.lam) == (3.0, 1.0)


def test_the_library_reads_each_scripts_own_constants_without_importing_it(tmp_path, monkeypatch):
    import forget_full_class_main
    import forget_random_main
    import forget_sub_class_main

    assert runner.script_ssd_params("full_class") == forget_full_class_main.SSD_PARAMS
    assert runner.script_ssd_params("sub_class") == forget_sub_class_main.SSD_PARAMS
    assert runner.script_ssd_params("random") == forget_random_main.SSD_PARAMS
    # an edit at the top of the script is what a RunConfig built in Python then gets
    text = (ROOT / "forget_random_main.py").read_text()
    entry = '("resnet18", "digits"): (10.0, 1.0)'  # the default dataset's own entry wins over the net's
    assert entry in text
    edited = text.replace(entry, '("resnet18", "digits"): (3.5, 0.5)')
    (tmp_path / "forget_random_main.py").write_text(edited)
    monkeypatch.setattr(runner, "HERE", tmp_path)
    hp = runner.RunConfig("random", method="ssd").resolve().hp
    assert (hp.alpha, hp.lam) == (3.5, 0.5)
    (tmp_path / "forget_random_main.py").write_text(edited.replace("(3.5, 0.5)", "(ALPHA, 0.5)"))
    with pytest.raises(UserError, match="SSD_PARAMS in forget_random_main.py is not a plain dict of numbers"):
        runner.RunConfig("random", method="ssd").resolve()


@pytest.mark.parametrize("flag", ["--net", "--dataset", "--seed", "--device", "--amp", "--deterministic"])
def test_each_shared_flag_is_declared_once(flag):
    declared = [f"{path.name}:{n}" for path in sorted(ROOT.glob("*.py"))
                for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(rf'\(\s*"{flag}"', line)]
    assert len(declared) == 1, declared


def test_help_shows_each_default_once_and_keeps_the_examples_apart():
    import io
    from contextlib import redirect_stdout

    import pretrain_model

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        pretrain_model.parse_args(["--help"])
    text = out.getvalue()
    assert "(default: None)" not in text and text.count("(default: ") >= 5
    assert not re.search(r"\(default: [^)]*\)\s*\(default:", text.replace("\n", " "))
    examples = [line for line in text.splitlines() if line.strip().startswith("python pretrain_model.py")]
    assert len(examples) == 2  # one example per line, as written in the docstring
    for scenario in FLAGS:
        text = cli.forget_parser(scenario, runner.parser_defaults(scenario), SSD_PARAMS).format_help()
        assert "(default: None)" not in text and not re.search(r"\(default: [^)]*\)\s*\(default:", text)
