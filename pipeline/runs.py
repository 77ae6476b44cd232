"""Run folders: where a fit's results, model and plots live, and how a rerun finds them.

A run folder holds ``results.json`` (settings, per-seed splits and scores, chosen
values, fit times, the feature file's fingerprint, mean and std of every metric),
``model.joblib`` (the seed-0 model, its SHA-256 in the results), ``predictions.npz``
(every seed's test rows and predictions, for paired tests), ``confusion.png``
and ``per_class.csv``. Identical settings reuse the folder.
"""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np

from features.errors import TapsError
from features.files import NAME_DIGITS, check_output_folder, digest, file_sha256, path_safe
from features.store import FeatureFile

from .fusion import AUTO, SEPARATOR
from .results import RESULTS, Artifact, RunResult

MODEL = "model.joblib"
PREDICTIONS = "predictions.npz"


def run_settings(features: FeatureFile, *, tap: str, keys: list[str], fingerprint: str, pooling: str, fit: dict,
                 protocol: str, seeds: int, copies: bool = False) -> dict:
    """Everything that defines a run's result: the file (its path and ``fingerprint``), the tap spec
    (``keys``: the file keys it reads; for ``auto``, its candidates), ``fit`` (``FitOptions.settings``).
    A file with byte-identical images (``copies``) records that CV keeps an image's copies in one
    fold, so a run made before it did is not reused."""
    return {"features": str(features.path.resolve()), "features_fingerprint": fingerprint,
            "tap": tap if tap == AUTO else SEPARATOR.join(keys), "pooling": pooling, "protocol": protocol,
            "seeds": seeds, **fit, **({"candidates": keys} if tap == AUTO else {}),
            **({"cv_copies": "one fold"} if copies else {})}


def settings_digest(settings: dict) -> str:
    """Short stable id of a settings dict: equal settings, equal folder names."""
    return digest(settings, length=NAME_DIGITS)


def find_run(runs_root: Path | str, features: FeatureFile, settings: dict, *,
             force: bool = False) -> tuple[Path, RunResult | None]:
    """The folder of the run with ``settings``, and the results of an earlier run with exactly these
    settings and an intact model there (None when there is none, or with ``force``)."""
    name = path_safe(f"{features.attrs['backbone']}__{settings['tap']}__{settings['clf']}__"
                     f"{digest(settings, length=NAME_DIGITS)}")
    check_output_folder(Path(runs_root), "--runs-root")
    run_dir = Path(runs_root) / str(features.attrs["dataset"]) / name
    return run_dir, None if force else reusable(run_dir, settings)


def load_results(run_dir: Path) -> RunResult:
    """The run's results.json, checked (see :class:`pipeline.results.RunResult`)."""
    return RunResult.load(run_dir)


def load_model(run_dir: Path, results: RunResult):
    """The run's model, after checking its SHA-256 against the run record (joblib files run code on load)."""
    path = Path(run_dir) / results.model.file
    if not path.is_file():
        raise TapsError(f"model file {path} is missing; rerun `taps fit --force`")
    digest = file_sha256(path)
    if digest != results.model.sha256:
        raise TapsError(f"model file {path} does not match the SHA-256 in its {RESULTS}; refusing to load it "
                        f"(rerun `taps fit --force` if you changed it yourself)")
    model = joblib.load(path)
    if len(getattr(model, "classes_", [])) > len(results.classes):
        raise TapsError(f"{Path(run_dir) / RESULTS} names {len(results.classes)} classes but its model predicts "
                        f"{len(model.classes_)}; rerun `taps fit --force`")
    return model


def reusable(run_dir: Path, settings: dict) -> RunResult | None:
    """The results of an earlier run with exactly these settings and an intact model, or None."""
    if not (run_dir / RESULTS).is_file():
        return None
    try:
        results = load_results(run_dir)
        kept = [(run_dir / MODEL, results.model.sha256),
                (run_dir / PREDICTIONS, results.predictions and results.predictions.sha256)]
        if results.settings == settings and all(file_sha256(p) == digest for p, digest in kept):
            return results
    except (TapsError, OSError, KeyError):
        pass  # unreadable or stale: recompute
    return None


def save_model(run_dir: Path, model) -> Artifact:
    """Write the model file (fitted on seed 0's split); -> its record (file name and SHA-256)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, run_dir / MODEL)
    return Artifact(file=MODEL, sha256=file_sha256(run_dir / MODEL), seed=0)


def save_predictions(run_dir: Path, predictions: dict[str, np.ndarray]) -> Artifact:
    """Write every seed's test rows and predictions (what paired significance tests compare); -> their record."""
    run_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(run_dir / PREDICTIONS, **predictions)
    return Artifact(file=PREDICTIONS, sha256=file_sha256(run_dir / PREDICTIONS))


def load_predictions(run_dir: Path, results: RunResult) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per seed: (test rows of the feature file, predicted labels), checked against the run record."""
    path = Path(run_dir) / PREDICTIONS
    record = results.predictions
    if not record or not path.is_file() or file_sha256(path) != record.sha256:
        raise TapsError(f"{path} is missing or does not match its {RESULTS}; rerun `taps fit --force`")
    with np.load(path) as saved:
        return {s.seed: (saved[f"test_{s.seed}"], saved[f"pred_{s.seed}"]) for s in results.per_seed}
