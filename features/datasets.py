"""Dataset names and specs turned into image sets with stable ids, labels and splits.

Every dataset, whatever its origin, becomes an :class:`ImageSet`: N samples with
an integer label, a class-name list, a stable string id (a relative path or
``split/index``) and, when the dataset defines one, an official split name per
sample. Images are decoded lazily, one at a time, so memory stays flat.
"""

from __future__ import annotations

import csv
import functools
import gzip
import os
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from .decoders import AS_STORED, EXIF_TURNED
from .errors import TapsError, UsageError, choose
from .files import content_digest, digest, file_content_digest, short_digest

# torchvision ImageFolder's, and what else photos are saved as: JPEG's other names (Windows saves a
# browser's JPEG as .jfif), GIF, AVIF and phones' HEIC/HEIF (read through pillow-heif, the `heif` extra;
# without it they are skipped with that reason), so that no photo in a class folder is left out unsaid.
# Odd but decodable formats are converted, not skipped.
HEIF_EXTENSIONS = (".heic", ".heif")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif",
                    ".avif", *HEIF_EXTENSIONS)
NOT_DATA = ("thumbs.db", "desktop.ini")  # what file managers leave in folders
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's decompression-bomb bound (about 9,459 x 9,459)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# open_image bounds every image's pixel count itself, before decoding. PIL's warning for
# the same thing is silenced once here: catch_warnings() per image is not thread-safe,
# and images decode on several threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# What a dataset fingerprint hashes for the content of image files: 1 their sizes, 2 their sizes
# and modification times (ns), 3 their bytes (--verify-content). Arrays always hash their pixels.
FINGERPRINT_VERSIONS = (1, 2, 3)
FINGERPRINT_VERSION = 2
CONTENT_FINGERPRINT = 3
SPLIT_FOLDERS = ("train", "val", "test")  # a folder dataset's official split, in this order
CSV_DELIMITERS = (",", ";", "\t", "|")  # what a CSV's header may be split by (spreadsheets write all four)
DUPLICATES = ("error", "first")  # what a CSV or folder listing one image file twice gets


def _stat(path: Path):
    try:
        return path.stat()
    except OSError:
        return None


class BadImage(Exception):
    """An image that cannot be decoded; the message is the reason recorded in the file."""


EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how a viewer turns the stored pixels (1: as stored, 2-8)


def exif_orientation(source: Path | str | BinaryIO) -> int:
    """The EXIF orientation (1-8) of an image file (a path or its bytes as a file object): 1 when it has
    none, or an invalid one, or cannot be read."""
    try:
        with Image.open(source) as img:
            value = img.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return 1
    return value if value in range(1, 9) else 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (grey, palette, CMYK, alpha, 16-bit, float)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float images: stretch to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


