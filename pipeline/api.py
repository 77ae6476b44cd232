"""Cached features for scripts and notebooks: :func:`load_features` (a scikit-learn ``X, y``),
:func:`features_frame` (a pandas DataFrame), :func:`splits` (the train and test rows ``taps fit``
uses), :func:`copies` (the dataset's byte-identical images and near-copies) and
:func:`export_features` (``taps export``: npz, parquet or csv), all through the store, so every
block is checked against its checksum on the way out.

```python
from pipeline.api import load_features, splits
X, y, meta = load_features("feature_store/digits/mobilenet_v2__IMAGENET1K_V1__112px-….h5", "block14+pooled")
train, test = splits("feature_store/digits/….h5", "fraction:0.5")[0]  # the split `taps fit` seed 0 uses
```

A tap spec is one tap, several comma-separated (each its own column block), or a fused set
``a+b`` (its taps side by side); with several feature files of the same samples (one per
backbone) taps are named ``BACKBONE/TAP``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.errors import TapsError, UsageError, choose
from features.files import check_output_folder
from features.joined import JoinedFeatures
from features.pooling import DEFAULT_POOLING
from features.shards import whole_feature_file
from features.store import FeatureFile

from .fusion import tap_set
from .nearcopies import RATIO, near_copy_pairs

FORMATS = ("npz", "parquet", "csv")


@dataclass(frozen=True)
class FeaturesMeta:
    """What the rows and columns of :func:`load_features` are."""

    ids: list[str]
    classes: list[str]
    split: list[str] | None
    valid: np.ndarray            # per row of the file: False for images that could not be decoded
    columns: dict[str, tuple[int, int]]  # each tap key -> its [start, stop) columns in X
    backbone: str
    path: str
    rows: np.ndarray             # the file's row of each row returned
    groups: np.ndarray | None    # per row returned, the file row of its first byte-identical image (None: unchecked)


def open_features(paths: str | Path | Sequence[str | Path]):
    """One feature file, or several of the same samples (one per backbone) read as one (an open one
    is returned as it is)."""
    if isinstance(paths, (FeatureFile, JoinedFeatures)):
        return paths
    if isinstance(paths, (str, Path)):
        paths = [p for p in str(paths).split(",") if p]
    files = [whole_feature_file(p) for p in paths]
    return files[0] if len(files) == 1 else JoinedFeatures(files)


def _keys(features, taps: str | Sequence[str], pooling: str) -> list[str]:
    specs = [t for t in taps.split(",") if t] if isinstance(taps, str) else list(taps)
    if not specs:
        raise UsageError("name at least one tap, e.g. --taps pooled (`taps info FILE` lists them)")
    keys = [features.tap_key(t, pooling) for spec in specs for t in tap_set(spec)]
    if len(set(keys)) < len(keys):
        raise UsageError(f"taps {', '.join(specs)} name a tap twice; name each tap once")
    return keys


def load_features(paths, taps: str | Sequence[str] = "pooled", *, pooling: str = DEFAULT_POOLING,
                  include_invalid: bool = False) -> tuple[np.ndarray, np.ndarray, FeaturesMeta]:
    """``(X, y, meta)``: the taps' columns side by side (float32, one row per image; undecodable
    images left out unless ``include_invalid``), the class index per row, and what the rows and
    columns are (``meta.ids``/``meta.split`` follow the rows returned)."""
    features = open_features(paths)
    keys = _keys(features, taps, pooling)
    rows = np.ones(len(features.labels), bool) if include_invalid else np.asarray(features.valid, bool)
    X = np.hstack([features.matrix(k)[rows] for k in keys]).astype(np.float32, copy=False)
    edges = np.cumsum([0] + [features.taps[k].dim for k in keys])
    columns = {k: (int(a), int(b)) for k, a, b in zip(keys, edges, edges[1:], strict=False)}
    split = None if features.split is None else [s for s, r in zip(features.split, rows, strict=True) if r]
    groups = features.duplicate_groups()
    meta = FeaturesMeta([i for i, r in zip(features.ids, rows, strict=True) if r], list(features.classes), split,
                        np.asarray(features.valid, bool)[rows], columns, str(features.attrs["backbone"]),
                        str(features.path), np.flatnonzero(rows), None if groups is None else groups[rows])
    return X, np.asarray(features.labels)[rows], meta


def splits(paths, protocol: str = "auto", *, seeds: int = 1, test_per_class: int | None = None,
           include_invalid: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each seed's (train, test) rows as ``taps fit --protocol PROTOCOL --seeds SEEDS`` draws them on
    these files (byte-identical images kept on one side), as indices into :func:`load_features`'s
    rows with the same ``include_invalid``, so that ``X[train]`` is what the fit trained on:

    ```python
    X, y, meta = load_features(path, "block14")
    for train, test in splits(path, "per-class:30", seeds=3, test_per_class=50):
        model.fit(X[train], y[train]).score(X[test], y[test])
    ```
    """
    from .protocols import parse_protocol, plan_splits

    features = open_features(paths)
    drawn = plan_splits(parse_protocol(protocol, test_per_class, has_split=features.split or False),
                        np.asarray(features.labels), classes=list(features.classes), split=features.split,
                        usable=np.asarray(features.valid, bool), groups=features.duplicate_groups(), seeds=seeds)
    if include_invalid:
        return drawn
    valid = np.flatnonzero(np.asarray(features.valid, bool))  # undecodable images are in no split
    return [(np.searchsorted(valid, train), np.searchsorted(valid, test)) for train, test in drawn]


