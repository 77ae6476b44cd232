"""How a stage-two fit runs: one validated settings object, built once from the CLI or from Python."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from features.errors import UsageError
from features.files import digest
from features.runtime import available_memory_bytes

from .classifiers import (
    DEFAULT_CLASSIFIER,
    DEFAULT_PREPROCESS,
    DEFAULT_SOLVER,
    TEXT_PREPROCESS,
    get_classifier,
    parse_preprocess,
    read_prompts,
    text_classifiers,
)
from .tapselectors import DEFAULT_SELECTOR, get_selector


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    """Everything that defines a fit besides the data; equal options + equal file = reusable run.

    Validated and completed once, when made: ``param`` (what the grid selects), ``settings`` (what
    a run folder records of them) and ``budget`` (the bytes an in-memory fit may use) are derived
    here, so the fit reads them instead of asking again."""

    clf: str = DEFAULT_CLASSIFIER
    preprocess: str = DEFAULT_PREPROCESS
    grid: list[float] | None = None
    folds: int = 3
    solver: str = DEFAULT_SOLVER
    hidden: int = 0
    device: str = "auto"
    memory_budget_mb: float | None = None  # above it, linear streams from HDF5 and svm/logreg refuse
    select: str = DEFAULT_SELECTOR  # how --tap auto chooses its taps (pipeline.tapselect)
    select_threshold: float = 0.002  # the least CV-accuracy gain that adds a tap
    calibrate: bool = False  # probabilities calibrated on out-of-fold training scores (pipeline.calibration)
    prompts: str | None = None  # zeroshot: a file of prompt templates (default: open_clip's)
    param: str = field(init=False, compare=False)  # the regularisation the grid is over: C, weight_decay, k
    budget: int = field(init=False, compare=False, repr=False)  # --memory-budget in bytes, or half the free RAM
    settings: dict = field(init=False, compare=False, repr=False)  # what a run records of these options

    def __post_init__(self):
        # Normalised once here (frozen afterwards): the canonical classifier name, a sorted float grid.
        self._check_numbers()
        record = get_classifier(self.clf)
        preprocess = self.preprocess
        if record.text:  # CLIP's embeddings compare with text as they are: no scaling
            if preprocess not in (DEFAULT_PREPROCESS, TEXT_PREPROCESS):
                raise UsageError(f"--clf {record.name} compares the image embedding with text as it is; drop "
                                 f"--preprocess {preprocess}")
            preprocess = TEXT_PREPROCESS
        elif self.prompts:
            raise UsageError(f"--prompts is for --clf {', '.join(text_classifiers())}")
        parse_preprocess(preprocess)  # validate early
        grid = sorted(float(v) for v in (self.grid or record.grid))
        if not all(np.isfinite(v) and v > 0 for v in grid):
            raise UsageError(f"--grid values must be positive numbers, not {', '.join(f'{v:g}' for v in grid)}")
        if record.whole_numbers and any(v != int(v) for v in grid):
            bad = ", ".join(f"{v:g}" for v in grid if v != int(v))
            raise UsageError(f"--grid for {record.name} is {record.param}, a whole number, not {bad}")
        budget = int(self.memory_budget_mb * 2 ** 20) if self.memory_budget_mb else available_memory_bytes() // 2
        settings = {"clf": record.name, "preprocess": preprocess, "grid": grid, "folds": self.folds,
                    "solver": self.solver, "hidden": self.hidden, "param": record.param,
                    "memory_budget_mb": self.memory_budget_mb, "select": self.select,
                    "select_threshold": self.select_threshold,
                    # only when asked: runs made before the option keep their folder names
                    **({"calibrate": True} if self.calibrate else {}),
                    # the zero-shot templates' digest: an edited --prompts file is another run
                    **({"prompts": digest(list(read_prompts(self.prompts)))} if record.text else {})}
        for name, value in (("clf", record.name), ("preprocess", preprocess), ("grid", grid), ("param", record.param),
                            ("budget", budget), ("settings", settings)):
            object.__setattr__(self, name, value)

    def _check_numbers(self) -> None:
        if self.folds < 2:
            raise UsageError(f"--folds must be at least 2, not {self.folds}")
        get_selector(self.select)
        if not 0 <= self.select_threshold < 1:
            raise UsageError(f"--select-threshold is a CV-accuracy gain between 0 and 1, not {self.select_threshold}")
        if self.hidden < 0:
            raise UsageError(f"--hidden must be 0 (a linear head) or more, not {self.hidden}")

