"""Models: the CIFAR-stem ResNet18 and a ViT from `transformers`.

A model is fully described by a small dict, its *spec* (net, num_classes, image_size and a few
options), stored in each checkpoint's metadata so the model can be rebuilt without guessing.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from common import UserError

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
