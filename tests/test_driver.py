"""The driver and the results file: run keys, resume, locking, fan-out, command printing."""
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import experiments
import methods
import results

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
    out = subprocess.run([sys.executable, "experiments.py", "--print-commands", "--table", "cifar100_full_resnet"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert len(lines) == 5 * len(methods.REGISTRY) * 5
    assert all(ln.startswith("python forget_full_class_main.py") for ln in lines)
    assert sum("--forget-class rocket" in ln and "--method ssd " in ln for ln in lines) == 5
    assert "pretrain first" in out.stderr


def test_unknown_table_is_a_one_line_error():
    out = subprocess.run([sys.executable, "experiments.py", "--print-commands", "--table", "nope"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: unknown table nope")


def test_two_cpu_slots_run_two_runs_at_once(tmp_path):
    args = experiments.parse_args(["cpu,cpu", "--logs", str(tmp_path / "logs")])
    stamp = "import sys, time; t=time.time(); time.sleep(1.5); open(sys.argv[1], 'w').write(f'{t} {time.time()}')"
    commands = [(f"job{i}", ["-c", stamp, str(tmp_path / f"t{i}")]) for i in range(2)]
    failures = experiments.execute(args, commands)
    assert failures == []
    (s0, e0), (s1, e1) = [map(float, (tmp_path / f"t{i}").read_text().split()) for i in range(2)]
    assert s1 < e0 and s0 < e1  # the two intervals overlap


def test_failures_are_reported_and_the_rest_still_runs(tmp_path):
    args = experiments.parse_args(["cpu", "--logs", str(tmp_path / "logs")])
    commands = [("bad", ["-c", "import sys; sys.exit(3)"]),
                ("good", ["-c", f"open({str(tmp_path / 'ok')!r}, 'w')"])]
    failures = experiments.execute(args, commands)
    assert [(label, rc) for label, _, rc in failures] == [("bad", 3)]
    assert (tmp_path / "ok").exists()
    assert "import sys" in (tmp_path / "logs" / "bad.log").read_text()  # the log holds the command


def test_resume_skips_runs_already_in_the_results_file(tiny_checkpoint, tmp_path):
    ckpt_dir = str(tiny_checkpoint.parent)
    argv = ["cpu", "--table", "digits_full_resnet", "--seeds", "0", "--methods", "baseline ssd",
            "--results", str(tmp_path / "r.jsonl"), "--checkpoint-dir", ckpt_dir, "--extra", "--wandb disabled"]
    args = experiments.parse_args(argv)
    runs = experiments.expand(args, experiments.select_tables(args))
    assert len(runs) == 2 and experiments.pretrain_commands(args, experiments.select_tables(args)) == []
    assert len(experiments.todo(args, runs)) == 2
    import forget_full_class_main
    import runner
    runner.run("full_class", forget_full_class_main.SSD_PARAMS, runs[0].argv + ["--device", "cpu"])
    left = experiments.todo(args, runs)
    assert [r.label for r in left] == [runs[1].label]
    assert experiments.main(argv + ["--no-tables"]) == 0
    keys = [r["key"] for r in results.read(tmp_path / "r.jsonl")]
    assert len(keys) == 2 == len(set(keys))
    assert experiments.todo(args, runs) == []
