"""One family's records by name (precisions, loaders, decoders, runtimes, poolings; stage two's
classifiers, preprocessing, protocols and tap selectors): each record is registered once, under
its ``name`` and its ``aliases`` if it has any, and a name is looked up with the family's own error."""

from __future__ import annotations

import importlib
from typing import Protocol, TypeVar

from .errors import choose


def load(target: str):
    """The attribute a record names as ``module:attribute`` (an engine class, a session opener, a
    quantizer, an estimator), imported only now: a record is declared without importing what it runs."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


class Named(Protocol):
    name: str


R = TypeVar("R", bound=Named)


class Registry(dict[str, R]):
    """The records of one family in registration order (the order help and errors list them).
    ``option`` names the family in errors (``--precision``, ``runtime``)."""

    def __init__(self, option: str):
        super().__init__()
        self.option = option

    def register(self, record: R) -> R:
        for name in (record.name, *getattr(record, "aliases", ())):
            self[name] = record
        return record

    def records(self) -> list[R]:
        """Each record once (its aliases left out), in registration order."""
        return [record for name, record in self.items() if name == record.name]

    def lookup(self, name: str) -> R:
        """The record named ``name``; a UsageError listing the valid names when there is none."""
        choose(self.option, name, tuple(self))
        return self[name]
