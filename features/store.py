"""The HDF5 feature file: the only contract between stage one and stage two.

Schema (format_version 2)::

    /                 attrs: format, format_version, backbone, weights, weights_sha256 (local files),
                             transform, image_size, dataset, dataset_fingerprint, n_samples,
                             batch_size, created, versions (JSON), complete, fingerprint_version
                             (what the dataset fingerprint hashes: 1 file sizes, 2 sizes and
                             modification times, 3 bytes; absent in older files: 1)
    /labels           int64 (N,)
    /classes          str   (C,)
    /ids              str   (N,)   stable sample ids (relative paths or split/index)
    /split            str   (N,)   official split per sample, only where the dataset has one
    /content          str   (N,)   a digest of each sample's bytes (BLAKE2b-128, hex): equal digests are
                                   byte-identical images, kept on one side of every split; absent where
                                   the dataset's bytes cannot be read cheaply, and in older files
    /valid            bool  (N,)   False for images that could not be decoded
    /errors           str   (N,)   '' or why the image was skipped
    /taps/<key>       float32 (N, D), chunked along N
                      attrs: tap, node, pooling, dim, precision, decode, runtime, rows_done, complete
    /blocks/<key>     uint32 (ceil(N / batch_size),)  CRC-32 of each written block of the tap
                      (its rows, then the block's /valid and /errors entries)

``<key>`` is the tap name, with ``@<pooling>`` appended for a spatial tap pooled
other than by the default average (``layer3@avgmax``). Rows are written in
fixed blocks of ``batch_size`` in sample order. A block counts as done only
once its data is flushed to the file *and then* ``rows_done`` has advanced and
been flushed again, so an interrupted run resumes at a block boundary and
recomputes exactly the blocks it would have computed anyway.

Each block's checksum is checked whenever a tap is read and whenever an
extraction opens the file again: a block whose data never reached the disk
(a failed flush on a full disk, a crash inside the file system, a copy cut
short) is refused by readers and recomputed by the next ``taps extract``.
Version-1 files (no ``/blocks``) are read and resumed without that check.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from .decoders import AS_STORED, LEGACY_DECODER
from .errors import TapsError, UsageError
from .files import check_free_space
from .identity import FileIdentity
from .pooling import DEFAULT_POOLING, matches_pooling
from .runtime_records import TORCH

FORMAT = "taps-features"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
STR = h5py.string_dtype()
MEASURED = ("runtime_rates", "int8")  # tap attributes that record a measurement, not a setting
# The tap settings a rerun must match to reuse or resume a tap, and the flag that sets each.
CHECKED_SETTINGS = {"precision": "--precision", "decode": "--decode", "runtime": "--runtime", "pooling": "--pool"}


def _settings_text(settings: dict, names: list[str]) -> str:
    return ", ".join(f"{name} {settings[name]}" for name in names)


def _flags_text(settings: dict, names: list[str]) -> str:
    return " ".join(f"{CHECKED_SETTINGS[name]} {settings[name]}" for name in names if settings[name] != "none")


def tap_key(tap: str, pooling: str, spatial: bool) -> str:
    return f"{tap}@{pooling}" if spatial and pooling != DEFAULT_POOLING else tap


def natural_key(name: str) -> tuple:
    """Sort key that puts block2 before block10 (numbers compared as numbers, not text)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


