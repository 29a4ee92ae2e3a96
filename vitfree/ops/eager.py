"""The ``eager`` backend: explicit softmax, the path whose probabilities pass a hook.

Logits and softmax are computed in fp32 (fp64 for fp64 inputs), whatever the input dtype, with
the window mask (and a caller's mask, and a position bias, :mod:`vitfree.ops.bias`) as an
additive bias; the probabilities then go through ``probs_hook``, which an attention layer sets to its ``attn_drop`` module (an identity outside
training, and the hook point of timm's ``AttentionExtract`` and vitfree's recorder).  It is the
path a layer takes with timm's ``fused_attn = False`` or under ``vitfree.use_backend('eager')``,
never chosen automatically.  :func:`softmax_attention` is plain tensor operations, so traced
graphs (FX, TorchScript, export) run exactly the same computation.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..windows import LayerWindows
from .backend import Backend, Plan, PreparedCache, ProbsHook, Query
from .bias import PositionBias, dense_position_bias

__all__ = ['EagerBackend', 'softmax_attention', 'softmax_probs', 'apply_probs', 'widen', 'window_bias']


@torch.fx.wrap
def widen(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or as it is when it is fp32 or fp64 (one FX node, so tracing needs no dtype branch)."""
    if x.dtype == torch.float32 or x.dtype == torch.float64:
        return x
    return x.float()


@torch.fx.wrap
def _add(scores: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``scores`` plus an additive bias, or masked by a boolean one (True = may attend); one FX node."""
    if bias is None:
        return scores
    if bias.dtype == torch.bool:
        return scores.masked_fill(bias.logical_not(), float('-inf'))
    return scores + bias


def softmax_probs(q: torch.Tensor, k: torch.Tensor, scale: float, window_bias: Optional[torch.Tensor] = None,
                  attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(q k^T * scale + window_bias + attn_mask)`` in fp32 (fp64 for fp64 inputs) on
    ``(B, heads, T, d)`` tensors; scriptable and FX-traceable."""
    attn = (widen(q) * scale) @ widen(k).transpose(-2, -1)
    attn = _add(_add(attn, window_bias), attn_mask)
    return attn.softmax(dim=-1)


def apply_probs(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The probabilities times v, in v's dtype."""
    return (attn @ widen(v)).to(v.dtype)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      window_bias: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                      probs_hook: Optional[ProbsHook] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """:func:`softmax_probs`, then ``probs_hook`` (else attention dropout ``dropout_p``), then
    :func:`apply_probs`: the whole explicit-softmax attention."""
    attn = softmax_probs(q, k, scale, window_bias, attn_mask)
    if probs_hook is not None:
        attn = probs_hook(attn)
    elif dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return apply_probs(attn, v)


_CACHE = PreparedCache('eager')


def window_bias(windows: LayerWindows, num_prefix_tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The window mask as an additive bias in ``dtype`` (0 inside, -inf outside), ``(T, T)`` or
    ``(heads, T, T)``; cached per (windows, prefix, device, dtype)."""
    def make() -> torch.Tensor:
        allowed = windows.mask(num_prefix_tokens, device)
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float('-inf'))
    return _CACHE.get(windows, ('bias', num_prefix_tokens, str(device), dtype), make)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class EagerBackend(Backend):
    name = 'eager'
    description = ('explicit softmax in fp32 with the window bias; its probabilities pass the layer\'s hook point '
                   '(attn_drop); O(T^2); never chosen automatically')
    auto = False
    takes_caller_mask = True
    takes_dropout = True
    takes_bias = True

    def prepare(self, windows: LayerWindows, query: Query) -> Any:
        return window_bias(windows, query.prefix, query.device, wide_dtype(query.dtype))

    def work(self, query: Query, windows: LayerWindows) -> float:
        return float(query.batch_heads * query.head_dim * query.tokens ** 2)

    def run(self, plan: Plan, q, k, v, scale, dropout_p=0.0, attn_mask=None, probs_hook=None,
            bias: Optional[PositionBias] = None) -> torch.Tensor:
        mask = plan.data
        if bias is not None:
            mask = mask + dense_position_bias(bias, plan.query.grid, plan.query.prefix, mask)
        return softmax_attention(q, k, v, scale, mask, attn_mask, probs_hook, dropout_p)


BACKENDS = (EagerBackend(),)
