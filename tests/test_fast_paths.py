"""Every speed-up of stage one keeps the values: box resizing, BatchNorm folding, pooling in
the graph, inline decoding, model replicas, torch.compile (with its fallback) and batch padding."""

import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms import functional as F

from features import forward
from features.backbones import Backbone
from features.datasets import load_dataset
from features.errors import UsageError
from features.extract import extract
from features.forward import build_extractor, forward_taps, resolve_compile
from features.loaders import REPLICAS_MIN_IMAGES, resolve_loader
from features.pooling import pool
from features.store import FeatureFile
from pipeline.cli import main
from pipeline.evaluate import fit_run
from pipeline.options import FitOptions
from pipeline.predict import predict_images
from pipeline.protocols import parse_protocol
from pipeline.runs import load_model


@pytest.mark.parametrize("size", [(300, 240), (240, 300), (500, 375), (256, 256), (180, 90), (1023, 257), (224, 600)])
def test_box_resize_matches_resize_then_crop(size, photo):
    crop = Backbone("mobilenet_v2", weights="none").pixel_transform()
    img = photo(*size, seed=sum(size))
    fast = crop(img).astype(int)
    reference = np.asarray(F.center_crop(F.resize(img, crop.resize_size, antialias=True), crop.crop_size)).astype(int)
    assert fast.shape == reference.shape == (224, 224, 3)
    diff = np.abs(fast - reference)
    # Only 8-bit rounding between PIL's two passes differs; a misplaced box would shift
    # the noisy pattern and differ by tens of grey levels almost everywhere.
    assert diff.max() <= 2 and diff.mean() < 0.5


@pytest.mark.parametrize("size", [(300, 240), (100, 80), (256, 300), (255, 1000), (500, 375), (257, 257), (224, 256)])
@pytest.mark.parametrize("layout", ["chw", "hwc"])  # hwc: simplejpeg's buffer viewed as CHW
@pytest.mark.parametrize("backbone", ["mobilenet_v2", "timm:resnet18"])  # bilinear; timm's bicubic
def test_tensor_resize_skips_antialiasing_only_where_it_changes_nothing(size, layout, backbone, photo):
    """Enlarging: the same pixels as the preset's antialiased resize; shrinking: antialiased. Bit for bit
    torchvision's v2 ops, in both memory layouts (taps calls torch's kernel itself where they would)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F2

    crop = Backbone(backbone, weights="none").pixel_transform()
    mode = InterpolationMode(crop.interpolation)
    img = F.pil_to_tensor(photo(*size, seed=sum(size)))
    if layout == "hwc":
        img = img.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    preset = F2.center_crop(F2.resize(img, crop.resize_size, mode, antialias=True), crop.crop_size).permute(1, 2, 0)
    assert torch.equal(crop.tensor(img), preset)
    if min(size) > crop.resize_size[0] or crop.interpolation != "bilinear":  # where dropping antialiasing would show
        plain = F2.center_crop(F2.resize(img, crop.resize_size, mode, antialias=False), crop.crop_size).permute(1, 2, 0)
        assert not torch.equal(plain, preset)


def test_the_pil_filters_are_torchvisions_own_mapping():
    """The crop-box path picks PIL's filter without importing torchvision: the same one torchvision would."""
    from features.models.preprocess import PIL_FILTERS

    assert PIL_FILTERS == {mode.value: int(pil) for mode, pil in F.pil_modes_mapping.items()}


def test_box_resize_falls_back_where_the_crop_would_pad(photo):
    crop = Backbone("resnet18", weights="none", image_size=64).pixel_transform()
    crop.resize_size = [32]  # a crop larger than the resized image: F.center_crop pads
    out = crop(photo(50, 40, 1))
    assert out.shape == (64, 64, 3) and out[0].max() == 0  # the padded border


@pytest.mark.parametrize("name,taps", [("resnet18", ["stem", "layer2", "avgpool"]),
                                       ("mobilenet_v2", ["block3", "block14", "pooled"])])
def test_folded_extractor_matches_the_plain_graph(name, taps):
    bb = Backbone(name, weights="none", image_size=64)
    resolved = bb.resolve_taps(taps)
    with torch.random.fork_rng():  # non-trivial BatchNorm statistics, so folding has work to do
        torch.manual_seed(1)
        model = bb.build()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    bb.build = lambda: copy.deepcopy(model).eval()  # folding works in place
    ext = build_extractor(bb, resolved, torch.device("cpu"), channels_last=False, pooling="avgmax")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ext.modules())
    pixels = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    got = forward_taps(ext, pixels, torch.device("cpu"), "fp32", channels_last=False)
    plain = create_feature_extractor(model, {t.node: t.node for t in resolved})
    preset = bb.transform()
    x = F.normalize(pixels.permute(0, 3, 1, 2).float() / 255, preset.mean, preset.std)
    with torch.inference_mode():
        want = {t.name: pool(v, "avgmax").numpy() for t, v in zip(resolved, plain(x).values(), strict=True)}
    for t in resolved:
        np.testing.assert_allclose(got[t.name], want[t.name], rtol=1e-4, atol=1e-5)


