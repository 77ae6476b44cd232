"""Run a frozen backbone over an image set once and write every requested tap to HDF5.

One forward pass serves all taps: ``create_feature_extractor`` returns the
requested nodes and prunes the graph after the deepest one, so early taps
alone cost proportionally less. An engine (:mod:`features.engines`) yields
fixed blocks of ``batch_size`` samples in order; the write loop below is the
only one, and the store advances per block, so an interrupted run resumes at
the first unfinished block and computes identical values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backbones import Backbone, Tap
from .blocks import Block, prepare_forward
from .catalog import check_dataset_matches, feature_path, unturned_taps
from .datasets import CONTENT_FINGERPRINT, FINGERPRINT_VERSION, ImageSet
from .decoders import SIMPLEJPEG, get_decoder
from .errors import TapsError, UsageError
from .files import check_output_folder, exclusive_lock
from .forward import resolve_compile
from .identity import FileIdentity
from .loaders import LOCAL, get_loader
from .options import CHOICES, EXPORTED_RUNTIME_PRECISIONS, TORCH, ExtractOptions, RunConfig
from .pooling import is_spatial, pooled_dim, recorded_pooling
from .precisions import precisions_on
from .progress import Progress
from .runtime import available_memory_bytes, keep_freed_memory
from .store import FeatureFile, FeatureWriter, tap_key, versions


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
    runtime: str = ""
    runtime_note: str = ""                               # what auto timed, or int8's calibration and agreement
    compile_seconds: float = 0.0                         # torch.compile, before ``seconds`` starts
    startup_seconds: float = 0.0                         # model ready (replica processes, compile) before then

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def feature_header(images: ImageSet, backbone: Backbone, batch_size: int,
                   fingerprint_version: int = FINGERPRINT_VERSION, digests: list[str] | None = None) -> dict:
    """The root attributes that say what a feature file was made from (see :mod:`features.identity`)
    and how (its block size, the library versions)."""
    return {**FileIdentity.of(images, backbone, fingerprint_version, digests).attrs(), "batch_size": batch_size,
            "versions": versions()}


def _existing(path: Path, force: bool) -> FeatureFile | None:
    """The feature file a run would add to or resume (None when it starts afresh)."""
    if force or not path.is_file():
        return None
    try:
        return FeatureFile(path)
    except (TapsError, OSError):
        return None  # the writer names what is wrong with it


def _adopt_recorded(cfg: RunConfig, options: ExtractOptions, existing: FeatureFile | None) -> RunConfig:
    """``auto`` precision and decoder resolve to what the file's taps were made with (when they agree),
    so that taps added to a file, or reused from it, match the ones already there."""
    if existing is None or not existing.taps:
        return cfg
    adopted = {}
    for name, valid in (("precision", precisions_on(cfg.device.type)), ("decode", CHOICES["decode"])):
        recorded = {getattr(t, name) for t in existing.taps.values()}
        if getattr(options, name) == "auto" and len(recorded) == 1 and (value := recorded.pop()) in valid \
                and not (name == "decode" and get_decoder(value).on_device and options.engine != LOCAL):  # CPU tasks
            adopted[name] = value
    if cfg.runtime != TORCH and adopted.get("precision", cfg.precision) not in \
            EXPORTED_RUNTIME_PRECISIONS.get(cfg.runtime, (adopted.get("precision", cfg.precision),)):
        adopted.pop("precision", None)
    return dataclasses.replace(cfg, **adopted)


@dataclass(frozen=True)
class _Job:
    """One extraction, resolved: what to compute, how, and what the user asked for."""

    images: ImageSet
    backbone: Backbone
    taps: list[Tap]
    keys: dict[str, str]  # tap name -> its key in the file
    cfg: RunConfig
    options: ExtractOptions


def extract(images: ImageSet, backbone: Backbone, taps: list[str] | None = None,
            options: ExtractOptions | None = None, **settings) -> ExtractionReport:
    """Extract ``taps`` (default: the backbone's standard embedding) of every image into one HDF5 file.

    ``options`` (or its fields as keyword arguments, which override it) says how: see
    :class:`features.options.ExtractOptions`. Reuses complete taps, resumes incomplete ones,
    and adds new ones to an existing file made with the same settings. ``shard=(i, n)``
    extracts the i-th of n contiguous slices into its own file (see :mod:`features.shards`).
    The loader (a :mod:`features.loaders` record: ``engine``'s when remote) changes where the work runs,
    never the file's layout.
    """
    options = dataclasses.replace(options, **settings) if options else ExtractOptions(**settings)
    resolved = backbone.resolve_taps(taps)
    backbone.check_pooling(resolved, options.pooling)
    path = Path(options.path) if options.path else feature_path(options.out, images.name, backbone)
    shard_attrs = {}
    if options.shard is not None:
        from .shards import shard_images, shard_path

        full, (images, shard_attrs) = images, shard_images(images, *options.shard)
        path = shard_path(path, *options.shard)
    check_output_folder(path.parent, "--features-root")
    existing = _existing(path, options.force)
    version = existing.fingerprint_version if existing else \
        CONTENT_FINGERPRINT if options.verify_content else FINGERPRINT_VERSION
    if shard_attrs:  # every shard fingerprints the whole dataset the way its own file does
        shard_attrs["full_dataset_fingerprint"] = full.fingerprint(version)
    # Each sample's bytes are read once: for a new file's /content, a content fingerprint, a check.
    digests = (images.content_digests() if existing is None or version == CONTENT_FINGERPRINT
               or options.verify_content else None)
    header = {**feature_header(images, backbone, options.batch_size, version, digests), **shard_attrs}
    if existing:  # says what changed; a copy of the same bytes with new file times is the same dataset
        check_dataset_matches(existing, images, "pass --force to rebuild it", verify_content=options.verify_content,
                              digests=digests, fingerprint=header["dataset_fingerprint"])
        header["dataset_fingerprint"] = existing.identity.dataset_fingerprint
    unturned = unturned_taps(existing, images, "pass --force to rebuild the file") if existing else []
    cfg = _adopt_recorded(options.resolve(len(images)), options, existing)
    check_batch_fits(backbone.input_size, cfg.batch_size, cfg.device)
    if cfg.runtime != TORCH:  # exported and checked once (cached); auto also timed against torch
        from .runtimes import resolve_runtime

        cfg = resolve_runtime(backbone, resolved, cfg, _recorded_runtime(existing, resolved, options.pooling),
                              torch_forward=lambda c: prepare_forward(backbone, resolved, c, len(images)),
                              calibration=lambda: dataset_calibration(images, backbone, cfg, header["dataset_fingerprint"]),
                              retime=options.retime)
    keys = {t.name: tap_key(t.name, options.pooling, is_spatial(t.shape)) for t in resolved}
    report = ExtractionReport(path=path, samples=len(images), device=str(cfg.device), precision=cfg.precision,
                              runtime=cfg.runtime, runtime_note=_runtime_note(cfg))
    backbone.check_weights()  # a missing checkpoint fails before any file is touched
    try:
        with exclusive_lock(path), keep_freed_memory():
            writer = FeatureWriter(path, header, images.labels, images.classes, images.ids, images.splits,
                                   force=options.force, content=digests if existing is None else None)
            try:
                # Blocks are the file's: a resumed file keeps the batch size it was made with.
                cfg = dataclasses.replace(cfg, batch_size=writer.batch_size)
                for key in unturned:
                    writer.record_tap(key, orientation=images.orientation)
                _fill(writer, _Job(images, backbone, resolved, keys, cfg, options), report)
            finally:
                report.skipped = {images.ids[i]: reason for i, reason in writer.skipped().items()}
                writer.close()
    except PermissionError as exc:
        raise UsageError(f"cannot write {path} ({exc.strerror}); pass --features-root to a writable folder") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # finished blocks are on disk, the rest resumes later
            raise TapsError(f"disk full while writing {path}; free space and rerun the same command "
                            f"(finished blocks are kept, the rest is recomputed)") from None
        raise
    return report


# Bytes per input pixel of one image in a forward pass, roughly: the decoded uint8 RGB (3), its float
# tensor (12) and the first feature maps (64 channels at stride 2 in float32: 64), which dominate.
BYTES_PER_PIXEL = 80


def check_batch_fits(image_size: int, batch_size: int, device) -> None:
    """Refuse, before anything is allocated, a batch whose images alone cannot fit in this machine's
    free memory (``--image-size 100000`` asks for terabytes), naming sizes that would."""
    if getattr(device, "type", "cpu") != "cpu":
        return  # an accelerator's free memory is not this machine's; its allocator decides
    need, free = BYTES_PER_PIXEL * image_size ** 2 * batch_size, available_memory_bytes()
    if need <= free:
        return
    fits = int((free / (BYTES_PER_PIXEL * batch_size)) ** 0.5)
    raise UsageError(f"{batch_size} images of {image_size}x{image_size} px need about {need / 2 ** 30:.1f} GiB in a "
                     f"forward pass, and {free / 2 ** 30:.1f} GiB are free; use --image-size {fits} or less, or a "
                     f"smaller --batch-size")


def _recorded_runtime(existing: FeatureFile | None, taps: list[Tap], pooling: str) -> str | None:
    """The runtime ``auto`` keeps on a rerun: the one the requested taps already in the file were made
    or started with (a resume finishes them with it, a reuse neither exports nor times anything),
    when they agree; None when none of them is in the file yet."""
    if existing is None:
        return None
    records = existing.taps
    keys = [tap_key(t.name, pooling, is_spatial(t.shape)) for t in taps]
    started = {records[k].runtime for k in keys if k in records}
    return started.pop() if len(started) == 1 else None


def dataset_calibration(images: ImageSet, backbone: Backbone, cfg: RunConfig, fingerprint: str):
    """int8's calibration and held-out samples of ``images``, decoded as the extraction decodes them
    (an on-device decoder's images are decoded on the CPU instead: int8 runs there)."""
    from .blocks import DecodedImages, collate_pixels
    from .quantize import calibration_set

    decode = SIMPLEJPEG if get_decoder(cfg.decode).on_device else cfg.decode
    decoded = DecodedImages(images, backbone.pixel_transform(),
                            int(backbone.pixel_transform().resize_size[0]) if cfg.draft else None, decode)

    def pixels(indices: np.ndarray) -> np.ndarray:
        batch = collate_pixels([decoded[int(i)] for i in indices])[0]
        return np.zeros((0, 3, 1, 1), np.uint8) if batch is None else np.ascontiguousarray(
            batch.permute(0, 3, 1, 2).numpy())
    return calibration_set(len(images), fingerprint, pixels)


def _runtime_note(cfg: RunConfig) -> str:
    """What the CLI says of the runtime: auto's timing, int8's calibration and agreement."""
    from .quantize import describe_int8

    notes = [f"runtime {cfg.runtime} chosen by timing: {cfg.runtime_rates}"] if cfg.runtime_rates else []
    return "; ".join(notes + ([describe_int8(json.loads(cfg.quantization))] if cfg.quantization else []))


def _tap_int8(quantization: str, tap: str) -> str:
    """A tap's int8 attribute: the calibration, the int8 model's SHA-256 and this tap's agreement with
    fp32 (JSON)."""
    record = json.loads(quantization)
    return json.dumps({"calibration": record["calibration"], "sha256": record["sha256"],
                       "agreement": record["agreement"][tap]})


def _fill(writer: FeatureWriter, job: _Job, report: ExtractionReport) -> None:
    """Create or check the job's taps in the file, then write every block they still miss."""
    cfg, keys = job.cfg, job.keys
    dims = {t.name: pooled_dim(t.shape, cfg.pooling) for t in job.taps}
    # Inductor's kernels (for batches padded to this size) round bf16 otherwise than eager ones: predict
    # compiles the same graph where the tap was compiled
    compiles = cfg.runtime == TORCH and resolve_compile(cfg.compile, cfg.device, len(job.images), warn=False)
    compiled = cfg.batch_size if compiles else 0
    attrs = {t.name: {"tap": t.name, "node": t.node, "pooling": recorded_pooling(t.shape, cfg.pooling),
                      "precision": cfg.precision, "decode": cfg.decode, "runtime": cfg.runtime,
                      "orientation": job.images.orientation,
                      **({"runtime_rates": cfg.runtime_rates} if cfg.runtime_rates else {}),
                      **({"int8": _tap_int8(cfg.quantization, t.name)} if cfg.quantization else {}),
                      # the export's outputs (their keys: names and pooling): its graph moves bf16 and int8 values
                      **({"export": ",".join(keys[x.name] for x in job.taps)} if cfg.runtime != TORCH else {}),
                      **({"compiled": compiled} if compiled else {})}
             for t in job.taps}
    writer.ensure_taps({keys[t.name]: (dims[t.name], attrs[t.name]) for t in job.taps})
    for key, rows in writer.recovered.items():
        warnings.warn(f"{rows} rows of tap {key} in {writer.path} were not on disk intact (a full disk or a crash "
                      f"while writing); recomputing them", stacklevel=3)
    todo = [t for t in job.taps if not writer.tap_done(keys[t.name])]
    report.reused = [keys[t.name] for t in job.taps if t not in todo]
    if not todo:
        return
    start = min(writer.rows_done(keys[t.name]) for t in todo)
    start -= start % cfg.batch_size
    bar = Progress(len(job.images), f"{job.backbone.name} {','.join(t.name for t in todo)}", initial=start,
                   enabled=job.options.progress)
    t0 = time.perf_counter()
    try:
        with get_loader(cfg.loader).engine_class()(job.images, job.backbone, todo, cfg) as engine, \
                contextlib.closing(engine.blocks(start)) as blocks:
            report.compile_seconds, report.startup_seconds = engine.compile_seconds, engine.startup_seconds
            t0 = time.perf_counter()
            for b, block in enumerate(blocks):
                if job.options.limit_batches is not None and b >= job.options.limit_batches:
                    break
                report.images += _write_block(writer, block, job, todo, dims)
                bar.update(block.stop - block.start)
    finally:
        report.seconds = time.perf_counter() - t0
        bar.close()
        writer.finish([keys[t.name] for t in todo])
    report.computed = [keys[t.name] for t in todo]


def _write_block(writer: FeatureWriter, block: Block, job: _Job, todo: list[Tap], dims: dict[str, int]) -> int:
    """Write one block (skipped images keep zero rows); returns how many images it embedded."""
    if block.errors and job.cfg.on_error == "fail":
        i, reason = next(iter(block.errors.items()))
        raise TapsError(f"cannot decode {job.images.ids[i]} ({reason}); fix or remove it, or use --on-error skip")
    n = block.stop - block.start
    rows = {job.keys[t.name]: np.zeros((n, dims[t.name]), np.float32) for t in todo}
    good = np.array([i - block.start for i in range(block.start, block.stop) if i not in block.errors], dtype=int)
    for name, arr in block.taps.items():
        rows[job.keys[name]][good] = arr
    writer.write(block.start, block.stop, rows, block.errors)
    return len(good)
