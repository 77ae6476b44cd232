"""The metrics every run reports, per seed and summarised over seeds."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, top_k_accuracy_score

METRICS = ("accuracy", "mean_per_class_accuracy", "macro_f1", "top5_accuracy",
           "expected_calibration_error", "expected_calibration_error_uncalibrated")  # the last two: --calibrate


def score_predictions(y: np.ndarray, pred: np.ndarray, scores: np.ndarray | None, classes) -> dict[str, float]:
    """Every metric from predictions; top-5 from ``scores`` (one column per class), only above 5 classes."""
    out = {"accuracy": accuracy_score(y, pred), "mean_per_class_accuracy": balanced_accuracy_score(y, pred),
           "macro_f1": f1_score(y, pred, average="macro")}
    if scores is not None and len(classes) > 5 and set(np.unique(y)) <= set(classes):
        out["top5_accuracy"] = top_k_accuracy_score(y, scores, k=5, labels=classes)
    return {k: float(v) for k, v in out.items()}


def summarize(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and std over seeds (one dict of metrics each) of each metric present in every seed."""
    names = [m for m in METRICS if all(m in s for s in per_seed)]
    return {m: {"mean": float(np.mean([s[m] for s in per_seed])), "std": float(np.std([s[m] for s in per_seed]))}
            for m in names}
