"""`taps bench`: extraction and stage-two speed, measured in one run on the same images.

- ceiling: the same extractor's forward on preprocessed uint8 batches already in memory,
  laid out over the cores as the pipeline runs it (one-thread replicas on a CPU);
- pipeline: :func:`features.extract.extract` end to end on JPEG files, 3 taps in one pass;
- seed-style: how the tutorials do it: ``Resize((224, 224))``, fp32, NCHW, a default
  ``DataLoader`` (no workers), ``torch.no_grad`` and one forward pass per tap;
- ablations: the pipeline with one optimisation switched off at a time;
- early tap: ResNet18 ``layer2`` alone against the full pass;
- peak RSS of the pipeline at two dataset sizes; page faults per batch with and without
  the kept-memory allocator setting; stage-two fit times.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from features.backbones import Backbone
from features.blocks import prepare_forward
from features.catalog import feature_path
from features.datasets import FileImageSet, folder_dataset
from features.decoders import PIL, TORCHVISION
from features.engines.replicas import ReplicaEngine
from features.errors import UsageError
from features.extract import dataset_calibration, extract
from features.loaders import (
    AUTO,
    INLINE,
    REPLICAS,
    REPLICAS_MIN_IMAGES,
    WORKERS,
    default_workers,
    get_loader,
    resolve_loader,
)
from features.options import FEATURES_ROOT, RunConfig, resolve_device, resolve_precision
from features.pooling import DEFAULT_POOLING
from features.precisions import FP32, INT8
from features.runtime import cpu_description, keep_freed_memory
from features.runtime_records import TORCH, get_runtime
from features.runtimes import installed_runtimes, prepare_export, runtime_precision, with_int8


def synthetic_jpegs(folder: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """Photo-like JPEGs (smooth colour fields plus texture), written once and reused."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*/*.jpg"))
    if len(existing) >= n:
        return folder
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        cls = folder / f"class{i % 10}"
        cls.mkdir(exist_ok=True)
        a, b, c = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(xx * a + i), np.cos(yy * b), np.sin((xx + yy) * c)], -1) * 100 + 128
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(cls / f"img_{i:05d}.jpg", quality=90)
    return folder


CALTECH_FOLDER = "caltech101/101_ObjectCategories"


def bench_images(n: int, data_root: str | None, work: Path) -> tuple[FileImageSet, str]:
    caltech = Path(data_root or "") / CALTECH_FOLDER
    if data_root:
        paths = sorted(p for p in caltech.glob("*/*.jpg") if p.parent.name != "BACKGROUND_Google")
        paths = paths[:: max(1, len(paths) // n)][:n]  # spread over the classes
        classes = sorted({p.parent.name for p in paths})
        images = FileImageSet("bench-caltech101", caltech, paths, classes, [classes.index(p.parent.name) for p in paths])
        return images, f"{len(images)} Caltech-101 JPEGs"
    return folder_dataset(synthetic_jpegs(work / "jpegs500x375", n)), f"{n} synthetic 500x375 JPEGs"


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def ceiling(backbone: Backbone, images, taps: list[str], cfg: RunConfig) -> float:
    """Forward-only images/s: the pipeline's own extractor (same taps, pooling, precision, layout,
    compilation, processes and threads) on preprocessed uint8 batches already in memory: only
    loading and writing are missing. With replicas every replica runs its share at once."""
    resolved = backbone.resolve_taps(taps)
    if cfg.loader == REPLICAS:
        with ReplicaEngine(images, backbone, resolved, cfg) as pool:
            return pool.forward_rate(0, len(images))
    crop, bs = backbone.pixel_transform(), cfg.batch_size
    pixels = torch.from_numpy(np.stack([crop(images.image(i)) for i in range(len(images))]))
    with keep_freed_memory():  # as extract() runs
        forward = prepare_forward(backbone, resolved, cfg, len(pixels))
        forward(pixels[:bs])  # warm-up
        t0 = time.perf_counter()
        for s in range(0, len(pixels), bs):
            forward(pixels[s:s + bs])
        if cfg.device.type == "cuda":
            torch.cuda.synchronize()
        return _rate(len(pixels), time.perf_counter() - t0)


def decode_rate(backbone: Backbone, images, cfg: RunConfig) -> float:
    """Images/s of the loader's work alone: decoding, resizing and collating every block as the
    pipeline does (its decoder and draft scale), blocks spread over ``cfg.workers`` threads (one per
    core), no model. Set against the forward alone (the ceiling), it says how much of the time the
    pipeline spends besides the forward is decoding."""
    from concurrent.futures import ThreadPoolExecutor

    from features.blocks import BlockSource, block_ranges

    source = BlockSource.of(images, backbone.pixel_transform(), cfg)
    blocks = list(block_ranges(0, len(images), cfg.batch_size))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, cfg.workers), thread_name_prefix="bench-decode") as pool:
        for _ in pool.map(lambda rows: source.load(rows.start, rows.stop), blocks):
            pass
    return _rate(len(images), time.perf_counter() - t0)


