"""--runtime onnxruntime: the exported extractor against torch's, its cache, resume and predict."""

import json

import numpy as np
import pytest
import torch

from features.backbones import Backbone
from features.datasets import load_dataset
from features.errors import TapsError
from features.extract import extract
from features.forward import build_extractor
from features.runtimes import TOLERANCE, OnnxForward, calibration_batch, largest_difference, prepare_onnx
from features.store import FeatureFile
from pipeline.evaluate import fit_run
from pipeline.options import FitOptions
from pipeline.predict import predict_images
from pipeline.protocols import parse_protocol
from pipeline.runs import load_model

RUN = dict(device="cpu", workers=0, progress=False, batch_size=8)
CASES = [("mobilenet_v2", "none", 32, ["block3", "block14", "pooled"], "avg"),
         ("resnet18", "none", 32, ["stem", "layer3", "avgpool"], "pyramid"),
         ("vgg16", "none", 32, ["pool2", "pool3"], "avgmax"),
         ("efficientnet_b0", "none", 32, ["block2", "block6"], "max"),
         # the offline ImageNet weights: random-init activations vanish by `pooled` (1e-9), where a
         # Dropout exported or run in training mode would go unnoticed; trained ones do not
         ("mobilenet_v2", "IMAGENET1K_V1", 64, ["block7", "pooled"], "avg")]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[4]}" for c in CASES])
def test_exported_extractor_equals_torch(case, tmp_path, monkeypatch):
    name, weights, size, taps, pooling = case
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path))
    bb = Backbone(name, weights=weights, image_size=size)
    resolved = [bb.tap(t) for t in taps]
    path, why, record = prepare_onnx(bb, resolved, pooling)
    assert path is not None, why
    assert record["max_relative_difference"] < TOLERANCE
    pixels = torch.randint(0, 256, (5, size, size, 3), dtype=torch.uint8)  # another batch size than the export's
    with torch.inference_mode():
        reference = {k: v.numpy() for k, v in build_extractor(bb, resolved, torch.device("cpu"), channels_last=False,
                                                              pooling=pooling)(pixels.permute(0, 3, 1, 2)).items()}
    got = OnnxForward.load(path, taps)(pixels)
    assert all(got[t].shape == (5, bb.dim(t, pooling)) for t in taps)
    assert largest_difference(reference, got) < TOLERANCE


def test_the_export_cache_is_reused_invalidated_and_never_trusted_when_damaged(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path))
    bb = Backbone("resnet18", weights="none", image_size=32)
    taps = [bb.tap("layer2"), bb.tap("avgpool")]
    first, _, record = prepare_onnx(bb, taps, "avg")
    stamp = first.stat().st_mtime_ns
    again, _, _ = prepare_onnx(bb, taps, "avg")
    assert again == first and first.stat().st_mtime_ns == stamp  # reused, not exported again
    other, _, _ = prepare_onnx(bb, taps, "avgmax")  # any key that changes: another file
    assert other != first
    other_size, _, _ = prepare_onnx(Backbone("resnet18", weights="none", image_size=48), taps, "avg")
    assert other_size not in (first, other)
    first.write_bytes(b"not an ONNX model")  # damaged on disk: rebuilt and checked again
    rebuilt, _, record2 = prepare_onnx(bb, taps, "avg")
    assert rebuilt == first and json.loads(first.with_suffix(".json").read_text())["sha256"] == record2["sha256"]
    out = OnnxForward.load(rebuilt, ["layer2", "avgpool"])(calibration_batch(32))
    assert out["avgpool"].shape == (8, 512)


def test_extract_records_the_runtime_refuses_to_resume_with_another_and_predict_rebuilds_it(
        tiny_flat, tmp_path, monkeypatch):
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    images = load_dataset(f"folder:{tiny_flat}")
    bb = Backbone("resnet18", weights="none", image_size=32)
    onnx = FeatureFile(extract(images, bb, ["layer2", "avgpool"], out=tmp_path / "ort", runtime="onnxruntime",
                               **RUN).path)
    torch_file = FeatureFile(extract(images, bb, ["layer2", "avgpool"], out=tmp_path / "torch", precision="fp32",
                                     **RUN).path)
    assert onnx.taps["avgpool"].extra["runtime"] == "onnxruntime" and onnx.taps["avgpool"].precision == "fp32"
    assert torch_file.taps["avgpool"].extra["runtime"] == "torch"
    for tap in ("layer2", "avgpool"):
        np.testing.assert_allclose(onnx.read(tap), torch_file.read(tap), rtol=1e-4, atol=1e-5)
    # a tap started by torch is not finished by ONNX Runtime
    extract(images, bb, ["layer1"], out=tmp_path / "mixed", precision="fp32", limit_batches=1, **RUN)
    with pytest.raises(TapsError, match="was started with runtime=torch, not onnxruntime; rerun with --runtime torch"):
        extract(images, bb, ["layer1"], out=tmp_path / "mixed", runtime="onnxruntime", **RUN)
    run_dir, results, _ = fit_run(onnx, "avgpool", "avg", FitOptions(clf="logreg", grid=[1.0], device="cpu"),
                                  parse_protocol("per-class:5"), runs_root=tmp_path / "runs")
    assert results["features"]["runtime"] == "onnxruntime"
    preds = predict_images(run_dir, [str(tiny_flat / i) for i in images.ids], device="cpu")
    expected = load_model(run_dir, results).predict_proba(onnx.read("avgpool")).max(axis=1)
    np.testing.assert_allclose([p.confidence for p in preds], expected, rtol=0, atol=1e-5)


def test_a_backbone_that_does_not_export_falls_back_to_torch_with_one_warning(tiny_flat, tmp_path, monkeypatch):
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::magic' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    images = load_dataset(f"folder:{tiny_flat}")
    with pytest.warns(UserWarning, match="resnet18 did not export to ONNX .*aten::magic.*; extracting with torch"):
        report = extract(images, Backbone("resnet18", weights="none", image_size=32), ["avgpool"],
                         out=tmp_path / "fs", runtime="onnxruntime", **RUN)
    assert FeatureFile(report.path).taps["avgpool"].extra["runtime"] == "torch"
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_auto_times_both_runtimes_records_its_choice_and_a_resume_keeps_it(tiny_flat, tmp_path, monkeypatch):
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    images = load_dataset(f"folder:{tiny_flat}")
    bb = Backbone("resnet18", weights="none", image_size=32)
    record = FeatureFile(extract(images, bb, ["avgpool"], out=tmp_path / "a", runtime="auto", **RUN).path).taps["avgpool"]
    assert record.extra["runtime"] in ("torch", "onnxruntime")
    rates = record.extra["runtime_rates"]
    assert "torch " in rates and "onnxruntime " in rates and "img/s" in rates
    faster = max(("torch", "onnxruntime"), key=lambda r: float(rates.split(f"{r} ")[1].split(" ")[0]))
    assert record.extra["runtime"] == faster
    torch_precision = rates.split("batch, ")[1].split(" torch")[0]  # what the torch timing ran in
    assert record.precision == ("fp32" if faster == "onnxruntime" else torch_precision)
    # an unfinished tap started by one runtime is finished by it, whatever a new timing would say
    extract(images, bb, ["layer1"], out=tmp_path / "b", runtime="onnxruntime", limit_batches=1, **RUN)
    resumed = extract(images, bb, ["layer1"], out=tmp_path / "b", runtime="auto", **RUN)
    assert FeatureFile(resumed.path).taps["layer1"].extra["runtime"] == "onnxruntime"
    assert FeatureFile(resumed.path).taps["layer1"].complete
