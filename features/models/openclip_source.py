"""``--backbone openclip:ARCH/PRETRAINED``: open_clip's image towers (the ``openclip`` extra).

The tower is open_clip's ``model.visual`` split in two (:class:`ImageTower`): ``visual``, which
ends at the pooled image embedding (the tower's own projection taken out), and ``projection``,
the matrix product open_clip applies next. So ``pooled`` (before the projection) and ``embed``
(after it: what ``encode_image`` returns, and what zero-shot classifiers compare with text) are
both graph nodes, and every transformer block is a tap (``block<i>``: its token sequence, pooled
on the patch grid or by the class token as for timm's ViTs). Preprocessing is open_clip's own
(its pretrained config's mean, std, interpolation and size). :meth:`OpenClipSource.text_classifier`
builds the zero-shot classifier from the text tower of the same weights (``--clf zeroshot``).
CLIP's CNN towers (``RN50``…, open_clip's ModifiedResNet) give ``stem``, ``layer1``…``layer4`` and
``embed`` (the attention pooling, whose projection is inside it).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from ..errors import UsageError
from .hub import cached_checkpoint, from_hub
from .schemes import TapScheme
from .source import CardFiles, ModelSource, WeightsChoice, load_state_file, local_weights, register_source, seeded

PREFIX = "openclip"


@cache
def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise UsageError("openclip: backbones need open_clip: pip install -e '.[openclip]'") from None
    return open_clip


@contextmanager
def _quiet():
    """open_clip logs a warning for every model built without weights (the random ones taps builds on purpose)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


class Projection(nn.Module):
    """``x @ weight``: open_clip's image projection, as a module so that its output is a tap."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class ImageTower(nn.Module):
    """open_clip's image tower: ``visual`` up to the pooled embedding (named by ``pooled``, an
    identity: the last node traced inside ``visual`` is its patch tokens), then ``projection``."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.projection = Projection(visual.proj)
        visual.proj = None  # open_clip's forward then returns the pooled embedding unprojected
        self.visual = visual
        self.pooled = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.pooled(self.visual(x)))


def _nodes(tower: nn.Module) -> dict[str, str]:
    blocks = tower.visual.transformer.resblocks
    return {**{f"block{i}": f"visual.transformer.resblocks.{i}" for i in range(len(blocks))},
            "pooled": "pooled", "embed": "projection"}


OPENCLIP_VIT = TapScheme("openclip-vit", lambda name, model: isinstance(model, ImageTower), _nodes, "embed",
                         adds_pooled=False, adds_logits=False)
# CLIP's ModifiedResNet: the stem, four stages, and the attention pooling, whose output is the image
# embedding (its projection is inside the attention, so there is no separate ``pooled``)
OPENCLIP_RESNET = TapScheme(
    "openclip-resnet", lambda name, model: hasattr(model, "attnpool"),
    lambda model: {"stem": "avgpool", **{f"layer{i}": f"layer{i}" for i in range(1, 5)}, "embed": "attnpool"},
    "embed", adds_pooled=False, adds_logits=False)


