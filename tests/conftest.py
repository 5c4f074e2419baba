"""Shared fixtures: generated CIFAR-format files and a tiny pretrained digits model. Nothing is downloaded."""
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import dataclasses  # noqa: E402

import datasets  # noqa: E402
import methods  # noqa: E402
import models  # noqa: E402
import runner  # noqa: E402
import training  # noqa: E402

# Two busy cores: more threads only fight each other (a tiny ResNet step goes from 10 ms to 1 s).
torch.set_num_threads(1)

SSD_PARAMS = {"resnet18": (10.0, 1.0), "vit": (5.0, 1.0)}  # what the task scripts hold, for tests


def run_argv(scenario: str, argv: list[str], ssd_params: dict = SSD_PARAMS) -> dict | None:
    """What `python <task script> <argv>` does, in-process, raising UserError instead of exiting."""
    return runner.execute(runner.RunConfig.from_argv(scenario, argv, ssd_params))


def plan_argv(scenario: str, argv: list[str], ssd_params: dict = SSD_PARAMS) -> runner.Plan:
    return runner.plan(runner.RunConfig.from_argv(scenario, argv, ssd_params))


SCENARIO_FIELDS = {"full_class": {"forget_class": "three"}, "sub_class": {"forget_class": "three"},
                   "random": {"forget_count": 12}}


def method_args(method: str, scenario: str = "full_class", num_classes: int = 10, image_size: int = 8,
                **overrides) -> tuple:
    """(hyperparameters, RunContext) for calling methods.REGISTRY[method].fn directly, as a run would:
    the method's defaults for the scenario, then `overrides`. An override naming a RunContext field
    goes to the context (a CPU run of a width-4 ResNet18 with a 1-epoch recipe); fields of other
    methods are ignored, so one dict of small settings serves every method."""
    config = runner.RunConfig(scenario, method=method, **SCENARIO_FIELDS[scenario]).resolve(SSD_PARAMS)
    values = dataclasses.asdict(config.hp)
    values.update({k: v for k, v in overrides.items() if k in values})
    ctx = methods.RunContext(device=torch.device("cpu"), seed=config.seed, batch_size=config.batch_size, amp=False,
                             recipe=training.Recipe(epochs=1, batch_size=32).as_dict(),
                             model_spec=models.make_spec("resnet18", num_classes, image_size, width=4),
                             pretrained=False, checkpoint_sha256=None, importance_cache=None)
    context_fields = {f.name for f in dataclasses.fields(methods.RunContext)}
    ctx = dataclasses.replace(ctx, **{k: v for k, v in overrides.items() if k in context_fields})
    return type(config.hp)(**values), ctx


@pytest.fixture()
def kept_results(tmp_path) -> Path:
    """A results file holding one earlier line, which a failing run must leave as it was."""
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "earlier", "metrics": {}}\n')
    return path


def write_cifar(root: Path, which: str, per_class_train: int, per_class_test: int, seed: int = 0) -> Path:
    """Random images in torchvision's on-disk CIFAR layout (python pickles), `per_class_*` per fine class."""
    rng = np.random.default_rng(seed)

    def batch(per_class, n_classes):
        labels = np.repeat(np.arange(n_classes), per_class)
        rng.shuffle(labels)
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        return data, labels.tolist()

    if which == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        data, labels = batch(per_class_train, 10)
        for i, part in enumerate(np.array_split(np.arange(len(labels)), 5), 1):
            with open(folder / f"data_batch_{i}", "wb") as f:
                pickle.dump({"data": data[part], "labels": [labels[j] for j in part]}, f)
        data, labels = batch(per_class_test, 10)
        with open(folder / "test_batch", "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({"label_names": datasets.CIFAR10_CLASSES}, f)
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, per_class in (("train", per_class_train), ("test", per_class_test)):
            data, labels = batch(per_class, 100)
            coarse = datasets.CIFAR100_TO_20[labels].tolist()
            with open(folder / name, "wb") as f:
                pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": coarse}, f)
        with open(folder / "meta", "wb") as f:
            pickle.dump({"fine_label_names": datasets.CIFAR100_CLASSES,
                         "coarse_label_names": datasets.CIFAR20_CLASSES}, f)
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, "cifar10", per_class_train=20, per_class_test=5)
    write_cifar(root, "cifar100", per_class_train=10, per_class_test=4)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A width-4 ResNet18 trained for two epochs on 16x16 digits: enough to run every code path."""
    import pretrain_model

    ckpt_dir = tmp_path_factory.mktemp("ckpt")
    return pretrain_model.main(["--dataset", "digits", "--width", "4", "--image-size", "16", "--epochs", "2",
                                "--milestones", "1", "--seed", "0", "--checkpoint-dir", str(ckpt_dir),
                                "--device", "cpu"])


@pytest.fixture(scope="session")
def digits5_checkpoint(tmp_path_factory) -> Path:
    """The same for digits5 (superclasses of two digits), which the sub-class scenario needs."""
    import pretrain_model

    return pretrain_model.main(["--dataset", "digits5", "--width", "4", "--image-size", "16", "--epochs", "1",
                                "--milestones", "--seed", "0", "--checkpoint-dir", str(tmp_path_factory.mktemp("d5")),
                                "--device", "cpu"])


@pytest.fixture()
def restore_determinism():
    """make_deterministic changes process-wide state; put it back for the other tests."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
    if saved[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]
