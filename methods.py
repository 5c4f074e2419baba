"""Unlearning methods: one registry, one signature.

    fn(model, splits, cfg) -> (model, info)

`model` is the original model (already on cfg.device), `splits` the forget/retain split of the
scenario, `cfg` the run's parsed flags plus `device`, `model_spec`, `pretrained`, `recipe` (the
pretraining recipe) and `checkpoint_sha256`. `info` is a dict of extra numbers for the results line
(sub-timings, counts). Scenario differences arrive only through `splits`; no method asks which
scenario it is in.
"""
from __future__ import annotations

import copy
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset
from tqdm import tqdm

import models
import ssd as ssd_lib
from common import UserError, atomic_torch_save
from datasets import Splits
from training import Recipe, autocast, loader, train, train_and_select

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
    the retain set, with the epoch selected on the retain part of the validation split, as the
    original model was. 'Initial' is random for ResNet and the ImageNet weights for a pretrained ViT."""
    models.reinitialise_(model, cfg.model_spec, cfg.pretrained, seed=cfg.seed + 1)
    recipe = _retrain_recipe(cfg)
    model, info = train_and_select(model, splits.retain_train_aug, recipe, cfg.device, splits.retain_val,
                                   seed=cfg.seed, amp=cfg.amp, desc="retrain")
    return model, {"retrain_epochs": recipe.epochs, **info}


def _retrain_recipe(cfg: Namespace, **overrides) -> Recipe:
    """The pretraining recipe, shortened by --retrain-epochs when given (0 included)."""
    recipe = Recipe(**{**cfg.recipe, **overrides})
    if cfg.retrain_epochs is not None:  # a shortened schedule keeps the milestones that still fall inside it
        recipe.epochs = cfg.retrain_epochs
        recipe.milestones = [m for m in recipe.milestones if m < recipe.epochs]
    return recipe


@register
def retrain_paper(model: nn.Module, splits: Splits, cfg: Namespace):
    """'retrain' as the SSD paper's code ran it, kept to reproduce that row of its tables; it is not a
    true retrain. Only the classifier head is re-initialised (the paper's code reset the children of
    the model that had `reset_parameters`, which for its networks was the head alone), so the body
    still holds everything it learned from D_f. Then the pretraining schedule (epochs, milestones,
    warm-up, gamma) runs on the retain set without augmentation, with SGD at --retrain-paper-lr
    (0.01, the paper code's default) and --batch-size (its -b). --retrain-epochs shortens it too."""
    models.reset_head_(model, seed=cfg.seed + 1)
    recipe = _retrain_recipe(cfg, lr=cfg.retrain_paper_lr, optimizer="sgd", batch_size=cfg.batch_size)
    train(model, splits.retain_train, recipe, cfg.device, seed=cfg.seed, amp=cfg.amp, desc="retrain_paper")
    return model, {"retrain_epochs": recipe.epochs}


def _plain_recipe(epochs: int, lr: float, batch_size: int, optimizer: str = "sgd", momentum: float = 0.9,
                  weight_decay: float = 0.0) -> Recipe:
    """A constant learning rate: no warm-up, no milestones, as the baselines' original loops had."""
    return Recipe(epochs=epochs, lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
                  batch_size=batch_size, warmup_epochs=0, milestones=[])


@register
def finetune(model: nn.Module, splits: Splits, cfg: Namespace):
    """Fine-tune on the retain set (no augmentation): SGD at a constant --finetune-lr with momentum and
    weight decay, --finetune-epochs epochs of --batch-size; no warm-up, no schedule, as the paper's
    code. Forgetting comes only from catastrophic interference."""
    recipe = _plain_recipe(cfg.finetune_epochs, cfg.finetune_lr, cfg.batch_size, "sgd", cfg.finetune_momentum,
                           cfg.finetune_weight_decay)
    train(model, splits.retain_train, recipe, cfg.device, seed=cfg.seed, amp=cfg.amp, desc="finetune")
    return model, {}


class Flagged(Dataset):
    """`(x, flag)` for every item of `ds`; the flag says which teacher the sample is distilled to."""

    def __init__(self, ds: Dataset, flag: int):
        self.ds, self.flag = ds, flag

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i][0], self.flag


