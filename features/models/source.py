"""The interface a model source implements, and the registry of sources by name prefix.

A source (torchvision's registry, timm's, later other hubs) answers what a model *is*: whether
a name exists, what ``--weights`` means for it, how to build it with those weights, its
preprocessing preset and how to trace its graph. Which of its nodes are taps is the
resolver's job (:mod:`.taps`), the same for every source.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, NoReturn

from ..errors import UsageError
from ..files import file_sha256
from .preprocess import Preprocess
from .schemes import Tap, TapScheme, tap_scheme

if TYPE_CHECKING:
    from torch import nn
    from torchvision.transforms._presets import ImageClassification

DEFAULT_IMAGE_SIZE = 224


@dataclass(frozen=True)
class WeightsChoice:
    """What ``--weights`` resolved to: an enum member, a local file, a hub name, or random init."""

    enum: object | None      # a torchvision WeightsEnum member (a card keeps spec and hub only)
    path: Path | None        # a local state-dict file
    spec: str                # the stable id recorded in feature files
    sha256: str | None = None  # the local file's full SHA-256, recorded beside the spec
    hub: str | None = None   # another source's pretrained name (timm: "resnet18.a1_in1k")

    @property
    def pretrained(self) -> bool:
        return self.spec != "none"


RANDOM = WeightsChoice(None, None, "none")


@dataclass(frozen=True)
class WeightsListing:
    """A model's pretrained weights as ``--weights`` names them (what follows the last ``.``), and the
    ``valid: ...`` text of its refusal: kept per machine, so a misspelt ``--weights`` answers without
    importing the source's library (:mod:`.names`)."""

    names: tuple[str, ...]
    valid: str

    def refusal(self, spec: str, name: str) -> str:
        return f"unknown weights {spec!r} for {name}; valid: {self.valid}"


class UnknownWeights(UsageError):
    """``--weights`` names none of the model's weights; carries the listing, which the caller keeps."""

    def __init__(self, spec: str, name: str, listing: WeightsListing):
        super().__init__(listing.refusal(spec, name))
        self.listing = listing


@dataclass(frozen=True)
class CardFiles:
    """The files a source's resolution of its weights read: whether each was there, and which ones
    the model needs on disk to be built offline."""

    seen: dict[str, bool]
    needed: tuple[str, ...] = ()
    stamps: dict[str, list[int]] = field(default_factory=dict)  # files that may change in place: size, mtime

    def unchanged(self) -> bool:
        return all(Path(p).is_file() == there for p, there in self.seen.items()) and \
            all(file_stamp(Path(p)) == stamp for p, stamp in self.stamps.items())

    def ready(self) -> bool:
        return all(Path(p).is_file() for p in self.needed)


