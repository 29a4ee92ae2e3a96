"""The ``flex`` backend: PyTorch's FlexAttention with a block-sparse mask built from the windows.

FlexAttention skips every (query block, key block) pair that its :class:`BlockMask` marks
empty, runs blocks marked *full* without evaluating the mask, and evaluates ``mask_mod`` on the
*partial* ones.  In row-major token order a query block of 128 patches is a strip of rows that
reaches far across the grid, so few blocks would be empty.  Here the tokens are first permuted
into tile-major order (tiles of 128 patches, e.g. 8x16, chosen per grid so the fewest blocks
are touched): a query block is then one compact tile whose windows touch only the few key
blocks around it, and the output is permuted back.

Token layout (FlexAttention allows different query and key lengths):

* queries: the ``N`` patches in tile-major order (prefix-token queries see every token and take
  one small unmasked SDPA call, as in :mod:`vitfree.ops.tiled`);
* keys: the ``N`` patches in tile-major order, then the ``P`` prefix tokens (so the patch blocks
  stay aligned with the tiles; the prefix keys share the last block).

The block structure is computed exactly with NumPy (per query block, how many of its queries'
windows cover each patch: a summed-area table; blocks that reach past the end of either sequence
are never full, as in ``create_block_mask``), and the :class:`BlockMask` is assembled with
``BlockMask.from_kv_blocks``; it equals what ``create_block_mask`` builds from the same
``mask_mod`` (tested), without materialising the ``N x N`` mask.  The mask, the permutations and
the tables ``mask_mod`` reads are built once per (windows, prefix, device) and kept in this
backend's cache, when a plan is made.

On CUDA the kernel is ``torch.compile(flex_attention)`` (one compiled function for the module,
made on first use; each input shape is one graph, so the first call at a new shape compiles for
a few seconds).  Elsewhere FlexAttention runs uncompiled, which materialises the scores: correct
and slow, for tests; the dispatcher never picks ``flex`` off CUDA.  Attention dropout has no
FlexAttention kernel: the dispatcher never gives it a call with dropout.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..windows import LayerWindows
from .backend import Backend, Plan, PreparedCache, Query

__all__ = [
    'FLEX_BLOCK', 'FlexPlan', 'flex_plan', 'tile_major_order', 'block_structure', 'window_mask_mod',
    'flex_window_attention', 'flex_counts', 'FlexBackend',
]

_CACHE = PreparedCache('flex')

Tile = Tuple[int, int]
FLEX_BLOCK: Tuple[int, int] = (128, 128)  # (query, key) block of the BlockMask: FlexAttention's default
_FAR = -(1 << 20)  # coordinate of prefix keys: outside every window (they are allowed by their flag)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def tile_major_order(grid: Tile, tile: Tile) -> np.ndarray:
    """Patches ordered tile by tile (tiles row-major, patches row-major inside a tile): ``order[i]``
    is the row-major patch index at position ``i``.  Border tiles may be partial."""
    h, w = grid
    th, tw = tile
    ys, xs = np.divmod(np.arange(h * w), w)
    key = ((ys // th) * _ceil(w, tw) + xs // tw) * (th * tw) + (ys % th) * tw + xs % tw
    return np.argsort(key, kind='stable')


def _candidate_tiles(grid: Tile, area: int) -> List[Tile]:
    h, w = grid
    tiles = {(min(area // s, h), min(s, w)) for s in (1, 2, 4, 8, 16, 32, 64, 128, 256) if s <= area}
    tiles.add((max(1, min(h, area // w)), w))  # whole rows
    return sorted(tiles)


def _extents(windows: LayerWindows) -> np.ndarray:
    """``(heads or 1, N, 4)`` int64 extents, row-major patches."""
    e = windows.extents.astype(np.int64)
    if e.ndim == 3:
        e = e[None]
    return e.reshape(e.shape[0], -1, 4)


def block_structure(windows: LayerWindows, num_prefix_tokens: int, q_order: np.ndarray, kv_order: np.ndarray,
                    block: Tuple[int, int] = FLEX_BLOCK) -> Tuple[np.ndarray, np.ndarray, int]:
    """``(partial, full, kv_len)``: bool ``(heads or 1, q_blocks, kv_blocks)`` maps of the blocks
    that need the mask and of those every pair of which is allowed, in the layout of the module
    docstring (queries in ``q_order``; keys in ``kv_order``, then the prefix)."""
    h, w = windows.grid
    n = h * w
    p = num_prefix_tokens
    bq, bk = block
    ext = _extents(windows)
    ys, xs = np.divmod(np.arange(n), w)
    kv_len = n + p
    nqb, nkb = _ceil(n, bq), _ceil(kv_len, bk)
    rows_per_block = np.minimum(bq, n - np.arange(nqb) * bq)  # (nqb,)
    qblock = np.arange(n) // bq  # block of each query position
    partial = np.zeros((ext.shape[0], nqb, nkb), dtype=bool)
    full = np.zeros_like(partial)
    for head, e in enumerate(ext):
        eq = e[q_order]  # (n, 4) in query order
        yq, xq = ys[q_order], xs[q_order]
        r0, r1 = np.maximum(yq - eq[:, 0], 0), np.minimum(yq + eq[:, 1], h - 1)
        c0, c1 = np.maximum(xq - eq[:, 2], 0), np.minimum(xq + eq[:, 3], w - 1)
        # per query block, how many of its queries' windows cover each patch (2-D difference array)
        diff = np.zeros((nqb, h + 1, w + 1), dtype=np.int32)
        for ry, cx, sign in ((r0, c0, 1), (r0, c1 + 1, -1), (r1 + 1, c0, -1), (r1 + 1, c1 + 1, 1)):
            np.add.at(diff, (qblock, ry, cx), sign)
        cover = diff.cumsum(1).cumsum(2)[:, :h, :w].reshape(nqb, n)
        cols = np.zeros((nqb, nkb * bk), dtype=np.int32)  # coverage per key position
        cols[:, :n] = cover[:, kv_order]
        cols[:, n:kv_len] = rows_per_block[:, None]  # prefix keys: always allowed
        inside = np.zeros(nkb * bk, dtype=bool)
        inside[:kv_len] = True
        any_ = ((cols > 0) & inside).reshape(nqb, nkb, bk).any(-1)
        # as create_block_mask does, positions past the sequence ends count as masked, so a block
        # that reaches past either end is never full (FlexAttention then evaluates mask_mod there)
        all_ = ((cols == bq) & inside).reshape(nqb, nkb, bk).all(-1)
        full[head] = any_ & all_
        partial[head] = any_ & ~all_
    return partial, full, kv_len


def _block_cost(partial: np.ndarray, full: np.ndarray) -> float:
    return float(partial.sum() + 0.8 * full.sum())


def window_mask_mod(tables: Dict[str, torch.Tensor], per_head: bool) -> Callable[..., torch.Tensor]:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of the windows, reading ``tables``
    (:attr:`FlexPlan.tables`): True where the query's window holds the key, or the key is a
    prefix token."""
    qy, qx, up, down, left, right = (tables[k] for k in ('qy', 'qx', 'up', 'down', 'left', 'right'))
    ky, kx, kp = tables['ky'], tables['kx'], tables['kp']
    if per_head:
        def mask_mod(b, h, q_idx, kv_idx):
            dy = ky[kv_idx] - qy[q_idx]
            dx = kx[kv_idx] - qx[q_idx]
            inside = ((dy + up[h, q_idx] >= 0) & (dy <= down[h, q_idx])
                      & (dx + left[h, q_idx] >= 0) & (dx <= right[h, q_idx]))
            return kp[kv_idx] | inside
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            dy = ky[kv_idx] - qy[q_idx]
            dx = kx[kv_idx] - qx[q_idx]
            inside = (dy + up[q_idx] >= 0) & (dy <= down[q_idx]) & (dx + left[q_idx] >= 0) & (dx <= right[q_idx])
            return kp[kv_idx] | inside
    return mask_mod


