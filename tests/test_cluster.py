"""The grid on SLURM through submitit, tested without SLURM: submitit's local executor runs real tasks
on this machine, and a fake `sbatch` (with `srun` and `sacct`) on PATH captures the job scripts that
SLURM would get and reports the task states we choose. Also: each run's own record file, merged by
every reader, a damaged one included."""
import json
import os
import sys
from pathlib import Path

import pytest

import cluster
import experiments
import make_tables
import results
from common import UserError

SMALL_GRID = ["--table", "digits_full_resnet", "--methods", "baseline ssd", "--no-tables"]


def grid_argv(tiny_checkpoint: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--slurm", *SMALL_GRID, "--checkpoint-dir", str(tiny_checkpoint.parent), "--results",
            str(tmp_path / "r.jsonl"), "--slurm-folder", str(tmp_path / "slurm"),
            "--extra", f"--wandb disabled --importance-cache {tmp_path / 'cache'}", *extra]


def test_local_tasks_record_each_run_in_its_own_file_and_a_second_submission_runs_nothing(tiny_checkpoint,
                                                                                          tmp_path, capsys):
    argv = grid_argv(tiny_checkpoint, tmp_path, "--seeds", "0", "--slurm-cluster", "local", "--slurm-gpus", "0",
                     "--slurm-cpus", "1", "--slurm-runs-per-job", "2")
    assert experiments.main(argv) == 0
    assert "0 runs already done, 2 to run" in capsys.readouterr().out
    files = sorted((tmp_path / "r.jsonl.d").glob("*.jsonl"))
    assert len(files) == 2 and not (tmp_path / "r.jsonl").exists()  # no line appended under a lock
    records = results.read(tmp_path / "r.jsonl")
    assert sorted(r["config"]["method"] for r in records) == ["baseline", "ssd"]
    assert {f.stem for f in files} == {r["key"] for r in records}
    assert all(r["config"]["separate_records"] and r["config"]["device"] == "cpu" for r in records)
    jobs = [p for p in (tmp_path / "slurm").iterdir() if p.is_dir() and p.name != "%j"]  # submitit makes %j too
    assert len(jobs) == 1  # both runs in one task
    written = {f: f.read_bytes() for f in files}

    assert experiments.main(argv) == 0  # everything is recorded: nothing is submitted
    assert "2 runs already done, 0 to run" in capsys.readouterr().out
    assert [p for p in (tmp_path / "slurm").iterdir() if p.is_dir() and p.name != "%j"] == jobs

    # a requeued (or duplicate) task runs its runs again: each finds its key and skips
    args = experiments.parse_args(argv)
    runs = experiments.expand(args, experiments.select_tables(args))
    assert cluster.ForgetTask()([(r.label, r.config) for r in runs]) == []
    assert capsys.readouterr().out.count("skip: ") == 2
    assert {f: f.read_bytes() for f in sorted((tmp_path / "r.jsonl.d").glob("*.jsonl"))} == written


FAKE_SBATCH = """#!{python}
import pathlib, shutil, sys
captured = pathlib.Path({captured!r})
job_id = 1000 + len(list(captured.glob("*.sh")))
shutil.copy(sys.argv[-1], captured / f"{{job_id}}.sh")
print(f"Submitted batch job {{job_id}}")
"""

# Reports every task of a captured job in the state that FAKE_STATES gives its job name (one state per
# array index), as `sacct -o JobID,State,NodeList --parsable2 -j ID ...` prints them.
FAKE_SACCT = """#!{python}
import json, os, pathlib, re, sys
captured, states = pathlib.Path({captured!r}), json.loads(os.environ["FAKE_STATES"])
print("JobID|State|NodeList")
for job_id in [a for i, a in enumerate(sys.argv) if sys.argv[i - 1] == "-j"]:
    script = (captured / f"{{job_id}}.sh").read_text()
    name = re.search(r"--job-name=(\\S+)", script).group(1)
    array = re.search(r"--array=0-(\\d+)", script)
    if array is None:
        print(f"{{job_id}}|{{states[name][0]}}|node1")
    for task in range(int(array.group(1)) + 1 if array else 0):
        print(f"{{job_id}}_{{task}}|{{states[name][task]}}|node1")
"""


def fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """sbatch, srun and sacct on PATH; returns the folder where sbatch leaves the scripts it gets."""
    bin_dir, captured = tmp_path / "bin", tmp_path / "captured"
    bin_dir.mkdir()
    captured.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("srun", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(text.format(python=sys.executable, captured=str(captured)))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return captured


def test_sbatch_gets_pretraining_first_then_the_runs_as_an_array_and_failures_are_listed(tiny_checkpoint, tmp_path,
                                                                                      monkeypatch, capsys):
    captured = fake_slurm(tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_STATES", json.dumps({"ssd-pretrain": ["NODE_FAIL"],
                                                  "ssd-forget": ["OUT_OF_MEMORY", "TIMEOUT"]}))
    argv = grid_argv(tiny_checkpoint, tmp_path, "--seeds", "0 1", "--slurm-partition", "gpu-short",
                     "--slurm-time", "33", "--slurm-pretrain-time", "600", "--slurm-gpus", "2", "--slurm-cpus", "3",
                     "--slurm-mem", "5", "--slurm-parallelism", "7", "--slurm-extra", "account=acme exclusive")
    assert experiments.main(argv) == 1

    pretrain, forget = sorted(captured.glob("*.sh"))  # in the order sbatch got them
    for script, name, minutes in ((pretrain, "ssd-pretrain", 600), (forget, "ssd-forget", 33)):
        lines = script.read_text().splitlines()
        for line in (f"--job-name={name}", f"--time={minutes}", "--partition=gpu-short", "--gpus-per-node=2",
                     "--cpus-per-task=3", "--mem=5GB", "--account=acme", "--exclusive"):
            assert f"#SBATCH {line}" in lines, (name, line)
        assert "export OMP_NUM_THREADS=3" in lines and any(ln.startswith("export PYTHONPATH=") for ln in lines)
    assert not any(ln.startswith("#SBATCH --array") for ln in pretrain.read_text().splitlines())  # one checkpoint
    assert "#SBATCH --array=0-1%2" in forget.read_text().splitlines()  # two runs; at most 7 at once

    out = capsys.readouterr().out
    failed = out[out.index("runs failed:"):]
    assert "NODE_FAIL: pretrain resnet18 digits seed1" in failed and f"{tmp_path / 'slurm' / '1000'}" in failed
    for method in ("baseline", "ssd"):  # seed 1 has no checkpoint, so its runs are not submitted
        assert f"no checkpoint: its pretraining failed: digits_full_resnet {method} seven seed1" in failed
    assert "OUT_OF_MEMORY: digits_full_resnet baseline seven seed0" in failed
    assert "TIMEOUT: digits_full_resnet ssd seven seed0" in failed
    assert f"log: {tmp_path / 'slurm' / '1001_1' / '1001_1_0_log.err'}" in failed


def test_readers_merge_the_runs_own_files_and_skip_a_damaged_one(tmp_path, capsys):
    path = tmp_path / "r.jsonl"

    def record(key: str, method: str, df: float) -> dict:
        return {"key": key, "config": {"dataset": "digits", "scenario": "full_class", "net": "resnet18",
                                       "method": method, "seed": 1, "forget_class": "seven"},
                "metrics": {"df": df, "retain_test_acc": 90.0}, "times": {"method_s": 1.0}, "method_info": {}}

    results.append(path, record("a", "baseline", 95.0))
    results.write_record(path, record("b", "retrain", 0.0))
    results.write_record(path, record("c", "ssd", float("inf")))  # a non-finite value survives its own file too
    (results.record_dir(path) / "d.jsonl").write_text('{"key": "d", "config": {"dataset"')  # a task killed mid-write
    capsys.readouterr()
    got = results.read(path)
    assert [r["key"] for r in got] == ["a", "b", "c"] and got[2]["metrics"]["df"] == float("inf")
    assert "d.jsonl:1 is not valid JSON" in capsys.readouterr().err
    assert results.done_keys(path) == {"a", "b", "c"}
    assert results.find(path, "c")["config"]["method"] == "ssd"

    path.unlink()  # a cluster run leaves no results file, only its runs' folder
    out = tmp_path / "tables"
    assert make_tables.main(["--results", str(path), "--out", str(out), "--no-figures"]) == 0
    table = (out / "tables.md").read_text()
    assert "| retrain " in table and "| ssd " in table and "| baseline " not in table


def test_extra_sbatch_parameters_are_key_value_pairs():
    assert cluster.extra_parameters("account=acme --qos=high exclusive dependency=afterok:1") == {
        "account": "acme", "qos": "high", "exclusive": True, "dependency": "afterok:1"}
    for bad in ("=x", "account="):
        with pytest.raises(UserError, match="--slurm-extra"):
            cluster.extra_parameters(bad)
