"""``--track mlflow[:URI]``: each fit as one MLflow run, each compare as a parent run with one
nested run per row (the ``track`` extra installs ``mlflow-skinny``).

What a run holds: the fit's settings as parameters (the feature file's backbone, weights,
preprocessing, the tap, classifier, grid, protocol, seeds), every metric per seed (``step`` =
seed) and its mean and spread over seeds, the chosen C / weight decay / k per seed, the chosen
taps of ``auto``, and the run folder's files as artifacts (results.json, the confusion matrix,
per-class table; a compare's table, JSON and tap chart on its parent run). The experiment is
the dataset's name. Without a URI the store is ``./mlruns`` (MLflow's file store, which taps
opts into with ``MLFLOW_ALLOW_FILE_STORE``); any tracking URI MLflow takes works
(``mlflow:http://host:5000``, ``mlflow:sqlite:///mlflow.db`` with the full ``mlflow`` package).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from features.errors import TapsError, UsageError
from features.runtime import reachable

from .results import RunResult

DEFAULT_URI = "file:./mlruns"
ARTIFACTS = ("results.json", "confusion.png", "per_class.csv")
COMPARE_ARTIFACTS = ("compare.csv", "compare.json", "compare.png")


@dataclass(frozen=True)
class Tracking:
    uri: str

    @classmethod
    def parse(cls, text: str | None) -> Tracking | None:
        """``mlflow`` or ``mlflow:URI`` (None: no tracking)."""
        if not text:
            return None
        kind, _, uri = text.partition(":")
        if kind != "mlflow":
            raise UsageError(f"--track takes mlflow or mlflow:URI (e.g. mlflow:file:./mlruns), not {text!r}")
        # found out before the fit, not after it (MLflow retries an unreachable server for minutes)
        if importlib.util.find_spec("mlflow") is None:
            raise UsageError("--track mlflow needs MLflow: pip install -e '.[track]' (mlflow-skinny)")
        uri = uri or DEFAULT_URI
        if uri.startswith(("http://", "https://")) and not reachable(uri):
            raise TapsError(f"the MLflow tracking server {uri} cannot be reached from here; start it, or pass "
                            f"--track mlflow for a local store (./mlruns)")
        return cls(uri)

    def client(self):
        try:
            import mlflow
        except ImportError:
            raise UsageError("--track mlflow needs MLflow: pip install -e '.[track]' (mlflow-skinny)") from None
        if self.uri.startswith("file:") or "://" not in self.uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store is what was asked for
        mlflow.set_tracking_uri(self.uri)
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not a line per created experiment
        return mlflow

    @contextmanager
    def run(self, experiment: str, name: str, nested: bool = False) -> Iterator[object]:
        mlflow = self.client()
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=name, nested=nested) as active:
            yield active


def _params(results: RunResult) -> dict[str, str]:
    f, s = results.features, results.settings
    params = {"backbone": f.backbone, "weights": f.weights, "transform": f.transform, "tap": f.tap, "dim": f.dim,
              "pooling": f.pooling, "precision": f.precision, "runtime": f.runtime, "features": f.path,
              **{k: v for k, v in s.items() if k not in ("features", "features_fingerprint", "candidates")}}
    return {k: str(v)[:500] for k, v in params.items()}  # MLflow caps parameter values


def log_fit(tracking: Tracking, run_dir: Path, results: RunResult, nested: bool = False) -> str:
    """One MLflow run for one fit; -> its run id."""
    mlflow = tracking.client()
    with tracking.run(results.features.dataset or Path(run_dir).parent.name, Path(run_dir).name, nested) as active:
        mlflow.log_params(_params(results))
        for seed in results.per_seed:
            mlflow.log_metrics({**seed.metrics, "fit_seconds": seed.fit_seconds}, step=seed.seed)
            mlflow.log_metric(f"chosen_{results.settings.get('param', 'C')}", float(seed.chosen), step=seed.seed)
        mlflow.log_metrics({f"{name}_{stat}": value for name, stats in results.metrics.items()
                            for stat, value in stats.items()})
        chosen_taps = ";".join("+".join(s.taps) for s in results.per_seed if s.taps)
        mlflow.set_tags({"taps.run_dir": str(Path(run_dir).resolve()), **({"taps.chosen_taps": chosen_taps}
                                                                          if chosen_taps else {})})
        for name in ARTIFACTS:
            if (Path(run_dir) / name).is_file():
                mlflow.log_artifact(str(Path(run_dir) / name))
        return active.info.run_id


def log_compare(tracking: Tracking, out: Path, rows: list[dict], load) -> str:
    """A parent run for a compare (its settings, table and chart) and one nested run per row
    (``load(run_dir)`` reads a row's results); -> the parent's run id."""
    import json

    mlflow = tracking.client()
    settings = json.loads((out / "compare.json").read_text())["settings"]
    with tracking.run(str(settings["dataset"]), out.name) as parent:
        mlflow.log_params({k: str(v)[:500] for k, v in settings.items() if k not in ("features", "dataset_fingerprint")})
        for name in COMPARE_ARTIFACTS:
            if (out / name).is_file():
                mlflow.log_artifact(str(out / name))
        for row in rows:
            log_fit(tracking, Path(row["run"]), load(Path(row["run"])), nested=True)
        best = next(r for r in rows if r["best"])
        mlflow.set_tags({"taps.best": f"{best['backbone']} {best['clf']} {best['tap']}"})
        return parent.info.run_id
