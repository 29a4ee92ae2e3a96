"""Window attention on fused attention kernels, tile by tile: linear cost, no T x T tensor.

The patch queries are cut into tiles of ``th x tw`` patches (the tile plan of
:mod:`vitfree.ops.tiled`); every tile reads its *halo*, the prefix tokens plus the smallest
block of patches holding the windows of all its queries.  All tiles of all (batch, head) pairs
go to ONE call of a fused memory-efficient attention kernel, with an additive bias per tile that
is exactly each patch's window (0 inside, ``-inf`` outside).  The result equals the dense
reference; the work is ``tiles * tile_area * (P + halo_area)`` query-key pairs instead of ``T^2``.

Two kernels run the batched tiles:

* ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA; see
  :mod:`vitfree.ops.xformers_attn`);
* ``sdpa-tiles``: ``torch.nn.functional.scaled_dot_product_attention`` with the same tiles and
  bias (any device; on CUDA it runs PyTorch's memory-efficient kernel, the one xformers' cutlass
  operator calls too, so it needs no extra package).

Layout (what the kernel sees, xformers' ``(batch, queries, heads, channels)``):

* windows shared by the heads: the heads join the batch and the tiles play the heads,
  ``q (B*heads, Qt, nt, d)``, keys ``(B*heads, Kt, nt, d)``, bias ``(nt, Qt, Kt)`` stored once and
  expanded with stride 0 over ``B*heads``;
* per-head windows: the tiles and heads share the heads axis, ``q (B, Qt, nt*heads, d)``, bias
  stored as ``(nt, heads, Qt, Kt)`` and expanded with stride 0 over the batch.

Each is ONE ``index_select`` of the ``(B, heads, T, d)`` input with an index in query-row-major
order (row ``j`` of every tile, then row ``j+1``), so the gathered tensor is already in that
layout (no permute copies).  The output comes back with one more ``index_select``.  Gradients
flow through both gathers (autograd's index_add sums the halos' overlapping key gradients).

Bias rules (xformers', which are also what SDPA's memory-efficient kernel needs to avoid a copy):
the query's dtype, unit stride in the last dimension, every other stride a multiple of 16
bytes.  The bias rows are stored padded to a multiple of :data:`BIAS_ALIGN` elements and sliced
back, so the visible shape is exactly ``Kt``.  Padding query rows of tiles that stick out of the
grid allow everything (their results are dropped); no row is ever fully masked, because every
patch sees itself.

Prefix-token queries see every token: they take one small unmasked SDPA call, as in
:mod:`vitfree.ops.tiled`.  Index tables and biases are built once (NumPy, on the CPU) and kept in
this module's cache per device (and dtype for the bias), when a plan is made.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..windows import LayerWindows
from .backend import Backend, Plan, PreparedCache, Query
from .tiled import plan_tiles, window_bounds

__all__ = [
    'BIAS_ALIGN', 'FUSED_BLOCK', 'TileBatch', 'choose_fused_tile', 'tile_batch', 'tile_bias', 'gather_tiles',
    'scatter_tiles', 'fused_tiles_attention', 'sdpa_tiles_attention', 'fused_tiles_counts', 'FusedTilesBackend',
    'SdpaTilesBackend', 'ROW_PAIRS',
]

_CACHE = PreparedCache('fused-tiles')

Tile = Tuple[int, int]

BIAS_ALIGN = 16   # elements: >= 16 bytes in any dtype (xformers), and SDPA's own alignment check
FUSED_BLOCK = 64  # query and key block of the memory-efficient kernels (cutlass, sm80+, head_dim <= 128)
# one gathered or scattered token row, in query-key pairs of the kernel: a row moves 2*d*2 bytes
# for 4*d FLOPs of a pair, and a GPU does ~100 FLOPs per byte; a guess that only shapes the tile
# choice (benchmarks/bench_cuda.py times a few tiles side by side)
ROW_PAIRS = 64
_SIDES = (1, 2, 4, 8, 12, 16, 24, 32)
_MAX_TILE_AREA = 1024


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _halo_shape(windows: LayerWindows, tile: Tile) -> Tile:
    """Rows and columns of the halo that holds the windows of every tile of this shape."""
    r0, r1, c0, c1 = window_bounds(windows)
    th, tw = tile
    h, w = windows.grid
    nty, ntx = _ceil(h, th), _ceil(w, tw)

    def reduce(a, fill, op):
        pad = np.full((nty * th, ntx * tw), fill, dtype=np.int64)
        pad[:h, :w] = a
        return op(op(pad.reshape(nty, th, ntx, tw), axis=3), axis=1)
    big = np.iinfo(np.int64).max // 4
    rows = reduce(r1, -1, np.max) - reduce(r0, big, np.min) + 1
    cols = reduce(c1, -1, np.max) - reduce(c0, big, np.min) + 1
    return int(rows.max()), int(cols.max())


def _tile_cost(windows: LayerWindows, num_prefix_tokens: int, tile: Tile) -> Tuple[float, int, int, int]:
    """``(cost in pairs, tiles, queries per tile, keys per tile)`` of one tiling for the fused kernels:
    every tile pays whole kernel blocks of queries and keys, plus its gathered rows."""
    h, w = windows.grid
    hh, hw = _halo_shape(windows, tile)
    nt = _ceil(h, tile[0]) * _ceil(w, tile[1])
    qt, kt = tile[0] * tile[1], num_prefix_tokens + hh * hw
    blocks = _ceil(qt, FUSED_BLOCK) * FUSED_BLOCK * _ceil(kt, FUSED_BLOCK) * FUSED_BLOCK
    return float(nt * (blocks + ROW_PAIRS * (2 * qt + 2 * kt))), nt, qt, kt


def choose_fused_tile(windows: LayerWindows, num_prefix_tokens: int = 0) -> Tile:
    """The tile shape with the lowest estimated cost on a blocked fused kernel (cached on ``windows``).

    Unlike :func:`vitfree.ops.tiled.choose_tile` (fitted on a CPU), a tile pays whole
    :data:`FUSED_BLOCK`-row blocks of queries and keys, and gathering rows weighs more."""
    def make() -> Tile:
        h, w = windows.grid
        best, best_cost = None, None
        for th in sorted({s for s in _SIDES if s < h} | {h}):
            for tw in sorted({s for s in _SIDES if s < w} | {w}):
                if th * tw > _MAX_TILE_AREA and (th, tw) != (h, w):
                    continue
                cost = _tile_cost(windows, num_prefix_tokens, (th, tw))[0]
                if best_cost is None or cost < best_cost:
                    best, best_cost = (th, tw), cost
        return best
    return _CACHE.get(windows, ('fused.tile', num_prefix_tokens), make)


def fused_tiles_counts(windows: LayerWindows, num_prefix_tokens: int = 0) -> Tuple[float, float]:
    """``(block pairs, gathered rows)`` per (batch, head) of the chosen tiling, prefix queries
    included (they see all ``T`` keys); used for the dispatcher's cost estimates."""
    def make():
        _, nt, qt, kt = _tile_cost(windows, num_prefix_tokens, choose_fused_tile(windows, num_prefix_tokens))
        t = num_prefix_tokens + windows.num_patches
        pairs = nt * _ceil(qt, FUSED_BLOCK) * FUSED_BLOCK * _ceil(kt, FUSED_BLOCK) * FUSED_BLOCK
        return float(pairs + num_prefix_tokens * t), float(nt * (2 * qt + 2 * kt))
    return _CACHE.get(windows, ('fused.counts', num_prefix_tokens), make)


