"""Small helpers every room may use (no torch, no vitfree imports)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

_INTERNAL = tuple(str(Path(p).resolve().parent) for p in (__file__,))


def _internal(filename: str) -> bool:
    """A frame of vitfree itself, or of the libraries it is called through (timm, torch)."""
    return filename.startswith(_INTERNAL) or any(f'{sep}{pkg}{sep}' in filename
                                                 for pkg in ('timm', 'torch') for sep in ('/', '\\'))


def warn(message: str, category: type = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside vitfree, timm and torch."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
