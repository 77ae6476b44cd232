"""Fit one tap of a feature file over seeded splits, score it, and write its run folder.

Orchestration only: the splits come from :mod:`pipeline.protocols`, the selecting estimator
from :mod:`pipeline.selection` (or the streaming head, :mod:`pipeline.streaming`, for
matrices over the memory budget), the metrics from :mod:`pipeline.metrics`, the folder from
:mod:`pipeline.runs` and the plots from :mod:`pipeline.report`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix

from features.errors import TapsError, UsageError
from features.store import FeatureFile, check_output_folder

from .metrics import score_predictions, summarize
from .options import FitOptions
from .protocols import Protocol, check_protocol, make_split, split_digest
from .report import plot_confusion, write_per_class
from .runs import reusable, run_dir_for, run_settings, save_model, save_results
from .selection import SelectedClassifier, cv_folds, selector
from .streaming import StreamedLinear, matrix_bytes


def load_matrix(features: FeatureFile, tap: str, pooling: str) -> np.ndarray:
    """The tap's matrix, refusing NaN or inf with the tap name and count."""
    X = features.read(tap, pooling)
    bad = ~np.isfinite(X).all(axis=1) & features.valid
    if bad.any():
        raise TapsError(f"tap {tap} in {features.path} has {int(bad.sum())} rows with NaN or inf; "
                        f"re-extract with --precision fp32 --force")
    return X


def selecting_model(features: FeatureFile, key: str, options: FitOptions, seed: int,
                    streaming: bool) -> SelectedClassifier:
    """The estimator that chooses C or weight decay by CV and refits: in memory on the tap's matrix, or
    streaming from the file, where its X are row indices. Both select the same way."""
    if streaming:
        head = StreamedLinear(features, key=key, hidden=options.hidden, device=options.device, random_state=seed)
        return SelectedClassifier(head, param=options.param, grid=options.grid, folds=options.folds,
                                  random_state=seed)
    return selector(options.clf, options.grid, folds=options.folds, preprocess=options.preprocess,
                    solver=options.solver, hidden=options.hidden, device=options.device, random_state=seed)


@dataclass
class TapEvaluation:
    per_seed: list[dict]
    metrics: dict
    model: object  # the seed-0 model
    test: tuple[np.ndarray, np.ndarray]  # seed-0 (y_true, y_pred)
    dim: int
    fit_seconds: list[float] = field(default_factory=list)


def _check_streaming(features: FeatureFile, key: str, options: FitOptions) -> bool:
    """Whether this fit streams from the file (its matrix is over the memory budget); refuses what cannot."""
    dim = features.taps[key].dim
    need, budget = matrix_bytes(int(features.valid.sum()), dim), options.budget_bytes()
    if need <= budget:
        return False
    if options.clf != "linear":
        raise TapsError(f"tap {key}: an in-memory {options.clf} fit of {int(features.valid.sum())} x {dim} needs about "
                        f"{need / 2 ** 20:.0f} MiB, over the budget of {budget / 2 ** 20:.0f} MiB; use --clf linear "
                        f"(streams from the HDF5 file) or raise --memory-budget")
    if options.preprocess != "standard":
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


