"""Classifiers on cached embeddings, as scikit-learn estimators.

``svm`` and ``logreg`` minimise the objectives of scikit-learn's ``LinearSVC``
(one-vs-rest squared hinge, L2; liblinear also penalises the intercept, ``svm``
does not) and ``LogisticRegression`` (multinomial cross-entropy, L2, unpenalised
intercept), but with full-batch
L-BFGS in torch: on 3,000 x 1,280 standardized features that is seconds, not
the minute and a half liblinear needs for one SVM fit, and a warm start makes
each further grid value cheaper still. ``solver="sklearn"`` runs the reference
implementations instead. ``linear`` is a small torch head trained with
mini-batches, weight decay and early stopping.
"""

from __future__ import annotations

import copy
from numbers import Integral, Real
from typing import TYPE_CHECKING

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.svm import LinearSVC
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .classifiers import DEFAULT_SOLVER, REFERENCE_SOLVER, SOLVERS

if TYPE_CHECKING:
    import torch

# torch is imported by the methods that compute with it: a fit with scikit-learn's solver
# (--solver sklearn) never pays for importing it.


def _device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)




class _LBFGSLinear(ClassifierMixin, BaseEstimator):
    """Shared machinery: L2-regularised linear model fitted by full-batch L-BFGS."""

    _parameter_constraints: dict = {
        "C": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "warm_start": ["boolean"],
        "solver": [StrOptions(set(SOLVERS))],
        "device": [str],
    }

    def __init__(self, *, C: float = 1.0, max_iter: int = 300, tol: float = 1e-4, warm_start: bool = False,
                 solver: str = DEFAULT_SOLVER, device: str = "auto"):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start
        self.solver = solver
        self.device = device

    # subclasses: per-sample loss summed over the batch, given scores and encoded targets
    def _loss(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _target(self, y_index: np.ndarray, n_out: int, device) -> torch.Tensor:
        raise NotImplementedError

    def _reference(self):
        raise NotImplementedError

    def _n_outputs(self, n_classes: int) -> int:
        raise NotImplementedError

    def fit(self, X, y):
        self._validate_params()  # scikit-learn's InvalidParameterError (a ValueError) names the parameter
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"the training data has only one class ({self.classes_[0]!r}); need at least 2 classes")
        if self.solver == REFERENCE_SOLVER:
            ref = self._reference().fit(X, y_index)
            self.coef_ = ref.coef_.astype(np.float64)
            self.intercept_ = np.atleast_1d(ref.intercept_).astype(np.float64)
            self.n_iter_ = int(np.max(ref.n_iter_))
            return self
        import torch

        dev = _device(self.device)
        Xt = torch.tensor(X, dtype=torch.float32, device=dev)
        n, d = Xt.shape
        k = self._n_outputs(len(self.classes_))
        target = self._target(y_index, k, dev)
        warm = self.warm_start and getattr(self, "coef_", None) is not None and self.coef_.shape == (k, d)
        W = torch.tensor(self.coef_.T if warm else np.zeros((d, k)), dtype=torch.float32, device=dev, requires_grad=True)
        b = torch.tensor(self.intercept_ if warm else np.zeros(k), dtype=torch.float32, device=dev, requires_grad=True)
        # sum-loss objective divided by n: same minimiser as scikit-learn's, better scaled.
        reg = 0.5 / (self.C * n)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=self.max_iter, tolerance_grad=self.tol,
                                tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = self._loss(Xt @ W + b, target) / n + reg * (W * W).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.n_iter_ = int(opt.state[opt._params[0]].get("n_iter", 0))
        self.coef_ = W.detach().T.cpu().double().numpy()
        self.intercept_ = b.detach().cpu().double().numpy()
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        index = (scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)
        return self.classes_[index]


class LinearSVM(_LBFGSLinear):
    """One-vs-rest linear SVM with squared hinge loss (LinearSVC's default objective)."""

    def _n_outputs(self, n_classes: int) -> int:
        return 1 if n_classes == 2 else n_classes

    def _target(self, y_index, n_out, device):
        import torch

        if n_out == 1:
            return torch.as_tensor(np.where(y_index == 1, 1.0, -1.0)[:, None], dtype=torch.float32, device=device)
        t = -np.ones((len(y_index), n_out), np.float32)
        t[np.arange(len(y_index)), y_index] = 1.0
        return torch.as_tensor(t, device=device)

    def _loss(self, scores, target):
        import torch.nn.functional as F

        return F.relu(1.0 - target * scores).pow(2).sum()

    def _reference(self):
        return LinearSVC(C=self.C, max_iter=max(self.max_iter, 1000), tol=1e-4, dual="auto")


