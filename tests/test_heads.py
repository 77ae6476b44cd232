"""Classifiers: scikit-learn's estimator checks, separable data, agreement with the reference solvers."""

import joblib
import numpy as np
import pytest
from sklearn.datasets import make_blobs, make_classification
from sklearn.model_selection import cross_val_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.classifiers import make_classifier
from pipeline.heads import KNNProbe, LinearSVM, SoftmaxRegression, TorchLinearHead
from pipeline.options import FitOptions
from pipeline.selection import SelectedClassifier, selector


def _applicable_checks():
    """scikit-learn's estimator checks, minus the array-API ones (they need SCIPY_ARRAY_API and an array
    library; stage two only ever passes numpy arrays read from HDF5)."""
    mark = parametrize_with_checks([LinearSVM(), SoftmaxRegression(), TorchLinearHead(lr=0.01, max_epochs=100),
                                    KNNProbe(n_neighbors=3)])
    pairs = [(est, check) for est, check in mark.args[1]
             if "array_api" not in check.func.__name__]
    return pytest.mark.parametrize("estimator, check", pairs, ids=mark.kwargs["ids"])


@_applicable_checks()
def test_sklearn_estimator_contract(estimator, check):
    check(estimator)


@pytest.mark.parametrize("clf", ["svm", "logreg", "linear", "ridge"])
def test_separable_embeddings_are_learned(clf):
    X, y = make_blobs(n_samples=300, centers=5, n_features=64, cluster_std=1.0, random_state=0)
    scores = cross_val_score(make_classifier(clf), X, y, cv=3)
    assert scores.mean() > 0.98


@pytest.mark.parametrize("head", [LinearSVM(C=0.05), SoftmaxRegression(C=0.05)])
def test_torch_solver_matches_sklearn_reference(head):
    X, y = make_classification(n_samples=400, n_features=40, n_informative=20, n_classes=4, random_state=1)
    ours = head.fit(X, y)
    ref = type(head)(C=head.C, solver="sklearn").fit(X, y)
    assert np.mean(ours.predict(X) == ref.predict(X)) > 0.97
    # liblinear also penalises the intercept, so weights agree closely but not exactly.
    assert np.corrcoef(ours.coef_.ravel(), ref.coef_.ravel())[0, 1] > 0.99


def test_warm_start_reuses_the_previous_solution():
    X, y = make_classification(n_samples=300, n_features=30, n_classes=3, n_informative=10, random_state=0)
    cold = SoftmaxRegression(C=1.0).fit(X, y)
    warm = SoftmaxRegression(C=0.5, warm_start=True).fit(X, y).set_params(C=1.0).fit(X, y)
    assert warm.n_iter_ < cold.n_iter_
    assert np.allclose(warm.coef_, cold.coef_, atol=1e-2)


def test_linear_head_pickles_and_predicts_proba(tmp_path):
    X, y = make_blobs(n_samples=120, centers=3, n_features=8, random_state=0)
    head = TorchLinearHead(hidden=16, max_epochs=50).fit(X, np.array(["a", "b", "c"])[y])
    joblib.dump(head, tmp_path / "m.joblib")
    back = joblib.load(tmp_path / "m.joblib")
    p = back.predict_proba(X)
    assert p.shape == (120, 3) and np.allclose(p.sum(1), 1) and list(back.classes_) == ["a", "b", "c"]
    assert (back.predict(X) == head.predict(X)).all()


def test_selection_records_its_cv_and_refits_the_chosen_value_on_all_the_data():
    X, y = make_classification(n_samples=120, n_features=20, n_informative=8, n_classes=3, random_state=0)
    selected = selector(FitOptions(clf="logreg", grid=[1e-3, 1e-1, 10.0], folds=50, device="cpu")).fit(X, y)
    smallest = int(np.bincount(y).min())
    assert selected.cv_folds_ == smallest and selected.selection_.startswith(f"{smallest}-fold CV (asked for 50")
    assert len(selected.cv_scores_) == 3 and selected.chosen_ == [1e-3, 1e-1, 10.0][int(np.argmax(selected.cv_scores_))]
    refit = make_classifier("logreg", device="cpu", C=selected.chosen_).fit(X, y)
    assert np.array_equal(selected.predict(X), refit.predict(X))
    fixed = selector(FitOptions(clf="logreg", grid=[0.5], device="cpu")).fit(X, y)
    assert fixed.cv_folds_ == 1 and fixed.cv_scores_ is None and fixed.chosen_ == 0.5
    with pytest.raises(ValueError, match="at least 2 training images in every class, but the smallest class has 1"):
        selector(FitOptions(clf="logreg", grid=[0.1, 1.0])).fit(X[:4], [0, 1, 2, 2])
    with pytest.raises(ValueError, match="'folds' parameter"):  # scikit-learn's parameter validation
        SelectedClassifier(make_classifier("logreg"), folds=1).fit(X, y)


