"""Unlearning methods: one registry, one signature.

    @register(FinetuneParams)
    def finetune(model, splits, hp: FinetuneParams, ctx: RunContext) -> (model, info)

Each method is one function registered with a small dataclass of its own hyperparameters (defaults
and one-line help), declared just above it. The task scripts turn every field into a flag
(`finetune_epochs` -> `--finetune-epochs`), and a run's key holds the chosen method's fields only,
so adding a method or a flag touches this file alone and changes no other run's key.

`model` is the original model (already on ctx.device), `splits` the forget/retain split of the
scenario, `ctx` what every method may know about the run. `info` is a dict of extra numbers for the
results line (keys ending in `_s` are timings). Scenario differences arrive only through `splits`;
no method asks which scenario it is in.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset
from tqdm import tqdm

import datasets
import models
import ssd as ssd_lib
from common import Number, UserError, array_sha256, non_negative_float, non_negative_int, positive_float, positive_int
from datasets import Splits
from training import Recipe, autocast, loader, predict, train, train_and_select


@dataclass
class RunContext:
    """What a method may know about its run besides its own hyperparameters."""

    device: torch.device
    seed: int
    batch_size: int  # of the importance passes and of the methods that train (the paper code's -b)
    amp: bool
    recipe: dict  # the original model's pretraining recipe (training.Recipe as a dict)
    model_spec: dict
    pretrained: bool  # whether the original started from pretrained weights (ViT)
    checkpoint_sha256: str | None
    importance_cache: str | None = None  # folder of cached I_D; None or "" turns the cache off


MOMENTUM = Number(float, 0, 1, high_open=True)
SHARE = Number(float, 0, 1)


def hyper(default, help: str, **flag) -> field:
    """A hyperparameter: its default, its one-line help, and optional settings: `type`, its range (a
    common.Number; needed when the default is None), `choices`, `flag` for another flag name, and
    `by_scenario`, the defaults by scenario of a field whose default is None."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class NoParams:
    pass


@dataclass
class Method:
    fn: Callable
    params: type  # the dataclass of the method's hyperparameters

    @property
    def param_names(self) -> list[str]:
        return [f.name for f in fields(self.params)]

    @property
    def uses_alpha(self) -> bool:
        """SSD family: alpha and lambda default to the task script's SSD_PARAMS."""
        return "alpha" in self.param_names


REGISTRY: dict[str, Method] = {}


def register(params: type = NoParams):
    def add(fn):
        REGISTRY[fn.__name__] = Method(fn, params)
        return fn
    return add


@register()
def baseline(model: nn.Module, splits: Splits, hp: NoParams, ctx: RunContext):
    """The original model, unchanged: the reference every other row is compared with."""
    return model, {}


RETRAIN_EPOCHS = "retrain and retrain_paper: shorten the schedule to this many epochs (default: the pretraining's)"


@dataclass
class RetrainParams:
    retrain_epochs: int | None = hyper(None, RETRAIN_EPOCHS, type=Number(int, 0))


@register(RetrainParams)
def retrain(model: nn.Module, splits: Splits, hp: RetrainParams, ctx: RunContext):
    """The gold standard: every parameter back to its initial value, then the pretraining recipe on
    the retain set, with the epoch selected on the retain part of the validation split, as the
    original model was. 'Initial' is random for ResNet and the ImageNet weights for a pretrained ViT."""
    models.reinitialise_(model, ctx.model_spec, ctx.pretrained, seed=ctx.seed + 1)
    recipe = _retrain_recipe(ctx, hp.retrain_epochs)
    model, info = train_and_select(model, splits.retain_train_aug, recipe, ctx.device, splits.retain_val,
                                   seed=ctx.seed, amp=ctx.amp, desc="retrain")
    return model, {"retrain_epochs": recipe.epochs, **info}


def _retrain_recipe(ctx: RunContext, epochs: int | None, **overrides) -> Recipe:
    """The pretraining recipe, shortened to `epochs` when given (0 included)."""
    recipe = Recipe(**{**ctx.recipe, **overrides})
    if epochs is not None:  # a shortened schedule keeps the milestones that still fall inside it
        recipe.epochs = epochs
        recipe.milestones = [m for m in recipe.milestones if m < recipe.epochs]
    return recipe


