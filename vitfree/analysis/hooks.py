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

Overrides nest: entering :func:`attention_override` on a block that is already overridden
chains the callbacks (outer ones run first), so for example a recorder opened inside a
head-pruning context sees the pruned probabilities.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ['attention_modules', 'attention_override', 'normalize_blocks', 'capture_block_io', 'patch_grid',
           'num_prefix_tokens']

LogitsFn = Callable[[int, torch.Tensor], Optional[torch.Tensor]]
ProbsFn = Callable[[int, torch.Tensor], Optional[torch.Tensor]]

_CALLBACKS_ATTR = '_vitfree_callbacks'


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
        if not isinstance(b, int) or isinstance(b, bool) or not -depth <= b < depth:
            raise ValueError(f'block index {b!r} out of range for a model with {depth} blocks '
                             f'(valid: 0..{depth - 1} or negative from the end)')
        out.append(b % depth)
    return sorted(set(out))


def num_prefix_tokens(model: nn.Module) -> int:
    """Leading class/register tokens of a timm ViT-family model (0 when it has none)."""
    return int(getattr(model, 'num_prefix_tokens', 0))



def patch_grid(model: nn.Module, image_size: Optional[Sequence[int]] = None) -> Tuple[int, int]:
    """The patch grid ``(H, W)`` the model uses for images of ``image_size = (h, w)`` pixels
    (its native grid when ``image_size`` is None or the model has a fixed input size)."""
    pe = getattr(model, 'patch_embed', None)
    if pe is None or not hasattr(pe, 'grid_size'):
        raise TypeError(f'{type(model).__name__} has no patch_embed.grid_size; expected a timm ViT-family model')
    if image_size is not None and getattr(model, 'dynamic_img_size', False):
        return tuple(int(g) for g in pe.dynamic_feat_size(tuple(int(s) for s in image_size)))
    return tuple(int(g) for g in pe.grid_size)


def _make_forward(attn: nn.Module, block: int, logits_fns: List[LogitsFn], probs_fns: List[ProbsFn]):
    """An explicit-softmax forward for one attention module (timm Attention or WindowAttention)."""
    windowed = getattr(attn, 'windows', None) is not None
    attn_dim = getattr(attn, 'attn_dim', attn.num_heads * attn.head_dim)

    def forward(x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate_layer = getattr(attn, 'gate', None)
        gate = gate_layer(x).sigmoid() if gate_layer is not None else None
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
        for fn in logits_fns:
            new = fn(block, logits)
            logits = logits if new is None else new
        probs = logits.softmax(dim=-1)
        for fn in probs_fns:
            new = fn(block, probs)
            probs = probs if new is None else new
        out = attn.attn_drop(probs) @ v
        out = out.transpose(1, 2).reshape(B, N, attn_dim)
        norm = getattr(attn, 'norm', None)
        if norm is not None:
            out = norm(out)
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))

    setattr(forward, _CALLBACKS_ATTR, (list(logits_fns), list(probs_fns)))
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
    Nested overrides of the same block chain their callbacks, outer first.
    """
    mods = attention_modules(model)
    chosen = normalize_blocks(blocks, len(mods))
    saved: Dict[int, Tuple[bool, object]] = {}
    try:
        for i in chosen:
            m = mods[i]
            had = 'forward' in m.__dict__
            old = m.__dict__.get('forward')
            saved[i] = (had, old)
            prev_logits, prev_probs = getattr(old, _CALLBACKS_ATTR, ([], []))
            m.forward = _make_forward(
                m, i,
                prev_logits + ([logits_fn] if logits_fn is not None else []),
                prev_probs + ([probs_fn] if probs_fn is not None else []),
            )
        yield chosen
    finally:
        for i, (had, old) in saved.items():
            m = mods[i]
            if had:
                m.forward = old
            else:
                m.__dict__.pop('forward', None)


@contextlib.contextmanager
def capture_block_io(model: nn.Module, blocks: Iterable[int]) -> Iterator[Dict[int, Dict[str, torch.Tensor]]]:
    """Within the context, every forward stores ``{'input': x, 'output': y}`` (detached) of the
    chosen ``model.blocks[i]`` in the yielded dict; the hooks are removed on exit."""
    mods = list(model.blocks)
    chosen = normalize_blocks(list(blocks), len(mods))
    store: Dict[int, Dict[str, torch.Tensor]] = {}
    handles = []

    def make(i: int):
        def hook(module, args, output):
            store[i] = {'input': args[0].detach(), 'output': output.detach()}
        return hook

    try:
        for i in chosen:
            handles.append(mods[i].register_forward_hook(make(i)))
        yield store
    finally:
        for h in handles:
            h.remove()
