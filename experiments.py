"""The experiment driver behind MAIN_run_experiments.sh: grid, pretraining, resume, fan-out, summary.

    python experiments.py cpu                          # the quick suite on the embedded digit pairs
    python experiments.py 0 --table cifar100_full_resnet
    python experiments.py 0,1,2,3                      # the paper grid over four GPUs
    python experiments.py --slurm --slurm-partition gpu --table cifar20_sub_vit   # SLURM job arrays
    python experiments.py --print-commands --table cifar20_sub_vit   # one shell command per run

The grid is a list of runner.RunConfig values. On this machine each device slot gets one persistent
worker process (worker.py); with --slurm the runs go to SLURM job arrays through submitit
(cluster.py). Missing checkpoints are pretrained first. Runs already recorded are skipped (by their
key, a hash of the config that defines them), and a run that another driver on this machine is
executing is skipped too (an OS file lock per key), so restarted or concurrent drivers never repeat
a cell.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import cli
import cluster
import datasets
import methods
import models
import results
import runner
import worker
from common import UserError, check_output_dir

HERE = Path(__file__).resolve().parent

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
# What fits the quick suite's 10 minutes on two CPU cores, pretraining included: retrain (the
# reference) alone takes a third of it. The other methods stay available (--methods all; the README
# gives each one's time); lfssd is in the verdict suite.
QUICK_METHODS = ["baseline", "retrain", "ssd", "assd", "ssd_search"]
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
# The privacy suite (privacy.py): N = 16 originals per request, and three retrains per original and
# request, so each training must be cheap. These originals train on the pairs' native 16x16 pixels
# (the other pair tables upsample to 32x32, about three times the compute), in their own checkpoint
# folder, since a checkpoint is found by (net, dataset, seed) alone. The requests are the first two
# of the verdict's fixed list.
PRIVACY_TABLES = {
    "pairs100_full_resnet": replace(QUICK_TABLES["pairs100_full_resnet"], classes=VERDICT_CLASSES[:2],
                                    pretrain_flags=[*QUICK_PRETRAIN, "--image-size", "16"]),
}
PRIVACY_RESULTS = "runs/privacy.jsonl"
PRIVACY_CHECKPOINTS = "runs/privacy/pretrain"


@dataclass
class Run:
    table: str
    config: runner.RunConfig  # the device is left to the slot or the cluster
    label: str
    key: str | None = None  # set by todo() when the run can be planned


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("devices", nargs="?", default=env("DEVICES", "cpu"),
                   help="'cpu' (default), one GPU id, or a comma list ('0,1,2,3'; 'cpu,cpu' runs two CPU slots); "
                        "one run at a time per entry")
    p.add_argument("--suite", choices=["quick", "verdict", "digits", "paper", "privacy"], default=env("SUITE"),
                   help=f"quick: the four digit-pair tables, one forget request each, {' '.join(QUICK_METHODS)}; "
                        f"verdict: pairs100 full class, pairs20 sub-class and pairs10 random, 10 requests each, "
                        f"{' '.join(VERDICT_METHODS)}, into {VERDICT_RESULTS} unless --results is given; digits: "
                        "the small-cap digits tables, every method; paper: every paper table; privacy: many-model "
                        "privacy statistics, run by privacy.py (./MAIN_run_experiments.sh --suite privacy starts "
                        "it; see privacy.py --help) (default: quick on cpu, paper on GPUs; env SUITE)")
    p.add_argument("--table", action="append", default=env("TABLE", "").split() or None,
                   help=f"run only these tables (repeatable; env TABLE): {', '.join(TABLES)}")
    p.add_argument("--seeds", default=env("SEEDS"), help="seeds, e.g. '1 2 3' (default: 1..5; the embedded tables: 1 2; env SEEDS)")
    p.add_argument("--methods", default=env("METHODS"), help=f"methods, or 'all' ({' '.join(ALL_METHODS)}) (default: the suite's; all for --table; env METHODS)")
    p.add_argument("--classes", default=env("CLASSES"), help="forget classes, overriding each table's (env CLASSES)")
    shared = {name: cli.SHARED_FLAGS[name][1]["default"] for name in ("results", "checkpoint_dir", "data_dir")}
    cli.add_shared_flags(p, "results", "checkpoint_dir", "data_dir", results=env("RESULTS"),
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
                   help="a new worker process per run instead of one per device slot: slower to start each run "
                        "(imports, wandb), but nothing at all is shared between runs")
    p.add_argument("--extra", default=env("EXTRA", ""), help="extra flags for every forget run, e.g. '--wandb disabled'")
    cluster.add_flags(p)
    args = p.parse_args(argv)
    known = known_tables(args.suite)
    unknown = [t for t in args.table or [] if t not in known]
    if unknown:
        raise UserError(f"unknown table {', '.join(unknown)} (choose from {', '.join(known)})")
    args.slots = [d.strip() for d in args.devices.split(",") if d.strip()]
    bad = [s for s in args.slots if s != "cpu" and not s.isdigit()] or ([] if args.slots else ["(none)"])
    if bad:
        raise UserError(f"devices {args.devices!r}: {', '.join(bad)} is neither 'cpu' nor a GPU id "
                        f"(pass cpu, a GPU id such as 0, or a comma list such as 0,1)")
    on_cpu = all(s == "cpu" for s in args.slots)
    args.suite = args.suite or ("quick" if on_cpu else "paper")
    args.results = args.results or (VERDICT_RESULTS if args.suite == "verdict" else shared["results"])
    quick = args.table is None and args.suite in ("quick", "verdict", "digits", "privacy") or args.table and all(
        t in EMBEDDED_TABLES for t in args.table)
    seeds = (args.seeds or ("1 2" if quick else "1 2 3 4 5")).replace(",", " ").split()
    if not seeds or not all(s.isdigit() for s in seeds):
        raise UserError(f"--seeds {args.seeds!r} is not a list of non-negative integers (pass e.g. --seeds '1 2 3')")
    args.seeds = [int(s) for s in seeds]
    default_methods = {"verdict": VERDICT_METHODS, "quick": QUICK_METHODS}.get(args.suite, ALL_METHODS) \
        if not args.table else ALL_METHODS
    args.methods = (args.methods or " ".join(default_methods)).replace(",", " ").split()
    args.methods = ALL_METHODS if args.methods == ["all"] else args.methods
    unknown = [m for m in args.methods if m not in ALL_METHODS] or ([] if args.methods else ["(none)"])
    if unknown:
        raise UserError(f"unknown method {', '.join(unknown)} (choose from {', '.join(ALL_METHODS)})")
    try:
        args.extra = shlex.split(args.extra)
    except ValueError as e:
        raise UserError(f"--extra {args.extra!r} cannot be split into flags: {e} (balance its quotes)") from None
    cluster.extra_parameters(args.slurm_extra)
    if not args.print_commands:  # every run writes here; a bad path must fail now, not after the first run
        results.check_writable(args.results, separate=args.slurm)
        check_output_dir(args.logs, "--logs")
        check_output_dir(args.checkpoint_dir, "--checkpoint-dir")
        if not args.slurm:
            check_gpus(args.slots)
    return args


def check_gpus(slots: list[str]) -> None:
    """Every GPU id among the device slots exists on this machine."""
    ids = [int(s) for s in slots if s != "cpu"]
    if not ids:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [i for i in ids if i >= count]
    if missing:
        fix = f"pass GPU ids 0 to {count - 1}, or cpu" if count else "pass cpu"
        raise UserError(f"GPU {missing[0]} does not exist: this machine has {count} GPU(s) ({fix})")


def known_tables(suite: str | None) -> dict[str, Table]:
    """The tables --table can name: the privacy suite's own versions take their names' place there."""
    return {**TABLES, **PRIVACY_TABLES} if suite == "privacy" else TABLES


def select_tables(args) -> dict[str, Table]:
    if args.table:
        return {t: known_tables(args.suite)[t] for t in args.table}
    return {"quick": QUICK_TABLES, "verdict": VERDICT_TABLES, "digits": DIGITS_TABLES,
            "privacy": PRIVACY_TABLES}.get(args.suite) or _paper_tables()


def class_names(scenario: str, dataset: str, data_dir: str) -> list[str] | None:
    """The names a forget class is chosen from (the targets for full class, the fine labels for
    sub-class), known before any data is loaded, so a typo fails before any run. None where they are
    not known yet (a face folder not in place: the run will say so)."""
    if dataset == "faces":  # identities are the sub-folder names, sorted as torchvision's ImageFolder sorts them
        folder = Path(data_dir) / "faces"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else None
    names = datasets.CLASS_NAMES.get(dataset)
    return None if names is None else names[1 if scenario == "sub_class" else 0]


def expand(args, tables: dict[str, Table]) -> list[Run]:
    """The grid's runs. Every forget class and every extra flag is checked here, before any run."""
    runs = []
    for name, t in tables.items():
        classes = args.classes.replace(",", " ").split() if args.classes and t.scenario != "random" else t.classes
        names = class_names(t.scenario, t.dataset, args.data_dir)
        for cls in classes if names is not None and t.scenario != "random" else []:
            try:
                datasets.resolve_class(cls, names, "sub-class" if t.scenario == "sub_class" else "class")
            except UserError as e:
                raise UserError(f"table {name} ({t.dataset}): {e}") from None
        # the table's flags and --extra, as the task script would parse them; they win over the grid's
        given = vars(cli.forget_parser(t.scenario, None).parse_args([*t.forget_flags, *args.extra]))
        overrides = {k: v for k, v in given.items() if k in {f.name for f in fields(runner.RunConfig)}}
        for axis, flag in (("method", "--methods"), ("seed", "--seeds"), ("forget_class", "--classes")):
            if axis in overrides:
                raise UserError(f"--extra sets {axis}, which the grid sets for each run (use {flag})")
        for seed in args.seeds:
            # (forget class, split seed) per request: a class, or a random split of this original
            requests = [(None, s) for s in t.split_seeds] if t.split_seeds else [(c, None) for c in classes]
            for cls, split_seed in requests:
                for method in args.methods:
                    seeds = {"seed": seed} if split_seed is None else {"seed": split_seed, "model_seed": seed}
                    values = {"method": method, "net": t.net, "dataset": t.dataset, "forget_class": cls, **seeds,
                              "results": args.results, "checkpoint_dir": args.checkpoint_dir,
                              "data_dir": args.data_dir, "separate_records": args.slurm, **overrides}
                    params = methods.REGISTRY[method].params
                    own = {k: v for k, v in given.items() if k in {f.name for f in fields(params)}}
                    config = runner.RunConfig(t.scenario, hp=params(**own) if own else None, **values)
                    request = cls or (f"split{split_seed}" if split_seed is not None else "")
                    label = f"{name} {method} {request} seed{seed}".replace("  ", " ")
                    runs.append(Run(name, config, label))
        for method in args.methods:  # a bad --extra value fails here, once, and not in every run
            try:  # (the device is the slot's or the cluster's)
                replace(next(r for r in runs if r.table == name and r.config.method == method).config,
                        device="cpu").resolve()
            except UserError as e:
                raise UserError(f"table {name}, {method}: {e}") from None
    return runs


