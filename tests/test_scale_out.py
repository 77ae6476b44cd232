"""Scale-out: Ray engine and shards produce the file a single local run produces."""

import numpy as np
import pytest

from features.backbones import Backbone
from features.datasets import load_dataset
from features.errors import TapsError, UsageError
from features.extract import extract
from features.shards import merge_shards
from features.store import FeatureFile
from pipeline.api import load_features
from pipeline.cli import main

TAPS = ["layer2", "avgpool"]


def resnet():
    return Backbone("resnet18", weights="none", image_size=32)


def assert_same_file(a, b):
    fa, fb = FeatureFile(a), FeatureFile(b)
    assert fa.ids == fb.ids and np.array_equal(fa.labels, fb.labels) and fa.split == fb.split
    assert fa.attrs["dataset_fingerprint"] == fb.attrs["dataset_fingerprint"] and fb.attrs["complete"]
    assert np.array_equal(fa.valid, fb.valid) and fa.errors == fb.errors
    assert fa.content == fb.content and fa.content is not None  # every sample's digest, in sample order
    assert fa.attrs["fingerprint_version"] == fb.attrs["fingerprint_version"]
    for tap in TAPS:
        np.testing.assert_allclose(fa.read(tap), fb.read(tap), rtol=1e-5, atol=1e-5)


def test_three_shards_merged_equal_a_single_run(tiny_folder, tmp_path, cpu_run):
    RUN = cpu_run(batch_size=8, workers=None)
    images = load_dataset(f"folder:{tiny_folder}")
    single = extract(images, resnet(), TAPS, out=tmp_path / "single", workers=0, **RUN)
    shards = [extract(images, resnet(), TAPS, out=tmp_path / "sharded", shard=(i, 3), workers=0, **RUN).path
              for i in range(3)]
    assert sorted(p.name for p in shards)[0].endswith(".shard0of3.h5")
    with pytest.raises(TapsError, match="missing"):
        merge_shards([shards[0], shards[2]])
    with pytest.raises(TapsError, match="duplicated"):
        merge_shards([shards[0], shards[0], shards[1], shards[2]])
    # a shard is a slice of the samples: fitting on it, or exporting it, is refused until it is merged
    with pytest.raises(UsageError, match=r"is shard 1/3 of an extraction \(\d+ of its \d+ samples\); merge the shards"):
        load_features(shards[1], "avgpool")
    assert main(["fit", "--features", str(shards[1]), "--runs-root", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs").exists()
    merged = merge_shards(list(reversed(shards)))
    assert merged.name == single.path.name
    assert_same_file(single.path, merged)
    # The merged file is what `fit` looks for, and a rerun of the full extract reuses it.
    again = extract(images, resnet(), TAPS, out=tmp_path / "sharded", workers=0, **RUN)
    assert again.path == merged and again.computed == []


@pytest.mark.slow
@pytest.mark.ray
def test_ray_engine_writes_the_local_engines_file(tiny_folder, tmp_path, cpu_run):
    RUN = cpu_run(batch_size=8, workers=None)
    pytest.importorskip("ray", reason="Ray is the optional extra taps[ray]")
    images = load_dataset(f"folder:{tiny_folder}")
    local = extract(images, resnet(), TAPS, out=tmp_path / "local", workers=0, **RUN)
    remote = extract(images, resnet(), TAPS, out=tmp_path / "ray", workers=2, engine="ray", **RUN)
    assert_same_file(local.path, remote.path)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_ray_actors_run_the_exported_runtime_of_a_local_run(runtime, tiny_folder, tmp_path, monkeypatch, cpu_run):
    RUN = cpu_run(batch_size=8, workers=None)
    pytest.importorskip("ray", reason="Ray is the optional extra taps[ray]")
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    images = load_dataset(f"folder:{tiny_folder}")
    local = extract(images, resnet(), TAPS, out=tmp_path / "local", workers=0, runtime=runtime, **RUN)
    remote = extract(images, resnet(), TAPS, out=tmp_path / "ray", workers=2, engine="ray", runtime=runtime, **RUN)
    assert_same_file(local.path, remote.path)
    assert {FeatureFile(remote.path).taps[t].runtime for t in TAPS} == {runtime}


@pytest.mark.slow
def test_streaming_linear_fit_matches_in_memory_fit(tmp_path):
    from sklearn.datasets import make_classification

    from features.store import FeatureWriter
    from pipeline.evaluate import fit_run
    from pipeline.options import FitOptions
    from pipeline.protocols import parse_protocol

    X, y = make_classification(n_samples=3000, n_features=48, n_informative=20, n_classes=6, n_clusters_per_class=1,
                               class_sep=2.0, random_state=0)
    path = tmp_path / "big.h5"
    header = {"backbone": "synthetic", "weights": "none", "transform": "-", "dataset": "synthetic",
              "dataset_fingerprint": "s", "n_samples": len(y), "batch_size": 500, "image_size": 0}
    w = FeatureWriter(path, header, y, [f"c{i}" for i in range(6)], [str(i) for i in range(len(y))], None)
    w.ensure_tap("emb", 48, {"tap": "emb", "node": "emb", "pooling": "none", "precision": "fp32"})
    w.write(0, len(y), {"emb": X.astype(np.float32)}, {})
    w.finish(["emb"])
    w.close()
    features = FeatureFile(path)
    protocol = parse_protocol("fraction:0.5")
    matrix_mib = X.nbytes / 2 ** 20 / 2  # float32: half the float64 size
    results = {}
    for budget in (None, matrix_mib / 4):  # the default budget, then a quarter of the matrix
        options = FitOptions(clf="linear", grid=[1e-4], device="cpu", memory_budget_mb=budget)
        _, res, _ = fit_run(features, "emb", "avg", options, protocol, runs_root=tmp_path / "runs")
        results[budget] = res
    in_memory, streamed = results.values()
    assert in_memory.per_seed[0].selection == "fixed weight_decay=0.0001 (one grid value, no selection)"
    assert streamed.per_seed[0].selection == "fixed weight_decay=0.0001 (one grid value, no selection), streaming"
    assert in_memory.metrics["accuracy"]["mean"] > 0.8
    assert abs(in_memory.metrics["accuracy"]["mean"] - streamed.metrics["accuracy"]["mean"]) <= 0.01
    # Streaming selects as the in-memory path does: k-fold CV over the grid, recorded.
    options = FitOptions(clf="linear", grid=[1e-4, 1e-1], folds=2, device="cpu", memory_budget_mb=matrix_mib / 4)
    _, selected, _ = fit_run(features, "emb", "avg", options, protocol, runs_root=tmp_path / "runs")
    record = selected.per_seed[0]
    assert record.selection == "2-fold CV, streaming" and len(record.cv_accuracy) == 2
    assert record.chosen == [1e-4, 1e-1][int(np.argmax(record.cv_accuracy))]
    with pytest.raises(TapsError, match="use --clf linear"):
        fit_run(features, "emb", "avg", FitOptions(clf="svm", memory_budget_mb=matrix_mib / 4), protocol,
                runs_root=tmp_path / "runs")


def test_info_says_a_shard_is_a_shard(tiny_folder, tmp_path, capsys, cpu_run):
    RUN = cpu_run(batch_size=8, workers=None)
    from pipeline.cli import main

    images = load_dataset(f"folder:{tiny_folder}")
    shard = extract(images, resnet(), ["avgpool"], out=tmp_path, shard=(1, 3), workers=0, **RUN).path
    assert main(["info", str(shard)]) == 0
    out = capsys.readouterr().out
    assert f"shard: 1/3, samples 9..17 of {len(images)}; combine the shards with `taps merge`" in out
