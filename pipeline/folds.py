"""The cross-validation folds of a fit's training rows, one definition for every CV inside training
(choosing C, weight decay or k; calibrating; choosing taps for ``auto``).

Byte-identical images (one photo filed twice, a dataset merged from two scrapes) stay in one fold,
as the protocol keeps them on one side of the train/test split: a validation image whose copy was
trained on is recognised, not classified, so the CV rewards memorising and picks the weakest
regularisation on offer. Without copies the folds are scikit-learn's ``StratifiedKFold``, exactly
as before copies were looked at.
"""

from __future__ import annotations

import numpy as np

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
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold  # a reused run names its folds only

    n = min(folds, fewest_distinct(y, copies))
    rows = np.zeros(len(y))
    if has_copies(copies):
        return list(StratifiedGroupKFold(n, shuffle=True, random_state=random_state).split(rows, y, copies))
    return list(StratifiedKFold(n, shuffle=True, random_state=random_state).split(rows, y))
