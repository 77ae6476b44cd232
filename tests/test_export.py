"""Features out of the HDF5 file: load_features, the DataFrame view and `taps export` (npz, csv, parquet)."""

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from features.errors import TapsError
from features.store import FeatureFile
from pipeline.api import export_features, features_frame, load_features, splits
from pipeline.cli import main
from pipeline.protocols import split_digest
from pipeline.runs import load_results


def test_load_features_gives_the_taps_side_by_side_with_labels_and_what_each_column_is(tiny_features):
    _, f, _ = tiny_features
    X, y, meta = load_features(f.path, "layer2+avgpool")
    np.testing.assert_array_equal(X, np.hstack([f.read("layer2"), f.read("avgpool")])[f.valid])
    np.testing.assert_array_equal(y, f.labels[f.valid])
    dims = (f.taps["layer2"].dim, f.taps["avgpool"].dim)
    assert meta.columns == {"layer2": (0, dims[0]), "avgpool": (dims[0], sum(dims))} and X.dtype == np.float32
    assert meta.ids == [i for i, v in zip(f.ids, f.valid, strict=True) if v] and meta.classes == f.classes
    frame = features_frame(f.path, ["layer2", "avgpool"])  # the same columns as a DataFrame
    assert list(frame.columns[:5]) == ["id", "label", "class", "split", "valid"]
    assert frame.shape == (len(f.labels), 5 + sum(dims)) and frame["class"][0] == f.classes[f.labels[0]]
    np.testing.assert_array_equal(frame[[f"avgpool_{j}" for j in range(dims[1])]].to_numpy(), f.read("avgpool"))


def test_splits_are_the_rows_taps_fit_trained_and_tested_on(copies, tmp_path, capsys):
    (copies / "c" / "broken.jpg").write_bytes(b"not a jpeg")  # in no split
    data = ["--dataset", f"folder:{copies}", "--backbone", "resnet18", "--weights", "none", "--image-size", "32",
            "--features-root", str(tmp_path / "fs")]
    assert main(["extract", *data, "--taps", "avgpool", "--no-progress", "--workers", "0"]) == 0
    assert main(["fit", *data, "--tap", "avgpool", "--clf", "logreg", "--grid", "1", "--protocol", "fraction:0.5",
                 "--seeds", "2", "--runs-root", str(tmp_path / "runs")]) == 0
    results = load_results(capsys.readouterr().out.strip().splitlines()[-1])
    path = next((tmp_path / "fs").rglob("*.h5"))
    X, y, meta = load_features(path, "avgpool")
    broken = FeatureFile(path).ids.index("c/broken.jpg")
    assert len(X) == len(meta.rows) == 26 and broken not in meta.rows and meta.rows[-1] == 26  # left out
    drawn = splits(path, "fraction:0.5", seeds=2)
    for (train, test), seed in zip(drawn, results.per_seed, strict=True):
        assert split_digest(meta.ids, train) == seed.train_digest and split_digest(meta.ids, test) == seed.test_digest
        assert not set(meta.groups[train]) & set(meta.groups[test])  # copies on one side
    assert len(set(meta.groups)) == 24  # two copies: 26 images, 24 distinct
    every = splits(path, "fraction:0.5", seeds=2, include_invalid=True)  # the file's rows
    assert all((meta.rows[train] == rows).all() for (train, _), (rows, _) in zip(drawn, every, strict=True))


@pytest.mark.parametrize("fmt", ["npz", "csv", "parquet"])
def test_taps_export_writes_every_image_with_its_id_label_and_columns(tiny_features, tmp_path, capsys, fmt):
    _, f, _ = tiny_features
    out = tmp_path / f"out.{fmt}"
    assert main(["export", str(f.path), "--taps", "layer1,avgpool", "--format", fmt, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    if fmt == "npz":
        saved = np.load(out)
        np.testing.assert_array_equal(saved["X_avgpool"], f.read("avgpool"))
        np.testing.assert_array_equal(saved["X_layer1"], f.read("layer1"))
        assert list(saved["ids"]) == f.ids and list(saved["labels"]) == list(f.labels)
        assert list(saved["classes"]) == f.classes and saved["valid"].all()
        return
    frame = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
    assert list(frame["id"]) == f.ids and list(frame["label"]) == list(f.labels)
    block = frame[[c for c in frame.columns if c.startswith("avgpool_")]].to_numpy()
    np.testing.assert_allclose(block, f.read("avgpool"), rtol=1e-6)  # csv goes through decimal text
    assert not list(tmp_path.glob(".*partial"))


def test_export_refuses_a_damaged_file_and_names_taps_across_backbones(tiny_features, two_backbones, tmp_path,
                                                                       capsys):
    _, f, _ = tiny_features
    copy = tmp_path / f.path.name
    shutil.copy(f.path, copy)
    with h5py.File(copy, "r+") as h5:  # one value changed behind the store's back
        h5["taps"]["avgpool"][3, 0] += 1.0
    with pytest.raises(TapsError, match="avgpool"):
        export_features(copy, "avgpool", tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()
    assert main(["export", str(copy), "--taps", "avgpol"]) == 2  # a misspelt tap: one line, a close match
    assert "did you mean avgpool" in capsys.readouterr().err
    # two backbones' files of the same samples: BACKBONE/TAP columns side by side
    _, root = two_backbones
    files = sorted(str(p) for p in root.rglob("*.h5"))
    X, y, meta = load_features(files, "resnet18/avgpool+mobilenet_v2/pooled")
    assert list(meta.columns) == ["resnet18/avgpool", "mobilenet_v2/pooled"] and X.shape[1] == 512 + 1280
