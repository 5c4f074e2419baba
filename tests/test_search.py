"""SSD that chooses its own alpha: ASSD's percentile rule and the guarded search (ssd_search).

The search tests use a model whose answer is known in advance: each image is black but for one
pixel, and a linear model reads that pixel alone, so every sample is classified by its own two
weights. Dampening a sample's weight for its own class flips its prediction, so which samples the
dampened model still gets right follows from which elements the selection takes.
"""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import datasets
import methods
import ssd
from conftest import method_args, run_argv


N_FORGET, N_RETAIN, N_VAL, SIDE = 40, 40, 40, 8
PIXELS = 3 * SIDE * SIDE


class OnePixelLinear(nn.Module):
    """Logits = W[:, pixel] + b, where `pixel` is the one lit pixel of the image."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, PIXELS))
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.flatten(1) + 1) / 2) @ self.weight.T + self.bias  # normalised -1/+1 back to 0/1


def one_pixel_splits() -> tuple[datasets.Splits, dict]:
    """Forget class 0 (N_FORGET images), retain class 1 (N_RETAIN train and N_VAL validation images),
    each image lit at its own pixel; returns the full-class splits and each group's pixel columns."""
    n = N_FORGET + N_RETAIN + N_VAL
    x = np.zeros((n, SIDE, SIDE, 3), dtype=np.uint8)
    x.reshape(n, -1)[np.arange(n), np.arange(n)] = 255
    y = np.array([0] * N_FORGET + [1] * (N_RETAIN + N_VAL))
    tf = datasets.make_transform("synthetic", SIDE, train=False, native_size=SIDE)
    train = datasets.LabeledImages(datasets._UInt8Images(x), y, None, tf)
    test = datasets.LabeledImages(datasets._UInt8Images(x[:4]), y[:4], None, tf)
    data = datasets.Data(name="one_pixel", train=train, test=test, train_aug=train,
                         train_idx=np.arange(N_FORGET + N_RETAIN), val_idx=np.arange(N_FORGET + N_RETAIN, n),
                         classes=["class0", "class1"], fine_classes=["class0", "class1"], image_size=SIDE)
    splits = datasets.build_splits("full_class", data, "class0")
    column = {i: int(train[i][0].flatten().argmax()) for i in range(n)}  # CHW position of each lit pixel
    cols = {"forget": [column[i] for i in splits.forget_idx], "retain": [column[i] for i in splits.retain_idx],
            "val": [column[i] for i in splits.retain_val_idx]}
    return splits, cols


def one_pixel_model(cols: dict, forget_margin: float = 5.0) -> nn.Module:
    """Each sample's own-class weight is `forget_margin` (forget) or 5 (retain), plus a seeded jitter
    below 1 so that no two samples' gradients tie, and the other class's weight is 1: every sample is
    right, and dampening its own-class weight by a factor of 50 or more makes it wrong."""
    model = OnePixelLinear()
    jitter = np.random.default_rng(3).uniform(0, 1, PIXELS)
    with torch.no_grad():
        for c in cols["forget"]:
            model.weight[0, c], model.weight[1, c] = forget_margin + jitter[c], 1.0
        for c in cols["retain"] + cols["val"]:
            model.weight[1, c], model.weight[0, c] = 5.0 + jitter[c], 1.0
    return model.eval()


def args_for(method: str, **overrides) -> tuple:
    """(hyperparameters, run context) of `method` at its defaults, as a run passes them."""
    return method_args(method, "full_class", **overrides)


def constructed_importances(monkeypatch, splits, ratios: dict) -> dict:
    """Make methods.ssd_importances return I_D = 1 and I_Df = the given ratio of each weight
    element ((row, column) -> ratio); every other element gets a small ratio below 1, so selecting
    it changes nothing (beta = min(I_D / I_Df, 1) = 1). Returns the flat ratios in parameter order."""
    rng = np.random.default_rng(0)
    forget = {"weight": torch.tensor(rng.uniform(0, 0.9, (2, PIXELS)), dtype=torch.float32),
              "bias": torch.tensor(rng.uniform(0, 0.9, 2), dtype=torch.float32)}
    for (row, col), r in ratios.items():
        forget["weight"][row, col] = r
    full = {n: torch.ones_like(t) for n, t in forget.items()}
    info = {"importance_full_s": 0.0, "importance_forget_s": 0.0, "cache_hit": False, "importance_order": "paper",
            "ratio_cap": len(splits.data.train_idx) / len(splits.forget_idx)}
    monkeypatch.setattr(methods, "ssd_importances", lambda *a, **k: (full, forget, info))
    return np.concatenate([forget["weight"].numpy().ravel(), forget["bias"].numpy()]).astype(np.float64)


