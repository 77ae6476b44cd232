"""Stage two beyond memory: train the ``linear`` head by streaming mini-batches from HDF5.

Rows are read one HDF5 chunk at a time through the store
(:meth:`features.store.FeatureFile.iter_rows`: chunk-aligned, contiguous reads) in a
shuffled chunk order, rows inside a chunk are shuffled, and standardisation
uses means and variances from one streaming pass. Memory holds one chunk plus
one mini-batch whatever the matrix size. Weight decay is chosen on the held-out
part of the training set that early stopping uses (no k-fold CV: each fold
would be a full streaming pass per grid value).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from features.errors import TapsError
from features.store import FeatureFile

from .heads import TorchLinearHead, _device


def matrix_bytes(n_rows: int, dim: int) -> int:
    """Peak bytes of an in-memory fit: the float32 matrix, its standardized copy and the solver's copy."""
    return 3 * 4 * n_rows * dim


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


def fit_linear_streaming(features: FeatureFile, key: str, train: np.ndarray, *, grid: list[float], seed: int,
                         hidden: int = 0, device: str = "auto"):
    """Pipeline(StandardScaler, TorchLinearHead) trained from the file; returns (model, chosen weight decay, scores)."""
    dev = _device(device)
    classes, y_index = np.unique(features.labels[train], return_inverse=True)
    if len(classes) < 2:
        raise TapsError(f"the training split of tap {key} has one class; use a protocol with more classes")
    scaler = streaming_scaler(features, key, train)
    mean, scale = (torch.as_tensor(v, dtype=torch.float32, device=dev) for v in (scaler.mean_, scaler.scale_))
    best = (np.inf, None, None)
    scores = []
    for value in grid:
        head = TorchLinearHead(hidden=hidden, weight_decay=value, device=device, random_state=seed)
        head.classes_ = classes
        fit_pos, val_pos = head.holdout(y_index)
        epochs = itertools.count()
        stream = _Stream(features, key, mean, scale, head.batch_size, dev)
        # Default arguments bind this grid value's split and counters (each epoch reshuffles with a new seed).
        train_epoch = lambda p=fit_pos, e=epochs, s=stream: _minibatches(s, train[p], y_index[p], seed + next(e))  # noqa: E731
        validation = (lambda p=val_pos, s=stream: _minibatches(s, train[p], y_index[p], None)) if len(val_pos) else None  # noqa: E731
        head.train_batches(len(scaler.mean_), train_epoch, validation, dev)
        loss = head.validation_loss_ if head.validation_loss_ is not None else 0.0
        scores.append(-loss)
        if loss < best[0]:
            best = (loss, value, head)
    model = Pipeline([("standard", scaler), ("head", best[2])])
    return model, best[1], scores


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


def predict_streaming(model, features: FeatureFile, key: str, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels, decision scores) for ``indices``, chunk by chunk, in the order of ``indices``."""
    preds = np.empty(len(indices), dtype=model.classes_.dtype)
    scores = None
    for local, rows in features.iter_rows(key, indices):
        s = model.decision_function(rows)
        if scores is None:
            scores = np.empty((len(indices),) + s.shape[1:], dtype=np.float64)
        scores[local] = s
        preds[local] = model.predict(rows)
    return preds, scores
