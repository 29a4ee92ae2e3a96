"""Attention hooks from the outside: run chosen blocks on an explicit-softmax path and let a
callback read (or change) the attention logits and probabilities.

Works on :class:`vitfree.layers.WindowAttention` and on timm's own ``Attention`` (plain
ViT/DeiT), without touching ``ops/`` or ``layers/``: the chosen modules get an instance-level
``forward`` for the duration of the context, every other block keeps its fused kernel, and
everything is restored on exit, also when the forward raises.

Callbacks::

    logits_fn(block, logits) -> logits | None     # (B, heads, T, T), before softmax, after
                                                   # the window mask (-inf outside windows)
    probs_fn(block, probs)   -> probs | None       # (B, heads, T, T), post-softmax

Returning ``None`` keeps the tensor as it is.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['attention_modules', 'attention_override', 'normalize_blocks']

LogitsFn = Callable[[int, torch.Tensor], Optional[torch.Tensor]]
ProbsFn = Callable[[int, torch.Tensor], Optional[torch.Tensor]]


def attention_modules(model: nn.Module) -> List[nn.Module]:
    """The attention module of every block of a timm ViT-family model (``model.blocks[i].attn``)."""
    blocks = getattr(model, 'blocks', None)
    if blocks is None or not all(hasattr(b, 'attn') and hasattr(b.attn, 'qkv') for b in blocks):
        raise TypeError(f'{type(model).__name__} is not a timm ViT-family model: expected .blocks[i].attn '
                        f'with a fused qkv projection')
    return [b.attn for b in blocks]


def normalize_blocks(blocks: Optional[Iterable[int]], depth: int) -> List[int]:
    """``None`` -> all blocks; negative indices count from the end; errors name the bad index."""
    if blocks is None:
        return list(range(depth))
    if isinstance(blocks, int):
        blocks = [blocks]
    out = []
    for b in blocks:
        if not isinstance(b, int) or not -depth <= b < depth:
            raise ValueError(f'block index {b!r} out of range for a model with {depth} blocks '
                             f'(valid: 0..{depth - 1} or negative from the end)')
        out.append(b % depth)
    return sorted(set(out))


def _num_prefix(model: nn.Module) -> int:
    return int(getattr(model, 'num_prefix_tokens', 0))


def _make_forward(attn: nn.Module, block: int, num_prefix_tokens: int,
                  logits_fn: Optional[LogitsFn], probs_fn: Optional[ProbsFn]):
    """An explicit-softmax forward for one attention module (timm Attention or WindowAttention)."""
    windowed = getattr(attn, 'windows', None) is not None

    def forward(x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = attn.gate(x).sigmoid() if getattr(attn, 'gate', None) is not None else None
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if windowed:
            win = attn.windows_for(N - attn.num_prefix_tokens).mask(attn.num_prefix_tokens, x.device)
            logits = logits.masked_fill(~win, float('-inf'))
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float('-inf')) if attn_mask.dtype == torch.bool \
                else logits + attn_mask
        if is_causal:
            causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
            logits = logits.masked_fill(~causal, float('-inf'))
        if logits_fn is not None:
            new = logits_fn(block, logits)
            logits = logits if new is None else new
        probs = logits.softmax(dim=-1)
        if probs_fn is not None:
            new = probs_fn(block, probs)
            probs = probs if new is None else new
        out = attn.attn_drop(probs) @ v
        out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
        out = attn.norm(out)
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))

    return forward


@contextlib.contextmanager
def attention_override(
        model: nn.Module,
        blocks: Optional[Iterable[int]] = None,
        logits_fn: Optional[LogitsFn] = None,
        probs_fn: Optional[ProbsFn] = None,
) -> Iterator[List[int]]:
    """Within the context, the chosen blocks run an explicit softmax and call the callbacks.

    Yields the list of block indices affected.  Blocks not chosen are untouched (fused).
    """
    mods = attention_modules(model)
    chosen = normalize_blocks(blocks, len(mods))
    npt = _num_prefix(model)
    saved: Dict[int, Tuple[bool, object]] = {}
    try:
        for i in chosen:
            m = mods[i]
            saved[i] = ('forward' in m.__dict__, m.__dict__.get('forward'))
            m.forward = _make_forward(m, i, npt, logits_fn, probs_fn)
        yield chosen
    finally:
        for i, (had, old) in saved.items():
            m = mods[i]
            if had:
                m.forward = old
            else:
                m.__dict__.pop('forward', None)
