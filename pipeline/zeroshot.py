"""``--clf zeroshot``: a CLIP zero-shot classifier as a row beside the probes.

The classifier is built from the dataset's class names and prompt templates by the backbone's
own text tower (:meth:`features.models.openclip_source.OpenClipSource.text_classifier`, which
calls open_clip's ``build_zero_shot_classifier``); it reads the ``embed`` tap (the image
embedding after the projection), needs no training rows (fitting only records the classes), and
is scored on the same test rows as every other row, so compare's intervals and paired tests
apply to it unchanged. Templates: open_clip's 80 ``OPENAI_IMAGENET_TEMPLATES``, or a file with one
template per line (``{}`` stands for the class name; ``--prompts FILE``).
"""

from __future__ import annotations

from functools import cache

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from features.errors import UsageError

TEXT_TAP = "embed"
LOGIT_SCALE = 100.0  # CLIP's learned temperature, as open_clip's zero-shot evaluation applies it


@cache
def _text_weights(backbone: str, weights: str, image_size: int | None, classes: tuple[str, ...],
                  templates: tuple[str, ...]) -> np.ndarray:
    from features.backbones import Backbone  # torch: only when a text tower is built

    source = Backbone(backbone, weights=weights, image_size=image_size).source
    if not hasattr(source, "text_classifier"):
        raise UsageError(f"--clf zeroshot needs a backbone with a text tower (openclip:ARCH/PRETRAINED), not {backbone}")
    return source.text_classifier([c.replace("_", " ") for c in classes], list(templates)).numpy()


def zero_shot_weights(attrs: dict, classes: list[str], templates: tuple[str, ...]) -> np.ndarray:
    """(embedding dim, classes): the text classifier of a feature file's backbone and weights."""
    spec = str(attrs["weights"])
    weights = "none" if spec == "none" else spec.rsplit("/", 1)[-1] if spec.startswith("openclip:") else spec
    size = attrs.get("image_size")
    return _text_weights(str(attrs["backbone"]), weights, int(size) if size else None, tuple(classes), templates)


class ZeroShotClassifier(ClassifierMixin, BaseEstimator):
    """``softmax(logit_scale * normalise(x) @ weights)``: one column of ``weights`` per class; ``fit``
    only records the classes (all of the weights' columns), so it needs no training rows."""

    def __init__(self, weights: np.ndarray | None = None, *, logit_scale: float = LOGIT_SCALE):
        self.weights = weights
        self.logit_scale = logit_scale

    def fit(self, X, y=None):
        if self.weights is None:
            raise UsageError("--clf zeroshot builds its classifier from the class names; use it through fit/compare")
        self.classes_ = np.arange(np.asarray(self.weights).shape[1])
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = np.asarray(X, dtype=np.float64)
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return self.logit_scale * X @ np.asarray(self.weights, dtype=np.float64)

    def predict_proba(self, X) -> np.ndarray:
        z = self.decision_function(X)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(axis=1)]
