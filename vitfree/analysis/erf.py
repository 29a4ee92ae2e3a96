"""Effective receptive fields (ERFs) measured from interaction maps, and windows made from them.

For block ``l`` and patch ``i`` at grid position ``(y, x)``, the ERF is a rectangle
``(up, down, left, right)`` around ``i`` that holds at least a fraction ``tau`` of row ``i`` of
the interaction map ``P_l`` (see :mod:`vitfree.analysis.interaction`).  It is grown greedily:

1. start from the patch itself, ``(0, 0, 0, 0)``;
2. while the captured mass is below ``tau`` and some mass lies outside the rectangle, add one
   strip (a row above or below, a column left or right) - the one with the most mass per
   added patch;
3. ties are broken deterministically, in this order: the side with more mass in the whole
   half-plane beyond it, then the side whose current extent is smaller (windows grow evenly),
   then the fixed order up, down, left, right.  Strip gains within a relative ``1e-9`` of the
   best count as ties.

The half-plane rule also makes growth stop at the support of the row: a side with nothing
beyond it is never grown, so a rectangle never leaves the smallest rectangle holding all of
row ``i``'s mass (for a WinfT: never leaves its window).  ``tau = 1`` therefore asks for every
patch with non-zero interaction - the whole grid for ordinary softmax attention.

Alongside each rectangle: the captured mass, its area, and the **tendency** vector
``t(i) = sum_j P(i, j) (p_j - p_i)`` - where the interaction of patch ``i`` leans to, in
patches, stored as ``(dy, dx)`` with ``dy`` pointing down and ``dx`` right.  Near the border
even uniform interaction leans towards the centre, so each block also keeps ``u(i)``, the
tendency that uniform interaction over the keys patch ``i`` may see would have (its window in
a windowed block, the whole grid otherwise), and pictures and summaries show the **excess
tendency** ``t(i) - u(i)``: what the model learned, not where the border is.

A block becomes ``global`` in the window spec when its mean ERF area is at least
``gamma * N``.  :func:`measure_erf` runs all of this on a model and returns a ``measured``
:class:`~vitfree.windows.WindowSpec` that :func:`vitfree.create_winft` accepts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..version import __version__
from ..weights import portable_text
from ..windows import WindowSpec, to_grid
from .capture import attention_modules
from .inputs import ImagesLike, model_name
from .interaction import InteractionResult, interaction
from .tables import format_table

__all__ = ['measure_erf', 'erf_from_interaction', 'erf_rectangles', 'tendency_vectors', 'uniform_tendency', 'model_windows',
           'ErfResult', 'BlockErf', 'checkpoint_hint', 'warn_all_global', 'trivial_blocks']

_RTOL = 1e-9   # strip gains (and half-plane masses) this close to the best count as ties
_MASS_TOL = 1e-9  # captured mass within this of tau counts as reaching tau


# ---- the greedy rectangle ---------------------------------------------------------------------
def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not 0.0 < tau <= 1.0 or math.isnan(tau):
        raise ValueError(f'tau must be in (0, 1] (the fraction of interaction mass an ERF holds), got {tau}')
    return tau


def erf_rectangles(maps: Union[np.ndarray, torch.Tensor], grid: Union[int, Sequence[int]],
                   tau: float = 0.9) -> Tuple[np.ndarray, np.ndarray]:
    """Greedy ERF rectangles for interaction maps ``(..., N, N)`` on ``grid`` (rows are queries,
    each should sum to one).

    Returns ``rects`` int32 ``(..., N, 4)`` as ``(up, down, left, right)`` and the captured mass
    ``(..., N)``.  Rules and tie-breaking: module docstring.
    """
    tau = _check_tau(tau)
    h, w = to_grid(grid)
    n = h * w
    p = maps.detach().cpu().double().numpy() if torch.is_tensor(maps) else np.asarray(maps, dtype=np.float64)
    if p.ndim < 2 or p.shape[-2:] != (n, n):
        raise ValueError(f'interaction maps must have shape (..., N, N) with N = {h}x{w} = {n}, got {p.shape}')
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise ValueError('interaction maps must be finite and non-negative')
    lead = p.shape[:-2]
    rows = p.reshape(-1, h, w)
    m = rows.shape[0]
    centre = np.tile(np.arange(n), m // n)
    yc, xc = centre // w, centre % w
    ar = np.arange(m)

    # prefix sums; differences over runs of exact zeros are exact zeros
    rowc = np.zeros((m, h, w + 1))
    rowc[:, :, 1:] = np.cumsum(rows, axis=2)                      # along each grid row
    colc = np.zeros((m, w, h + 1))
    colc[:, :, 1:] = np.cumsum(rows.transpose(0, 2, 1), axis=2)   # along each grid column
    rtot, ctot = rows.sum(2), rows.sum(1)
    above = np.zeros((m, h + 1))
    above[:, 1:] = np.cumsum(rtot, axis=1)                        # mass in rows < r
    below = np.zeros((m, h + 1))
    below[:, :h] = np.cumsum(rtot[:, ::-1], axis=1)[:, ::-1]      # mass in rows >= r
    leftm = np.zeros((m, w + 1))
    leftm[:, 1:] = np.cumsum(ctot, axis=1)                        # mass in columns < c
    rightm = np.zeros((m, w + 1))
    rightm[:, :w] = np.cumsum(ctot[:, ::-1], axis=1)[:, ::-1]     # mass in columns >= c

    ext = np.zeros((m, 4), dtype=np.int64)  # up, down, left, right
    mass = rows[ar, yc, xc].copy()

    def beyond(idx: np.ndarray) -> np.ndarray:
        r0, r1 = yc[idx] - ext[idx, 0], yc[idx] + ext[idx, 1] + 1
        c0, c1 = xc[idx] - ext[idx, 2], xc[idx] + ext[idx, 3] + 1
        return np.stack([above[idx, r0], below[idx, r1], leftm[idx, c0], rightm[idx, c1]], axis=1)

    def still_growing(idx: np.ndarray) -> np.ndarray:
        more = (beyond(idx) > 0).any(axis=1)
        return more if tau >= 1.0 else more & (mass[idx] < tau - _MASS_TOL)

    active = np.nonzero(still_growing(ar))[0]
    while active.size:
        i = active
        r0, r1 = yc[i] - ext[i, 0], yc[i] + ext[i, 1] + 1
        c0, c1 = xc[i] - ext[i, 2], xc[i] + ext[i, 3] + 1
        half = beyond(i)
        eligible = half > 0
        up_r, dn_r = np.clip(r0 - 1, 0, h - 1), np.clip(r1, 0, h - 1)
        lf_c, rt_c = np.clip(c0 - 1, 0, w - 1), np.clip(c1, 0, w - 1)
        strip = np.stack([
            rowc[i, up_r, c1] - rowc[i, up_r, c0],
            rowc[i, dn_r, c1] - rowc[i, dn_r, c0],
            colc[i, lf_c, r1] - colc[i, lf_c, r0],
            colc[i, rt_c, r1] - colc[i, rt_c, r0],
        ], axis=1)
        length = np.stack([c1 - c0, c1 - c0, r1 - r0, r1 - r0], axis=1)
        gain = np.where(eligible, strip / length, -np.inf)
        best = gain.max(axis=1, keepdims=True)
        cand = eligible & (gain >= best * (1 - _RTOL))
        half_c = np.where(cand, half, -np.inf)
        cand &= half_c >= half_c.max(axis=1, keepdims=True) * (1 - _RTOL)
        ext_c = np.where(cand, ext[i], np.iinfo(np.int64).max)
        cand &= ext_c == ext_c.min(axis=1, keepdims=True)
        side = cand.argmax(axis=1)  # first remaining side in the order up, down, left, right
        ext[i, side] += 1
        mass[i] += strip[np.arange(i.size), side]
        active = i[still_growing(i)]
    return ext.astype(np.int32).reshape(*lead, n, 4), mass.reshape(*lead, n)


def tendency_vectors(maps: Union[np.ndarray, torch.Tensor], grid: Union[int, Sequence[int]]) -> np.ndarray:
    """``t(i) = sum_j P(i, j) (p_j - p_i)`` for maps ``(..., N, N)``: ``(..., N, 2)`` as ``(dy, dx)``
    in patches (``dy`` down, ``dx`` right).  Rows that do not sum to one are used as they are."""
    h, w = to_grid(grid)
    p = maps.detach().cpu().double().numpy() if torch.is_tensor(maps) else np.asarray(maps, dtype=np.float64)
    pos = np.stack(np.divmod(np.arange(h * w), w), axis=1).astype(np.float64)  # (N, 2): (y, x)
    return p @ pos - p.sum(-1, keepdims=True) * pos


def uniform_tendency(grid: Union[int, Sequence[int]], extents: Optional[np.ndarray] = None) -> np.ndarray:
    """``u(i)``: the tendency of uniform interaction over the keys patch ``i`` may see, as
    ``(..., H, W, 2)`` ``(dy, dx)`` in patches: the offset from the patch to the centre of its
    window (``extents`` ``(H, W, 4)`` or per head ``(heads, H, W, 4)``, clipped at the border as
    windows are) or, with ``extents=None``, of the whole grid."""
    h, w = to_grid(grid)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    if extents is None:
        return np.stack([(h - 1) / 2 - ys, (w - 1) / 2 - xs], axis=-1)
    e = np.asarray(extents, dtype=np.float64)
    if e.shape[-3:] != (h, w, 4):
        raise ValueError(f'window extents must have shape (..., {h}, {w}, 4) for a {h}x{w} grid, got {e.shape}')
    y0, y1 = np.maximum(ys - e[..., 0], 0), np.minimum(ys + e[..., 1], h - 1)
    x0, x1 = np.maximum(xs - e[..., 2], 0), np.minimum(xs + e[..., 3], w - 1)
    return np.stack([(y0 + y1) / 2 - ys, (x0 + x1) / 2 - xs], axis=-1)


# ---- results ----------------------------------------------------------------------------------
@dataclass
class BlockErf:
    """ERFs of every patch (and head) of one block.

    ``rects``: int32 ``(H, W, 4)`` (or ``(heads, H, W, 4)``), ``(up, down, left, right)``;
    ``mass``: captured mass ``(H, W)``; ``tendency``: ``(H, W, 2)`` as ``(dy, dx)`` in patches;
    ``uniform``: the tendency uniform interaction over each patch's keys would have
    (:func:`uniform_tendency`, broadcastable to ``tendency``; ``None`` = the whole grid);
    ``window``: the extents of the block's windows when it had any (``None``: global).
    """
    block: int
    rects: np.ndarray
    mass: np.ndarray
    tendency: np.ndarray
    uniform: Optional[np.ndarray] = None
    window: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if self.uniform is None:
            self.uniform = uniform_tendency(self.tendency.shape[-3:-1], self.window)

    @property
    def excess_tendency(self) -> np.ndarray:
        """``t(i) - u(i)``: the tendency beyond what the geometry of the keys gives."""
        return self.tendency - self.uniform

    @property
    def grid(self) -> Tuple[int, int]:
        return tuple(self.rects.shape[-3:-1])

    @property
    def area(self) -> np.ndarray:
        """Patches inside each rectangle (rectangles never leave the grid)."""
        e = self.rects.astype(np.int64)
        return (e[..., 0] + e[..., 1] + 1) * (e[..., 2] + e[..., 3] + 1)

    @property
    def mean_area(self) -> float:
        return float(self.area.mean())

    @property
    def trivial(self) -> bool:
        """Every patch (and head) interacts only with itself: every ERF is the patch, holding all of
        its mass.  Nothing is learned there about where a patch draws from (1x1 windows, or a last
        block whose patch outputs never reach the logit under ``attribution``), so its tendency
        and excess tendency are not analysed."""
        return bool(np.all(self.area == 1) and np.all(self.mass >= 1 - _MASS_TOL))

    def __repr__(self) -> str:
        what = 'trivial: every patch interacts only with itself' if self.trivial else \
            f'mean ERF area {self.mean_area:.1f} patches'
        return f'BlockErf(block {self.block}, rects {tuple(self.rects.shape)}, {what})'


@dataclass
class ErfResult:
    """Everything :func:`measure_erf` found: per-block ERFs, the spec made from them and the
    interaction maps they came from."""
    grid: Tuple[int, int]
    tau: float
    gamma: float
    blocks: List[BlockErf]
    global_blocks: List[int]
    spec: WindowSpec
    interaction: Optional[InteractionResult] = None
    provenance: Dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, block: int) -> BlockErf:
        return self.blocks[block]

    @property
    def trivial_blocks(self) -> List[int]:
        """Blocks where every patch interacts only with itself (:attr:`BlockErf.trivial`)."""
        return [b.block for b in self.blocks if b.trivial]

    def __repr__(self) -> str:
        areas = ', '.join(f'{b.mean_area:.1f}' for b in self.blocks)
        return (f'ErfResult(grid {self.grid[0]}x{self.grid[1]}, tau {self.tau:g}, gamma {self.gamma:g}, '
                f'{len(self.blocks)} blocks; mean ERF area per block: {areas} patches; global: '
                f'{self.global_blocks or "none"}; trivial: {self.trivial_blocks or "none"})')

    def summary(self) -> List[Dict[str, Any]]:
        """Per block: mean / min / max ERF area (patches), the mean as a share of the grid, mean
        captured mass, mean length of the tendency and of the excess tendency (patches; NaN for a
        trivial block, where every patch interacts only with itself), whether the block is trivial
        and whether it became global."""
        n = self.grid[0] * self.grid[1]
        out = []
        for b in self.blocks:
            area = b.area
            excess = float('nan') if b.trivial else float(np.linalg.norm(b.excess_tendency, axis=-1).mean())
            out.append({'block': b.block, 'mean_area': b.mean_area, 'min_area': int(area.min()),
                        'max_area': int(area.max()), 'fraction': b.mean_area / n,
                        'mean_mass': float(b.mass.mean()),
                        'mean_tendency': float(np.linalg.norm(b.tendency, axis=-1).mean()),
                        'mean_excess_tendency': excess, 'trivial': b.trivial,
                        'global': b.block in self.global_blocks})
        return out

    def summary_rows(self) -> List[Tuple]:
        """:meth:`summary` as the rows of :meth:`format_summary` (and of the report's table)."""
        return [(r['block'], f'{r["mean_area"]:.1f}', r['min_area'], r['max_area'], f'{100 * r["fraction"]:.1f}%',
                 f'{r["mean_mass"]:.3f}', f'{r["mean_tendency"]:.2f}',
                 '-' if math.isnan(r['mean_excess_tendency']) else f'{r["mean_excess_tendency"]:.2f}',
                 'global' if r['global'] else 'local, trivial' if r['trivial'] else 'local')
                for r in self.summary()]

    SUMMARY_HEADER = ('block', 'mean ERF area', 'min', 'max', 'of grid', 'mass', '|t|', '|t - u|', 'window')

    def format_summary(self, style: str = 'text') -> str:
        """The per-block summary as a table (``style``: ``'text'`` or ``'markdown'``)."""
        n = self.grid[0] * self.grid[1]
        table = format_table(list(self.SUMMARY_HEADER), self.summary_rows(), style)
        note = (f'grid {self.grid[0]}x{self.grid[1]} = {n} patches, tau={self.tau:g}, gamma={self.gamma:g}: global '
                f'when the mean ERF area >= {self.gamma * n:.1f}; areas in patches; |t|: mean tendency length, '
                f'|t - u|: beyond uniform interaction over the same keys (patches)')
        if self.trivial_blocks:
            note += ('; trivial: every patch interacts only with itself, so there is no tendency to compare (-)')
        return f'{table}\n\n{note}' if style == 'markdown' else f'{table}\n({note})'


def erf_from_interaction(
        result: Union[InteractionResult, Mapping[int, Union[torch.Tensor, np.ndarray]]],
        grid: Optional[Union[int, Sequence[int]]] = None,
        tau: float = 0.9,
        gamma: float = 0.6,
        provenance: Optional[Mapping[str, Any]] = None,
        windows: Optional[Sequence[Optional[np.ndarray]]] = None,
) -> ErfResult:
    """ERFs and the window spec from interaction maps of every block ``0 .. L-1``.

    ``result`` is an :class:`InteractionResult` or a ``{block: (N, N) or (heads, N, N)}`` mapping
    (then ``grid`` is required).  A block is ``global`` when its mean ERF area (over patches and
    heads) is at least ``gamma * N``; the others get their rectangles as windows (per head when
    the maps are per head).  ``provenance`` defaults to ``{'kind': 'measured'}`` plus tau/gamma.
    ``windows``: per block, the window extents ``(H, W, 4)`` (or per head) the measured model
    imposed, ``None`` for a global block; they set the keys of the uniform baseline ``u`` of the
    excess tendency (default: every block global).
    """
    tau = _check_tau(tau)
    gamma = float(gamma)
    if math.isnan(gamma) or gamma < 0:
        raise ValueError(f'gamma must be >= 0 (a block is global when its mean ERF area >= gamma * N; '
                         f'gamma > 1 never makes a block global), got {gamma}')
    inter = result if isinstance(result, InteractionResult) else None
    maps = result.maps if inter is not None else dict(result)
    if grid is None:
        if inter is None:
            raise ValueError('grid is required when interaction maps are given as a plain mapping')
        grid = inter.grid
    grid = to_grid(grid)
    depth = len(maps)
    if sorted(maps) != list(range(depth)):
        raise ValueError(f'a window spec needs the maps of every block 0..L-1, got blocks {sorted(maps)}')
    n = grid[0] * grid[1]
    if windows is not None and len(windows) != depth:
        raise ValueError(f'windows must give one entry (extents or None) per block: {len(windows)} for {depth} blocks')
    blocks: List[BlockErf] = []
    extents: List[Optional[np.ndarray]] = []
    global_blocks: List[int] = []
    for b in range(depth):
        p = maps[b]
        rects, mass = erf_rectangles(p, grid, tau)
        lead = rects.shape[:-2]
        erf = BlockErf(block=b, rects=rects.reshape(*lead, *grid, 4), mass=mass.reshape(*lead, *grid),
                       tendency=tendency_vectors(p, grid).reshape(*lead, *grid, 2),
                       window=None if windows is None or windows[b] is None else np.asarray(windows[b]))
        blocks.append(erf)
        if erf.mean_area >= gamma * n:
            global_blocks.append(b)
            extents.append(None)
        else:
            extents.append(erf.rects)
    prov: Dict[str, Any] = {'kind': 'measured'}
    prov.update(provenance or {})
    for key in ('checkpoint', 'data'):  # provenance travels with the spec: no paths of this machine
        if isinstance(prov.get(key), str):
            prov[key] = portable_text(prov[key])
    prov.setdefault('tau', tau)
    prov.setdefault('gamma', gamma)
    prov['global_blocks'] = global_blocks
    prov['mean_erf_area'] = [round(e.mean_area, 3) for e in blocks]
    spec = WindowSpec(grid, extents, prov)
    return ErfResult(grid=grid, tau=tau, gamma=gamma, blocks=blocks, global_blocks=global_blocks, spec=spec,
                     interaction=inter, provenance=prov)


def model_windows(model: nn.Module, grid: Sequence[int]) -> List[Optional[np.ndarray]]:
    """Per block, the window extents a model imposes at ``grid`` (``None`` for global blocks
    and for models without windows)."""
    n = int(grid[0]) * int(grid[1])
    out: List[Optional[np.ndarray]] = []
    for attn in attention_modules(model):
        win = attn.windows_for(n) if getattr(attn, 'windows', None) is not None else None
        out.append(None if win is None else win.extents)
    return out


def trivial_blocks(model: nn.Module, grid: Optional[Sequence[int]] = None) -> List[int]:
    """Blocks whose every window is 1x1 at ``grid`` (default: the model's own): each patch attends
    only to itself (and the prefix tokens), so analyses of where patches look say nothing there."""
    from .inputs import patch_grid
    windows = model_windows(model, grid if grid is not None else patch_grid(model))
    return [b for b, ext in enumerate(windows) if ext is not None and not np.any(ext)]


def checkpoint_hint(model: nn.Module) -> Optional[str]:
    """The checkpoint timm associates with the model's config, named without machine paths: a
    shipped file as ``model.tag (weights/FILE)``, a Hub download as ``hf-hub:ORG/NAME``, another
    file or export folder by :func:`~vitfree.weights.portable_path`, else the URL.  timm does not
    record whether those weights were actually loaded."""
    from ..weights import portable_path, shipped_weights_file
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    file, hub = cfg.get('file'), cfg.get('hf_hub_id')
    if file:
        if Path(shipped_weights_file(Path(file).name)).resolve() == Path(file).resolve():
            return f'{model_name(model)} (weights/{Path(file).name})'
        if hub and _in_hub_cache(file):  # downloaded from the Hub by vitfree's safe loader
            return f'hf-hub:{hub}'
        return portable_path(file)
    if hub:
        return f'hf-hub:{hub}'
    return cfg.get('url') or None


def _in_hub_cache(path: str) -> bool:
    from huggingface_hub import constants
    try:
        Path(path).resolve().relative_to(Path(constants.HF_HUB_CACHE).resolve())
        return True
    except ValueError:
        return False


def measure_erf(
        model: nn.Module,
        images: ImagesLike,
        estimator: str = 'attention',
        tau: float = 0.9,
        gamma: float = 0.6,
        *,
        num_images: Optional[int] = None,
        batch_size: int = 16,
        per_head: bool = False,
        target: Union[str, int] = 'predicted',
        data: Optional[str] = None,
        checkpoint: Optional[str] = None,
        progress: bool = True,
        return_result: bool = False,
        **kwargs,
) -> Union[WindowSpec, ErfResult]:
    """Measure per-patch ERFs of ``model`` on ``images`` and turn them into a window spec.

    Args:
        model: any timm ViT-family model (ViT, DeiT, WinfT itself).
        images: a tensor batch ``(B, C, H, W)`` normalised for the model, a ``(tensor, labels)``
            pair, a DataLoader, a Dataset of ``(image, label)`` items (PIL images are transformed
            with the model's eval transform), a list of images or a folder; see
            :func:`vitfree.analysis.inputs.iter_images`.
        estimator: ``'attention'``, ``'attribution'`` or ``'ablation'`` interaction estimator.
        tau: mass an ERF must hold (``1`` = all of it).
        gamma: a block is global when its mean ERF area is at least ``gamma * N``.
        num_images: at most this many images (``None`` = all given).
        per_head: one window per head (not with ``'ablation'``).
        target: class whose logit ``attribution`` differentiates (``'predicted'``, ``'label'``,
            an index).
        data: how to describe the images in the provenance (default: derived from ``images``).
        checkpoint: which weights the model holds, for the provenance (default: the checkpoint
            timm's ``pretrained_cfg`` names, see :func:`checkpoint_hint` - pass it explicitly for a
            randomly initialised or fine-tuned model).  Absolute paths in it (and in ``data``) are
            recorded relative to the project or the current folder, or by their last two parts:
            a spec travels, the machine's folders do not.
        progress: progress bar over images.
        return_result: return the full :class:`ErfResult` (rectangles, tendency, mass, the maps
            and ``.spec``) instead of just the spec.
        **kwargs: passed to :func:`vitfree.interaction` (``batch_size``, ``ablation_batch``,
            ``max_bytes``, ``device``).

    Returns a :class:`WindowSpec` with ``provenance.kind == 'measured'`` recording the model,
    checkpoint, data, image count, estimator, tau and gamma (or an :class:`ErfResult`).  When every
    block comes out global there is nothing to build a WinfT from: a ``UserWarning`` says so,
    naming gamma, tau and the grid.
    """
    _check_tau(tau)
    inter = interaction(model, images, estimator, blocks=None, num_images=num_images, batch_size=batch_size,
                        target=target, per_head=per_head, progress=progress, data=data, **kwargs)
    prov: Dict[str, Any] = {
        'kind': 'measured',
        'model': inter.model,
        'checkpoint': checkpoint if checkpoint is not None else checkpoint_hint(model),
        'data': inter.data if data is None else data,
        'num_images': inter.num_images,
        'estimator': estimator,
        'tau': float(tau),
        'gamma': float(gamma),
    }
    if estimator == 'attribution':
        prov['target'] = inter.target
    if per_head:
        prov['per_head'] = True
    prov['vitfree_version'] = __version__
    res = erf_from_interaction(inter, tau=tau, gamma=gamma, provenance=prov,
                               windows=model_windows(model, inter.grid))
    if len(res.global_blocks) == len(res.blocks):
        warn_all_global(res)
    return res if return_result else res.spec


def warn_all_global(res: ErfResult) -> None:
    """Warn that a measurement gave no window at all, naming the threshold and the grid."""
    import warnings
    h, w = res.grid
    n = h * w
    smallest = min(b.mean_area for b in res.blocks)
    warnings.warn(f'every block came out global: each mean ERF area is at least gamma={res.gamma:g} of the {h}x{w} '
                  f'grid ({res.gamma * n:.1f} of {n} patches; the smallest is {smallest:.1f} at tau={res.tau:g}), so '
                  f'the spec has no windows and a WinfT built from it is the ViT itself. Lower gamma (below '
                  f'{smallest / n:.2f}) or tau, or measure on images that give a larger patch grid',
                  UserWarning, stacklevel=3)
