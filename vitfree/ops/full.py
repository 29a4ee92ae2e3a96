"""The ``global`` backend: plain SDPA without a window mask, for windows that cover the whole grid.

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
from .backend import Backend, Plan, PreparedCache, Query
from .bias import PositionBias, dense_position_bias

__all__ = ['GlobalBackend', 'covers_grid', 'full_attention']

_CACHE = PreparedCache('global')


def covers_grid(windows: LayerWindows) -> bool:
    """True when every patch's window (every head's, too) covers the whole grid."""
    def make() -> bool:
        h, w = windows.grid
        e = windows.extents
        ys = np.arange(h).reshape(h, 1)
        xs = np.arange(w).reshape(1, w)
        return bool(np.all(e[..., 0] >= ys) and np.all(e[..., 1] >= h - 1 - ys)
                    and np.all(e[..., 2] >= xs) and np.all(e[..., 3] >= w - 1 - xs))
    return _CACHE.get(windows, 'covers', make)


class GlobalBackend(Backend):
    name = 'global'
    description = 'unmasked SDPA; only for windows that cover the whole grid'
    takes_caller_mask = True
    takes_bias = True

    def supports(self, query: Query, windows: LayerWindows) -> Optional[str]:
        if not covers_grid(windows):
            return (f'the windows do not cover the whole {windows.grid[0]}x{windows.grid[1]} grid (max extents '
                    f'{windows.max_extents()}), so an unmasked kernel would be wrong')
        return None

    def work(self, query: Query, windows: LayerWindows) -> float:
        return float(query.batch_heads * query.head_dim * query.tokens ** 2)

    def run(self, plan: Plan, q, k, v, scale, dropout_p=0.0, attn_mask=None, probs_hook=None,
            bias: Optional[PositionBias] = None) -> torch.Tensor:
        if bias is not None:  # the whole bias, with a caller's mask on top
            pos = dense_position_bias(bias, plan.query.grid, plan.query.prefix, q)
            if attn_mask is not None:
                pos = pos.masked_fill(~attn_mask, float('-inf')) if attn_mask.dtype == torch.bool else pos + attn_mask
            attn_mask = pos
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


BACKENDS = (GlobalBackend(),)


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: LayerWindows,
                   num_prefix_tokens: int = 0, scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Unmasked attention through the ``global`` backend (``windows`` must cover the grid)."""
    from .dispatch import window_attention
    return window_attention(q, k, v, windows, num_prefix_tokens, scale, dropout_p, backend='global')
