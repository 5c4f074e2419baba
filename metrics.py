"""Evaluation of an unlearned model: accuracies, the paper's membership-inference attack with its
power, and ZRF.

Each split gets one batched forward pass; every metric is computed from the logits kept from it.
Accuracies and MIA are in percent, as in the paper's tables; an empty split gives None.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets import Splits
from training import accuracy, predict


def entropy(logits: torch.Tensor) -> np.ndarray:
    """Entropy of the softmax, the MIA's one feature (natural log)."""
    logp = F.log_softmax(logits.float(), dim=1)
    return (-(logp.exp() * logp).sum(dim=1)).numpy()


def membership_attack(member_logits: torch.Tensor, nonmember_logits: torch.Tensor,
                      target_logits: torch.Tensor) -> tuple[float, float]:
    """The SSD paper's MIA: logistic regression on entropy, trained on members (retain-train) against
    non-members (test). Returns the fraction of the target (forget-train) predicted 'member', in %,
    and the attack's power: the AUC of its own score on the data it was fitted on. An AUC near 0.5
    means the attack cannot tell a training image from a test image, and its verdict on the target
    says only on which side of a flat threshold the target's entropies fall."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x = np.concatenate([entropy(member_logits), entropy(nonmember_logits)])[:, None]
    y = np.concatenate([np.ones(len(member_logits)), np.zeros(len(nonmember_logits))])
    clf = LogisticRegression(class_weight="balanced", solver="lbfgs")
    clf.fit(x, y)
    attack_auc = float(roc_auc_score(y, clf.decision_function(x)))
    return 100.0 * float(clf.predict(entropy(target_logits)[:, None]).mean()), attack_auc


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence between two softmax outputs (natural log, at most ln 2)."""
    p, q = F.softmax(logits_p.float(), 1), F.softmax(logits_q.float(), 1)
    m = (0.5 * (p + q)).clamp_min(1e-12)
    kl = lambda a: (a * (a.clamp_min(1e-12).log() - m.log())).sum(1)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def evaluate(model: nn.Module, splits: Splits, device: torch.device, random_model: nn.Module | None = None,
             batch_size: int = 512, amp: bool = False, per_example: dict | None = None) -> dict:
    """All metrics for one unlearned model. `random_model`, a freshly initialised model of the same
    architecture, is the reference for ZRF (Chundawat et al.); without it ZRF is skipped.

    `loss_auc` is the AUC with which a lower per-example loss says "forget-train" against the forget
    set's unseen counterpart: the test images of the same class (class scenarios, SCRUB's pairing) or
    the whole test set (random forgetting); 0.5 means D_f looks like unseen data. A `per_example`
    dict receives each example's phi (privacy_stats.phi) on both sets, for many-model statistics."""
    import privacy_stats
    out = {}
    for name in ("forget_train", "retain_train", "forget_test", "retain_test"):
        out[name] = predict(model, getattr(splits, name), device, batch_size, amp, desc=f"eval {name}")
    test_logits = torch.cat([out["forget_test"][0], out["retain_test"][0]]) if len(out["forget_test"][1]) \
        else out["retain_test"][0]
    test_y = torch.cat([out["forget_test"][1], out["retain_test"][1]])
    m = {f"{name}_acc": accuracy(*out[name]) for name in out}
    m["test_acc"] = accuracy(test_logits, test_y)
    m["df"] = m[f"{splits.df_split}_acc"]
    m["mia"], m["mia_attack_auc"] = membership_attack(out["retain_train"][0], test_logits, out["forget_train"][0])
    counterpart = out["forget_test"] if splits.df_split == "forget_test" else (test_logits, test_y)
    losses = [F.cross_entropy(z, y, reduction="none").numpy() if len(y) else [] for z, y in (out["forget_train"],
                                                                                           counterpart)]
    # a model whose outputs hold NaN (a collapsed one) has no loss order; its other metrics still count
    m["loss_auc"] = None if any(np.isnan(x).any() for x in losses) else privacy_stats.loss_auc(*losses)
    if per_example is not None:  # aligned by index: the same request gives the same order on every model
        per_example["forget_idx"] = splits.forget_idx
        per_example["counterpart_idx"] = splits.forget_test_idx if splits.df_split == "forget_test" else \
            np.concatenate([splits.forget_test_idx, splits.retain_test_idx])
        per_example["phi_forget"] = privacy_stats.phi(*out["forget_train"]).astype(np.float32)
        per_example["phi_counterpart"] = privacy_stats.phi(*counterpart).astype(np.float32)
    if random_model is not None:
        ref_logits, _ = predict(random_model, splits.forget_train, device, batch_size, amp, desc="eval zrf")
        m["zrf"] = float(1.0 - js_divergence(out["forget_train"][0], ref_logits).mean())
    m["n_forget_train"], m["n_retain_train"] = len(splits.forget_idx), len(splits.retain_idx)
    m["n_forget_test"], m["n_retain_test"] = len(splits.forget_test_idx), len(splits.retain_test_idx)
    return m


OUTCOMES = ("clean", "collapse", "untouched", "partial")


def outcome(df: float, retain: float, original_retain: float, original_df: float,
            reference_df: float | None = None) -> str:
    """What one forget request did, from its Df and retain-test accuracy (in %) and the original's.

    collapse = retain-test < 50 comes first. Without `reference_df` (full class, where a model that
    never saw the class scores 0 on it): untouched = Df >= 90; clean = Df <= 10 and retain-test within
    5 points of the original; partial = anything else. Random and sub-class forgetting pass
    `reference_df`, what a model that never saw D_f scores on it (retrain's Df, or the original's
    validation accuracy), which may be high: a forgotten pair class whose superclass follows from its
    digits is still classified by a retrained model. Then clean = Df within 5 points of the reference
    and retain-test within 5 points of the original (a method that changes nothing is clean when the
    reference did not move either: accuracy cannot tell it apart, a membership test may); untouched
    = otherwise, Df not below the original's; partial = the rest."""
    if retain < 50:
        return "collapse"
    if reference_df is None:
        if df >= 90:
            return "untouched"
        return "clean" if df <= 10 and retain >= original_retain - 5 else "partial"
    if abs(df - reference_df) <= 5 and retain >= original_retain - 5:
        return "clean"
    return "untouched" if df >= original_df else "partial"
