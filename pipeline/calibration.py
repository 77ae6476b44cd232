"""Calibrated probabilities (``fit --calibrate``): the selected model refit inside scikit-learn's
``CalibratedClassifierCV`` with ``ensemble=False``, so the calibration map is fitted on
out-of-fold scores of the training rows (never on test rows) and the model itself on all of them.

* ``temperature`` (logreg, linear, knn): one temperature on the logits, which keeps every argmax,
  so accuracy does not move.
* ``sigmoid`` (svm, whose scores are not probabilities): Platt scaling per class, normalised.

:func:`expected_calibration_error` is the usual top-label ECE (15 equal-width bins): the mean gap,
weighted by bin size, between the confidence of the predicted class and how often it is right.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV

from .classifiers import get_classifier
from .selection import training_folds

BINS = 15


def calibration_method(clf: str) -> str:
    """Platt scaling for classifiers without probabilities (svm), else a temperature."""
    return "temperature" if get_classifier(clf).probabilities else "sigmoid"


def calibrate(model, X: np.ndarray, y: np.ndarray, *, method: str, folds: int = 3, random_state: int = 0,
              copies: np.ndarray | None = None):
    """``model`` (unfitted or fitted: it is cloned) refit on ``X, y`` with a calibration map fitted on
    its out-of-fold scores over ``folds`` stratified folds (fewer when a class is smaller; ``copies``:
    an image's byte-identical copies in one fold, else its out-of-fold score is a memorised one)."""
    cv = training_folds(y, folds, random_state=random_state, copies=copies)
    return CalibratedClassifierCV(clone(model), method=method, cv=cv, ensemble=False).fit(X, y)


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, classes: np.ndarray, bins: int = BINS) -> float:
    """Top-label ECE of ``proba`` (one column per entry of ``classes``) against labels ``y``."""
    confidence = proba.max(axis=1)
    correct = np.asarray(classes)[proba.argmax(axis=1)] == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            gap += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(gap)
