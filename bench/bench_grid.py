"""Benchmark of the grid driver: where a run's wall time goes. It prints numbers; it is not a test.

    python bench/bench_grid.py                      # the quick suite, seed 1, every method, both modes
    python bench/bench_grid.py --table digits_full_resnet --seeds 1 --classes "zero one two three four" \
        --methods "baseline ssd lfssd bad_teacher"   # a 20-run grid
    python bench/bench_grid.py --extra "--wandb disabled"   # without wandb (offline is the suite's default)

For each mode (a persistent worker per device slot, and --isolate: a new process per run) it runs
`experiments.py cpu ...` as a user would, with fresh results, logs and importance-cache folders; the
checkpoints are pretrained once, before anything is timed. It reports

    overhead per run = wall (as the driver saw the run) - method_s - eval_s

(median over the runs), and for the whole command (wall - sum of method_s and eval_s) / runs, which
also counts the driver's own start, its planning and the workers' start. The modes run one after the
other, so a change in machine load between them shows in the numbers: the load average is printed.
Then it splits one run's eval_s into its parts (the batched pass per split, the MIA's fit, ZRF).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would drown the tables (children inherit it)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import experiments  # noqa: E402
import models  # noqa: E402
import results  # noqa: E402
import runner  # noqa: E402

SUMMARY = re.compile(r"^    (.+?): Df .* \[wall ([0-9.]+)s\]$")


def load() -> str:
    return f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "load average n/a"


def grid_argv(args, tmp: Path, mode: str) -> list[str]:
    out = tmp / mode
    argv = ["cpu", "--seeds", args.seeds, "--methods", args.methods, "--results", str(out / "results.jsonl"),
            "--logs", str(out / "logs"), "--checkpoint-dir", args.checkpoint_dir, "--no-tables",
            "--extra", f"--importance-cache {out / 'cache'} {args.extra}".strip()]
    for t in args.table or []:
        argv += ["--table", t]
    if args.classes:
        argv += ["--classes", args.classes]
    return argv + (["--isolate"] if mode == "isolate" else [])


def run_keys(argv: list[str]) -> dict[str, str]:
    """label -> results key of every run of the grid, planned as the driver plans them."""
    args = experiments.parse_args(argv)
    cache = runner.Cache()
    return {r.label: runner.plan(r.config, cache).key for r in experiments.expand(args, experiments.select_tables(args))}


def bench_mode(args, tmp: Path, mode: str) -> dict:
    argv = grid_argv(args, tmp, mode)
    print(f"\n## {mode}: python experiments.py {shlex.join(argv)}\n({load()} at start)", flush=True)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "experiments.py", *argv], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"error: the {mode} grid failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    walls = {m.group(1): float(m.group(2)) for m in map(SUMMARY.match, out.stdout.splitlines()) if m}
    by_key = {r["key"]: r for r in results.read(tmp / mode / "results.jsonl")}
    rows = []
    for label, key in run_keys(argv).items():
        rec = by_key[key]
        t = rec["times"]
        rows.append({"label": label, "method": rec["config"]["method"], "wall": walls[label],
                     "method_s": t["method_s"], "eval_s": t["eval_s"],
                     "overhead": walls[label] - t["method_s"] - t["eval_s"]})
    work = sum(r["method_s"] + r["eval_s"] for r in rows)
    r = {"mode": mode, "runs": len(rows), "wall": wall, "method": sum(x["method_s"] for x in rows),
         "eval": sum(x["eval_s"] for x in rows), "median": statistics.median(x["overhead"] for x in rows),
         "per_run_command": (wall - work) / len(rows), "rows": rows}
    print("| method | runs | method s (sum) | eval s (sum) | overhead per run, median s | max s |\n|---|---:|---:|---:|---:|---:|")
    for method in dict.fromkeys(x["method"] for x in rows):
        sel = [x for x in rows if x["method"] == method]
        print(f"| {method} | {len(sel)} | {sum(x['method_s'] for x in sel):.1f} | {sum(x['eval_s'] for x in sel):.1f} "
              f"| {statistics.median(x['overhead'] for x in sel):.2f} | {max(x['overhead'] for x in sel):.2f} |")
    print(f"\n{mode}: {len(rows)} runs in {wall:.0f} s (method {r['method']:.0f} s, eval {r['eval']:.0f} s); "
          f"overhead per run: median {r['median']:.2f} s (driver's view of each run), "
          f"{r['per_run_command']:.2f} s over the whole command ({load()} at the end)", flush=True)
    return r


def bench_eval_split(args, repeats: int = 3) -> None:
    """One run's evaluation, part by part, with the suite's own functions (as metrics.evaluate calls them)."""
    import torch

    import metrics
    import training

    grid = experiments.parse_args(["cpu", "--seeds", args.seeds, "--checkpoint-dir", args.checkpoint_dir]
                                  + sum((["--table", t] for t in args.table or []), []))
    run = experiments.expand(grid, experiments.select_tables(grid))[0]
    p = runner.plan(replace(run.config, device="cpu"))
    device, bs = torch.device("cpu"), p.config.eval_batch_size
    model = models.load_checkpoint(p.weights, p.meta)
    splits = p.splits
    parts: dict[str, list[float]] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        parts.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    for _ in range(repeats):
        logits = {n: timed(f"pass {n}", lambda n=n: training.predict(model, getattr(splits, n), device, bs))
                  for n in ("forget_train", "retain_train", "forget_test", "retain_test")}
        test = torch.cat([logits["forget_test"][0], logits["retain_test"][0]])
        timed("MIA fit and predict", lambda: metrics.membership_attack(logits["retain_train"][0], test,
                                                                      logits["forget_train"][0]))
        ref = timed("ZRF reference model (build)", lambda: models.initial(p.meta["model_spec"], False, seed=p.config.seed + 2))
        timed("ZRF reference pass (forget_train)", lambda: training.predict(ref, splits.forget_train, device, bs))
        timed("metrics.evaluate, whole", lambda: metrics.evaluate(model, splits, device, ref, bs))
    sizes = {f"pass {n}": len(getattr(splits, n)) for n in ("forget_train", "retain_train", "forget_test", "retain_test")}
    sizes["ZRF reference pass (forget_train)"] = len(splits.forget_train)
    print(f"\n## eval_s split: {run.label}, eval batch {bs}, median of {repeats} ({load()})\n")
    print("| part | images | median s | ms per image |\n|---|---:|---:|---:|")
    for name, times in parts.items():
        med, n = statistics.median(times), sizes.get(name)
        print(f"| {name} | {n or ''} | {med:.3f} | {f'{1000 * med / n:.2f}' if n else ''} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--table", action="append", default=None, help="tables (repeatable; default: the quick suite)")
    a("--seeds", default="1", help="seeds of the grid")
    a("--methods", default=" ".join(experiments.ALL_METHODS), help="methods of the grid")
    a("--classes", default=None, help="forget classes, overriding each table's")
    a("--extra", default="", help="extra flags for every run, e.g. '--wandb disabled'")
    a("--modes", default="worker isolate", help="which modes to time, in this order")
    a("--checkpoint-dir", default=None, help="existing checkpoints (default: pretrained into a temporary folder)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_grid_") as tmp:
        tmp = Path(tmp)
        args.checkpoint_dir = args.checkpoint_dir or str(tmp / "pretrain")
        grid = experiments.parse_args(grid_argv(args, tmp, "pretrain"))
        pretrain = experiments.pretrain_commands(grid, experiments.select_tables(grid)).values()
        for cmd in pretrain:  # untimed: both modes start from the same checkpoints
            subprocess.run([sys.executable, *cmd, "--device", "cpu"], cwd=ROOT, check=True, capture_output=True)
        print(f"# grid driver benchmark\n\n{os.cpu_count()} CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
              f"{len(pretrain)} checkpoints pretrained first; {load()}", flush=True)
        res = [bench_mode(args, tmp, mode) for mode in args.modes.split()]
        bench_eval_split(args)
    print("\n## Summary\n\n| mode | runs | command wall s | method s | eval s | overhead per run, median s "
          "| overhead per run, whole command s |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in res:
        print(f"| {r['mode']} | {r['runs']} | {r['wall']:.0f} | {r['method']:.0f} | {r['eval']:.0f} | "
              f"{r['median']:.2f} | {r['per_run_command']:.2f} |")
    print(f"\nbenchmark wall time {time.perf_counter() - t_start:.0f} s; {load()} at the end")


if __name__ == "__main__":
    main()
