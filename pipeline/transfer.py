"""Transferability without a classifier fit: LogME (You et al., ICML 2021).

Why LogME rather than a leave-one-out k-NN score: taps' probes are linear, and LogME is the
log marginal likelihood (evidence) of exactly that family, a Bayesian linear model from the
embeddings to each one-hot label column, with its prior and noise precisions set by
maximising the evidence itself. It has no hyperparameter to choose, costs one
eigendecomposition of the smaller Gram matrix per tap (seconds, against minutes of fits),
and penalises dimensions that do not help predict the labels, so a wide tap does not win
by its width. A k-NN score measures what the k-NN probe sees, not the linear one.

Embeddings are standardised first, as the probes see them.
"""

from __future__ import annotations

import numpy as np
from sklearn.preprocessing import StandardScaler


def _evidence(sigma: np.ndarray, projected: np.ndarray, y: np.ndarray, n: int, d: int,
              iterations: int = 100) -> tuple[float, float, float]:
    """Maximum evidence of one target column by LogME's fixed-point updates -> (evidence / n, alpha, beta).

    ``sigma``: eigenvalues of F^T F (padded with zeros to d); ``projected``: the targets in the
    eigenbasis (V^T F^T y); alpha is the prior precision of the weights, beta the noise precision."""
    alpha, beta = 1.0, 1.0
    y_sq = float(y @ y)
    for _ in range(iterations):
        gamma = float((beta * sigma / (alpha + beta * sigma)).sum())
        m_sq = float(((beta * projected / (alpha + beta * sigma)) ** 2).sum())  # |m|^2, m the posterior mean
        # |y - F m|^2 = |y|^2 - 2 m^T F^T y + m^T F^T F m, in the eigenbasis
        coef = beta / (alpha + beta * sigma)
        residual = max(y_sq - 2 * float((coef * projected ** 2).sum()) + float((coef ** 2 * sigma * projected ** 2).sum()),
                       1e-12)
        new_alpha, new_beta = gamma / max(m_sq, 1e-12), (n - gamma) / residual
        converged = abs(new_alpha / new_beta - alpha / beta) <= 1e-3 * alpha / beta
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    coef = beta / (alpha + beta * sigma)
    m_sq = float(((coef * projected) ** 2).sum())
    residual = max(y_sq - 2 * float((coef * projected ** 2).sum()) + float((coef ** 2 * sigma * projected ** 2).sum()),
                   1e-12)
    evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * sigma).sum()
                - beta / 2 * residual - alpha / 2 * m_sq - n / 2 * np.log(2 * np.pi))
    return float(evidence / n), alpha, beta


def logme(X: np.ndarray, y: np.ndarray) -> float:
    """LogME of embeddings ``X`` for labels ``y``: the mean over classes of the per-sample log evidence
    of a Bayesian linear model predicting that class's one-hot column. Higher transfers better."""
    F = StandardScaler().fit_transform(np.asarray(X, dtype=np.float64))
    n, d = F.shape
    classes = np.unique(y)
    if n <= d:  # the n x n Gram matrix has the same nonzero eigenvalues, and is smaller
        sigma, U = np.linalg.eigh(F @ F.T)
        sigma = np.clip(sigma, 0, None)
        # V^T F^T y = S^(1/2) U^T y for the nonzero part; the rest of the d-dimensional basis sees nothing
        targets = U.T @ (y[:, None] == classes[None, :]).astype(np.float64) * np.sqrt(sigma)[:, None]
        sigma = np.concatenate([sigma, np.zeros(d - n)])
        targets = np.vstack([targets, np.zeros((d - n, len(classes)))])
    else:
        sigma, V = np.linalg.eigh(F.T @ F)
        sigma = np.clip(sigma, 0, None)
        targets = V.T @ (F.T @ (y[:, None] == classes[None, :]).astype(np.float64))
    Y = (y[:, None] == classes[None, :]).astype(np.float64)
    scores = [_evidence(sigma, targets[:, k], Y[:, k], n, d)[0] for k in range(len(classes))]
    return float(np.mean(scores))


def logme_parameters(X: np.ndarray, y_column: np.ndarray) -> tuple[float, float, float]:
    """(evidence / n, alpha, beta) of one target column, for checking the evidence against its definition."""
    F = StandardScaler().fit_transform(np.asarray(X, dtype=np.float64))
    sigma, V = np.linalg.eigh(F.T @ F)
    return _evidence(np.clip(sigma, 0, None), V.T @ (F.T @ y_column), y_column, *F.shape)
