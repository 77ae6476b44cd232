"""Stage one on tiny synthetic images with randomly initialised nets."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

from features.backbones import Backbone
from features.datasets import class_files, csv_dataset, load_dataset
from features.errors import TapsError, UsageError
from features.extract import extract
from features.pooling import POOLINGS, pool, pooled_dim
from features.store import FeatureFile


def resnet(size=32):
    return Backbone("resnet18", weights="none", image_size=size)


def test_friendly_taps_resolve_in_depth_order():
    bb = resnet()
    assert list(bb.taps) == ["stem", "layer1", "layer2", "layer3", "layer4", "avgpool", "logits"]
    assert bb.default_tap == "avgpool" and bb.taps["avgpool"].shape == (512,)
    vgg = Backbone("vgg16", weights="none")
    assert vgg.default_tap == "fc7" and vgg.taps["fc6"].shape == (4096,) and vgg.taps["pool5"].node == "features.30"
    mnv2 = Backbone("mobilenet_v2", weights="none")
    assert mnv2.taps["pooled"].shape == (1280,) and mnv2.taps["block14"].node == "features.14"
    # Raw graph node names are taps too.
    assert bb.tap("layer3.1.relu_1").shape[0] == 256


def test_unknown_names_list_valid_choices():
    with pytest.raises(UsageError, match="valid: stem, layer1"):
        resnet().tap("layer9")
    with pytest.raises(UsageError, match="unknown backbone"):
        Backbone("resnet19")
    with pytest.raises(UsageError, match="valid: digits"):
        load_dataset("imagenet22k")
    with pytest.raises(UsageError, match="valid: auto, DEFAULT"):
        Backbone("resnet18", weights="IMAGENET9K")


def test_avgstd_pooling_is_each_channels_mean_then_its_population_std():
    x = torch.rand(2, 4, 3, 5)
    want = np.concatenate([x.numpy().mean(axis=(2, 3)), x.numpy().std(axis=(2, 3))], axis=1)
    np.testing.assert_allclose(pool(x, "avgstd").numpy(), want, rtol=1e-5, atol=1e-6)
    assert pooled_dim((4, 3, 5), "avgstd") == 8
    # a 1x1 map (a late tap of a small image) has spread 0, not NaN as the unbiased estimate would give
    assert (pool(x[:, :, :1, :1], "avgstd")[:, 4:] == 0).all()


def test_gem_pooling_is_the_cubic_mean_between_average_and_max():
    x = torch.rand(2, 4, 3, 5)
    want = (x.numpy().astype(np.float64) ** 3).mean(axis=(2, 3)) ** (1 / 3)
    np.testing.assert_allclose(pool(x, "gem").numpy(), want, rtol=1e-5)
    assert (pool(x, "avg") <= pool(x, "gem") + 1e-6).all() and (pool(x, "gem") <= pool(x, "max") + 1e-6).all()
    assert (pool(-x, "gem") < 1e-5).all()  # negative responses count as zero, not as NaN


@pytest.mark.parametrize("method", POOLINGS)
def test_pooling_dimensions(method):
    from features.pooling import pool_tap

    x = torch.randn(2, 8, 6, 5)
    tokens = torch.randn(2, 1 + 6 * 5, 8)  # a class token, then a 6 x 5 grid of 8-D patch tokens
    assert pool_tap(tokens, method, "tokens", 1, (6, 5)).shape == (2, pooled_dim((8, 6, 5), method))
    assert pool_tap(torch.randn(2, 7), method).shape == (2, 7)
    if method == "cls":  # a feature map has no class token
        with pytest.raises(ValueError, match="class token"):
            pool_tap(x, method)
    else:
        assert pool(x, method).shape == (2, pooled_dim((8, 6, 5), method))
        torch.testing.assert_close(pool_tap(x.permute(0, 2, 3, 1), method, "nhwc"), pool(x, method))


def test_one_pass_writes_every_tap_with_listed_dims(tiny_folder, tmp_path, cpu_run):
    RUN = cpu_run()
    images = load_dataset(f"folder:{tiny_folder}")
    bb = resnet()
    report = extract(images, bb, ["layer2", "stem", "avgpool", "logits"], pooling="avgmax", out=tmp_path, **RUN)
    assert report.computed == ["stem@avgmax", "layer2@avgmax", "avgpool", "logits"] and report.images == len(images) == 27
    f = FeatureFile(report.path)
    assert f.attrs["complete"] and f.attrs["backbone"] == "resnet18" and f.attrs["weights"] == "none"
    assert sorted(f.taps) == ["avgpool", "layer2@avgmax", "logits", "stem@avgmax"]
    assert f.read("layer2", "avgmax").shape == (27, bb.dim("layer2", "avgmax")) == (27, 256)
    assert f.read("avgpool").shape == (27, 512)
    with pytest.raises(TapsError, match=r"--taps layer2 --pool avg` first, or pass --pool avgmax to fit the one"):
        f.read("layer2")  # the default pooling: the one there is named
    assert set(f.split) == {"train", "val"} and f.split.count("val") == 9
    assert f.classes == ["circle", "square", "stripes"] and f.ids[0] == "train/circle/img_000.jpg"
    assert np.bincount(f.labels).tolist() == [9, 9, 9]


def test_matches_a_direct_forward_pass(tiny_flat, tmp_path, cpu_run):
    """PIL decoding: the file holds what the model gives on the preset's PIL path."""
    RUN = cpu_run()
    images = load_dataset(f"folder:{tiny_flat}")
    bb = resnet()
    report = extract(images, bb, ["logits"], out=tmp_path, decode="pil", **RUN)
    model, transform = bb.build(), bb.transform()
    with torch.inference_mode():
        direct = model(torch.stack([transform(images.image(i)) for i in range(3)])).numpy()
    np.testing.assert_allclose(FeatureFile(report.path).read("logits")[:3], direct, rtol=1e-4, atol=1e-4)


