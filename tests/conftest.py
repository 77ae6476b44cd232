"""Tiny synthetic datasets (a few small images per class, made fresh for each test session) and the
settings the tests share."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """The suite's own ``$TAPS_CACHE`` (exports, auto's choices, backbone cards): no test reads what an
    earlier session left in the user's cache, or writes into it."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TAPS_CACHE", str(tmp_path_factory.mktemp("taps_cache")))
    yield
    patch.undo()


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """A Hugging Face cache of this test's own (and a TAPS_CACHE with it): ``hf_cache(repo, filename)``
    puts an empty checkpoint where the hub's download of that file would be, and returns its path."""
    from huggingface_hub import constants

    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "taps_cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def put(repo: str, filename: str) -> Path:
        folder = tmp_path / "hf" / f"models--{repo.replace('/', '--')}"
        checkpoint = folder / "snapshots" / "0123abc" / filename
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"")  # its presence is all that a card reads
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text("0123abc")
        return checkpoint
    return put


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth, photo-like RGB image with noise (JPEG-friendly, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([np.sin(xx / 7.0 + seed), np.cos(yy / 5.0), np.sin((xx + yy) / 11.0)], -1) * 90 + 128
    return Image.fromarray(np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def photo():
    """``photo(w, h, seed)`` -> a photo-like PIL image."""
    return _photo


@pytest.fixture(scope="session")
def image_folder():
    """``image_folder(root, classes=..., per_class=6, size=40, seed=0, fmt="jpg")`` writes an
    ImageFolder tree of class-dependent patterns and returns the paths."""
    return _make_images


def _make_images(root: Path, classes=("circle", "square", "stripes"), per_class=6, size=40, seed=0, fmt="jpg"):
    """Class-dependent patterns plus noise, so a linear classifier can separate them."""
    rng = np.random.default_rng(seed)
    paths = []
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), np.float32)
            base[..., c % 3] = 200
            if c == 1:
                base[::4] = 255
            if c == 2:
                base[:, ::5] = 0
            img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            path = root / name / f"img_{i:03d}.{fmt}"
            Image.fromarray(img).save(path)
            paths.append(path)
    return paths


