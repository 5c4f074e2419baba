"""The CUDA paths: a forget run on the GPU, bf16 autocast, deterministic reruns.

`pytest -m gpu` selects the CUDA tests; without CUDA they are skipped. The bf16 selection check also
runs on the CPU (not marked gpu), so the autocast path of the importances is covered everywhere.
"""
import json
import math
from pathlib import Path

import pytest
import torch

import models
import ssd
from conftest import plan_argv, run_argv
from training import loader

torch.set_num_threads(1)

SSD_PARAMS = {"resnet18": (10.0, 1.0)}
CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def argv_for(ckpt: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--weights", str(ckpt / "model.pt"), "--results", str(tmp_path / "results.jsonl"), "--wandb", "disabled",
            "--importance-cache", str(tmp_path / "cache"), "--forget-class", "three", *extra]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_forget_run_on_cuda_writes_its_results_line(tiny_checkpoint, tmp_path):
    record = run_argv("full_class", argv_for(tiny_checkpoint, tmp_path, "--device", "cuda", "--method", "ssd"),
                      SSD_PARAMS)
    (line,) = (tmp_path / "results.jsonl").read_text().splitlines()
    saved = json.loads(line)
    assert saved["key"] == record["key"] and saved["config"]["device"] == "cuda"
    assert saved["device_name"] == torch.cuda.get_device_name(0) != "cpu"
    assert saved["method_info"]["cache_hit"] is False and saved["method_info"]["dampened"] > 0
    for k in ("df", "retain_test_acc", "test_acc", "mia", "zrf"):
        assert math.isfinite(saved["metrics"][k]), k


def _selection(imp_full: dict, imp_forget: dict, alpha: float) -> torch.Tensor:
    """SSD's selection I_Df > alpha I_D over every parameter, as one flat mask."""
    return torch.cat([(imp_forget[n] > alpha * imp_full[n]).flatten().cpu() for n in imp_full])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_bf16_importances_are_finite_and_select_like_fp32(tiny_checkpoint, tmp_path, device):
    p = plan_argv("full_class", argv_for(tiny_checkpoint, tmp_path, "--device", device), SSD_PARAMS)
    dev = torch.device(device)
    model = models.load_checkpoint(p.weights, p.meta).to(dev)
    imp = {}
    for amp in (False, True):
        full = ssd.importance(model, loader(p.splits.full_train, 64, dev, shuffle=True, seed=0), dev, amp=amp)
        forget = ssd.importance(model, loader(p.splits.forget_train, 64, dev, shuffle=True, seed=0), dev, amp=amp)
        imp[amp] = full, forget
    for t in [*imp[True][0].values(), *imp[True][1].values()]:
        assert torch.isfinite(t).all()
    # bf16 really ran: its gradients carry 8 mantissa bits, so the importances differ from fp32
    assert not torch.equal(imp[True][0]["conv1.weight"], imp[False][0]["conv1.weight"])
    fp32, bf16 = _selection(*imp[False], alpha=10.0), _selection(*imp[True], alpha=10.0)
    jaccard = (fp32 & bf16).sum().item() / (fp32 | bf16).sum().item()
    # measured on the CPU with this model: 0.956 (8706 vs 8576 of 44,622 elements selected)
    assert jaccard > 0.9, jaccard
    assert abs(bf16.sum().item() - fp32.sum().item()) < 0.05 * fp32.sum().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_eval_run_completes_close_to_fp32(tiny_checkpoint, tmp_path):
    argv = argv_for(tiny_checkpoint, tmp_path, "--device", "cuda", "--method", "baseline")
    fp32 = run_argv("full_class", argv, SSD_PARAMS)
    bf16 = run_argv("full_class", argv + ["--amp"], SSD_PARAMS)
    assert bf16["config"]["amp"] is True and bf16["key"] != fp32["key"]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
    for k in ("test_acc", "retain_test_acc", "forget_train_acc", "retain_train_acc"):
        assert abs(bf16["metrics"][k] - fp32["metrics"][k]) <= 5.0, k  # a few logits near a tie may flip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deterministic_cuda_reruns_are_identical(tiny_checkpoint, tmp_path, restore_determinism):
    argv = argv_for(tiny_checkpoint, tmp_path, "--device", "cuda", "--method", "ssd", "--deterministic",
                    "--no-importance-cache", "--force")
    first = run_argv("full_class", argv, SSD_PARAMS)
    second = run_argv("full_class", argv, SSD_PARAMS)
    assert second["metrics"] == first["metrics"]
    assert second["method_info"] == first["method_info"]
