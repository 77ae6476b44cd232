"""Fit a classifier on one tap of a feature file: choose regularisation by CV, score, save a run folder.

A run folder holds ``results.json`` (settings, per-seed splits and scores,
chosen C, fit times, the feature file's fingerprint, mean and std of every
metric), ``model.joblib`` (the seed-0 model, its SHA-256 in the results),
``confusion.png`` and ``per_class.csv``. Identical settings reuse the folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import joblib
import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    top_k_accuracy_score,
)
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from features.errors import TapsError, UsageError
from features.store import FeatureFile, file_sha256

from .heads import DEFAULT_GRID, REGULARIZER, canonical, make_classifier, make_head, make_preprocess
from .protocols import Protocol, check_protocol, make_split, split_digest
from .streaming import fit_linear_streaming, matrix_bytes, predict_streaming

METRICS = ("accuracy", "mean_per_class_accuracy", "macro_f1", "top5_accuracy")
RESULTS = "results.json"
MODEL = "model.joblib"


@dataclass
class FitOptions:
    """Everything that defines a fit besides the data; equal options + equal file = reusable run."""

    clf: str = "svm"
    preprocess: str = "standard"
    grid: list[float] | None = None
    folds: int = 3
    solver: str = "torch"
    hidden: int = 0
    device: str = "auto"
    memory_budget_mb: float | None = None  # above it, linear streams from HDF5 and svm/logreg refuse

    def __post_init__(self):
        self.clf = canonical(self.clf)
        make_preprocess(self.preprocess)  # validate early
        if self.folds < 2:
            raise UsageError(f"--folds must be at least 2, not {self.folds}")
        self.grid = sorted(float(v) for v in (self.grid or DEFAULT_GRID[self.clf]))
        if not all(np.isfinite(v) and v > 0 for v in self.grid):
            raise UsageError(f"--grid values must be positive numbers, not {', '.join(f'{v:g}' for v in self.grid)}")
        if self.hidden < 0:
            raise UsageError(f"--hidden must be 0 (a linear head) or more, not {self.hidden}")

    @property
    def param(self) -> str:
        return REGULARIZER[self.clf]

    def as_dict(self) -> dict:
        return {"clf": self.clf, "preprocess": self.preprocess, "grid": self.grid, "folds": self.folds,
                "solver": self.solver, "hidden": self.hidden, "param": self.param,
                "memory_budget_mb": self.memory_budget_mb}

    def budget_bytes(self) -> int:
        from .streaming import available_memory_bytes

        return int(self.memory_budget_mb * 2 ** 20) if self.memory_budget_mb else available_memory_bytes() // 2


def load_matrix(features: FeatureFile, tap: str, pooling: str) -> np.ndarray:
    """The tap's matrix, refusing NaN or inf with the tap name and count."""
    X = features.read(tap, pooling)
    bad = ~np.isfinite(X).all(axis=1) & features.valid
    if bad.any():
        raise TapsError(f"tap {tap} in {features.path} has {int(bad.sum())} rows with NaN or inf; "
                        f"re-extract with --precision fp32 --force")
    return X


def _preprocessor(spec: str):
    steps = make_preprocess(spec)
    return Pipeline(steps) if steps else FunctionTransformer()


def cv_folds(options: FitOptions, y: np.ndarray) -> int:
    """The folds that selection will really use on training labels ``y``: ``--folds``, or fewer when the
    smallest class has fewer training images; 1 when the grid has one value (nothing to select).

    Stratified k-fold needs k images of every class. Fewer than 2 makes selection impossible: that
    is refused (one line) rather than silently falling back to a grid value nobody chose.
    """
    if len(options.grid) == 1:
        return 1
    counts = np.bincount(np.unique(y, return_inverse=True)[1])
    folds = min(options.folds, int(counts.min()))
    if folds < 2:
        raise TapsError(f"choosing {options.param} by cross-validation needs at least 2 training images in every "
                        f"class, but the smallest class has {int(counts.min())}; use a protocol with more training "
                        f"images per class, or pass a single --grid value to fit without selection")
    return folds


def describe_selection(options: FitOptions, folds: int) -> str:
    """How the regularisation was chosen, as recorded in results.json and printed."""
    if folds == 1:
        return f"fixed {options.param}={options.grid[0]:g} (one grid value, no selection)"
    if folds < options.folds:
        return f"{folds}-fold CV (asked for {options.folds}; the smallest class has {folds} training images)"
    return f"{folds}-fold CV"


def cv_scores(options: FitOptions, X: np.ndarray, y: np.ndarray, seed: int, folds: int) -> np.ndarray | None:
    """Mean CV accuracy for each grid value (ascending); warm starts carry each fold along the grid."""
    if folds < 2:
        return None
    scores = np.zeros(len(options.grid))
    for tr, va in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        prep = _preprocessor(options.preprocess).fit(X[tr])
        Xtr, Xva = prep.transform(X[tr]), prep.transform(X[va])
        head = make_head(options.clf, options.solver, options.hidden, options.device)
        if "warm_start" in head.get_params():
            head.set_params(warm_start=True)
        for j, value in enumerate(options.grid):
            head.set_params(**{options.param: value}).fit(Xtr, y[tr])
            scores[j] += accuracy_score(y[va], head.predict(Xva)) / folds
    return scores


