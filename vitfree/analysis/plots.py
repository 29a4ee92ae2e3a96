"""Every picture of the analyses (matplotlib, Agg backend): each function writes one PNG and
returns its path.

Plots read the result objects of the analyses (``InteractionResult``, ``ErfResult``,
``DistanceProfiles``, ``HeadImportance``, ``AttentionPatterns``, ``SemanticResult``,
``RemovalResult``) by their attributes only, so this module imports no analysis module but
:mod:`vitfree.analysis.inputs` (to show images as the model sees them).

Sizes are chosen for a page 1000 px wide: a figure is at most :data:`PAGE_WIDTH` inches wide
at :data:`DPI`, so it is shown at its own size, and no text is smaller than
:data:`SMALL_FONT` points (about 11 px).  Every colour encoding has a colour bar, a key or a
legend in the figure.

Grids are drawn with row 0 at the top, as on the image; a patch ``(y, x)`` is the unit square
``[x, x+1] x [y, y+1]``.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .inputs import to_display_image

__all__ = [
    'DPI', 'PAGE_WIDTH', 'SMALL_FONT',
    'plot_window_sizes', 'plot_interaction', 'plot_interaction_matrices', 'plot_erf_rects', 'MAX_PATCHES',
    'plot_tendency', 'plot_removal', 'erf_pictures',
    'default_patches', 'pick_blocks',
    'plot_head_importance', 'HEAD_MEASURES', 'plot_entropy_by_layer', 'plot_hop_profiles', 'plot_pattern_map',
    'plot_pattern_clusters', 'plot_sift_keypoints', 'plot_semantic_lifts', 'plot_images',
]

PatchLike = Union[int, Tuple[int, int]]
PathLike = Union[str, Path]

DPI = 110          # pixels per inch of the PNGs
PAGE_WIDTH = 8.4   # inches: 924 px, the width of the report's text column in a 1000 px window
SMALL_FONT = 7     # points: the smallest text in any picture (cell numbers, ticks): ~11 px
MAX_COLS = 4       # panels per row of a block-by-block figure
STYLE = {
    'font.size': 8, 'axes.titlesize': 8.5, 'axes.labelsize': 8, 'xtick.labelsize': SMALL_FONT,
    'ytick.labelsize': SMALL_FONT, 'legend.fontsize': SMALL_FONT + 0.5, 'legend.title_fontsize': 8,
    'figure.titlesize': 10, 'figure.dpi': DPI, 'savefig.dpi': DPI,
}
MISSING = '0.82'   # colour of entries that are exactly zero (outside a window) or undefined


def _plt():
    import matplotlib
    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt
    return plt


def _styled(fn):
    """Run a plot function under :data:`STYLE` (fonts, DPI) without touching global settings."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib
        _plt()
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


def _save(fig, path: PathLike) -> Path:
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches='tight', pad_inches=0.08)  # legends outside the axes are kept
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


