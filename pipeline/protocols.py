"""Evaluation protocols: which samples train and which test, seeded and checked before any work.

- ``official``: the split stored in the feature file (train, plus val when a test split exists).
- ``per-class:N``: N random training images per class, the rest tested (capped by ``test_per_class``);
  Caltech-101's standard protocol is ``per-class:30`` with at most 50 test images per class.
- ``fraction:F``: a stratified random fraction F of the samples for training, the rest for testing.
- ``auto``: ``official`` when the file has a train split and a test (or val) split, else ``fraction:0.5``.

Each kind is one :class:`ProtocolKind` record (its syntax, how its value is read and written,
what data it needs, how it splits), registered once; parsing, checking and splitting look the
kind up instead of switching on its name.

Byte-identical images (equal content digests in the feature file) are one group, and every
protocol keeps a group on one side: the random protocols draw groups (each represented by its
first member), and ``official`` drops from the test side the images whose bytes are also in
training. Without duplicates the splits are exactly those drawn sample by sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np

from features.errors import UsageError
from features.files import digest
from features.registry import Registry

AUTO = "auto"
OFFICIAL = "official"


@dataclass(frozen=True)
class ProtocolKind:
    """One kind of protocol. ``value`` reads the text after ``name:`` (None when it is not valid);
    ``check`` refuses data the protocol cannot split; ``split`` returns (train, test) indices among
    the ``usable`` samples (``random``: drawn with ``rng``, so duplicate groups are drawn whole)."""

    name: str
    syntax: str
    hint: str
    value: Callable[[str], float | None]
    text: Callable[[float], str]
    check: Callable[..., None]
    split: Callable[..., tuple[np.ndarray, np.ndarray]]
    random: bool = True


PROTOCOL_REGISTRY: Registry[ProtocolKind] = Registry("protocol")
register_protocol = PROTOCOL_REGISTRY.register


@dataclass(frozen=True)
class Protocol:
    kind: str            # a registered ProtocolKind's name
    value: float = 0.0   # N or F
    test_per_class: int | None = None
    record: ProtocolKind = field(init=False, compare=False, repr=False)  # the kind's record
    text: str = field(init=False, compare=False, repr=False)  # as runs record it: fraction:0.5 test-per-class:50

    def __post_init__(self) -> None:
        record = PROTOCOL_REGISTRY[self.kind]
        object.__setattr__(self, "record", record)
        object.__setattr__(self, "text", record.text(self.value) + (f" test-per-class:{self.test_per_class}"
                                                                    if self.test_per_class else ""))

    def __str__(self) -> str:
        return self.text


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# ------------------------------------------------------------------ official

def _check_official(protocol: Protocol, counts: np.ndarray, classes: list[str], split: list[str] | None) -> None:
    if split is None or not any(s == "train" for s in split):
        raise UsageError("protocol official needs a dataset with a train split; use per-class:N or fraction:F")
    if not any(s in ("test", "val") for s in split):
        raise UsageError("protocol official needs a test or val split; use per-class:N or fraction:F")


def _split_official(protocol: Protocol, labels: np.ndarray, split: list[str], usable: np.ndarray,
                    rng: np.random.Generator, seed: int) -> tuple[np.ndarray, np.ndarray]:
    names = np.asarray(split)
    train_names = ["train", "val"] if "test" in names else ["train"]
    test_name = "test" if "test" in names else "val"
    return np.flatnonzero(np.isin(names, train_names) & usable), np.flatnonzero((names == test_name) & usable)


register_protocol(ProtocolKind(
    OFFICIAL, OFFICIAL, "", value=lambda text: 0 if text == "" else None, text=lambda value: OFFICIAL,
    check=_check_official, split=_split_official, random=False))


# ------------------------------------------------------------------ per-class:N

def _check_per_class(protocol: Protocol, counts: np.ndarray, classes: list[str], split: list[str] | None) -> None:
    n = int(protocol.value)
    short = [(classes[c], int(counts[c])) for c in np.flatnonzero(counts) if counts[c] <= n]
    if short:
        name, count = min(short, key=lambda t: t[1])
        raise UsageError(f"protocol per-class:{n} needs more than {n} images in every class, but {name!r} has "
                         f"{count} ({len(short)} classes too small); lower N")


def _split_per_class(protocol: Protocol, labels: np.ndarray, split, usable: np.ndarray, rng: np.random.Generator,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = int(protocol.value)
    train_parts, test_parts = [], []
    for c in np.unique(labels[usable]):
        members = rng.permutation(np.flatnonzero((labels == c) & usable))
        train_parts.append(members[:n])
        test_parts.append(members[n:])
    return np.concatenate(train_parts), np.concatenate(test_parts)


register_protocol(ProtocolKind(
    "per-class", "per-class:N", "per-class:N needs a whole N >= 1",
    value=lambda text: int(v) if (v := _number(text)) is not None and v == int(v) and v >= 1 else None,
    text=lambda value: f"per-class:{int(value)}", check=_check_per_class, split=_split_per_class))


# ------------------------------------------------------------------ fraction:F

def _check_fraction(protocol: Protocol, counts: np.ndarray, classes: list[str], split: list[str] | None) -> None:
    present = counts[counts > 0]
    if present.min() < 2:
        name = classes[int(np.flatnonzero(counts == present.min())[0])]
        raise UsageError(f"protocol fraction needs at least 2 images per class, but {name!r} has 1")
    n, k = int(counts.sum()), len(present)  # a stratified split puts every class on both sides
    low, high = k / n, 1 - k / n
    if not low <= protocol.value <= high:
        raise UsageError(f"protocol fraction:{protocol.value:g} leaves {'training' if protocol.value < low else 'test'}"
                         f" split smaller than the {k} classes ({n} images); use a fraction between "
                         f"{low:.3f} and {high:.3f}")


def _split_fraction(protocol: Protocol, labels: np.ndarray, split, usable: np.ndarray, rng: np.random.Generator,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split  # here: the parser reads this module's names

    idx = np.flatnonzero(usable)
    try:
        train, test = train_test_split(idx, train_size=protocol.value, random_state=seed, stratify=labels[idx])
    except ValueError as exc:  # e.g. a class whose images are all copies of one image
        raise UsageError(f"protocol fraction:{protocol.value:g} cannot split these images ({exc}); use per-class:N "
                         f"or another fraction") from None
    return train, test


register_protocol(ProtocolKind(
    "fraction", "fraction:F", "fraction:F needs 0 < F < 1",
    value=lambda text: v if (v := _number(text)) is not None and 0 < v < 1 else None,
    text=lambda value: f"fraction:{value:g}", check=_check_fraction, split=_split_fraction))

KINDS = (*(k.syntax for k in PROTOCOL_REGISTRY.values()), AUTO)
FALLBACK = "fraction:0.5"  # what auto uses without an official split


def parse_protocol(text: str, test_per_class: int | None = None,
                   has_split: bool | Collection[str | None] = True) -> Protocol:
    """Parse and sanity-check a protocol string. ``has_split``: whether the data has an official split,
    or its split names per sample (``auto`` falls back to ``fraction:0.5``, with a warning, when
    they lack a train or a test side, e.g. a subset of the training split)."""
    if test_per_class is not None and test_per_class < 1:
        raise UsageError(f"--test-per-class must be at least 1, not {test_per_class}")
    if text == AUTO:
        names = has_split if isinstance(has_split, bool) else set(has_split or ()) - {None, ""}
        usable = names if isinstance(names, bool) else "train" in names and bool(names & {"test", "val"})
        if not usable and names:
            warnings.warn(f"--protocol auto: the data's split has only {', '.join(sorted(names))} (no train and "
                          f"test sides), so it uses {FALLBACK}", stacklevel=2)
        text = OFFICIAL if usable else FALLBACK
    name, _, value = text.partition(":")
    kind = PROTOCOL_REGISTRY.get(name)
    number = kind.value(value) if kind else None
    if number is None:
        hint = kind.hint if kind else ""
        raise UsageError(f"bad protocol {text!r}{'; ' + hint if hint else ''}; valid: {', '.join(KINDS)}")
    return Protocol(name, number, test_per_class)


def plan_splits(protocol: Protocol, labels: np.ndarray, *, classes: list[str], split: list[str] | None,
                usable: np.ndarray, groups: np.ndarray | None, seeds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each seed's (train, test) split of the ``usable`` samples, after checking that the data can
    satisfy the protocol (see :func:`check_protocol` and :func:`make_split`)."""
    check_protocol(protocol, labels[usable], classes,
                   None if split is None else [s for s, ok in zip(split, usable, strict=True) if ok])
    return [make_split(protocol, labels, split, seed, usable, groups) for seed in range(seeds)]