class SoftmaxRegression(_LBFGSLinear):
    """Multinomial logistic regression (LogisticRegression's lbfgs objective)."""

    def _n_outputs(self, n_classes: int) -> int:
        return n_classes

    def _target(self, y_index, n_out, device):
        import torch

        return torch.as_tensor(y_index, dtype=torch.long, device=device)

    def _loss(self, scores, target):
        import torch.nn.functional as F

        return F.cross_entropy(scores, target, reduction="sum")

    def _reference(self):
        return LogisticRegression(C=self.C, max_iter=max(self.max_iter, 1000))

    def decision_function(self, X) -> np.ndarray:
        scores = super().decision_function(X)
        return scores[:, 1] - scores[:, 0] if scores.ndim == 2 and scores.shape[1] == 2 else scores

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        scores = X @ self.coef_.T + self.intercept_
        scores -= scores.max(axis=1, keepdims=True)
        p = np.exp(scores)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        index = self.predict_proba(X).argmax(axis=1)
        return self.classes_[index]


class _ScoredClassifier(ClassifierMixin):
    """``decision_function`` and ``predict`` from ``_class_scores(X)``, one column per class: for two
    classes the positive one's margin, as scikit-learn expects, and the best-scoring class."""

    def decision_function(self, X) -> np.ndarray:
        scores = self._class_scores(X)
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    def predict(self, X) -> np.ndarray:
        best = self._class_scores(X).argmax(axis=1)  # first: an unfitted estimator says so there
        return self.classes_[best]


