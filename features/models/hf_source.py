"""``--backbone hf:REPO``: Hugging Face image models whose ``AutoModel`` returns ``hidden_states``
(the ``hf`` extra installs transformers). ``REPO`` is a hub id (``google/vit-base-patch16-224``)
or a local folder saved with ``save_pretrained``.

Every hidden state is a tap: ``embeddings`` (``hidden_states[0]``) and ``block<i>`` (the output of
layer i, ``hidden_states[i + 1]``), token sequences pooled on their patch grid or by the class
token as for timm's ViTs, feature maps (ConvNeXt, ResNet…) pooled as maps. The model is wrapped
(:class:`HiddenStates`) so that each hidden state passes through a named identity, and traced
with the transformers model as one leaf: its own code runs as it is, unpruned. Preprocessing
comes from the repo's image processor (size, crop, mean, std, resampling). ``HF_HUB_OFFLINE`` is
respected; weights or configs that are not cached are refused in one line.
"""

from __future__ import annotations

from functools import cache, cached_property
from pathlib import Path

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from ..errors import UsageError
from .hub import from_hub
from .schemes import TapScheme
from .source import CardFiles, ModelSource, WeightsChoice, file_stamp, register_source

PREFIX = "hf"
# PIL's resampling numbers, as image processors record them
RESAMPLING = {0: InterpolationMode.NEAREST, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}


@cache
def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("hf: backbones need transformers: pip install -e '.[hf]'") from None
    transformers.logging.set_verbosity_error()  # no per-load progress bars or notices
    return transformers


class HiddenStates(nn.Module):
    """A transformers model whose hidden states each pass through a named identity (``hidden.<i>``),
    so that they are graph nodes; the output is the last one."""

    def __init__(self, model: nn.Module, states: int):
        super().__init__()
        self.model = model
        self.hidden = nn.ModuleList(nn.Identity() for _ in range(states))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = self.model(pixel_values=x, output_hidden_states=True).hidden_states
        return [self.hidden[i](states[i]) for i in range(len(self.hidden))][-1]


def _nodes(model: nn.Module) -> dict[str, str]:
    return {("embeddings" if i == 0 else f"block{i - 1}"): f"hidden.{i}" for i in range(len(model.hidden))}


def _scheme(model: nn.Module) -> TapScheme:
    return TapScheme("hf-hidden-states", lambda name, m: True, _nodes, f"block{len(model.hidden) - 2}",
                     adds_pooled=False, adds_logits=False)


@register_source(PREFIX)
class HfSource(ModelSource):
    """``hf:REPO``: a hub id or a local ``save_pretrained`` folder."""

    @property
    def repo(self) -> str:
        return self.name.split(":", 1)[1]

    @classmethod
    def check_name(cls, name: str) -> None:
        if not name.split(":", 1)[1].strip():
            raise UsageError("hf: needs a repo, e.g. hf:google/vit-base-patch16-224 or hf:/path/to/saved/model")
        _transformers()

    @classmethod
    def listing(cls) -> str:
        return "hf:REPO for Hugging Face image models whose AutoModel returns hidden_states (a hub id or a folder)"

    def resolve_weights(self, spec: str) -> WeightsChoice:
        if spec.lower() not in ("auto", "default"):
            raise UsageError(f"hf:{self.repo} takes --weights auto (the repo's) or none, not {spec!r}")
        return WeightsChoice(None, None, f"{PREFIX}:{self.repo}", hub=self.repo)

    def weights_arg(self) -> str:
        return "auto" if self.weights.hub else "none"

    def _load(self, call, what: str):
        """A from_pretrained call, offline at once when the hub cannot be reached; one line if it fails."""
        return from_hub(call, lambda reason: f"the {what} of hf:{self.repo} are not cached and could not be downloaded "
                                             f"({reason}); download them where there is internet (cached under "
                                             f"HF_HOME) or pass a local folder")

    @cached_property
    def config(self):
        return self._load(lambda: _transformers().AutoConfig.from_pretrained(self.repo), "config")

    def _wrap(self, model: nn.Module) -> nn.Module:
        layers = getattr(model.config, "num_hidden_layers", None) or len(getattr(model.config, "depths", []))
        if not layers:
            raise UsageError(f"hf:{self.repo} ({type(model).__name__}) declares no hidden layers; pass an image "
                             f"model whose AutoModel returns hidden_states")
        return HiddenStates(model, layers + 1)

    def random_model(self) -> nn.Module:
        return self._wrap(_transformers().AutoModel.from_config(self.config))

    def download(self) -> nn.Module | None:
        if self.weights.hub is None:
            return None
        return self._wrap(self._load(lambda: _transformers().AutoModel.from_pretrained(self.repo), "weights"))

    def check_weights(self) -> None:
        if self.weights.hub is not None:
            self.build()

    def card_files(self) -> CardFiles | None:
        """A local folder's files, stamped (a folder saved again is another model); a hub repo: none."""
        folder = Path(self.repo)
        if not folder.is_dir():
            return None
        files = sorted(str(p.resolve()) for p in folder.iterdir() if p.is_file())
        return CardFiles({p: True for p in files}, tuple(files) if self.weights.hub else (),
                         {p: file_stamp(Path(p)) for p in files})

    def load_file(self, model: nn.Module, path: Path) -> None:
        raise UsageError("hf: backbones take their weights from the repo (or a local save_pretrained folder)")

    def architecture(self) -> nn.Module:
        return self.random_model().eval()

    def preset(self) -> ImageClassification:
        """The repo's image processor as a torchvision preset: the shorter side to its size, the centre
        crop (a processor that resizes to a fixed height and width gets the same on square images)."""
        p = self._load(lambda: _transformers().AutoImageProcessor.from_pretrained(self.repo), "image processor")
        size, crop = dict(p.size or {}), dict(getattr(p, "crop_size", None) or {})
        resize = size.get("shortest_edge") or size.get("height") or 224
        side = crop.get("height") if getattr(p, "do_center_crop", False) and crop else resize
        return ImageClassification(crop_size=int(side), resize_size=int(resize), mean=tuple(p.image_mean),
                                   std=tuple(p.image_std),
                                   interpolation=RESAMPLING.get(int(getattr(p, "resample", 2)), InterpolationMode.BILINEAR))

    def tap_scheme(self, model: nn.Module) -> TapScheme:
        return _scheme(model)

    def feature_graph(self, model: nn.Module, nodes: dict[str, str]) -> nn.Module:
        return create_feature_extractor(model, nodes, tracer_kwargs={"leaf_modules": [type(model.model)]})

    def graph_nodes(self, model: nn.Module) -> list[str]:
        return get_graph_node_names(model, tracer_kwargs={"leaf_modules": [type(model.model)]})[1]

    def token_grid(self, model: nn.Module) -> tuple[int, int, int] | None:
        config = model.model.config
        patch, size = getattr(config, "patch_size", None), getattr(config, "image_size", None)
        if not patch or not size:
            return None
        side = self.input_size // (patch if isinstance(patch, int) else patch[0])
        return 1 + int(getattr(config, "num_register_tokens", 0) or 0), side, side