def test_default_decoder_matches_the_presets_tensor_path(tiny_flat, tmp_path, cpu_run):
    """simplejpeg (the CPU default) against the preset on decoded uint8 tensors: the loader
    rounds its resized pixels to uint8, so logits agree to that rounding."""
    RUN = cpu_run()
    from torchvision.transforms.functional import pil_to_tensor

    images = load_dataset(f"folder:{tiny_flat}")
    bb = resnet()
    report = extract(images, bb, ["logits"], out=tmp_path, **RUN)
    model, transform = bb.build(), bb.transform()
    with torch.inference_mode():
        direct = model(torch.stack([transform(pil_to_tensor(images.image(i))) for i in range(3)])).numpy()
    got = FeatureFile(report.path).read("logits")[:3]
    assert np.abs(got - direct).max() < 0.01 * np.abs(direct).max()


def test_a_run_resumes_only_with_the_decoder_it_started_with(tiny_flat, tmp_path, cpu_run):
    """Decoders differ at the rounding level: one tap's rows all come from one of them."""
    RUN = cpu_run()
    images = load_dataset(f"folder:{tiny_flat}")
    part = extract(images, resnet(), ["avgpool"], out=tmp_path, limit_batches=2, decode="pil", **RUN)
    with h5py.File(part.path) as h5:
        assert h5["taps/avgpool"].attrs["decode"] == "pil"
    with pytest.raises(TapsError, match="was started with decode pil, but this run resolves to decode simplejpeg; "
                                        "rerun with --decode pil to use it, or pass --force"):
        extract(images, resnet(), ["avgpool"], out=tmp_path, decode="simplejpeg", **RUN)
    assert extract(images, resnet(), ["avgpool"], out=tmp_path, **RUN).images == 30 - 8  # auto: the file's decoder
    assert FeatureFile(part.path).taps["avgpool"].decode == "pil"
    with pytest.raises(UsageError, match="with --engine ray use --decode simplejpeg or pil"):
        extract(images, resnet(), ["avgpool"], out=tmp_path / "ray", engine="ray", decode="torchvision", **RUN)


def test_interrupted_run_resumes_to_identical_arrays(tiny_flat, tmp_path, cpu_run):
    RUN = cpu_run()
    images = load_dataset(f"folder:{tiny_flat}")
    clean = extract(images, resnet(), ["layer3", "avgpool"], out=tmp_path / "clean", **RUN)
    part = extract(images, resnet(), ["layer3", "avgpool"], out=tmp_path / "part", limit_batches=3, **RUN)
    with h5py.File(part.path) as h5:
        assert h5["taps/avgpool"].attrs["rows_done"] == 12 and not h5.attrs["complete"]
    resumed = extract(images, resnet(), ["layer3", "avgpool"], out=tmp_path / "part", **RUN)
    assert resumed.images == 30 - 12
    a, b = FeatureFile(clean.path), FeatureFile(resumed.path)
    for tap in ("layer3", "avgpool"):
        assert np.array_equal(a.read(tap), b.read(tap))


