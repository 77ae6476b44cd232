"""Frozen torchvision classifiers with friendly tap names, weights and preprocessing.

One uniform interface for every torchvision classification model (timm-style):
:func:`get_backbone` returns a :class:`Backbone` that knows its taps (friendly
name -> graph node, ordered by depth), their output shapes, its weights enum
and that enum's preprocessing. Families with well-known layer names (VGG,
ResNet) get those names; every other model gets ``block<i>`` for the children
of its ``features`` stack, ``pooled`` (the input of the last Linear layer: the
standard pre-logits embedding) and ``logits``. Raw graph node names from
:func:`torchvision.models.feature_extraction.get_graph_node_names` work too.
"""

from __future__ import annotations

import difflib
import importlib
import pickle
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import models
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from torchvision.transforms import functional as F
from torchvision.transforms._presets import ImageClassification
from torchvision.transforms.v2 import functional as F2

from .errors import TapsError, UsageError
from .files import file_sha256
from .pooling import DEFAULT_POOLING, get_pooling, poolable, pooled_dim

DEFAULT_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def backbone_names() -> list[str]:
    """Every torchvision image classification model."""
    return sorted(models.list_models(module=models))


@dataclass(frozen=True)
class Tap:
    name: str    # friendly name, or the raw node name when asked for one
    node: str    # graph node (or module) name for create_feature_extractor
    shape: tuple[int, ...]  # per-sample shape at the backbone's input size: (C, H, W) or (D,)
    depth: int   # position of the node in the graph, for sorting shallow -> deep
    layout: str = "map"  # how the node returns it: "map", "tokens" (prefix + H*W tokens of C), "nhwc"
    prefix: int = 0      # tokens: the class (and register) tokens before the patch tokens


def _meta_model(name: str) -> nn.Module:
    """The architecture without memory (meta tensors); a few models need real init."""
    try:
        with torch.device("meta"):
            return models.get_model(name, weights=None).eval()
    except (NotImplementedError, RuntimeError):
        return models.get_model(name, weights=None).eval()


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


TAP_SCHEMES: list[TapScheme] = []  # tried in order: the last registered first, the catch-all last


def register_tap_scheme(scheme: TapScheme) -> TapScheme:
    """Register a family's scheme (as torchvision's ``register_model``); it is tried before
    every scheme registered earlier, so the more specific a family, the later it registers."""
    TAP_SCHEMES.insert(0, scheme)
    return scheme


def tap_scheme(name: str, model: nn.Module) -> TapScheme:
    """The first registered scheme that covers this model."""
    return next(s for s in TAP_SCHEMES if s.covers(name, model))


def _vgg_nodes(model: nn.Module) -> dict[str, str]:
    pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
    # fc6/fc7 are taken after their ReLU, as in DeCAF and the VGG paper.
    return {**{f"pool{k + 1}": f"features.{i}" for k, i in enumerate(pools)}, "fc6": "classifier.1", "fc7": "classifier.4"}


def _features_stack_nodes(model: nn.Module) -> dict[str, str]:
    return {f"block{c}" if c.isdigit() else c: f"features.{c}" for c, _ in model.features.named_children()}


def _children_nodes(model: nn.Module) -> dict[str, str]:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = {linears[-1].split(".")[0]} if linears else set()
    return {c: c for c, m in model.named_children() if c not in head and any(True for _ in m.parameters())}


register_tap_scheme(TapScheme("generic", lambda name, model: True, _children_nodes, "pooled"))
register_tap_scheme(TapScheme(  # MobileNet, EfficientNet, ConvNeXt, DenseNet, ...
    "features-stack", lambda name, model: isinstance(getattr(model, "features", None), nn.Sequential),
    _features_stack_nodes, "pooled"))
register_tap_scheme(TapScheme("vgg", lambda name, model: name.startswith("vgg"), _vgg_nodes, "fc7",
                              adds_pooled=False))
register_tap_scheme(TapScheme(  # vit_b_16, ...: the encoder blocks, tokens pooled by pooling.pool_tap
    "vit", lambda name, model: isinstance(model, models.VisionTransformer),
    lambda model: {f"block{i}": f"encoder.layers.encoder_layer_{i}" for i in range(len(model.encoder.layers))},
    "pooled"))
register_tap_scheme(TapScheme(  # resnet, resnext, wide_resnet
    "resnet", lambda name, model: hasattr(model, "layer4") and hasattr(model, "maxpool"),
    lambda model: {"stem": "maxpool", **{f"layer{i}": f"layer{i}" for i in range(1, 5)}, "avgpool": "flatten"},
    "avgpool", adds_pooled=False))


