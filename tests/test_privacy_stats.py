"""Known answers for the many-model privacy statistics: phi, the competition's epsilon, F and final
score, U-LiRA and the loss AUC, on arrays built here."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

import privacy_stats as ps
from common import UserError

DELTA = 1e-5


# --- phi -----------------------------------------------------------------------------------------

def test_phi_finite_when_softmax_saturates():
    # softmax of [1000, 0, -1000] is exactly [1, 0, 0] in float64
    logits = np.array([[1000.0, 0.0, -1000.0], [1000.0, 0.0, -1000.0]])
    out = ps.phi(logits, np.array([0, 2]))
    assert np.isfinite(out).all()
    # label 0: 1000 - log(e^0 + e^-1000) = 1000; label 2: -1000 - log(e^1000 + e^0) = -2000
    assert out == pytest.approx([1000.0, -2000.0])


def test_phi_equals_naive_formula_on_ordinary_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20, 5)) * 2
    labels = rng.integers(0, 5, size=20)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    p_y = p[np.arange(20), labels]
    naive = np.log(p_y) - np.log(1 - p_y)
    assert ps.phi(logits, labels) == pytest.approx(naive, rel=1e-9, abs=1e-9)
    # a torch tensor (float32) gives the same numbers as its numpy values
    as_torch = ps.phi(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels))
    assert as_torch == pytest.approx(ps.phi(logits.astype(np.float32), labels), abs=1e-9)


def test_phi_rejects_out_of_range_labels():
    with pytest.raises(UserError, match="labels"):
        ps.phi(np.zeros((2, 3)), np.array([0, 3]))


# --- the competition's epsilon -------------------------------------------------------------------

def test_threshold_epsilon_by_hand():
    # fpr = 1/4, fnr = 1/2: max(ln(3/4 - d) - ln(1/2), ln(1/2 - d) - ln(1/4)) = ln(2 - 4d) = 0.6931272
    assert ps.threshold_epsilon(0.25, 0.5, DELTA) == pytest.approx(0.6931271806, abs=1e-9)
    assert ps.threshold_epsilon(0.25, 0.5, DELTA) == pytest.approx(math.log((0.5 - DELTA) / 0.25))
    assert ps.threshold_epsilon(0.0, 0.0) == math.inf  # perfect separation
    assert math.isnan(ps.threshold_epsilon(0.0, 0.5))  # one rate 0: rule discarded
    assert math.isnan(ps.threshold_epsilon(1.0, 1.0))  # both logs undefined: discarded
    # fpr = 1: the first term is undefined and ignored; ln(1/2 - d) - ln(1) < 0 clips to 0
    assert ps.threshold_epsilon(1.0, 0.5) == 0.0
    assert ps.threshold_epsilon(0.5, 0.5) == 0.0  # a coin flip


def test_example_epsilon_small_case_by_hand():
    # 4 models a side. The best rules flag 2 of one side and 1 of the other, e.g. "phi >= 1.5"
    # flags retrained {2, 3, 4} (fnr 1/4) and unlearned {2, 3} (fpr 1/2), or the window [-1, 1.2]
    # around the unlearned side's low end flags unlearned {0, 1} and retrained {1}: either way
    # epsilon = ln(1/2 - d) - ln(1/4). Rules with a rate of 0 (e.g. "phi >= 3.5") are discarded.
    unlearned = np.array([0.0, 1.0, 2.0, 3.0])
    retrained = np.array([1.0, 2.0, 3.0, 4.0])
    assert ps.example_epsilon(unlearned, retrained) == pytest.approx(math.log((0.5 - DELTA) / 0.25))
    assert ps.example_epsilon(retrained, unlearned) == pytest.approx(math.log((0.5 - DELTA) / 0.25))


def test_one_threshold_flags_the_higher_median_side():
    # a = [0, 2, 3, 6] (median 2.5) against b = [0, 0, 1, 5] (median 0.5): "phi >= 1.5" flags a's
    # {2, 3, 6} (fnr 1/4) and b's {5} (fpr 1/4): epsilon ln(3/4 - d) - ln(1/4). Flagging b above a
    # threshold never beats chance, and the windows (on b, the narrower side, 3 to 7 wide, right
    # end in [3, 7]) cannot take 0, 0, 1 without 2 and 3: at best 0.
    a, b = np.array([0.0, 2.0, 3.0, 6.0]), np.array([0.0, 0.0, 1.0, 5.0])
    assert ps.example_epsilon(a, b) == pytest.approx(math.log((0.75 - DELTA) / 0.25))
    assert ps.example_epsilon(b, a) == pytest.approx(math.log((0.75 - DELTA) / 0.25))


def test_window_sits_on_the_lower_median_side_when_ranges_tie():
    # a = [0, 1, 1, 4], b = [2, 2, 5, 6], both ranges 4: the window (2 to 6 wide, right end in
    # [2, 6]) goes on a. Best rules: window [-1, 3] flags a's {0, 1, 1} and b's {2, 2}, or "phi >= 3"
    # flags b's {5, 6} and a's {4}: fnr 1/4 and fpr 1/2 either way, epsilon ln(1/2 - d) - ln(1/4).
    # A window on b, e.g. [1.5, 5.5], would flag b's {2, 2, 5} and a's {4}: ln 3.
    a, b = np.array([0.0, 1.0, 1.0, 4.0]), np.array([2.0, 2.0, 5.0, 6.0])
    assert ps.example_epsilon(a, b) == pytest.approx(math.log((0.5 - DELTA) / 0.25))
    assert ps.example_epsilon(b, a) == pytest.approx(math.log((0.5 - DELTA) / 0.25))


def test_window_catches_a_narrow_side_inside_a_wide_one():
    # a = [4, 5, 7, 9] (range 5) inside b = [0, 1, 8, 9] (range 9): the window on a (right end in
    # [7, 11], 3 to 7 wide), e.g. [1, 7.5], flags a's {4, 5, 7} and b's {1}: ln(3/4 - d) - ln(1/4).
    # One threshold does no better than "phi >= 4.5" (a's {5, 7, 9}, b's {8, 9}): ln 2.
    a, b = np.array([4.0, 5.0, 7.0, 9.0]), np.array([0.0, 1.0, 8.0, 9.0])
    assert ps.example_epsilon(a, b) == pytest.approx(math.log((0.75 - DELTA) / 0.25))


def test_window_right_end_stays_near_the_peaky_sides_top():
    # a = [0, 3, 6, 6], b = [3, 3, 3, 8]: the window goes on b (range 5 < 6) with its right end in
    # [8 - 2, 8 + 2], so [2, 5] (b's {3, 3, 3}, a's {3}: ln 3) is not in the family. The best left is
    # "phi >= 4.5" flagging a's {6, 6} and b's {8}: ln(1/2 - d) - ln(1/4).
    a, b = np.array([0.0, 3.0, 6.0, 6.0]), np.array([3.0, 3.0, 3.0, 8.0])
    assert ps.example_epsilon(a, b) == pytest.approx(math.log((0.5 - DELTA) / 0.25))


def test_example_epsilon_caps():
    spread = np.arange(8.0)
    assert ps.example_epsilon(spread, spread + 100) == ps.EPSILON_CAP  # never overlap
    # one side's range under 1% of the other's: the cap. Sitting on a value of the other side, the
    # constant side defeats every threshold rule (each one scores 0 or is discarded), so only the
    # cap catches it.
    assert ps.example_epsilon(np.full(8, 3.0), spread) == ps.EPSILON_CAP
    assert ps.example_epsilon(3.0 + 0.001 * np.arange(8), spread) == ps.EPSILON_CAP
    assert ps.example_epsilon(np.full(8, 3.5), np.full(8, 3.5)) == 0.0  # identical constants


def test_epsilon_points_bins():
    # N = 16: ceil(ln 15) = 3, bins [0,.5) [.5,1) ... [2.5,3) score 1, 1/2, ..., 1/32; 3 and up score 0
    eps = [0.0, 0.49, 0.5, 0.99, 1.7, 2.99, 3.0, 50.0]
    assert ps.epsilon_points(eps, 16) == pytest.approx([1, 1, 0.5, 0.5, 0.125, 1 / 32, 0, 0])
    # N = 4: ceil(ln 3) = 2, four bins
    assert ps.epsilon_points([1.6, 2.0], 4) == pytest.approx([1 / 8, 0])


# --- F, ceiling, final score ---------------------------------------------------------------------

def _draws(rng, n_models, mean, shift=0.0):
    return mean + shift + rng.normal(size=(n_models, len(mean)))


def test_forgetting_quality_same_distribution_reaches_the_ceiling():
    rng = np.random.default_rng(3)
    mean = rng.normal(size=100) * 3  # each example has its own typical phi
    f, eps = ps.forgetting_quality(_draws(rng, 16, mean), _draws(rng, 16, mean))
    top = ps.ceiling(_draws(rng, 16, mean), _draws(rng, 16, mean))
    shifted, _ = ps.forgetting_quality(_draws(rng, 16, mean, shift=2.0), _draws(rng, 16, mean))
    assert eps.shape == (100,) and (eps >= 0).all()
    assert 0.05 < top < 0.5  # with 16 models even a perfect unlearner is far from 1
    assert f == pytest.approx(top, abs=0.05)
    assert shifted < 0.5 * top  # a visible difference costs F


def test_forgetting_quality_zero_when_never_overlapping():
    rng = np.random.default_rng(4)
    mean = rng.normal(size=20)
    f, eps = ps.forgetting_quality(_draws(rng, 8, mean, shift=50.0), _draws(rng, 8, mean))
    assert f == 0.0
    assert (eps == ps.EPSILON_CAP).all()


def test_forgetting_quality_rejects_mismatched_shapes():
    with pytest.raises(UserError, match="one shape"):
        ps.forgetting_quality(np.zeros((8, 5)), np.zeros((8, 6)))


def test_final_score_is_f_times_mean_accuracy_ratios():
    # retain 91 / 91, test 80 / 100
    score = ps.final_score(0.5, [90.0, 92.0], [91.0, 91.0], [80.0], [100.0, 100.0])
    assert score == pytest.approx(0.5 * 1.0 * 0.8)


# --- U-LiRA --------------------------------------------------------------------------------------

def test_ulira_identical_distributions_near_half():
    rng = np.random.default_rng(5)
    mean = rng.normal(size=200) * 3
    result = ps.ulira(_draws(rng, 16, mean), _draws(rng, 16, mean))
    assert result["auc"] == pytest.approx(0.5, abs=0.03)
    assert result["balanced_accuracy"] == pytest.approx(0.5, abs=0.04)
    assert result["tpr_at_1pct_fpr"] < 0.03


def test_ulira_separated_distributions_near_one():
    rng = np.random.default_rng(6)
    mean = rng.normal(size=200) * 3
    result = ps.ulira(_draws(rng, 16, mean, shift=4.0), _draws(rng, 16, mean))
    assert result["auc"] > 0.99
    assert result["balanced_accuracy"] > 0.95
    assert result["tpr_at_1pct_fpr"] > 0.8


def test_ulira_scores_leave_the_scored_model_out():
    rng = np.random.default_rng(7)
    unlearned, retrained = rng.normal(size=(5, 3)), rng.normal(size=(6, 3))
    in_scores, out_scores = ps.ulira_scores(unlearned, retrained, global_variance=False)

    def logpdf(x, sample):
        return norm.logpdf(x, sample.mean(), sample.std(ddof=1))

    x = unlearned[2, 1]  # unlearned model 2: "in" from unlearned models 0, 1, 3, 4, "out" from all retrained
    expected = logpdf(x, np.delete(unlearned[:, 1], 2)) - logpdf(x, retrained[:, 1])
    assert in_scores[2, 1] == pytest.approx(expected)
    x = retrained[4, 0]  # retrained model 4: "in" from all unlearned, "out" from the other retrained
    expected = logpdf(x, unlearned[:, 0]) - logpdf(x, np.delete(retrained[:, 0], 4))
    assert out_scores[4, 0] == pytest.approx(expected)

    # global variance: one variance per side, the mean over examples of the per-example variances of
    # the models that fit it (model 2 left out of its own side)
    in_scores, _ = ps.ulira_scores(unlearned, retrained, global_variance=True)
    others = np.delete(unlearned, 2, axis=0)
    x = unlearned[2, 1]
    expected = (norm.logpdf(x, others[:, 1].mean(), np.sqrt(others.var(0, ddof=1).mean()))
                - norm.logpdf(x, retrained[:, 1].mean(), np.sqrt(retrained.var(0, ddof=1).mean())))
    assert in_scores[2, 1] == pytest.approx(expected)


def test_ulira_leave_one_out_does_not_inflate_the_auc():
    # Few models, per-example Gaussians, no real difference: a model that helped fit its own Gaussian
    # looks like a member of its own side, and the AUC climbs far above 0.5. Held out, it does not.
    rng = np.random.default_rng(8)
    unlearned, retrained = rng.normal(size=(4, 300)), rng.normal(size=(4, 300))

    def in_sample(x):
        return (norm.logpdf(x, unlearned.mean(0), unlearned.std(0, ddof=1))
                - norm.logpdf(x, retrained.mean(0), retrained.std(0, ddof=1)))

    labels = np.r_[np.ones(unlearned.size), np.zeros(retrained.size)]
    inflated = roc_auc_score(labels, np.r_[in_sample(unlearned).ravel(), in_sample(retrained).ravel()])
    held_out = ps.ulira(unlearned, retrained, global_variance=False)["auc"]
    assert inflated > 0.7
    assert held_out < 0.55


def test_ulira_pools_the_variance_below_32_models():
    rng = np.random.default_rng(9)
    unlearned = rng.normal(size=(8, 10)) * np.arange(1, 11)  # per-example spreads differ
    retrained = rng.normal(size=(8, 10)) * np.arange(1, 11)
    default = ps.ulira_scores(unlearned, retrained)
    assert np.array_equal(default[0], ps.ulira_scores(unlearned, retrained, global_variance=True)[0])
    assert not np.allclose(default[0], ps.ulira_scores(unlearned, retrained, global_variance=False)[0])


# --- loss AUC ------------------------------------------------------------------------------------

def test_loss_auc_known_answers():
    losses = np.array([0.1, 0.5, 2.0, 3.0])
    assert ps.loss_auc(losses, losses.copy()) == 0.5
    assert ps.loss_auc([0.1, 0.2, 0.3], [0.4, 1.0, np.inf]) == 1.0  # every member has the lower loss
    assert ps.loss_auc([0.4, 1.0], [0.1, 0.2]) == 0.0
    assert ps.loss_auc([], [0.1]) is None
    assert ps.loss_auc(None, [0.1]) is None
