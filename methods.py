"""Unlearning methods: one registry, one signature.

    fn(model, splits, cfg) -> (model, info)

`model` is the original model (already on cfg.device), `splits` the forget/retain split of the
scenario, `cfg` the run's parsed flags plus `device`, `model_spec`, `pretrained`, `recipe` (the
pretraining recipe) and `checkpoint_sha256`. `info` is a dict of extra numbers for the results line
(sub-timings, counts). Scenario differences arrive only through `splits`; no method asks which
scenario it is in.
"""
from __future__ import annotations

import time
from argparse import Namespace
from pathlib import Path

import torch
from torch import nn

import models
import ssd as ssd_lib
from common import atomic_torch_save
from datasets import Splits
from training import Recipe, loader, train

REGISTRY = {}


def register(fn):
    REGISTRY[fn.__name__] = fn
    return fn


@register
def baseline(model: nn.Module, splits: Splits, cfg: Namespace):
    """The original model, unchanged: the reference every other row is compared with."""
    return model, {}


@register
def retrain(model: nn.Module, splits: Splits, cfg: Namespace):
    """The gold standard: every parameter back to its initial value, then the pretraining recipe on
    the retain set. 'Initial' is random for ResNet and the ImageNet weights for a pretrained ViT."""
    models.reinitialise_(model, cfg.model_spec, cfg.pretrained, seed=cfg.seed + 1)
    recipe = Recipe(**{**cfg.recipe, **({"epochs": cfg.retrain_epochs} if cfg.retrain_epochs else {})})
    if cfg.retrain_epochs:  # a shortened schedule keeps the milestones that still fall inside it
        recipe.milestones = [m for m in recipe.milestones if m < recipe.epochs]
    train(model, splits.retain_train_aug, recipe, cfg.device, seed=cfg.seed, amp=cfg.amp, desc="retrain")
    return model, {"retrain_epochs": recipe.epochs}


def _full_importance(model: nn.Module, splits: Splits, cfg: Namespace, variant: str):
    """I_D, from the on-disk cache when this checkpoint, data and settings were seen before.

    I_D depends only on the model, the data and the importance settings, so the paper's Algorithm 1
    computes it once per model; the paper's code recomputed it on every request."""
    key = {"checkpoint": cfg.checkpoint_sha256, "dataset": splits.data.name, "split": splits.data.split_hash(),
           "batch_size": cfg.batch_size, "image_size": splits.data.image_size, "variant": variant,
           "amp": bool(cfg.amp), "shuffle_seed": 0}
    path = None
    if cfg.importance_cache and cfg.checkpoint_sha256:
        name = "-".join(str(v) for v in (cfg.checkpoint_sha256[:16], splits.data.name, splits.data.split_hash(),
                                         cfg.batch_size, splits.data.image_size, variant, int(bool(cfg.amp))))
        path = Path(cfg.importance_cache) / f"{name}.pt"
        if path.exists():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
                if stored.get("key") == key:
                    return stored["importance"], True
                print(f"warning: importance cache {path} was made for another setup; recomputing")
            except Exception as e:  # a truncated or foreign file is recomputed, never trusted
                print(f"warning: unreadable importance cache {path} ({type(e).__name__}); recomputing")
    # Shuffled with a fixed seed so that batches mix classes (sorted image folders would not) and
    # the result does not depend on the run's seed, which keeps it cacheable.
    dl = loader(splits.full_train, cfg.batch_size, cfg.device, shuffle=True, seed=0)
    imp = ssd_lib.importance(model, dl, cfg.device, variant, amp=cfg.amp, desc="importance D")
    if path is not None:
        atomic_torch_save({"key": key, "importance": imp}, path)
    return imp, False


def _ssd(model: nn.Module, splits: Splits, cfg: Namespace, variant: str):
    t0 = time.perf_counter()
    imp_full, cache_hit = _full_importance(model, splits, cfg, variant)
    t1 = time.perf_counter()
    dl = loader(splits.forget_train, cfg.batch_size, cfg.device, shuffle=True, seed=cfg.seed)
    imp_forget = ssd_lib.importance(model, dl, cfg.device, variant, amp=cfg.amp, desc="importance Df")
    t2 = time.perf_counter()
    report = ssd_lib.dampen(model, imp_full, imp_forget, cfg.alpha, cfg.lam)
    return model, {"importance_full_s": t1 - t0, "importance_forget_s": t2 - t1, "cache_hit": cache_hit,
                   "dampened": report.total, "dampened_fraction": report.total / max(report.num_elements, 1)}


@register
def ssd(model: nn.Module, splits: Splits, cfg: Namespace):
    """Selective Synaptic Dampening with cross-entropy importances."""
    return _ssd(model, splits, cfg, "ssd")


@register
def lfssd(model: nn.Module, splits: Splits, cfg: Namespace):
    """Loss-free SSD (Schoepf et al.): importances from |grad| of the squared logit norm; no labels."""
    return _ssd(model, splits, cfg, "lfssd")
