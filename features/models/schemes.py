"""Friendly tap names per backbone family, declared once (as timm's ``FeatureInfo`` does)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Tap:
    name: str    # friendly name, or the raw node name when asked for one
    node: str    # graph node (or module) name for create_feature_extractor
    shape: tuple[int, ...]  # per-sample shape at the backbone's input size: (C, H, W) or (D,)
    depth: int   # position of the node in the graph, for sorting shallow -> deep
    layout: str = "map"  # how the node returns it: "map", "tokens" (prefix + H*W tokens of C), "nhwc"
    prefix: int = 0      # tokens: the class (and register) tokens before the patch tokens


@dataclass(frozen=True)
class TapScheme:
    """A backbone family's friendly taps, declared once (as timm's ``FeatureInfo`` declares a
    model's features): which models it covers, each friendly tap's graph node, and the
    standard embedding. ``pooled`` (the input of the last Linear layer) and ``logits`` (that
    layer) are added for every family that has a Linear head, unless the family names its own."""

    name: str
    covers: Callable[[str, nn.Module], bool]
    nodes: Callable[[nn.Module], dict[str, str]]   # friendly name -> node, any order
    standard: str                                  # the standard embedding
    adds_pooled: bool = True
    adds_logits: bool = True  # False where the last Linear is inside the network (an image tower's MLP)


TAP_SCHEMES: list[TapScheme] = []  # tried in order: the last registered first, the catch-all last


def register_tap_scheme(scheme: TapScheme) -> TapScheme:
    """Register a family's scheme (as torchvision's ``register_model``); it is tried before
    every scheme registered earlier, so the more specific a family, the later it registers."""
    TAP_SCHEMES.insert(0, scheme)
    return scheme


def tap_scheme(name: str, model: nn.Module) -> TapScheme:
    """The first registered scheme that covers this model."""
    return next(s for s in TAP_SCHEMES if s.covers(name, model))


def node_depth(name: str, nodes: Sequence[str], model: str, friendly: Sequence[str]) -> int:
    """:func:`last_node` of a raw node name ``name`` among ``model``'s graph ``nodes``, or one line naming
    the closest of its ``friendly`` taps."""
    try:
        return last_node(name, nodes)
    except KeyError:
        close = difflib.get_close_matches(name, list(friendly), n=3, cutoff=0.6)
        raise UsageError(f"unknown tap {name!r} for {model}; " + (f"did you mean {' or '.join(close)}? " if close else "")
                         + f"valid: {', '.join(friendly)} (or a node from `taps list nodes {model}`)") from None


def last_node(prefix: str, nodes: Sequence[str]) -> int:
    """Index of the node a module name stands for: itself, or the last node inside it."""
    if prefix in nodes:
        return nodes.index(prefix)
    inside = [i for i, n in enumerate(nodes) if n.startswith(prefix + ".")]
    if not inside:
        raise KeyError(prefix)
    return inside[-1]


# The schemes look at a built model, so torch is imported by then; importing it here would make every
# import of the schemes (a backbone answered from its card, a fit) pay for torch.


def _vgg_nodes(model: nn.Module) -> dict[str, str]:
    from torch import nn

    pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
    # fc6/fc7 are taken after their ReLU, as in DeCAF and the VGG paper.
    return {**{f"pool{k + 1}": f"features.{i}" for k, i in enumerate(pools)}, "fc6": "classifier.1", "fc7": "classifier.4"}


def _features_stack_nodes(model: nn.Module) -> dict[str, str]:
    return {f"block{c}" if c.isdigit() else c: f"features.{c}" for c, _ in model.features.named_children()}


def _has_features_stack(model: nn.Module) -> bool:
    from torch import nn

    return isinstance(getattr(model, "features", None), nn.Sequential)


def _children_nodes(model: nn.Module) -> dict[str, str]:
    from torch import nn

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = {linears[-1].split(".")[0]} if linears else set()
    return {c: c for c, m in model.named_children() if c not in head and any(True for _ in m.parameters())}


register_tap_scheme(TapScheme("generic", lambda name, model: True, _children_nodes, "pooled"))
register_tap_scheme(TapScheme(  # MobileNet, EfficientNet, ConvNeXt, DenseNet, ...
    "features-stack", lambda name, model: _has_features_stack(model),
    _features_stack_nodes, "pooled"))
register_tap_scheme(TapScheme("vgg", lambda name, model: name.startswith("vgg"), _vgg_nodes, "fc7",
                              adds_pooled=False))


def _is_torchvision_vit(name: str, model: nn.Module) -> bool:
    from torchvision.models import VisionTransformer  # a model exists: torchvision is imported already

    return isinstance(model, VisionTransformer)


register_tap_scheme(TapScheme(  # vit_b_16, ...: the encoder blocks, tokens pooled by pooling.pool_tap
    "vit", _is_torchvision_vit,
    lambda model: {f"block{i}": f"encoder.layers.encoder_layer_{i}" for i in range(len(model.encoder.layers))},
    "pooled"))
register_tap_scheme(TapScheme(  # resnet, resnext, wide_resnet
    "resnet", lambda name, model: hasattr(model, "layer4") and hasattr(model, "maxpool"),
    lambda model: {"stem": "maxpool", **{f"layer{i}": f"layer{i}" for i in range(1, 5)}, "avgpool": "flatten"},
    "avgpool", adds_pooled=False))


_BUILT_IN = tuple(TAP_SCHEMES)


def built_in_schemes_only() -> bool:
    """Whether the schemes are this package's own (none registered at run time), whose code
    :mod:`.cards` keys its cards by."""
    return tuple(TAP_SCHEMES) == _BUILT_IN
