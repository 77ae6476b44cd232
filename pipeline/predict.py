"""Classify new image files end to end with a run folder's model.

The run records the backbone, weights, preprocessing, tap node and pooling that
made its training features; the same chain is rebuilt here, so a prediction
sees exactly what the classifier was trained on.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features.backbones import Backbone, Tap
from features.blocks import BlockSource, prepare_forward
from features.datasets import FileImageSet, split_images
from features.decoders import AS_STORED, EXIF_TURNED, LEGACY_DECODER
from features.errors import TapsError, UsageError, choose
from features.files import file_sha256
from features.joined import BACKBONE_SEPARATOR, owner
from features.loaders import AUTO, INLINE
from features.options import TORCH, RunConfig, resolve_device, resolve_precision
from features.pooling import DEFAULT_POOLING, UNPOOLED
from features.precisions import INT8
from features.store import FeatureFile

from .results import FeaturesUsed, TapUsed
from .runs import load_model, load_results


@dataclass
class Prediction:
    image: str
    label: str | None
    confidence: float | None  # a probability (logreg, linear) or a decision score (svm)
    kind: str                 # "probability" or "score"
    error: str = ""
    top: list[tuple[str, float]] = field(default_factory=list)  # the k best (label, confidence), best first


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


def backbone_for(f: FeaturesUsed, weights: str | None = None) -> Backbone:
    """Rebuild the backbone and preprocessing a run records (one backbone's part of it: :func:`per_backbone`)."""
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


def _forward(bb: Backbone, taps: list[Tap], records: list[TapUsed], cfg: RunConfig, int8: dict | None = None):
    """The forward the extraction built, by the same function: torch's, or the runtime's checked
    export of the very graph the taps came from (the taps extracted with them, as their file
    records: other outputs move bf16 and int8 values), and for int8 the very model ``int8`` records."""
    if cfg.runtime == TORCH:
        return prepare_forward(bb, taps, cfg, 0)
    from features.runtimes import load_exported, prepare_export, recorded_int8

    # what the extraction's graph named each tap: its name in the file, without backbone or pooling
    outputs = [r.tap.rpartition(BACKBONE_SEPARATOR)[2].partition("@")[0] for r in records]
    together = {r.export for r in records}
    if cfg.precision == INT8:
        if int8 is None:
            raise TapsError("this run's int8 features do not record their quantised model (the run and its feature "
                            "file are from an older taps, or the file is gone); rerun `taps extract ... --precision "
                            "int8 --force` and refit on its features")
        path = recorded_int8(cfg.runtime, int8)
    else:  # runs from before the graph was recorded (or of taps from two extractions): an export of these taps
        keys = together.pop().split(",") if len(together) == 1 and None not in together else None
        graph = bb.resolve_taps([k.partition("@")[0] for k in keys]) if keys else taps
        pooling = next((k.partition("@")[2] for k in keys if "@" in k), DEFAULT_POOLING) if keys else cfg.pooling
        path, why, _ = prepare_export(bb, graph, pooling, cfg.runtime)
        if path is None:
            raise TapsError(f"this run's features came from {cfg.runtime}, which cannot be rebuilt here: {why}")
        outputs = outputs if keys else None
    return load_exported(cfg.runtime, path, [t.name for t in taps], cfg.precision, outputs)


def _int8_record(f: FeaturesUsed, records: list[TapUsed]) -> dict | None:
    """What the run (or, for runs made before it recorded it, its feature file) says of the int8
    model its taps came from; one model gives every tap of a pass."""
    recorded = next((r.int8 for r in records if r.int8), None)
    if recorded is None and f.path and Path(f.path).is_file():
        file_taps = FeatureFile(f.path).taps
        recorded = next((file_taps[r.tap].extra.get("int8") for r in records if r.tap in file_taps), None)
    return json.loads(recorded) if recorded else None


def per_backbone(f: FeaturesUsed) -> list[tuple[FeaturesUsed, list[TapUsed]]]:
    """A run's record split by backbone: each backbone's settings and the taps the model reads from it,
    in the model's column order (one part for a run on one feature file)."""
    records = f.taps or (TapUsed(tap=f.tap, node=f.node, dim=f.dim, pooling=f.pooling, precision=f.precision,
                                 decode=f.decode, runtime=f.runtime),)  # runs from before fused taps were listed
    names = f.backbone.split("+")
    if len(names) == 1:
        return [(f, list(records))]
    columns = {key: str(value).split("+") for key, value in
               (("weights", f.weights), ("transform", f.transform), ("image_size", f.image_size))}
    parts = []
    for i, name in enumerate(names):
        mine = [r for r in records if owner(r.tap) == name]
        one = dataclasses.replace(f, backbone=name, weights=columns["weights"][i], weights_sha256=None, path=None,
                                  transform=columns["transform"][i], taps=tuple(mine),
                                  image_size=None if columns["image_size"][i] == "None" else int(columns["image_size"][i]))
        parts.append((one, mine))
    return parts


@dataclass
class _Pass:
    """One backbone's part of a run, ready to embed images: its taps and the forward that made them."""

    backbone: Backbone
    taps: list[Tap]
    records: list[TapUsed]
    cfg: RunConfig
    forward: object

    @property
    def orientation(self) -> str:
        """How the run's training images were decoded: turned as their EXIF orientation says where every tap
        records so, else as stored (runs from before taps turned them, torchvision's datasets)."""
        return EXIF_TURNED if all(r.orientation == EXIF_TURNED for r in self.records) else AS_STORED

    @classmethod
    def build(cls, f: FeaturesUsed, records: list[TapUsed], device: str, weights: str | None,
              compile: str = AUTO) -> _Pass:
        bb = backbone_for(f, weights)
        taps = [_tap(bb, r) for r in records]
        spatial = {r.pooling for r in records} - {UNPOOLED}
        runtime = f.runtime or TORCH  # runs from before the runtime was recorded ran torch
        if any("+" in (value or "") for value in (f.decode, f.precision, f.runtime)):
            raise TapsError(f"the fused taps of this run were extracted with different decoders, precisions or "
                            f"runtimes ({f.decode}, {f.precision}, {runtime}), which one pass "
                            f"cannot reproduce; re-extract them together with `taps extract --force` and refit")
        dev = resolve_device(device)
        # compiled as the taps were (Inductor rounds bf16 otherwise than eager), unless asked not to
        padded = max((r.compiled for r in records), default=0) if compile == AUTO else 0
        cfg = RunConfig(pooling=spatial.pop() if spatial else DEFAULT_POOLING, device=dev,
                        precision=f.precision or resolve_precision(AUTO, dev), workers=0, channels_last=True,
                        on_error="skip", draft=True, loader=INLINE, compile="on" if padded else "off",
                        batch_size=padded or RunConfig.batch_size,
                        decode=f.decode or LEGACY_DECODER,  # runs from before the decoder was recorded
                        runtime=runtime)
        # every tap of this backbone in one pass, by the runtime that made them
        int8 = _int8_record(f, records) if cfg.precision == INT8 else None
        return cls(bb, taps, records, cfg, _forward(bb, taps, records, cfg, int8))

    def embed(self, files: FileImageSet, batch_size: int) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """Every tap this backbone gives the model (rows of unreadable images are zero), and the errors
        by image index, through the extraction's own decode-and-embed code."""
        source = BlockSource.of(files, self.backbone.pixel_transform(), self.cfg)
        out = {t.name: np.zeros((len(files), r.dim), np.float32) for t, r in zip(self.taps, self.records, strict=True)}
        errors: dict[int, str] = {}
        for start in range(0, len(files), batch_size):
            block = source.embed(source.load(start, min(start + batch_size, len(files))), self.forward)
            errors.update(block.errors)
            rows = [i for i in range(block.start, block.stop) if i not in block.errors]
            for name, values in block.taps.items():
                out[name][rows] = values
        return out, errors


class Predictor:
    """A run's model behind the chain that made its training features: the same backbones, weights,
    preprocessing, decoder, taps, pooling and precision, built once; :meth:`predict` classifies any
    number of batches of image files with it. Each backbone decodes the images itself: a JPEG's draft
    scale follows that backbone's input size, so one shared decode would not give every backbone the
    pixels its training features were made from. ``weights``: one value for every backbone, or one per
    backbone, comma-separated."""

    def __init__(self, run_dir: Path | str, device: str = "auto", batch_size: int = 32, weights: str | None = None,
                 top_k: int = 1, compile: str = AUTO):
        if top_k < 1:
            raise UsageError(f"--top-k must be at least 1, not {top_k}")
        results = load_results(Path(run_dir))
        self.model, self.classes = load_model(Path(run_dir), results), results.classes
        self.batch_size, self.top_k = batch_size, top_k
        parts = per_backbone(results.features)
        given = weights.split(",") if weights and len(parts) > 1 else [weights]
        given = given * len(parts) if len(given) == 1 else given
        if len(given) != len(parts):
            raise UsageError(f"--weights has {len(given)} values for this run's {len(parts)} backbones; pass one per "
                             f"backbone in the run's order ({results.features.backbone.replace('+', ', ')})")
        choose("--compile", compile, (AUTO, "off"))
        self.passes = [_Pass.build(f, records, device, w or None, compile)
                       for (f, records), w in zip(parts, given, strict=True)]
        self.order = [r.tap for r in results.features.taps] or [t.name for p in self.passes for t in p.taps]

    def predict(self, images: list[str]) -> list[Prediction]:
        for image in images:  # a device or a folder would be read without end, or not at all
            if Path(image).exists() and not Path(image).is_file():
                raise UsageError(f"{image} is not a regular file; pass image files")
        files = FileImageSet("predict", Path("/"), [Path(p).absolute() for p in images], ["?"], np.zeros(len(images)))
        columns, errors = {}, {}
        for part in self.passes:
            files.orientation = part.orientation  # decoded as this backbone's training images were
            embedded, failed = part.embed(files, self.batch_size)
            columns.update(embedded)
            errors.update({i: e for i, e in failed.items() if i not in errors})
        X = np.hstack([columns[t] for t in self.order])
        return _classify(self.model, self.classes, images, X, errors, self.top_k)


def predict_images(run_dir: Path | str, images: list[str], device: str = "auto", batch_size: int = 32,
                   weights: str | None = None) -> list[Prediction]:
    """Classify image files with a run's model (:class:`Predictor`, built for this call)."""
    return Predictor(run_dir, device, batch_size, weights).predict(images)


def image_files(inputs: list[str], left_out: list[Path] | None = None) -> Iterator[str]:
    """The image files named by ``inputs``, in order: files as given, folders searched recursively for
    the dataset's image types (hidden files and folders skipped, names sorted), one at a time; the other
    files found in the folders are appended to ``left_out``."""
    for item in inputs:
        path = Path(item)
        if not path.is_dir():
            yield item
            continue
        for folder, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            images, others = split_images(Path(folder), names)
            yield from (str(p) for p in images if not p.name.startswith("."))
            if left_out is not None:
                left_out += others


def _classify(model, classes: list[str], images: list[str], X: np.ndarray, errors: dict[int, str],
              top_k: int = 1) -> list[Prediction]:
    has_proba = hasattr(model, "predict_proba")
    good = [i for i in range(len(images)) if i not in errors]
    out = [Prediction(images[i], None, None, "", errors[i]) for i in sorted(errors)]
    if good:
        scores = model.predict_proba(X[good]) if has_proba else model.decision_function(X[good])
        if scores.ndim == 1:  # binary decision function: score of the positive class
            scores = np.stack([-scores, scores], axis=1)
        for i, row in zip(good, scores, strict=True):
            ranked = np.argsort(-row, kind="stable")[:top_k]
            top = [(classes[int(model.classes_[j])], float(row[j])) for j in ranked]
            out.append(Prediction(images[i], top[0][0], top[0][1], "probability" if has_proba else "score",
                                  top=top))
    order = {p: i for i, p in enumerate(images)}
    return sorted(out, key=lambda p: order[p.image])


def prediction_writer(fmt: str, top_k: int = 1) -> tuple[str | None, Callable[[Prediction], str]]:
    """(a header line or None, ``Prediction -> one line``) in ``fmt``: ``tsv`` (path, label, kind=value,
    then the next labels of the top k; ``ERROR`` and the reason for an unreadable image), ``csv``
    (path, label, confidence, kind, error, then label_2, confidence_2, …) or ``json`` (one object per
    line: path, label, the probability or score, the top k when asked, or the error)."""
    if fmt == "json":
        return None, lambda p: json.dumps({"path": p.image, "error": p.error} if p.error else {
            "path": p.image, "label": p.label, p.kind: round(p.confidence, 6),
            **({"top": [{"label": label, p.kind: round(v, 6)} for label, v in p.top]} if top_k > 1 else {})})
    if fmt == "tsv":
        return None, lambda p: f"{p.image}\tERROR\t{p.error}" if p.error else "\t".join(
            [p.image, p.label, f"{p.kind}={p.confidence:.4f}"] + [f"{label}\t{p.kind}={v:.4f}" for label, v in p.top[1:]])
    extra = [name for k in range(2, top_k + 1) for name in (f"label_{k}", f"confidence_{k}")]

    def csv_line(row: list) -> str:
        text = io.StringIO()
        csv.writer(text, lineterminator="").writerow(row)
        return text.getvalue()
    return csv_line(["path", "label", "confidence", "kind", "error", *extra]), lambda p: csv_line(
        [p.image, "", "", "", p.error] if p.error else
        [p.image, p.label, f"{p.confidence:.6f}", p.kind, "", *(x for label, v in p.top[1:] for x in (label, f"{v:.6f}"))])