def _chunk_rows(n: int, dim: int) -> int:
    # About 1 MiB per chunk: large enough for fast sequential reads, small enough to append per batch.
    return max(1, min(n, (1 << 20) // (4 * max(dim, 1))))


def block_checksum(rows: np.ndarray, valid: np.ndarray, errors) -> int:
    """CRC-32 of one block: its float32 rows, then its /valid flags and its /errors texts (bytes)."""
    crc = zlib.crc32(np.ascontiguousarray(rows, dtype=np.float32))
    crc = zlib.crc32(np.ascontiguousarray(valid, dtype=bool), crc)
    return zlib.crc32(b"\x00".join(e if isinstance(e, bytes) else e.encode() for e in errors), crc)


def first_bad_row(rows: np.ndarray, valid: np.ndarray, errors, sums: np.ndarray, start: int,
                  batch_size: int) -> int | None:
    """The first row of the first block in ``rows`` (sample rows from ``start``, a block boundary)
    whose checksum differs from ``sums`` (indexed by block number), or None when all match."""
    for lo in range(0, len(rows), batch_size):
        hi = min(lo + batch_size, len(rows))
        block = (start + lo) // batch_size
        if block_checksum(rows[lo:hi], valid[lo:hi], errors[lo:hi]) != int(sums[block]):
            return start + lo
    return None


def _verify_tap(h5: h5py.File, key: str) -> int | None:
    """First row of a written block of ``key`` whose data is not what was written, or None.

    Reads the written rows in slabs of about 64 MiB. Version-1 taps have no checksums.
    """
    if "blocks" not in h5 or key not in h5["blocks"]:
        return None
    ds, sums, bs = h5["taps"][key], h5["blocks"][key][:], int(h5.attrs["batch_size"])
    done = int(ds.attrs["rows_done"])
    step = bs * max(1, (64 << 20) // (4 * max(ds.shape[1], 1) * bs))
    for lo in range(0, done, step):
        hi = min(lo + step, done)
        bad = first_bad_row(ds[lo:hi], h5["valid"][lo:hi], h5["errors"][lo:hi], sums, lo, bs)
        if bad is not None:
            return bad
    return None


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)  # HDF5 reports the OS error inside a RuntimeError's text
    return "errno = 28" in text or "No space left" in text or "quota exceeded" in text.lower()


def _reason(exc: BaseException) -> str:
    """The OS's words for a failed write: HDF5 wraps them (over several lines) in its own text."""
    text = str(exc).strip()
    found = re.search(r"error message = '([^']*)'", text)
    if found:
        return found.group(1)
    return text.splitlines()[0] if text else type(exc).__name__


# HDF5 records the file's size in its superblock; a file cut short after that (a full disk while
# the file grew) is refused on open with this message.
_TRUNCATED = re.compile(r"truncated file: eof = (\d+).*stored_eof = (\d+)", re.S)


def open_h5(path: Path, mode: str = "r", not_hdf5: str = "pass a feature file that `taps extract` wrote") -> h5py.File:
    """Open a feature (or shard) file; a damaged or foreign file is one line naming the fix
    (``not_hdf5``: the fix when the file is not HDF5 at all)."""
    # HDF5's own flock is inherited by forked DataLoader workers and outlives a killed writer;
    # exclusive_lock() is the writers' lock, and readers refuse incomplete taps anyway.
    try:
        return h5py.File(path, mode, locking=False)
    except OSError as exc:
        if _TRUNCATED.search(str(exc)):
            raise TapsError(f"{path} was cut short while it was written (a full disk or a crash); rerun the same "
                            f"`taps extract` command to repair it (finished blocks are kept)") from None
        if not _looks_like_hdf5(path):
            raise TapsError(f"{path} is not an HDF5 file; {not_hdf5}") from None
        raise TapsError(f"{path} is not a readable HDF5 feature file ({_reason(exc)}); rebuild it with the "
                        f"same `taps extract` command plus --force") from None


def _looks_like_hdf5(path: Path) -> bool:
    """HDF5's signature at the start (where taps writes it; HDF5 also allows a user block before)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def _pad_truncated(path: Path) -> bool:
    """Make a cut-short file openable again: zeros up to the size its superblock records.

    The OS refused HDF5's last writes, which had already counted the new size; what is missing
    are those writes, and every tap block among them fails its checksum once the file opens, so
    the writer recomputes it. Returns False when the file was not cut short.
    """
    try:
        h5py.File(path, "r", locking=False).close()
        return False
    except OSError as exc:
        found = _TRUNCATED.search(str(exc))
        if not found:
            return False
        os.truncate(path, int(found.group(2)))
        return True


class FeatureWriter:
    """Creates, checks and appends to one feature file (use under :func:`exclusive_lock`).

    After a failed write the writer is spent: it closes the file without letting HDF5
    write anything more to it (see :meth:`_abandon`) and raises one :class:`TapsError`.
    """

    def __init__(self, path: Path, header: dict, labels, classes, ids, splits, *, force: bool = False,
                 content: list[str] | None = None):
        self.path = Path(path)
        self.failed = False
        self.recovered: dict[str, int] = {}  # tap key -> rows found damaged on open, to be recomputed
        # Datasets stay open while the writer lives: HDF5 writes a dataset's cached chunks when its
        # last handle closes, and a write that fails there (a full disk) cannot be caught or undone.
        self._open: dict[str, h5py.Dataset] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if force and self.path.exists():
            self.path.unlink()
        if self.path.exists():
            repaired = _pad_truncated(self.path)
            self.h5 = open_h5(self.path, "r+", "pass --force to replace it, or --features-root to write elsewhere")
            self._check(header)
            if repaired:  # any tap may have lost blocks, not only the ones this run asks for
                for key in list(self.h5["taps"]):
                    self._recover(key)
                self._flush()
        else:
            self.h5 = self._create(header, labels, classes, ids, splits, content)

    def _create(self, header, labels, classes, ids, splits, content) -> h5py.File:
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
        if content is not None:
            h5.create_dataset("content", data=list(content), dtype=STR)
        h5.create_dataset("valid", data=np.ones(n, dtype=bool))
        h5.create_dataset("errors", shape=(n,), dtype=STR)
        h5.create_group("taps")
        h5.create_group("blocks")
        h5.close()
        os.replace(tmp, self.path)  # the file appears whole or not at all
        return open_h5(self.path, "r+")

    def _check(self, header: dict) -> None:
        attrs = self.h5.attrs
        if attrs.get("format") != FORMAT:
            raise TapsError(f"{self.path} is not a taps feature file; pass --force to replace it or --features-root elsewhere")
        if int(attrs.get("format_version", 1)) not in READABLE_VERSIONS:
            raise TapsError(f"{self.path} has format_version {attrs.get('format_version')}, newer than this taps "
                            f"reads; upgrade taps, or pass --force to rebuild it")
        FileIdentity.recorded(_plain(attrs)).refuse_other(header, self.path, "pass --force to rebuild it or --features-root "
                                                                                "to write elsewhere")

    @property
    def batch_size(self) -> int:
        return int(self.h5.attrs["batch_size"])

    @property
    def n_samples(self) -> int:
        return int(self.h5.attrs["n_samples"])

    @property
    def complete(self) -> bool:
        """Every tap of the file has every row."""
        return bool(self.h5.attrs.get("complete"))

    def ensure_taps(self, specs: dict[str, tuple[int, dict]]) -> None:
        """Create each ``/taps/<key>`` (``{key: (dim, attrs)}``) that is missing, after checking that
        the disk has room for them; refuse to resume one made with other settings; check the
        written blocks of the existing ones, so that a block that never reached the disk is
        recomputed (its rows are counted in :attr:`recovered`)."""
        taps, n = self.h5["taps"], self.n_samples
        new = {k: v for k, v in specs.items() if k not in taps}
        check_free_space(self.path.parent, sum(4 * n * dim for dim, _ in new.values()), f"the new taps of {self.path}")
        for key, (dim, attrs) in specs.items():
            if key in taps:
                self._check_tap(key, attrs)
                self._recover(key)
                continue
            ds = taps.create_dataset(key, shape=(n, dim), dtype=np.float32, chunks=(_chunk_rows(n, dim), dim),
                                     fillvalue=0.0)
            ds.attrs.update({**attrs, "dim": dim, "rows_done": 0, "complete": False})
            blocks = self.h5.require_group("blocks")
            blocks.create_dataset(key, shape=(-(-n // self.batch_size),), dtype=np.uint32, fillvalue=0)
            self.h5.attrs["complete"] = False
        self._flush()

    def ensure_tap(self, key: str, dim: int, attrs: dict) -> None:
        self.ensure_taps({key: (dim, attrs)})

    def _dataset(self, name: str) -> h5py.Dataset:
        if name not in self._open:
            self._open[name] = self.h5[name]
        return self._open[name]

    def _check_tap(self, key: str, attrs: dict) -> None:
        """Refuse to resume or reuse a tap made with other settings than this run's: a file whose taps
        were made two ways would be fused, compared and reported as if they were one."""
        ds = self.h5["taps"][key]
        recorded = TapRecord.read(key, _plain(ds.attrs)).settings()
        # Files from before a setting was recorded are checked without it; measurements differ per run.
        differ = [name for name in CHECKED_SETTINGS if name in attrs and name in ds.attrs
                  and str(recorded[name]) != str(attrs[name])]
        if differ:
            state = "made" if ds.attrs["complete"] else "started"
            raise TapsError(f"tap {key} in {self.path} was {state} with {_settings_text(recorded, differ)}, but this "
                            f"run resolves to {_settings_text(attrs, differ)}; rerun with "
                            f"{_flags_text(recorded, differ)} to use it, or pass --force to rebuild the file")

    def _recover(self, key: str) -> None:
        try:
            bad = _verify_tap(self.h5, key)
        except (OSError, KeyError, RuntimeError, ValueError) as exc:  # HDF5's own structures are damaged
            raise TapsError(f"{self.path} is damaged beyond repair ({_reason(exc)}); rebuild it with the same "
                            f"`taps extract` command plus --force") from None
        if bad is None:
            return
        ds = self.h5["taps"][key]
        self.recovered[key] = int(ds.attrs["rows_done"]) - bad
        ds.attrs.update({"rows_done": bad, "complete": False})
        self.h5.attrs["complete"] = False

    def record_tap(self, key: str, **attrs) -> None:
        """Add what a later check established about an existing tap to its attributes."""
        self.h5["taps"][key].attrs.update(attrs)
        self._flush()

    def tap_done(self, key: str) -> bool:
        return key in self.h5["taps"] and bool(self.h5["taps"][key].attrs["complete"])

    def rows_done(self, key: str) -> int:
        return int(self.h5["taps"][key].attrs["rows_done"])

    def write(self, start: int, stop: int, arrays: dict[str, np.ndarray], errors: dict[int, str]) -> None:
        """Write rows [start, stop) of each tap with the block's valid flags, errors and checksums; flush;
        only then advance each tap's ``rows_done`` and flush again. ``start`` is a block boundary and
        ``stop`` one too, or the end of the file; ``errors`` maps sample index -> reason."""
        bs = self.batch_size
        if start % bs or (stop % bs and stop != self.n_samples) or stop <= start:
            raise ValueError(f"rows [{start}, {stop}) are not whole blocks of {bs}")
        if self.failed:
            raise TapsError(f"{self.path} was abandoned after a failed write; rerun the same command")
        valid, reasons = np.ones(stop - start, dtype=bool), [""] * (stop - start)
        for index, reason in errors.items():
            valid[index - start], reasons[index - start] = False, reason
        encoded = [r.encode() for r in reasons]
        try:
            self._dataset("valid")[start:stop] = valid
            self._dataset("errors")[start:stop] = reasons
            for key, rows in arrays.items():
                self._dataset(f"taps/{key}")[start:stop] = rows
                if f"blocks/{key}" in self.h5:
                    sums = [block_checksum(rows[lo:lo + bs], valid[lo:lo + bs], encoded[lo:lo + bs])
                            for lo in range(0, stop - start, bs)]
                    self._dataset(f"blocks/{key}")[start // bs:start // bs + len(sums)] = sums
            self.h5.flush()  # the block's data is in the file ...
            for key in arrays:
                self._dataset(f"taps/{key}").attrs["rows_done"] = stop
            self.h5.flush()  # ... before its progress marker says it is
        except (OSError, RuntimeError) as exc:
            raise self._abandon(exc) from None

    def _flush(self) -> None:
        try:
            self.h5.flush()
        except (OSError, RuntimeError) as exc:
            raise self._abandon(exc) from None

    def _abandon(self, exc: BaseException) -> TapsError:
        """Close the file after a failed write, sending HDF5's last writes nowhere; the error to raise.

        HDF5 retries its dirty cache at close (and again at interpreter exit, where a full disk
        crashed the process). Those late writes could put a progress marker on disk without
        the data it counts, so the file descriptor is pointed at /dev/null first: the file on
        disk keeps what the successful flushes wrote, and any block that a failed flush left
        half-written fails its checksum when the file is opened again.
        """
        self.failed = True
        try:
            fd = self.h5.id.get_vfd_handle()
            sink = os.open(os.devnull, os.O_RDWR)
            os.dup2(sink, fd)
            os.close(sink)
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # another HDF5 driver: closing below may fail too, which is caught
        try:
            self._open.clear()
            self.h5.close()
        except (OSError, RuntimeError):
            pass
        if _is_disk_full(exc):
            return TapsError(f"disk full while writing {self.path}; free space and rerun the same command "
                             f"(finished blocks are kept, the rest is recomputed)")
        return TapsError(f"could not write {self.path} ({_reason(exc)}); rerun the same command "
                         f"(finished blocks are kept, the rest is recomputed)")

    def skipped(self) -> dict[int, str]:
        """Sample index -> why it was skipped, over the whole file (empty once the writer failed)."""
        if self.failed:
            return {}
        errors = self.h5["errors"][:]
        return {i: (e.decode() if isinstance(e, bytes) else str(e)) for i, e in enumerate(errors) if e}

    def finish(self, keys: list[str]) -> None:
        if self.failed:
            return
        n = self.n_samples
        for key in keys:
            ds = self.h5["taps"][key]
            ds.attrs["complete"] = int(ds.attrs["rows_done"]) >= n
        self.h5.attrs["complete"] = all(bool(ds.attrs["complete"]) for ds in self.h5["taps"].values())
        self._flush()

    def close(self) -> None:
        if not self.failed:
            self._open.clear()
            self.h5.close()


class FeatureFile:
    """Read-only view of a feature file for stage two: labels, classes, split and tap matrices."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if self.path.is_dir():
            raise TapsError(f"{self.path} is a folder; pass a feature file (.h5) inside it")
        if not self.path.is_file():
            raise TapsError(f"feature file {self.path} does not exist; run `taps extract` first")
        with open_h5(self.path, "r") as h5:
            if h5.attrs.get("format") != FORMAT:
                raise TapsError(f"{self.path} is not a taps feature file; run `taps extract` to make one")
            if int(h5.attrs.get("format_version", 1)) not in READABLE_VERSIONS:
                raise TapsError(f"{self.path} has format_version {h5.attrs.get('format_version')}, newer than "
                                f"this taps reads; upgrade taps")
            self.attrs = _plain(h5.attrs)
            self.labels = h5["labels"][:]
            self.classes = [c.decode() if isinstance(c, bytes) else c for c in h5["classes"][:]]
            self.ids = [i.decode() if isinstance(i, bytes) else i for i in h5["ids"][:]]
            self.split = ([s.decode() if isinstance(s, bytes) else s for s in h5["split"][:]]
                          if "split" in h5 else None)
            self.content = ([c.decode() if isinstance(c, bytes) else c for c in h5["content"][:]]
                            if "content" in h5 else None)
            self.valid = h5["valid"][:]
            self._raw_errors = h5["errors"][:]
            self.errors = {self.ids[i]: (e.decode() if isinstance(e, bytes) else e)
                           for i, e in enumerate(self._raw_errors) if e}
            self.taps = {k: TapRecord.read(k, _plain(ds.attrs)) for k, ds in h5["taps"].items()}
            self._sums = {k: ds[:] for k, ds in h5["blocks"].items()} if "blocks" in h5 else {}

    @property
    def fingerprint_version(self) -> int:
        """What the file's dataset fingerprint hashes (see :data:`features.datasets.FINGERPRINT_VERSIONS`)."""
        return self.identity.fingerprint_version

    def duplicate_groups(self) -> np.ndarray | None:
        """Per sample, the index of the first sample with byte-identical content (itself when it has
        none), or None for files without content digests. Unreadable samples are their own group."""
        if self.content is None:
            return None
        first: dict[str, int] = {}
        return np.asarray([first.setdefault(c, i) if c else i for i, c in enumerate(self.content)], dtype=np.int64)

    def tap_key(self, tap: str, pooling: str = DEFAULT_POOLING) -> str:
        """The dataset key of a tap; raises naming what exists when it is not in the file."""
        for key in (tap_key(tap, pooling, True), tap):
            if key in self.taps and (key == tap_key(tap, pooling, True) or matches_pooling(self.taps[key].pooling, pooling)):
                return key
        have = ", ".join(sorted(self.taps, key=natural_key)) or "none"
        names = sorted({r.tap for r in self.taps.values()})
        close = difflib.get_close_matches(tap, names, n=2, cutoff=0.75)
        if close and tap not in names:  # a misspelt tap: a usage error, not a missing extraction
            raise UsageError(f"tap {tap!r} is not in {self.path}; did you mean {' or '.join(close)}? (it has: {have}; "
                             f"if {tap} is a tap of its backbone, `taps extract ... --taps {tap}` adds it)")
        pooled_otherwise = sorted({r.pooling for r in self.taps.values() if r.tap == tap})
        other = f", or pass --pool {' or '.join(pooled_otherwise)} to fit the one it has" if pooled_otherwise else ""
        raise TapsError(f"tap {tap!r} (pooling {pooling}) is not in {self.path} (it has: {have}); "
                        f"run `taps extract ... --taps {tap} --pool {pooling}` first{other}")

    def read(self, tap: str, pooling: str = DEFAULT_POOLING) -> np.ndarray:
        """The (N, D) float32 matrix of one tap; refuses a tap that is not completely written."""
        return self.matrix(self.tap_key(tap, pooling))

    def matrix(self, key: str, *, finite: bool = False) -> np.ndarray:
        """The (N, D) float32 matrix stored under ``/taps/<key>``, checked block by block; with
        ``finite``, refused when a valid row holds NaN or inf (an overflow at low precision)."""
        if not self.taps[key].complete:
            raise TapsError(f"tap {key} in {self.path} is incomplete ({self.taps[key].rows_done} of "
                            f"{len(self.labels)} rows); rerun the same `taps extract` command to finish it")
        with open_h5(self.path, "r") as h5:
            X = h5["taps"][key][:]
        if key in self._sums:
            bs = int(self.attrs["batch_size"])
            bad = first_bad_row(X, self.valid, self._raw_errors, self._sums[key], 0, bs)
            if bad is not None:
                raise self._damaged(key, bad)
        if finite and (nonfinite := int((~np.isfinite(X).all(axis=1) & self.valid).sum())):
            raise TapsError(f"tap {key} in {self.path} has {nonfinite} rows with NaN or inf; re-extract with "
                            f"--precision fp32 --force")
        return X

    def iter_rows(self, key: str, indices: np.ndarray, shuffle_seed: int | None = None):
        """Yield (positions into ``indices``, their rows of ``/taps/<key>``) one HDF5 chunk at a time:
        contiguous, chunk-aligned reads, so memory holds one chunk whatever the matrix size. The chunk
        order is shuffled when a seed is given (streaming SGD); rows keep their order within a chunk."""
        indices = np.asarray(indices)
        order = np.argsort(indices)
        sorted_idx = indices[order]
        with open_h5(self.path, "r") as h5:
            ds = h5["taps"][key]
            step = ds.chunks[0] if ds.chunks else _chunk_rows(ds.shape[0], ds.shape[1])
            chunks = [(lo, min(lo + step, ds.shape[0])) for lo in range(0, ds.shape[0], step)]
            if shuffle_seed is not None:
                chunks = [chunks[i] for i in np.random.default_rng(shuffle_seed).permutation(len(chunks))]
            for lo, hi in chunks:
                a, b = np.searchsorted(sorted_idx, [lo, hi])
                if a < b:
                    yield order[a:b], ds[lo:hi][sorted_idx[a:b] - lo]

    def verify(self, key: str) -> None:
        """Check every block of ``/taps/<key>`` against its checksum without holding the matrix
        (for stage two's streaming path); raises naming the rows and the fix."""
        with open_h5(self.path, "r") as h5:
            bad = _verify_tap(h5, key)
        if bad is not None:
            raise self._damaged(key, bad)

    def _damaged(self, key: str, row: int) -> TapsError:
        last = min(row + int(self.attrs["batch_size"]), len(self.labels)) - 1
        return TapsError(f"tap {key} in {self.path}: rows {row}-{last} are not what was written (checksum "
                         f"mismatch: a full disk or a crash while writing); rerun the same `taps extract` "
                         f"command to recompute them")

    def fingerprint(self) -> str:
        """Identifies the file's content: dataset fingerprint, settings and creation time."""
        return f"{self.attrs['dataset_fingerprint']}:{self.attrs['backbone']}:{self.attrs['created']}"

    def settings(self) -> dict:
        keys = ("backbone", "weights", "weights_sha256", "transform", "image_size", "dataset", "dataset_fingerprint")
        return {k: self.attrs.get(k) for k in keys}

    @property
    def identity(self) -> FileIdentity:
        """What the file records it was made from."""
        return FileIdentity.recorded(self.attrs)

    def check_made_from(self, expected: dict, fix: str) -> None:
        """Refuse a file made from other data or settings than ``expected`` (attribute -> value),
        in one line that says what changed and ``fix``."""
        self.identity.refuse_other(expected, self.path, fix, keys=("dataset_fingerprint", "n_samples", "backbone",
                                                                   "weights", "transform"))


@dataclass(frozen=True)
class TapRecord:
    """What the file says of one ``/taps/<key>``: how it was made and how far it got."""

    key: str
    tap: str
    node: str
    pooling: str        # UNPOOLED for vector taps
    dim: int
    precision: str
    decode: str
    rows_done: int
    complete: bool
    runtime: str = TORCH  # files from before runtimes were recorded ran torch
    orientation: str = AS_STORED  # taps from before EXIF orientation was applied hold pixels as stored
    extra: dict = field(default_factory=dict)  # attributes this version does not know, kept by merge

    KNOWN = ("tap", "node", "pooling", "dim", "precision", "decode", "rows_done", "complete", "runtime", "orientation")

    @classmethod
    def read(cls, key: str, attrs: dict) -> TapRecord:
        """From a tap's HDF5 attributes. Version-1 taps made before the decoder was recorded were
        decoded with PIL; they have no checksums (``/blocks``), which readers then skip."""
        attrs = {"decode": LEGACY_DECODER, **attrs}
        return cls(key=key, tap=str(attrs["tap"]), node=str(attrs["node"]), pooling=str(attrs["pooling"]),
                   dim=int(attrs["dim"]), precision=str(attrs["precision"]), decode=str(attrs["decode"]),
                   rows_done=int(attrs["rows_done"]), complete=bool(attrs["complete"]),
                   runtime=str(attrs.get("runtime", TORCH)), orientation=str(attrs.get("orientation", AS_STORED)),
                   extra={k: v for k, v in attrs.items() if k not in cls.KNOWN})

    def made_like(self) -> tuple[str, str, str]:
        """(precision, decode, runtime): taps fused or compared together must agree on these."""
        return self.precision, self.decode, self.runtime

    def settings(self) -> dict:
        """The attributes that make the tap what it is (to create it elsewhere: merge)."""
        return {"tap": self.tap, "node": self.node, "pooling": self.pooling, "precision": self.precision,
                "decode": self.decode, "runtime": self.runtime, "orientation": self.orientation, **self.extra}


def _plain(attrs) -> dict:
    """HDF5 attributes as plain Python values (numpy scalars unwrapped)."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}


def versions() -> str:
    """The libraries a file was made with. torchvision's is its distribution's (no build tag: torch's
    has it), read without importing torchvision, which a run on an exported runtime never needs."""
    from importlib import metadata

    import PIL
    import simplejpeg
    import torch

    return json.dumps({"torch": torch.__version__, "torchvision": metadata.version("torchvision"),
                       "numpy": np.__version__,
                       "h5py": h5py.__version__, "pillow": PIL.__version__, "simplejpeg": simplejpeg.__version__})
