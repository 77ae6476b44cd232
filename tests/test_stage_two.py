"""Protocols, fit runs, predict and compare on tiny synthetic data (weights=None nets)."""

import json

import numpy as np
import pytest

from features.backbones import Backbone
from features.datasets import load_dataset
from features.errors import UsageError
from features.options import ExtractOptions
from pipeline.compare import compare_taps
from pipeline.evaluate import fit_run
from pipeline.options import FitOptions
from pipeline.predict import predict_images
from pipeline.protocols import check_protocol, make_split, parse_protocol
from pipeline.report import format_table
from pipeline.runs import load_results


def test_per_class_splits_are_disjoint_seed_stable_and_counted():
    labels = np.repeat(np.arange(4), [10, 12, 15, 40])
    p = parse_protocol("per-class:5", test_per_class=6)
    train, test = make_split(p, labels, None, seed=3)
    again, _ = make_split(p, labels, None, seed=3)
    other, _ = make_split(p, labels, None, seed=4)
    assert not set(train) & set(test)
    assert np.bincount(labels[train]).tolist() == [5, 5, 5, 5]
    assert np.bincount(labels[test]).tolist() == [5, 6, 6, 6]
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_fraction_and_official_splits():
    labels = np.repeat(np.arange(2), 50)
    train, test = make_split(parse_protocol("fraction:0.3"), labels, None, seed=0)
    assert len(train) == 30 and len(test) == 70 and not set(train) & set(test)
    split = ["train"] * 60 + ["val"] * 40
    train, test = make_split(parse_protocol("official"), labels, split, seed=0)
    assert train.tolist() == list(range(60)) and test.tolist() == list(range(60, 100))


@pytest.mark.parametrize("text", ["per-class:0", "fraction:1.5", "fraction:0", "per-class:x", "holdout"])
def test_bad_protocols_are_rejected(text):
    with pytest.raises(UsageError):
        parse_protocol(text)


def test_infeasible_protocols_name_the_class():
    labels = np.repeat(np.arange(2), [50, 8])
    with pytest.raises(UsageError, match="'b' has 8"):
        check_protocol(parse_protocol("per-class:40"), labels, ["a", "b"], None)
    with pytest.raises(UsageError, match="train split"):
        check_protocol(parse_protocol("official"), labels, ["a", "b"], None)




@pytest.mark.parametrize("clf", ["svm", "logreg", "linear"])
def test_fit_run_writes_a_round_tripping_run_and_reuses_it(tiny_features, tmp_path, clf):
    _, features, _ = tiny_features
    options = FitOptions(clf=clf, grid=[0.01, 1.0] if clf != "linear" else [1e-4, 1e-2], device="cpu")
    run_dir, results, reused = fit_run(features, "avgpool", "avg", options, parse_protocol("per-class:5"), seeds=2,
                                       runs_root=tmp_path)
    assert not reused and (run_dir / "model.joblib").is_file() and (run_dir / "confusion.png").is_file()
    assert load_results(run_dir) == results  # the typed record survives results.json unchanged
    for metric in ("accuracy", "mean_per_class_accuracy", "macro_f1"):
        per_seed = [s.metrics[metric] for s in results.per_seed]
        assert results.metrics[metric] == {"mean": pytest.approx(np.mean(per_seed)), "std": pytest.approx(np.std(per_seed))}
    assert [s.seed for s in results.per_seed] == [0, 1] and results.per_seed[0].n_train == 15
    assert results.chosen[options.param][0] in options.grid
    again_dir, _, reused = fit_run(features, "avgpool", "avg", options, parse_protocol("per-class:5"), seeds=2,
                                   runs_root=tmp_path)
    assert reused and again_dir == run_dir


def test_predict_returns_training_labels_and_refuses_tampered_models(tiny_features, tiny_flat, tmp_path):
    _, features, _ = tiny_features
    options = FitOptions(clf="logreg", grid=[1.0], device="cpu")
    run_dir, _, _ = fit_run(features, "avgpool", "avg", options, parse_protocol("fraction:0.9"), runs_root=tmp_path)
    results = load_results(run_dir)
    assert results.features.decode == features.taps["avgpool"].decode  # predict decodes the same way
    images = sorted(tiny_flat.glob("*/img_00[0-2].jpg"))
    preds = predict_images(run_dir, [str(p) for p in images], device="cpu")
    assert [p.label for p in preds] == [p.parent.name for p in images]
    assert all(0 < p.confidence <= 1 and p.kind == "probability" for p in preds)
    with open(run_dir / "model.joblib", "ab") as fh:
        fh.write(b"tampered")
    from features.errors import TapsError
    with pytest.raises(TapsError, match="SHA-256"):
        predict_images(run_dir, [str(images[0])], device="cpu")
    assert results.model.sha256 != ""


