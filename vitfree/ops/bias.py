"""An additive position bias inside the windows (METHODS §1.7), described once for every backend.

A family may add a per-head term ``b_h(i, j)`` to the logits of the pairs a query may see:
``q_i . k_j * scale + b_h(i, j)``.  :class:`PositionBias` says what that term is, in forms a
linear-cost kernel can evaluate on the pairs it visits without ever building a ``T x T`` tensor:

* ``table`` ``(heads, 2*ry + 1, 2*rx + 1)``: a term per relative offset of two patches,
  ``table[h, clamp(y_i - y_j, -ry, ry) + ry, clamp(x_i - x_j, -rx, rx) + rx]`` (BEiT's relative
  position table; offsets past the table take its edge);
* ``prefix`` ``(heads, 3)``: the terms of pairs with a prefix token: a prefix query and a patch
  key, a patch query and a prefix key, two prefix tokens (BEiT's three class-token entries);
* ``rows`` ``(B or 1, heads, N, H)`` and ``cols`` ``(B or 1, heads, N, W)``: a term per query and
  key row plus one per query and key column, ``rows[b, h, i, y_j] + cols[b, h, i, x_j]`` (SAM's
  decomposed relative positions, which depend on the query);
* ``full`` ``(B or 1, heads or 1, T, T)``: any dense bias, added as it is (no linear kernel can
  avoid reading it whole).

Fields left ``None`` add nothing.  Every part is an ordinary tensor computed by the layer from its
parameters, so gradients flow into those parameters through whatever the kernel returns for the
bias.  :func:`dense_position_bias` is the dense materialisation (the reference, and what
``dense``, ``eager`` and traced graphs add).  Backends that can add a bias say so with
``takes_bias``: ``True`` for every part (``dense``, ``eager``, ``global``, ``tiled``), or the names
of the parts they take (``native``: ``table``, ``prefix``, ``rows`` and ``cols``, evaluated in the
kernel on the pairs it visits, not ``full``); a :class:`~vitfree.ops.backend.Query` records the
parts a call has (:func:`bias_parts`), and the dispatcher never gives a backend a part it cannot
add.  Plain tensor operations throughout, so TorchScript, FX and ``torch.export`` trace them.
"""

from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ['PositionBias', 'position_bias', 'dense_position_bias', 'prefix_query_bias', 'offset_index',
           'bias_batch', 'bias_heads', 'bias_parts', 'bias_shape_error', 'PARTS']

PARTS = ('table', 'prefix', 'rows', 'cols', 'full')  # the fields of PositionBias, in order


class PositionBias(NamedTuple):
    """See the module docstring (a plain tuple of optional tensors, so TorchScript can pass it)."""
    table: Optional[torch.Tensor]
    prefix: Optional[torch.Tensor]
    rows: Optional[torch.Tensor]
    cols: Optional[torch.Tensor]
    full: Optional[torch.Tensor]


def position_bias(table: Optional[torch.Tensor] = None, prefix: Optional[torch.Tensor] = None,
                  rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None,
                  full: Optional[torch.Tensor] = None) -> PositionBias:
    """A :class:`PositionBias` with the given parts (the others ``None``)."""
    return PositionBias(table, prefix, rows, cols, full)


def bias_parts(bias: Union['PositionBias', bool, None, Tuple[str, ...]]) -> Tuple[str, ...]:
    """The names of the parts a bias has, in :data:`PARTS` order (what a :class:`~vitfree.ops.backend.Query`
    records): ``()`` for None or False; ``True`` (a bias of unknown parts) counts as every part."""
    if bias is None or bias is False:
        return ()
    if bias is True:
        return PARTS
    if isinstance(bias, PositionBias):
        return tuple(name for name, part in zip(PARTS, bias) if part is not None)
    return tuple(name for name in PARTS if name in bias)


def bias_shape_error(bias: PositionBias, batch: int, heads: int, grid: Tuple[int, int],
                     num_prefix_tokens: int) -> Optional[str]:
    """None when every part of ``bias`` fits ``(batch, heads)`` queries on ``grid`` with
    ``num_prefix_tokens`` prefix tokens, else what is wrong: the part, its shape and the shape accepted
    (the one check of these shapes: the dispatcher's input contract, and the native kernel's arguments)."""
    h, w = grid
    n, t = h * w, num_prefix_tokens + h * w
    wants = {'table': f'(heads={heads}, 2*ry+1, 2*rx+1) with odd sides', 'prefix': f'({heads}, 3)',
             'rows': f'(1 or {batch}, {heads}, {n}, {h})', 'cols': f'(1 or {batch}, {heads}, {n}, {w})',
             'full': f'(1 or {batch}, 1 or {heads}, {t}, {t})'}
    for name, part in zip(PARTS, bias):
        if part is None:
            continue
        s = tuple(part.shape) if torch.is_tensor(part) else None
        ok = s is not None and part.dtype.is_floating_point and {
            'table': lambda: len(s) == 3 and s[0] == heads and s[1] % 2 == 1 and s[2] % 2 == 1,
            'prefix': lambda: s == (heads, 3),
            'rows': lambda: len(s) == 4 and s[0] in (1, batch) and s[1:] == (heads, n, h),
            'cols': lambda: len(s) == 4 and s[0] in (1, batch) and s[1:] == (heads, n, w),
            'full': lambda: len(s) == 4 and s[0] in (1, batch) and s[1] in (1, heads) and s[2:] == (t, t),
        }[name]()
        if not ok:
            got = f'{s} {part.dtype}' if s is not None else type(part).__name__
            return f'bias.{name} must be a floating tensor of shape {wants[name]}, got {got}'
    return None


