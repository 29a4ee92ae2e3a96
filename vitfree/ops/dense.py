"""The ``dense`` backend, the reference: PyTorch SDPA with the whole window mask.

Cost and memory are O(T^2) per head whatever the windows are; every faster backend is tested
against it.  The mask goes to SDPA as an additive bias (0 inside windows, -inf outside) in the
query's dtype, made once per (windows, prefix, device, dtype): a boolean mask would be turned
into a new float T x T tensor on every call and kept for the backward.  A caller's mask is
added on top, and so is a position bias (:mod:`vitfree.ops.bias`), materialised whole.  On a
small grid, where most pairs are inside the windows anyway, this is the fastest exact path on
many CPUs.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..windows import LayerWindows
from .backend import Backend, Plan, Query
from .bias import PositionBias, dense_position_bias
from .eager import window_bias

__all__ = ['DenseBackend', 'dense_window_attention', 'DENSE_MASK_WEIGHT']

# reading one bias element costs about this many pair-channels of SDPA's work (CPU fit)
DENSE_MASK_WEIGHT = 24


def _caller_bias(attn_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(
            ~attn_mask, float('-inf'))
    return attn_mask.to(dtype)


class DenseBackend(Backend):
    name = 'dense'
    description = 'PyTorch SDPA with the dense window mask as a cached bias; O(T^2); the reference'
    takes_caller_mask = True
    takes_bias = True

    def prepare(self, windows: LayerWindows, query: Query) -> Any:
        return window_bias(windows, query.prefix, query.device, query.dtype)

    def work(self, query: Query, windows: LayerWindows) -> float:
        t2 = query.tokens ** 2
        return float(t2 * (query.batch_heads * query.head_dim + DENSE_MASK_WEIGHT))

    def run(self, plan: Plan, q, k, v, scale, dropout_p=0.0, attn_mask=None, probs_hook=None,
            bias: Optional[PositionBias] = None) -> torch.Tensor:
        mask = plan.data
        if attn_mask is not None:
            mask = mask + _caller_bias(attn_mask, mask.dtype)
        if bias is not None:  # SDPA's gradient for its mask carries the bias's gradient
            mask = mask + dense_position_bias(bias, plan.query.grid, plan.query.prefix, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


BACKENDS = (DenseBackend(),)


def dense_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: LayerWindows,
                           num_prefix_tokens: int = 0, scale: Optional[float] = None,
                           dropout_p: float = 0.0) -> torch.Tensor:
    """Windowed attention on ``(B, heads, T, head_dim)`` tensors through the ``dense`` backend."""
    from .dispatch import window_attention
    return window_attention(q, k, v, windows, num_prefix_tokens, scale, dropout_p, backend='dense')
