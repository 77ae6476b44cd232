"""Reduce a spatial tap (B, C, H, W) to a vector (B, D); vector taps pass through.

Each pooling is one :class:`Pooling` record, registered once (:func:`register_pooling`): it owns
its name, its embedding size (a fixed multiple of C, so D never depends on the image size and
early high-resolution taps stay as small as their channel count allows), what it computes, and
whether it takes a transformer's class token instead of the feature map. Every table of valid
values (the CLI's ``--pool`` choices, ``taps list taps`` columns) is read from the registry.

Transformer taps come in other layouts, converted first (:func:`pool_tap`): a token
sequence (B, prefix + H*W, C) has its patch tokens reshaped to their (B, C, H, W) grid
(``avg`` is then the mean of the patch tokens) and offers ``cls``, its first (class)
token; a channels-last map (B, H, W, C) (Swin) is permuted to (B, C, H, W).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .registry import Registry

if TYPE_CHECKING:  # torch is imported where a tensor is pooled: `taps --help` and `taps info` never need it
    import torch


@dataclass(frozen=True)
class Pooling:
    """One way of pooling a spatial tap: ``reduce`` maps (B, C, H, W) to (B, multiplier * C)."""

    name: str
    multiplier: int
    reduce: Callable[[torch.Tensor], torch.Tensor]
    description: str
    class_token: bool = False  # takes a token tap's class token instead of pooling its grid


POOLING_REGISTRY: Registry[Pooling] = Registry("pooling")
register_pooling = POOLING_REGISTRY.register
get_pooling = POOLING_REGISTRY.lookup


def _global_avg(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


def _global_max(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=(2, 3))


def _avgmax(x: torch.Tensor) -> torch.Tensor:
    import torch
    return torch.cat([_global_avg(x), _global_max(x)], dim=1)


def _pyramid(x: torch.Tensor) -> torch.Tensor:
    import torch
    import torch.nn.functional as F
    return torch.cat([_global_avg(x), F.adaptive_avg_pool2d(x, 2).flatten(1)], dim=1)


def _avgstd(x: torch.Tensor) -> torch.Tensor:
    import torch
    mean = x.mean(dim=(2, 3), keepdim=True)  # spelled out (not torch.std) so every exported runtime runs it
    return torch.cat([mean.flatten(1), (x - mean).pow(2).mean(dim=(2, 3)).sqrt()], dim=1)


def _no_grid(x: torch.Tensor) -> torch.Tensor:
    raise ValueError("cls pooling needs a token tap with a class token")


DEFAULT_POOLING = register_pooling(Pooling("avg", 1, _global_avg, "global average: the standard embedding")).name
register_pooling(Pooling("max", 1, _global_max, "global max: the strongest response of each channel"))
register_pooling(Pooling("avgmax", 2, _avgmax, "global average and max, concatenated"))
register_pooling(Pooling("pyramid", 5, _pyramid,
                         "spatial pyramid: 1x1 + 2x2 average cells (channel-major), keeps coarse layout"))
register_pooling(Pooling("gem", 1, lambda x: x.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3),
                         "generalised mean, p=3 (Radenovic et al.): between avg and max; negatives count as 0"))
register_pooling(Pooling("avgstd", 2, _avgstd, "each channel's spatial mean and standard deviation, concatenated: "
                                               "first- and second-order statistics, a texture descriptor"))
register_pooling(Pooling("cls", 1, _no_grid, "a transformer block's class token", class_token=True))
POOLINGS = tuple(POOLING_REGISTRY)  # in the order help text lists them
LAYOUTS = ("map", "tokens", "nhwc")  # how a tap's node returns it (see pool_tap)


def check_pooling(method: str) -> None:
    get_pooling(method)


def poolable(shape: tuple[int, ...]) -> bool:
    """A feature map (C, H, W) or a vector (D,); token sequences (N, D) are not."""
    return len(shape) in (1, 3)


def pooled_dim(shape: tuple[int, ...], method: str) -> int:
    """Embedding size of a tap whose per-sample output shape is ``shape`` (C,H,W) or (D,)."""
    pooling = get_pooling(method)
    if len(shape) == 1:
        return int(shape[0])
    return pooling.multiplier * int(shape[0])


def pool(x: torch.Tensor, method: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, D) by ``method``; (B, D) unchanged; other ranks flattened."""
    if x.dim() == 2:
        return x
    if x.dim() != 4:
        return x.flatten(1)
    return get_pooling(method).reduce(x)


def pool_tap(x: torch.Tensor, method: str, layout: str = "map", prefix: int = 0,
             grid: tuple[int, int] | None = None) -> torch.Tensor:
    """A tap's raw node output -> (B, D): token sequences and channels-last maps are brought to
    (B, C, H, W) first (``grid`` is the token grid's H, W); ``cls`` takes the class token.
    Vector taps (B, D) pass through whatever the method."""
    if x.dim() == 2:
        return x
    pooling = get_pooling(method)
    if layout == "tokens":
        if pooling.class_token:
            return x[:, 0]
        x = x[:, prefix:].transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
    elif layout == "nhwc":
        x = x.permute(0, 3, 1, 2)
    return pool(x, method)


def is_spatial(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3


UNPOOLED = "none"  # what a vector tap records as its pooling: it is taken as it is


def recorded_pooling(shape: tuple[int, ...], method: str) -> str:
    """The pooling a tap of this shape is recorded with: ``method`` for a map, :data:`UNPOOLED` for a vector."""
    return method if is_spatial(shape) else UNPOOLED


def matches_pooling(recorded: str, method: str) -> bool:
    """Whether a tap recorded with ``recorded`` serves a run that pools by ``method`` (vectors serve every run)."""
    return recorded in (method, UNPOOLED)