@dataclass
class RetrainPaperParams(RetrainParams):
    retrain_paper_lr: float = hyper(0.01, "retrain_paper: SGD learning rate (the paper code's fit_one_cycle value)",
                                    type=positive_float)


@register(RetrainPaperParams)
def retrain_paper(model: nn.Module, splits: Splits, hp: RetrainPaperParams, ctx: RunContext):
    """'retrain' as the SSD paper's code ran it, kept to reproduce that row of its tables; it is not a
    true retrain. Only the classifier head is re-initialised (the paper's code reset the children of
    the model that had `reset_parameters`, which for its networks was the head alone), so the body
    still holds everything it learned from D_f. Then the pretraining schedule (epochs, milestones,
    warm-up, gamma) runs on the retain set without augmentation, with SGD at --retrain-paper-lr
    (0.01, the paper code's default) and --batch-size (its -b). --retrain-epochs shortens it too."""
    models.reset_head_(model, seed=ctx.seed + 1)
    recipe = _retrain_recipe(ctx, hp.retrain_epochs, lr=hp.retrain_paper_lr, optimizer="sgd",
                             batch_size=ctx.batch_size)
    train(model, splits.retain_train, recipe, ctx.device, seed=ctx.seed, amp=ctx.amp, desc="retrain_paper")
    return model, {"retrain_epochs": recipe.epochs}


def _plain_recipe(epochs: int, lr: float, batch_size: int, optimizer: str = "sgd", momentum: float = 0.9,
                  weight_decay: float = 0.0) -> Recipe:
    """A constant learning rate: no warm-up, no milestones, as the baselines' original loops had."""
    return Recipe(epochs=epochs, lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
                  batch_size=batch_size, warmup_epochs=0, milestones=[])


@dataclass
class FinetuneParams:
    finetune_epochs: int = hyper(5, "finetune: epochs on the retain set", type=positive_int)
    finetune_lr: float = hyper(0.02, "finetune: constant SGD learning rate", type=positive_float)
    finetune_momentum: float = hyper(0.9, "finetune: SGD momentum", type=MOMENTUM)
    finetune_weight_decay: float = hyper(5e-4, "finetune: SGD weight decay", type=non_negative_float)


@register(FinetuneParams)
def finetune(model: nn.Module, splits: Splits, hp: FinetuneParams, ctx: RunContext):
    """Fine-tune on the retain set (no augmentation): SGD at a constant --finetune-lr with momentum and
    weight decay, --finetune-epochs epochs of --batch-size; no warm-up, no schedule, as the paper's
    code. Forgetting comes only from catastrophic interference."""
    recipe = _plain_recipe(hp.finetune_epochs, hp.finetune_lr, ctx.batch_size, "sgd", hp.finetune_momentum,
                           hp.finetune_weight_decay)
    train(model, splits.retain_train, recipe, ctx.device, seed=ctx.seed, amp=ctx.amp, desc="finetune")
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


@dataclass
class BadTeacherParams:
    bt_epochs: int = hyper(1, "bad_teacher: distillation epochs", type=positive_int)
    bt_lr: float = hyper(1e-4, "bad_teacher: Adam learning rate", type=positive_float)
    bt_batch_size: int = hyper(256, "bad_teacher: batch size (the paper code lowered it to 128 for ViT to fit in "
                                    "memory)", type=positive_int)
    bt_retain_fraction: float = hyper(0.3, "bad_teacher: random fraction of D_r distilled from the original model",
                                      type=SHARE)
    bt_temperature: float = hyper(1.0, "bad_teacher: KL temperature", type=positive_float)


