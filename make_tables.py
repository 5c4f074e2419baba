"""The paper's tables and figures from the results file (or a wandb project).

    python make_tables.py                                  # every table in runs/results.jsonl
    python make_tables.py --only digits_full_resnet --latex
    python make_tables.py --per-class --out runs/tables_per_class
    python make_tables.py --wandb-project me/ssd-unlearning

First, per table, the verdict against retrain: one row per method over every (forget class, seed) cell
that also has retrain and baseline runs, with the mean |Df - Df(retrain)| and |MIA - MIA(retrain)|, the
mean retain-test drop from the original, the counts of clean, collapsed, untouched and partial requests
(metrics.outcome) and the mean method time; with --privacy (privacy.py's JSON), also F / ceiling and
U-LiRA AUC. Then one table per (dataset, scenario, net), named like
experiments.py's TABLES (cifar20_sub_vit). Rows are
methods; columns are Df accuracy, retain-test accuracy (Dr), MIA and method time, each the mean ± sample
std (ddof=1) over seeds, and over forget classes unless --per-class. A run recorded twice counts once.
Writes OUT/tables.md, OUT/tables.csv, OUT/tables.tex (--latex), OUT/<table>_acc.png and OUT/<table>_time.png.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import results
from cli import ArgumentParser, run_cli
from common import UserError, check_output_dir, non_negative_float

SHORT_SCENARIO = {"full_class": "full", "sub_class": "sub", "random": "random"}
SHORT_NET = {"resnet18": "resnet", "vit": "vit"}
METHOD_ORDER = ["baseline", "retrain", "retrain_paper", "finetune", "bad_teacher", "amnesiac", "unsir",
                "ssd", "lfssd", "ssd_per_sample", "assd", "ssd_search"]
COLUMNS = {"df": "Df", "retain_test_acc": "Dr", "test_acc": "Test", "mia": "MIA", "mia_attack_auc": "MIA AUC",
           "method_s": "Time (s)", "dampened_pct": "Dampened (%)"}
# Below this AUC on its own training data (retain-train vs test) the paper's MIA cannot tell a training
# image from a test image, and its column is marked uninformative.
MIA_POWER_FLOOR = 0.6
# Scenarios whose outcome is judged against retrain's Df (metrics.outcome), not against Df = 0.
REFERENCE_SCENARIOS = ("random", "sub_class")
NO_POWER = "†"
ONLY_SOME = {"dampened_pct"}  # SSD-family rows only: other methods show a dash, not a missing value
MARKED = ("df", "retain_test_acc", "mia")  # time is not meant to match retrain: being faster is the point
MARK = "*"
STD_FLOOR = 0.5


@dataclass
class Cell:
    mean: float | None
    std: float | None  # sample std (ddof=1); None for a single value
    n: int
    marked: bool = False


@dataclass
class Row:
    method: str
    label: str  # the method, plus alpha/lambda when one table holds several settings of an SSD variant
    forget_class: str | None  # None when the row pools all forget classes (the default)
    seeds: int
    classes: int
    cells: dict[str, Cell]


@dataclass
class Table:
    name: str
    dataset: str
    scenario: str
    net: str
    forget_classes: list[str]
    rows: list[Row]
    runtime: dict[str, dict] = field(default_factory=dict)  # per SSD variant, see _runtime
    regime: dict = field(default_factory=dict)  # forget ratio and MIA power, see _regime

    @property
    def mia_uninformative(self) -> bool:
        auc = self.regime.get("mia_attack_auc")
        return auc is not None and auc < MIA_POWER_FLOOR


def table_name(config: dict) -> str:
    scenario, net = config.get("scenario"), config.get("net")
    return f"{config.get('dataset')}_{SHORT_SCENARIO.get(scenario, scenario)}_{SHORT_NET.get(net, net)}"


def load_file(path: str | Path) -> list[dict]:
    """The results file's records and those of its runs' own files (results.read merges them)."""
    if not Path(path).is_file() and not results.record_dir(path).is_dir():
        raise UserError(f"results file {path} not found (nor its runs' folder {results.record_dir(path)})")
    return results.read(path)


def load_wandb(project: str) -> list[dict]:
    """Runs logged by results.log_wandb, in the results-file shape. wandb has no method_info, so no
    cache_hit either: the I_D time is then n/a."""
    import wandb

    records = []
    try:
        for run in wandb.Api().runs(project, order="+created_at"):  # oldest first: the newest duplicate wins
            config = {k: v for k, v in run.config.items() if not k.startswith("_")}
            summary = {k: v for k, v in run.summary.items() if not k.startswith("_")}
            records.append({"key": config.pop("key", run.id), "config": config,
                            "metrics": {k: v for k, v in summary.items() if not k.startswith("time/")},
                            "times": {k[5:]: v for k, v in summary.items() if k.startswith("time/")}})
    except Exception as e:  # no network, no login, no such project: one line, not a traceback
        raise UserError(f"cannot read wandb project {project}: {type(e).__name__}: {e}") from e
    return records


def _value(record: dict, name: str) -> float | None:
    if name == "dampened_pct":  # the share of parameter elements SSD multiplied by beta < 1
        v = (record.get("method_info") or {}).get("dampened_fraction")
        v = 100 * v if isinstance(v, (int, float)) else None
    else:
        v = (record["times"] if name.endswith("_s") else record["metrics"]).get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _cell(values: list) -> Cell:
    values = [v for v in values if v is not None]  # a null metric leaves that cell's n short, not the row
    if not values:
        return Cell(None, None, 0)
    return Cell(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def _rank(method: str) -> tuple:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def _rows(runs: list[dict], per_class: bool) -> list[Row]:
    settings = defaultdict(set)  # an alpha/lambda sweep must not be pooled into one SSD row
    for r in runs:
        if "importance_full_s" in r["times"]:
            settings[r["config"]["method"]].add((r["config"].get("alpha"), r["config"].get("lam")))
    groups = defaultdict(list)
    for r in runs:
        c = r["config"]
        label = c["method"]
        if len(settings[label]) > 1:
            label += f" (alpha={c.get('alpha')}, lambda={c.get('lam')})"
        groups[(c["method"], label, str(c.get("forget_class") or "-") if per_class else None)].append(r)
    rows = [Row(method, label, cls, len({r["config"].get("seed") for r in rs}),
                len({r["config"].get("forget_class") for r in rs}),
                {col: _cell([_value(r, col) for r in rs]) for col in COLUMNS})
            for (method, label, cls), rs in groups.items()]
    # Per class, a class's rows sit together, next to the retrain row they are compared with.
    return sorted(rows, key=lambda row: (row.forget_class or "", _rank(row.method), row.label))


def _mark(rows: list[Row], std_floor: float) -> None:
    """Mark cells more than 2 * max(std, retrain's std, std_floor) from retrain; a missing std counts as 0."""
    reference = {row.forget_class: row for row in rows if row.method == "retrain"}
    for row in rows:
        base = reference.get(row.forget_class)
        for col in MARKED if base is not None and base is not row else ():
            a, b = row.cells[col], base.cells[col]
            if a.mean is not None and b.mean is not None:
                a.marked = abs(a.mean - b.mean) > 2 * max(a.std or 0.0, b.std or 0.0, std_floor)


def _runtime(runs: list[dict], id_times: dict[str, float]) -> dict[str, dict]:
    """Per SSD variant: its one-off importance on D apart from the per-request cost, and the speed-ups."""
    retrain_s = _cell([_value(r, "method_s") for r in runs if r["config"]["method"] == "retrain"]).mean
    out = {}
    for method in sorted({r["config"]["method"] for r in runs if "importance_full_s" in r["times"]}, key=_rank):
        rs = [r for r in runs if r["config"]["method"] == method and "importance_full_s" in r["times"]]
        method_s = _cell([_value(r, "method_s") for r in rs]).mean
        request_s = _cell([_value(r, "method_s") - _value(r, "importance_full_s") for r in rs
                           if _value(r, "method_s") is not None and _value(r, "importance_full_s") is not None]).mean
        id_s = [id_times[r["key"]] for r in rs if r["key"] in id_times]
        out[method] = {"importance_s": _cell(id_s).mean, "importance_n": len(id_s), "request_s": request_s,
                       "method_s": method_s, "runs": len(rs), "retrain_s": retrain_s,
                       "cache_hits": sum(r["method_info"].get("cache_hit") is True for r in rs),
                       "speedup": retrain_s / method_s if retrain_s is not None and method_s else None,
                       "speedup_request": retrain_s / request_s if retrain_s is not None and request_s else None}
    return out


def _regime(runs: list[dict], dataset: str, scenario: str) -> dict:
    """The regime a table runs in: its forget ratio |D| / |D_f| (median over runs), the largest
    I_Df / I_D that ssd measured (median), the ratio of the paper table it mirrors, and the paper
    MIA's power (median attack AUC over runs)."""
    from datasets import MIRRORS, PAPER_RATIOS

    def median(values):
        values = [v for v in values if _known(v)]
        return statistics.median(values) if values else None

    ratios = []
    for r in runs:
        n_f, n_r = r["metrics"].get("n_forget_train"), r["metrics"].get("n_retain_train")
        ratios.append((n_f + n_r) / n_f if _known(n_f, n_r) and n_f else None)
    mirror = MIRRORS.get(dataset, dataset)
    return {"ratio": median(ratios), "mirror": mirror, "paper_ratio": PAPER_RATIOS.get((mirror, scenario)),
            "ssd_max_ratio": median([r["method_info"].get("max_ratio") for r in runs if r["config"]["method"] == "ssd"]),
            "mia_attack_auc": median([r["metrics"].get("mia_attack_auc") for r in runs])}


def regime_notes(table: Table) -> list[str]:
    """The footer lines on the regime: forget ratio beside the paper's, and the MIA's power."""
    g, lines = table.regime, []
    f = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    if g.get("ratio") is not None:
        paper = f"; the paper's {g['mirror']} {table.scenario} table: {g['paper_ratio']}" if g.get("paper_ratio") else ""
        lines.append(f"forget ratio |D|/|D_f| {f(g['ratio'], '.1f')}; largest I_Df/I_D that ssd measured "
                     f"(median) {f(g.get('ssd_max_ratio'), '.3g')}{paper}.")
    if g.get("mia_attack_auc") is not None:
        verdict = (f"{NO_POWER} uninformative here: the attack cannot tell a training image from a test image, so "
                   f"MIA differences in this table are not results" if table.mia_uninformative else "informative")
        lines.append(f"MIA power: the paper's attack scores {g['mia_attack_auc']:.3f} AUC on its own training data "
                     f"(retain-train vs test; median over runs; MIA AUC column per method): {verdict}.")
    return lines


def build_tables(records: list[dict], per_class: bool = False, only: list[str] | None = None,
                 std_floor: float = STD_FLOOR) -> dict[str, Table]:
    """Records as read (duplicates included) -> tables by name. A key recorded twice counts once: the last."""
    kept, id_times = {}, {}
    for i, r in enumerate(records):
        c = r.get("config") if isinstance(r, dict) else None
        if not isinstance(c, dict) or not all(c.get(k) for k in ("dataset", "scenario", "net", "method")):
            print(f"warning: record {i + 1} has no dataset/scenario/net/method; skipping it", file=sys.stderr)
            continue
        r = {**r, "key": r.get("key") or f"#{i}", "metrics": r.get("metrics") or {}, "times": r.get("times") or {},
             "method_info": r.get("method_info") or {}}
        kept[r["key"]] = r
        # I_D is only timed when the cache missed; a later cache-hit rerun of the same key must not hide it.
        if r["method_info"].get("cache_hit") is False and _value(r, "importance_full_s") is not None:
            id_times[r["key"]] = _value(r, "importance_full_s")
    by_table = defaultdict(list)
    for r in kept.values():
        by_table[table_name(r["config"])].append(r)
    tables = {}
    for name in sorted(n for n in by_table if not only or n in only):
        runs, c = by_table[name], by_table[name][0]["config"]
        rows = _rows(runs, per_class)
        _mark(rows, std_floor)
        classes = sorted({str(r["config"]["forget_class"]) for r in runs if r["config"].get("forget_class")})
        tables[name] = Table(name, c["dataset"], c["scenario"], c["net"], classes, rows, _runtime(runs, id_times),
                             _regime(runs, c["dataset"], c["scenario"]))
    return tables


# --- the verdict against retrain ------------------------------------------------------------------

@dataclass
class Verdict:
    """One method over every (forget class, seed) cell of a table that also has retrain and baseline."""

    method: str
    cells: int
    df_gap: float | None  # mean |Df - Df(retrain)|
    mia_gap: float | None  # mean |MIA - MIA(retrain)|
    loss_auc_gap: float | None  # mean |loss AUC - loss AUC(retrain)|
    retain_drop: float | None  # mean retain-test accuracy of the original (baseline) minus the method's
    counts: dict[str, int]  # metrics.OUTCOMES -> cells
    method_s: float | None
    statuses: dict[str, int]  # ssd_search's search_status -> cells (empty for other methods)


def build_verdicts(tables: dict[str, Table], records: list[dict]) -> dict[str, list[Verdict]]:
    """Per table, one Verdict per method. A cell is one (forget class, seed); it counts when retrain
    and baseline ran on it too. Outcomes as metrics.outcome, random forgetting against retrain's Df."""
    from metrics import OUTCOMES, outcome

    kept = {}
    for r in records:  # the last record of a key wins, as in the tables
        if isinstance(r.get("config"), dict) and r["config"].get("method"):
            kept[r.get("key")] = r
    cells = defaultdict(dict)  # (table, class, seed, original's seed, forget seed) -> method -> record
    for r in kept.values():
        c = r["config"]
        cells[(table_name(c), str(c.get("forget_class")), c.get("seed"), c.get("model_seed"),
               c.get("forget_seed"))][c["method"]] = r
    verdicts = {}
    for name, table in tables.items():
        per_method = defaultdict(list)
        for (t, *_), runs in cells.items():
            if t != name or "retrain" not in runs or "baseline" not in runs:
                continue
            ref, orig = runs["retrain"]["metrics"], runs["baseline"]["metrics"]
            for method, r in runs.items():
                per_method[method].append((r, ref, orig))
        rows = []
        for method in sorted(per_method, key=_rank):
            group = per_method[method]

            def mean(values):
                values = [v for v in values if v is not None]
                return statistics.fmean(values) if values else None

            def gap(key):
                return mean(abs(r["metrics"][key] - ref[key]) if _known(r["metrics"].get(key), ref.get(key))
                            else None for r, ref, _ in group)

            outcomes = [outcome(r["metrics"]["df"], r["metrics"]["retain_test_acc"], orig["retain_test_acc"],
                                orig["df"], ref["df"] if table.scenario in REFERENCE_SCENARIOS else None)
                        for r, ref, orig in group if _known(r["metrics"].get("df"), r["metrics"].get("retain_test_acc"),
                                                            orig.get("df"), orig.get("retain_test_acc"), ref.get("df"))]
            statuses = defaultdict(int)
            for r, _, _ in group:
                if (r.get("method_info") or {}).get("search_status"):
                    statuses[r["method_info"]["search_status"]] += 1
            rows.append(Verdict(method, len(group), gap("df"), gap("mia"), gap("loss_auc"),
                                mean(orig["retain_test_acc"] - r["metrics"]["retain_test_acc"]
                                     if _known(orig.get("retain_test_acc"), r["metrics"].get("retain_test_acc"))
                                     else None for r, _, orig in group),
                                {o: outcomes.count(o) for o in OUTCOMES}, mean(_value(r, "method_s") for r, _, _ in group),
                                dict(statuses)))
        if rows:
            verdicts[name] = rows
    return verdicts


def _known(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def load_privacy(paths: list[str]) -> dict[str, dict[str, list[dict]]]:
    """table -> method -> one entry per request, from the JSON files privacy.py --out wrote."""
    found: dict = defaultdict(lambda: defaultdict(list))
    for path in paths:
        try:
            requests = json.loads(Path(path).read_text())["requests"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"privacy file {path} cannot be read ({type(e).__name__}: {e}) (pass a file that "
                            f"privacy.py --out wrote)") from None
        for request in requests:  # under the name its runs' records get (table_name), which the verdicts use
            name = table_name(request) if "dataset" in request else request["table"]
            for method, numbers in request["methods"].items():
                found[name][method].append({**numbers, "n_models": request["n_models"]})
    return found


def _privacy_mean(entries: list[dict], name: str) -> str:
    values = [e[name] for e in entries if _known(e.get(name))]
    return f"{statistics.fmean(values):.2f}" if values else "n/a"


def _privacy_cells(entries: list[dict]) -> tuple[str, str]:
    """F / ceiling and U-LiRA AUC, each the mean over the requests."""
    return _privacy_mean(entries, "f_over_ceiling"), _privacy_mean(entries, "ulira_auc")


def verdict_markdown(verdicts: dict[str, list[Verdict]], tables: dict[str, Table],
                     privacy: dict[str, dict[str, list[dict]]] | None = None) -> str:
    """The verdicts as Markdown; with privacy.py's numbers for a table, two more columns (F / ceiling
    and U-LiRA AUC, means over its requests)."""
    parts = []
    for name, rows in verdicts.items():
        t = tables[name]
        judged = t.scenario in REFERENCE_SCENARIOS
        reference = "Df within 5 of retrain's" if judged else "Df <= 10"
        mia = "\\|MIA - retrain\\|" + (NO_POWER if t.mia_uninformative else "")
        private = (privacy or {}).get(name)
        extra = " F / ceiling | U-LiRA AUC |" if private else ""
        lines = [f"### Verdict against retrain: {name} ({t.net} on {t.dataset}, {t.scenario})", "",
                 f"| Method | Cells | \\|Df - retrain\\| | {mia} | \\|loss AUC - retrain\\| |{extra} Retain-test drop | "
                 "Clean | Collapse | Untouched | Partial | Time (s) |",
                 "|---|" + "---:|" * (10 + 2 * bool(private))]
        f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        f3 = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        for v in rows:
            cells = " {} | {} |".format(*_privacy_cells(private.get(v.method, []))) if private else ""
            lines.append(f"| {v.method} | {v.cells} | {f(v.df_gap)} | {f(v.mia_gap)} | {f3(v.loss_auc_gap)} |{cells} "
                         f"{f(v.retain_drop)} | "
                         f"{v.counts['clean']} | {v.counts['collapse']} | {v.counts['untouched']} | "
                         f"{v.counts['partial']} | {f(v.method_s)} |")
        lines += ["", "- a cell is one forget request (class or random split) on one original, with baseline and "
                      "retrain; loss AUC: forget-train against its unseen counterpart, lower loss = member "
                      "(0.5: D_f looks unseen); gaps and the drop are means "
                      "over cells, in points; retain-test drop = original (baseline) minus the method.",
                  f"- clean: {reference} and retain-test within 5 points of the original; collapse: retain-test "
                  f"< 50; untouched: " + ("otherwise Df not below the original's" if judged else "Df >= 90")
                  + "; partial: the rest (metrics.outcome).", *(f"- {n}" for n in regime_notes(t))]
        if private:
            sizes = sorted({e["n_models"] for entries in private.values() for e in entries})
            requests = max(len(entries) for entries in private.values())
            null = _privacy_mean(next(iter(private.values())), "ulira_auc_ceiling")  # the same for every method
            lines += [f"- F / ceiling and U-LiRA AUC (privacy.py): N = {', '.join(map(str, sizes))} models "
                      f"per side, means over {requests} requests. F / ceiling: the competition's forgetting "
                      f"quality over F of independent retrains (1: as good as retraining; 0: found out). "
                      f"U-LiRA AUC: 0.5, the attack cannot tell the method's models from retrained ones; "
                      f"1, it always can; independent retrains against the reference read {null}. retrain's "
                      f"row: the method `retrain`, on other seeds than the reference retrains."]
        for v in rows:
            if v.statuses:
                lines.append(f"- {v.method} search status: " + ", ".join(f"{k} {n}" for k, n in sorted(v.statuses.items())))
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n" if parts else ""


# --- text ----------------------------------------------------------------------------------------

def _fmt(cell: Cell, mark: str = MARK, column: str = "") -> str:
    if cell.mean is None:
        return "-" if column in ONLY_SOME else "n/a"
    if column in ("dampened_pct", "mia_attack_auc"):  # fractions of a percent or of an AUC matter here
        return f"{cell.mean:.3f}" if cell.std is None else f"{cell.mean:.3f} ± {cell.std:.3f}"
    text = f"{cell.mean:.2f}" if cell.std is None else f"{cell.mean:.2f} ± {cell.std:.2f}"
    return text + (mark if cell.marked else "")


def _lead(row: Row, per_class: bool) -> list[str]:
    """Method, class, n: n is seeds, times forget classes where a row pools several."""
    return [row.label, *([row.forget_class] if per_class else []),
            str(row.seeds) if row.classes <= 1 else f"{row.seeds}x{row.classes}"]


def notes(table: Table, std_floor: float = STD_FLOOR) -> list[str]:
    """The lines under a table: the marker, the statistics, then each SSD variant's runtime."""
    pooled = any(row.classes > 1 for row in table.rows)
    lines = [f"({MARK}) differs from retrain by more than 2 x max(std, retrain's std, {std_floor:g}); "
             "a single run's std counts as 0." if any(r.method == "retrain" for r in table.rows)
             else "no retrain row, so nothing is marked.",
             f"mean ± sample std (ddof=1) over seeds{' and forget classes (n = seeds x classes)' if pooled else ''}; "
             "Df, Dr (retain-test acc.), Test (whole test set) and MIA in %; MIA AUC = the MIA attack's AUC on "
             "its own training data; time = method time in s; "
             "Dampened = % of parameter elements SSD dampened (SSD variants only).", *regime_notes(table)]
    s = lambda v: "n/a" if v is None else f"{v:.2f} s"  # noqa: E731
    x = lambda v: "n/a" if v is None else f"{v:.1f}x"  # noqa: E731
    for method, t in table.runtime.items():
        lines.append(f"{method} runtime: I_D {s(t['importance_s'])} (cache-miss runs: {t['importance_n']}); "
                     f"per request (method - I_D) {s(t['request_s'])}; method {s(t['method_s'])} "
                     f"({t['cache_hits']}/{t['runs']} runs reused a cached I_D); speed-up vs retrain "
                     f"({s(t['retrain_s'])}): {x(t['speedup'])} per run, {x(t['speedup_request'])} per request.")
    return lines


def _title(table: Table) -> str:
    forget = ", ".join(table.forget_classes) or "random samples"
    return f"{table.name}: {table.net} on {table.dataset}, {table.scenario}, forget {forget}"


def to_markdown(tables: dict[str, Table], per_class: bool = False, std_floor: float = STD_FLOOR) -> str:
    parts = []
    for table in tables.values():
        grid = [["Method", *(["Class"] if per_class else []), "n", *_headers(table)]]
        grid += [[*_lead(row, per_class), *(_fmt(row.cells[c], column=c) for c in COLUMNS)] for row in table.rows]
        widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in grid]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        parts.append("\n".join([f"### {_title(table)}", "", *lines, "", *(f"- {n}" for n in notes(table, std_floor))]))
    return "\n\n".join(parts) + "\n"


def _headers(table: Table) -> list[str]:
    """Column titles; the MIA column carries the no-power mark where its attack has no power."""
    return [name + (NO_POWER if c == "mia" and table.mia_uninformative else "") for c, name in COLUMNS.items()]


def _tex(text: str) -> str:
    return "".join("\\" + ch if ch in "_%&#$" else ch for ch in text).replace("±", "$\\pm$").replace(
        NO_POWER, "$^\\dagger$")


LATEX_HEADERS = {"df": "$D_f$", "retain_test_acc": "$D_r$"}


def to_latex(tables: dict[str, Table], per_class: bool = False, std_floor: float = STD_FLOOR) -> str:
    parts = []
    for table in tables.values():
        lead = ["Method", *(["Class"] if per_class else []), "n"]
        header = [_tex(h) for h in lead] + [LATEX_HEADERS.get(c, _tex(name)) for c, name in zip(COLUMNS, _headers(table))]
        lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{_tex(_title(table))}}}",
                 f"\\begin{{tabular}}{{{'l' * len(lead)}{'r' * len(COLUMNS)}}}", "\\toprule",
                 " & ".join(header) + " \\\\", "\\midrule"]
        for row in table.rows:
            cells = [_tex(c) for c in _lead(row, per_class)]
            cells += [_tex(_fmt(row.cells[c], mark="", column=c)) + ("$^{*}$" if row.cells[c].marked else "")
                      for c in COLUMNS]
            lines.append(" & ".join(cells) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", "\\par\\smallskip{\\footnotesize",
                  " \\\\\n".join(_tex(n) for n in notes(table, std_floor)) + "}", "\\end{table}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def to_csv(tables: dict[str, Table]) -> str:
    """One line per row, full precision; an empty field is a missing value."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["table", "dataset", "scenario", "net", "method", "label", "forget_class", "seeds", "classes",
                *(f"{c}_{s}" for c in COLUMNS for s in ("mean", "std", "n", "marked"))])
    for t in tables.values():
        for row in t.rows:
            stats = [("" if v is None else v) for c in COLUMNS for v in
                     (row.cells[c].mean, row.cells[c].std, row.cells[c].n, row.cells[c].marked)]
            w.writerow([t.name, t.dataset, t.scenario, t.net, row.method, row.label, row.forget_class or "",
                        row.seeds, row.classes, *stats])
    return buf.getvalue()


# --- figures -------------------------------------------------------------------------------------

def plot(table: Table, out: Path, per_class: bool = False) -> list[Path]:
    """OUT/<table>_acc.png (Df and Dr per method, retrain as dashed lines), OUT/<table>_time.png (log axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.rows
    labels = [f"{row.label} [{row.forget_class}]" if per_class else row.label for row in rows]
    x = np.arange(len(rows))
    width = max(6.0, 0.8 * len(rows) + 2)

    def means(col: str) -> list[float]:
        return [np.nan if r.cells[col].mean is None else r.cells[col].mean for r in rows]

    fig, ax = plt.subplots(figsize=(width, 4.2))
    for i, (col, name, color) in enumerate((("df", "Df acc.", "tab:red"), ("retain_test_acc", "Dr acc.", "tab:blue"))):
        ax.bar(x + (i - 0.5) * 0.4, means(col), 0.4, yerr=[r.cells[col].std or 0.0 for r in rows], capsize=3,
               color=color, alpha=0.8, label=name)
        # One retrain level per group of rows that shares it: all rows, or one forget class with --per-class.
        for j, ref in enumerate(r for r in rows if r.method == "retrain" and r.cells[col].mean is not None):
            span = [k for k, r in enumerate(rows) if r.forget_class == ref.forget_class]
            ax.hlines(ref.cells[col].mean, min(span) - 0.5, max(span) + 0.5, colors=color, linestyles="--",
                      label=f"retrain {name}" if j == 0 else None)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set(ylabel="accuracy (%)", ylim=(0, 115), title=f"{table.name}: Df and retain-test accuracy")
    ax.legend(fontsize=8, ncol=4, loc="upper center")
    fig.tight_layout()
    fig.savefig(out / f"{table.name}_acc.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(width, 3.8))
    t = means("method_s")
    # Below 1 ms (the baseline does nothing) a bar is drawn at 1 ms: a log axis cannot show 0 s, and
    # microseconds would squash the bars that matter.
    bars = ax.bar(x, [max(v, 1e-3) for v in t], 0.6, color="tab:gray")
    ax.bar_label(bars, labels=["" if np.isnan(v) else "<1 ms" if v < 1e-3 else f"{v:.3g} s" for v in t], fontsize=8)
    if not all(np.isnan(t)):
        ax.set_yscale("log")
        ax.margins(y=0.12)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set(ylabel="method time (s, log)", title=f"{table.name}: method time (mean over runs)")
    fig.tight_layout()
    fig.savefig(out / f"{table.name}_time.png", dpi=110)
    plt.close(fig)
    return [out / f"{table.name}_acc.png", out / f"{table.name}_time.png"]


# --- command line --------------------------------------------------------------------------------

EPILOG = f"""\
marker: a Df, Dr or MIA cell gets '{MARK}' when its mean differs from the retrain row's (the same forget
  class with --per-class) by more than 2 x max(its std, retrain's std, --std-floor). The std of a single
  run is undefined and counts as 0, so with n=1 (or identical runs) the floor alone decides: a difference
  over 2 x floor = 1 point by default. Time cells are never marked.
runtime lines (per SSD variant): I_D = importance on D (importance_full_s, mean over the runs that missed
  the importance cache), per request = method_s - importance_full_s (the cost once I_D is cached),
  speed-up = retrain's mean method_s / the variant's mean method_s, and / its per-request time.
errors (missing results file, no runs) print one 'error: ...' line and exit with status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="runs/results.jsonl", help="results file, JSON lines (default: %(default)s)")
    p.add_argument("--wandb-project", metavar="ENTITY/PROJECT", help="read the runs from wandb instead of --results")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="only these tables, e.g. digits_full_resnet cifar20_sub_vit")
    p.add_argument("--per-class", action="store_true",
                   help="one row per (method, forget class) instead of pooling the classes")
    p.add_argument("--latex", action="store_true",
                   help="also write OUT/tables.tex, and print LaTeX instead of Markdown")
    p.add_argument("--out", default="runs/tables", metavar="OUT", help="output folder (default: %(default)s)")
    p.add_argument("--std-floor", type=non_negative_float, default=STD_FLOOR,
                   help="smallest std, in points, that the marker rule uses (default: %(default)s)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--privacy", nargs="+", metavar="FILE",
                   help="JSON files written by privacy.py --out: their tables' verdicts gain the columns F / "
                        "ceiling and U-LiRA AUC (run them on the same --results file)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output_dir(args.out, "--out")
    source = args.wandb_project or args.results
    records = load_wandb(args.wandb_project) if args.wandb_project else load_file(args.results)
    if not records:
        raise UserError(f"no runs in {source}")
    tables = build_tables(records, args.per_class, args.only, args.std_floor)
    if not tables:
        raise UserError(f"no runs in {source}" + (f" for the tables {' '.join(args.only)}" if args.only else ""))
    for name in sorted(set(args.only or []) - set(tables)):
        print(f"warning: no runs for table {name}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    verdicts = build_verdicts(tables, records)  # the table a reader looks at first
    privacy = load_privacy(args.privacy) if args.privacy else None
    text = verdict_markdown(verdicts, tables, privacy) + ("\n" if verdicts else "") + to_markdown(
        tables, args.per_class, args.std_floor)
    (out / "tables.md").write_text(text)
    (out / "tables.csv").write_text(to_csv(tables))
    if args.latex:
        text = to_latex(tables, args.per_class, args.std_floor)
        (out / "tables.tex").write_text(text)
    print(text)
    figures = [] if args.no_figures else [p for t in tables.values() for p in plot(t, out, args.per_class)]
    print(f"wrote {out}/tables.md, tables.csv{', tables.tex' if args.latex else ''} and {len(figures)} figures")
    return 0


if __name__ == "__main__":
    run_cli(main)