def evaluate_tap(features: FeatureFile, tap: str, pooling: str, options: FitOptions, protocol: Protocol,
                 seeds: int) -> TapEvaluation:
    """Fit and score one tap over ``seeds`` seeded splits (seed s uses split seed s)."""
    if not features.valid.any():
        raise TapsError(f"every image of {features.path} was skipped as undecodable ({len(features.valid)}); "
                        f"`taps info {features.path}` lists why")
    check_protocol(protocol, features.labels[features.valid], features.classes,
                   None if features.split is None else
                   [s for s, v in zip(features.split, features.valid, strict=True) if v])
    key = features.tap_key(tap, pooling)
    streaming = _check_streaming(features, key, options)
    X = None if streaming else load_matrix(features, tap, pooling)
    y = features.labels
    splits = [make_split(protocol, y, features.split, seed, features.valid) for seed in range(seeds)]
    _check_splits(splits, y, tap, options)
    _check_pca(options, features.taps[key].dim, min(len(train) for train, _ in splits))
    per_seed, model0, test0 = [], None, None
    for seed, (train, test) in enumerate(splits):
        # In memory the estimator sees the tap's rows; streaming, the rows' indices in the file.
        Xtr, Xte = (train[:, None], test[:, None]) if streaming else (X[train], X[test])
        t0 = time.perf_counter()
        selected = selecting_model(features, key, options, seed, streaming).fit(Xtr, y[train])
        seconds = time.perf_counter() - t0
        pred = selected.predict(Xte)  # once: streaming, each pass over the test rows reads the file
        ranks = selected.decision_function(Xte) if len(selected.classes_) > 5 else None  # for top-5
        metrics = score_predictions(y[test], pred, ranks, selected.classes_)
        model = selected.model_.to_array_model() if streaming else selected.model_
        per_seed.append({"seed": seed, "n_train": int(len(train)), "n_test": int(len(test)),
                         "train_digest": split_digest(features.ids, train),
                         "test_digest": split_digest(features.ids, test), "chosen": selected.chosen_,
                         "cv_folds": selected.cv_folds_, "selection": selected.selection_ + (", streaming" if streaming else ""),
                         "cv_accuracy": None if selected.cv_scores_ is None else [float(s) for s in selected.cv_scores_],
                         "fit_seconds": round(seconds, 3), "metrics": metrics})
        if seed == 0:
            model0, test0 = model, (y[test], pred)
    return TapEvaluation(per_seed, summarize(per_seed), model0, test0, features.taps[key].dim,
                         [s["fit_seconds"] for s in per_seed])


def fit_run(features: FeatureFile, tap: str, pooling: str, options: FitOptions, protocol: Protocol, *,
            seeds: int = 1, runs_root: Path | str = "runs", force: bool = False) -> tuple[Path, dict, bool]:
    """Evaluate one tap and write its run folder; returns (folder, results, reused)."""
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, not {seeds}")
    check_output_folder(Path(runs_root), "--out")
    settings = run_settings(features, tap, pooling, options.as_dict(), str(protocol), seeds)
    run_dir = run_dir_for(Path(runs_root), features, settings)
    if not force and (results := reusable(run_dir, settings)) is not None:
        return run_dir, results, True
    ev = evaluate_tap(features, tap, pooling, options, protocol, seeds)
    model = save_model(run_dir, ev.model)
    key = settings["tap"]
    record = features.taps[key]
    results = {
        "settings": settings,
        "features": {**features.settings(), "path": str(features.path.resolve()), "tap": key,
                     "node": record.node, "pooling": record.pooling, "dim": record.dim,
                     "precision": record.precision, "decode": record.decode},
        "classes": features.classes,
        "split_seeds": [s["seed"] for s in ev.per_seed],
        "per_seed": ev.per_seed,
        "chosen": {options.param: [s["chosen"] for s in ev.per_seed]},
        "grid": {options.param: options.grid},
        "fit_seconds": {"mean": float(np.mean(ev.fit_seconds)), "total": float(np.sum(ev.fit_seconds))},
        "metrics": ev.metrics,
        "model": model,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    y_true, y_pred = ev.test
    labels = np.arange(len(features.classes))
    write_per_class(run_dir / "per_class.csv", classification_report(
        y_true, y_pred, labels=labels, target_names=features.classes, output_dict=True, zero_division=0),
        features.classes)
    plot_confusion(confusion_matrix(y_true, y_pred, labels=labels), features.classes, run_dir / "confusion.png",
                   f"{features.attrs['backbone']} {key} {options.clf}: seed 0")
    save_results(run_dir, results)
    return run_dir, results, False
