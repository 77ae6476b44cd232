"""The HDF5 feature file: the only contract between stage one and stage two.

Schema (format_version 1)::

    /                 attrs: format, format_version, backbone, weights, transform, image_size,
                             dataset, dataset_fingerprint, n_samples, batch_size, created,
                             versions (JSON), complete
    /labels           int64 (N,)
    /classes          str   (C,)
    /ids              str   (N,)   stable sample ids (relative paths or split/index)
    /split            str   (N,)   official split per sample, only where the dataset has one
    /valid            bool  (N,)   False for images that could not be decoded
    /errors           str   (N,)   '' or why the image was skipped
    /taps/<key>       float32 (N, D), chunked along N
                      attrs: tap, node, pooling, dim, precision, rows_done, complete

``<key>`` is the tap name, with ``@<pooling>`` appended for a spatial tap pooled
other than by the default average (``layer3@avgmax``). Rows are written in
fixed batches of ``batch_size`` in sample order, and ``rows_done`` advances only
after a batch is on disk, so an interrupted run resumes at a batch boundary and
recomputes exactly the batches it would have computed anyway.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from .errors import TapsError

FORMAT = "taps-features"
FORMAT_VERSION = 1
# Settings that define a feature file: if any differs, the file is a different one.
IDENTITY = ("backbone", "weights", "transform", "dataset", "dataset_fingerprint", "n_samples")
STR = h5py.string_dtype()


def tap_key(tap: str, pooling: str, spatial: bool) -> str:
    return f"{tap}@{pooling}" if spatial and pooling != "avg" else tap


def _chunk_rows(n: int, dim: int) -> int:
    # About 1 MiB per chunk: large enough for fast sequential reads, small enough to append per batch.
    return max(1, min(n, (1 << 20) // (4 * max(dim, 1))))


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``path`` so two writers never touch the same file.

    A POSIX record lock, not flock: DataLoader workers forked while it is held do not
    inherit it, so a killed writer's orphaned workers cannot keep the next run out.
    """
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            raise TapsError(f"another taps process is writing {path}; wait for it to finish, "
                            f"then rerun (finished batches are kept)") from None
        yield
    finally:
        os.close(fd)


def _open_h5(path: Path, mode: str) -> h5py.File:
    # HDF5's own flock is inherited by forked DataLoader workers and outlives a killed writer;
    # exclusive_lock() is the writers' lock, and readers refuse incomplete taps anyway.
    try:
        return h5py.File(path, mode, locking=False)
    except OSError as exc:
        raise TapsError(f"{path} is not a readable HDF5 feature file ({str(exc).splitlines()[0][:100]}); "
                        f"pass --force to rebuild it") from None


