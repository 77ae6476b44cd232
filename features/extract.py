"""Run a frozen backbone over an image set once and write every requested tap to HDF5.

One forward pass serves all taps: ``create_feature_extractor`` returns the
requested nodes and prunes the graph after the deepest one, so early taps
alone cost proportionally less. Batches are fixed blocks of ``batch_size``
samples in order; the store advances per batch, so an interrupted run
resumes at the first unfinished block and computes identical values.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.models.feature_extraction import create_feature_extractor
from tqdm.auto import tqdm

from .backbones import Backbone, Normalize, Tap
from .datasets import BadImage, ImageSet
from .errors import TapsError, UsageError, choose
from .pooling import check_pooling, is_spatial, pool, pooled_dim
from .store import FeatureWriter, exclusive_lock, tap_key, versions

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ON_ERROR = ("skip", "fail")
ENGINES = ("local", "ray")


def resolve_device(device: str) -> torch.device:
    choose("device", device, DEVICES)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA GPU is visible; use --device auto or cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps requested but MPS is not available; use --device auto or cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: fp16 autocast on CUDA, bf16 on CPUs with native bf16 kernels, else fp32."""
    choose("precision", precision, PRECISIONS)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def default_workers() -> int:
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)


class _Preprocessed(Dataset):
    """Sample index -> (tensor or None, index, error reason); bad images never raise."""

    def __init__(self, images: ImageSet, transform, min_side: int | None):
        self.images, self.transform, self.min_side = images, transform, min_side

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            return self.transform(self.images.image(index, self.min_side)), index, ""
        except BadImage as exc:
            return None, index, str(exc) or "undecodable image"


def _collate(items):
    good = [x for x, _, _ in items if x is not None]
    batch = torch.stack(good) if good else None
    return batch, [i for _, i, _ in items], {i: e for _, i, e in items if e}


class _Blocks(torch.utils.data.Sampler):
    """Consecutive fixed blocks [k*B, (k+1)*B) from a block-aligned start."""

    def __init__(self, start: int, n: int, batch_size: int):
        self.start, self.n, self.batch_size = start, n, batch_size

    def __iter__(self):
        for s in range(self.start, self.n, self.batch_size):
            yield list(range(s, min(s + self.batch_size, self.n)))

    def __len__(self) -> int:
        return -(-(self.n - self.start) // self.batch_size)


@dataclass
class ExtractionReport:
    path: Path
    samples: int = 0                                     # samples in the file (a shard's own count)
    computed: list[str] = field(default_factory=list)   # tap keys computed by this call
    reused: list[str] = field(default_factory=list)     # tap keys already complete
    images: int = 0                                      # images pushed through the network
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)  # sample id -> reason (whole file)
    device: str = ""
    precision: str = ""

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def feature_path(out: Path | str, dataset_name: str, backbone: Backbone) -> Path:
    """One file per (dataset, backbone, weights, preprocessing); ``dataset_name`` as from ``dataset_slug``."""
    weights = backbone.weights.spec.split(".")[-1].replace(":", "-")
    return Path(out) / dataset_name / f"{backbone.name}__{weights}__{backbone.input_size}px.h5"


def build_extractor(backbone: Backbone, taps: list[Tap], device: torch.device, channels_last: bool):
    """The pruned feature extractor behind batch normalisation; takes uint8 (or normalised float) batches."""
    model = backbone.build()
    preset = backbone.transform()
    extractor = Normalize(create_feature_extractor(model, {t.node: t.node for t in taps}), preset.mean, preset.std)
    extractor = extractor.eval().to(device)
    if channels_last:
        extractor = extractor.to(memory_format=torch.channels_last)
    return extractor


def forward_taps(extractor, batch: torch.Tensor, taps: list[Tap], pooling: str, device: torch.device,
                 precision: str, channels_last: bool) -> dict[str, np.ndarray]:
    """One forward pass -> pooled float32 arrays keyed by tap name."""
    batch = batch.to(device, non_blocking=True)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device, precision):
        out = extractor(batch)
        return {t.name: pool(out[t.node], pooling).float().cpu().numpy() for t in taps}


@dataclass(frozen=True)
class RunConfig:
    """How one extraction pass runs (none of it changes the stored values beyond float tolerance)."""

    pooling: str
    device: torch.device
    precision: str
    workers: int
    channels_last: bool
    on_error: str
    draft: bool


