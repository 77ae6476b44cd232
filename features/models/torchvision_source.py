"""torchvision's classifiers: every name of ``models.list_models``, with its weights enums."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchvision import models
from torchvision.transforms._presets import ImageClassification

from ..errors import TapsError, UsageError
from .schemes import Tap
from .source import (
    DEFAULT_IMAGE_SIZE,
    CardFiles,
    ModelSource,
    WeightsChoice,
    load_state_file,
    local_weights,
    register_source,
)

if TYPE_CHECKING:
    from .source import WeightsListing


def backbone_names() -> list[str]:
    """Every torchvision image classification model."""
    return sorted(models.list_models(module=models))


def checkpoint_path(member) -> Path:
    """Where torchvision's weights API caches (and looks for) this enum member's file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(member.url).name


@register_source("")
class TorchvisionSource(ModelSource):
    """A torchvision classifier by name; ``--weights`` names a member of its weights enum."""

    @classmethod
    def names(cls) -> list[str]:
        return backbone_names()

    @classmethod
    def listing(cls) -> str:
        return " ".join(backbone_names())

    def resolve_weights(self, spec: str) -> WeightsChoice:
        local = local_weights(spec, (".pth", ".pt"), ".pth")
        if local is not None:
            return local
        enum_cls = models.get_model_weights(self.name)
        if spec.lower() == "auto":
            # torchvision's DEFAULT, unless only another pretrained member is on disk (offline machines).
            cached = [m for m in enum_cls if checkpoint_path(m).is_file()]
            member = enum_cls.DEFAULT if not cached or enum_cls.DEFAULT in cached else cached[0]
            return WeightsChoice(member, None, str(member))
        try:
            member = enum_cls.DEFAULT if spec.upper() == "DEFAULT" else enum_cls[spec.split(".")[-1]]
        except KeyError:
            self.refuse_weights(spec)
        return WeightsChoice(member, None, str(member))

    def weights_listing(self) -> WeightsListing:
        return self.listed_weights([m.name for m in models.get_model_weights(self.name)],
                                   ["auto", "DEFAULT", "none", "FILE.pth"])

    def weights_arg(self) -> str:
        w = self.weights
        return str(w.path) if w.path else (w.enum.name if w.enum is not None else "none")

    def check_weights(self) -> None:
        if self.weights.enum is not None and not checkpoint_path(self.weights.enum).is_file():
            self.build()

    def card_files(self) -> CardFiles | None:
        if self.weights.path is not None:
            return None  # a local file: its digest is read on every run anyway
        if self.weights.enum is None:
            return CardFiles({})
        # auto takes whichever checkpoint is on disk: a member's file coming or going changes the answer
        return CardFiles({str(checkpoint_path(m)): checkpoint_path(m).is_file() for m in type(self.weights.enum)},
                         (str(checkpoint_path(self.weights.enum)),))

    def random_model(self) -> nn.Module:
        return models.get_model(self.name, weights=None)

    def load_file(self, model: nn.Module, path: Path) -> None:
        try:
            model.load_state_dict(load_state_file(path, ".pth"))
        except RuntimeError as exc:
            raise UsageError(f"weights file {path} does not fit {self.name} "
                             f"({str(exc).splitlines()[0]}); pass a {self.name} state dict") from None

    def download(self) -> nn.Module | None:
        w = self.weights
        if w.enum is None:
            return None
        cached = checkpoint_path(w.enum)
        try:
            if not cached.is_file():  # torch.hub prints "Downloading: ..." before it finds out it cannot
                urllib.request.urlopen(urllib.request.Request(w.enum.url, method="HEAD"), timeout=15).close()
            return models.get_model(self.name, weights=w.enum)
        except Exception as exc:  # network errors come in many types (URLError, OSError, HTTPError...)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            others = [m.name for m in type(w.enum) if m is not w.enum and checkpoint_path(m).is_file()]
            fix = (f"pass --weights {others[0]} (cached)" if others else
                   "pass --weights FILE.pth, copy the file there, or use an offline backbone "
                   "(mobilenet_v2, seeded by `make weights`)")
            raise TapsError(f"weights {w.spec} are not cached at {cached} and could not be downloaded "
                            f"({reason}); {fix}") from None

    def preset(self) -> ImageClassification:
        """The weights enum's own ``transforms()`` (the default member's for random or file weights)."""
        enum = self.weights.enum or self._default_enum()
        return enum.transforms() if enum is not None else ImageClassification(crop_size=DEFAULT_IMAGE_SIZE)

    def _default_enum(self):
        try:
            return models.get_model_weights(self.name).DEFAULT
        except (ValueError, AttributeError):
            return None

    def architecture(self) -> nn.Module:
        try:
            with torch.device("meta"):
                return models.get_model(self.name, weights=None).eval()
        except (NotImplementedError, RuntimeError):  # a few models need real init
            return models.get_model(self.name, weights=None).eval()

    def token_grid(self, model: nn.Module) -> tuple[int, int, int] | None:
        if isinstance(model, models.VisionTransformer):
            side = self.input_size // model.patch_size
            return 1, side, side
        return None

    def channels_last(self, model: nn.Module, tap: Tap) -> bool:
        # torchvision's Swin returns (H, W, C) from its stages and final norm, permuted only before the head.
        return isinstance(model, models.SwinTransformer) and (tap.node.startswith("features") or tap.node == "norm")
