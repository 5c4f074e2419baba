"""make_tables.py on a hand-written results file whose numbers are known."""
import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import make_tables
import results

ROOT = Path(__file__).resolve().parents[1]


def _run(key, method, seed, df, dr, mia, method_s, forget_class="three", scenario="full_class", dataset="digits",
         net="resnet18", importance_s=None, cache_hit=None):
    times = {"method_s": method_s, "eval_s": 1.0}
    info = {}
    if importance_s is not None:
        times.update(importance_full_s=importance_s, importance_forget_s=0.1)
        info["cache_hit"] = cache_hit
    config = {"scenario": scenario, "net": net, "dataset": dataset, "method": method, "seed": seed,
              "forget_class": forget_class, "alpha": 10.0, "lam": 1.0}
    return {"key": key, "config": config, "metrics": {"df": df, "retain_test_acc": dr, "mia": mia, "test_acc": 90.0},
            "times": times, "method_info": info}


# digits_full_resnet, class "three". Expected:
#   retrain: Df 0 ± 0, Dr 61 ± 1.41 (60, 62), MIA 30 ± 0, time 21
#   ssd: Df 1.00 ± 1.41 (0, 2; the first ssd-2 line is superseded), Dr 61 ± 0, MIA 50 ± 0 -> marked
#   baseline (one seed): Df 100 -> marked; Dr 61.5 (within 2 x 1.41 of 61); MIA 30.9 (within 2 x floor 0.5)
LINES = [
    _run("r1", "retrain", 1, 0.0, 60.0, 30.0, 20.0),
    _run("r2", "retrain", 2, 0.0, 62.0, 30.0, 22.0),
    _run("s1", "ssd", 1, 0.0, 61.0, 50.0, 4.0, importance_s=3.0, cache_hit=False),
    _run("s2", "ssd", 2, 50.0, 61.0, 50.0, 6.0, importance_s=5.0, cache_hit=False),  # superseded below
    "{this line was cut off by a crash",
    _run("s2", "ssd", 2, 2.0, 61.0, 50.0, 1.2, importance_s=0.2, cache_hit=True),
    _run("b1", "baseline", 1, 100.0, 61.5, 30.9, 0.0),
    _run("c1", "my_method", 1, 10.0, 55.0, None, 2.0),
    _run("f1", "finetune", 1, 5.0, 58.0, 31.0, 3.0),
    # cifar20_sub_vit over two forget classes, to check --per-class
    # pooled Df: retrain 5 ± 5.77, ssd 6 ± 4.62 (alike); per class: veg 0 vs 2 (marked), people 10 vs 10
    *(_run(f"v{m}{c}{s}", m, s, df, 80.0 + s, 40.0, 10.0, forget_class=c, scenario="sub_class", dataset="cifar20",
           net="vit") for m, c, df in (("retrain", "veg", 0.0), ("retrain", "people", 10.0), ("ssd", "veg", 2.0),
                                       ("ssd", "people", 10.0)) for s in (1, 2)),
    _run("rand1", "ssd", 1, 70.0, 75.0, 50.0, 1.0, forget_class=None, scenario="random", importance_s=0.5,
         cache_hit=False),
]


@pytest.fixture
def results_file(tmp_path) -> Path:
    path = tmp_path / "results.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in LINES))
    return path


@pytest.fixture
def tables(results_file):
    return make_tables.build_tables(results.read(results_file))


def _row(table, method, forget_class=None):
    return next(r for r in table.rows if r.method == method and r.forget_class == forget_class)


def test_table_names_match_experiments():
    import experiments

    for name, t in experiments.TABLES.items():
        assert make_tables.table_name({"dataset": t.dataset, "scenario": t.scenario, "net": t.net}) == name


def test_aggregation_mean_and_sample_std(tables):
    assert list(tables) == ["cifar20_sub_vit", "digits_full_resnet", "digits_random_resnet"]
    t = tables["digits_full_resnet"]
    assert [r.method for r in t.rows] == ["baseline", "retrain", "finetune", "ssd", "my_method"]
    ssd = _row(t, "ssd")
    assert ssd.seeds == 2 and ssd.cells["df"].n == 2
    assert ssd.cells["df"].mean == pytest.approx(1.0)
    assert ssd.cells["df"].std == pytest.approx(math.sqrt(2))  # ddof=1: sqrt(((0-1)^2 + (2-1)^2) / 1)
    assert _row(t, "retrain").cells["retain_test_acc"].std == pytest.approx(math.sqrt(2))
    assert _row(t, "baseline").cells["df"].std is None  # one seed: no std
    assert _row(t, "my_method").cells["mia"].mean is None  # a null metric
    md = make_tables.to_markdown({"digits_full_resnet": t})
    ssd_line = next(line for line in md.splitlines() if line.startswith("| ssd "))
    assert "1.00 ± 1.41" in ssd_line and "61.00 ± 0.00" in ssd_line and "| 2 " in ssd_line
    assert "n/a" in next(line for line in md.splitlines() if line.startswith("| my_method "))