def _grid_panels(n: int, extra: int = 0, max_cols: int = MAX_COLS, panel: float = 1.85, head: float = 0.45):
    """``n`` square panels (plus ``extra`` free ones at the end) in rows of ``max_cols``, at most
    :data:`PAGE_WIDTH` wide; returns the figure, all axes, the ``n`` panels and the extras."""
    plt = _plt()
    total = n + extra
    cols = min(max_cols, total)
    rows = math.ceil(total / cols)
    side = min(panel, (PAGE_WIDTH - 0.9) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 0.9, (side + head) * rows + 0.5), squeeze=False,
                             layout='constrained')
    flat = [axes[i // cols][i % cols] for i in range(rows * cols)]
    for ax in flat[total:]:
        ax.axis('off')
    return fig, axes, flat[:n], flat[n:total]


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


def _shared_log_norm(values: Sequence[np.ndarray], n: int):
    """One logarithmic colour scale for interaction values of several blocks: from a tenth of
    uniform interaction over the whole grid (``0.1 / N``) to the largest value shown."""
    from matplotlib.colors import LogNorm
    top = max([float(v.max()) for v in values] + [1.0 / n])
    return LogNorm(vmin=min(0.1 / n, top / 10), vmax=top, clip=True)


def _masked_cmap(name: str):
    import matplotlib
    return matplotlib.colormaps[name].with_extremes(bad=MISSING)


# ---- window sizes ---------------------------------------------------------------------------------
@_styled
def plot_window_sizes(spec, path: PathLike, title: Optional[str] = None) -> Path:
    """One heat map per block: each patch coloured by its window area as a fraction of the grid
    (mean over heads for per-head blocks); global blocks are drawn full and labelled."""
    h, w = spec.grid
    n = h * w
    fig, axes, panels, _ = _grid_panels(spec.depth)
    im = None
    for i, ax in enumerate(panels):
        areas = spec.areas(i)
        if areas is None:
            frac, label = np.ones((h, w)), f'block {i}: global'
        else:
            frac = (areas.mean(axis=0) if areas.ndim == 3 else areas) / n
            label = f'block {i}: 1x1 windows (trivial)' if np.all(areas == 1) else \
                f'block {i}: {100 * frac.mean():.0f}% of grid'
        im = ax.imshow(frac, vmin=0, vmax=1, cmap='viridis', interpolation='nearest')
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85, label='window area / grid area')
    prov = spec.provenance.get('kind', '?')
    fig.suptitle(title or f'Window size per patch ({h}x{w} grid, {prov} spec)')
    return _save(fig, path)


# ---- interaction maps -----------------------------------------------------------------------------
@_styled
def plot_interaction(
        image: Any,
        maps: Any,
        grid: Sequence[int],
        path: PathLike,
        patches: Optional[Sequence[PatchLike]] = None,
        blocks: Optional[Sequence[int]] = None,
        model=None,
        title: Optional[str] = None,
        trivial: Sequence[int] = (),
) -> Path:
    """Rows: blocks; columns: query patches (outlined in cyan).  Each panel shows the image with
    the query's interaction row ``P_l(i, .)`` laid over it, on one logarithmic colour scale
    shared by all panels; keys with exactly zero interaction (outside a window) are grey.
    Blocks in ``trivial`` (every patch interacts only with itself) are labelled so.

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
    rows, cols = len(blocks), len(patches)
    side = min(1.75, (PAGE_WIDTH - 1.6) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 1.6, side * rows + 0.8), squeeze=False)
    heats = {(b, yx): m[b][yx[0] * w + yx[1]].reshape(h, w) for b in blocks for yx in patches}
    norm = _shared_log_norm(list(heats.values()), h * w)
    cmap = _masked_cmap('inferno')
    im = None
    for r, b in enumerate(blocks):
        for c, (y, x) in enumerate(patches):
            ax = axes[r][c]
            heat = heats[(b, (y, x))]
            ax.imshow(rgb, extent=(0, w, h, 0), interpolation='nearest' if rgb.shape[0] < 96 else 'bilinear')
            im = ax.imshow(np.ma.masked_where(heat <= 0, heat), extent=(0, w, h, 0), cmap=cmap, norm=norm,
                           alpha=0.7, interpolation='nearest')
            ax.add_patch(Rectangle((x, y), 1, 1, fill=False, ec='cyan', lw=1.8))
            _grid_axes(ax, (h, w), lines=False)
            if r == 0:
                ax.set_title(f'query patch ({y},{x})')
            if c == 0:
                ax.set_ylabel(f'block {b}' + ('\n(trivial)' if b in trivial else ''))
    cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, pad=0.02)
    cb.set_label('interaction P(i, j), log scale shared by all panels; grey: exactly 0')
    fig.suptitle(title or 'How much each key patch informs the query patch (cyan), block by block')
    return _save(fig, path)


@_styled
def plot_interaction_matrices(maps: Any, path: PathLike, blocks: Optional[Sequence[int]] = None,
                              title: Optional[str] = None, trivial: Sequence[int] = ()) -> Path:
    """The full ``N x N`` map per block (queries are rows, keys columns), all blocks on one
    logarithmic colour scale; entries that are exactly zero (keys outside a query's window) grey.
    Blocks in ``trivial`` (the identity: every patch interacts only with itself) are labelled so."""
    m = _maps_dict(maps)
    blocks = pick_blocks(sorted(m) if blocks is None else list(blocks), 12)
    n = next(iter(m.values())).shape[-1]
    fig, axes, panels, _ = _grid_panels(len(blocks))
    norm = _shared_log_norm([m[b] for b in blocks], n)
    cmap = _masked_cmap('magma')
    im = None
    cols = axes.shape[1]
    for k, (ax, b) in enumerate(zip(panels, blocks)):
        a = m[b]
        im = ax.imshow(np.ma.masked_where(a <= 0, a), cmap=cmap, norm=norm, interpolation='nearest')
        ax.set_title(f'block {b}' + (' (trivial: identity)' if b in trivial else ''))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel('key patch j')
        if k % cols == 0:
            ax.set_ylabel('query patch i')
    cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85)
    cb.set_label('P(i, j), log scale shared by all blocks\n(grey: exactly 0, outside the window)')
    fig.suptitle(title or f'Interaction maps P ({n} x {n}; patches in raster order, rows sum to 1)')
    return _save(fig, path)


# ---- ERFs -----------------------------------------------------------------------------------------
MAX_PATCHES = 4    # query patches drawn in one ERF panel: more outlines than this cannot be told apart
TRIVIAL = 'trivial: every patch\ninteracts only with itself'


def _block_title(result, b: int) -> str:
    erf = result.blocks[b]
    n = result.grid[0] * result.grid[1]
    if _trivial(result, b):
        return f'block {b}\nERF = the patch (trivial)'
    tag = ' (global)' if b in result.global_blocks else ''
    return f'block {b}{tag}\nERF {100 * erf.mean_area / n:.0f}% of grid'


def _trivial(result, b: int) -> bool:
    """Block ``b`` of an ERF result is trivial (every patch interacts only with itself; see
    :attr:`~vitfree.analysis.erf.BlockErf.trivial`): nothing to draw but the word."""
    erf = result.blocks[b]
    return bool(getattr(erf, 'trivial', np.all(np.asarray(erf.area) <= 1)))


def _say_trivial(ax, grid: Sequence[int]) -> None:
    h, w = int(grid[0]), int(grid[1])
    ax.text(w / 2, h / 2, TRIVIAL, ha='center', va='center', fontsize=SMALL_FONT + 0.5,
            bbox=dict(facecolor='white', edgecolor='0.7', boxstyle='round,pad=0.3'))


def _rect(ax, y: int, x: int, ext, grid, inset: float, **kw) -> None:
    """Draw the rectangle ``ext = (up, down, left, right)`` around patch ``(y, x)``, clipped at the grid."""
    from matplotlib.patches import Rectangle
    h, w = int(grid[0]), int(grid[1])
    u, d, l, r = (int(v) for v in ext)
    y0, y1, x0, x1 = max(0, y - u), min(h - 1, y + d), max(0, x - l), min(w - 1, x + r)
    ax.add_patch(Rectangle((x0 + inset, y0 + inset), x1 - x0 + 1 - 2 * inset, y1 - y0 + 1 - 2 * inset, fill=False,
                           **kw))


def _block_rects(erf, head: Optional[int]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The ERF rectangles and (when the measured model had them) the windows of one block, for one head."""
    rects = erf.rects if erf.rects.ndim == 3 else erf.rects[0 if head is None else head]
    win = getattr(erf, 'window', None)
    if win is not None and win.ndim == 4:
        win = win[0 if head is None else head]
    return rects, win


@_styled
def plot_erf_rects(result, path: PathLike, blocks: Optional[Sequence[int]] = None,
                   patches: Optional[Sequence[PatchLike]] = None, head: Optional[int] = None,
                   title: Optional[str] = None) -> Path:
    """ERF rectangles of at most :data:`MAX_PATCHES` query patches (by default the centre, two
    corners and an off-centre patch) in each block, drawn on the patch grid, each in its own
    colour with its patch filled; where the measured model had windows, each patch's window is
    drawn dashed in the same colour.  Panel titles give the mean ERF area as a share of the grid
    and mark blocks that became global; trivial blocks say so.  Per-head results show ``head``
    (default: head 0)."""
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    grid = result.grid
    blocks = pick_blocks(range(len(result.blocks)) if blocks is None else list(blocks), 12)
    pts = [_patch_yx(p, grid) for p in (default_patches(grid) if patches is None else patches)]
    if len(pts) > MAX_PATCHES:
        raise ValueError(f'at most {MAX_PATCHES} patches per ERF panel can be told apart, got {len(pts)}')
    colors = plt.get_cmap('tab10')
    fig, axes, panels, _ = _grid_panels(len(blocks))
    windowed = False
    for ax, b in zip(panels, blocks):
        rects, win = _block_rects(result.blocks[b], head)
        _grid_axes(ax, grid)
        ax.set_title(_block_title(result, b))
        for k, (y, x) in enumerate(pts):
            col = colors(k % 10)
            ax.fill_between([x, x + 1], y, y + 1, color=col, alpha=0.85, lw=0)
            if _trivial(result, b):
                continue
            if win is not None:
                windowed = True
                _rect(ax, y, x, win[y, x], grid, 0.02, ec=col, lw=1.0, ls=(0, (3, 2)))
            _rect(ax, y, x, rects[y, x], grid, 0.1 + 0.08 * k, ec=col, lw=1.8)
        if _trivial(result, b):
            _say_trivial(ax, grid)
    handles = [Patch(color=colors(k % 10), label=f'patch ({y},{x})') for k, (y, x) in enumerate(pts)]
    handles.append(Line2D([], [], color='0.35', lw=1.8, label=f'ERF: smallest rectangle holding {result.tau:g} of P(i, .)'))
    if windowed:
        handles.append(Line2D([], [], color='0.35', lw=1.0, ls=(0, (3, 2)), label='window in the measured model'))
    fig.legend(handles=handles, loc='outside lower center', ncol=3, frameon=False)
    fig.suptitle(title or f'ERF rectangles of {len(pts)} query patches (one colour per patch)')
    return _save(fig, path)


def _excess(result, b: int, head: Optional[int]) -> np.ndarray:
    """The excess tendency ``t - u`` of a block (mean over heads unless ``head`` is given)."""
    erf = result.blocks[b]
    t = erf.excess_tendency if hasattr(erf, 'excess_tendency') else erf.tendency
    if t.ndim == 4:
        t = t.mean(0) if head is None else t[head]
    return t


def _fields_and_top(result, blocks, head):
    """Per block its excess tendency, and the longest one among the blocks that are not trivial
    (a trivial block has no measured tendency and must not set the scale shared by all)."""
    fields = {b: _excess(result, b, head) for b in blocks}
    scaled = [f for b, f in fields.items() if not _trivial(result, b)]
    top = max([float(np.hypot(f[..., 0], f[..., 1]).max()) for f in scaled] + [0.0])
    return fields, top


@_styled
def plot_tendency(result, path: PathLike, blocks: Optional[Sequence[int]] = None,
                  head: Optional[int] = None, title: Optional[str] = None) -> Path:
    """The excess tendency ``t(i) - u(i)`` (METHODS 3.2), the one tendency picture: arrows from
    patch centres (every patch on grids up to 12 a side, a lattice otherwise) and, behind them,
    each patch coloured by the arrow's length, one scale for all blocks (colour bar; the key
    arrow shows the arrow scale), so the picture shows the ``|t - u|`` column of the tables.
    Trivial blocks say so.  Per-head results: mean over heads unless ``head`` is given."""
    grid = result.grid
    h, w = grid
    blocks = pick_blocks(range(len(result.blocks)) if blocks is None else list(blocks), 12)
    fields, top = _fields_and_top(result, blocks, head)
    step = max(1, math.ceil(max(h, w) / 12))
    scale = top / (0.9 * step) if top > 0 else 1.0
    ys, xs = np.mgrid[0:h:step, 0:w:step]
    fig, axes, panels, _ = _grid_panels(len(blocks))
    from matplotlib.colors import LinearSegmentedColormap
    blues = LinearSegmentedColormap.from_list('excess', ['white', '#6baed6'])  # light enough for dark arrows
    im = q = None
    for ax, b in zip(panels, blocks):
        _grid_axes(ax, grid, lines=False)
        ax.set_title(_block_title(result, b))
        if _trivial(result, b):
            _say_trivial(ax, grid)
            continue
        length = np.hypot(fields[b][..., 0], fields[b][..., 1])
        im = ax.imshow(length, extent=(0, w, h, 0), cmap=blues, vmin=0, vmax=max(top, 1e-12), interpolation='nearest')
        t = fields[b][::step, ::step]
        q = ax.quiver(xs + 0.5, ys + 0.5, t[..., 1], t[..., 0], angles='xy', scale_units='xy', scale=scale,
                      color='#a50f15', width=0.012, headwidth=3.5, minlength=0.05)
    if q is not None:
        key = float(f'{top:.1g}') if top > 0 else 1.0
        panels[0].quiverkey(q, 0.05, -0.1, key, f'key arrow: {key:g} patches', labelpos='E', coordinates='axes',
                            fontproperties={'size': SMALL_FONT + 0.5})
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, pad=0.02, label='|t - u| (patches)')
    fig.suptitle(title or f'Excess tendency t(i) - u(i): arrows, and their length as colour (longest {top:.2f} '
                          f'patches)')
    return _save(fig, path)


# ---- patch removal --------------------------------------------------------------------------------
@_styled
def plot_removal(result, path: PathLike, title: Optional[str] = None) -> Path:
    """Accuracy against the fraction of patches removed, one line per score."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    marks = {'interaction': 'o', 'sift': 's', 'random': '^'}
    for s, acc in result.accuracy.items():
        ax.plot(100 * np.asarray(result.fractions), 100 * np.asarray(acc), marker=marks.get(s, '.'), label=s)
    ax.set_xlabel('patches hidden as keys, lowest score first (%)')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(title='ranking score', loc='lower left')
    step = 100 / max(result.num_images, 1)
    ax.set_title(title or f'Patch removal ({result.num_images} images, {result.grid[0]}x{result.grid[1]} grid; '
                          f'one image = {step:.1f} points)')
    fig.tight_layout()
    return _save(fig, path)


# ---- everything for one measurement ----------------------------------------------------------------
def erf_pictures(result, out_dir: PathLike, image: Any = None, model=None,
                 patches: Optional[Sequence[PatchLike]] = None, prefix: str = '',
                 window_sizes: bool = True) -> Dict[str, Path]:
    """Write the standard pictures of an :class:`~vitfree.analysis.erf.ErfResult` into ``out_dir``:
    window sizes of the measured spec (unless ``window_sizes`` is off, e.g. when they are drawn
    elsewhere already), ERF rectangles, the excess tendency, the interaction matrices, and (with
    ``image``) interaction maps of a few patches over the image.  Returns ``{name: path}``."""
    out = Path(out_dir)
    files = {}
    if window_sizes:
        files['window_sizes'] = plot_window_sizes(result.spec, out / f'{prefix}window_sizes.png')
    files['erf_rects'] = plot_erf_rects(result, out / f'{prefix}erf_rects.png', patches=patches)
    files['tendency'] = plot_tendency(result, out / f'{prefix}tendency.png')
    trivial = [b.block for b in result.blocks if getattr(b, 'trivial', False)]
    if result.interaction is not None:
        files['interaction_matrices'] = plot_interaction_matrices(result.interaction,
                                                                  out / f'{prefix}interaction_matrices.png',
                                                                  trivial=trivial)
        if image is not None:
            files['interaction_maps'] = plot_interaction(image, result.interaction, result.grid,
                                                         out / f'{prefix}interaction_maps.png', patches=patches,
                                                         model=model, trivial=trivial)
    return files


# ---- heat maps of blocks x heads ---------------------------------------------------------------------
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
          cell: Tuple[float, float], fmt: str = '{:.2f}', norm=None):
    """A blocks x heads heat map (linear from ``vmin`` to ``vmax``, or ``norm``); cell numbers only
    when a cell (``cell`` = width, height in inches) is large enough to print them at
    :data:`SMALL_FONT`."""
    from matplotlib.colors import Normalize
    cm = _masked_cmap(cmap)
    norm = norm if norm is not None else Normalize(vmin=vmin, vmax=vmax)
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cm, norm=norm, aspect='auto', interpolation='nearest')
    ax.set_title(title)
    nb, nh = values.shape
    step_h = max(1, math.ceil(nh / 16))
    ax.set_xticks(range(0, nh, step_h))
    ax.set_xticklabels([str(h) for h in range(0, nh, step_h)])
    step = max(1, math.ceil(nb / 12))
    ax.set_yticks(range(0, nb, step))
    ax.set_yticklabels([str(blocks[i]) for i in range(0, nb, step)])
    if cell[0] >= 0.4 and cell[1] >= 0.17:
        _cell_numbers(ax, values, norm, fmt, diverging=cmap in ('RdBu_r', 'coolwarm'))
    return im


def _cell_numbers(ax, values: np.ndarray, norm, fmt: str, diverging: bool) -> None:
    """Each finite cell's value, white on the dark ends of the colour map."""
    for b in range(values.shape[0]):
        for h in range(values.shape[1]):
            v = values[b, h]
            if np.isfinite(v):
                pos = float(np.clip(norm(v), 0, 1))
                light = abs(pos - 0.5) > 0.3 if diverging else pos > 0.6
                text = fmt.format(v)
                if text.lstrip('-+').strip('0.') == '':
                    text = '0'
                ax.text(h, b, text, ha='center', va='center', fontsize=SMALL_FONT, color='white' if light else 'black')


def _plain_ticks(cb) -> None:
    """Ratios on a log colour bar read as numbers (0.5, 1, 2), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    norm = cb.mappable.norm
    cb.set_ticks(sorted({round(float(v), 2) for v in np.geomspace(norm.vmin, norm.vmax, 5)} | {1.0}))
    cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:.2g}'))
    cb.ax.yaxis.set_minor_formatter(NullFormatter())


def _ratio_norm(values: np.ndarray):
    """A logarithmic colour scale centred on 1 for ratios (lifts): from ``1/r`` to ``r``, ``r`` the
    largest factor away from 1, so one large lift does not wash out the others and 2 and 1/2 are
    equally far from "no preference"."""
    from matplotlib.colors import LogNorm
    v = values[np.isfinite(values) & (values > 0)]
    r = max(float(np.max(np.maximum(v, 1 / v))) if v.size else 1.0, 1.001)
    return LogNorm(vmin=1 / r, vmax=r, clip=True)


HEAD_MEASURES = {
    'prob_drop': ('mean drop of the target probability when the head is pruned', 'probability drop'),
    'accuracy_drop': ('accuracy drop when the head is pruned', 'accuracy drop'),
    'gate': ('gradient gate score E|dLoss/dg| of a gate g = 1 on the head', 'mean |dLoss/dg|'),
}


@_styled
def plot_head_importance(imp, path: PathLike, measure: str = 'prob_drop', title: Optional[str] = None) -> Path:
    """Blocks x heads heat maps of one ``measure`` of :func:`vitfree.head_importance`:
    ``'prob_drop'`` or ``'accuracy_drop'`` (one panel per pruning mode, three to a row, on one
    symmetric colour scale; red = pruning hurts) or ``'gate'`` (one panel)."""
    plt = _plt()
    if measure not in HEAD_MEASURES:
        raise ValueError(f'measure must be one of {tuple(HEAD_MEASURES)}, got {measure!r}')
    what, bar_label = HEAD_MEASURES[measure]
    if measure == 'gate':
        values = imp.gate_score()
        if values is None:
            raise ValueError('this HeadImportance has no gate scores (run head_importance with gate=True)')
        panels = [(values, 'gate score')]
        lim = (0.0, max(float(values.max()), 1e-12))
        cmap, fmt = 'viridis', '{:.2g}'
    else:
        data = imp.prob_drop() if measure == 'prob_drop' else imp.accuracy_drop()
        panels = _merged_mode_panels(imp, data, measure)
        top = max(float(np.abs(data).max()), 1e-6)
        lim = (-top, top)
        decimals = int(min(4, max(2, 1 - math.floor(math.log10(top)))))  # small drops keep a significant digit
        cmap, fmt = 'RdBu_r', '{:+.%df}' % decimals
    nb, nh = panels[0][0].shape
    cols = 2 if len(panels) == 4 else min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    pw = min((PAGE_WIDTH - 1.3) / cols, max(1.6, 0.45 * nh + 0.5))
    ph = max(1.4, 0.24 * nb + 0.5)
    fig, axes = plt.subplots(rows, cols, figsize=(pw * cols + 1.3, (ph + 0.55) * rows + 0.4), squeeze=False,
                             layout='constrained')
    im = None
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= len(panels):
            ax.axis('off')
            continue
        values, name = panels[k]
        im = _heat(ax, values, name, cmap, lim[0], lim[1], imp.blocks, ((pw - 0.5) / nh, (ph - 0.4) / nb), fmt)
        if k % cols == 0:
            ax.set_ylabel('block')
        if k // cols == rows - 1 or k + cols >= len(panels):
            ax.set_xlabel('head')
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9, label=bar_label)
    merged = '\n(modes that agree within 1 % of the colour scale share a panel)' \
        if len(panels) < len(imp.modes) and measure != 'gate' else ''
    fig.suptitle(title or f'Head importance: {what} ({imp.num_images} image(s)){merged}')
    return _save(fig, path)


def _merged_mode_panels(imp, data: np.ndarray, measure: str, rel_tol: float = 0.01) -> List[Tuple[np.ndarray, str]]:
    """One panel per group of modes with equal results (:meth:`HeadImportance.mode_groups`): two
    panels that look the same are drawn once, titled with every mode they stand for; a panel whose
    every value is within ``rel_tol`` of the colour scale of zero says "no effect"."""
    panels = []
    tol = rel_tol * max(float(np.abs(data).max()), 1e-12)
    for group in imp.mode_groups(measure, rel_tol):
        values = data[imp.modes.index(group[0])]
        names = ', '.join(imp.mode_names[m] for m in group)
        label = f'mode {group[0]}: {names}' if len(group) == 1 else \
            f'modes {", ".join(map(str, group))}:\n{names}'  # two lines: merged titles are long
        if float(np.abs(values).max()) <= tol:
            label += ' (no effect)'
        panels.append((values, label))
    return panels


# ---- distance profiles -----------------------------------------------------------------------------
def _head_colors(nh: int):
    plt = _plt()
    cmap = plt.get_cmap('tab20' if nh > 10 else 'tab10')
    return [cmap(h % 20) for h in range(nh)]


@_styled
def plot_entropy_by_layer(prof, path: PathLike, title: Optional[str] = None) -> Path:
    """Head entropy against block: one dot per head (dataset mean), small grey dots for single
    images; the dashed line is the largest possible entropy ``ln(max(H, W))``.  The legend sits
    below the axes, outside the data."""
    plt = _plt()
    ent = prof.entropy  # (I, L, h)
    nb, nh = ent.shape[1:]
    fig, ax = plt.subplots(figsize=(min(PAGE_WIDTH, max(5.0, 0.45 * nb + 3.0)), 3.4))
    offs = (np.arange(nh) - (nh - 1) / 2) * (0.6 / max(nh, 1))
    colors = _head_colors(nh)
    for h in range(nh):
        xs = np.arange(nb) + offs[h]
        if prof.num_images > 1:
            for i in range(ent.shape[0]):
                ax.scatter(xs, ent[i, :, h], s=5, color='0.72', zorder=1, lw=0,
                           label='one image' if h == 0 and i == 0 else None)
        ax.scatter(xs, prof.mean_entropy[:, h], s=22, color=colors[h], zorder=2,
                   label=f'head {h} (mean)' if nh <= 16 else None)
    top = math.log(prof.hops)
    ax.axhline(top, ls='--', color='0.4', lw=0.8, label=f'ln({prof.hops}) = {top:.2f}: no distance preference')
    ax.set_xticks(range(nb))
    ax.set_xticklabels([str(b) for b in prof.blocks])
    ax.set_xlabel('block')
    ax.set_ylabel('head entropy (nats)')
    ax.set_ylim(-0.05, top * 1.08 + 0.05)
    ax.grid(alpha=0.25)
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.2), ncol=min(nh + 2, 4), frameon=False)
    ax.set_title(title or 'Entropy of the hop-distance distribution per head (low = local head)')
    return _save(fig, path)


@_styled
def plot_hop_profiles(prof, path: PathLike, max_blocks: int = 12, title: Optional[str] = None) -> Path:
    """One panel per block: each head's attention strength per hop (dataset mean, normalised to
    a distribution over hops); the dotted line is uniform attention.  One legend for all panels."""
    plt = _plt()
    from matplotlib.lines import Line2D
    blocks = pick_blocks(list(range(len(prof.blocks))), max_blocks)
    dist = prof.hop_distribution().mean(0)  # (L, h, hops)
    cols = min(3, len(blocks))
    rows = math.ceil(len(blocks) / cols)
    pw = (PAGE_WIDTH - 0.6) / cols
    fig, axes = plt.subplots(rows, cols, figsize=(pw * cols + 0.6, 2.1 * rows + 0.6), squeeze=False, sharey=True,
                             layout='constrained')
    colors = _head_colors(dist.shape[1])
    hops = np.arange(prof.hops)
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= len(blocks):
            ax.axis('off')
            continue
        bi = blocks[k]
        for h in range(dist.shape[1]):
            ax.plot(hops, dist[bi, h], marker='.', ms=3, lw=1, color=colors[h])
        ax.axhline(1 / prof.hops, ls=':', color='0.4', lw=0.8)
        ax.set_title(f'block {prof.blocks[bi]}')
        ax.grid(alpha=0.25)
        if k // cols == rows - 1 or k + cols >= len(blocks):
            ax.set_xlabel('hop (Chebyshev distance)')
        if k % cols == 0:
            ax.set_ylabel('share of strength p_n')
    nh = dist.shape[1]
    handles = [Line2D([], [], color=colors[h], marker='.', lw=1, label=f'head {h}') for h in range(min(nh, 16))]
    handles.append(Line2D([], [], color='0.4', ls=':', lw=0.8, label='uniform attention'))
    fig.legend(handles=handles, loc='outside lower center', ncol=min(len(handles), 6), frameon=False)
    fig.suptitle(title or f'Attention strength by hop distance (mean over {prof.average}; one line per head)')
    return _save(fig, path)


# ---- attention patterns -------------------------------------------------------------------------------
@_styled
def plot_pattern_map(pat, path: PathLike, title: Optional[str] = None) -> Path:
    """Left: the 2-D PCA map of the autoencoder latents, one dot per (image, block, head),
    coloured by cluster (block numbers printed next to the dots when there are few).  Right:
    each head's most frequent cluster (blocks x heads)."""
    plt = _plt()
    from matplotlib.colors import ListedColormap
    colors = plt.get_cmap('tab10')
    cmap = ListedColormap([colors(c % 10) for c in range(pat.k)])
    nb, nh = pat.head_cluster.shape
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 3.9), gridspec_kw={'width_ratios': [1.45, 1]},
                                  layout='constrained')
    depth = pat.descriptors.index[:, 1]
    sizes = np.bincount(pat.labels, minlength=pat.k)
    for c in range(pat.k):
        sel = pat.labels == c
        ax.scatter(pat.coords[sel, 0], pat.coords[sel, 1], s=16, color=colors(c % 10), alpha=0.75, lw=0,
                   label=f'cluster {c} (n={int(sizes[c])})')
    annotated = len(depth) <= 80
    if annotated:
        for (x, y), b in zip(pat.coords, depth):
            ax.annotate(str(int(b)), (x, y), fontsize=SMALL_FONT, color='0.3', xytext=(2, 2),
                        textcoords='offset points')
    ev = pat.explained_variance
    ax.set_xlabel(f'PC 1 ({100 * ev[0]:.0f}% of variance)' if len(ev) else 'PC 1')
    ax.set_ylabel(f'PC 2 ({100 * ev[1]:.0f}%)' if len(ev) > 1 else 'PC 2')
    ax.legend(loc='best', title='k-means cluster')
    ax.set_title('latent map: one dot per (image, block, head)' + ('; numbers: block' if annotated else ''))
    ax2.imshow(pat.head_cluster, cmap=cmap, vmin=-0.5, vmax=pat.k - 0.5, aspect='auto', interpolation='nearest')
    if nb * nh <= 200:
        for b in range(nb):
            for h in range(nh):
                ax2.text(h, b, str(pat.head_cluster[b, h]), ha='center', va='center', fontsize=8, color='white')
    ax2.set_xticks(range(nh))
    ax2.set_xticklabels([str(h) for h in range(nh)])
    ax2.set_yticks(range(nb))
    ax2.set_yticklabels([str(b) for b in pat.descriptors.blocks])
    ax2.set_xlabel('head')
    ax2.set_ylabel('block')
    ax2.set_title("each head's cluster (majority over images)")
    fig.suptitle(title or f'Attention patterns: autoencoder (latent {pat.latents.shape[1]}), k-means k={pat.k}, '
                          f'seed {pat.seed}')
    return _save(fig, path)


