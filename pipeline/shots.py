"""How much labelled data does each tap need? Few-shot curves: ``compare --shots 1,2,5,all --tries T``.

The test split is fixed (the protocol's seed-0 split). For each shot count K and each try t,
K training images per class are drawn from that split's training side; every row (a tap, a
fused set, ``auto``, a set across backbones, for each classifier) is fitted on the same draw,
with its regularisation chosen by CV inside the draw, and scored on the same test images.

* Draws are nested and seeded: try t orders each class's training images once (seed t) and
  K takes the first K, so a curve's points differ by the images added, not by a new draw. A
  class with fewer than K training images keeps all it has (the table names it). Byte-identical
  images count once: a draw takes distinct images only, since a copy adds no information.
* Selection inside a draw uses ``min(folds, K)`` stratified folds; at K = 1 no fold can hold a
  class out, so the grid's middle value is used, and the table says so.
* ``all`` is the whole training side: one draw, so its interval comes from the test images only.
* Each point's interval and the paired tests resample tries, then test images (the same
  resamples for every row and every try, which share one test set), as
  :mod:`pipeline.significance` does over seeds; the spread over tries alone (``std``) says how
  much of it the draw causes.
* Every point's predictions are kept (``RUNS/DATASET/shot-points``, keyed by the feature file's
  fingerprint, the taps, the fit settings and the draw), so a rerun with more shot counts, tries
  or rows fits only the new points.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from features.datasets import ImageSet
from features.errors import UsageError
from features.files import digest, path_safe
from features.joined import Features
from features.options import ExtractOptions

from .classifiers import get_classifier
from .compare import METRIC, PlannedRow, prepare_rows
from .fitdata import read_fit_data
from .fusion import AUTO, Groups, column_groups
from .options import FitOptions
from .protocols import Protocol, check_protocol, make_split, split_digest
from .results import RUNS_ROOT
from .runs import settings_digest
from .selection import selector
from .significance import bootstrap, interval, paired_difference, sample_weights
from .tapselect import select_taps

ALL = "all"
NO_FOLD = "(1 image of a class leaves no fold to choose by)"
CSV_COLUMNS = ("row", "backbone", "clf", "tap", "shots", "k", "tries", "mean", "std", "low", "high", "best", "tied",
               "vs_best", "vs_best_low", "vs_best_high", "short_classes", "untrained_classes", "selection")


def parse_shots(text: str) -> list[int | None]:
    """``1,2,5,all`` -> [1, 2, 5, None] (None: every training image), ascending, ``all`` last."""
    values: set[int | None] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == ALL:
            values.add(None)
        elif part.isdigit() and int(part) >= 1:
            values.add(int(part))
        else:
            raise UsageError(f"--shots takes whole numbers of training images per class (>= 1) or {ALL}, "
                             f"comma-separated, not {part!r}; e.g. --shots 1,2,5,10,{ALL}")
    if not values:
        raise UsageError(f"--shots needs at least one shot count, e.g. --shots 1,2,5,10,{ALL}")
    return sorted(v for v in values if v is not None) + ([None] if None in values else [])


def check_shots(shots: list[int | None], tries: int, auto: bool) -> None:
    """Refuse what a curve cannot fit, before any work."""
    if tries < 1:
        raise UsageError(f"--tries must be at least 1, not {tries}")
    if auto and 1 in shots:
        raise UsageError("auto (--fuse) chooses its taps by CV, which needs 2 training images per class; drop 1 "
                         "from --shots or leave out --fuse")


def shot_name(k: int | None) -> str:
    return ALL if k is None else str(k)


def draw_shots(labels: np.ndarray, pool: np.ndarray, k: int | None, attempt: int) -> np.ndarray:
    """Try ``attempt``'s draw of ``k`` training rows per class from ``pool`` (sorted indices; a class
    with fewer keeps all; ``None``: the whole pool). Nested: the draw of k is in the draw of k + 1."""
    if k is None:
        return np.sort(pool)
    rng = np.random.default_rng([attempt, 7919])  # one ordering per try, shared by every k
    parts = [rng.permutation(pool[labels[pool] == c])[:k] for c in np.unique(labels[pool])]
    return np.sort(np.concatenate(parts))


@dataclass(frozen=True)
class CurveRow:
    """One line of the curve: its matrix over every sample (taps side by side, ``groups`` naming each
    tap's columns when there are several) and how it is fitted."""

    label: str
    X: np.ndarray
    options: FitOptions
    groups: Groups | None = None
    auto: bool = False
    key: str = ""  # what names its points in the cache (the label when empty)


def fit_point(row: CurveRow, y: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int) -> dict:
    """Fit ``row`` on the ``train`` rows (its taps and C chosen on them only) and predict ``test``."""
    t0 = time.perf_counter()
    counts = np.bincount(y[train])
    smallest = int(counts[counts > 0].min())
    options = row.options
    if smallest < 2 and len(options.grid) > 1:  # no fold can hold a class out: the grid's middle value
        options = replace(options, grid=[options.grid[len(options.grid) // 2]])
    X, groups, taps = row.X, row.groups, None
    if row.auto:
        picked = select_taps(X[train], y[train], groups, method=options.select, folds=min(options.folds, smallest),
                             threshold=options.select_threshold, random_state=seed)
        taps = picked.taps
        cols = np.concatenate([np.arange(*groups[t]) for t in taps])
        X = X[:, cols]
        groups = column_groups({t: groups[t][1] - groups[t][0] for t in taps}) if len(taps) > 1 else None
    model = selector(options, random_state=seed, groups=groups).fit(X[train], y[train])
    selection = model.selection_
    if len(row.options.grid) > 1 and len(options.grid) == 1:
        selection = f"fixed {options.param}={model.chosen_:g} {NO_FOLD}"
    return {"pred": model.predict(X[test]), "chosen": float(model.chosen_), "selection": selection, "taps": taps,
            "seconds": round(time.perf_counter() - t0, 3)}


def curve_points(rows: Sequence[CurveRow], y: np.ndarray, pool: np.ndarray, test: np.ndarray,
                 shots: list[int | None], tries: int, *, classes: list[str] | None = None,
                 cache: Path | None = None, log=print) -> list[dict]:
    """Every row at every shot count: the mean over ``tries`` draws of the mean per-class accuracy on
    ``test``, its interval, the spread over tries, and whether it is the best at that shot count or tied
    with it. Points already in ``cache`` (a folder) are read, new ones written there."""
    check_shots(shots, tries, any(r.auto for r in rows))
    classes = classes or [str(c) for c in range(int(y.max()) + 1)]
    counts = np.bincount(y[pool], minlength=len(classes))
    untrained = "; ".join(classes[c] for c in np.unique(y[test]) if counts[c] == 0)  # tested, never predictable
    weights = sample_weights(y[test], METRIC)
    points: list[dict] = []
    for k in shots:
        attempts = 1 if k is None else tries  # every draw of "all" is the whole pool
        draws = [draw_shots(y, pool, k, t) for t in range(attempts)]
        fitted = [[_cached_point(row, y, train, test, k=k, attempt=t, cache=cache, log=log)
                   for t, train in enumerate(draws)]
                  for row in rows]
        correct = [[y[test] == f["pred"] for f in per_row] for per_row in fitted]
        short = [f"{classes[c]} ({int(counts[c])})" for c in np.flatnonzero(counts) if k is not None and counts[c] < k]
        effective = float(np.mean([np.bincount(y[d])[np.unique(y[d])].mean() for d in draws]))
        about = {"shots": shot_name(k), "k": round(effective, 2), "short_classes": "; ".join(short),
                 "untrained_classes": untrained,
                 "draws": [digest(d.tolist()) for d in draws]}
        points += _shot_points(rows, fitted, correct, weights, test, about)
    return points


def _shot_points(rows, fitted, correct, weights, test, about: dict) -> list[dict]:
    """One shot count's points (``about`` says which): mean, spread over tries, bootstrap interval, best
    and ties."""
    per_try = [[float(np.sum(weights * c) / np.sum(weights)) for c in by_try] for by_try in correct]
    stats = bootstrap(correct, [weights] * len(correct[0]), samples=[test] * len(correct[0]))  # one test set
    observed = np.array([np.mean(p) for p in per_try])
    best = int(np.argmax(observed))
    out = []
    for i, row in enumerate(rows):
        low, high = interval(stats[i])
        point = {"row": row.label, **about, "tries": len(per_try[i]),
                 "mean": round(float(observed[i]), 5), "std": round(float(np.std(per_try[i])), 5),
                 "low": round(low, 5), "high": round(high, 5), "best": i == best, "tied": False,
                 "per_try": [round(v, 5) for v in per_try[i]],
                 "selection": _most_common([f["selection"] for f in fitted[i]]),
                 "chosen": [f["chosen"] for f in fitted[i]],
                 "fit_seconds": round(float(np.mean([f["seconds"] for f in fitted[i]])), 3)}
        if any(f["taps"] for f in fitted[i]):
            point["taps_chosen"] = ["+".join(f["taps"]) for f in fitted[i]]
        if i != best:
            d = paired_difference(stats, observed, correct, i, best)
            point.update(tied=not d.significant, vs_best=round(d.difference, 5) + 0.0,
                         vs_best_low=round(d.low, 5) + 0.0, vs_best_high=round(d.high, 5) + 0.0)
        out.append(point)
    return out


def _most_common(texts: list[str]) -> str:
    return max(dict.fromkeys(texts), key=texts.count)


def _cached_point(row: CurveRow, y, train, test, *, k: int | None, attempt: int, cache: Path | None, log) -> dict:
    """:func:`fit_point`, or its earlier result from ``cache`` when the same row, draw and test split
    were fitted before."""
    name = digest({"row": row.key or row.label, "options": row.options.settings, "train": train.tolist(),
                   "test": test.tolist()})
    path = None if cache is None else cache / f"{path_safe(row.label)}__{shot_name(k)}__{attempt}__{name}.npz"
    if path is not None and path.exists():
        with np.load(path) as stored:
            return {"pred": stored["pred"], **json.loads(str(stored["meta"]))}
    point = fit_point(row, y, train, test, seed=attempt)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial.npz")  # a killed run leaves no half-written point
        np.savez(partial, pred=point["pred"], meta=json.dumps({k: v for k, v in point.items() if k != "pred"}))
        partial.rename(path)
    log(f"fitted {row.label} at {_shots(shot_name(k))}, try {attempt}: "
        f"{100 * float(np.mean(point['pred'] == y[test])):.1f}% accuracy")
    return point


def leaders(points: list[dict]) -> str:
    """Which row leads where, as one sentence ("a leads up to 5 shots, b from 10 shots"). A row keeps the
    lead while it is the best or tied with the best (its paired interval against the best includes 0),
    so the lead changes hands only where the leader falls significantly behind."""
    order = list(dict.fromkeys(p["shots"] for p in points))
    at = {(p["row"], p["shots"]): p for p in points}
    runs: list[tuple[str, list[str]]] = []
    for s in order:
        if runs and (at[(runs[-1][0], s)]["best"] or at[(runs[-1][0], s)]["tied"]):
            runs[-1][1].append(s)
        else:
            runs.append((next(p["row"] for p in points if p["shots"] == s and p["best"]), [s]))
    if len(runs) == 1:
        parts = [f"{runs[0][0]} is the best or tied with it at every shot count"]
    else:
        parts = [f"{runs[0][0]} leads up to {_shots(runs[0][1][-1])}"]
        parts += [f"{row} at {_shots(s[0]) if len(s) == 1 else s[0] + '-' + _shots(s[-1])}" for row, s in runs[1:-1]]
        parts.append(f"{runs[-1][0]} from {_shots(runs[-1][1][0])}")
    ties = [f"{s}: {', '.join(p['row'] for p in points if p['shots'] == s and (p['best'] or p['tied']))}"
            for s in order if any(p["shots"] == s and p["tied"] for p in points)]
    return ", ".join(parts) + (f" (best and tied at {'; '.join(ties)})" if ties else "")


def _shots(s: str) -> str:
    return "all images" if s == ALL else f"{s} shot{'s' if s != '1' else ''}"


def _curve_row(planned: PlannedRow, fit: FitOptions, pooling: str, label: str) -> CurveRow:
    data = read_fit_data(planned.features, planned.spec, pooling, fit, None if planned.tap else planned.candidates)
    keys, X, groups = data.keys, data.X, data.groups
    if data.streaming:
        raise UsageError(f"shot curves fit in memory, and tap {keys[0]} is over the memory budget; pool it smaller")
    made = [planned.features.taps[k].made_like() for k in keys]
    return CurveRow(label, X, fit, groups, auto=planned.spec == AUTO,
                    key=digest(data.fingerprint, keys, [list(m) for m in made]))


def shot_curves(images: ImageSet, backbones: list, taps: list[str] | None, options: Sequence[FitOptions],
                protocol: Protocol, *, shots: list[int | None], tries: int,
                extract_options: ExtractOptions | None = None, runs_root: Path | str = RUNS_ROOT,
                fuse: bool = False, log=print) -> tuple[Path, list[dict], str]:
    """``compare --shots``: extract what is missing, fit every row at every shot count over ``tries``
    draws on the protocol's seed-0 split, write shots.csv, shots.json and shots.png; -> (folder,
    points, who leads where)."""
    extract_options = extract_options or ExtractOptions()
    check_protocol(protocol, images.labels, images.classes, images.splits)
    check_shots(shots, tries, fuse or AUTO in (taps or []))
    if any(get_classifier(f.clf).text for f in options):
        raise UsageError("--clf zeroshot uses no training images, so it has no curve; compare it without --shots")
    prepared = prepare_rows(images, backbones, taps, fuse, extract_options, log)
    several = {"backbone": len(backbones) > 1, "clf": len(options) > 1}
    rows, meta = [], []
    for planned in prepared.rows:
        for fit in options:
            named = several["backbone"] and "/" not in planned.spec  # a set across backbones names them itself
            label = " ".join([planned.backbone] * named + [planned.spec] + [fit.clf] * several["clf"])
            rows.append(_curve_row(planned, fit, extract_options.pooling, label))
            meta.append({"backbone": planned.backbone, "clf": fit.clf, "tap": planned.spec})
    features: Features = prepared.rows[0].features
    first = features.duplicate_groups()
    pool, test = make_split(protocol, features.labels, features.split, 0, features.valid, first)
    if first is not None:  # distinct images only: one training image per group, whichever side its first copy is on
        pool = np.sort(pool[np.unique(first[pool], return_index=True)[1]])
    settings = {"dataset": images.name, "dataset_fingerprint": images.fingerprint(), "features": prepared.made_from,
                "backbones": [b.name for b in backbones], "taps": taps, "fuse": fuse,
                "pooling": extract_options.pooling, "protocol": str(protocol), "fits": [f.settings for f in options]}
    out = Path(runs_root) / images.name / path_safe(
        f"shots__{'+'.join(b.name for b in backbones)}__{'+'.join(f.clf for f in options)}__{settings_digest(settings)}")
    points = curve_points(rows, features.labels, pool, test, shots, tries, classes=features.classes,
                          cache=Path(runs_root) / images.name / "shot-points", log=log)
    by_label = {r.label: m for r, m in zip(rows, meta, strict=True)}
    points = [{**by_label[p["row"]], **p} for p in points]
    sentence = leaders(points)
    _write(out, points, {**settings, "shots": [shot_name(k) for k in shots], "tries": tries,
                         "test_images": int(len(test)), "test_digest": split_digest(features.ids, test),
                         "training_pool": int(len(pool))}, sentence)
    plot_curves(points, out / "shots.png", f"{images.name}: mean per-class accuracy against training images per "
                                          f"class ({tries} tries, 95% intervals)")
    return out, points, sentence


def _write(out: Path, points: list[dict], settings: dict, sentence: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "shots.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(points)
    (out / "shots.json").write_text(json.dumps({"settings": settings, "leaders": sentence, "metric": METRIC,
                                                "points": points}, indent=2))


def plot_curves(points: list[dict], path: Path, title: str) -> None:
    """Accuracy against training images per class (log axis), one line per row with its interval band;
    ``all`` sits at its mean images per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, row in enumerate(dict.fromkeys(p["row"] for p in points)):
        mine = [p for p in points if p["row"] == row]
        x = [p["k"] for p in mine]
        ax.plot(x, [100 * p["mean"] for p in mine], marker="o", color=f"C{i % 10}", label=row)
        ax.fill_between(x, [100 * p["low"] for p in mine], [100 * p["high"] for p in mine], color=f"C{i % 10}",
                        alpha=0.12)
    ticks = list(dict.fromkeys((p["k"], p["shots"]) for p in points))
    ax.set_xscale("log")
    ax.set_xticks([k for k, _ in ticks], [s if s != ALL else f"all\n({k:g})" for k, s in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training images per class")
    ax.set_ylabel("mean per-class accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_curves(points: list[dict]) -> str:
    """The curve as a table: one line per row, one column per shot count; * best, = tied with it."""
    shots = list(dict.fromkeys(p["shots"] for p in points))
    names = list(dict.fromkeys(p["row"] for p in points))
    wide = max(12, *(len(n) + 2 for n in names))
    lines = [f"{'row':<{wide}}" + "".join(f"{s:>15}" for s in shots)]
    for name in names:
        cells = []
        for s in shots:
            p = next(q for q in points if q["row"] == name and q["shots"] == s)
            mark = "*" if p["best"] else "=" if p["tied"] else " "
            cells.append(f"{100 * p['mean']:>8.1f} ±{100 * (p['high'] - p['low']) / 2:4.1f}{mark}")
        lines.append(f"{name:<{wide}}" + "".join(f"{c:>15}" for c in cells))
    notes = {p["shots"]: p["short_classes"] for p in points if p["short_classes"]}
    lines += [f"at {s} shots {n.count('(')} classes have fewer images and keep all they have: {n}"
              for s, n in notes.items()]
    untrained = points[0].get("untrained_classes") if points else ""
    if untrained:
        lines.append(f"note: {untrained.count(';') + 1} class(es) have test images but no training image: {untrained}; "
                     f"no draw can predict them, so every point counts each such class as 0")
    selections: dict[str, dict[str, None]] = {}  # per shot count, each distinct way a row chose (one per classifier)
    for p in points:
        selections.setdefault(p["shots"], {})[p["selection"]] = None
    lines.append("regularisation: " + "; ".join(f"{_shots(s)}: {_ways(list(t))}" for s, t in selections.items()))
    return "\n".join(lines)


def _ways(selections: list[str]) -> str:
    """One shot count's ways of choosing, the reason for a fixed value said once."""
    fixed = [t.removesuffix(f" {NO_FOLD}") for t in selections]
    return ", ".join(fixed) + (f" {NO_FOLD}" if fixed != selections else "")
