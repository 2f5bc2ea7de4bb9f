"""The bundled demo: a small trained Fashion-MNIST CNN and 2,000 real test images, no download.

``FashionNet`` is a ResNet-style CNN for 1x28x28 images that holds every layer kind the
quantizer must handle: plain, grouped (1 < groups < channels) and depthwise (groups ==
channels) convs, 1x1 convs and a linear head. The bundled weights are the deployed form: each
BatchNorm was folded into the conv before it, so the network is convs with bias, ReLUs,
residual adds and the head, and quantizing its weights is what quantizing a deployed model is.

The weights and images are produced by ``bench/train_fashion_mnist.py``; see
``squant/data/README.md``.
"""

from __future__ import annotations

import importlib.resources
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Mean and standard deviation of the Fashion-MNIST training pixels, scaled to [0, 1].
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530

WEIGHTS_FILE = "fashion_net.safetensors"
TEST_SLICE_FILE = "fashion_mnist_test_2000.npz"


class ConvUnit(nn.Module):
    """A conv followed by BatchNorm (for training) or a conv with bias (deployed, BN folded).

    Both forms share the ``conv`` name, so a trained unit's folded weights load straight into
    the deployed one.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=not batch_norm,
        )
        self.bn = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve, then normalise when training with BatchNorm."""
        return self.bn(self.conv(x))


class ResidualBlock(nn.Module):
    """A 3x3 conv (grouped or depthwise, channel count kept), a 1x1 conv, and a shortcut.

    The cheap 3x3 conv filters space, the 1x1 conv mixes channels; the shortcut is the identity,
    or a strided 1x1 conv when the block changes resolution or width, as in ResNet.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, groups: int, batch_norm: bool
    ) -> None:
        super().__init__()
        self.spatial = ConvUnit(in_channels, in_channels, 3, stride, groups, batch_norm)
        self.mix = ConvUnit(in_channels, out_channels, 1, batch_norm=batch_norm)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else ConvUnit(in_channels, out_channels, 1, stride, batch_norm=batch_norm)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``relu(mix(relu(spatial(x))) + shortcut(x))``."""
        out = self.mix(self.relu(self.spatial(x)))
        return self.relu(out + self.shortcut(x))


class FashionNet(nn.Module):
    """ResNet-style CNN for 1x28x28 Fashion-MNIST images, about 52k parameters.

    Layers (output channels @ resolution):

    - stem: 3x3 conv, 32 @ 28x28
    - block1: grouped 3x3 conv (groups=4, stride 2), 1x1 conv, 1x1 shortcut: 64 @ 14x14
    - block2: depthwise 3x3 conv (groups=64), 1x1 conv, identity shortcut: 64 @ 14x14
    - block3: grouped 3x3 conv (groups=8, stride 2), 1x1 conv, 1x1 shortcut: 128 @ 7x7
    - block4: depthwise 3x3 conv (groups=128), 1x1 conv, identity shortcut: 128 @ 7x7
    - head: global average pool, linear 128 -> 10

    ``batch_norm=False`` (the default) is the deployed network, convs with bias and no
    BatchNorm, which the bundled weights are for; ``batch_norm=True`` is the network trained.
    """

    def __init__(self, batch_norm: bool = False) -> None:
        super().__init__()
        self.stem = ConvUnit(1, 32, 3, batch_norm=batch_norm)
        self.blocks = nn.Sequential(
            ResidualBlock(32, 64, stride=2, groups=4, batch_norm=batch_norm),
            ResidualBlock(64, 64, stride=1, groups=64, batch_norm=batch_norm),
            ResidualBlock(64, 128, stride=2, groups=8, batch_norm=batch_norm),
            ResidualBlock(128, 128, stride=1, groups=128, batch_norm=batch_norm),
        )
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(128, len(CLASS_NAMES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised images ``(N, 1, 28, 28)`` to class logits ``(N, 10)``."""
        features = self.blocks(self.relu(self.stem(x)))
        return self.head(features.mean(dim=(2, 3)))


def normalize_images(images: np.ndarray) -> torch.Tensor:
    """Turn uint8 images ``(N, 28, 28)`` into the float32 ``(N, 1, 28, 28)`` input of the net.

    Training and ``load_demo_data`` both use this, so the demo sees what the model was trained on.
    """
    pixels = torch.tensor(np.asarray(images, dtype=np.uint8)).float() / 255.0
    return ((pixels - PIXEL_MEAN) / PIXEL_STD).unsqueeze(1)


def _data_file(name: str) -> Traversable:
    """The bundled data file ``name``, wherever the package is installed."""
    return importlib.resources.files("squant") / "data" / name


def load_demo_model() -> FashionNet:
    """Build the deployed (BatchNorm-folded) ``FashionNet``, load the bundled weights, eval mode."""
    model = FashionNet()
    with importlib.resources.as_file(_data_file(WEIGHTS_FILE)) as path:
        model.load_state_dict(load_file(path))
    return model.eval()


def load_demo_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Return the bundled 2,000 Fashion-MNIST test images and labels.

    Images are float32 ``(2000, 1, 28, 28)``, normalised as in training; labels are int64
    ``(2000,)`` indices into ``CLASS_NAMES``. The slice is 200 images per class.
    """
    with _data_file(TEST_SLICE_FILE).open("rb") as f, np.load(f) as data:
        images, labels = data["images"], data["labels"]
    return normalize_images(images), torch.from_numpy(labels.astype(np.int64))
