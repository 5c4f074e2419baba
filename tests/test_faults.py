"""Reliability: runs killed at random points, determinism, and bad input that must fail cleanly.

A kill may land anywhere: in the importance pass, the cache write, the evaluation, the results append.
Whatever it hits, the results file must stay valid JSON lines, the importance cache must hold only
complete files, and the next run must finish the work exactly once.
"""
import copy
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import datasets
import experiments
import forget_random_main
import methods
import models
import results
import runner
from common import UserError, make_deterministic
from conftest import plan_argv, run_argv

ROOT = Path(__file__).resolve().parents[1]
SSD_PARAMS = forget_random_main.SSD_PARAMS
# Child processes get one thread too, and never talk to wandb.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled",
             "PYTHONUNBUFFERED": "1"}


def argv_for(ckpt: Path, tmp_path: Path, *extra: str, results_name: str = "results.jsonl") -> list[str]:
    return ["--weights", str(ckpt / "model.pt"), "--results", str(tmp_path / results_name), "--device", "cpu",
            "--wandb", "disabled", "--importance-cache", str(tmp_path / "cache"), *extra]


def check_jsonl(path: Path) -> list[dict]:
    """Every line parses and the file ends on a newline: what a reader needs from a killed writer."""
    if not path.exists():
        return []
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"partial last line: {data[-80:]!r}"
    return [json.loads(line) for line in data.decode().splitlines()]


def kill_after(cmd: list[str], delay: float, start: str) -> str:
    """Run `cmd` and SIGKILL it `delay` s after it prints a line starting with `start`.

    Returns 'killed', 'finished' (it ended within the delay) or 'no start' (it ended before that line).
    The clock starts at that line, not at launch: imports alone take 5-15 s on a busy machine, and a kill
    timed from launch would hardly ever reach the writes."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if not any(line.startswith(start) for line in p.stdout):
            p.wait()
            return "no start"
        p.wait(timeout=delay)
        return "finished"
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
        return "killed"
    finally:
        p.stdout.close()


# --- kills ----------------------------------------------------------------------------------------

def test_killed_forget_runs_leave_valid_results_and_the_next_run_completes_once(tiny_checkpoint, tmp_path, capsys):
    rng = random.Random(1)
    argv = argv_for(tiny_checkpoint, tmp_path, "--forget-count", "12", "--method", "ssd", "--seed", "1")
    key = plan_argv("random", argv, SSD_PARAMS).key
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "earlier", "metrics": {}}\n')  # a finished run that must survive every kill
    outcomes = []
    for _ in range(3):  # after its first line a run needs 2-6 s: importances, cache write, eval, append
        done = key in results.done_keys(path)
        outcomes.append(kill_after([sys.executable, "forget_random_main.py", *argv], rng.uniform(0.0, 5.0),
                                   start="random: ssd"))
        assert outcomes[-1] != "no start" or done, "the run failed before it started"
        records = check_jsonl(path)
        assert [r["key"] for r in records if r["key"] != key] == ["earlier"]
        assert sum(r["key"] == key for r in records) <= 1
    assert "killed" in outcomes
    run_argv("random", argv, SSD_PARAMS)  # the next run: completes (or skips, if a kill came too late)
    records = check_jsonl(path)
    assert sorted(r["key"] for r in records) == sorted(["earlier", key])
    before = path.read_bytes()
    capsys.readouterr()
    assert run_argv("random", argv, SSD_PARAMS)["key"] == key  # a completed run is skipped: its record comes back
    assert "skip:" in capsys.readouterr().out
    assert path.read_bytes() == before


def start_worker() -> subprocess.Popen:
    """A persistent worker, as the driver starts one per device slot."""
    return subprocess.Popen([sys.executable, "worker.py"], cwd=ROOT, env=CHILD_ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def config_job(argv: list[str], log: Path) -> str:
    """A worker's job line: the run of `forget_random_main.py <argv>`, as a RunConfig."""
    config = runner.RunConfig.from_argv("random", argv, SSD_PARAMS)
    return json.dumps({"config": config.to_dict(), "log": str(log)}) + "\n"


