"""Many-model privacy of one forget request: the NeurIPS 2023 unlearning competition's forgetting
quality F and score, U-LiRA, and the per-run loss AUC, over N originals and N retrains.

    ./MAIN_run_experiments.sh --suite privacy        # the privacy suite: this script with its defaults
    python privacy.py --first-seed 17                 # the same requests on originals 17..32
    python privacy.py 0 --table cifar100_full_resnet --classes rocket --n-models 16   # on GPU 0
    python privacy.py --table pairs10_random_resnet --forget-seeds "1 2" --n-models 16

A forget request is a table and a forget class (--classes), or, for a random table, a forget seed f
(--forget-seeds; request "seed f"): f draws which samples are forgotten, as many as the table's
--forget-count, and every run of the request draws with f whatever its run seed, so all N models
forget the same samples (in experiments.py the run seed draws them, so each original forgets others).
For each request and N = --n-models, with seeds s = F..F+N-1 (F = --first-seed):
- originals: pretraining seed s, shared by every request and method;
- each method unlearns each original once (run seed s): SSD is deterministic given its original, so
  N unlearned models need N originals;
- reference retrains: `retrain` with run seed s, shared by every method of the request;
- the method `retrain` runs with seeds s + 10,000, and the ceiling retrains with s + 20,000, so that
  neither is compared with itself. The ceiling is F of those retrains against the reference ones at
  the same N: what a perfect unlearner scores here (well below 1 at small N). F / ceiling is the
  number to read first; U-LiRA's AUC (0.5: the attack cannot tell the method's models from retrained
  ones) second, beside the AUC of those retrains against the reference (ulira_auc_ceiling): phi
  varies mostly from model to model, so at N = 16 a perfect unlearner's AUC scatters around 0.5 by
  about 0.1, and a value below 0.5 means only that the attack found nothing.
The privacy suite (the defaults) is pairs100 full class, forget classes 07 and 18 (the first two of
the verdict's fixed list), N = 16, on originals trained at the pairs' native 16x16 in their own
checkpoint folder, with two CPU runs side by side ('cpu,cpu', one thread each) where there are two
cores or more. The verdict table of its runs, with the privacy columns, is rendered at the end.
Runs already in --results are reused (same keys, same resume rules); missing checkpoints and runs
go through the driver's workers (experiments.py). The statistics come from the per-example side
files the runs wrote (results.examples_path), so nothing is re-run to compute them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import experiments
import privacy_stats
import results
import runner
import worker
from cli import SHARED_FLAGS, ArgumentParser, run_cli
from common import UserError, atomic_write_json

PRIVACY_METHODS = ["baseline", "retrain", "ssd", "assd", "ssd_search", "finetune", "amnesiac"]
METHOD_RETRAIN_OFFSET = 10_000  # the method `retrain`: other seeds than the reference retrains
CEILING_OFFSET = 20_000  # the retrains that measure the ceiling


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("devices", nargs="?", default="cpu,cpu" if (os.cpu_count() or 1) > 1 else "cpu",
                   help="'cpu', a GPU id, or a comma list, as experiments.py ('cpu,cpu': two CPU runs side by side, "
                        "one thread each: about 1.4x the throughput of one run on two cores for these small "
                        "models) (default: %(default)s)")
    p.add_argument("--suite", choices=["privacy"], default="privacy",
                   help="accepted so that ./MAIN_run_experiments.sh --suite privacy can pass its flags on")
    p.add_argument("--table", default="pairs100_full_resnet",
                   help="a table of experiments.py; the embedded pairs100_full_resnet is the privacy suite's "
                        "(16x16 originals, requests 07 and 18) (default: %(default)s)")
    p.add_argument("--classes", default=None,
                   help="class tables: forget classes, one request each (default: the table's)")
    p.add_argument("--forget-seeds", default=None,
                   help="random tables: forget seeds, one request each; each draws the samples that every run of "
                        "its request forgets (default: 1)")
    p.add_argument("--methods", default=" ".join(PRIVACY_METHODS), help="methods (default: %(default)s)")
    p.add_argument("--n-models", type=int, default=16, help="N: originals, reference retrains and unlearned models "
                                                             "per method (default: %(default)s)")
    p.add_argument("--first-seed", type=int, default=1, help="seeds are first..first+N-1 (default: %(default)s)")
    p.add_argument("--results", default=experiments.PRIVACY_RESULTS, help="results file (default: %(default)s)")
    p.add_argument("--checkpoint-dir", default=None,
                   help=f"checkpoint folder (default: {experiments.PRIVACY_CHECKPOINTS} for the privacy suite's own "
                        f"tables, else runs/pretrain)")
    p.add_argument("--data-dir", default="data", help="dataset root (default: %(default)s)")
    p.add_argument("--logs", default="runs/logs", help="one log file per run (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the numbers as JSON to FILE (default: runs/privacy-seeds<first>-<last>.json)")
    p.add_argument("--no-tables", action="store_true",
                   help="do not render the verdict table with the privacy columns (make_tables.py --privacy)")
    args = p.parse_args(argv)
    if args.n_models < 3:
        raise UserError(f"--n-models {args.n_models} is too few: the competition's score needs at least 3 models "
                        f"per side (pass --n-models 3 or more; 16 is the default)")
    if args.first_seed < 0:
        raise UserError(f"--first-seed {args.first_seed} is negative (pass 0 or more)")
    known = experiments.known_tables("privacy")
    table = known.get(args.table)
    if table is None:
        raise UserError(f"unknown table {args.table} (choose from {', '.join(known)})")
    own = args.table in experiments.PRIVACY_TABLES
    shared_default = SHARED_FLAGS["checkpoint_dir"][1]["default"]
    args.checkpoint_dir = args.checkpoint_dir or (experiments.PRIVACY_CHECKPOINTS if own else shared_default)
    last = args.first_seed + args.n_models - 1
    args.out = args.out or f"runs/privacy-seeds{args.first_seed}-{last}.json"
    args.forget_seeds = forget_seeds(args, table)
    return args


def forget_seeds(args: argparse.Namespace, table: experiments.Table) -> list[int] | None:
    """The forget seeds of a random table (one request each), None for a class table."""
    if table.scenario != "random":
        if args.forget_seeds is not None:
            raise UserError(f"--forget-seeds is for random tables, and {args.table} is {table.scenario} (pass "
                            f"--classes, or a _random_ table)")
        return None
    if args.classes is not None:
        raise UserError(f"--classes is for class tables, and {args.table} forgets random samples (pass "
                        f"--forget-seeds, or a _full_ or _sub_ table)")
    seeds = ("1" if args.forget_seeds is None else args.forget_seeds).replace(",", " ").split()
    if not seeds or not all(s.isdigit() for s in seeds):
        raise UserError(f"--forget-seeds {args.forget_seeds!r} is not a list of non-negative integers (pass e.g. "
                        f"--forget-seeds '1 2')")
    return list(dict.fromkeys(int(s) for s in seeds))


def plan_runs(args) -> tuple[argparse.Namespace, dict, list[tuple[str, str, int, experiments.Run]]]:
    """The driver's arguments, the table, and every run as (request, role, seed, Run); request is the
    forget class, or "seed f" for forget seed f; role is the method's name, "reference" or "ceiling"."""
    seeds = list(range(args.first_seed, args.first_seed + args.n_models))
    asked = args.methods.replace(",", " ").split()
    methods = [m for m in asked if m != "retrain"]
    driver = experiments.parse_args([args.devices, "--suite", "privacy", "--table", args.table,
                                     "--seeds", " ".join(map(str, seeds)),
                                     "--methods", " ".join(["retrain", *methods]), "--results", args.results,
                                     "--checkpoint-dir", args.checkpoint_dir, "--data-dir", args.data_dir,
                                     "--logs", args.logs, "--no-tables",
                                     *(["--classes", args.classes] if args.classes else [])])
    tables = experiments.select_tables(driver)
    if args.forget_seeds is not None:  # the originals' own seeds as run seeds, not a table's split seeds
        tables = {name: replace(t, split_seeds=None) for name, t in tables.items()}
    runs = experiments.expand(driver, tables)
    if args.forget_seeds is not None:  # every run of a request, whatever its seed, forgets the same samples
        runs = [experiments.Run(r.table, replace(r.config, forget_seed=f), f"{r.label} forget-seed {f}")
                for f in args.forget_seeds for r in runs]
    planned = []
    for run in runs:
        c, s = run.config, run.config.seed
        request = c.forget_class if c.forget_seed is None else f"seed {c.forget_seed}"
        if c.method != "retrain":
            planned.append((request, c.method, s, run))
            continue
        planned.append((request, "reference", s, run))
        for role, offset in (("retrain", METHOD_RETRAIN_OFFSET), ("ceiling", CEILING_OFFSET)):
            if role == "retrain" and "retrain" not in asked:
                continue
            config = replace(c, seed=s + offset, model_seed=s)
            planned.append((request, role, s, experiments.Run(run.table, config,
                                                              f"{run.label} ({role}, seed {s + offset})")))
    return driver, tables, planned


