"""Beyond one tap: fused taps, --tap auto (forward and group-lasso selection), paired significance
tests and the LogME transferability score."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from features.store import FeatureFile
from pipeline.cli import main
from pipeline.evaluate import evaluate_tap, fit_run
from pipeline.fusion import column_groups, fusion_transformer
from pipeline.options import FitOptions
from pipeline.predict import predict_images
from pipeline.protocols import make_split, parse_protocol
from pipeline.runs import load_model, load_results
from pipeline.significance import bootstrap, interval, mcnemar, paired_difference
from pipeline.tapselect import group_lasso_ranking, select_taps
from pipeline.transfer import logme, logme_parameters

TAPS = ["layer1", "layer2", "layer3", "avgpool"]




def test_a_fused_fit_standardises_each_tap_and_equals_the_hand_concatenated_matrix(split_features, tmp_path):
    images, features = split_features
    protocol = parse_protocol("official")
    run_dir, results, _ = fit_run(features, "layer1+avgpool", "avg", FitOptions(clf="logreg", grid=[1.0], device="cpu"),
                                  protocol, runs_root=tmp_path)
    assert results.features.tap == "layer1+avgpool" and results.features.dim == 64 + 512
    assert [t.tap for t in results.features.taps] == ["layer1", "avgpool"]
    X = np.hstack([features.read("layer1"), features.read("avgpool")])
    train, test = make_split(protocol, features.labels, features.split, 0)
    model = load_model(run_dir, results)
    by_hand = np.hstack([(M - M[train].mean(0)) / np.where(M[train].std(0) > 0, M[train].std(0), 1)
                         for M in (features.read("layer1"), features.read("avgpool"))])
    np.testing.assert_allclose(model[:-1].transform(X), by_hand, rtol=1e-4, atol=1e-4)
    with np.load(run_dir / "predictions.npz") as saved:
        assert np.array_equal(saved["test_0"], test) and np.array_equal(saved["pred_0"], model.predict(X[test]))
    # per-tap L2 after standardising: every tap's block of a row has norm 1, whatever its width
    l2 = fusion_transformer(column_groups({"a": 64, "b": 512}), "l2").fit_transform(X[train])
    np.testing.assert_allclose(np.linalg.norm(l2[:, :64], axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(l2[:, 64:], axis=1), 1, rtol=1e-5)


def test_predict_rebuilds_every_fused_tap_in_one_pass(split_features, tiny_folder, tmp_path):
    images, features = split_features
    run_dir, results, _ = fit_run(features, "layer2+avgpool", "avg", FitOptions(clf="logreg", grid=[1.0], device="cpu"),
                                  parse_protocol("official"), runs_root=tmp_path)
    preds = predict_images(run_dir, [str(tiny_folder / i) for i in images.ids], device="cpu")
    X = np.hstack([features.read("layer2"), features.read("avgpool")])
    expected = load_model(run_dir, results).predict_proba(X)
    np.testing.assert_allclose([p.confidence for p in preds], expected.max(axis=1), rtol=0, atol=1e-5)


class PoisonedTestRows(FeatureFile):
    """The same file, but every tap's test rows replaced by loud noise."""

    test_rows: np.ndarray = np.array([], int)

    def matrix(self, key, **read):
        X = super().matrix(key, **read).copy()
        X[self.test_rows] = np.random.default_rng(0).normal(0, 1e3, (len(self.test_rows), X.shape[1]))
        return X