def test_duplicate_key_counts_once_and_damaged_line_is_skipped(results_file, capsys):
    records = results.read(results_file)
    assert "not valid JSON" in capsys.readouterr().err
    assert len(records) == len(LINES) - 1
    ssd = _row(make_tables.build_tables(records)["digits_full_resnet"], "ssd")
    assert ssd.cells["df"].n == 2 and ssd.cells["method_s"].mean == pytest.approx((4.0 + 1.2) / 2)


def test_runtime_split_and_speedup(tables):
    rt = tables["digits_full_resnet"].runtime["ssd"]
    # I_D from the cache-miss runs: s1 (3.0) and the superseded s2 (5.0), whose rerun only reused the cache.
    assert rt["importance_s"] == pytest.approx(4.0) and rt["importance_n"] == 2
    assert rt["request_s"] == pytest.approx(1.0)  # 4.0 - 3.0 and 1.2 - 0.2
    assert rt["cache_hits"] == 1 and rt["runs"] == 2
    assert rt["speedup"] == pytest.approx(21.0 / 2.6)
    assert rt["speedup_request"] == pytest.approx(21.0)
    notes = "\n".join(make_tables.notes(tables["digits_full_resnet"]))
    assert "I_D 4.00 s" in notes and "21.0x per request" in notes
    assert "speed-up vs retrain (n/a)" in "\n".join(make_tables.notes(tables["digits_random_resnet"]))


def test_marker(tables, results_file):
    t = tables["digits_full_resnet"]
    ssd, base, retrain = _row(t, "ssd"), _row(t, "baseline"), _row(t, "retrain")
    assert ssd.cells["mia"].marked and base.cells["df"].marked
    assert not ssd.cells["df"].marked  # |1 - 0| < 2 x 1.41
    assert not ssd.cells["retain_test_acc"].marked and not base.cells["retain_test_acc"].marked
    assert not base.cells["mia"].marked  # 0.9 < 2 x floor 0.5
    assert not any(c.marked for c in retrain.cells.values())
    assert not ssd.cells["method_s"].marked  # time is never marked
    md = make_tables.to_markdown({"digits_full_resnet": t})
    assert "| 50.00 ± 0.00* " in md and "| 100.00* " in md and "1.41* " not in md and "30.90*" not in md
    assert "(*) differs from retrain" in md
    assert "no retrain row" in "\n".join(make_tables.notes(tables["digits_random_resnet"]))
    # A smaller floor marks the one-seed baseline's MIA (0.9 > 2 x 0.4).
    strict = make_tables.build_tables(results.read(results_file), std_floor=0.4)["digits_full_resnet"]
    assert _row(strict, "baseline").cells["mia"].marked


def test_per_class_rows(results_file):
    pooled = make_tables.build_tables(results.read(results_file), only=["cifar20_sub_vit"])
    assert list(pooled) == ["cifar20_sub_vit"]
    ssd = _row(pooled["cifar20_sub_vit"], "ssd")
    assert (ssd.seeds, ssd.classes, ssd.cells["df"].n) == (2, 2, 4)
    assert "| 2x2 " in make_tables.to_markdown(pooled)
    split = make_tables.build_tables(results.read(results_file), per_class=True, only=["cifar20_sub_vit"])
    rows = split["cifar20_sub_vit"].rows
    assert [(r.forget_class, r.method) for r in rows] == [("people", "retrain"), ("people", "ssd"),
                                                          ("veg", "retrain"), ("veg", "ssd")]
    assert not ssd.cells["df"].marked
    assert _row(split["cifar20_sub_vit"], "ssd", "veg").cells["df"].marked  # 2 vs 0, both std 0
    assert not _row(split["cifar20_sub_vit"], "ssd", "people").cells["df"].marked
    assert "| Class " in make_tables.to_markdown(split, per_class=True)


