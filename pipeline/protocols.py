"""Evaluation protocols: which samples train and which test, seeded and checked before any work.

- ``official``: the split stored in the feature file (train, plus val when a test split exists).
- ``per-class:N``: N random training images per class, the rest tested (capped by ``test_per_class``);
  Caltech-101's standard protocol is ``per-class:30`` with at most 50 test images per class.
- ``fraction:F``: a stratified random fraction F of the samples for training, the rest for testing.
- ``auto``: ``official`` when the file has a train split and a test (or val) split, else ``fraction:0.5``.

Byte-identical images (equal content digests in the feature file) are one group, and every
protocol keeps a group on one side: the random protocols draw groups (each represented by its
first member), and ``official`` drops from the test side the images whose bytes are also in
training. Without duplicates the splits are exactly those drawn sample by sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

from features.errors import UsageError
from features.files import digest

KINDS = ("official", "per-class:N", "fraction:F", "auto")


@dataclass(frozen=True)
class Protocol:
    kind: str            # official | per-class | fraction
    value: float = 0.0   # N or F
    test_per_class: int | None = None

    def __str__(self) -> str:
        base = {"official": "official", "per-class": f"per-class:{int(self.value)}",
                "fraction": f"fraction:{self.value:g}"}[self.kind]
        return base + (f" test-per-class:{self.test_per_class}" if self.test_per_class else "")


def parse_protocol(text: str, test_per_class: int | None = None,
                   has_split: bool | Collection[str | None] = True) -> Protocol:
    """Parse and sanity-check a protocol string. ``has_split``: whether the data has an official split,
    or its split names per sample (``auto`` falls back to ``fraction:0.5``, with a warning, when
    they lack a train or a test side, e.g. a subset of the training split)."""
    if test_per_class is not None and test_per_class < 1:
        raise UsageError(f"--test-per-class must be at least 1, not {test_per_class}")
    if text == "auto":
        names = has_split if isinstance(has_split, bool) else set(has_split or ()) - {None, ""}
        usable = names if isinstance(names, bool) else "train" in names and bool(names & {"test", "val"})
        if not usable and names:
            warnings.warn(f"--protocol auto: the data's split has only {', '.join(sorted(names))} (no train and "
                          f"test sides), so it uses fraction:0.5", stacklevel=2)
        text = "official" if usable else "fraction:0.5"
    if text == "official":
        return Protocol("official", 0, test_per_class)
    kind, _, value = text.partition(":")
    try:
        number = float(value)
    except ValueError:
        number = None
    if kind == "per-class" and number is not None and number == int(number) and number >= 1:
        return Protocol("per-class", int(number), test_per_class)
    if kind == "fraction" and number is not None and 0 < number < 1:
        return Protocol("fraction", number, test_per_class)
    hint = {"per-class": "per-class:N needs a whole N >= 1", "fraction": "fraction:F needs 0 < F < 1"}.get(kind, "")
    raise UsageError(f"bad protocol {text!r}{'; ' + hint if hint else ''}; valid: {', '.join(KINDS)}")


def check_protocol(protocol: Protocol, labels: np.ndarray, classes: list[str], split: list[str] | None) -> None:
    """Reject protocols the data cannot satisfy, naming the class or split at fault."""
    if protocol.kind == "official":
        if split is None or not any(s == "train" for s in split):
            raise UsageError("protocol official needs a dataset with a train split; use per-class:N or fraction:F")
        if not any(s in ("test", "val") for s in split):
            raise UsageError("protocol official needs a test or val split; use per-class:N or fraction:F")
    counts = np.bincount(labels, minlength=len(classes))
    present = counts[counts > 0]
    if protocol.kind == "per-class":
        n = int(protocol.value)
        short = [(classes[c], int(counts[c])) for c in np.flatnonzero(counts) if counts[c] <= n]
        if short:
            name, count = min(short, key=lambda t: t[1])
            raise UsageError(f"protocol per-class:{n} needs more than {n} images in every class, but {name!r} has "
                             f"{count} ({len(short)} classes too small); lower N")
    if protocol.kind == "fraction" and present.min() < 2:
        name = classes[int(np.flatnonzero(counts == present.min())[0])]
        raise UsageError(f"protocol fraction needs at least 2 images per class, but {name!r} has 1")
    if protocol.kind == "fraction":  # a stratified split puts every class on both sides
        n, k = int(counts.sum()), len(present)
        low, high = k / n, 1 - k / n
        if not low <= protocol.value <= high:
            raise UsageError(f"protocol fraction:{protocol.value:g} leaves {'training' if protocol.value < low else 'test'}"
                             f" split smaller than the {k} classes ({n} images); use a fraction between "
                             f"{low:.3f} and {high:.3f}")


def make_split(protocol: Protocol, labels: np.ndarray, split: list[str] | None, seed: int,
               usable: np.ndarray | None = None, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint (train, test) sample indices for ``seed``; ``usable`` masks out skipped images;
    ``groups`` (per sample, the first sample with identical bytes) keeps identical images on one side."""
    usable = np.ones(len(labels), bool) if usable is None else usable
    rng = np.random.default_rng(seed)
    first = None if groups is None or (groups == np.arange(len(labels))).all() else groups
    if protocol.kind == "official":
        names = np.asarray(split)
        train_names = ["train", "val"] if "test" in names else ["train"]
        test_name = "test" if "test" in names else "val"
        train = np.flatnonzero(np.isin(names, train_names) & usable)
        test = np.flatnonzero((names == test_name) & usable)
        if first is not None:  # a test image whose bytes are in training is no test of generalisation
            test = test[~np.isin(first[test], first[train])]
    else:
        drawn = usable if first is None else usable & (first == np.arange(len(labels)))
        train, test = _draw(protocol, labels, drawn, rng, seed)
        if first is not None:  # every copy follows its group's first member
            train = np.flatnonzero(np.isin(first, train) & usable)
            test = np.flatnonzero(np.isin(first, test) & usable)
    if protocol.test_per_class:
        test = np.concatenate([rng.permutation(test[labels[test] == c])[:protocol.test_per_class]
                               for c in np.unique(labels[test])])
    return np.sort(train), np.sort(test)


def _draw(protocol: Protocol, labels: np.ndarray, usable: np.ndarray, rng: np.random.Generator,
          seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The random protocols' (train, test) draw among the ``usable`` samples."""
    if protocol.kind == "per-class":
        n = int(protocol.value)
        train_parts, test_parts = [], []
        for c in np.unique(labels[usable]):
            members = rng.permutation(np.flatnonzero((labels == c) & usable))
            train_parts.append(members[:n])
            test_parts.append(members[n:])
        return np.concatenate(train_parts), np.concatenate(test_parts)
    idx = np.flatnonzero(usable)
    train, test = train_test_split(idx, train_size=protocol.value, random_state=seed, stratify=labels[idx])
    return train, test


def duplicate_summary(groups: np.ndarray | None) -> dict:
    """How many groups of byte-identical images a file has, and how many images are in them."""
    if groups is None:
        return {"checked": False, "groups": 0, "images": 0}
    sizes = np.bincount(groups, minlength=len(groups))
    return {"checked": True, "groups": int((sizes > 1).sum()), "images": int(sizes[sizes > 1].sum())}


def split_digest(ids: list[str], indices: np.ndarray) -> str:
    """Short hash of the sample ids in a split: equal digests mean identical splits."""
    return digest("\n".join(ids[i] for i in indices))
