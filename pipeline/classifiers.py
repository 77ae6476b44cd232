"""The records behind ``--clf``, ``--solver`` and ``--preprocess``: names, aliases, grids and
validation, one record each, registered once.

This module imports neither torch nor scikit-learn: the CLI builds its arguments and checks
them from these records alone, so ``taps fit --help`` or a mistyped flag answers at once. What a
record builds (a head from :mod:`pipeline.heads`, a scikit-learn step) is named as
``module:attribute`` and imported only when a fit runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from features.errors import UsageError
from features.registry import Registry, load

# --solver: who fits the L-BFGS heads (svm, logreg): torch (any device), or scikit-learn's own
# estimator (LinearSVC, LogisticRegression), the reference it is tested against.
DEFAULT_SOLVER = "torch"
REFERENCE_SOLVER = "sklearn"
SOLVERS = (DEFAULT_SOLVER, REFERENCE_SOLVER)


@dataclass(frozen=True)
class Classifier:
    """One classifier of ``--clf``: its name and aliases, the parameter its grid selects and that
    grid's default, the head it builds (``head``: an estimator class taking the ``takes`` settings)
    and scikit-learn's own estimator at one grid value (``reference``, timed by the bench)."""

    name: str
    param: str                      # what the grid selects: C, weight_decay, n_neighbors
    grid: tuple[float, ...]         # the default grid
    head: str                       # "module:Class" of the head
    takes: tuple[str, ...] = ("device",)  # which of solver, hidden, device the head takes
    aliases: tuple[str, ...] = ()
    whole_numbers: bool = False     # grid values are counts (k), not strengths
    streams: bool = False           # can train from the HDF5 file chunk by chunk (pipeline.streaming)
    probabilities: bool = True      # predict_proba (else decision scores only: svm)
    text: bool = False              # built from the class names by the backbone's text tower (no training)
    reference: str | None = None    # "module:Class" of scikit-learn's estimator, built with param=value
    reference_params: dict = field(default_factory=dict)

    def build(self, solver: str = DEFAULT_SOLVER, hidden: int = 0, device: str = "auto"):
        """The unfitted head."""
        given = {"solver": solver, "hidden": hidden, "device": device}
        return load(self.head)(**{name: given[name] for name in self.takes})

    def build_reference(self, value: float):
        """scikit-learn's estimator for this classifier at grid value ``value``."""
        return load(self.reference)(**{self.param: value, **self.reference_params})


CLASSIFIER_REGISTRY: Registry[Classifier] = Registry("classifier")
register_classifier = CLASSIFIER_REGISTRY.register


DEFAULT_CLASSIFIER = register_classifier(Classifier(
    "svm", "C", tuple(10.0 ** e for e in range(-5, 1)), "pipeline.heads:LinearSVM", ("solver", "device"),
    probabilities=False, reference="sklearn.svm:LinearSVC")).name
register_classifier(Classifier(
    "logreg", "C", tuple(10.0 ** e for e in range(-4, 3)), "pipeline.heads:SoftmaxRegression", ("solver", "device"),
    aliases=("softmax",), reference="sklearn.linear_model:LogisticRegression", reference_params={"max_iter": 1000}))
register_classifier(Classifier(
    "linear", "weight_decay", (1e-5, 1e-4, 1e-3, 1e-2, 1e-1), "pipeline.heads:TorchLinearHead", ("hidden", "device"),
    streams=True))
register_classifier(Classifier(
    "knn", "n_neighbors", (5, 10, 20, 50), "pipeline.heads:KNNProbe", whole_numbers=True))
register_classifier(Classifier(  # closed-form one-vs-rest ridge regression: the fastest linear baseline
    "ridge", "alpha", (1e-1, 1.0, 1e1, 1e2, 1e3, 1e4), "sklearn.linear_model:RidgeClassifier", (),
    probabilities=False))
register_classifier(Classifier(
    "zeroshot", "logit_scale", (100.0,), "pipeline.zeroshot:ZeroShotClassifier", (), text=True))
CLASSIFIERS = tuple(CLASSIFIER_REGISTRY)  # names and aliases, as --clf takes them


get_classifier = CLASSIFIER_REGISTRY.lookup  # the record of a --clf value (an alias gives its classifier's)


def text_classifiers() -> list[str]:
    """The classifiers built from the class names by a text tower (those --prompts is for)."""
    return [c.name for c in CLASSIFIER_REGISTRY.records() if c.text]