def wait_for_line(path: Path, starts: tuple[str, ...], timeout: float = 120) -> str:
    """Poll a run's log until a line starts with one of `starts`; return that line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        found = next((ln for ln in lines if ln.startswith(starts)), None)
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"no line starting with {starts} in {path} after {timeout} s")


def test_a_worker_killed_mid_run_leaves_valid_results_and_the_next_run_completes_once(tiny_checkpoint, tmp_path):
    rng = random.Random(3)
    argv = argv_for(tiny_checkpoint, tmp_path, "--forget-count", "12", "--method", "ssd", "--seed", "1")
    key = plan_argv("random", argv, SSD_PARAMS).key
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "earlier", "metrics": {}}\n')
    worker = start_worker()
    try:
        # two runs of the same kind that complete, into another results file (the second finds I_D
        # cached, as the killed runs may): the worker then holds the data and weights, and the second
        # tells how long a run takes after its first line, which is where the kills aim
        warm = argv_for(tiny_checkpoint, tmp_path, "--forget-count", "12", "--method", "ssd", "--seed", "1",
                        results_name="warm.jsonl")
        for i in range(2):
            log = tmp_path / f"warm{i}.log"
            worker.stdin.write(config_job([*warm, "--force"], log))
            worker.stdin.flush()
            wait_for_line(log, ("random: ssd",))
            t0 = time.monotonic()
            assert json.loads(worker.stdout.readline()) == {"rc": 0}
            run_s = time.monotonic() - t0
        mid_run = 0
        for i in range(4):
            log = tmp_path / f"run{i}.log"
            worker.stdin.write(config_job(argv, log))
            worker.stdin.flush()
            done = key in results.done_keys(path)
            if wait_for_line(log, ("random: ssd", "skip:")).startswith("skip:"):
                assert done, "the run was skipped before it was done"
            else:
                time.sleep(rng.uniform(0.0, run_s))  # in the importances, the eval or the append
            worker.kill()  # mid-run, or just after the run if it finished within the delay
            worker.wait()
            mid_run += key not in results.done_keys(path)
            records = check_jsonl(path)
            assert [r["key"] for r in records if r["key"] != key] == ["earlier"]
            assert sum(r["key"] == key for r in records) <= 1
            worker = start_worker()
        assert mid_run, "no kill landed before the run was done; nothing was tested"
        log = tmp_path / "final.log"
        worker.stdin.write(config_job(argv, log))
        worker.stdin.flush()
        assert json.loads(worker.stdout.readline()) == {"rc": 0}, log.read_text()[-2000:]
    finally:
        worker.kill()
        worker.wait()
    records = check_jsonl(path)
    assert sorted(r["key"] for r in records) == sorted(["earlier", key])


def test_killing_the_driver_at_random_points_then_restarting_runs_each_cell_once(tiny_checkpoint, tmp_path):
    """The driver is killed alone (its worker must notice and stop) or with its worker (the whole
    process group, as a job scheduler or the OOM killer of a container would), while a run is in flight."""
    rng = random.Random(5)
    results_path = tmp_path / "r.jsonl"
    argv = ["cpu", "--table", "digits_full_resnet", "--seeds", "0", "--methods", "baseline ssd finetune",
            "--classes", "three four", "--results", str(results_path), "--checkpoint-dir", str(tiny_checkpoint.parent),
            "--logs", str(tmp_path / "logs"), "--no-tables",
            "--extra", f"--wandb disabled --finetune-epochs 1 --importance-cache {tmp_path / 'cache'}"]
    args = experiments.parse_args(argv)
    runs = experiments.expand(args, experiments.select_tables(args))
    keys = {runner.plan(r.config).key for r in runs}
    assert len(keys) == len(runs) == 6
    mid_run = 0
    for whole_group in [True, False, True, False]:
        driver = subprocess.Popen([sys.executable, "experiments.py", *argv], cwd=ROOT, env=CHILD_ENV, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        target, label = rng.randint(1, 2), None  # kill during the target-th run of this attempt, at a random moment
        for line in driver.stdout:
            if line.startswith(f"[{target}/"):
                label = line.split(": ", 1)[1].strip()
                time.sleep(rng.uniform(0.0, 0.5))
                break
        if whole_group:
            os.killpg(driver.pid, signal.SIGKILL)
        else:
            driver.kill()
        driver.wait()
        printed = driver.stdout.read()
        driver.stdout.close()
        mid_run += label is not None and f"    {label}: " not in printed  # the run had not reported back
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # a worker whose driver is gone stops by itself
            try:
                os.killpg(driver.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the worker outlived its driver")
        done = [r["key"] for r in check_jsonl(results_path)]
        assert len(done) == len(set(done)) and set(done) <= keys
    assert mid_run, "no kill landed in the middle of a run; nothing was tested"
    assert experiments.main(argv) == 0  # the restart finishes what is left
    done = [r["key"] for r in check_jsonl(results_path)]
    assert sorted(done) == sorted(keys)


APPENDER = """
import sys
import results
path, writer = sys.argv[1], sys.argv[2]
print("ready", flush=True)
i = 0
while True:  # large records of many small items: most of the time goes to encoding and writing
    results.append(path, {"key": f"{writer}-{i}", "writer": writer, "i": i, "pad": list(range(10000))})
    i += 1
