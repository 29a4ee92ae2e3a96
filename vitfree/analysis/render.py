"""Pictures (matplotlib, Agg backend): everything here writes PNG files and returns their paths.

Grids are drawn with row 0 at the top, as on the image; a patch ``(y, x)`` is the unit square
``[x, x+1] x [y, y+1]``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    'plot_window_sizes', 'plot_interaction', 'plot_interaction_matrices', 'plot_erf_rects',
    'plot_tendency_arrows', 'plot_tendency_flow', 'flow_colors', 'plot_removal', 'erf_pictures',
    'default_patches', 'pick_blocks',
]

PatchLike = Union[int, Tuple[int, int]]


def _plt():
    import matplotlib
    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Union[str, Path], dpi: int = 110) -> Path:
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def pick_blocks(blocks: Sequence[int], max_blocks: int = 6) -> List[int]:
    """At most ``max_blocks`` of ``blocks``, evenly spaced, always keeping the first and last."""
    blocks = list(blocks)
    if len(blocks) <= max_blocks:
        return blocks
    idx = np.unique(np.round(np.linspace(0, len(blocks) - 1, max_blocks)).astype(int))
    return [blocks[i] for i in idx]


def default_patches(grid: Sequence[int]) -> List[Tuple[int, int]]:
    """A few telling query patches: the centre, two corners and an off-centre one."""
    h, w = int(grid[0]), int(grid[1])
    cands = [(h // 2, w // 2), (0, 0), (h // 4, (3 * w) // 4), (h - 1, w - 1)]
    out: List[Tuple[int, int]] = []
    for c in cands:
        if c not in out:
            out.append(c)
    return out


def _patch_yx(p: PatchLike, grid: Sequence[int]) -> Tuple[int, int]:
    h, w = int(grid[0]), int(grid[1])
    if isinstance(p, (int, np.integer)):
        if not 0 <= int(p) < h * w:
            raise ValueError(f'patch index {p} out of range for a {h}x{w} grid (0..{h * w - 1})')
        return divmod(int(p), w)
    y, x = (int(v) for v in p)
    if not (0 <= y < h and 0 <= x < w):
        raise ValueError(f'patch {(y, x)} outside the {h}x{w} grid')
    return y, x


def _grid_panels(n: int, max_cols: int = 6):
    plt = _plt()
    cols = min(max_cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols + 0.8, 2.4 * rows + 0.7), squeeze=False)
    flat = [axes[i // cols][i % cols] for i in range(rows * cols)]
    for ax in flat[n:]:
        ax.axis('off')
    return fig, axes, flat[:n]


def _grid_axes(ax, grid: Sequence[int], lines: bool = True) -> None:
    h, w = int(grid[0]), int(grid[1])
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_aspect('equal')
    ax.set_xticks([])
    ax.set_yticks([])
    if lines and max(h, w) <= 32:
        for y in range(1, h):
            ax.axhline(y, color='0.85', lw=0.4, zorder=0)
        for x in range(1, w):
            ax.axvline(x, color='0.85', lw=0.4, zorder=0)


def _as_rgb(image: Any, model=None) -> np.ndarray:
    """An ``(h, w, 3)`` uint8 array from a normalised ``(C, H, W)`` tensor (needs ``model`` or
    the identity normalisation), a PIL image or an array."""
    try:
        import torch
        if torch.is_tensor(image):
            from .interaction import to_display_image
            return to_display_image(image, model)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    if hasattr(image, 'convert'):
        return np.asarray(image.convert('RGB'))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8) if arr.max() <= 1.0 else arr.astype(np.uint8)
    return arr


def _maps_dict(maps: Any) -> Dict[int, np.ndarray]:
    """``{block: (N, N) array}`` from an InteractionResult or a mapping of tensors/arrays
    (per-head maps are averaged over heads)."""
    src = maps.maps if hasattr(maps, 'maps') else maps
    out = {}
    for b, m in src.items():
        a = m.detach().cpu().double().numpy() if hasattr(m, 'detach') else np.asarray(m, dtype=np.float64)
        out[int(b)] = a.mean(0) if a.ndim == 3 else a
    return out


# ---- window sizes ---------------------------------------------------------------------------------
def plot_window_sizes(spec, path: Union[str, Path], title: Optional[str] = None) -> Path:
    """One heat map per block: each patch coloured by its window area as a fraction of the grid
    (mean over heads for per-head blocks); global blocks are drawn full and labelled."""
    plt = _plt()
    h, w = spec.grid
    n = h * w
    cols = min(6, spec.depth)
    rows = math.ceil(spec.depth / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols + 0.8, 2.2 * rows + 0.6), squeeze=False)
    im = None
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= spec.depth:
            ax.axis('off')
            continue
        areas = spec.areas(i)
        if areas is None:
            frac = np.ones((h, w))
            label = f'block {i}: global'
        else:
            frac = (areas.mean(axis=0) if areas.ndim == 3 else areas) / n
            label = f'block {i}: {100 * frac.mean():.0f}%'
        im = ax.imshow(frac, vmin=0, vmax=1, cmap='viridis', interpolation='nearest')
        ax.set_title(label, fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label='window area / grid')
    prov = spec.provenance.get('kind', '?')
    fig.suptitle(title or f'Window size per patch ({h}x{w} grid, {prov} spec)', fontsize=11)
    return _save(fig, path)


# ---- interaction maps -----------------------------------------------------------------------------
def plot_interaction(
        image: Any,
        maps: Any,
        grid: Sequence[int],
        path: Union[str, Path],
        patches: Optional[Sequence[PatchLike]] = None,
        blocks: Optional[Sequence[int]] = None,
        model=None,
        title: Optional[str] = None,
) -> Path:
    """Rows: query patches (outlined in cyan); columns: blocks.  Each panel shows the image with
    the query's interaction row ``P_l(i, .)`` laid over it (scaled to the panel's maximum).

    ``image``: a normalised ``(C, H, W)`` tensor (pass ``model`` to undo the normalisation), a PIL
    image or an array; ``maps``: an InteractionResult or ``{block: (N, N)}``.
    """
    plt = _plt()
    from matplotlib.patches import Rectangle
    h, w = int(grid[0]), int(grid[1])
    rgb = _as_rgb(image, model)
    m = _maps_dict(maps)
    for b, a in m.items():
        if a.shape != (h * w, h * w):
            raise ValueError(f'map of block {b} has shape {a.shape}, expected ({h * w}, {h * w}) for grid {h}x{w}')
    blocks = pick_blocks(sorted(m) if blocks is None else list(blocks))
    patches = [_patch_yx(p, (h, w)) for p in (default_patches((h, w)) if patches is None else patches)]
    rows, cols = len(patches), len(blocks)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols + 0.6, 2.2 * rows + 0.6), squeeze=False)
    for r, (y, x) in enumerate(patches):
        for c, b in enumerate(blocks):
            ax = axes[r][c]
            heat = m[b][y * w + x].reshape(h, w)
            ax.imshow(rgb, extent=(0, w, h, 0), interpolation='bilinear')
            top = heat.max()
            ax.imshow(heat / top if top > 0 else heat, extent=(0, w, h, 0), cmap='inferno', alpha=0.65,
                      vmin=0, vmax=1, interpolation='nearest')
            ax.add_patch(Rectangle((x, y), 1, 1, fill=False, ec='cyan', lw=1.6))
            _grid_axes(ax, (h, w), lines=False)
            if r == 0:
                ax.set_title(f'block {b}', fontsize=9)
            if c == 0:
                ax.set_ylabel(f'patch ({y},{x})', fontsize=8)
    fig.suptitle(title or 'Interaction of query patches (cyan) with every patch', fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_interaction_matrices(maps: Any, path: Union[str, Path], blocks: Optional[Sequence[int]] = None,
                              title: Optional[str] = None) -> Path:
    """The full ``N x N`` map per block (queries are rows), on a square-root colour scale."""
    m = _maps_dict(maps)
    blocks = pick_blocks(sorted(m) if blocks is None else list(blocks), 12)
    fig, axes, panels = _grid_panels(len(blocks))
    im = None
    for ax, b in zip(panels, blocks):
        a = m[b]
        im = ax.imshow(np.sqrt(a / a.max()) if a.max() > 0 else a, cmap='magma', vmin=0, vmax=1,
                       interpolation='nearest')
        ax.set_title(f'block {b}', fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label='sqrt(P / max P)')
    fig.suptitle(title or 'Interaction maps P (row = query patch, column = key patch)', fontsize=10)
    return _save(fig, path)


# ---- ERFs -----------------------------------------------------------------------------------------
def _sample_patches(grid: Sequence[int], per_side: int = 3) -> List[Tuple[int, int]]:
    h, w = int(grid[0]), int(grid[1])
    ys = np.unique(np.round(np.linspace(0, h - 1, min(per_side, h))).astype(int))
    xs = np.unique(np.round(np.linspace(0, w - 1, min(per_side, w))).astype(int))
    return [(int(y), int(x)) for y in ys for x in xs]


def _block_title(result, b: int) -> str:
    erf = result.blocks[b]
    n = result.grid[0] * result.grid[1]
    tag = ' (global)' if b in result.global_blocks else ''
    return f'block {b}{tag}: {100 * erf.mean_area / n:.0f}%'


def plot_erf_rects(result, path: Union[str, Path], blocks: Optional[Sequence[int]] = None,
                   patches: Optional[Sequence[PatchLike]] = None, head: Optional[int] = None,
                   title: Optional[str] = None) -> Path:
    """ERF rectangles of a few patches (a 3x3 lattice by default) in each block, drawn on the
    patch grid, each in its own colour with its patch filled.  Panel titles give the mean ERF
    area as a share of the grid; ``(global)`` marks blocks that became global.  Per-head results
    show ``head`` (default: head 0)."""
    plt = _plt()
    from matplotlib.patches import Rectangle
    grid = result.grid
    blocks = pick_blocks(range(len(result.blocks)) if blocks is None else list(blocks), 12)
    pts = [_patch_yx(p, grid) for p in (_sample_patches(grid) if patches is None else patches)]
    colors = plt.get_cmap('tab10')
    fig, axes, panels = _grid_panels(len(blocks))
    for ax, b in zip(panels, blocks):
        rects = result.blocks[b].rects
        if rects.ndim == 4:
            rects = rects[0 if head is None else head]
        _grid_axes(ax, grid)
        for k, (y, x) in enumerate(pts):
            u, d, l, r = (int(v) for v in rects[y, x])
            col = colors(k % 10)
            ax.add_patch(Rectangle((x - l + 0.08, y - u + 0.08), l + r + 1 - 0.16, u + d + 1 - 0.16, fill=False,
                                   ec=col, lw=1.5))
            ax.add_patch(Rectangle((x, y), 1, 1, color=col, alpha=0.8))
        ax.set_title(_block_title(result, b), fontsize=9)
    fig.suptitle(title or f'ERF rectangles (tau={result.tau:g}) of sample patches', fontsize=10)
    return _save(fig, path)


def _tendency(result, b: int, head: Optional[int]) -> np.ndarray:
    t = result.blocks[b].tendency
    if t.ndim == 4:
        t = t.mean(0) if head is None else t[head]
    return t


def plot_tendency_arrows(result, path: Union[str, Path], blocks: Optional[Sequence[int]] = None,
                         head: Optional[int] = None, title: Optional[str] = None) -> Path:
    """Tendency vectors as arrows from patch centres (every patch on grids up to 12 a side, a
    lattice otherwise) over the ERF area of each patch as a grey background.  One scale for all
    blocks: the longest arrow spans 0.9 lattice steps and its length in patches is printed.
    Per-head results: mean over heads unless ``head`` is given."""
    grid = result.grid
    h, w = grid
    n = h * w
    blocks = pick_blocks(range(len(result.blocks)) if blocks is None else list(blocks), 12)
    fields = {b: _tendency(result, b, head) for b in blocks}
    top = max(float(np.hypot(f[..., 0], f[..., 1]).max()) for f in fields.values())
    step = max(1, math.ceil(max(h, w) / 12))
    scale = top / (0.9 * step) if top > 0 else 1.0
    ys, xs = np.mgrid[0:h:step, 0:w:step]
    fig, axes, panels = _grid_panels(len(blocks))
    for ax, b in zip(panels, blocks):
        area = result.blocks[b].area
        area = area.mean(0) if area.ndim == 3 else area
        ax.imshow(area / n, extent=(0, w, h, 0), cmap='Greys', vmin=0, vmax=1.6, interpolation='nearest')
        t = fields[b][::step, ::step]
        ax.quiver(xs + 0.5, ys + 0.5, t[..., 1], t[..., 0], angles='xy', scale_units='xy', scale=scale,
                  color='tab:red', width=0.012, headwidth=3.5, minlength=0.05)
        _grid_axes(ax, grid, lines=False)
        ax.set_title(_block_title(result, b), fontsize=9)
    fig.suptitle(title or f'Tendency t(i) = sum_j P(i,j)(p_j - p_i); longest arrow = {top:.2f} patches '
                          f'(grey: ERF area)', fontsize=10)
    return _save(fig, path)


def flow_colors(vectors: np.ndarray, max_length: Optional[float] = None) -> np.ndarray:
    """Optical-flow style colours for ``(..., 2)`` vectors ``(dy, dx)``: hue = direction, saturation
    = ``sqrt(length / max_length)`` (default: the largest length; the square root keeps short
    vectors visible), value = 1, so zero is white.  Returns ``(..., 3)`` RGB floats in ``[0, 1]``."""
    from matplotlib.colors import hsv_to_rgb
    dy, dx = vectors[..., 0], vectors[..., 1]
    length = np.hypot(dx, dy)
    top = float(length.max()) if max_length is None else float(max_length)
    hue = (np.arctan2(-dy, dx) / (2 * np.pi)) % 1.0  # counter-clockwise from "right", y up on screen
    sat = np.sqrt(np.clip(length / top, 0, 1)) if top > 0 else np.zeros_like(length)
    return hsv_to_rgb(np.stack([hue, sat, np.ones_like(hue)], axis=-1))


def plot_tendency_flow(result, path: Union[str, Path], blocks: Optional[Sequence[int]] = None,
                       head: Optional[int] = None, title: Optional[str] = None) -> Path:
    """Tendency as a colour image per block (hue = direction, saturation = square root of the
    length, one scale for all blocks, white = no tendency), with the colour wheel as the key."""
    grid = result.grid
    h, w = grid
    blocks = pick_blocks(range(len(result.blocks)) if blocks is None else list(blocks), 12)
    fields = {b: _tendency(result, b, head) for b in blocks}
    top = max(float(np.hypot(f[..., 0], f[..., 1]).max()) for f in fields.values())
    fig, axes, panels = _grid_panels(len(blocks) + 1)
    for ax, b in zip(panels, blocks):
        ax.imshow(flow_colors(fields[b], top), extent=(0, w, h, 0), interpolation='nearest')
        _grid_axes(ax, grid, lines=False)
        ax.set_title(_block_title(result, b), fontsize=9)
    key = panels[-1]
    r = np.linspace(-1, 1, 121)
    yy, xx = np.meshgrid(r, r, indexing='ij')
    wheel = flow_colors(np.stack([yy, xx], axis=-1) * top, top)
    wheel[np.hypot(xx, yy) > 1] = 1.0
    key.imshow(wheel, extent=(-top, top, top, -top))
    key.set_title(f'key: direction, length up to {top:.2f}', fontsize=8)
    key.set_xlabel('dx (patches)', fontsize=7)
    key.set_ylabel('dy (patches)', fontsize=7)
    key.tick_params(labelsize=6)
    fig.suptitle(title or 'Tendency field (hue = direction, saturation = length)', fontsize=10)
    return _save(fig, path)


# ---- patch removal --------------------------------------------------------------------------------
def plot_removal(result, path: Union[str, Path], title: Optional[str] = None) -> Path:
    """Accuracy against the fraction of patches removed, one line per score."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    marks = {'interaction': 'o', 'sift': 's', 'random': '^'}
    for s, acc in result.accuracy.items():
        ax.plot(100 * np.asarray(result.fractions), 100 * np.asarray(acc), marker=marks.get(s, '.'), label=s)
    ax.set_xlabel('patches removed as keys, lowest score first (%)')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(title='score', fontsize=8)
    ax.set_title(title or f'Patch removal ({result.num_images} images, {result.grid[0]}x{result.grid[1]} grid)',
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# ---- everything for one measurement ----------------------------------------------------------------
def erf_pictures(result, out_dir: Union[str, Path], image: Any = None, model=None,
                 patches: Optional[Sequence[PatchLike]] = None, prefix: str = '') -> Dict[str, Path]:
    """Write the standard pictures of an :class:`~vitfree.analysis.erf.ErfResult` into ``out_dir``:
    window sizes of the measured spec, ERF rectangles, tendency arrows and colour field, the
    interaction matrices, and (with ``image``) interaction maps of a few patches over the image.
    Returns ``{name: path}``."""
    out = Path(out_dir)
    files = {
        'window_sizes': plot_window_sizes(result.spec, out / f'{prefix}window_sizes.png'),
        'erf_rects': plot_erf_rects(result, out / f'{prefix}erf_rects.png'),
        'tendency_arrows': plot_tendency_arrows(result, out / f'{prefix}tendency_arrows.png'),
        'tendency_flow': plot_tendency_flow(result, out / f'{prefix}tendency_flow.png'),
    }
    if result.interaction is not None:
        files['interaction_matrices'] = plot_interaction_matrices(result.interaction,
                                                                  out / f'{prefix}interaction_matrices.png')
        if image is not None:
            files['interaction_maps'] = plot_interaction(image, result.interaction, result.grid,
                                                         out / f'{prefix}interaction_maps.png', patches=patches,
                                                         model=model)
    return files