def referenced_classifiers() -> list[Classifier]:
    """The classifiers with a scikit-learn reference to time against, each once."""
    return [c for c in CLASSIFIER_REGISTRY.records() if c.reference is not None]


def streaming_classifiers() -> list[str]:
    return [c.name for c in CLASSIFIER_REGISTRY.records() if c.streams]


# ------------------------------------------------------------ --preprocess, one record each


@dataclass(frozen=True)
class Preprocess:
    """One preprocessing step of ``--preprocess``: its name (``pca`` takes ``:K``) and the named
    scikit-learn steps it adds, as (step name, "module:Class", parameters); ``count`` names the
    parameter K fills."""

    name: str
    steps: tuple[tuple[str, str, dict], ...]
    count: str | None = None  # written NAME:K with a positive integer K, passed as this parameter

    def build(self, k: int | None) -> list[tuple[str, object]]:
        return [(step, load(target)(**params, **({self.count: k} if self.count and step == self.name else {})))
                for step, target, params in self.steps]


PREPROCESS_REGISTRY: Registry[Preprocess] = Registry("--preprocess")
register_preprocess = PREPROCESS_REGISTRY.register


DEFAULT_PREPROCESS = register_preprocess(Preprocess(
    "standard", (("standard", "sklearn.preprocessing:StandardScaler", {}),))).name
register_preprocess(Preprocess("l2", (("l2", "sklearn.preprocessing:Normalizer", {}),)))
TEXT_PREPROCESS = register_preprocess(Preprocess("none", ())).name  # what a text classifier's embeddings get
register_preprocess(Preprocess("pca", (("pca_standard", "sklearn.preprocessing:StandardScaler", {}),
                                       ("pca", "sklearn.decomposition:PCA", {"random_state": 0})), count="n_components"))


def preprocess_spellings() -> list[str]:
    """How each record is written in ``--preprocess`` (``NAME:K`` where it takes a count)."""
    return [f"{n}:K" if p.count else n for n, p in PREPROCESS_REGISTRY.items()]


def parse_preprocess(spec: str) -> list[tuple[Preprocess, int | None]]:
    """``standard`` (default), ``l2``, ``none``, ``pca:K``, or a comma list applied in order
    (``l2,standard``) -> each record with its K; refuses what is not one."""
    valid = ", ".join(preprocess_spellings())
    parsed = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, colon, argument = part.partition(":")
        record = PREPROCESS_REGISTRY.get(name)
        if record is None or bool(colon) != bool(record.count):
            raise UsageError(f"unknown preprocessing {part!r}; valid: {valid} (comma-separated)")
        count = int(argument) if record.count and argument.isdigit() else 0
        if record.count and count < 1:
            raise UsageError(f"bad preprocessing {part!r}: use {name}:K with a positive integer K")
        parsed.append((record, count if record.count else None))
    return parsed


def make_preprocess(spec: str) -> list[tuple[str, object]]:
    """The scikit-learn steps of ``spec`` (see :func:`parse_preprocess`), in order."""
    return [step for record, k in parse_preprocess(spec) for step in record.build(k)]


def make_classifier(clf: str, preprocess: str = DEFAULT_PREPROCESS, solver: str = DEFAULT_SOLVER, hidden: int = 0,
                    device: str = "auto", *, fuse=None, **params):
    """A scikit-learn Pipeline: the preprocessing steps (or ``fuse``, a step that preprocesses each
    fused tap's columns apart), then the head, with ``params`` set on it."""
    from sklearn.pipeline import Pipeline

    steps = make_preprocess(preprocess) if fuse is None else [("fuse", fuse)]
    head = get_classifier(clf).build(solver=solver, hidden=hidden, device=device).set_params(**params)
    return Pipeline([*steps, ("head", head)])


# ------------------------------------------------------------ --prompts (zeroshot)


def read_prompts(path: str | None) -> tuple[str, ...]:
    """The templates of ``--prompts FILE`` (one per line, ``{}`` for the class name), or open_clip's."""
    if path is None:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise UsageError(f"cannot read --prompts {path} ({exc.strerror}); pass a text file, one template per "
                         f"line") from None
    bad = [line for line in lines if line.count("{}") != 1]
    if not lines or bad:
        raise UsageError(f"--prompts {path}: every line is a template with one {{}} for the class name, e.g. "
                         f"'a photo of a {{}}.'" + (f"; not {bad[0]!r}" if bad else " (the file is empty)"))
    return tuple(lines)
