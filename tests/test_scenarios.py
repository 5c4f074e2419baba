"""Issue 3 acceptance: every method in every scenario on generated CIFAR files, the tiny ViT end to end,
the pretrained-ViT path with only the hub call mocked, the face folder, and the sub-class and random splits.

Everything is tiny (width-4 ResNets, 16x16 inputs, one epoch): these tests check that the paths run and
record what they should, not that forgetting works.
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification

import datasets
import forget_full_class_main
import methods
import models
import pretrain_model
from common import UserError
from conftest import SSD_PARAMS, plan_argv, run_argv, write_cifar

# Only the amount of work is cut; the noise batch and copies matter most for random forgetting, where
# UNSIR makes one noise batch per forgotten target.
SMALL = ["--retrain-epochs", "1", "--finetune-epochs", "1", "--amnesiac-epochs", "1", "--unsir-noise-steps", "2",
         "--unsir-noise-batch", "4", "--unsir-noise-copies", "2", "--unsir-retain-per-class", "5"]
METRICS = ("df", "test_acc", "retain_test_acc", "forget_train_acc", "retain_train_acc", "mia", "zrf")
ROCKET_SIBLINGS = ("lawn_mower", "streetcar", "tank", "tractor")  # rocket's superclass, vehicles_2


def pretrain(out, *argv):
    """One epoch of pretraining into `out`; returns the checkpoint folder."""
    return pretrain_model.main([*argv, "--epochs", "1", "--milestones", "--out", str(out), "--device", "cpu",
                                "--no-download"])


def forget(scenario, ckpt, data_dir, results, *extra, ssd_params=SSD_PARAMS):
    """One run, as the task script makes it; checks that exactly one results line was appended and returns it as saved."""
    before = len(results.read_text().splitlines()) if results.exists() else 0
    meta = json.loads((ckpt / "meta.json").read_text())
    argv = ["--net", meta["net"], "--dataset", meta["dataset"], "--weights", str(ckpt / "model.pt"),
            "--data-dir", str(data_dir), "--no-download", "--results", str(results), "--device", "cpu",
            "--wandb", "disabled", "--importance-cache", str(results.parent / "cache"), *SMALL, *extra]
    record = run_argv(scenario, argv, ssd_params)
    lines = results.read_text().splitlines()
    assert record is not None and len(lines) == before + 1
    saved = json.loads(lines[-1])
    assert saved["key"] == record["key"] and saved["config"]["scenario"] == scenario
    assert_finite(saved)
    return saved


def assert_finite(saved):
    m = saved["metrics"]
    for k in METRICS:
        assert isinstance(m[k], (int, float)) and math.isfinite(m[k]), f"{k} = {m[k]!r}"
    # random forgetting has no forget-test split; class scenarios must report it
    if saved["config"]["scenario"] == "random":
        assert m["forget_test_acc"] is None and m["n_forget_test"] == 0
    else:
        assert math.isfinite(m["forget_test_acc"]) and m["n_forget_test"] > 0
    assert all(math.isfinite(v) and v >= 0 for v in saved["times"].values())


# --- generated CIFAR: every method in every scenario ------------------------------------------------

@pytest.fixture(scope="module")
def small_cifar(tmp_path_factory):
    """A CIFAR root smaller than conftest's (3 images per CIFAR-100 fine class, 10 per CIFAR-10 class)
    and width-4 ResNets pretrained on it at 16x16: cifar20 for the class scenarios, cifar10 for random."""
    root = tmp_path_factory.mktemp("small_cifar")
    write_cifar(root, "cifar10", per_class_train=10, per_class_test=4)
    write_cifar(root, "cifar100", per_class_train=3, per_class_test=2)
    ckpt = tmp_path_factory.mktemp("small_cifar_ckpt")
    common = ["--net", "resnet18", "--width", "4", "--image-size", "16", "--data-dir", str(root)]
    return {"root": root,
            "cifar20": pretrain(ckpt / "c20", *common, "--dataset", "cifar20"),
            "cifar10": pretrain(ckpt / "c10", *common, "--dataset", "cifar10")}


CIFAR_SCENARIOS = {  # scenario -> (checkpoint, flags)
    "full_class": ("cifar20", ["--forget-class", "vehicle2"]),
    "sub_class": ("cifar20", ["--forget-class", "rocket"]),
    "random": ("cifar10", ["--forget-count", "20"]),
}


@pytest.mark.parametrize("method", sorted(methods.REGISTRY))
@pytest.mark.parametrize("scenario", list(CIFAR_SCENARIOS))
def test_every_method_runs_in_every_scenario_on_generated_cifar(small_cifar, tmp_path, scenario, method):
    which, flags = CIFAR_SCENARIOS[scenario]
    saved = forget(scenario, small_cifar[which], small_cifar["root"], tmp_path / "results.jsonl",
                   *flags, "--method", method)
    cfg, m = saved["config"], saved["metrics"]
    assert cfg["method"] == method and cfg["dataset"] == which
    if methods.REGISTRY[method].uses_alpha:  # the task script's constants
        assert (cfg["alpha"], cfg["lam"]) == SSD_PARAMS["resnet18"]
    else:  # a run's config holds its own method's hyperparameters only
        assert "alpha" not in cfg and "lam" not in cfg
    if scenario == "full_class":
        assert cfg["forget_class"] == "vehicles_2" and m["df"] == m["forget_test_acc"]
        assert m["n_forget_test"] == 5 * 2  # five fine classes, two test images each
    elif scenario == "sub_class":
        assert cfg["forget_class"] == "rocket" and m["df"] == m["forget_test_acc"] and m["n_forget_test"] == 2
    else:
        assert cfg["forget_class"] is None and m["n_forget_train"] == 20 and m["df"] == m["forget_train_acc"]


def test_sub_class_keeps_the_superclass_target_and_retains_its_siblings(small_cifar):
    data = datasets.build_data("cifar20", small_cifar["root"], image_size=16, download=False)
    s = datasets.build_splits("sub_class", data, "rocket")
    vehicles_2, rocket = datasets.CIFAR20_CLASSES.index("vehicles_2"), datasets.CIFAR100_CLASSES.index("rocket")
    train_fine, test_fine = data.train.fine, data.test.fine

    assert len(s.forget_idx) == (train_fine[data.train_idx] == rocket).sum() > 0
    assert (train_fine[s.forget_idx] == rocket).all() and (data.train.targets[s.forget_idx] == vehicles_2).all()
    assert not set(s.forget_idx) & set(s.retain_idx)
    assert sorted(np.concatenate([s.forget_idx, s.retain_idx])) == sorted(data.train_idx)
    assert s.forget_classes == []  # no target is forgotten as a whole
    _, target, fine = s.forget_train[0]
    assert (target, fine) == (vehicles_2, rocket)  # the model is still asked for the superclass
    for name in ROCKET_SIBLINGS:
        c = datasets.CIFAR100_CLASSES.index(name)
        assert datasets.CIFAR100_TO_20[c] == vehicles_2
        siblings = data.train_idx[train_fine[data.train_idx] == c]
        assert len(siblings) > 0 and set(siblings) <= set(s.retain_idx), name
        assert set(np.flatnonzero(test_fine == c)) <= set(s.retain_test_idx), name

    assert (test_fine[s.forget_test_idx] == rocket).all() and len(s.forget_test_idx) == (test_fine == rocket).sum()
    assert (data.test.targets[s.forget_test_idx] == vehicles_2).all()
    assert sorted(np.concatenate([s.forget_test_idx, s.retain_test_idx])) == list(range(len(data.test)))


# --- random forgetting: exact counts -----------------------------------------------------------------

def fake_data(n_train: int, n_test: int = 100) -> datasets.Data:
    """A Data with only labels: build_splits for random forgetting never reads an image."""
    train = datasets.LabeledImages(None, np.arange(n_train) % 10, None)
    test = datasets.LabeledImages(None, np.arange(n_test) % 10, None)
    return datasets.Data("fake", train, test, train, np.arange(n_train), np.array([], dtype=np.int64),
                         datasets.CIFAR10_CLASSES, datasets.CIFAR10_CLASSES, 32)


def test_paper_forget_fraction_gives_83_of_50000():
    assert datasets.random_split_count(50_000, 0.00165) == 83
    data = fake_data(50_000)
    s = datasets.build_splits("random", data, seed=1, forget_fraction=0.00165)
    assert len(s.forget_idx) == 83 and len(set(s.forget_idx)) == 83 and len(s.retain_idx) == 50_000 - 83
    assert len(s.forget_test_idx) == 0 and s.df_split == "forget_train"


@pytest.mark.parametrize("count", [1, 20, 100, 2_499])
def test_forget_count_gives_exactly_n_samples_from_the_training_part(count):
    data = fake_data(5_000)
    data.train_idx, data.val_idx = np.arange(0, 5_000, 2), np.arange(1, 5_000, 2)  # odd indices are validation
    s = datasets.build_splits("random", data, seed=3, forget_count=count)
    assert len(s.forget_idx) == len(set(s.forget_idx)) == count and len(s.retain_idx) == 2_500 - count
    assert set(s.forget_idx) <= set(data.train_idx) and not set(s.forget_idx) & set(s.retain_idx)
    again = datasets.build_splits("random", data, seed=3, forget_count=count)
    assert np.array_equal(again.forget_idx, s.forget_idx)  # seeded


def test_forget_count_larger_than_the_training_part_is_a_user_error():
    data = fake_data(100)
    with pytest.raises(UserError, match="cannot forget 100 of 100"):
        datasets.build_splits("random", data, forget_count=100)


def test_forget_fraction_flag_reaches_the_split(small_cifar, tmp_path):
    argv = ["--net", "resnet18", "--dataset", "cifar10", "--weights", str(small_cifar["cifar10"] / "model.pt"),
            "--data-dir", str(small_cifar["root"]), "--no-download", "--results", str(tmp_path / "r.jsonl"),
            "--forget-fraction", "0.1"]
    p = plan_argv("random", argv)
    n = len(p.data.train_idx)
    assert len(p.splits.forget_idx) == datasets.random_split_count(n, 0.1) > 0
    assert p.record_config["forget_fraction"] == 0.1


# --- the tiny ViT, end to end -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_checkpoints(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("vit_ckpt")
    common = ["--net", "vit", "--vit-config", "tiny", "--image-size", "16"]
    return {name: pretrain(ckpt / name, *common, "--dataset", name) for name in ("digits", "digits5")}


VIT_SCENARIOS = {
    "full_class": ("digits", ["--forget-class", "three"]),
    "sub_class": ("digits5", ["--forget-class", "three"]),
    "random": ("digits", ["--forget-count", "20"]),
}


@pytest.mark.parametrize("method", ["ssd", "lfssd"])
@pytest.mark.parametrize("scenario", list(VIT_SCENARIOS))
def test_tiny_vit_runs_end_to_end(vit_checkpoints, tmp_path, scenario, method):
    which, flags = VIT_SCENARIOS[scenario]
    meta = json.loads((vit_checkpoints[which] / "meta.json").read_text())
    assert meta["pretrained"] is False and meta["model_spec"]["vit_config"] == "tiny"
    assert meta["model_spec"]["vit_name"] is None  # nothing to look up on the hub
    saved = forget(scenario, vit_checkpoints[which], tmp_path, tmp_path / "results.jsonl", *flags, "--method", method)
    assert saved["config"]["net"] == "vit" and (saved["config"]["alpha"], saved["config"]["lam"]) == (5.0, 1.0)
    info, m = saved["method_info"], saved["metrics"]
    assert info["ratio_cap"] == pytest.approx((m["n_forget_train"] + m["n_retain_train"]) / m["n_forget_train"])
    assert info["max_ratio"] > 0 and (info["dampened"] > 0) == (info["max_ratio"] > 5.0 or info["zero_full_importance"] > 0)
    if scenario == "random":
        assert saved["metrics"]["n_forget_train"] == 20


# --- the pretrained ViT, with only the hub call mocked ----------------------------------------------

TINY_HUB = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=8,
                image_size=16)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """from_pretrained redirected to a tiny 1000-class 'ImageNet' model saved locally: the real loading
    (head replaced, backbone kept) still runs, only the download is gone. Records every call."""
    local = tmp_path / "hub"
    torch.manual_seed(123)
    hub_model = ViTForImageClassification(ViTConfig(num_labels=1000, **TINY_HUB))
    hub_model.save_pretrained(local)
    real = ViTForImageClassification.from_pretrained
    calls = []

    def fake(name, *args, **kwargs):
        calls.append((name, args, kwargs))
        return real(local, *args, **kwargs)

    monkeypatch.setattr(ViTForImageClassification, "from_pretrained", staticmethod(fake))
    return hub_model, calls


def test_pretrained_vit_loads_by_name_and_replaces_the_head(fake_hub):
    hub_model, calls = fake_hub
    spec = models.make_spec("vit", 7, 224)  # ViT-base: loaded by name when pretrained
    assert spec["vit_name"] == models.VIT_DEFAULT_NAME
    model = models.build(spec, pretrained=True)

    (name, args, kwargs), = calls
    assert name == models.VIT_DEFAULT_NAME and args == ()
    assert kwargs == {"num_labels": 7, "ignore_mismatched_sizes": True}
    assert isinstance(model, models.ViT)
    head = model.head()
    assert (head.out_features, head.in_features) == (7, TINY_HUB["hidden_size"])
    hub_state = hub_model.state_dict()
    for k, v in model.vit.state_dict().items():  # the backbone is the hub's, the head is new
        if not k.startswith("classifier."):
            assert torch.equal(v, hub_state[k]), k
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 7)

    # initial() seeds the new head, so retrain from the pretrained weights is reproducible
    a, b = models.initial(spec, True, seed=5), models.initial(spec, True, seed=5)
    assert torch.equal(a.head().weight, b.head().weight) and len(calls) == 3


def test_building_a_vit_without_pretrained_never_touches_the_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained called")

    monkeypatch.setattr(ViTForImageClassification, "from_pretrained", staticmethod(refuse))
    # a ViT-base spec carries a hub name, yet loading its checkpoint must build from the config
    base = models.make_spec("vit", 3, 32)
    assert base["vit_name"] == models.VIT_DEFAULT_NAME
    model = models.build(base)
    cfg = model.vit.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.patch_size, cfg.num_labels) == (768, 12, 16, 3)
    tiny = models.build(models.make_spec("vit", 4, 16, vit_config="tiny"), pretrained=True)  # no name: config
    assert tiny.head().out_features == 4 and tiny(torch.zeros(1, 3, 16, 16)).shape == (1, 4)


# --- faces: an image folder with identities ---------------------------------------------------------

IDENTITIES = ("Alice", "Bob", "Carol Ann", "dave")  # the real folders mix spaces and case


@pytest.fixture(scope="module")
def faces_root(tmp_path_factory):
    """4 identities x 10 images of assorted sizes and formats, one folder each, as PinsFaceRecognition."""
    root = tmp_path_factory.mktemp("faces_data")
    rng = np.random.default_rng(0)
    for k, who in enumerate(IDENTITIES):
        folder = root / "faces" / f"pins_{who}"
        folder.mkdir(parents=True)
        for i in range(10):
            h, w = 20 + i, 18 + 2 * k
            pixels = np.clip(rng.normal(60 * k + 40, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            if i < 2:  # a grey and an RGBA image too: the loader must give RGB
                image.convert("L" if i == 0 else "RGBA").save(folder / f"{i}.png")
            else:
                image.save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def _split_files(data):
    """(train files, test files) behind a faces Data, through the subsets that hold them."""
    files = lambda ds: [ds.source.dataset.samples[i][0] for i in ds.source.indices]  # noqa: E731
    return files(data.train), files(data.test)


def test_faces_split_is_seeded_stratified_and_disjoint(faces_root):
    data = datasets.build_data("faces", faces_root, image_size=16)
    assert data.classes == [f"pins_{who}" for who in IDENTITIES] and data.num_classes == 4
    assert len(data.train) == 32 and len(data.test) == 8
    train_files, test_files = _split_files(data)
    assert not set(train_files) & set(test_files) and len(set(train_files) | set(test_files)) == 40
    assert np.bincount(data.train.targets).tolist() == [8] * 4 and np.bincount(data.test.targets).tolist() == [2] * 4
    for files, targets in ((train_files, data.train.targets), (test_files, data.test.targets)):
        assert all(f.split("/")[-2] == data.classes[t] for f, t in zip(files, targets))  # labels follow folders
    assert set(data.train.targets[data.val_idx]) == set(range(4))  # the validation split is stratified too
    for i in range(len(data.train)):  # every image is RGB and resized, whatever its size and mode
        assert data.train[i][0].shape == (3, 16, 16)

    again = datasets.build_data("faces", faces_root, image_size=16)
    assert _split_files(again) == (train_files, test_files)
    assert np.array_equal(again.train_idx, data.train_idx) and np.array_equal(again.val_idx, data.val_idx)
    other = datasets.build_data("faces", faces_root, image_size=16, split_seed=1)
    assert _split_files(other) != (train_files, test_files)  # the seed is what fixes it


@pytest.mark.parametrize("name, index", [("pins_Bob", 1), ("Bob", 1), ("bob", 1), ("1", 1), ("Carol Ann", 2),
                                         ("pins_dave", 3), ("Dave", 3)])
def test_an_identity_can_be_forgotten_by_folder_name_bare_name_or_index(faces_root, name, index):
    data = datasets.build_data("faces", faces_root, image_size=16)
    s = datasets.build_splits("full_class", data, name)
    targets = data.train.targets
    assert s.forget_classes == [index]
    assert (targets[s.forget_idx] == index).all() and (targets[s.retain_idx] != index).all()
    assert len(s.forget_idx) == (targets[data.train_idx] == index).sum() > 0
    assert (data.test.targets[s.forget_test_idx] == index).all() and len(s.forget_test_idx) == 2


def test_faces_full_class_ssd_end_to_end_uses_the_face_constants(faces_root, tmp_path):
    ckpt = pretrain(tmp_path / "ckpt", "--dataset", "faces", "--data-dir", str(faces_root), "--image-size", "16",
                    "--width", "4")
    assert forget_full_class_main.SSD_PARAMS[("resnet18", "faces")] == (50.0, 0.1)
    saved = forget("full_class", ckpt, faces_root, tmp_path / "results.jsonl", "--forget-class", "Bob",
                   "--method", "ssd", ssd_params=forget_full_class_main.SSD_PARAMS)
    assert (saved["config"]["alpha"], saved["config"]["lam"]) == (50.0, 0.1)
    assert saved["config"]["forget_class"] == "pins_Bob"
    assert saved["metrics"]["n_forget_test"] == 2 and saved["metrics"]["n_forget_train"] > 0