def check_protocol(protocol: Protocol, labels: np.ndarray, classes: list[str], split: list[str] | None) -> None:
    """Reject protocols the data cannot satisfy, naming the class or split at fault."""
    protocol.record.check(protocol, np.bincount(labels, minlength=len(classes)), classes, split)


def make_split(protocol: Protocol, labels: np.ndarray, split: list[str] | None, seed: int,
               usable: np.ndarray | None = None, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint (train, test) sample indices for ``seed``; ``usable`` masks out skipped images;
    ``groups`` (per sample, the first sample with identical bytes) keeps identical images on one side,
    and tests each image once per class it is filed under."""
    usable = np.ones(len(labels), bool) if usable is None else usable
    rng = np.random.default_rng(seed)
    first = None if groups is None or (groups == np.arange(len(labels))).all() else groups
    kind = protocol.record
    if not kind.random:
        train, test = kind.split(protocol, labels, split, usable, rng, seed)
        if first is not None:  # a test image whose bytes are in training is no test of generalisation
            test = test[~np.isin(first[test], first[train])]
    else:
        drawn = usable if first is None else usable & (first == np.arange(len(labels)))
        train, test = kind.split(protocol, labels, split, drawn, rng, seed)
        if first is not None:  # every copy follows its group's first member
            train = np.flatnonzero(np.isin(first, train) & usable)
            test = np.flatnonzero(np.isin(first, test) & usable)
    if first is not None:  # one image filed twice under its class is one test image: scored once, not twice
        test = test[np.sort(np.unique(np.stack([first[test], labels[test]]), axis=1, return_index=True)[1])]
    if protocol.test_per_class:
        test = np.concatenate([rng.permutation(test[labels[test] == c])[:protocol.test_per_class]
                               for c in np.unique(labels[test])])
    return np.sort(train), np.sort(test)


def duplicate_summary(groups: np.ndarray | None, protocol: Protocol | None = None, labels: np.ndarray | None = None,
                      split: list[str] | None = None, usable: np.ndarray | None = None,
                      test: np.ndarray | None = None) -> dict:
    """How many groups of byte-identical images a file has, how many images are in them and how many
    groups are filed under more than one class (``mixed_labels``, with ``labels``); with a fixed
    ``protocol`` (official), also how many of its test images were left out because their bytes are in
    its training side (``test_copies_dropped``; drawn splits keep each group on one side instead); with
    ``test`` (seed 0's test rows), how many copies of them under the same class were scored once with
    them (``test_copies_once``)."""
    if groups is None:
        return {"checked": False, "groups": 0, "images": 0}
    sizes = np.bincount(groups, minlength=len(groups))
    summary = {"checked": True, "groups": int((sizes > 1).sum()), "images": int(sizes[sizes > 1].sum())}
    if labels is not None and summary["groups"]:  # copies filed under two classes: a label is wrong somewhere
        labelled = np.unique(np.stack([groups, np.asarray(labels)]), axis=1)[0]
        summary["mixed_labels"] = int((np.bincount(labelled, minlength=len(groups)) > 1).sum())
    if protocol is not None and not protocol.record.random and summary["groups"]:
        usable = np.ones(len(groups), bool) if usable is None else usable
        fixed_train, fixed_test = protocol.record.split(protocol, labels, split, usable, np.random.default_rng(0), 0)
        summary["test_copies_dropped"] = int(np.isin(groups[fixed_test], groups[fixed_train]).sum())
    if test is not None and labels is not None and summary["groups"]:
        pair = groups * (int(np.max(labels)) + 1) + np.asarray(labels)  # an image under one class
        others = np.setdiff1d(np.flatnonzero(usable if usable is not None else np.ones(len(groups), bool)), test)
        summary["test_copies_once"] = int(np.isin(pair[others], pair[test]).sum())
    return summary


def split_digest(ids: list[str], indices: np.ndarray) -> str:
    """Short hash of the sample ids in a split: equal digests mean identical splits."""
    return digest("\n".join(ids[i] for i in indices))