class FeatureWriter:
    """Creates, checks and appends to one feature file (use under :func:`exclusive_lock`)."""

    def __init__(self, path: Path, header: dict, labels, classes, ids, splits, force: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if force and self.path.exists():
            self.path.unlink()
        if self.path.exists():
            self.h5 = _open_h5(self.path, "r+")
            self._check(header)
        else:
            self.h5 = self._create(header, labels, classes, ids, splits)

    def _create(self, header, labels, classes, ids, splits) -> h5py.File:
        tmp = self.path.with_suffix(".creating")
        h5 = h5py.File(tmp, "w", locking=False)
        h5.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "complete": False,
                         "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        h5.attrs.update({k: v for k, v in header.items() if v is not None})
        n = len(labels)
        h5["labels"] = np.asarray(labels, dtype=np.int64)
        h5.create_dataset("classes", data=list(classes), dtype=STR)
        h5.create_dataset("ids", data=list(ids), dtype=STR)
        if splits is not None:
            h5.create_dataset("split", data=[s or "" for s in splits], dtype=STR)
        h5.create_dataset("valid", data=np.ones(n, dtype=bool))
        h5.create_dataset("errors", shape=(n,), dtype=STR)
        h5.create_group("taps")
        h5.close()
        os.replace(tmp, self.path)  # the file appears whole or not at all
        return _open_h5(self.path, "r+")

    def _check(self, header: dict) -> None:
        attrs = self.h5.attrs
        if attrs.get("format") != FORMAT:
            raise TapsError(f"{self.path} is not a taps feature file; pass --force to replace it or --out elsewhere")
        for key in IDENTITY:
            old, new = attrs.get(key), header.get(key)
            if new is not None and str(old) != str(new):
                raise TapsError(f"{self.path} was written with {key}={old!s:.60}, not {new!s:.60}; "
                                f"pass --force to rebuild it or --out to write elsewhere")

    @property
    def batch_size(self) -> int:
        return int(self.h5.attrs["batch_size"])

    def ensure_tap(self, key: str, dim: int, attrs: dict) -> None:
        """Create ``/taps/<key>`` if missing; refuse to resume one made with other settings."""
        taps = self.h5["taps"]
        n = int(self.h5.attrs["n_samples"])
        if key in taps:
            ds = taps[key]
            for name, value in attrs.items():
                # Files from before a setting was recorded resume without that check.
                if not ds.attrs["complete"] and name in ds.attrs and str(ds.attrs[name]) != str(value):
                    flag = {"precision": "--precision", "decode": "--decode"}.get(name)
                    rerun = f"rerun with {flag} {ds.attrs[name]} or pass --force" if flag else "pass --force"
                    raise TapsError(f"tap {key} in {self.path} was started with {name}={ds.attrs[name]}, "
                                    f"not {value}; {rerun}")
            return
        ds = taps.create_dataset(key, shape=(n, dim), dtype=np.float32, chunks=(_chunk_rows(n, dim), dim),
                                 fillvalue=0.0)
        ds.attrs.update({**attrs, "dim": dim, "rows_done": 0, "complete": False})
        self.h5.attrs["complete"] = False
        self.h5.flush()

    def tap_done(self, key: str) -> bool:
        return key in self.h5["taps"] and bool(self.h5["taps"][key].attrs["complete"])

    def rows_done(self, key: str) -> int:
        return int(self.h5["taps"][key].attrs["rows_done"])

    def write(self, start: int, stop: int, arrays: dict[str, np.ndarray], errors: dict[int, str]) -> None:
        """Write rows [start, stop) of each tap, mark bad rows, then advance ``rows_done`` and flush."""
        for index, reason in errors.items():
            self.h5["valid"][index] = False
            self.h5["errors"][index] = reason
        for key, rows in arrays.items():
            ds = self.h5["taps"][key]
            ds[start:stop] = rows
            ds.attrs["rows_done"] = stop
        self.h5.flush()

    def finish(self, keys: list[str]) -> None:
        n = int(self.h5.attrs["n_samples"])
        for key in keys:
            ds = self.h5["taps"][key]
            ds.attrs["complete"] = int(ds.attrs["rows_done"]) >= n
        self.h5.attrs["complete"] = all(bool(ds.attrs["complete"]) for ds in self.h5["taps"].values())
        self.h5.flush()

    def close(self) -> None:
        self.h5.close()


class FeatureFile:
    """Read-only view of a feature file for stage two: labels, classes, split and tap matrices."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_file():
            raise TapsError(f"feature file {self.path} does not exist; run `taps extract` first")
        with _open_h5(self.path, "r") as h5:
            if h5.attrs.get("format") != FORMAT:
                raise TapsError(f"{self.path} is not a taps feature file; run `taps extract` to make one")
            self.attrs = _plain(h5.attrs)
            self.labels = h5["labels"][:]
            self.classes = [c.decode() if isinstance(c, bytes) else c for c in h5["classes"][:]]
            self.ids = [i.decode() if isinstance(i, bytes) else i for i in h5["ids"][:]]
            self.split = ([s.decode() if isinstance(s, bytes) else s for s in h5["split"][:]]
                          if "split" in h5 else None)
            self.valid = h5["valid"][:]
            errors = h5["errors"][:]
            self.errors = {self.ids[i]: (e.decode() if isinstance(e, bytes) else e)
                           for i, e in enumerate(errors) if e}
            self.taps = {k: _plain(ds.attrs) for k, ds in h5["taps"].items()}

    def tap_key(self, tap: str, pooling: str = "avg") -> str:
        """The dataset key of a tap; raises naming what exists when it is not in the file."""
        for key in (tap_key(tap, pooling, True), tap):
            if key in self.taps and (key == tap_key(tap, pooling, True) or self.taps[key].get("pooling") in (pooling, "none")):
                return key
        have = ", ".join(sorted(self.taps)) or "none"
        raise TapsError(f"tap {tap!r} (pooling {pooling}) is not in {self.path} (it has: {have}); "
                        f"run `taps extract ... --taps {tap} --pool {pooling}` first")

    def read(self, tap: str, pooling: str = "avg") -> np.ndarray:
        """The (N, D) float32 matrix of one tap; refuses a tap that is not completely written."""
        key = self.tap_key(tap, pooling)
        if not self.taps[key]["complete"]:
            raise TapsError(f"tap {key} in {self.path} is incomplete ({self.taps[key]['rows_done']} of "
                            f"{len(self.labels)} rows); rerun the same `taps extract` command to finish it")
        with _open_h5(self.path, "r") as h5:
            return h5["taps"][key][:]

    def fingerprint(self) -> str:
        """Identifies the file's content: dataset fingerprint, settings and creation time."""
        return f"{self.attrs['dataset_fingerprint']}:{self.attrs['backbone']}:{self.attrs['created']}"

    def settings(self) -> dict:
        keys = ("backbone", "weights", "transform", "image_size", "dataset", "dataset_fingerprint")
        return {k: self.attrs.get(k) for k in keys}


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain(attrs) -> dict:
    """HDF5 attributes as plain Python values (numpy scalars unwrapped)."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}


def versions() -> str:
    import PIL
    import simplejpeg
    import torch
    import torchvision

    return json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__,
                       "h5py": h5py.__version__, "pillow": PIL.__version__, "simplejpeg": simplejpeg.__version__})