def test_outputs_are_written(results_file, tmp_path, capsys):
    out = tmp_path / "tables"
    assert make_tables.main(["--results", str(results_file), "--out", str(out), "--latex"]) == 0
    printed = capsys.readouterr().out
    assert "\\begin{tabular}" in printed and "1.00 $\\pm$ 1.41" in printed and "50.00 $\\pm$ 0.00$^{*}$" in printed
    for name in ("tables.md", "tables.tex", "tables.csv"):
        assert (out / name).stat().st_size > 0
    assert "| ssd " in (out / "tables.md").read_text()
    rows = list(csv.DictReader((out / "tables.csv").open()))
    ssd = next(r for r in rows if r["table"] == "digits_full_resnet" and r["method"] == "ssd")
    assert float(ssd["df_mean"]) == pytest.approx(1.0) and ssd["mia_marked"] == "True"
    for table in ("digits_full_resnet", "cifar20_sub_vit", "digits_random_resnet"):
        for kind in ("acc", "time"):
            assert (out / f"{table}_{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_unknown_table_is_an_error(results_file):
    with pytest.raises(make_tables.UserError, match="no runs"):
        make_tables.main(["--results", str(results_file), "--only", "cifar100_full_vit", "--no-figures"])


def test_cli_missing_results_file(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "make_tables.py"), "--results", str(tmp_path / "nope.jsonl"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _tabulars(tex: str) -> list[tuple[int, list[int]]]:
    """(columns in the spec, cells in each row) for every tabular of a LaTeX document."""
    found = []
    for spec, body in re.findall(r"\\begin\{tabular\}\{([^}]*)\}(.*?)\\end\{tabular\}", tex, flags=re.S):
        rows = [line for line in body.split("\\\\") if "&" in line]
        found.append((len(spec), [len(re.split(r"(?<!\\)&", row)) for row in rows]))
    return found


@pytest.mark.parametrize("per_class", [False, True])
def test_latex_rows_have_as_many_cells_as_the_column_spec(results_file, per_class):
    tables = make_tables.build_tables(results.read(results_file), per_class=per_class)
    found = _tabulars(make_tables.to_latex(tables, per_class=per_class))
    assert len(found) == len(tables)
    for columns, cells in found:
        assert len(cells) >= 2 and set(cells) == {columns}  # the header and every row


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (Debian: texlive-latex-base "
                                                              "and texlive-latex-recommended)")
def test_latex_table_compiles(results_file, tmp_path):
    tables = make_tables.build_tables(results.read(results_file), only=["digits_full_resnet"])
    doc = "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n" + make_tables.to_latex(tables) \
        + "\\end{document}\n"
    (tmp_path / "t.tex").write_text(doc)
    p = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:]
    assert (tmp_path / "t.pdf").stat().st_size > 0


def test_verdict_against_retrain_on_known_numbers(results_file):
    records = results.read(results_file)
    tables = make_tables.build_tables(records)
    verdicts = make_tables.build_verdicts(tables, records)
    # digits_full_resnet: only seed 1 of class three has a baseline (Dr 61.5, Df 100), so one cell per method
    rows = {v.method: v for v in verdicts["digits_full_resnet"]}
    assert set(rows) == {"baseline", "retrain", "finetune", "ssd", "my_method"}
    ssd = rows["ssd"]
    assert ssd.cells == 1 and ssd.df_gap == 0 and ssd.mia_gap == pytest.approx(20) and ssd.retain_drop == 0.5
    assert ssd.loss_auc_gap is None
    assert ssd.counts == {"clean": 1, "collapse": 0, "untouched": 0, "partial": 0} and ssd.method_s == 4.0
    assert rows["baseline"].counts["untouched"] == 1 and rows["baseline"].df_gap == 100
    assert rows["finetune"].counts["clean"] == 1 and rows["finetune"].retain_drop == pytest.approx(3.5)
    assert rows["my_method"].counts["partial"] == 1 and rows["my_method"].mia_gap is None  # Dr 55 < 61.5 - 5
    assert "cifar20_sub_vit" not in verdicts  # no baseline there: nothing to compare with
    text = make_tables.verdict_markdown(verdicts, tables)
    assert "| ssd | 1 | 0.00 | 20.00 | n/a | 0.50 | 1 | 0 | 0 | 0 | 4.00 |" in text  # these records have no loss AUC
