"""The experiment driver behind MAIN_run_experiments.sh: grid, pretraining, resume, fan-out, summary.

    python experiments.py cpu                          # the quick digits suite
    python experiments.py 0 --table cifar100_full_resnet
    python experiments.py 0,1,2,3                      # the paper grid over four GPUs
    python experiments.py --print-commands --table cifar20_sub_vit   # for SLURM / GNU parallel

Every run is a subprocess of a forget_*_main.py script. Runs already in the results file are
skipped (by their key, a hash of the full config), and a run that another driver is executing is
skipped too (an OS file lock per key), so restarted or concurrent drivers never repeat a cell.
"""
from __future__ import annotations

import argparse
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import methods
import results
import runner
from common import SHARED_FLAGS, ArgumentParser, UserError, add_shared_flags, check_output_dir, run_cli

HERE = Path(__file__).resolve().parent
SCRIPTS = {"full_class": "forget_full_class_main.py", "sub_class": "forget_sub_class_main.py",
           "random": "forget_random_main.py"}
ALL_METHODS = list(methods.REGISTRY)
PAPER_CLASSES = {"cifar100": ["rocket", "mushroom", "baby", "lamp", "sea"],
                 "cifar20": ["vehicle2", "veg", "people", "electrical_devices", "natural_scenes"],
                 "sub": ["rocket", "mushroom", "baby", "lamp", "sea"],
                 "faces": ["0", "1", "2", "3", "4"]}  # identity folders by index; pass --classes to pick others


@dataclass
class Table:
    scenario: str
    net: str
    dataset: str
    classes: list  # [None] for random forgetting
    pretrain_flags: list[str] = field(default_factory=list)
    forget_flags: list[str] = field(default_factory=list)


def _paper_tables() -> dict[str, Table]:
    tables = {}
    for net, short in (("resnet18", "resnet"), ("vit", "vit")):
        tables[f"cifar100_full_{short}"] = Table("full_class", net, "cifar100", PAPER_CLASSES["cifar100"])
        tables[f"cifar20_full_{short}"] = Table("full_class", net, "cifar20", PAPER_CLASSES["cifar20"])
        tables[f"cifar20_sub_{short}"] = Table("sub_class", net, "cifar20", PAPER_CLASSES["sub"])
        tables[f"cifar10_random_{short}"] = Table("random", net, "cifar10", [None], forget_flags=["--forget-count", "100"])
    tables["faces_full_resnet"] = Table("full_class", "resnet18", "faces", PAPER_CLASSES["faces"])
    return tables


# The quick suite: digits on a narrow ResNet18, which trains in under a minute on two CPU cores.
QUICK_PRETRAIN = ["--width", "16"]
QUICK_TABLES = {
    "digits_full_resnet": Table("full_class", "resnet18", "digits", ["seven"], QUICK_PRETRAIN),
    "digits5_sub_resnet": Table("sub_class", "resnet18", "digits5", ["seven"], QUICK_PRETRAIN),
    "digits_random_resnet": Table("random", "resnet18", "digits", [None], QUICK_PRETRAIN, ["--forget-count", "100"]),
}
TABLES = {**_paper_tables(), **QUICK_TABLES}