def test_padding_a_short_batch_keeps_its_rows():
    bb = Backbone("resnet18", weights="none", image_size=32)
    ext = build_extractor(bb, bb.resolve_taps(["layer1", "avgpool"]), torch.device("cpu"))
    pixels = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    a = forward_taps(ext, pixels, torch.device("cpu"), "fp32")
    b = forward_taps(ext, pixels, torch.device("cpu"), "fp32", pad_to=8)
    assert b["avgpool"].shape == (3, 512)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_inline_threads_and_worker_processes_write_identical_files(tiny_flat, tmp_path, cpu_run):
    RUN = cpu_run(workers=None)
    images = load_dataset(f"folder:{tiny_flat}")
    bb = Backbone("resnet18", weights="none", image_size=32)
    runs = [extract(images, bb, ["layer2", "avgpool"], out=tmp_path / name, loader=loader, workers=workers,
                    compile="off", **RUN)
            for name, loader, workers in [("serial", "inline", 0), ("threads", "inline", 2), ("procs", "workers", 2)]]
    files = [FeatureFile(r.path) for r in runs]
    for tap in ("layer2", "avgpool"):
        assert all(np.array_equal(files[0].read(tap), f.read(tap)) for f in files[1:])


@pytest.mark.slow
def test_replicas_write_the_inline_values_and_resume_to_identical_rows(tiny_flat, tmp_path, cpu_run):
    RUN = cpu_run(workers=None)
    images = load_dataset(f"folder:{tiny_flat}")  # 30 images in blocks of 4
    bb = Backbone("resnet18", weights="none", image_size=32)
    taps, run = ["layer2", "avgpool"], dict(compile="off", **RUN)
    inline = extract(images, bb, taps, out=tmp_path / "inline", loader="inline", workers=0, **run)
    whole = extract(images, bb, taps, out=tmp_path / "whole", loader="replicas", workers=2, **run)
    part = extract(images, bb, taps, out=tmp_path / "resumed", loader="replicas", workers=2, limit_batches=3, **run)
    assert part.images == 12 and not FeatureFile(part.path).attrs["complete"]
    resumed = extract(images, bb, taps, out=tmp_path / "resumed", loader="replicas", workers=2, **run)
    assert resumed.images == 18 and whole.images == 30 and whole.startup_seconds > 0
    for tap in taps:
        np.testing.assert_allclose(FeatureFile(whole.path).read(tap), FeatureFile(inline.path).read(tap),
                                   rtol=1e-5, atol=1e-6)
        assert np.array_equal(FeatureFile(whole.path).read(tap), FeatureFile(resumed.path).read(tap))


def test_a_dataset_replicas_cannot_receive_is_a_usage_error(tiny_flat, tmp_path, cpu_run):
    RUN = cpu_run(workers=None)
    images = load_dataset(f"folder:{tiny_flat}")
    images.reader = lambda path: path  # a local function does not pickle
    with pytest.raises(UsageError, match="cannot be sent to replica processes .* use --loader inline"):
        extract(images, Backbone("resnet18", weights="none", image_size=32), ["avgpool"], out=tmp_path,
                loader="replicas", workers=2, compile="off", **RUN)


@pytest.mark.slow
def test_compiled_extraction_matches_eager_and_reports_its_compile_time(tiny_flat, tmp_path, cpu_run, capsys):
    RUN = cpu_run(workers=None)
    if forward.can_compile(torch.device("cpu")):
        pytest.fail(f"this machine should be able to compile: {forward.can_compile(torch.device('cpu'))}")
    images = load_dataset(f"folder:{tiny_flat}")  # 30 images in batches of 4: the last one is short
    bb = Backbone("resnet18", weights="none", image_size=32)
    eager = extract(images, bb, ["layer2", "avgpool"], out=tmp_path / "eager", compile="off", **RUN)
    fast = extract(images, bb, ["layer2", "avgpool"], out=tmp_path / "compiled", compile="on", **RUN)
    assert eager.compile_seconds == 0 and fast.compile_seconds > 0
    for tap in ("layer2", "avgpool"):
        np.testing.assert_allclose(FeatureFile(fast.path).read(tap), FeatureFile(eager.path).read(tap),
                                   rtol=1e-3, atol=1e-4)
    # the file says so, and predict compiles the same graph: at the CPU's precision (bf16 where it has it)
    # Inductor's kernels round otherwise than eager ones
    assert "compiled" not in FeatureFile(eager.path).taps["avgpool"].extra
    compiled = FeatureFile(extract(images, bb, ["layer2", "avgpool"], out=tmp_path / "auto", compile="on",
                                   **{**RUN, "precision": "auto"}).path)
    assert compiled.taps["avgpool"].extra["compiled"] == RUN["batch_size"]
    assert main(["info", str(compiled.path)]) == 0 and "complete=True; compiled (batches of 4)" in capsys.readouterr().out
    run_dir, results, _ = fit_run(compiled, "avgpool", "avg", FitOptions(clf="logreg", grid=[1.0], device="cpu"),
                                  parse_protocol("per-class:5"), runs_root=tmp_path / "runs")
    assert results.features.taps[0].compiled == RUN["batch_size"]
    expected = load_model(run_dir, results).predict_proba(compiled.read("avgpool")).max(axis=1)
    preds = predict_images(run_dir, [str(tiny_flat / i) for i in images.ids], device="cpu")
    np.testing.assert_allclose([p.confidence for p in preds], expected, rtol=0, atol=1e-6)