def pretrain_commands(args, tables: dict[str, Table]) -> dict[str, list[str]]:
    """label -> pretraining command, one per (net, dataset, seed) whose checkpoint is missing. An
    existing checkpoint of another image size than the table names is an error (check_recipe)."""
    cmds = {}
    for name, t in tables.items():
        for seed in args.seeds:
            label = f"pretrain {t.net} {t.dataset} seed{seed}"
            if label in cmds:
                continue
            if has_checkpoint(args.checkpoint_dir, t.net, t.dataset, seed):
                check_recipe(name, t, models.find_checkpoint(args.checkpoint_dir, t.net, t.dataset, seed))
                continue
            cmds[label] = ["pretrain_model.py", "--net", t.net, "--dataset", t.dataset, "--seed", str(seed),
                           "--checkpoint-dir", args.checkpoint_dir, "--data-dir", args.data_dir, *t.pretrain_flags]
    return cmds


def check_recipe(name: str, table: Table, weights: Path) -> None:
    """A table that names its pretraining image size (the privacy suite's 16x16 originals) gets a
    checkpoint of that size, not one that merely shares its (net, dataset, seed)."""
    flags = table.pretrain_flags
    if "--image-size" not in flags:
        return
    want = flags[flags.index("--image-size") + 1]
    have = models.load_meta(weights).get("model_spec", {}).get("image_size")
    if str(have) != want:
        raise UserError(f"checkpoint {weights} was trained at image size {have}, but table {name} pretrains at "
                        f"{want} (give this table a --checkpoint-dir of its own)")