@dataclass
class Run:
    table: str
    argv: list[str]  # flags for the forget script, without --device
    script: str
    label: str


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("devices", nargs="?", default=env("DEVICES", "cpu"),
                   help="'cpu' (default), one GPU id, or a comma list ('0,1,2,3'; 'cpu,cpu' runs two CPU slots); "
                        "one run at a time per entry")
    p.add_argument("--suite", choices=["quick", "paper"], default=env("SUITE"),
                   help="quick: digits, every scenario; paper: every paper table (default: quick on cpu, "
                        "paper on GPUs; env SUITE)")
    p.add_argument("--table", action="append", default=env("TABLE", "").split() or None,
                   help=f"run only these tables (repeatable; env TABLE): {', '.join(TABLES)}")
    p.add_argument("--seeds", default=env("SEEDS"), help="seeds, e.g. '1 2 3' (default: 1..5; the quick digits tables: 1 2; env SEEDS)")
    p.add_argument("--methods", default=env("METHODS"), help=f"methods (default: all: {' '.join(ALL_METHODS)}; env METHODS)")
    p.add_argument("--classes", default=env("CLASSES"), help="forget classes, overriding each table's (env CLASSES)")
    shared = {name: SHARED_FLAGS[name][1]["default"] for name in ("results", "checkpoint_dir", "data_dir")}
    add_shared_flags(p, "results", "checkpoint_dir", "data_dir", results=env("RESULTS", shared["results"]),
                     checkpoint_dir=env("CHECKPOINT_DIR", shared["checkpoint_dir"]),
                     data_dir=env("DATA_DIR", shared["data_dir"]),
                     results_help="results file (env RESULTS)", checkpoint_dir_help="checkpoint folder (env "
                                                                                     "CHECKPOINT_DIR)",
                     data_dir_help="dataset root (env DATA_DIR)")
    p.add_argument("--logs", default="runs/logs", help="one log file per run, with its command and output")
    p.add_argument("--print-commands", action="store_true",
                   help="print one shell command per run and run nothing (pretraining commands go to stderr)")
    p.add_argument("--no-tables", action="store_true", help="do not print the tables at the end")
    p.add_argument("--extra", default=env("EXTRA", ""), help="extra flags for every forget run, e.g. '--wandb disabled'")
    args = p.parse_args(argv)
    unknown = [t for t in args.table or [] if t not in TABLES]
    if unknown:
        raise UserError(f"unknown table {', '.join(unknown)} (choose from {', '.join(TABLES)})")
    args.slots = [d.strip() for d in args.devices.split(",") if d.strip()]
    bad = [s for s in args.slots if s != "cpu" and not s.isdigit()] or ([] if args.slots else ["(none)"])
    if bad:
        raise UserError(f"devices {args.devices!r}: {', '.join(bad)} is neither 'cpu' nor a GPU id "
                        f"(pass cpu, a GPU id such as 0, or a comma list such as 0,1)")
    on_cpu = all(s == "cpu" for s in args.slots)
    args.suite = args.suite or ("quick" if on_cpu else "paper")
    quick = args.table is None and args.suite == "quick" or args.table and all(t in QUICK_TABLES for t in args.table)
    seeds = (args.seeds or ("1 2" if quick else "1 2 3 4 5")).replace(",", " ").split()
    if not seeds or not all(s.isdigit() for s in seeds):
        raise UserError(f"--seeds {args.seeds!r} is not a list of non-negative integers (pass e.g. --seeds '1 2 3')")
    args.seeds = [int(s) for s in seeds]
    args.methods = (args.methods or " ".join(ALL_METHODS)).replace(",", " ").split()
    unknown = [m for m in args.methods if m not in ALL_METHODS] or ([] if args.methods else ["(none)"])
    if unknown:
        raise UserError(f"unknown method {', '.join(unknown)} (choose from {', '.join(ALL_METHODS)})")
    try:
        shlex.split(args.extra)
    except ValueError as e:
        raise UserError(f"--extra {args.extra!r} cannot be split into flags: {e} (balance its quotes)") from None
    if not args.print_commands:  # every run writes here; a bad path must fail now, not after the first run
        results.check_writable(args.results)
        check_output_dir(args.logs, "--logs")
        check_output_dir(args.checkpoint_dir, "--checkpoint-dir")
    return args


def select_tables(args) -> dict[str, Table]:
    if args.table:
        return {t: TABLES[t] for t in args.table}
    return QUICK_TABLES if args.suite == "quick" else _paper_tables()


def expand(args, tables: dict[str, Table]) -> list[Run]:
    runs = []
    for name, t in tables.items():
        classes = args.classes.replace(",", " ").split() if args.classes and t.scenario != "random" else t.classes
        for seed in args.seeds:
            for cls in classes:
                for method in args.methods:
                    argv = ["--net", t.net, "--dataset", t.dataset, "--method", method, "--seed", str(seed),
                            "--results", args.results, "--checkpoint-dir", args.checkpoint_dir,
                            "--data-dir", args.data_dir, *t.forget_flags, *shlex.split(args.extra)]
                    if cls is not None:
                        argv += ["--forget-class", cls]
                    label = f"{name} {method} {cls or ''} seed{seed}".replace("  ", " ")
                    runs.append(Run(name, argv, SCRIPTS[t.scenario], label))
    return runs


