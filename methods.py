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
import math
import time
from argparse import Namespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset
from tqdm import tqdm

import datasets
import models
import ssd as ssd_lib
from common import UserError, array_sha256
from datasets import Splits
from training import Recipe, autocast, loader, predict, train, train_and_select

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


def _unsir_noise(model: nn.Module, noise_targets: list[int], shape: tuple, cfg: Namespace):
    """UNSIR's error-maximising noise, one batch per target: Adam on the noise to raise the
    cross-entropy towards the target, with an L2 penalty that keeps it bounded. The model stays in
    eval mode, so batch norm neither normalises with the noise's statistics nor stores them (the
    original ran this in train mode, which overwrote the running statistics with the noise's)."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = []
    for t in noise_targets:
        noise = torch.randn(cfg.unsir_noise_batch, *shape, generator=gen).to(cfg.device).requires_grad_(True)
        y = torch.full((cfg.unsir_noise_batch,), t, dtype=torch.long, device=cfg.device)
        opt = torch.optim.Adam([noise], lr=cfg.unsir_noise_lr)
        for _ in tqdm(range(cfg.unsir_noise_steps), desc=f"unsir noise for {t}", leave=False, mininterval=2):
            with autocast(cfg.device, cfg.amp):
                logits = model(noise)
            l2 = noise.pow(2).flatten(1).sum(dim=1).mean()
            loss = -F.cross_entropy(logits.float(), y) + cfg.unsir_noise_l2 * l2
            noise.grad, = torch.autograd.grad(loss, [noise])  # gradients for the noise only, none for the model
            opt.step()
        batches.append(noise.detach().cpu())
    targets = torch.tensor(noise_targets, dtype=torch.long).repeat_interleave(cfg.unsir_noise_batch)
    return torch.cat(batches), targets


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


def _importance(model: nn.Module, ds: Dataset, cfg: Namespace, variant: str, desc: str) -> ssd_lib.Importances:
    """One importance pass over `ds` in its own order (the loader never shuffles: see importance_order)."""
    dl = loader(ds, cfg.batch_size, cfg.device)
    if variant == "ssd_per_sample":
        return ssd_lib.importance_per_sample(model, dl, cfg.device, amp=cfg.amp, desc=desc)
    return ssd_lib.importance(model, dl, cfg.device, variant, amp=cfg.amp, desc=desc)


def ssd_importances(model: nn.Module, splits: Splits, cfg: Namespace, variant: str = "ssd"
                    ) -> tuple[ssd_lib.Importances, ssd_lib.Importances, dict]:
    """I_D (cached) and I_Df, with D and D_f read in --importance-order (datasets.importance_order).

    I_D depends only on the model, the samples of D in their batch order and the importance settings,
    so it is cached on disk under exactly that key: in the shuffled order D is the same for every
    request and I_D is computed once per checkpoint, as the paper's Algorithm 1 does; in the paper's
    order D ends with the forget samples, so I_D is computed once per request. The per-sample
    importance depends on neither batch order nor batch size, so its key holds the set of samples."""
    per_sample = variant == "ssd_per_sample"
    d_order, f_order = datasets.importance_order(splits, cfg.importance_order, cfg.seed)
    key = {"checkpoint": cfg.checkpoint_sha256, "dataset": splits.data.name, "image_size": splits.data.image_size,
           "variant": variant, "amp": bool(cfg.amp), "batch_size": None if per_sample else cfg.batch_size,
           "samples": array_sha256(np.sort(d_order) if per_sample else d_order)}
    t0 = time.perf_counter()
    imp_full, cache_hit = ssd_lib.cached_importance(
        cfg.importance_cache if cfg.checkpoint_sha256 else None, key,
        lambda: _importance(model, Subset(splits.data.train, d_order.tolist()), cfg, variant, "importance D"))
    t1 = time.perf_counter()
    imp_forget = _importance(model, Subset(splits.data.train, f_order.tolist()), cfg, variant, "importance Df")
    t2 = time.perf_counter()
    return imp_full, imp_forget, {"importance_full_s": t1 - t0, "importance_forget_s": t2 - t1,
                                  "cache_hit": cache_hit, "importance_order": "any" if per_sample else cfg.importance_order,
                                  "ratio_cap": len(d_order) / len(f_order)}


def _ssd(model: nn.Module, splits: Splits, cfg: Namespace, variant: str):
    imp_full, imp_forget, info = ssd_importances(model, splits, cfg, variant)
    report = ssd_lib.dampen(model, imp_full, imp_forget, cfg.alpha, cfg.lam)
    return model, {**info, **report.summary()}


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


@register
def assd(model: nn.Module, splits: Splits, cfg: Namespace):
    """Adaptive SSD (Schoepf, Foster, Brintrup 2024, arXiv 2402.10098): SSD with alpha chosen per request.

    alpha is the p-th percentile (numpy's linear interpolation) of I_Df / I_D over every parameter
    element with a finite ratio, p = 100 - ln(1 + 100 |D_f| / |D|), and lambda = 1: about 0.7% of the
    elements are dampened when D_f is 1% of D, 2.4% when it is 10%. I_D is computed on D, as SSD does
    (cached, in --importance-order), where ASSD's notebook uses the retain set."""
    imp_full, imp_forget, info = ssd_importances(model, splits, cfg, "ssd")
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


def search_fractions(start: float, growth: float, max_steps: int) -> np.ndarray:
    """Potion's grid of selection fractions: start * growth**k for k = 0, 1, ..., below 1, at most max_steps."""
    fractions = start * growth ** np.arange(max_steps)
    return fractions[fractions < 1]


def search_grid(probe, steps: int, strategy: str = "gallop") -> tuple[int | None, str, int]:
    """Walk a grid of increasing dampening strengths 0..steps-1; returns (chosen step, status, probes).

    `probe(k)` dampens a copy at step k and returns (target met, guard passed). The walk stops at
    the first step that meets the target (target_reached) or fails the guard (guard_hit: the step
    before it is chosen, None when that is no step at all, i.e. the original model). If no step does
    either, the last step is chosen (target_unreachable).
    geometric: Potion's walk, probing 0, 1, 2, ... in turn.
    gallop: probes 0, 1, 3, 7, ... until one stops, then bisects the last gap: the same step in about
      2 log2(k) probes when "target met or guard failed" is monotone in k (forget and retain accuracy
      fall with the fraction dampened, near enough; a one-sample wobble can move the answer a step).
    """
    if steps < 1:
        raise UserError("the search grid is empty (pass --search-max-steps >= 1)")
    if strategy not in ("gallop", "geometric"):
        raise UserError(f"unknown search strategy {strategy!r} (choose gallop or geometric)")
    seen = {}

    def stops(k: int) -> bool:
        seen[k] = probe(k)
        return seen[k][0] or not seen[k][1]

    below, k = -1, 0  # below: the last step probed that passed the guard and missed the target (-1: none)
    while not stops(k):
        below = k
        if k == steps - 1:
            return k, "target_unreachable", len(seen)
        k = k + 1 if strategy == "geometric" else min(2 * k + 1, steps - 1)
    stop = k
    while stop - below > 1:  # geometric never enters: its gap is always one step
        mid = (below + stop) // 2
        if stops(mid):
            stop = mid
        else:
            below = mid
    if seen[stop][1]:
        return stop, "target_reached", len(seen)
    return (below if below >= 0 else None), "guard_hit", len(seen)


def _guard_subset(ds: Subset, n: int = GUARD_SAMPLES) -> Subset:
    """A fixed (seed 0) random subset of at most n items of `ds`, so each step's guard costs a bounded pass."""
    if len(ds) <= n:
        return ds
    pick = np.sort(np.random.default_rng(0).choice(len(ds), n, replace=False))
    return Subset(ds.dataset, [ds.indices[i] for i in pick])


def _accuracy(model: nn.Module, ds: Dataset, cfg: Namespace) -> float:
    logits, y = predict(model, ds, cfg.device, cfg.eval_batch_size, cfg.amp, desc="search eval")
    return 100.0 * int((logits.argmax(1) == y).sum()) / max(len(y), 1)  # exact: the target is compared with it


@register
def ssd_search(model: nn.Module, splits: Splits, cfg: Namespace):
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
    rho, max_drop = cfg.search_rho, cfg.search_max_retain_drop
    max_steps, strategy = cfg.search_max_steps, cfg.search_strategy
    imp_full, imp_forget, info = ssd_importances(model, splits, cfg, "ssd")
    t0 = time.perf_counter()
    guard = _guard_subset(splits.retain_val)
    if len(guard) == 0:
        raise UserError("ssd_search needs validation images for its guard, and the checkpoint has none "
                        "(pretrain with a validation fraction above 0)")
    forget0, retain0 = _accuracy(model, splits.forget_train, cfg), _accuracy(model, guard, cfg)
    target = rho * forget0 if splits.forget_classes or splits.scenario != "random" else retain0
    floor = retain0 - max_drop
    fractions = search_fractions(1 / info["ratio_cap"] / SEARCH_START_DIVISOR, SEARCH_GROWTH, max_steps)
    ratios = ssd_lib.importance_ratios(imp_full, imp_forget)
    # the same numbers as ssd.alpha_for_fraction(s) for each s, from one sort of the ratios
    alphas = np.percentile(ratios, 100 * (1 - fractions)) if len(ratios) else np.full(len(fractions), np.inf)
    accuracies = {}

    def probe(k: int) -> tuple[bool, bool]:
        trial = copy.deepcopy(model)
        ssd_lib.dampen(trial, imp_full, imp_forget, float(alphas[k]), 1.0)
        retain = _accuracy(trial, guard, cfg)
        if retain < floor:  # the guard decides alone: the forget pass can be skipped
            return False, False
        accuracies[k] = _accuracy(trial, splits.forget_train, cfg), retain
        return accuracies[k][0] <= target, True

    if forget0 <= target:  # nothing to do: the original already scores what the target asks
        chosen, status, probes = None, "target_reached", 0
    else:
        chosen, status, probes = search_grid(probe, len(fractions), strategy)
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