@_styled
def plot_pattern_clusters(pat, path: PathLike, title: Optional[str] = None) -> Path:
    """One column per cluster: its mean class-token map over the patch grid (top, brighter =
    more attention, one logarithmic scale for all clusters so that a peaked cluster does not
    darken the others) and its mean hop distribution (bottom; dotted: uniform)."""
    plt = _plt()
    k = pat.k
    cw = min(1.7, (PAGE_WIDTH - 0.9) / k)
    fig, axes = plt.subplots(2, k, figsize=(cw * k + 0.9, 2 * cw + 1.3), squeeze=False, layout='constrained')
    colors = plt.get_cmap('tab10')
    hops = np.arange(pat.mean_hop.shape[1])
    top = max(float(pat.mean_hop.max()), 1e-6) * 1.1
    sizes = pat.cluster_sizes()
    im = None
    maps = np.asarray(pat.mean_cls_map, dtype=np.float64)
    norm = _shared_log_norm(list(maps), maps[0].size)  # a few peaked clusters must not turn the rest black
    cmap = _masked_cmap('magma')
    for c in range(k):
        ax = axes[0][c]
        im = ax.imshow(np.ma.masked_where(maps[c] <= 0, maps[c]), cmap=cmap, norm=norm, interpolation='nearest')
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f'cluster {c}\nn={sizes[c]}', color=colors(c % 10))
        ax = axes[1][c]
        ax.bar(hops, pat.mean_hop[c], color=colors(c % 10))
        ax.axhline(1 / len(hops), ls=':', color='0.4', lw=0.8)
        ax.set_ylim(0, top)
        ax.set_xlabel('hop')
        if c:
            ax.set_yticklabels([])
    axes[0][0].set_ylabel(f'{pat.descriptors.source}\nmap')
    axes[1][0].set_ylabel('share p_n')
    fig.colorbar(im, ax=[axes[0][c] for c in range(k)], shrink=0.9, label='share of attention\n(log scale)')
    fig.suptitle(title or 'Mean descriptor per cluster: where the attention lands (top), how far it reaches (bottom)')
    return _save(fig, path)


