"""Classify new image files end to end with a run folder's model.

The run records the backbone, weights, preprocessing, tap node and pooling that
made its training features; the same chain is rebuilt here, so a prediction
sees exactly what the classifier was trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.backbones import Backbone, Tap
from features.blocks import BlockSource, prepare_forward
from features.datasets import FileImageSet
from features.errors import TapsError, UsageError
from features.files import file_sha256
from features.options import TORCH, RunConfig, resolve_device, resolve_precision
from features.pooling import DEFAULT_POOLING, UNPOOLED
from features.store import FeatureFile

from .results import FeaturesUsed, RunResult, TapUsed
from .runs import load_model, load_results


@dataclass
class Prediction:
    image: str
    label: str | None
    confidence: float | None  # a probability (logreg, linear) or a decision score (svm)
    kind: str                 # "probability" or "score"
    error: str = ""


def weights_for(features: FeaturesUsed, weights: str | None) -> str:
    """The ``--weights`` value that rebuilds a run's backbone.

    A run on a local weights file needs that file again: ``weights`` must name it, and its
    SHA-256 must be the one recorded at extraction. A run on torchvision weights takes them
    from the record; a ``weights`` that names other weights is refused.
    """
    spec = features.weights
    if spec.startswith("file:"):
        _, name, digest = spec.split(":", 2)
        want = features.weights_sha256 or digest  # runs before the full digest was kept: 16 hex digits
        if not weights:
            raise UsageError(f"this run's features came from the local weights file {name} (SHA-256 {want[:16]}...); "
                             f"pass --weights PATH to that file")
        path = Path(weights)
        if not path.is_file():
            raise UsageError(f"weights file {path} does not exist; pass --weights PATH to {name}, the file this "
                             f"run's features came from")
        have = file_sha256(path)
        if not have.startswith(want):
            raise TapsError(f"weights file {path} (SHA-256 {have[:16]}...) is not the file this run's features came "
                            f"from ({name}, SHA-256 {want[:16]}...); pass that file")
        return str(path)
    recorded = spec if spec == "none" else spec.split(".")[-1]
    if weights and Backbone(features.backbone, weights=weights).weights.spec != spec:
        raise UsageError(f"this run's features came from weights {spec}, not {weights}; drop --weights")
    return recorded


def _check_record(f: FeaturesUsed) -> None:
    """Refuse a run record whose backbone, weights or preprocessing are not those of the feature file it
    names (when that file is still there): results.json was edited, and the model would be fed
    features of another network."""
    path = Path(str(f.path or ""))
    if not f.path or not path.is_file():
        return
    try:
        made = FeatureFile(path).attrs
    except TapsError:
        return
    for key in ("backbone", "weights", "transform"):
        if key in made and str(made[key]) != str(getattr(f, key)):
            raise TapsError(f"this run's results.json records {key} {getattr(f, key)}, but its feature file {path} was made "
                            f"with {made[key]}: the record was edited; rerun `taps fit --force` to record it again")


def backbone_for(results: RunResult, weights: str | None = None) -> Backbone:
    """Rebuild the backbone and preprocessing recorded in a run."""
    f = results.features
    _check_record(f)
    spec = weights_for(f, weights)
    bb = Backbone(f.backbone, weights=spec)
    if bb.transform_spec() != f.transform:
        bb = Backbone(f.backbone, weights=spec, image_size=int(f.image_size))
    if bb.transform_spec() != f.transform:
        raise TapsError(f"this run's results.json records weights {f.weights} with the preprocessing "
                        f"{f.transform}, which those weights do not have ({bb.transform_spec()}): the weights or "
                        f"the preprocessing in it were edited; rerun `taps fit --force` to record them again")
    return bb


def _tap(bb: Backbone, record: TapUsed) -> Tap:
    """The tap a run's record names, rebuilt from its backbone (its node's layout included), under
    the record's key so the forward returns it by that name."""
    tap = bb.tap(record.node)
    return Tap(record.tap, tap.node, tap.shape, tap.depth, tap.layout, tap.prefix)


