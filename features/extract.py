"""Run a frozen backbone over an image set once and write every requested tap to HDF5.

One forward pass serves all taps: ``create_feature_extractor`` returns the
requested nodes and prunes the graph after the deepest one, so early taps
alone cost proportionally less. Batches are fixed blocks of ``batch_size``
samples in order; the store advances per batch, so an interrupted run
resumes at the first unfinished block and computes identical values.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import jpeg
from .backbones import Backbone, Tap
from .datasets import BadImage, ImageSet
from .errors import TapsError, UsageError, choose
from .forward import Forward, build_extractor, compiled, resolve_compile
from .pooling import check_pooling, is_spatial, pooled_dim
from .runtime import keep_freed_memory
from .store import FeatureWriter, exclusive_lock, feature_file_name, tap_key, versions
from .turbojpeg import sample_pixels

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ON_ERROR = ("skip", "fail")
ENGINES = ("local", "ray")
LOADERS = ("auto", "inline", "workers", "replicas")
DECODERS = ("auto", "simplejpeg", "pil", "torchvision")
# `--loader auto` runs replicas on datasets at least this large. Their start-up (spawn, import
# torch, build and compile one model each) took ~10 s here against ~5 s for the inline loader's
# compile; on all of Caltech-101 (8,677 images, MobileNetV2, 3 taps) they extracted at 516-519
# img/s against 405-468, and the two runs took the same wall time within 1-4 s.
REPLICAS_MIN_IMAGES = 20_000


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


def resolve_loader(loader: str, device: torch.device, n_images: int) -> str:
    """``auto``: on CPUs with 2+ cores, replicas for datasets large enough to repay their start-up
    (see :data:`REPLICAS_MIN_IMAGES`), else inline; worker processes on accelerators."""
    choose("--loader", loader, LOADERS)
    if loader == "replicas" and device.type != "cpu":
        raise UsageError(f"--loader replicas runs one model per CPU core, not on {device.type}; "
                         "use --loader auto or workers there")
    if loader != "auto":
        return loader
    if device.type != "cpu":
        return "workers"
    return "replicas" if n_images >= REPLICAS_MIN_IMAGES and default_workers() >= 2 else "inline"


def resolve_decode(decode: str, device: torch.device, engine: str) -> str:
    """``auto``: torchvision (nvJPEG) on CUDA in the local engine, else simplejpeg (Ray decodes in CPU tasks)."""
    choose("--decode", decode, DECODERS)
    if decode == "torchvision" and engine == "ray":
        raise UsageError("--decode torchvision decodes on the model's device in the local engine; "
                         "with --engine ray use --decode simplejpeg or pil")
    if decode != "auto":
        return decode
    return "torchvision" if device.type == "cuda" and engine == "local" else "simplejpeg"


def default_workers() -> int:
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)


class _Preprocessed(Dataset):
    """Sample index -> (HWC uint8 array or None, index, error reason); bad images never raise."""

    def __init__(self, images: ImageSet, transform, min_side: int | None, decode: str):
        self.images, self.transform, self.min_side, self.decode = images, transform, min_side, decode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            return sample_pixels(self.images, index, self.transform, self.min_side, self.decode), index, ""
        except BadImage as exc:
            return None, index, str(exc) or "undecodable image"


def _collate(items):
    """-> (NHWC uint8 tensor of the good images or None, indices, {index: error})."""
    good = [x for x, _, _ in items if x is not None]
    batch = torch.from_numpy(np.stack(good)) if good else None
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
    compile_seconds: float = 0.0                         # torch.compile, before ``seconds`` starts
    startup_seconds: float = 0.0                         # model ready (replica processes, compile) before then

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def feature_path(out: Path | str, dataset_name: str, backbone: Backbone) -> Path:
    """One file per (dataset, backbone, weights, preprocessing); ``dataset_name`` as from ``dataset_slug``."""
    name = feature_file_name(backbone.name, backbone.weights.spec, backbone.input_size, backbone.transform_spec())
    return Path(out) / dataset_name / name


def feature_header(images: ImageSet, backbone: Backbone, batch_size: int) -> dict:
    """The root attributes that say what a feature file was made from (see :mod:`features.store`)."""
    return {"backbone": backbone.name, "weights": backbone.weights.spec, "weights_sha256": backbone.weights.sha256,
            "transform": backbone.transform_spec(), "image_size": backbone.input_size, "dataset": images.name,
            "dataset_fingerprint": images.fingerprint(), "n_samples": len(images), "batch_size": batch_size,
            "versions": versions()}


@dataclass(frozen=True)
class RunConfig:
    """How one extraction pass runs: none of it changes what is computed, only how fast (values may
    differ at the rounding level: precision, compile, and a grey level or two between decoders)."""

    pooling: str
    device: torch.device
    precision: str
    workers: int
    channels_last: bool
    on_error: str
    draft: bool
    loader: str = "inline"   # inline | workers, resolved from auto
    compile: str = "off"     # auto | on | off
    decode: str = "simplejpeg"  # simplejpeg | pil | torchvision, resolved from auto


def extract(images: ImageSet, backbone: Backbone, taps: list[str] | None = None, pooling: str = "avg",
            out: Path | str = "feature_store", path: Path | str | None = None, device: str = "auto",
            precision: str = "auto", batch_size: int = 64, workers: int | None = None,
            channels_last: bool = True, on_error: str = "skip", force: bool = False,
            progress: bool = True, limit_batches: int | None = None, draft: bool = True,
            shard: tuple[int, int] | None = None, engine: str = "local", ray_options: dict | None = None,
            loader: str = "auto", compile: str = "auto", decode: str = "auto") -> ExtractionReport:
    """Extract ``taps`` (default: the backbone's standard embedding) of every image into one HDF5 file.

    Reuses complete taps, resumes incomplete ones, and adds new ones to an existing
    file made with the same settings. ``limit_batches`` stops after that many
    batches (for tests of interruption). ``draft`` lets JPEGs decode at a reduced
    scale that still covers the resize target (PIL draft mode). ``shard=(i, n)``
    extracts the i-th of n contiguous slices into its own file (see
    :mod:`features.shards`). ``engine="ray"`` runs decoding and the backbone on Ray
    Data (see :mod:`features.ray_engine`); the file is the same.

    ``loader``: ``replicas`` runs ``workers`` processes, each with its own single-threaded
    model, decoding and embedding whole blocks (see :mod:`features.replicas`; the CPU
    default from :data:`REPLICAS_MIN_IMAGES` images); ``inline`` runs one model on all
    cores and decodes each batch on ``workers`` threads between forward passes, so
    decoding never competes with the forward for the cores (the CPU default below that);
    ``workers`` decodes ahead in DataLoader processes while an accelerator computes
    (the default on CUDA/MPS). ``compile``: ``torch.compile`` the extractor
    (``auto``: when the dataset is large enough to repay the compile time, see
    :data:`features.forward.COMPILE_MIN_IMAGES`). ``decode``: ``simplejpeg`` (libjpeg-turbo
    and torch's uint8 resize in the loader; see :mod:`features.turbojpeg`), ``pil`` (draft
    mode, box resize) or ``torchvision`` (``decode_jpeg`` and tensor resizing on the model's
    device, nvJPEG on CUDA; see :mod:`features.jpeg`); ``auto`` picks torchvision on CUDA,
    else simplejpeg.
    """
    check_pooling(pooling)
    choose("--on-error policy", on_error, ON_ERROR)
    choose("engine", engine, ENGINES)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
    resolved = backbone.resolve_taps(taps)
    dev = resolve_device(device)
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be 0 or more, not {workers}")
    cfg = RunConfig(pooling, dev, resolve_precision(precision, dev), default_workers() if workers is None else workers,
                    channels_last, on_error, draft, resolve_loader(loader, dev, len(images)), compile,
                    resolve_decode(decode, dev, engine))
    header = feature_header(images, backbone, batch_size)
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
        with exclusive_lock(path), keep_freed_memory():
            writer = FeatureWriter(path, header, images.labels, images.classes, images.ids, images.splits, force)
            try:
                _run(writer, images, backbone, resolved, keys, cfg, progress, limit_batches, report, engine,
                     ray_options or {})
            finally:
                report.skipped = {images.ids[i]: reason for i, reason in writer.skipped().items()}
                writer.close()
    except PermissionError as exc:
        raise UsageError(f"cannot write {path} ({exc.strerror}); pass --out to a writable folder") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # finished blocks are on disk, the rest resumes later
            raise TapsError(f"disk full while writing {path}; free space and rerun the same command "
                            f"(finished blocks are kept, the rest is recomputed)") from None
        raise
    return report



def prepare_forward(backbone: Backbone, taps: list[Tap], cfg: RunConfig, n_images: int, batch_size: int) -> Forward:
    """The extractor ready to run; compiled (and timed) when ``cfg.compile`` asks for it.

    Compiling runs one blank batch, so the compile time is reported on its own and
    the extraction rate is the steady state. A failing compile falls back to eager.
    Compiled graphs get NCHW input: Inductor picks its own layouts, and the bench
    measured channels_last input slower there, while it is much faster eagerly.
    """
    eager = Forward(build_extractor(backbone, taps, cfg.device, cfg.channels_last, cfg.pooling), cfg.device,
                    cfg.precision, cfg.channels_last)
    if not resolve_compile(cfg.compile, cfg.device, n_images):
        return eager
    t0 = time.perf_counter()
    try:
        fast = Forward(compiled(eager.module.to(memory_format=torch.contiguous_format)), cfg.device, cfg.precision,
                       channels_last=False, pad_to=batch_size)
        size = backbone.input_size
        fast(torch.zeros((batch_size, size, size, 3), dtype=torch.uint8))
    except Exception as exc:  # Inductor fails in many ways (toolchain, headers, unsupported ops)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"torch.compile failed ({reason}); extracting without it", stacklevel=2)
        eager.module.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        return eager
    fast.compile_seconds = time.perf_counter() - t0
    return fast


def _inline_loader(dataset: Dataset, blocks: _Blocks, threads: int, collate=_collate):
    """Decode each block on ``threads`` threads, in the caller's turn (PIL releases the GIL;
    simplejpeg scales across threads the same here).

    On a CPU the forward pass already keeps every core busy; decoding alongside it
    only makes the forward's threads wait for a preempted peer. Decoding between
    forward passes, on all cores, costs exactly its own time divided by the cores.
    """
    pool = ThreadPoolExecutor(threads, thread_name_prefix="taps-decode") if threads > 1 else None
    try:
        for block in blocks:
            yield collate(list(pool.map(dataset.__getitem__, block)) if pool else [dataset[i] for i in block])
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


@dataclass
class BlockSource:
    """Sample indices -> decoded batches, by the run's decoder: the same for every engine on one machine."""

    dataset: Dataset
    collate: object
    encoded: bool  # JPEG bytes, decoded per batch on the model's device (``--decode torchvision``)

    @classmethod
    def of(cls, images: ImageSet, transform, cfg: RunConfig) -> BlockSource:
        min_side = int(transform.resize_size[0]) if cfg.draft else None
        if cfg.decode == "torchvision" and jpeg.supports(images):
            return cls(jpeg.EncodedImages(images, transform, min_side), jpeg.collate_encoded, True)
        return cls(_Preprocessed(images, transform, min_side, cfg.decode), _collate, False)

    def load(self, lo: int, hi: int):
        """Samples [lo, hi) decoded and collated, on the calling thread."""
        return self.collate([self.dataset[i] for i in range(lo, hi)])

    def embed(self, collated, forward: Forward) -> tuple[int, int, dict[str, np.ndarray], dict[int, str]]:
        """A collated block -> (lo, hi, {tap name: pooled rows of the good images}, {index: error})."""
        batch, indices, errors = collated
        if self.encoded:  # loaders read bytes; decoding happens here, on the device, for the whole batch
            batch, more = jpeg.decode_batch(batch, self.dataset, forward.device)
            errors = {**errors, **more}
        arrays = {} if batch is None else forward(batch)
        return indices[0], indices[-1] + 1, arrays, errors


