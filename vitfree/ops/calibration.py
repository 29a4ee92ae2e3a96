"""Measured costs of the attention backends on one device: the tables and where they are found.

The dispatcher estimates a backend's time for a call as ``call + per_unit * work``, where
``work`` is that backend's own count of what one call does (query-key pairs times head size,
plus gathered rows for the tiled kernels; each backend registers a ``work`` function).  On CUDA
the two constants are *measured*: :func:`calibrate` times every backend that can run on the
device on a few representative shapes (:mod:`vitfree.ops.calibrate`) (CUDA events, median of repeats) and fits them per
precision (``lowp``: float16/bfloat16, ``fp32``) and mode (``infer``; ``train``: forward and
backward), minimising the relative error.  Every sample is kept next to the fits.

Where a device's calibration comes from, first match wins (the device is named by
``torch.cuda.get_device_name``):

1. one installed with :func:`set_calibration` (tests install CPU ones this way);
2. the file named by the environment variable ``VITFREE_CALIBRATION``;
3. the user cache, written by :func:`vitfree.ops.calibrate.calibrate`: ``$VITFREE_CACHE_DIR``, else
   ``$XDG_CACHE_HOME/vitfree``, else ``~/.cache/vitfree``, file
   ``calibration/<device>-torch<version>-vitfree<version>.json``;
4. the tables shipped with vitfree, ``vitfree/ops/calibrations/<device>.json`` (measured on the
   device and committed; one for the same torch version is preferred).

5. none of these: the first attention call on that device measures one
   (:func:`vitfree.ops.calibrate.auto_calibrate`, the quick shapes in low precision, at most
   about a minute), saves it to the user cache (3.)
   and uses it from then on, so the choice on a GPU always rests on timings of that GPU.  It says
   so once, on the ``vitfree`` logger and as a warning.  Run ``python -m vitfree.ops.calibrate``
   ahead of time to avoid that pause (and for the float32 fits).

Only where a calibration cannot be measured at that moment (inside a ``torch.compile`` trace
or a CUDA-graph capture, or with ``VITFREE_AUTO_CALIBRATE=0``) do CUDA estimates fall back to
fixed guesses, and :func:`vitfree.ops.explain_choice` labels them ``guess, not measured``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

__all__ = [
    'Fit', 'Calibration', 'calibration_for', 'set_calibration', 'device_name', 'cache_path', 'shipped_tables',
    'precision_key',
]

TABLE_DIR = Path(__file__).resolve().parent / 'calibrations'
ENV_FILE = 'VITFREE_CALIBRATION'
ENV_AUTO = 'VITFREE_AUTO_CALIBRATE'   # '0': never measure implicitly (fixed guesses on an uncalibrated GPU)
AUTO_BUDGET_S = 60.0


@dataclass(frozen=True)
class Fit:
    """``seconds = call + per_unit * work``, fitted on ``samples`` timings with relative RMS error ``rel_err``."""
    call: float
    per_unit: float
    samples: int = 0
    rel_err: float = 0.0

    def predict(self, work: float) -> float:
        return self.call + self.per_unit * work


def precision_key(dtype: torch.dtype) -> Optional[str]:
    if dtype in (torch.float16, torch.bfloat16):
        return 'lowp'
    if dtype == torch.float32:
        return 'fp32'
    return None


def _key(precision: str, training: bool) -> str:
    return f'{precision}-{"train" if training else "infer"}'


@dataclass
class Calibration:
    """The fitted costs of one device: ``fits[backend][precision-mode]`` plus the raw samples."""
    device: str
    torch: str
    vitfree: str
    created: str
    fits: Dict[str, Dict[str, Fit]] = field(default_factory=dict)
    samples: List[Dict[str, Any]] = field(default_factory=list)
    source: str = 'memory'
    format: str = 'vitfree.calibration'
    version: int = 1

    def fit(self, backend: str, dtype: torch.dtype, training: bool) -> Optional[Fit]:
        """The fit for ``backend`` at this dtype and mode, or None when it was not measured."""
        prec = precision_key(dtype)
        if prec is None:
            return None
        return self.fits.get(backend, {}).get(_key(prec, training))

    def backends(self) -> List[str]:
        return sorted(self.fits)

    def describe(self) -> str:
        return f'measured on {self.device} (torch {self.torch}, {self.created}; {self.source})'

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop('source')
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = 'memory') -> 'Calibration':
        if d.get('format') != 'vitfree.calibration' or d.get('version') != 1:
            raise ValueError(f'{source}: not a vitfree calibration (format {d.get("format")!r}, '
                             f'version {d.get("version")!r})')
        fits = {b: {k: Fit(**f) for k, f in per.items()} for b, per in d.get('fits', {}).items()}
        return cls(d['device'], d['torch'], d['vitfree'], d['created'], fits, list(d.get('samples', [])), source)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + '.tmp')
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + '\n')
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> 'Calibration':
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f'cannot read calibration {str(path)!r}: {e}') from None
        return cls.from_dict(d, source=str(path))


# ---- lookup -----------------------------------------------------------------------------------
_installed: Dict[str, Optional[Calibration]] = {}
_found: Dict[str, Optional[Calibration]] = {}
_listeners: List[Callable[[], None]] = []


def device_name(device: Union[torch.device, str, None]) -> str:
    """``torch.cuda.get_device_name`` for CUDA devices, ``'cpu'`` (or the device type) otherwise."""
    dev = torch.device(device) if device is not None else torch.device('cpu')
    if dev.type == 'cuda':
        return torch.cuda.get_device_name(dev.index if dev.index is not None else torch.cuda.current_device())
    return dev.type


def _slug(name: str) -> str:
    return re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-') or 'device'


def _versions() -> Tuple[str, str]:
    from ..version import __version__
    return torch.__version__.split('+')[0], __version__


def cache_dir() -> Path:
    env = os.environ.get('VITFREE_CACHE_DIR')
    if env:
        return Path(env)
    xdg = os.environ.get('XDG_CACHE_HOME')
    return (Path(xdg) if xdg else Path.home() / '.cache') / 'vitfree'


def cache_path(name: str) -> Path:
    """The user-cache file for device ``name`` with this torch and vitfree."""
    tv, vv = _versions()
    return cache_dir() / 'calibration' / f'{_slug(name)}-torch{tv}-vitfree{vv}.json'


def shipped_tables() -> List[Calibration]:
    """Every calibration table shipped in ``vitfree/ops/calibrations/``."""
    out = []
    for path in sorted(TABLE_DIR.glob('*.json')):
        try:
            out.append(Calibration.load(path))
        except ValueError:
            continue
    return out


def _on_change() -> None:
    for fn in _listeners:
        fn()


def set_calibration(calibration: Optional[Calibration], device: Union[torch.device, str, None] = None) -> None:
    """Use ``calibration`` for ``device`` (default: the device it was measured on); ``None`` removes
    an installed one (the files are looked up again)."""
    name = device_name(device) if device is not None else (calibration.device if calibration else None)
    if name is None:
        raise ValueError('set_calibration(None) needs the device whose calibration to remove')
    if calibration is None:
        _installed.pop(name, None)
    else:
        _installed[name] = calibration
    _found.clear()
    _on_change()


def calibration_for(device: Union[torch.device, str, None]) -> Optional[Calibration]:
    """The calibration that applies to ``device``, or None (see the module docstring)."""
    dev = torch.device(device) if device is not None else torch.device('cpu')
    if dev.type != 'cuda':
        return _installed.get(dev.type)
    name = device_name(dev)
    if name in _installed:
        return _installed[name]
    if name not in _found:
        _found[name] = _find(name)
    if _found[name] is None and name not in _auto_tried and _can_auto_calibrate():
        _auto_tried.add(name)
        if _auto_measure is not None:
            _found[name] = _auto_measure(dev, name)
    return _found[name]


_auto_tried: set = set()   # devices measured (or tried) implicitly in this process
# the implicit measurement (vitfree.ops.calibrate.auto_calibrate), wired in by the vitfree.ops package:
# the measuring code runs the dispatcher, which reads this module, so this module cannot import it
_auto_measure: Optional[Callable[[torch.device, str], Optional[Calibration]]] = None


def _can_auto_calibrate() -> bool:
    if os.environ.get(ENV_AUTO, '1').strip().lower() in ('0', 'false', 'no', 'off'):
        return False
    try:
        if torch.compiler.is_compiling():
            return False
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return False
    except (AttributeError, RuntimeError):
        return False
    return True


def _find(name: str) -> Optional[Calibration]:
    env = os.environ.get(ENV_FILE)
    if env:
        cal = Calibration.load(env)
        if cal.device == name:
            return cal
    path = cache_path(name)
    if path.is_file():
        try:
            return Calibration.load(path)
        except ValueError:
            pass
    tv, _ = _versions()
    tables = sorted((c for c in shipped_tables() if c.device == name), key=lambda c: c.created, reverse=True)
    tables.sort(key=lambda c: c.torch != tv)  # stable: the newest of the same torch first
    return tables[0] if tables else None


# ---- fitting ------------------------------------------------------------------------------------
