"""Reduce a spatial tap (B, C, H, W) to a vector (B, D); vector taps pass through.

Every method has a fixed grid, so D depends only on C (never on image size):
early high-resolution taps stay as small as their channel count allows.

Transformer taps come in other layouts, converted first (:func:`pool_tap`): a token
sequence (B, prefix + H*W, C) has its patch tokens reshaped to their (B, C, H, W) grid
(``avg`` is then the mean of the patch tokens) and offers ``cls``, its first (class)
token; a channels-last map (B, H, W, C) (Swin) is permuted to (B, C, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import choose

# D = multiplier x C for a spatial tap.
MULTIPLIER = {
    "avg": 1,      # global average: the standard embedding
    "max": 1,      # global max: keeps the strongest response of each channel
    "avgmax": 2,   # both, concatenated
    "pyramid": 5,  # spatial pyramid: 1x1 + 2x2 average cells, keeps coarse layout
    "cls": 1,      # token taps only: the class token
}
LAYOUTS = ("map", "tokens", "nhwc")  # how a tap's node returns it (see pool_tap)
POOLINGS = tuple(MULTIPLIER)


def check_pooling(method: str) -> None:
    choose("pooling", method, POOLINGS)


def poolable(shape: tuple[int, ...]) -> bool:
    """A feature map (C, H, W) or a vector (D,); token sequences (N, D) are not."""
    return len(shape) in (1, 3)


def pooled_dim(shape: tuple[int, ...], method: str) -> int:
    """Embedding size of a tap whose per-sample output shape is ``shape`` (C,H,W) or (D,)."""
    check_pooling(method)
    if len(shape) == 1:
        return int(shape[0])
    return MULTIPLIER[method] * int(shape[0])


def pool(x: torch.Tensor, method: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, D) by ``method``; (B, D) unchanged; other ranks flattened."""
    if x.dim() == 2:
        return x
    if x.dim() != 4:
        return x.flatten(1)
    if method == "avg":
        return x.mean(dim=(2, 3))
    if method == "max":
        return x.amax(dim=(2, 3))
    if method == "avgmax":
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
    if method == "pyramid":
        cells = F.adaptive_avg_pool2d(x, 2).flatten(1)  # (B, 4C), channel-major cells
        return torch.cat([x.mean(dim=(2, 3)), cells], dim=1)
    check_pooling(method)
    raise AssertionError("unreachable")


def pool_tap(x: torch.Tensor, method: str, layout: str = "map", prefix: int = 0,
             grid: tuple[int, int] | None = None) -> torch.Tensor:
    """A tap's raw node output -> (B, D): token sequences and channels-last maps are brought to
    (B, C, H, W) first (``grid`` is the token grid's H, W); ``cls`` takes the class token.
    Vector taps (B, D) pass through whatever the method."""
    if x.dim() == 2:
        return x
    if layout == "tokens":
        if method == "cls":
            return x[:, 0]
        x = x[:, prefix:].transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
    elif layout == "nhwc":
        x = x.permute(0, 3, 1, 2)
    if method == "cls":
        raise ValueError("cls pooling needs a token tap with a class token")
    return pool(x, method)


def is_spatial(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3
