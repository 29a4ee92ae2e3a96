"""Plain-text and Markdown tables of results: one formatter for every table the package prints
(window specs, ERF areas, patch removal), so the CLI, the demo, the report and the README
show the same columns.

Nothing here imports torch or another analysis module.
"""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ['STYLES', 'format_table', 'format_spec']

STYLES = ('text', 'markdown')


def _check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f'table style must be one of {STYLES}, got {style!r}')
    return style


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], style: str = 'text',
                 align: str = '') -> str:
    """``rows`` of already formatted cells under ``header``.

    ``style='text'``: columns padded to their widest cell (right-aligned, except columns marked
    ``'l'`` in ``align``, one letter per column); ``style='markdown'``: a GitHub table with the
    same alignment.
    """
    _check_style(style)
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    ncol = len(header)
    if any(len(r) != ncol for r in cells):
        raise ValueError(f'every row needs {ncol} cells, got rows of {sorted({len(r) for r in cells})}')
    left = [i < len(align) and align[i] == 'l' for i in range(ncol)]
    if style == 'markdown':
        rule = ['---' if left[i] else '---:' for i in range(ncol)]
        return '\n'.join('| ' + ' | '.join(r) + ' |' for r in [cells[0], rule] + cells[1:])
    width = [max(len(r[i]) for r in cells) for i in range(ncol)]
    return '\n'.join('  '.join(c.ljust(width[i]) if left[i] else c.rjust(width[i]) for i, c in enumerate(r)).rstrip()
                     for r in cells)


def format_spec(spec, style: str = 'text') -> str:
    """A :class:`~vitfree.windows.WindowSpec` per block: global or local, mean / min / max window
    area in patches, and the mean as a share of the grid."""
    n = spec.grid[0] * spec.grid[1]
    rows = [(r['block'], 'global' if r['global'] else 'local', f'{r["mean_area"]:.1f}', r['min_area'], r['max_area'],
             f'{100 * r["fraction"]:.1f}%') for r in spec.summary()]
    table = format_table(['block', 'window', 'mean area', 'min', 'max', 'of grid'], rows, style)
    return f'{table}\n\n(grid has {n} patches)' if style == 'markdown' else f'{table}\n(grid has {n} patches)'
