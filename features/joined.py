"""Several backbones' feature files of the same samples, read as one file.

Stage two fits, fuses and selects taps of one :class:`~features.store.FeatureFile`;
:class:`JoinedFeatures` gives it every tap of several files under ``BACKBONE/TAP`` keys
(``mobilenet_v2/block14``, ``timm:tf_efficientnet_lite0/block6``: neither timm names nor graph
nodes hold a slash), so a tap set may mix backbones and ``--tap auto`` chooses across all of
them. The files must describe the same samples: the same dataset fingerprint, ids, labels,
classes and split, else one line names the first difference. A sample counts as valid when
every file could read it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import TapsError, UsageError
from .files import digest
from .store import FeatureFile

BACKBONE_SEPARATOR = "/"


def owner(key: str) -> str:
    """The backbone a joined key names ("" for a key of one file)."""
    return key.rpartition(BACKBONE_SEPARATOR)[0]


def split_key(key: str) -> tuple[str, str]:
    """``BACKBONE/TAP`` -> (backbone, tap); refuses a key without its backbone."""
    backbone, sep, tap = key.rpartition(BACKBONE_SEPARATOR)
    if not sep or not backbone or not tap:
        raise UsageError(f"tap {key!r} does not name its backbone; with several backbones write BACKBONE/TAP, "
                         f"e.g. mobilenet_v2/block14")
    return backbone, tap


def _same_samples(first: FeatureFile, other: FeatureFile) -> None:
    """Refuse two files that do not describe the same samples, naming the first difference."""
    checks = [("dataset", first.attrs.get("dataset"), other.attrs.get("dataset")),
              ("dataset fingerprint", first.attrs.get("dataset_fingerprint"), other.attrs.get("dataset_fingerprint")),
              ("number of samples", len(first.ids), len(other.ids)),
              ("classes", first.classes, other.classes)]
    for what, a, b in checks:
        if a != b:
            shown = " vs ".join(str(v) if len(str(v)) <= 60 else str(v)[:57] + "..." for v in (a, b))
            raise TapsError(f"{first.path.name} and {other.path.name} do not describe the same samples: their {what} "
                            f"differ ({shown}); extract both backbones from the same dataset")
    for what, a, b in (("ids", first.ids, other.ids), ("labels", list(first.labels), list(other.labels)),
                       ("split", first.split, other.split)):
        if a != b:
            row = next((i for i, (x, y) in enumerate(zip(a or [], b or [], strict=False)) if x != y), 0)
            raise TapsError(f"{first.path.name} and {other.path.name} do not describe the same samples: their {what} "
                            f"differ from row {row} ({first.ids[row]}); extract both backbones from the same dataset")


class JoinedFeatures:
    """Several :class:`FeatureFile` s of one dataset, one per backbone, read as one (see the module)."""

    def __init__(self, files: list[FeatureFile]):
        if len(files) < 2:
            raise UsageError("joining feature files needs at least two, one per backbone")
        names = [str(f.attrs["backbone"]) for f in files]
        if len(set(names)) < len(names):
            raise UsageError(f"two feature files of the same backbone ({', '.join(names)}); pass one per backbone")
        for other in files[1:]:
            _same_samples(files[0], other)
        self.files = dict(zip(names, files, strict=True))
        first = files[0]
        self.path = first.path
        self.ids, self.labels, self.classes, self.split = first.ids, first.labels, first.classes, first.split
        self.valid = np.logical_and.reduce([f.valid for f in files])
        self.errors = {k: v for f in files for k, v in f.errors.items()}
        self.taps = {f"{name}{BACKBONE_SEPARATOR}{key}": record for name, f in self.files.items()
                     for key, record in f.taps.items()}
        self.attrs = {**first.attrs, "backbone": "+".join(names)}

    @property
    def paths(self) -> list[Path]:
        return [f.path for f in self.files.values()]

    def _file(self, key: str) -> tuple[FeatureFile, str]:
        backbone, tap = split_key(key)
        if backbone not in self.files:
            raise UsageError(f"tap {key!r} names backbone {backbone!r}, which is not one of "
                             f"{', '.join(self.files)}; pass it with --backbone")
        return self.files[backbone], tap

    def tap_key(self, tap: str, pooling: str) -> str:
        file, name = self._file(tap)
        return f"{file.attrs['backbone']}{BACKBONE_SEPARATOR}{file.tap_key(name, pooling)}"

    def read(self, tap: str, pooling: str) -> np.ndarray:
        return self.matrix(self.tap_key(tap, pooling))

    def matrix(self, key: str, *, finite: bool = False) -> np.ndarray:
        file, name = self._file(key)
        return file.matrix(name, finite=finite)

    def iter_rows(self, key: str, indices: np.ndarray, shuffle_seed: int | None = None):
        file, name = self._file(key)
        return file.iter_rows(name, indices, shuffle_seed)

    def verify(self, key: str) -> None:
        file, name = self._file(key)
        file.verify(name)

    def duplicate_groups(self) -> np.ndarray | None:
        return next(iter(self.files.values())).duplicate_groups()  # the same samples: the same bytes

    def fingerprint(self) -> str:
        return digest({name: f.fingerprint() for name, f in self.files.items()})

    def settings(self) -> dict:
        """Each backbone's settings joined by ``+`` in the order of the backbones."""
        each = [f.settings() for f in self.files.values()]
        joined = {k: "+".join(str(s[k]) for s in each) for k in ("backbone", "weights", "transform", "image_size")}
        return {**each[0], **joined, "weights_sha256": None}


Features = FeatureFile | JoinedFeatures  # what stage two reads its taps from