@pytest.mark.parametrize("select", ["forward", "group-lasso"])
def test_auto_chooses_its_taps_without_reading_the_test_split(split_features, select):
    _, features = split_features
    protocol = parse_protocol("official")
    options = FitOptions(clf="logreg", grid=[0.1, 1.0], device="cpu", select=select)
    clean = evaluate_tap(features, "auto", "avg", options, protocol, 2)
    poisoned = PoisonedTestRows(features.path)
    poisoned.test_rows = make_split(protocol, features.labels, features.split, 0)[1]
    dirty = evaluate_tap(poisoned, "auto", "avg", options, protocol, 2)
    assert [s.taps for s in dirty.per_seed] == [s.taps for s in clean.per_seed]
    assert [s.tap_selection["path"] for s in dirty.per_seed] == [s.tap_selection["path"] for s in clean.per_seed]
    assert [s.chosen for s in dirty.per_seed] == [s.chosen for s in clean.per_seed]
    # ... while the test rows really were read, for scoring only
    assert not np.array_equal(dirty.predictions["pred_0"], clean.predictions["pred_0"]) or \
        dirty.metrics != clean.metrics
    assert all(set(s.taps) <= set(TAPS) and s.tap_selection["method"] == select for s in clean.per_seed)


def _two_bit_problem(n=400, seed=0):
    """4 classes; tap a carries bit 0 of the class, tap b bit 1, c and d are noise: a or b alone reach
    half the classes, only a and b together all of them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    a = rng.normal(0, 1, (n, 8)) + 3 * (y % 2)[:, None]
    b = rng.normal(0, 1, (n, 12)) + 3 * (y // 2)[:, None]
    c, d = rng.normal(0, 1, (n, 20)), rng.normal(0, 1, (n, 6))
    return np.hstack([a, b, c, d]), y, column_groups({"a": 8, "b": 12, "c": 20, "d": 6})


@pytest.mark.parametrize("method", ["forward", "group-lasso"])
def test_both_selectors_find_the_two_complementary_taps_and_leave_out_noise(method):
    X, y, groups = _two_bit_problem()
    picked = select_taps(X, y, groups, method=method, random_state=0)
    assert picked.taps == ["a", "b"], picked.path
    if method == "forward":  # the path records every set tried, with its CV accuracy
        scores = {tuple(p["taps"]): p["cv_accuracy"] for p in picked.path}
        assert scores[("a", "b")] > 0.95 > 0.6 > max(scores[("a",)], scores[("b",)])
    norms = group_lasso_ranking(X, y, groups)
    assert min(norms["a"], norms["b"]) > 5 * max(norms["c"], norms["d"])


def test_mcnemar_matches_a_table_computed_by_hand():
    a = np.array([1] * 10 + [0] * 2 + [1] * 30 + [0] * 8)  # a right and b wrong: 10; a wrong and b right: 2
    b = np.array([0] * 10 + [1] * 2 + [1] * 30 + [0] * 8)
    only_a, only_b, p = mcnemar(a, b)
    assert (only_a, only_b) == (10, 2)
    assert p == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)  # two-sided exact binomial: 2 * P(X <= 2 | 12, 1/2)
    assert mcnemar(a, a) == (0, 0, 1.0)


def test_the_paired_bootstrap_interval_covers_a_known_difference_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    covered, trials = 0, 200
    # b copies a, then loses 10% of a's right answers and wins 15% of its wrong ones:
    # P(a right) - P(b right) = 0.8 - (0.8 * 0.9 + 0.2 * 0.15) = 0.05
    true_difference = 0.8 - (0.8 * 0.9 + 0.2 * 0.15)
    for trial in range(trials):
        a = rng.random(500) < 0.8
        b = np.where(a, rng.random(500) >= 0.10, rng.random(500) < 0.15)
        stats = bootstrap([[a], [b]], [np.ones(500)], resamples=400, seed=trial)
        d = paired_difference(stats, np.array([a.mean(), b.mean()]), [[a], [b]], 0, 1)
        covered += d.low <= true_difference <= d.high
    assert 0.90 <= covered / trials <= 0.99


def test_seeds_that_share_their_test_images_share_their_resamples():
    # an official split scored with 3 seeds (or a shot curve's 3 tries): one test set, so its sampling noise is
    # one draw's; the interval must be as wide as one seed's, not narrowed as if each seed had its own images
    rng = np.random.default_rng(4)
    a, b = rng.random(300) < 0.8, rng.random(300) < 0.7
    test = rng.permutation(1000)[:300]

    def width(samples, seeds):
        stats = bootstrap([[a] * seeds, [b] * seeds], [np.ones(300)] * seeds, samples=samples, resamples=2000)
        low, high = interval(stats[0] - stats[1])
        return high - low

    one = width([test], 1)
    assert width([test] * 3, 3) == pytest.approx(one, rel=0.08)
    assert width(None, 3) == pytest.approx(one * np.sqrt(5 / 9), rel=0.08)  # distinct images: averaged down


def test_mean_per_class_bootstrap_is_centred_on_the_metric_and_pairs_rows():
    from sklearn.metrics import balanced_accuracy_score

    from pipeline.significance import sample_weights

    rng = np.random.default_rng(2)
    y = np.repeat([0, 1, 2], [100, 30, 10])
    pred = np.where(rng.random(len(y)) < 0.8, y, (y + 1) % 3)
    stats = bootstrap([[pred == y], [pred == y]], [sample_weights(y, "mean_per_class_accuracy")], resamples=300)
    assert abs(np.median(stats[0]) - balanced_accuracy_score(y, pred)) < 0.02
    assert np.array_equal(stats[0], stats[1])  # identical rows: every paired difference is exactly 0


def test_logme_is_the_maximised_log_evidence_and_ranks_informative_features_first():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 150)
    informative = rng.normal(0, 1, (150, 10)) + 2 * np.eye(3)[y] @ rng.normal(0, 1, (3, 10))
    noise = rng.normal(0, 1, (150, 10))
    assert logme(informative, y) > logme(noise, y) + 0.1
    column = (y == 1).astype(float)
    evidence, alpha, beta = logme_parameters(informative, column)
    F = (informative - informative.mean(0)) / informative.std(0)
    direct = multivariate_normal(np.zeros(150), np.eye(150) / beta + F @ F.T / alpha).logpdf(column) / 150
    assert evidence == pytest.approx(direct, rel=1e-6)
    # fewer samples than dimensions: the n x n Gram path gives what the d x d path gives
    wide, y40 = rng.normal(0, 1, (40, 60)), y[:40]
    per_class = [logme_parameters(wide, (y40 == k).astype(float))[0] for k in range(3)]
    assert logme(wide, y40) == pytest.approx(np.mean(per_class), rel=1e-6)


@pytest.mark.slow
def test_compare_fuse_marks_best_and_ties_and_writes_every_pair(tiny_folder, tmp_path, capsys):
    args = ["compare", "--dataset", f"folder:{tiny_folder}", "--backbone", "resnet18", "--weights", "none",
            "--image-size", "32", "--taps", "layer1,layer2,avgpool,layer1+avgpool", "--fuse", "--clf", "logreg,knn",
            "--grid", "", "--seeds", "2", "--no-progress", "--workers", "0", "--device", "cpu",
            "--features-root", str(tmp_path / "fs"), "--runs-root", str(tmp_path / "runs")]
    assert main(args) == 0
    out = capsys.readouterr().out
    folder = next((tmp_path / "runs").rglob("compare.json")).parent
    assert out.strip().splitlines()[-1] == str(folder)
    data = json.loads((folder / "compare.json").read_text())
    rows = data["rows"]
    assert [(r["clf"], r["tap"]) for r in rows] == [(c, t) for c in ("logreg", "knn")
                                                     for t in ("layer1", "layer2", "avgpool", "layer1+avgpool", "auto")]
    assert sum(r["best"] for r in rows) == 1 and len(data["pairs"]) == 10 * 9 // 2
    for r in rows:
        assert r["interval_low"] <= r["metrics"]["mean_per_class_accuracy"]["mean"] <= r["interval_high"] + 1e-9
        if not r["best"]:
            assert r["tied"] == (r["vs_best_low"] <= 0 <= r["vs_best_high"])
            assert len(r["vs_best_mcnemar_p"]) == 2
    fused = [r for r in rows if r["depth"] is None]
    assert all(r["gain_over_best_single"]["tap"] in ("layer1", "layer2", "avgpool") for r in fused)
    # each row's pooling is what its taps were read with: a vector is not pooled, a set lists its members'
    assert {r["tap"]: r["pooling"] for r in rows if r["tap"] != "auto"} == {
        "layer1": "avg", "layer2": "avg", "avgpool": "none", "layer1+avgpool": "avg+none"}
    chosen = [r for r in rows if r["tap"] == "auto"]
    assert all(r["pooling"] == json.loads((Path(r["run"]) / "results.json").read_text())["features"]["pooling"]
               for r in chosen)
    assert sum("95% interval" in line for line in out.splitlines()) == 4  # one gain per fused row
    # the pick made without the test rows: the highest CV accuracy (over seeds, at the C chosen), auto aside
    for r in rows:
        per_seed = json.loads((Path(r["run"]) / "results.json").read_text())["per_seed"]
        assert r["cv_accuracy"] == pytest.approx(np.mean([max(s["cv_accuracy"]) for s in per_seed]), abs=1e-5)
    pick = [r for r in rows if r["cv_pick"]]
    assert len(pick) == 1 and pick[0]["tap"] != "auto"
    assert pick[0]["cv_accuracy"] == max(r["cv_accuracy"] for r in rows if r["tap"] != "auto")
    line = next(x for x in out.splitlines() if x.startswith("picked on the training splits alone"))
    assert f": resnet18 {pick[0]['clf']} {pick[0]['tap']}, " in line
    assert "CV's pick" in next(x for x in out.splitlines() if x.split()[1:3] == [pick[0]["clf"], pick[0]["tap"]])
    assert [a["taps"] for a in data["rank_agreement"]] == [3, 3]
    assert all(r["logme"] is not None for r in rows if r["depth"] is not None)
    assert (folder / "compare.png").stat().st_size > 1000


def test_compare_score_ranks_taps_without_fitting(tiny_folder, tmp_path, capsys):
    args = ["compare", "--dataset", f"folder:{tiny_folder}", "--backbone", "resnet18", "--weights", "none",
            "--image-size", "32", "--taps", "layer1,layer2,avgpool", "--score", "--no-progress", "--workers", "0",
            "--device", "cpu", "--features-root", str(tmp_path / "fs"), "--runs-root", str(tmp_path / "runs")]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    ranked = [line.split() for line in lines[header + 1:header + 4]]
    assert [r[0] for r in ranked] == ["1", "2", "3"] and {r[2] for r in ranked} == {"layer1", "layer2", "avgpool"}
    scores = [float(r[4]) for r in ranked]
    assert scores == sorted(scores, reverse=True) and "no fit" in lines[-2]
    assert not list((tmp_path / "runs").rglob("results.json"))  # nothing fitted: the ranking alone is kept
    assert (Path(lines[-1]) / "score.csv").is_file()


def test_fused_fits_refuse_to_stream(split_features, tmp_path):
    from features.errors import TapsError

    _, features = split_features
    with pytest.raises(TapsError, match="fused taps are fitted in memory"):
        fit_run(features, "layer1+avgpool", "avg", FitOptions(clf="linear", memory_budget_mb=0.001, device="cpu"),
                parse_protocol("official"), runs_root=tmp_path)


def test_fit_tap_auto_through_the_cli_prints_the_sets_it_chose(tiny_folder, tmp_path, capsys):
    data = ["--dataset", f"folder:{tiny_folder}", "--backbone", "resnet18", "--weights", "none", "--image-size", "32",
            "--features-root", str(tmp_path / "fs")]
    assert main(["extract", *data, "--taps", ",".join(TAPS), "--no-progress", "--workers", "0", "--device", "cpu"]) == 0
    assert main(["fit", *data, "--tap", "auto", "--clf", "logreg", "--seeds", "2", "--device", "cpu",
                 "--runs-root", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "--tap auto (forward) chose: seed 0 " in out and "; seed 1 " in out
    results = load_results(next((tmp_path / "runs").rglob("results.json")).parent)
    assert results.settings["candidates"] == TAPS
    assert all(s.tap_selection["path"] for s in results.per_seed)
    assert results.features.tap == "+".join(results.per_seed[0].taps)
