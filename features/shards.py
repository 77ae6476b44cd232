"""Sharded extraction for batch schedulers (SLURM array jobs, one process per GPU) and the merge.

``--shard I/N`` (0 <= I < N) extracts the I-th of N contiguous, deterministic
slices of the dataset into ``<file>.shardIofN.h5``; the shard records where its
slice starts and the fingerprint of the whole dataset. :func:`merge_shards`
checks that the shards share settings and taps and cover every sample exactly
once, then copies them into the file a single run would have written.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .datasets import ImageSet, SubsetImageSet
from .errors import TapsError, UsageError
from .files import exclusive_lock
from .identity import COMPARED
from .store import CHECKED_SETTINGS, FeatureFile, FeatureWriter

MADE_WITH = ("node", *CHECKED_SETTINGS, "orientation")  # a tap's settings that shape its values

SHARD_SUFFIX = re.compile(r"\.shard(\d+)of(\d+)$")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise UsageError(f"bad --shard {text!r}: use I/N with 0 <= I < N (e.g. 0/4 ... 3/4)")
    return i, n


def shard_bounds(n_samples: int, shards: int) -> np.ndarray:
    return np.linspace(0, n_samples, shards + 1).astype(int)


def shard_images(images: ImageSet, index: int, shards: int) -> tuple[ImageSet, dict]:
    """The shard's slice of ``images`` and the attributes that tie it to the whole dataset."""
    bounds = shard_bounds(len(images), shards)
    lo, hi = int(bounds[index]), int(bounds[index + 1])
    if hi <= lo:
        raise UsageError(f"shard {index}/{shards} of {len(images)} samples is empty; use fewer shards")
    attrs = {"shard": f"{index}/{shards}", "shard_start": lo, "full_n_samples": len(images)}
    return SubsetImageSet(images, np.arange(lo, hi), images.name), attrs


def shard_path(path: Path, index: int, shards: int) -> Path:
    return path.with_name(f"{path.stem}.shard{index}of{shards}{path.suffix}")


def merge_shards(paths: list[Path], out: Path | None = None, force: bool = False) -> Path:
    """Combine complete shard files into one feature file; refuses gaps, overlaps and mixed settings.

    Every root and tap attribute of the shards is kept (the decoder and precision a tap was
    computed with included), and the rows are rewritten in whole blocks of the merged file,
    so its block checksums are those a single run would have written.
    """
    if not paths:
        raise UsageError("taps merge needs shard files")
    for p in paths:
        if not Path(p).is_file():
            raise UsageError(f"shard file {p} does not exist; pass the .shardIofN.h5 files `taps extract --shard` wrote")
    files = [FeatureFile(p) for p in paths]
    _check_same_extraction(paths, files)
    order = _check_coverage(paths, files)
    out = Path(out) if out else paths[0].with_name(SHARD_SUFFIX.sub("", paths[0].stem) + paths[0].suffix)
    first = files[0].attrs
    header = {k: v for k, v in first.items() if k not in SHARD_ONLY}
    header.update(dataset_fingerprint=first["full_dataset_fingerprint"], n_samples=int(first["full_n_samples"]))
    shards = [files[i] for i in order]
    splits = [s for f in shards for s in f.split] if shards[0].split is not None else None
    errors = {}
    for f in shards:
        errors.update({int(f.attrs["shard_start"]) + j: f.errors[f.ids[j]] for j in np.flatnonzero(~f.valid)})
    with exclusive_lock(out):
        writer = FeatureWriter(out, header, np.concatenate([f.labels for f in shards]), shards[0].classes,
                               [i for f in shards for i in f.ids], splits, force=force,
                               content=None if any(f.content is None for f in shards) else
                               [c for f in shards for c in f.content])
        try:
            if writer.complete:
                return out
            taps = shards[0].taps
            writer.ensure_taps({key: (t.dim, t.settings()) for key, t in taps.items()})
            for key in taps:
                _write_blocks(writer, key, shards, errors)
            writer.finish(list(taps))
        finally:
            writer.close()
    return out


