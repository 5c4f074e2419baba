"""The experiment driver behind MAIN_run_experiments.sh: grid, pretraining, resume, fan-out, summary.

    python experiments.py cpu                          # the quick suite on the embedded digit pairs
    python experiments.py 0 --table cifar100_full_resnet
    python experiments.py 0,1,2,3                      # the paper grid over four GPUs
    python experiments.py --print-commands --table cifar20_sub_vit   # for SLURM / GNU parallel

Each device slot gets one persistent worker process, which imports the suite once and then runs
the forget_*_main.py scripts in-process, one after the other, exactly as `python <script>` would
(fresh seeding, a freshly loaded model and a new results line per run); it keeps only the loaded
datasets and checkpoint weights between runs. A worker that dies is replaced and its run reported
as failed. --isolate starts a new process per run instead. Runs already in the results file are
skipped (by their key, a hash of the full config), and a run that another driver is executing is
skipped too (an OS file lock per key), so restarted or concurrent drivers never repeat a cell.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
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
    # random forgetting: split seeds per original (--seed s --model-seed m); None: the split seed is
    # the run seed, as in the paper's tables
    split_seeds: list[int] | None = None


def _paper_tables() -> dict[str, Table]:
    tables = {}
    for net, short in (("resnet18", "resnet"), ("vit", "vit")):
        tables[f"cifar100_full_{short}"] = Table("full_class", net, "cifar100", PAPER_CLASSES["cifar100"])
        tables[f"cifar20_full_{short}"] = Table("full_class", net, "cifar20", PAPER_CLASSES["cifar20"])
        tables[f"cifar20_sub_{short}"] = Table("sub_class", net, "cifar20", PAPER_CLASSES["sub"])
        tables[f"cifar10_random_{short}"] = Table("random", net, "cifar10", [None], forget_flags=["--forget-count", "100"])
    tables["faces_full_resnet"] = Table("full_class", "resnet18", "faces", PAPER_CLASSES["faces"])
    return tables


# The quick suite: the paper's four ResNet18 tables in miniature. Digit pairs (datasets.pair_arrays)
# run at the paper's forget ratios |D| / |D_f| (100, 20, 100 and 500) on a width-16 ResNet18 that
# trains in well under a minute on two CPU cores.
QUICK_PRETRAIN = ["--width", "16"]
QUICK_TABLES = {
    "pairs100_full_resnet": Table("full_class", "resnet18", "pairs100", ["07"], QUICK_PRETRAIN),
    "pairs20_full_resnet": Table("full_class", "resnet18", "pairs20", ["05-09"], QUICK_PRETRAIN),
    "pairs20_sub_resnet": Table("sub_class", "resnet18", "pairs20", ["07"], QUICK_PRETRAIN),
    "pairs10_random_resnet": Table("random", "resnet18", "pairs10", [None], QUICK_PRETRAIN, ["--forget-count", "20"]),
}
# What fits the quick suite's 10 minutes on two CPU cores (see the README for each method's time);
# retrain_paper, finetune, amnesiac, unsir and ssd_per_sample stay available through --methods.
QUICK_METHODS = ["baseline", "retrain", "bad_teacher", "ssd", "lfssd", "assd", "ssd_search"]
# The small-cap regime: one digit is a tenth of the data, so I_Df / I_D is capped near 10 and the
# paper's alpha = 10 selects nothing (--suite digits).
DIGITS_TABLES = {
    "digits_full_resnet": Table("full_class", "resnet18", "digits", ["seven"], QUICK_PRETRAIN),
    "digits5_sub_resnet": Table("sub_class", "resnet18", "digits5", ["seven"], QUICK_PRETRAIN),
    "digits_random_resnet": Table("random", "resnet18", "digits", [None], QUICK_PRETRAIN, ["--forget-count", "100"]),
}
EMBEDDED_TABLES = {**QUICK_TABLES, **DIGITS_TABLES}
TABLES = {**_paper_tables(), **EMBEDDED_TABLES}
# The verdict suite: 10 forget requests per table, fixed before any result was seen: the pair classes
# "k, (k + 7) mod 10", one per tens digit (07, 18, ..., 96), and for random forgetting the split seeds
# 1..10; each on the originals of the run seeds. Its own results file, so the quick tables keep one class.
VERDICT_CLASSES = [f"{k}{(k + 7) % 10}" for k in range(10)]
VERDICT_SPLIT_SEEDS = list(range(1, 11))
VERDICT_TABLES = {
    "pairs100_full_resnet": replace(QUICK_TABLES["pairs100_full_resnet"], classes=VERDICT_CLASSES),
    "pairs20_sub_resnet": replace(QUICK_TABLES["pairs20_sub_resnet"], classes=VERDICT_CLASSES),
    "pairs10_random_resnet": replace(QUICK_TABLES["pairs10_random_resnet"], split_seeds=VERDICT_SPLIT_SEEDS),
}
VERDICT_METHODS = ["baseline", "retrain", "ssd", "lfssd", "assd", "ssd_search"]
VERDICT_RESULTS = "runs/verdict.jsonl"


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
    p.add_argument("--suite", choices=["quick", "verdict", "digits", "paper"], default=env("SUITE"),
                   help=f"quick: the four digit-pair tables, one forget request each, {' '.join(QUICK_METHODS)}; "
                        f"verdict: pairs100 full class, pairs20 sub-class and pairs10 random, 10 requests each, "
                        f"{' '.join(VERDICT_METHODS)}, into {VERDICT_RESULTS} unless --results is given; digits: "
                        "the small-cap digits tables, every method; paper: every paper table (default: quick on "
                        "cpu, paper on GPUs; env SUITE)")
    p.add_argument("--table", action="append", default=env("TABLE", "").split() or None,
                   help=f"run only these tables (repeatable; env TABLE): {', '.join(TABLES)}")
    p.add_argument("--seeds", default=env("SEEDS"), help="seeds, e.g. '1 2 3' (default: 1..5; the quick digits tables: 1 2; env SEEDS)")
    p.add_argument("--methods", default=env("METHODS"), help=f"methods (default: all: {' '.join(ALL_METHODS)}; env METHODS)")
    p.add_argument("--classes", default=env("CLASSES"), help="forget classes, overriding each table's (env CLASSES)")
    shared = {name: SHARED_FLAGS[name][1]["default"] for name in ("results", "checkpoint_dir", "data_dir")}
    add_shared_flags(p, "results", "checkpoint_dir", "data_dir", results=env("RESULTS"),
                     checkpoint_dir=env("CHECKPOINT_DIR", shared["checkpoint_dir"]),
                     data_dir=env("DATA_DIR", shared["data_dir"]),
                     results_help=f"results file (env RESULTS; default: {shared['results']}, or {VERDICT_RESULTS} "
                                  f"for the verdict suite)", checkpoint_dir_help="checkpoint folder (env "
                                                                                     "CHECKPOINT_DIR)",
                     data_dir_help="dataset root (env DATA_DIR)")
    p.add_argument("--logs", default="runs/logs", help="one log file per run, with its command and output")
    p.add_argument("--print-commands", action="store_true",
                   help="print one shell command per run and run nothing (pretraining commands go to stderr)")
    p.add_argument("--no-tables", action="store_true", help="do not print the tables at the end")
    p.add_argument("--isolate", action="store_true",
                   help="a new process per run instead of one persistent worker per device slot: slower to "
                        "start each run (imports, wandb), but nothing at all is shared between runs")
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
    args.results = args.results or (VERDICT_RESULTS if args.suite == "verdict" else shared["results"])
    quick = args.table is None and args.suite in ("quick", "verdict", "digits") or args.table and all(
        t in EMBEDDED_TABLES for t in args.table)
    seeds = (args.seeds or ("1 2" if quick else "1 2 3 4 5")).replace(",", " ").split()
    if not seeds or not all(s.isdigit() for s in seeds):
        raise UserError(f"--seeds {args.seeds!r} is not a list of non-negative integers (pass e.g. --seeds '1 2 3')")
    args.seeds = [int(s) for s in seeds]
    default_methods = {"verdict": VERDICT_METHODS, "quick": QUICK_METHODS}.get(args.suite, ALL_METHODS) \
        if not args.table else ALL_METHODS
    args.methods = (args.methods or " ".join(default_methods)).replace(",", " ").split()
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
    return {"quick": QUICK_TABLES, "verdict": VERDICT_TABLES, "digits": DIGITS_TABLES}.get(args.suite) \
        or _paper_tables()


def expand(args, tables: dict[str, Table]) -> list[Run]:
    runs = []
    for name, t in tables.items():
        classes = args.classes.replace(",", " ").split() if args.classes and t.scenario != "random" else t.classes
        for seed in args.seeds:
            # (forget class, split seed) per request: a class, or a random split of this original
            requests = [(None, s) for s in t.split_seeds] if t.split_seeds else [(c, None) for c in classes]
            for cls, split_seed in requests:
                for method in args.methods:
                    seeds = ["--seed", str(seed)] if split_seed is None else \
                        ["--seed", str(split_seed), "--model-seed", str(seed)]
                    argv = ["--net", t.net, "--dataset", t.dataset, "--method", method, *seeds,
                            "--results", args.results, "--checkpoint-dir", args.checkpoint_dir,
                            "--data-dir", args.data_dir, *t.forget_flags, *shlex.split(args.extra)]
                    if cls is not None:
                        argv += ["--forget-class", cls]
                    request = cls or (f"split{split_seed}" if split_seed is not None else "")
                    label = f"{name} {method} {request} seed{seed}".replace("  ", " ")
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


def describe_exit(rc: int) -> str:
    if rc >= 0:
        return f"exit {rc}"
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    hint = " (the out-of-memory killer sends SIGKILL)" if -rc == signal.SIGKILL else ""
    return f"killed by {name}{hint}"


class Worker:
    """The driver's handle on one persistent worker (`python experiments.py --worker`, see serve):
    one JSON line per job on its stdin, one JSON line per result on its stdout."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "experiments.py"), "--worker"], cwd=HERE, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, cmd: list[str], log: Path) -> int | None:
        """The run's exit status, as the script would have returned it; None if the worker died."""
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, "log": str(log)}) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
        except OSError:  # the pipe broke: the worker is gone
            reply = ""
        if reply:
            return json.loads(reply)["rc"]
        self.proc.wait()
        return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Closing stdin ends the worker's loop."""
        self.proc.stdin.close()
        self.proc.wait()
        self.proc.stdout.close()


