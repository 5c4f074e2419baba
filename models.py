"""Models: the CIFAR-stem ResNet18 and a ViT from `transformers`, and their checkpoints.

A model is fully described by a small dict, its *spec* (net, num_classes, image_size and a few
options), stored in each checkpoint's metadata so the model can be rebuilt without guessing. A
checkpoint is a folder with model.pt (the state dict) and meta.json (spec, seed, recipe, sha256...),
as pretrain_model.py writes it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from common import UserError, file_sha256

NETS = ("resnet18", "vit")
VIT_DEFAULT_NAME = "google/vit-base-patch16-224"
# Offline ViT configs: "base" is ViT-B/16 (the architecture of the default pretrained name),
# "tiny" is small enough for tests and CPU demos.
VIT_CONFIGS = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, patch_size=4),
}


class ResNet18(nn.Module):
    """ResNet18 for 32x32 inputs: 3x3 stem, no max-pool. `width` 64 is the standard 11.2 M model."""

    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, in_ch = [], width
        for i, out_ch in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or in_ch != out_ch:
                down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
            layers.append(nn.Sequential(BasicBlock(in_ch, out_ch, stride, down), BasicBlock(out_ch, out_ch)))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))

    def head(self) -> nn.Module:
        return self.fc


class ViT(nn.Module):
    """A `transformers` ViTForImageClassification that returns plain logits."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.vit = hf_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x).logits

    def head(self) -> nn.Module:
        return self.vit.classifier


def make_spec(net: str, num_classes: int, image_size: int, width: int = 64, vit_config: str = "base",
              vit_name: str = VIT_DEFAULT_NAME) -> dict:
    if net not in NETS:
        raise UserError(f"unknown net {net!r} (choose one of {', '.join(NETS)})")
    if net == "resnet18":
        return {"net": net, "num_classes": num_classes, "image_size": image_size, "width": width}
    if vit_config not in VIT_CONFIGS:
        raise UserError(f"unknown --vit-config {vit_config!r} (choose one of {', '.join(VIT_CONFIGS)})")
    return {"net": net, "num_classes": num_classes, "image_size": image_size, "vit_config": vit_config,
            "vit_name": vit_name if vit_config == "base" else None}


def build(spec: dict, pretrained: bool = False) -> nn.Module:
    """A model from its spec. `pretrained` loads ImageNet weights by name (ViT-base only; needs the hub)."""
    if spec["net"] == "resnet18":
        return ResNet18(spec["num_classes"], spec.get("width", 64))
    from transformers import ViTConfig, ViTForImageClassification

    if pretrained and spec.get("vit_name"):
        try:
            hf = ViTForImageClassification.from_pretrained(
                spec["vit_name"], num_labels=spec["num_classes"], ignore_mismatched_sizes=True)
        except OSError as e:
            raise UserError(f"could not load pretrained ViT {spec['vit_name']!r}: {str(e).splitlines()[0]} "
                            f"(allow access to the HuggingFace hub, set HF_HOME to a cache that has it, "
                            f"or use --vit-config tiny for an offline model)") from None
        return ViT(hf)
    cfg = ViTConfig(image_size=spec["image_size"], num_labels=spec["num_classes"], **VIT_CONFIGS[spec["vit_config"]])
    return ViT(ViTForImageClassification(cfg))


def initial(spec: dict, pretrained: bool, seed: int) -> nn.Module:
    """The model as training starts from it: fresh random weights, or the pretrained ViT with a new head."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(spec, pretrained=pretrained)


def reinitialise_(model: nn.Module, spec: dict, pretrained: bool, seed: int) -> nn.Module:
    """Overwrite every parameter and buffer of `model` with those of `initial(spec)`, in place."""
    model.load_state_dict(initial(spec, pretrained, seed).state_dict())
    return model


def reset_head_(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise only the classifier head, as the SSD paper's code did for its 'retrain'."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.head().reset_parameters()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- checkpoints ---------------------------------------------------------------------------------

def find_checkpoint(checkpoint_dir: str | Path, net: str, dataset: str, seed: int) -> Path:
    """The model.pt whose meta.json matches (net, dataset, seed)."""
    found = []
    for meta_path in sorted(Path(checkpoint_dir).glob("*/meta.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("net") == net and meta.get("dataset") == dataset and meta.get("seed") == seed:
            found.append(meta_path.parent / "model.pt")
    if not found:
        raise UserError(f"no checkpoint for net={net} dataset={dataset} seed={seed} in {checkpoint_dir} "
                        f"(run: python pretrain_model.py --net {net} --dataset {dataset} --seed {seed}, "
                        f"or pass --weights)")
    if len(found) > 1:
        raise UserError(f"several checkpoints match net={net} dataset={dataset} seed={seed}: "
                        f"{', '.join(map(str, found))} (pass one with --weights)")
    return found[0]


def load_meta(weights: Path) -> dict:
    meta_path = weights.parent / "meta.json"
    if not weights.is_file():
        raise UserError(f"checkpoint {weights} not found (pretrain it with pretrain_model.py, or fix --weights)")
    try:
        return json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"metadata {meta_path} is missing or unreadable ({type(e).__name__}) "
                        f"(re-run pretrain_model.py, which writes both files)") from None


def load_checkpoint(weights: Path, meta: dict, kept: dict | None = None) -> nn.Module:
    """Rebuild the model from its metadata and load the weights safely, after checking the file hash.
    `kept` holds the weights of the last checkpoint loaded, by path and sha256, for the next run in the
    process (runner.Cache.weights)."""
    digest = file_sha256(weights) if meta.get("sha256") or kept is not None else None
    if meta.get("sha256") and digest != meta["sha256"]:
        raise UserError(f"checkpoint {weights} does not match the hash in its meta.json: the file was changed "
                        f"or truncated (re-run pretrain_model.py)")
    model = build(meta["model_spec"])
    cached = kept if kept is not None else {}
    key = (str(weights.resolve()), digest)
    try:
        state = cached.get(key) or torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)  # copies into the new model's tensors: the kept ones stay pristine
        if kept is not None and key not in cached:
            cached.clear()  # a grid runs one checkpoint's runs together: keep one, not a ViT per seed
            cached[key] = state
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        raise UserError(f"checkpoint {weights} cannot be loaded into {meta['model_spec']}: {msg[:200]} "
                        f"(the file is corrupt or was saved for another model; re-run pretrain_model.py)") from None
    except Exception as e:
        raise UserError(f"checkpoint {weights} is corrupt ({type(e).__name__}) (re-run pretrain_model.py)") from None
    return model