"""


def test_appends_killed_mid_write_never_leave_a_partial_line(tmp_path):
    rng = random.Random(7)
    path = tmp_path / "results.jsonl"
    for w in range(4):
        assert kill_after([sys.executable, "-c", APPENDER, str(path), f"w{w}"], rng.uniform(0.05, 0.8),
                          start="ready") == "killed"
        records = check_jsonl(path)
        # appends are all-or-nothing: each writer's records are 0..n-1, none lost, none doubled
        for v in range(w + 1):
            got = [r["i"] for r in records if r["writer"] == f"w{v}"]
            assert got == list(range(len(got))), f"writer w{v}: {got[:5]}...{got[-5:]}"
    assert len(records) > 4, "too few appends to have tested anything"
    assert results.read(path) == records  # and the reader agrees


CACHE_WRITER = """
import sys
import torch
import common
src, dst = sys.argv[1], sys.argv[2]
stored = torch.load(src, weights_only=True)
print("ready", flush=True)
i = 1
while True:  # every file is one constant i throughout, padded so that a write takes a while
    imp = {n: torch.full_like(t, float(i)) for n, t in stored["importance"].items()}
    common.atomic_torch_save({"key": stored["key"], "importance": imp, "pad": torch.zeros(4_000_000)}, dst)
    i += 1
