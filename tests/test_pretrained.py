"""The one real-weights test: MobileNetV2 ImageNet weights (seeded offline) see a cat in chelsea()."""

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
    assert _checkpoint_path(bb.weights.enum).is_file(), "run `make weights` to seed the offline checkpoint"
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
