"""Reduce a spatial tap (B, C, H, W) to a vector (B, D); vector taps pass through.

Every method has a fixed grid, so D depends only on C (never on image size):
early high-resolution taps stay as small as their channel count allows.
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
}
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


def is_spatial(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3