"""


def _importance_setup(ckpt: Path, tmp_path: Path):
    """The model, splits and context that methods.ssd_importances sees in a tiny ssd run."""
    p = plan_argv("full_class", argv_for(ckpt, tmp_path, "--forget-class", "three"), SSD_PARAMS)
    return models.load_checkpoint(p.weights, p.meta), p.splits, runner.run_context(p, torch.device("cpu"))


def test_a_cache_write_killed_midway_leaves_only_complete_files(tiny_checkpoint, tmp_path, monkeypatch):
    model, splits, ctx = _importance_setup(tiny_checkpoint, tmp_path)
    zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    monkeypatch.setattr(methods, "_importance", lambda *a, **k: zeros)  # the real pass is not the point here
    methods.ssd_importances(model, splits, "paper", ctx, "ssd")
    (path,) = (tmp_path / "cache").glob("*.pt")  # the exact file a run would read
    template = tmp_path / "template.pt"
    path.rename(template)

    rng = random.Random(11)
    for _ in range(3):
        assert kill_after([sys.executable, "-c", CACHE_WRITER, str(template), str(path)], rng.uniform(0.1, 1.5),
                          start="ready") == "killed"
        if path.exists():  # only ever a whole file under the real name
            stored = torch.load(path, weights_only=True)
            values = torch.cat([t.flatten() for t in stored["importance"].values()]).unique()
            assert len(values) == 1 and values.item() >= 1
    assert path.exists(), "no write finished before the kills; nothing was tested"
    # leftovers of killed writes are temporary names, never the cache file itself
    assert all(f == path or f.name.endswith(".tmp") for f in path.parent.iterdir())

    def must_not_recompute(*a, **k):
        raise AssertionError("a complete cache file was not trusted")

    monkeypatch.setattr(methods, "_importance", lambda model, ds, *a, **k: (
        zeros if len(ds) == len(splits.forget_idx) else must_not_recompute()))  # only the D_f pass may run
    imp, _, info = methods.ssd_importances(model, splits, "paper", ctx, "ssd")
    assert info["cache_hit"] and torch.cat([t.flatten() for t in imp.values()]).unique().numel() == 1


# --- determinism ----------------------------------------------------------------------------------

def test_make_deterministic_sets_every_switch(restore_determinism, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    make_deterministic()
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own setting is kept
    make_deterministic()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize("method, extra", [("ssd", []), ("finetune", ["--finetune-epochs", "1"])])
def test_same_seed_gives_identical_metrics(tiny_checkpoint, tmp_path, restore_determinism, monkeypatch, method,
                                           extra):
    argv = argv_for(tiny_checkpoint, tmp_path, "--forget-class", "three", "--method", method, "--seed", "2",
                    "--no-importance-cache", *extra)
    first = run_argv("full_class", argv, SSD_PARAMS)
    torch.manual_seed(123)  # global state left behind by the first run must not matter
    during = []
    monkeypatch.setattr(methods.REGISTRY[method], "fn", lambda *a, fn=methods.REGISTRY[method].fn: (
        during.append(torch.are_deterministic_algorithms_enabled()) or fn(*a)))
    second = run_argv("full_class", argv + ["--deterministic", "--force"], SSD_PARAMS)
    assert during == [True]  # the flag reached make_deterministic, for the run
    assert not torch.are_deterministic_algorithms_enabled()  # and the switches were put back after it
    assert second["key"] == first["key"]  # --deterministic picks kernels; it is not another run
    assert second["config"]["deterministic"] is True
    assert second["metrics"] == first["metrics"]
    assert second["method_info"] == first["method_info"]
    if method == "ssd":
        assert first["method_info"]["cache_hit"] is False and first["method_info"]["dampened"] > 0


# --- bad input ------------------------------------------------------------------------------------

def expect_user_error(match: str, scenario: str, ckpt: Path, tmp_path: Path, kept: Path, *extra: str) -> str:
    argv = argv_for(ckpt, tmp_path, *extra, results_name=kept.name)
    before = kept.read_bytes()
    with pytest.raises(UserError, match=match) as e:
        run_argv(scenario, argv, SSD_PARAMS)
    assert kept.read_bytes() == before
    return str(e.value)


def without_class(build_data, field: str, gone: int, instead: int):
    """build_data, but in the training images label `gone` is relabelled `instead`: the class is absent
    from the training pool while the indices (and so the split hash) stay as they were."""
    def build(*a, **k):
        data = build_data(*a, **k)
        train = copy.copy(data.train)
        labels = getattr(train, field).copy()
        labels[labels == gone] = instead
        setattr(train, field, labels)
        return dataclasses.replace(data, train=train)
    return build


def test_full_class_absent_from_the_training_pool(tiny_checkpoint, tmp_path, kept_results, monkeypatch):
    monkeypatch.setattr(datasets, "build_data", without_class(datasets.build_data, "targets", 3, 2))
    msg = expect_user_error("forget set is empty", "full_class", tiny_checkpoint, tmp_path, kept_results,
                            "--forget-class", "three")
    assert "pick a class that the data contains" in msg


def test_sub_class_absent_or_unknown(tiny_checkpoint, tmp_path, kept_results, monkeypatch):
    # digits5 runs need a digits5 checkpoint; the split is built before the model matters
    monkeypatch.setattr(runner, "check_meta", lambda *a: None)
    expect_user_error("unknown sub-class 'rocket'.*choose one of: zero", "sub_class", tiny_checkpoint, tmp_path,
                      kept_results, "--dataset", "digits5", "--forget-class", "rocket")
    monkeypatch.setattr(datasets, "build_data", without_class(datasets.build_data, "fine", 3, 2))
    msg = expect_user_error("forget set is empty", "sub_class", tiny_checkpoint, tmp_path, kept_results,
                            "--dataset", "digits5", "--forget-class", "three")
    assert "pick a class that the data contains" in msg


def test_class_index_out_of_range(tiny_checkpoint, tmp_path, kept_results):
    expect_user_error(r"unknown class '10'.*index 0-9", "full_class", tiny_checkpoint, tmp_path, kept_results,
                      "--forget-class", "10")


@pytest.mark.parametrize("flags, match", [
    (["--forget-count", "100000"], r"cannot forget 100000 of \d+ .*choose --forget-count between 1 and \d+"),
    (["--forget-count", "0"], r"--forget-count\): 0 is out of range \(pass an integer >= 1\)"),
    (["--forget-fraction", "1.0"], r"--forget-fraction\): 1.0 is out of range \(pass a number > 0 and < 1\)")],
    ids=["too-many", "zero", "all"])
def test_forget_count_outside_the_training_set(tiny_checkpoint, tmp_path, kept_results, flags, match):
    expect_user_error(match, "random", tiny_checkpoint, tmp_path, kept_results, *flags)


def test_truncated_results_file_is_read_around_and_appended_to(tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    good = json.dumps({"key": "earlier", "metrics": {"df": 1.0}})
    path.write_text(f"{good}\n{good[:-1]}\n{good[:25]}")  # a damaged line, then a cut-off last line
    assert [r["key"] for r in results.read(path)] == ["earlier"]
    assert f"{path}:2 is not valid JSON" in capsys.readouterr().err
    argv = argv_for(tiny_checkpoint, tmp_path, "--forget-class", "three", "--method", "baseline")
    record = run_argv("full_class", argv, SSD_PARAMS)
    assert "is not valid JSON" in capsys.readouterr().err
    lines = path.read_text().splitlines()
    assert lines[:3] == [good, good[:-1], good[:25]]  # damaged lines are kept for a person to look at
    assert json.loads(lines[3])["key"] == record["key"] and len(lines) == 4
    assert [r["key"] for r in results.read(path)] == ["earlier", record["key"]]
    assert run_argv("full_class", argv, SSD_PARAMS)["key"] == record["key"]  # and the new line counts as done


def test_foreign_or_damaged_importance_cache_is_recomputed(tiny_checkpoint, tmp_path, capsys):
    argv = argv_for(tiny_checkpoint, tmp_path, "--forget-class", "three", "--method", "ssd", "--force")
    first = run_argv("full_class", argv, SSD_PARAMS)
    assert first["method_info"]["cache_hit"] is False
    (path,) = (tmp_path / "cache").glob("*.pt")
    good = path.read_bytes()
    stored = torch.load(path, weights_only=True)
    # checkpoint A's cache under checkpoint B's name, with importances that would change the selection
    foreign = {"key": {**stored["key"], "checkpoint": "0" * 64},
               "importance": {n: 1e6 * t for n, t in stored["importance"].items()}}
    torch.save(foreign, path)
    damaged = [("made for another setup", None), ("unreadable importance cache", good[: len(good) // 2]),
               ("unreadable importance cache", b"not a torch file")]
    for warning, content in damaged:
        if content is not None:
            path.write_bytes(content)
        capsys.readouterr()
        again = run_argv("full_class", argv, SSD_PARAMS)
        assert warning in capsys.readouterr().out
        assert again["method_info"]["cache_hit"] is False
        assert again["method_info"]["dampened"] == first["method_info"]["dampened"]
        assert again["metrics"] == first["metrics"]
        assert torch.load(path, weights_only=True)["key"] == stored["key"]  # replaced by a good file
    assert run_argv("full_class", argv, SSD_PARAMS)["method_info"]["cache_hit"] is True
