"""Sweep SSD's alpha, or its selection fraction, over many forget requests with one importance pass each.

    python sweep_alpha.py --scenario full_class --dataset digits --alphas 1 2 5 10
    python sweep_alpha.py --scenario sub_class --dataset digits5 --orders paper shuffled --alphas 1 2 5 10
    python sweep_alpha.py --scenario full_class --classes three seven --fractions 0.0005 0.002 0.01

For each (checkpoint seed, forget class, batch order) the importances I_D and I_Df are computed once
(I_D through the importance cache), then every alpha dampens a fresh copy of the original model, which
is evaluated on the forget and retain parts of the test set. A selection fraction s stands for the
alpha that selects a share s of the parameter elements (the (1 - s) quantile of I_Df / I_D).

This is a research tool, so it looks at test accuracy, which the unlearning methods never do. Each
request's outcome (clean, collapse, untouched, partial) is metrics.outcome; for random forgetting Df is
compared with the original model's accuracy on the validation split, which is what a model that never
saw D_f scores.

Writes OUT/<dataset>_<scenario>.csv, OUT/<dataset>_<scenario>_<order>.png (Df and retain-test against
alpha, one line per class and seed, the cap |D|/|D_f| marked) and prints the counts per order and alpha.
"""
from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import datasets
import methods
import models
import runner
import ssd
from cli import ArgumentParser, HelpFormatter, add_shared_flags, run_cli
from common import UserError, file_sha256, resolve_device, seed_everything
from metrics import OUTCOMES, outcome
from training import accuracy, predict


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--scenario", default="full_class", choices=datasets.SCENARIOS, help="forget scenario")
    add_shared_flags(p, "net", "dataset", dataset=None, dataset_help="dataset (default: digits, or digits5 for sub_class)")
    p.add_argument("--classes", nargs="+", default=["all"],
                   help="forget classes by name or index, or 'all' (default: all; random forgetting ignores it)")
    p.add_argument("--forget-count", type=int, default=100, help="random forgetting: samples forgotten")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2],
                   help="seeds: each names its checkpoint (--model-seed) and the run's seed (default: 1 2)")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--alphas", type=float, nargs="+", default=None, help="alphas to try (default: 1 2 5 10)")
    choice.add_argument("--fractions", type=float, nargs="+", default=None,
                        help="selection fractions to try instead of alphas, each in (0, 1)")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="dampening constant")
    p.add_argument("--orders", nargs="+", default=["paper"], choices=datasets.IMPORTANCE_ORDERS,
                   help="importance batch orders to compare (default: paper)")
    p.add_argument("--variant", default="ssd", choices=["ssd", "lfssd", "ssd_per_sample"],
                   help="importance estimate")
    p.add_argument("--batch-size", type=int, default=None,
                   help="importance batch size (default: the task script's, 64 or 128 for random)")
    add_shared_flags(p, "checkpoint_dir", "data_dir")
    p.add_argument("--importance-cache", default="runs/importance_cache",
                   help="folder of cached I_D; '' turns the cache off")
    add_shared_flags(p, "device")
    p.add_argument("--out", default="runs/sweeps", help="folder for the CSV and the figures")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    args = p.parse_args(argv)
    args.dataset = args.dataset or runner.scenario_defaults(args.scenario)["dataset"]
    if args.fractions is None and args.alphas is None:
        args.alphas = [1.0, 2.0, 5.0, 10.0]
    for f in args.fractions or []:
        if not 0 < f < 1:
            raise UserError(f"--fractions must lie in (0, 1), got {f}")
    return args


def _accuracy(model: torch.nn.Module, ds, device: torch.device) -> float | None:
    return accuracy(*predict(model, ds, device))


def sweep_request(p: runner.Plan, order: str, args, device: torch.device) -> list[dict]:
    """Every alpha (or fraction) for one planned request; the importances are computed once."""
    seed_everything(p.config.seed)
    original = models.load_checkpoint(p.weights, p.meta).to(device).eval()
    splits, random_forgetting = p.splits, p.config.scenario == "random"
    df_set = splits.forget_train if random_forgetting else splits.forget_test

    def accuracies(model) -> tuple[float, float]:
        return _accuracy(model, df_set, device), _accuracy(model, splits.retain_test, device)

    original_df, original_retain = accuracies(original)
    reference = _accuracy(original, splits.retain_val, device) if random_forgetting else None
    if random_forgetting and reference is None:
        raise UserError("random forgetting compares Df with the original's validation accuracy, and the checkpoint "
                        "has no validation split (pretrain it with --val-fraction above 0)")
    ctx = runner.run_context(p, device)
    t0 = time.perf_counter()
    imp_full, imp_forget, info = methods.ssd_importances(copy.deepcopy(original), splits, order, ctx, args.variant)
    importance_s = time.perf_counter() - t0
    settings = [("fraction", f) for f in args.fractions] if args.fractions else [("alpha", a) for a in args.alphas]
    rows = []
    for kind, value in settings:
        alpha = ssd.alpha_for_fraction(imp_full, imp_forget, value) if kind == "fraction" else value
        model = copy.deepcopy(original)
        report = ssd.dampen(model, imp_full, imp_forget, alpha, args.lam)
        df, retain = accuracies(model)
        rows.append({"dataset": p.config.dataset, "scenario": p.config.scenario, "order": info["importance_order"],
                     "seed": p.config.seed, "checkpoint_sha256": p.meta.get("sha256"),
                     "forget_class": p.record_config["forget_class"] or "random",
                     kind: value, "alpha": alpha, "lambda": args.lam, "df": df, "retain_test": retain,
                     "original_df": original_df, "original_retain_test": original_retain, "reference_df": reference,
                     "dampened_fraction": report.total / report.num_elements, "max_ratio": report.max_ratio,
                     "ratio_cap": info["ratio_cap"], "importance_s": importance_s, "cache_hit": info["cache_hit"],
                     "outcome": outcome(df, retain, original_retain, original_df, reference)})
    return rows


