"""Reference backend: PyTorch SDPA with the dense window mask.

Cost and memory are O(T^2) per head whatever the windows are; every faster backend is tested
against this one.  The mask is handed to SDPA as an additive bias (0 inside windows, -inf
outside) in the query's dtype, built once per (prefix, device, dtype) and cached: a boolean
mask would be converted to a new float T x T tensor on every call and kept for the backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..windows import LayerWindows


def dense_window_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        windows: LayerWindows,
        num_prefix_tokens: int = 0,
        scale: Optional[float] = None,
        dropout_p: float = 0.0,
) -> torch.Tensor:
    """Windowed attention on ``(B, heads, T, head_dim)`` tensors; returns the same shape."""
    bias = additive_mask(windows, num_prefix_tokens, q.device, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


def additive_mask(windows: LayerWindows, num_prefix_tokens: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """The window mask as a cached additive bias: 0 where attention is allowed, -inf elsewhere."""
    def make() -> torch.Tensor:
        allowed = windows.mask(num_prefix_tokens, device)
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float('-inf'))
    return windows.cached(('dense.bias', num_prefix_tokens, str(device), dtype), make)
