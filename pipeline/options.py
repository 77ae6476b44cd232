"""How a stage-two fit runs: one validated settings object, built once from the CLI or from Python."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.errors import UsageError, choose
from features.runtime import available_memory_bytes

from .classifiers import DEFAULT_CLASSIFIER, DEFAULT_PREPROCESS, DEFAULT_SOLVER, get_classifier, parse_preprocess

SELECTORS = ("forward", "group-lasso")  # pipeline.tapselect's selectors


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    """Everything that defines a fit besides the data; equal options + equal file = reusable run."""

    clf: str = DEFAULT_CLASSIFIER
    preprocess: str = DEFAULT_PREPROCESS
    grid: list[float] | None = None
    folds: int = 3
    solver: str = DEFAULT_SOLVER
    hidden: int = 0
    device: str = "auto"
    memory_budget_mb: float | None = None  # above it, linear streams from HDF5 and svm/logreg refuse
    select: str = "forward"  # how --tap auto chooses its taps (pipeline.tapselect)
    select_threshold: float = 0.002  # the least CV-accuracy gain that adds a tap
    calibrate: bool = False  # probabilities calibrated on out-of-fold training scores (pipeline.calibration)
    prompts: str | None = None  # zeroshot: a file of prompt templates (default: open_clip's)

    def __post_init__(self):
        # Normalised once here (frozen afterwards): the canonical classifier name, a sorted float grid.
        object.__setattr__(self, "clf", get_classifier(self.clf).name)
        if get_classifier(self.clf).text:  # CLIP's embeddings compare with text as they are: no scaling
            if self.preprocess not in (DEFAULT_PREPROCESS, "none"):
                raise UsageError(f"--clf zeroshot compares the image embedding with text as it is; drop "
                                 f"--preprocess {self.preprocess}")
            object.__setattr__(self, "preprocess", "none")
        elif self.prompts:
            raise UsageError("--prompts is for --clf zeroshot")
        parse_preprocess(self.preprocess)  # validate early
        if self.folds < 2:
            raise UsageError(f"--folds must be at least 2, not {self.folds}")
        object.__setattr__(self, "grid", sorted(float(v) for v in (self.grid or get_classifier(self.clf).grid)))
        if not all(np.isfinite(v) and v > 0 for v in self.grid):
            raise UsageError(f"--grid values must be positive numbers, not {', '.join(f'{v:g}' for v in self.grid)}")
        if get_classifier(self.clf).whole_numbers and any(v != int(v) for v in self.grid):
            bad = ", ".join(f"{v:g}" for v in self.grid if v != int(v))
            raise UsageError(f"--grid for {self.clf} is {self.param}, a whole number, not {bad}")
        choose("tap selector (--select)", self.select, SELECTORS)
        if not 0 <= self.select_threshold < 1:
            raise UsageError(f"--select-threshold is a CV-accuracy gain between 0 and 1, not {self.select_threshold}")
        if self.hidden < 0:
            raise UsageError(f"--hidden must be 0 (a linear head) or more, not {self.hidden}")

    @property
    def param(self) -> str:
        """The regularisation the grid is over: ``C`` or ``weight_decay``."""
        return get_classifier(self.clf).param

    def as_dict(self) -> dict:
        return {"clf": self.clf, "preprocess": self.preprocess, "grid": self.grid, "folds": self.folds,
                "solver": self.solver, "hidden": self.hidden, "param": self.param,
                "memory_budget_mb": self.memory_budget_mb, "select": self.select,
                "select_threshold": self.select_threshold,
                # only when asked: runs made before the option keep their folder names
                **({"calibrate": True} if self.calibrate else {}),
                **({"prompts": self.prompts_digest()} if get_classifier(self.clf).text else {})}

    def prompts_digest(self) -> str:
        """The zero-shot templates' digest: an edited --prompts file is another run."""
        from features.files import digest

        from .classifiers import read_prompts

        return digest(list(read_prompts(self.prompts)))

    def budget_bytes(self) -> int:
        """Bytes an in-memory fit may use: ``--memory-budget``, or half the free RAM."""
        return int(self.memory_budget_mb * 2 ** 20) if self.memory_budget_mb else available_memory_bytes() // 2
