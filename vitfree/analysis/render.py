"""Pictures (matplotlib, Agg backend): everything here writes PNG files and returns their paths."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import numpy as np

__all__ = ['plot_window_sizes']


def _plt():
    import matplotlib
    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt
    return plt


def plot_window_sizes(spec, path: Union[str, Path], title: Optional[str] = None) -> Path:
    """One heat map per block: each patch coloured by its window area as a fraction of the grid
    (mean over heads for per-head blocks); global blocks are drawn full and labelled."""
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
