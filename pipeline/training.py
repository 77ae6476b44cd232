"""Fit and score a selecting estimator on each seed's split of a :class:`pipeline.fitdata.FitData`.

Per seed: for ``--tap auto`` the taps chosen on the training rows only, the estimator that
chooses C (or weight decay, or k) by CV and refits (:mod:`pipeline.selection`), its calibration
when asked, its predictions and scores on the test rows. Every split is checked before the first
fit, so a protocol that cannot be cross-validated fails at once, not after minutes of fitting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.metrics import balanced_accuracy_score

from features.errors import TapsError, UsageError
from features.joined import BACKBONE_SEPARATOR

from .calibration import calibrate, calibration_method, expected_calibration_error
from .classifiers import get_classifier, parse_preprocess, read_prompts
from .fitdata import FitData
from .fusion import AUTO, Groups, column_groups
from .metrics import score_predictions, summarize
from .nearcopies import RATIO, near_copies
from .options import FitOptions
from .protocols import split_digest
from .results import SeedResult
from .selection import SelectedClassifier, check_folds, selector
from .tapselect import select_taps
from .zeroshot import TEXT_TAP, ZeroShotClassifier, zero_shot_weights

Split = tuple[np.ndarray, np.ndarray]


@dataclass
class TapEvaluation:
    per_seed: list[SeedResult]
    metrics: dict
    model: object  # the seed-0 model
    taps: list[str]  # the file keys the seed-0 model reads, side by side
    predictions: dict[str, np.ndarray]  # per seed: test rows (test_S) and their predictions (pred_S)
    near_copies: dict  # seed 0's test images with a near-copy in training (see near_copy_report)
    untrained: list[int] = field(default_factory=list)  # classes tested in some seed's split but not trained on

    @property
    def fit_seconds(self) -> list[float]:
        return [s.fit_seconds for s in self.per_seed]


def fit_seeds(data: FitData, splits: list[Split], options: FitOptions, tap: str) -> TapEvaluation:
    """Fit and score ``tap`` (its spec: one tap, a ``+`` set or ``auto``) on each split, seed s on split s."""
    _check_counts(options, min(data.features.taps[k].dim for k in data.keys), min(len(train) for train, _ in splits))
    for train, _ in splits:
        if len(np.unique(data.features.labels[train])) < 2:
            raise TapsError(f"the training split of tap {tap} has one class ({len(train)} samples); "
                            f"use a protocol with more classes in training")
    copies = data.same_bytes  # each image's copies stay in one CV fold
    every_train = [(data.features.labels[train], None if copies is None else copies[train]) for train, _ in splits]
    per_seed, model0, taps0, predictions = [], None, data.keys, {}
    for seed, (train, test) in enumerate(splits):
        result, model, pred = _fit_seed(data, options, tap, seed, train, test, check=every_train if seed == 0 else None)
        predictions.update({f"test_{seed}": test, f"pred_{seed}": pred})
        per_seed.append(result)
        if seed == 0:
            model0, taps0 = model, result.taps
    near = near_copy_report(data, splits[0], taps0, predictions["pred_0"], options,
                            per_seed[0].metrics["mean_per_class_accuracy"])
    labels = data.features.labels  # a class with no training image can never be predicted (zero-shot aside)
    untrained = [] if get_classifier(options.clf).text else \
        sorted({int(c) for train, test in splits for c in np.setdiff1d(labels[test], labels[train])})
    return TapEvaluation(per_seed, summarize([s.metrics for s in per_seed]), model0, taps0, predictions, near,
                         untrained)


def near_copy_report(data: FitData, split: Split, taps: list[str], pred: np.ndarray, options: FitOptions,
                     scored: float) -> dict:
    """Seed 0's test images with a near-copy among its training images in the taps the model read
    (:mod:`pipeline.nearcopies`), a few of them by id, and the seed's mean per-class accuracy
    without them beside ``scored``, the one with them. Not checked where the fit streams (no
    matrix in memory) or trains nothing (zero-shot)."""
    if data.streaming or get_classifier(options.clf).text:
        return {"checked": False}
    (train, test), y, ids = split, data.features.labels, data.features.ids
    X, fused = _chosen_matrix(data, taps)
    rows, partners = near_copies(X, train, test, groups=fused)
    first = np.argsort(y[rows] == y[partners], kind="stable")  # copies under another class: the examples to show
    rows, partners = rows[first], partners[first]
    report = {"checked": True, "ratio": RATIO, "test_images": int(len(rows)),
              "across_classes": int((y[rows] != y[partners]).sum()),
              "examples": [[ids[r], ids[p]] for r, p in zip(rows[:3].tolist(), partners[:3].tolist(), strict=True)]}
    keep = ~np.isin(test, rows)
    if len(rows) and keep.any():
        report["mean_per_class_accuracy"] = scored
        report["mean_per_class_accuracy_without"] = float(balanced_accuracy_score(y[test][keep], pred[keep]))
    return report


def _chosen_matrix(data: FitData, taps: list[str]) -> tuple[np.ndarray, Groups | None]:
    """The in-memory matrix of ``taps`` (all of the fit's keys, or those ``auto`` chose) and their columns."""
    if taps == data.keys:
        return data.X, data.groups
    return _columns(data.X, data.groups, taps) if len(taps) > 1 else (data.X[:, np.arange(*data.groups[taps[0]])], None)


def _fit_seed(data: FitData, options: FitOptions, tap: str, seed: int, train: np.ndarray, test: np.ndarray, *,
              check: list[tuple[np.ndarray, np.ndarray | None]] | None = None) -> tuple[SeedResult, object, np.ndarray]:
    """One seed: (its record, the model a run keeps, its predictions on the test rows). ``check``:
    every seed's training labels and copies, checked for cross-validation before this (the first)
    fit, so a protocol that cannot be cross-validated fails before any fit, not after some. Every CV
    inside the training rows keeps an image's byte-identical copies in one fold."""
    t0, y = time.perf_counter(), data.features.labels
    copies = None if data.same_bytes is None else data.same_bytes[train]
    record, chosen, X, fused = None, data.keys, data.X, data.groups
    if tap == AUTO:  # chosen from this seed's training rows only
        picked = select_taps(X[train], y[train], fused, method=options.select, folds=options.folds,
                             threshold=options.select_threshold, random_state=seed, copies=copies)
        chosen = picked.taps
        X, fused = _chosen_matrix(data, chosen)
        record = {"method": picked.method, "seconds": picked.seconds, "path": picked.path}
    # In memory the estimator sees the rows; streaming, the rows' indices in the file.
    Xtr, Xte = (train[:, None], test[:, None]) if data.streaming else (X[train], X[test])
    selected = selecting_model(data, options, seed, fused)
    try:
        check_folds(check or [], options.folds, len(options.grid))
    except ValueError as exc:
        raise TapsError(f"choosing {options.param} by {exc}; use a protocol with more training images per "
                        f"class, or pass a single --grid value to fit without selection") from None
    selected.fit(Xtr, y[train], copies=copies)
    model = (calibrate(selected.model_, Xtr, y[train], method=calibration_method(options.clf),
                       folds=options.folds, random_state=seed, copies=copies) if options.calibrate else selected)
    seconds, t0 = time.perf_counter() - t0, time.perf_counter()
    pred = model.predict(Xte)  # once: streaming, each pass over the test rows reads the file
    predict_seconds = time.perf_counter() - t0
    ranks = _scores(model, Xte) if len(selected.classes_) > 5 else None  # for top-5
    metrics = {**score_predictions(y[test], pred, ranks, selected.classes_),
               **(_calibration_metrics(selected.model_, model, Xte, y[test]) if options.calibrate else {})}
    ids = data.features.ids
    result = SeedResult(
        seed=seed, n_train=int(len(train)), n_test=int(len(test)), train_digest=split_digest(ids, train),
        test_digest=split_digest(ids, test), taps=chosen, tap_selection=record, chosen=selected.chosen_,
        cv_folds=selected.cv_folds_, selection=selected.selection_ + (", streaming" if data.streaming else ""),
        cv_accuracy=None if selected.cv_scores_ is None else [float(s) for s in selected.cv_scores_],
        fit_seconds=round(seconds, 3), predict_seconds=round(predict_seconds, 3), metrics=metrics)
    kept = selected.model_.to_array_model() if data.streaming else model if options.calibrate else selected.model_
    return result, kept, pred


def selecting_model(data: FitData, options: FitOptions, seed: int, groups: Groups | None = None) -> SelectedClassifier:
    """The estimator that chooses C or weight decay by CV and refits: in memory on the tap's matrix, or
    streaming from the file, where its X are row indices. Both select the same way."""
    key = data.keys[0]
    if data.streaming:
        from .streaming import StreamedLinear  # torch: only a streamed head needs it

        head = StreamedLinear(data.features, key=key, hidden=options.hidden, device=options.device, random_state=seed)
    elif get_classifier(options.clf).text:
        if key.rpartition(BACKBONE_SEPARATOR)[2] != TEXT_TAP or groups is not None:
            raise UsageError(f"--clf {options.clf} reads the {TEXT_TAP} tap (the image embedding the text is compared "
                             f"with), not {key}; pass --tap {TEXT_TAP}")
        head = ZeroShotClassifier(zero_shot_weights(data.features.attrs, data.features.classes,
                                                    read_prompts(options.prompts)))
    else:
        return selector(options, random_state=seed, groups=groups)
    return SelectedClassifier(head, param=options.param, grid=options.grid, folds=options.folds, random_state=seed)


def _check_counts(options: FitOptions, dim: int, n_train: int) -> None:
    """A preprocessing step that keeps K components (PCA) keeps at most min(features, training
    samples) of them (fewer inside a CV fold)."""
    for record, k in parse_preprocess(options.preprocess):
        limit = min(dim, n_train * (options.folds - 1) // options.folds if len(options.grid) > 1 else n_train)
        if record.count and k > limit:
            raise UsageError(f"--preprocess {record.name}:{k} asks for more components than this fit can have: at "
                             f"most {limit} ({dim}-D tap, {n_train} training samples"
                             f"{', less a CV fold' if len(options.grid) > 1 else ''}); lower K")


def _columns(X: np.ndarray, groups: Groups, keys: list[str]) -> tuple[np.ndarray, Groups]:
    """The fused matrix of the chosen taps only, and their columns in it."""
    cols = np.concatenate([np.arange(*groups[k]) for k in keys])
    return X[:, cols], column_groups({k: groups[k][1] - groups[k][0] for k in keys})


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
