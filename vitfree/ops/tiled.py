"""Tiled window attention: cost and memory linear in the number of patches.

Patch queries are grouped in rectangular tiles of ``th x tw`` patches.  Every tile reads one
*halo*: the smallest block of patches (the same size for all tiles, placed per tile) that holds
the windows of all its patches, plus the prefix tokens.  Inside the tile a boolean mask keeps
each query to its exact rectangle, so the result is the same as the dense reference; only the
work changes, from ``T^2`` query-key pairs to ``tiles * tile_area * (P + halo_area)``.

All tiles and heads of a few batch entries run as one batched matmul / softmax / matmul
(the batch is cut into chunks whose logits fit in cache; there is no Python loop over tiles).
The forward pass keeps no attention probabilities: like flash attention, the backward pass
recomputes them per tile from the saved log-sum-exp, so training memory stays linear too.
Prefix-token queries see every token and take one small plain-softmax call.  Logits and
softmax run in fp32 (fp64 for fp64 inputs) whatever the input dtype.

The index tables and masks (a :class:`TilePlan`) depend only on the windows, the number of
prefix tokens and the tile shape; they are built once with NumPy and kept in this backend's
cache per device (and per dtype for the additive masks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..windows import LayerWindows
from .backend import Backend, Plan, PreparedCache, Query, refuse_second_order
from .bias import PositionBias, bias_heads, offset_index, prefix_query_bias

__all__ = [
    'TiledBackend', 'TilePlan', 'plan_tiles', 'choose_tile', 'tiled_window_attention', 'tiled_cost', 'window_bounds',
    'TileBias', 'tile_position_bias',
]

_CACHE = PreparedCache('tiled')

Tile = Tuple[int, int]

# tile sides tried by choose_tile (besides the full grid side)
_TILE_SIDES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32)
# relative cost of moving one token row (gather of q/k/v, scatter of the output) against one
# query-key pair of the batched attention, and a fixed cost per tile in pairs (small tiles
# make skinny matmuls); least-squares fit of tile sweeps on CPU (grids 24..64, radius 1..6)
_ROW_COST = 16.0
_TILE_COST = 256.0


def window_bounds(windows: LayerWindows) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clipped window rows ``[r0, r1]`` and columns ``[c0, c1]`` of every patch, each ``(H, W)``.

    With per-head windows the union over heads is returned (tiles are shared by the heads)."""
    h, w = windows.grid
    e = windows.extents.astype(np.int64)
    if e.ndim == 4:
        e = e.max(axis=0)  # the bounding box of rectangles around one patch: largest side each
    ys = np.arange(h).reshape(h, 1)
    xs = np.arange(w).reshape(1, w)
    r0 = np.maximum(ys - e[..., 0], 0)
    r1 = np.minimum(ys + e[..., 1], h - 1)
    c0 = np.maximum(xs - e[..., 2], 0)
    c1 = np.minimum(xs + e[..., 3], w - 1)
    return r0, r1, c0, c1