@functools.cache
def _heif_readable() -> bool:
    """Whether PIL opens HEIC/HEIF files: pillow-heif registers its opener at the first one."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def open_image(path: Path | str, min_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               turn: bool = True) -> Image.Image:
    """Decode one image file to RGB, or raise :class:`BadImage` with the reason.

    ``min_side``: JPEGs are decoded at a reduced DCT scale (PIL's draft mode)
    whose shorter side still is at least this many pixels; the later resize
    then has less to do and the decode is several times cheaper. ``turn``: the image is turned as its
    EXIF orientation says (a phone's portrait photo is stored sideways), as viewers show it.
    """
    if Path(path).suffix.lower() in HEIF_EXTENSIONS and not _heif_readable():
        raise BadImage("a HEIC/HEIF image, which needs pillow-heif: pip install 'taps[heif]'")
    try:
        with Image.open(path) as img:
            w, h = img.size  # checked before decoding; PIL's own warning is silenced above
            if w * h > max_pixels:
                raise BadImage(f"too large: {w}x{h} pixels exceeds the bound of {max_pixels}")
            if min_side and img.format == "JPEG" and min(w, h) > 2 * min_side:
                img.draft("RGB", (min_side * w // min(w, h), min_side * h // min(w, h)))
            img.load()
            if turn:
                ImageOps.exif_transpose(img, in_place=True)
            return to_rgb(img)
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if Path(path).exists() and Path(path).stat().st_size == 0:
            reason = "empty file"
        raise BadImage(reason) from None


class ImageSet:
    """N labelled images with stable ids; subclasses say where pixels come from."""

    max_pixels: int | None = None  # the decode bound of file-backed sets
    orientation: str = EXIF_TURNED  # taps' decoders turn its images as their EXIF orientation says (or not:
    # AS_STORED, as torchvision's loaders, and predict for a run whose features were made so)

    def __init__(self, name: str, classes: Sequence[str], labels: Sequence[int], ids: Sequence[str],
                 splits: Sequence[str] | None = None):
        self.name = name
        self.classes = list(classes)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids = list(ids)
        self.splits = None if splits is None else list(splits)
        if not (len(self.labels) == len(self.ids) and (self.splits is None or len(self.splits) == len(self.ids))):
            raise ValueError("labels, ids and splits must have one entry per sample")
        if len(self.ids) == 0:
            raise UsageError(f"dataset {name!r} has no images; check the path or data root")

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, index: int, min_side: int | None = None) -> Image.Image:
        """The RGB image of sample ``index``; raises :class:`BadImage` if it cannot be decoded."""
        raise NotImplementedError

    def source_file(self, index: int) -> Path | None:
        """The file sample ``index`` decodes from, for decoders that read files themselves."""
        return None

    def turned(self) -> list[int]:
        """The samples whose file carries an EXIF orientation other than as stored (decoders turn them)."""
        return [i for i in range(len(self)) if (path := self.source_file(i)) is not None and exif_orientation(path) != 1]

    def _content_key(self, version: int = FINGERPRINT_VERSION) -> bytes:
        """Bytes that change when the pixels may have changed (file sizes and times, array hash)."""
        return b""

    def content_digests(self) -> list[str] | None:
        """One digest of each sample's bytes (equal bytes, equal digest), or None where the set
        cannot read its samples' bytes cheaply (a torchvision dataset without an array)."""
        return None

    def fingerprint(self, version: int = FINGERPRINT_VERSION, digests: list[str] | None = None) -> str:
        """Hash of names, labels, ids, splits and content key: equal sets give equal prints.

        ``version`` says what stands for the content of file-backed sets (see
        :data:`FINGERPRINT_VERSIONS`); a feature file records the version it was made with, and
        is checked with that version, so files from before a version keep working. ``digests``:
        :meth:`content_digests`, when the caller has read them already (version 3 reads every byte).
        """
        if version not in FINGERPRINT_VERSIONS:
            raise TapsError(f"fingerprint version {version} is newer than this taps knows; upgrade taps")
        texts = (self.name, "\x00".join(self.classes), "\x00".join(self.ids), "\x00".join(self.splits or []))
        if version == CONTENT_FINGERPRINT:
            digests = self.content_digests() if digests is None else digests
            content = "\x00".join(digests).encode() if digests is not None else self._content_key(1)
        else:
            content = self._content_key(version)
        return digest(*(p for text in texts for p in (text, b"\x01")), self.labels.tobytes(), content)

    def class_counts(self) -> str:
        """The classes read and their image counts, in one line (the extremes for many classes)."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        if len(self.classes) <= 12:
            listed = ", ".join(f"{c} {n}" for c, n in zip(self.classes, counts, strict=True))
            return f"{len(self)} images in {len(self.classes)} classes ({listed})"
        low, high = int(np.argmin(counts)), int(np.argmax(counts))
        return (f"{len(self)} images in {len(self.classes)} classes, {counts[low]} to {counts[high]} per class "
                f"(smallest {self.classes[low]}, largest {self.classes[high]})")


class FileImageSet(ImageSet):
    """Images stored as files below a root; ids are paths relative to that root."""

    def __init__(self, name: str, root: Path, paths: Sequence[Path], classes, labels, *, splits=None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root)
        self.paths = [Path(p) for p in paths]
        self.max_pixels = max_pixels
        ids = [p.relative_to(self.root).as_posix() if p.is_relative_to(self.root) else str(p) for p in self.paths]
        super().__init__(name, classes, labels, ids, splits)

    def image(self, index: int, min_side: int | None = None) -> Image.Image:
        return open_image(self.paths[index], min_side, self.max_pixels, self.orientation == EXIF_TURNED)

    def source_file(self, index: int) -> Path:
        return self.paths[index]

    def _content_key(self, version: int = FINGERPRINT_VERSION) -> bytes:
        # Version 1: sizes only, so an edit that kept the size went unnoticed; 2 adds the
        # modification time in nanoseconds (a copy without preserved times reads as changed).
        stats = [_stat(p) for p in self.paths]
        fields = [(st.st_size, st.st_mtime_ns) if st else (-1, -1) for st in stats]
        if version == 1:
            fields = [size for size, _ in fields]
        return np.asarray(fields, dtype=np.int64).tobytes()

    def content_digests(self) -> list[str] | None:
        return [file_content_digest(p) for p in self.paths]


class ArrayImageSet(ImageSet):
    """Images held in a uint8 array (N, H, W) or (N, H, W, 3): digits, Fashion-MNIST."""

    def __init__(self, name: str, pixels: np.ndarray, classes, labels, ids, splits=None):
        self.pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        super().__init__(name, classes, labels, ids, splits)

    def image(self, index: int, min_side: int | None = None) -> Image.Image:
        return to_rgb(Image.fromarray(self.pixels[index]))

    def _content_key(self, version: int = FINGERPRINT_VERSION) -> bytes:
        return bytes.fromhex(digest(self.pixels.tobytes(), length=64))

    def content_digests(self) -> list[str] | None:
        return [content_digest(row.tobytes()) for row in self.pixels]


class TorchvisionImageSet(ImageSet):
    """A torchvision dataset (one object per official split) read through its ``__getitem__``."""

    orientation = AS_STORED  # as torchvision's loaders decode them (they do not turn by EXIF)

    def __init__(self, name: str, parts: Sequence[tuple[str | None, object]], classes):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(ds) for _, ds in self.parts])
        labels, ids, splits = [], [], []
        for split, ds in self.parts:
            labels.extend(int(t) for t in _targets(ds))
            ids.extend(f"{split or 'all'}/{i:06d}" for i in range(len(ds)))
            splits.extend([split] * len(ds))
        has_split = any(s is not None for s, _ in self.parts)
        super().__init__(name, classes, labels, ids, splits if has_split else None)

    def content_digests(self) -> list[str] | None:
        """The rows of each part's pixel array, where the torchvision class keeps one (CIFAR)."""
        arrays = [getattr(ds, "data", None) for _, ds in self.parts]
        if not all(isinstance(a, np.ndarray) and len(a) == len(ds) for a, (_, ds) in zip(arrays, self.parts, strict=True)):
            return None
        return [content_digest(np.ascontiguousarray(row).tobytes()) for a in arrays for row in a]

    def _content_key(self, version: int = FINGERPRINT_VERSION) -> bytes:
        """The pixels of up to 64 evenly spaced samples: torchvision hides its files behind each
        class's own layout, and a re-downloaded or edited set changes its pixels."""
        parts = []
        for i in np.unique(np.linspace(0, len(self) - 1, min(64, len(self))).astype(int)):
            try:
                parts.append(np.asarray(self.image(int(i))).tobytes())
            except BadImage as exc:
                parts.append(str(exc))
        return bytes.fromhex(digest(*parts, length=64))

    def image(self, index: int, min_side: int | None = None) -> Image.Image:
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        try:
            img, _ = self.parts[part][1][index - self.offsets[part]]
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImage(str(exc).splitlines()[0] or type(exc).__name__) from None
        return to_rgb(img)


class SubsetImageSet(ImageSet):
    """A seeded random subset of another image set (per official split when it has one)."""

    def __init__(self, base: ImageSet, indices: np.ndarray, name: str):
        self.base, self.indices = base, np.asarray(indices)
        self.max_pixels, self.orientation = base.max_pixels, base.orientation
        super().__init__(name, base.classes, base.labels[self.indices], [base.ids[i] for i in self.indices],
                         None if base.splits is None else [base.splits[i] for i in self.indices])

    def image(self, index: int, min_side: int | None = None) -> Image.Image:
        return self.base.image(int(self.indices[index]), min_side)

    def source_file(self, index: int) -> Path | None:
        return self.base.source_file(int(self.indices[index]))

    def _content_key(self, version: int = FINGERPRINT_VERSION) -> bytes:
        return self.base._content_key(version)

    def content_digests(self) -> list[str] | None:
        if isinstance(self.base, FileImageSet):  # only the chosen files are read
            return [file_content_digest(self.base.paths[i]) for i in self.indices]
        digests = self.base.content_digests()
        return None if digests is None else [digests[i] for i in self.indices]


def parse_subset(spec: str) -> dict[str | None, int]:
    """``500`` (500 samples) or ``train:5000,test:2000`` (per split)."""
    try:
        if ":" not in spec:
            return {None: int(spec)}
        return {k: int(v) for k, v in (part.split(":") for part in spec.split(","))}
    except ValueError:
        raise UsageError(f"bad --subset {spec!r}; use N or SPLIT:N,SPLIT:N (e.g. train:5000,test:2000)") from None


def subset(images: ImageSet, spec: str, seed: int = 0) -> ImageSet:
    """A seeded random subset: N samples, or N per named split; order is kept."""
    sizes = parse_subset(spec)
    rng = np.random.default_rng(seed)
    chosen = []
    for split, n in sizes.items():
        if split is None:
            pool = np.arange(len(images))
        else:
            if images.splits is None or split not in images.splits:
                have = sorted(set(images.splits or [])) or ["none"]
                raise UsageError(f"--subset names split {split!r}, but {images.name} has splits: {', '.join(have)}")
            pool = np.flatnonzero(np.asarray(images.splits) == split)
        if n < 1:
            raise UsageError(f"--subset sizes must be at least 1, not {n}")
        if n > len(pool):
            where = f"split {split!r} of {images.name}" if split else images.name
            warnings.warn(f"--subset asks for {n} samples of {where}, which has {len(pool)}; using all {len(pool)}",
                          stacklevel=3)
        chosen.append(rng.choice(pool, size=min(n, len(pool)), replace=False))
    indices = np.sort(np.concatenate(chosen))
    if len(indices) == len(images):  # asked for at least everything: the dataset itself, its own file
        return images
    tag = "-".join(f"{k or 'n'}{len(c)}" for k, c in zip(sizes, chosen, strict=True))
    return SubsetImageSet(images, indices, f"{images.name}-{tag}")


def _targets(ds) -> Sequence[int]:
    """Labels of a torchvision dataset without decoding its images."""
    for attr in ("targets", "labels", "_labels", "y"):
        if hasattr(ds, attr):
            return list(getattr(ds, attr))
    return [ds[i][1] for i in range(len(ds))]


# ---------------------------------------------------------------- builders

def _digits(data_root: Path, download: bool) -> ImageSet:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.clip(bunch.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    ids = [f"digits/{i:04d}" for i in range(len(pixels))]
    return ArrayImageSet("digits", pixels, [str(c) for c in bunch.target_names], bunch.target, ids)


# torchvision's FashionMNIST.classes, in label order
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _fashion_mnist(data_root: Path, download: bool) -> ImageSet:
    """The idx files torchvision keeps under ``<data-root>/FashionMNIST/raw``, or Debian's gzipped ones,
    read without importing torchvision; otherwise torchvision downloads them."""
    raw = data_root / "FashionMNIST" / "raw"
    found = {split: [_idx_file(name, raw) for name in names] for split, names in IDX_FILES.items()}
    if any(path is None for paths in found.values() for path in paths):
        from torchvision.datasets import FashionMNIST

        for split in IDX_FILES:
            _torchvision_call(FashionMNIST, "fashion_mnist", data_root, download, train=split == "train")
        found = {split: [_idx_file(name, raw) for name in names] for split, names in IDX_FILES.items()}
    parts = [(split, read_idx(images), read_idx(labels)) for split, (images, labels) in found.items()]
    pixels = np.concatenate([p for _, p, _ in parts])
    labels = np.concatenate([y for _, _, y in parts]).astype(np.int64)
    splits = [s for s, p, _ in parts for _ in range(len(p))]
    ids = [f"{s}/{i:05d}" for s, p, _ in parts for i in range(len(p))]
    return ArrayImageSet("fashion_mnist", pixels, list(FASHION_MNIST_CLASSES), labels, ids, splits)


def _idx_file(name: str, raw: Path) -> Path | None:
    """An idx file as torchvision keeps it (unpacked), else Debian's gzipped copy."""
    for path in (raw / name, DEBIAN_FASHION_MNIST / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def read_idx(path: Path) -> np.ndarray:
    """The array of an idx file (MNIST's format: a magic number naming the type and rank, the
    dimensions, then the values big-endian), gzipped or not; uint8 only, as MNIST-like sets use."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[0] or data[1] or data[2] != 0x08:
        raise TapsError(f"{path} is not an idx file of bytes; delete it so that it is downloaded again")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(rank))
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank)
    if values.size != int(np.prod(shape)):
        raise TapsError(f"{path} holds {values.size} values, not the {int(np.prod(shape))} its header says; delete "
                        f"it so that it is downloaded again")
    return values.reshape(shape)


def _caltech101(data_root: Path, download: bool) -> ImageSet:
    folder = data_root / "caltech101" / "101_ObjectCategories"
    if folder.is_dir():  # listed as torchvision's Caltech101 lists it, without importing torchvision
        categories = sorted(c for c in os.listdir(folder) if c != "BACKGROUND_Google")  # not a real class
        counts = [len(os.listdir(folder / c)) for c in categories]  # every entry, as torchvision counts them
        index = [i for n in counts for i in range(1, n + 1)]
        labels = [y for y, n in enumerate(counts) for _ in range(n)]
    else:  # not there: torchvision downloads it
        from torchvision.datasets import Caltech101

        ds = _torchvision_call(Caltech101, "caltech101", data_root, download)
        categories, index, labels = ds.categories, ds.index, ds.y
    paths = [folder / categories[y] / f"image_{i:04d}.jpg" for i, y in zip(index, labels, strict=True)]
    return FileImageSet("caltech101", folder, paths, categories, labels)


def _torchvision_call(cls, name: str, data_root: Path, download: bool, **kwargs):
    try:
        return cls(root=str(data_root), download=download, **kwargs)
    except (RuntimeError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"dataset {name!r} is not under {data_root} and could not be downloaded ({first}); "
                         f"put it there or pass --data-root") from None


def _torchvision(cls_name: str, split_kwargs: dict[str | None, dict]) -> Callable[[Path, bool], ImageSet]:
    def build(data_root: Path, download: bool) -> ImageSet:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        name = cls_name.lower()
        parts = [(split, _torchvision_call(cls, name, data_root, download, **kw)) for split, kw in split_kwargs.items()]
        ds0 = parts[0][1]
        classes = getattr(ds0, "classes", None) or [str(i) for i in range(max(_targets(ds0)) + 1)]
        return TorchvisionImageSet(name, parts, classes)

    return build


BUILDERS: dict[str, Callable[[Path, bool], ImageSet]] = {
    "digits": _digits,
    "fashion_mnist": _fashion_mnist,
    "caltech101": _caltech101,
    "cifar10": _torchvision("CIFAR10", {"train": {"train": True}, "test": {"train": False}}),
    "cifar100": _torchvision("CIFAR100", {"train": {"train": True}, "test": {"train": False}}),
    "stl10": _torchvision("STL10", {"train": {"split": "train"}, "test": {"split": "test"}}),
    "dtd": _torchvision("DTD", {s: {"split": s} for s in ("train", "val", "test")}),
    "flowers102": _torchvision("Flowers102", {s: {"split": s} for s in ("train", "val", "test")}),
    "eurosat": _torchvision("EuroSAT", {None: {}}),
}
PREFIXES = ("folder:", "csv:")


def dataset_names() -> list[str]:
    return list(BUILDERS) + [p + "PATH" for p in PREFIXES]


def class_files(folder: Path) -> list[Path]:
    """The image files under one class folder, in torchvision ``ImageFolder``'s order (its ``make_dataset``:
    links followed, folders walked in sorted order, names sorted within each, extensions matched in any
    case), without importing torchvision."""
    return walk_class(folder)[0]


def _class_images(root: Path, parts: list[tuple[str | None, Path]], classes: list[str]) -> list[tuple]:
    """(split, class, path) of every image in the class folders, saying what else lies there or beside
    them (hidden files, ".x.jpg" and macOS "._x.jpg", are not images)."""
    found, others = [], []
    for split, d in parts:
        for c in classes:
            if (d / c).is_dir():
                images, not_images = walk_class(d / c)
                found += [(split, c, p) for p in images if not p.name.startswith(".")]
                others += not_images
    if others:
        warn_left_out(others, f"the class folders of {root}")
    loose = [p for folder in dict.fromkeys([root, *(d for _, d in parts)]) for p in
             split_images(folder, [f.name for f in folder.iterdir() if f.is_file()])[0] if not p.name.startswith(".")]
    if loose:  # an image beside the class folders has no class: it is not in the dataset
        warnings.warn(f"dataset folder {root}: {len(loose)} image(s) lie outside every class folder and are left out "
                      f"(e.g. {loose[0].relative_to(root)}); move each into its class's folder", stacklevel=4)
    return found


def walk_class(folder: Path) -> tuple[list[Path], list[Path]]:
    """(:func:`class_files`, the other files under the folder)."""
    images, others = [], []
    for top, _, names in sorted(os.walk(folder, followlinks=True)):
        found = split_images(Path(top), names)
        images += found[0]
        others += found[1]
    return images, others


def split_images(folder: Path, names: Iterable[str]) -> tuple[list[Path], list[Path]]:
    """The files ``names`` in ``folder``, sorted: (images by their extension, the other files, hidden
    files and file managers' own left out)."""
    images, others = [], []
    for name in sorted(names):
        if name.lower().endswith(IMAGE_EXTENSIONS):
            images.append(folder / name)
        elif not name.startswith(".") and name.lower() not in NOT_DATA:
            others.append(folder / name)
    return images, others


def _split_parts(root: Path) -> list[tuple[str | None, Path]]:
    """(split, folder) of each part of a folder dataset: ``train/`` with ``val/`` or ``test/`` are the
    official split; a split folder is never a class (``train/`` alone holds the classes, ``val/`` or
    ``test/`` without ``train/`` are refused)."""
    split_dirs = [d for d in SPLIT_FOLDERS if (root / d).is_dir()]
    top = {c.name for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")}
    if "train" in split_dirs and len(split_dirs) > 1:
        return [(s, root / s) for s in split_dirs]
    if top == {"train"}:
        warnings.warn(f"dataset folder {root} has only train/: its class folders are the classes, with no "
                      f"official split", stacklevel=4)
        return [(None, root / "train")]
    if top and top <= set(SPLIT_FOLDERS):
        raise UsageError(f"dataset folder {root} has {', '.join(f'{d}/' for d in split_dirs)} but no train/; add "
                         f"train/ beside them, or pass folder:{root / split_dirs[0]} to read one as the dataset")
    return [(None, root)]


def folder_dataset(root: Path, max_pixels: int = DEFAULT_MAX_PIXELS, allow_outside: bool = False,
                   duplicates: str = "error") -> FileImageSet:
    """An ImageFolder tree; ``train/`` with ``val/`` or ``test/`` below it become the official split."""
    root = Path(root).resolve()
    if root.is_file():
        kind = "a CSV file" if root.suffix.lower() in (".csv", ".tsv", ".txt") else "a file"
        raise UsageError(f"dataset folder {root} is {kind}, not a folder; pass folder:PATH to an ImageFolder tree"
                         + (f" or csv:{root}" if kind == "a CSV file" else ""))
    if not root.is_dir():
        raise UsageError(f"dataset folder {root} does not exist; pass folder:PATH to an ImageFolder tree")
    parts = _split_parts(root)
    classes = sorted({c.name for _, d in parts for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")})
    if not classes:
        raise UsageError(f"dataset folder {root} has no class subfolders; expected {root}/<class>/<image>")
    found = _class_images(root, parts, classes)
    if not found:
        raise UsageError(f"dataset folder {root} has no images in its class folders")
    resolved = [p.resolve() for _, _, p in found]
    for (_, _, path), target in zip(found, resolved, strict=True):
        if not allow_outside and not target.is_relative_to(root):
            raise UsageError(f"{path} links outside {root} (to {target}); pass --allow-outside-root to permit it")
    keep = _unique_files(resolved, [str(p.relative_to(root)) for _, _, p in found],
                         f"dataset folder {root}", "links", duplicates)
    found = [found[i] for i in keep]
    empty = [c for c in classes if c not in {c for _, c, _ in found}]
    if empty:  # a class folder without images is not a class: most often its images were not copied yet
        warnings.warn(f"dataset folder {root}: class folder(s) {', '.join(empty[:5])}"
                      f"{' and more' if len(empty) > 5 else ''} hold no images and are left out", stacklevel=3)
    merged = merge_unicode_forms({c for _, c, _ in found}, f"dataset folder {root}")
    found = [(split, merged[c], p) for split, c, p in found]
    classes = sorted({c for _, c, _ in found})
    warn_near_duplicate_classes(classes, f"folder {root}")
    index = {c: i for i, c in enumerate(classes)}
    paths = [p for _, _, p in found]
    labels = [index[c] for _, c, _ in found]
    splits = [s for s, _, _ in found]
    return FileImageSet(f"folder-{root.name}", root, paths, classes, labels, splits=splits if parts[0][0] else None,
                        max_pixels=max_pixels)


def warn_left_out(files: list[Path], where: str) -> None:
    """Say how many files in folders of images are not read as images, by extension (a format taps does
    not read, or notes beside the images), so that none is left out without a word."""
    by_suffix = Counter(p.suffix.lower() or "(no extension)" for p in files)
    listed = ", ".join(f"{suffix} {n}" for suffix, n in by_suffix.most_common(5))
    warnings.warn(f"{len(files)} file(s) in {where} are not images by their extension and are left out ({listed}"
                  f"{', …' if len(by_suffix) > 5 else ''}, e.g. {files[0].name}); images taps reads: "
                  f"{' '.join(IMAGE_EXTENSIONS)}", stacklevel=4)


def _unique_files(paths: list[Path], where: list[str], source: str, what: str, duplicates: str) -> list[int]:
    """Positions of the samples to keep: every one, unless a file is listed more than once (two
    rows, or links to one file), which is refused (``error``) or kept at its first place (``first``):
    a file on both sides of a split would test the classifier on an image it was trained on."""
    choose("--duplicates", duplicates, DUPLICATES)
    first: dict[Path, int] = {}
    repeats: dict[Path, list[int]] = {}
    for i, p in enumerate(paths):
        if p in first:
            repeats.setdefault(p, [first[p]]).append(i)
        else:
            first[p] = i
    if not repeats:
        return list(range(len(paths)))
    extra = sum(len(v) - 1 for v in repeats.values())
    if duplicates == "error":
        shown = "; ".join(f"{p.name} ({', '.join(where[i] for i in v)})" for p, v in list(repeats.items())[:3])
        raise UsageError(f"{source} {what} {len(repeats)} image file(s) more than once ({extra} repeats; e.g. "
                         f"{shown}); remove the repeats, or pass --duplicates first to keep each file's first "
                         f"occurrence")
    warnings.warn(f"{source}: kept the first of {extra + len(repeats)} occurrences of {len(repeats)} image "
                  f"file(s) listed more than once (--duplicates first)", stacklevel=3)
    return sorted(first.values())


def _read_csv(csv_path: Path, encoding: str) -> tuple[list[dict], list[str]]:
    """The rows and columns of a CSV file, or one line naming the encoding problem and where it is. The
    delimiter is the one the header uses most among ``,``, ``;`` (Excel's where the comma is the decimal
    mark), tab and ``|``; a comma where none is used."""
    try:
        with open(csv_path, newline="", encoding=encoding) as fh:
            header = fh.readline()
            delimiter = max(CSV_DELIMITERS, key=header.count)  # the first, a comma, on a tie
            fh.seek(0)
            reader = csv.DictReader(fh, delimiter=delimiter)
            return list(reader), list(reader.fieldnames or [])
    except LookupError:
        raise UsageError(f"unknown --encoding {encoding!r}; use a Python codec name such as utf-8, cp1252 or "
                         f"latin-1") from None
    except UnicodeDecodeError as exc:
        raw = csv_path.read_bytes()
        line = raw[:exc.start].count(b"\n") + 1
        raise UsageError(f"CSV file {csv_path} is not {encoding} (byte {raw[exc.start]:#04x} on line {line}); "
                         f"pass --encoding with the file's encoding (e.g. cp1252 or latin-1), or save it as "
                         f"UTF-8") from None


def _labels(rows: list[dict], column: str, csv_path: Path) -> list[str]:
    """The label of each row with surrounding whitespace stripped (one class per Unicode form); an empty
    label or one class written two ways as a number (``1`` and ``1.0``) is refused, naming the lines."""
    written = [r[column].strip() for r in rows]
    merged = merge_unicode_forms(written, f"CSV file {csv_path}")
    labels = [merged[label] for label in written]
    for number, label in enumerate(labels, start=2):
        if not label:
            raise UsageError(f"CSV file {csv_path} line {number} has an empty label in column {column!r}; "
                             f"label that row or remove it")
    spelled: dict[float, dict[str, int]] = {}
    for number, label in enumerate(labels, start=2):
        try:
            value = float(label)
        except ValueError:
            continue
        spelled.setdefault(value, {}).setdefault(label, number)
    for ways in spelled.values():
        if len(ways) > 1:
            shown = " and ".join(f"{w!r} (line {n})" for w, n in list(ways.items())[:3])
            raise UsageError(f"CSV file {csv_path} writes one number as {len(ways)} labels: {shown}; write each "
                             f"class one way, or they become separate classes")
    return labels


def merge_unicode_forms(written: Iterable[str], where: str) -> dict[str, str]:
    """Each class name as written -> its class. ``café`` typed on one system and ``cafe`` + combining
    accent written by another (macOS file names) are one text to Unicode: a name that arrives in both
    forms is one class, in the composed form (NFC), with a warning; a name written one way stays as
    written, so a dataset's names and its feature files do not change."""
    forms: dict[str, set[str]] = {}
    for name in written:
        forms.setdefault(unicodedata.normalize("NFC", name), set()).add(name)
    twice = [name for name, spellings in forms.items() if len(spellings) > 1]
    if twice:
        warnings.warn(f"{where}: class {', '.join(repr(n) for n in twice[:5])} is written in two Unicode forms "
                      f"(composed and decomposed accents, as macOS writes file names); read as one class",
                      stacklevel=3)
    return {name: composed if len(spellings) > 1 else name for composed, spellings in forms.items()
            for name in spellings}


def warn_near_duplicate_classes(classes: Sequence[str], where: str) -> None:
    """Warn about class names that differ only in case, spacing, ``_`` for a space or Unicode form
    (``Cat`` and ``cat``, ``golden_retriever`` and ``golden retriever``): they stay separate classes, as
    written (EMNIST's ``a`` and ``A`` are two), but more often they are one class spelt twice."""
    groups: dict[str, list[str]] = {}
    for name in classes:
        key = " ".join(unicodedata.normalize("NFKC", name).casefold().replace("_", " ").split())
        groups.setdefault(key, []).append(name)
    near = [names for names in groups.values() if len(names) > 1]
    if near:
        shown = "; ".join(" and ".join(repr(n) for n in names) for names in near[:3])
        warnings.warn(f"{where}: classes {shown} differ only in case or spacing ({len(near)} such group"
                      f"{'s' if len(near) > 1 else ''}); they are separate classes here: if they are one, write it "
                      f"one way", stacklevel=3)


def csv_dataset(csv_path: Path, *, image_column: str | None = None, label_column: str | None = None,
                allow_outside: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS, duplicates: str = "error",
                encoding: str = "utf-8-sig") -> FileImageSet:
    """A CSV of image path and label; paths are relative to the CSV's folder or an ``images/`` folder beside it.

    Labels are stripped of surrounding whitespace; ``encoding`` defaults to UTF-8 with or without
    Excel's byte-order mark."""
    csv_path = Path(csv_path).resolve()
    if not csv_path.is_file():
        raise UsageError(f"CSV file {csv_path} does not exist; pass csv:PATH to a CSV of image path and label")
    rows, columns = _read_csv(csv_path, encoding)
    if not rows:
        raise UsageError(f"CSV file {csv_path} has no rows")
    if len(columns) < 2 and not (image_column and label_column):
        raise UsageError(f"CSV file {csv_path} has one column ({', '.join(columns)}); it needs an image path and a "
                         f"label per row (set --image-column and --label-column)")
    image_column = image_column or columns[0]
    label_column = label_column or columns[1]
    for col in (image_column, label_column):
        if col not in columns:
            raise UsageError(f"CSV file {csv_path} has no column {col!r}; columns: {', '.join(columns)}; "
                             f"set --image-column/--label-column")
    for number, r in enumerate(rows, start=2):  # line numbers as an editor shows them, the header being 1
        if r[image_column] is None or r[label_column] is None:
            raise UsageError(f"CSV file {csv_path} line {number} has fewer cells than the header "
                             f"({len([v for v in r.values() if v is not None])} of {len(columns)}); fix that row")
    root = csv_path.parent
    values = [_as_found(r[image_column], root, root / "images") for r in rows]
    base = root / "images" if (root / "images").is_dir() and not (root / values[0]).exists() else root
    paths = []
    for r, value in zip(rows, values, strict=True):
        p = (base / value).resolve()
        if not allow_outside and not p.is_relative_to(root):
            raise UsageError(f"CSV row {r[image_column]!r} points outside {root}; pass --allow-outside-root to permit it")
        paths.append(p)
    if not any(p.is_file() for p in paths):
        first = rows[0][image_column]
        fix = ("write the paths relative to the CSV's folder: this is a Windows drive path"
               if re.match(r"[A-Za-z]:[\\/]", first) else "set --image-column to the column of image paths")
        raise UsageError(f"no value of column {image_column!r} in {csv_path} is an existing file (first: "
                         f"{first!r}); {fix}")
    labels = _labels(rows, label_column, csv_path)
    keep = _unique_files(paths, [f"line {n}" for n in range(2, len(rows) + 2)],
                         f"CSV file {csv_path}", "lists", duplicates)
    paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    classes = sorted(set(labels))
    warn_near_duplicate_classes(classes, f"CSV file {csv_path}")
    index = {c: i for i, c in enumerate(classes)}
    return FileImageSet(f"csv-{csv_path.stem}", root, paths, classes, [index[label] for label in labels],
                        max_pixels=max_pixels)


def _as_found(value: str, *folders: Path) -> str:
    """A CSV's image path as the file system spells it, where the file is found only that way: a Windows
    tool's ``images\\ants\\a1.jpg`` with this system's separator (a backslash is a legal character of a
    file name here), and an accented name in the other Unicode form (macOS writes file names decomposed,
    most other tools composed: one text, two byte strings)."""
    if "\\" not in value and value.isascii():
        return value
    posix = value.replace("\\", "/")
    spellings = dict.fromkeys((value, posix, *(unicodedata.normalize(form, posix) for form in ("NFC", "NFD"))))
    return next((v for v in spellings if any((folder / v).exists() for folder in folders)), posix)


def load_dataset(spec: str, data_root: Path | str = "data", download: bool = True, subset_spec: str | None = None,
                 **options) -> ImageSet:
    """Resolve a dataset name or ``folder:PATH`` / ``csv:PATH`` spec to an :class:`ImageSet`."""
    images = _load(spec, Path(data_root), download, **options)
    return subset(images, subset_spec) if subset_spec else images


def _load(spec: str, data_root: Path, download: bool, **options) -> ImageSet:
    if spec.startswith(PREFIXES):
        kind, path = spec.split(":", 1)
        if kind == "folder":
            images = folder_dataset(Path(path), **{k: v for k, v in options.items()
                                                   if k in ("max_pixels", "allow_outside", "duplicates")})
        else:
            images = csv_dataset(Path(path), **options)
        images.name = dataset_slug(spec)  # two folders with the same basename never share a feature file
        return images
    if spec not in BUILDERS:
        raise UsageError(f"unknown dataset {spec!r}; valid: {', '.join(dataset_names())}")
    return BUILDERS[spec](data_root, download)


def dataset_slug(spec: str, subset_spec: str | None = None) -> str:
    """A file-system-safe name for a dataset spec; paths get a short hash so two folders never collide."""
    name = spec
    if spec.startswith(PREFIXES):
        kind, path = spec.split(":", 1)
        resolved = str(Path(path).resolve())
        name = f"{kind}-{Path(resolved).stem}-{short_digest(resolved)}"
    if subset_spec:
        name += "-" + "-".join(f"{k or 'n'}{v}" for k, v in parse_subset(subset_spec).items())
    return name
