"""--runtime onnxruntime|openvino|auto: the exported extractor against torch's, its cache, resume and predict."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from features.backbones import Backbone
from features.datasets import load_dataset
from features.errors import TapsError, UsageError
from features.export import calibration_batch, largest_difference
from features.extract import extract
from features.forward import build_extractor
from features.options import ExtractOptions, resolve_precision
from features.runtimes import TOLERANCE, load_exported, local_export, prepare_export, runtime_precision
from features.store import FeatureFile
from pipeline.cli import main
from pipeline.evaluate import fit_run
from pipeline.options import FitOptions
from pipeline.predict import predict_images
from pipeline.protocols import parse_protocol
from pipeline.runs import load_model

EXPORTED = ["onnxruntime", "openvino"]
CASES = [("mobilenet_v2", "none", 32, ["block3", "block14", "pooled"], "avg"),
         ("resnet18", "none", 32, ["stem", "layer3", "avgpool"], "pyramid"),
         ("vgg16", "none", 32, ["pool2", "pool3"], "avgmax"),
         ("efficientnet_b0", "none", 32, ["block2", "block6"], "max"),
         ("resnet18", "none", 32, ["layer2", "avgpool"], "gem"),
         ("resnet18", "none", 32, ["layer1", "layer3"], "avgstd"),
         # token taps; frozen nn.MultiheadAttention takes a fused kernel that ONNX has no op for
         ("vit_b_16", "none", 224, ["block0", "block1"], "cls"),
         # the offline ImageNet weights: random-init activations vanish by `pooled` (1e-9), where a
         # Dropout exported or run in training mode would go unnoticed; trained ones do not
         ("mobilenet_v2", "IMAGENET1K_V1", 64, ["block7", "pooled"], "avg")]


@pytest.mark.slow
@pytest.mark.parametrize("runtime", EXPORTED)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[4]}" for c in CASES])
def test_exported_extractor_equals_torch(case, runtime, tmp_path, monkeypatch):
    name, weights, size, taps, pooling = case
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path))
    bb = Backbone(name, weights=weights, image_size=size)
    resolved = [bb.tap(t) for t in taps]
    path, why, record = prepare_export(bb, resolved, pooling, runtime)
    assert path is not None, why
    assert torch.backends.mha.get_fastpath_enabled()  # the export's setting does not outlive it
    assert [k.split()[0] for k in record["checks"]] == [runtime]
    assert next(iter(record["checks"].values()))["max_relative_difference"] < TOLERANCE
    pixels = torch.randint(0, 256, (5, size, size, 3), dtype=torch.uint8)  # another batch size than the export's
    with torch.inference_mode():
        reference = {k: v.numpy() for k, v in build_extractor(bb, resolved, torch.device("cpu"), channels_last=False,
                                                              pooling=pooling)(pixels.permute(0, 3, 1, 2)).items()}
    got = load_exported(runtime, path, taps)(pixels)
    assert all(got[t].shape == (5, bb.dim(t, pooling)) for t in taps)
    assert largest_difference(reference, got) < TOLERANCE


@pytest.mark.slow
def test_the_export_cache_is_reused_invalidated_and_never_trusted_when_damaged(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path))
    bb = Backbone("resnet18", weights="none", image_size=32)
    taps = [bb.tap("layer2"), bb.tap("avgpool")]
    first, _, record = prepare_export(bb, taps, "avg", "onnxruntime")
    stamp = first.stat().st_mtime_ns
    again, _, _ = prepare_export(bb, taps, "avg", "onnxruntime")
    assert again == first and first.stat().st_mtime_ns == stamp  # reused, not exported again
    # another runtime checks the same file (recorded beside the first check), it does not export it again
    same, _, both = prepare_export(bb, taps, "avg", "openvino")
    assert same == first and first.stat().st_mtime_ns == stamp
    assert sorted(k.split()[0] for k in both["checks"]) == ["onnxruntime", "openvino"]
    changed = [prepare_export(bb, taps, "avgmax", "onnxruntime")[0],  # any key that changes: another file
               prepare_export(Backbone("resnet18", weights="none", image_size=48), taps, "avg", "onnxruntime")[0],
               prepare_export(bb, [bb.tap("layer3"), bb.tap("avgpool")], "avg", "onnxruntime")[0],
               prepare_export(Backbone("resnet34", weights="none", image_size=32), taps, "avg", "onnxruntime")[0]]
    assert len({first, *changed}) == 1 + len(changed)
    first.write_bytes(b"not an ONNX model")  # damaged on disk: rebuilt and checked again
    rebuilt, _, record2 = prepare_export(bb, taps, "avg", "openvino")
    assert rebuilt == first and json.loads(first.with_suffix(".json").read_text())["sha256"] == record2["sha256"]
    assert [k.split()[0] for k in record2["checks"]] == ["openvino"]  # the old checks were of another file
    out = load_exported("openvino", rebuilt, ["layer2", "avgpool"])(calibration_batch(32))
    assert out["avgpool"].shape == (8, 512)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", EXPORTED)
def test_extract_records_the_runtime_refuses_to_resume_with_another_and_predict_rebuilds_it(
        runtime, tiny_flat, tmp_path, monkeypatch, cpu_run):
    RUN = cpu_run(batch_size=8, precision=None)
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    images = load_dataset(f"folder:{tiny_flat}")
    bb = Backbone("resnet18", weights="none", image_size=32)
    exported = FeatureFile(extract(images, bb, ["layer2", "avgpool"], out=tmp_path / "exported", runtime=runtime,
                                   precision="fp32", **RUN).path)
    torch_file = FeatureFile(extract(images, bb, ["layer2", "avgpool"], out=tmp_path / "torch", precision="fp32",
                                     **RUN).path)
    assert exported.taps["avgpool"].runtime == runtime and exported.taps["avgpool"].precision == "fp32"
    assert torch_file.taps["avgpool"].runtime == "torch"
    for tap in ("layer2", "avgpool"):
        np.testing.assert_allclose(exported.read(tap), torch_file.read(tap), rtol=1e-4, atol=1e-5)
    # precision auto: the CPU's (bf16 where it has bf16 kernels) if the runtime runs it, else fp32
    auto = FeatureFile(extract(images, bb, ["avgpool"], out=tmp_path / "auto", runtime=runtime, **RUN).path)
    expected = runtime_precision(runtime, resolve_precision("auto", torch.device("cpu")))
    assert auto.taps["avgpool"].precision == expected
    assert largest_difference({"a": torch_file.read("avgpool")}, {"a": auto.read("avgpool")}) < (
        0.1 if expected == "bf16" else 1e-4)
    # a tap started by torch is not finished by an exported runtime
    extract(images, bb, ["layer1"], out=tmp_path / "mixed", precision="fp32", limit_batches=1, **RUN)
    with pytest.raises(TapsError, match=f"was started with runtime torch, but this run resolves to runtime {runtime}; "
                                        f"rerun with --runtime torch to use it"):
        extract(images, bb, ["layer1"], out=tmp_path / "mixed", runtime=runtime, precision="fp32", **RUN)
    run_dir, results, _ = fit_run(exported, "avgpool", "avg", FitOptions(clf="logreg", grid=[1.0], device="cpu"),
                                  parse_protocol("per-class:5"), runs_root=tmp_path / "runs")
    assert results.features.runtime == runtime
    preds = predict_images(run_dir, [str(tiny_flat / i) for i in images.ids], device="cpu")
    expected_confidence = load_model(run_dir, results).predict_proba(exported.read("avgpool")).max(axis=1)
    np.testing.assert_allclose([p.confidence for p in preds], expected_confidence, rtol=0, atol=1e-5)
    # at the CPU's precision (bf16 where it has it) a graph with other outputs gives other values: predict
    # runs the export the tap came from (layer2 and avgpool), under its name in the file (layer2@gem)
    both = FeatureFile(extract(images, bb, ["layer2", "avgpool"], out=tmp_path / "both", runtime=runtime,
                               pooling="gem", **RUN).path)
    assert both.taps["layer2@gem"].extra["export"] == "layer2@gem,avgpool"  # the export's outputs, as keys
    for tap in ("avgpool", "layer2"):
        run_dir, results, _ = fit_run(both, tap, "gem", FitOptions(clf="logreg", grid=[1.0], device="cpu"),
                                      parse_protocol("per-class:5"), runs_root=tmp_path / "runs")
        expected_confidence = load_model(run_dir, results).predict_proba(both.read(tap, "gem")).max(axis=1)
        preds = predict_images(run_dir, [str(tiny_flat / i) for i in images.ids], device="cpu")
        np.testing.assert_allclose([p.confidence for p in preds], expected_confidence, rtol=0, atol=1e-5)


def test_a_backbone_that_does_not_export_falls_back_to_torch_with_one_warning(tiny_flat, tmp_path, monkeypatch, cpu_run):
    RUN = cpu_run(batch_size=8, precision=None)
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::magic' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    images = load_dataset(f"folder:{tiny_flat}")
    with pytest.warns(UserWarning, match="resnet18 did not export to ONNX for openvino .*aten::magic.*; extracting "
                                         "with torch"):
        report = extract(images, Backbone("resnet18", weights="none", image_size=32), ["avgpool"],
                         out=tmp_path / "fs", runtime="openvino", **RUN)
    assert FeatureFile(report.path).taps["avgpool"].runtime == "torch"
    assert not list((tmp_path / "cache").rglob("*.tmp"))


@pytest.mark.slow
def test_a_rerun_on_an_exported_runtime_never_imports_torchvision(tiny_flat, tmp_path):
    """The first run exports the model (torchvision builds it) and keeps the backbone's card; a rerun
    needs neither, so its fixed cost is not torchvision's import (over a second), and it writes the
    same file: the same identity and the same features."""
    env = {**os.environ, "TAPS_CACHE": str(tmp_path / "cache")}
    probe = "import sys; from pipeline.cli import main; main(sys.argv[1:]); print('torchvision' in sys.modules)"
    args = ["extract", "--dataset", f"folder:{tiny_flat}", "--backbone", "mobilenet_v2", "--weights", "none",
            "--image-size", "32", "--taps", "block3,pooled", "--runtime", "openvino", "--no-progress"]

    def run(out: Path) -> tuple[Path, bool]:
        lines = subprocess.run([sys.executable, "-c", probe, *args, "--features-root", str(out)], env=env,
                               capture_output=True, text=True, check=True).stdout.split()
        return Path(lines[-2]), lines[-1] == "True"

    (first, imported), (second, again) = run(tmp_path / "a"), run(tmp_path / "b")
    assert imported and not again
    a, b = FeatureFile(first), FeatureFile(second)
    assert first.name == second.name and a.identity == b.identity and b.taps["block3"].runtime == "openvino"
    for tap in ("block3", "pooled"):
        np.testing.assert_array_equal(a.read(tap), b.read(tap))


def test_auto_times_every_runtime_records_its_choice_and_a_resume_keeps_it(tiny_flat, tmp_path, monkeypatch, cpu_run):
    RUN = cpu_run(batch_size=8, precision=None)
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    images = load_dataset(f"folder:{tiny_flat}")
    bb = Backbone("resnet18", weights="none", image_size=32)
    record = FeatureFile(extract(images, bb, ["avgpool"], out=tmp_path / "a", runtime="auto", **RUN).path).taps["avgpool"]
    rates = {name: (float(rate), precision) for name, rate, precision in
             re.findall(r"(\w+) ([\d.]+) img/s \((\w+)\)", record.extra["runtime_rates"])}
    assert sorted(rates) == ["onnxruntime", "openvino", "torch"]
    chosen = max(rates, key=lambda name: rates[name][0])
    assert record.runtime == chosen and record.precision == rates[chosen][1]
    cpu = resolve_precision("auto", torch.device("cpu"))
    assert rates["torch"][1] == cpu and rates["onnxruntime"][1] == "fp32" and rates["openvino"][1] == cpu
    # the choice is kept for this CPU, model, taps and batch size: a new file reuses it without timing,
    # saying so, until --retime
    again = FeatureFile(extract(images, bb, ["avgpool"], out=tmp_path / "b", runtime="auto", **RUN).path).taps["avgpool"]
    assert again.runtime == chosen and "(recorded " in again.extra["runtime_rates"]
    assert again.extra["runtime_rates"].startswith(record.extra["runtime_rates"])
    fresh = FeatureFile(extract(images, bb, ["avgpool"], out=tmp_path / "c", runtime="auto", retime=True,
                                **RUN).path).taps["avgpool"]
    assert "recorded" not in fresh.extra["runtime_rates"] and fresh.extra["runtime_rates"] != record.extra["runtime_rates"]
    # an unfinished tap started by one runtime is finished by it, whatever a new timing would say
    for runtime in ("onnxruntime", "torch"):
        extract(images, bb, ["layer1"], out=tmp_path / runtime, runtime=runtime, limit_batches=1, **RUN)
        resumed = extract(images, bb, ["layer1"], out=tmp_path / runtime, runtime="auto", **RUN)
        assert FeatureFile(resumed.path).taps["layer1"].runtime == runtime
        assert FeatureFile(resumed.path).taps["layer1"].complete


def test_a_machine_without_the_export_gets_a_checked_copy_of_its_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    bb = Backbone("resnet18", weights="none", image_size=32)
    path, _, record = prepare_export(bb, [bb.tap("avgpool")], "avg", "onnxruntime")
    fetched = []

    def fetch():
        fetched.append(1)
        return path.read_bytes()

    assert local_export(path, record["sha256"], fetch) == path and not fetched  # the driver's machine: no copy
    elsewhere = tmp_path / "on-the-driver-only.onnx"
    copy = local_export(elsewhere, record["sha256"], fetch)
    assert copy != path and copy.read_bytes() == path.read_bytes() and fetched == [1]
    assert local_export(elsewhere, record["sha256"], fetch) == copy and fetched == [1]  # kept, not fetched again
    copy.write_bytes(b"damaged")
    assert local_export(elsewhere, record["sha256"], fetch).read_bytes() == path.read_bytes() and fetched == [1, 1]
    out = load_exported("onnxruntime", copy, ["avgpool"])(calibration_batch(32))
    assert out["avgpool"].shape == (8, 512)


def test_a_failed_quantisation_leaves_no_partial_model_in_the_cache(tiny_flat, tmp_path, monkeypatch, cpu_run):
    import onnxruntime.quantization

    def broken(model_input, model_output, *args, **kwargs):  # dies halfway through writing its model
        Path(model_output).write_bytes(b"half a model")
        raise RuntimeError("quantiser broke")

    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", broken)
    images = load_dataset(f"folder:{tiny_flat}")
    bb = Backbone("resnet18", weights="none", image_size=32)
    with pytest.raises(RuntimeError, match="quantiser broke"):
        extract(images, bb, ["avgpool"], out=tmp_path / "int8", runtime="onnxruntime", precision="int8",
                **cpu_run(batch_size=8, precision=None))
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert cached and not [name for name in cached if "int8" in name], cached  # the fp32 export alone is kept


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_int8_is_calibrated_on_the_dataset_checked_against_fp32_recorded_and_cached(runtime, tiny_flat, tmp_path,
                                                                                   monkeypatch, cpu_run, capsys):
    RUN = cpu_run(batch_size=8, precision=None)
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    images = load_dataset(f"folder:{tiny_flat}")
    bb = Backbone("resnet18", weights="none", image_size=32)
    taps = ["layer2", "avgpool"]
    fp32 = FeatureFile(extract(images, bb, taps, out=tmp_path / "fp32", runtime=runtime, precision="fp32",
                               **RUN).path)
    report = extract(images, bb, taps, out=tmp_path / "int8", runtime=runtime, precision="int8", **RUN)
    int8 = FeatureFile(report.path)
    for tap in taps:
        record = int8.taps[tap]
        assert (record.precision, record.runtime) == ("int8", runtime)
        made = json.loads(record.extra["int8"])
        assert made["calibration"]["images"] == 22 and made["calibration"]["held_out"] == 8  # 3/4 of 30, the rest
        assert made["calibration"]["seed"] == 0
        # the recorded agreement is what the stored features show against the fp32 file
        a, b = fp32.read(tap).astype(np.float64), int8.read(tap).astype(np.float64)
        cosine = ((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean()
        assert 0.98 < made["agreement"]["cosine"] <= 1 and abs(cosine - made["agreement"]["cosine"]) < 0.01
        assert 0 < made["agreement"]["relative_error"] < 0.2  # quantised: close, yet not the fp32 forward
    assert "int8 calibrated on 22 images" in report.runtime_note
    assert main(["info", str(report.path)]) == 0  # and `taps info` says it per tap
    assert re.search(r"tap avgpool: .*precision=int8 .*; int8: cosine with fp32 0\.9\d+ \(min 0\.\d+\), error 0\.\d+, "
                     r"calibrated on 22 images \(seed 0\)", capsys.readouterr().out)
    # quantised once per calibration set: another folder of the same images reuses the cached model
    cached = list((tmp_path / "cache").rglob("*.int8-*.json"))  # the record of each quantised model
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    extract(images, bb, taps, out=tmp_path / "again", runtime=runtime, precision="int8", **RUN)
    assert [p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.int8-*.json")] == [stamp]
    # predict runs the very int8 model (quantised with layer2 as an output too) for the one tap it needs
    run_dir, results, _ = fit_run(int8, "avgpool", "avg", FitOptions(clf="logreg", grid=[1.0], device="cpu"),
                                  parse_protocol("per-class:5"), runs_root=tmp_path / "runs")
    paths = [str(tiny_flat / i) for i in images.ids]
    expected = load_model(run_dir, results).predict_proba(int8.read("avgpool")).max(axis=1)
    np.testing.assert_allclose([p.confidence for p in predict_images(run_dir, paths, device="cpu")], expected,
                               rtol=0, atol=1e-5)
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "elsewhere"))  # another machine: refused, not approximated
    with pytest.raises(TapsError, match=f"came from {runtime}'s int8 model, quantised on 22 images .* not in this "
                                        f"machine's cache"):
        predict_images(run_dir, paths[:1], device="cpu")
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    # a file of int8 taps is not finished or extended in fp32 silently
    with pytest.raises(TapsError, match="precision int8"):
        extract(images, bb, ["avgpool"], out=tmp_path / "int8", runtime=runtime, precision="fp32", force=False,
                **{**RUN, "limit_batches": None})
    with pytest.raises(UsageError, match="--precision int8 runs a post-training quantised export"):
        ExtractOptions(runtime="torch", precision="int8")
