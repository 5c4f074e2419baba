"""Selective Synaptic Dampening (Foster et al., AAAI 2024): importances, selection, dampening.

The importance of a dataset follows the paper's code: with the model in eval mode, the mean over
mini-batches of the squared gradient of the batch-mean loss (a diagonal Fisher estimate). Eval mode
matters: in train mode batch-norm uses batch statistics and updates its running buffers, and the
dampened model is then destroyed.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from common import UserError, atomic_torch_save
from training import autocast

Importances = dict[str, torch.Tensor]


def _loss(logits: torch.Tensor, y: torch.Tensor, variant: str) -> torch.Tensor:
    if variant == "lfssd":  # Loss-free SSD: needs no labels, the squared L2 norm of the logits
        return logits.float().pow(2).sum(dim=1).mean()
    return F.cross_entropy(logits.float(), y)


def importance(model: nn.Module, dl: DataLoader, device: torch.device, variant: str = "ssd",
               amp: bool = False, desc: str = "importance") -> Importances:
    """Mean over batches of grad**2 (ssd) or |grad| (lfssd), one tensor per trainable parameter."""
    if variant not in ("ssd", "lfssd"):
        raise ValueError(f"unknown importance variant {variant!r}")
    model.to(device).eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    batches = 0
    for x, y, *_ in tqdm(dl, desc=desc, leave=False, mininterval=2):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        model.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = _loss(model(x), y, variant)
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                g = p.grad.float()
                total[n].add_(g.abs() if variant == "lfssd" else g.pow(2))
        batches += 1
    model.zero_grad(set_to_none=True)
    if batches == 0:
        raise UserError("cannot compute importances on an empty dataset (the forget set has no samples)")
    return {n: t / batches for n, t in total.items()}


@dataclass
class DampenReport:
    per_parameter: dict[str, int]  # elements dampened in each parameter tensor
    total: int
    num_elements: int
    max_ratio: float  # the largest I_Df / I_D over elements with I_D > 0: alpha at or above it selects nothing
    zero_full_importance: int  # elements with I_D = 0 < I_Df, which every finite alpha selects

    def summary(self, top: int = 3) -> dict:
        """The numbers a results line keeps: counts, fraction, largest ratio, most dampened tensors."""
        most = sorted(((n, c) for n, c in self.per_parameter.items() if c), key=lambda nc: -nc[1])[:top]
        return {"dampened": self.total, "dampened_fraction": self.total / max(self.num_elements, 1),
                "max_ratio": self.max_ratio, "zero_full_importance": self.zero_full_importance,
                "most_dampened": [[n, c] for n, c in most]}


def check_finite(imp: Importances, what: str) -> None:
    for n, t in imp.items():
        if not torch.isfinite(t).all():
            raise UserError(f"the {what} importances of {n} contain NaN or inf, so SSD refuses to dampen "
                            f"(run without --amp, or check the model for overflow)")


@torch.no_grad()
def dampen(model: nn.Module, imp_full: Importances, imp_forget: Importances, alpha: float,
           lam: float) -> DampenReport:
    """Multiply every element with I_Df > alpha * I_D by min(lam * I_D / I_Df, 1), in place.

    Only elements where I_Df > alpha * I_D >= 0 are touched, so I_Df > 0 there and the ratio is
    finite; alpha = inf selects nothing. alpha and lam are checked where they enter (RunConfig.resolve,
    sweep_alpha's flags); the methods that choose alpha give a percentile of I_Df / I_D, never negative.
    """
    check_finite(imp_full, "full-data")
    check_finite(imp_forget, "forget-set")
    per_parameter, total, elements, max_ratio, zero_full = {}, 0, 0, 0.0, 0
    for n, p in model.named_parameters():
        if n not in imp_forget:
            continue
        d, f = imp_full[n].to(p.device), imp_forget[n].to(p.device)
        positive = d > 0
        if positive.any():
            max_ratio = max(max_ratio, float((f[positive] / d[positive]).max()))
        zero_full += int(((d == 0) & (f > 0)).sum())
        selected = f > alpha * d if math.isfinite(alpha) else torch.zeros_like(f, dtype=torch.bool)
        safe_f = torch.where(selected, f, torch.ones_like(f))
        beta = torch.where(selected, (lam * d / safe_f).clamp(max=1.0), torch.ones_like(f))
        p.mul_(beta.to(p.dtype))
        count = int(selected.sum())
        per_parameter[n] = count
        total += count
        elements += p.numel()
    return DampenReport(per_parameter, total, elements, max_ratio, zero_full)


def importance_ratios(imp_full: Importances, imp_forget: Importances) -> np.ndarray:
    """I_Df / I_D of every parameter element with a finite ratio (I_D = 0 gives inf or nan: left out)."""
    r = np.concatenate([(imp_forget[n].double() / imp_full[n].double()).flatten().numpy() for n in imp_forget])
    return r[np.isfinite(r)]


def alpha_for_fraction(imp_full: Importances, imp_forget: Importances, fraction: float) -> float:
    """The alpha that selects about `fraction` of the elements: the (1 - fraction) quantile of I_Df / I_D
    (numpy's linear interpolation), as ASSD and Potion choose it. Elements with I_D = 0 < I_Df are
    selected by every finite alpha on top of that."""
    if not 0 < fraction < 1:
        raise UserError(f"a selection fraction must be in (0, 1), got {fraction}")
    r = importance_ratios(imp_full, imp_forget)
    if len(r) == 0:
        raise UserError("no parameter element has a finite I_Df / I_D, so no alpha can be chosen from them")
    return float(np.percentile(r, 100 * (1 - fraction)))


def cached_importance(folder: str | Path | None, key: dict, compute: Callable[[], Importances]
                      ) -> tuple[Importances, bool]:
    """`compute()`, stored in `folder` under a name derived from `key`; returns (importances, cache_hit).

    The whole key is stored in the file and compared on load, so a file made for another setup, a
    truncated one or a foreign one is recomputed with a warning, never trusted. No folder: no cache."""
    if not folder:
        return compute(), False
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = Path(folder) / f"{key.get('variant', 'importance')}-{digest}.pt"
    if path.exists():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("key") == key:
                return stored["importance"], True
            print(f"warning: importance cache {path} was made for another setup; recomputing")
        except Exception as e:  # a truncated or foreign file is recomputed, never trusted
            print(f"warning: unreadable importance cache {path} ({type(e).__name__}); recomputing")
    imp = compute()
    atomic_torch_save({"key": key, "importance": imp}, path)
    return imp, False


def importance_per_sample(model: nn.Module, dl: DataLoader, device: torch.device, amp: bool = False,
                          desc: str = "importance", chunk_size: int | None = None) -> Importances:
    """Mean over samples of the squared per-sample gradient of the cross-entropy.

    This is the textbook diagonal empirical Fisher. `importance` squares the gradient of each
    batch-mean loss instead, which mixes the samples of a batch (cross terms), so its value depends
    on the batch size and on which samples share a batch; this one depends on neither, up to float
    rounding. Per-sample gradients come from torch.func (vmap over grad), not a Python loop, and
    need eval mode: batch norm then uses its running statistics, so every sample's loss is its own.
    `chunk_size` bounds how many per-sample gradients vmap holds at once (memory, not the result).
    """
    from torch.func import functional_call, grad, vmap

    model.to(device).eval()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def sample_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, fixed), (x.unsqueeze(0),))
        # at least float32 for the loss (bf16 logits under autocast), float64 stays float64
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y.unsqueeze(0))

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)
    # float64 sums, so that regrouping the samples into other batches changes nothing visible
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    for x, y, *_ in tqdm(dl, desc=desc, leave=False, mininterval=2):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            grads = per_sample_grads(params, x, y)
        for n, g in grads.items():
            total[n] += g.pow(2).sum(dim=0)
        count += len(y)
    if count == 0:
        raise UserError("cannot compute importances on an empty dataset (the forget set has no samples)")
    return {n: (t / count).float() for n, t in total.items()}


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
