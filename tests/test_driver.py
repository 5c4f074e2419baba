"""The driver and the results file: run keys, resume, locking, fan-out, command printing."""
import multiprocessing as mp
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import experiments
import methods
import results
import runner
import worker

ROOT = Path(__file__).resolve().parents[1]


def test_run_key_is_stable_and_holds_only_the_defining_fields():
    defining = ("scenario", "method", "seed", "alpha")
    config = {"scenario": "full_class", "method": "ssd", "seed": 1, "alpha": 10.0, "device": "cpu",
              "results": "a.jsonl", "data_dir": "data", "finetune_lr": 0.1}
    same = dict(reversed(list(config.items())), device="cuda", results="b.jsonl", finetune_lr=9.0)
    assert results.run_key(config, defining) == results.run_key(same, defining)
    assert results.run_key(config, defining) == "24583134dba555595656"  # a key must not change between versions
    assert results.run_key({**config, "seed": 2}, defining) != results.run_key(config, defining)
    assert results.run_key({**config, "alpha": 5.0}, defining) != results.run_key(config, defining)
    missing = {k: v for k, v in config.items() if k != "alpha"}  # a field the config lacks counts as None
    assert results.run_key(missing, defining) == results.run_key({**config, "alpha": None}, defining)


def _append_many(path, worker, n):
    for i in range(n):
        results.append(path, {"key": f"{worker}-{i}", "payload": "x" * 2000})


def test_concurrent_appends_under_the_lock_lose_nothing(tmp_path):
    path = tmp_path / "results.jsonl"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    records = results.read(path)
    assert len(records) == 100 == len({r["key"] for r in records})
    assert len(path.read_text().splitlines()) == 100