def copies(paths, tap: str | None = None, *, pooling: str = DEFAULT_POOLING, ratio: float = RATIO) -> list[dict]:
    """A dataset's copies, to clean it: each group of byte-identical images (``kind`` ``"bytes"``) and,
    with ``tap``, each pair of near-copies by that tap (``"near"``: resized, re-encoded, mirrored;
    ``distance`` in units of the tap's typical nearest-neighbour distance, see
    :mod:`pipeline.nearcopies`). Every entry: ``kind``, ``ids``, ``classes``, ``distance``; copies
    under two classes mean a wrong label or overlapping classes."""
    features = open_features(paths)
    groups, ids, labels = features.duplicate_groups(), features.ids, np.asarray(features.labels)
    if groups is None:
        raise UsageError(f"{features.path} records no image digests (an older file); extract it again to list copies")
    found = []
    order = np.argsort(groups, kind="stable")  # each group's rows together, in file order
    for rows in np.split(order, np.flatnonzero(np.diff(groups[order])) + 1):
        if len(rows) < 2:
            continue
        found.append({"kind": "bytes", "ids": [ids[r] for r in rows], "distance": 0.0,
                      "classes": sorted({features.classes[labels[r]] for r in rows})})
    if tap is not None:
        X, _, meta = load_features(features, tap, pooling=pooling)
        for a, b, distance in near_copy_pairs(X, np.arange(len(X)), ratio=ratio,
                                              groups=meta.columns if len(meta.columns) > 1 else None):
            a, b = meta.rows[a], meta.rows[b]
            if groups[a] != groups[b]:  # byte-identical pairs are listed above
                found.append({"kind": "near", "ids": [ids[a], ids[b]], "distance": round(distance, 4),
                              "classes": sorted({features.classes[labels[a]], features.classes[labels[b]]})})
    return found


def features_frame(paths, taps: str | Sequence[str] = "pooled", *, pooling: str = DEFAULT_POOLING,
                   include_invalid: bool = True):
    """A pandas DataFrame: ``id, label, class, split, valid``, then ``<tap>_<j>`` per column."""
    try:
        import pandas as pd
    except ImportError:
        raise UsageError("a DataFrame needs pandas: pip install -e '.[export]'") from None
    X, y, meta = load_features(paths, taps, pooling=pooling, include_invalid=include_invalid)
    info = pd.DataFrame({"id": meta.ids, "label": y, "class": [meta.classes[i] for i in y],
                         "split": meta.split if meta.split is not None else [""] * len(y), "valid": meta.valid})
    names = [f"{key}_{j}" for key, (a, b) in meta.columns.items() for j in range(b - a)]
    return pd.concat([info, pd.DataFrame(X, columns=names)], axis=1)


def export_features(paths, taps: str | Sequence[str], out: str | Path | None = None, *, fmt: str = "npz",
                    pooling: str = DEFAULT_POOLING) -> Path:
    """Write the taps of ``paths`` with ids, labels, class names, split and valid flags (every image,
    undecodable ones flagged) to ``out`` (default: beside the first file, named by the taps) as npz,
    parquet or csv; -> the path written."""
    choose("--format", fmt, FORMATS)
    features = open_features(paths)
    keys = _keys(features, taps, pooling)
    name = "+".join(keys).replace("/", "-")
    out = Path(out) if out else Path(str(features.path)).with_name(f"{Path(str(features.path)).stem}__{name}.{fmt}")
    check_output_folder(out.parent, "--out")
    partial = out.with_name(f".{out.name}.partial")  # a failed export leaves no half-written file
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_export(features, taps, pooling, fmt, partial)
        partial.replace(out)
    except OSError as exc:  # a full disk, or a folder that refuses files although its permissions allow them
        partial.unlink(missing_ok=True)
        raise TapsError(f"cannot write {out} ({exc.strerror or exc}); pass --out in a writable folder with free "
                        f"space") from None
    return out


def _write_export(features, taps, pooling: str, fmt: str, partial: Path) -> None:
    if fmt == "npz":
        X, y, meta = load_features(features, taps, pooling=pooling, include_invalid=True)
        with open(partial, "wb") as fh:
            np.savez(fh, **{f"X_{k}": X[:, a:b] for k, (a, b) in meta.columns.items()}, ids=np.array(meta.ids),
                     labels=y, classes=np.array(meta.classes), valid=meta.valid,
                     split=np.array(meta.split if meta.split is not None else [""] * len(y)))
        return
    frame = features_frame(features, taps, pooling=pooling)
    if fmt == "csv":
        frame.to_csv(partial, index=False)
        return
    try:
        frame.to_parquet(partial, index=False)
    except ImportError:
        raise UsageError("parquet needs pyarrow: pip install -e '.[export]', or use --format npz|csv") from None