def test_compare_gives_one_row_per_tap_with_identical_splits(tiny_features, tmp_path, cpu_run):
    RUN = cpu_run(batch_size=8)
    images, _, out = tiny_features
    bb = Backbone("resnet18", weights="none", image_size=32)
    folder, rows = compare_taps(images, [bb], ["stem", "layer1", "layer2", "avgpool"],
                                FitOptions(clf="logreg", grid=[0.1, 1.0], device="cpu"), parse_protocol("per-class:5"),
                                seeds=2, extract_options=ExtractOptions(out=out, **RUN | {"batch_size": 8}),
                                runs_root=tmp_path, log=lambda *_: None)
    assert [r["tap"] for r in rows] == ["stem", "layer1", "layer2", "avgpool"]
    assert len({tuple(r["split_digests"]) for r in rows}) == 1
    assert sum(r["best"] for r in rows) == 1
    assert (folder / "compare.png").stat().st_size > 1000
    data = json.loads((folder / "compare.json").read_text())
    assert [r["dim"] for r in data["rows"]] == [64, 64, 128, 512]
    assert set(data["rows"][0]["metrics"]["mean_per_class_accuracy"]) == {"mean", "std"}
    assert (folder / "compare.csv").read_text().count("\n") == 5
    # results.json's metric names; top-5 only where there are more than 5 classes (3 here)
    assert set(data["rows"][0]["metrics"]) == {"accuracy", "mean_per_class_accuracy", "macro_f1"}
    assert "±" in format_table(rows, 2) and "±" not in format_table(rows, 1)  # no spread shown for one seed


def test_compare_checks_protocol_seeds_and_every_backbones_taps_before_extracting(tiny_flat, tmp_path, cpu_run):
    RUN = cpu_run(batch_size=8)
    images = load_dataset(f"folder:{tiny_flat}")
    resnet = Backbone("resnet18", weights="none", image_size=32)
    mobilenet = Backbone("mobilenet_v2", weights="none", image_size=32)
    fit, options = FitOptions(clf="logreg", device="cpu"), ExtractOptions(out=tmp_path / "fs", **RUN)
    cases = [([resnet], parse_protocol("per-class:40"), 1, "per-class:40 needs more than 40 images in every class"),
             ([resnet, mobilenet], parse_protocol("per-class:5"), 1, "unknown tap 'avgpool' for mobilenet_v2"),
             ([resnet], parse_protocol("per-class:5"), 0, "--seeds must be at least 1")]
    for backbones, protocol, seeds, message in cases:
        with pytest.raises(UsageError, match=message):
            compare_taps(images, backbones, ["avgpool"], fit, protocol, seeds=seeds, extract_options=options,
                         runs_root=tmp_path / "runs")
    assert not (tmp_path / "fs").exists() and not (tmp_path / "runs").exists()  # nothing was extracted or fitted


def test_torchvision_datasets_are_fingerprinted_by_their_pixels():
    from torchvision.datasets import FakeData

    from features.datasets import TorchvisionImageSet

    def fake(offset: int) -> TorchvisionImageSet:
        return TorchvisionImageSet("fake", [("train", FakeData(20, (3, 8, 8), 2, random_offset=offset))], ["a", "b"])

    assert fake(0).fingerprint() == fake(0).fingerprint() != fake(1).fingerprint()


def test_a_run_folder_from_before_the_newer_fields_still_predicts(tiny_features, tiny_flat, tmp_path):
    """results.json written before duplicates, seeds_vary, per-tap records and the runtime were kept:
    read with defaults, and predict rebuilds the same chain (torch runtime, one tap)."""
    _, features, _ = tiny_features
    run_dir, _, _ = fit_run(features, "avgpool", "avg", FitOptions(clf="logreg", grid=[1.0], device="cpu"),
                            parse_protocol("fraction:0.9"), runs_root=tmp_path)
    images = [str(p) for p in sorted(tiny_flat.glob("*/img_00[0-2].jpg"))]
    now = [p.label for p in predict_images(run_dir, images, device="cpu")]
    old = json.loads((run_dir / "results.json").read_text())
    for key in ("duplicates", "seeds_vary", "created"):
        del old[key]
    for key in ("taps", "runtime", "weights_sha256", "dataset", "dataset_fingerprint"):
        del old["features"][key]
    (run_dir / "results.json").write_text(json.dumps(old))
    results = load_results(run_dir)
    assert results.features.taps == () and results.features.runtime is None and results.duplicates == {}
    assert [p.label for p in predict_images(run_dir, images, device="cpu")] == now
