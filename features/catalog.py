"""Where feature files live, and whether the one a command finds is still the one it asks for.

``extract`` writes one file per (dataset, backbone, weights, preprocessing) under a features
root; ``fit`` and ``predict``-side commands find it here, and :func:`find_feature_file` refuses a
file that no longer matches its dataset or settings, in one line that names what changed and the
command that rebuilds it. The CLI only says what that command is.
"""

from __future__ import annotations

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
                          digests: list[str] | None = None) -> None:
    """Refuse a feature file made from other contents of ``images`` than it has now, in one line with
    ``fix``. The fingerprint is computed the way the file's was (its recorded version), so files
    from before a fingerprint version keep working; ``verify_content`` compares each sample's bytes
    with the digests the file recorded and names the first that changed. ``digests``: the dataset's
    content digests when the caller has read them already (each sample's bytes are read once)."""
    if digests is None and (verify_content or features.fingerprint_version == CONTENT_FINGERPRINT):
        digests = images.content_digests()
    expected = {"dataset_fingerprint": images.fingerprint(features.fingerprint_version, digests),
                "n_samples": len(images)}
    features.check_made_from(expected, fix)
    if not verify_content:
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


def find_feature_file(images: ImageSet, backbone: Backbone, root: Path | str, extract_command: str, *,
                      verify_content: bool = False) -> FeatureFile:
    """The feature file ``extract_command`` writes for ``images`` and ``backbone`` under ``root``, after
    checking that it was made with these weights and preprocessing from the dataset as it is now."""
    path = feature_path(root, images.name, backbone)
    if not path.is_file():
        raise TapsError(f"no feature file {path}; run `{extract_command}` first")
    features = FeatureFile(path)
    fix = f"rebuild it with `{extract_command} --force`"
    features.check_made_from({"weights": backbone.weights.spec, "transform": backbone.transform_spec()}, fix)
    check_dataset_matches(features, images, fix, verify_content=verify_content)
    return features