def pretrain_commands(args, tables: dict[str, Table]) -> list[list[str]]:
    """One pretraining command per (net, dataset, seed) whose checkpoint is missing."""
    cmds, seen = [], set()
    for t in tables.values():
        for seed in args.seeds:
            if (t.net, t.dataset, seed) in seen:
                continue
            seen.add((t.net, t.dataset, seed))
            try:
                runner.find_checkpoint(args.checkpoint_dir, t.net, t.dataset, seed)
                continue
            except UserError:
                pass
            cmds.append(["pretrain_model.py", "--net", t.net, "--dataset", t.dataset, "--seed", str(seed),
                         "--checkpoint-dir", args.checkpoint_dir, "--data-dir", args.data_dir, *t.pretrain_flags])
    return cmds


def device_env(slot: str, cpu_slots: int = 1) -> tuple[dict, list[str]]:
    env = dict(os.environ)
    if slot == "cpu":
        # CPU slots share the cores: without a thread cap, two runs of two threads each on two cores
        # spin against each other and run many times slower than one after the other
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cpu_slots)))
        return env, ["--device", "cpu"]
    env["CUDA_VISIBLE_DEVICES"] = slot
    return env, ["--device", "cuda"]


def todo(args, runs: list[Run]) -> list[Run]:
    """Drop runs whose key is already in the results file; runs that cannot be planned are kept
    (the run itself will then report the problem)."""
    done, cache, left = results.done_keys(args.results, runner.record_key), {}, []
    for r in runs:
        scenario = next(s for s, f in SCRIPTS.items() if f == r.script)
        try:
            key = runner.plan(scenario, runner.script_params(scenario), r.argv + ["--device", "cpu"], data_cache=cache).key
        except UserError:
            key = None
        if key not in done:
            left.append(r)
    return left


def execute(args, commands: list[tuple[str, list[str]]]) -> list[tuple[str, str, int]]:
    """Run (label, [script, flags...]) commands, one at a time per device slot; return the failures."""
    jobs: queue.Queue = queue.Queue()
    for c in commands:
        jobs.put(c)
    failures, lock, total = [], threading.Lock(), len(commands)
    counter = {"started": 0}
    Path(args.logs).mkdir(parents=True, exist_ok=True)

    def worker(slot: str):
        env, device_flags = device_env(slot, args.slots.count("cpu"))
        while True:
            try:
                label, cmd = jobs.get_nowait()
            except queue.Empty:
                return
            full = [sys.executable, *cmd, *device_flags]
            with lock:
                counter["started"] += 1
                print(f"[{counter['started']}/{total}] {slot}: {label}", flush=True)
            log = Path(args.logs) / (label.replace(" ", "_").replace("/", "-") + ".log")
            with open(log, "w") as f:
                f.write(shlex.join(full) + "\n")
                f.flush()
                rc = subprocess.run(full, cwd=HERE, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                with lock:
                    failures.append((label, shlex.join(full), rc))
                    print(f"FAILED ({rc}): {label}; see {log}", flush=True)
            else:
                lines = log.read_text().splitlines()
                summary = next((ln for ln in reversed(lines) if ln.startswith(("Df ", "skip:", "saved "))), "")
                if summary:
                    print(f"    {label}: {summary}", flush=True)

    threads = [threading.Thread(target=worker, args=(s,)) for s in args.slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def main(argv=None) -> int:
    args = parse_args(argv)
    tables = select_tables(args)
    runs = expand(args, tables)
    if args.print_commands:
        for cmd in pretrain_commands(args, tables):
            print("# pretrain first: python " + shlex.join(cmd), file=sys.stderr)
        for r in runs:
            print(f"python {shlex.join([r.script, *r.argv])}")
        return 0
    print(f"suite {args.suite}: {len(tables)} tables, {len(runs)} runs, seeds {args.seeds}, devices {args.slots}")
    if args.suite == "quick":
        print("note: the quick suite uses the paper's alpha and lambda; --extra '--alpha X' overrides them")
    t0 = time.time()
    failures = execute(args, [(f"pretrain {c[2]} {c[4]} seed{c[6]}", c) for c in pretrain_commands(args, tables)])
    left = todo(args, runs)
    print(f"{len(runs) - len(left)} runs already done, {len(left)} to run")
    failures += execute(args, [(r.label, [r.script, *r.argv]) for r in left])
    if not args.no_tables and Path(args.results).exists() and (HERE / "make_tables.py").exists():
        subprocess.run([sys.executable, "make_tables.py", "--results", args.results, "--only",
                        *sorted(tables)], cwd=HERE)
    print(f"finished in {time.time() - t0:.0f}s")
    if failures:
        print(f"{len(failures)} runs failed:")
        for label, cmd, rc in failures:
            print(f"  exit {rc}: {label}\n    {cmd}")
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
