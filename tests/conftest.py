"""Tiny synthetic datasets: a few small images per class, made fresh for each test session."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth, photo-like RGB image with noise (JPEG-friendly, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([np.sin(xx / 7.0 + seed), np.cos(yy / 5.0), np.sin((xx + yy) / 11.0)], -1) * 90 + 128
    return Image.fromarray(np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def photo():
    """``photo(w, h, seed)`` -> a photo-like PIL image."""
    return _photo


@pytest.fixture(scope="session")
def image_folder():
    """``image_folder(root, classes=..., per_class=6, size=40, seed=0, fmt="jpg")`` writes an
    ImageFolder tree of class-dependent patterns and returns the paths."""
    return _make_images


def _make_images(root: Path, classes=("circle", "square", "stripes"), per_class=6, size=40, seed=0, fmt="jpg"):
    """Class-dependent patterns plus noise, so a linear classifier can separate them."""
    rng = np.random.default_rng(seed)
    paths = []
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), np.float32)
            base[..., c % 3] = 200
            if c == 1:
                base[::4] = 255
            if c == 2:
                base[:, ::5] = 0
            img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            path = root / name / f"img_{i:03d}.{fmt}"
            Image.fromarray(img).save(path)
            paths.append(path)
    return paths


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """folder: dataset with an official split (train/ and val/), 3 classes."""
    root = tmp_path_factory.mktemp("tiny")
    _make_images(root / "train", per_class=6, seed=1)
    _make_images(root / "val", per_class=3, seed=2)
    return root


@pytest.fixture(scope="session")
def tiny_flat(tmp_path_factory) -> Path:
    """folder: dataset without a split, 3 classes x 10 images."""
    root = tmp_path_factory.mktemp("flat")
    _make_images(root, per_class=10, seed=3)
    return root