@dataclass(frozen=True)
class TileBatch:
    """Index tables of one tiling in query-row-major order (see the module docstring).

    ``q_index`` ``(Qt*nt,)``: token of row ``j`` of tile ``i`` at ``j*nt + i``; ``k_index``
    ``(Kt*nt,)`` likewise for the keys (prefix first, then the halo); ``out_index`` ``(N,)``: the
    row of each patch in the kernel's output."""
    tile: Tile
    num_tiles: int
    tile_queries: int
    tile_keys: int
    q_index: torch.Tensor
    k_index: torch.Tensor
    out_index: torch.Tensor


def _resolve_tile(windows: LayerWindows, num_prefix_tokens: int, tile: Optional[Sequence[int]]) -> Tile:
    if tile is None:
        return choose_fused_tile(windows, num_prefix_tokens)
    tile = tuple(int(t) for t in tile)
    if len(tile) != 2 or min(tile) < 1:
        raise ValueError(f'tile must be two positive ints (rows, cols), got {tile!r}')
    return min(tile[0], windows.grid[0]), min(tile[1], windows.grid[1])


def tile_batch(windows: LayerWindows, num_prefix_tokens: int = 0, device: torch.device | str | None = None,
               tile: Optional[Sequence[int]] = None) -> TileBatch:
    """The :class:`TileBatch` of these windows (tile from :func:`choose_fused_tile` unless given),
    cached on ``windows`` per (prefix, tile, device)."""
    tile = _resolve_tile(windows, num_prefix_tokens, tile)
    dev = torch.device(device) if device is not None else torch.device('cpu')

    def make() -> TileBatch:
        if dev.type != 'cpu':
            b = tile_batch(windows, num_prefix_tokens, 'cpu', tile)
            return TileBatch(b.tile, b.num_tiles, b.tile_queries, b.tile_keys, b.q_index.to(dev),
                             b.k_index.to(dev), b.out_index.to(dev))
        plan = plan_tiles(windows, num_prefix_tokens, tile, 'cpu')
        nt, qt, kt = plan.num_tiles, plan.tile_queries, plan.tile_keys
        q_index = plan.query_index.view(nt, qt).t().reshape(-1)
        k_index = plan.key_index.view(nt, kt).t().reshape(-1)
        out_index = (plan.out_index % qt) * nt + plan.out_index // qt
        return TileBatch(tile, nt, qt, kt, q_index.contiguous(), k_index.contiguous(), out_index.contiguous())
    return _CACHE.get(windows, ('fused.batch', num_prefix_tokens, tile, str(dev)), make)