@register(BadTeacherParams)
def bad_teacher(model: nn.Module, splits: Splits, hp: BadTeacherParams, ctx: RunContext):
    """Bad Teacher (Chundawat et al., AAAI 2023): a student copy of the model is distilled with KL at
    --bt-temperature towards a randomly initialised teacher on D_f and towards the original model
    (frozen) on a random --bt-retain-fraction of D_r; Adam, --bt-epochs epochs of --bt-batch-size."""
    student = copy.deepcopy(model)
    good = model.eval()  # the original model, frozen (only ever run under no_grad); the student is returned
    bad = models.initial(ctx.model_spec, pretrained=False, seed=ctx.seed + 3).to(ctx.device).eval()
    retain = _random_subset(splits.retain_train, hp.bt_retain_fraction, ctx.seed)
    ds = ConcatDataset([Flagged(splits.forget_train, 1), Flagged(retain, 0)])
    dl = loader(ds, hp.bt_batch_size, ctx.device, shuffle=True, seed=ctx.seed)
    opt = torch.optim.Adam(student.parameters(), lr=hp.bt_lr)
    temp = hp.bt_temperature
    for epoch in range(hp.bt_epochs):
        student.train()
        bar = tqdm(dl, desc=f"bad_teacher {epoch + 1}/{hp.bt_epochs}", leave=False, mininterval=2)
        for x, is_forget in bar:
            x, is_forget = x.to(ctx.device, non_blocking=True), is_forget.to(ctx.device).float().unsqueeze(1)
            with torch.no_grad(), autocast(ctx.device, ctx.amp):
                p_good = F.softmax(good(x).float() / temp, dim=1)
                p_bad = F.softmax(bad(x).float() / temp, dim=1)
            target = is_forget * p_bad + (1 - is_forget) * p_good
            with autocast(ctx.device, ctx.amp):
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


@dataclass
class AmnesiacParams:
    amnesiac_epochs: int = hyper(3, "amnesiac: epochs on relabelled D_f plus D_r", type=positive_int)
    amnesiac_lr: float = hyper(1e-4, "amnesiac: Adam learning rate", type=positive_float)
    amnesiac_batch_size: int = hyper(128, "amnesiac: batch size", type=positive_int)


@register(AmnesiacParams)
def amnesiac(model: nn.Module, splits: Splits, hp: AmnesiacParams, ctx: RunContext):
    """Amnesiac unlearning (Graves et al., AAAI 2021), as the Bad Teacher code ran it: D_f gets seeded
    random wrong targets (for sub-class that is automatically another superclass), then the model
    trains on relabelled D_f together with D_r: Adam, --amnesiac-epochs of --amnesiac-batch-size."""
    true = splits.data.train.targets[splits.forget_idx]
    new = random_other_labels(true, splits.num_classes, ctx.seed)
    ds = ConcatDataset([Relabeled(splits.forget_train, new), splits.retain_train])
    recipe = _plain_recipe(hp.amnesiac_epochs, hp.amnesiac_lr, hp.amnesiac_batch_size, "adam")
    train(model, ds, recipe, ctx.device, seed=ctx.seed, amp=ctx.amp, desc="amnesiac")
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


