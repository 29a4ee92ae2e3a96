"""Window specifications: which patches each patch may attend to, block by block.

A window is an axis-aligned rectangle of patches around a query patch, written as four
non-negative extents ``(up, down, left, right)`` counted in patches.  Patch ``j`` lies in the
window of patch ``i`` when ``-up <= y_j - y_i <= down`` and ``-left <= x_j - x_i <= right``; a
window that reaches past the grid is cut off at the border (it is never moved back inside),
and it always holds the query patch itself, so no attention row can be empty.

Prefix tokens (class token, register tokens) are never constrained: they see every token and
every token sees them.  A block may also be ``global``: then it is an unmodified ViT block.

This module holds plain values (NumPy arrays) and builds masks with torch; it caches nothing
(every backend keeps what it prepares for some windows in its own room, :mod:`vitfree.ops`) and
has no ``torch.nn`` in it.  The file format is documented in :meth:`WindowSpec.to_dict`.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import json
import operator
import os
import re
import stat
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    'WindowSpec', 'LayerWindows', 'WindowSpecError', 'SPEC_FORMAT', 'SPEC_VERSION',
    'resize_extents', 'window_mask', 'extents_mask', 'to_grid', 'RESIZE_MODES', 'list_specs', 'get_spec', 'resolve_spec',
    'partition_extents', 'partition_cell', 'MAX_GRID_SIDE', 'MAX_DEPTH', 'MAX_SPEC_CELLS', 'MAX_SPEC_BYTES',
    'check_int', 'file_problem', 'read_text_file', 'parse_json', 'parse_yaml',
]

SPEC_FORMAT = 'vitfree.window_spec'
SPEC_VERSION = 1
SIDES = ('up', 'down', 'left', 'right')
PROVENANCE_KINDS = ('measured', 'prior', 'uniform')
Grid = Tuple[int, int]
ExtentLike = Union[int, Sequence[int], np.ndarray]


class WindowSpecError(ValueError):
    """A window specification (or the file holding it) is malformed or does not fit."""


MAX_GRID_SIDE = 4096  # patches per side: a 65536 px image at patch 16; larger grids are refused before any work
MAX_DEPTH = 4096  # blocks in one spec
MAX_SPEC_CELLS = 1 << 26  # windowed blocks x patches (x heads): 1 GiB of int32 extents
MAX_SPEC_BYTES = 64 << 20  # size of a spec file (YAML or JSON) read by WindowSpec.load


def integral(value: Any) -> Optional[int]:
    """``value`` as a Python int when it is an integer (Python or NumPy ints, 0-d integer tensors,
    floats with no fractional part), else None.  Booleans and strings are not integers here."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        return None
    if isinstance(value, (float, np.floating)):
        return int(value) if np.isfinite(value) and float(value).is_integer() else None
    if torch.is_tensor(value) and (value.dtype == torch.bool or value.dtype.is_floating_point):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_int(value: Any, name: str, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` as an int in ``[low, high]``; otherwise :class:`WindowSpecError` naming ``name``, the
    value and the range."""
    v = integral(value)
    if v is None or (low is not None and v < low) or (high is not None and v > high):
        span = (f' in [{low}, {high}]' if low is not None and high is not None else
                f' >= {low}' if low is not None else f' <= {high}' if high is not None else '')
        raise WindowSpecError(f'{name} must be an integer{span}, got {value!r:.80}')
    return v


def to_grid(grid: Union[int, Sequence[int]], name: str = 'grid') -> Grid:
    """Normalise ``14`` or ``(14, 14)`` to a ``(H, W)`` tuple of positive ints, each at most
    :data:`MAX_GRID_SIDE`.  Booleans, strings and non-integral floats are refused."""
    if isinstance(grid, np.ndarray) and grid.ndim == 0:
        grid = grid.item()
    if integral(grid) is not None:
        pair = (grid, grid)
    elif isinstance(grid, (str, bytes, Mapping)) or not isinstance(grid, (Sequence, np.ndarray, torch.Size)):
        raise WindowSpecError(f'{name} must be an int or a pair of ints (H, W), got {grid!r:.80}')
    else:
        pair = tuple(grid)
        if len(pair) != 2:
            raise WindowSpecError(f'{name} must be an int or a pair of ints (H, W), got {len(pair)} values: '
                                  f'{grid!r:.80}')
    h, w = (integral(g) for g in pair)
    if h is None or w is None:
        raise WindowSpecError(f'{name} must be an int or a pair of ints (H, W), got {grid!r:.80}')
    if h < 1 or w < 1:
        raise WindowSpecError(f'{name} must be positive, got {(h, w)}')
    if max(h, w) > MAX_GRID_SIDE:
        raise WindowSpecError(f'{name} {h}x{w} is too large: at most {MAX_GRID_SIDE} patches per side')
    return h, w


EXTENT_LIMIT = 2 ** 31  # extents are stored as int32; anything at or beyond the grid is clipped anyway


def _bool_in(value: Any) -> Any:
    """The first boolean inside nested lists/tuples (a Python bool silently becomes 1 in NumPy), else None."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (bool, np.bool_)):
            return v
        if isinstance(v, (list, tuple)):
            stack.extend(v)
    return None


def _as_extents(value: ExtentLike, grid: Grid, where: str) -> np.ndarray:
    """Turn a radius, a 4-tuple or an array into a validated, clipped int32 extents array.

    Every value must be an integer in ``[0, 2**31)`` (booleans and fractional floats are refused);
    it is checked as given, before any cast.  An extent that reaches past the grid means "the whole
    axis" and is stored clipped to it (``H - 1`` up and down, ``W - 1`` left and right), which
    selects exactly the same patches."""
    h, w = grid
    if isinstance(value, (list, tuple)) and _bool_in(value) is not None:
        raise WindowSpecError(f'{where}: extents must be integers, got {_bool_in(value)!r} in {value!r:.80}')
    if torch.is_tensor(value):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object:  # Python ints too large for int64, or mixed types
        for v in arr.reshape(-1):
            if integral(v) is None or isinstance(v, (float, np.floating)):
                raise WindowSpecError(f'{where}: extents must be integers, got {v!r:.80}')
            if not 0 <= v < EXTENT_LIMIT:
                raise WindowSpecError(f'{where}: extents must be integers in [0, 2**31), got {v!r}')
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in 'iu':
        if arr.dtype.kind == 'f' and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            if arr.size and (arr.min() < 0 or arr.max() >= EXTENT_LIMIT):
                v = arr.reshape(-1)[np.argmax((arr.reshape(-1) < 0) | (arr.reshape(-1) >= EXTENT_LIMIT))]
                raise WindowSpecError(f'{where}: extents must be integers in [0, 2**31), got {v!r}')
            arr = arr.astype(np.int64)
        elif arr.dtype.kind == 'f' and arr.ndim:
            flat = arr.reshape(-1)
            i = int(np.argmax(~np.isfinite(flat) | (flat != np.round(flat))))
            raise WindowSpecError(f'{where}: extents must be integers, got {flat[i].item()!r} at index '
                                  f'{tuple(int(k) for k in np.unravel_index(i, arr.shape))}')
        else:
            raise WindowSpecError(f'{where}: extents must be integers, got {value!r:.80} (dtype {arr.dtype})')
    if arr.ndim == 0:  # one radius on every side
        arr = np.broadcast_to(arr.reshape(1, 1, 1), (h, w, 4))
    elif arr.shape == (4,):  # one (up, down, left, right) for every patch
        arr = np.broadcast_to(arr.reshape(1, 1, 4), (h, w, 4))
    if arr.ndim not in (3, 4) or arr.shape[-3:] != (h, w, 4):
        raise WindowSpecError(
            f'{where}: extents must have shape (H, W, 4) = {(h, w, 4)} or (heads, H, W, 4), '
            f'got {tuple(arr.shape)}')
    if arr.ndim == 4 and arr.shape[0] < 1:
        raise WindowSpecError(f'{where}: per-head extents need at least one head, got shape {arr.shape}')
    if arr.size:
        out_of_range = (arr < 0) | (arr >= EXTENT_LIMIT) if arr.dtype.kind == 'i' else arr >= EXTENT_LIMIT
        if out_of_range.any():
            idx = tuple(int(i) for i in np.argwhere(out_of_range)[0])
            raise WindowSpecError(
                f'{where}: extents must be integers in [0, 2**31), got {arr[idx].item()!r} at index {idx} '
                f'(side {SIDES[idx[-1]]!r})')
    limit = np.array([h - 1, h - 1, w - 1, w - 1], dtype=np.int64)
    arr = np.ascontiguousarray(np.minimum(arr.astype(np.int64), limit), dtype=np.int32)
    arr.setflags(write=False)
    return arr


RESIZE_MODES = ('scale', 'keep')


def resize_extents(extents: np.ndarray, src: Grid, dst: Grid, mode: str = 'scale') -> np.ndarray:
    """Resize one block's extents from grid ``src`` to grid ``dst``.

    The per-patch map is resampled by nearest neighbour (patch centres).  ``mode='scale'``
    (default): vertical extents scale by ``H_dst / H_src`` and horizontal ones by
    ``W_dst / W_src``, rounded up (exact integer arithmetic), so a window keeps its share of
    the image; an extent that covers its whole axis keeps covering it.  ``mode='keep'``: extents
    stay in patches (clipped to the new grid), so windows keep their size in patches and the
    cost stays linear at any resolution.  Partition windows (:func:`partition_extents`) stay
    partitions: their cell scales (or keeps its size) the same way.  ``src == dst`` returns the
    array unchanged.
    """
    mode = check_resize_mode(mode)
    src, dst = to_grid(src), to_grid(dst)
    if src == dst:
        return extents
    parts = _resize_partitions(extents, src, dst, mode)
    if parts is not None:
        return parts
    (hs, ws), (hd, wd) = src, dst
    # nearest neighbour on patch centres: source index floor((i + 0.5) * S / D)
    ys = np.minimum(((2 * np.arange(hd) + 1) * hs) // (2 * hd), hs - 1)
    xs = np.minimum(((2 * np.arange(wd) + 1) * ws) // (2 * wd), ws - 1)
    out = extents[..., ys, :, :][..., :, xs, :].astype(np.int64)
    if mode == 'scale':
        whole = out >= np.array([hs - 1, hs - 1, ws - 1, ws - 1])
        out[..., 0:2] = (out[..., 0:2] * hd + hs - 1) // hs  # ceil(e * hd / hs)
        out[..., 2:4] = (out[..., 2:4] * wd + ws - 1) // ws
        out[whole] = np.broadcast_to(np.array([hd - 1, hd - 1, wd - 1, wd - 1]), out.shape)[whole]
    out = np.minimum(out, np.array([hd - 1, hd - 1, wd - 1, wd - 1]))
    out = np.ascontiguousarray(out, dtype=np.int32)
    out.setflags(write=False)
    return out


def check_resize_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise WindowSpecError(f'window resize mode must be one of {RESIZE_MODES}, got {mode!r}')
    return mode


# ---- partition windows (METHODS §1.6) -----------------------------------------------------------
def partition_extents(grid: Grid, cell: Union[int, Sequence[int]]) -> np.ndarray:
    """The extents of partition windows (ViTDet / SAM): the grid is tiled into ``sh x sw`` cells from
    the top-left corner (padded at the bottom and right, as SAM pads) and each patch's window is the cell
    that holds it, clipped to the grid.  ``(H, W, 4)`` int32, read-only."""
    h, w = to_grid(grid)
    sh, sw = to_grid(cell, 'partition cell')
    ys, xs = np.arange(h), np.arange(w)
    up, left = ys % sh, xs % sw
    down = np.minimum(ys - up + sh, h) - 1 - ys
    right = np.minimum(xs - left + sw, w) - 1 - xs
    e = np.stack(np.broadcast_arrays(up[:, None], down[:, None], left[None, :], right[None, :]), axis=-1)
    e = np.ascontiguousarray(e, dtype=np.int32)
    e.setflags(write=False)
    return e


def partition_cell(plane: np.ndarray, grid: Grid) -> Optional[Grid]:
    """``(sh, sw)`` when one ``(H, W, 4)`` window map is exactly a partition of the grid, else None."""
    if plane.ndim != 3 or plane.shape[:2] != tuple(grid):
        return None
    cell = (int(plane[..., 0].max()) + 1, int(plane[..., 2].max()) + 1)
    return cell if np.array_equal(plane, partition_extents(grid, cell)) else None


_PARTITION = re.compile(r'\s*partition\s*\(\s*([0-9]+)\s*(?:,\s*([0-9]+)\s*)?\)\s*')


def parse_partition(text: str, grid: Grid, where: str) -> np.ndarray:
    """The extents of ``'partition(s)'`` or ``'partition(sh, sw)'`` on ``grid``."""
    m = _PARTITION.fullmatch(text)
    if m is None:
        raise WindowSpecError(f"{where}: expected 'global', 'partition(s)', 'partition(sh, sw)' or extents, got "
                              f"{text!r:.80}")
    sh = int(m.group(1))
    sw = int(m.group(2)) if m.group(2) is not None else sh
    if min(sh, sw) < 1 or max(sh, sw) > MAX_GRID_SIDE:
        raise WindowSpecError(f'{where}: partition cells must be 1..{MAX_GRID_SIDE} patches per side, got {text!r}')
    return partition_extents(grid, (sh, sw))


def _encode_partition(cell: Grid) -> str:
    return f'partition({cell[0]})' if cell[0] == cell[1] else f'partition({cell[0]}, {cell[1]})'


def _resize_partitions(extents: np.ndarray, src: Grid, dst: Grid, mode: str) -> Optional[np.ndarray]:
    """Partition windows on another grid, still partitions: the cell keeps its size in patches
    (``keep``) or its share of the image (``scale``, rounded up); None when ``extents`` holds another kind."""
    planes = extents if extents.ndim == 4 else extents[None]
    cells = [partition_cell(p, src) for p in planes]
    if any(c is None for c in cells):
        return None
    if mode == 'scale':
        cells = [(-(-c[0] * dst[0] // src[0]), -(-c[1] * dst[1] // src[1])) for c in cells]
    out = np.stack([partition_extents(dst, c) for c in cells])
    out = np.ascontiguousarray(out if extents.ndim == 4 else out[0])
    out.setflags(write=False)
    return out


def window_mask(
        extents: Union[np.ndarray, torch.Tensor],
        num_prefix_tokens: int = 0,
        device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """Boolean attention mask (``True`` = may attend) for extents of shape ``(H, W, 4)``
    (gives ``(T, T)``) or ``(heads, H, W, 4)`` (gives ``(heads, T, T)``), ``T = P + H*W``.

    Queries are rows.  Prefix rows and columns are all ``True``.
    """
    if num_prefix_tokens < 0:
        raise WindowSpecError(f'num_prefix_tokens must be >= 0, got {num_prefix_tokens}')
    if torch.is_tensor(extents):
        ext = extents.to(device=device)
    else:
        ext = torch.from_numpy(np.array(extents, dtype=np.int64)).to(device)
    return extents_mask(ext, num_prefix_tokens)


def extents_mask(extents: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """:func:`window_mask` of an extents tensor in plain tensor operations (no NumPy, no Python
    branch on a value), so TorchScript, FX, ``torch.export`` and ONNX export can trace it."""
    h, w = extents.shape[-3], extents.shape[-2]
    n = h * w
    ys = torch.arange(h, device=extents.device).repeat_interleave(w)
    xs = torch.arange(w, device=extents.device).repeat(h)
    dy = ys.view(1, n) - ys.view(n, 1)  # y_j - y_i, rows are queries i
    dx = xs.view(1, n) - xs.view(n, 1)
    e = extents.flatten(-3, -2).to(torch.int64).unsqueeze(-2)  # (..., n, 1, 4)
    patch = (dy >= -e[..., 0]) & (dy <= e[..., 1]) & (dx >= -e[..., 2]) & (dx <= e[..., 3])
    p = num_prefix_tokens
    if p == 0:
        return patch
    return F.pad(patch.to(torch.uint8), [p, 0, p, 0], value=1.0).to(torch.bool)


class LayerWindows:
    """The windows of one (non-global) block at one grid size: a value.

    ``extents`` is an int32 array ``(H, W, 4)`` or ``(heads, H, W, 4)``.  Instances are
    immutable and interned by content: constructing equal windows twice gives the same object,
    in one model or many, so whatever a backend prepares for them (tile plans, biases; each
    backend keeps its own, see :class:`vitfree.ops.backend.PreparedCache`) is made once.  Nothing
    derived from the windows is stored here.
    """

    _live: 'weakref.WeakValueDictionary[str, LayerWindows]' = weakref.WeakValueDictionary()

    def __new__(cls, extents: np.ndarray, grid: Grid) -> 'LayerWindows':
        grid = to_grid(grid)
        ext = _as_extents(extents, grid, 'LayerWindows')
        digest = hashlib.blake2b(ext.tobytes(), digest_size=12).hexdigest()
        key = f'{grid[0]}x{grid[1]}:{"x".join(map(str, ext.shape))}:{digest}'
        obj = cls._live.get(key)
        if obj is None:
            obj = super().__new__(cls)
            obj.grid = grid
            obj.extents = ext
            obj.key = key
            # plain Python facts, so that code traced by torch.compile never reads the NumPy array
            obj.per_head = ext.ndim == 4
            obj.num_heads = int(ext.shape[0]) if obj.per_head else None
            obj.num_patches = grid[0] * grid[1]
            obj = cls._live.setdefault(key, obj)  # another thread may have made the same windows meanwhile
        return obj

    def __init__(self, extents: np.ndarray, grid: Grid) -> None:
        """See the class docstring; everything is set up (or found) in ``__new__``."""

    def __reduce__(self):
        return LayerWindows, (np.array(self.extents), self.grid)

    def __copy__(self) -> 'LayerWindows':
        return self

    def __deepcopy__(self, memo) -> 'LayerWindows':
        return self

    def max_extents(self) -> Tuple[int, int, int, int]:
        """Largest (up, down, left, right) over all patches (and heads); extents are stored
        clipped to the grid."""
        m = self.extents.reshape(-1, 4).max(axis=0)
        return int(m[0]), int(m[1]), int(m[2]), int(m[3])

    def mean_area(self) -> float:
        """Mean number of patches per window after clipping to the grid."""
        return float(window_areas(self.extents, self.grid).mean())

    def extents_tensor(self, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """The extents as a new int32 tensor on ``device``."""
        return torch.from_numpy(np.array(self.extents)).to(_device(device))

    def mask(self, num_prefix_tokens: int = 0, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """Boolean ``(T, T)`` (or ``(heads, T, T)``) mask, ``True`` = may attend (a new tensor)."""
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, (int, np.integer)) \
                or num_prefix_tokens < 0:
            raise WindowSpecError(f'num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}')
        return extents_mask(self.extents_tensor(device), int(num_prefix_tokens))

    def resize(self, grid: Union[int, Sequence[int]], mode: str = 'scale') -> 'LayerWindows':
        """These windows on another grid (see :func:`resize_extents`); same grid -> ``self``."""
        grid = to_grid(grid)
        if grid == self.grid:
            return self
        return LayerWindows(resize_extents(self.extents, self.grid, grid, check_resize_mode(mode)), grid)

    def __repr__(self) -> str:
        shape = 'x'.join(str(s) for s in self.extents.shape)
        return f'LayerWindows(grid={self.grid}, extents={shape}, max={self.max_extents()})'


def _device(device: Union[str, torch.device, None]) -> torch.device:
    return torch.device(device) if device is not None else torch.device('cpu')


def window_areas(extents: np.ndarray, grid: Grid) -> np.ndarray:
    """Number of patches inside each (clipped) window; same leading shape as ``extents[..., 0]``."""
    h, w = grid
    ys = np.arange(h).reshape(h, 1)
    xs = np.arange(w).reshape(1, w)
    e = extents.astype(np.int64)
    rows = np.minimum(ys + e[..., 1], h - 1) - np.maximum(ys - e[..., 0], 0) + 1
    cols = np.minimum(xs + e[..., 3], w - 1) - np.maximum(xs - e[..., 2], 0) + 1
    return rows * cols


@dataclass
class WindowSpec:
    """Per-block windows for a ViT with a ``grid = (H, W)`` patch grid.

    ``blocks[l]`` is ``None`` for a global block or an int32 array of extents, shape
    ``(H, W, 4)`` (same window for every head) or ``(heads, H, W, 4)`` (per head); the last axis
    is ``(up, down, left, right)``.  ``provenance`` says where the windows came from: its
    ``kind`` is ``measured``, ``prior`` or ``uniform``, with details alongside.
    """
    grid: Grid
    blocks: List[Optional[np.ndarray]]
    provenance: Dict[str, Any] = field(default_factory=lambda: {'kind': 'uniform'})

    def __post_init__(self):
        self.grid = to_grid(self.grid)
        if isinstance(self.blocks, (str, bytes, Mapping)) or not isinstance(self.blocks, Iterable):
            raise WindowSpecError(f'blocks must be a list (one entry per block), got {type(self.blocks).__name__}')
        entries = list(self.blocks)
        _check_size(entries, self.grid)
        blocks = []
        for i, b in enumerate(entries):
            if _is_global_entry(b):
                blocks.append(None)
            elif isinstance(b, str):
                blocks.append(parse_partition(b, self.grid, f'blocks[{i}]'))
            else:
                blocks.append(_as_extents(b, self.grid, f'blocks[{i}]'))
        self.blocks = blocks
        heads = {b.shape[0] for b in blocks if b is not None and b.ndim == 4}
        if len(heads) > 1:
            raise WindowSpecError(f'per-head blocks disagree on the number of heads: {sorted(heads)}')
        if not isinstance(self.provenance, Mapping):
            raise WindowSpecError(f'provenance must be a mapping, got {type(self.provenance).__name__}')
        self.provenance = dict(self.provenance)
        kind = self.provenance.get('kind')
        if kind not in PROVENANCE_KINDS:
            raise WindowSpecError(f'provenance.kind must be one of {PROVENANCE_KINDS}, got {kind!r}')

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def uniform(
            cls,
            depth: int,
            grid: Union[int, Sequence[int]],
            radius: ExtentLike,
            global_blocks: Iterable[int] = (),
    ) -> 'WindowSpec':
        """The same window for every patch of every block, except ``global_blocks``.

        ``radius`` is an int (a square window of side ``2r+1``) or ``(up, down, left, right)``; for a
        spec without windows use :meth:`all_global`.
        """
        depth = check_int(depth, 'depth', 1, MAX_DEPTH)
        if radius is None or isinstance(radius, (str, bytes)):
            raise WindowSpecError(f'radius must be an int or (up, down, left, right), got {radius!r}; for a '
                                  f'spec with every block global use WindowSpec.all_global(depth, grid)')
        glob = set()
        for g in global_blocks:
            g = check_int(g, 'global_blocks entries', -depth, depth - 1)
            glob.add(g % depth)
        r = np.asarray(radius)
        prov = {'kind': 'uniform', 'radius': r.tolist(), 'global_blocks': sorted(glob)}
        return cls(grid, [None if i in glob else radius for i in range(depth)], prov)

    @classmethod
    def from_schedule(
            cls,
            grid: Union[int, Sequence[int]],
            schedule: Sequence[Union[str, int, Sequence[int], None]],
            provenance: Optional[Mapping[str, Any]] = None,
    ) -> 'WindowSpec':
        """One entry per block: ``'global'`` (or ``None``), a radius, ``(up, down, left, right)``, or
        ``'partition(s)'`` / ``'partition(sh, sw)'`` (METHODS §1.6)."""
        if isinstance(schedule, (str, bytes, Mapping)) or not isinstance(schedule, Iterable):
            raise WindowSpecError(f'schedule must be a list with one entry per block, got {schedule!r:.80}')
        schedule = list(schedule)
        prov = dict(provenance or {'kind': 'prior'})
        prov.setdefault('kind', 'prior')
        spec = cls(grid, schedule, prov)  # validates every entry before the provenance records them
        spec.provenance.setdefault('schedule', [_plain(s) for s in schedule])
        return spec

    @classmethod
    def all_global(cls, depth: int, grid: Union[int, Sequence[int]]) -> 'WindowSpec':
        """Every block global: the model is exactly a ViT."""
        return cls(grid, [None] * check_int(depth, 'depth', 1, MAX_DEPTH), {'kind': 'uniform', 'radius': 'global'})

    # ---- queries ------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> Optional[int]:
        """Head count of per-head blocks, or None when no block is per-head."""
        for b in self.blocks:
            if b is not None and b.ndim == 4:
                return b.shape[0]
        return None

    def is_global(self, block: int) -> bool:
        return self.blocks[self._check_block(block)] is None

    def layer(self, block: int) -> Optional[LayerWindows]:
        """The windows of one block as a :class:`LayerWindows` (None when global)."""
        b = self.blocks[self._check_block(block)]
        return None if b is None else LayerWindows(b, self.grid)

    def mask(self, block: int, num_prefix_tokens: int = 0, device=None) -> torch.Tensor:
        """Boolean mask ``(T, T)`` or ``(heads, T, T)`` of block ``block``; ``True`` = may attend.

        A global block gives an all-``True`` ``(T, T)`` mask.
        """
        b = self.blocks[self._check_block(block)]
        if b is None:
            t = num_prefix_tokens + self.grid[0] * self.grid[1]
            return torch.ones(t, t, dtype=torch.bool, device=device)
        return window_mask(b, num_prefix_tokens, device=device)

    def areas(self, block: int) -> Optional[np.ndarray]:
        """Clipped window area of every patch (and head) in ``block``, or None when global."""
        b = self.blocks[self._check_block(block)]
        return None if b is None else window_areas(b, self.grid)

    def summary(self) -> List[Dict[str, Any]]:
        """Per block: global or not, mean / min / max window area and the fraction of the grid."""
        n = self.grid[0] * self.grid[1]
        rows = []
        for i in range(self.depth):
            a = self.areas(i)
            if a is None:
                rows.append({'block': i, 'global': True, 'mean_area': float(n), 'min_area': n, 'max_area': n,
                             'fraction': 1.0})
            else:
                rows.append({'block': i, 'global': False, 'mean_area': float(a.mean()), 'min_area': int(a.min()),
                             'max_area': int(a.max()), 'fraction': float(a.mean() / n)})
        return rows

    def _check_block(self, block: int) -> int:
        if not isinstance(block, (int, np.integer)) or not -self.depth <= block < self.depth:
            raise WindowSpecError(f'block must be an int in [0, {self.depth}), got {block!r}')
        return int(block) % self.depth

    # ---- transforms ---------------------------------------------------------------------
    def resize(self, grid: Union[int, Sequence[int]], mode: str = 'scale') -> 'WindowSpec':
        """The spec for another patch grid (see :func:`resize_extents`); same grid -> ``self``.

        ``mode='scale'`` (default) keeps each window's share of the image; ``mode='keep'`` keeps
        its size in patches (ViTDet-style locality, cost linear in the number of patches)."""
        grid = to_grid(grid)
        check_resize_mode(mode)
        if grid == self.grid:
            return self
        prov = copy.deepcopy(self.provenance)
        prov['resized_from'] = list(prov.get('resized_from', self.grid))
        if mode != 'scale':
            prov['resize_mode'] = mode
        return WindowSpec(grid, [None if b is None else resize_extents(b, self.grid, grid, mode)
                                 for b in self.blocks], prov)

    def check_compatible(self, depth: int, grid: Union[int, Sequence[int]], num_heads: Optional[int] = None,
                         what: str = 'model') -> None:
        """Raise a clear error if this spec cannot serve a model of that depth / grid / heads."""
        if depth != self.depth:
            raise WindowSpecError(f'window spec has {self.depth} blocks but the {what} has depth {depth}')
        grid = to_grid(grid)
        if grid != self.grid:
            raise WindowSpecError(
                f'window spec was made for a {self.grid[0]}x{self.grid[1]} patch grid but the {what} has '
                f'{grid[0]}x{grid[1]}; use spec.resize({grid}) to adapt it')
        if num_heads is not None and self.num_heads is not None and self.num_heads != num_heads:
            raise WindowSpecError(f'window spec has per-head windows for {self.num_heads} heads but the '
                                  f'{what} has {num_heads} heads')

    def same_windows(self, other: 'WindowSpec') -> bool:
        """The same grid, depth and windows in every block, whatever the provenance says."""
        if self.grid != other.grid or self.depth != other.depth:
            return False
        for a, b in zip(self.blocks, other.blocks):
            if (a is None) != (b is None):
                return False
            if a is not None and (a.shape != b.shape or not np.array_equal(a, b)):
                return False
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WindowSpec):
            return NotImplemented
        return self.provenance == other.provenance and self.same_windows(other)

    def __repr__(self) -> str:
        kinds = ''.join('G' if b is None else ('h' if b.ndim == 4 else 'w') for b in self.blocks)
        return (f'WindowSpec(grid={self.grid}, depth={self.depth}, blocks={kinds!r} '
                f'(G=global, w=windowed, h=per-head), provenance={self.provenance.get("kind")!r})')

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """A JSON/YAML-ready dict; the format is::

            format: vitfree.window_spec
            version: 1
            grid: [H, W]
            provenance: {kind: measured|prior|uniform, ...}
            blocks:
              - global                          # an unconstrained block
              - [up, down, left, right]         # the same window for every patch
              - partition(s)                    # the s x s cell holding each patch (or partition(sh, sw))
              - {up: [...], down: [...], left: [...], right: [...]}   # per patch: H rows of W
                                                                       # ints, as strings
              - {heads: [<one of the two forms above>, ...]}          # per head

        Rows are strings of space-separated ints so files stay short and readable.
        """
        return {
            'format': SPEC_FORMAT,
            'version': SPEC_VERSION,
            'grid': list(self.grid),
            'provenance': _plain(self.provenance),
            'blocks': [_encode_block(b) for b in self.blocks],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = 'window spec') -> 'WindowSpec':
        """The spec in a :meth:`to_dict` mapping; errors name ``source`` (a file, a config field) and
        the path inside it (``blocks[3].up[2][5]``)."""
        if isinstance(d, WindowSpec):
            return d
        if not isinstance(d, Mapping):
            raise WindowSpecError(f'{source}: expected a mapping, got {type(d).__name__}')
        fmt = d.get('format', SPEC_FORMAT)
        if fmt != SPEC_FORMAT:
            raise WindowSpecError(f'{source}: format must be {SPEC_FORMAT!r}, got {fmt!r:.80}')
        version = d.get('version')
        if type(version) is not int or version != SPEC_VERSION:
            raise WindowSpecError(f'{source}: unknown version {version!r:.80}; this vitfree reads version '
                                  f'{SPEC_VERSION}')
        for key in ('grid', 'blocks'):
            if key not in d:
                raise WindowSpecError(f'{source}: missing field {key!r}')
        blocks_in = d['blocks']
        try:
            grid = to_grid(d['grid'], 'grid')
            if not isinstance(blocks_in, list):
                raise WindowSpecError(f'blocks must be a list, got {type(blocks_in).__name__}')
            _check_size(blocks_in, grid)
        except WindowSpecError as e:
            raise WindowSpecError(f'{source}: {e}') from None
        blocks = [_decode_block(b, grid, f'{source}: blocks[{i}]') for i, b in enumerate(blocks_in)]
        try:
            return cls(grid, blocks, d.get('provenance', {'kind': 'uniform'}))
        except WindowSpecError as e:
            raise WindowSpecError(f'{source}: {e}') from None

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``.yaml``/``.yml`` or ``.json`` (by suffix), atomically; returns the path."""
        path = Path(path)
        d = self.to_dict()
        suffix = path.suffix.lower()
        if suffix in ('.yaml', '.yml'):
            import yaml
            text = yaml.safe_dump(d, sort_keys=False, default_flow_style=None, width=100000)
        elif suffix == '.json':
            text = json.dumps(d, indent=1) + '\n'
        else:
            raise WindowSpecError(f'cannot save a window spec as {path.name!r}: use a .yaml, .yml or .json suffix')
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + '.tmp')
        try:
            tmp.write_text(text, encoding='utf-8')
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> 'WindowSpec':
        """Read a ``.yaml``/``.yml`` or ``.json`` spec (UTF-8, at most :data:`MAX_SPEC_BYTES`; YAML
        aliases are refused); every error names the file."""
        path = Path(path)
        text = read_text_file(path, 'window spec file', WindowSpecError, MAX_SPEC_BYTES)
        if path.suffix.lower() == '.json':
            d = parse_json(text, str(path), WindowSpecError)
        else:
            d = parse_yaml(text, str(path), WindowSpecError)
        return cls.from_dict(d, source=str(path))


# ---- reading files: bounded, decoded, every error names the file ---------------------------------
def file_problem(path: Union[str, os.PathLike]) -> Optional[str]:
    """What keeps ``path`` from being read as a regular file (a folder, a symlink loop, a broken
    link, missing ...), or None when it is one."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        if path.is_symlink():
            try:
                os.stat(path)
            except OSError as inner:
                if inner.errno == errno.ELOOP:
                    return 'is a symlink loop (the link points back at itself)'
            return f'is a broken symlink (to {os.readlink(path)!r})'
        if e.errno == errno.ELOOP:
            return 'is a symlink loop (the link points back at itself)'
        if e.errno == errno.ENOENT:
            return 'not found'
        return e.strerror or str(e)
    if stat.S_ISDIR(st.st_mode):
        return 'is a folder, not a file'
    if not stat.S_ISREG(st.st_mode):
        return 'is not a regular file (a device, socket or pipe)'
    return None


def read_text_file(path: Union[str, os.PathLike], what: str, error: type = WindowSpecError,
                   max_bytes: Optional[int] = None) -> str:
    """The UTF-8 text of ``path``; ``error`` (naming ``what`` and the file) when it is not a readable
    regular file, larger than ``max_bytes`` or not UTF-8."""
    path = Path(path)
    problem = file_problem(path)
    if problem is not None:
        raise error(f'{what} {str(path)!r} {problem}' if problem == 'not found' else f'{what} {path} {problem}')
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise error(f'{what} {path} has {size} bytes, more than the {max_bytes} allowed')
    try:
        with open(path, 'rb') as f:
            data = f.read(max_bytes + 1 if max_bytes is not None else -1)
    except OSError as e:
        raise error(f'{what} {path}: {e.strerror or e}') from None
    if max_bytes is not None and len(data) > max_bytes:
        raise error(f'{what} {path} has more than the {max_bytes} bytes allowed')
    try:
        return data.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        raise error(f'{what} {path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} cannot be '
                    f'decoded as UTF-8 (save the file as UTF-8)') from None


def parse_json(text: str, source: str, error: type = WindowSpecError) -> Any:
    """``json.loads`` whose errors name ``source``, the line and the column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        cut = e.pos >= len(text.rstrip()) or e.msg.startswith('Unterminated')
        raise error(f'{source}: not valid JSON ({e.msg}: line {e.lineno}, column {e.colno}'
                    + ('; the text ends early, so the file may be truncated)' if cut else ')')) from None
    except RecursionError:
        raise error(f'{source}: not valid JSON (nested too deeply)') from None


def parse_yaml(text: str, source: str, error: type = WindowSpecError) -> Any:
    """YAML with the safe loader and without aliases (``*name``), so a small file cannot expand into a
    huge object (an alias bomb); errors name ``source`` and the line."""
    import yaml
    loader = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)
    try:
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.AliasEvent):
                mark = event.start_mark
                raise error(f'{source}: YAML alias *{event.anchor} at line {mark.line + 1}: window spec files may '
                            f'not use anchors and aliases (write the values out)')
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:
        raise error(f'{source}: not valid YAML: {" ".join(str(e).split())}') from None
    except RecursionError:
        raise error(f'{source}: not valid YAML (nested too deeply)') from None


def _is_global_entry(b: Any) -> bool:
    return b is None or (isinstance(b, str) and b == 'global')


def _planes(b: Any) -> int:
    """How many (H, W) window maps a block entry holds: 0 global, heads for per-head, else 1."""
    if _is_global_entry(b):
        return 0
    if isinstance(b, Mapping) and isinstance(b.get('heads'), list):
        return len(b['heads'])
    if isinstance(b, np.ndarray) and b.ndim == 4:
        return int(b.shape[0])
    return 1


def _check_size(entries: Sequence[Any], grid: Grid) -> None:
    """Refuse a spec too large to build, before any array is made: at most :data:`MAX_DEPTH` blocks,
    and window maps (blocks, heads) x patches at most :data:`MAX_SPEC_CELLS`."""
    if not entries:
        raise WindowSpecError('blocks must not be empty: a spec needs one entry per transformer block')
    if len(entries) > MAX_DEPTH:
        raise WindowSpecError(f'a window spec has at most {MAX_DEPTH} blocks, got {len(entries)}')
    cells = sum(_planes(b) for b in entries) * grid[0] * grid[1]
    if cells > MAX_SPEC_CELLS:
        raise WindowSpecError(f'{len(entries)} blocks on a {grid[0]}x{grid[1]} grid hold {cells} patch windows, '
                              f'more than the {MAX_SPEC_CELLS} a window spec may hold')


def _plain(x: Any) -> Any:
    """Provenance values as plain JSON types."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _encode_plane(a: np.ndarray) -> Any:
    flat = a.reshape(-1, 4)
    if np.all(flat == flat[0]):
        return [int(v) for v in flat[0]]
    cell = partition_cell(a, a.shape[:2])
    if cell is not None:
        return _encode_partition(cell)
    return {side: [' '.join(str(int(v)) for v in row) for row in a[..., s]] for s, side in enumerate(SIDES)}


def _encode_block(b: Optional[np.ndarray]) -> Any:
    if b is None:
        return 'global'
    if b.ndim == 4:
        return {'heads': [_encode_plane(p) for p in b]}
    return _encode_plane(b)


def _decode_plane(e: Any, grid: Grid, where: str) -> np.ndarray:
    h, w = grid
    if isinstance(e, str):
        return parse_partition(e, grid, where)
    if isinstance(e, (int, list, tuple)) and not isinstance(e, bool):
        vals = [e] * 4 if isinstance(e, int) else list(e)
        if len(vals) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            raise WindowSpecError(f'{where}: expected [up, down, left, right] ints, got {e!r:.80}')
        return _as_extents(np.array(vals, dtype=object), grid, where)
    if isinstance(e, Mapping):
        missing = [s for s in SIDES if s not in e]
        extra = [k for k in e if k not in SIDES]
        if missing or extra:
            raise WindowSpecError(f'{where}: per-patch extents need keys {list(SIDES)}'
                                  + (f', missing {missing}' if missing else '') + (f', unknown {extra}' if extra else ''))
        planes = [_decode_rows(e[side], grid, f'{where}.{side}') for side in SIDES]
        return _as_extents(np.stack(planes, axis=-1), grid, where)
    raise WindowSpecError(f"{where}: expected 'global', [up, down, left, right], 'partition(s)', a per-patch "
                          f"mapping or {{heads: [...]}}, got {e!r:.80}")


_INT_TEXT = re.compile(r'[+-]?[0-9]+')


def _decode_rows(rows: Any, grid: Grid, where: str) -> np.ndarray:
    """One side of a per-patch block: ``H`` rows of ``W`` integers (a string of space-separated ints or
    a list of ints); every value must be a plain integer, named by its position when it is not."""
    h, w = grid
    if not isinstance(rows, list) or len(rows) != h:
        raise WindowSpecError(f'{where}: expected {h} rows (grid {h}x{w}), got '
                              f'{len(rows) if isinstance(rows, list) else type(rows).__name__}')
    plane = np.empty((h, w), dtype=np.int64)
    for r, row in enumerate(rows):
        if isinstance(row, str):
            items = row.split()
            vals = [int(v) if _INT_TEXT.fullmatch(v) else None for v in items]
        elif isinstance(row, list):
            items = row
            vals = [v if isinstance(v, int) and not isinstance(v, bool) else None for v in row]
        else:
            raise WindowSpecError(f'{where}[{r}]: expected {w} ints, got {row!r:.80}')
        if len(vals) != w:
            raise WindowSpecError(f'{where}[{r}]: expected {w} values (grid {h}x{w}), got {len(vals)}')
        for c, v in enumerate(vals):
            if v is None:
                raise WindowSpecError(f'{where}[{r}][{c}]: expected an integer, got {items[c]!r:.40}')
            if not 0 <= v < EXTENT_LIMIT:
                raise WindowSpecError(f'{where}[{r}][{c}]: extents must be integers in [0, 2**31), got {v}')
        plane[r] = vals
    return plane


def _decode_block(b: Any, grid: Grid, where: str) -> Optional[np.ndarray]:
    if b is None or b == 'global':
        return None
    if isinstance(b, Mapping) and 'heads' in b:
        heads = b['heads']
        if not isinstance(heads, list) or not heads:
            raise WindowSpecError(f'{where}.heads: expected a non-empty list, got {heads!r:.80}')
        return np.stack([_decode_plane(p, grid, f'{where}.heads[{k}]') for k, p in enumerate(heads)])
    return _decode_plane(b, grid, where)


# ---- shipped specs (configs/) -------------------------------------------------------------
def _config_dirs() -> List[Path]:
    dirs = []
    env = os.environ.get('VITFREE_CONFIG_PATH')
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    here = Path(__file__).resolve().parent
    dirs += [here.parent / 'configs', here / '_configs']  # source checkout, installed wheel
    return [d for d in dirs if d.is_dir()]


def list_specs() -> List[str]:
    """Names of the window specs shipped in ``configs/`` (usable wherever a spec is accepted)."""
    names = set()
    for d in _config_dirs():
        names.update(p.stem for p in d.glob('*.yaml'))
    return sorted(names)


def get_spec(name: str) -> WindowSpec:
    """Load a shipped spec by name (see :func:`list_specs`)."""
    if not isinstance(name, str) or not name or Path(name).name != name or name.startswith('.'):
        raise WindowSpecError(f'a shipped window spec is named by a plain name such as winft_prior_d12_g14, got '
                              f'{name!r:.80}; shipped specs: {", ".join(list_specs()) or "(none)"}')
    for d in _config_dirs():
        p = d / f'{name}.yaml'
        if p.is_file():
            return WindowSpec.load(p)
    raise WindowSpecError(f'unknown window spec {name!r}; shipped specs: {", ".join(list_specs()) or "(none)"}; '
                          'or pass a WindowSpec, a dict, or a path to a .yaml/.json file')


def resolve_spec(windows: Union[WindowSpec, Mapping, str, os.PathLike, None]) -> Optional[WindowSpec]:
    """Accept a WindowSpec, a dict (``to_dict`` form), a file path or a shipped spec name."""
    if windows is None or isinstance(windows, WindowSpec):
        return windows
    if isinstance(windows, Mapping):
        return WindowSpec.from_dict(windows)
    if isinstance(windows, (str, os.PathLike)):
        p = Path(windows)
        if p.suffix.lower() in ('.yaml', '.yml', '.json') or os.sep in str(windows) or p.exists() or p.is_symlink():
            return WindowSpec.load(p)
        return get_spec(str(windows))
    raise WindowSpecError(f'windows must be a WindowSpec, a dict, a file path or a shipped spec name, '
                          f'got {type(windows).__name__}')
