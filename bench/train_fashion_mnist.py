"""Train the bundled demo model (``squant.demo_model.FashionNet``) on Fashion-MNIST, on CPU.

Reads the dataset installed by Debian's ``dataset-fashion-mnist`` package (gzip'd idx files),
trains the BatchNorm form of ``FashionNet`` on the 60,000 training images, folds each BatchNorm
into the conv before it, checks that the folded network predicts as the trained one does on
the 10,000 test images, and writes to ``--out-dir``:

- ``fashion_net.safetensors``: the folded float32 weights, with accuracies and settings as
  metadata;
- ``fashion_mnist_test_2000.npz``: 200 test images per class (seeded choice), as uint8
  ``images``, ``labels`` and their ``indices`` in the test set.

Run: ``python bench/train_fashion_mnist.py [--epochs 10] [--seed 0] [--out-dir squant/data]``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle threads must not spin

import gzip
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from squant.demo_model import (
    CLASS_NAMES,
    PIXEL_MEAN,
    PIXEL_STD,
    TEST_SLICE_FILE,
    WEIGHTS_FILE,
    ConvUnit,
    FashionNet,
    normalize_images,
)

DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_UBYTE = 0x08  # idx type code for unsigned bytes, the only one Fashion-MNIST uses
SLICE_PER_CLASS = 200
CROP_PADDING = 2
MAX_BUNDLED_BYTES = 1 << 20


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (gzip'd when named ``*.gz``) of unsigned bytes into an array.

    Layout: two zero bytes, the type code, the number of dimensions, one big-endian int32 per
    dimension, then the data in C order.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\0\0" or raw[2] != IDX_UBYTE:
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", ndim, offset=4))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return uint8 images ``(N, 28, 28)`` and labels ``(N,)`` of ``train`` or ``t10k``."""
    if not DATASET_DIR.is_dir():
        raise SystemExit(
            f"Fashion-MNIST not found in {DATASET_DIR}: "
            "run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) first"
        )
    images = read_idx(DATASET_DIR / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(DATASET_DIR / f"{split}-labels-idx1-ubyte.gz")
    return images, labels


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``CROP_PADDING`` pixels (padding with black) and flip half.

    Equivalent to a random crop of the padded image; done on the whole batch at once.
    """
    n, _, h, w = batch.shape
    black = -PIXEL_MEAN / PIXEL_STD
    padded = F.pad(batch, (CROP_PADDING,) * 4, value=black)
    dy, dx = torch.randint(0, 2 * CROP_PADDING + 1, (2, n, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, :, None]
    cols = (dx + torch.arange(w))[:, None, :]
    shifted = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], shifted.flip(3), shifted)


def train(
    model: FashionNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> None:
    """Train with AdamW under a one-cycle learning-rate schedule, logging each epoch's loss."""
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = -(-len(labels) // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch
    )
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        total_loss = 0.0
        for batch in order.split(args.batch_size):
            x = augment(images[batch], generator).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        log(f"epoch {epoch + 1}/{args.epochs}: train loss {total_loss / len(labels):.4f}")


@torch.no_grad()
def predict(model: FashionNet, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Return the predicted class of every image, in eval mode (channels-last: faster on CPU)."""
    model.eval().to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    return torch.cat([model(x).argmax(1) for x in images.split(batch_size)])


@torch.no_grad()
def fold_batch_norm(trained: FashionNet) -> FashionNet:
    """Return the deployed ``FashionNet`` whose convs absorb the trained network's BatchNorms.

    In eval mode BN is ``y = (conv(x) - mean) * gamma / sqrt(var + eps) + beta``, which is one
    conv with weight ``w * s`` and bias ``beta - mean * s`` for ``s = gamma / sqrt(var + eps)``.
    Computed in float64, stored as float32.
    """
    state = {}
    for name, unit in trained.named_modules():
        if isinstance(unit, ConvUnit):
            bn = unit.bn
            scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
            weight = unit.conv.weight.double() * scale[:, None, None, None]
            bias = bn.bias.double() - bn.running_mean.double() * scale
            state[f"{name}.conv.weight"] = weight.float().contiguous()
            state[f"{name}.conv.bias"] = bias.float()
    state["head.weight"] = trained.head.weight.clone()
    state["head.bias"] = trained.head.bias.clone()
    deployed = FashionNet()
    deployed.load_state_dict(state)  # strict: every deployed parameter is set exactly once
    return deployed.eval()


def choose_slice(labels: np.ndarray, seed: int) -> np.ndarray:
    """Pick ``SLICE_PER_CLASS`` test indices per class with a seeded generator, sorted."""
    rng = np.random.default_rng(seed)
    picks = [
        rng.choice(np.flatnonzero(labels == c), SLICE_PER_CLASS, replace=False)
        for c in range(len(CLASS_NAMES))
    ]
    return np.sort(np.concatenate(picks))


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to the labels."""
    return (predictions == labels).double().mean().item()


def check_size(path: Path) -> int:
    """Return the file's size, failing if it is over ``MAX_BUNDLED_BYTES``."""
    size = path.stat().st_size
    if size > MAX_BUNDLED_BYTES:
        raise SystemExit(f"{path} is {size} bytes, over the {MAX_BUNDLED_BYTES}-byte limit")
    return size


def parse_args() -> argparse.Namespace:
    """Command-line settings; the defaults are those of the bundled files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("squant/data"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=4e-3, help="peak of the one-cycle schedule")
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    """Train, fold, check, and write the bundled weights and test slice."""
    args = parse_args()
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_images, train_labels = load_split("train")
    test_images, test_labels = load_split("t10k")
    x_test, y_test = normalize_images(test_images), torch.from_numpy(test_labels.astype(np.int64))

    trained = FashionNet(batch_norm=True).to(memory_format=torch.channels_last)
    log(f"FashionNet: {sum(p.numel() for p in trained.parameters())} parameters with BatchNorm")
    train(
        trained,
        normalize_images(train_images),
        torch.from_numpy(train_labels.astype(np.int64)),
        args,
        log,
    )
    train_seconds = time.perf_counter() - start

    deployed = fold_batch_norm(trained)
    trained_predictions, predictions = predict(trained, x_test), predict(deployed, x_test)
    test_accuracy = accuracy(predictions, y_test)
    agreement = accuracy(predictions, trained_predictions)
    log(
        f"10k test accuracy: trained (BN) {accuracy(trained_predictions, y_test):.4f}, "
        f"folded {test_accuracy:.4f}; predictions agree on {agreement:.4%}"
    )
    if abs(test_accuracy - accuracy(trained_predictions, y_test)) > 1e-3:
        raise SystemExit("folding BatchNorm changed the accuracy by more than 0.1%")

    indices = choose_slice(test_labels, args.seed)
    slice_accuracy = accuracy(predictions[indices], y_test[indices])
    log(f"accuracy on the {len(indices)}-image slice: {slice_accuracy:.4f}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = args.out_dir / WEIGHTS_FILE
    metadata = {
        "format": "pt",
        "model": "squant.demo_model.FashionNet (BatchNorm folded)",
        "dataset": "Fashion-MNIST (Zalando Research, MIT); Debian dataset-fashion-mnist",
        "parameters": str(sum(p.numel() for p in deployed.parameters())),
        "test_accuracy_10k": f"{test_accuracy:.4f}",
        "test_accuracy_slice_2000": f"{slice_accuracy:.4f}",
        "training": json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        ),
        "torch": torch.__version__,
    }
    state = {name: tensor.contiguous() for name, tensor in deployed.state_dict().items()}
    save_file(state, weights_path, metadata=metadata)
    slice_path = args.out_dir / TEST_SLICE_FILE
    np.savez_compressed(
        slice_path,
        images=test_images[indices],
        labels=test_labels[indices],
        indices=indices.astype(np.uint16),
    )
    log(f"wrote {weights_path} ({check_size(weights_path)} bytes)")
    log(f"wrote {slice_path} ({check_size(slice_path)} bytes)")
    log(f"training took {train_seconds:.0f}s")


if __name__ == "__main__":
    main()
