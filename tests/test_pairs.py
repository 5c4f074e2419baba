"""The digit-pair sets that mirror the paper's CIFAR forget ratios, and how the tables report a regime."""
import numpy as np
import pytest

import datasets
import experiments
import make_tables


@pytest.fixture(scope="module")
def pair_sets():
    return {name: datasets.build_data(name) for name in ("pairs100", "pairs20", "pairs10")}


def test_no_test_image_shares_a_source_digit_with_a_training_image():
    for name in ("pairs100", "pairs10"):
        (x_train, fine_train, src_train), (x_test, fine_test, src_test) = datasets.pair_arrays(name)
        assert not set(src_train.ravel()) & set(src_test.ravel())
        # every source index is a real sklearn digit of the pair's left / right digit, from its own pool
        images, labels, train_pool, test_pool = datasets.digit_source_split()
        assert set(src_train.ravel()) <= set(train_pool) and set(src_test.ravel()) <= set(test_pool)
        for fine, src, x in ((fine_train, src_train, x_train), (fine_test, src_test, x_test)):
            assert np.array_equal(labels[src[:, 0]], fine // 10) and np.array_equal(labels[src[:, 1]], fine % 10)
            assert np.array_equal(x[:, 4:12, :8, 0], images[src[:, 0]])
            assert np.array_equal(x[:, 4:12, 8:, 0], images[src[:, 1]])
            assert not x[:, :4].any() and not x[:, 12:].any()


def test_generation_is_deterministic():
    a, b = datasets.pair_arrays("pairs100"), datasets.pair_arrays("pairs100")
    for part_a, part_b in zip(a, b):
        for u, v in zip(part_a, part_b):
            assert np.array_equal(u, v)


def test_sizes_classes_and_the_paper_ratios(pair_sets):
    p100, p20, p10 = pair_sets["pairs100"], pair_sets["pairs20"], pair_sets["pairs10"]
    assert (p100.num_classes, p20.num_classes, p10.num_classes) == (100, 20, 10)
    assert p100.classes[37] == "37" and p20.classes[7] == "35-39" and p10.classes[3] == "3x"
    assert (len(p100.train), len(p100.test), len(p10.train), len(p10.test)) == (4000, 2000, 11100, 2000)
    # pairs20 is pairs100's images with superclass targets: the five pairs 35..39 are superclass 35-39
    assert np.array_equal(p20.train.fine, p100.train.fine)
    assert set(p20.train.fine[p20.train.targets == 7]) == {35, 36, 37, 38, 39}
    assert np.array_equal(p10.train.targets, p10.train.fine // 10) and np.array_equal(datasets.PAIRS100_TO_10[[37]], [3])
    ratio = lambda s: len(s.data.train_idx) / len(s.forget_idx)  # noqa: E731
    cases = [(datasets.build_splits("full_class", p100, "07"), 100), (datasets.build_splits("full_class", p20, "05-09"), 20),
             (datasets.build_splits("sub_class", p20, "07"), 100),
             (datasets.build_splits("random", p10, seed=1, forget_count=20), 500)]
    for splits, paper in cases:
        assert abs(ratio(splits) / paper - 1) < 0.15, (splits.scenario, ratio(splits))
    sub = cases[2][0]
    assert set(p20.train.targets[sub.forget_idx]) == {1} and 1 in set(p20.train.targets[sub.retain_idx])


def test_pair_images_are_not_mirrored_by_augmentation():
    transform = datasets.make_transform("pairs100", 16, train=True, native_size=16)
    assert not any(type(t).__name__ == "RandomHorizontalFlip" for t in transform.transforms)


def test_the_verdict_suite_has_ten_requests_per_table_fixed_in_advance():
    args = experiments.parse_args(["--suite", "verdict", "--print-commands"])
    runs = experiments.expand(args, experiments.select_tables(args))
    per_table = {}
    for r in runs:
        per_table.setdefault(r.table, set()).add((r.config.seed, r.config.model_seed, r.config.forget_class))
    assert sorted(per_table) == ["pairs100_full_resnet", "pairs10_random_resnet", "pairs20_sub_resnet"]
    assert all(len(requests) == 20 for requests in per_table.values())  # 10 requests x seeds 1 and 2
    random_runs = [r for r in runs if r.table == "pairs10_random_resnet" and r.config.method == "ssd"]
    assert {(r.config.seed, r.config.model_seed) for r in random_runs} == {(s, m) for s in range(1, 11) for m in (1, 2)}
    # the printed command holds the same split seed and original
    argv = random_runs[0].config.to_argv()
    assert argv[argv.index("--seed") + 1] == str(random_runs[0].config.seed)
    assert argv[argv.index("--model-seed") + 1] == str(random_runs[0].config.model_seed)
    assert experiments.VERDICT_CLASSES == ["07", "18", "29", "30", "41", "52", "63", "74", "85", "96"]


LOSS_AUC = {"baseline": 0.9, "retrain": 0.5, "ssd": 0.55}


def _record(method, df, mia_auc, seed=1, model_seed=1, max_ratio=None):
    info = {} if max_ratio is None else {"max_ratio": max_ratio}
    return {"key": f"{method}-{seed}-{model_seed}", "config": {"dataset": "pairs100", "scenario": "full_class",
            "net": "resnet18", "method": method, "forget_class": "07", "seed": seed, "model_seed": model_seed},
            "metrics": {"df": df, "retain_test_acc": 95.0, "test_acc": 95.0, "mia": 50.0, "mia_attack_auc": mia_auc, "loss_auc": LOSS_AUC[method],
                        "n_forget_train": 36, "n_retain_train": 3564},
            "times": {"method_s": 1.0}, "method_info": info}


def test_the_footer_gives_the_ratio_and_marks_a_powerless_mia():
    weak = [_record("baseline", 100.0, 0.52), _record("retrain", 0.0, 0.50), _record("ssd", 0.0, 0.55, max_ratio=97.0)]
    table = make_tables.build_tables(weak)["pairs100_full_resnet"]
    text = make_tables.to_markdown({"pairs100_full_resnet": table})
    assert "forget ratio |D|/|D_f| 100.0" in text and "ssd measured (median) 97" in text
    assert "the paper's cifar100 full_class table: 100" in text
    assert "| MIA† |" in text.replace("  ", " ").replace("  ", " ") and "uninformative" in text
    verdicts = make_tables.build_verdicts({"pairs100_full_resnet": table}, weak)
    verdict = make_tables.verdict_markdown(verdicts, {"pairs100_full_resnet": table})
    assert "\\|MIA - retrain\\|†" in verdict and "uninformative" in verdict
    # the loss AUC's gap to retrain, per cell: |0.9 - 0.5| for the original, |0.55 - 0.5| for ssd
    gaps = {v.method: v.loss_auc_gap for v in verdicts["pairs100_full_resnet"]}
    assert gaps == pytest.approx({"baseline": 0.4, "retrain": 0.0, "ssd": 0.05})
    strong = [_record("baseline", 100.0, 0.81), _record("retrain", 0.0, 0.74), _record("ssd", 0.0, 0.70, max_ratio=97.0)]
    table = make_tables.build_tables(strong)["pairs100_full_resnet"]
    text = make_tables.to_markdown({"pairs100_full_resnet": table})
    assert "MIA†" not in text and "0.740" in text and ": informative" in text


def test_verdict_cells_keep_the_originals_of_random_requests_apart():
    records = [_record(m, df, 0.5, seed=3, model_seed=ms) for ms in (1, 2) for m, df in
               (("baseline", 100.0), ("retrain", 0.0), ("ssd", 0.0))]
    tables = make_tables.build_tables(records)
    verdicts = make_tables.build_verdicts(tables, records)["pairs100_full_resnet"]
    assert {v.method: v.cells for v in verdicts} == {"baseline": 2, "retrain": 2, "ssd": 2}


def test_verdict_cells_keep_the_forget_seeds_of_one_original_apart():
    records = []
    for forget_seed in (1, 2):
        for m, df in (("baseline", 100.0), ("retrain", 0.0), ("ssd", 0.0)):
            r = _record(m, df, 0.5)
            r["key"] += f"-f{forget_seed}"
            r["config"]["forget_seed"] = forget_seed
            records.append(r)
    tables = make_tables.build_tables(records)
    verdicts = make_tables.build_verdicts(tables, records)["pairs100_full_resnet"]
    assert {v.method: v.cells for v in verdicts} == {"baseline": 2, "retrain": 2, "ssd": 2}