def fit_selected(options: FitOptions, X: np.ndarray, y: np.ndarray, seed: int):
    """CV over the grid on the training data only, then refit on all of it; returns (model, value, scores).

    Raises :class:`TapsError` when the training data cannot be cross-validated (see :func:`cv_folds`).
    """
    scores = cv_scores(options, X, y, seed, cv_folds(options, y))
    value = options.grid[int(np.argmax(scores))] if scores is not None else options.grid[0]
    model = make_classifier(options.clf, options.preprocess, options.solver, options.hidden, options.device,
                            **{options.param: value})
    return model.fit(X, y), value, scores


def score(model, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    scores = model.decision_function(X) if len(model.classes_) > 5 else None
    return score_predictions(y, model.predict(X), scores, model.classes_)


def score_predictions(y: np.ndarray, pred: np.ndarray, scores: np.ndarray | None, classes) -> dict[str, float]:
    out = {"accuracy": accuracy_score(y, pred), "mean_per_class_accuracy": balanced_accuracy_score(y, pred),
           "macro_f1": f1_score(y, pred, average="macro")}
    if scores is not None and len(classes) > 5 and set(np.unique(y)) <= set(classes):
        out["top5_accuracy"] = top_k_accuracy_score(y, scores, k=5, labels=classes)
    return {k: float(v) for k, v in out.items()}


def summarize(per_seed: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and std over seeds of each metric present in every seed."""
    names = [m for m in METRICS if all(m in s["metrics"] for s in per_seed)]
    return {m: {"mean": float(np.mean([s["metrics"][m] for s in per_seed])),
                "std": float(np.std([s["metrics"][m] for s in per_seed]))} for m in names}


@dataclass
class TapEvaluation:
    per_seed: list[dict]
    metrics: dict
    model: object  # the seed-0 model
    test: tuple[np.ndarray, np.ndarray]  # seed-0 (y_true, y_pred)
    dim: int
    fit_seconds: list[float] = field(default_factory=list)


def evaluate_tap(features: FeatureFile, tap: str, pooling: str, options: FitOptions, protocol: Protocol,
                 seeds: int) -> TapEvaluation:
    """Fit and score one tap over ``seeds`` seeded splits (seed s uses split seed s)."""
    check_protocol(protocol, features.labels[features.valid], features.classes,
                   None if features.split is None else [s for s, v in zip(features.split, features.valid, strict=True) if v])
    key = features.tap_key(tap, pooling)
    dim = int(features.taps[key]["dim"])
    need, budget = matrix_bytes(int(features.valid.sum()), dim), options.budget_bytes()
    streaming = need > budget
    if streaming and options.clf != "linear":
        raise TapsError(f"tap {key}: an in-memory {options.clf} fit of {int(features.valid.sum())} x {dim} needs about "
                        f"{need / 2 ** 20:.0f} MiB, over the budget of {budget / 2 ** 20:.0f} MiB; use --clf linear "
                        f"(streams from the HDF5 file) or raise --memory-budget")
    if streaming and options.preprocess != "standard":
        raise TapsError(f"streaming fits (tap {key} is over the memory budget) standardize only; "
                        f"drop --preprocess {options.preprocess}")
    if streaming:
        features.verify(key)
    X = None if streaming else load_matrix(features, tap, pooling)
    y = features.labels
    splits = [make_split(protocol, y, features.split, seed, features.valid) for seed in range(seeds)]
    folds = []  # checked for every seed before the first fit
    for train, _ in splits:
        if len(np.unique(y[train])) < 2:
            raise TapsError(f"the training split of tap {tap} has one class ({len(train)} samples); "
                            f"use a protocol with more classes in training")
        folds.append(None if streaming else cv_folds(options, y[train]))
    per_seed, model0, test0 = [], None, None
    for seed, (train, test) in enumerate(splits):
        t0 = time.perf_counter()
        if streaming:
            model, value, cv = fit_linear_streaming(features, key, train, grid=options.grid, seed=seed,
                                                    hidden=options.hidden, device=options.device)
            seconds = time.perf_counter() - t0
            pred, scores = predict_streaming(model, features, key, test)
            metrics = score_predictions(y[test], pred, scores if len(model.classes_) > 5 else None, model.classes_)
        else:
            model, value, cv = fit_selected(options, X[train], y[train], seed)
            seconds = time.perf_counter() - t0
            pred = model.predict(X[test])
            metrics = score(model, X[test], y[test])
        per_seed.append({"seed": seed, "n_train": int(len(train)), "n_test": int(len(test)),
                         "train_digest": split_digest(features.ids, train), "test_digest": split_digest(features.ids, test),
                         "chosen": value, "cv_folds": folds[seed],
                         "selection": "holdout, streaming" if streaming else describe_selection(options, folds[seed]),
                         "cv_accuracy" if not streaming else "holdout_score": None if cv is None else [float(s) for s in cv],
                         "fit_seconds": round(seconds, 3), "metrics": metrics})
        if seed == 0:
            model0, test0 = model, (y[test], pred)
    return TapEvaluation(per_seed, summarize(per_seed), model0, test0, dim, [s["fit_seconds"] for s in per_seed])


def run_settings(features: FeatureFile, tap: str, pooling: str, options: FitOptions, protocol: Protocol,
                 seeds: int) -> dict:
    return {"features": str(features.path.resolve()), "features_fingerprint": features.fingerprint(),
            "tap": features.tap_key(tap, pooling), "pooling": pooling, "protocol": str(protocol), "seeds": seeds,
            **options.as_dict()}


def settings_digest(settings: dict) -> str:
    """Short stable id of a settings dict: equal settings, equal folder names."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def run_dir_for(runs_root: Path, features: FeatureFile, settings: dict) -> Path:
    name = f"{features.attrs['backbone']}__{settings['tap']}__{settings['clf']}__{settings_digest(settings)}"
    return Path(runs_root) / str(features.attrs["dataset"]) / name


def load_results(run_dir: Path) -> dict:
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise UsageError(f"{run_dir} is not a run folder (no {RESULTS}); pass the folder `taps fit` printed")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TapsError(f"{path} is not valid JSON ({exc}); rerun `taps fit --force`") from None


def load_model(run_dir: Path, results: dict):
    """The run's model, after checking its SHA-256 against the run record (joblib files run code on load)."""
    path = Path(run_dir) / results["model"]["file"]
    if not path.is_file():
        raise TapsError(f"model file {path} is missing; rerun `taps fit --force`")
    digest = file_sha256(path)
    if digest != results["model"]["sha256"]:
        raise TapsError(f"model file {path} does not match the SHA-256 in its {RESULTS}; refusing to load it "
                        f"(rerun `taps fit --force` if you changed it yourself)")
    return joblib.load(path)


def fit_run(features: FeatureFile, tap: str, pooling: str, options: FitOptions, protocol: Protocol, *,
            seeds: int = 1, runs_root: Path | str = "runs", force: bool = False) -> tuple[Path, dict, bool]:
    """Evaluate one tap and write its run folder; returns (folder, results, reused)."""
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, not {seeds}")
    settings = run_settings(features, tap, pooling, options, protocol, seeds)
    run_dir = run_dir_for(Path(runs_root), features, settings)
    if not force and (run_dir / RESULTS).is_file():
        try:
            results = load_results(run_dir)
            if results.get("settings") == settings and file_sha256(run_dir / MODEL) == results["model"]["sha256"]:
                return run_dir, results, True
        except (TapsError, OSError, KeyError):
            pass  # unreadable or stale: recompute
    ev = evaluate_tap(features, tap, pooling, options, protocol, seeds)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = run_dir / MODEL
    joblib.dump(ev.model, model_path)
    key = settings["tap"]
    y_true, y_pred = ev.test
    labels = np.arange(len(features.classes))
    report = classification_report(y_true, y_pred, labels=labels, target_names=features.classes,
                                   output_dict=True, zero_division=0)
    results = {
        "settings": settings,
        "features": {**features.settings(), "path": str(features.path.resolve()), "tap": key,
                     "node": features.taps[key]["node"], "pooling": features.taps[key]["pooling"],
                     "dim": ev.dim, "precision": features.taps[key]["precision"],
                     "decode": features.taps[key].get("decode", "pil")},
        "classes": features.classes,
        "split_seeds": [s["seed"] for s in ev.per_seed],
        "per_seed": ev.per_seed,
        "chosen": {options.param: [s["chosen"] for s in ev.per_seed]},
        "grid": {options.param: options.grid},
        "fit_seconds": {"mean": float(np.mean(ev.fit_seconds)), "total": float(np.sum(ev.fit_seconds))},
        "metrics": ev.metrics,
        "model": {"file": MODEL, "sha256": file_sha256(model_path), "seed": 0},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_per_class(run_dir / "per_class.csv", report, features.classes)
    plot_confusion(confusion_matrix(y_true, y_pred, labels=labels), features.classes, run_dir / "confusion.png",
                   f"{features.attrs['backbone']} {key} {options.clf}: seed 0")
    tmp = run_dir / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(run_dir / RESULTS)
    return run_dir, results, False


def _write_per_class(path: Path, report: dict, classes: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", "precision", "recall", "f1", "support"])
        for c in classes:
            r = report[c]
            w.writerow([c, f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1-score']:.4f}", int(r["support"])])


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.18 * len(classes), 20)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 40:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
