"""``--tap auto``: which taps to fuse, chosen on a training split only.

Refitting the probe's whole C grid for every candidate set would cost a full fit per
candidate and step. Candidate sets are scored instead by a cheap, exact stand-in: the k-fold
CV accuracy of a ridge classifier (least squares on one-hot targets, the closed-form
relative of the linear probe) on each tap standardised and reduced to at most
``PROXY_DIM`` principal components. Per fold, the Gram matrix of all candidate columns is
formed once; a candidate set's score is then a Cholesky solve on its block per ridge value.
The probe itself (C by CV) is fitted once, on the chosen set.

Two selectors (``--select``):

``forward``
    Greedy forward selection: start from the best single tap, add the tap that raises the
    CV score most, stop when no tap adds more than ``threshold`` or ``max_taps`` are in.
    Only the ``candidates`` best single taps are tried after the first step.
``group-lasso``
    Head2Toe's ranking (Evci et al., 2022): a multinomial logistic regression on all taps
    with a group-lasso penalty (one group per tap, weighted by the square root of its
    width) ranks the taps by their weights' norm per dimension; the number of top-ranked
    taps to keep is then chosen by the same CV score. It judges every tap jointly, so a tap
    that only helps next to others can rank high, which greedy steps may miss.

Everything here sees the training rows it is given and nothing else; the folds are
stratified and seeded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from .classifiers import load
from .fusion import Groups
from .selection import training_folds
from .tapselectors import DEFAULT_SELECTOR, get_selector

# torch is imported by the scores that compute with it: a fit without --tap auto never imports it.

PROXY_DIM = 256
RIDGE = (0.1, 1.0, 10.0)  # ridge values, relative to the mean Gram diagonal of the set


@dataclass
class TapSelection:
    """The chosen taps (in the file's order) and how they were chosen."""

    taps: list[str]
    method: str
    path: list[dict] = field(default_factory=list)  # each step: the set tried and its CV accuracy
    seconds: float = 0.0


def proxy_features(X: np.ndarray, groups: Groups, max_dim: int = PROXY_DIM) -> tuple[np.ndarray, Groups]:
    """Each tap standardised, then reduced to at most ``max_dim`` principal components (fitted on these rows)."""
    parts, dims = [], {}
    for tap, (lo, hi) in groups.items():
        Z = StandardScaler().fit_transform(X[:, lo:hi])
        k = min(max_dim, Z.shape[1], Z.shape[0] - 1)
        if k < Z.shape[1]:
            Z = PCA(n_components=k, svd_solver="randomized" if k < Z.shape[1] // 2 else "auto",
                    random_state=0).fit_transform(Z)
        parts.append(Z.astype(np.float64))
        dims[tap] = Z.shape[1]
    start, out = 0, {}
    for tap, d in dims.items():
        out[tap] = (start, start + d)
        start += d
    return np.hstack(parts), out


class RidgeCVScore:
    """k-fold CV accuracy of a ridge classifier on any subset of tap groups, from per-fold Gram matrices."""

    def __init__(self, Z: np.ndarray, y: np.ndarray, groups: Groups, *, folds: int, random_state: int,
                 copies: np.ndarray | None = None):
        import torch

        self.groups = groups
        classes, y_index = np.unique(y, return_inverse=True)
        Y = torch.as_tensor(np.eye(len(classes))[y_index], dtype=torch.float32)
        Zt = torch.as_tensor(Z, dtype=torch.float32)
        self.folds = []
        for tr, va in training_folds(y, folds, random_state=random_state, copies=copies):
            tr, va = torch.as_tensor(tr), torch.as_tensor(va)
            mean_z, mean_y = Zt[tr].mean(0), Y[tr].mean(0)
            Zc = Zt[tr] - mean_z
            self.folds.append((Zc.T @ Zc, Zc.T @ (Y[tr] - mean_y), Zt[va] - mean_z, mean_y,
                               torch.as_tensor(y_index)[va]))

    def __call__(self, taps: list[str]) -> float:
        import torch

        cols = torch.cat([torch.arange(*self.groups[t]) for t in taps])
        ridge = torch.tensor(RIDGE, dtype=torch.float32)[:, None, None]
        accuracy = torch.zeros(len(RIDGE))
        for gram, zy, z_val, mean_y, y_val in self.folds:
            G = gram[cols][:, cols]
            eye = torch.eye(len(cols)) * (torch.diagonal(G).mean())
            L = torch.linalg.cholesky(G + ridge * eye)  # every ridge value in one batched factorisation
            W = torch.cholesky_solve(zy[cols].expand(len(RIDGE), -1, -1), L)
            pred = (z_val[:, cols] @ W + mean_y).argmax(-1)
            accuracy += (pred == y_val).float().mean(-1) / len(self.folds)
        return float(accuracy.max())


def forward_selection(score: RidgeCVScore, Z: np.ndarray, y: np.ndarray, groups: Groups, *, threshold: float,
                      max_taps: int, candidates: int) -> tuple[list[str], list[dict]]:
    """``forward``: the best single tap, then the tap that adds most, while it adds more than ``threshold``."""
    taps = list(groups)
    singles = {t: score([t]) for t in taps}
    ranked = sorted(taps, key=lambda t: -singles[t])
    chosen, current = [ranked[0]], singles[ranked[0]]
    path = [{"taps": [t], "cv_accuracy": round(singles[t], 5)} for t in ranked]
    pool = ranked[1:candidates]
    while len(chosen) < max_taps and pool:
        trial = {t: score(chosen + [t]) for t in pool}
        path += [{"taps": chosen + [t], "cv_accuracy": round(s, 5)} for t, s in trial.items()]
        best = max(trial, key=trial.get)
        if trial[best] - current <= threshold:
            break
        chosen.append(best)
        pool.remove(best)
        current = trial[best]
    return chosen, path


def group_lasso_ranking(Z: np.ndarray, y: np.ndarray, groups: Groups, *, strength: float = 0.02,
                        iterations: int = 200) -> dict[str, float]:
    """Each tap's weight norm per sqrt(width) in a group-lasso multinomial logistic regression
    (FISTA, penalty ``strength`` times the smallest one that zeroes every group)."""
    import torch

    Zt = torch.as_tensor(Z, dtype=torch.float32)
    _, y_index = np.unique(y, return_inverse=True)
    Y = torch.nn.functional.one_hot(torch.as_tensor(y_index), int(y_index.max()) + 1).float()
    n = len(Zt)
    spans = list(groups.values())
    sizes = torch.tensor([np.sqrt(hi - lo) for lo, hi in spans], dtype=torch.float32)
    grad0 = Zt.T @ (Y.mean(0, keepdim=True).expand_as(Y) - Y) / n  # at W = 0 with the best intercept
    lam = strength * max(float(grad0[lo:hi].norm() / s) for (lo, hi), s in zip(spans, sizes, strict=True))
    step = 1.0 / (0.5 * torch.linalg.matrix_norm(Zt, ord=2) ** 2 / n + 1e-12)  # softmax loss is 0.5-smooth
    W = torch.zeros(Z.shape[1], Y.shape[1], dtype=torch.float32)
    b = torch.log(Y.mean(0) + 1e-12)
    V, Vb, t = W.clone(), b.clone(), 1.0
    for _ in range(iterations):
        P = torch.softmax(Zt @ V + Vb, dim=1) - Y
        W_new, b_new = V - step * (Zt.T @ P) / n, Vb - step * P.mean(0)
        for (lo, hi), s in zip(spans, sizes, strict=True):  # the group soft-threshold
            norm = W_new[lo:hi].norm()
            W_new[lo:hi] *= torch.clamp(1 - step * lam * s / max(float(norm), 1e-12), min=0.0)
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        V = W_new + (t - 1) / t_new * (W_new - W)
        Vb = b_new + (t - 1) / t_new * (b_new - b)
        W, b, t = W_new, b_new, t_new
    return {tap: float(W[lo:hi].norm() / s) for (tap, (lo, hi)), s in zip(groups.items(), sizes, strict=True)}


def group_lasso_selection(score: RidgeCVScore, Z: np.ndarray, y: np.ndarray, groups: Groups, *, threshold: float,
                          max_taps: int, candidates: int) -> tuple[list[str], list[dict]]:
    """``group-lasso``: the taps ranked by Head2Toe's group norms, the count by the CV score."""
    norms = group_lasso_ranking(Z, y, groups)
    ranked = [t for t in sorted(norms, key=lambda t: -norms[t]) if norms[t] > 0] or [max(norms, key=norms.get)]
    path = [{"ranking": {t: round(norms[t], 6) for t in ranked}}]
    chosen, current = ranked[:1], score(ranked[:1])
    path.append({"taps": list(chosen), "cv_accuracy": round(current, 5)})
    for k in range(2, min(max_taps, len(ranked)) + 1):
        accuracy = score(ranked[:k])
        path.append({"taps": ranked[:k], "cv_accuracy": round(accuracy, 5)})
        if accuracy - current > threshold:
            chosen, current = ranked[:k], accuracy
    return chosen, path


def select_taps(X: np.ndarray, y: np.ndarray, groups: Groups, *, method: str = DEFAULT_SELECTOR, folds: int = 3,
                threshold: float = 0.002, max_taps: int = 4, candidates: int = 8,
                random_state: int = 0, copies: np.ndarray | None = None) -> TapSelection:
    """Choose the taps to fuse from training rows ``X`` (the taps' matrices side by side, ``groups``
    naming each tap's columns) and labels ``y`` (``copies``: per row, its group of byte-identical
    images, kept in one CV fold); nothing else is looked at."""
    rank = load(get_selector(method).choose)
    t0 = time.perf_counter()
    Z, zgroups = proxy_features(X, groups)
    score = RidgeCVScore(Z, y, zgroups, folds=folds, random_state=random_state, copies=copies)
    chosen, path = rank(score, Z, y, zgroups, threshold=threshold, max_taps=max_taps, candidates=candidates)
    order = list(groups)
    return TapSelection(sorted(chosen, key=order.index), method, path, round(time.perf_counter() - t0, 3))