def local_batches(images: ImageSet, forward: Forward, transform, cfg: RunConfig, start: int, batch_size: int):
    """Yield (lo, hi, {tap name: pooled rows of the good images}, {index: error}) in sample order."""
    source, blocks = BlockSource.of(images, transform, cfg), _Blocks(start, len(images), batch_size)
    if cfg.loader == "inline":
        loader = _inline_loader(source.dataset, blocks, cfg.workers, source.collate)
    else:
        loader = DataLoader(source.dataset, batch_sampler=blocks, collate_fn=source.collate,
                            num_workers=cfg.workers, pin_memory=cfg.device.type == "cuda",
                            prefetch_factor=4 if cfg.workers else None)
    for collated in loader:
        yield source.embed(collated, forward)


def _run(writer: FeatureWriter, images: ImageSet, backbone: Backbone, taps: list[Tap], keys: dict[str, str],
         cfg: RunConfig, progress: bool, limit_batches: int | None, report: ExtractionReport, engine: str,
         ray_options: dict) -> None:
    attrs = {t.name: {"tap": t.name, "node": t.node, "pooling": cfg.pooling if is_spatial(t.shape) else "none",
                      "precision": cfg.precision, "decode": cfg.decode} for t in taps}
    writer.ensure_taps({keys[t.name]: (pooled_dim(t.shape, cfg.pooling), attrs[t.name]) for t in taps})
    for key, rows in writer.recovered.items():
        warnings.warn(f"{rows} rows of tap {key} in {writer.path} were not on disk intact (a full disk or a crash "
                      f"while writing); recomputing them", stacklevel=2)
    todo = [t for t in taps if not writer.tap_done(keys[t.name])]
    report.reused = [keys[t.name] for t in taps if t not in todo]
    if not todo:
        return
    n, bs = len(images), writer.batch_size
    start = min(writer.rows_done(keys[t.name]) for t in todo)
    start -= start % bs
    stack = contextlib.ExitStack()
    if engine == "ray":
        from .ray_engine import ray_batches

        batches = ray_batches(images, backbone, todo, cfg, start, bs, **ray_options)
    elif cfg.loader == "replicas":
        from .replicas import ReplicaPool

        pool = stack.enter_context(ReplicaPool(images, backbone, todo, cfg, bs))
        report.compile_seconds, report.startup_seconds = pool.compile_seconds, pool.startup_seconds
        batches = pool.batches(start)
    else:
        # By dataset size, not images left: a resumed run must compute the way it started.
        forward = prepare_forward(backbone, todo, cfg, n, bs)
        report.compile_seconds = report.startup_seconds = forward.compile_seconds
        batches = local_batches(images, forward, backbone.pixel_transform(), cfg, start, bs)
    stack.callback(batches.close)  # stops what feeds the batches (threads, processes) even mid-run
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
        stack.close()
        bar.close()
        writer.finish([keys[t.name] for t in todo])
    report.computed = [keys[t.name] for t in todo]