def offset_index(grid: Tuple[int, int], table: torch.Tensor, qy: torch.Tensor, qx: torch.Tensor,
                 ky: torch.Tensor, kx: torch.Tensor) -> torch.Tensor:
    """Flat index into ``table.flatten(1)`` of the offsets between query patches ``(qy, qx)`` and key
    patches ``(ky, kx)`` (broadcast against each other), clamped to the table."""
    ry, rx = (table.shape[-2] - 1) // 2, (table.shape[-1] - 1) // 2
    dy = (qy - ky).clamp(-ry, ry) + ry
    dx = (qx - kx).clamp(-rx, rx) + rx
    return dy * table.shape[-1] + dx


def _coords(grid: Tuple[int, int], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    h, w = grid[0], grid[1]
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    return ys, xs


def bias_batch(bias: PositionBias) -> int:
    """The batch size of the batched parts (1 when none is batched)."""
    b = 1
    for part in (bias.rows, bias.cols, bias.full):
        if part is not None:
            b = max(b, part.shape[0])
    return b


def bias_heads(bias: PositionBias) -> int:
    h = 1
    for part in (bias.table, bias.prefix):
        if part is not None:
            h = max(h, part.shape[0])
    for part in (bias.rows, bias.cols, bias.full):
        if part is not None:
            h = max(h, part.shape[1])
    return h


def _patch_part(bias: PositionBias, grid: Tuple[int, int], like: torch.Tensor) -> Optional[torch.Tensor]:
    """The bias among patches, ``(B or 1, heads, N, N)``, or None when no part adds to it."""
    ys, xs = _coords(grid, like.device)
    out: Optional[torch.Tensor] = None
    table = bias.table
    if table is not None:
        idx = offset_index(grid, table, ys.view(-1, 1), xs.view(-1, 1), ys.view(1, -1), xs.view(1, -1))
        n = ys.shape[0]
        out = table.flatten(1).index_select(1, idx.reshape(-1)).view(1, table.shape[0], n, n)
    rows, cols = bias.rows, bias.cols
    if rows is not None and cols is not None:  # key j = (y_j, x_j) row-major: one broadcast sum
        part = (rows.unsqueeze(-1) + cols.unsqueeze(-2)).flatten(-2)
        out = part if out is None else out + part
    elif rows is not None:
        part = rows.index_select(-1, ys)
        out = part if out is None else out + part
    elif cols is not None:
        part = cols.index_select(-1, xs)
        out = part if out is None else out + part
    return out


def dense_position_bias(bias: PositionBias, grid: Tuple[int, int], num_prefix_tokens: int,
                        like: torch.Tensor) -> torch.Tensor:
    """The whole bias as a ``(B or 1, heads or 1, T, T)`` tensor in ``like``'s dtype (the reference)."""
    p = num_prefix_tokens
    n = grid[0] * grid[1]
    t = p + n
    patch = _patch_part(bias, grid, like)
    heads = bias_heads(bias)
    if patch is None:
        out = torch.zeros(1, heads, t, t, dtype=like.dtype, device=like.device)
    elif p == 0:
        out = patch.to(like.dtype)
    else:
        out = F.pad(patch.to(like.dtype), [p, 0, p, 0])
    pre = bias.prefix
    if pre is not None and p > 0:
        frame = torch.zeros(heads, t, t, dtype=like.dtype, device=like.device)
        pre = pre.to(like.dtype)
        frame[:, :p, p:] = pre[:, 0].view(-1, 1, 1).expand(heads, p, n)
        frame[:, p:, :p] = pre[:, 1].view(-1, 1, 1).expand(heads, n, p)
        frame[:, :p, :p] = pre[:, 2].view(-1, 1, 1).expand(heads, p, p)
        out = out + frame.unsqueeze(0)
    full = bias.full
    if full is not None:
        out = out + full.to(like.dtype)
    return out


def prefix_query_bias(bias: PositionBias, grid: Tuple[int, int], num_prefix_tokens: int,
                      like: torch.Tensor) -> Optional[torch.Tensor]:
    """The rows of the prefix queries, ``(B or 1, heads or 1, P, T)`` (None when nothing adds to them):
    what a kernel that runs the prefix queries apart adds to their logits."""
    p = num_prefix_tokens
    n = grid[0] * grid[1]
    out: Optional[torch.Tensor] = None
    pre = bias.prefix
    if pre is not None:
        pre = pre.to(like.dtype)
        out = torch.cat([pre[:, 2].view(-1, 1, 1).expand(-1, p, p), pre[:, 0].view(-1, 1, 1).expand(-1, p, n)],
                        dim=-1).unsqueeze(0)
    full = bias.full
    if full is not None:
        part = full[..., :p, :].to(like.dtype)
        out = part if out is None else out + part
    return out
