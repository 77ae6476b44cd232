"""Is a difference between two rows of a comparison more than noise?

Both tests are paired: every row was scored on the same test samples of the same seeded
splits, so what varies between rows is only the classifier's features or kind.

* :func:`bootstrap` resamples seeds, then test samples (the same resamples for every row, and
  for every seed that tests on a sample), and recomputes the metric: accuracy, or mean
  per-class accuracy as the ratio estimator ``sum(w * correct) / sum(w)`` with
  ``w = 1 / (test images of the class)``, which equals the metric on the original sample. Percentiles of the paired differences give
  the confidence interval (:func:`paired_difference`).
* :func:`mcnemar` is McNemar's exact test on one seed: of the samples exactly one row gets
  right, is the split further from 50/50 than chance allows (a two-sided binomial test)?
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

LEVEL = 0.95
RESAMPLES = 2000


def sample_weights(y_true: np.ndarray, metric: str) -> np.ndarray:
    """Per-sample weights whose weighted accuracy is ``metric`` (accuracy or mean per-class accuracy)."""
    if metric == "accuracy":
        return np.ones(len(y_true))
    _, index, counts = np.unique(y_true, return_inverse=True, return_counts=True)
    return 1.0 / counts[index]


def bootstrap(correct: np.ndarray | list, weights: list[np.ndarray], *, samples: list[np.ndarray] | None = None,
              resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Resampled metric per row: ``correct[r][s]`` is row r's 0/1 correctness on seed s's test samples,
    ``weights[s]`` their weights, ``samples[s]`` which samples they are (rows of the dataset). Returns a
    (rows, resamples) array; column b of every row comes from the same resample of seeds and samples, so
    differences between rows are paired.

    The test samples are resampled once per resample, over every sample any seed tests on, and each
    seed reads its own samples' counts: seeds that share test images (an official split, the tries of a
    shot curve, the overlapping test sides of seeded fractions) share their resampled counts. The test
    images are one draw from the population whichever split picked them; resampling them per seed
    would average that draw's noise down as if each seed had images of its own (three seeds on one
    test set: an interval sqrt(5/9), about 0.75, times as wide as one seed's). Without ``samples``
    the seeds' test samples are taken as distinct."""
    rng = np.random.default_rng(seed)
    n_seeds = len(weights)
    if samples is None:
        ends = np.cumsum([len(w) for w in weights])
        samples = [np.arange(end - len(w), end) for w, end in zip(weights, ends, strict=True)]
    universe, where = np.unique(np.concatenate([np.asarray(s) for s in samples]), return_inverse=True)
    positions = np.split(where, np.cumsum([len(s) for s in samples])[:-1])  # each seed's samples in universe
    picks = rng.integers(0, n_seeds, size=(resamples, n_seeds))  # seeds drawn with replacement
    observed = [np.stack([np.asarray(c[s], dtype=np.float64) for c in correct]) for s in range(n_seeds)]
    # a seed whose samples all go undrawn in a resample (only likely with a handful of test images) keeps its metric
    unresampled = [(o @ w / w.sum())[:, None] for o, w in zip(observed, weights, strict=True)]
    stats = np.zeros((len(correct), resamples))
    step = max(1, 20_000_000 // len(universe))  # resample counts in chunks: memory stays bounded
    for lo in range(0, resamples, step):
        hi = min(lo + step, resamples)
        drawn = rng.multinomial(len(universe), np.full(len(universe), 1 / len(universe)), size=hi - lo)
        for s, w in enumerate(weights):
            times = (picks[lo:hi] == s).sum(1) / n_seeds  # how much seed s weighs in each resample
            counts = drawn[:, positions[s]] * w  # (chunk, n)
            total = counts.sum(1)
            metric = np.where(total > 0, (observed[s] @ counts.T) / np.where(total > 0, total, 1), unresampled[s])
            stats[:, lo:hi] += metric * times
    return stats


@dataclass(frozen=True)
class Difference:
    """Row a's metric minus row b's, with its bootstrap interval and McNemar p-values per seed."""

    difference: float
    low: float
    high: float
    mcnemar_p: tuple[float, ...]

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {"difference": round(self.difference, 5), "low": round(self.low, 5), "high": round(self.high, 5),
                "mcnemar_p": [float(f"{p:.4g}") for p in self.mcnemar_p]}


def paired_difference(stats: np.ndarray, observed: np.ndarray, correct: list, a: int, b: int,
                      level: float = LEVEL) -> Difference:
    """Row ``a`` against row ``b``: ``stats`` from :func:`bootstrap`, ``observed`` the rows' metrics."""
    diff = stats[a] - stats[b]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(diff, [tail, 100 - tail])
    return Difference(float(observed[a] - observed[b]), float(low), float(high),
                      tuple(mcnemar(ca, cb)[2] for ca, cb in zip(correct[a], correct[b], strict=True)))


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """McNemar's exact test on paired 0/1 outcomes -> (a right and b wrong, a wrong and b right, p)."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 0, 0, 1.0
    return only_a, only_b, float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def interval(stats: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The bootstrap interval of one row's metric."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)
