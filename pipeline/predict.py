"""Classify new image files end to end with a run folder's model.

The run records the backbone, weights, preprocessing, tap node and pooling that
made its training features; the same chain is rebuilt here, so a prediction
sees exactly what the classifier was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from features.backbones import Backbone, Tap
from features.datasets import BadImage
from features.errors import TapsError
from features.extract import resolve_device, resolve_precision
from features.forward import build_extractor, forward_taps
from features.turbojpeg import file_pixels

from .evaluate import load_model, load_results


@dataclass
class Prediction:
    image: str
    label: str | None
    confidence: float | None  # a probability (logreg, linear) or a decision score (svm)
    kind: str                 # "probability" or "score"
    error: str = ""


def backbone_for(results: dict, weights: str | None = None) -> Backbone:
    """Rebuild the backbone and preprocessing recorded in a run."""
    f = results["features"]
    spec = weights or f["weights"]
    if spec.startswith("file:"):
        raise TapsError(f"this run used a local weights file ({spec}); pass --weights FILE.pth to predict")
    bb = Backbone(f["backbone"], weights=spec.split(".")[-1])
    if bb.transform_spec() != f["transform"]:
        bb = Backbone(f["backbone"], weights=spec.split(".")[-1], image_size=int(f["image_size"]))
    if bb.transform_spec() != f["transform"]:
        raise TapsError(f"cannot rebuild the preprocessing of this run ({f['transform']})")
    return bb


def predict_images(run_dir: Path | str, images: list[str], device: str = "auto", batch_size: int = 32,
                   weights: str | None = None) -> list[Prediction]:
    results = load_results(Path(run_dir))
    model = load_model(Path(run_dir), results)
    bb = backbone_for(results, weights)
    f = results["features"]
    tap = Tap(f["tap"], f["node"], (f["dim"],), 0)
    pooling = f["pooling"] if f["pooling"] != "none" else "avg"
    dev = resolve_device(device)
    precision = f.get("precision") or resolve_precision("auto", dev)
    extractor = build_extractor(bb, [tap], dev, channels_last=True, pooling=pooling)
    transform = bb.pixel_transform()
    decode = f.get("decode", "pil")  # decode as the training features were; runs before the attr were PIL
    classes = results["classes"]
    out: list[Prediction] = []
    has_proba = hasattr(model, "predict_proba")
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        tensors, good = [], []
        for path in chunk:
            try:
                tensors.append(file_pixels(path, transform, int(transform.resize_size[0]), decode))
                good.append(path)
            except (BadImage, FileNotFoundError) as exc:
                out.append(Prediction(path, None, None, "", str(exc) or "cannot read"))
        if not tensors:
            continue
        X = forward_taps(extractor, torch.from_numpy(np.stack(tensors)), dev, precision)[tap.name]
        scores = model.predict_proba(X) if has_proba else model.decision_function(X)
        if scores.ndim == 1:  # binary decision function: score of the positive class
            scores = np.stack([-scores, scores], axis=1)
        for path, row in zip(good, scores):
            best = int(np.argmax(row))
            label = classes[int(model.classes_[best])]
            out.append(Prediction(path, label, float(row[best]), "probability" if has_proba else "score"))
    order = {p: i for i, p in enumerate(images)}
    return sorted(out, key=lambda p: order[p.image])