def plan_requests(args) -> list[tuple[runner.Plan, str]]:
    """(plan, importance order) of every request."""
    plans, cache = [], runner.Cache()
    for seed in args.seeds:
        for order in args.orders:
            # the sweep dampens with its own alphas: the config's (inf, which selects nothing) is never used
            hp = methods.REGISTRY[args.variant].params(alpha=float("inf"), lam=args.lam)
            if hasattr(hp, "importance_order"):
                hp.importance_order = order
            base = runner.RunConfig(args.scenario, method=args.variant, hp=hp, net=args.net, dataset=args.dataset,
                                    seed=seed, batch_size=args.batch_size, checkpoint_dir=args.checkpoint_dir,
                                    data_dir=args.data_dir, importance_cache=args.importance_cache, device=args.device)
            if args.scenario == "random":
                plans.append((runner.plan(replace(base, forget_count=args.forget_count), cache), order))
                continue
            first = runner.plan(replace(base, forget_class="0"), cache)
            names = first.data.fine_classes if args.scenario == "sub_class" else first.data.classes
            classes = names if args.classes == ["all"] else args.classes
            plans += [(runner.plan(replace(base, forget_class=c), cache), order) for c in classes]
    return plans


def summarise(rows: list[dict], kind: str) -> list[dict]:
    """Per (order, alpha or fraction): the outcome counts and medians over requests."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["order"], r[kind])].append(r)
    out = []
    for (order, value), rs in sorted(groups.items()):
        counts = {o: sum(r["outcome"] == o for r in rs) for o in OUTCOMES}
        out.append({"order": order, kind: value, "requests": len(rs), **counts,
                    "median_dampened_pct": 100 * statistics.median(r["dampened_fraction"] for r in rs),
                    "median_max_ratio": statistics.median(r["max_ratio"] for r in rs),
                    "median_cap": statistics.median(r["ratio_cap"] for r in rs)})
    return out


def print_summary(summary: list[dict], kind: str) -> None:
    print(f"| Order | {kind} | Requests | Clean | Collapse | Untouched | Partial | Median dampened (%) | "
          "Median largest I_Df/I_D | Median cap |D|/|D_f| |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in summary:
        print(f"| {s['order']} | {s[kind]:g} | {s['requests']} | {s['clean']} | {s['collapse']} | {s['untouched']} | "
              f"{s['partial']} | {s['median_dampened_pct']:.3f} | {s['median_max_ratio']:.3g} | {s['median_cap']:.3g} |")


def plot(rows: list[dict], kind: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    classes = sorted({r["forget_class"] for r in rows})
    colors = plt.cm.tab10(np.linspace(0, 1, max(len(classes), 1)))
    styles = ["-", "--", ":", "-."]
    for (cls, seed), rs in sorted(_by(rows, ("forget_class", "seed")).items()):
        rs = sorted(rs, key=lambda r: r[kind])
        style = dict(color=colors[classes.index(cls)], ls=styles[sorted({r["seed"] for r in rows}).index(seed) % 4])
        for ax, col in zip(axes, ("df", "retain_test")):
            ax.plot([r[kind] for r in rs], [r[col] for r in rs], marker="o", ms=3,
                    label=f"{cls} s{seed}" if col == "df" else None, **style)
    for ax, title in zip(axes, ("Df accuracy (%)", "retain-test accuracy (%)")):
        ax.set_xscale("log")
        ax.set(xlabel=kind, title=title, ylim=(-3, 103))
        if kind == "alpha":
            ax.axvline(statistics.median(r["ratio_cap"] for r in rows), color="k", lw=1, ls=":",
                       label="cap |D|/|D_f| (median)" if ax is axes[1] else None)
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"{r0['dataset']} {r0['scenario']}, importance order {r0['order']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _by(rows: list[dict], fields: tuple) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r[f] for f in fields)].append(r)
    return groups


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    plans = plan_requests(args)
    kind = "fraction" if args.fractions else "alpha"
    print(f"{len(plans)} requests x {len(args.fractions or args.alphas)} {kind}s; checkpoints:")
    for weights in sorted({p.weights for p, _ in plans}):
        print(f"  {weights}  sha256 {file_sha256(weights)}")
    rows, t0 = [], time.time()
    for i, (p, order) in enumerate(plans, 1):
        got = sweep_request(p, order, args, device)
        rows += got
        print(f"[{i}/{len(plans)}] seed {p.config.seed} {got[0]['order']} {got[0]['forget_class']}: " + ", ".join(
            f"{r[kind]:g}: Df {r['df']:.0f} Dr {r['retain_test']:.0f} ({r['outcome']})" for r in got), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.dataset}_{args.scenario}"
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    if not args.no_figures:
        for (order,), rs in _by(rows, ("order",)).items():
            plot(rs, kind, out / f"{stem}_{order}.png")
    print(f"\n{args.dataset} {args.scenario}, {len(plans)} requests, lambda {args.lam}, {time.time() - t0:.0f}s; "
          f"wrote {out / stem}.csv")
    print_summary(summarise(rows, kind), kind)
    return 0


if __name__ == "__main__":
    run_cli(main)
