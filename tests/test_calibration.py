"""fit --calibrate: calibrated probabilities against a case whose true probabilities are known."""

import json
from pathlib import Path

import numpy as np
from conftest import QUIET
from scipy.special import softmax

from pipeline.calibration import calibrate, expected_calibration_error
from pipeline.classifiers import make_classifier
from pipeline.cli import main


def test_temperature_scaling_brings_an_overconfident_model_to_the_true_probabilities():
    """Three Gaussian classes (unit variance, known means): the true posterior is a softmax of
    ``x @ means.T - |means|^2 / 2``. A barely regularised logreg on 150 rows with 40 noise columns is
    overconfident; calibrated on out-of-fold training scores it is close to the truth, argmax kept."""
    rng = np.random.default_rng(0)
    means = np.array([[1.0, 0.0], [-0.5, 0.9], [-0.5, -0.9]]) * 1.2

    def draw(n):
        y = rng.integers(0, 3, n)
        signal = means[y] + rng.normal(size=(n, 2))
        return np.hstack([signal, rng.normal(size=(n, 40))]), y, softmax(signal @ means.T - (means ** 2).sum(1) / 2,
                                                                            axis=1)

    X, y, _ = draw(150)
    Xt, yt, truth = draw(4000)
    model = make_classifier("logreg", C=1e4, device="cpu").fit(X, y)
    calibrated = calibrate(model, X, y, method="temperature", folds=3, random_state=0)
    before, after = model.predict_proba(Xt), calibrated.predict_proba(Xt)
    ece_before = expected_calibration_error(yt, before, model.classes_)
    ece_after = expected_calibration_error(yt, after, calibrated.classes_)
    assert ece_before > 0.1 and ece_after < ece_before / 2
    assert np.abs(after - truth).mean() < 0.8 * np.abs(before - truth).mean()  # its errors of rank remain
    np.testing.assert_array_equal(after.argmax(1), before.argmax(1))  # a temperature keeps every decision
    # the ECE itself: a model that says 0.8 and is right 80% of the time has none
    y8 = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(y8, np.tile([0.8, 0.2], (10, 1)), np.array([0, 1])) < 1e-12


def test_fit_calibrate_reports_the_calibration_error_and_predict_gives_svm_probabilities(world, tmp_path, capsys):
    args = ["fit", *world["data"], "--clf", "svm", "--device", "cpu", "--protocol", "per-class:5", "--calibrate",
            "--runs-root", str(tmp_path / "runs")]
    assert main(args) == 0
    out = capsys.readouterr().out
    run = out.strip().splitlines()[-1]
    assert "calibrated (sigmoid): expected calibration error on the test rows" in out
    metrics = json.loads((Path(run) / "results.json").read_text())["metrics"]
    assert 0 <= metrics["expected_calibration_error"]["mean"] <= 1
    assert "expected_calibration_error_uncalibrated" not in metrics  # an SVM's scores are no probabilities
    assert main(["predict", "--run", run, world["image"], *QUIET[:1]]) == 0
    assert "\tprobability=" in capsys.readouterr().out  # not score=: the calibrated model has probabilities
    assert main(args) == 0 and "reused" in capsys.readouterr().out  # --calibrate is part of the run's identity
