"""Pictures of head importance, distance profiles, attention patterns and SIFT lifts.

Every function writes one PNG (matplotlib, Agg backend) and returns its path.  The pictures
of interaction maps, ERFs, windows and patch removal live in :mod:`vitfree.analysis.render`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .render import _plt, _save, pick_blocks

__all__ = ['plot_head_importance', 'plot_entropy_by_layer', 'plot_hop_profiles', 'plot_pattern_map',
           'plot_pattern_clusters', 'plot_sift_keypoints', 'plot_semantic_lifts', 'plot_images']

PathLike = Union[str, Path]


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
    from .heads import MODE_NAMES
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
        im_p = _heat(axes[0][c], pdrop[c], f'{m}: {MODE_NAMES[m]}', 'RdBu_r', -plim, plim, imp.blocks)
        im_a = _heat(axes[1][c], adrop[c], f'{m}: {MODE_NAMES[m]}', 'RdBu_r', -alim, alim, imp.blocks)
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
    from .semantic import GROUP_NAMES
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
        ax.set_title('groups: ' + ', '.join(f'{g} {GROUP_NAMES[g]} ({sizes[g]})' for g in range(4)), fontsize=6.5)
    fig.suptitle(title or f'SIFT keypoints on the images as the model sees them; patch groups by {items[0].weight}'
                 if items else 'SIFT', fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_semantic_lifts(sem, path: PathLike, title: Optional[str] = None) -> Path:
    """Three panels: the query lift per block and head; the class-token lift on each group
    against block; the group-to-group lift of the last measured block."""
    plt = _plt()
    from .semantic import GROUP_NAMES
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
            ax.plot(sem.blocks, cl[:, k], marker='o', ms=3, color=colors[k], label=f'{k} {GROUP_NAMES[k]}')
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
    ax.set_xticklabels([f'{k} {GROUP_NAMES[k]}' for k in range(4)], fontsize=6)
    ax.set_yticks(range(4))
    ax.set_yticklabels([f'{k} {GROUP_NAMES[k]}' for k in range(4)], fontsize=6)
    ax.set_xlabel('key group', fontsize=7)
    ax.set_ylabel('query group', fontsize=7)
    ax.set_title(f'group-to-group lift, block {sem.blocks[-1]}', fontsize=9)
    fig.suptitle(title or f'Semantic attention lift ({sem.weight} weights; above 1 = more attention on keypoint '
                          f'mass than uniform attention would give)', fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