@dataclass
class FlexPlan:
    """Everything a ``flex`` call reads, for one (windows, prefix, device).

    Attributes:
        q_tile, kv_tile: tiles of the query and key permutations.
        q_index: ``(N,)`` token of each query position; ``q_inverse`` ``(N,)``: position of each patch.
        kv_index: ``(N + P,)`` token of each key position.
        tables: the int32/bool vectors ``mask_mod`` reads (query coordinates and extents in query
            order, key coordinates and prefix flags in key order).
        block_mask: the BlockMask (batch and, for shared windows, head dimensions of size 1).
        partial_blocks, full_blocks: counts over heads (for cost estimates).
    """
    q_tile: Tile
    kv_tile: Tile
    q_index: torch.Tensor
    q_inverse: torch.Tensor
    kv_index: torch.Tensor
    tables: Dict[str, torch.Tensor]
    block_mask: Any
    partial_blocks: int
    full_blocks: int


def _choose_orders(windows: LayerWindows, num_prefix_tokens: int, block: Tuple[int, int]):
    best = None
    for qt in _candidate_tiles(windows.grid, block[0]):
        q_order = tile_major_order(windows.grid, qt)
        kts = _candidate_tiles(windows.grid, block[1]) if block[1] != block[0] else [qt]
        for kt in kts:
            kv_order = q_order if kt == qt else tile_major_order(windows.grid, kt)
            partial, full, kv_len = block_structure(windows, num_prefix_tokens, q_order, kv_order, block)
            cost = _block_cost(partial, full)
            if best is None or cost < best[0]:
                best = (cost, qt, kt, q_order, kv_order, partial, full, kv_len)
    return best[1:]


