"""Evaluation of an unlearned model: accuracies, the paper's membership-inference attack, and ZRF.

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
                      target_logits: torch.Tensor) -> float:
    """The SSD paper's MIA: logistic regression on entropy, trained on members (retain-train) against
    non-members (test); the result is the fraction of the target (forget-train) predicted 'member'."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([entropy(member_logits), entropy(nonmember_logits)])[:, None]
    y = np.concatenate([np.ones(len(member_logits)), np.zeros(len(nonmember_logits))])
    clf = LogisticRegression(class_weight="balanced", solver="lbfgs")
    clf.fit(x, y)
    return 100.0 * float(clf.predict(entropy(target_logits)[:, None]).mean())


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence between two softmax outputs (natural log, at most ln 2)."""
    p, q = F.softmax(logits_p.float(), 1), F.softmax(logits_q.float(), 1)
    m = (0.5 * (p + q)).clamp_min(1e-12)
    kl = lambda a: (a * (a.clamp_min(1e-12).log() - m.log())).sum(1)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def evaluate(model: nn.Module, splits: Splits, device: torch.device, random_model: nn.Module | None = None,
             batch_size: int = 512, amp: bool = False) -> dict:
    """All metrics for one unlearned model. `random_model`, a freshly initialised model of the same
    architecture, is the reference for ZRF (Chundawat et al.); without it ZRF is skipped."""
    out = {}
    for name in ("forget_train", "retain_train", "forget_test", "retain_test"):
        out[name] = predict(model, getattr(splits, name), device, batch_size, amp, desc=f"eval {name}")
    test_logits = torch.cat([out["forget_test"][0], out["retain_test"][0]]) if len(out["forget_test"][1]) \
        else out["retain_test"][0]
    test_y = torch.cat([out["forget_test"][1], out["retain_test"][1]])
    m = {f"{name}_acc": accuracy(*out[name]) for name in out}
    m["test_acc"] = accuracy(test_logits, test_y)
    m["df"] = m[f"{splits.df_split}_acc"]
    m["mia"] = membership_attack(out["retain_train"][0], test_logits, out["forget_train"][0])
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

    Class scenarios: collapse = retain-test < 50; untouched = Df >= 90; clean = Df <= 10 and
    retain-test within 5 points of the original; partial = anything else. Random forgetting passes
    `reference_df`, what a model that never saw D_f scores on it (retrain's Df, or the original's
    validation accuracy): untouched = Df not below the original's Df; clean = Df within 5 points of
    the reference and retain-test within 5 points of the original."""
    if retain < 50:
        return "collapse"
    if reference_df is None:
        if df >= 90:
            return "untouched"
        return "clean" if df <= 10 and retain >= original_retain - 5 else "partial"
    if df >= original_df:
        return "untouched"
    return "clean" if abs(df - reference_df) <= 5 and retain >= original_retain - 5 else "partial"
