"""Few-shot curves (compare --shots): the draws, the statistics, and the CLI's reruns."""

import json
import shutil
from pathlib import Path

import numpy as np
from conftest import QUIET, TINY

from pipeline.cli import main
from pipeline.options import FitOptions
from pipeline.protocols import make_split, parse_protocol
from pipeline.shots import CurveRow, curve_points, draw_shots, format_curves, leaders, parse_shots


def test_draws_come_from_training_only_are_reproducible_nested_and_keep_small_classes_whole():
    labels = np.repeat([0, 1, 2], [30, 30, 4])  # class 2 is small
    pool, test = make_split(parse_protocol("fraction:0.5"), labels, None, seed=0)
    for k in (1, 2, 5):
        for attempt in range(3):
            draw = draw_shots(labels, pool, k, attempt)
            assert not np.intersect1d(draw, test).size and np.isin(draw, pool).all()
            counts = np.bincount(labels[draw], minlength=3)
            assert counts[0] == counts[1] == k and counts[2] == min(k, int((labels[pool] == 2).sum()))
            np.testing.assert_array_equal(draw, draw_shots(labels, pool, k, attempt))  # same seed, same draw
            assert np.isin(draw_shots(labels, pool, k - 1, attempt), draw).all() if k > 1 else True  # nested
    assert not np.array_equal(draw_shots(labels, pool, 5, 0), draw_shots(labels, pool, 5, 1))
    np.testing.assert_array_equal(draw_shots(labels, pool, None, 3), pool)
    assert parse_shots("10,all,1,2,2") == [1, 2, 10, None]


def test_a_curve_finds_the_set_that_wins_with_few_labels_and_the_one_that_wins_with_many():
    """'few' is 4-D and noisy (good from one image per class, capped low); 'many' hides a strong signal
    in 5 of 305 columns (poor until the fit has enough images to find it)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 120)
    few = rng.normal(size=(5, 4))[y] * 1.2 + rng.normal(size=(len(y), 4))
    many = np.hstack([rng.normal(size=(5, 5))[y] * 2.5 + rng.normal(size=(len(y), 5)) * 0.6,
                      rng.normal(size=(len(y), 300)) * 3.0])
    order = rng.permutation(len(y))
    pool, test = np.sort(order[:300]), np.sort(order[300:])
    options = FitOptions(clf="logreg")
    points = curve_points([CurveRow("few", few, options), CurveRow("many", many, options)], y, pool, test,
                          [1, 5, None], 3, log=lambda _: None)
    best = {p["shots"]: p["row"] for p in points if p["best"]}
    assert best == {"1": "few", "5": "few", "all": "many"}
    at = {(p["row"], p["shots"]): p for p in points}
    assert not at[("many", "1")]["tied"] and at[("many", "1")]["vs_best_high"] < 0  # significantly worse
    assert at[("few", "1")]["tries"] == 3 and at[("few", "all")]["tries"] == 1  # "all" is one draw
    assert at[("few", "1")]["low"] <= at[("few", "1")]["mean"] <= at[("few", "1")]["high"]
    assert at[("few", "1")]["selection"].startswith("fixed C=")  # one image per class: no fold
    assert leaders(points).startswith("few leads up to 5 shots, many from all images")


def test_a_one_shot_point_names_the_value_it_used_and_the_table_says_why_once():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 20)
    X = rng.normal(size=(3, 8))[y] + rng.normal(size=(len(y), 8))
    pool, test = np.arange(0, 60, 2), np.arange(1, 60, 2)
    rows = [CurveRow("knn", X, FitOptions(clf="knn")), CurveRow("logreg", X, FitOptions(clf="logreg"))]
    points = curve_points(rows, y, pool, test, [1], 2, log=lambda _: None)
    # k-NN's grid middle (20) is capped at the 3 training images: the point says the k that voted
    assert points[0]["selection"] == "fixed n_neighbors=3 (1 image of a class leaves no fold to choose by)"
    assert format_curves(points).splitlines()[-1] == (
        "regularisation: 1 shot: fixed n_neighbors=3, fixed C=0.1 (1 image of a class leaves no fold to choose by)")


def test_a_class_tested_but_never_drawn_for_training_is_named_under_the_curves():
    """A class the training side lacks (an official split whose test side has one more) cannot be
    predicted at any shot count: every point says so, and the table's note names it."""
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 20)
    X = rng.normal(size=(3, 8))[y] + rng.normal(size=(len(y), 8))
    pool, test = np.flatnonzero((np.arange(60) % 2 == 0) & (y < 2)), np.arange(1, 60, 2)
    points = curve_points([CurveRow("logreg", X, FitOptions(clf="logreg"))], y, pool, test, [2, None], 2,
                          classes=["a", "b", "c"], log=lambda _: None)
    assert [p["untrained_classes"] for p in points] == ["c", "c"]
    assert all(p["mean"] <= 2 / 3 + 1e-9 for p in points)  # c's test images are errors in every draw
    assert "note: 1 class(es) have test images but no training image: c; no draw can predict them" in \
        format_curves(points)


