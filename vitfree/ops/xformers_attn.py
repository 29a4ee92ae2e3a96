"""The xformers backends: ``xformers.ops.memory_efficient_attention`` on CUDA.

* ``xformers``: linear cost.  The queries are cut into tiles and every tile attends to its halo
  of keys, all tiles in one call, with a per-tile additive bias that is exactly each patch's
  window (:mod:`vitfree.ops.fused_tiles` builds the batched tiles and biases).
* ``xformers-dense``: the whole ``T x T`` window mask as one additive bias (0 inside a window,
  -inf outside); quadratic, and cheaper only on small grids.  The dispatcher chooses by cost.

xformers is imported lazily, the first time a CUDA tensor asks for this backend, with its
import-time warnings silenced; CPU users never import it.  Whether xformers can run a given
CUDA device / dtype / head size is probed once with a tiny call and remembered, so the
dispatcher falls back to SDPA where xformers has no kernel.

Argument preparation is split into pure functions (:func:`window_bias`,
:func:`xformers_inputs`, and the tile functions of :mod:`vitfree.ops.fused_tiles`) that run anywhere, so their shapes, strides and alignment are tested
on CPU.  What xformers asks of a tensor bias: the query's dtype, shape ``(B, heads, Mq, Mk)``
(broadcast dimensions may have stride 0), unit stride in the last dimension, and every other
stride a multiple of 16 bytes; we allocate the rows padded to a multiple of 8 elements and
slice back, so the row stride is aligned while the visible shape is exactly ``T x T``.
"""
from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any, Dict, Optional, Tuple

import torch

from ..windows import LayerWindows
from .backend import Backend, Plan, PreparedCache, Query
from .fused_tiles import FusedTilesBackend

__all__ = [
    'BIAS_ALIGN', 'window_bias', 'xformers_inputs', 'xformers_supports', 'import_xformers', 'XformersBackend',
    'XformersDenseBackend',
]

BIAS_ALIGN = 8  # elements; 16 bytes for fp16/bf16, 32 for fp32 (xformers needs 16)

_xformers: Any = None          # the imported xformers.ops module, once loaded
_import_error: Optional[str] = None
_probe_results: Dict[Tuple[str, torch.dtype, int, int], Optional[str]] = {}
_CACHE = PreparedCache('xformers')


def import_xformers() -> Tuple[Any, Optional[str]]:
    """``(xformers.ops, None)`` or ``(None, reason)``; imports once, silencing its warnings."""
    global _xformers, _import_error
    if _xformers is None and _import_error is None:
        xf_logger = logging.getLogger('xformers')
        level = xf_logger.level
        xf_logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                _xformers = importlib.import_module('xformers.ops')
        except Exception as e:  # ImportError, or a broken build raising anything at import
            _import_error = (f'xformers is not usable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}); '
                             f"install it with pip install 'vitfree[gpu]'")
        finally:
            xf_logger.setLevel(level)
    return _xformers, _import_error


def window_bias(
        windows: LayerWindows,
        num_prefix_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        batch: int = 1,
        num_heads: int = 1,
) -> torch.Tensor:
    """The window mask as an additive bias ``(batch, num_heads, T, T)`` for xformers.

    0 where a query may attend, ``-inf`` elsewhere, in ``dtype``.  The storage is one
    ``(T, T_pad)`` matrix (``(heads, T, T_pad)`` for per-head windows), ``T_pad`` the next
    multiple of :data:`BIAS_ALIGN`, sliced to ``T`` columns and expanded (stride 0) over the
    batch (and heads).  The storage is cached per (windows, prefix, dtype, device).
    """
    dev = torch.device(device) if device is not None else torch.device('cpu')
    if windows.per_head and windows.num_heads != num_heads:
        raise ValueError(f'windows are per head for {windows.num_heads} heads, got num_heads={num_heads}')

    store = _bias_storage(windows, num_prefix_tokens, dtype, dev)
    t = store.shape[-2]
    bias = store[..., :t]
    if bias.dim() == 2:
        bias = bias.unsqueeze(0)
    return bias.unsqueeze(0).expand(batch, num_heads, t, t)


