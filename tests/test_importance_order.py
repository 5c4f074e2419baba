"""SSD's importance batches: the paper's order against the paper code's own loaders, built here
independently, and what a run records about its selection."""
import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, Subset, random_split

import datasets
import methods
import metrics
import models
import runner
import ssd
import training
from conftest import plan_argv, run_argv

torch.set_num_threads(1)

FLAGS = {"full_class": ["--forget-class", "three"], "sub_class": ["--forget-class", "three"],
         "random": ["--forget-count", "30"]}
DATASET = {"full_class": "digits", "sub_class": "digits5", "random": "digits"}
SEED = 3


@pytest.fixture(scope="module")
def small_data():
    """dataset name -> Data over a quarter of the digits at 8x8 (with a validation split, as in a real run)."""
    out = {}
    for name in ("digits", "digits5"):
        data = datasets.build_data(name, image_size=8)
        out[name] = dataclasses.replace(data, train_idx=data.train_idx[::4])
    return out


def setup(scenario: str, data: datasets.Data, order: str):
    splits = datasets.build_splits(scenario, data, "three" if scenario != "random" else None, seed=SEED,
                                   forget_count=30)
    config = runner.RunConfig.from_argv(scenario, FLAGS[scenario] + ["--importance-order", order, "--seed", str(SEED)],
                                        {"resnet18": (10.0, 1.0)})
    spec = models.make_spec("resnet18", data.num_classes, 8, width=4)
    ctx = methods.RunContext(device=torch.device("cpu"), seed=config.seed, batch_size=config.batch_size, amp=False,
                             recipe={}, model_spec=spec, pretrained=False, checkpoint_sha256=None)
    return models.initial(spec, pretrained=False, seed=0).eval(), splits, ctx, config.hp.importance_order


def paper_loaders(scenario: str, data: datasets.Data, batch_size: int) -> tuple[DataLoader, DataLoader]:
    """The SSD paper code's D and D_f loaders, rebuilt from its description with torch alone."""
    if scenario == "random":  # random_split of the training images, forget part first; D = retain + forget
        count = 30
        forget, retain = random_split(Subset(data.train, data.train_idx.tolist()),
                                      [count, len(data.train_idx) - count],
                                      generator=torch.Generator().manual_seed(SEED))
    else:  # one list per class (target, or fine class for sub-class) in dataset order; retain classes ascending
        labels = data.train.fine if scenario == "sub_class" else data.train.targets
        names = data.fine_classes if scenario == "sub_class" else data.classes
        forget_class = names.index("three")
        classwise = {c: [int(i) for i in data.train_idx if labels[i] == c] for c in range(len(names))}
        retain = Subset(data.train, [i for c in sorted(classwise) if c != forget_class for i in classwise[c]])
        forget = Subset(data.train, classwise[forget_class])
    return (DataLoader(ConcatDataset((retain, forget)), batch_size=batch_size),
            DataLoader(forget, batch_size=batch_size))