def file_stamp(path: Path) -> list[int] | None:
    """A file's size and modification time (ns): what changes when it is written again."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


# Sources by the prefix of their names ("timm:resnet18"; torchvision's names have none): the module
# that registers each source, imported only when such a name is used.
SOURCE_MODULES = {"": "features.models.torchvision_source", "timm": "features.models.timm_source",
                  "openclip": "features.models.openclip_source", "hf": "features.models.hf_source"}
SOURCES: dict[str, type[ModelSource]] = {}
# The package each source's answers depend on, beside torch and torchvision (keys of backbone cards).
SOURCE_PACKAGES = {"": "torchvision", "timm": "timm", "openclip": "open_clip_torch", "hf": "transformers"}


def register_source(prefix: str):
    """Class decorator: names with this prefix (``PREFIX:name``) are built by this source (as
    torchvision's ``register_model`` registers a builder)."""
    def register(cls):
        cls.prefix = prefix
        SOURCES[prefix] = cls
        return cls
    return register


def split_name(name: str) -> tuple[str, str]:
    """``timm:resnet18`` -> ("timm", "resnet18"); a torchvision name has no prefix."""
    prefix, colon, model = name.partition(":")
    return (prefix, model) if colon else ("", name)


def check_prefix(name: str) -> str:
    """The source prefix of ``name``, refused in one line when no source has it."""
    prefix = split_name(name)[0]
    if prefix not in SOURCE_MODULES:
        raise UsageError(f"unknown backbone source {prefix!r} in {name!r}; valid: a torchvision name, or "
                         f"{', '.join(p + ':NAME' for p in SOURCE_MODULES if p)}")
    return prefix


def source_class(prefix: str) -> type[ModelSource]:
    """The source registered for a known ``prefix`` (:func:`check_prefix`), its module imported now."""
    importlib.import_module(SOURCE_MODULES[prefix])
    return SOURCES[prefix]


def get_source(name: str, weights: str | None = "auto", image_size: int | None = None) -> ModelSource:
    """The source that builds ``name`` (``timm:NAME`` -> timm, a plain name -> torchvision)."""
    return source_class(check_prefix(name))(name, weights, image_size)


def seeded(build):
    """``build()`` under a fixed seed: random-init (``--weights none``) files are reproducible and resumable."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def local_weights(spec: str, suffixes: tuple[str, ...], kinds: str) -> WeightsChoice | None:
    """``--weights FILE``: the file with its SHA-256, or None when ``spec`` names no file."""
    if not (spec.endswith(suffixes) or Path(spec).is_file()):
        return None
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"weights file {path} does not exist; pass an existing {kinds} state dict")
    digest = file_sha256(path)
    return WeightsChoice(None, path.resolve(), f"file:{path.name}:{digest[:16]}", digest)


def load_state_file(path: Path, kinds: str) -> dict:
    """A state dict from ``.safetensors`` or a torch file (``weights_only``: a file holding code is refused)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UsageError(f"weights file {path} holds more than tensors ({str(exc).splitlines()[0]}); it is loaded "
                         f"with weights_only=True, which refuses code: pass a plain state dict") from None
    except Exception as exc:
        raise UsageError(f"weights file {path} is not a state dict ({str(exc).splitlines()[0]}); pass a "
                         f"{kinds} state dict") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class ModelSource:
    """One model of one source, with resolved weights and an optional square input size.

    Subclasses implement :meth:`names` (or :meth:`check_name`), :meth:`resolve_weights`, :meth:`download`,
    :meth:`random_model`, :meth:`load_file`, :meth:`weights_arg`, :meth:`preset` and
    :meth:`architecture`; :meth:`build` puts the weights parts together once for every source, and
    the graph hooks default to torchvision's ``feature_extraction``."""

    prefix: ClassVar[str] = ""

    def __init__(self, name: str, weights: str | None = "auto", image_size: int | None = None):
        self.check_name(name)
        if image_size is not None and image_size < 1:
            raise UsageError(f"--image-size must be a positive number of pixels, not {image_size}")
        self.name = name
        self.image_size = image_size
        self.weights = RANDOM if weights is None or weights.lower() in ("none", "random") else \
            self.resolve_weights(weights)

    # ------------------------------------------------------------ what a source implements
    @classmethod
    def names(cls) -> list[str] | None:
        """The model names this source takes after its prefix (checked, and kept, by :mod:`.names`);
        None where any name may be one (hub ids, folders): :meth:`check_name` decides."""
        return None

    @classmethod
    def check_name(cls, name: str) -> None:
        """What a listed name may still get wrong (an open_clip tag); nothing by default."""

    @classmethod
    def listing(cls) -> str:
        """One line for ``taps list backbones``."""
        raise NotImplementedError

    def resolve_weights(self, spec: str) -> WeightsChoice:
        """``--weights`` other than none/random."""
        raise NotImplementedError

    def weights_listing(self) -> WeightsListing | None:
        """The pretrained weights ``--weights`` may name, where they can be listed (None: a hub id, a folder)."""
        return None

    @staticmethod
    def listed_weights(names: list[str], words: list[str]) -> WeightsListing:
        """A listing of the weights ``names`` whose refusal offers ``words`` (auto, none, FILE) first."""
        return WeightsListing(tuple(names), ", ".join([*words, *names]))

    def refuse_weights(self, spec: str) -> NoReturn:
        """``--weights`` names none of this model's weights: refused with the listing, which is kept."""
        raise UnknownWeights(spec, self.name, self.weights_listing())

    def download(self) -> nn.Module | None:
        """The model with its pretrained weights from the source's servers or cache, or None when the
        weights are not the source's own (random, or a local file)."""
        raise NotImplementedError

    def random_model(self) -> nn.Module:
        """The model with random weights (called under a fixed seed)."""
        raise NotImplementedError

    def load_file(self, model: nn.Module, path: Path) -> None:
        """Load a local state-dict file into ``model``, refusing one that does not fit it."""
        raise NotImplementedError

    def build(self) -> nn.Module:
        """The frozen model in eval mode with its weights loaded (on CPU): the source's pretrained
        weights, else seeded random ones with a local file's tensors loaded on top."""
        model = self.download()
        if model is None:
            model = seeded(self.random_model)
            if self.weights.path is not None:
                self.load_file(model, self.weights.path)
        return frozen(model)

    def weights_arg(self) -> str:
        """The ``--weights`` value that resolves to these weights again, in another process."""
        raise NotImplementedError

    def preset(self) -> ImageClassification:
        """The weights' own eval preprocessing, as a torchvision preset."""
        raise NotImplementedError

    def architecture(self) -> nn.Module:
        """The model without weights, on meta tensors where possible (for names and shapes)."""
        raise NotImplementedError

    def check_weights(self) -> None:
        """Fail early (one line) when pretrained weights are neither cached nor downloadable."""

    def card_files(self) -> CardFiles | None:
        """The files this model's weights resolution read, for its card (:mod:`.cards`); None: not carded."""
        return None

    def hub_card_files(self, checkpoint: Callable[[str], str | None],
                       seen: dict[str, bool] | None = None) -> CardFiles | None:
        """:meth:`card_files` of a source whose pretrained weights come from a hub: random weights as they
        are; hub weights once ``checkpoint(hub name)`` finds their file in the local cache (the build that
        downloads it comes first), with the other files whose presence their resolution read (``seen``);
        a local file never (its digest is read on every run anyway)."""
        w = self.weights
        if w.path is not None:
            return None
        if w.hub is None:
            return CardFiles({})
        found = checkpoint(w.hub)
        return None if found is None else CardFiles({**(seen or {}), found: True}, (found,))

    def tap_scheme(self, model: nn.Module) -> TapScheme:
        return tap_scheme(self.name, model)

    def feature_graph(self, model: nn.Module, nodes: dict[str, str]) -> nn.Module:
        """``model`` traced and pruned to return ``nodes``."""
        from torchvision.models.feature_extraction import create_feature_extractor

        return create_feature_extractor(model, nodes)

    def graph_nodes(self, model: nn.Module) -> list[str]:
        """The eval-mode graph's node names, in execution order."""
        from torchvision.models.feature_extraction import get_graph_node_names

        return get_graph_node_names(model)[1]

    def token_grid(self, model: nn.Module) -> tuple[int, int, int] | None:
        """(prefix tokens, grid height, grid width) of a vision transformer's token sequences, else None."""
        return None

    def channels_last(self, model: nn.Module, tap: Tap) -> bool:
        """Whether this (C, H, W)-looking tap is really returned as (H, W, C)."""
        return False

    # ------------------------------------------------------------ shared by every source
    @cached_property
    def meta(self) -> nn.Module:
        """The architecture, built once (names, shapes, configs)."""
        return self.architecture()

    def spec_args(self) -> tuple[str, str, int | None]:
        """Constructor arguments that rebuild this model in another process."""
        return self.name, self.weights_arg(), self.image_size

    def transform(self) -> ImageClassification:
        """The weights' preprocessing, or the same with a square ``image_size``."""
        from torchvision.transforms._presets import ImageClassification

        preset = self.preset()
        if self.image_size is None:
            return preset
        # An explicit size: resize the shorter side to it and crop the square (no border lost on square inputs).
        return ImageClassification(crop_size=self.image_size, resize_size=self.image_size, mean=preset.mean,
                                   std=preset.std, interpolation=preset.interpolation)

    def preprocess(self) -> Preprocess:
        """:meth:`transform`'s numbers, as feature files and backbone cards record them."""
        return Preprocess.of(self.transform())

    @property
    def input_size(self) -> int:
        return self.preprocess().input_size
