"""Fit one tap of a feature file over seeded splits, score it, and write its run folder.

Orchestration only: the splits come from :mod:`pipeline.protocols`, the selecting estimator
from :mod:`pipeline.selection` (or the streaming head, :mod:`pipeline.streaming`, for
matrices over the memory budget), the metrics from :mod:`pipeline.metrics`, the folder from
:mod:`pipeline.runs` and the plots from :mod:`pipeline.report`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.metrics import classification_report, confusion_matrix

from features.errors import TapsError, UsageError
from features.files import check_output_folder
from features.joined import BACKBONE_SEPARATOR, Features, owner
from features.pooling import matches_pooling

from .calibration import calibrate, calibration_method, expected_calibration_error
from .classifiers import DEFAULT_PREPROCESS, get_classifier, read_prompts, streaming_classifiers
from .fusion import AUTO, Groups, column_groups, tap_set
from .metrics import score_predictions, summarize
from .options import FitOptions
from .protocols import Protocol, check_protocol, duplicate_summary, make_split, split_digest
from .report import plot_confusion, write_per_class
from .results import FeaturesUsed, RunResult, SeedResult, TapUsed
from .runs import reusable, run_dir_for, run_settings, save_model, save_predictions
from .selection import SelectedClassifier, cv_folds, selector
from .streaming import StreamedLinear, matrix_bytes
from .tapselect import select_taps
from .zeroshot import TEXT_TAP, ZeroShotClassifier, zero_shot_weights


def load_matrix(features: Features, key: str) -> np.ndarray:
    """The matrix of tap ``key``, refusing NaN or inf with the tap name and count."""
    X = features.matrix(key)
    bad = ~np.isfinite(X).all(axis=1) & features.valid
    if bad.any():
        raise TapsError(f"tap {key} in {features.path} has {int(bad.sum())} rows with NaN or inf; "
                        f"re-extract with --precision fp32 --force")
    return X


def selecting_model(features: Features, key: str, options: FitOptions, seed: int,
                    streaming: bool, groups: Groups | None = None) -> SelectedClassifier:
    """The estimator that chooses C or weight decay by CV and refits: in memory on the tap's matrix, or
    streaming from the file, where its X are row indices. Both select the same way."""
    if streaming:
        head = StreamedLinear(features, key=key, hidden=options.hidden, device=options.device, random_state=seed)
        return SelectedClassifier(head, param=options.param, grid=options.grid, folds=options.folds,
                                  random_state=seed)
    if get_classifier(options.clf).text:
        if key.rpartition(BACKBONE_SEPARATOR)[2] != TEXT_TAP or groups is not None:
            raise UsageError(f"--clf zeroshot reads the {TEXT_TAP} tap (the image embedding the text is compared "
                             f"with), not {key}; pass --tap {TEXT_TAP}")
        head = ZeroShotClassifier(zero_shot_weights(features.attrs, features.classes, read_prompts(options.prompts)))
        return SelectedClassifier(head, param=options.param, grid=options.grid, folds=options.folds, random_state=seed)
    return selector(options.clf, options.grid, folds=options.folds, preprocess=options.preprocess,
                    solver=options.solver, hidden=options.hidden, device=options.device, random_state=seed,
                    groups=groups)


def tap_keys(features: Features, tap: str, pooling: str, candidates: list[str] | None = None) -> list[str]:
    """The file keys a tap spec reads: one tap, a ``+`` set, or for ``auto`` the candidates of the
    selection: ``candidates``, or every complete tap of this pooling in the file (in depth order)."""
    if tap != AUTO:
        return _made_alike(features, [features.tap_key(t, pooling) for t in tap_set(tap)])
    if candidates:
        return _made_alike(features, [features.tap_key(t, pooling) for t in candidates])
    keys = sorted((k for k, r in features.taps.items() if r.complete and matches_pooling(r.pooling, pooling)),
                  key=_natural)
    if len(keys) < 2:
        raise UsageError(f"--tap auto chooses among the file's taps, but {features.path.name} has "
                         f"{len(keys)} complete tap(s) with pooling {pooling}; extract more with "
                         f"`taps extract ... --taps all`")
    return _made_alike(features, keys)


def _made_alike(features: Features, keys: list[str]) -> list[str]:
    """``keys``, after refusing to fuse taps of one backbone computed with different precisions, decoders
    or runtimes: their columns would not mean what they mean at predict time, which rebuilds each
    backbone's taps in one pass."""
    ways = {k: features.taps[k].made_like() for k in keys}
    if any(len({w for k, w in ways.items() if owner(k) == o}) > 1 for o in {owner(k) for k in keys}):
        shown = "; ".join(f"{k}: precision {p}, decode {d}, runtime {r}" for k, (p, d, r) in ways.items())
        raise UsageError(f"the taps to fuse in {features.path.name} were made differently ({shown}); re-extract "
                         f"them together with the same `taps extract ... --force` settings")
    return keys