def tile_bias(windows: LayerWindows, num_prefix_tokens: int, device: torch.device | str | None, dtype: torch.dtype,
              tile: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Each tile's window mask as an additive bias, ``(1, nt, Qt, Kt)`` for shared windows or
    ``(1, nt*heads, Qt, Kt)`` for per-head windows (tile-major, then head), in ``dtype``.

    A slice of storage whose rows are padded to :data:`BIAS_ALIGN` elements (every stride but
    the last is a multiple of 16 elements, the last is 1); cached on ``windows`` per (prefix,
    tile, device, dtype).  Expand it over the batch (stride 0) for the kernel."""
    tile = _resolve_tile(windows, num_prefix_tokens, tile)
    dev = torch.device(device) if device is not None else torch.device('cpu')

    def make() -> torch.Tensor:
        plan = plan_tiles(windows, num_prefix_tokens, tile, 'cpu')
        allowed = plan.allowed  # (nt, Qt, Kt) or (heads, nt, Qt, Kt)
        if allowed.dim() == 4:
            allowed = allowed.permute(1, 0, 2, 3)  # (nt, heads, Qt, Kt)
        kt = allowed.shape[-1]
        kt_pad = _ceil(kt, BIAS_ALIGN) * BIAS_ALIGN
        store = torch.full((*allowed.shape[:-1], kt_pad), float('-inf'), dtype=dtype, device=dev)
        store[..., :kt].masked_fill_(allowed.to(dev), 0.0)
        qt = allowed.shape[-2]
        return store.view(1, -1, qt, kt_pad)[..., :kt]
    return _CACHE.get(windows, ('fused.bias', num_prefix_tokens, tile, str(dev), dtype), make)


def gather_tiles(x: torch.Tensor, index: torch.Tensor, rows: int, num_tiles: int, per_head: bool) -> torch.Tensor:
    """``(B, heads, T, d)`` -> the kernel's ``(B*heads, rows, nt, d)`` (shared windows) or
    ``(B, rows, nt*heads, d)`` (per-head windows): one ``index_select``, no other copy."""
    b, h, _, d = x.shape
    if per_head:
        return x.transpose(1, 2).index_select(1, index).view(b, rows, num_tiles * h, d)
    return x.index_select(2, index).view(b * h, rows, num_tiles, d)


def scatter_tiles(o: torch.Tensor, batch: TileBatch, b: int, h: int, per_head: bool) -> torch.Tensor:
    """The kernel's output (layout of :func:`gather_tiles`) -> patch rows ``(B, heads, N, dv)``."""
    dv = o.shape[-1]
    rows = batch.tile_queries * batch.num_tiles
    if per_head:
        return o.reshape(b, rows, h, dv).index_select(1, batch.out_index).transpose(1, 2)
    return o.reshape(b, h, rows, dv).index_select(2, batch.out_index)


Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def _sdpa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                 dropout_p: float) -> torch.Tensor:
    """SDPA on ``(B, M, H, K)`` tensors (its own layout is ``(B, H, M, K)``: views, no copies)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=bias, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)


def fused_tiles_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: TileBatch, bias: torch.Tensor,
                          num_prefix_tokens: int, per_head: bool, scale: float, dropout_p: float = 0.0,
                          kernel: Optional[Kernel] = None) -> torch.Tensor:
    """Windowed attention on checked ``(B, heads, T, d)`` inputs of one dtype (outside autocast), all
    tiles in one fused-kernel call.  ``kernel(q, k, v, bias, scale, dropout_p)`` takes xformers'
    ``(B, M, H, K)`` layout and a bias ``(B, H, Mq, Mk)`` (expanded, stride 0 over the batch);
    default: PyTorch SDPA."""
    p = num_prefix_tokens
    b, h = q.shape[:2]
    nt, qt, kt = batch.num_tiles, batch.tile_queries, batch.tile_keys
    qb = gather_tiles(q, batch.q_index, qt, nt, per_head)
    kb = gather_tiles(k, batch.k_index, kt, nt, per_head)
    vb = gather_tiles(v, batch.k_index, kt, nt, per_head)
    bias = bias.expand(qb.shape[0], bias.shape[1], qt, kt)
    o = (kernel or _sdpa_kernel)(qb, kb, vb, bias, scale, dropout_p)
    patches = scatter_tiles(o, batch, b, h, per_head)
    if p == 0:
        return patches
    prefix = F.scaled_dot_product_attention(q[:, :, :p], k, v, dropout_p=dropout_p, scale=scale)
    return torch.cat([prefix, patches], dim=2)


class FusedTilesBackend(Backend):
    """Batched tiles on a fused kernel (``sdpa-tiles`` here, ``xformers`` in its own module)."""
    auto_devices = ('cuda',)
    kernel: Optional[Kernel] = None

    def prepare(self, windows: LayerWindows, query: Query) -> Any:
        batch = tile_batch(windows, query.prefix, query.device)
        return batch, tile_bias(windows, query.prefix, query.device, query.dtype, batch.tile)

    def work(self, query: Query, windows: LayerWindows) -> float:
        pairs, rows = fused_tiles_counts(windows, query.prefix)
        return float(query.batch_heads * query.head_dim * (pairs + ROW_PAIRS * rows))

    def run(self, plan: Plan, q, k, v, scale, dropout_p=0.0, attn_mask=None, probs_hook=None) -> torch.Tensor:
        batch, bias = plan.data
        return fused_tiles_attention(q, k, v, batch, bias, plan.query.prefix, plan.windows.per_head, scale,
                                     dropout_p, self.kernel)


class SdpaTilesBackend(FusedTilesBackend):
    name = 'sdpa-tiles'
    description = ('PyTorch SDPA over batched tiles with per-tile window biases; O(T * window); chosen '
                   'automatically on CUDA only')


BACKENDS = (SdpaTilesBackend(),)


def sdpa_tiles_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: LayerWindows,
                         num_prefix_tokens: int = 0, scale: Optional[float] = None,
                         dropout_p: float = 0.0) -> torch.Tensor:
    """Windowed attention on ``(B, heads, T, d)`` tensors through the ``sdpa-tiles`` backend."""
    from .dispatch import window_attention
    return window_attention(q, k, v, windows, num_prefix_tokens, scale, dropout_p, backend='sdpa-tiles')
