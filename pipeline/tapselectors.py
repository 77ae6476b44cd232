"""The records behind ``--select``: how ``--tap auto`` chooses the taps to fuse, one record each.

Like :mod:`pipeline.classifiers`, this module imports neither torch nor scikit-learn (the CLI
builds ``--select`` from it); a record names its function as ``module:function``, imported
when a selection runs (:func:`pipeline.tapselect.select_taps`).
"""

from __future__ import annotations

from dataclasses import dataclass

from features.registry import Registry


@dataclass(frozen=True)
class TapSelector:
    """One ``--select`` value: ``choose`` is ``module:function`` with the signature
    ``(score, Z, y, groups, *, threshold, max_taps, candidates) -> (chosen taps, path)``."""

    name: str
    choose: str
    summary: str


SELECTOR_REGISTRY: Registry[TapSelector] = Registry("tap selector (--select)")
register_selector = SELECTOR_REGISTRY.register


DEFAULT_SELECTOR = register_selector(TapSelector(
    "forward", "pipeline.tapselect:forward_selection", "greedy, by CV")).name
register_selector(TapSelector(
    "group-lasso", "pipeline.tapselect:group_lasso_selection", "Head2Toe's ranking, the count by CV"))
SELECTORS = tuple(SELECTOR_REGISTRY)


get_selector = SELECTOR_REGISTRY.lookup  # the record of a --select value
