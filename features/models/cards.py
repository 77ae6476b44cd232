"""A backbone's card: what a resolved backbone declares without its model, kept once per machine.

A run whose model is never built (an exported runtime's cached file does the forward) needs
only what the model declares: its weights' id, their preprocessing and its taps with their
shapes (timm's ``pretrained_cfg`` and ``FeatureInfo``, written down). Resolving them imports
the source's library (torchvision pulls in ``torch._dynamo``: over a second) and traces the
graph, on every run, to the same answer. The first resolution writes this card; later ones
read it and build the model only if something asks for it.

A card is keyed by everything its answer depends on: the name, ``--weights`` as given, the
input size, torch's and the source library's versions, torch's hub folder, Hugging Face's cache,
the code of :mod:`features.models` and the registered tap schemes (a scheme registered at run
time turns cards off). It also lists the checkpoint files whose presence the weights' resolution read
(``auto`` takes the checkpoint that is on disk) and is ignored when any of them has come or
gone since, or (files that may be written again in place) changed size or time. Local weights
files (and timm's seeded ones) are never carded: their digest is read on every run anyway.
torchvision, timm and open_clip sources keep cards (hub weights once their checkpoint is in the
Hugging Face cache); ``hf:`` sources keep one for a local ``save_pretrained`` folder, stamped by
its files, while a hub repo's config and processor, which may change under the same name, are
read on every run.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

from ..files import KEY_DIGITS, cache_root, digest, path_safe, write_atomically
from .preprocess import Preprocess
from .schemes import Tap, built_in_schemes_only
from .source import SOURCE_PACKAGES, CardFiles, WeightsChoice, split_name

CARD_VERSION = 2


@dataclass(frozen=True)
class BackboneCard:
    """What :class:`features.backbones.Backbone` answers without its source: name, weights,
    preprocessing, taps and the standard embedding."""

    name: str
    weights: WeightsChoice       # spec and hub name only: enum members and local files are not carded
    weights_arg: str             # the --weights value that resolves to them again
    image_size: int | None
    preprocess: Preprocess
    taps: dict[str, Tap]
    standard: str
    files: CardFiles
    nodes: tuple[str, ...]       # the traced graph's node names: any of them is a tap too

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "weights": {"spec": self.weights.spec, "hub": self.weights.hub},
                           "weights_arg": self.weights_arg, "image_size": self.image_size,
                           "preprocess": asdict(self.preprocess), "taps": [asdict(t) for t in self.taps.values()],
                           "standard": self.standard, "files": asdict(self.files), "nodes": list(self.nodes)},
                          indent=1)

    @classmethod
    def from_json(cls, text: str) -> BackboneCard:
        d = json.loads(text)
        p = d["preprocess"]
        preprocess = Preprocess(tuple(p["resize"]), tuple(p["crop"]), p["interpolation"], p["antialias"],
                                tuple(p["mean"]), tuple(p["std"]))
        taps = {t["name"]: Tap(**{**t, "shape": tuple(t["shape"])}) for t in d["taps"]}
        return cls(d["name"], WeightsChoice(None, None, d["weights"]["spec"], hub=d["weights"]["hub"]),
                   d["weights_arg"], d["image_size"], preprocess, taps, d["standard"],
                   CardFiles(d["files"]["seen"], tuple(d["files"]["needed"]), d["files"].get("stamps", {})),
                   tuple(d["nodes"]))


@cache
def code_digest() -> str:
    """The code that decides what a card says (sources, schemes, resolver, preprocessing)."""
    here = Path(__file__).parent
    return digest(*[p.read_bytes() for p in sorted(here.glob("*.py"))], length=KEY_DIGITS)


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def hub_dir() -> str:
    """``torch.hub.get_dir()``, where checkpoints are looked for, without importing torch where nothing has:
    torch's own rule (``$TORCH_HOME/hub``, ``$TORCH_HOME`` defaulting to ``$XDG_CACHE_HOME/torch``)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.hub.get_dir()  # it may have been moved by torch.hub.set_dir
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return os.path.join(os.path.expanduser(home), "hub")


def hf_cache_dir() -> str:
    """``huggingface_hub.constants.HF_HUB_CACHE`` (where timm's and open_clip's checkpoints are), by its own
    rule, without importing it."""
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        return str(hub.HF_HUB_CACHE)
    home = os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "huggingface"))
    default = os.path.join(os.path.expanduser(home), "hub")
    return os.path.expanduser(os.getenv("HF_HUB_CACHE", os.getenv("HUGGINGFACE_HUB_CACHE", default)))


def card_path(name: str, weights: str, image_size: int | None) -> Path | None:
    """Where the card of ``Backbone(name, weights, image_size)`` is kept; None where none may be."""
    prefix = split_name(name)[0]
    if Path(weights).exists() or prefix not in SOURCE_PACKAGES or not built_in_schemes_only():
        return None
    where = Path(split_name(name)[1])  # a folder (hf:./model) is the folder it names from here
    key = digest({"card": CARD_VERSION, "name": name, "weights": weights, "image_size": image_size,
                  "folder": str(where.resolve()) if where.is_dir() else None,
                  "versions": [package_version(p) for p in ("torch", "torchvision", SOURCE_PACKAGES[prefix])],
                  "hub": hub_dir(), "hf": hf_cache_dir(), "code": code_digest()}, length=KEY_DIGITS)
    return cache_root() / "backbones" / f"{path_safe(name)}-{key}.json"


def load_card(name: str, weights: str, image_size: int | None) -> BackboneCard | None:
    """The card kept for these arguments, or None (none kept, unreadable, or its files changed)."""
    path = card_path(name, weights, image_size)
    if path is None or not path.is_file():
        return None
    try:
        card = BackboneCard.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a card from another version of this code, or damaged: resolved afresh
    return card if card.files.unchanged() else None


def save_card(card: BackboneCard, weights: str) -> None:
    """Keep ``card`` for the arguments it was resolved from (a cache that cannot be written is skipped:
    the card only saves time)."""
    path = card_path(card.name, weights, card.image_size)
    if path is None:
        return
    try:
        write_atomically(path, card.to_json())
    except OSError:
        pass
