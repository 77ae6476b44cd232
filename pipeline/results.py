"""A run's results as typed records, and the one place they are written to and read from JSON.

``results.json`` keeps its layout (older run folders still read): :meth:`RunResult.to_json`
writes the same keys in the same order, :meth:`RunResult.from_json` checks what predict and
reuse need and fills what older files lack.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from features.errors import TapsError, UsageError

RESULTS = "results.json"
RUNS_ROOT = "runs"  # where fit and compare write run folders, one folder per dataset


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """A file of the run folder, pinned by its SHA-256."""

    file: str
    sha256: str
    seed: int | None = None  # the model: the split seed it was fitted on

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k != "seed"}


@dataclass(frozen=True, kw_only=True)
class TapUsed:
    """One tap the saved model reads, as the feature file made it."""

    tap: str
    node: str
    pooling: str
    dim: int
    precision: str
    decode: str
    runtime: str
    int8: str | None = None    # int8 taps: the file's record of their quantised model (JSON)
    export: str | None = None  # exported runtimes: the keys of the taps the export computed together
    compiled: int = 0          # torch: made by a torch.compile'd forward, for batches padded to this size
    orientation: str | None = None  # whether its images were turned by EXIF (None: runs from before, as stored)

    def to_json(self) -> dict:
        optional = {"int8": None, "export": None, "compiled": 0, "orientation": None}  # written when set
        return {k: v for k, v in asdict(self).items() if k not in optional or v != optional[k]}


@dataclass(frozen=True, kw_only=True)
class FeaturesUsed:
    """The feature file a run read: its settings and the taps the saved model reads (joined by ``+``
    when fused; ``taps`` lists each)."""

    backbone: str
    weights: str
    weights_sha256: str | None = None
    transform: str
    image_size: int | None
    dataset: str | None = None
    dataset_fingerprint: str | None = None
    path: str | None = None
    tap: str
    node: str
    pooling: str
    dim: int
    precision: str | None = None
    decode: str | None = None
    runtime: str | None = None
    taps: tuple[TapUsed, ...] = ()

    @classmethod
    def from_json(cls, data: dict) -> FeaturesUsed:
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known},
                      "taps": tuple(TapUsed(**{"runtime": None, **t}) for t in data.get("taps", []))})


@dataclass(frozen=True, kw_only=True)
class SeedResult:
    """One seeded split: its sizes and digests, what was chosen on its training rows, its scores."""

    seed: int
    n_train: int
    n_test: int
    train_digest: str
    test_digest: str
    taps: list[str]
    tap_selection: dict | None = None  # --tap auto: method, seconds, path
    chosen: float | None
    cv_folds: int | None = None
    selection: str
    cv_accuracy: list[float] | None = None
    fit_seconds: float
    predict_seconds: float = 0.0
    metrics: dict[str, float]

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k != "tap_selection"}

    @classmethod
    def from_json(cls, data: dict) -> SeedResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """Everything a run folder records about its fit."""

    settings: dict              # what defines the run (its folder name is their digest)
    features: FeaturesUsed
    classes: list[str]
    split_seeds: list[int]
    seeds_vary: str = ""
    duplicates: dict = field(default_factory=dict)
    undecodable: int = 0        # images the extraction could not decode: in no split
    untested_classes: list[str] = field(default_factory=list)  # classes with no test image in some seed's split
    untrained_classes: list[str] = field(default_factory=list)  # classes tested but not trained on in some seed's split
    fewest_test_images: dict = field(default_factory=dict)  # seed 0's tested class with the fewest test images
    near_copies: dict = field(default_factory=dict)  # seed 0's test images with a near-copy in training
    per_seed: list[SeedResult]
    chosen: dict[str, list]     # the selected parameter's value per seed
    grid: dict[str, list]
    fit_seconds: dict[str, float]
    metrics: dict[str, dict[str, float]]  # metric -> mean and std over seeds
    model: Artifact
    predictions: Artifact | None = None
    created: str = ""

    @property
    def param(self) -> str:
        """The name of the parameter the fit selected (C, k, ...)."""
        return next(iter(self.chosen))

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        features = {**asdict(self.features), "taps": [t.to_json() for t in self.features.taps]}
        return {**data, "features": features, "per_seed": [s.to_json() for s in self.per_seed],
                "model": self.model.to_json(), "predictions": self.predictions and self.predictions.to_json()}

    @classmethod
    def from_json(cls, data: dict, path: Path) -> RunResult:
        missing = [k for k in REQUIRED if not _has(data, k)]
        if missing:
            raise TapsError(f"{path} lacks {', '.join(missing)} (edited or from another tool); "
                            f"rerun `taps fit --force`")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{**{k: v for k, v in data.items() if k in known},
                          "features": FeaturesUsed.from_json(data["features"]),
                          "per_seed": [SeedResult.from_json(s) for s in data.get("per_seed", [])],
                          "model": Artifact(**data["model"]),
                          "predictions": Artifact(**data["predictions"]) if data.get("predictions") else None})
        except TypeError as exc:  # a record without one of its fields
            raise TapsError(f"{path} does not hold a run's results ({exc}); rerun `taps fit --force`") from None

    def save(self, run_dir: Path) -> None:
        """Write results.json whole or not at all (it marks the run as finished)."""
        tmp = run_dir / (RESULTS + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(run_dir / RESULTS)

    @classmethod
    def load(cls, run_dir: Path) -> RunResult:
        path = Path(run_dir) / RESULTS
        if not path.is_file():
            raise UsageError(f"{run_dir} is not a run folder (no {RESULTS}); pass the folder `taps fit` printed")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise TapsError(f"{path} is not valid JSON ({exc}); rerun `taps fit --force`") from None
        if not isinstance(data, dict):
            raise TapsError(f"{path} does not hold a run's results; rerun `taps fit --force`")
        return cls.from_json(data, path)


# What predict and reuse read from results.json ("a.b" is key b inside a).
REQUIRED = ("settings", "classes", "model.file", "model.sha256", "features.backbone", "features.weights",
            "features.transform", "features.image_size", "features.tap", "features.node", "features.pooling",
            "features.dim")


def _has(results: dict, dotted: str) -> bool:
    node = results
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
