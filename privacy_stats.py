"""Many-model privacy statistics for one forget request: the per-model statistic phi, the NeurIPS 2023
unlearning competition's forgetting quality F and final score, and the per-example U-LiRA attack.

Inputs are plain arrays: a statistic (phi) of N unlearned and N retrained models on the n forget
examples, shape (N, n). Nothing here trains or loads a model, so nothing here imports torch.

Sources:
- competition: Triantafillou et al. 2024, "Are we making progress in unlearning? Findings from the
  first NeurIPS unlearning competition"; the rules below follow the official evaluation,
  google-deepmind/unlearning_evaluation (metric.py for phi, epsilon and F; main.py for the final
  score). Written anew from those rules; deviations are named where they occur.
- U-LiRA: Hayes et al. 2024, "Inexact unlearning needs more careful evaluations to avoid a false
  sense of privacy"; the global variance for few models is LiRA's (Carlini et al. 2022).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import logsumexp
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve

from common import UserError

# The competition's constants (metric.py).
DELTA = 1e-5
EPSILON_CAP = 50.0  # every epsilon is clipped to [0, 50]; a perfect separation (inf) becomes 50
THRESHOLDS_PER_UNIT = 100  # threshold grid spacing is about 1/100 of a unit of phi
DOUBLE_BUFFER = 2.0  # the two-threshold family slides its window this far either side
PEAKY_RATIO = 0.01  # one side's spread below 1% of the other's: epsilon is the cap outright
BIN_WIDTH = 0.5  # epsilon bins [0, .5), [.5, 1), ... score 1, 1/2, 1/4, ...

# U-LiRA: below this many models per side one variance per side is pooled over examples (LiRA).
GLOBAL_VARIANCE_BELOW = 32
VARIANCE_FLOOR = 1e-12  # a side whose statistic never moves still gives finite log-likelihoods


def _to_numpy(x: Any, dtype=None) -> np.ndarray:
    """numpy array from a numpy array, list or torch tensor (any device, any float width)."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()  # bfloat16 and float16 have no numpy view
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


# --- the per-model statistic ---------------------------------------------------------------------

