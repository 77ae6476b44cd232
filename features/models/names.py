"""Which model names a source knows, its line in ``taps list backbones``, and which weights a model
takes, kept once per machine.

Listing torchvision's models or timm's imports those libraries, and torch with them (seconds),
to an answer that changes only with their versions. The first listing of a source keeps it in
``$TAPS_CACHE/names/``, keyed by those versions and the code of :mod:`features.models`; then
``taps list backbones`` and a misspelt ``--backbone`` answer without importing either. A model's
weights are kept the same way the first time it is resolved, so a misspelt ``--weights`` for a
model used before answers without them too.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UsageError
from ..files import KEY_DIGITS, cache_root, digest, path_safe, write_atomically
from .cards import code_digest, package_version
from .source import SOURCE_MODULES, SOURCE_PACKAGES, WeightsListing, check_prefix, source_class, split_name

NAMES_VERSION = 1


@dataclass(frozen=True)
class SourceNames:
    listing: str                      # the source's line in `taps list backbones`
    names: tuple[str, ...] | None     # the model names it takes after its prefix; None: any (hub ids, folders)


def source_names(prefix: str) -> SourceNames:
    """The names of the source registered for ``prefix``, as kept, or listed (and kept) now."""
    versions = [package_version(p) for p in ("torch", "torchvision", SOURCE_PACKAGES[prefix])]
    key = digest({"names": NAMES_VERSION, "prefix": prefix, "versions": versions, "code": code_digest()},
                 length=KEY_DIGITS)
    path = cache_root() / "names" / f"{prefix or 'torchvision'}-{key}.json"
    try:
        kept = json.loads(path.read_text())
        return SourceNames(kept["listing"], None if kept["names"] is None else tuple(kept["names"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not kept yet, or damaged: listed afresh
    cls = source_class(prefix)
    names = cls.names()
    found = SourceNames(cls.listing(), None if names is None else tuple(sorted(names)))
    try:
        write_atomically(path, json.dumps(asdict(found)))
    except OSError:
        pass  # a cache that cannot be written only costs the listing's time
    return found


def source_listings() -> list[str]:
    """One line per model source, for ``taps list backbones``."""
    return [source_names(prefix).listing for prefix in SOURCE_MODULES]


def check_known(name: str) -> None:
    """Refuse a model name its source does not list (with the closest ones it does), before the
    source's library is imported; where it is imported already, a model registered with it since
    the names were kept counts."""
    prefix, model = check_prefix(name), split_name(name)[1]
    known = source_names(prefix).names
    if known is None or model in known:
        return
    if SOURCE_PACKAGES[prefix] in sys.modules:  # imported already (a notebook): a model it registered since counts
        known = source_class(prefix).names() or []
        if model in known:
            return
    close = [f"{prefix}:{c}" if prefix else c for c in difflib.get_close_matches(model, known, n=3, cutoff=0.6)]
    hint = f"did you mean {' or '.join(close)}?" if close else \
        f"run `taps list backbones` for the valid names ({len(known)} here)"
    raise UsageError(f"unknown backbone {name!r}; {hint}")


def _weights_path(name: str) -> Path:
    prefix = check_prefix(name)
    versions = [package_version(p) for p in ("torch", "torchvision", SOURCE_PACKAGES[prefix])]
    key = digest({"weights": NAMES_VERSION, "name": name, "versions": versions, "code": code_digest()},
                 length=KEY_DIGITS)
    return cache_root() / "names" / f"weights-{path_safe(name)}-{key}.json"


def keep_weights(name: str, listing: Callable[[], WeightsListing | None]) -> None:
    """Keep model ``name``'s weights (``listing()``, called only where none are kept yet)."""
    path = _weights_path(name)
    if path.is_file():
        return
    found = listing()
    if found is not None and found.names:  # a model without pretrained weights: its source says so itself
        try:
            write_atomically(path, json.dumps({"names": list(found.names), "valid": found.valid}))
        except OSError:
            pass  # a cache that cannot be written only costs the import on the next misspelling


def check_weights_known(name: str, spec: str) -> None:
    """Refuse ``--weights`` that names none of the kept weights of ``name``, as its source would, before
    the source's library is imported. Anything the source could still take passes: auto, default,
    none, a path or file name, a spelling in another case (the source decides those), or a model whose
    weights were never kept."""
    if spec.lower() in ("auto", "default", "none", "random") or "/" in spec or "\\" in spec \
            or Path(spec).suffix.lower() in (".pth", ".pt", ".safetensors", ".bin") or Path(spec).exists():
        return
    try:
        kept = json.loads(_weights_path(name).read_text())
        listing = WeightsListing(tuple(kept["names"]), kept["valid"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # never kept (or damaged): the source answers
    if spec.split(".")[-1].lower() not in {n.lower() for n in listing.names}:
        raise UsageError(listing.refusal(spec, name))
