"""Fit one tap of a feature file over seeded splits, score it, and write its run folder.

Orchestration only, one stage per module: the data from :mod:`pipeline.fitdata`, the run's
name (and an identical earlier run) from :mod:`pipeline.runs`, the splits from
:mod:`pipeline.protocols`, each seed's fit and scores from :mod:`pipeline.training`, the plots
from :mod:`pipeline.report`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from features.errors import TapsError, UsageError
from features.joined import Features

from .fitdata import read_fit_data
from .options import FitOptions
from .protocols import Protocol, duplicate_summary, plan_splits
from .report import plot_confusion, write_per_class
from .results import RUNS_ROOT, FeaturesUsed, RunResult, TapUsed
from .runs import find_run, run_settings, save_model, save_predictions

if TYPE_CHECKING:
    from .training import TapEvaluation


def evaluate_tap(features: Features, tap: str, pooling: str, options: FitOptions, protocol: Protocol,
                 seeds: int, *, candidates: list[str] | None = None) -> TapEvaluation:
    """Fit and score one tap, a fused set (``a+b``) or ``auto`` (the set chosen on each training split
    from ``candidates``, default every tap in the file) over ``seeds`` seeded splits (seed s uses split
    seed s), without a run folder."""
    from .training import fit_seeds  # scikit-learn: only where a fit runs (a reused run answers without it)

    data = read_fit_data(features, tap, pooling, options, candidates)
    splits = plan_splits(protocol, features.labels, classes=features.classes, split=features.split,
                         usable=features.valid, groups=data.same_bytes, seeds=seeds)
    return fit_seeds(data, splits, options, tap)


def features_record(features: Features, keys: list[str]) -> FeaturesUsed:
    """The file's settings and the taps the saved model reads (joined by ``+`` when fused; ``taps`` lists each)."""
    records = [features.taps[k] for k in keys]
    taps = tuple(TapUsed(tap=k, node=r.node, pooling=r.pooling, dim=r.dim, precision=r.precision,
                         decode=r.decode, runtime=r.runtime, int8=r.extra.get("int8"), export=r.extra.get("export"),
                         compiled=int(r.extra.get("compiled", 0)), orientation=r.orientation)
                 for k, r in zip(keys, records, strict=True))
    joined = {name: "+".join(dict.fromkeys(str(getattr(t, name)) for t in taps))
              for name in ("pooling", "precision", "decode", "runtime")}
    return FeaturesUsed(**features.settings(), path=str(features.path.resolve()), tap="+".join(keys),
                        node="+".join(r.node for r in records), dim=sum(r.dim for r in records), **joined, taps=taps)


def fit_run(features: Features, tap: str, pooling: str, options: FitOptions, protocol: Protocol, *,
            seeds: int = 1, runs_root: Path | str = RUNS_ROOT, force: bool = False,
            candidates: list[str] | None = None) -> tuple[Path, RunResult, bool]:
    """Evaluate one tap, tap set or ``auto`` (choosing among ``candidates``) and write its run folder;
    returns (folder, results, reused). In order: read and check the data, name the run (and reuse an
    identical one), split, fit each seed, write."""
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, not {seeds}")
    data = read_fit_data(features, tap, pooling, options, candidates)
    settings = run_settings(features, tap=tap, keys=data.keys, fingerprint=data.fingerprint, pooling=pooling,
                            fit=options.settings, protocol=protocol.text, seeds=seeds,
                            copies=data.same_bytes is not None)
    run_dir, results = find_run(runs_root, features, settings, force=force)
    if results is not None:
        return run_dir, results, True
    from .training import fit_seeds  # scikit-learn: only now, a reused run answers without it

    splits = plan_splits(protocol, features.labels, classes=features.classes, split=features.split,
                         usable=features.valid, groups=data.same_bytes, seeds=seeds)
    ev = fit_seeds(data, splits, options, tap)
    with staged(run_dir) as stage:
        results = _write_run(stage, features, settings, ev, options, protocol)
    return run_dir, results, False


@contextlib.contextmanager
def staged(run_dir: Path):
    """A folder to write a run into that becomes ``run_dir`` only when everything is written: a full
    disk or a crash leaves no half-written run that a later command could take for a finished one."""
    stage = run_dir.with_name(f".{run_dir.name}.partial-{os.getpid()}")
    try:
        stage.mkdir(parents=True, exist_ok=True)
        yield stage
        if run_dir.exists():  # --force over an earlier run: the old one goes only once the new one is whole
            old = run_dir.with_name(f".{run_dir.name}.old-{os.getpid()}")
            run_dir.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        stage.rename(run_dir)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TapsError(f"disk full while writing the run {run_dir}; free space and rerun the same command "
                            f"(nothing of this run was kept)") from None
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _write_run(run_dir: Path, features: Features, settings: dict, ev: TapEvaluation, options: FitOptions,
               protocol: Protocol) -> RunResult:
    """Write a run's model, predictions, per-class table, confusion matrix and results.json; -> the results."""
    varies = ("the train/test split and the CV folds" if protocol.record.random
              else f"the CV folds only: the {protocol} split is the same for every seed")
    tested = [set(features.labels[ev.predictions[f"test_{s}"]].tolist()) for s in range(len(ev.per_seed))]
    untested = [c for i, c in enumerate(features.classes) if any(i not in seen for seen in tested)]
    counts = np.bincount(features.labels[ev.predictions["test_0"]], minlength=len(features.classes))
    fewest = int(np.argmin(np.where(counts > 0, counts, counts.max() + 1)))
    # mean/class weighs each class alike, so one test image of this class is 1 / (its count x classes) of it
    fewest_test = {"class": features.classes[fewest], "images": int(counts[fewest]),
                   "classes_tested": int((counts > 0).sum())}
    results = RunResult(
        settings=settings, features=features_record(features, ev.taps), classes=features.classes,
        split_seeds=[s.seed for s in ev.per_seed], seeds_vary=varies,
        duplicates=duplicate_summary(features.duplicate_groups(), protocol, features.labels, features.split,
                                     features.valid, ev.predictions["test_0"]), undecodable=int((~features.valid).sum()),
        untested_classes=untested, untrained_classes=[features.classes[c] for c in ev.untrained],
        fewest_test_images=fewest_test, near_copies=ev.near_copies, per_seed=ev.per_seed,
        chosen={options.param: [s.chosen for s in ev.per_seed]}, grid={options.param: options.grid},
        fit_seconds={"mean": float(np.mean(ev.fit_seconds)), "total": float(np.sum(ev.fit_seconds))},
        metrics=ev.metrics, model=save_model(run_dir, ev.model), predictions=save_predictions(run_dir, ev.predictions),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    from sklearn.metrics import classification_report, confusion_matrix

    y_true, y_pred = features.labels[ev.predictions["test_0"]], ev.predictions["pred_0"]
    labels = np.arange(len(features.classes))
    write_per_class(run_dir / "per_class.csv", classification_report(
        y_true, y_pred, labels=labels, target_names=features.classes, output_dict=True, zero_division=0),
        features.classes)
    plot_confusion(confusion_matrix(y_true, y_pred, labels=labels), features.classes, run_dir / "confusion.png",
                   f"{features.attrs['backbone']} {results.features.tap} {options.clf}: seed 0")
    results.save(run_dir)
    return results
