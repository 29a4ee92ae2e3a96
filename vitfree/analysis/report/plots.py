"""Every picture of the analyses (matplotlib, Agg backend): each function writes one PNG and
returns its path.

Plots read the result objects of the analyses (``InteractionResult``, ``ErfResult``,
``DistanceProfiles``, ``HeadImportance``, ``AttentionPatterns``, ``SemanticResult``,
``RemovalResult``) by their attributes only, so this module imports no analysis module but
:mod:`vitfree.analysis.inputs` (to show images as the model sees them).

Grids are drawn with row 0 at the top, as on the image; a patch ``(y, x)`` is the unit square
``[x, x+1] x [y, y+1]``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..inputs import to_display_image

__all__ = [
    'plot_window_sizes', 'plot_interaction', 'plot_interaction_matrices', 'plot_erf_rects',
    'plot_tendency_arrows', 'plot_tendency_flow', 'flow_colors', 'plot_removal', 'erf_pictures',
    'default_patches', 'pick_blocks',
    'plot_head_importance', 'plot_entropy_by_layer', 'plot_hop_profiles', 'plot_pattern_map',
    'plot_pattern_clusters', 'plot_sift_keypoints', 'plot_semantic_lifts', 'plot_images',
]

PatchLike = Union[int, Tuple[int, int]]
PathLike = Union[str, Path]


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
    if hasattr(image, 'detach'):  # a torch tensor
        return to_display_image(image, model)
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


def _grid_lines(ax, grid: Sequence[int]) -> None:
    """Patch grid axes: row 0 at the top, thin lines between patches (up to 32 a side)."""
    h, w = int(grid[0]), int(grid[1])
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if max(h, w) <= 32:
        for y in range(1, h):
            ax.axhline(y, color='white', lw=0.3, alpha=0.6)
        for x in range(1, w):
            ax.axvline(x, color='white', lw=0.3, alpha=0.6)


def _heat(ax, values: np.ndarray, title: str, cmap: str, vmin: float, vmax: float, blocks: Sequence[int],
          annotate: bool = True, fmt: str = '{:.2f}'):
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect='auto', interpolation='nearest')
    ax.set_title(title, fontsize=9)
    nb, nh = values.shape
    ax.set_xticks(range(nh))
    ax.set_xticklabels([str(h) for h in range(nh)], fontsize=6)
    step = max(1, math.ceil(nb / 12))
    ax.set_yticks(range(0, nb, step))
    ax.set_yticklabels([str(blocks[i]) for i in range(0, nb, step)], fontsize=6)
    if annotate and nb * nh <= 48 and max(abs(vmin), abs(vmax)) >= 0.005:
        span = max(abs(vmax - vmin), 1e-12)
        diverging = cmap in ('RdBu_r', 'coolwarm')
        for b in range(nb):
            for h in range(nh):
                v = values[b, h]
                if np.isfinite(v):
                    # white text on the dark ends of the colour map
                    light = abs(v - (vmin + vmax) / 2) / span > 0.3 if diverging else (v - vmin) / span > 0.6
                    text = fmt.format(v)
                    if text.lstrip('-').strip('0.') == '':
                        text = '0'
                    ax.text(h, b, text, ha='center', va='center', fontsize=5.5,
                            color='white' if light else 'black')
    return im


def plot_head_importance(imp, path: PathLike, title: Optional[str] = None) -> Path:
    """Blocks x heads heat maps: top row the mean drop of the target probability per pruning
    mode, bottom row the accuracy drop, and the gradient gate score in the last column."""
    plt = _plt()
    modes = list(imp.modes)
    pdrop, adrop, gate = imp.prob_drop(), imp.accuracy_drop(), imp.gate_score()
    cols = len(modes) + (gate is not None)
    nb, nh = pdrop.shape[1:]
    cw = max(1.5, min(0.22 * nh + 0.7, 2.6))
    fig, axes = plt.subplots(2, cols, figsize=(cw * cols + 1.2, 2 * max(2.0, 0.22 * nb + 1.0) + 0.8), squeeze=False,
                             layout='constrained')
    plim = max(float(np.abs(pdrop).max()), 1e-6)
    alim = max(float(np.abs(adrop).max()), 1e-6)
    im_p = im_a = None
    for c, m in enumerate(modes):
        im_p = _heat(axes[0][c], pdrop[c], f'{m}: {imp.mode_names[m]}', 'RdBu_r', -plim, plim, imp.blocks)
        im_a = _heat(axes[1][c], adrop[c], f'{m}: {imp.mode_names[m]}', 'RdBu_r', -alim, alim, imp.blocks)
        axes[1][c].set_xlabel('head', fontsize=7)
    axes[0][0].set_ylabel('block\n(target prob. drop)', fontsize=7)
    axes[1][0].set_ylabel('block\n(accuracy drop)', fontsize=7)
    if gate is not None:
        _heat(axes[0][-1], gate, 'gate |dL/dg|', 'viridis', 0.0, max(float(gate.max()), 1e-12), imp.blocks,
              fmt='{:.2g}')
        axes[1][-1].axis('off')
        axes[1][-1].text(0.0, 0.5, 'gate score:\nmean |dLoss/dg| for a\ngate g=1 on the head\'s output',
                         fontsize=7, va='center', transform=axes[1][-1].transAxes)
    fig.colorbar(im_p, ax=[axes[0][c] for c in range(len(modes))], shrink=0.85, pad=0.01).ax.tick_params(labelsize=6)
    fig.colorbar(im_a, ax=[axes[1][c] for c in range(len(modes))], shrink=0.85, pad=0.01).ax.tick_params(labelsize=6)
    fig.suptitle(title or f'Head importance by partial pruning ({imp.num_images} image(s); red = pruning hurts)',
                 fontsize=10)
    return _save(fig, path)


def plot_entropy_by_layer(prof, path: PathLike, title: Optional[str] = None) -> Path:
    """Head entropy against block: one dot per head (dataset mean), small grey dots for single
    images; the dashed line is the largest possible entropy ``ln(max(H, W))``."""
    plt = _plt()
    ent = prof.entropy  # (I, L, h)
    nb, nh = ent.shape[1:]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * nb + 2.5), 3.6))
    offs = (np.arange(nh) - (nh - 1) / 2) * (0.6 / max(nh, 1))
    colors = plt.get_cmap('tab20' if nh > 10 else 'tab10')
    for h in range(nh):
        xs = np.arange(nb) + offs[h]
        if prof.num_images > 1:
            for i in range(ent.shape[0]):
                ax.scatter(xs, ent[i, :, h], s=4, color='0.75', zorder=1, lw=0)
        ax.scatter(xs, prof.mean_entropy[:, h], s=18, color=colors(h % 20), zorder=2,
                   label=f'head {h}' if nh <= 16 else None)
    top = math.log(prof.hops)
    ax.axhline(top, ls='--', color='0.4', lw=0.8, label=f'ln({prof.hops}) = {top:.2f}: no distance preference')
    ax.set_xticks(range(nb))
    ax.set_xticklabels([str(b) for b in prof.blocks], fontsize=7)
    ax.set_xlabel('block')
    ax.set_ylabel('head entropy (nats)')
    ax.set_ylim(-0.05, top * 1.35 + 0.05)  # room for the legend above the maximum
    ax.grid(alpha=0.25)
    ax.legend(fontsize=6, ncol=min(nh + 1, 5), loc='upper left', frameon=True, framealpha=0.9)
    ax.set_title(title or 'Entropy of the hop-distance distribution per head (low = local head)', fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_hop_profiles(prof, path: PathLike, max_blocks: int = 12, title: Optional[str] = None) -> Path:
    """One panel per block: each head's attention strength per hop (dataset mean, normalised to
    a distribution over hops); the dotted line is uniform attention."""
    plt = _plt()
    blocks = pick_blocks(list(range(len(prof.blocks))), max_blocks)
    dist = prof.hop_distribution().mean(0)  # (L, h, hops)
    cols = min(4, len(blocks))
    rows = math.ceil(len(blocks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols + 0.4, 2.3 * rows + 0.7), squeeze=False, sharey=True)
    colors = plt.get_cmap('tab20' if dist.shape[1] > 10 else 'tab10')
    hops = np.arange(prof.hops)
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= len(blocks):
            ax.axis('off')
            continue
        bi = blocks[k]
        for h in range(dist.shape[1]):
            ax.plot(hops, dist[bi, h], marker='.', ms=3, lw=1, color=colors(h % 20))
        ax.axhline(1 / prof.hops, ls=':', color='0.4', lw=0.8)
        ax.set_title(f'block {prof.blocks[bi]}', fontsize=8)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.25)
        if k // cols == rows - 1:
            ax.set_xlabel('hop (Chebyshev distance)', fontsize=7)
        if k % cols == 0:
            ax.set_ylabel('share p_n', fontsize=7)
    fig.suptitle(title or f'Attention strength by hop distance (average over {prof.average}; one line per head)',
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_pattern_map(pat, path: PathLike, title: Optional[str] = None) -> Path:
    """Left: the 2-D PCA map of the autoencoder latents, one dot per (image, block, head),
    coloured by cluster.  Right: each head's most frequent cluster (blocks x heads)."""
    plt = _plt()
    from matplotlib.colors import ListedColormap
    colors = plt.get_cmap('tab10')
    cmap = ListedColormap([colors(c % 10) for c in range(pat.k)])
    nb, nh = pat.head_cluster.shape
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.5, 4.0), gridspec_kw={'width_ratios': [1.5, 1]})
    depth = pat.descriptors.index[:, 1]
    for c in range(pat.k):
        sel = pat.labels == c
        ax.scatter(pat.coords[sel, 0], pat.coords[sel, 1], s=14, color=colors(c % 10), alpha=0.75, lw=0,
                   label=f'cluster {c} ({int(sel.sum())})')
    if len(depth) <= 400:
        for (x, y), b in zip(pat.coords, depth):
            ax.annotate(str(int(b)), (x, y), fontsize=4.5, color='0.35', xytext=(1.5, 1.5), textcoords='offset points')
    ev = pat.explained_variance
    ax.set_xlabel(f'PC 1 ({100 * ev[0]:.0f}% of variance)' if len(ev) else 'PC 1', fontsize=8)
    ax.set_ylabel(f'PC 2 ({100 * ev[1]:.0f}%)' if len(ev) > 1 else 'PC 2', fontsize=8)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6, frameon=False, loc='best')
    ax.set_title('latent map (small numbers: block)', fontsize=9)
    ax2.imshow(pat.head_cluster, cmap=cmap, vmin=-0.5, vmax=pat.k - 0.5, aspect='auto', interpolation='nearest')
    for b in range(nb):
        for h in range(nh):
            if nb * nh <= 200:
                ax2.text(h, b, str(pat.head_cluster[b, h]), ha='center', va='center', fontsize=6, color='white')
    ax2.set_xticks(range(nh))
    ax2.set_xticklabels([str(h) for h in range(nh)], fontsize=6)
    ax2.set_yticks(range(nb))
    ax2.set_yticklabels([str(b) for b in pat.descriptors.blocks], fontsize=6)
    ax2.set_xlabel('head', fontsize=8)
    ax2.set_ylabel('block', fontsize=8)
    ax2.set_title('cluster of each head (majority over images)', fontsize=9)
    fig.suptitle(title or f'Attention patterns: autoencoder (latent {pat.latents.shape[1]}), k-means k={pat.k}, '
                          f'seed {pat.seed}', fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_pattern_clusters(pat, path: PathLike, title: Optional[str] = None) -> Path:
    """One column per cluster: its mean class-token map over the patch grid (top) and its mean
    hop distribution (bottom)."""
    plt = _plt()
    k = pat.k
    fig, axes = plt.subplots(2, k, figsize=(1.9 * k + 0.6, 4.0), squeeze=False)
    colors = plt.get_cmap('tab10')
    hops = np.arange(pat.mean_hop.shape[1])
    top = max(float(pat.mean_hop.max()), 1e-6) * 1.1
    sizes = pat.cluster_sizes()
    for c in range(k):
        ax = axes[0][c]
        ax.imshow(pat.mean_cls_map[c], cmap='magma', interpolation='nearest')
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f'cluster {c} (n={sizes[c]})', fontsize=8, color=colors(c % 10))
        ax = axes[1][c]
        ax.bar(hops, pat.mean_hop[c], color=colors(c % 10))
        ax.axhline(1 / len(hops), ls=':', color='0.4', lw=0.8)
        ax.set_ylim(0, top)
        ax.tick_params(labelsize=6)
        ax.set_xlabel('hop', fontsize=7)
    axes[0][0].set_ylabel(pat.descriptors.source, fontsize=7)
    axes[1][0].set_ylabel('share p_n', fontsize=7)
    fig.suptitle(title or 'Mean descriptor per cluster: where the class token looks, how far the head looks',
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_images(images: Sequence[np.ndarray], names: Sequence[str], path: PathLike,
                title: Optional[str] = None) -> Path:
    """The images as the model sees them, named, up to four in a row."""
    plt = _plt()
    n = len(images)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.75 * rows + (0.3 if title else 0)), squeeze=False)
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        ax.axis('off')
        if k < n:
            ax.imshow(images[k], interpolation='nearest' if images[k].shape[0] < 96 else 'bilinear')
            ax.set_title(str(names[k]), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_sift_keypoints(sem_images: Sequence, names: Sequence[str], path: PathLike, max_images: int = 4,
                        title: Optional[str] = None) -> Path:
    """Per image: the SIFT keypoints (circles of the keypoint's size) over the image, and the
    concentration group of every patch (0 = no keypoint, 1-3 = low/mid/high mass)."""
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Circle
    items = list(sem_images)[:max_images]
    n = len(items)
    fig, axes = plt.subplots(n, 2, figsize=(6.4, 3.1 * n + 0.5), squeeze=False)
    cmap = ListedColormap(['#d9d9d9', '#fdd49e', '#fc8d59', '#b30000'])
    for r, s in enumerate(items):
        gh, gw = s.grid
        h, w = s.image.shape[:2]
        ax = axes[r][0]
        ax.imshow(s.image, extent=(0, w, h, 0))
        kp = s.keypoints
        for x, y, size in zip(kp.x, kp.y, kp.size):
            ax.add_patch(Circle((x, y), max(size / 2, 0.6), fill=False, ec='yellow', lw=0.6))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f'{names[r]}: {len(kp)} SIFT keypoints', fontsize=8)
        ax = axes[r][1]
        ax.imshow(s.image, extent=(0, gw, gh, 0), alpha=0.45)
        ax.imshow(s.groups.reshape(gh, gw), cmap=cmap, vmin=-0.5, vmax=3.5, alpha=0.7, extent=(0, gw, gh, 0),
                  interpolation='nearest')
        _grid_lines(ax, (gh, gw))
        sizes = s.group_sizes()
        ax.set_title('groups: ' + ', '.join(f'{g} {s.group_names[g]} ({sizes[g]})' for g in range(4)),
                     fontsize=6.5)
    fig.suptitle(title or f'SIFT keypoints on the images as the model sees them; patch groups by {items[0].weight}'
                 if items else 'SIFT', fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_semantic_lifts(sem, path: PathLike, title: Optional[str] = None) -> Path:
    """Three panels: the query lift per block and head; the class-token lift on each group
    against block; the group-to-group lift of the last measured block."""
    plt = _plt()
    names = sem.group_names
    q = sem.mean_query_lift()
    cl = sem.mean_cls_lift()
    g = sem.mean_group_lift()
    fig, axes = plt.subplots(1, 3, figsize=(12.0, max(3.4, 0.2 * len(sem.blocks) + 2.2)),
                             gridspec_kw={'width_ratios': [1.1, 1.3, 1.0]})
    finite = q[np.isfinite(q)]
    span = max(float(np.abs(finite - 1).max()) if finite.size else 0.0, 1e-3)
    im = _heat(axes[0], q, 'query lift (1 = no preference)', 'RdBu_r', 1 - span, 1 + span, sem.blocks)
    axes[0].set_xlabel('head', fontsize=7)
    axes[0].set_ylabel('block', fontsize=7)
    fig.colorbar(im, ax=axes[0], shrink=0.85).ax.tick_params(labelsize=6)
    ax = axes[1]
    if cl is not None:
        colors = ['#969696', '#fdae6b', '#f16913', '#a50f15']
        for k in range(4):
            ax.plot(sem.blocks, cl[:, k], marker='o', ms=3, color=colors[k], label=f'{k} {names[k]}')
        ax.axhline(1.0, ls=':', color='0.4', lw=0.8)
        ax.set_xlabel('block', fontsize=7)
        ax.set_ylabel("class token's lift", fontsize=7)
        ax.legend(fontsize=6, frameon=False, title='group', title_fontsize=6)
        ax.grid(alpha=0.25)
        ax.tick_params(labelsize=6)
        ax.set_title('class-token lift per group (mean over heads, images)', fontsize=9)
    else:
        ax.axis('off')
        ax.text(0.5, 0.5, 'no class token', ha='center', va='center')
    ax = axes[2]
    last = g[-1]
    fin = last[np.isfinite(last)]
    span = max(float(np.abs(fin - 1).max()) if fin.size else 0.0, 1e-3)
    ax.imshow(last, cmap='RdBu_r', vmin=1 - span, vmax=1 + span, interpolation='nearest')
    for a in range(4):
        for b in range(4):
            v = last[a, b]
            ax.text(b, a, '-' if not np.isfinite(v) else f'{v:.2f}', ha='center', va='center', fontsize=7)
    ax.set_xticks(range(4))
    ax.set_xticklabels([f'{k} {names[k]}' for k in range(4)], fontsize=6)
    ax.set_yticks(range(4))
    ax.set_yticklabels([f'{k} {names[k]}' for k in range(4)], fontsize=6)
    ax.set_xlabel('key group', fontsize=7)
    ax.set_ylabel('query group', fontsize=7)
    ax.set_title(f'group-to-group lift, block {sem.blocks[-1]}', fontsize=9)
    fig.suptitle(title or f'Semantic attention lift ({sem.weight} weights; above 1 = more attention on keypoint '
                          f'mass than uniform attention would give)', fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
