"""What a stage-two command reads: a dataset and the feature file(s) extracted from it.

The library, not the CLI, finds the feature file a set of settings names and says why it is
stale; the settings are two records, :class:`DatasetRequest` (which images) and
:class:`FeatureRequest` (which backbones, weights and preprocessing, or which files), whose
defaults are the CLI's.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from features.datasets import DUPLICATES
from features.errors import TapsError, UsageError, choose
from features.options import FEATURES_ROOT

if TYPE_CHECKING:
    from features.backbones import Backbone
    from features.datasets import ImageSet
    from features.joined import Features


@dataclass(frozen=True, kw_only=True)
class DatasetRequest:
    """A dataset by name (``digits``, ``caltech101``, ``folder:PATH``, ``csv:PATH``) and how to read it."""

    name: str = "digits"
    data_root: str = "data"
    subset: str | None = None  # N samples, or per split as train:5000,test:2000
    image_column: str | None = None  # csv: default the first column
    label_column: str | None = None  # csv: default the second column
    allow_outside_root: bool = False  # csv, folder: paths (or links) leading outside the dataset's folder
    duplicates: str = DUPLICATES[0]  # csv, folder: one image file listed twice is refused, or kept once
    encoding: str = "utf-8-sig"  # csv: the file's text encoding
    verify_content: bool = False  # fingerprint by the images' bytes and name each changed image on a rerun

    def load(self) -> ImageSet:
        from features.datasets import load_dataset

        choose("--duplicates", self.duplicates, DUPLICATES)
        listed = self.name.startswith(("csv:", "folder:"))
        options = {"allow_outside": self.allow_outside_root, "duplicates": self.duplicates} if listed else {}
        if self.name.startswith("csv:"):
            options.update(image_column=self.image_column, label_column=self.label_column, encoding=self.encoding)
        return load_dataset(self.name, self.data_root, subset_spec=self.subset, **options)

    def flags(self) -> list[str]:
        """The `taps` flags that name this dataset (those that differ from the defaults)."""
        return ["--dataset", self.name, *_flags(self, {f.name: "--" + f.name.replace("_", "-") for f in fields(self)
                                                       if f.name != "name"})]


@dataclass(frozen=True, kw_only=True)
class FeatureRequest:
    """The feature files of ``dataset`` for each of ``backbones`` (with ``weights``: one for all, or one
    per backbone), or the files named in ``files`` taken as they are."""

    dataset: DatasetRequest = DatasetRequest()
    backbones: tuple[str, ...] = ("mobilenet_v2",)
    weights: tuple[str, ...] = ("auto",)
    image_size: int | None = None  # a square input size instead of the weights' preprocessing
    features_root: str = FEATURES_ROOT
    pooling: str | None = None  # for the extract command a stale file names (None: the default)
    files: tuple[str, ...] = ()

    def backbone(self, name: str | None = None) -> Backbone:
        """``name`` (default: the first backbone) with its weights."""
        from features.backbones import Backbone

        if len(self.weights) not in (1, len(self.backbones)):
            raise UsageError(f"--weights has {len(self.weights)} values for {len(self.backbones)} backbones; pass one "
                             f"for all, or one per backbone in the order of --backbone")
        name = name or self.backbones[0]
        one_each = len(self.weights) > 1 and name in self.backbones
        weights = self.weights[self.backbones.index(name)] if one_each else self.weights[0]
        return Backbone(name, weights=weights, image_size=self.image_size)

    def extract_command(self, taps: list[str] | None = None) -> str:
        """The `taps extract` command that writes these feature files (with ``taps``)."""
        parts = ["taps", "extract", *self.dataset.flags(), "--backbone", ",".join(self.backbones)]
        parts += _flags(self, {"weights": "--weights", "image_size": "--image-size",
                               "features_root": "--features-root"})
        if taps:
            parts += ["--taps", ",".join(taps)]
        if self.pooling is not None:
            from features.pooling import DEFAULT_POOLING

            parts += ["--pool", self.pooling] if self.pooling != DEFAULT_POOLING else []
        return shlex.join(parts)

    def open(self, taps: list[str] | None = None) -> Features:
        """The named files as they are (refused when --image-size says they were made otherwise), or
        the files `extract` writes for these settings, checked against the dataset as it is now;
        several are joined (:class:`features.joined.JoinedFeatures`). ``taps``: for the command a
        missing or stale file names."""
        from features.joined import JoinedFeatures
        from features.shards import whole_feature_file

        if self.files:
            files = [whole_feature_file(path) for path in self.files]
            for features in files if self.image_size else []:
                features.check_made_from({"transform": self.backbone(features.attrs["backbone"]).transform_spec()},
                                         "drop --image-size, or pass the file extracted with it")
        else:
            files = self._found(taps)
        return files[0] if len(files) == 1 else JoinedFeatures(files)

    def open_for_fit(self, tap: str | None) -> tuple[Features, str]:
        """The feature files a fit on ``tap`` reads, and the tap: as given (checked against the
        backbones where that needs no network, before the dataset is read), or each backbone's
        standard embedding (fused when there are several)."""
        from features.joined import BACKBONE_SEPARATOR, JoinedFeatures, split_key

        from .fusion import AUTO, tap_set

        if self.files and tap:  # the file names the taps it has when one is missing: no network to build
            return self.open(), tap
        members = tap_set(tap) if tap and tap != AUTO else []
        if members and not self.files and len(self.backbones) == 1:  # a tap it lacks: a usage error, found first
            self.backbone().resolve_taps(members)
        features = self.open(None if not tap else ["all"] if tap == AUTO else members)
        if not isinstance(features, JoinedFeatures):
            backbone = self.backbone(features.attrs["backbone"])
            if members:
                backbone.resolve_taps(members)
            return features, tap or backbone.default_tap
        backbones = {name: self.backbone(name) for name in features.files}
        for name, one in map(split_key, members):
            if name in backbones:
                backbones[name].resolve_taps([one])
        return features, tap or "+".join(f"{name}{BACKBONE_SEPARATOR}{bb.default_tap}" for name, bb in backbones.items())

    def _found(self, taps: list[str] | None) -> list:
        from features.catalog import find_feature_file

        backbones = [self.backbone(name) for name in self.backbones]
        try:
            images = self.dataset.load()
        except TapsError as exc:
            raise type(exc)(f"{exc} (fit reads the dataset to check that its feature file still matches it; pass "
                            f"--features FILE to fit on a file as it is)") from None
        command = self.extract_command(taps)
        return [find_feature_file(images, bb, self.features_root, command, verify_content=self.dataset.verify_content)
                for bb in backbones]


def _flags(record, names: dict[str, str]) -> list[str]:
    """``FLAG value`` for each field of ``record`` in ``names`` whose value is not its default (a bare
    flag for a boolean, commas between a tuple's values)."""
    parts = []
    for field in fields(record):
        flag, value = names.get(field.name), getattr(record, field.name)
        if flag is None or value is None or value is False or value == field.default:
            continue
        parts += [flag] if value is True else [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return parts
