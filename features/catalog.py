"""Where feature files live, and whether the one a command finds is still the one it asks for.

``extract`` writes one file per (dataset, backbone, weights, preprocessing) under a features
root; ``fit`` and ``predict``-side commands find it here, and :func:`find_feature_file` refuses a
file that no longer matches its dataset or settings, in one line that names what changed and the
command that rebuilds it. The CLI only says what that command is.
"""

from __future__ import annotations

import glob
import warnings
from pathlib import Path

from .backbones import Backbone
from .datasets import CONTENT_FINGERPRINT, ImageSet
from .errors import TapsError, UsageError
from .identity import feature_file_name
from .store import FeatureFile


def feature_path(out: Path | str, dataset_name: str, backbone: Backbone) -> Path:
    """One file per (dataset, backbone, weights, preprocessing); ``dataset_name`` as from ``dataset_slug``."""
    name = feature_file_name(backbone.name, backbone.weights.spec, backbone.input_size, backbone.transform_spec())
    return Path(out) / dataset_name / name


def check_dataset_matches(features: FeatureFile, images: ImageSet, fix: str, verify_content: bool = False,
                          digests: list[str] | None = None, fingerprint: str | None = None) -> None:
    """Refuse a feature file made from other contents of ``images`` than it has now, in one line that
    says what changed (images added, removed, relabelled, moved between splits or edited) and ``fix``.

    The fingerprint is computed the way the file's was (its recorded version), so files from before
    a fingerprint version keep working. When only the files' sizes or times can explain a changed
    fingerprint, each sample's bytes are compared with the digests the file recorded: a copy of the
    dataset that did not keep modification times is the same data, and is used with a warning.
    ``verify_content`` always compares the bytes; ``digests`` and ``fingerprint``: the dataset's content
    digests and its fingerprint (at the file's version) when the caller has computed them already
    (each sample's bytes and sizes are read once)."""
    if digests is None and (verify_content or features.fingerprint_version == CONTENT_FINGERPRINT):
        digests = images.content_digests()
    fingerprint = fingerprint or images.fingerprint(features.fingerprint_version, digests)
    stale = fingerprint != features.identity.dataset_fingerprint
    if stale:
        changes = sample_changes(features, images)
        if changes:
            count = len(features.ids) != len(images)
            raise TapsError(f"{features.path} was made from " + (f"{len(features.ids)} samples, the dataset now has "
                            f"{len(images)}" if count else "other contents of the dataset") + f": {'; '.join(changes)}; {fix}")
        digests = images.content_digests() if digests is None else digests
        if digests is None or features.content is None:
            raise TapsError(f"{features.path} was made from other contents of the dataset: the same images, labels "
                            f"and splits, but their content changed (fingerprint {features.identity.dataset_fingerprint}"
                            f", now {fingerprint}); {fix}")
    elif not verify_content:
        return
    if features.content is None:
        raise UsageError(f"--verify-content compares each image's bytes with the digests in {features.path}, but "
                         f"that file has none (made before they were recorded); rebuild it with --force")
    if digests is None:
        raise UsageError(f"--verify-content compares each image's bytes, but {images.name} cannot be read as bytes; "
                         f"drop --verify-content")
    changed = [i for i, (old, new) in enumerate(zip(features.content, digests, strict=True)) if old != new]
    if changed:
        raise TapsError(f"{features.path} was made from other contents of the dataset: {len(changed)} image(s) changed "
                        f"since (first: {images.ids[changed[0]]}); {fix}")
    if stale:
        warnings.warn(f"{features.path}: the dataset's files have other modification times than when it was "
                      f"extracted, but the same bytes (all {len(digests)} compared); using it, and comparing "
                      f"them again on each run until the file is rebuilt", stacklevel=2)