def _forward(bb: Backbone, taps: list[Tap], cfg: RunConfig):
    """The forward the extraction built, by the same function: the runtime's checked export, or torch."""
    if cfg.runtime != TORCH:
        from features.runtimes import prepare_export

        path, why, _ = prepare_export(bb, taps, cfg.pooling, cfg.runtime)
        if path is None:
            raise TapsError(f"this run's features came from {cfg.runtime}, which cannot be rebuilt here: {why}")
        cfg = dataclasses.replace(cfg, onnx_path=str(path))
    return prepare_forward(bb, taps, cfg, 0)


def predict_images(run_dir: Path | str, images: list[str], device: str = "auto", batch_size: int = 32,
                   weights: str | None = None) -> list[Prediction]:
    """Classify image files with a run's model, through the chain that made its training features:
    the same backbone, weights, preprocessing, decoder, tap, pooling and precision, and the
    extraction's own decode-and-embed code (:class:`features.blocks.BlockSource`)."""
    for image in images:  # a device or a folder would be read without end, or not at all
        if Path(image).exists() and not Path(image).is_file():
            raise UsageError(f"{image} is not a regular file; pass image files")
    results = load_results(Path(run_dir))
    model = load_model(Path(run_dir), results)
    bb = backbone_for(results, weights)
    f = results.features
    records = f.taps or [TapUsed(tap=f.tap, node=f.node, dim=f.dim, pooling=f.pooling, precision=f.precision,
                                 decode=f.decode, runtime=f.runtime)]  # runs from before fused taps were listed
    taps = [_tap(bb, r) for r in records]
    spatial = {r.pooling for r in records} - {UNPOOLED}
    pooling = spatial.pop() if spatial else DEFAULT_POOLING
    dev = resolve_device(device)
    runtime = f.runtime or TORCH  # runs from before the runtime was recorded ran torch
    if any("+" in (value or "") for value in (f.decode, f.precision, f.runtime)):
        raise TapsError(f"the fused taps of this run were extracted with different decoders, precisions or "
                        f"runtimes ({f.decode}, {f.precision}, {runtime}), which one pass "
                        f"cannot reproduce; re-extract them together with `taps extract --force` and refit")
    precision = f.precision or resolve_precision("auto", dev)
    decode = f.decode or "pil"  # runs from before the decoder was recorded decoded with PIL
    cfg = RunConfig(pooling=pooling, device=dev, precision=precision, workers=0, channels_last=True,
                    on_error="skip", draft=True, loader="inline", compile="off", decode=decode,
                    runtime=runtime)
    # every tap the model reads, in one forward pass, by the runtime that made the training features
    forward = _forward(bb, taps, cfg)
    files = FileImageSet("predict", Path("/"), [Path(p).absolute() for p in images], ["?"], np.zeros(len(images)))
    source = BlockSource.of(files, bb.pixel_transform(), cfg)
    classes = results.classes
    out: list[Prediction] = []
    has_proba = hasattr(model, "predict_proba")
    for start in range(0, len(images), batch_size):
        block = source.embed(source.load(start, min(start + batch_size, len(images))), forward)
        errors = block.errors
        out += [Prediction(images[i], None, None, "", errors[i]) for i in sorted(errors)]
        if any(t.name not in block.taps for t in taps):
            continue
        X = np.hstack([block.taps[t.name] for t in taps])
        scores = model.predict_proba(X) if has_proba else model.decision_function(X)
        if scores.ndim == 1:  # binary decision function: score of the positive class
            scores = np.stack([-scores, scores], axis=1)
        for i, row in zip([i for i in range(block.start, block.stop) if i not in errors], scores, strict=True):
            best = int(np.argmax(row))
            label = classes[int(model.classes_[best])]
            out.append(Prediction(images[i], label, float(row[best]), "probability" if has_proba else "score"))
    order = {p: i for i, p in enumerate(images)}
    return sorted(out, key=lambda p: order[p.image])