def test_ridge_is_scikit_learns_ridge_classifier_with_alpha_chosen_by_cv():
    """--clf ridge is one record: scikit-learn's RidgeClassifier behind the standard scaler, its alpha
    chosen from the grid by the same CV as every classifier, then refitted on all the data."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.preprocessing import StandardScaler

    from pipeline.calibration import calibration_method

    X, y = make_classification(n_samples=150, n_features=30, n_informative=10, n_classes=3, random_state=2)
    options = FitOptions(clf="ridge")
    assert options.param == "alpha" and len(options.grid) > 1
    selected = selector(options).fit(X, y)
    assert selected.chosen_ == options.grid[int(np.argmax(selected.cv_scores_))]
    reference = RidgeClassifier(alpha=selected.chosen_).fit(StandardScaler().fit_transform(X), y)
    head = selected.model_.steps[-1][1]
    assert isinstance(head, RidgeClassifier) and np.allclose(head.coef_, reference.coef_)
    assert not hasattr(head, "predict_proba") and calibration_method("ridge") == "sigmoid"  # scores: Platt scaling


def test_linear_head_learns_incrementally_with_partial_fit():
    X, y = make_blobs(n_samples=600, centers=4, n_features=16, random_state=1)
    labels = np.array(["a", "b", "c", "d"])[y]
    head = TorchLinearHead(lr=0.01, batch_size=32, device="cpu")
    with pytest.raises(ValueError, match="classes must be passed on the first call"):
        TorchLinearHead().partial_fit(X[:10], labels[:10])
    rng = np.random.default_rng(0)
    for _ in range(5):  # epochs, fed in shuffled chunks as streaming from HDF5 does
        for chunk in np.array_split(rng.permutation(len(X)), 6):
            head.partial_fit(X[chunk], labels[chunk], classes=labels)
    assert list(head.classes_) == ["a", "b", "c", "d"] and (head.predict(X) == labels).mean() > 0.95
    with pytest.raises(ValueError, match=r"labels \['e'\] outside the classes"):
        head.partial_fit(X[:2], np.array(["a", "e"]))
    with pytest.raises(ValueError, match="features"):
        head.partial_fit(X[:2, :8], labels[:2])


def test_knn_probe_matches_a_brute_force_reference_in_any_batching():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 16)), rng.integers(0, 4, 200)
    Q = rng.normal(size=(37, 16))
    probe = KNNProbe(n_neighbors=7, temperature=0.1, device="cpu").fit(X, y)
    # the reference: cosine similarities, the 7 most similar, exp(s / T) votes per class
    Xn, Qn = X / np.linalg.norm(X, axis=1, keepdims=True), Q / np.linalg.norm(Q, axis=1, keepdims=True)
    sims = Qn @ Xn.T
    top = np.argsort(-sims, axis=1)[:, :7]
    votes = np.zeros((len(Q), 4))
    for i, row in enumerate(top):
        np.add.at(votes[i], y[row], np.exp(sims[i, row] / 0.1))
    expected = votes / votes.sum(1, keepdims=True)
    for budget in (1 << 25, 200 * 5):  # one batch, or batches of 5 queries
        probe.set_params(max_similarities=budget)
        np.testing.assert_allclose(probe.predict_proba(Q), expected, rtol=1e-5, atol=1e-6)
    assert np.array_equal(probe.predict(Q), np.argmax(expected, axis=1))


def test_knn_is_a_classifier_of_the_cli_with_k_chosen_by_cv(tiny_flat, tmp_path, capsys):
    from pipeline.cli import main

    common = ["--dataset", f"folder:{tiny_flat}", "--backbone", "resnet18", "--weights", "none", "--image-size",
              "32", "--features-root", str(tmp_path)]
    assert main(["extract", *common, "--no-progress", "--workers", "0"]) == 0
    assert main(["fit", *common, "--clf", "knn", "--grid", "1,3,5", "--protocol", "per-class:6", "--device", "cpu",
                 "--runs-root", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "fitted knn on avgpool" in out and "n_neighbors by 3-fold CV" in out
