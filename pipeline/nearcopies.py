"""Near-copies across a split: test images whose embedding is all but that of a training image.

Byte-identical images are caught by their digests (and kept on one side of every split); a copy
resized, re-encoded, cropped a little or mirrored has other bytes. Caltech-101 holds such pairs
(``Faces/image_0389.jpg`` and ``Faces_easy/image_0389.jpg``, mirrored ``Leopards`` photos); the test
image of a pair is recognised rather than classified, or, filed under another class, cannot be
right. A fit names them and gives its accuracy without them, so a reader can judge what they are
worth; the splits are left as they are.

The yardstick is the tap's own: in the embedding centred on the training mean, each image scaled
to unit length (a fused set's taps weighted alike), a test image is a near-copy when its nearest
training image is at most :data:`RATIO` of the median distance between a training image and its
nearest other one. Being scale-free, one ratio serves a 24-D early tap and a 1,280-D pooled one:
on Caltech-101 it finds 14 to 32 images for MobileNetV2's ``block2`` to ``pooled`` and
EfficientNet-Lite0's ``pooled``, all of them copies by eye, and none on digits, a 7,000-image
Fashion-MNIST subset or ants/bees (random weights included). Near the ratio it can name a
look-alike rather than a copy (on the whole of Fashion-MNIST, 20 pairs of 70,000 images: the
closest the same photo, the farthest two sandals of one catalogue): it errs towards naming.
"""

from __future__ import annotations

import numpy as np

from .fusion import Groups

RATIO = 0.1  # a tenth of the typical nearest-neighbour distance: copies sit far inside it (see above)
SAMPLE = 2000  # training images whose nearest neighbour sets the typical distance
CHUNK = 256  # rows compared at once: a chunk's distances to 60,000 training rows take 61 MB


def _embedding(X: np.ndarray, train: np.ndarray, groups: Groups | None) -> np.ndarray:
    Z = X - X[train].mean(0, dtype=np.float64).astype(np.float32)
    for start, stop in (groups or {}).values():  # each tap's block at unit mean length: taps weigh alike
        Z[:, start:stop] /= max(float(np.sqrt((Z[train, start:stop] ** 2).sum(1).mean())), 1e-12)
    return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)


def _nearest(Z: np.ndarray, queries: np.ndarray, pool: np.ndarray, *, within: bool) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``queries``, its nearest row of ``pool`` (other than itself when the queries are
    ``within`` the pool): (distance, that row)."""
    distance, nearest = np.empty(len(queries)), np.empty(len(queries), int)
    others = Z[pool].T
    for start in range(0, len(queries), CHUNK):
        rows = queries[start:start + CHUNK]
        similarity = Z[rows] @ others
        if within:
            similarity[rows[:, None] == pool[None, :]] = -np.inf
        best = similarity.argmax(1)
        nearest[start:start + CHUNK] = pool[best]
        distance[start:start + CHUNK] = np.sqrt(np.maximum(2 - 2 * similarity[np.arange(len(rows)), best], 0))
    return distance, nearest


def _typical(Z: np.ndarray, pool: np.ndarray) -> float:
    """The median distance from an image of ``pool`` (a seeded sample of it) to its nearest other one."""
    sample = np.random.default_rng(0).choice(pool, min(SAMPLE, len(pool)), replace=False)
    return float(np.median(_nearest(Z, sample, pool, within=True)[0]))


def near_copies(X: np.ndarray, train: np.ndarray, test: np.ndarray, *, groups: Groups | None = None,
                ratio: float = RATIO) -> tuple[np.ndarray, np.ndarray]:
    """The test rows with a near-copy among the ``train`` rows of ``X`` (a tap's matrix; ``groups``:
    a fused set's columns per tap) and, for each, that training row."""
    if len(train) < 2 or len(test) == 0:
        return np.empty(0, int), np.empty(0, int)
    Z = _embedding(np.asarray(X, np.float32), train, groups)
    distance, nearest = _nearest(Z, test, train, within=False)
    close = distance <= ratio * _typical(Z, train)
    return test[close], nearest[close]


def near_copy_pairs(X: np.ndarray, rows: np.ndarray, *, groups: Groups | None = None,
                    ratio: float = RATIO) -> list[tuple[int, int, float]]:
    """Pairs of ``rows`` of ``X`` that are near-copies (either is the other's nearest image, within
    ``ratio`` x the typical distance), each once as ``(row, row, distance / typical distance)``,
    closest first: a dataset's copies, whichever side of any split they are on."""
    if len(rows) < 2:
        return []
    Z = _embedding(np.asarray(X, np.float32), rows, groups)
    typical = _typical(Z, rows)
    distance, nearest = _nearest(Z, rows, rows, within=True)
    pairs: dict[tuple[int, int], float] = {}
    for a, b, d in zip(rows.tolist(), nearest.tolist(), distance.tolist(), strict=True):
        if d <= ratio * typical:
            pairs.setdefault((min(a, b), max(a, b)), d / max(typical, 1e-12))
    return sorted(((a, b, r) for (a, b), r in pairs.items()), key=lambda pair: (pair[2], pair[0]))
