"""Bad input fails at the boundary, before anything expensive, and a finished result is never lost.

Every bad input must end in exit status 2 with one `error: <problem> (<fix>)` line on stderr, no
traceback, and no file added or changed. Most cases run the scripts in-process (imports cost ~5 s
per subprocess); a few run as real subprocesses to show what a user sees.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import experiments
import forget_full_class_main
import forget_random_main
import make_tables
import methods
import models
import pretrain_model
import results
import training
from cli import run_cli
from conftest import plan_argv, run_argv

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
SCRIPT_PARAMS = {"full_class": forget_full_class_main.SSD_PARAMS, "random": forget_random_main.SSD_PARAMS}


def forget_argv(ckpt: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--weights", str(ckpt / "model.pt"), "--results", str(tmp_path / "results.jsonl"), "--device", "cpu",
            "--wandb", "disabled", "--importance-cache", str(tmp_path / "cache"), "--forget-class", "three", *extra]


def snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every path under `roots` with its content (None for a folder): a changed or new file shows up."""
    return {str(p): (p.read_bytes() if p.is_file() else None) for root in roots for p in sorted(root.rglob("*"))}


def cli(main) -> tuple[int, str, str]:
    """Run an entry point as its script does (cli.run_cli) and return (status, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as e:
        run_cli(main)
    return e.value.code, out.getvalue(), err.getvalue()


def assert_one_line_error(status: int, err: str, match: str) -> str:
    """Status 2 and one `error: <problem> (<fix>)` line; progress bars of work already done may precede it."""
    assert "Traceback" not in err, err
    lines = [ln for ln in re.split(r"[\r\n]", err) if ln.strip() and not re.search(r"\d+%\|.*it/s\]", ln)]
    assert status == 2, (status, err)
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert re.fullmatch(r"error: .+ \(.+\)", lines[0]), f"no '(fix)' in {lines[0]!r}"
    assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture()
def nothing_expensive(monkeypatch):
    """A bad input must be refused before a checkpoint is loaded or a model trains."""
    def refuse(*a, **k):
        raise AssertionError("expensive work started before the input was validated")

    monkeypatch.setattr(models, "load_checkpoint", refuse)
    monkeypatch.setattr(training, "train_and_select", refuse)


def write_faces(root: Path, counts: dict[str, int], garbage: bool = False) -> Path:
    """data/faces/<identity>/<i>.png: `counts[identity]` small images (or unreadable bytes)."""
    rng = np.random.default_rng(0)
    for identity, n in counts.items():
        folder = root / "faces" / identity
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            if garbage:
                (folder / f"{i}.jpg").write_bytes(b"not an image at all")
            else:
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _forget(scenario: str, argv: list[str]):
    return lambda: run_argv(scenario, argv, SCRIPT_PARAMS[scenario]) and None


# --- the cases that used to end in a traceback ----------------------------------------------------

def _table_case(case: str, ckpt: Path, tmp: Path):
    """(entry point, regex of the error or None where the run must succeed) for one case of the table."""
    if case == "alpha-inf":
        return _forget("full_class", forget_argv(ckpt, tmp, "--method", "ssd", "--alpha", "inf")), None
    if case == "results-is-a-folder":
        (tmp / "out").mkdir()
        return (_forget("full_class", forget_argv(ckpt, tmp, "--method", "baseline", "--results", str(tmp / "out"))),
                r"--results: .*out is a folder, not a file")
    if case == "device-tpu9":
        return _forget("full_class", forget_argv(ckpt, tmp, "--device", "tpu9")), r"unknown device 'tpu9'"
    if case == "batch-size-0":
        return _forget("full_class", forget_argv(ckpt, tmp, "--batch-size", "0")), r"--batch-size\): 0 is out of range"
    pretrain = ["--checkpoint-dir", str(tmp / "ckpt"), "--device", "cpu", "--data-dir", str(tmp / "data")]
    if case == "pretrain-epochs-0":
        return lambda: pretrain_model.main([*pretrain, "--epochs", "0"]) and None, r"--epochs: 0 is out of range"
    if case == "pretrain-width-0":
        return lambda: pretrain_model.main([*pretrain, "--width", "0"]) and None, r"--width: 0 is out of range"
    if case == "faces-empty-identity":
        write_faces(tmp / "data", {"ann": 10, "bob": 10, "cid": 0})
        return (lambda: pretrain_model.main([*pretrain, "--dataset", "faces"]) and None,
                r"identity folder.* fewer than 2 images: cid \(0\)")
    if case == "faces-single-unreadable-image":
        write_faces(tmp / "data", {"ann": 1, "bob": 1, "cid": 1}, garbage=True)
        return (lambda: pretrain_model.main([*pretrain, "--dataset", "faces"]) and None,
                r"3 image\(s\) under .*faces cannot be read")
    raise ValueError(case)


TABLE = ["alpha-inf", "results-is-a-folder", "device-tpu9", "batch-size-0", "pretrain-epochs-0", "pretrain-width-0",
         "faces-empty-identity", "faces-single-unreadable-image"]


@pytest.mark.parametrize("case", TABLE)
def test_the_reported_cases(case, tiny_checkpoint, tmp_path, monkeypatch, request):
    main, match = _table_case(case, tiny_checkpoint, tmp_path)
    if match is None:  # alpha = inf is a valid request ("select nothing"): it must run and be recorded
        status, out, err = cli(main)
        assert status == 0 and "Traceback" not in err, err
        path = tmp_path / "results.jsonl"
        raw = json.loads(path.read_text())
        assert raw["config"]["alpha"] is None and raw["nonfinite"]["/config/alpha"] == "inf"  # strict JSON
        (record,) = results.read(path)
        assert record["config"]["alpha"] == float("inf") and "nonfinite" not in record
        assert record["method_info"]["dampened"] == 0  # alpha = inf selects nothing
        assert record["key"] in results.done_keys(path)  # a rerun is skipped: resuming works
        status, out, err = cli(lambda: make_tables.main(["--results", str(path), "--out", str(tmp_path / "tables"),
                                                         "--no-figures"]))
        assert status == 0, err
        assert re.search(r"\| ssd +\| 1 ", (tmp_path / "tables" / "tables.md").read_text())
        return
    request.getfixturevalue("nothing_expensive")
    before = snapshot(tmp_path, tiny_checkpoint)
    status, out, err = cli(main)
    assert_one_line_error(status, err, match)
    assert snapshot(tmp_path, tiny_checkpoint) == before


# --- more bad input -------------------------------------------------------------------------------

def _forget_case(*extra: str, scenario: str = "full_class"):
    def build(ckpt: Path, tmp: Path):
        argv = forget_argv(ckpt, tmp, *extra)
        if scenario == "random":
            argv.remove("--forget-class")
            argv.remove("three")
        return _forget(scenario, [a.replace("TMP", str(tmp)) for a in argv])
    return build


def _pretrain_case(*extra: str):
    def build(ckpt: Path, tmp: Path):
        argv = ["--checkpoint-dir", str(tmp / "ckpt"), "--device", "cpu", "--data-dir", str(tmp / "data"), *extra]
        return lambda: pretrain_model.main([a.replace("TMP", str(tmp)) for a in argv]) and None
    return build


def _file(name: str):
    """A setup step: a plain file at TMP/name, where a folder is expected."""
    return lambda tmp: (tmp / name).write_text("a file\n")


def _faces(counts: dict):
    return lambda tmp: write_faces(tmp / "data", counts)


def _other_entry(module, *extra: str):
    def build(ckpt: Path, tmp: Path):
        return lambda: module.main([a.replace("TMP", str(tmp)) for a in extra]) and None
    return build


def _held_lock(tmp: Path):
    from filelock import FileLock

    lock = FileLock(str(tmp / "results.jsonl.lock"))
    lock.acquire()
    return lock


OWN_CASES = {
    "lambda-nan": (_forget_case("--lambda", "nan"), r"lam \(--lambda\): nan is out of range", None),
    "alpha-negative": (_forget_case("--alpha", "-1"), r"--alpha\): -1.0 is out of range .*or inf", None),
    "device-cuda-x": (_forget_case("--device", "cuda:x"), r"unknown device 'cuda:x'", None),
    "device-missing-gpu": (_forget_case("--device", "cuda:7"), r"'cuda:7'", None),
    "eval-batch-size-negative": (_forget_case("--eval-batch-size", "-5"), r"--eval-batch-size\): -5 is out", None),
    "finetune-lr-zero": (_forget_case("--method", "finetune", "--finetune-lr", "0"), r"--finetune-lr\): 0.0 is out", None),
    "bt-fraction-above-1": (_forget_case("--bt-retain-fraction", "1.5"), r"--bt-retain-fraction\): 1.5", None),
    "momentum-1": (_forget_case("--unsir-momentum", "1"), r"--unsir-momentum\): 1.0 is out of range .*< 1", None),
    "seed-not-a-number": (_forget_case("--seed", "abc"), r"--seed/-seed: 'abc' is not an integer", None),
    "forget-fraction-nan": (_forget_case("--forget-fraction", "nan", scenario="random"), r"--forget-fraction\): nan",
                            None),
    "unknown-method": (_forget_case("--method", "nope"), r"method \(--method\): 'nope' is not one of", None),
    "unknown-flag": (_forget_case("--alhpa", "3"), r"unrecognized arguments: --alhpa 3", None),
    "results-parent-is-a-file": (_forget_case("--results", "TMP/afile/results.jsonl"), r"afile is a file",
                                 _file("afile")),
    "importance-cache-is-a-file": (_forget_case("--importance-cache", "TMP/afile"),
                                   r"--importance-cache: cannot use .*afile as a folder", _file("afile")),
    "results-lock-held": (_forget_case(), r"the lock .*results.jsonl.lock has been held", _held_lock),
    "faces-forget-too-few-per-identity": (_forget_case("--dataset", "faces", "--data-dir", "TMP/data"),
                                          r"fewer than 2 images: bob \(1\)", _faces({"ann": 5, "bob": 1})),
    "faces-split-impossible": (_pretrain_case("--dataset", "faces"), r"stratified train/test split .* impossible",
                               _faces({"ann": 2, "bob": 2, "cid": 2})),
    "pretrain-out-is-a-file": (_pretrain_case("--out", "TMP/afile"), r"--out: cannot use .*afile as a folder",
                               _file("afile")),
    "pretrain-lr-negative": (_pretrain_case("--lr", "-0.1"), r"--lr: -0.1 is out of range", None),
    "pretrain-val-fraction-1": (_pretrain_case("--val-fraction", "1"), r"--val-fraction: 1 is out", None),
    "pretrain-milestone-0": (_pretrain_case("--milestones", "0", "3"), r"--milestones: 0 is out", None),
    "pretrain-vit-patch": (_pretrain_case("--net", "vit", "--vit-config", "tiny", "--image-size", "30"),
                           r"--image-size 30 does not fit", None),
    "driver-seeds": (_other_entry(experiments, "cpu", "--seeds", "1 two", "--results", "TMP/r.jsonl", "--logs",
                                  "TMP/logs"), r"--seeds '1 two' is not a list", None),
    "driver-methods": (_other_entry(experiments, "cpu", "--methods", "ssd sdd", "--results", "TMP/r.jsonl"),
                       r"unknown method sdd", None),
    "driver-devices": (_other_entry(experiments, "gpu0", "--results", "TMP/r.jsonl"), r"gpu0 is neither", None),
    "driver-missing-gpu": (_other_entry(experiments, "0,7", "--results", "TMP/r.jsonl", "--logs", "TMP/logs"),
                           r"GPU \d does not exist: this machine has \d+ GPU", None),
    "driver-unknown-class": (_other_entry(experiments, "cpu", "--suite", "digits", "--classes", "seven eleven", "--results", "TMP/r.jsonl",
                                          "--logs", "TMP/logs"), r"table digits_full_resnet .*unknown class 'eleven'",
                             None),
    "driver-class-printing": (_other_entry(experiments, "--print-commands", "--table", "cifar20_sub_resnet",
                                           "--classes", "rocket vehicle2"), r"unknown sub-class 'vehicle2'", None),
    "driver-extra-flag": (_other_entry(experiments, "cpu", "--extra", "--alhpa 3", "--results", "TMP/r.jsonl"),
                          r"unrecognized arguments: --alhpa 3", None),
    "driver-extra-value": (_other_entry(experiments, "cpu", "--extra", "--alpha -1", "--results", "TMP/r.jsonl"),
                           r"table pairs100_full_resnet, ssd: alpha \(--alpha\): -1.0 is out of range", None),
    "tables-out-is-a-file": (_other_entry(make_tables, "--results", "TMP/r.jsonl", "--out", "TMP/afile"),
                             r"--out: cannot use .*afile as a folder", _file("afile")),
    "tables-std-floor": (_other_entry(make_tables, "--std-floor", "-1"), r"--std-floor: -1 is out", None),
}


@pytest.mark.parametrize("case", sorted(OWN_CASES))
def test_bad_input_fails_before_any_work(case, tiny_checkpoint, tmp_path, nothing_expensive, monkeypatch):
    build, match, setup = OWN_CASES[case]
    monkeypatch.setattr(results, "LOCK_WAIT_S", 0.2)
    held = setup(tmp_path) if setup else None
    try:
        before = snapshot(tmp_path, tiny_checkpoint)
        status, out, err = cli(build(tiny_checkpoint, tmp_path))
        assert_one_line_error(status, err, match)
        assert snapshot(tmp_path, tiny_checkpoint) == before
    finally:
        if hasattr(held, "release"):
            held.release()


@pytest.mark.parametrize("args, match", [
    (["forget_full_class_main.py", "--batch-size", "0", "--forget-class", "three"], r"--batch-size\): 0 is out"),
    (["pretrain_model.py", "--epochs", "0"], r"--epochs: 0 is out of range"),
    (["forget_random_main.py", "--device", "tpu9"], r"unknown device 'tpu9'"),
], ids=["forget", "pretrain", "device"])
def test_a_real_script_prints_one_line_and_exits_2(args, match, tmp_path):
    before = snapshot(ROOT / "runs") if (ROOT / "runs").exists() else {}
    p = subprocess.run([sys.executable, *args, "--results" if "forget" in args[0] else "--checkpoint-dir",
                        str(tmp_path / "x")], cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert_one_line_error(p.returncode, p.stderr, match)
    assert p.stdout == "" and list(tmp_path.iterdir()) == []
    assert (snapshot(ROOT / "runs") if (ROOT / "runs").exists() else {}) == before


# --- a finished result is never lost --------------------------------------------------------------

def test_nonfinite_numbers_round_trip_through_a_results_line(tmp_path, capsys):
    record = {"key": "k", "config": {"alpha": float("inf"), "odd/key~": [1.0, float("nan"), -float("inf")]},
              "metrics": {"zrf": float("nan"), "df": 3.5}}
    path = tmp_path / "results.jsonl"
    results.append(path, record)
    line = path.read_text()
    json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not strict JSON"))
    (back,) = results.read(path)
    assert back["config"]["alpha"] == float("inf") and back["metrics"]["df"] == 3.5
    assert back["config"]["odd/key~"][0] == 1.0 and np.isnan(back["config"]["odd/key~"][1])
    assert back["config"]["odd/key~"][2] == -float("inf") and np.isnan(back["metrics"]["zrf"])
    path.write_bytes(path.read_bytes() + b'{"key": "\xff\xfe"}\n')  # not UTF-8: skipped, the rest kept
    assert [r["key"] for r in results.read(path)] == ["k"]
    assert "is not valid JSON" in capsys.readouterr().err


def _breaks_results_after_the_method(monkeypatch, how: str, results_path: Path):
    """Wrap the baseline method so that the results path turns unwritable while the run is underway."""
    original = methods.REGISTRY["baseline"]

    def method_then_break(model, splits, hp, ctx):
        out = original.fn(model, splits, hp, ctx)
        if how == "results-becomes-a-folder":
            results_path.unlink()
            results_path.mkdir()
        else:  # the results folder is replaced by a file: nothing can be written beside it
            folder = results_path.parent
            folder.rename(folder.with_name("moved"))
            folder.write_text("now a file\n")
        return out

    monkeypatch.setitem(methods.REGISTRY, "baseline", methods.Method(method_then_break, original.params))


@pytest.mark.parametrize("how", ["results-becomes-a-folder", "its-folder-becomes-a-file"])
def test_a_result_that_cannot_be_appended_goes_to_a_fallback_file(how, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/logs, the second place a record may go, is relative to the run
    path = tmp_path / "res" / "results.jsonl"
    path.parent.mkdir()
    path.write_text('{"key": "earlier", "metrics": {}}\n')
    argv = forget_argv(tiny_checkpoint, tmp_path, "--method", "baseline", "--results", str(path))
    key = plan_argv("full_class", argv, SCRIPT_PARAMS["full_class"]).key
    _breaks_results_after_the_method(monkeypatch, how, path)

    status, out, err = cli(_forget("full_class", argv))
    line = assert_one_line_error(status, err, r"the result could not be appended to .*results.jsonl")
    fallback = Path(re.search(r"the record is saved in (\S+) ", line).group(1))
    expected = path.parent if how == "results-becomes-a-folder" else Path("runs/logs")
    assert fallback.parent.resolve() == expected.resolve() and fallback.name == f"unsaved-{key}.jsonl"
    (record,) = results.read(fallback)
    assert record["key"] == key and record["config"]["method"] == "baseline"
    assert set(record["metrics"]) >= {"df", "retain_test_acc", "mia"} and record["metrics"]["df"] is not None

    # the fix the message gives: make the results file writable again, then append the saved line
    if how == "results-becomes-a-folder":
        path.rmdir()
        path.write_text('{"key": "earlier", "metrics": {}}\n')
    else:
        path.parent.unlink()
        path.parent.with_name("moved").rename(path.parent)
    with open(path, "ab") as f:
        f.write(fallback.read_bytes())
    assert [r["key"] for r in results.read(path)] == ["earlier", key]
    assert run_argv("full_class", argv, SCRIPT_PARAMS["full_class"])["key"] == key  # and it counts as done


def test_a_record_with_nowhere_to_go_is_printed(tiny_checkpoint, tmp_path, monkeypatch):
    argv = forget_argv(tiny_checkpoint, tmp_path, "--method", "baseline")

    def no_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results, "append", no_disk)
    monkeypatch.setattr(results, "atomic_write_bytes", no_disk)
    status, out, err = cli(_forget("full_class", argv))
    assert_one_line_error(status, err, r"No space left on device.*the record is printed above")
    printed = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert len(printed) == 1 and printed[0]["config"]["method"] == "baseline"