class _SeedStyle(Dataset):
    def __init__(self, images):
        self.images = images
        self.t = T.Compose([T.Resize((224, 224)), T.ToTensor(),
                            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.t(Image.open(self.images.paths[i]).convert("RGB"))


def seed_style(backbone: Backbone, images, taps: list[str], device, batch_size: int) -> float:
    """The tutorial way: one truncated model per tap, each run over every batch, fp32 NCHW."""
    model = backbone.build()
    per_tap = [backbone.feature_graph(model, {backbone.tap(t).node: "out"}).eval().to(device) for t in taps]
    loader = DataLoader(_SeedStyle(images), batch_size=batch_size)
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            for m in per_tap:
                m(batch)["out"].flatten(1).cpu().numpy()
    return _rate(len(images), time.perf_counter() - t0)


FAULTS_PROBE = """
import json, resource, torch
from features.runtime import cpu_description, keep_freed_memory

def faults_per_batch(n=16):
    out = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 << 20).sum()  # a 64 MB activation: above glibc's largest mmap threshold
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out

default = faults_per_batch()
with keep_freed_memory():
    kept = faults_per_batch()
print(json.dumps([default, kept]))
"""


def page_faults_per_batch() -> dict[str, float]:
    """Median page faults of a 64 MB activation per batch, with glibc's defaults and with the
    allocator setting extraction runs under (:func:`features.runtime.keep_freed_memory`), in a
    fresh process: the heap a long run leaves behind is not an extraction's."""
    out = subprocess.run([sys.executable, "-c", FAULTS_PROBE], capture_output=True, text=True, check=True)
    default, kept = json.loads(out.stdout)
    return {"default": float(np.median(default)), "kept": float(np.median(kept))}


def peak_rss_mb(n: int, work: Path, backbone: str, weights: str, compile: str, loader: str) -> float:
    """Peak RSS (largest process of the run) of `taps extract` over n small JPEGs, in a fresh process."""
    folder = synthetic_jpegs(work / f"rss{n}", n, size=(80, 80), seed=1)
    cmd = [sys.executable, "-m", "pipeline", "extract", "--dataset", f"folder:{folder}", "--backbone", backbone,
           "--weights", weights, "--image-size", "64", "--taps", "all", "--no-progress", "--force",
           "--compile", compile, "--loader", loader, "--features-root", str(work / f"rss_out{n}")]
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def startup_seconds(work: Path, backbone: Backbone, repeats: int = 3) -> dict[str, float]:
    """Wall seconds of short commands, each in a fresh interpreter (the median of ``repeats``): the
    fixed cost a user waits for before any image is embedded. The extractions make a new file each
    time (``--force``) from 10 small JPEGs, so their time is almost all start-up."""
    ten = synthetic_jpegs(work / "jpegs10", 10, size=(160, 120))
    taps = [sys.executable, "-m", "pipeline"]
    data = ["--dataset", f"folder:{ten}", "--backbone", backbone.name, "--features-root", str(work / "startup"),
            "--weights", "auto" if backbone.weights.pretrained else "none", "--force", "--no-progress"]
    commands = {"taps --help": [*taps, "--help"],
                "taps extract, 10 images (torch)": [*taps, "extract", *data],
                "taps extract, 10 images (--runtime auto)": [*taps, "extract", *data, "--runtime", "auto"],
                "taps info FILE": [*taps, "info", "{file}"]}
    out: dict[str, float] = {}
    file = ""
    for label, command in commands.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            done = subprocess.run([c.replace("{file}", file) for c in command], capture_output=True, text=True,
                                  check=True)
            times.append(time.perf_counter() - t0)
            file = done.stdout.strip().splitlines()[-1] if "extract" in label else file
        out[label] = round(float(np.median(times)), 2)
    return out


def end_to_end_seconds(work: Path, backbone: Backbone, images: FileImageSet, taps: list[str]) -> dict[str, float]:
    """Wall seconds of ``taps extract --runtime auto`` over the bench's images in a fresh interpreter,
    start-up included: ``first`` with an empty cache (it exports, times the runtimes, compiles and
    keeps the backbone's card: the one-time cost), ``repeated`` what each later run on a new image
    set waits for."""
    listing = work / "bench_images.csv"
    listing.write_text("image,label\n" + "".join(f"{p.resolve()},{images.classes[y]}\n"
                                                 for p, y in zip(images.paths, images.labels, strict=True)))
    command = [sys.executable, "-m", "pipeline", "extract", "--dataset", f"csv:{listing}", "--allow-outside-root",
               "--backbone", backbone.name, "--weights", backbone.spec_args()[1], "--taps", ",".join(taps),
               "--runtime", "auto", "--features-root", str(work / "end_to_end"), "--force", "--no-progress"]
    cache = work / "end_to_end_cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "TAPS_CACHE": str(cache)}
    seconds = {}
    for run in ("first", "repeated"):
        t0 = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True, env=env)
        seconds[run] = time.perf_counter() - t0
    return seconds


def stage_two_times(features_root: str, reference: bool, quick: bool = False) -> dict:
    """Grid-searched svm and logreg fits at Caltech-101 scale (real features when cached, else synthetic)."""
    from sklearn.datasets import make_classification
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    from features.store import FeatureFile

    from .classifiers import referenced_classifiers
    from .options import FitOptions
    from .protocols import make_split, parse_protocol
    from .selection import selector

    path = feature_path(features_root, "caltech101", Backbone("mobilenet_v2", weights="IMAGENET1K_V1"))
    if quick:
        X, y = make_classification(n_samples=600, n_features=256, n_informative=64, n_classes=10, random_state=0)
        X = X.astype(np.float32)
        train, test = np.arange(300), np.arange(300, 600)
        source = "synthetic 300 x 256, 10 classes (--quick)"
    elif path.is_file() and "pooled" in FeatureFile(path).taps:
        f = FeatureFile(path)
        X, y = f.read("pooled"), f.labels
        train, test = make_split(parse_protocol("per-class:30", 50), y, None, 0)
        source = "Caltech-101 MobileNetV2 pooled, 30/class (seed 0)"
    else:
        X, y = make_classification(n_samples=6000, n_features=1280, n_informative=200, n_classes=101,
                                   n_clusters_per_class=1, random_state=0)
        X = X.astype(np.float32)
        train, test = np.arange(3030), np.arange(3030, 6000)
        source = "synthetic 3,030 x 1,280, 101 classes"
    out = {"source": source, "train_shape": list(X[train].shape)}
    for record in referenced_classifiers():
        clf = record.name
        t0 = time.perf_counter()
        selected = selector(FitOptions(clf=clf)).fit(X[train], y[train])
        model, value = selected.model_, selected.chosen_
        seconds = time.perf_counter() - t0
        acc = balanced_accuracy_score(y[test], model.predict(X[test]))
        out[clf] = {"seconds": round(seconds, 2), "chosen_C": value, "mean_per_class_accuracy": round(acc, 4)}
        if reference:
            scaler = StandardScaler().fit(X[train])
            ref = record.build_reference(value)
            t0 = time.perf_counter()
            ref.fit(scaler.transform(X[train]), y[train])
            out[clf]["sklearn_one_fit_seconds"] = round(time.perf_counter() - t0, 2)
            out[clf]["sklearn_mean_per_class_accuracy"] = round(
                balanced_accuracy_score(y[test], ref.predict(scaler.transform(X[test]))), 4)
    return out


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    """What `taps bench` measures: the backbone and images, the batch size, and how many rounds."""

    backbone: str = "mobilenet_v2"
    images: int = 1000
    data_root: str | None = None       # Caltech-101 JPEGs from here, else synthetic ones
    batch_size: int = 32
    taps: list[str] | None = None      # the pipeline's 3 taps (default: a third, two thirds, standard)
    device: str = "auto"
    rss_sizes: tuple[int, int] = (1000, 8000)
    out: Path | str = "bench_out"
    features_root: str = FEATURES_ROOT
    reference: bool = False            # also time scikit-learn's reference fits
    rounds: int = 3
    compile: str = "on"
    precision: str = "auto"            # fp32 here shows what a CPU without bf16 kernels would pick
    runtimes: tuple[str, ...] | None = None  # exported runtimes to measure beside torch (None: every installed one)
    startup_repeats: int = 3           # start-up commands: each timed this many times (the median is kept)
    quick: bool = False                # every row at toy size, in about a minute: a check, not a measurement

    def __post_init__(self) -> None:
        for name in ("images", "batch_size", "rounds", "startup_repeats"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if min(self.rss_sizes) < 1:
            raise UsageError(f"--rss-sizes must be at least 1 image each, not {' '.join(map(str, self.rss_sizes))}")
        if self.data_root and not (Path(self.data_root) / CALTECH_FOLDER).is_dir():  # not synthetic ones instead
            raise UsageError(f"--data-root {self.data_root} has no {CALTECH_FOLDER}; pass the folder that holds "
                             f"caltech101/, or leave --data-root out to time synthetic JPEGs")


# --quick: every row measured once on a few images, torch only, one process; the figures are not
# comparable with a full run's, the point is that every measure runs.
QUICK = {"images": 16, "batch_size": 8, "rounds": 1, "compile": "off", "rss_sizes": (16, 32), "startup_repeats": 1,
         "reference": False}


@dataclass
class _Bench:
    """One bench run's resolved pieces, shared by its measures."""

    settings: BenchSettings
    backbone: Backbone
    resnet: Backbone
    taps: list[str]
    images: FileImageSet
    source: str
    cfg: RunConfig
    work: Path
    runtimes: dict[str, RunConfig] = field(default_factory=dict)  # each exported runtime's config
    compile_times: list[float] = field(default_factory=list)

    def pipeline(self, backbone: Backbone, taps: list[str], **changes) -> float:
        """Steady-state images/s of `taps extract`; the compile time (if any) is kept."""
        cfg, s = self.cfg, self.settings
        options = {"device": s.device, "batch_size": s.batch_size, "compile": s.compile, "loader": cfg.loader,
                   "precision": cfg.precision, **changes}
        report = extract(self.images, backbone, taps, path=self.work / "bench.h5", force=True, progress=False,
                         **options)
        if report.compile_seconds and backbone is self.backbone and not changes:
            self.compile_times.append(report.compile_seconds)
        return report.images_per_second

    def ceiling(self, backbone: Backbone, taps: list[str], **changes) -> float:
        return ceiling(backbone, self.images, taps, dataclasses.replace(self.cfg, **changes))


def _offline_or_random(name: str) -> Backbone:
    """The backbone with its default weights when they are at hand; speed does not depend on their values."""
    bb = Backbone(name)
    try:
        bb.check_weights()
    except Exception:
        bb = Backbone(name, weights="none")
    return bb


def _prepare(s: BenchSettings, work: Path) -> _Bench:
    bb = _offline_or_random(s.backbone)
    names = list(bb.taps)
    taps = s.taps or [names[len(names) // 3], names[2 * len(names) // 3], bb.default_tap]
    dev = resolve_device(s.device)
    images, source = bench_images(s.images, s.data_root, work)
    cfg = RunConfig(pooling=DEFAULT_POOLING, device=dev, precision=resolve_precision(s.precision, dev), workers=default_workers(),
                    channels_last=True, on_error="skip", draft=True, compile=s.compile, batch_size=s.batch_size,
                    loader=INLINE if s.quick else resolve_loader(AUTO, dev.type, max(s.images, REPLICAS_MIN_IMAGES)))
    # (the loader a large run gets here: the bench measures that one)
    return _Bench(s, bb, _offline_or_random("resnet18"), taps, images, source, cfg, work,
                  _exported_runtimes(s, bb, taps, cfg, images))


def _exported_runtimes(s: BenchSettings, bb: Backbone, taps: list[str], cfg: RunConfig,
                       images: FileImageSet) -> dict[str, RunConfig]:
    """The run config of each exported runtime whose export of the pipeline's extractor checks out (CPU
    only), at the bench's precision, and at int8 where the runtime quantises (calibrated on the bench's
    images, as an extraction of them would be)."""
    if cfg.device.type != "cpu":
        return {}
    out = {}
    for name in installed_runtimes() if s.runtimes is None else s.runtimes:
        path, why, _ = prepare_export(bb, bb.resolve_taps(taps), cfg.pooling, name)
        if path is None:
            warnings.warn(f"bench: no {name} rows: {why}", stacklevel=3)
            continue
        out[name] = dataclasses.replace(cfg, runtime=name, onnx_path=str(path), compile="off",
                                        precision=runtime_precision(name, cfg.precision))
        if INT8 in get_runtime(name).precisions:
            out[f"{name} {INT8}"] = with_int8(dataclasses.replace(out[name], precision=INT8),
                                              [t.name for t in bb.resolve_taps(taps)],
                                              lambda: dataset_calibration(images, bb, cfg, images.fingerprint()))
    return out


EAGER = "eager instead of torch.compile"


def _ablations(b: _Bench) -> list[tuple[str, dict, str]]:
    """(label, change, the measure it is compared with). Under torch.compile the input layout is
    Inductor's choice, so channels_last is measured where it acts: in the eager pass."""
    prec, loader = b.cfg.precision, b.cfg.loader
    loaders = ([(f"{INLINE} loader: one process, all cores", {"loader": INLINE}, "pipeline")]
               if loader == REPLICAS else [("one decode thread", {"workers": 0}, "pipeline")])
    ablations = [(f"{FP32} instead of {prec}", {"precision": FP32}, "pipeline"),
                 ("no JPEG draft decoding", {"draft": False}, "pipeline"),
                 *loaders,
                 ("DataLoader processes decoding alongside", {"loader": WORKERS}, "pipeline"),
                 ("PIL decode + box resize (not simplejpeg)", {"decode": PIL}, "pipeline"),
                 ("torchvision decode_jpeg + tensor resize", {"decode": TORCHVISION}, "pipeline"),
                 (EAGER, {"compile": "off"}, "pipeline"),
                 ("eager, NCHW instead of channels_last", {"compile": "off", "channels_last": False}, EAGER)]
    if b.settings.compile == "off":
        ablations = ablations[:-2] + [("NCHW instead of channels_last", {"channels_last": False}, "pipeline")]
    return [a for a in ablations if not (a[1].get("precision") == prec)]


def _measures(b: _Bench, ablations) -> dict:
    rn = b.resnet
    return {
        "ceiling": lambda: b.ceiling(b.backbone, b.taps),
        "pipeline": lambda: b.pipeline(b.backbone, b.taps),
        "decode": lambda: decode_rate(b.backbone, b.images, b.cfg),
        **{f"ceiling:{name}": (lambda c=c: ceiling(b.backbone, b.images, b.taps, c)) for name, c in b.runtimes.items()},
        **{f"pipeline:{name}": (lambda c=c: b.pipeline(b.backbone, b.taps, runtime=c.runtime, precision=c.precision))
           for name, c in b.runtimes.items()},
        **{label: (lambda c=c: b.pipeline(b.backbone, b.taps, **c)) for label, c, _ in ablations},
        **({"ceiling_eager": lambda: b.ceiling(b.backbone, b.taps, compile="off")}
           if b.settings.compile != "off" else {}),
        "forward_layer2": lambda: b.ceiling(rn, ["layer2"]),
        "forward_full": lambda: b.ceiling(rn, ["avgpool"]),
        "pipeline_layer2": lambda: b.pipeline(rn, ["layer2"]),
        "pipeline_full": lambda: b.pipeline(rn, ["avgpool"]),
    }


def _brackets(runtimes) -> dict[str, str]:
    """The headline ratios' measures run as one unit, the reference on both sides of the other
    (A B A) and taken as the mean of its two rates: a drift within the unit cancels."""
    return {"ceiling": "pipeline", **{f"ceiling:{r}": f"pipeline:{r}" for r in runtimes},
            "forward_full": "forward_layer2", "pipeline_full": "pipeline_layer2"}


def _interleave(measures: dict, rounds: int, log, brackets: dict[str, str]) -> tuple[dict, dict]:
    """Shared machines drift by tens of percent within minutes: rounds interleave the measures
    (in rotated order), so that each ratio can be taken inside a round. -> (rates per measure
    and round, the bracketing rates of the references)."""
    names = [name for name in measures if name not in brackets.values()]
    runs: dict[str, list[float]] = {}
    samples: dict[str, list[list[float]]] = {}

    def measure(name: str, round_: int) -> float:
        rate = measures[name]()
        log(f"  round {round_ + 1}: {name} {rate:.1f} img/s")
        return rate

    for round_ in range(rounds):
        # Each round starts at another measure: what ran just before (a big compile, the
        # ceiling's 150 MB of pixels) must not always precede the same measure.
        shift = round_ * len(names) // rounds
        for name in names[shift:] + names[:shift]:
            if name not in brackets:
                runs.setdefault(name, []).append(measure(name, round_))
                continue
            before, inner, after = measure(name, round_), measure(brackets[name], round_), measure(name, round_)
            samples.setdefault(name, []).append([before, after])
            runs.setdefault(name, []).append((before + after) / 2)
            runs.setdefault(brackets[name], []).append(inner)
    return runs, samples


def _summary(runs: dict, ablations, precisions: dict[str, str]) -> dict:
    """Median rates, and ratios as the median over rounds of a/b measured in the same round.
    The ceiling is the fastest runtime's forward; pipeline/ceiling is that runtime's pipeline
    against it, so it measures the data path against the real limit."""
    def ratio(a: str, b: str) -> float:
        return float(np.median([x / y for x, y in zip(runs[a], runs[b], strict=True)]))

    med = {name: float(np.median(v)) for name, v in runs.items()}
    keys = {name: ("ceiling", "pipeline") if name == TORCH else (f"ceiling:{name}", f"pipeline:{name}")
            for name in precisions}
    runtimes = {name: {"precision": precisions[name], "ceiling": med[c], "pipeline": med[p],
                       "pipeline/ceiling": ratio(p, c), "pipeline/torch pipeline": ratio(p, "pipeline")}
                for name, (c, p) in keys.items()}
    fastest = max(runtimes, key=lambda name: runtimes[name]["ceiling"])
    r = {"runtimes": runtimes, "fastest_runtime": fastest, "ceiling": runtimes[fastest]["ceiling"],
         "pipeline": med["pipeline"], "decode": med["decode"], "pipeline/ceiling": runtimes[fastest]["pipeline/ceiling"],
         "ablations": {label: {"rate": med[label], "versus": base, "ratio": ratio(base, label)}
                       for label, _, base in ablations},
         "early_tap": {**{k: med[k] for k in ("forward_layer2", "forward_full", "pipeline_layer2", "pipeline_full")},
                       "forward_time_ratio": ratio("forward_full", "forward_layer2"),
                       "pipeline_time_ratio": ratio("pipeline_full", "pipeline_layer2")}}
    if "ceiling_eager" in runs:  # the same data path behind the slower eager forward
        r["eager"] = {"ceiling": med["ceiling_eager"], "pipeline": med[EAGER],
                      "pipeline/ceiling": ratio(EAGER, "ceiling_eager")}
    return r


def run_bench(settings: BenchSettings | None = None, log=print, **fields) -> tuple[str, dict]:
    """Measure everything in one run; writes ``bench.txt`` and ``bench.json`` to ``settings.out``.
    ``fields`` are :class:`BenchSettings` fields, for calls from Python."""
    s = settings or BenchSettings(**fields)
    if s.quick:
        s = dataclasses.replace(s, **QUICK)
    out = Path(s.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    b = _prepare(s, work)
    bb, cfg = b.backbone, b.cfg
    r: dict = {"backbone": bb.name, "weights": bb.weights.spec, "images": b.source, "taps": b.taps,
               "batch_size": s.batch_size, "device": str(cfg.device), "precision": cfg.precision,
               "loader": cfg.loader, "workers": cfg.workers, "rounds": s.rounds, "compile": s.compile,
               "cpu": cpu_description(), "cores": os.cpu_count(), "torch": torch.__version__,
               "startup_repeats": s.startup_repeats}
    log(f"bench: {bb.name}, {b.source}, taps {', '.join(b.taps)}, {cfg.device}, {cfg.precision}, {s.rounds} rounds")
    ablations = _ablations(b)
    runs, samples = _interleave(_measures(b, ablations), s.rounds, log, _brackets(b.runtimes))
    r.update(_summary(runs, ablations, {TORCH: cfg.precision, **{k: c.precision for k, c in b.runtimes.items()}}))
    r["rates_per_round"], r["bracketing_rates"] = runs, samples
    r["compile_seconds"] = [round(c, 1) for c in b.compile_times]
    r["seed_style"] = seed_style(bb, b.images, b.taps, cfg.device, s.batch_size)  # slow: one round
    log(f"  seed-style {r['seed_style']:.1f} img/s")
    weights = bb.weights.spec.split(".")[-1] if bb.weights.pretrained else "none"
    r["rss_mb"] = {str(k): round(peak_rss_mb(k, work, bb.name, weights, s.compile, cfg.loader), 1)
                   for k in s.rss_sizes}
    log(f"  peak RSS: {r['rss_mb']}")
    r["page_faults"] = page_faults_per_batch()
    r["startup_seconds"] = startup_seconds(work, bb, s.startup_repeats)
    log(f"  start-up: {r['startup_seconds']}")
    r["end_to_end_seconds"] = end_to_end_seconds(work, bb, b.images, b.taps)
    log(f"  end to end: {r['end_to_end_seconds']}")
    r["stage_two"] = stage_two_times(s.features_root, s.reference, quick=s.quick)
    text = format_bench(r)
    (out / "bench.txt").write_text(text + "\n")
    (out / "bench.json").write_text(json.dumps(r, indent=2))
    return text, r


def _time_per_image(r: dict) -> list[str]:
    """The torch pipeline's time per image split into the forward alone, decoding alone and the rest
    (copies, pooling's output, the HDF5 write, waiting), each measured on its own in the same rounds."""
    if "decode" not in r:  # a bench.json from before the decode measure
        return []
    torch_ceiling = r["runtimes"][TORCH]["ceiling"]
    total, forward, decode = (1000 / r["pipeline"], 1000 / torch_ceiling, 1000 / r["decode"])
    return [f"{'decode + resize alone (the loader, no model)':<44}{r['decode']:>8.1f}",
            f"torch pipeline per image {total:.2f} ms = forward alone {forward:.2f} + decode alone {decode:.2f} "
            f"+ the rest {total - forward - decode:+.2f} (copies, write, waits; negative: overlap)"]


def _end_to_end(r: dict) -> list[str]:
    """`taps extract --runtime auto` end to end with its start-up (repeated, and the first run with an empty
    cache), against seed-style's steady rate."""
    seconds = r.get("end_to_end_seconds")
    if not isinstance(seconds, dict):  # a bench.json from before this row
        return []
    n = int(r["images"].split()[0])
    rate = n / seconds["repeated"]
    return [f"{'taps extract --runtime auto, end to end':<44}{rate:>8.1f}  end to end/seed-style = "
            f"{rate / r['seed_style']:.1f} ({n} images in {seconds['repeated']:.1f} s with start-up, a fresh "
            f"interpreter, the export and auto's choice cached; the first run, which exports, times the "
            f"runtimes and keeps them: {seconds['first']:.1f} s)"]


def _per_round(r: dict, a: str, b: str) -> str:
    """The ratio a/b in each round, for the headline ratios: how far the machine drifted."""
    rounds = r.get("rates_per_round", {})
    if a not in rounds or b not in rounds:
        return ""
    return " (rounds: " + ", ".join(f"{x / y:.2f}" for x, y in zip(rounds[a], rounds[b], strict=True)) + ")"


def _runtime_rows(r: dict) -> list[str]:
    """One row per runtime (ceiling: the forward alone on batches in memory; pipeline: `taps extract`
    end to end), then the headline: the fastest forward is the ceiling."""
    fastest = r["fastest_runtime"]
    lines = [f"{'runtime (precision)':<26}{'ceiling':>9}{'pipeline':>10}  pipeline/ceiling  pipeline/torch pipeline"]
    for name, x in r["runtimes"].items():
        lines.append(f"{name + ' (' + x['precision'] + ')':<26}{x['ceiling']:>9.1f}{x['pipeline']:>10.1f}  "
                     f"{x['pipeline/ceiling']:>16.2f}  {x['pipeline/torch pipeline']:>23.2f}")
    c, p = ("ceiling", "pipeline") if fastest == TORCH else (f"ceiling:{fastest}", f"pipeline:{fastest}")
    lines.append(f"ceiling = the fastest forward ({fastest}) {r['ceiling']:.1f} img/s; its pipeline: pipeline/ceiling = "
                 f"{r['pipeline/ceiling']:.2f}{_per_round(r, p, c)}, {r['runtimes'][fastest]['pipeline/torch pipeline']:.2f}"
                 f"x the torch pipeline{_per_round(r, p, 'pipeline')}")
    return lines


def format_bench(r: dict) -> str:
    et, rss, s2 = r["early_tap"], r["rss_mb"], r["stage_two"]
    small, large = sorted(rss, key=int)
    lines = [
        f"taps bench: {r['backbone']} ({r['weights']}), {r['images']}, batch {r['batch_size']}, {r['device']} "
        f"{r['precision']}, {r['workers']} {get_loader(r.get('loader', INLINE)).workers}, {r['cores']} cores, "
        f"torch {r['torch']}, "
        f"torch.compile {r['compile']}" + (f" ({max(r['compile_seconds']):.0f} s at most per run, not in the rates)"
                                           if r.get("compile_seconds") else ""),
        f"taps: {', '.join(r['taps'])}; rates: median of {r['rounds']} interleaved rounds (seed-style: one); "
        "ratios: median of the ratios within each round, where the ceiling and the full passes run "
        "before and after the measure they are compared with",
        f"cpu: {r.get('cpu', '?')}",
        "",
        *_runtime_rows(r),
        "",
        f"{'measure':<44}{'img/s':>8}  ratio",
        f"{'pipeline (torch, taps extract, 3 taps)':<44}{r['pipeline']:>8.1f}",
        f"{'seed-style (fp32 NCHW, one pass per tap)':<44}{r['seed_style']:>8.1f}  pipeline/seed-style = {r['pipeline'] / r['seed_style']:.1f}",
        *_end_to_end(r),
        *_time_per_image(r),
        "torch pipeline with one optimisation off:",
    ]
    for label, a in r["ablations"].items():
        versus = "pipeline" if a["versus"] == "pipeline" else "eager"
        lines.append(f"  {label:<42}{a['rate']:>8.1f}  {versus}/this = {a['ratio']:.2f}")
    if "eager" in r:
        e = r["eager"]
        lines.append(f"{'ceiling without torch.compile':<44}{e['ceiling']:>8.1f}  eager pipeline/eager ceiling = "
                     f"{e['pipeline/ceiling']:.2f}")
    lines += [
        f"resnet18 layer2 alone / full pass, time: forward {et['forward_time_ratio']:.2f}"
        + _per_round(r, "forward_full", "forward_layer2") + f", pipeline {et['pipeline_time_ratio']:.2f}"
        + _per_round(r, "pipeline_full", "pipeline_layer2"),
        f"peak RSS of the pipeline: {small} images {rss[small]:.0f} MB, {large} images {rss[large]:.0f} MB "
        f"(growth {100 * (rss[large] / rss[small] - 1):+.1f}%)",
        f"page faults per 64 MB batch (median of 16): {r['page_faults']['default']:.0f} with glibc's defaults, "
        f"{r['page_faults']['kept']:.0f} with the setting extraction runs under",
        f"start-up (wall seconds in a fresh interpreter, median of {r.get('startup_repeats', 3)}): "
        + ", ".join(f"{k} {v:.2f}" for k, v in r.get("startup_seconds", {}).items()),
        f"stage two on {s2['source']}:",
    ]
    for clf, s in ((k, v) for k, v in s2.items() if isinstance(v, dict)):  # one entry per classifier timed
        ref = (f"; sklearn one fit at that C {s['sklearn_one_fit_seconds']:.1f} s, "
               f"{100 * s['sklearn_mean_per_class_accuracy']:.1f}%") if "sklearn_one_fit_seconds" in s else ""
        lines.append(f"  {clf:<7} grid search + refit {s['seconds']:.1f} s, C={s['chosen_C']:g}, "
                     f"mean per-class accuracy {100 * s['mean_per_class_accuracy']:.1f}%{ref}")
    return "\n".join(lines)