def test_a_failing_compile_falls_back_to_eager_with_a_warning(tiny_flat, tmp_path, monkeypatch, cpu_run):
    RUN = cpu_run(workers=None)
    def broken(module, **options):  # what Inductor raises without a working toolchain
        raise RuntimeError("C++ compile error: cannot find Python.h\nlong log ...")

    monkeypatch.setattr(torch, "compile", broken)
    images = load_dataset(f"folder:{tiny_flat}")
    bb = Backbone("resnet18", weights="none", image_size=32)
    with pytest.warns(UserWarning, match=r"torch.compile failed \(C\+\+ compile error: cannot find Python.h\)"):
        report = extract(images, bb, ["avgpool"], out=tmp_path, compile="on", **RUN)
    assert report.compile_seconds == 0 and report.images == 30 and FeatureFile(report.path).attrs["complete"]


def test_compile_and_loader_choices(monkeypatch):
    cpu = torch.device("cpu")
    assert not resolve_compile("auto", cpu, forward.COMPILE_MIN_IMAGES - 1)
    assert resolve_compile("auto", cpu, forward.COMPILE_MIN_IMAGES)
    assert not resolve_compile("off", cpu, 10**6)
    assert not resolve_compile("auto", torch.device("mps"), 10**6)
    monkeypatch.setattr("shutil.which", lambda name: None)  # no C++ compiler: never compile on the CPU
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert not resolve_compile("on", cpu, 10)
    with pytest.raises(UsageError, match="valid: auto, on, off"):
        resolve_compile("fast", cpu, 10)
    assert resolve_loader("auto", "cuda", 10**6) == "workers"
    assert resolve_loader("workers", "cpu", 10) == "workers"
    assert resolve_loader("auto", "cpu", REPLICAS_MIN_IMAGES - 1) == "inline"
    for cores, expected in [(2, "replicas"), (1, "inline")]:  # one core: nothing to run in parallel
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: set(range(cores)))
        assert resolve_loader("auto", "cpu", REPLICAS_MIN_IMAGES) == expected
    with pytest.raises(UsageError, match="--loader replicas runs on cpu, not on cuda"):
        resolve_loader("replicas", "cuda", 10)
    with pytest.raises(UsageError, match="valid: auto, inline, workers, replicas"):  # ray is --engine's
        resolve_loader("ray", "cpu", 10)


def test_other_decoders_match_pil_and_keep_the_error_handling(tmp_path, image_folder, cpu_run):
    """simplejpeg (the CPU default) and decode_jpeg + tensor resizing (the CUDA default, here
    on the CPU) against PIL's path."""
    RUN = cpu_run(workers=None)
    image_folder(tmp_path / "data", per_class=4, size=90)
    Image.fromarray(np.full((70, 50, 3), 120, np.uint8)).save(tmp_path / "data" / "circle" / "flat.png")
    (tmp_path / "data" / "square" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    images = load_dataset(f"folder:{tmp_path / 'data'}")
    bb = Backbone("resnet18", weights="none", image_size=64)
    runs = {d: extract(images, bb, ["layer1", "avgpool"], out=tmp_path / d, decode=d, compile="off", **RUN)
            for d in ("pil", "torchvision", "simplejpeg")}
    assert list(runs["pil"].skipped) == ["square/broken.jpg"]
    for other in ("torchvision", "simplejpeg"):
        assert runs[other].skipped == runs["pil"].skipped
        for tap in ("layer1", "avgpool"):
            a, b = FeatureFile(runs["pil"].path).read(tap), FeatureFile(runs[other].path).read(tap)
            assert a.shape == b.shape == (len(images), bb.dim(tap))
            # Same images, a different resampling kernel: features agree closely, not bit for bit.
            assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


SPIN_PROBE = "import os, sys; import pipeline.cli; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"


@pytest.mark.parametrize("env,expected", [({}, "2000 False"), ({"GOMP_SPINCOUNT": "123"}, "123 False"),
                                          ({"OMP_WAIT_POLICY": "PASSIVE"}, "None False")])
def test_cli_shortens_openmp_spinning_before_torch_loads(env, expected):
    """The setting only works if libgomp has not loaded yet: importing the CLI must not import torch.
    A user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY wins."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", SPIN_PROBE], env={**base, **env}, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == expected
