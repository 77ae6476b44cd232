"""A feature file's identity: what it was made from, in one record.

:class:`FileIdentity` owns the header keys that say what a file is (backbone, weights,
preprocessing, dataset and its fingerprint, sample count), the file's name, the fingerprint
version its dataset was hashed with, and the comparison that decides whether a file is the one a
command asks for. The writer checks a file it resumes with it, ``fit`` checks a file it reads with
it, and ``merge`` checks shards with it: none of them keeps its own list of keys.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .datasets import FINGERPRINT_VERSION
from .errors import TapsError
from .files import path_safe, short_digest

# The fields that make two files different files; the others are recorded beside them.
COMPARED = ("backbone", "weights", "transform", "dataset", "dataset_fingerprint", "n_samples")
# Files from before the fingerprint version was recorded hashed file sizes only.
UNRECORDED_FINGERPRINT_VERSION = 1


@dataclass(frozen=True)
class FileIdentity:
    backbone: str
    weights: str                 # the weights spec: enum member, none, or file:<name>:<digest>
    transform: str               # the whole preprocessing (resize, crop, interpolation, mean, std)
    image_size: int
    dataset: str
    dataset_fingerprint: str
    n_samples: int
    fingerprint_version: int = FINGERPRINT_VERSION
    weights_sha256: str | None = None  # local weights files: their full digest

    @classmethod
    def of(cls, images: Any, backbone: Any, fingerprint_version: int = FINGERPRINT_VERSION,
           digests: list[str] | None = None) -> FileIdentity:
        """The identity of the file that ``backbone`` makes of ``images`` (an ImageSet; ``digests``: its
        content digests when already read)."""
        return cls(backbone=backbone.name, weights=backbone.weights.spec, transform=backbone.transform_spec(),
                   image_size=backbone.input_size, dataset=images.name,
                   dataset_fingerprint=images.fingerprint(fingerprint_version, digests), n_samples=len(images),
                   fingerprint_version=fingerprint_version, weights_sha256=backbone.weights.sha256)

    @classmethod
    def recorded(cls, attrs: dict) -> FileIdentity:
        """The identity a file's root attributes record (older files: fingerprint version 1)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in attrs.items() if k in known}
        values.setdefault("fingerprint_version", UNRECORDED_FINGERPRINT_VERSION)
        return cls(**{k: (int(v) if k in ("image_size", "n_samples", "fingerprint_version") else v)
                      for k, v in values.items()})

    def attrs(self) -> dict:
        """The root attributes to write (unset ones left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def file_name(self) -> str:
        """One file per (backbone, weights, preprocessing): every setting that changes the features.

        The weights part is the enum member (``IMAGENET1K_V1``), ``none``, or ``file-<stem>-<digest>``
        for a local file; the preprocessing part is the input size and a digest of the whole
        transform, so ``--image-size 224`` (resize 224) and the weights' preset (resize 256,
        crop 224) never share a file.
        """
        return feature_file_name(self.backbone, self.weights, self.image_size, self.transform)

    def differences(self, other: FileIdentity | dict, keys: tuple[str, ...] = COMPARED) -> list[str]:
        """Clauses saying how ``self`` (what a file records) differs from ``other`` (what is asked for);
        keys ``other`` leaves unset are not compared."""
        other = other if isinstance(other, dict) else asdict(other)
        changed = [k for k in keys if other.get(k) is not None and str(getattr(self, k)) != str(other[k])]
        if "dataset_fingerprint" in changed and "n_samples" in changed:
            changed.remove("dataset_fingerprint")  # the count says it more plainly
        return [describe_change(k, getattr(self, k), other[k]) for k in changed]

    def refuse_other(self, other: FileIdentity | dict, where: Path, fix: str,
                     keys: tuple[str, ...] = COMPARED) -> None:
        """Raise one line naming the first difference from ``other`` and ``fix``, if there is one."""
        changes = self.differences(other, keys)
        if changes:
            raise TapsError(f"{where} {changes[0]}; {fix}")


def feature_file_name(backbone: str, weights_spec: str, input_size: int, transform_spec: str) -> str:
    """See :attr:`FileIdentity.file_name`."""
    if weights_spec.startswith("file:"):
        _, name, digest = weights_spec.split(":", 2)
        weights = f"file-{Path(name).stem}-{digest[:8]}"
    else:
        weights = weights_spec.split(".")[-1]
    weights = re.sub(r"[^A-Za-z0-9_.-]", "_", weights)
    return f"{path_safe(backbone)}__{weights}__{input_size}px-{short_digest(transform_spec)}.h5"


def describe_change(key: str, old, new) -> str:
    """'was made from another dataset ...': one clause saying what changed, values never cut."""
    if key == "dataset_fingerprint":
        return f"was made from other contents of the dataset (fingerprint {old}, now {new}: images added, removed or changed)"
    if key == "n_samples":
        return f"was made from {old} samples, the dataset now has {new}"
    return f"was made with {key} {old}, not {new}"