def _natural(key: str) -> tuple:
    """By backbone, then block2 before block10 (block3.1 before block3, the end of its stage), then named taps."""
    backbone, tap = owner(key), key.rpartition(BACKBONE_SEPARATOR)[2]
    match = re.fullmatch(r"(\D*)(\d+)(?:\.(\d+))?", tap.split("@")[0])
    return (backbone, 0, match[1], int(match[2]), int(match[3] or 1e9)) if match else (backbone, 1, tap, 0, 0)


@dataclass
class TapEvaluation:
    per_seed: list[SeedResult]
    metrics: dict
    model: object  # the seed-0 model
    taps: list[str]  # the file keys the seed-0 model reads, side by side
    predictions: dict[str, np.ndarray]  # per seed: test rows (test_S) and their predictions (pred_S)

    @property
    def fit_seconds(self) -> list[float]:
        return [s.fit_seconds for s in self.per_seed]


def _check_streaming(features: Features, key: str, options: FitOptions) -> bool:
    """Whether this fit streams from the file (its matrix is over the memory budget); refuses what cannot."""
    dim = features.taps[key].dim
    need, budget = matrix_bytes(int(features.valid.sum()), dim), options.budget_bytes()
    if need <= budget:
        return False
    if not get_classifier(options.clf).streams:
        streaming = " or ".join(f"--clf {c}" for c in streaming_classifiers())
        raise TapsError(f"tap {key}: an in-memory {options.clf} fit of {int(features.valid.sum())} x {dim} needs about "
                        f"{need / 2 ** 20:.0f} MiB, over the budget of {budget / 2 ** 20:.0f} MiB; use {streaming} "
                        f"(streams from the HDF5 file) or raise --memory-budget")
    if options.preprocess != DEFAULT_PREPROCESS:
        raise TapsError(f"streaming fits (tap {key} is over the memory budget) standardize only; "
                        f"drop --preprocess {options.preprocess}")
    features.verify(key)
    return True


def _check_splits(splits: list, y: np.ndarray, tap: str, options: FitOptions) -> None:
    """Every seed's training split can be fitted (and cross-validated), before the first fit."""
    for train, _ in splits:
        if len(np.unique(y[train])) < 2:
            raise TapsError(f"the training split of tap {tap} has one class ({len(train)} samples); "
                            f"use a protocol with more classes in training")
        try:
            cv_folds(y[train], options.folds, len(options.grid))
        except ValueError as exc:
            raise TapsError(f"choosing {options.param} by {exc}; use a protocol with more training images per "
                            f"class, or pass a single --grid value to fit without selection") from None