class TorchLinearHead(_ScoredClassifier, BaseEstimator):
    """A linear (or one-hidden-layer) softmax head trained with AdamW and early stopping."""

    _parameter_constraints: dict = {
        "hidden": [Interval(Integral, 0, None, closed="left")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "patience": [Interval(Integral, 1, None, closed="left")],
        "device": [str],
        "random_state": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(self, *, hidden: int = 0, weight_decay: float = 1e-4, lr: float = 1e-3, max_epochs: int = 200,
                 batch_size: int = 256, validation_fraction: float = 0.1, patience: int = 10,
                 device: str = "auto", random_state: int = 0):
        self.hidden = hidden
        self.weight_decay = weight_decay
        self.lr = lr
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.device = device
        self.random_state = random_state

    def _net(self, d: int, k: int) -> torch.nn.Module:
        import torch

        if self.hidden:
            return torch.nn.Sequential(torch.nn.Linear(d, self.hidden), torch.nn.ReLU(), torch.nn.Linear(self.hidden, k))
        return torch.nn.Linear(d, k)

    def holdout(self, y_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) positions for early stopping: stratified when every class can spare one."""
        idx = np.arange(len(y_index))
        if not (self.validation_fraction > 0 and len(y_index) >= 10):
            return idx, idx[:0]
        counts = np.bincount(y_index)
        strat = y_index if counts.min() >= 2 and int(len(idx) * self.validation_fraction) >= len(counts) else None
        return tuple(train_test_split(idx, test_size=self.validation_fraction, random_state=self.random_state,
                                      stratify=strat))

    def fit(self, X, y):
        import torch

        self._validate_params()
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"the training data has only one class ({self.classes_[0]!r}); need at least 2 classes")
        dev = _device(self.device)
        gen = torch.Generator().manual_seed(self.random_state)
        tr, va = self.holdout(y_index)
        Xt = torch.tensor(X, dtype=torch.float32, device=dev)
        yt = torch.as_tensor(y_index, dtype=torch.long, device=dev)
        tr_t, va_t = torch.as_tensor(tr, device=dev), torch.as_tensor(va, device=dev)

        def epoch():
            order = tr_t[torch.randperm(len(tr), generator=gen).to(dev)]
            for s in range(0, len(order), self.batch_size):
                yield Xt[order[s:s + self.batch_size]], yt[order[s:s + self.batch_size]]

        return self.train_batches(X.shape[1], epoch, (lambda: iter([(Xt[va_t], yt[va_t])])) if len(va) else None, dev)

    def _start(self, n_features: int, dev: torch.device) -> None:
        """A fresh network (seeded) and its optimiser."""
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            self._net_ = self._net(n_features, len(self.classes_)).to(dev)
        self._opt_ = torch.optim.AdamW(self._net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.n_features_in_ = n_features

    def _step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """One AdamW step on one mini-batch (class indices), the unit every fit is made of."""
        import torch.nn.functional as F

        self._net_.train()
        self._opt_.zero_grad()
        F.cross_entropy(self._net_(xb), yb).backward()
        self._opt_.step()

    def partial_fit(self, X, y, classes=None):
        """One pass of mini-batch steps over (X, y), continuing from the previous call (scikit-learn's
        incremental API: ``classes`` is required on the first call). Rows are taken in order: the
        caller shuffles, as streaming from HDF5 does chunk by chunk."""
        import torch

        first = not hasattr(self, "classes_")
        if first:
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit")
            self._validate_params()
            self.classes_ = np.unique(classes)
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64], reset=first)
        unknown = np.setdiff1d(np.unique(y), self.classes_)
        if unknown.size:
            raise ValueError(f"y has labels {unknown.tolist()} outside the classes given to the first partial_fit")
        index = np.searchsorted(self.classes_, y)
        dev = _device(self.device)
        if first:
            self._start(X.shape[1], dev)
        elif not hasattr(self, "_net_"):  # after fit(): go on from its weights
            self._net_ = self.model_.to(dev)
            self._opt_ = torch.optim.AdamW(self._net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        Xt, yt = torch.as_tensor(X, dtype=torch.float32, device=dev), torch.as_tensor(index, device=dev)
        for s in range(0, len(Xt), self.batch_size):
            self._step(Xt[s:s + self.batch_size], yt[s:s + self.batch_size])
        self.model_ = self._net_.eval()
        return self

    def train_batches(self, n_features: int, epoch, validation, dev: torch.device):
        """Epochs of :meth:`_step` over the mini-batches from ``epoch()``, stopping early on the
        loss over ``validation()`` batches and keeping the best epoch's weights.

        Shared by in-memory fits and streaming fits from HDF5 (:mod:`pipeline.streaming`);
        ``classes_`` must be set by the caller.
        """
        import torch
        import torch.nn.functional as F

        self._start(n_features, dev)
        net = self._net_
        best, best_state, bad_epochs = np.inf, copy.deepcopy(net.state_dict()), 0
        self.n_epochs_, self.validation_loss_ = 0, None
        for n in range(self.max_epochs):
            for xb, yb in epoch():
                self._step(xb, yb)
            self.n_epochs_ = n + 1
            if validation is None:
                best_state = net.state_dict()
                continue
            net.eval()
            with torch.no_grad():
                total = count = 0.0
                for xb, yb in validation():
                    total += F.cross_entropy(net(xb), yb, reduction="sum").item()
                    count += len(yb)
            loss = total / max(count, 1)
            if loss < best - 1e-6:
                best, best_state, bad_epochs = loss, copy.deepcopy(net.state_dict()), 0
            else:
                bad_epochs += 1
                if bad_epochs >= self.patience:
                    break
        net.load_state_dict(best_state)
        self.model_ = net.cpu().eval()
        del self._net_, self._opt_  # a finished fit: partial_fit starts afresh, and the pickle stays small
        self.validation_loss_ = None if validation is None else float(best)
        return self

    def _logits(self, X) -> np.ndarray:
        import torch

        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        device = next(self.model_.parameters()).device
        with torch.no_grad():
            return self.model_(torch.as_tensor(X, dtype=torch.float32, device=device)).double().cpu().numpy()

    def predict_proba(self, X) -> np.ndarray:
        logits = self._logits(X)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        return p / p.sum(axis=1, keepdims=True)

    def _class_scores(self, X) -> np.ndarray:
        return self._logits(X)


class KNNProbe(_ScoredClassifier, BaseEstimator):
    """A weighted k-nearest-neighbour probe, as in DINO's evaluation: embeddings are L2-normalised,
    each query's ``n_neighbors`` most cosine-similar training rows vote with weight
    ``exp(similarity / temperature)``, and the votes (normalised) are its class probabilities.

    Training stores the normalised rows; no classifier is fitted. Queries go in batches sized so
    that a batch's similarities to every training row stay under ``max_similarities`` values, so
    50,000 training rows never need an N x N matrix.
    """

    _parameter_constraints: dict = {
        "n_neighbors": [Interval(Real, 1, None, closed="left")],  # a grid of floats selects it
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "max_similarities": [Interval(Integral, 1, None, closed="left")],
        "device": [str],
    }

    def __init__(self, *, n_neighbors: float = 20, temperature: float = 0.07, max_similarities: int = 1 << 25,
                 device: str = "auto"):
        self.n_neighbors = n_neighbors
        self.temperature = temperature
        self.max_similarities = max_similarities
        self.device = device

    def fit(self, X, y):
        self._validate_params()
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        self.classes_, self._y_index = np.unique(y, return_inverse=True)
        self.n_neighbors_ = min(int(self.n_neighbors), len(X))  # the k used: at most the training rows
        self._bank = _l2_rows(np.asarray(X, dtype=np.float64))  # float64: a query's result never depends
        # on which other queries share its batch (float32 products round differently per batch shape)
        return self

    def predict_proba(self, X) -> np.ndarray:
        import torch

        check_is_fitted(self)
        X = _l2_rows(np.asarray(validate_data(self, X, reset=False, dtype=[np.float32, np.float64]), dtype=np.float64))
        dev = _device(self.device)
        bank, labels = torch.as_tensor(self._bank, device=dev), torch.as_tensor(self._y_index, device=dev)
        k = self.n_neighbors_
        step = max(1, self.max_similarities // len(bank))
        out = np.empty((len(X), len(self.classes_)))
        for lo in range(0, len(X), step):
            sims = torch.as_tensor(X[lo:lo + step], device=dev) @ bank.T
            top, index = sims.topk(k, dim=1)
            votes = torch.zeros((len(sims), len(self.classes_)), dtype=torch.float64, device=dev)
            votes.scatter_add_(1, labels[index], torch.exp(top / self.temperature))
            out[lo:lo + step] = (votes / votes.sum(1, keepdim=True)).cpu().numpy()
        return out

    def _class_scores(self, X) -> np.ndarray:
        return self.predict_proba(X)


def _l2_rows(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