def sample_changes(features: FeatureFile, images: ImageSet) -> list[str]:
    """How the samples ``features`` was made from differ from ``images``: ids added or removed,
    labels or splits changed, the class list or the order changed; each a clause naming the first
    such image. Empty when only the images' content can differ."""
    old = {sample: i for i, sample in enumerate(features.ids)}
    new = {sample: j for j, sample in enumerate(images.ids)}
    added, removed = [s for s in images.ids if s not in old], [s for s in features.ids if s not in new]
    common = [s for s in images.ids if s in old]
    old_split = features.split or [None] * len(features.ids)
    new_split = images.splits or [None] * len(images.ids)
    relabelled = [(s, features.classes[features.labels[old[s]]], images.classes[images.labels[new[s]]])
                  for s in common if features.classes[features.labels[old[s]]] != images.classes[images.labels[new[s]]]]
    moved = [(s, old_split[old[s]], new_split[new[s]]) for s in common if old_split[old[s]] != new_split[new[s]]]
    changes = [f"another dataset ({features.identity.dataset}, now {images.name})"] \
        if features.identity.dataset != images.name else []
    changes += [f"{len(names)} image(s) {verb} (first: {names[0]})"
                for names, verb in ((added, "added"), (removed, "removed")) if names]
    changes += [f"{len(pairs)} image(s) {what} (first: {pairs[0][0]}, {pairs[0][1]} -> {pairs[0][2]})"
                for pairs, what in ((relabelled, "relabelled"), (moved, "in another split")) if pairs]
    if not changes and list(features.classes) != list(images.classes):
        changes.append(f"the class list changed ({len(features.classes)} classes: {', '.join(features.classes[:5])}"
                       f"{', ...' if len(features.classes) > 5 else ''}; now {len(images.classes)}: "
                       f"{', '.join(images.classes[:5])}{', ...' if len(images.classes) > 5 else ''})")
    if not changes and list(features.ids) != list(images.ids):
        changes.append("the same images in another order (rows reordered)")
    return changes


def find_feature_file(images: ImageSet, backbone: Backbone, root: Path | str, extract_command: str, *,
                      verify_content: bool = False) -> FeatureFile:
    """The feature file ``extract_command`` writes for ``images`` and ``backbone`` under ``root``, after
    checking that it was made with these weights and preprocessing from the dataset as it is now."""
    path = feature_path(root, images.name, backbone)
    if not path.is_file():
        raise TapsError(f"no feature file {path}; run `{extract_command}` first{_made_otherwise(root, images.name)}")
    features = FeatureFile(path)
    fix = f"rebuild it with `{extract_command} --force`"
    features.check_made_from({"weights": backbone.weights.spec, "transform": backbone.transform_spec()}, fix)
    check_dataset_matches(features, images, fix, verify_content=verify_content)
    unturned_taps(features, images, fix)
    return features


def unturned_taps(features: FeatureFile, images: ImageSet, fix: str) -> list[str]:
    """The file's taps decoded before taps turned images by their EXIF orientation (recorded otherwise than
    ``images`` are decoded now), when none of ``images`` carries one: they hold what turning gives (the
    extraction records it, so later runs skip this scan of the images' headers). Refused, naming ``fix``,
    when some do: those rows hold the photos sideways or mirrored, which no fit should report as if turned
    and no new row may join."""
    stored = sorted(key for key, tap in features.taps.items() if tap.orientation != images.orientation)
    if stored and (turned := images.turned()):
        raise TapsError(f"{features.path.name} was made before taps turned images by their EXIF orientation, and "
                        f"{len(turned)} of these images carry one (e.g. {images.ids[turned[0]]}): its taps "
                        f"{', '.join(stored)} hold them as stored; {fix}")
    return stored


def _made_otherwise(root: Path | str, dataset_name: str, shown: int = 3) -> str:
    """The feature files of this dataset (or a --subset of it) that other settings made under ``root``,
    as a clause for the "no feature file" message: a fit asked with other flags than the extraction's
    (another --image-size, --weights or --subset) finds them here."""
    root = Path(root)
    # a --subset's folder is the dataset's name with the subset appended; shards are not whole files
    found = sorted(str(p.relative_to(root)) for p in root.glob(f"{glob.escape(dataset_name)}*/*.h5")
                   if (p.parent.name == dataset_name or p.parent.name.startswith(f"{dataset_name}-"))
                   and ".shard" not in p.name)
    if not found:
        return ""
    listed = ", ".join(found[:shown]) + (f" and {len(found) - shown} more" if len(found) > shown else "")
    return (f" (under {root} other settings made {listed}: pass the flags they were made with, or "
            f"--features FILE)")
