"""Fused taps: several taps' embeddings side by side, each standardised on its own first.

A tap set is written ``block14+block17+pooled``; ``auto`` asks :mod:`pipeline.tapselect` to
choose the set. The fused matrix is the taps' matrices concatenated in the order given, and
a fused fit's preprocessing is one scikit-learn ``ColumnTransformer`` that standardises each
tap on its own columns (then L2-normalises it or reduces it by PCA when ``--preprocess``
asks), so that a 1,280-D tap does not drown a 160-D one merely by its width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from features.errors import UsageError

from .classifiers import DEFAULT_PREPROCESS, make_preprocess

if TYPE_CHECKING:
    from sklearn.compose import ColumnTransformer

AUTO = "auto"
SEPARATOR = "+"

Groups = dict[str, tuple[int, int]]  # tap -> (first column, one past the last) in the fused matrix


def tap_set(spec: str) -> list[str]:
    """The taps of ``a+b+c`` in order (one tap for a plain name); refuses empty parts and repeats."""
    taps = [t.strip() for t in spec.split(SEPARATOR)]
    if not all(taps):
        raise UsageError(f"bad tap set {spec!r}: write taps joined by '+', e.g. block14+pooled")
    if len(set(taps)) < len(taps):
        raise UsageError(f"tap set {spec!r} names a tap twice; name each tap once")
    if AUTO in taps and len(taps) > 1:
        raise UsageError(f"tap set {spec!r}: 'auto' chooses the whole set; pass --tap auto alone")
    return taps


def is_fused(spec: str) -> bool:
    """Whether a tap spec fuses taps (``a+b`` or ``auto``) rather than naming one."""
    return spec == AUTO or SEPARATOR in spec


def column_groups(dims: dict[str, int]) -> Groups:
    """Each tap's columns in the matrix that concatenates them in ``dims``' order."""
    groups, start = {}, 0
    for tap, dim in dims.items():
        groups[tap] = (start, start + dim)
        start += dim
    return groups


def per_tap_steps(preprocess: str) -> list:
    """One tap's preprocessing in a fusion: standardisation first, then ``--preprocess``'s other steps
    (``l2`` to give every tap the same norm, ``pca:K`` to give every tap K dimensions)."""
    from sklearn.preprocessing import StandardScaler  # here: parsing tap sets needs no scikit-learn

    steps = [s for s in make_preprocess(preprocess) if s[0] != DEFAULT_PREPROCESS]
    if not steps or steps[0][0] != "pca_standard":
        steps.insert(0, (DEFAULT_PREPROCESS, StandardScaler()))
    return steps


def fusion_transformer(groups: Groups, preprocess: str = DEFAULT_PREPROCESS) -> ColumnTransformer:
    """The fused matrix's preprocessing: each tap's columns through its own :func:`per_tap_steps`."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    return ColumnTransformer([(tap, Pipeline(per_tap_steps(preprocess)), slice(lo, hi))
                              for tap, (lo, hi) in groups.items()])