def test_rerun_reuses_and_new_taps_are_added(tiny_flat, tmp_path, cpu_run):
    RUN = cpu_run()
    images = load_dataset(f"folder:{tiny_flat}")
    first = extract(images, resnet(), ["avgpool"], out=tmp_path, **RUN)
    again = extract(images, resnet(), ["avgpool"], out=tmp_path, **RUN)
    assert again.computed == [] and again.reused == ["avgpool"] and again.images == 0
    before = FeatureFile(first.path).read("avgpool")
    more = extract(images, resnet(), ["layer1", "avgpool"], out=tmp_path, **RUN)
    assert more.computed == ["layer1"] and more.reused == ["avgpool"]
    assert np.array_equal(FeatureFile(more.path).read("avgpool"), before)


def test_mismatched_or_foreign_files_are_refused(tiny_flat, tmp_path, cpu_run):
    RUN = cpu_run()
    images = load_dataset(f"folder:{tiny_flat}")
    path = tmp_path / "f.h5"
    extract(images, resnet(32), ["avgpool"], path=path, **RUN)
    with pytest.raises(TapsError, match="--force"):
        extract(images, resnet(48), ["avgpool"], path=path, **RUN)
    bad = tmp_path / "junk.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(TapsError, match="junk.h5 is not an HDF5 file; pass --force to replace it"):
        extract(images, resnet(32), ["avgpool"], path=bad, **RUN)
    report = extract(images, resnet(32), ["avgpool"], path=bad, force=True, **RUN)
    assert FeatureFile(report.path).attrs["complete"]


def test_digits_dataset_is_embedded():
    digits = load_dataset("digits")
    assert len(digits) == 1797 and len(digits.classes) == 10
    assert digits.image(0).mode == "RGB" and digits.image(0).size == (8, 8)
    assert digits.fingerprint() == load_dataset("digits").fingerprint()


