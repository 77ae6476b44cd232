"""Frozen ImageNet classifiers with friendly tap names, weights and preprocessing.

One uniform interface for every model of every source (timm-style): :class:`Backbone` puts a
model source (:mod:`features.models.source`: torchvision's registry, or ``timm:NAME``), its
tap resolver (:mod:`features.models.taps`) and its card (:mod:`features.models.cards`: what a
first resolution found, kept so that later runs need neither) behind one object that knows its
taps (friendly name -> graph node, ordered by depth), their output shapes, its weights and
their preprocessing. Families with well-known layer names (VGG, ResNet) get those names; every other
torchvision model gets ``block<i>`` for the children of its ``features`` stack, timm models
their ``feature_info`` stages, and all ``pooled`` (the input of the last Linear layer: the
standard pre-logits embedding) and ``logits``. Raw graph node names work too.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING

from .errors import UsageError
from .models.cards import BackboneCard, load_card, save_card
from .models.names import check_known, check_weights_known, keep_weights, source_listings
from .models.preprocess import Preprocess, UInt8Crop
from .models.schemes import TAP_SCHEMES, Tap, TapScheme, node_depth, register_tap_scheme
from .models.source import ModelSource, UnknownWeights, WeightsChoice, get_source
from .pooling import DEFAULT_POOLING, get_pooling, poolable, pooled_dim

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn
    from torchvision.transforms._presets import ImageClassification

    from .models.taps import TapResolver

__all__ = ["TAP_SCHEMES", "Backbone", "Tap", "TapScheme", "UInt8Crop", "WeightsChoice", "_checkpoint_path",
           "register_tap_scheme", "source_listings"]


def _checkpoint_path(member) -> Path:
    """Where torchvision's weights API caches (and looks for) this enum member's file."""
    from .models.torchvision_source import checkpoint_path

    return checkpoint_path(member)


class Backbone:
    """A model by name (``resnet18``, ``timm:resnet18``) with weights, preprocessing and friendly taps.

    What the model declares (weights, preprocessing, taps) comes from its card when one is kept
    (:mod:`features.models.cards`); the model source (torchvision's registry, timm's, ...) and the
    tap resolver are made only for what needs the model itself: building it, tracing it, a raw
    graph node, or a first resolution (which writes the card)."""

    def __init__(self, name: str, weights: str | None = "auto", image_size: int | None = None):
        self._args = (name, "none" if weights is None else weights, image_size)
        self.card: BackboneCard | None = load_card(*self._args)
        self._card_tried = self.card is not None
        if self.card is None:
            self.source  # noqa: B018 -- resolve now: an unknown name, weights or size fails here

    def __repr__(self) -> str:
        return f"Backbone({self.name!r}, weights={self.weights.spec!r}, image_size={self.image_size})"

    @cached_property
    def source(self) -> ModelSource:
        name, weights, _ = self._args
        check_known(name)  # from the names kept per machine: a misspelt one imports no library
        check_weights_known(name, weights)  # the same for weights, where this model's are kept
        try:
            source = get_source(*self._args)
        except UnknownWeights as refused:
            listing = refused.listing
            keep_weights(name, lambda: listing)
            raise
        keep_weights(name, source.weights_listing)
        return source

    @cached_property
    def resolver(self) -> TapResolver:
        from .models.taps import TapResolver  # torch: the resolver traces the model

        return TapResolver(self.source)

    # ------------------------------------------------------------ what the model declares (its card)
    @property
    def name(self) -> str:
        return self.card.name if self.card else self.source.name

    @property
    def weights(self) -> WeightsChoice:
        return self.card.weights if self.card else self.source.weights

    @property
    def image_size(self) -> int | None:
        return self.card.image_size if self.card else self.source.image_size

    def preprocess(self) -> Preprocess:
        """The weights' preprocessing (or the same at a square ``image_size``) as numbers."""
        return self.card.preprocess if self.card else self.source.preprocess()

    @property
    def input_size(self) -> int:
        return self.preprocess().input_size

    def pixel_transform(self) -> UInt8Crop:
        """The geometric half of the preprocessing: image -> resized, cropped HWC uint8 array.

        Loaders move uint8 (a quarter of float32's bytes); :class:`features.forward.TapExtractor`
        (or the exported graph) does the arithmetic half on whole batches, with the same ops in the
        same order as torchvision's ``ImageClassification``."""
        return UInt8Crop(self.preprocess())

    def transform_spec(self) -> str:
        return self.preprocess().spec()

    def spec_args(self) -> tuple[str, str, int | None]:
        """Constructor arguments that rebuild this backbone in another process."""
        return (self.name, self.card.weights_arg, self.image_size) if self.card else self.source.spec_args()

    def check_weights(self) -> None:
        """Fail early (one line) when pretrained weights are neither cached nor downloadable."""
        if not (self.card and self.card.files.ready()):
            self.source.check_weights()

    @property
    def taps(self) -> dict[str, Tap]:
        """Friendly taps ordered from shallow to deep, with shapes at this input size."""
        card = self._declared()
        return card.taps if card else self.resolver.taps

    @property
    def default_tap(self) -> str:
        """The standard embedding its family declares (vgg fc7, resnet avgpool, others pooled)."""
        card = self._declared()
        return card.standard if card else self.resolver.default_tap

    def _declared(self) -> BackboneCard | None:
        """The card, written on the first resolution of the taps where the source allows one."""
        if not self._card_tried:
            self._card_tried = True
            files = self.source.card_files()
            if files is not None:
                s, r = self.source, self.resolver
                self.card = BackboneCard(s.name, s.weights, s.weights_arg(), s.image_size, s.preprocess(), r.taps,
                                         r.default_tap, files, tuple(r.node_names()))
                save_card(self.card, self._args[1])
        return self.card

    # ------------------------------------------------------------ the model itself (its source)
    def build(self) -> nn.Module:
        """The frozen model in eval mode with its weights loaded (on CPU)."""
        return self.source.build()

    def transform(self) -> ImageClassification:
        """The preprocessing as a torchvision preset (what :meth:`preprocess` holds as numbers)."""
        return self.source.transform()

    def feature_graph(self, model: nn.Module, nodes: dict[str, str]) -> nn.Module:
        return self.source.feature_graph(model, nodes)

    @property
    def scheme(self) -> TapScheme:
        return self.resolver.scheme

    def node_names(self) -> list[str]:
        card = self._declared()
        return list(card.nodes) if card else self.resolver.node_names()

    # ------------------------------------------------------------ requested taps
    def tap(self, name: str) -> Tap:
        """A friendly tap, or a raw graph node name resolved with its shape: a friendly tap's node (what runs
        record) from the taps already known, any other node traced (a name that is no node is refused
        from the card's node names where there is one)."""
        if name in self.taps:
            return self.taps[name]
        named = next((t for t in self.taps.values() if t.node == name), None)
        if named:
            return replace(named, name=name)
        if self.card:  # a misspelt name is refused from the card's node names, without tracing
            node_depth(name, self.card.nodes, self.name, list(self.taps))
        return self.resolver.tap(name)

    def resolve_taps(self, names: list[str] | None) -> list[Tap]:
        """Requested taps (``None``: the standard embedding; ``['all']``: every friendly tap that can be
        pooled), shallow first. A tap whose output is a token sequence (N, D) is refused: taps pools
        feature maps (C, H, W) and vectors (D,)."""
        if not names:
            names = [self.default_tap]
        elif names == ["all"]:
            names = [t.name for t in self.taps.values() if poolable(t.shape)]
        taps = {t.name: t for t in (self.tap(n) for n in names)}
        for t in taps.values():
            if not poolable(t.shape):
                usable = ", ".join(t.name for t in self.taps.values() if poolable(t.shape))
                raise UsageError(f"tap {t.name!r} of {self.name} outputs {'x'.join(map(str, t.shape))} tokens, "
                                 f"which taps does not pool; choose from: {usable}")
        return sorted(taps.values(), key=lambda t: t.depth)

    def check_pooling(self, taps: list[Tap], pooling: str) -> None:
        """``cls`` pooling needs a class token in every spatial tap."""
        if get_pooling(pooling).class_token:
            bad = [t.name for t in taps if len(t.shape) == 3 and not (t.layout == "tokens" and t.prefix > 0)]
            if bad:
                raise UsageError(f"--pool cls takes a transformer's class token, but {', '.join(bad)} of "
                                 f"{self.name} {'is a feature map' if len(bad) == 1 else 'are feature maps'}; "
                                 f"use --pool {DEFAULT_POOLING} (or another pooling)")

    def dim(self, tap: str, pooling: str = DEFAULT_POOLING) -> int:
        return pooled_dim(self.tap(tap).shape, pooling)