def stack(records: list[dict], path: str) -> tuple:
    """phi of every forget example for each record's model, as an (N, n) list of rows, plus the
    models' retain-test and test accuracies and loss AUCs."""
    rows, order = [], None
    for r in records:
        ex = results.load_examples(path, r["key"])
        if ex is None:
            raise UserError(f"run {r['key']} has no per-example file beside {path} (it was recorded before "
                            f"they existed: rerun it with --force)")
        if order is None:
            order = ex["forget_idx"]
        elif not (ex["forget_idx"] == order).all():
            raise UserError("the forget sets of the N models differ (the request must name the same samples)")
        rows.append(ex["phi_forget"])
    metric = lambda name: [r["metrics"][name] for r in records]  # noqa: E731
    return rows, metric("retain_test_acc"), metric("test_acc"), metric("loss_auc")


def request_stats(by_role: dict[str, list[dict]], path: str) -> dict:
    """Per method: F, its ceiling and their ratio, the final score, U-LiRA and the loss AUC."""
    import numpy as np

    ref_phi, ref_retain, ref_test, ref_loss = stack(by_role["reference"], path)
    ref_phi = np.array(ref_phi)
    ceiling_phi = np.array(stack(by_role["ceiling"], path)[0])
    ceiling = privacy_stats.ceiling(ceiling_phi, ref_phi)
    ulira_ceiling = privacy_stats.ulira(ceiling_phi, ref_phi)["auc"]  # a perfect unlearner's AUC here
    out = {}
    for role, records in by_role.items():
        if role in ("reference", "ceiling"):
            continue
        phi, retain, test, losses = stack(records, path)
        f, _ = privacy_stats.forgetting_quality(np.array(phi), ref_phi)
        attack = privacy_stats.ulira(np.array(phi), ref_phi)
        known = [v for v in losses if v is not None]
        out[role] = {"forgetting_quality": f, "ceiling": ceiling, "f_over_ceiling": f / ceiling if ceiling else None,
                     "final_score": privacy_stats.final_score(f, retain, ref_retain, test, ref_test),
                     "ulira_auc": attack["auc"], "ulira_balanced_accuracy": attack["balanced_accuracy"],
                     "ulira_tpr_at_1pct_fpr": attack["tpr_at_1pct_fpr"], "ulira_auc_ceiling": ulira_ceiling,
                     "loss_auc_mean": statistics.fmean(known) if known else None,
                     "loss_auc_sd": statistics.stdev(known) if len(known) > 1 else None,
                     "retain_test_acc_mean": statistics.fmean(retain), "test_acc_mean": statistics.fmean(test)}
    known = [v for v in ref_loss if v is not None]
    out["reference retrain"] = {"loss_auc_mean": statistics.fmean(known) if known else None,
                                "loss_auc_sd": statistics.stdev(known) if len(known) > 1 else None,
                                "retain_test_acc_mean": statistics.fmean(ref_retain),
                                "test_acc_mean": statistics.fmean(ref_test)}
    return out