def _last_node(prefix: str, nodes: list[str]) -> int:
    """Index of the node a module name stands for: itself, or the last node inside it."""
    if prefix in nodes:
        return nodes.index(prefix)
    inside = [i for i, n in enumerate(nodes) if n.startswith(prefix + ".")]
    if not inside:
        raise KeyError(prefix)
    return inside[-1]


class UInt8Crop:
    """Resize and centre-crop like ``ImageClassification``: PIL image -> HWC uint8 array.

    For PIL images the crop box is mapped back to the source and PIL resamples only
    that box (``Image.resize(box=...)``): the same filter and sample positions as
    resizing the whole image and cropping afterwards, at a fraction of the work
    (a 300x240 photo: 50k output pixels instead of 82k). Values may differ by a grey
    level or two: PIL rounds to 8 bits between its horizontal and vertical passes and
    may order the passes differently for the two output sizes. HWC is what the model
    wants in channels_last layout, so batches need no transposing copy.
    """

    def __init__(self, preset: ImageClassification):
        self.resize_size, self.crop_size = list(preset.resize_size), list(preset.crop_size)
        self.interpolation, self.antialias = preset.interpolation, preset.antialias
        self.crop_hw = self.crop_size if len(self.crop_size) == 2 else self.crop_size * 2

    def __call__(self, img) -> np.ndarray:
        """PIL image or CHW uint8 tensor -> HWC uint8 array."""
        if not isinstance(img, Image.Image):
            return self.tensor(img).cpu().numpy()
        box = self._box(img.size)
        if box is not None:
            ch, cw = self.crop_hw
            return np.asarray(img.resize((cw, ch), F.pil_modes_mapping[self.interpolation], box=box))
        img = F.center_crop(F.resize(img, self.resize_size, interpolation=self.interpolation,
                                     antialias=self.antialias), self.crop_size)
        return F.pil_to_tensor(img).permute(1, 2, 0).numpy()

    def tensor(self, img: torch.Tensor) -> torch.Tensor:
        """CHW uint8 tensor (any device) -> HWC uint8 tensor, with the preset's tensor ops.

        torchvision's v2 kernels resize uint8 natively on the CPU (vectorised, channels-last
        when the CHW tensor views HWC memory) where v1 converts to float and back.
        Antialiasing only widens the filter when shrinking: an enlarged image (most of
        Caltech-101) gets the same pixels without it, 1.5x faster.
        """
        h, w = img.shape[-2:]
        rs = self.resize_size
        shrinks = min(h, w) > rs[0] if len(rs) == 1 else (h > rs[0] or w > rs[1])
        img = F2.resize(img, rs, interpolation=self.interpolation, antialias=self.antialias and shrinks)
        return F2.center_crop(img, self.crop_size).permute(1, 2, 0)

    def _box(self, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
        """The source rectangle behind the centre crop, or None when the shortcut does not apply."""
        if len(self.resize_size) != 1:
            return None
        w, h = size
        short, long = min(w, h), max(w, h)
        new_short, new_long = self.resize_size[0], int(self.resize_size[0] * long / short)  # as F.resize
        rw, rh = (new_short, new_long) if w <= h else (new_long, new_short)
        ch, cw = self.crop_hw
        if cw > rw or ch > rh:  # F.center_crop would pad
            return None
        top, left = int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0))  # as F.center_crop
        sx, sy = w / rw, h / rh
        return left * sx, top * sy, (left + cw) * sx, (top + ch) * sy


