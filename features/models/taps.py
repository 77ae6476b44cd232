"""Which nodes of a model are taps: friendly names, shapes at the input size, layouts.

The same for every source: the source supplies the architecture, its graph and a family
scheme; :class:`TapResolver` orders the scheme's taps by depth, traces their shapes (on meta
tensors where the source allows), resolves raw node names and says which sizes a model takes.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property

import torch
from torch import nn

from ..errors import UsageError
from .schemes import Tap, TapScheme, last_node, node_depth
from .source import DEFAULT_IMAGE_SIZE, ModelSource


class TapResolver:
    """The taps of one source's model at its input size."""

    def __init__(self, source: ModelSource):
        self.source = source

    @cached_property
    def _graph(self) -> tuple[nn.Module, list[str]]:
        model = self.source.meta
        return model, self.source.graph_nodes(model)

    @cached_property
    def scheme(self) -> TapScheme:
        return self.source.tap_scheme(self._graph[0])

    @cached_property
    def taps(self) -> dict[str, Tap]:
        """Friendly taps ordered from shallow to deep, with shapes at this input size."""
        model, nodes = self._graph
        friendly = dict(self.scheme.nodes(model))
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if linears and self.scheme.adds_logits:
            friendly["logits"] = linears[-1]
            if self.scheme.adds_pooled:  # the standard embedding feeds the classifier: the node before it
                friendly["pooled"] = nodes[last_node(linears[-1], nodes) - 1]
        known = {t for t, node in friendly.items() if node in nodes or any(n.startswith(node + ".") for n in nodes)}
        order = sorted(known, key=lambda t: last_node(friendly[t], nodes))
        shapes = self._shapes({friendly[t] for t in order})
        return {t: self.layout(Tap(t, friendly[t], shapes[friendly[t]], last_node(friendly[t], nodes)))
                for t in order}

    def layout(self, tap: Tap) -> Tap:
        """The tap with the layout its node returns: a vision transformer's token sequences (shape
        becomes the patch grid's (C, H, W)) and channels-last maps; others unchanged."""
        model = self._graph[0]
        tokens = self.source.token_grid(model)
        if tokens and len(tap.shape) == 2 and tap.shape[0] == tokens[0] + tokens[1] * tokens[2]:
            return replace(tap, shape=(tap.shape[1], tokens[1], tokens[2]), layout="tokens", prefix=tokens[0])
        if len(tap.shape) == 3 and self.source.channels_last(model, tap):  # (H, W, C) before a permute
            height, width, channels = tap.shape
            return replace(tap, shape=(channels, height, width), layout="nhwc")
        return tap

    @property
    def default_tap(self) -> str:
        """The standard embedding its family declares (vgg fc7, resnet avgpool, others pooled)."""
        return self.scheme.standard if self.scheme.standard in self.taps else list(self.taps)[-1]

    def tap(self, name: str) -> Tap:
        """A friendly tap, or a raw graph node name, resolved with its shape."""
        if name in self.taps:
            return self.taps[name]
        depth = node_depth(name, self._graph[1], self.source.name, list(self.taps))
        return self.layout(Tap(name, name, self._shapes({name})[name], depth))

    def node_names(self) -> list[str]:
        return list(self._graph[1])

    # ------------------------------------------------------------ shapes
    def _shapes(self, nodes: set[str]) -> dict[str, tuple[int, ...]]:
        try:
            return self._trace(nodes, self.source.input_size)
        except (RuntimeError, AssertionError, ValueError) as exc:  # too small, or a fixed-size model
            raise UsageError(f"{self.source.name} cannot take {self.source.input_size}px images "
                             f"({str(exc).strip().splitlines()[0]}); {self._sizes_hint()}") from None

    def _trace(self, nodes: set[str], size: int) -> dict[str, tuple[int, ...]]:
        model, _ = self._graph
        extractor = self.source.feature_graph(model, {n: n for n in nodes})
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

        default = int(self.source.transform().crop_size[0]) if self.source.image_size is None else DEFAULT_IMAGE_SIZE
        if not works(default):
            return "use its default size (no --image-size)"
        if not works(default - 1) and not works(default + 1):
            return f"it takes --image-size {default} only"
        lo, hi = 1, default  # works(hi); find the smallest size that works
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if works(mid) else (mid + 1, hi)
        return f"use --image-size {lo} or more"