def test_damaged_line_is_skipped_and_the_rest_kept(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b", "trunc')
    assert [r["key"] for r in results.read(path)] == ["a"]
    assert "not valid JSON" in capsys.readouterr().err
    results.append(path, {"key": "c"})  # appending after a damaged last line starts a new line
    assert [r["key"] for r in results.read(path)] == ["a", "c"]


def test_claim_is_exclusive(tmp_path):
    with results.claim(tmp_path / "r.jsonl", "k1") as first:
        assert first
        with results.claim(tmp_path / "r.jsonl", "k1") as second:
            assert not second
        with results.claim(tmp_path / "r.jsonl", "k2") as other:
            assert other
    with results.claim(tmp_path / "r.jsonl", "k1") as again:
        assert again


def test_print_commands_counts_classes_methods_and_seeds():
    out = subprocess.run([sys.executable, "experiments.py", "--print-commands", "--table", "cifar100_full_resnet",
                          "--extra", "--retrain-epochs 3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert len(lines) == 5 * len(methods.REGISTRY) * 5
    assert all(ln.startswith("python forget_full_class_main.py --net resnet18 --dataset cifar100") for ln in lines)
    assert sum("--forget-class rocket" in ln and "--method ssd " in ln for ln in lines) == 5
    # a method's own flag from --extra goes to that method's commands only
    assert all(("--retrain-epochs 3" in ln) == ("--method retrain" in ln) for ln in lines)
    assert "pretrain first" in out.stderr


def test_unknown_table_is_a_one_line_error():
    out = subprocess.run([sys.executable, "experiments.py", "--print-commands", "--table", "nope"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: unknown table nope")


def script(tmp_path: Path, name: str, code: str) -> str:
    """A small script file that a worker runs as it runs pretrain_model.py."""
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    return str(path)


def test_two_cpu_slots_run_two_runs_at_once(tmp_path):
    args = experiments.parse_args(["cpu,cpu", "--isolate", "--logs", str(tmp_path / "logs")])
    stamp = script(tmp_path, "stamp", "import sys, time; t=time.time(); time.sleep(1.5); "
                                      "open(sys.argv[1], 'w').write(f'{t} {time.time()}')")
    commands = [(f"job{i}", [stamp, str(tmp_path / f"t{i}")]) for i in range(2)]
    failures = worker.run_local(args, commands)
    assert failures == []
    (s0, e0), (s1, e1) = [map(float, (tmp_path / f"t{i}").read_text().split()) for i in range(2)]
    assert s1 < e0 and s0 < e1  # the two intervals overlap


@pytest.mark.parametrize("isolate", [True, False], ids=["isolate", "worker"])
def test_failures_are_reported_and_the_rest_still_runs(tmp_path, isolate):
    args = experiments.parse_args(["cpu", "--logs", str(tmp_path / "logs")] + (["--isolate"] if isolate else []))
    commands = [("bad", [script(tmp_path, "bad", "import sys; sys.exit(3)")]),
                ("raises", [script(tmp_path, "raises", "raise RuntimeError('boom')")]),
                ("good", [script(tmp_path, "good", f"open({str(tmp_path / 'ok')!r}, 'w')")])]
    failures = worker.run_local(args, commands)
    assert [(label, why) for label, _, why in failures] == [("bad", "exit 3"), ("raises", "exit 1")]
    assert (tmp_path / "ok").exists()
    assert "bad.py" in (tmp_path / "logs" / "bad.log").read_text().splitlines()[0]  # the log holds the command
    raised = (tmp_path / "logs" / "raises.log").read_text()
    assert "raises.py" in raised.splitlines()[0] and "RuntimeError: boom" in raised  # and the traceback


def test_a_worker_that_dies_is_replaced_and_its_run_marked_failed(tmp_path):
    args = experiments.parse_args(["cpu", "--logs", str(tmp_path / "logs")])
    pid = "import os; open({!r}, 'w').write(str(os.getpid()))"
    code = {"first": pid.format(str(tmp_path / "first")),
            "raises": pid.format(str(tmp_path / "raises")) + "; raise ValueError('bad run')",
            "victim": pid.format(str(tmp_path / "victim")) + "; import signal; os.kill(os.getpid(), signal.SIGKILL)",
            "after": pid.format(str(tmp_path / "after"))}
    failures = worker.run_local(args, [(name, [script(tmp_path, name, c)]) for name, c in code.items()])
    assert [(label, why) for label, _, why in failures] == [
        ("raises", "exit 1"), ("victim", "worker died: killed by SIGKILL (the out-of-memory killer sends SIGKILL)")]
    pids = {name: (tmp_path / name).read_text() for name in ("first", "raises", "victim", "after")}
    assert pids["first"] == pids["raises"] == pids["victim"] != pids["after"]  # one worker until it died
    assert pids["first"] != str(os.getpid())  # and it was not the driver
    assert "worker died: killed by SIGKILL" in (tmp_path / "logs" / "victim.log").read_text()


SMALL = ["--retrain-epochs", "1", "--finetune-epochs", "1", "--unsir-noise-steps", "3", "--unsir-noise-batch", "4",
         "--unsir-noise-copies", "2", "--unsir-retain-per-class", "5"]


def test_a_run_in_the_worker_writes_the_line_it_writes_in_process(tiny_checkpoint, digits5_checkpoint, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same threads, so the same float sums, in both processes
    results_path, cache = tmp_path / "r.jsonl", tmp_path / "cache"
    common = ["--results", str(results_path), "--importance-cache", str(cache), "--wandb", "disabled", "--seed", "1",
              "--device", "cpu", *SMALL]
    configs = [  # one run per scenario, with methods that train, learn noise and use the importance cache
        runner.RunConfig.from_argv("full_class", ["--weights", str(tiny_checkpoint / "model.pt"), "--forget-class",
                                                  "three", "--method", "ssd", *common]),
        runner.RunConfig.from_argv("sub_class", ["--dataset", "digits5", "--weights", str(digits5_checkpoint / "model.pt"),
                                                 "--forget-class", "three", "--method", "unsir", *common]),
        runner.RunConfig.from_argv("random", ["--weights", str(tiny_checkpoint / "model.pt"), "--forget-count", "20",
                                              "--forget-seed", "9", "--method", "bad_teacher", *common])]
    for config in configs:
        runner.execute(config)
    in_process = results.read(results_path)
    results_path.unlink()
    shutil.rmtree(cache)

    # the worker runs something else first, so whatever a run leaves behind in the process would show
    warm_up = runner.RunConfig.from_argv("random", [
        "--weights", str(tiny_checkpoint / "model.pt"), "--forget-count", "30", "--method", "finetune", "--seed", "4",
        "--results", str(tmp_path / "other.jsonl"), "--wandb", "disabled", *SMALL])
    args = experiments.parse_args(["cpu", "--logs", str(tmp_path / "logs")])
    jobs = [("warm-up", warm_up)] + [(c.scenario, c) for c in configs]
    assert worker.run_local(args, jobs) == []
    by_worker = results.read(results_path)

    def comparable(record: dict) -> dict:
        return {k: v for k, v in record.items() if k not in ("times", "started")}

    assert len(in_process) == len(by_worker) == 3
    assert [r["config"]["scenario"] for r in by_worker] == ["full_class", "sub_class", "random"]
    assert by_worker[2]["config"]["forget_seed"] == 9  # the worker's config carries every field
    for line, worker_line in zip(in_process, by_worker):
        assert comparable(worker_line) == comparable(line)
        assert worker_line["times"].keys() == line["times"].keys()
    log = (tmp_path / "logs" / "full_class.log").read_text().splitlines()[0]
    assert log.endswith("forget_full_class_main.py " + shlex.join(configs[0].to_argv()))  # the command heads the log


def test_resume_skips_runs_already_in_the_results_file(tiny_checkpoint, tmp_path):
    ckpt_dir = str(tiny_checkpoint.parent)
    argv = ["cpu", "--table", "digits_full_resnet", "--seeds", "0", "--methods", "baseline ssd",
            "--results", str(tmp_path / "r.jsonl"), "--checkpoint-dir", ckpt_dir, "--extra", "--wandb disabled"]
    args = experiments.parse_args(argv)
    runs = experiments.expand(args, experiments.select_tables(args))
    assert len(runs) == 2 and experiments.pretrain_commands(args, experiments.select_tables(args)) == {}
    assert len(experiments.todo(args, runs)) == 2
    runner.execute(runs[0].config)
    left = experiments.todo(args, runs)
    assert [r.label for r in left] == [runs[1].label]
    assert experiments.main(argv + ["--no-tables"]) == 0
    keys = [r["key"] for r in results.read(tmp_path / "r.jsonl")]
    assert len(keys) == 2 == len(set(keys))
    assert experiments.todo(args, runs) == []


def test_verdict_suite_covers_ten_requests_per_pair_table_with_its_methods_in_its_own_file():
    args = experiments.parse_args(["cpu", "--suite", "verdict", "--print-commands"])
    runs = experiments.expand(args, experiments.select_tables(args))
    assert args.results == experiments.VERDICT_RESULTS and args.seeds == [1, 2]
    methods_per_run = {r.config.method for r in runs}
    assert methods_per_run == set(experiments.VERDICT_METHODS)
    per_table = {t: len([r for r in runs if r.table == t]) for t in experiments.VERDICT_TABLES}
    n = len(experiments.VERDICT_METHODS) * 2
    assert per_table == {"pairs100_full_resnet": 10 * n, "pairs20_sub_resnet": 10 * n, "pairs10_random_resnet": 10 * n}
    assert experiments.parse_args(["cpu", "--suite", "verdict", "--print-commands", "--results", "x.jsonl"]
                                  ).results == "x.jsonl"
