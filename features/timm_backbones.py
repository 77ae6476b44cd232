"""timm backbones: ``--backbone timm:NAME`` for any model in ``timm.list_models()``.

The same :class:`features.backbones.Backbone` interface over timm's registry: weights from
timm's own resolution (its pretrained tag, from the Hugging Face hub where there is
internet), ``none`` or a local ``.safetensors``/``.pth`` state dict; preprocessing from the
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
import pickle
from dataclasses import replace
from functools import cache
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from .backbones import Backbone, TapScheme, WeightsChoice, register_source, register_tap_scheme
from .errors import TapsError, UsageError
from .files import file_sha256

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


register_tap_scheme(TapScheme(  # every timm model declares its features (timm's FeatureInfo)
    "timm", lambda name, model: name.startswith(f"{PREFIX}:") and bool(getattr(model, "feature_info", None)),
    _stage_nodes, "pooled"))


@register_source(PREFIX)
class TimmBackbone(Backbone):
    """A timm model by ``timm:NAME``, with timm's weights, preprocessing and feature stages."""

    @property
    def model_name(self) -> str:
        return self.name.split(":", 1)[1]

    @staticmethod
    def check_name(name: str) -> None:
        model = name.split(":", 1)[1]
        if model not in timm_names():
            close = difflib.get_close_matches(model, sorted(timm_names()), n=5, cutoff=0.6)
            hint = f"close matches: {', '.join(f'timm:{c}' for c in close)}" if close else \
                "see timm.list_models() for the valid names"
            raise UsageError(f"unknown timm model {model!r}; {hint}")

    # ------------------------------------------------------------ weights
    def _resolve_weights(self, spec: str) -> WeightsChoice:
        if spec is None or spec.lower() in ("none", "random"):
            return WeightsChoice(None, None, "none")
        if spec.endswith((".pth", ".pt", ".safetensors")) or Path(spec).is_file():
            path = Path(spec)
            if not path.is_file():
                raise UsageError(f"weights file {path} does not exist; pass an existing .safetensors or .pth state dict")
            digest = file_sha256(path)
            return WeightsChoice(None, path.resolve(), f"file:{path.name}:{digest[:16]}", digest)
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

    def check_weights(self) -> None:
        if self.weights.hub is not None:
            self.build()

    def build(self) -> nn.Module:
        """The frozen model in eval mode with its weights loaded (on CPU)."""
        w = self.weights
        if w.hub is not None:
            offline = False
            try:
                with _offline_unless_reachable() as offline:
                    model = self._create(w.hub, pretrained=True)
            except Exception as exc:  # hub and network errors come in many types
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if offline:
                    reason = "the hub cannot be reached from here"
                raise TapsError(f"weights {w.spec} are not cached and could not be downloaded ({reason}); download "
                                f"them where there is internet and pass --weights FILE (.safetensors or .pth), "
                                f"or pass --weights none") from None
        else:
            with torch.random.fork_rng(devices=[]):  # seeded: weights=none files are reproducible
                torch.manual_seed(0)
                model = self._create(self.model_name, pretrained=False)
            if w.path is not None:
                model.load_state_dict(self._state_dict(w.path, model))
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    def _state_dict(self, path: Path, model: nn.Module) -> dict:
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UsageError(f"weights file {path} holds more than tensors ({str(exc).splitlines()[0]}); it is loaded "
                             f"with weights_only=True, which refuses code: pass a plain state dict") from None
        except Exception as exc:
            raise UsageError(f"weights file {path} is not a state dict ({str(exc).splitlines()[0]}); pass a "
                             f".safetensors or .pth state dict") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        want = model.state_dict()
        missing = [k for k in want if k not in state]
        unexpected = [k for k in state if k not in want]
        if missing or unexpected:
            raise UsageError(f"weights file {path} does not fit timm:{self.model_name} (missing "
                             f"{', '.join(missing[:3]) or 'none'}; unexpected {', '.join(unexpected[:3]) or 'none'}); "
                             f"pass a timm:{self.model_name} state dict")
        return state

    def spec_args(self) -> tuple[str, str, int | None]:
        w = self.weights
        weights = str(w.path) if w.path else (w.hub.split(".", 1)[1] if w.hub else "none")
        return self.name, weights, self.image_size

    # ------------------------------------------------------------ preprocessing and graph
    def preset(self) -> ImageClassification:
        """timm's eval preprocessing from the pretrained config, as a torchvision preset."""
        config = _timm().data.resolve_model_data_config(self._graph[0])
        size = int(config["input_size"][-1])
        return ImageClassification(crop_size=size, resize_size=math.floor(size / config["crop_pct"]),
                                   mean=config["mean"], std=config["std"],
                                   interpolation=InterpolationMode(config["interpolation"]))

    def token_grid(self) -> tuple[int, int, int] | None:
        model = self._graph[0]
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is None or not hasattr(model, "num_prefix_tokens"):
            return None
        return int(model.num_prefix_tokens), int(grid[0]), int(grid[1])

    def tap_layout(self, tap):
        """As torchvision's, and maps of models that declare channels-last output (timm's Swin:
        ``output_fmt == "NHWC"``) are permuted before pooling."""
        tap = super().tap_layout(tap)
        if len(tap.shape) == 3 and tap.layout == "map" and getattr(self._graph[0], "output_fmt", "NCHW") == "NHWC":
            height, width, channels = tap.shape
            return replace(tap, shape=(channels, height, width), layout="nhwc")
        return tap

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

    def feature_graph(self, model: nn.Module, nodes: dict[str, str]) -> nn.Module:
        from timm.layers import create_feature_extractor
        return create_feature_extractor(model, nodes)

    def graph_nodes(self, model: nn.Module) -> list[str]:
        from timm.layers import get_graph_node_names
        return get_graph_node_names(model)[1]


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