def extract(images: ImageSet, backbone: Backbone, taps: list[str] | None = None, pooling: str = "avg",
            out: Path | str = "feature_store", path: Path | str | None = None, device: str = "auto",
            precision: str = "auto", batch_size: int = 64, workers: int | None = None,
            channels_last: bool = True, on_error: str = "skip", force: bool = False,
            progress: bool = True, limit_batches: int | None = None, draft: bool = True,
            shard: tuple[int, int] | None = None, engine: str = "local", ray_options: dict | None = None
            ) -> ExtractionReport:
    """Extract ``taps`` (default: the backbone's standard embedding) of every image into one HDF5 file.

    Reuses complete taps, resumes incomplete ones, and adds new ones to an existing
    file made with the same settings. ``limit_batches`` stops after that many
    batches (for tests of interruption). ``draft`` lets JPEGs decode at a reduced
    scale that still covers the resize target (PIL draft mode). ``shard=(i, n)``
    extracts the i-th of n contiguous slices into its own file (see
    :mod:`features.shards`). ``engine="ray"`` runs decoding and the backbone on Ray
    Data (see :mod:`features.ray_engine`); the file is the same.
    """
    check_pooling(pooling)
    choose("--on-error policy", on_error, ON_ERROR)
    choose("engine", engine, ENGINES)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
    resolved = backbone.resolve_taps(taps)
    dev = resolve_device(device)
    cfg = RunConfig(pooling, dev, resolve_precision(precision, dev), default_workers() if workers is None else workers,
                    channels_last, on_error, draft)
    header = {"backbone": backbone.name, "weights": backbone.weights.spec, "transform": backbone.transform_spec(),
              "image_size": backbone.input_size, "dataset": images.name, "dataset_fingerprint": images.fingerprint(),
              "n_samples": len(images), "batch_size": batch_size, "versions": versions()}
    path = Path(path) if path else feature_path(out, images.name, backbone)
    if shard is not None:
        from .shards import shard_images, shard_path

        images, shard_attrs = shard_images(images, *shard)
        header = {**header, **shard_attrs, "dataset_fingerprint": images.fingerprint(), "n_samples": len(images)}
        path = shard_path(path, *shard)
    keys = {t.name: tap_key(t.name, pooling, is_spatial(t.shape)) for t in resolved}
    report = ExtractionReport(path=path, samples=len(images), device=str(dev), precision=cfg.precision)
    backbone.check_weights()  # a missing checkpoint fails before any file is touched
    try:
        with exclusive_lock(path):
            writer = FeatureWriter(path, header, images.labels, images.classes, images.ids, images.splits, force)
            try:
                _run(writer, images, backbone, resolved, keys, cfg, progress, limit_batches, report, engine,
                     ray_options or {})
            finally:
                report.skipped = {images.ids[i]: str(e.decode() if isinstance(e, bytes) else e)
                                  for i, e in enumerate(writer.h5["errors"][:]) if e}
                writer.close()
    except PermissionError as exc:
        raise UsageError(f"cannot write {path} ({exc.strerror}); pass --out to a writable folder") from None
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC: finished batches are on disk, the rest resumes later
            raise TapsError(f"disk full while writing {path}; free space and rerun to resume") from None
        raise
    return report



def local_batches(images: ImageSet, backbone: Backbone, taps: list[Tap], cfg: RunConfig, start: int,
                  batch_size: int):
    """Yield (lo, hi, {tap name: pooled rows of the good images}, {index: error}) in sample order."""
    extractor = build_extractor(backbone, taps, cfg.device, cfg.channels_last)
    transform = backbone.pixel_transform()
    min_side = int(transform.resize_size[0]) if cfg.draft else None
    loader = DataLoader(_Preprocessed(images, transform, min_side),
                        batch_sampler=_Blocks(start, len(images), batch_size), collate_fn=_collate,
                        num_workers=cfg.workers, pin_memory=cfg.device.type == "cuda",
                        prefetch_factor=4 if cfg.workers else None)
    for batch, indices, errors in loader:
        arrays = {} if batch is None else forward_taps(extractor, batch, taps, cfg.pooling, cfg.device,
                                                       cfg.precision, cfg.channels_last)
        yield indices[0], indices[-1] + 1, arrays, errors


def _run(writer: FeatureWriter, images: ImageSet, backbone: Backbone, taps: list[Tap], keys: dict[str, str],
         cfg: RunConfig, progress: bool, limit_batches: int | None, report: ExtractionReport, engine: str,
         ray_options: dict) -> None:
    attrs = {t.name: {"tap": t.name, "node": t.node, "pooling": cfg.pooling if is_spatial(t.shape) else "none",
                      "precision": cfg.precision} for t in taps}
    for t in taps:
        writer.ensure_tap(keys[t.name], pooled_dim(t.shape, cfg.pooling), attrs[t.name])
    todo = [t for t in taps if not writer.tap_done(keys[t.name])]
    report.reused = [keys[t.name] for t in taps if t not in todo]
    if not todo:
        return
    n, bs = len(images), writer.batch_size
    start = min(writer.rows_done(keys[t.name]) for t in todo)
    start -= start % bs
    if engine == "ray":
        from .ray_engine import ray_batches

        batches = ray_batches(images, backbone, todo, cfg, start, bs, **ray_options)
    else:
        batches = local_batches(images, backbone, todo, cfg, start, bs)
    bar = tqdm(total=n, initial=start, unit="img", desc=f"{backbone.name} {','.join(t.name for t in todo)}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    dims = {t.name: pooled_dim(t.shape, cfg.pooling) for t in todo}
    t0 = time.perf_counter()
    try:
        for b, (lo, hi, arrays, errors) in enumerate(batches):
            if limit_batches is not None and b >= limit_batches:
                break
            if errors and cfg.on_error == "fail":
                i, reason = next(iter(errors.items()))
                raise TapsError(f"cannot decode {images.ids[i]} ({reason}); fix or remove it, or use --on-error skip")
            rows = {keys[t.name]: np.zeros((hi - lo, dims[t.name]), np.float32) for t in todo}
            good = np.array([i - lo for i in range(lo, hi) if i not in errors], dtype=int)
            for name, arr in arrays.items():
                rows[keys[name]][good] = arr
            report.images += len(good)
            writer.write(lo, hi, rows, errors)
            bar.update(hi - lo)
    finally:
        report.seconds = time.perf_counter() - t0
        bar.close()
        writer.finish([keys[t.name] for t in todo])
    report.computed = [keys[t.name] for t in todo]