@pytest.mark.parametrize("scenario", ["full_class", "sub_class", "random"])
def test_paper_order_gives_the_paper_codes_importances(scenario, small_data):
    data = small_data[DATASET[scenario]]
    model, splits, ctx, order = setup(scenario, data, "paper")
    assert ctx.batch_size == (128 if scenario == "random" else 64)  # the paper code's -b defaults
    got_full, got_forget, info = methods.ssd_importances(model, splits, order, ctx, "ssd")
    full_dl, forget_dl = paper_loaders(scenario, data, ctx.batch_size)
    want_full = ssd.importance(model, full_dl, ctx.device)
    want_forget = ssd.importance(model, forget_dl, ctx.device)
    for name in want_full:
        torch.testing.assert_close(got_full[name], want_full[name], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(got_forget[name], want_forget[name], rtol=1e-6, atol=1e-12)
    assert info["ratio_cap"] == pytest.approx(len(full_dl.dataset) / len(forget_dl.dataset))


@pytest.mark.parametrize("scenario", ["full_class", "random"])
def test_shuffled_order_gives_other_importances(scenario, small_data):
    data = small_data[DATASET[scenario]]
    model, splits, ctx, order = setup(scenario, data, "shuffled")
    got_full, _, info = methods.ssd_importances(model, splits, order, ctx, "ssd")
    assert info["importance_order"] == "shuffled"
    want_full = ssd.importance(model, paper_loaders(scenario, data, ctx.batch_size)[0], ctx.device)
    worst = max(float(((got_full[n] - want_full[n]).abs() / (want_full[n].abs() + 1e-12)).max()) for n in want_full)
    assert worst > 1e-2, "shuffling D should change which samples share a batch, and so I_D"


def test_shuffled_order_is_what_a_seeded_shuffling_loader_reads(small_data):
    splits = datasets.build_splits("full_class", small_data["digits"], "three")
    full, forget = datasets.importance_order(splits, "shuffled", seed=5)
    read = lambda idx, seed: np.concatenate([b.numpy() for b in training.loader(  # noqa: E731
        idx.tolist(), 50, torch.device("cpu"), shuffle=True, seed=seed)])
    assert (full == read(splits.data.train_idx, 0)).all()
    assert (forget == read(splits.forget_idx, 5)).all()


def test_paper_order_puts_each_class_together_and_the_forget_class_last(small_data):
    splits = datasets.build_splits("full_class", small_data["digits"], "three")
    full, forget = datasets.importance_order(splits, "paper", seed=0)
    targets = splits.data.train.targets[full]
    assert sorted(full.tolist()) == sorted(splits.data.train_idx.tolist()) and (forget == splits.forget_idx).all()
    assert (targets[-len(forget):] == 3).all() and (np.diff(targets[:-len(forget)]) >= 0).all()


def test_a_run_records_what_ssd_selected_and_warns_when_alpha_selects_nothing(tiny_checkpoint, tmp_path, capsys):
    base = ["--weights", str(tiny_checkpoint / "model.pt"), "--forget-class", "three", "--method", "ssd",
            "--device", "cpu", "--wandb", "disabled", "--results", str(tmp_path / "r.jsonl"),
            "--importance-cache", str(tmp_path / "cache")]
    nothing = run_argv("full_class", base + ["--alpha", "1e9"])
    info = nothing["method_info"]
    assert info["dampened"] == 0 and info["dampened_fraction"] == 0 and info["most_dampened"] == []
    assert info["importance_order"] == "paper" and 0 < info["max_ratio"] < 1e9
    splits = plan_argv("full_class", base).splits
    assert info["ratio_cap"] == pytest.approx(len(splits.data.train_idx) / len(splits.forget_idx))
    err = capsys.readouterr().err
    assert "selects nothing" in err and f"{info['max_ratio']:.3g}" in err

    alpha = info["max_ratio"] / 2  # below the largest ratio: something must be selected
    some = run_argv("full_class", base + ["--alpha", str(alpha)])["method_info"]
    assert some["cache_hit"] is True  # the same request again reuses I_D
    assert some["dampened"] > 0 and some["dampened_fraction"] == pytest.approx(
        some["dampened"] / sum(p.numel() for p in models.build(models.load_meta(tiny_checkpoint / "model.pt")
                                                               ["model_spec"]).parameters()))
    counts = [c for _, c in some["most_dampened"]]
    assert 1 <= len(counts) <= 3 and counts == sorted(counts, reverse=True) and sum(counts) <= some["dampened"]
    out = capsys.readouterr()
    assert f"dampened {100 * some['dampened_fraction']:.3f}%" in out.out and "selects nothing" not in out.err


def test_dampen_reports_the_largest_ratio_and_zero_importance_elements():
    model = torch.nn.Linear(2, 1, bias=False)
    full = {"weight": torch.tensor([[1.0, 0.0]])}
    forget = {"weight": torch.tensor([[4.0, 2.0]])}
    report = ssd.dampen(model, full, forget, alpha=5.0, lam=1.0)
    assert report.max_ratio == 4.0 and report.zero_full_importance == 1
    assert report.total == 1  # I_D = 0 < I_Df is selected by any finite alpha; 4 < 5 is not
    assert report.summary()["most_dampened"] == [["weight", 1]]


# --- sweep_alpha.py -------------------------------------------------------------------------------

def test_sweep_evaluates_every_alpha_on_one_importance_pass(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import csv

    import sweep_alpha

    passes = []
    real = methods._importance
    monkeypatch.setattr(methods, "_importance", lambda *a, **k: passes.append(a[4]) or real(*a, **k))
    sweep_alpha.main(["--checkpoint-dir", str(tiny_checkpoint.parent), "--seeds", "0", "--classes", "three",
                      "--alphas", "0.5", "1e9", "--importance-cache", "", "--device", "cpu", "--out", str(tmp_path)])
    assert passes == ["importance D", "importance Df"]
    rows = list(csv.DictReader(open(tmp_path / "digits_full_class.csv")))
    assert [float(r["alpha"]) for r in rows] == [0.5, 1e9]
    low, high = rows
    assert float(high["dampened_fraction"]) == 0 and float(high["df"]) == float(high["original_df"])
    assert float(low["dampened_fraction"]) > 0 and float(low["max_ratio"]) == float(high["max_ratio"])
    assert (tmp_path / "digits_full_class_paper.png").stat().st_size > 0
    assert "| paper | 0.5 | 1 |" in capsys.readouterr().out


def test_sweep_fractions_pick_the_quantile_alpha(tiny_checkpoint, tmp_path):
    import csv

    import sweep_alpha

    sweep_alpha.main(["--checkpoint-dir", str(tiny_checkpoint.parent), "--seeds", "0", "--classes", "three",
                      "--fractions", "0.01", "0.1", "--importance-cache", "", "--device", "cpu", "--out",
                      str(tmp_path), "--no-figures"])
    rows = list(csv.DictReader(open(tmp_path / "digits_full_class.csv")))
    for r in rows:  # the share selected is the fraction asked for, give or take ties and I_D = 0 elements
        assert float(r["dampened_fraction"]) == pytest.approx(float(r["fraction"]), abs=0.01)


@pytest.mark.parametrize("df, retain, expected", [(0, 97, "clean"), (5, 91, "partial"), (0, 40, "collapse"),
                                                  (95, 97, "untouched"), (50, 96, "partial")])
def test_outcome_of_a_class_request(df, retain, expected):
    assert metrics.outcome(df, retain, original_retain=97, original_df=99) == expected


@pytest.mark.parametrize("df, expected", [(92, "clean"), (86, "clean"), (99.5, "untouched"), (80, "partial"),
                                         (95.5, "partial")])
def test_outcome_of_a_random_request_compares_with_unseen_accuracy(df, expected):
    assert metrics.outcome(df, 97, original_retain=97, original_df=99.5, reference_df=90) == expected


def test_a_request_whose_reference_did_not_move_is_clean_when_nothing_moves():
    """Sub-class forgetting where the retrained model still classifies the forgotten class: a method that
    changes nothing matches retrain on accuracy; one that drives Df to 0 does not."""
    assert metrics.outcome(100, 97, original_retain=97, original_df=100, reference_df=100) == "clean"
    assert metrics.outcome(0, 96, original_retain=97, original_df=100, reference_df=100) == "partial"
