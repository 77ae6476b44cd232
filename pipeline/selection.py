"""Choosing the regularisation by cross-validation, as one estimator that records its scores
(the shape of scikit-learn's ``LogisticRegressionCV``): :class:`SelectedClassifier`."""

from __future__ import annotations

from numbers import Integral

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .heads import CLASSIFIERS, REGULARIZER, canonical, make_classifier, make_head, make_preprocess


def cv_folds(y: np.ndarray, folds: int, n_grid: int) -> int:
    """The folds selection really uses on training labels ``y``: ``folds``, or fewer when the smallest
    class has fewer training images; 1 when the grid has one value (nothing to select).

    Raises ``ValueError`` when a class has fewer than 2 training images: selection is impossible,
    and silently falling back to a grid value nobody chose would claim CV that did not happen.
    """
    if n_grid == 1:
        return 1
    smallest = int(np.bincount(np.unique(y, return_inverse=True)[1]).min())
    if smallest < 2:
        raise ValueError(f"cross-validation needs at least 2 training images in every class, but the smallest "
                         f"class has {smallest}")
    return min(folds, smallest)


def describe_selection(param: str, grid: list[float], folds: int, asked: int) -> str:
    """How the regularisation was chosen, as results.json records and the CLI prints it."""
    if folds == 1:
        return f"fixed {param}={grid[0]:g} (one grid value, no selection)"
    if folds < asked:
        return f"{folds}-fold CV (asked for {asked}; the smallest class has {folds} training images)"
    return f"{folds}-fold CV"


class SelectedClassifier(ClassifierMixin, BaseEstimator):
    """Preprocessing + a head whose C (or weight decay) is chosen from ``grid`` by stratified k-fold
    CV on the data given to :meth:`fit` only, then refit on all of it.

    Fitted attributes: ``chosen_`` (the value), ``cv_folds_`` (the folds really used; 1 for a
    single grid value), ``cv_scores_`` (mean CV accuracy per grid value, ascending grid; None
    without selection), ``selection_`` (a sentence), ``model_`` (the refit Pipeline), ``classes_``.
    Warm starts carry each fold's head along the grid.
    """

    _parameter_constraints: dict = {
        "clf": [StrOptions(set(CLASSIFIERS))],
        "grid": ["array-like"],
        "folds": [Interval(Integral, 2, None, closed="left")],
        "preprocess": [str],
        "solver": [StrOptions({"torch", "sklearn"})],
        "hidden": [Interval(Integral, 0, None, closed="left")],
        "device": [str],
        "random_state": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(self, *, clf: str = "svm", grid=(0.01, 0.1, 1.0), folds: int = 3, preprocess: str = "standard",
                 solver: str = "torch", hidden: int = 0, device: str = "auto", random_state: int = 0):
        self.clf = clf
        self.grid = grid
        self.folds = folds
        self.preprocess = preprocess
        self.solver = solver
        self.hidden = hidden
        self.device = device
        self.random_state = random_state

    def fit(self, X, y):
        self._validate_params()
        grid = sorted(float(v) for v in self.grid)
        param = REGULARIZER[canonical(self.clf)]
        self.cv_folds_ = cv_folds(np.asarray(y), self.folds, len(grid))
        self.cv_scores_ = self._cv_scores(np.asarray(X), np.asarray(y), grid, param) if self.cv_folds_ > 1 else None
        self.chosen_ = grid[int(np.argmax(self.cv_scores_))] if self.cv_scores_ is not None else grid[0]
        self.selection_ = describe_selection(param, grid, self.cv_folds_, self.folds)
        self.model_ = make_classifier(self.clf, self.preprocess, self.solver, self.hidden, self.device,
                                      **{param: self.chosen_}).fit(X, y)
        self.classes_ = self.model_.classes_
        return self

    def _cv_scores(self, X: np.ndarray, y: np.ndarray, grid: list[float], param: str) -> np.ndarray:
        scores = np.zeros(len(grid))
        split = StratifiedKFold(self.cv_folds_, shuffle=True, random_state=self.random_state).split(X, y)
        for tr, va in split:
            steps = make_preprocess(self.preprocess)
            prep = (Pipeline(steps) if steps else FunctionTransformer()).fit(X[tr])
            Xtr, Xva = prep.transform(X[tr]), prep.transform(X[va])
            head = make_head(self.clf, self.solver, self.hidden, self.device)
            if "warm_start" in head.get_params():
                head.set_params(warm_start=True)
            for j, value in enumerate(grid):
                head.set_params(**{param: value}).fit(Xtr, y[tr])
                scores[j] += accuracy_score(y[va], head.predict(Xva)) / self.cv_folds_
        return scores

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.model_.predict(X)

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.model_.decision_function(X)