@register_source(PREFIX)
class OpenClipSource(ModelSource):
    """``openclip:ARCH/PRETRAINED`` (``PRETRAINED`` is one of ``open_clip.list_pretrained()``'s tags)."""

    @property
    def arch(self) -> str:
        return self.name.split(":", 1)[1].split("/")[0]

    @property
    def tag(self) -> str | None:
        rest = self.name.split(":", 1)[1]
        return rest.split("/", 1)[1] if "/" in rest else None

    @classmethod
    def check_name(cls, name: str) -> None:
        open_clip = _open_clip()
        rest = name.split(":", 1)[1]
        arch, _, tag = rest.partition("/")
        if arch not in open_clip.list_models():
            raise UsageError(f"unknown open_clip model {arch!r}; see open_clip.list_models() (e.g. ViT-B-32)")
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag and tag not in tags:
            raise UsageError(f"open_clip has no weights {tag!r} for {arch}; valid: {', '.join(tags) or 'none'}")

    @classmethod
    def listing(cls) -> str:
        try:
            return (f"openclip:ARCH/PRETRAINED for open_clip's image towers ({len(_open_clip().list_pretrained())} "
                    f"pretrained pairs), e.g. openclip:ViT-B-32/openai")
        except UsageError:
            return "openclip:ARCH/PRETRAINED needs open_clip: pip install -e '.[openclip]'"

    def resolve_weights(self, spec: str) -> WeightsChoice:
        local = local_weights(spec, (".pth", ".pt", ".safetensors", ".bin"), "open_clip")
        if local is not None:
            return local
        tag = self.tag if spec.lower() in ("auto", "default") else spec
        if not tag:
            raise UsageError(f"openclip:{self.arch} names no pretrained weights; write openclip:{self.arch}/TAG "
                             f"(one of {', '.join(_open_clip().list_pretrained_tags_by_model(self.arch))}) or pass "
                             f"--weights none")
        if tag not in _open_clip().list_pretrained_tags_by_model(self.arch):
            raise UsageError(f"open_clip has no weights {tag!r} for {self.arch}")
        return WeightsChoice(None, None, f"{PREFIX}:{self.arch}/{tag}", hub=tag)

    def weights_arg(self) -> str:
        return self.weights.hub or (str(self.weights.path) if self.weights.path else "none")

    def _config(self) -> dict:
        return _open_clip().get_pretrained_cfg(self.arch, self.tag or "") or {}

    def _clip(self, pretrained: str | None) -> nn.Module:
        """open_clip's whole model (both towers), with the pretrained config's activation."""
        with _quiet():
            return _open_clip().create_model(self.arch, pretrained=pretrained,
                                             force_quick_gelu=bool(self._config().get("quick_gelu")),
                                             force_image_size=self.image_size)

    def _create(self, pretrained: str | None) -> nn.Module:
        model = self._clip(pretrained)
        if hasattr(model.visual, "transformer"):
            return ImageTower(model.visual)
        if hasattr(model.visual, "attnpool"):  # CLIP's modified ResNets: stages, then attention pooling
            return model.visual
        raise UsageError(f"openclip:{self.arch}'s image tower ({type(model.visual).__name__}) is not wired in taps; "
                         f"use a ViT or ModifiedResNet tower (e.g. openclip:ViT-B-32/openai, openclip:RN50/openai)")

    def random_model(self) -> nn.Module:
        return self._create(None)

    def text_classifier(self, classnames: list[str], templates: list[str]) -> torch.Tensor:
        """open_clip's zero-shot classifier for these class names and prompt templates (``{}`` stands
        for the class name): each class's mean normalised text embedding, (embedding dim, classes),
        from the text tower of the same weights as the image tower (seed 0 for ``--weights none``)."""
        open_clip = _open_clip()
        if self.weights.path is not None:
            raise UsageError("a zero-shot classifier needs the text tower, which a local image-tower file lacks; "
                             "use the open_clip tag the file came from")
        model = from_hub(lambda: self._clip(self.weights.hub), self._refusal) if self.weights.hub else \
            seeded(lambda: self._clip(None))
        with torch.inference_mode():
            return open_clip.build_zero_shot_classifier(
                model.eval(), open_clip.get_tokenizer(self.arch), classnames, list(templates),
                device="cpu", use_tqdm=False)

    def download(self) -> nn.Module | None:
        if self.weights.hub is None:
            return None
        return from_hub(lambda: self._create(self.weights.hub), self._refusal)

    def _refusal(self, reason: str) -> str:
        return (f"weights {self.weights.spec} are not cached and could not be downloaded ({reason}); download them "
                f"where there is internet (open_clip caches them under HF_HOME), or pass --weights none")

    def check_weights(self) -> None:
        if self.weights.hub is not None:
            self.build()

    def card_files(self) -> CardFiles | None:
        return self.hub_card_files(self._hub_checkpoint)

    def _hub_checkpoint(self, tag: str) -> str | None:
        """The Hugging Face cache's copy of what open_clip downloads for ``tag``: its hub entry is ``org/name/``
        (open_clip's default file) or ``org/name/file``, each looked for as safetensors first; None for a URL."""
        open_clip = _open_clip()
        repo, name = os.path.split(open_clip.get_pretrained_cfg(self.arch, tag).get("hf_hub", ""))
        name = name or open_clip.pretrained.HF_WEIGHTS_NAME
        safe = [open_clip.pretrained.HF_SAFE_WEIGHTS_NAME] if name == open_clip.pretrained.HF_WEIGHTS_NAME else \
            [name[:-4] + ".safetensors"] if name.endswith((".bin", ".pth")) else []
        return cached_checkpoint(repo, [*safe, name]) if repo else None

    def load_file(self, model: nn.Module, path: Path) -> None:
        """A whole open_clip model's state dict (its ``visual.*`` tensors are kept) or the tower's."""
        state = load_state_file(path, "open_clip")
        state = {("projection.weight" if k == "visual.proj" else k): v for k, v in state.items()
                 if k.startswith("visual.") or k == "projection.weight"}
        if not isinstance(model, ImageTower):  # a ResNet tower is open_clip's visual module itself
            state = {k.removeprefix("visual."): v for k, v in state.items()}
        missing = [k for k in model.state_dict() if k not in state]
        if missing:
            raise UsageError(f"weights file {path} does not fit openclip:{self.arch} (missing {', '.join(missing[:3])}); "
                             f"pass an open_clip {self.arch} state dict")
        model.load_state_dict(state)

    def preset(self) -> ImageClassification:
        """open_clip's eval preprocessing: the shorter side to the tower's size, the centre crop, its mean/std."""
        config = self._config()
        size = getattr(self.meta, "visual", self.meta).image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean = config.get("mean") or _open_clip().OPENAI_DATASET_MEAN
        std = config.get("std") or _open_clip().OPENAI_DATASET_STD
        return ImageClassification(crop_size=size, resize_size=size, mean=tuple(mean), std=tuple(std),
                                   interpolation=InterpolationMode(config.get("interpolation", "bicubic")))

    def architecture(self) -> nn.Module:
        return self._create(None).eval()

    def tap_scheme(self, model: nn.Module) -> TapScheme:
        return OPENCLIP_VIT if OPENCLIP_VIT.covers(self.name, model) else OPENCLIP_RESNET

    def token_grid(self, model: nn.Module) -> tuple[int, int, int] | None:
        if not isinstance(model, ImageTower):
            return None
        grid = model.visual.grid_size
        return 1, int(grid[0]), int(grid[1])
