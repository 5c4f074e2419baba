"""The spine: SSD's arithmetic, splits, metrics, the forget runner and its errors."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cli
import datasets
import metrics
import models
import runner
import ssd
from common import UserError

from conftest import SSD_PARAMS, run_argv

ROOT = Path(__file__).resolve().parents[1]


# --- SSD ----------------------------------------------------------------------------------------

def _linear(weights):
    m = nn.Linear(len(weights), 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([weights]))
    return m


def test_dampen_matches_hand_computed_example():
    model = _linear([1.0, 2.0, 3.0, 4.0])
    imp_d = {"weight": torch.tensor([[1.0, 1.0, 2.0, 0.5]])}
    imp_f = {"weight": torch.tensor([[5.0, 20.0, 40.0, 1.0]])}
    # alpha=5: selected where I_Df > 5 I_D -> [5>5 no, 20>5 yes, 40>10 yes, 1>2.5 no]
    # lambda=2: beta = min(2 I_D / I_Df, 1) -> [-, 2/20=0.1, 4/40=0.1, -]
    report = ssd.dampen(model, imp_d, imp_f, alpha=5.0, lam=2.0)
    assert torch.allclose(model.weight, torch.tensor([[1.0, 0.2, 0.3, 4.0]]))
    assert report.total == 2 and report.per_parameter == {"weight": 2} and report.num_elements == 4


def test_dampen_caps_beta_at_one():
    model = _linear([1.0, 1.0])
    # selected (3 > 1 * 1) but lambda * I_D / I_Df = 10 / 3 > 1, so the weight is kept
    ssd.dampen(model, {"weight": torch.tensor([[1.0, 1.0]])}, {"weight": torch.tensor([[3.0, 0.5]])}, 1.0, 10.0)
    assert torch.equal(model.weight, torch.tensor([[1.0, 1.0]]))


def test_dampen_zero_importances_give_no_nan():
    model = _linear([1.0, 2.0, 3.0])
    imp_d = {"weight": torch.tensor([[0.0, 0.0, 1.0]])}
    imp_f = {"weight": torch.tensor([[0.0, 2.0, 0.0]])}
    report = ssd.dampen(model, imp_d, imp_f, alpha=10.0, lam=1.0)
    # 0 > 0 is not selected; I_D = 0 < I_Df selects and dampens to lambda * 0 / 2 = 0; I_Df = 0 is kept
    assert torch.isfinite(model.weight).all()
    assert torch.equal(model.weight, torch.tensor([[1.0, 0.0, 3.0]]))
    assert report.total == 1


def test_dampen_with_alpha_infinity_changes_nothing():
    torch.manual_seed(0)
    model = models.build(models.make_spec("resnet18", 10, 16, width=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    imp_d = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    imp_f = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    report = ssd.dampen(model, imp_d, imp_f, alpha=math.inf, lam=1.0)
    assert report.total == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dampen_refuses_non_finite_importances():
    model = _linear([1.0, 2.0])
    with pytest.raises(UserError, match="NaN or inf"):
        ssd.dampen(model, {"weight": torch.tensor([[1.0, float("inf")]])}, {"weight": torch.ones(1, 2)}, 1.0, 1.0)


def test_importance_is_mean_of_squared_batch_gradients_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[1].running_mean.fill_(0.5)  # eval mode must use these, not batch statistics
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.eval()
    for xb, yb in batches:
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(xb), yb), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            expected[n] += g.pow(2) / len(batches)
    model.train()  # importance() must switch to eval itself
    got = ssd.importance(model, [(xb, yb) for xb, yb in batches], torch.device("cpu"))
    assert not model.training
    for n in expected:
        assert torch.allclose(got[n], expected[n], atol=1e-7), n
    assert model[1].running_mean.eq(0.5).all()  # batch-norm buffers untouched


# --- splits -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, n_classes", [("cifar100", 100), ("cifar20", 20)])
def test_cifar_full_class_splits_are_disjoint_with_exact_sizes(cifar_root, name, n_classes):
    data = datasets.build_data(name, cifar_root, download=False)
    assert data.num_classes == n_classes and len(data.train) == 1000 and len(data.test) == 400
    assert len(data.train_idx) + len(data.val_idx) == 1000 and not set(data.train_idx) & set(data.val_idx)
    target = "rocket" if name == "cifar100" else "vehicle2"
    s = datasets.build_splits("full_class", data, target)
    c = data.classes.index("rocket" if name == "cifar100" else "vehicles_2")
    assert not set(s.forget_idx) & set(s.retain_idx)
    assert sorted(np.concatenate([s.forget_idx, s.retain_idx])) == sorted(data.train_idx)
    assert (data.train.targets[s.forget_idx] == c).all() and (data.train.targets[s.retain_idx] != c).all()
    per_class_test = 4 * (100 // n_classes)  # each superclass holds 5 fine classes
    assert len(s.forget_test_idx) == per_class_test and len(s.retain_test_idx) == 400 - per_class_test
    assert len(s.forget_idx) == (data.train.targets[data.train_idx] == c).sum() > 0
    x, target_label, fine = s.forget_train[0]
    assert x.shape == (3, 32, 32) and target_label == c
    if name == "cifar20":
        assert datasets.CIFAR100_CLASSES[fine] in {"lawn_mower", "rocket", "streetcar", "tank", "tractor"}


def test_cifar20_labels_follow_the_standard_coarse_map(cifar_root):
    data = datasets.build_data("cifar20", cifar_root, download=False)
    names = dict(zip(datasets.CIFAR100_CLASSES, datasets.CIFAR100_TO_20))
    assert datasets.CIFAR20_CLASSES[names["baby"]] == "people"
    assert datasets.CIFAR20_CLASSES[names["mushroom"]] == "fruit_and_vegetables"
    assert datasets.CIFAR20_CLASSES[names["sea"]] == "large_natural_outdoor_scenes"
    assert datasets.CIFAR20_CLASSES[names["lamp"]] == "household_electrical_devices"
    assert (data.train.targets == datasets.CIFAR100_TO_20[data.train.fine]).all()
    assert np.bincount(datasets.CIFAR100_TO_20).tolist() == [5] * 20


def test_class_names_resolve_with_aliases_and_indices():
    for alias, name in [("veg", "fruit_and_vegetables"), ("electrical_devices", "household_electrical_devices"),
                        ("natural_scenes", "large_natural_outdoor_scenes"), ("people", "people")]:
        assert datasets.resolve_class(alias, datasets.CIFAR20_CLASSES) == datasets.CIFAR20_CLASSES.index(name)
    assert datasets.resolve_class("Rocket", datasets.CIFAR100_CLASSES) == 69
    assert datasets.resolve_class("7", datasets.DIGIT_CLASSES) == 7
    with pytest.raises(UserError, match="unknown class 'rockett'"):
        datasets.resolve_class("rockett", datasets.CIFAR100_CLASSES)


def test_transforms_are_fresh_and_only_training_augments():
    data = datasets.build_data("digits", image_size=16)
    assert data.train.transform is not data.train_aug.transform
    assert data.train.source is data.train_aug.source  # views share the images, never copy them
    x1, x2 = data.train[0][0], data.train[0][0]
    assert torch.equal(x1, x2)
    torch.manual_seed(0)
    augmented = [data.train_aug[0][0] for _ in range(8)]
    assert any(not torch.equal(a, x1) for a in augmented)
    vit = datasets.build_data("digits", image_size=16, vit=True)
    assert vit.train[0][0].shape == (3, 16, 16)


def test_digits_is_a_fixed_stratified_split():
    (xtr, ytr), (xte, yte) = datasets.digits_arrays(32)
    assert len(ytr) + len(yte) == 1797 and xtr.shape[1:] == (32, 32, 3) and xtr.dtype == np.uint8
    assert np.abs(np.bincount(ytr) / len(ytr) - np.bincount(yte) / len(yte)).max() < 0.01
    (xtr2, ytr2), _ = datasets.digits_arrays(32)
    assert np.array_equal(ytr, ytr2) and np.array_equal(xtr, xtr2)


# --- metrics ------------------------------------------------------------------------------------

def test_mia_is_near_half_when_the_model_saw_neither_set():
    torch.manual_seed(0)
    data = datasets.build_data("digits", image_size=16)
    splits = datasets.build_splits("full_class", data, "three")
    untrained = models.initial(models.make_spec("resnet18", 10, 16, width=4), pretrained=False, seed=0)
    m = metrics.evaluate(untrained, splits, torch.device("cpu"))
    assert 30.0 <= m["mia"] <= 70.0
    # and a clear signal is found when the member entropies differ from the non-members'
    member, nonmember = torch.zeros(200, 10), torch.randn(200, 10) * 0.01
    member[:, 0] = 20.0
    assert metrics.membership_attack(member, nonmember, member[:50])[0] == 100.0


def test_mia_attack_auc_measures_the_attacks_power():
    """Memorised members (confident) against random non-members: the attack separates its own training
    data perfectly. Members and non-members from one distribution: the attack is a coin."""
    gen = torch.Generator().manual_seed(0)
    memorised = torch.randn(300, 10, generator=gen)
    memorised[torch.arange(300), torch.randint(0, 10, (300,), generator=gen)] += 25.0
    unseen = torch.randn(300, 10, generator=gen)
    mia, auc = metrics.membership_attack(memorised, unseen, memorised[:40])
    assert auc > 0.99 and mia == 100.0
    same_a, same_b = torch.randn(300, 10, generator=gen), torch.randn(300, 10, generator=gen)
    _, auc = metrics.membership_attack(same_a, same_b, same_a[:40])
    assert 0.4 < auc < 0.6
    # through evaluate: an untrained model saw neither retain-train nor test, so its attack has no power
    data = datasets.build_data("digits", image_size=16)
    splits = datasets.build_splits("full_class", data, "three")
    untrained = models.initial(models.make_spec("resnet18", 10, 16, width=4), pretrained=False, seed=0)
    m = metrics.evaluate(untrained, splits, torch.device("cpu"))
    assert 0.4 < m["mia_attack_auc"] < 0.6


def test_zrf_is_one_for_identical_models_and_js_is_bounded():
    a, b = torch.randn(32, 10), torch.randn(32, 10) * 5
    assert torch.allclose(metrics.js_divergence(a, a), torch.zeros(32), atol=1e-6)
    js = metrics.js_divergence(a, b)
    assert (js >= 0).all() and (js <= math.log(2) + 1e-6).all()


# --- the runner ---------------------------------------------------------------------------------

def _run(scenario, tiny_checkpoint, tmp_path, *extra):
    argv = ["--weights", str(tiny_checkpoint / "model.pt"), "--results", str(tmp_path / "results.jsonl"),
            "--device", "cpu", "--wandb", "disabled", "--importance-cache", str(tmp_path / "cache"), *extra]
    return run_argv(scenario, argv)


def test_end_to_end_run_writes_one_results_line_and_resumes(tiny_checkpoint, tmp_path):
    record = _run("full_class", tiny_checkpoint, tmp_path, "--forget-class", "three", "--method", "ssd", "--seed", "3")
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1
    saved = json.loads(lines[0])
    assert saved["key"] == record["key"]
    assert saved["config"]["seed"] == 3 and saved["config"]["alpha"] == 10.0 and saved["config"]["lam"] == 1.0
    assert saved["config"]["forget_class"] == "three" and saved["config"]["method"] == "ssd"
    assert saved["config"]["checkpoint_sha256"] == json.loads((tiny_checkpoint / "meta.json").read_text())["sha256"]
    for k in ("df", "test_acc", "retain_test_acc", "forget_train_acc", "retain_train_acc", "mia", "zrf"):
        assert k in saved["metrics"]
    assert saved["times"]["method_s"] > 0 and saved["times"]["eval_s"] > 0
    assert saved["times"]["method_s"] >= saved["times"]["importance_full_s"]
    assert saved["method_info"]["cache_hit"] is False
    # the same run again is skipped (and gives the record); a different seed is a new run and hits the cache
    assert _run("full_class", tiny_checkpoint, tmp_path, "--forget-class", "three", "--method", "ssd", "--seed", "3") == saved
    again = _run("full_class", tiny_checkpoint, tmp_path, "--forget-class", "three", "--method", "ssd", "--seed", "4")
    assert again["method_info"]["cache_hit"] is True
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2


# --- bad input ----------------------------------------------------------------------------------

def _expect_user_error(match, scenario, tiny_checkpoint, tmp_path, kept_results, *extra, weights=None):
    argv = ["--weights", str(weights or tiny_checkpoint / "model.pt"), "--results", str(kept_results),
            "--device", "cpu", "--wandb", "disabled", *extra]
    before = kept_results.read_bytes()
    with pytest.raises(UserError, match=match):
        run_argv(scenario, argv)
    assert kept_results.read_bytes() == before


def test_unknown_class_name(tiny_checkpoint, tmp_path, kept_results):
    _expect_user_error("unknown class 'threee'", "full_class", tiny_checkpoint, tmp_path, kept_results,
                       "--forget-class", "threee")


@pytest.mark.parametrize("flags, match", [(["--net", "vit"], "net='resnet18'"),
                                          (["--dataset", "digits5"], "dataset='digits'")])
def test_checkpoint_metadata_mismatch(tiny_checkpoint, tmp_path, kept_results, flags, match):
    _expect_user_error(match, "full_class", tiny_checkpoint, tmp_path, kept_results, "--forget-class", "one", *flags)


def test_checkpoint_with_another_number_of_classes(tiny_checkpoint, tmp_path, kept_results):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["model_spec"]["num_classes"] = 5
    (bad / "meta.json").write_text(json.dumps(meta))
    _expect_user_error("5 classes but digits has 10", "full_class", tiny_checkpoint, tmp_path, kept_results,
                       "--forget-class", "one", weights=bad / "model.pt")


def test_missing_checkpoint(tiny_checkpoint, tmp_path, kept_results):
    _expect_user_error("not found", "full_class", tiny_checkpoint, tmp_path, kept_results, "--forget-class", "one",
                       weights=tmp_path / "nowhere" / "model.pt")
    _expect_user_error("no checkpoint for net=resnet18 dataset=digits seed=7", "full_class", tiny_checkpoint,
                       tmp_path, kept_results, "--forget-class", "one", "--weights", "", "--checkpoint-dir",
                       str(tmp_path), "--seed", "7")


@pytest.mark.parametrize("keep_hash", [True, False])
def test_corrupt_checkpoint(tiny_checkpoint, tmp_path, kept_results, keep_hash):
    bad = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, bad)
    data = (bad / "model.pt").read_bytes()
    (bad / "model.pt").write_bytes(data[: len(data) // 2])
    if not keep_hash:  # without a recorded hash, loading itself must fail cleanly
        meta = json.loads((bad / "meta.json").read_text())
        meta["sha256"] = None
        (bad / "meta.json").write_text(json.dumps(meta))
    _expect_user_error("does not match the hash" if keep_hash else "corrupt", "full_class", tiny_checkpoint,
                       tmp_path, kept_results, "--forget-class", "one", weights=bad / "model.pt")


@pytest.mark.parametrize("flags", [["--alpha", "-1"], ["--lambda", "-0.5"]])
def test_negative_alpha_or_lambda(tiny_checkpoint, tmp_path, kept_results, flags):
    _expect_user_error(r"--(alpha|lambda)\): -[\d.]+ is out of range \(pass a number >= 0", "full_class",
                       tiny_checkpoint, tmp_path, kept_results, "--forget-class", "one", *flags)


def test_missing_dataset_directory_without_download(tmp_path):
    with pytest.raises(UserError, match="could not load .*CIFAR10"):
        datasets.build_data("cifar10", tmp_path / "empty", download=False)
    with pytest.raises(UserError, match="face dataset folder"):
        datasets.build_data("faces", tmp_path / "empty")


def test_script_prints_one_line_error_and_exits_2(tmp_path, kept_results):
    before = kept_results.read_bytes()
    out = subprocess.run([sys.executable, "forget_full_class_main.py", "--forget-class", "one", "--weights",
                          str(tmp_path / "missing.pt"), "--results", str(kept_results), "--wandb", "disabled"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: checkpoint")
    assert "Traceback" not in out.stderr
    assert kept_results.read_bytes() == before


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "forget_full_class_main.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--net", "--dataset", "--forget-class", "--method", "--weights", "--seed", "--batch-size",
                 "--device", "--data-dir", "--results", "--alpha", "--lambda"):
        assert flag in out.stdout
    parser = cli.forget_parser("full_class", runner.parser_defaults("full_class"), SSD_PARAMS)
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_loss_auc_and_per_example_phi_come_from_the_evaluation_pass():
    """A model that memorised its forget set has a forget-train loss below its test counterpart's;
    an untrained one does not; phi is kept per example for both sets."""
    data = datasets.build_data("digits", image_size=16)
    splits = datasets.build_splits("full_class", data, "three")
    untrained = models.initial(models.make_spec("resnet18", 10, 16, width=4), pretrained=False, seed=0)
    kept = {}
    m = metrics.evaluate(untrained, splits, torch.device("cpu"), per_example=kept)
    assert 0.35 < m["loss_auc"] < 0.65
    assert kept["phi_forget"].shape == (len(splits.forget_idx),)
    assert kept["phi_counterpart"].shape == (len(splits.forget_test_idx),)
    assert np.isfinite(kept["phi_forget"]).all()

    class Oracle(torch.nn.Module):  # confident and right on forget-train, unsure on everything else
        def __init__(self, memorised):
            super().__init__()
            self.memorised = memorised

        def forward(self, x):
            hit = torch.tensor([any(torch.equal(v, u) for u in self.memorised) for v in x])
            logits = torch.zeros(len(x), 10)
            logits[hit, 3] = 30.0
            return logits

    forget_images = torch.stack([splits.forget_train[i][0] for i in range(len(splits.forget_idx))])
    m = metrics.evaluate(Oracle(forget_images), splits, torch.device("cpu"))
    assert m["loss_auc"] == 1.0
