"""Explicit-softmax backend: the attention probabilities are formed in memory, so analysis
code can read them (``return_attn=True``).  Same result as ``dense``, slower."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..windows import LayerWindows


def eager_attention_probs(
        q: torch.Tensor,
        k: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
) -> torch.Tensor:
    """Post-softmax attention ``softmax(q k^T * scale)`` with disallowed keys removed."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits.masked_fill(~mask, float('-inf'))
    return logits.softmax(dim=-1)


def eager_window_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        windows: Optional[LayerWindows],
        num_prefix_tokens: int = 0,
        scale: Optional[float] = None,
        dropout_p: float = 0.0,
        return_attn: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Windowed attention with an explicit softmax; ``windows=None`` means unconstrained.

    With ``return_attn=True`` also returns the post-softmax probabilities ``(B, heads, T, T)``
    (before dropout).
    """
    mask = None if windows is None else windows.mask(num_prefix_tokens, q.device)
    attn = eager_attention_probs(q, k, mask, scale)
    out = F.dropout(attn, p=dropout_p) if dropout_p > 0 else attn
    out = out @ v
    return (out, attn) if return_attn else out