@pytest.fixture(scope="session")
def scene_folder():
    """``scene_folder(root, classes=..., per_class=8, size=64, seed=0)`` writes an ImageFolder tree of
    JPEGs that differ as photos do (each its own random layout of colour blobs, tinted by its class),
    unlike ``image_folder``'s one pattern per class, and returns the paths."""
    def make(root: Path, classes=("red", "green", "blue"), per_class=8, size=64, seed=0):
        rng, paths = np.random.default_rng(seed), []
        for c, name in enumerate(classes):
            (root / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                layout = rng.uniform(0, 200, (4, 4, 3))
                layout[..., c % 3] += 55
                path = root / name / f"img_{i:03d}.jpg"
                Image.fromarray(layout.astype(np.uint8)).resize((size, size), Image.BICUBIC).save(path)
                paths.append(path)
        return paths
    return make


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """folder: dataset with an official split (train/ and val/), 3 classes."""
    root = tmp_path_factory.mktemp("tiny")
    _make_images(root / "train", per_class=6, seed=1)
    _make_images(root / "val", per_class=3, seed=2)
    return root


@pytest.fixture(scope="session")
def tiny_flat(tmp_path_factory) -> Path:
    """folder: dataset without a split, 3 classes x 10 images."""
    root = tmp_path_factory.mktemp("flat")
    _make_images(root, per_class=10, seed=3)
    return root


# How most tests extract: on the CPU in fp32 (bit-stable), decoding inline, no progress bar, small
# blocks (several per tiny dataset, so resuming and checksums are exercised).
CPU_RUN = {"device": "cpu", "precision": "fp32", "workers": 0, "progress": False, "batch_size": 4}
# The same through the CLI: a tiny random-weights network, quietly on the CPU.
TINY = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32"]
QUIET = ["--no-progress", "--workers", "0", "--device", "cpu"]
FUSED_TAPS = ["layer1", "layer2", "layer3", "avgpool"]  # split_features' taps (test_fusion.TAPS)


@pytest.fixture(scope="session")
def cpu_run():
    """``cpu_run(**overrides)`` -> the shared extraction settings, as keyword arguments of ``extract``;
    an override of None leaves that option at its default (a test then passes it itself)."""
    return lambda **overrides: {k: v for k, v in {**CPU_RUN, **overrides}.items() if v is not None}


@pytest.fixture()
def csv_world(tmp_path, image_folder):
    """Six images in two classes under ``tmp_path/images``, and their CSV rows (path,label)."""
    image_folder(tmp_path / "images", classes=("a", "b"), per_class=3)
    rows = [f"{c}/img_{i:03d}.jpg,{c}" for c in "ab" for i in range(3)]
    return tmp_path, rows


@pytest.fixture()
def copies(tmp_path, image_folder):
    """A folder with byte-identical images: one copied within its class, one across two classes."""
    root = tmp_path / "copies"
    image_folder(root, classes=("a", "b", "c"), per_class=8)
    shutil.copy(root / "a" / "img_000.jpg", root / "a" / "copy_of_000.jpg")
    shutil.copy(root / "a" / "img_001.jpg", root / "b" / "copy_of_a001.jpg")
    return root


@pytest.fixture(scope="module")
def torchvision_resnet18_file(tmp_path_factory):
    """A torchvision resnet18 (seeded random weights) and its state dict as .pth and .safetensors."""
    import torch
    from safetensors.torch import save_file

    from features.backbones import Backbone

    tv = Backbone("resnet18", weights="none", image_size=64)
    state = tv.build().state_dict()
    folder = tmp_path_factory.mktemp("weights")
    torch.save(state, folder / "resnet18.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "resnet18.safetensors")
    return tv, folder


@pytest.fixture(scope="module")
def messy(tmp_path_factory, image_folder) -> Path:
    """A folder dataset with every kind of odd or broken image."""
    root = tmp_path_factory.mktemp("messy")
    image_folder(root, classes=("good", "odd"), per_class=4)
    odd = root / "odd"
    rgb = np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(odd / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(odd / "palette.png")
    Image.fromarray(np.dstack([rgb, np.full((30, 30), 128, np.uint8)])).save(odd / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(odd / "deep16.png")
    Image.fromarray(rgb[..., 0]).save(odd / "grey.jpg")
    Image.fromarray(rgb).save(odd / "anim.gif")
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    whole = (root / "good" / "img_000.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (bad / "notes.jpg").write_text("this is not an image")
    Image.new("RGB", (1100, 1000)).save(bad / "bomb.png")
    (bad / "readme.txt").write_text("ignored: not an image extension")
    return root


@pytest.fixture(scope="module")
def long_set(tmp_path_factory, image_folder) -> Path:
    """360 small images: long enough for a run to be killed halfway."""
    root = tmp_path_factory.mktemp("long")
    image_folder(root, per_class=120, size=24, seed=5)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_flat, image_folder):
    """A folder dataset with its features and a fitted run, CSV variants, and a set of broken images."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("world")
    fs, runs = root / "fs", root / "runs"
    data = ["--dataset", f"folder:{tiny_flat}", *TINY, "--features-root", str(fs)]
    assert main(["extract", *data, *QUIET]) == 0
    assert main(["fit", *data, "--clf", "logreg", "--grid", "1", "--device", "cpu", "--protocol", "per-class:5",
                 "--runs-root", str(runs)]) == 0
    run = next(runs.rglob("results.json")).parent
    image_folder(root / "images", classes=("a", "b"), per_class=3)
    rows = [f"{c}/img_{i:03d}.jpg,{c}" for c in "ab" for i in range(3)]
    (root / "ok.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    (root / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (root / "ok.csv").read_bytes())
    (root / "short.csv").write_text("path,label\n" + rows[0] + "\n" + "b/img_000.jpg\n")
    (root / "one.csv").write_text("path\n" + "\n".join(r.split(",")[0] for r in rows) + "\n")
    (root / "swapped.csv").write_text("label,path\n" + "\n".join(",".join(reversed(r.split(","))) for r in rows))
    broken = root / "broken"
    for c in ("x", "y"):
        (broken / c).mkdir(parents=True)
        for i in range(3):
            (broken / c / f"{i}.jpg").write_bytes(b"not a jpeg")
    (root / "afile").write_text("")
    (root / "twice.csv").write_text("path,label\n" + "\n".join(rows + rows[:1]) + "\n")
    (root / "numbers.csv").write_text("path,label\n" + "\n".join(r.replace(",a", ",1").replace(",b", ",1.0")
                                                                  for r in rows) + "\n")
    (root / "nolabel.csv").write_text("path,label\n" + "\n".join(rows[:2] + [rows[2].split(",")[0] + ","]) + "\n")
    (root / "latin.csv").write_bytes(("path,label\n" + "\n".join(rows[:4] + [r + "é" for r in rows[4:]]) + "\n")
                                     .encode("latin-1"))
    return {"root": root, "data": data, "fs": fs, "run": run, "image": str(next(tiny_flat.glob("circle/*.jpg")))}


@pytest.fixture(scope="module")
def tiny_features(tiny_flat, tmp_path_factory, cpu_run):
    """resnet18 (random weights) layer1, layer2 and avgpool of the flat dataset: (images, file, root)."""
    from features.backbones import Backbone
    from features.datasets import load_dataset
    from features.extract import extract
    from features.store import FeatureFile

    RUN = cpu_run(batch_size=8)
    out = tmp_path_factory.mktemp("fs")
    images = load_dataset(f"folder:{tiny_flat}")
    report = extract(images, Backbone("resnet18", weights="none", image_size=32), ["layer1", "layer2", "avgpool"],
                     out=out, **RUN)
    return images, FeatureFile(report.path), out


@pytest.fixture(scope="module")
def split_features(tiny_folder, tmp_path_factory, cpu_run):
    """resnet18 (random weights) taps of a dataset with an official train/val split."""
    from features.backbones import Backbone
    from features.datasets import load_dataset
    from features.extract import extract
    from features.store import FeatureFile

    RUN = cpu_run(batch_size=8)
    images = load_dataset(f"folder:{tiny_folder}")
    report = extract(images, Backbone("resnet18", weights="none", image_size=32), FUSED_TAPS,
                     out=tmp_path_factory.mktemp("fs"), **RUN)
    return images, FeatureFile(report.path)



@pytest.fixture(scope="module")
def two_backbones(tiny_flat, tmp_path_factory):
    """The flat dataset through two random-weights backbones (resnet18: layer2, avgpool; mobilenet_v2:
    block3, pooled), each in its feature file of one features root: (CLI data arguments, root)."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("two")
    data = ["--dataset", f"folder:{tiny_flat}", "--features-root", str(root / "fs")]
    for backbone, taps in (("resnet18", "layer2,avgpool"), ("mobilenet_v2", "block3,pooled")):
        assert main(["extract", *data, "--backbone", backbone, "--weights", "none", "--image-size", "32",
                     "--taps", taps, *QUIET]) == 0
    return data, root


@pytest.fixture(scope="session")
def tiny_hf_vit(tmp_path_factory) -> Path:
    """A tiny random ViT saved as a Hugging Face repo folder (3 layers, 32 px, 8 px patches), with its
    image processor: what `hf:FOLDER` reads offline."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("hf") / "tinyvit"
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