def execute(args, commands: list[tuple[str, list[str]]]) -> list[tuple[str, str, str]]:
    """Run (label, [script, flags...]) commands, one at a time per device slot; return the failures
    as (label, command, why)."""
    jobs: queue.Queue = queue.Queue()
    for c in commands:
        jobs.put(c)
    failures, lock, total = [], threading.Lock(), len(commands)
    counter = {"started": 0}
    Path(args.logs).mkdir(parents=True, exist_ok=True)

    def slot_loop(slot: str):
        env, device_flags = device_env(slot, args.slots.count("cpu"))
        worker = None
        try:
            while True:
                try:
                    label, cmd = jobs.get_nowait()
                except queue.Empty:
                    return
                full = [*cmd, *device_flags]
                with lock:
                    counter["started"] += 1
                    print(f"[{counter['started']}/{total}] {slot}: {label}", flush=True)
                log = Path(args.logs) / (label.replace(" ", "_").replace("/", "-") + ".log")
                log.write_text(shlex.join([sys.executable, *full]) + "\n")  # the command heads its log
                t0 = time.perf_counter()
                if args.isolate:
                    with open(log, "a") as f:
                        rc = subprocess.run([sys.executable, *full], cwd=HERE, env=env, stdout=f,
                                            stderr=subprocess.STDOUT).returncode
                    why = describe_exit(rc)
                else:
                    if worker is None or not worker.alive():
                        worker = Worker(env)
                    rc = worker.run(full, log)
                    why = describe_exit(rc) if rc is not None else f"worker died: {describe_exit(worker.proc.returncode)}"
                    if rc is None:  # the run died with its worker; the next run gets a new one
                        with open(log, "a") as f:
                            f.write(f"\n{why}\n")
                        worker = None
                wall = time.perf_counter() - t0
                if rc != 0:
                    with lock:
                        failures.append((label, shlex.join([sys.executable, *full]), why))
                        print(f"FAILED ({why}): {label}; see {log}", flush=True)
                else:
                    lines = log.read_text().splitlines()
                    summary = next((ln for ln in reversed(lines) if ln.startswith(("Df ", "skip:", "saved "))), "")
                    if summary:
                        print(f"    {label}: {summary} [wall {wall:.2f}s]", flush=True)
        finally:
            if worker is not None:
                worker.close()

    # daemon threads: on Ctrl-C the driver exits instead of starting the next runs, and its workers,
    # whose stdin then closes, stop too
    threads = [threading.Thread(target=slot_loop, args=(s,), daemon=True) for s in args.slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def serve() -> None:
    """The worker loop: import the suite once, then execute one job per line of stdin, in-process, as
    `python <script> <flags>` would (runpy runs the script as __main__; `-c CODE` runs CODE), with
    the run's stdout and stderr, down to the file descriptors, appended to its log. Replies
    {"rc": status} on the original stdout. A run that raises is logged and the loop goes on.

    When stdin closes, the worker exits at once, also in the middle of a run: the driver is gone, and
    an interrupted run leaves what a killed script leaves (atomic writes, released claims)."""
    import runpy
    import traceback

    import torch

    runner.SHARED = {"data": {}, "weights": {}}
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    console = os.dup(1), os.dup(2)
    switches = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    jobs: queue.Queue = queue.Queue()

    def read_jobs():
        for line in sys.stdin:
            jobs.put(json.loads(line))
        os._exit(0)

    def run_one(cmd: list[str]) -> int:
        sys.argv = ["-c", *cmd[2:]] if cmd[0] == "-c" else list(cmd)
        try:
            if cmd[0] == "-c":
                exec(compile(cmd[1], "<string>", "exec"), {"__name__": "__main__"})
            else:
                runpy.run_path(cmd[0], run_name="__main__")
            return 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                return e.code or 0
            print(e.code, file=sys.stderr)
            return 1
        except Exception:
            traceback.print_exc()
            return 1
        finally:  # --deterministic changes process-wide switches; the next run starts from the defaults
            torch.use_deterministic_algorithms(switches[0], warn_only=switches[1])
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = switches[2:]

    def redirect(out: int, err: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out, 1)
        os.dup2(err, 2)

    threading.Thread(target=read_jobs, daemon=True).start()
    while True:
        job = jobs.get()
        with open(job["log"], "a") as log:
            redirect(log.fileno(), log.fileno())
            try:
                rc = run_one(job["cmd"])
            finally:
                redirect(*console)
        replies.write(json.dumps({"rc": rc}) + "\n")


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
        for label, cmd, why in failures:
            print(f"  {why}: {label}\n    {cmd}")
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:  # started by execute(), one per device slot
        serve()
    else:
        run_cli(main)
