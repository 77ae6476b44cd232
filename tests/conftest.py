"""Tiny synthetic datasets: a few small images per class, made fresh for each test session."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_images(root: Path, classes=("circle", "square", "stripes"), per_class=6, size=40, seed=0, fmt="jpg"):
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
    make_images(root / "train", per_class=6, seed=1)
    make_images(root / "val", per_class=3, seed=2)
    return root


@pytest.fixture(scope="session")
def tiny_flat(tmp_path_factory) -> Path:
    """folder: dataset without a split, 3 classes x 10 images."""
    root = tmp_path_factory.mktemp("flat")
    make_images(root, per_class=10, seed=3)
    return root