def _dense_to_indices(blocks: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(heads, nqb, nkb)`` bool -> BlockMask's ``(1, heads, nqb)`` counts and ``(1, heads, nqb, nkb)``
    indices (listed blocks first, in increasing order)."""
    counts = blocks.sum(-1).astype(np.int32)
    order = np.argsort(~blocks, axis=-1, kind='stable').astype(np.int32)
    return torch.from_numpy(counts[None].copy()), torch.from_numpy(order[None].copy())


def flex_plan(windows: LayerWindows, num_prefix_tokens: int = 0, device: torch.device | str | None = None,
              block: Optional[Sequence[int]] = None) -> FlexPlan:
    """The :class:`FlexPlan` of these windows, cached on ``windows`` per (prefix, device, block)."""
    from torch.nn.attention.flex_attention import BlockMask
    block = tuple(int(b) for b in (block or FLEX_BLOCK))
    dev = torch.device(device) if device is not None else torch.device('cpu')

    def make() -> FlexPlan:
        if dev.type != 'cpu':
            c = flex_plan(windows, num_prefix_tokens, 'cpu', block)
            tables = {k: t.to(dev) for k, t in c.tables.items()}
            return FlexPlan(c.q_tile, c.kv_tile, c.q_index.to(dev), c.q_inverse.to(dev), c.kv_index.to(dev), tables,
                            _block_mask(c.block_mask, tables, windows.per_head, dev), c.partial_blocks, c.full_blocks)
        p = num_prefix_tokens
        h, w = windows.grid
        n = h * w
        qt, kt, q_order, kv_order, partial, full, kv_len = _choose_orders(windows, p, block)
        ys, xs = np.divmod(np.arange(n), w)
        ext = _extents(windows)[:, q_order]  # (heads or 1, n, 4)
        ky = np.full(kv_len, _FAR, dtype=np.int64)
        kx = np.full(kv_len, _FAR, dtype=np.int64)
        ky[:n], kx[:n] = ys[kv_order], xs[kv_order]
        kp = np.zeros(kv_len, dtype=bool)
        kp[kv_len - p:] = True
        kv_index = np.concatenate([p + kv_order, np.arange(p)])
        i32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))  # noqa: E731
        sq = (lambda a: a[0]) if not windows.per_head else (lambda a: a)  # noqa: E731
        tables = {'qy': i32(ys[q_order]), 'qx': i32(xs[q_order]), 'up': i32(sq(ext[..., 0])),
                  'down': i32(sq(ext[..., 1])), 'left': i32(sq(ext[..., 2])), 'right': i32(sq(ext[..., 3])),
                  'ky': i32(ky), 'kx': i32(kx), 'kp': torch.from_numpy(kp)}
        kv_num, kv_idx = _dense_to_indices(partial)
        full_num, full_idx = _dense_to_indices(full)
        mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                        mask_mod=window_mask_mod(tables, windows.per_head), seq_lengths=(n, kv_len))
        inverse = np.empty(n, dtype=np.int64)
        inverse[q_order] = np.arange(n)
        as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        return FlexPlan(qt, kt, as_long(p + q_order), as_long(inverse), as_long(kv_index), tables, mask,
                        int(partial.sum()), int(full.sum()))
    return _CACHE.get(windows, ('flex.plan', num_prefix_tokens, str(dev), block), make)


def _block_mask(cpu_mask, tables: Dict[str, torch.Tensor], per_head: bool, device: torch.device):
    """The CPU BlockMask on ``device``, its ``mask_mod`` reading the device's tables."""
    from torch.nn.attention.flex_attention import BlockMask
    m = cpu_mask.to(device)
    kv_num, kv_idx, full_num, full_idx = m.kv_num_blocks, m.kv_indices, m.full_kv_num_blocks, m.full_kv_indices
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tuple(m.BLOCK_SIZE),
                                    mask_mod=window_mask_mod(tables, per_head), seq_lengths=tuple(m.seq_lengths))


