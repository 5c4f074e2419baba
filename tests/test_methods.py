"""The baselines of issue 3 and SSD's per-sample importance, on tiny models and tiny digit splits."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

import datasets
import methods
import models
import runner
import ssd
import training

from conftest import SCENARIO_FIELDS, method_args

SCENARIOS = {scenario: ("digits5" if scenario == "sub_class" else "digits", fields)
             for scenario, fields in SCENARIO_FIELDS.items()}
# Only the amount of work is cut; every other hyperparameter keeps its CLI default.
SMALL = dict(finetune_epochs=1, amnesiac_epochs=1, unsir_noise_steps=4, unsir_noise_batch=8, unsir_noise_copies=3,
             unsir_retain_per_class=10)


@pytest.fixture(scope="module")
def tiny_splits():
    """scenario -> Splits over ~200 training digits of 8x8 pixels."""
    out, cache = {}, {}
    for scenario, (name, fields) in SCENARIOS.items():
        if name not in cache:
            data = datasets.build_data(name, image_size=8)
            cache[name] = dataclasses.replace(data, train_idx=data.train_idx[::6])
        forget_class = fields.get("forget_class")
        out[scenario] = datasets.build_splits(scenario, cache[name], forget_class, seed=0, forget_count=12)
    return out


def trained_like(spec: dict, seed: int = 0) -> torch.nn.Module:
    """A model whose every parameter and batch-norm statistic differs from a fresh initialisation."""
    model = models.initial(spec, pretrained=False, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for n, b in model.named_buffers():
            if n.endswith("running_mean"):
                b.add_(0.1 * torch.randn(b.shape, generator=gen))
            elif n.endswith("running_var"):
                b.mul_(1 + 0.5 * torch.rand(b.shape, generator=gen))
    return model.eval()


class Spy:
    """Stands in for a training or loading function: records the calls, optionally passes them on."""

    def __init__(self, fn=None, record=None):
        self.fn, self.record, self.calls = fn, record, []

    def __call__(self, *args, **kwargs):
        self.calls.append(self.record(*args, **kwargs) if self.record else (args, kwargs))
        return self.fn(*args, **kwargs) if self.fn else args[0]


# --- SSD's per-sample importance -----------------------------------------------------------------

def _importance_setup(n: int = 40):
    torch.manual_seed(0)
    model = trained_like(models.make_spec("resnet18", 5, 8, width=4)).double().eval()
    x, y = torch.randn(n, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (n,))
    return model, TensorDataset(x, y, y)


def test_per_sample_importance_ignores_batch_size_and_order():
    model, ds = _importance_setup()
    cpu = torch.device("cpu")
    ref = ssd.importance_per_sample(model, DataLoader(ds, batch_size=64), cpu)
    shuffled = DataLoader(ds, batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(1))
    for dl in (DataLoader(ds, batch_size=1), DataLoader(ds, batch_size=7), shuffled):
        imp = ssd.importance_per_sample(model, dl, cpu)
        assert imp.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(imp[n], ref[n], rtol=1e-5, atol=0)
    assert any(t.abs().sum() > 0 for t in ref.values())
    # the paper's batch-mean estimate does depend on the batch size, so the check above can fail
    bm1 = ssd.importance(model, DataLoader(ds, batch_size=1), cpu)
    bm7 = ssd.importance(model, DataLoader(ds, batch_size=7), cpu)
    assert not torch.allclose(bm1["fc.weight"], bm7["fc.weight"], rtol=1e-2)


def test_per_sample_importance_equals_batch_mean_with_one_sample_per_batch():
    model, ds = _importance_setup()
    cpu = torch.device("cpu")
    batch_mean = ssd.importance(model, DataLoader(ds, batch_size=1), cpu, "ssd")
    per_sample = ssd.importance_per_sample(model, DataLoader(ds, batch_size=16), cpu)
    assert batch_mean.keys() == per_sample.keys()
    for n in batch_mean:
        scale = float(batch_mean[n].abs().max())
        torch.testing.assert_close(per_sample[n], batch_mean[n], rtol=1e-4, atol=1e-6 * scale)


def test_per_sample_importance_keeps_batch_norm_statistics():
    model, ds = _importance_setup()
    before = copy.deepcopy(model.state_dict())
    model.train()  # the function must switch to eval itself
    ssd.importance_per_sample(model, DataLoader(ds, batch_size=8), torch.device("cpu"))
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- retrain and retrain_paper -------------------------------------------------------------------

def test_retrain_reinitialises_every_parameter(tiny_splits):
    splits = tiny_splits["full_class"]
    hp, ctx = method_args("retrain", "full_class", splits.num_classes, retrain_epochs=0)
    model = trained_like(ctx.model_spec)
    original = copy.deepcopy(model.state_dict())
    model, info = methods.retrain(model, splits, hp, ctx)
    assert info["retrain_epochs"] == 0  # 0 means no training, not the full schedule
    fresh = models.initial(ctx.model_spec, pretrained=False, seed=ctx.seed + 1).state_dict()
    for n, p in model.named_parameters():
        assert not torch.equal(p, original[n]), f"{n} was not re-initialised"
        assert torch.equal(p, fresh[n])


def test_retrain_paper_resets_only_the_head_before_training(tiny_splits, monkeypatch):
    splits = tiny_splits["full_class"]
    hp, ctx = method_args("retrain_paper", "full_class", splits.num_classes,
                          recipe=training.Recipe(epochs=3, milestones=[2], batch_size=32).as_dict())
    spy = Spy(record=lambda model, ds, recipe, *a, **k: (copy.deepcopy(model.state_dict()), ds, recipe))
    monkeypatch.setattr(methods, "train", spy)
    model = trained_like(ctx.model_spec)
    original = copy.deepcopy(model.state_dict())
    methods.retrain_paper(model, splits, hp, ctx)

    (state, ds, recipe), = spy.calls
    head = {f"fc.{n}" for n, _ in model.head().named_parameters()}
    assert head == {"fc.weight", "fc.bias"}
    for k, v in state.items():
        if k in head:
            assert not torch.equal(v, original[k]), f"head tensor {k} was not reset"
        else:
            assert torch.equal(v, original[k]), f"{k} changed before training"
    # the retain set without augmentation, with the paper code's SGD at 0.01 on the pretraining schedule
    assert ds.dataset is splits.data.train and list(ds.indices) == splits.retain_idx.tolist()
    assert (recipe.optimizer, recipe.lr, recipe.epochs, recipe.milestones) == ("sgd", 0.01, 3, [2])
    assert recipe.batch_size == ctx.batch_size


# --- amnesiac ------------------------------------------------------------------------------------

def test_random_other_labels_is_never_the_true_label():
    targets = np.random.default_rng(0).integers(0, 4, size=4000)
    new = methods.random_other_labels(targets, 4, seed=1)
    assert new.shape == targets.shape and (new != targets).all()
    assert new.min() >= 0 and new.max() <= 3
    for t in range(4):  # every other label is used, about equally often
        counts = np.bincount(new[targets == t], minlength=4)
        assert counts[t] == 0 and np.delete(counts, t).min() > 0.25 * counts.sum()
    assert (methods.random_other_labels(targets, 4, seed=1) == new).all()  # seeded


@pytest.mark.parametrize("scenario", ["full_class", "sub_class", "random"])
def test_amnesiac_trains_on_wrong_forget_labels_and_true_retain_labels(tiny_splits, monkeypatch, scenario):
    splits = tiny_splits[scenario]
    spy = Spy(record=lambda model, ds, recipe, *a, **k: (ds, recipe))
    monkeypatch.setattr(methods, "train", spy)
    hp, ctx = method_args("amnesiac", scenario, splits.num_classes, **SMALL)
    methods.amnesiac(trained_like(ctx.model_spec), splits, hp, ctx)
    (ds, recipe), = spy.calls
    assert len(ds) == len(splits.forget_idx) + len(splits.retain_idx)
    labels = np.array([y for _, y, _ in ds])
    true_forget = splits.data.train.targets[splits.forget_idx]
    assert (labels[:len(true_forget)] != true_forget).all()
    assert (labels[len(true_forget):] == splits.data.train.targets[splits.retain_idx]).all()
    assert (recipe.optimizer, recipe.lr, recipe.batch_size, recipe.epochs) == ("adam", 1e-4, 128, 1)


# --- data stays on disk --------------------------------------------------------------------------

def _is_sample(v) -> bool:
    return isinstance(v, torch.Tensor) or (isinstance(v, tuple) and any(isinstance(e, torch.Tensor) for e in v))


def _holds_tensor_list(obj, depth: int = 0) -> bool:
    """Whether a dataset, or any dataset it wraps, keeps samples in a Python list (as the original
    code's `random.sample(ds, k)` and `trainset.append((x, y))` did)."""
    if depth > 10:
        return False
    if isinstance(obj, list):
        return any(_is_sample(v) or _holds_tensor_list(v, depth + 1) for v in obj)
    if isinstance(obj, Dataset):
        return any(_holds_tensor_list(v, depth + 1) for v in vars(obj).values())
    return False


@pytest.fixture
def fetches(monkeypatch):
    """Counts images read from the dataset and records each DataLoader's dataset with the count at its
    creation: a method that gathers samples into memory reads them all before its loader exists."""
    count = {"n": 0}
    real_getitem = datasets.LabeledImages.__getitem__

    def counting_getitem(self, i):
        count["n"] += 1
        return real_getitem(self, i)

    monkeypatch.setattr(datasets.LabeledImages, "__getitem__", counting_getitem)
    spy = Spy(fn=training.loader, record=lambda ds, *a, **k: (ds, count["n"]))
    monkeypatch.setattr(training, "loader", spy)
    monkeypatch.setattr(methods, "loader", spy)
    return count, spy.calls


def test_bad_teacher_streams_its_data(tiny_splits, fetches):
    count, loaders = fetches
    splits = tiny_splits["full_class"]
    hp, ctx = method_args("bad_teacher", "full_class", splits.num_classes)
    model = trained_like(ctx.model_spec)
    original = copy.deepcopy(model.state_dict())
    student, info = methods.bad_teacher(model, splits, hp, ctx)

    (ds, read_before), = loaders
    expected = len(splits.forget_idx) + int(0.3 * len(splits.retain_idx))
    assert isinstance(ds, Dataset) and len(ds) == expected == len(splits.forget_idx) + info["retain_subset"]
    assert not _holds_tensor_list(ds)
    assert read_before == 0 and count["n"] == expected  # each image read once, when its batch is drawn
    flags = [flag for _, flag in ds]  # D_f goes to the bad teacher, D_r to the original model
    assert flags == [1] * len(splits.forget_idx) + [0] * info["retain_subset"]
    assert student is not model and all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_unsir_streams_its_data(tiny_splits, fetches):
    count, loaders = fetches
    splits = tiny_splits["sub_class"]
    hp, ctx = method_args("unsir", "sub_class", splits.num_classes, **SMALL)
    _, info = methods.unsir(trained_like(ctx.model_spec), splits, hp, ctx)

    (impair, read_impair), (repair, read_repair) = loaders
    retain = info["retain_subset"]
    per_class = np.bincount(splits.data.train.targets[splits.retain_idx])
    assert retain == np.minimum(per_class[per_class > 0], hp.unsir_retain_per_class).sum()
    assert info["noise_targets"] == 1  # the superclass of the forgotten digit
    noise = hp.unsir_noise_batch * hp.unsir_noise_copies
    assert isinstance(impair, Dataset) and len(impair) == noise + retain and info["noise_samples"] == noise
    assert isinstance(repair, Dataset) and len(repair) == retain
    assert not _holds_tensor_list(impair) and not _holds_tensor_list(repair)
    assert read_impair <= 1  # at most the one image that gives the noise its shape
    assert read_repair == read_impair + retain and count["n"] == read_impair + 2 * retain
    for part in impair.datasets:  # the retain part is a view of the training set, not a copy
        assert isinstance(part, (methods.NoiseImages, Subset))


def test_holds_tensor_list_detects_materialised_data():
    x = torch.zeros(3, 2)
    assert _holds_tensor_list([(x[0], 1), (x[1], 0)])
    assert _holds_tensor_list(ConcatDataset([TensorDataset(x), Subset([(x[0], 1)], [0])]))
    assert not _holds_tensor_list(ConcatDataset([TensorDataset(x), Subset(TensorDataset(x), [0, 2])]))


# --- UNSIR's noise -------------------------------------------------------------------------------

def test_unsir_learns_noise_without_touching_batch_norm_statistics(tiny_splits, monkeypatch):
    splits = tiny_splits["full_class"]
    hp, ctx = method_args("unsir", "full_class", splits.num_classes, **SMALL)
    spy = Spy(record=lambda model, ds, recipe, *a, **k: (copy.deepcopy(model.state_dict()), ds, recipe))
    monkeypatch.setattr(methods, "train", spy)
    model = trained_like(ctx.model_spec).train()
    original = copy.deepcopy(model.state_dict())
    methods.unsir(model, splits, hp, ctx)

    (state, impair, recipe), (_, repair, repair_recipe) = spy.calls
    assert all(torch.equal(v, original[k]) for k, v in state.items())  # buffers included
    noise = impair.datasets[0]
    assert set(noise.targets.tolist()) == set(splits.forget_classes)
    assert noise.noise.shape == (hp.unsir_noise_batch, 3, 8, 8) and torch.isfinite(noise.noise).all()
    assert not torch.equal(noise[0][0], noise[1][0]) and torch.equal(noise[0][0], noise[hp.unsir_noise_batch][0])
    assert (recipe.optimizer, recipe.lr, recipe.epochs) == ("sgd", 0.02, 1)
    assert (repair_recipe.lr, repair_recipe.epochs) == (0.01, 1) and repair is impair.datasets[1]


def _noise_one_target_at_a_time(model, noise_targets, shape, hp, seed):
    """The reference: each target's noise learned alone, by its own Adam, as the original did."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in noise_targets:
        noise = torch.randn(hp.unsir_noise_batch, *shape, generator=gen).requires_grad_(True)
        y = torch.full((hp.unsir_noise_batch,), t, dtype=torch.long)
        opt = torch.optim.Adam([noise], lr=hp.unsir_noise_lr)
        for _ in range(hp.unsir_noise_steps):
            l2 = noise.pow(2).flatten(1).sum(dim=1).mean()
            loss = -torch.nn.functional.cross_entropy(model(noise), y) + hp.unsir_noise_l2 * l2
            noise.grad, = torch.autograd.grad(loss, [noise])
            opt.step()
        out.append(noise.detach())
    return torch.cat(out)


@pytest.mark.parametrize("per_pass", [8, 16, 1000], ids=["one-target-per-pass", "two-per-pass", "all-in-one-pass"])
def test_unsir_noise_learned_together_equals_one_target_at_a_time(monkeypatch, per_pass):
    hp, ctx = method_args("unsir", "random", 5, **{**SMALL, "unsir_noise_steps": 6}, seed=3)
    model = trained_like(ctx.model_spec)
    monkeypatch.setattr(methods, "NOISE_IMAGES_PER_PASS", per_pass)
    targets = [0, 2, 3, 4]
    noise, noise_y = methods._unsir_noise(model, targets, (3, 8, 8), hp, ctx)
    expected = _noise_one_target_at_a_time(model, targets, (3, 8, 8), hp, ctx.seed)
    assert noise_y.tolist() == [t for t in targets for _ in range(hp.unsir_noise_batch)]
    gen = torch.Generator().manual_seed(ctx.seed)
    start = torch.randn(noise.shape, generator=gen)
    assert (noise - start).abs().mean() > 0.01  # the noise was learned, not left as drawn
    torch.testing.assert_close(noise, expected, rtol=1e-5, atol=1e-5)


def test_unsir_noise_steps_default_depends_on_the_scenario():
    flags = {"full_class": ["--forget-class", "3"], "sub_class": ["--forget-class", "3"], "random": []}
    for how in ("python", "argv"):
        steps = {s: (runner.RunConfig(s, method="unsir", **f).resolve() if how == "python" else
                     runner.RunConfig.from_argv(s, flags[s] + ["--method", "unsir"])).hp.unsir_noise_steps
                 for s, (_, f) in SCENARIOS.items()}
        assert steps == {"full_class": 25, "sub_class": 250, "random": 25}


# --- every method --------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("method", sorted(methods.REGISTRY))
def test_every_method_runs_and_gives_finite_outputs(tiny_splits, scenario, method):
    splits = tiny_splits[scenario]
    hp, ctx = method_args(method, scenario, splits.num_classes, **SMALL)
    model, info = methods.REGISTRY[method].fn(trained_like(ctx.model_spec), splits, hp, ctx)
    assert isinstance(model, torch.nn.Module) and isinstance(info, dict)
    assert all(isinstance(v, float) for k, v in info.items() if k.endswith("_s"))  # the runner records them as times
    logits, _ = training.predict(model, Subset(splits.data.test, list(range(40))), ctx.device)
    assert logits.shape == (40, splits.num_classes) and torch.isfinite(logits).all()