def test_compare_shots_writes_the_curve_and_a_rerun_fits_only_new_points(tiny_flat, tmp_path, capsys):
    args = ["compare", "--dataset", f"folder:{tiny_flat}", *TINY, *QUIET, "--taps", "layer2,avgpool",
            "--features-root", str(tmp_path / "fs"), "--runs-root", str(tmp_path / "runs"), "--tries", "2"]
    assert main([*args, "--shots", "1,all"]) == 0
    first = capsys.readouterr().out
    assert first.count("fitted ") == 2 * (2 + 1)
    assert "leads up to" in first or "is the best or tied with it at every shot count" in first  # who leads where
    folder = Path(first.strip().splitlines()[-1])
    saved = json.loads((folder / "shots.json").read_text())
    assert {(p["tap"], p["shots"]) for p in saved["points"]} == {(t, s) for t in ("layer2", "avgpool")
                                                                 for s in ("1", "all")}
    assert saved["settings"]["tries"] == 2 and (folder / "shots.png").stat().st_size > 0
    assert main([*args, "--shots", "1,3,all"]) == 0  # only 3 shots is new: 2 taps x 2 tries
    assert capsys.readouterr().out.count("fitted ") == 4
    assert main([*args, "--shots", "1,all", "--fuse"]) == 2  # auto needs CV, impossible at one shot
    assert "drop 1 from --shots" in capsys.readouterr().err
    assert main([*args, "--shots", "1,all", "--seeds", "3"]) == 2
    assert main([*args, "--shots", "0,2"]) == 2


def test_a_shot_pool_keeps_one_copy_of_an_image_in_both_splits_and_tests_without_it(tmp_path, image_folder):
    root = tmp_path / "split"
    image_folder(root / "train", classes=("a", "b"), per_class=4, seed=1)
    image_folder(root / "test", classes=("a", "b"), per_class=3, seed=2)
    shutil.copy(root / "test" / "a" / "img_000.jpg", root / "train" / "a" / "copy.jpg")
    assert main(["compare", "--dataset", f"folder:{root}", *TINY, *QUIET, "--taps", "avgpool", "--shots", "all",
                 "--tries", "1", "--features-root", str(tmp_path / "fs"), "--runs-root", str(tmp_path / "runs")]) == 0
    settings = json.loads(next((tmp_path / "runs").rglob("shots.json")).read_text())["settings"]
    # the copy trains (its test twin is dropped from the test side, as in every official split)
    assert (settings["training_pool"], settings["test_images"]) == (9, 5)


def test_a_one_shot_curve_over_many_classes_passes_on_no_regression_warning(tmp_path, image_folder, recwarn):
    # 22 classes, one image each: scikit-learn guesses from as many classes as samples (over 20) that the
    # target "could represent a regression problem", a false alarm the CLI does not pass on
    image_folder(tmp_path / "many", classes=tuple(f"c{i:02d}" for i in range(22)), per_class=3)
    assert main(["compare", "--dataset", f"folder:{tmp_path / 'many'}", *TINY, *QUIET, "--taps", "avgpool",
                 "--protocol", "per-class:2", "--shots", "1", "--tries", "1", "--features-root", str(tmp_path / "fs"),
                 "--runs-root", str(tmp_path / "runs")]) == 0
    assert not [w for w in recwarn if "regression problem" in str(w.message)]