def show(request: dict) -> str:
    f = lambda v, spec=".3f": "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [f"### {request['table']}, forget {request['forget']}, N = {request['n_models']} "
             f"(seeds {request['seeds'][0]}..{request['seeds'][-1]})", "",
             "| Method | F | F / ceiling | Final score | U-LiRA AUC | U-LiRA bal. acc. | TPR @ 1% FPR | loss AUC "
             "(mean ± sd) | Retain-test | Test |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in request["methods"].items():
        loss = f"{f(m['loss_auc_mean'])} ± {f(m['loss_auc_sd'])}"
        lines.append(f"| {name} | {f(m.get('forgetting_quality'))} | {f(m.get('f_over_ceiling'), '.2f')} | "
                     f"{f(m.get('final_score'))} | {f(m.get('ulira_auc'))} | {f(m.get('ulira_balanced_accuracy'))} | "
                     f"{f(m.get('ulira_tpr_at_1pct_fpr'))} | {loss} | {f(m['retain_test_acc_mean'], '.2f')} | "
                     f"{f(m['test_acc_mean'], '.2f')} |")
    ceiling = next((m for m in request["methods"].values() if "ceiling" in m), {})
    lines += ["", f"- ceiling: {request['n_models']} retrains (seeds + {CEILING_OFFSET:,}) against the "
                  f"{request['n_models']} reference retrains: F {f(ceiling.get('ceiling'))}, U-LiRA AUC "
                  f"{f(ceiling.get('ulira_auc_ceiling'))} (what a perfect unlearner reads here); the method "
                  f"`retrain` uses seeds + {METHOD_RETRAIN_OFFSET:,}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    driver, tables, planned = plan_runs(args)
    failures = worker.run_local(driver, list(experiments.pretrain_commands(driver, tables).items()))
    runs = [run for *_, run in planned]
    left = experiments.todo(driver, runs)  # sets every run's key
    print(f"privacy: {len(runs)} runs, {len(runs) - len(left)} already done, {len(left)} to run")
    failures += worker.run_local(driver, [(r.label, r.config) for r in left])
    if failures:
        for label, _, why in failures:
            print(f"FAILED ({why}): {label}")
        raise UserError(f"{len(failures)} runs failed; the statistics need all of them (see {args.logs}, then rerun "
                        f"the same command: finished runs are kept)")
    recorded = {r["key"]: r for r in results.read(args.results)}
    requests = []
    for forget in dict.fromkeys(request for request, *_ in planned):
        by_role: dict[str, list[dict]] = {}
        for request, role, _, run in planned:
            if request == forget:
                by_role.setdefault(role, []).append(recorded[run.key])
        seeds = sorted({s for request, _, s, _ in planned if request == forget})
        table = next(iter(tables.values()))
        requests.append({"table": args.table, "forget": forget, "n_models": args.n_models, "seeds": seeds,
                         "scenario": table.scenario, "net": table.net, "dataset": table.dataset,
                         "methods": request_stats(by_role, args.results)})
        print("\n" + show(requests[-1]))
    elapsed = time.time() - t0
    print(f"\nprivacy finished in {elapsed:.0f}s")
    atomic_write_json(args.out, {"requests": requests, "seconds": elapsed})
    print(f"wrote {args.out}")
    if not args.no_tables:
        subprocess.run([sys.executable, "make_tables.py", "--results", args.results, "--privacy", args.out,
                        "--out", str(Path(args.out).with_suffix("")) + "-tables", "--no-figures"],
                       cwd=Path(__file__).resolve().parent)
    return 0


if __name__ == "__main__":
    run_cli(main)
