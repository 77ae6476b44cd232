"""Frozen ImageNet classifiers with friendly tap names, weights and preprocessing.

One uniform interface for every model of every source (timm-style): :class:`Backbone` puts a
model source (:mod:`features.models.source`: torchvision's registry, or ``timm:NAME``) and
its tap resolver (:mod:`features.models.taps`) behind one object that knows its taps (friendly
name -> graph node, ordered by depth), their output shapes, its weights and their
preprocessing. Families with well-known layer names (VGG, ResNet) get those names; every other
torchvision model gets ``block<i>`` for the children of its ``features`` stack, timm models
their ``feature_info`` stages, and all ``pooled`` (the input of the last Linear layer: the
standard pre-logits embedding) and ``logits``. Raw graph node names work too.
"""

from __future__ import annotations

from torch import nn
from torchvision.transforms._presets import ImageClassification

from .models.preprocess import UInt8Crop
from .models.schemes import TAP_SCHEMES, Tap, TapScheme, register_tap_scheme
from .models.source import SOURCE_MODULES, ModelSource, WeightsChoice, get_source, source_class
from .models.taps import TapResolver
from .models.torchvision_source import backbone_names
from .models.torchvision_source import checkpoint_path as _checkpoint_path
from .pooling import DEFAULT_POOLING

__all__ = ["TAP_SCHEMES", "Backbone", "Tap", "TapScheme", "UInt8Crop", "WeightsChoice", "_checkpoint_path",
           "backbone_names", "register_tap_scheme", "source_listings"]


def source_listings() -> list[str]:
    """One line per model source, for ``taps list backbones``."""
    return [source_class(prefix).listing() for prefix in SOURCE_MODULES]


class Backbone:
    """A model by name (``resnet18``, ``timm:resnet18``) with weights, preprocessing and friendly taps."""

    def __init__(self, name: str, weights: str | None = "auto", image_size: int | None = None):
        self.source: ModelSource = get_source(name, weights, image_size)
        self.resolver = TapResolver(self.source)

    def __repr__(self) -> str:
        return f"Backbone({self.name!r}, weights={self.weights.spec!r}, image_size={self.image_size})"

    # ------------------------------------------------------------ the model (its source)
    @property
    def name(self) -> str:
        return self.source.name

    @property
    def weights(self) -> WeightsChoice:
        return self.source.weights

    @property
    def image_size(self) -> int | None:
        return self.source.image_size

    @property
    def input_size(self) -> int:
        return self.source.input_size

    def build(self) -> nn.Module:
        """The frozen model in eval mode with its weights loaded (on CPU)."""
        return self.source.build()

    def check_weights(self) -> None:
        """Fail early (one line) when pretrained weights are neither cached nor downloadable."""
        self.source.check_weights()

    def spec_args(self) -> tuple[str, str, int | None]:
        """Constructor arguments that rebuild this backbone in another process."""
        return self.source.spec_args()

    def transform(self) -> ImageClassification:
        return self.source.transform()

    def pixel_transform(self) -> UInt8Crop:
        return self.source.pixel_transform()

    def transform_spec(self) -> str:
        return self.source.transform_spec()

    def feature_graph(self, model: nn.Module, nodes: dict[str, str]) -> nn.Module:
        return self.source.feature_graph(model, nodes)

    # ------------------------------------------------------------ its taps (the resolver)
    @property
    def taps(self) -> dict[str, Tap]:
        return self.resolver.taps

    @property
    def scheme(self) -> TapScheme:
        return self.resolver.scheme

    @property
    def default_tap(self) -> str:
        return self.resolver.default_tap

    def tap(self, name: str) -> Tap:
        return self.resolver.tap(name)

    def resolve_taps(self, names: list[str] | None) -> list[Tap]:
        return self.resolver.resolve_taps(names)

    def check_pooling(self, taps: list[Tap], pooling: str) -> None:
        self.resolver.check_pooling(taps, pooling)

    def node_names(self) -> list[str]:
        return self.resolver.node_names()

    def dim(self, tap: str, pooling: str = DEFAULT_POOLING) -> int:
        return self.resolver.dim(tap, pooling)