# ---- images and SIFT ------------------------------------------------------------------------------------
@_styled
def plot_images(images: Sequence[np.ndarray], names: Sequence[str], path: PathLike,
                title: Optional[str] = None) -> Path:
    """The images as the model sees them, named, up to four in a row."""
    plt = _plt()
    n = len(images)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    side = min(2.0, PAGE_WIDTH / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, (side + 0.3) * rows + (0.3 if title else 0)),
                             squeeze=False)
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        ax.axis('off')
        if k < n:
            ax.imshow(images[k], interpolation='nearest' if images[k].shape[0] < 96 else 'bilinear')
            ax.set_title(str(names[k]))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


_GROUP_COLORS = ('#d9d9d9', '#fdd49e', '#fc8d59', '#b30000')


@_styled
def plot_sift_keypoints(sem_images: Sequence, names: Sequence[str], path: PathLike, max_images: int = 4,
                        title: Optional[str] = None) -> Path:
    """Per image: the SIFT keypoints (circles of the keypoint's size) over the image, and the
    concentration group of every patch (0 = no keypoint, 1-3 = low/mid/high mass), with a
    legend of the groups and their sizes."""
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Circle, Patch
    items = list(sem_images)[:max_images]
    n = len(items)
    fig, axes = plt.subplots(n, 2, figsize=(7.4, 2.5 * n + 0.5), squeeze=False, layout='constrained')
    cmap = ListedColormap(list(_GROUP_COLORS))
    for r, s in enumerate(items):
        gh, gw = s.grid
        h, w = s.image.shape[:2]
        ax = axes[r][0]
        ax.imshow(s.image, extent=(0, w, h, 0), interpolation='nearest' if h < 96 else 'bilinear')
        kp = s.keypoints
        for x, y, size in zip(kp.x, kp.y, kp.size):
            ax.add_patch(Circle((x, y), max(size / 2, 0.6), fill=False, ec='yellow', lw=0.8))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f'{names[r]}\n{len(kp)} SIFT keypoint{"" if len(kp) == 1 else "s"} ({w}x{h} px)')
        ax = axes[r][1]
        ax.imshow(s.image, extent=(0, gw, gh, 0), alpha=0.45)
        ax.imshow(s.groups.reshape(gh, gw), cmap=cmap, vmin=-0.5, vmax=3.5, alpha=0.7, extent=(0, gw, gh, 0),
                  interpolation='nearest')
        _grid_lines(ax, (gh, gw))
        sizes = s.group_sizes()
        ax.set_title('patch groups\n(by keypoint mass)')
        ax.legend(handles=[Patch(color=_GROUP_COLORS[g], label=f'{g} {s.group_names[g]}: {sizes[g]} patches')
                           for g in range(4)], loc='center left', bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle(title or (f'SIFT keypoints (yellow circles) and patch groups by keypoint {items[0].weight}'
                           if items else 'SIFT'))
    return _save(fig, path)


@_styled
def plot_semantic_lifts(sem, path: PathLike, title: Optional[str] = None, trivial: Sequence[int] = ()) -> Path:
    """Three panels: the query lift per block and head (top left); the group-to-group lift of
    the last measured block that is not trivial (top right); the class-token lift on each group
    against block (bottom).  Lifts are ratios to uniform attention over the same keys: 1 = no
    preference.  Blocks in ``trivial`` (1x1 windows: a patch query sees only itself, so its lift
    is 1 by construction) are marked, not drawn; groups empty in every image are left out."""
    plt = _plt()
    q = np.array(sem.mean_query_lift(), dtype=np.float64)
    nb, nh = q.shape
    rows = [i for i, b in enumerate(sem.blocks) if b in trivial]
    q[rows] = np.nan
    fig = plt.figure(figsize=(PAGE_WIDTH, 6.4), layout='constrained')
    fig.get_layout_engine().set(wspace=0.12)  # room between the first colour bar and the second panel's labels
    grid = fig.add_gridspec(2, 2, height_ratios=[max(1.0, 0.2 * nb + 0.6), 1.0])
    ax0, ax1, ax2 = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    im = _heat(ax0, q, 'query lift (mean over images)', 'RdBu_r', 0, 0, sem.blocks,
               (3.4 / max(nh, 1), 2.4 / max(nb, 1)), norm=_ratio_norm(q))
    for r in rows:
        ax0.text((nh - 1) / 2, r, 'trivial (1x1 windows)', ha='center', va='center', fontsize=SMALL_FONT)
    ax0.set_xlabel('head')
    ax0.set_ylabel('block')
    _plain_ticks(fig.colorbar(im, ax=ax0, shrink=0.9, label='lift (1 = none), log scale'))
    _group_lift_panel(fig, ax1, sem, [i for i in range(nb) if i not in rows])
    _class_lift_panel(ax2, sem)
    fig.suptitle(title or f'Semantic attention lift ({sem.weight} weights): attention on keypoint mass against uniform\n'
                          f'attention over the same keys; above 1 = the heads seek out structure')
    return _save(fig, path)


def _group_lift_panel(fig, ax, sem, usable: Sequence[int]) -> None:
    """The group-to-group lift of the last block in ``usable`` (indices into ``sem.blocks``)."""
    names = sem.group_names
    if not usable:
        ax.axis('off')
        ax.text(0.5, 0.5, 'every block is trivial: no group-to-group lift', ha='center', va='center')
        return
    last = sem.mean_group_lift()[usable[-1]]
    im = ax.imshow(np.ma.masked_invalid(last), cmap=_masked_cmap('RdBu_r'), norm=_ratio_norm(last),
                   interpolation='nearest')
    for a in range(4):
        for b in range(4):
            v = last[a, b]
            ax.text(b, a, '-' if not np.isfinite(v) else f'{v:.2f}', ha='center', va='center', fontsize=8)
    ax.set_xticks(range(4))
    ax.set_xticklabels([f'{k} {names[k]}' for k in range(4)])
    ax.set_yticks(range(4))
    ax.set_yticklabels([f'{k} {names[k]}' for k in range(4)])
    ax.set_xlabel('key group')
    ax.set_ylabel('query group')
    ax.set_title(f'group-to-group lift, block {sem.blocks[usable[-1]]} (grey: empty group)')
    _plain_ticks(fig.colorbar(im, ax=ax, shrink=0.9, label='lift (1 = none), log scale'))


def _class_lift_panel(ax, sem) -> None:
    """The class token's lift on each keypoint group against block (groups with values only)."""
    cl = sem.mean_cls_lift()
    if cl is None:
        ax.axis('off')
        ax.text(0.5, 0.5, 'no class token: no class-token lift', ha='center', va='center')
        return
    names = sem.group_names
    colors = ['#969696', '#fdae6b', '#f16913', '#a50f15']
    empty = [k for k in range(4) if not np.isfinite(cl[:, k]).any()]
    for k in range(4):
        if k not in empty:
            ax.plot(sem.blocks, cl[:, k], marker='o', ms=4, color=colors[k], label=f'group {k}: {names[k]}')
    ax.axhline(1.0, ls=':', color='0.4', lw=0.8, label='1 = no preference')
    ax.set_xticks(sem.blocks)
    ax.set_xlabel('block')
    ax.set_ylabel("class token's lift")
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.22), ncol=5, frameon=False)
    ax.grid(alpha=0.25)
    gone = f'; empty in every image: {", ".join(f"group {k} ({names[k]})" for k in empty)}' if empty else ''
    ax.set_title(f'class-token lift per keypoint group (mean over heads and images){gone}')