def walk(flat_ratios: np.ndarray, forget_ratios, val_ratios, cap: float, rho: float = 0.1, max_drop: float = 5.0):
    """Potion's walk, simulated from the ratios alone: which step comes first, the target or the guard."""
    fractions = (1 / cap / 25) * 1.1 ** np.arange(500)
    for k, s in enumerate(fractions[fractions < 1]):
        alpha = np.percentile(flat_ratios, 100 * (1 - s))
        forget_acc = 100 * np.mean(np.asarray(forget_ratios) <= alpha)  # a selected sample is forgotten
        val_acc = 100 * np.mean(np.asarray(val_ratios) <= alpha)
        if val_acc < 100 - max_drop:
            return k, "guard_hit", s
        if forget_acc <= rho * 100:
            return k, "target_reached", s
    raise AssertionError("the construction should stop the walk")


def test_assd_alpha_is_the_numpy_percentile_of_the_same_importances(monkeypatch):
    splits, cols = one_pixel_splits()
    model = one_pixel_model(cols)
    seen = []
    real = methods.ssd_importances
    monkeypatch.setattr(methods, "ssd_importances", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    before = copy.deepcopy(model.state_dict())
    _, info = methods.assd(model, splits, *args_for("assd"))

    (imp_full, imp_forget, _), = seen
    ratios = np.concatenate([(imp_forget[n].double() / imp_full[n].double()).numpy().ravel() for n in imp_forget])
    assert not np.isfinite(ratios).all()  # unlit pixels have I_D = I_Df = 0: those must be left out
    ratios = ratios[np.isfinite(ratios)]
    d, d_f = len(splits.forget_idx) + len(splits.retain_idx), len(splits.forget_idx)
    p = 100 - math.log(1 + 100 * d_f / d)
    assert info["percentile"] == pytest.approx(p, rel=1e-12)
    assert info["chosen_alpha"] == pytest.approx(float(np.percentile(ratios, p)), rel=1e-12)
    assert info["lambda"] == 1.0
    # the dampened elements are exactly those above alpha, and only they changed
    selected = sum(int((imp_forget[n] > info["chosen_alpha"] * imp_full[n]).sum()) for n in imp_forget)
    changed = sum(int((before[n] != v).sum()) for n, v in model.state_dict().items())
    assert info["dampened"] == selected > 0 and changed <= selected


@pytest.mark.parametrize("strategy", ["gallop", "geometric"])
def test_search_stops_at_the_first_step_that_meets_the_target(monkeypatch, strategy):
    splits, cols = one_pixel_splits()
    forget_ratios = 50.0 + np.random.default_rng(1).permutation(N_FORGET)  # all above every other element
    flat = constructed_importances(monkeypatch, splits, {(0, c): r for c, r in zip(cols["forget"], forget_ratios)})
    cap = len(splits.data.train_idx) / len(splits.forget_idx)
    k, status, s = walk(flat, forget_ratios, [0.0] * N_VAL, cap)
    assert status == "target_reached" and k >= 5  # several steps in: the walk has something to find

    model, info = methods.ssd_search(one_pixel_model(cols), splits, *args_for("ssd_search", search_strategy=strategy))
    assert info["search_status"] == "target_reached"
    assert info["selection_fraction"] == pytest.approx(s, rel=1e-12)
    assert info["chosen_alpha"] == pytest.approx(ssd.alpha_for_fraction(*methods.ssd_importances()[:2], s), rel=1e-12)
    assert info["forget_train_acc"] <= 10 < 100 * np.mean(forget_ratios <= np.percentile(flat, 100 * (1 - s / 1.1)))
    assert info["retain_val_acc"] == info["original_retain_val_acc"] == 100
    preds = methods.predict(model, splits.forget_train, torch.device("cpu"))[0].argmax(1)
    assert 100 * int((preds == 0).sum()) / N_FORGET == info["forget_train_acc"]  # the returned model is that step
    assert info["search_steps"] == (k + 1 if strategy == "geometric" else pytest.approx(2 * math.log2(k + 1), abs=3))
    assert info["search_s"] >= 0 and info["dampened"] > 0


def test_guard_stops_the_search_when_dampening_destroys_the_retain_set(monkeypatch):
    splits, cols = one_pixel_splits()
    rng = np.random.default_rng(2)
    # ten forget samples go first; then the rest of D_f and the validation samples are taken together
    mixed = 50.0 + rng.permutation(N_FORGET - 10 + N_VAL)
    forget_ratios = np.concatenate([200.0 + np.arange(10), mixed[:N_FORGET - 10]])
    val_ratios = mixed[N_FORGET - 10:]
    flat = constructed_importances(monkeypatch, splits, {
        **{(0, c): r for c, r in zip(cols["forget"], forget_ratios)},
        **{(1, c): r for c, r in zip(cols["val"], val_ratios)}})
    cap = len(splits.data.train_idx) / len(splits.forget_idx)
    k, status, _ = walk(flat, forget_ratios, val_ratios, cap)
    assert status == "guard_hit" and k >= 1  # some steps pass the guard before it stops the walk
    last_good = (1 / cap / 25) * 1.1 ** (k - 1)

    for strategy in ("gallop", "geometric"):
        model, info = methods.ssd_search(one_pixel_model(cols), splits, *args_for("ssd_search", search_strategy=strategy))
        assert info["search_status"] == "guard_hit"
        assert info["selection_fraction"] == pytest.approx(last_good, rel=1e-12)
        assert 95 <= info["retain_val_acc"] < 100 and info["forget_train_acc"] > 10
        val_preds = methods.predict(model, splits.retain_val, torch.device("cpu"))[0].argmax(1)
        assert 100 * int((val_preds == 1).sum()) / N_VAL == info["retain_val_acc"]



def test_a_guard_that_no_step_passes_keeps_the_original_model(monkeypatch):
    splits, cols = one_pixel_splits()
    constructed_importances(monkeypatch, splits, {  # the validation samples' weights are selected first
        **{(0, c): 50.0 + i for i, c in enumerate(cols["forget"])},
        **{(1, c): 200.0 + i for i, c in enumerate(cols["val"])}})
    model = one_pixel_model(cols)
    before = copy.deepcopy(model.state_dict())
    _, info = methods.ssd_search(model, splits, *args_for("ssd_search"))
    assert info["search_status"] == "guard_hit" and info["chosen_alpha"] is None and info["dampened"] == 0
    assert all(torch.equal(before[n], v) for n, v in model.state_dict().items())


def test_forget_set_with_zero_gradients_is_target_unreachable():
    splits, cols = one_pixel_splits()
    model = one_pixel_model(cols, forget_margin=1000.0)  # softmax is exactly one-hot: zero gradients on D_f
    before = copy.deepcopy(model.state_dict())
    imp_full, imp_forget, _ = methods.ssd_importances(model, splits, "paper", args_for("ssd")[1])
    assert all(float(t.abs().max()) == 0 for t in imp_forget.values())
    assert any(float(t.abs().max()) > 0 for t in imp_full.values())

    model, info = methods.ssd_search(model, splits, *args_for("ssd_search"))
    assert info["search_status"] == "target_unreachable" and info["dampened"] == 0
    assert info["forget_train_acc"] == info["original_forget_train_acc"] == 100
    assert all(torch.equal(before[n], v) for n, v in model.state_dict().items())


def test_search_grid_walks_agree_and_gallop_probes_less():
    for steps in (1, 2, 7, 58):
        for target_at in range(steps + 1):  # steps means never
            for guard_at in range(steps + 1):
                answers = []
                for strategy in ("geometric", "gallop"):
                    probed = []

                    def probe(k):
                        probed.append(k)
                        return k >= target_at, k < guard_at

                    answers.append(ssd.search_grid(probe, steps, strategy)[:2])
                    assert len(probed) == len(set(probed))
                first = min(target_at, guard_at)
                if first == steps:
                    assert answers[0] == (steps - 1, "target_unreachable")
                elif guard_at <= target_at:
                    assert answers[0] == ((guard_at - 1) if guard_at else None, "guard_hit")
                else:
                    assert answers[0] == (target_at, "target_reached")
                assert answers[1] == answers[0]
    probes = [ssd.search_grid(lambda k: (k >= 40, True), 58, s)[2] for s in ("geometric", "gallop")]
    assert probes[0] == 41 and probes[1] <= 12


def test_a_search_run_says_its_status_in_the_summary_line(tiny_checkpoint, tmp_path, capsys):
    argv = ["--weights", str(tiny_checkpoint / "model.pt"), "--forget-class", "three", "--method", "ssd_search",
            "--device", "cpu", "--wandb", "disabled", "--results", str(tmp_path / "r.jsonl"),
            "--importance-cache", str(tmp_path / "cache")]
    record = run_argv("full_class", argv)
    info = record["method_info"]
    assert info["search_status"] in ("target_reached", "guard_hit", "target_unreachable")
    assert record["times"]["search_s"] <= record["times"]["method_s"]
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Df ")]
    assert len(summary) == 1 and f"{info['search_status']} ({info['search_steps']} steps)" in summary[0]
