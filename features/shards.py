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
from .store import IDENTITY, FeatureWriter, _open_h5, exclusive_lock

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
    attrs = {"shard": f"{index}/{shards}", "shard_start": lo, "full_n_samples": len(images),
             "full_dataset_fingerprint": images.fingerprint()}
    return SubsetImageSet(images, np.arange(lo, hi), images.name), attrs


def shard_path(path: Path, index: int, shards: int) -> Path:
    return path.with_name(f"{path.stem}.shard{index}of{shards}{path.suffix}")


def merge_shards(paths: list[Path], out: Path | None = None, force: bool = False) -> Path:
    """Combine complete shard files into one feature file; refuses gaps, overlaps and mixed settings."""
    if not paths:
        raise UsageError("taps merge needs shard files")
    files = [_open_h5(Path(p), "r") for p in paths]
    try:
        first = files[0].attrs
        for p, f in zip(paths, files):
            if "shard" not in f.attrs:
                raise UsageError(f"{p} is not a shard file (made without --shard)")
            for key in [k for k in IDENTITY if k not in ("dataset_fingerprint", "n_samples")] + [
                    "full_dataset_fingerprint", "full_n_samples", "batch_size"]:
                if str(f.attrs[key]) != str(first[key]):
                    raise TapsError(f"{p} has {key}={f.attrs[key]}, but {paths[0]} has {first[key]}; "
                                    f"merge shards of one extraction only")
            if sorted(f["taps"]) != sorted(files[0]["taps"]):
                raise TapsError(f"{p} has taps {sorted(f['taps'])}, but {paths[0]} has {sorted(files[0]['taps'])}")
            incomplete = [k for k, ds in f["taps"].items() if not ds.attrs["complete"]]
            if incomplete:
                raise TapsError(f"{p} is incomplete (taps {', '.join(incomplete)}); rerun its extract to finish it")
        order = sorted(range(len(files)), key=lambda i: int(files[i].attrs["shard_start"]))
        n_total = int(first["full_n_samples"])
        expected = 0
        for i in order:
            start, size = int(files[i].attrs["shard_start"]), int(files[i].attrs["n_samples"])
            if start != expected:
                what = "missing" if start > expected else "duplicated"
                raise TapsError(f"samples {min(start, expected)}..{max(start, expected) - 1} are {what} "
                                f"(at {paths[i]}); pass every shard exactly once")
            expected = start + size
        if expected != n_total:
            raise TapsError(f"samples {expected}..{n_total - 1} are missing; pass every shard exactly once")
        out = Path(out) if out else paths[0].with_name(SHARD_SUFFIX.sub("", paths[0].stem) + paths[0].suffix)
        header = {k: first[k] for k in first if k not in ("shard", "shard_start", "full_n_samples",
                                                            "full_dataset_fingerprint", "complete", "created",
                                                            "format", "format_version")}
        header.update(dataset_fingerprint=first["full_dataset_fingerprint"], n_samples=n_total)

        def concat(name):
            parts = [files[i][name][:] for i in order]
            return np.concatenate(parts) if parts else None

        decode = lambda a: [v.decode() if isinstance(v, bytes) else v for v in a]  # noqa: E731
        splits = decode(concat("split")) if "split" in files[0] else None
        with exclusive_lock(out):
            writer = FeatureWriter(out, header, concat("labels"), decode(files[0]["classes"][:]),
                                   decode(concat("ids")), splits, force)
            try:
                if writer.h5.attrs.get("complete"):
                    return out
                valid, errors = concat("valid"), decode(concat("errors"))
                bad = {i: e for i, e in enumerate(errors) if not valid[i]}
                keys = list(files[0]["taps"])
                for key in keys:
                    ds = files[0]["taps"][key]
                    writer.ensure_tap(key, int(ds.attrs["dim"]),
                                      {k: ds.attrs[k] for k in ("tap", "node", "pooling", "precision")})
                for i in order:  # one shard at a time: memory stays at one slice
                    start = int(files[i].attrs["shard_start"])
                    stop = start + int(files[i].attrs["n_samples"])
                    writer.write(start, stop, {k: files[i]["taps"][k][:] for k in keys},
                                 {j: e for j, e in bad.items() if start <= j < stop})
                writer.finish(keys)
            finally:
                writer.close()
        return out
    finally:
        for f in files:
            f.close()