def _random_subset(ds: Dataset, fraction: float, seed: int) -> Subset:
    """A seeded random `int(fraction * len)` of `ds`, as indices: nothing is loaded here."""
    pick = np.random.default_rng(seed).choice(len(ds), int(fraction * len(ds)), replace=False)
    return Subset(ds, np.sort(pick).tolist())


@register
def bad_teacher(model: nn.Module, splits: Splits, cfg: Namespace):
    """Bad Teacher (Chundawat et al., AAAI 2023): a student copy of the model is distilled with KL at
    --bt-temperature towards a randomly initialised teacher on D_f and towards the original model
    (frozen) on a random --bt-retain-fraction of D_r; Adam, --bt-epochs epochs of --bt-batch-size."""
    student = copy.deepcopy(model)
    good = model.eval()  # the original model, frozen (only ever run under no_grad); the student is returned
    bad = models.initial(cfg.model_spec, pretrained=False, seed=cfg.seed + 3).to(cfg.device).eval()
    retain = _random_subset(splits.retain_train, cfg.bt_retain_fraction, cfg.seed)
    ds = ConcatDataset([Flagged(splits.forget_train, 1), Flagged(retain, 0)])
    dl = loader(ds, cfg.bt_batch_size, cfg.device, shuffle=True, seed=cfg.seed)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.bt_lr)
    temp = cfg.bt_temperature
    for epoch in range(cfg.bt_epochs):
        student.train()
        bar = tqdm(dl, desc=f"bad_teacher {epoch + 1}/{cfg.bt_epochs}", leave=False, mininterval=2)
        for x, is_forget in bar:
            x, is_forget = x.to(cfg.device, non_blocking=True), is_forget.to(cfg.device).float().unsqueeze(1)
            with torch.no_grad(), autocast(cfg.device, cfg.amp):
                p_good = F.softmax(good(x).float() / temp, dim=1)
                p_bad = F.softmax(bad(x).float() / temp, dim=1)
            target = is_forget * p_bad + (1 - is_forget) * p_good
            with autocast(cfg.device, cfg.amp):
                logits = student(x)
            loss = F.kl_div(F.log_softmax(logits.float() / temp, dim=1), target, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return student.eval(), {"retain_subset": len(retain)}


def random_other_labels(targets: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """For each target, a label drawn uniformly from the other num_classes - 1: never the target."""
    if num_classes < 2:
        raise UserError(f"relabelling needs at least two classes, the model has {num_classes}")
    targets = np.asarray(targets, dtype=np.int64)
    r = np.random.default_rng(seed).integers(0, num_classes - 1, size=len(targets))
    return r + (r >= targets)  # skip over the true target


class Relabeled(Dataset):
    """`ds` with the target of item i replaced by `targets[i]`; the image and fine label are kept."""

    def __init__(self, ds: Dataset, targets: np.ndarray):
        assert len(ds) == len(targets)
        self.ds, self.targets = ds, np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        x, _, fine = self.ds[i]
        return x, int(self.targets[i]), fine


@register
def amnesiac(model: nn.Module, splits: Splits, cfg: Namespace):
    """Amnesiac unlearning (Graves et al., AAAI 2021), as the Bad Teacher code ran it: D_f gets seeded
    random wrong targets (for sub-class that is automatically another superclass), then the model
    trains on relabelled D_f together with D_r: Adam, --amnesiac-epochs of --amnesiac-batch-size."""
    true = splits.data.train.targets[splits.forget_idx]
    new = random_other_labels(true, splits.num_classes, cfg.seed)
    ds = ConcatDataset([Relabeled(splits.forget_train, new), splits.retain_train])
    recipe = _plain_recipe(cfg.amnesiac_epochs, cfg.amnesiac_lr, cfg.amnesiac_batch_size, "adam")
    train(model, ds, recipe, cfg.device, seed=cfg.seed, amp=cfg.amp, desc="amnesiac")
    return model, {"relabelled": len(new)}


class NoiseImages(Dataset):
    """A learned noise batch served `copies` times over without copying it; items `(x, target, -1)`
    (noise has no fine label)."""

    def __init__(self, noise: torch.Tensor, targets: torch.Tensor, copies: int):
        assert len(noise) == len(targets)
        self.noise, self.targets, self.copies = noise, targets, copies

    def __len__(self) -> int:
        return self.copies * len(self.noise)

    def __getitem__(self, i: int):
        j = i % len(self.noise)
        return self.noise[j], int(self.targets[j]), -1


# Noise images per forward pass while learning UNSIR's noise: whole targets at a time, about the
# memory of a training batch, so a ViT with many noise targets still fits on one GPU.
NOISE_IMAGES_PER_PASS = 128


def _unsir_noise(model: nn.Module, noise_targets: list[int], shape: tuple, cfg: Namespace):
    """UNSIR's error-maximising noise, one batch per target: Adam on the noise to raise the
    cross-entropy towards the target, with an L2 penalty that keeps it bounded. The model stays in
    eval mode, so batch norm neither normalises with the noise's statistics nor stores them (the
    original ran this in train mode, which overwrote the running statistics with the noise's).

    All targets are learned together, in passes of whole targets. In eval mode no sample sees
    another, the loss is the sum over targets of each target's own means, and Adam is elementwise,
    so each noise element follows the same path as when the targets were learned one after the
    other (the original's order), up to float rounding."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.unsir_noise_batch
    noise = torch.cat([torch.randn(n, *shape, generator=gen) for _ in noise_targets]).to(cfg.device)
    targets = torch.tensor(noise_targets, dtype=torch.long).repeat_interleave(n)
    y = targets.to(cfg.device)
    per_pass = n * max(1, NOISE_IMAGES_PER_PASS // n)
    opt = torch.optim.Adam([noise], lr=cfg.unsir_noise_lr)
    for _ in tqdm(range(cfg.unsir_noise_steps), desc=f"unsir noise for {len(noise_targets)} targets", leave=False,
                  mininterval=2):
        grads = []
        for part, part_y in zip(noise.split(per_pass), y.split(per_pass)):
            part = part.detach().requires_grad_(True)
            with autocast(cfg.device, cfg.amp):
                logits = model(part)
            # per target: -mean cross-entropy + l2 * mean squared norm; summed over the targets
            ce = F.cross_entropy(logits.float(), part_y, reduction="sum") / n
            l2 = part.pow(2).sum() / n
            grads += torch.autograd.grad(-ce + cfg.unsir_noise_l2 * l2, [part])  # the noise only, not the model
        noise.grad = torch.cat(grads)
        opt.step()
    return noise.cpu(), targets


def first_per_class(idx: np.ndarray, targets: np.ndarray, n: int) -> np.ndarray:
    """The first `n` indices of each target among `idx` (in index order), as the original took them."""
    t = targets[idx]
    return np.sort(np.concatenate([idx[t == c][:n] for c in np.unique(t)]))


@register
def unsir(model: nn.Module, splits: Splits, cfg: Namespace):
    """UNSIR (Tarun et al., 'Fast Yet Effective Machine Unlearning', TNNLS 2023).

    1. Learn error-maximising noise (see _unsir_noise), --unsir-noise-batch images per noise target,
       --unsir-noise-steps Adam steps at --unsir-noise-lr with L2 weight --unsir-noise-l2.
    2. Impair: one epoch on the noise (each image --unsir-noise-copies times, labelled with its
       target) mixed with a retain subset, the first --unsir-retain-per-class samples of each target
       in D_r; --unsir-optimizer at --unsir-lr, batch --unsir-batch-size.
    3. Repair: one epoch on that retain subset at --unsir-repair-lr, batch --unsir-repair-batch-size.

    Noise targets are splits.forget_classes when whole classes are forgotten, else every target that
    occurs in D_f: for sub-class that is the superclass of the forgotten fine class. Random forgetting
    has no UNSIR in the original; here it follows the same rule, so every target present among the
    forgotten samples (with ~100 random samples, nearly every class) gets its own noise and is
    impaired, then repaired. That is an extrapolation, not the published method: expect it to hurt
    the retained classes more than it does for class forgetting.
    """
    t0 = time.perf_counter()
    targets = splits.data.train.targets
    noise_targets = [int(c) for c in (splits.forget_classes or np.unique(targets[splits.forget_idx]))]
    shape = tuple(splits.forget_train[0][0].shape)
    noise, noise_y = _unsir_noise(model, noise_targets, shape, cfg)
    t1 = time.perf_counter()
    retain = Subset(splits.data.train, first_per_class(splits.retain_idx, targets, cfg.unsir_retain_per_class).tolist())
    impair = ConcatDataset([NoiseImages(noise, noise_y, cfg.unsir_noise_copies), retain])
    recipe = _plain_recipe(1, cfg.unsir_lr, cfg.unsir_batch_size, cfg.unsir_optimizer, cfg.unsir_momentum)
    train(model, impair, recipe, cfg.device, seed=cfg.seed, amp=cfg.amp, desc="unsir impair")
    t2 = time.perf_counter()
    recipe = _plain_recipe(1, cfg.unsir_repair_lr, cfg.unsir_repair_batch_size, cfg.unsir_optimizer,
                           cfg.unsir_momentum)
    train(model, retain, recipe, cfg.device, seed=cfg.seed + 1, amp=cfg.amp, desc="unsir repair")
    t3 = time.perf_counter()
    return model, {"noise_s": t1 - t0, "impair_s": t2 - t1, "repair_s": t3 - t2, "noise_targets": len(noise_targets),
                   "noise_samples": len(impair) - len(retain), "retain_subset": len(retain)}


def _full_importance(model: nn.Module, splits: Splits, cfg: Namespace, variant: str):
    """I_D, from the on-disk cache when this checkpoint, data and settings were seen before.

    I_D depends only on the model, the data and the importance settings, so the paper's Algorithm 1
    computes it once per model; the paper's code recomputed it on every request."""
    # the per-sample importance does not depend on the batch size, so any batch size may reuse it
    batch_size = None if variant == "ssd_per_sample" else cfg.batch_size
    key = {"checkpoint": cfg.checkpoint_sha256, "dataset": splits.data.name, "split": splits.data.split_hash(),
           "batch_size": batch_size, "image_size": splits.data.image_size, "variant": variant,
           "amp": bool(cfg.amp), "shuffle_seed": 0}
    path = None
    if cfg.importance_cache and cfg.checkpoint_sha256:
        name = "-".join(str(v) for v in (cfg.checkpoint_sha256[:16], splits.data.name, splits.data.split_hash(),
                                         batch_size, splits.data.image_size, variant, int(bool(cfg.amp))))
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
    imp = _importance(model, dl, cfg, variant, desc="importance D")
    if path is not None:
        atomic_torch_save({"key": key, "importance": imp}, path)
    return imp, False


def _importance(model: nn.Module, dl, cfg: Namespace, variant: str, desc: str) -> ssd_lib.Importances:
    if variant == "ssd_per_sample":
        return ssd_lib.importance_per_sample(model, dl, cfg.device, amp=cfg.amp, desc=desc)
    return ssd_lib.importance(model, dl, cfg.device, variant, amp=cfg.amp, desc=desc)


def _ssd(model: nn.Module, splits: Splits, cfg: Namespace, variant: str):
    t0 = time.perf_counter()
    imp_full, cache_hit = _full_importance(model, splits, cfg, variant)
    t1 = time.perf_counter()
    dl = loader(splits.forget_train, cfg.batch_size, cfg.device, shuffle=True, seed=cfg.seed)
    imp_forget = _importance(model, dl, cfg, variant, desc="importance Df")
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


@register
def ssd_per_sample(model: nn.Module, splits: Splits, cfg: Namespace):
    """SSD with the textbook diagonal empirical Fisher: the mean over samples of each sample's squared
    gradient (ssd.importance_per_sample), then the same selection and dampening as ssd.

    Why this variant exists: the paper's estimate squares the gradient of each batch-mean loss, which
    adds cross terms between the samples of a batch, so I_D and I_Df (and what gets dampened) change
    with the batch size and with which samples share a batch; this one does not. With batches of one
    sample the two are the same.

    Alpha needs its own tuning: D_f is part of D and every per-sample term is non-negative, so
    I_Df / I_D <= |D| / |D_f| (about 10 when a tenth of the data is forgotten, e.g. one class of
    CIFAR-10), and an alpha at or above that bound selects nothing. The batch-mean estimate has no
    such bound, because gradients of mixed batches of D cancel and shrink I_D."""
    return _ssd(model, splits, cfg, "ssd_per_sample")