def test_csv_dataset_and_root_escape(tmp_path, image_folder):
    image_folder(tmp_path / "images", classes=("a", "b"), per_class=2)
    rows = ["image_names,emergency_or_not"] + [f"{c}/img_{i:03d}.jpg,{int(c == 'a')}" for c in "ab" for i in range(2)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    ds = csv_dataset(tmp_path / "train.csv")
    assert len(ds) == 4 and ds.classes == ["0", "1"] and ds.labels.tolist() == [1, 1, 0, 0]
    assert ds.image(0).size == (40, 40)
    (tmp_path / "evil.csv").write_text("path,label\n../../etc/passwd,x\n")
    with pytest.raises(UsageError, match="outside"):
        csv_dataset(tmp_path / "evil.csv")


def test_class_folders_are_listed_in_torchvisions_imagefolder_order(tmp_path, image_folder):
    """Nested folders, a linked folder, upper-case extensions and files that are not images: the same
    files in the same order as torchvision's ``make_dataset`` (taps lists them without importing it)."""
    from torchvision.datasets.folder import make_dataset

    from features.datasets import IMAGE_EXTENSIONS

    root = tmp_path / "images"
    image_folder(root, classes=("b", "a"), per_class=3)
    (root / "a" / "z_sub" / "deeper").mkdir(parents=True)
    for name in ("B.JPG", "notes.txt", "c.Png"):
        (root / "a" / "z_sub" / name).write_bytes(b"x")
    (root / "a" / "z_sub" / "deeper" / "d.jpeg").write_bytes(b"x")
    (root / "a" / "linked").symlink_to(root / "b", target_is_directory=True)
    for c in ("a", "b"):
        want = [p for p, _ in make_dataset(str(root), {c: 0}, extensions=IMAGE_EXTENSIONS)]
        assert [str(p) for p in class_files(root / c)] == want
    assert len(class_files(root / "a")) == 3 + 3 + 3  # its own, z_sub's three images, and b's through the link


def test_caltech101_is_listed_as_torchvision_lists_it_without_importing_it(tmp_path, image_folder):
    """Its categories (sorted, BACKGROUND_Google left out), each counted by every entry of its folder
    and named image_0001.jpg…: the same ids and labels, so files made through torchvision stay valid."""
    from torchvision.datasets import Caltech101

    folder = tmp_path / "caltech101" / "101_ObjectCategories"
    for category, n in (("airplanes", 3), ("Faces_easy", 2), ("BACKGROUND_Google", 2), ("ant", 1)):
        for i in range(1, n + 1):
            image_folder(tmp_path / "scratch", classes=("x",), per_class=1)
            (folder / category).mkdir(parents=True, exist_ok=True)
            (tmp_path / "scratch" / "x" / "img_000.jpg").rename(folder / category / f"image_{i:04d}.jpg")
    reference = Caltech101(str(tmp_path))
    images = load_dataset("caltech101", data_root=tmp_path)
    assert images.classes == reference.categories == ["Faces_easy", "airplanes", "ant"]
    assert images.ids == [f"{reference.categories[y]}/image_{i:04d}.jpg" for i, y in zip(reference.index, reference.y,
                                                                                        strict=True)]
    assert images.labels.tolist() == reference.y
    probe = (f"import sys; from features.datasets import load_dataset; "
             f"n = len(load_dataset('caltech101', data_root={str(tmp_path)!r})); "
             f"print(n, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["6", "False"]


def test_fashion_mnist_idx_files_read_as_torchvision_reads_them_without_importing_it(tmp_path):
    from torchvision.datasets import FashionMNIST

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 7), ("t10k", 3)):  # the idx layout: magic, dimensions big-endian, bytes
        images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + b"".join(
            d.to_bytes(4, "big") for d in images.shape) + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.tobytes())
    images = load_dataset("fashion_mnist", data_root=tmp_path, download=False)
    train, test = FashionMNIST(str(tmp_path), train=True), FashionMNIST(str(tmp_path), train=False)
    np.testing.assert_array_equal(images.pixels, np.concatenate([train.data.numpy(), test.data.numpy()]))
    assert images.labels.tolist() == train.targets.tolist() + test.targets.tolist()
    assert images.classes == train.classes and images.splits == ["train"] * 7 + ["test"] * 3
    probe = (f"import sys; from features.datasets import load_dataset; "
             f"n = len(load_dataset('fashion_mnist', data_root={str(tmp_path)!r}, download=False)); "
             f"print(n, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["10", "False"]
    (raw / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"\0\0")
    with pytest.raises(TapsError, match=r"holds 2 values, not the 5 its header says; delete it"):
        load_dataset("fashion_mnist", data_root=tmp_path, download=False)


@pytest.mark.parametrize("name,tap,first_tap,libraries", [
    ("resnet18", "layer3", ["stem", "maxpool", [64, 12, 12]], ["torch", "torchvision"]),
    ("timm:resnet18", "stage4", ["stage1", "act1", [64, 24, 24]], ["timm", "torch", "torchvision"])])
def test_a_backbone_card_answers_as_its_source_did_without_importing_torch(name, tap, first_tap, libraries, tmp_path):
    """The first process resolves the backbone and keeps its card; the second answers from the card:
    the same taps, shapes, preprocessing, weights, graph nodes and refusal of a misspelt tap, and neither
    the source's library nor torch is imported."""
    probe = f"""import json, sys
from features.backbones import Backbone
b = Backbone({name!r}, weights='none', image_size=48)
taps = b.resolve_taps(['all'])
try:
    b.tap({tap + 'x'!r})
except Exception as exc:
    misspelt = str(exc)
print(json.dumps({{'taps': [[t.name, t.node, list(t.shape), t.depth] for t in taps], 'default': b.default_tap,
                  'transform': b.transform_spec(), 'weights': b.weights.spec, 'args': b.spec_args(),
                  'dim': b.dim({tap!r}, 'pyramid'), 'by_node': str(b.tap(taps[-2].node)), 'nodes': b.node_names(),
                  'misspelt': misspelt, 'imported': sorted({{'timm', 'torch', 'torchvision'}} & set(sys.modules))}}))"""
    env = {**os.environ, "TAPS_CACHE": str(tmp_path)}
    first, second = (json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                               check=True).stdout) for _ in range(2))
    assert first.pop("imported") == libraries and second.pop("imported") == []
    assert first == second and first["taps"][0][:3] == first_tap
    assert f"unknown tap '{tap}x' for {name}; did you mean {tap} or" in first["misspelt"] and len(first["nodes"]) > 20


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("mobilenet_v2", 64), ("vit_b_16", None), ("swin_t", None)])
def test_a_friendly_taps_node_names_that_tap_traced_or_not(name, size):
    """Runs record taps by node; a node that a friendly tap names is that tap (shape, depth, layout), as
    tracing the node finds it, without tracing (a card-backed backbone has no graph to trace)."""
    bb = Backbone(name, weights="none", image_size=size)
    for tap in bb.taps.values():
        assert bb.tap(tap.node) == bb.resolver.tap(tap.node) == replace(tap, name=tap.node)


