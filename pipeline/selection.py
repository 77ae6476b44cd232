"""Choosing the regularisation by cross-validation, as one estimator that records its scores
(the shape of scikit-learn's ``LogisticRegressionCV``): :class:`SelectedClassifier`; and the folds
of every CV inside a fit's training rows (:func:`training_folds`: choosing C, weight decay or k,
calibrating, choosing taps for ``auto``).

Byte-identical images (one photo filed twice, a dataset merged from two scrapes) stay in one fold,
as the protocol keeps them on one side of the train/test split: a validation image whose copy was
trained on is recognised, not classified, so the CV rewards memorising and picks the weakest
regularisation on offer. Without copies the folds are scikit-learn's ``StratifiedKFold``, exactly
as before copies were looked at.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.metrics import accuracy_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.utils._param_validation import HasMethods, Interval
from sklearn.utils.validation import check_is_fitted

from .classifiers import make_classifier
from .fusion import Groups, fusion_transformer
from .options import FitOptions

Fold = tuple[np.ndarray, np.ndarray]


def has_copies(copies: np.ndarray | None) -> bool:
    """Whether ``copies`` (per row, its group of byte-identical images) puts two rows in one group."""
    return copies is not None and len(np.unique(copies)) < len(copies)


def fewest_distinct(y: np.ndarray, copies: np.ndarray | None = None) -> int:
    """The fewest distinct images of any class in ``y`` (the copies of one image count once)."""
    _, label = np.unique(y, return_inverse=True)
    if not has_copies(copies):
        return int(np.bincount(label).min())
    _, group = np.unique(copies, return_inverse=True)
    pairs = np.unique(np.stack([label, group]), axis=1)
    return int(np.bincount(pairs[0]).min())


def training_folds(y: np.ndarray, folds: int, *, random_state: int, copies: np.ndarray | None = None) -> list[Fold]:
    """``folds`` stratified, shuffled folds of labels ``y`` (fewer when a class has fewer distinct images;
    at least 2 distinct images per class needed), the copies of an image in one fold."""
    n = min(folds, fewest_distinct(y, copies))
    rows = np.zeros(len(y))
    if has_copies(copies):
        return list(StratifiedGroupKFold(n, shuffle=True, random_state=random_state).split(rows, y, copies))
    return list(StratifiedKFold(n, shuffle=True, random_state=random_state).split(rows, y))


def cv_folds(y: np.ndarray, folds: int, n_grid: int, copies: np.ndarray | None = None) -> int:
    """The folds selection really uses on training labels ``y``: ``folds``, or fewer when the smallest
    class has fewer distinct training images (``copies``: per row, its group of byte-identical
    images, which count once); 1 when the grid has one value (nothing to select).

    Raises ``ValueError`` when a class has fewer than 2 distinct training images: selection is
    impossible, and silently falling back to a grid value nobody chose would claim CV that did not happen.
    """
    if n_grid == 1:
        return 1
    smallest = fewest_distinct(y, copies)
    if smallest < 2:
        distinct = "distinct " if has_copies(copies) else ""
        raise ValueError(f"cross-validation needs at least 2 {distinct}training images in every class, but the "
                         f"smallest class has {smallest}")
    return min(folds, smallest)


def check_folds(trains: list[tuple[np.ndarray, np.ndarray | None]], folds: int, n_grid: int) -> None:
    """Raise ``ValueError`` (see :func:`cv_folds`) unless every training split (its labels and
    copies) can be cross-validated."""
    for y, copies in trains:
        cv_folds(y, folds, n_grid, copies)


def describe_selection(param: str, grid: list[float], folds: int, asked: int, copies: bool = False) -> str:
    """How the regularisation was chosen, as results.json records and the CLI prints it (``copies``:
    byte-identical training images were kept in one fold)."""
    if folds == 1:
        return f"fixed {param}={grid[0]:g} (one grid value, no selection)"
    notes = [f"asked for {asked}; the smallest class has {folds} {'distinct ' if copies else ''}training images"
             ] if folds < asked else []
    notes += ["copies of an image in one fold"] if copies else []
    return f"{folds}-fold CV" + (f" ({'; '.join(notes)})" if notes else "")


class SelectedClassifier(ClassifierMixin, BaseEstimator):
    """An estimator whose ``param`` (C or weight decay) is chosen from ``grid`` by stratified k-fold
    CV (:func:`training_folds`: an image's byte-identical copies in one fold) on the data given to
    :meth:`fit` only, then refit on all of it (the shape of scikit-learn's ``LogisticRegressionCV``,
    for any of taps' heads).

    ``estimator`` is the unfitted model: a Pipeline of preprocessing and a head (in memory; the
    preprocessing is fitted once per fold and the head warm-started along the grid), or the
    streaming head of :mod:`pipeline.streaming`, whose X are row indices of a feature file. Both
    paths select the same way. Fitted attributes: ``chosen_``, ``cv_folds_`` (the folds really
    used; 1 for a single grid value), ``cv_scores_`` (mean CV accuracy per grid value, ascending;
    None without selection), ``selection_`` (a sentence), ``model_`` (the refit model), ``classes_``.
    """

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["fit", "predict"])],
        "param": [str],
        "grid": ["array-like"],
        "folds": [Interval(Integral, 2, None, closed="left")],
        "random_state": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(self, estimator=None, *, param: str = "C", grid=(0.01, 0.1, 1.0), folds: int = 3,
                 random_state: int = 0):
        self.estimator = estimator
        self.param = param
        self.grid = grid
        self.folds = folds
        self.random_state = random_state

    def fit(self, X, y, copies=None):
        """Choose ``param`` by CV on ``X, y`` and refit. ``copies`` (per row, its group of
        byte-identical images) keeps an image's copies in one fold."""
        self._validate_params()
        grid = sorted(float(v) for v in self.grid)
        y = np.asarray(y)
        copies = None if copies is None else np.asarray(copies)
        self.cv_folds_ = cv_folds(y, self.folds, len(grid), copies)
        self.cv_scores_ = self._cv_scores(X, y, grid, copies) if self.cv_folds_ > 1 else None
        self.chosen_ = grid[int(np.argmax(self.cv_scores_))] if self.cv_scores_ is not None else grid[0]
        self.selection_ = describe_selection(self.param, grid, self.cv_folds_, self.folds,
                                             has_copies(copies) and self.cv_folds_ > 1)
        self.model_ = _with(clone(self.estimator), self.param, self.chosen_).fit(X, y)
        # A head that caps its parameter on the data it saw (k-NN's k at the training rows) records
        # the value it used; that is the value chosen.
        effective = getattr(self.model_.steps[-1][1] if isinstance(self.model_, Pipeline) else self.model_,
                            f"{self.param}_", None)
        if effective is not None:
            self.chosen_ = float(effective)
        self.classes_ = self.model_.classes_
        return self

    def _cv_scores(self, X, y: np.ndarray, grid: list[float], copies: np.ndarray | None) -> np.ndarray:
        scores = np.zeros(len(grid))
        for tr, va in training_folds(y, self.cv_folds_, random_state=self.random_state, copies=copies):
            model, Xtr, Xva = clone(self.estimator), X[tr], X[va]
            head = model
            if isinstance(model, Pipeline):  # preprocessing fitted once per fold, the head tuned
                if len(model.steps) > 1:
                    prep = model[:-1].fit(Xtr)
                    Xtr, Xva = prep.transform(Xtr), prep.transform(Xva)
                head = model.steps[-1][1]
            if "warm_start" in head.get_params():
                head.set_params(warm_start=True)
            for j, value in enumerate(grid):
                _with(head, self.param, value).fit(Xtr, y[tr])
                scores[j] += accuracy_score(y[va], head.predict(Xva)) / self.cv_folds_
        return scores

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.model_.predict(X)

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.model_.decision_function(X)


def _with(model, param: str, value: float):
    """``model`` with its head's ``param`` set (the head is a Pipeline's last step)."""
    head = model.steps[-1][1] if isinstance(model, Pipeline) else model
    head.set_params(**{param: value})
    return model


def selector(options: FitOptions, *, random_state: int = 0, groups: Groups | None = None) -> SelectedClassifier:
    """The selecting estimator of an in-memory fit with ``options``: preprocessing + head, C or weight
    decay by CV. With ``groups`` (a fused matrix's taps) the preprocessing runs on each tap's columns apart."""
    model = make_classifier(options.clf, options.preprocess, options.solver, options.hidden, options.device,
                            fuse=None if groups is None else fusion_transformer(groups, options.preprocess))
    return SelectedClassifier(model, param=options.param, grid=options.grid, folds=options.folds,
                              random_state=random_state)