def flex_counts(windows: LayerWindows, num_prefix_tokens: int = 0) -> Tuple[float, float, float]:
    """``(partial block pairs, full block pairs, gathered rows)`` per (batch, head) of the
    ``flex`` backend, in query-key pairs (prefix-query rows included); for cost estimates."""
    def make():
        plan = flex_plan(windows, num_prefix_tokens, 'cpu')
        heads = 1 if not windows.per_head else windows.num_heads
        size = FLEX_BLOCK[0] * FLEX_BLOCK[1] / heads
        t = num_prefix_tokens + windows.num_patches
        rows = 2 * windows.num_patches + 2 * plan.kv_index.numel()
        return (plan.partial_blocks * size + num_prefix_tokens * t, plan.full_blocks * size, float(rows))
    return _CACHE.get(windows, ('flex.counts', num_prefix_tokens), make)


_compiled: Optional[Callable[..., torch.Tensor]] = None
_RECOMPILE_LIMIT = 64


def _flex_kernel(device_type: str) -> Callable[..., torch.Tensor]:
    """Compiled FlexAttention on CUDA (made once, lazily); the plain function elsewhere, and inside
    a graph that ``torch.compile`` is already tracing."""
    global _compiled
    from torch.nn.attention.flex_attention import flex_attention
    if device_type != 'cuda' or torch.compiler.is_compiling():
        return flex_attention
    if _compiled is None:
        # every (shape, dtype, grad) is one graph of this one function: a model at three image
        # sizes, trained and evaluated in two dtypes, needs more than dynamo's default 8
        from torch import _dynamo  # (an `import torch._dynamo` here would make `torch` a local name)
        cfg = _dynamo.config
        for name in ('recompile_limit', 'cache_size_limit'):  # the newer name first; the other is its alias
            if hasattr(cfg, name):
                if getattr(cfg, name) < _RECOMPILE_LIMIT:
                    setattr(cfg, name, _RECOMPILE_LIMIT)
                break
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


class FlexBackend(Backend):
    name = 'flex'
    description = ('FlexAttention with a block-sparse mask of the windows, tokens in tile-major order; compiled '
                   'on CUDA; chosen automatically on CUDA only')
    auto_devices = ('cuda',)
    takes_dropout = False

    def supports(self, query: Query, windows: LayerWindows) -> Optional[str]:
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as e:  # torch < 2.5
            return f'FlexAttention needs torch >= 2.5 ({e})'
        d = query.head_dim
        if query.device.type == 'cpu' and query.grad:
            return 'FlexAttention has no backward pass on CPU (it runs there only for inference and tests)'
        if query.device.type == 'cuda':
            if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                return f'FlexAttention on CUDA needs float16, bfloat16 or float32, got {query.dtype}'
            if d < 16 or d & (d - 1):
                return f'FlexAttention on CUDA needs a power-of-two head_dim >= 16, got {d}'
        return None

    def prepare(self, windows: LayerWindows, query: Query) -> Any:
        return flex_plan(windows, query.prefix, query.device)

    def work(self, query: Query, windows: LayerWindows) -> float:
        from .fused_tiles import ROW_PAIRS
        partial, full, rows = flex_counts(windows, query.prefix)
        return float(query.batch_heads * query.head_dim * (partial + 0.8 * full + ROW_PAIRS * rows))

    def run(self, plan: Plan, q, k, v, scale, dropout_p=0.0, attn_mask=None, probs_hook=None) -> torch.Tensor:
        fp: FlexPlan = plan.data
        p = plan.query.prefix
        dev = q.device.type
        qp = q.index_select(2, fp.q_index)
        kp = k.index_select(2, fp.kv_index)
        vp = v.index_select(2, fp.kv_index)
        kernel = _flex_kernel(dev)
        if dev == 'cuda':
            out = kernel(qp, kp, vp, block_mask=fp.block_mask, scale=scale)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # "flex_attention called without torch.compile()": known, for tests
                out = kernel(qp, kp, vp, block_mask=fp.block_mask, scale=scale)
        patches = out.index_select(2, fp.q_inverse)
        if p == 0:
            return patches
        prefix = F.scaled_dot_product_attention(q[:, :, :p], k, v, scale=scale)
        return torch.cat([prefix, patches], dim=2)


BACKENDS = (FlexBackend(),)


def flex_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: LayerWindows,
                          num_prefix_tokens: int = 0, scale: Optional[float] = None,
                          dropout_p: float = 0.0) -> torch.Tensor:
    """Windowed attention on ``(B, heads, T, head_dim)`` tensors through the ``flex`` backend."""
    from .dispatch import window_attention
    return window_attention(q, k, v, windows, num_prefix_tokens, scale, dropout_p, backend='flex')