def has_checkpoint(checkpoint_dir: str, net: str, dataset: str, seed: int) -> bool:
    try:
        models.find_checkpoint(checkpoint_dir, net, dataset, seed)
        return True
    except UserError:
        return False


def without_checkpoint(runs: list[Run]) -> list[Run]:
    """The runs whose checkpoint is missing (after pretraining: its pretraining failed)."""
    found, missing = {}, []
    for r in runs:
        c = r.config
        where = (c.checkpoint_dir, c.net, c.dataset, c.seed if c.model_seed is None else c.model_seed)
        if where not in found:
            found[where] = has_checkpoint(*where)
        if not c.weights and not found[where]:
            missing.append(r)
    return missing


def todo(args, runs: list[Run]) -> list[Run]:
    """The runs whose key is not recorded yet, each with its key; runs that cannot be planned are kept
    (the run itself will then report the problem)."""
    done, cache, left = results.done_keys(args.results, runner.record_key), runner.Cache(), []
    for r in runs:
        try:
            r.key = runner.plan(replace(r.config, device="cpu"), cache).key
        except UserError:
            r.key = None
        if r.key not in done:
            left.append(r)
    return left


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.suite == "privacy":
        raise UserError("the privacy suite runs through privacy.py (run ./MAIN_run_experiments.sh --suite privacy, "
                        "or python privacy.py)")
    tables = select_tables(args)
    runs = expand(args, tables)
    pretrain = pretrain_commands(args, tables)
    if args.print_commands:
        for cmd in pretrain.values():
            print("# pretrain first: python " + shlex.join(cmd), file=sys.stderr)
        for r in runs:
            print(f"python {shlex.join([runner.SCRIPTS[r.config.scenario], *r.config.to_argv()])}")
        return 0
    where = "SLURM" if args.slurm else f"devices {args.slots}"
    print(f"suite {args.suite}: {len(tables)} tables, {len(runs)} runs, seeds {args.seeds}, {where}")
    if args.suite == "quick":
        print("note: the quick suite uses the paper's alpha and lambda; --extra '--alpha X' overrides them")
    t0 = time.time()
    failures = cluster.pretrain(args, pretrain) if args.slurm else worker.run_local(args, list(pretrain.items()))
    missing = {id(r): r for r in without_checkpoint(runs)}
    failures += [(r.label, "", "no checkpoint: its pretraining failed") for r in missing.values()]
    runnable = [r for r in runs if id(r) not in missing]
    left = todo(args, runnable)
    print(f"{len(runnable) - len(left)} runs already done, {len(left)} to run")
    failures += cluster.forget(args, left) if args.slurm else worker.run_local(args, [(r.label, r.config) for r in left])
    if not args.no_tables and (HERE / "make_tables.py").exists() and results.read(args.results):
        subprocess.run([sys.executable, "make_tables.py", "--results", args.results, "--only",
                        *sorted(tables)], cwd=HERE)
    print(f"finished in {time.time() - t0:.0f}s")
    if failures:
        print(f"{len(failures)} runs failed:")
        for label, detail, why in failures:
            print(f"  {why}: {label}" + (f"\n    {detail}" if detail else ""))
        return 1
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
