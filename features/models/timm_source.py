"""timm backbones: ``--backbone timm:NAME`` for any model in ``timm.list_models()``.

Weights from timm's own resolution (its pretrained tag, from the Hugging Face hub where there
is internet), ``none`` or a local ``.safetensors``/``.pth`` state dict; preprocessing from the
model's pretrained config (``timm.data.resolve_model_data_config``, the geometry timm's
``create_transform`` uses at eval time: resize to ``floor(size / crop_pct)``, centre crop);
graphs traced with timm's own FX helpers (its leaf modules and wrapped functions); friendly
taps from the model's ``feature_info`` (channels and reduction declared once by timm):
``stage1``..``stageN``, plus ``pooled`` (the classifier's input) and ``logits``.

Vision transformers (``patch_embed`` and prefix tokens) get ``block0``..``blockN``; their token
outputs are pooled by :func:`features.pooling.pool_tap` (``cls``, or the patch grid's
``avg``/``max``/``avgmax``/``pyramid``), every requested block from one forward pass.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from functools import cache

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from ..errors import TapsError, UsageError
from .schemes import Tap, TapScheme, tap_scheme
from .source import ModelSource, WeightsChoice, frozen, load_state_file, local_weights, register_source, seeded

PREFIX = "timm"


def _timm():
    try:
        import timm
    except ImportError:
        raise UsageError("timm backbones need timm: pip install -e '.[timm]' (`make install` installs it)") from None
    return timm


@cache
def timm_names() -> frozenset[str]:
    return frozenset(_timm().list_models())


def _stage_nodes(model: nn.Module) -> dict[str, str]:
    """CNNs: ``stage1``..``stageN`` from ``feature_info``; transformers, whose features are their
    blocks (``blocks.i``): ``block0``..``blockN``, as their papers count them."""
    modules = [info["module"] for info in model.feature_info]
    if all(m.startswith("blocks.") for m in modules):
        return {f"block{m.split('.')[1]}": m for m in modules}
    return {f"stage{i + 1}": m for i, m in enumerate(modules)}


FEATURE_INFO = TapScheme("timm", lambda name, model: bool(getattr(model, "feature_info", None)), _stage_nodes,
                         "pooled")


@register_source(PREFIX)
class TimmSource(ModelSource):
    """A timm model by ``timm:NAME``, with timm's weights, preprocessing and feature stages."""

    @property
    def model_name(self) -> str:
        return self.name.split(":", 1)[1]

    @classmethod
    def check_name(cls, name: str) -> None:
        model = name.split(":", 1)[1]
        if model not in timm_names():
            close = difflib.get_close_matches(model, sorted(timm_names()), n=5, cutoff=0.6)
            hint = f"close matches: {', '.join(f'timm:{c}' for c in close)}" if close else \
                "see timm.list_models() for the valid names"
            raise UsageError(f"unknown timm model {model!r}; {hint}")

    @classmethod
    def listing(cls) -> str:
        try:
            return f"timm:NAME for any of the {len(timm_names())} models of timm.list_models(), e.g. timm:resnet18"
        except TapsError:
            return "timm:NAME needs timm: pip install -e '.[timm]'"

    def resolve_weights(self, spec: str) -> WeightsChoice:
        local = local_weights(spec, (".pth", ".pt", ".safetensors"), ".safetensors or .pth")
        if local is not None:
            return local
        tags = [n.split(".", 1)[1] for n in _timm().list_pretrained(f"{self.model_name}.*")]
        if not tags:
            raise UsageError(f"timm:{self.model_name} has no pretrained weights in timm; pass --weights none or a "
                             f"state dict file")
        if spec.lower() in ("auto", "default"):
            tag = _timm().models.get_pretrained_cfg(self.model_name).tag or tags[0]
        elif spec.split(".")[-1] in tags:
            tag = spec.split(".")[-1]
        else:
            raise UsageError(f"unknown weights {spec!r} for timm:{self.model_name}; valid: auto, none, FILE, "
                             f"{', '.join(tags)}")
        return WeightsChoice(None, None, f"timm:{self.model_name}.{tag}", hub=f"{self.model_name}.{tag}")

    def weights_arg(self) -> str:
        w = self.weights
        return str(w.path) if w.path else (w.hub.split(".", 1)[1] if w.hub else "none")

    def check_weights(self) -> None:
        if self.weights.hub is not None:
            self.build()

    def build(self) -> nn.Module:
        w = self.weights
        if w.hub is not None:
            return frozen(self._download(w))
        model = seeded(lambda: self._create(self.model_name, pretrained=False))
        if w.path is not None:
            model.load_state_dict(self._checked(load_state_file(w.path, ".safetensors or .pth"), model, w))
        return frozen(model)

    def _download(self, w: WeightsChoice) -> nn.Module:
        offline = False
        try:
            with _offline_unless_reachable() as offline:
                return self._create(w.hub, pretrained=True)
        except Exception as exc:  # hub and network errors come in many types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if offline:
                reason = "the hub cannot be reached from here"
            raise TapsError(f"weights {w.spec} are not cached and could not be downloaded ({reason}); download "
                            f"them where there is internet and pass --weights FILE (.safetensors or .pth), "
                            f"or pass --weights none") from None

    def _checked(self, state: dict, model: nn.Module, w: WeightsChoice) -> dict:
        want = model.state_dict()
        missing = [k for k in want if k not in state]
        unexpected = [k for k in state if k not in want]
        if missing or unexpected:
            raise UsageError(f"weights file {w.path} does not fit timm:{self.model_name} (missing "
                             f"{', '.join(missing[:3]) or 'none'}; unexpected {', '.join(unexpected[:3]) or 'none'}); "
                             f"pass a timm:{self.model_name} state dict")
        return state

    def preset(self) -> ImageClassification:
        """timm's eval preprocessing from the pretrained config, as a torchvision preset."""
        config = _timm().data.resolve_model_data_config(self.meta)
        size = int(config["input_size"][-1])
        return ImageClassification(crop_size=size, resize_size=math.floor(size / config["crop_pct"]),
                                   mean=config["mean"], std=config["std"],
                                   interpolation=InterpolationMode(config["interpolation"]))

    def _create(self, name: str, pretrained: bool) -> nn.Module:
        """timm's model; with ``--image-size`` a transformer is built for that size (timm resamples
        its position embeddings when it loads pretrained weights). CNNs take any size as they are."""
        timm = _timm()
        if self.image_size is not None:
            try:
                return timm.create_model(name, pretrained=pretrained, img_size=self.image_size)
            except TypeError:  # the model's class has no img_size: a CNN
                pass
        return timm.create_model(name, pretrained=pretrained)

    def architecture(self) -> nn.Module:
        try:
            with torch.device("meta"):
                return self._create(self.model_name, pretrained=False).eval()
        except (NotImplementedError, RuntimeError):
            return self._create(self.model_name, pretrained=False).eval()

    def tap_scheme(self, model: nn.Module) -> TapScheme:
        """Every timm model declares its features (timm's ``FeatureInfo``); the rest get the generic names."""
        return FEATURE_INFO if FEATURE_INFO.covers(self.name, model) else tap_scheme(self.name, model)

    def feature_graph(self, model: nn.Module, nodes: dict[str, str]) -> nn.Module:
        from timm.layers import create_feature_extractor
        return create_feature_extractor(model, nodes)

    def graph_nodes(self, model: nn.Module) -> list[str]:
        from timm.layers import get_graph_node_names
        return get_graph_node_names(model)[1]

    def token_grid(self, model: nn.Module) -> tuple[int, int, int] | None:
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is None or not hasattr(model, "num_prefix_tokens"):
            return None
        return int(model.num_prefix_tokens), int(grid[0]), int(grid[1])

    def channels_last(self, model: nn.Module, tap: Tap) -> bool:
        return getattr(model, "output_fmt", "NCHW") == "NHWC"  # timm's Swin declares channels-last output


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (or the mirror HF_ENDPOINT names) answers a TCP connection within
    ``timeout`` seconds, name lookup included (which has no timeout of its own, hence the thread)."""
    import socket
    import threading
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    reached = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            reached.set()
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout + 0.5)
    return reached.is_set()


@contextlib.contextmanager
def _offline_unless_reachable():
    """Hub downloads in offline mode (cache only) when the hub cannot be reached: without it a missing
    checkpoint costs about a minute of retries and a screen of their messages before failing."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield False
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = False