def _bias_storage(windows: LayerWindows, num_prefix_tokens: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    def make() -> torch.Tensor:
        allowed = windows.mask(num_prefix_tokens, device)  # (T, T) or (heads, T, T)
        t = allowed.shape[-1]
        t_pad = -(-t // BIAS_ALIGN) * BIAS_ALIGN
        store = torch.full((*allowed.shape[:-1], t_pad), float('-inf'), dtype=dtype, device=device)
        store[..., :t].masked_fill_(allowed, 0.0)
        return store
    return _CACHE.get(windows, ('bias', num_prefix_tokens, dtype, str(device)), make)


def xformers_inputs(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        windows: LayerWindows,
        num_prefix_tokens: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, heads, T, d)`` q/k/v -> xformers' ``(B, T, heads, d)`` views plus the bias.

    No copies are made except that the last dimension is made contiguous if it is not."""
    b, h = q.shape[:2]

    def bmhk(x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        return x if x.stride(-1) == 1 else x.contiguous()

    bias = window_bias(windows, num_prefix_tokens, q.dtype, q.device, b, h)
    return bmhk(q), bmhk(k), bmhk(v), bias


def _xformers_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                     dropout_p: float) -> torch.Tensor:
    xops, reason = import_xformers()
    if xops is None:
        raise RuntimeError(reason)
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p, scale=scale)


def _probe(device: torch.device, dtype: torch.dtype, head_dim: int, value_dim: int) -> Optional[str]:
    """Run a tiny biased call once per (device, dtype, head sizes); the error text if it fails."""
    key = (str(device), dtype, head_dim, value_dim)
    if key not in _probe_results:
        xops, reason = import_xformers()
        if xops is None:
            _probe_results[key] = reason
        else:
            try:
                q = torch.zeros(1, 8, 1, head_dim, dtype=dtype, device=device)
                v = torch.zeros(1, 8, 1, value_dim, dtype=dtype, device=device)
                bias = torch.zeros(1, 1, 8, 8, dtype=dtype, device=device)
                xops.memory_efficient_attention(q, q, v, attn_bias=bias)
                _probe_results[key] = None
            except Exception as e:  # NotImplementedError / ValueError from its dispatcher
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                _probe_results[key] = f'xformers has no kernel for {dtype}, head_dim {head_dim} on {device}: {first}'
    return _probe_results[key]


def _on_cuda(query: Query) -> bool:
    return query.device.type == 'cuda'


def xformers_supports(query: Query, windows: LayerWindows) -> Optional[str]:
    """None when xformers can run the query (CUDA, importable, kernel available), else why not."""
    if not _on_cuda(query):
        return f'xformers runs on CUDA tensors only; the inputs are on {query.device.type}'
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f'xformers needs float16, bfloat16 or float32 inputs, got {query.dtype}'
    return _probe(query.device, query.dtype, query.head_dim, query.value_dim)


class XformersBackend(FusedTilesBackend):
    name = 'xformers'
    description = ('xformers memory-efficient attention over batched tiles with per-tile window biases; '
                   'O(T * window); CUDA only')
    kernel = staticmethod(_xformers_kernel)

    def supports(self, query: Query, windows: LayerWindows) -> Optional[str]:
        return xformers_supports(query, windows)


class XformersDenseBackend(Backend):
    name = 'xformers-dense'
    description = ('xformers memory-efficient attention with the whole window mask as a bias; O(T^2); '
                   'CUDA only')
    auto_devices = ('cuda',)

    def supports(self, query: Query, windows: LayerWindows) -> Optional[str]:
        return xformers_supports(query, windows)

    def prepare(self, windows: LayerWindows, query: Query) -> Any:
        return _bias_storage(windows, query.prefix, query.dtype, query.device)

    def work(self, query: Query, windows: LayerWindows) -> float:
        return float(query.batch_heads * query.head_dim * query.tokens ** 2)

    def run(self, plan: Plan, q, k, v, scale, dropout_p=0.0, attn_mask=None, probs_hook=None) -> torch.Tensor:
        qx, kx, vx, bias = xformers_inputs(q, k, v, plan.windows, plan.query.prefix)
        return _xformers_kernel(qx, kx, vx, bias, scale, dropout_p).transpose(1, 2)


BACKENDS = (XformersBackend(), XformersDenseBackend())
