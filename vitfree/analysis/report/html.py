"""The report page: one self-contained HTML file (pictures inlined as data URIs, no scripts,
nothing fetched from the network), and the JSON form of the results."""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ['escape', 'figure', 'table', 'write_html', 'to_json']


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; color: #1d1d1f; background: #fafafa;
       margin: 0; line-height: 1.45; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.1em; }
h2 { font-size: 1.3em; margin-top: 2.2em; padding-top: 0.6em; border-top: 2px solid #e5e5e5; }
h3 { font-size: 1.05em; margin: 1.4em 0 0.4em; }
p, li { max-width: 80ch; }
.sub { color: #555; margin-top: 0; }
.meta { border-collapse: collapse; margin: 0.8em 0; }
.meta td { padding: 2px 14px 2px 0; vertical-align: top; }
.meta td:first-child { color: #666; white-space: nowrap; }
.banner { background: #fff4e5; border-left: 4px solid #f0a020; padding: 8px 14px; margin: 1em 0; }
.note { background: #eef4fb; border-left: 4px solid #4a7bb7; padding: 8px 14px; margin: 1em 0; }
.caveat { background: #fff8e6; border-left: 3px solid #e0a800; padding: 6px 12px; margin: 0.8em 0; }
.error { background: #fdecea; border-left: 4px solid #d93025; padding: 8px 14px; margin: 1em 0; }
.skip { color: #777; font-style: italic; }
nav ol { columns: 2; max-width: 640px; padding-left: 1.4em; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; margin-top: 4px; max-width: 90ch; }
table.data { border-collapse: collapse; font-size: 0.88em; margin: 0.6em 0 1.2em; }
table.data th, table.data td { border-bottom: 1px solid #e5e5e5; padding: 3px 10px; text-align: right; }
table.data th { background: #f3f3f3; }
table.data td.l, table.data th.l { text-align: left; }
pre { background: #f6f6f6; padding: 8px 12px; font-size: 0.82em; overflow-x: auto; }
footer { margin-top: 3em; color: #888; font-size: 0.85em; }
"""


def escape(s: Any) -> str:
    """Text made safe for HTML (quotes included)."""
    return html.escape(str(s), quote=True)


def figure(path: Path, alt: str, caption: str) -> str:
    """A PNG inlined as a data URI, with its caption (HTML): what the picture shows and how its
    colours, marks and lines are to be read."""
    if not caption:
        raise ValueError(f'figure {alt!r} needs a caption that explains its encodings')
    data = base64.b64encode(Path(path).read_bytes()).decode('ascii')
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(alt)}">'
            f'<figcaption>{caption}</figcaption></figure>')


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: Sequence[int] = (0,)) -> str:
    """A data table; columns in ``left`` are left-aligned, the others right-aligned."""
    def cell(tag, i, v):
        cls = ' class="l"' if i in left else ''
        return f'<{tag}{cls}>{escape(v)}</{tag}>'
    head = ''.join(cell('th', i, h) for i, h in enumerate(header))
    body = ''.join('<tr>' + ''.join(cell('td', i, v) for i, v in enumerate(r)) + '</tr>' for r in rows)
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def write_html(path: Union[str, os.PathLike], title: str, subtitle: str, meta: Sequence[Tuple[str, str]],
               sections: Sequence[Tuple[str, str, str]], banner: Optional[str] = None, footer: str = '',
               note: Optional[str] = None) -> Path:
    """One self-contained page: ``sections`` are ``(anchor id, heading, body HTML)``; ``meta``
    rows go in the header table, then the ``banner`` (a warning) and the ``note`` (e.g. on
    sample size).  Images must already be inlined as data URIs in the bodies."""
    toc = ''.join(f'<li><a href="#{escape(a)}">{escape(t)}</a></li>' for a, t, _ in sections)
    meta_html = ''.join(f'<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>' for k, v in meta)
    body = ''.join(f'<section id="{escape(a)}"><h2>{escape(t)}</h2>{b}</section>' for a, t, b in sections)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{escape(title)}</title><style>{_CSS}</style></head><body><main>'
            f'<h1>{escape(title)}</h1><p class="sub">{escape(subtitle)}</p>'
            f'<table class="meta">{meta_html}</table>'
            + (f'<div class="banner">{banner}</div>' if banner else '')
            + (f'<div class="note">{note}</div>' if note else '')
            + f'<nav><h3>Contents</h3><ol>{toc}</ol></nav>{body}'
            f'<footer>{footer}</footer></main></body></html>\n')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding='utf-8')
    return path


def to_json(obj: Any) -> Any:
    """Plain JSON values (NumPy arrays and numbers, paths; non-finite floats become null)."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj
