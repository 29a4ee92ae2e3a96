"""The ``global`` backend: plain SDPA without a mask, for windows that cover the whole grid.

A window spec may give a block windows so large that, clipped at the border, every patch sees
every patch (for example a radius-5 spec resized to a small image).  Such a block is global in
all but name, and the unmasked fused kernel is the fastest exact way to run it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..windows import LayerWindows

__all__ = ['covers_grid', 'full_attention', 'full_supports']


def covers_grid(windows: LayerWindows) -> bool:
    """True when every patch's window (every head's, too) covers the whole grid."""
    def make():
        h, w = windows.grid
        e = windows.extents
        ys = np.arange(h).reshape(h, 1)
        xs = np.arange(w).reshape(1, w)
        return bool(np.all(e[..., 0] >= ys) and np.all(e[..., 1] >= h - 1 - ys)
                    and np.all(e[..., 2] >= xs) and np.all(e[..., 3] >= w - 1 - xs))
    return windows.cached(('full.covers',), make)


def full_supports(q: torch.Tensor, windows: LayerWindows) -> Optional[str]:
    if not covers_grid(windows):
        return (f'windows do not cover the whole {windows.grid[0]}x{windows.grid[1]} grid (max extents '
                f'{windows.max_extents()}), so an unmasked kernel would be wrong; use tiled or dense')
    return None


def full_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        windows: Optional[LayerWindows] = None,
        num_prefix_tokens: int = 0,
        scale: Optional[float] = None,
        dropout_p: float = 0.0,
) -> torch.Tensor:
    """Unconstrained attention (``windows`` must cover the grid; it is not read otherwise)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
