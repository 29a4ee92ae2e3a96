"""Reference backend: PyTorch SDPA with the dense boolean window mask.

Cost and memory are O(T^2) per head whatever the windows are; every faster backend is tested
against this one.
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
    mask = windows.mask(num_prefix_tokens, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