def whole_feature_file(path: Path | str) -> FeatureFile:
    """A feature file to read as a dataset; a shard file (one slice of the samples) is refused, naming the
    merge that makes the whole file."""
    features = FeatureFile(path)
    shard = features.attrs.get("shard")
    if shard is not None:
        raise UsageError(f"{path} is shard {shard} of an extraction ({features.attrs.get('n_samples')} of its "
                         f"{features.attrs.get('full_n_samples')} samples); merge the shards first: "
                         f"`taps merge SHARD_FILES --out FILE`")
    return features


def _check_same_extraction(paths: list[Path], files: list[FeatureFile]) -> None:
    """Every file is a complete shard of one extraction: same settings, same taps."""
    first = files[0].attrs
    for p, f in zip(paths, files, strict=True):
        if "shard" not in f.attrs:
            raise UsageError(f"{p} is not a shard file (made without --shard)")
        for key in [k for k in COMPARED if k not in ("dataset_fingerprint", "n_samples")] + [
                "full_dataset_fingerprint", "full_n_samples", "batch_size"]:
            if str(f.attrs.get(key)) != str(first.get(key)):
                raise TapsError(f"{p} has {key}={f.attrs.get(key)}, but {paths[0]} has {first.get(key)}; "
                                f"merge shards of one extraction only")
        if sorted(f.taps) != sorted(files[0].taps):
            raise TapsError(f"{p} has taps {sorted(f.taps)}, but {paths[0]} has {sorted(files[0].taps)}")
        for key, tap in f.taps.items():  # a merged tap records one way of making it: every row must be made so
            made, first_made = tap.settings(), files[0].taps[key].settings()
            differ = [name for name in MADE_WITH if str(made[name]) != str(first_made[name])]
            if differ:
                raise TapsError(f"{p} made tap {key} with {', '.join(f'{n} {made[n]}' for n in differ)}, but "
                                f"{paths[0]} with {', '.join(f'{n} {first_made[n]}' for n in differ)}; rerun the odd "
                                f"shard's extract with the others' settings (or every shard with --force), then merge")
        incomplete = [k for k, t in f.taps.items() if not t.complete]
        if incomplete:
            raise TapsError(f"{p} is incomplete (taps {', '.join(incomplete)}); rerun its extract to finish it")


def _check_coverage(paths: list[Path], files: list[FeatureFile]) -> list[int]:
    """The files' order by their first sample; refuses gaps and overlaps, naming the samples."""
    order = sorted(range(len(files)), key=lambda i: int(files[i].attrs["shard_start"]))
    expected = 0
    for i in order:
        start, size = int(files[i].attrs["shard_start"]), int(files[i].attrs["n_samples"])
        if start != expected:
            what = "missing" if start > expected else "duplicated"
            raise TapsError(f"samples {min(start, expected)}..{max(start, expected) - 1} are {what} "
                            f"(at {paths[i]}); pass every shard exactly once")
        expected = start + size
    n_total = int(files[0].attrs["full_n_samples"])
    if expected != n_total:
        raise TapsError(f"samples {expected}..{n_total - 1} are missing; pass every shard exactly once")
    return order


# Attributes of a shard (or of a tap's progress) that the merged file sets for itself.
SHARD_ONLY = ("shard", "shard_start", "full_n_samples", "full_dataset_fingerprint", "complete", "created",
              "format", "format_version")


def _write_blocks(writer: FeatureWriter, key: str, shards: list[FeatureFile], errors: dict[int, str]) -> None:
    """Copy one tap of the ordered shards into ``writer`` in whole blocks; memory holds one shard's rows."""
    bs, n = writer.batch_size, writer.n_samples
    carry, lo = None, 0  # rows not yet written, starting at sample ``lo`` (a block boundary)
    for f in shards:
        rows = f.matrix(key)
        carry = rows if carry is None else np.concatenate([carry, rows])
        end = lo + len(carry)
        whole = end if end == n else lo + (len(carry) // bs) * bs
        for start in range(lo, whole, bs):
            stop = min(start + bs, whole)
            writer.write(start, stop, {key: carry[start - lo:stop - lo]},
                         {j: e for j, e in errors.items() if start <= j < stop})
        carry, lo = carry[whole - lo:], whole