def phi(logits: Any, labels: Any) -> np.ndarray:
    """Logit-scaled confidence phi = log p_y - log(sum_{j != y} p_j), one value per example.

    Computed as z_y - logsumexp_{j != y} z_j (the softmax normaliser cancels), so it stays finite when
    the probabilities round to exactly 0 or 1. The official metric.py computes it from
    probabilities plus 1e-45, which bounds it to about +-103.6; the two agree below that."""
    z = _to_numpy(logits, np.float64)
    y = _to_numpy(labels)
    if z.ndim != 2 or z.shape[1] < 2:
        raise UserError(f"phi needs logits of shape (examples, classes >= 2), got {z.shape}")
    if y.shape != (z.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"phi needs one integer label per row of logits, got labels of shape {y.shape} "
                        f"and dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise UserError(f"phi: labels must lie in [0, {z.shape[1] - 1}], got {y.min()}..{y.max()}")
    rows = np.arange(z.shape[0])
    others = z.copy()
    others[rows, y] = -np.inf  # exp(-inf) = 0: the true class drops out of the sum
    return z[rows, y] - logsumexp(others, axis=1)


# --- the competition's epsilon per example ------------------------------------------------------

def threshold_epsilon(fpr: Any, fnr: Any, delta: float = DELTA) -> float | np.ndarray:
    """Epsilon of one threshold rule from its false positive and false negative rates (metric.py).

    - fpr = fnr = 0 (perfect separation): inf.
    - exactly one of them 0: nan, the rule is discarded (too few models to measure it).
    - otherwise max(log(1 - delta - fpr) - log(fnr), log(1 - delta - fnr) - log(fpr)), clipped below
      at 0; a term whose log(1 - delta - rate) is undefined (rate > 1 - delta) is ignored, and a rule
      where both are undefined (fpr = fnr = 1) is discarded (nan).
    Works elementwise on arrays."""
    fpr = np.asarray(fpr, dtype=np.float64)
    fnr = np.asarray(fnr, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.fmax(np.log(1 - delta - fpr) - np.log(fnr),  # fmax: a nan term loses to the other
                      np.log(1 - delta - fnr) - np.log(fpr))
        eps = np.maximum(eps, 0.0)  # keeps nan
    eps = np.where((fpr == 0) | (fnr == 0), np.nan, eps)
    eps = np.where((fpr == 0) & (fnr == 0), np.inf, eps)
    return float(eps) if eps.ndim == 0 else eps


def _epsilon_table(n_models: int, delta: float) -> np.ndarray:
    """epsilon[tp, fp] for a rule that flags tp of the positive side's models and fp of the other's."""
    tp = np.arange(n_models + 1)[:, None]
    fp = np.arange(n_models + 1)[None, :]
    return threshold_epsilon(fp / n_models, (n_models - tp) / n_models, delta)


def _count_between(sorted_values: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """How many values v satisfy low <= v <= high (0 where the window is empty)."""
    inside = np.searchsorted(sorted_values, high, "right") - np.searchsorted(sorted_values, low, "left")
    return np.maximum(inside, 0)


def _grid(start: float, stop: float) -> np.ndarray:
    """The official grid: ceil((stop - start) * 100) evenly spaced thresholds from start to stop."""
    return np.linspace(start, stop, int(np.ceil((stop - start) * THRESHOLDS_PER_UNIT)))


def _two_threshold_counts(high: np.ndarray, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tp, fp) counts of the two-threshold family: flag "positive" when left <= phi <= right, where
    positive is the peakier side (smaller range; the lower-median side on a tie). Right thresholds
    span [peaky max - 2, peaky max + 2] (exactly: peaky min + width - 2 to peaky max + 2 with width
    the smaller range); for each, 400 left thresholds span right - width -+ 2."""
    high_range, low_range = np.ptp(high), np.ptp(low)
    width = min(high_range, low_range)
    peaky, other = (low, high) if high_range >= low_range else (high, low)
    right = _grid(peaky.min() + width - DOUBLE_BUFFER, peaky.max() + DOUBLE_BUFFER)
    n_left = int(np.ceil(2 * DOUBLE_BUFFER * THRESHOLDS_PER_UNIT))
    left = np.linspace(right - width - DOUBLE_BUFFER, right - width + DOUBLE_BUFFER, n_left, axis=1)
    right = np.broadcast_to(right[:, None], left.shape)
    return _count_between(np.sort(peaky), left, right), _count_between(np.sort(other), left, right)


def _one_threshold_counts(high: np.ndarray, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tp, fp) counts of the one-threshold family: flag "positive" (the higher-median side) when
    phi >= t, for t on the official grid from the smallest to the largest value of both sides."""
    both = np.concatenate([high, low])
    t = _grid(both.min(), both.max())
    n = len(high)
    return (n - np.searchsorted(np.sort(high), t, "left"),
            n - np.searchsorted(np.sort(low), t, "left"))


def _example_epsilon(unlearned: np.ndarray, retrained: np.ndarray, table: np.ndarray) -> float:
    # The side with the larger median is "positive" (a tie makes the unlearned side positive).
    if np.median(retrained) > np.median(unlearned):
        high, low = retrained, unlearned
    else:
        high, low = unlearned, retrained
    largest = max(np.ptp(high), np.ptp(low))
    smallest = min(np.ptp(high), np.ptp(low))
    # One side far peakier than the other: the grid might miss it, so the official code caps here.
    # (Both sides constant: 0/0 in metric.py, which is not < 0.01, so the attacks run.)
    if largest > 0 and smallest / largest < PEAKY_RATIO:
        return EPSILON_CAP
    tp2, fp2 = _two_threshold_counts(high, low)
    tp1, fp1 = _one_threshold_counts(high, low)
    eps = np.concatenate([table[tp2, fp2].ravel(), table[tp1, fp1]])
    eps = eps[~np.isnan(eps)]
    if eps.size == 0:
        # Only when both sides are one and the same constant: no attack can tell them apart. The
        # official code stops on an assertion here; 0 is the epsilon of identical distributions.
        return 0.0
    return float(min(eps.max(), EPSILON_CAP))  # inf (perfect separation) becomes the cap


def _check_pair(unlearned: Any, retrained: Any, ndim: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    u = _to_numpy(unlearned, np.float64)
    r = _to_numpy(retrained, np.float64)
    if u.ndim != ndim or u.shape != r.shape:
        raise UserError(f"{what} needs unlearned and retrained statistics of one shape "
                        f"({'models' if ndim == 1 else 'models, examples'}), got {u.shape} and {r.shape}")
    if u.shape[0] < 3:
        raise UserError(f"{what} needs at least 3 models per side, got {u.shape[0]}; train more models")
    if not (np.isfinite(u).all() and np.isfinite(r).all()):
        raise UserError(f"{what}: the statistics contain NaN or inf; compute phi from logits")
    return u, r


def example_epsilon(unlearned: np.ndarray, retrained: np.ndarray, delta: float = DELTA) -> float:
    """The competition's epsilon for one forget example from the statistic of N unlearned and N
    retrained models (metric.py): the largest threshold_epsilon over both threshold families
    (two-threshold window on the peakier side, one threshold on the higher-median side), after
    discarding nan rules, clipped to [0, 50]; 50 outright when one side's range is under 1% of the
    other's."""
    u, r = _check_pair(unlearned, retrained, 1, "example_epsilon")
    return _example_epsilon(u, r, _epsilon_table(len(u), delta))


def epsilon_points(epsilons: Any, n_models: int) -> np.ndarray:
    """Points per example (metric.py): bins of width 0.5 from 0 up to ceil(ln(N - 1)) score
    1, 1/2, 1/4, ... (bin k = [k/2, (k+1)/2)); an epsilon at or beyond ceil(ln(N - 1)) scores 0.
    N = 16: six bins, the last [2.5, 3)."""
    eps = np.asarray(epsilons, dtype=np.float64)
    max_epsilon = math.ceil(math.log(n_models - 1)) if n_models > 1 else 0
    n_bins = max(0, int(round(max_epsilon / BIN_WIDTH)))
    k = np.maximum(np.floor(eps / BIN_WIDTH), 0)  # a negative epsilon falls in the first bin
    return np.where(k < n_bins, 0.5 ** np.minimum(k, n_bins), 0.0)  # each bin is worth half the last


def forgetting_quality(unlearned: np.ndarray, retrained: np.ndarray,
                       delta: float = DELTA) -> tuple[float, np.ndarray]:
    """(F, per-example epsilons) for (N, n) statistics of N unlearned and N retrained models on n
    forget examples: F is the mean over examples of epsilon_points (metric.py). 1 would mean every
    example's epsilon lies in the first bin [0, 0.5); with finitely many models even retraining
    scores far less (see ceiling)."""
    u, r = _check_pair(unlearned, retrained, 2, "forgetting_quality")
    table = _epsilon_table(u.shape[0], delta)
    eps = np.array([_example_epsilon(u[:, j], r[:, j], table) for j in range(u.shape[1])])
    return float(np.mean(epsilon_points(eps, u.shape[0]))), eps


def ceiling(retrained_a: np.ndarray, retrained_b: np.ndarray, delta: float = DELTA) -> float:
    """F of one set of retrained models against another: what a perfect unlearner scores with this
    many models, the yardstick for F."""
    return forgetting_quality(retrained_a, retrained_b, delta)[0]


def final_score(forgetting: float, unlearned_retain_acc: Any, retrained_retain_acc: Any,
                unlearned_test_acc: Any, retrained_test_acc: Any) -> float:
    """The competition's final score (main.py): F * (mean unlearned retain acc / mean retrained
    retain acc) * (mean unlearned test acc / mean retrained test acc). Accuracies are per model (or
    already means); the ratios are not capped at 1."""
    means = [float(np.mean(_to_numpy(a, np.float64))) for a in
             (unlearned_retain_acc, retrained_retain_acc, unlearned_test_acc, retrained_test_acc)]
    if means[1] <= 0 or means[3] <= 0:
        raise UserError("final_score: the retrained models' mean retain and test accuracies must be > 0")
    return float(forgetting * (means[0] / means[1]) * (means[2] / means[3]))


# --- U-LiRA --------------------------------------------------------------------------------------

def _leave_one_out_fits(x: np.ndarray, global_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row i: per-example mean and variance of x fitted on every model but model i. The variance is
    per example (ddof=1) or, with global_variance, the mean of those over examples (pooled within
    examples)."""
    means, variances = np.empty_like(x), np.empty_like(x)
    for i in range(x.shape[0]):
        others = np.delete(x, i, axis=0)
        means[i] = others.mean(axis=0)
        var = others.var(axis=0, ddof=1)
        variances[i] = var.mean() if global_variance else var
    return means, np.maximum(variances, VARIANCE_FLOOR)


def _gaussian_logpdf(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    return -0.5 * (np.log(2 * np.pi * var) + (x - mean) ** 2 / var)


def _fits(x: np.ndarray, global_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    var = x.var(axis=0, ddof=1)
    return x.mean(axis=0), np.maximum(var.mean() if global_variance else var, VARIANCE_FLOOR)


def ulira_scores(unlearned: np.ndarray, retrained: np.ndarray,
                 global_variance: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-example likelihood-ratio scores log N(x; mu_in, s_in) - log N(x; mu_out, s_out), "in" =
    unlearned models, "out" = retrained models, both (N, n). Leave one model out: model i's value is
    scored with Gaussians fitted on the other models only, i.e. an unlearned model against the other
    N - 1 unlearned and all retrained, a retrained model against all unlearned and the other N - 1
    retrained. global_variance None: pooled iff fewer than 32 models per side.
    Returns (scores of unlearned models, scores of retrained models), each (N, n)."""
    u = _to_numpy(unlearned, np.float64)
    r = _to_numpy(retrained, np.float64)
    if u.ndim != 2 or r.ndim != 2 or u.shape[1] != r.shape[1]:
        raise UserError(f"ulira needs (models, examples) statistics with the same examples, "
                        f"got {u.shape} and {r.shape}")
    if min(u.shape[0], r.shape[0]) < 3:
        raise UserError(f"ulira needs at least 3 models per side (leave-one-out variance), "
                        f"got {u.shape[0]} and {r.shape[0]}")
    if not (np.isfinite(u).all() and np.isfinite(r).all()):
        raise UserError("ulira: the statistics contain NaN or inf; compute phi from logits")
    if global_variance is None:
        global_variance = min(u.shape[0], r.shape[0]) < GLOBAL_VARIANCE_BELOW
    in_loo_mean, in_loo_var = _leave_one_out_fits(u, global_variance)
    out_loo_mean, out_loo_var = _leave_one_out_fits(r, global_variance)
    in_mean, in_var = _fits(u, global_variance)
    out_mean, out_var = _fits(r, global_variance)
    in_scores = _gaussian_logpdf(u, in_loo_mean, in_loo_var) - _gaussian_logpdf(u, out_mean, out_var)
    out_scores = _gaussian_logpdf(r, in_mean, in_var) - _gaussian_logpdf(r, out_loo_mean, out_loo_var)
    return in_scores, out_scores


def ulira(unlearned: np.ndarray, retrained: np.ndarray, global_variance: bool | None = None) -> dict:
    """U-LiRA (Hayes et al. 2024) over all held-out scores of ulira_scores: unlearned models'
    scores are positives, retrained models' negatives, pooled over examples. Returns the ROC's
    auc, balanced_accuracy (best over thresholds) and tpr_at_1pct_fpr (best TPR with FPR <= 1%).
    0.5, 0.5 and about 0.01 mean the unlearned models cannot be told from retrained ones."""
    in_scores, out_scores = ulira_scores(unlearned, retrained, global_variance)
    scores = np.concatenate([in_scores.ravel(), out_scores.ravel()])
    is_unlearned = np.concatenate([np.ones(in_scores.size), np.zeros(out_scores.size)])
    fpr, tpr, _ = roc_curve(is_unlearned, scores, drop_intermediate=False)
    return {"auc": float(roc_auc_score(is_unlearned, scores)),
            "balanced_accuracy": float(np.max((tpr + 1 - fpr) / 2)),
            "tpr_at_1pct_fpr": float(np.max(tpr[fpr <= 0.01]))}


# --- one model: loss AUC -------------------------------------------------------------------------

def loss_auc(member_losses: Any, nonmember_losses: Any) -> float | None:
    """AUC of the per-example loss as a membership test, lower loss = member: 1.0 when every member
    has a lower loss than every non-member, 0.5 when the two look alike. None when a side is
    missing or empty."""
    if member_losses is None or nonmember_losses is None:
        return None
    members = _to_numpy(member_losses, np.float64).ravel()
    nonmembers = _to_numpy(nonmember_losses, np.float64).ravel()
    if members.size == 0 or nonmembers.size == 0:
        return None
    losses = np.concatenate([members, nonmembers])
    if np.isnan(losses).any():
        raise UserError("loss_auc: the losses contain NaN; check the model's outputs")
    is_member = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    # ranks keep the order (ties included) and let an infinite loss through; AUC only sees the order
    return float(roc_auc_score(is_member, -rankdata(losses)))