def test_a_backbone_card_is_not_trusted_once_a_checkpoint_auto_read_comes_or_goes(tmp_path, monkeypatch):
    """``auto`` takes the checkpoint on disk: a card made with only V1 cached must not answer once
    torchvision's DEFAULT (V2, other preprocessing) is there too."""
    from torchvision.models import MobileNet_V2_Weights

    from features.backbones import _checkpoint_path

    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    v1, v2 = (_checkpoint_path(m) for m in (MobileNet_V2_Weights.IMAGENET1K_V1, MobileNet_V2_Weights.IMAGENET1K_V2))
    v1.parent.mkdir(parents=True)
    v1.write_bytes(b"")  # its presence is all that auto and check_weights read
    first = Backbone("mobilenet_v2")
    assert first.card is None and first.resolve_taps(["block3"])[0].shape == (24, 56, 56)
    again = Backbone("mobilenet_v2")
    assert again.card is not None and again.weights.spec == first.weights.spec == "MobileNet_V2_Weights.IMAGENET1K_V1"
    again.check_weights()  # from the card: the file is there (building from this empty file would fail)
    v2.write_bytes(b"")
    after = Backbone("mobilenet_v2")
    assert after.card is None and after.weights.spec == "MobileNet_V2_Weights.IMAGENET1K_V2"
    assert after.transform_spec() != first.transform_spec()  # V2's preset resizes to 232, not 256


def test_a_damaged_backbone_card_is_resolved_afresh_and_rewritten(tmp_path, monkeypatch):
    from features.models.cards import card_path

    monkeypatch.setenv("TAPS_CACHE", str(tmp_path))
    want = resnet(40).resolve_taps(["layer2"])
    path = card_path("resnet18", "none", 40)
    assert path.is_file()
    path.write_text('{"name": "resnet18", "taps": [')  # a write cut short, or another version's card
    again = resnet(40)
    assert again.card is None and again.resolve_taps(["layer2"]) == want
    assert resnet(40).card is not None  # rewritten whole


def test_a_registered_tap_scheme_names_a_familys_taps():
    from features.backbones import TAP_SCHEMES, TapScheme, register_tap_scheme

    stages = {"stem": "stem", **{f"stage{i}": f"trunk_output.block{i}" for i in range(1, 5)}}
    scheme = TapScheme("regnet", lambda name, model: name.startswith("regnet"), lambda model: stages, "stage4")
    register_tap_scheme(scheme)
    try:
        bb = Backbone("regnet_y_400mf", weights="none", image_size=64)
        assert bb.scheme is scheme and bb.default_tap == "stage4"
        assert list(bb.taps) == ["stem", "stage1", "stage2", "stage3", "stage4", "pooled", "logits"]
        assert bb.taps["stage4"].shape == (440, 2, 2) and bb.dim("stage4", "pyramid") == 5 * 440
    finally:
        TAP_SCHEMES.remove(scheme)
    assert Backbone("regnet_y_400mf", weights="none").scheme.name == "generic"
    # no backbone card was kept while a scheme from outside the package named the taps
    assert "stage4" not in Backbone("regnet_y_400mf", weights="none", image_size=64).taps


def test_version_1_files_are_read_and_resumed_as_before(tiny_flat, tmp_path, cpu_run):
    """Files from before format_version 2 have no block checksums and may lack the decoder attribute."""
    RUN = cpu_run()
    images = load_dataset(f"folder:{tiny_flat}")
    part = extract(images, resnet(), ["avgpool"], out=tmp_path, limit_batches=2, decode="pil", **RUN)
    with h5py.File(part.path, "r+") as h5:  # as version 1 wrote it
        h5.attrs["format_version"] = 1
        del h5["blocks"]
        del h5["taps/avgpool"].attrs["decode"]
    assert FeatureFile(part.path).taps["avgpool"].decode == "pil"
    done = extract(images, resnet(), ["avgpool"], out=tmp_path, decode="pil", **RUN)
    clean = extract(images, resnet(), ["avgpool"], out=tmp_path / "clean", decode="pil", **RUN)
    assert done.images == 30 - 8 and np.array_equal(FeatureFile(done.path).read("avgpool"),
                                                    FeatureFile(clean.path).read("avgpool"))