def _checkpoint_path(member) -> Path:
    """Where torchvision's weights API caches (and looks for) this enum member's file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(member.url).name


@dataclass(frozen=True)
class WeightsChoice:
    """What ``--weights`` resolved to: an enum member, a local file, or random init."""

    enum: object | None      # a torchvision WeightsEnum member
    path: Path | None        # a local state-dict file
    spec: str                # the stable id recorded in feature files
    sha256: str | None = None  # the local file's full SHA-256, recorded beside the spec
    hub: str | None = None   # another source's pretrained name (timm: "resnet18.a1_in1k")

    @property
    def pretrained(self) -> bool:
        return self.enum is not None or self.path is not None or self.hub is not None


# Backbone sources beyond torchvision, by the prefix of their names ("timm:resnet18"): the module
# that registers the source's Backbone subclass, imported only when such a name is used.
SOURCE_MODULES = {"timm": "features.timm_backbones"}
SOURCES: dict[str, type] = {}


def register_source(prefix: str):
    """Class decorator: ``Backbone("PREFIX:name", ...)`` builds this subclass (as torchvision's
    ``register_model`` registers a builder)."""
    def register(cls):
        SOURCES[prefix] = cls
        return cls
    return register


class Backbone:
    """A torchvision classifier by name, with weights, preprocessing and friendly taps.

    A name with a source prefix (``timm:resnet18``) builds that source's subclass instead,
    which overrides the architecture, weights, preprocessing preset and graph tracing."""

    def __new__(cls, name: str, *args, **kwargs):
        if cls is Backbone and ":" in name:
            prefix = name.split(":", 1)[0]
            if prefix not in SOURCE_MODULES:
                raise UsageError(f"unknown backbone source {prefix!r} in {name!r}; valid: a torchvision name, or "
                                 f"{', '.join(p + ':NAME' for p in SOURCE_MODULES)}")
            importlib.import_module(SOURCE_MODULES[prefix])
            cls = SOURCES[prefix]
        return super().__new__(cls)

    def __init__(self, name: str, weights: str = "auto", image_size: int | None = None):
        self.check_name(name)
        if image_size is not None and image_size < 1:
            raise UsageError(f"--image-size must be a positive number of pixels, not {image_size}")
        self.name = name
        self.weights = self._resolve_weights(weights)
        self.image_size = image_size

    @staticmethod
    def check_name(name: str) -> None:
        if name not in backbone_names():
            raise UsageError(f"unknown backbone {name!r}; run `taps list backbones` for the {len(backbone_names())} valid names")

    # ------------------------------------------------------------ weights
    def _resolve_weights(self, spec: str) -> WeightsChoice:
        if spec is None or spec.lower() in ("none", "random"):
            return WeightsChoice(None, None, "none")
        if spec.endswith((".pth", ".pt")) or Path(spec).is_file():
            path = Path(spec)
            if not path.is_file():
                raise UsageError(f"weights file {path} does not exist; pass an existing .pth state dict")
            digest = file_sha256(path)
            return WeightsChoice(None, path.resolve(), f"file:{path.name}:{digest[:16]}", digest)
        enum_cls = models.get_model_weights(self.name)
        if spec.lower() == "auto":
            # torchvision's DEFAULT, unless only another pretrained member is on disk (offline machines).
            cached = [m for m in enum_cls if _checkpoint_path(m).is_file()]
            member = enum_cls.DEFAULT if not cached or enum_cls.DEFAULT in cached else cached[0]
            return WeightsChoice(member, None, str(member))
        try:
            member = enum_cls.DEFAULT if spec.upper() == "DEFAULT" else enum_cls[spec.split(".")[-1]]
        except KeyError:
            valid = ", ".join(["auto", "DEFAULT", "none", "FILE.pth"] + [m.name for m in enum_cls])
            raise UsageError(f"unknown weights {spec!r} for {self.name}; valid: {valid}") from None
        return WeightsChoice(member, None, str(member))

    def _default_enum(self):
        try:
            return models.get_model_weights(self.name).DEFAULT
        except (ValueError, AttributeError):
            return None

    def check_weights(self) -> None:
        """Fail early (one line) when pretrained weights are neither cached nor downloadable."""
        if self.weights.enum is not None and not _checkpoint_path(self.weights.enum).is_file():
            self.build()

    def build(self) -> nn.Module:
        """The frozen model in eval mode with its weights loaded (on CPU)."""
        w = self.weights
        if w.enum is not None:
            cached = _checkpoint_path(w.enum)
            try:
                if not cached.is_file():  # torch.hub prints "Downloading: ..." before it finds out it cannot
                    urllib.request.urlopen(urllib.request.Request(w.enum.url, method="HEAD"), timeout=15).close()
                model = models.get_model(self.name, weights=w.enum)
            except Exception as exc:  # network errors come in many types (URLError, OSError, HTTPError...)
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                others = [m.name for m in type(w.enum) if m is not w.enum and _checkpoint_path(m).is_file()]
                fix = (f"pass --weights {others[0]} (cached)" if others else
                       "pass --weights FILE.pth, copy the file there, or use an offline backbone "
                       "(mobilenet_v2, seeded by `make weights`)")
                raise TapsError(f"weights {w.spec} are not cached at {cached} and could not be downloaded "
                                f"({reason}); {fix}") from None
        else:
            # Random init is seeded, so weights=none files are reproducible (and resumable).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = models.get_model(self.name, weights=None)
            if w.path is not None:
                try:
                    state = torch.load(w.path, map_location="cpu", weights_only=True)
                except pickle.UnpicklingError as exc:
                    raise UsageError(f"weights file {w.path} holds more than tensors ({str(exc).splitlines()[0]}); "
                                     f"it is loaded with weights_only=True, which refuses code: pass a plain "
                                     f"state dict") from None
                state = state.get("state_dict", state) if isinstance(state, dict) else state
                try:
                    model.load_state_dict(state)
                except RuntimeError as exc:
                    raise UsageError(f"weights file {w.path} does not fit {self.name} "
                                     f"({str(exc).splitlines()[0]}); pass a {self.name} state dict") from None
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    def spec_args(self) -> tuple[str, str, int | None]:
        """Constructor arguments that rebuild this backbone in another process."""
        w = self.weights
        weights = str(w.path) if w.path else (w.enum.name if w.enum is not None else "none")
        return self.name, weights, self.image_size

    # ------------------------------------------------------------ preprocessing
    def preset(self) -> ImageClassification:
        """The weights' own preprocessing (torchvision: the enum's ``transforms()``)."""
        enum = self.weights.enum or self._default_enum()
        return enum.transforms() if enum is not None else ImageClassification(crop_size=DEFAULT_IMAGE_SIZE)

    def transform(self) -> ImageClassification:
        """The weights' preprocessing, or the same with a square ``image_size``."""
        preset = self.preset()
        if self.image_size is None:
            return preset
        # An explicit size: resize the shorter side to it and crop the square (no border lost on square inputs).
        return ImageClassification(crop_size=self.image_size, resize_size=self.image_size, mean=preset.mean,
                                   std=preset.std, interpolation=preset.interpolation)

    def pixel_transform(self) -> UInt8Crop:
        """The geometric half of :meth:`transform`: PIL image -> resized, cropped HWC uint8 array.

        Loaders move uint8 (a quarter of float32's bytes);
        :class:`features.forward.TapExtractor` does the arithmetic half on whole batches
        on the model's device, with the same ops in the same order as ``ImageClassification``.
        """
        return UInt8Crop(self.transform())

    @property
    def input_size(self) -> int:
        return int(self.transform().crop_size[0])

    def transform_spec(self) -> str:
        t = self.transform()
        return (f"resize={t.resize_size[0]} crop={t.crop_size[0]} interpolation={t.interpolation.value} "
                f"mean={list(t.mean)} std={list(t.std)}")

    # ------------------------------------------------------------ taps
    def architecture(self) -> nn.Module:
        """The model without weights, on meta tensors where possible (for names and shapes)."""
        return _meta_model(self.name)

    def feature_graph(self, model: nn.Module, nodes: dict[str, str]) -> nn.Module:
        """``model`` traced and pruned to return ``nodes`` (torchvision's ``create_feature_extractor``)."""
        return create_feature_extractor(model, nodes)

    def graph_nodes(self, model: nn.Module) -> list[str]:
        """The eval-mode graph's node names, in execution order."""
        return get_graph_node_names(model)[1]

    @cached_property
    def _graph(self) -> tuple[nn.Module, list[str]]:
        model = self.architecture()
        return model, self.graph_nodes(model)

    @cached_property
    def scheme(self) -> TapScheme:
        return tap_scheme(self.name, self._graph[0])

    @cached_property
    def taps(self) -> dict[str, Tap]:
        """Friendly taps ordered from shallow to deep, with shapes at this input size."""
        model, nodes = self._graph
        friendly = dict(self.scheme.nodes(model))
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            friendly["logits"] = linears[-1]
            if self.scheme.adds_pooled:  # the standard embedding feeds the classifier: the node before it
                friendly["pooled"] = nodes[_last_node(linears[-1], nodes) - 1]
        known = {t for t, node in friendly.items() if node in nodes or any(n.startswith(node + ".") for n in nodes)}
        order = sorted(known, key=lambda t: _last_node(friendly[t], nodes))
        shapes = self._shapes({friendly[t] for t in order})
        return {t: self.tap_layout(Tap(t, friendly[t], shapes[friendly[t]], _last_node(friendly[t], nodes)))
                for t in order}

    def token_grid(self) -> tuple[int, int, int] | None:
        """(prefix tokens, grid height, grid width) of a vision transformer's token sequences, else None."""
        model = self._graph[0]
        if isinstance(model, models.VisionTransformer):
            side = self.input_size // model.patch_size
            return 1, side, side
        return None

    def tap_layout(self, tap: Tap) -> Tap:
        """The tap with the layout its node returns: token sequences of a vision transformer (shape
        becomes the patch grid's (C, H, W)) and Swin's channels-last maps; others unchanged."""
        tokens = self.token_grid()
        if tokens and len(tap.shape) == 2 and tap.shape[0] == tokens[0] + tokens[1] * tokens[2]:
            return replace(tap, shape=(tap.shape[1], tokens[1], tokens[2]), layout="tokens", prefix=tokens[0])
        if (len(tap.shape) == 3 and isinstance(self._graph[0], models.SwinTransformer)
                and (tap.node.startswith("features") or tap.node == "norm")):  # (H, W, C) before the permute
            height, width, channels = tap.shape
            return replace(tap, shape=(channels, height, width), layout="nhwc")
        return tap

    def check_pooling(self, taps: list[Tap], pooling: str) -> None:
        """``cls`` pooling needs a class token in every spatial tap."""
        if get_pooling(pooling).class_token:
            bad = [t.name for t in taps if len(t.shape) == 3 and not (t.layout == "tokens" and t.prefix > 0)]
            if bad:
                raise UsageError(f"--pool cls takes a transformer's class token, but {', '.join(bad)} of {self.name} "
                                 f"{'is a feature map' if len(bad) == 1 else 'are feature maps'}; use --pool {DEFAULT_POOLING} "
                                 f"(or another pooling)")

    @property
    def default_tap(self) -> str:
        """The standard embedding its family declares (vgg fc7, resnet avgpool, others pooled)."""
        return self.scheme.standard if self.scheme.standard in self.taps else list(self.taps)[-1]

    def _shapes(self, nodes: set[str]) -> dict[str, tuple[int, ...]]:
        try:
            return self._trace(nodes, self.input_size)
        except (RuntimeError, AssertionError, ValueError) as exc:  # too small, or a fixed-size model
            raise UsageError(f"{self.name} cannot take {self.input_size}px images "
                             f"({str(exc).strip().splitlines()[0]}); {self._sizes_hint()}") from None

    def _trace(self, nodes: set[str], size: int) -> dict[str, tuple[int, ...]]:
        model, _ = self._graph
        extractor = self.feature_graph(model, {n: n for n in nodes})
        device = next(model.parameters()).device
        with torch.inference_mode():
            out = extractor(torch.zeros(1, 3, size, size, device=device))
        return {n: tuple(v.shape[1:]) for n, v in out.items()}

    def _sizes_hint(self) -> str:
        """Which --image-size values work: the smallest (bisected on meta tensors), or the only one."""
        nodes = {self._graph[1][-1]}

        def works(size: int) -> bool:
            try:
                self._trace(nodes, size)
                return True
            except (RuntimeError, AssertionError, ValueError):
                return False

        default = int(self.transform().crop_size[0]) if self.image_size is None else DEFAULT_IMAGE_SIZE
        if not works(default):
            return "use its default size (no --image-size)"
        if not works(default - 1) and not works(default + 1):
            return f"it takes --image-size {default} only"
        lo, hi = 1, default  # works(hi); find the smallest size that works
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if works(mid) else (mid + 1, hi)
        return f"use --image-size {lo} or more"

    def tap(self, name: str) -> Tap:
        """A friendly tap, or a raw graph node name, resolved with its shape."""
        if name in self.taps:
            return self.taps[name]
        _, nodes = self._graph
        try:
            depth = _last_node(name, nodes)
        except KeyError:
            close = difflib.get_close_matches(name, list(self.taps), n=3, cutoff=0.6)
            raise UsageError(f"unknown tap {name!r} for {self.name}; "
                             + (f"did you mean {' or '.join(close)}? " if close else "")
                             + f"valid: {', '.join(self.taps)} (or a node from `taps list nodes {self.name}`)") from None
        return self.tap_layout(Tap(name, name, self._shapes({name})[name], depth))

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
                raise UsageError(f"tap {t.name!r} of {self.name} outputs {'x'.join(map(str, t.shape))} tokens, which "
                                 f"taps does not pool; choose from: {usable}")
        return sorted(taps.values(), key=lambda t: t.depth)

    def node_names(self) -> list[str]:
        return list(self._graph[1])

    def dim(self, tap: str, pooling: str = DEFAULT_POOLING) -> int:
        return pooled_dim(self.tap(tap).shape, pooling)