def _tile_reduce(a: np.ndarray, tile: Tile, fill: int, op) -> np.ndarray:
    """Reduce an ``(H, W)`` map over tiles of ``tile`` (padding with ``fill``) -> ``(nty, ntx)``."""
    th, tw = tile
    h, w = a.shape
    nty, ntx = -(-h // th), -(-w // tw)
    pad = np.full((nty * th, ntx * tw), fill, dtype=a.dtype)
    pad[:h, :w] = a
    return op(op(pad.reshape(nty, th, ntx, tw), axis=3), axis=1)


def _halo_shape(bounds, tile: Tile) -> Tuple[Tuple[int, int], Tuple[np.ndarray, ...]]:
    r0, r1, c0, c1 = bounds
    big = np.iinfo(np.int64).max // 4
    ymin = _tile_reduce(r0, tile, big, np.min)
    ymax = _tile_reduce(r1, tile, -1, np.max)
    xmin = _tile_reduce(c0, tile, big, np.min)
    xmax = _tile_reduce(c1, tile, -1, np.max)
    return (int((ymax - ymin).max()) + 1, int((xmax - xmin).max()) + 1), (ymin, xmin)


def _candidate_cost(grid: Tuple[int, int], tile: Tile, halo: Tile, num_prefix_tokens: int) -> float:
    h, w = grid
    th, tw = tile
    nt = (-(-h // th)) * (-(-w // tw))
    q_rows = th * tw
    k_rows = num_prefix_tokens + halo[0] * halo[1]
    return nt * (q_rows * k_rows + _ROW_COST * (2 * q_rows + 2 * k_rows) + _TILE_COST)


def choose_tile(windows: LayerWindows, num_prefix_tokens: int = 0) -> Tile:
    """The tile shape ``(th, tw)`` with the lowest estimated cost for these windows.

    The estimate counts query-key pairs of all tiles (tile area times prefix plus halo area)
    plus the rows gathered and scattered, plus a fixed cost per tile; tiles of 1..32 patches per
    side (and the full grid side) are tried.  Cached on ``windows``."""
    def make():
        h, w = windows.grid
        bounds = window_bounds(windows)
        best, best_cost = None, None
        for th in sorted({s for s in _TILE_SIDES if s < h} | {h}):
            for tw in sorted({s for s in _TILE_SIDES if s < w} | {w}):
                halo, _ = _halo_shape(bounds, (th, tw))
                cost = _candidate_cost(windows.grid, (th, tw), halo, num_prefix_tokens)
                if best_cost is None or cost < best_cost:
                    best, best_cost = (th, tw), cost
        return best
    return _CACHE.get(windows, ('tiled.tile', num_prefix_tokens), make)


@dataclass
class TilePlan:
    """Index tables and masks of one tiling (see the module docstring).

    Token indices count the prefix tokens first (``0..P-1``), then patches row-major.

    Attributes:
        grid, tile, halo: patch grid, tile shape and halo shape ``(rows, cols)``.
        num_prefix_tokens: ``P``.
        num_tiles: number of tiles ``nt``; ``tile_queries = th*tw``, ``tile_keys = P + halo area``.
        query_index: ``(nt * th*tw,)`` token of each tile query (rows past the grid edge repeat a
            valid patch; their results are dropped).
        grad_index: ``(nt * th*tw,)`` patch of each tile query, ``N`` for padding rows (used to
            gather from a patch tensor with one extra zero row).
        key_index: ``(nt * tile_keys,)`` token of each tile key: the prefix, then the halo.
        out_index: ``(N,)`` row of each patch in the tile-major query layout.
        allowed: bool ``(nt, th*tw, tile_keys)`` or ``(heads, nt, th*tw, tile_keys)``; padding
            rows allow everything (they are dropped).
        halo_rows, halo_cols: ``(nt, hh)`` and ``(nt, hw)``: the grid row and column of each tile's
            halo (what a position bias is read at).
    """
    grid: Tuple[int, int]
    tile: Tile
    halo: Tile
    num_prefix_tokens: int
    num_tiles: int
    query_index: torch.Tensor
    grad_index: torch.Tensor
    key_index: torch.Tensor
    out_index: torch.Tensor
    allowed: torch.Tensor
    outside: torch.Tensor  # ~allowed
    halo_rows: torch.Tensor
    halo_cols: torch.Tensor

    @property
    def tile_queries(self) -> int:
        return self.tile[0] * self.tile[1]

    @property
    def tile_keys(self) -> int:
        return self.num_prefix_tokens + self.halo[0] * self.halo[1]

    @property
    def pairs(self) -> int:
        """Query-key pairs computed per (batch, head), prefix queries included."""
        t = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        return self.num_tiles * self.tile_queries * self.tile_keys + self.num_prefix_tokens * t

    def to(self, device: torch.device) -> 'TilePlan':
        return TilePlan(self.grid, self.tile, self.halo, self.num_prefix_tokens, self.num_tiles,
                        self.query_index.to(device), self.grad_index.to(device), self.key_index.to(device),
                        self.out_index.to(device), self.allowed.to(device), self.outside.to(device),
                        self.halo_rows.to(device), self.halo_cols.to(device))


def _build_plan(windows: LayerWindows, num_prefix_tokens: int, tile: Tile) -> TilePlan:
    h, w = windows.grid
    n = h * w
    p = num_prefix_tokens
    th, tw = tile
    nty, ntx = -(-h // th), -(-w // tw)
    nt = nty * ntx
    (hh, hw), (ymin, xmin) = _halo_shape(window_bounds(windows), tile)
    sy = np.clip(ymin, 0, h - hh)  # (nty, ntx): halo origin, shifted inwards at the border
    sx = np.clip(xmin, 0, w - hw)

    # query coordinates per tile: (nty, ntx, th, tw)
    qy = (np.arange(nty) * th)[:, None, None, None] + np.arange(th)[None, None, :, None]
    qx = (np.arange(ntx) * tw)[None, :, None, None] + np.arange(tw)[None, None, None, :]
    qy, qx = np.broadcast_arrays(qy, qx)
    valid = (qy < h) & (qx < w)
    qyc, qxc = np.minimum(qy, h - 1), np.minimum(qx, w - 1)
    patch = qyc * w + qxc
    query_index = (p + patch).reshape(-1)
    grad_index = np.where(valid, patch, n).reshape(-1)
    out_index = np.empty(n, dtype=np.int64)
    out_index[patch[valid]] = np.flatnonzero(valid.reshape(-1))

    # halo coordinates per tile: rows (nty, ntx, hh), cols (nty, ntx, hw)
    ky = sy[:, :, None] + np.arange(hh)
    kx = sx[:, :, None] + np.arange(hw)
    halo_tok = p + ky[:, :, :, None] * w + kx[:, :, None, :]  # (nty, ntx, hh, hw)
    prefix = np.broadcast_to(np.arange(p), (nt, p))
    key_index = np.concatenate([prefix, halo_tok.reshape(nt, hh * hw)], axis=1).reshape(-1)

    # exact rectangles: dy = y_key - y_query, tested against (up, down); same for x
    e = windows.extents.astype(np.int64)[..., qyc, qxc, :]  # (..., nty, ntx, th, tw, 4)
    dy = ky[:, :, None, None, :] - qy[..., None]  # (nty, ntx, th, tw, hh)
    dx = kx[:, :, None, None, :] - qx[..., None]  # (nty, ntx, th, tw, hw)
    ok_y = (dy >= -e[..., 0:1]) & (dy <= e[..., 1:2])
    ok_x = (dx >= -e[..., 2:3]) & (dx <= e[..., 3:4])
    ok = ok_y[..., :, None] & ok_x[..., None, :]  # (..., nty, ntx, th, tw, hh, hw)
    ok = ok | ~valid[..., None, None]
    lead = ok.shape[:-6]
    ok = ok.reshape(*lead, nt, th * tw, hh * hw)
    allowed = np.concatenate([np.ones((*lead, nt, th * tw, p), dtype=bool), ok], axis=-1)

    as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    allowed = torch.from_numpy(np.ascontiguousarray(allowed))
    return TilePlan((h, w), (th, tw), (hh, hw), p, nt, as_long(query_index), as_long(grad_index),
                    as_long(key_index), as_long(out_index), allowed, ~allowed, as_long(ky.reshape(nt, hh)),
                    as_long(kx.reshape(nt, hw)))


def plan_tiles(windows: LayerWindows, num_prefix_tokens: int = 0, tile: Optional[Sequence[int]] = None,
               device: torch.device | str | None = None) -> TilePlan:
    """The :class:`TilePlan` for these windows (tile from :func:`choose_tile` unless given),
    cached on ``windows`` per ``(num_prefix_tokens, tile, device)``."""
    if num_prefix_tokens < 0:
        raise ValueError(f'num_prefix_tokens must be >= 0, got {num_prefix_tokens}')
    if tile is None:
        tile = choose_tile(windows, num_prefix_tokens)
    else:
        tile = tuple(int(t) for t in tile)
        if len(tile) != 2 or min(tile) < 1:
            raise ValueError(f'tile must be two positive ints (rows, cols), got {tile!r}')
        tile = (min(tile[0], windows.grid[0]), min(tile[1], windows.grid[1]))
    dev = torch.device(device) if device is not None else torch.device('cpu')

    def make() -> TilePlan:
        if dev.type == 'cpu':
            return _build_plan(windows, num_prefix_tokens, tile)
        return plan_tiles(windows, num_prefix_tokens, tile, 'cpu').to(dev)
    return _CACHE.get(windows, ('tiled.plan', num_prefix_tokens, tile, str(dev)), make)


def plan_bias(windows: LayerWindows, plan: TilePlan, dtype: torch.dtype) -> torch.Tensor:
    """The plan's additive mask (0 inside windows, -inf outside) in ``dtype``, cached on ``windows``."""
    def make() -> torch.Tensor:
        return torch.zeros(plan.allowed.shape, dtype=dtype, device=plan.allowed.device).masked_fill_(
            plan.outside, float('-inf'))
    return _CACHE.get(windows, ('tiled.bias', plan.num_prefix_tokens, plan.tile, str(plan.allowed.device), dtype), make)


def tiled_cost(windows: LayerWindows, num_prefix_tokens: int = 0) -> Tuple[float, float, float]:
    """``(pairs, rows, tiles)`` of the chosen tiling per (batch, head): query-key pairs computed,
    token rows gathered/scattered and tiles; used by the dispatcher's cost model."""
    def make():
        tile = choose_tile(windows, num_prefix_tokens)
        (hh, hw), _ = _halo_shape(window_bounds(windows), tile)
        h, w = windows.grid
        nt = (-(-h // tile[0])) * (-(-w // tile[1]))
        q_rows, k_rows = tile[0] * tile[1], num_prefix_tokens + hh * hw
        t = num_prefix_tokens + h * w
        pairs = nt * q_rows * k_rows + num_prefix_tokens * t
        rows = nt * (2 * q_rows + 2 * k_rows)
        return float(pairs), float(rows), float(nt)
    return _CACHE.get(windows, ('tiled.cost', num_prefix_tokens), make)


# ---- the kernel ------------------------------------------------------------------------------
def _flat_indices(plan: TilePlan, bh: int, t: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices into ``(bh*T, d)`` / ``(bh*nt*Qt, d)`` views for ``bh = batch*heads`` slices:
    query rows, key rows and patch output rows."""
    dev = plan.key_index.device
    qt_rows = plan.num_tiles * plan.tile_queries
    base_t = torch.arange(bh, device=dev).unsqueeze(1) * t
    base_o = torch.arange(bh, device=dev).unsqueeze(1) * qt_rows
    return ((base_t + plan.query_index).reshape(-1), (base_t + plan.key_index).reshape(-1),
            (base_o + plan.out_index).reshape(-1))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, heads, T, d)`` as a contiguous ``(B*heads*T, d)`` matrix (copies strided inputs)."""
    return x.reshape(-1, x.shape[-1])


# exp() of very negative floats takes a slow path on CPU, so logits more than this far below
# the row maximum are raised to it before exp(); the masked keys are then set to exactly zero
# (a masked fill) so no tiny weights reach the matmuls, where subnormal numbers
# would slow them down by orders of magnitude.  Keys inside a window lose nothing visible:
# e^-60 < 1e-26 of the largest weight.
_LOGIT_FLOOR = -60.0

# batch entries (and heads) per chunk are chosen so one chunk's logits stay near this many
# elements: small enough to stay in cache between the matmul, the softmax and the second
# matmul, and to bound the backward pass's scratch memory
_CHUNK_ELEMS = 1 << 18


def _chunks(plan: TilePlan, b: int, h: int) -> List[Tuple[slice, slice]]:
    """(batch slice, head slice) pieces covering ``b x h``, each near ``_CHUNK_ELEMS`` logits."""
    per_head = plan.num_tiles * plan.tile_queries * plan.tile_keys
    hc = min(h, max(1, _CHUNK_ELEMS // max(per_head, 1)))
    bc = max(1, _CHUNK_ELEMS // max(per_head * h, 1)) if hc == h else 1
    return [(slice(i, min(i + bc, b)), slice(j, min(j + hc, h))) for i in range(0, b, bc) for j in range(0, h, hc)]


def _masks(plan: TilePlan, bias: torch.Tensor, heads: slice):
    """The additive bias and the outside-window mask for the heads of a chunk."""
    outside = plan.outside
    if bias.dim() == 4:  # per-head windows
        bias, outside = bias[heads], outside[heads]
    return bias, outside


# ---- a position bias in the tile layout ---------------------------------------------------------
class TileBias(NamedTuple):
    """A :class:`~vitfree.ops.bias.PositionBias` read at the pairs the tiles visit: ``full``
    ``(B or 1, heads or 1, nt, Qt, Kt)`` (table, prefix and dense parts), ``rows`` ``(B or 1, heads,
    nt, Qt, hh)`` and ``cols`` ``(B or 1, heads, nt, Qt, hw)`` (the decomposed parts, on the halo's
    patch keys only: ``rows[..., a] + cols[..., b]`` is the term of halo key ``(a, b)``)."""
    full: Optional[torch.Tensor]
    rows: Optional[torch.Tensor]
    cols: Optional[torch.Tensor]


def _table_index(windows: LayerWindows, plan: TilePlan, table_shape: Tuple[int, int], has_prefix: bool) -> torch.Tensor:
    """``(nt * Qt * Kt,)`` index into ``[table.flatten(1), prefix, 0]`` of every tile pair (cached)."""
    def make() -> torch.Tensor:
        nt, nq, p = plan.num_tiles, plan.tile_queries, plan.num_prefix_tokens
        (hh, hw), w = plan.halo, plan.grid[1]
        size = table_shape[0] * table_shape[1]
        zero = size + 3
        qp = plan.query_index.view(nt, nq, 1, 1) - p
        if table_shape[0] > 0:
            like = torch.empty(0, *table_shape)
            halo = offset_index(plan.grid, like, qp // w, qp % w, plan.halo_rows.view(nt, 1, hh, 1),
                                plan.halo_cols.view(nt, 1, 1, hw)).reshape(nt, nq, hh * hw)
        else:
            halo = torch.full((nt, nq, hh * hw), zero, dtype=torch.long, device=qp.device)
        pre = torch.full((nt, nq, p), size + 1 if has_prefix else zero, dtype=torch.long, device=qp.device)
        return torch.cat([pre, halo], dim=-1).reshape(-1)
    key = ('tiled.table', plan.num_prefix_tokens, plan.tile, str(plan.allowed.device), tuple(table_shape), has_prefix)
    return _CACHE.get(windows, key, make)


def tile_position_bias(windows: LayerWindows, bias: PositionBias, plan: TilePlan, dtype: torch.dtype) -> TileBias:
    """``bias`` read at the pairs of ``plan``'s tiles, in ``dtype`` (differentiable gathers, so the bias's
    gradients reach the tensors it was made from)."""
    nt, nq, nk, p = plan.num_tiles, plan.tile_queries, plan.tile_keys, plan.num_prefix_tokens
    (hh, hw), (h, w) = plan.halo, plan.grid
    shape = (1, -1, nt, nq)
    full = None
    if bias.table is not None or bias.prefix is not None:
        heads = bias_heads(bias)
        table = bias.table.flatten(1).to(dtype) if bias.table is not None else torch.zeros(
            heads, 0, dtype=dtype, device=plan.allowed.device)
        prefix = bias.prefix.to(dtype) if bias.prefix is not None else table.new_zeros(heads, 3)
        flat = torch.cat([table, prefix, table.new_zeros(heads, 1)], dim=1)
        tshape = tuple(bias.table.shape[1:]) if bias.table is not None else (0, 0)
        full = flat.index_select(1, _table_index(windows, plan, tshape, bias.prefix is not None)).view(*shape, nk)
    if bias.full is not None:
        t = p + h * w
        pair = plan.query_index.view(nt, nq, 1) * t + plan.key_index.view(nt, 1, nk)
        dense = bias.full.flatten(-2).index_select(-1, pair.reshape(-1)).to(dtype)
        dense = dense.view(bias.full.shape[0], bias.full.shape[1], nt, nq, nk)
        full = dense if full is None else full + dense
    qp = (plan.query_index.view(nt, nq, 1) - p)
    rows = cols = None
    if bias.rows is not None:
        idx = (qp * h + plan.halo_rows.view(nt, 1, hh)).reshape(-1)
        rows = bias.rows.flatten(-2).index_select(-1, idx).to(dtype).view(bias.rows.shape[0], -1, nt, nq, hh)
    if bias.cols is not None:
        idx = (qp * w + plan.halo_cols.view(nt, 1, hw)).reshape(-1)
        cols = bias.cols.flatten(-2).index_select(-1, idx).to(dtype).view(bias.cols.shape[0], -1, nt, nq, hw)
    return TileBias(full, rows, cols)


def _part(t: Optional[torch.Tensor], batch: slice, heads: slice) -> Optional[torch.Tensor]:
    """A chunk's share of one tile-bias part (broadcast dimensions are kept whole)."""
    if t is None:
        return None
    return t[batch if t.shape[0] > 1 else slice(None), heads if t.shape[1] > 1 else slice(None)]


def _add_position(s5: torch.Tensor, pos: Optional[TileBias], plan: TilePlan, batch: slice, heads: slice) -> None:
    """Add a chunk's position bias to its ``(b, h, nt, Qt, Kt)`` logits in place."""
    if pos is None:
        return
    full, rows, cols = (_part(t, batch, heads) for t in pos)
    if full is not None:
        s5.add_(full)
    if rows is not None or cols is not None:
        patch = s5[..., plan.num_prefix_tokens:].view(*s5.shape[:-1], *plan.halo)
        if rows is not None:
            patch.add_(rows.unsqueeze(-1))
        if cols is not None:
            patch.add_(cols.unsqueeze(-2))


def _position_grads(ds5: torch.Tensor, pos: Optional[TileBias], plan: TilePlan) -> Tuple[Optional[torch.Tensor], ...]:
    """The gradients of a chunk's tile-bias parts from the logits' gradient ``(b, h, nt, Qt, Kt)``
    (summed over the dimensions a part broadcasts over)."""
    if pos is None:
        return None, None, None

    def reduce(g: torch.Tensor, part: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if part is None:
            return None
        if part.shape[0] == 1 and g.shape[0] > 1:
            g = g.sum(0, keepdim=True)
        if part.shape[1] == 1 and g.shape[1] > 1:
            g = g.sum(1, keepdim=True)
        return g
    patch = ds5[..., plan.num_prefix_tokens:].reshape(*ds5.shape[:-1], *plan.halo)
    rows = reduce(patch.sum(-1), pos.rows) if pos.rows is not None else None
    cols = reduce(patch.sum(-2), pos.cols) if pos.cols is not None else None
    return reduce(ds5, pos.full), rows, cols


def _gather_tiles(q, k, v, plan: TilePlan, scale: float):
    b, h, t, d = q.shape
    nt, nq, nk = plan.num_tiles, plan.tile_queries, plan.tile_keys
    iq, ik, io = _flat_indices(plan, b * h, t)
    qs = _rows(q).index_select(0, iq).view(b * h * nt, nq, d).mul_(scale)
    kt = _rows(k).index_select(0, ik).view(b * h * nt, nk, d)
    vt = _rows(v).index_select(0, ik).view(b * h * nt, nk, v.shape[-1])
    return qs, kt, vt, (iq, ik, io)


def _probabilities(qs, kt, plan: TilePlan, plan_bias, heads: slice, pos: Optional[TileBias], batch: slice,
                   b: int, h: int, lse: Optional[torch.Tensor] = None):
    """Logits of the tiles with the window mask and the position bias, in fp32 (fp64); then either the
    unnormalised probabilities and the row maxima (forward) or, given ``lse``, the probabilities."""
    nt, nq, nk = plan.num_tiles, plan.tile_queries, plan.tile_keys
    s = torch.bmm(qs, kt.transpose(1, 2))
    s = s.to(torch.float64 if s.dtype == torch.float64 else torch.float32)
    bias, outside = _masks(plan, plan_bias, heads)
    s5 = s.view(b, h, nt, nq, nk)
    s5.add_(bias)
    _add_position(s5, pos, plan, batch, heads)
    m = s.amax(-1, keepdim=True) if lse is None else lse
    e = s.sub_(m).clamp_min_(_LOGIT_FLOOR).exp_()
    s5.masked_fill_(outside, 0.0)
    return e, m


def _forward(q, k, v, plan: TilePlan, plan_bias: torch.Tensor, scale: float, heads: slice,
             pos: Optional[TileBias] = None, batch: slice = slice(None)):
    """One chunk: patch outputs ``(b, h, N, dv)`` and the log-sum-exp of every tile row."""
    b, h = q.shape[:2]
    dv = v.shape[-1]
    qs, kt, vt, (_, _, io) = _gather_tiles(q, k, v, plan, scale)
    e, m = _probabilities(qs, kt, plan, plan_bias, heads, pos, batch, b, h)
    denom = e.sum(-1, keepdim=True)
    o = torch.bmm(e.to(v.dtype), vt)  # (b*h*nt, Qt, dv)
    o = o.div_(denom) if o.dtype == denom.dtype else (o / denom).to(v.dtype)
    out = o.view(-1, dv).index_select(0, io).view(b, h, -1, dv)
    return out, m.add_(denom.log_())


def _backward(q, k, v, out, lse, grad_out, plan: TilePlan, plan_bias: torch.Tensor, scale: float, heads: slice,
              pos: Optional[TileBias] = None, batch: slice = slice(None)):
    """One chunk of the backward pass: ``dq, dk, dv`` with the shapes of q, k, v, and the gradients of
    the tile-bias parts."""
    b, h, t, d = q.shape
    dv = v.shape[-1]
    nt, nq, nk, p = plan.num_tiles, plan.tile_queries, plan.tile_keys, plan.num_prefix_tokens
    qs, kt, vt, (_, ik, io) = _gather_tiles(q, k, v, plan, scale)
    prob, _ = _probabilities(qs, kt, plan, plan_bias, heads, pos, batch, b, h, lse)
    acc = prob.dtype
    # grad_out and rowsum(grad_out * out) in the tile layout; padding rows stay zero
    go = grad_out.new_zeros(b * h * nt * nq, dv).index_copy_(0, io, _rows(grad_out))
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1).reshape(-1)
    delta = delta.new_zeros(b * h * nt * nq).index_copy_(0, io, delta)
    go = go.view(b * h * nt, nq, dv)
    dvt = torch.bmm(prob.to(v.dtype).transpose(1, 2), go)
    dp = torch.bmm(go, vt.transpose(1, 2)).to(acc)
    ds = dp.sub_(delta.view(b * h * nt, nq, 1)).mul_(prob)  # d loss / d logits
    del prob, dp
    pos_grads = _position_grads(ds.view(b, h, nt, nq, nk), pos, plan)
    ds = ds.to(q.dtype)
    dqt = torch.bmm(ds, kt).mul_(scale)
    dkt = torch.bmm(ds.transpose(1, 2), qs)
    dq = q.new_zeros(b, h, t, d)
    dq[:, :, p:] = dqt.view(-1, d).index_select(0, io).view(b, h, -1, d)
    dk = k.new_zeros(b * h * t, d).index_add_(0, ik, dkt.view(-1, d)).view(b, h, t, d)
    dvv = v.new_zeros(b * h * t, dv).index_add_(0, ik, dvt.view(-1, dv)).view(b, h, t, dv)
    return (dq, dk, dvv) + pos_grads


def _accumulate(store: List[Optional[torch.Tensor]], grads, pos: TileBias, batch: slice, heads: slice) -> None:
    """Add one chunk's tile-bias gradients into whole-size buffers (broadcast parts accumulate)."""
    for i, (g, part) in enumerate(zip(grads, pos)):
        if g is None:
            continue
        if store[i] is None:
            store[i] = torch.zeros(part.shape, dtype=g.dtype, device=g.device)
        store[i][batch if part.shape[0] > 1 else slice(None), heads if part.shape[1] > 1 else slice(None)] += g


class _TiledAttention(torch.autograd.Function):
    """Patch-query rows of windowed attention; returns ``(B, heads, N, dv)``.

    Runs in (batch, head) chunks sized to stay in cache.  The backward pass recomputes the
    probabilities tile by tile from the saved log-sum-exp instead of storing them.  The tile-layout
    position bias (``full``, ``rows``, ``cols``; any may be None) gets its gradient from the logits'."""

    @staticmethod
    def forward(q, k, v, plan: TilePlan, plan_bias: torch.Tensor, scale: float, pos_full=None, pos_rows=None,
                pos_cols=None):
        b, h = q.shape[:2]
        pos = None if pos_full is None and pos_rows is None and pos_cols is None else TileBias(
            pos_full, pos_rows, pos_cols)
        chunks = _chunks(plan, b, h)
        if len(chunks) == 1:
            out, lse = _forward(q, k, v, plan, plan_bias, scale, slice(None), pos)
            return out, lse.reshape(-1)
        out = v.new_empty(b, h, plan.grid[0] * plan.grid[1], v.shape[-1])
        lses = []
        for bs, hs in chunks:
            out[bs, hs], lse = _forward(q[bs, hs], k[bs, hs], v[bs, hs], plan, plan_bias, scale, hs, pos, bs)
            lses.append(lse.reshape(-1))
        return out, torch.cat(lses)  # every chunk's log-sum-exp, flat, in chunk order

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, plan, plan_bias, scale, pos_full, pos_rows, pos_cols = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, pos_full, pos_rows, pos_cols)
        ctx.plan, ctx.plan_bias, ctx.scale = plan, plan_bias, scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        refuse_second_order('tiled')
        q, k, v, out, lse, pos_full, pos_rows, pos_cols = ctx.saved_tensors
        pos = None if pos_full is None and pos_rows is None and pos_cols is None else TileBias(
            pos_full, pos_rows, pos_cols)
        plan, plan_bias, scale = ctx.plan, ctx.plan_bias, ctx.scale
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dpos: List[Optional[torch.Tensor]] = [None, None, None]
        start = 0
        rows = plan.num_tiles * plan.tile_queries
        for bs, hs in _chunks(plan, q.shape[0], q.shape[1]):
            qc = q[bs, hs]
            n = qc.shape[0] * qc.shape[1] * rows
            lse_c = lse[start:start + n].view(-1, plan.tile_queries, 1)
            start += n
            dq[bs, hs], dk[bs, hs], dv[bs, hs], *grads = _backward(
                qc, k[bs, hs], v[bs, hs], out[bs, hs], lse_c, grad_out[bs, hs], plan, plan_bias, scale, hs, pos, bs)
            if pos is not None:
                _accumulate(dpos, grads, pos, bs, hs)
        return (dq, dk, dv, None, None, None) + tuple(dpos)


def _dense_tile_bias(pos: TileBias, plan: TilePlan) -> Optional[torch.Tensor]:
    """The tile-layout bias as one ``(B or 1, heads, nt, Qt, Kt)`` tensor (for the plain-autograd path)."""
    out = pos.full
    if pos.rows is not None or pos.cols is not None:
        hh, hw = plan.halo
        r = pos.rows.unsqueeze(-1) if pos.rows is not None else 0
        c = pos.cols.unsqueeze(-2) if pos.cols is not None else 0
        patch = (r + c).flatten(-2)
        patch = F.pad(patch, [plan.num_prefix_tokens, 0])
        out = patch if out is None else out + patch
    return out


def _tiled_with_dropout(q, k, v, plan: TilePlan, plan_bias: torch.Tensor, scale: float, dropout_p: float,
                        pos: Optional[TileBias] = None) -> torch.Tensor:
    """Plain-autograd version (keeps the probabilities) for attention dropout."""
    b, h, t, d = q.shape
    dv = v.shape[-1]
    nt, nq, nk = plan.num_tiles, plan.tile_queries, plan.tile_keys
    iq, ik, io = _flat_indices(plan, b * h, t)
    qs = _rows(q).index_select(0, iq).view(b * h * nt, nq, d) * scale
    kt = _rows(k).index_select(0, ik).view(b * h * nt, nk, d)
    vt = _rows(v).index_select(0, ik).view(b * h * nt, nk, dv)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.bmm(qs, kt.transpose(1, 2)).to(acc)
    s5 = s.view(b, h, nt, nq, nk) + plan_bias
    extra = None if pos is None else _dense_tile_bias(pos, plan)
    if extra is not None:
        s5 = s5 + extra
    prob = F.dropout(s5.view(b * h * nt, nq, nk).softmax(-1), p=dropout_p).to(v.dtype)
    o = torch.bmm(prob, vt)
    return o.view(-1, dv).index_select(0, io).view(b, h, -1, dv)


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TilePlan, bias: torch.Tensor,
                    scale: float, dropout_p: float = 0.0, pos: Optional[TileBias] = None,
                    prefix_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernel on checked ``(B, heads, T, d)`` inputs of one dtype, outside autocast: patches
    tile by tile, prefix queries by one small SDPA call.  bf16/fp16 inputs are widened to fp32 for
    the whole computation (the output is rounded once, to the input dtype).  ``pos`` and
    ``prefix_bias``: a position bias in the tile layout (:func:`tile_position_bias`) and on the
    prefix queries' rows (:func:`~vitfree.ops.bias.prefix_query_bias`)."""
    p = plan.num_prefix_tokens
    out_dtype = q.dtype
    if q.dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    if dropout_p > 0.0:
        patches = _tiled_with_dropout(q, k, v, plan, bias, scale, dropout_p, pos)
    else:
        patches = _TiledAttention.apply(q, k, v, plan, bias, scale, *(pos or (None, None, None)))[0]
    if p > 0:
        # prefix queries see every token: a few rows of plain SDPA (which keeps views, not
        # copies, of the strided k and v for its backward pass)
        mask = None if prefix_bias is None else prefix_bias.to(q.dtype)
        prefix = F.scaled_dot_product_attention(q[:, :, :p], k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        patches = torch.cat([prefix, patches], dim=2)
    return patches.to(out_dtype)


def _bias_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class TiledBackend(Backend):
    name = 'tiled'
    description = 'tiles of queries against their halo of keys, batched matmuls; O(T * window); any device'
    takes_bias = True

    def prepare(self, windows: LayerWindows, query: Query) -> Any:
        plan = plan_tiles(windows, query.prefix, None, query.device)
        return plan, plan_bias(windows, plan, _bias_dtype(query.dtype))

    def work(self, query: Query, windows: LayerWindows) -> float:
        pairs, rows, tiles = tiled_cost(windows, query.prefix)
        return float(query.batch_heads * (query.head_dim * (pairs + _ROW_COST * rows) + TILE_WORK * tiles))

    def run(self, plan: Plan, q, k, v, scale, dropout_p=0.0, attn_mask=None, probs_hook=None,
            bias: Optional[PositionBias] = None) -> torch.Tensor:
        tiles, mask = plan.data
        if bias is None:
            return tiled_attention(q, k, v, tiles, mask, scale, dropout_p)
        acc = _bias_dtype(q.dtype)
        pos = tile_position_bias(plan.windows, bias, tiles, acc)
        pre = prefix_query_bias(bias, tiles.grid, tiles.num_prefix_tokens, q.new_empty(0, dtype=acc)) \
            if tiles.num_prefix_tokens else None
        return tiled_attention(q, k, v, tiles, mask, scale, dropout_p, pos, pre)


BACKENDS = (TiledBackend(),)

# one tile's fixed cost in pair-channels of work (CPU fit of the first development machine)
TILE_WORK = 16000.0


def tiled_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: LayerWindows,
                           num_prefix_tokens: int = 0, scale: Optional[float] = None, dropout_p: float = 0.0,
                           tile: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Windowed attention on ``(B, heads, T, head_dim)`` tensors computed tile by tile (see the module
    docstring); the same result as the dense reference.  ``tile=(th, tw)`` overrides the automatic
    tile shape; otherwise this is the ``tiled`` backend through the dispatcher."""
    from .dispatch import check_inputs, compute_dtype, window_attention
    if tile is None:
        return window_attention(q, k, v, windows, num_prefix_tokens, scale, dropout_p, backend='tiled')
    check_inputs(q, k, v, windows, num_prefix_tokens, dropout_p)
    dt = compute_dtype(q)
    tiles = plan_tiles(windows, num_prefix_tokens, tile, q.device)
    bias = plan_bias(windows, tiles, _bias_dtype(dt))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with torch.autocast(q.device.type, enabled=False):
        return tiled_attention(q.to(dt), k.to(dt), v.to(dt), tiles, bias, scale, dropout_p)
