"""Stage two beyond memory: train the ``linear`` head by streaming mini-batches from HDF5.

Rows are read one HDF5 chunk at a time through the store
(:meth:`features.store.FeatureFile.iter_rows`: chunk-aligned, contiguous reads) in a
shuffled chunk order, rows inside a chunk are shuffled, and standardisation
uses means and variances from one streaming pass. Memory holds one chunk plus
one mini-batch whatever the matrix size. :class:`StreamedLinear` is an estimator whose X
are row indices of the file, so the weight decay is chosen by the same k-fold CV
(:class:`pipeline.selection.SelectedClassifier`) as in memory; each fold and grid value
costs its own streaming passes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from features.errors import TapsError
from features.store import FeatureFile

from .classifiers import DEFAULT_PREPROCESS
from .heads import TorchLinearHead, _device


def streaming_scaler(features: FeatureFile, key: str, indices: np.ndarray) -> StandardScaler:
    """A fitted StandardScaler from one pass of float64 sums."""
    n, total, squares = 0, None, None
    for _, rows in features.iter_rows(key, indices):
        rows = rows.astype(np.float64)
        total = rows.sum(0) if total is None else total + rows.sum(0)
        squares = (rows ** 2).sum(0) if squares is None else squares + (rows ** 2).sum(0)
        n += len(rows)
    scaler = StandardScaler()
    scaler.mean_ = total / n
    scaler.var_ = np.maximum(squares / n - scaler.mean_ ** 2, 0.0)
    scaler.scale_ = np.where(scaler.var_ > 0, np.sqrt(scaler.var_), 1.0)
    scaler.n_features_in_, scaler.n_samples_seen_ = len(total), n
    return scaler


@dataclass(frozen=True)
class _Stream:
    """Where mini-batches come from and how they are standardized."""

    features: FeatureFile
    key: str
    mean: torch.Tensor
    scale: torch.Tensor
    batch_size: int
    device: torch.device


class StreamedLinear(ClassifierMixin, BaseEstimator):
    """Standardisation + :class:`TorchLinearHead`, trained and applied by streaming rows of
    ``/taps/<key>`` from ``features``; X is a column of row indices into the file."""

    def __init__(self, features: FeatureFile | None = None, *, key: str = "", hidden: int = 0,
                 weight_decay: float = 1e-4, device: str = "auto", random_state: int = 0):
        self.features = features
        self.key = key
        self.hidden = hidden
        self.weight_decay = weight_decay
        self.device = device
        self.random_state = random_state

    def fit(self, X, y):
        rows, y = np.asarray(X, dtype=np.int64).ravel(), np.asarray(y)
        dev = _device(self.device)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise TapsError(f"the training split of tap {self.key} has one class; use a protocol with more classes")
        self.scaler_ = streaming_scaler(self.features, self.key, rows)
        mean, scale = (torch.as_tensor(v, dtype=torch.float32, device=dev) for v in (self.scaler_.mean_, self.scaler_.scale_))
        head = TorchLinearHead(hidden=self.hidden, weight_decay=self.weight_decay, device=self.device,
                               random_state=self.random_state)
        head.classes_ = self.classes_
        fit_pos, val_pos = head.holdout(y_index)
        stream, epochs = _Stream(self.features, self.key, mean, scale, head.batch_size, dev), itertools.count()
        train_epoch = lambda: _minibatches(stream, rows[fit_pos], y_index[fit_pos], self.random_state + next(epochs))  # noqa: E731
        validation = (lambda: _minibatches(stream, rows[val_pos], y_index[val_pos], None)) if len(val_pos) else None  # noqa: E731
        self.head_ = head.train_batches(len(self.scaler_.mean_), train_epoch, validation, dev)
        return self

    def to_array_model(self) -> Pipeline:
        """The fitted model for feature vectors (what predict on new images uses)."""
        check_is_fitted(self)
        return Pipeline([(DEFAULT_PREPROCESS, self.scaler_), ("head", self.head_)])

    def _stream(self, X, method: str) -> np.ndarray:
        rows, model, out = np.asarray(X, dtype=np.int64).ravel(), self.to_array_model(), None
        for local, chunk in self.features.iter_rows(self.key, rows):
            values = getattr(model, method)(chunk)
            if out is None:
                out = np.empty((len(rows),) + values.shape[1:], dtype=values.dtype)
            out[local] = values
        return out

    def predict(self, X) -> np.ndarray:
        return self._stream(X, "predict")

    def decision_function(self, X) -> np.ndarray:
        return self._stream(X, "decision_function")


def _minibatches(stream: _Stream, indices: np.ndarray, targets: np.ndarray, seed: int | None):
    """Standardized (x, y) mini-batches of the rows ``indices``; shuffled chunks and rows when seeded."""
    rng = np.random.default_rng(seed) if seed is not None else None
    carry_x, carry_y, pending = [], [], 0
    chunk_seed = None if rng is None else int(rng.integers(1 << 31))
    mean, scale, batch_size, device = stream.mean, stream.scale, stream.batch_size, stream.device
    for local, rows in stream.features.iter_rows(stream.key, indices, chunk_seed):
        if rng is not None:
            perm = rng.permutation(len(local))
            local, rows = local[perm], rows[perm]
        carry_x.append((torch.as_tensor(rows, dtype=torch.float32, device=device) - mean) / scale)
        carry_y.append(torch.as_tensor(targets[local], dtype=torch.long, device=device))
        pending += len(local)
        while pending >= batch_size:
            xs, ys = torch.cat(carry_x), torch.cat(carry_y)
            yield xs[:batch_size], ys[:batch_size]
            carry_x, carry_y, pending = [xs[batch_size:]], [ys[batch_size:]], pending - batch_size
    if pending:
        yield torch.cat(carry_x), torch.cat(carry_y)
