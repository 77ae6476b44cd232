"""What a fit reads from a feature file, read once: the taps' keys, their matrix (or the decision
to stream it), the duplicate groups and the file's fingerprint.

Everything is checked here, before a run folder is named or a split drawn: a tap spec naming
taps made differently, NaN rows (refused by the store's read), a matrix over the memory budget
that cannot stream, a file whose images were all skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from features.errors import TapsError, UsageError
from features.joined import BACKBONE_SEPARATOR, Features, owner
from features.pooling import matches_pooling

from .classifiers import DEFAULT_PREPROCESS, get_classifier, streaming_classifiers
from .fusion import AUTO, Groups, column_groups, tap_set
from .options import FitOptions

FIT_COPIES = 3  # an in-memory fit holds the float32 matrix, its standardized copy and the solver's copy


@dataclass
class FitData:
    """A fit's input: ``keys`` (the file keys it reads, side by side), ``X`` (their matrix; None when
    the fit streams from the file), ``groups`` (each key's columns when there are several),
    ``same_bytes`` (per sample, its group of byte-identical images; None when the file has no digests
    or no two samples share their bytes, so splits and CV folds are drawn as without digests) and the
    file's ``fingerprint``."""

    features: Features
    keys: list[str]
    X: np.ndarray | None
    groups: Groups | None
    streaming: bool
    same_bytes: np.ndarray | None
    fingerprint: str


def read_fit_data(features: Features, tap: str, pooling: str, options: FitOptions,
                  candidates: list[str] | None = None) -> FitData:
    """Read and check what a fit of ``tap`` (one tap, a ``+`` set, or ``auto`` among ``candidates``,
    default every complete tap of this pooling) reads. In memory when the matrix fits the budget
    (fused taps side by side, each tap's columns in ``groups``); else a single tap streams from the
    file where the classifier can, and is refused where it cannot."""
    if not features.valid.any():
        raise TapsError(f"every image of {features.path} was skipped as undecodable ({len(features.valid)}); "
                        f"`taps info {features.path}` lists why")
    keys = tap_keys(features, tap, pooling, candidates)
    dims = {k: features.taps[k].dim for k in keys}
    need = FIT_COPIES * np.dtype(np.float32).itemsize * int(features.valid.sum()) * sum(dims.values())
    streaming = need > options.budget
    if streaming:
        _check_streaming(features, keys, options, need)
        features.verify(keys[0])
        X, groups = None, None
    elif len(keys) == 1:
        X, groups = features.matrix(keys[0], finite=True), None
    else:
        X, groups = np.hstack([features.matrix(k, finite=True) for k in keys]), column_groups(dims)
    same_bytes = features.duplicate_groups()  # per sample, the row of its first copy (its own row: none)
    if same_bytes is not None and (same_bytes == np.arange(len(same_bytes))).all():
        same_bytes = None
    return FitData(features, keys, X, groups, streaming, same_bytes, features.fingerprint())


def tap_keys(features: Features, tap: str, pooling: str, candidates: list[str] | None = None) -> list[str]:
    """The file keys a tap spec reads: one tap, a ``+`` set, or for ``auto`` the candidates of the
    selection: ``candidates``, or every complete tap of this pooling in the file (in depth order).
    Taps of one backbone computed with different precisions, decoders or runtimes are refused: their
    columns would not mean what they mean at predict time, which rebuilds each backbone's taps in
    one pass."""
    if tap != AUTO or candidates:
        keys = [features.tap_key(t, pooling) for t in (tap_set(tap) if tap != AUTO else candidates)]
    else:
        keys = sorted((k for k, r in features.taps.items() if r.complete and matches_pooling(r.pooling, pooling)),
                      key=_natural)
        if len(keys) < 2:
            raise UsageError(f"--tap auto chooses among the file's taps, but {features.path.name} has "
                             f"{len(keys)} complete tap(s) with pooling {pooling}; extract more with "
                             f"`taps extract ... --taps all`")
    ways = {k: features.taps[k].made_like() for k in keys} if len(keys) > 1 else {}
    if any(len({w for k, w in ways.items() if owner(k) == o}) > 1 for o in {owner(k) for k in ways}):
        shown = "; ".join(f"{k}: precision {p}, decode {d}, runtime {r}" for k, (p, d, r) in ways.items())
        raise UsageError(f"the taps to fuse in {features.path.name} were made differently ({shown}); re-extract "
                         f"them together with the same `taps extract ... --force` settings")
    return keys


def _natural(key: str) -> tuple:
    """By backbone, then block2 before block10 (block3.1 before block3, the end of its stage), then named taps."""
    backbone, tap = owner(key), key.rpartition(BACKBONE_SEPARATOR)[2]
    match = re.fullmatch(r"(\D*)(\d+)(?:\.(\d+))?", tap.split("@")[0])
    return (backbone, 0, match[1], int(match[2]), int(match[3] or 1e9)) if match else (backbone, 1, tap, 0, 0)


def _check_streaming(features: Features, keys: list[str], options: FitOptions, need: int) -> None:
    """Refuse a fit over the memory budget that cannot stream: fused taps, a classifier that only fits
    in memory, preprocessing other than standardization, calibration."""
    dim = sum(features.taps[k].dim for k in keys)
    shown = f"{need / 2 ** 20:.0f} MiB, over the budget of {options.budget / 2 ** 20:.0f} MiB"
    if len(keys) > 1:
        raise TapsError(f"fused taps are fitted in memory, and {'+'.join(keys)} ({dim}-D) needs about "
                        f"{shown}; fuse fewer taps, pool them smaller, or raise --memory-budget")
    if not get_classifier(options.clf).streams:
        streaming = " or ".join(f"--clf {c}" for c in streaming_classifiers())
        raise TapsError(f"tap {keys[0]}: an in-memory {options.clf} fit of {int(features.valid.sum())} x {dim} needs "
                        f"about {shown}; use {streaming} (streams from the HDF5 file) or raise --memory-budget")
    if options.preprocess != DEFAULT_PREPROCESS:
        raise TapsError(f"streaming fits (tap {keys[0]} is over the memory budget) standardize only; "
                        f"drop --preprocess {options.preprocess}")
    if options.calibrate:
        raise TapsError(f"--calibrate fits in memory, and tap {keys[0]} streams from the file (over the memory "
                        f"budget); pool it smaller, raise --memory-budget or leave out --calibrate")
