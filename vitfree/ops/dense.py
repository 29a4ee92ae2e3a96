"""Reference backend: PyTorch SDPA with the dense window mask.

Cost and memory are O(T^2) per head whatever the windows are; every faster backend is tested
against this one.  The mask goes to SDPA as an additive bias (0 inside windows, -inf outside)
in the query's dtype, built once per (prefix, device, dtype) in the windows' cache: a boolean
mask would be converted to a new float T x T tensor on every call and kept for the backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..windows import LayerWindows

__all__ = ['dense_window_attention', 'dense_prepare']


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
    bias = windows.bias(num_prefix_tokens, q.device, _sdpa_dtype(q))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


def _sdpa_dtype(q: torch.Tensor) -> torch.dtype:
    dev = q.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype


def dense_prepare(windows: LayerWindows, num_prefix_tokens: int, device: torch.device, dtype: torch.dtype) -> None:
    windows.bias(num_prefix_tokens, device, dtype)