def _check_pca(options: FitOptions, dim: int, n_train: int) -> None:
    """PCA keeps at most min(features, training samples) components (fewer inside a CV fold)."""
    for part in options.preprocess.split(","):
        if part.strip().startswith("pca:"):
            k = int(part.strip()[4:])
            limit = min(dim, n_train * (options.folds - 1) // options.folds if len(options.grid) > 1 else n_train)
            if k > limit:
                raise UsageError(f"--preprocess {part.strip()} asks for more components than this fit can have: at "
                                 f"most {limit} ({dim}-D tap, {n_train} training samples"
                                 f"{', less a CV fold' if len(options.grid) > 1 else ''}); lower K")


def fit_matrix(features: Features, keys: list[str], options: FitOptions) -> tuple[np.ndarray | None, Groups | None, bool]:
    """The matrix a fit reads (None when it streams), each tap's columns when taps are fused, and
    whether it streams."""
    if len(keys) == 1:
        streaming = _check_streaming(features, keys[0], options)
        return (None if streaming else load_matrix(features, keys[0])), None, streaming
    dims = {k: features.taps[k].dim for k in keys}
    need, budget = matrix_bytes(int(features.valid.sum()), sum(dims.values())), options.budget_bytes()
    if need > budget:
        raise TapsError(f"fused taps are fitted in memory, and {'+'.join(keys)} ({sum(dims.values())}-D) needs about "
                        f"{need / 2 ** 20:.0f} MiB, over the budget of {budget / 2 ** 20:.0f} MiB; fuse fewer taps, "
                        f"pool them smaller, or raise --memory-budget")
    return np.hstack([load_matrix(features, k) for k in keys]), column_groups(dims), False


def _columns(X: np.ndarray, groups: Groups, keys: list[str]) -> tuple[np.ndarray, Groups]:
    """The fused matrix of the chosen taps only, and their columns in it."""
    cols = np.concatenate([np.arange(*groups[k]) for k in keys])
    return X[:, cols], column_groups({k: groups[k][1] - groups[k][0] for k in keys})


def evaluate_tap(features: Features, tap: str, pooling: str, options: FitOptions, protocol: Protocol,
                 seeds: int, *, candidates: list[str] | None = None) -> TapEvaluation:
    """Fit and score one tap, a fused set (``a+b``) or ``auto`` (the set chosen on each training split
    from ``candidates``, default every tap in the file) over ``seeds`` seeded splits (seed s uses split
    seed s)."""
    if not features.valid.any():
        raise TapsError(f"every image of {features.path} was skipped as undecodable ({len(features.valid)}); "
                        f"`taps info {features.path}` lists why")
    check_protocol(protocol, features.labels[features.valid], features.classes,
                   None if features.split is None else
                   [s for s, v in zip(features.split, features.valid, strict=True) if v])
    keys = tap_keys(features, tap, pooling, candidates)
    X, groups, streaming = fit_matrix(features, keys, options)
    if streaming and options.calibrate:
        raise TapsError(f"--calibrate fits in memory, and tap {keys[0]} streams from the file (over the memory "
                        f"budget); pool it smaller, raise --memory-budget or leave out --calibrate")
    y = features.labels
    same_bytes = features.duplicate_groups()
    splits = [make_split(protocol, y, features.split, seed, features.valid, same_bytes) for seed in range(seeds)]
    _check_splits(splits, y, tap, options)
    _check_pca(options, min(features.taps[k].dim for k in keys), min(len(train) for train, _ in splits))
    per_seed, model0, taps0, predictions = [], None, keys, {}
    for seed, (train, test) in enumerate(splits):
        t0 = time.perf_counter()
        record, chosen, Xs, fused = None, keys, X, groups
        if tap == AUTO:  # chosen from this seed's training rows only
            picked = select_taps(X[train], y[train], groups, method=options.select, folds=options.folds,
                                 threshold=options.select_threshold, random_state=seed)
            chosen = picked.taps
            Xs, fused = _columns(X, groups, chosen) if len(chosen) > 1 else (X[:, np.arange(*groups[chosen[0]])], None)
            record = {"method": picked.method, "seconds": picked.seconds, "path": picked.path}
        # In memory the estimator sees the rows; streaming, the rows' indices in the file.
        Xtr, Xte = (train[:, None], test[:, None]) if streaming else (Xs[train], Xs[test])
        selected = selecting_model(features, keys[0], options, seed, streaming, fused).fit(Xtr, y[train])
        model = (calibrate(selected.model_, Xtr, y[train], method=calibration_method(options.clf),
                           folds=options.folds, random_state=seed) if options.calibrate else selected)
        seconds, t0 = time.perf_counter() - t0, time.perf_counter()
        pred = model.predict(Xte)  # once: streaming, each pass over the test rows reads the file
        predict_seconds = time.perf_counter() - t0
        ranks = _scores(model, Xte) if len(selected.classes_) > 5 else None  # for top-5
        metrics = {**score_predictions(y[test], pred, ranks, selected.classes_),
                   **(_calibration_metrics(selected.model_, model, Xte, y[test]) if options.calibrate else {})}
        predictions.update({f"test_{seed}": test, f"pred_{seed}": pred})
        per_seed.append(SeedResult(
            seed=seed, n_train=int(len(train)), n_test=int(len(test)), train_digest=split_digest(features.ids, train),
            test_digest=split_digest(features.ids, test), taps=chosen, tap_selection=record, chosen=selected.chosen_,
            cv_folds=selected.cv_folds_, selection=selected.selection_ + (", streaming" if streaming else ""),
            cv_accuracy=None if selected.cv_scores_ is None else [float(s) for s in selected.cv_scores_],
            fit_seconds=round(seconds, 3), predict_seconds=round(predict_seconds, 3), metrics=metrics))
        if seed == 0:
            model0 = selected.model_.to_array_model() if streaming else model if options.calibrate else selected.model_
            taps0 = chosen
    return TapEvaluation(per_seed, summarize([s.metrics for s in per_seed]), model0, taps0, predictions)


def _scores(model, X: np.ndarray) -> np.ndarray:
    """Per-class scores for top-5: decision scores, or a calibrated model's probabilities."""
    return model.predict_proba(X) if isinstance(model, CalibratedClassifierCV) else model.decision_function(X)


def _calibration_metrics(uncalibrated, calibrated, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Expected calibration error on the test rows after calibration, and before it where the model
    had probabilities (an SVM's scores are not)."""
    after = {"expected_calibration_error": expected_calibration_error(y, calibrated.predict_proba(X),
                                                                      calibrated.classes_)}
    if not hasattr(uncalibrated, "predict_proba"):
        return after
    before = expected_calibration_error(y, uncalibrated.predict_proba(X), uncalibrated.classes_)
    return {**after, "expected_calibration_error_uncalibrated": before}


def features_record(features: Features, keys: list[str]) -> FeaturesUsed:
    """The file's settings and the taps the saved model reads (joined by ``+`` when fused; ``taps`` lists each)."""
    records = [features.taps[k] for k in keys]
    taps = tuple(TapUsed(tap=k, node=r.node, pooling=r.pooling, dim=r.dim, precision=r.precision,
                         decode=r.decode, runtime=r.runtime) for k, r in zip(keys, records, strict=True))
    joined = {name: "+".join(dict.fromkeys(str(getattr(t, name)) for t in taps))
              for name in ("pooling", "precision", "decode", "runtime")}
    return FeaturesUsed(**features.settings(), path=str(features.path.resolve()), tap="+".join(keys),
                        node="+".join(r.node for r in records), dim=sum(r.dim for r in records), **joined, taps=taps)


def fit_run(features: Features, tap: str, pooling: str, options: FitOptions, protocol: Protocol, *,
            seeds: int = 1, runs_root: Path | str = "runs", force: bool = False,
            candidates: list[str] | None = None) -> tuple[Path, RunResult, bool]:
    """Evaluate one tap, tap set or ``auto`` (choosing among ``candidates``) and write its run folder;
    returns (folder, results, reused)."""
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, not {seeds}")
    check_output_folder(Path(runs_root), "--runs-root")
    settings = run_settings(features, tap, pooling, options.as_dict(), str(protocol), seeds)
    if tap == AUTO:
        settings["candidates"] = tap_keys(features, tap, pooling, candidates)
    run_dir = run_dir_for(Path(runs_root), features, settings)
    if not force and (results := reusable(run_dir, settings)) is not None:
        return run_dir, results, True
    ev = evaluate_tap(features, tap, pooling, options, protocol, seeds, candidates=candidates)
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
    results = RunResult(
        settings=settings, features=features_record(features, ev.taps), classes=features.classes,
        split_seeds=[s.seed for s in ev.per_seed], seeds_vary=varies,
        duplicates=duplicate_summary(features.duplicate_groups()), per_seed=ev.per_seed,
        chosen={options.param: [s.chosen for s in ev.per_seed]}, grid={options.param: options.grid},
        fit_seconds={"mean": float(np.mean(ev.fit_seconds)), "total": float(np.sum(ev.fit_seconds))},
        metrics=ev.metrics, model=save_model(run_dir, ev.model), predictions=save_predictions(run_dir, ev.predictions),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    y_true, y_pred = features.labels[ev.predictions["test_0"]], ev.predictions["pred_0"]
    labels = np.arange(len(features.classes))
    write_per_class(run_dir / "per_class.csv", classification_report(
        y_true, y_pred, labels=labels, target_names=features.classes, output_dict=True, zero_division=0),
        features.classes)
    plot_confusion(confusion_matrix(y_true, y_pred, labels=labels), features.classes, run_dir / "confusion.png",
                   f"{features.attrs['backbone']} {results.features.tap} {options.clf}: seed 0")
    results.save(run_dir)
    return results