def _unsir_noise(model: nn.Module, noise_targets: list[int], shape: tuple, hp: "UnsirParams", ctx: RunContext):
    """UNSIR's error-maximising noise, one batch per target: Adam on the noise to raise the
    cross-entropy towards the target, with an L2 penalty that keeps it bounded. The model stays in
    eval mode, so batch norm neither normalises with the noise's statistics nor stores them (the
    original ran this in train mode, which overwrote the running statistics with the noise's).

    All targets are learned together, in passes of whole targets. In eval mode no sample sees
    another, the loss is the sum over targets of each target's own means, and Adam is elementwise,
    so each noise element follows the same path as when the targets were learned one after the
    other (the original's order), up to float rounding."""
    model.eval()
    gen = torch.Generator().manual_seed(ctx.seed)
    n = hp.unsir_noise_batch
    noise = torch.cat([torch.randn(n, *shape, generator=gen) for _ in noise_targets]).to(ctx.device)
    targets = torch.tensor(noise_targets, dtype=torch.long).repeat_interleave(n)
    y = targets.to(ctx.device)
    per_pass = n * max(1, NOISE_IMAGES_PER_PASS // n)
    opt = torch.optim.Adam([noise], lr=hp.unsir_noise_lr)
    for _ in tqdm(range(hp.unsir_noise_steps), desc=f"unsir noise for {len(noise_targets)} targets", leave=False,
                  mininterval=2):
        grads = []
        for part, part_y in zip(noise.split(per_pass), y.split(per_pass)):
            part = part.detach().requires_grad_(True)
            with autocast(ctx.device, ctx.amp):
                logits = model(part)
            # per target: -mean cross-entropy + l2 * mean squared norm; summed over the targets
            ce = F.cross_entropy(logits.float(), part_y, reduction="sum") / n
            l2 = part.pow(2).sum() / n
            grads += torch.autograd.grad(-ce + hp.unsir_noise_l2 * l2, [part])  # the noise only, not the model
        noise.grad = torch.cat(grads)
        opt.step()
    return noise.cpu(), targets


def first_per_class(idx: np.ndarray, targets: np.ndarray, n: int) -> np.ndarray:
    """The first `n` indices of each target among `idx` (in index order), as the original took them."""
    t = targets[idx]
    return np.sort(np.concatenate([idx[t == c][:n] for c in np.unique(t)]))


@dataclass
class UnsirParams:
    unsir_noise_steps: int | None = hyper(None, "unsir: Adam steps that learn the noise (paper code: 25 full class, "
                                              "250 sub-class; random, which the original lacks, takes 25)",
                                          by_scenario={"full_class": 25, "sub_class": 250, "random": 25},
                                          type=non_negative_int)
    unsir_noise_lr: float = hyper(0.1, "unsir: Adam learning rate of the noise", type=positive_float)
    unsir_noise_l2: float = hyper(0.1, "unsir: weight of the noise's mean squared L2 norm",
                                  type=non_negative_float)
    unsir_noise_batch: int = hyper(32, "unsir: noise images per noise target. Targets: the forgotten class (full "
                                       "class), the forgotten fine class's superclass (sub-class); for random "
                                       "forgetting, which the original does not define, every target among the "
                                       "forgotten samples gets its own noise, so nearly every class is impaired and "
                                       "repaired", type=positive_int)
    unsir_noise_copies: int = hyper(80, "unsir: times each noise image appears in the impair epoch", type=positive_int)
    unsir_retain_per_class: int = hyper(500, "unsir: first samples of each target of D_r used to impair and repair",
                                        type=positive_int)
    unsir_optimizer: str = hyper("sgd", "unsir: optimizer of impair and repair (the SSD paper's code used adam at "
                                        "1e-4 for both; UNSIR's own notebook adam at 0.02 and 0.01)",
                                 choices=["sgd", "adam"])
    unsir_momentum: float = hyper(0.9, "unsir: SGD momentum (ignored by adam)", type=MOMENTUM)
    unsir_lr: float = hyper(0.02, "unsir: impair learning rate (UNSIR paper)", type=positive_float)
    unsir_batch_size: int = hyper(32, "unsir: impair batch size", type=positive_int)
    unsir_repair_lr: float = hyper(0.01, "unsir: repair learning rate (UNSIR paper)", type=positive_float)
    unsir_repair_batch_size: int = hyper(128, "unsir: repair batch size", type=positive_int)


@register(UnsirParams)
def unsir(model: nn.Module, splits: Splits, hp: UnsirParams, ctx: RunContext):
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
    noise, noise_y = _unsir_noise(model, noise_targets, shape, hp, ctx)
    t1 = time.perf_counter()
    retain = Subset(splits.data.train, first_per_class(splits.retain_idx, targets, hp.unsir_retain_per_class).tolist())
    impair = ConcatDataset([NoiseImages(noise, noise_y, hp.unsir_noise_copies), retain])
    recipe = _plain_recipe(1, hp.unsir_lr, hp.unsir_batch_size, hp.unsir_optimizer, hp.unsir_momentum)
    train(model, impair, recipe, ctx.device, seed=ctx.seed, amp=ctx.amp, desc="unsir impair")
    t2 = time.perf_counter()
    recipe = _plain_recipe(1, hp.unsir_repair_lr, hp.unsir_repair_batch_size, hp.unsir_optimizer,
                           hp.unsir_momentum)
    train(model, retain, recipe, ctx.device, seed=ctx.seed + 1, amp=ctx.amp, desc="unsir repair")
    t3 = time.perf_counter()
    return model, {"noise_s": t1 - t0, "impair_s": t2 - t1, "repair_s": t3 - t2, "noise_targets": len(noise_targets),
                   "noise_samples": len(impair) - len(retain), "retain_subset": len(retain)}


def _importance(model: nn.Module, ds: Dataset, ctx: RunContext, variant: str, desc: str) -> ssd_lib.Importances:
    """One importance pass over `ds` in its own order (the loader never shuffles: see importance_order)."""
    dl = loader(ds, ctx.batch_size, ctx.device)
    if variant == "ssd_per_sample":
        return ssd_lib.importance_per_sample(model, dl, ctx.device, amp=ctx.amp, desc=desc)
    return ssd_lib.importance(model, dl, ctx.device, variant, amp=ctx.amp, desc=desc)


def ssd_importances(model: nn.Module, splits: Splits, order: str, ctx: RunContext, variant: str = "ssd"
                    ) -> tuple[ssd_lib.Importances, ssd_lib.Importances, dict]:
    """I_D (cached) and I_Df, with D and D_f read in `order` (datasets.importance_order).

    I_D depends only on the model, the samples of D in their batch order and the importance settings,
    so it is cached on disk under exactly that key: in the shuffled order D is the same for every
    request and I_D is computed once per checkpoint, as the paper's Algorithm 1 does; in the paper's
    order D ends with the forget samples, so I_D is computed once per request. The per-sample
    importance depends on neither batch order nor batch size, so its key holds the set of samples."""
    per_sample = variant == "ssd_per_sample"
    d_order, f_order = datasets.importance_order(splits, order, ctx.seed)
    key = {"checkpoint": ctx.checkpoint_sha256, "dataset": splits.data.name, "image_size": splits.data.image_size,
           "variant": variant, "amp": bool(ctx.amp), "batch_size": None if per_sample else ctx.batch_size,
           "samples": array_sha256(np.sort(d_order) if per_sample else d_order)}
    t0 = time.perf_counter()
    imp_full, cache_hit = ssd_lib.cached_importance(
        ctx.importance_cache if ctx.checkpoint_sha256 else None, key,
        lambda: _importance(model, Subset(splits.data.train, d_order.tolist()), ctx, variant, "importance D"))
    t1 = time.perf_counter()
    imp_forget = _importance(model, Subset(splits.data.train, f_order.tolist()), ctx, variant, "importance Df")
    t2 = time.perf_counter()
    return imp_full, imp_forget, {"importance_full_s": t1 - t0, "importance_forget_s": t2 - t1,
                                  "cache_hit": cache_hit, "importance_order": "any" if per_sample else order,
                                  "ratio_cap": len(d_order) / len(f_order)}


def _ssd(model: nn.Module, splits: Splits, hp, ctx: RunContext, variant: str):
    imp_full, imp_forget, info = ssd_importances(model, splits, getattr(hp, "importance_order", "paper"), ctx, variant)
    report = ssd_lib.dampen(model, imp_full, imp_forget, hp.alpha, hp.lam)
    return model, {**info, **report.summary()}


ALPHA = ("SSD selection threshold: dampen where I_Df > alpha * I_D; inf selects nothing (default: the task "
         "script's SSD_PARAMS)")
LAMBDA = "SSD dampening constant: multiply by min(lambda * I_D / I_Df, 1) (default: the task script's SSD_PARAMS)"


@dataclass
class PerSampleParams:  # per-sample importances do not depend on which samples share a batch
    alpha: float | None = hyper(None, ALPHA, type=Number(float, 0, inf=True))
    lam: float | None = hyper(None, LAMBDA, type=non_negative_float, flag="--lambda")


def order_hyper() -> field:
    """--importance-order, shared by every method that computes SSD's batch-mean importances."""
    return hyper("paper", "which samples share a batch in the importance passes (part of SSD's definition, since "
                          "each batch's mean gradient is squared). paper: the SSD code's unshuffled D = retain samples "
                          "class by class, then the forget samples, which caps I_Df/I_D near |D|/|D_f|; shuffled: D "
                          "and D_f shuffled, no cap, so the same alpha dampens far more",
                 choices=list(datasets.IMPORTANCE_ORDERS))


@dataclass
class SSDParams(PerSampleParams):
    importance_order: str = order_hyper()


@register(SSDParams)
def ssd(model: nn.Module, splits: Splits, hp: SSDParams, ctx: RunContext):
    """Selective Synaptic Dampening with cross-entropy importances."""
    return _ssd(model, splits, hp, ctx, "ssd")


@register(SSDParams)
def lfssd(model: nn.Module, splits: Splits, hp: SSDParams, ctx: RunContext):
    """Loss-free SSD (Schoepf et al.): importances from |grad| of the squared logit norm; no labels."""
    return _ssd(model, splits, hp, ctx, "lfssd")


@register(PerSampleParams)
def ssd_per_sample(model: nn.Module, splits: Splits, hp: PerSampleParams, ctx: RunContext):
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
    return _ssd(model, splits, hp, ctx, "ssd_per_sample")


@dataclass
class AssdParams:
    importance_order: str = order_hyper()


@register(AssdParams)
def assd(model: nn.Module, splits: Splits, hp: AssdParams, ctx: RunContext):
    """Adaptive SSD (Schoepf, Foster, Brintrup 2024, arXiv 2402.10098): SSD with alpha chosen per request.

    alpha is the p-th percentile (numpy's linear interpolation) of I_Df / I_D over every parameter
    element with a finite ratio, p = 100 - ln(1 + 100 |D_f| / |D|), and lambda = 1: about 0.7% of the
    elements are dampened when D_f is 1% of D, 2.4% when it is 10%. I_D is computed on D, as SSD does
    (cached, in --importance-order), where ASSD's notebook uses the retain set."""
    imp_full, imp_forget, info = ssd_importances(model, splits, hp.importance_order, ctx, "ssd")
    percentile = 100 - math.log(1 + 100 / info["ratio_cap"])  # ratio_cap = |D| / |D_f|
    ratios = ssd_lib.importance_ratios(imp_full, imp_forget)
    if len(ratios) == 0:
        raise UserError("no parameter element has a finite I_Df / I_D, so ASSD cannot choose alpha "
                        "(the full-data importances are all zero: check the model)")
    alpha = float(np.percentile(ratios, percentile))
    report = ssd_lib.dampen(model, imp_full, imp_forget, alpha, 1.0)
    return model, {**info, **report.summary(), "chosen_alpha": alpha, "percentile": percentile, "lambda": 1.0}


SEARCH_START_DIVISOR = 25  # Potion's first selection fraction: (|D_f| / |D|) / 25
SEARCH_GROWTH = 1.1  # Potion's step: the fraction grows by 10%
GUARD_SAMPLES = 2000  # retain-validation images the guard evaluates at each step


def _guard_subset(ds: Subset, n: int = GUARD_SAMPLES) -> Subset:
    """A fixed (seed 0) random subset of at most n items of `ds`, so each step's guard costs a bounded pass."""
    if len(ds) <= n:
        return ds
    pick = np.sort(np.random.default_rng(0).choice(len(ds), n, replace=False))
    return Subset(ds.dataset, [ds.indices[i] for i in pick])


def _accuracy(model: nn.Module, ds: Dataset, ctx: RunContext) -> float:
    """Accuracy in percent from the exact count of hits. The search compares it with its target, where
    ties are common (4 of 40 is exactly 10%); training.accuracy's float32 mean, the formula of the stored
    metrics, would put 4/40 a hair above 10% and decide such a tie the other way."""
    logits, y = predict(model, ds, ctx.device, amp=ctx.amp, desc="search eval")
    return 100.0 * int((logits.argmax(1) == y).sum()) / max(len(y), 1)


@dataclass
class SearchParams:
    search_rho: float = hyper(0.1, "ssd_search: class scenarios stop once forget-train accuracy <= rho x the "
                                   "original's (random forgetting stops at the original's validation accuracy "
                                   "instead)", type=SHARE)
    search_max_retain_drop: float = hyper(5.0, "ssd_search: the guard; no step may fall more than this many points "
                                               "below the original's accuracy on (at most 2,000 of) the "
                                               "retain-validation images", type=non_negative_float)
    search_max_steps: int = hyper(500, "ssd_search: most selection fractions on Potion's grid (|D_f|/|D|/25 x "
                                       "1.1^k, below 1)", type=positive_int)
    search_strategy: str = hyper("gallop", "ssd_search: geometric is Potion's walk up the grid one step at a "
                                           "time; gallop probes steps 0, 1, 3, 7, ... and bisects the last gap, "
                                           "which finds the same step in fewer probes when forget and retain "
                                           "accuracy fall monotonically with the dampened fraction",
                                 choices=["gallop", "geometric"])
    importance_order: str = order_hyper()


@register(SearchParams)
def ssd_search(model: nn.Module, splits: Splits, hp: SearchParams, ctx: RunContext):
    """Potion's search for alpha (Schoepf, Foster, Brintrup 2024, arXiv 2406.09173), with a target
    that needs no test data and a guard on the retained classes.

    The importances are computed once (as ssd: I_D cached, --importance-order). On Potion's grid of
    selection fractions s = (|D_f| / |D|) / 25 * 1.1**k below 1 (at most --search-max-steps), alpha is
    the (1 - s) quantile of I_Df / I_D (ssd.alpha_for_fraction) and lambda is 1; each step dampens a
    fresh copy of the original model. The search stops at the first step that meets the target:
    - class scenarios: forget-train accuracy <= --search-rho x the original's;
    - random forgetting: forget-train accuracy <= the original's accuracy on the validation images,
      which is what a model that never saw D_f scores.
    The guard evaluates a fixed subset of at most 2,000 retain-validation images at each step and
    never accepts a step more than --search-max-retain-drop points below the original's accuracy there.
    Status: target_reached; guard_hit (the guard stopped the search first: the last step it passed
    is returned, or the original model if none did); target_unreachable (no step meets the target
    and every step passed the guard, e.g. D_f has zero gradients, so nothing is selected or beta = 1:
    the last step is returned). --search-strategy gallop (see search_grid) finds the step Potion's
    walk (geometric) finds in fewer probes. Only D_f and the validation split are evaluated, never
    the test set."""
    rho, max_drop = hp.search_rho, hp.search_max_retain_drop
    max_steps, strategy = hp.search_max_steps, hp.search_strategy
    imp_full, imp_forget, info = ssd_importances(model, splits, hp.importance_order, ctx, "ssd")
    t0 = time.perf_counter()
    guard = _guard_subset(splits.retain_val)
    if len(guard) == 0:
        raise UserError("ssd_search needs validation images for its guard, and the checkpoint has none "
                        "(pretrain with a validation fraction above 0)")
    forget0, retain0 = _accuracy(model, splits.forget_train, ctx), _accuracy(model, guard, ctx)
    target = rho * forget0 if splits.forget_classes or splits.scenario != "random" else retain0
    floor = retain0 - max_drop
    fractions = ssd_lib.search_fractions(1 / info["ratio_cap"] / SEARCH_START_DIVISOR, SEARCH_GROWTH, max_steps)
    ratios = ssd_lib.importance_ratios(imp_full, imp_forget)
    # the same numbers as ssd.alpha_for_fraction(s) for each s, from one sort of the ratios
    alphas = np.percentile(ratios, 100 * (1 - fractions)) if len(ratios) else np.full(len(fractions), np.inf)
    accuracies = {}

    def probe(k: int) -> tuple[bool, bool]:
        trial = copy.deepcopy(model)
        ssd_lib.dampen(trial, imp_full, imp_forget, float(alphas[k]), 1.0)
        retain = _accuracy(trial, guard, ctx)
        if retain < floor:  # the guard decides alone: the forget pass can be skipped
            return False, False
        accuracies[k] = _accuracy(trial, splits.forget_train, ctx), retain
        return accuracies[k][0] <= target, True

    if forget0 <= target:  # nothing to do: the original already scores what the target asks
        chosen, status, probes = None, "target_reached", 0
    else:
        chosen, status, probes = ssd_lib.search_grid(probe, len(fractions), strategy)
    alpha = float(alphas[chosen]) if chosen is not None else float("inf")
    report = ssd_lib.dampen(model, imp_full, imp_forget, alpha, 1.0)
    forget_acc, retain_acc = accuracies[chosen] if chosen is not None else (forget0, retain0)
    return model, {**info, **report.summary(), "search_status": status, "search_steps": probes,
                   "search_strategy": strategy, "search_grid": len(fractions),
                   "chosen_alpha": alpha if chosen is not None else None,
                   "selection_fraction": float(fractions[chosen]) if chosen is not None else 0.0,
                   "lambda": 1.0, "original_forget_train_acc": forget0, "forget_train_acc": forget_acc,
                   "target_forget_train_acc": target, "original_retain_val_acc": retain0,
                   "retain_val_acc": retain_acc, "guard_samples": len(guard), "search_s": time.perf_counter() - t0}
