"""Cost tables of the attention backends: what the dispatcher reads to choose a kernel.

A table gives, per backend and per ``precision-mode`` (``fp32`` or ``lowp`` for float16/bfloat16;
``infer``, or ``train`` for forward and backward), a :class:`Fit`: ``seconds = call + per_unit *
work``, where ``work`` is that backend's own count of what one call does
(:meth:`vitfree.ops.backend.Backend.work`).  Tables are per device: a GPU by its name, a CPU by
its model and vector extensions (:func:`device_name`), because crossovers differ from one CPU to
the next.

Where the table for a device comes from, first match wins:

1. one installed with :func:`set_calibration` (tests do this);
2. the file named by ``VITFREE_CALIBRATION``, if it is for this device;
3. the user cache written by ``vitfree calibrate`` (:mod:`vitfree.ops.calibrate`):
   ``$VITFREE_CACHE_DIR``, else ``$XDG_CACHE_HOME/vitfree``, else ``~/.cache/vitfree``, file
   ``calibration/<device>-torch<version>-vitfree<version>.json``;
4. a table shipped with vitfree for this device, ``vitfree/ops/calibrations/<device>.json``
   (measured on such a machine and committed);
5. the shipped defaults for the device type (``defaults-cpu.json``: fitted on the first
   development CPU; ``defaults-cuda.json``: guesses, never measured).  The dispatcher says so
   once per device, as a warning that names ``vitfree calibrate``.

Nothing here measures anything: measuring is a tool (``vitfree calibrate``), never a side effect
of a forward pass.
"""
from __future__ import annotations

import json
import os
import platform
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

__all__ = [
    'Fit', 'Calibration', 'calibration_for', 'set_calibration', 'device_name', 'cache_dir', 'cache_path',
    'shipped_tables', 'defaults_for', 'fit_key', 'cpu_model', 'cpu_extensions', 'table_version',
]

TABLE_DIR = Path(__file__).resolve().parent / 'calibrations'
ENV_FILE = 'VITFREE_CALIBRATION'
FORMAT = 'vitfree.calibration'
CALIBRATE_COMMAND = 'vitfree calibrate'


@dataclass(frozen=True)
class Fit:
    """``seconds = call + per_unit * work``, fitted on ``samples`` timings with relative RMS error ``rel_err``."""
    call: float
    per_unit: float
    samples: int = 0
    rel_err: float = 0.0

    def predict(self, work: float) -> float:
        return self.call + self.per_unit * work


def fit_key(precision: str, training: bool) -> str:
    return f'{precision}-{"train" if training else "infer"}'


@dataclass
class Calibration:
    """The cost fits of one device: ``fits[backend][precision-mode]``, the raw samples, and whether
    they were measured on that device (``measured``) or are shipped defaults."""
    device: str
    torch: str
    vitfree: str
    created: str
    fits: Dict[str, Dict[str, Fit]] = field(default_factory=dict)
    samples: List[Dict[str, Any]] = field(default_factory=list)
    measured: bool = True
    note: str = ''
    source: str = 'memory'
    format: str = FORMAT
    version: int = 1

    def fit(self, backend: str, precision: Optional[str], training: bool) -> Optional[Fit]:
        """The fit for ``backend`` at this precision and mode, or None when the table has none."""
        if precision is None:
            return None
        return self.fits.get(backend, {}).get(fit_key(precision, training))

    def backends(self) -> List[str]:
        return sorted(self.fits)

    def describe(self) -> str:
        if self.measured:
            return f'measured on {self.device} (torch {self.torch}, {self.created}; {self.source})'
        return f'shipped defaults for {self.device} ({self.note or "not measured on this machine"}; {self.source})'

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop('source')
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = 'memory') -> 'Calibration':
        if not isinstance(d, dict) or d.get('format') != FORMAT or d.get('version') != 1:
            got = (d.get('format'), d.get('version')) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f'{source}: not a vitfree calibration table (format, version = {got!r})')
        try:
            fits = {b: {k: Fit(**f) for k, f in per.items()} for b, per in d.get('fits', {}).items()}
            return cls(d['device'], d['torch'], d['vitfree'], d['created'], fits, list(d.get('samples', [])),
                       bool(d.get('measured', True)), str(d.get('note', '')), source)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f'{source}: malformed calibration table ({type(e).__name__}: {e})') from None

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
            d = json.loads(path.read_text(encoding='utf-8'))
        except (OSError, ValueError) as e:
            raise ValueError(f'cannot read calibration table {str(path)!r}: {e}') from None
        return cls.from_dict(d, source=str(path))


# ---- devices ------------------------------------------------------------------------------------------
def _cpuinfo() -> Tuple[str, set]:
    """``(model name, flags)``; the model name carries the family and model numbers where the kernel
    reports them (a virtual machine may call very different CPUs just "AMD EPYC")."""
    model, flags = platform.processor() or platform.machine() or 'cpu', set()
    try:
        text = Path('/proc/cpuinfo').read_text()
    except OSError:
        return model, flags

    def field(name: str) -> Optional[str]:
        m = re.search(rf'^{name}\s*:\s*(.+)$', text, re.M)
        return m.group(1).strip() if m else None
    model = field('model name') or model
    family, number = field('cpu family'), field('model')
    if family is not None and number is not None:
        model = f'{model} (family {family} model {number})'
    return model, set((field('flags') or '').split())


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (``/proc/cpuinfo``), e.g.
    ``AMD EPYC (family 26 model 2)``."""
    return _cpuinfo()[0]


def cpu_extensions() -> List[str]:
    """The vector extensions that matter to the kernels, of those this CPU has."""
    flags = _cpuinfo()[1]
    wanted = ('avx2', 'fma', 'avx512f', 'avx512bw', 'avx512vl', 'avx512_bf16', 'avx512_fp16', 'amx_tile',
              'amx_bf16', 'asimd', 'sve')
    return [f for f in wanted if f in flags]


_ISA_NAMES = {'avx512f': 'avx512', 'avx2': 'avx2', 'asimd': 'neon'}


def device_name(device: Union[torch.device, str, None]) -> str:
    """A GPU's name; for a CPU its model and widest vector extension, e.g.
    ``AMD EPYC (family 26 model 2) [avx512]``."""
    dev = torch.device(device) if device is not None else torch.device('cpu')
    if dev.type == 'cuda':
        return torch.cuda.get_device_name(dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type != 'cpu':
        return dev.type
    ext = cpu_extensions()
    isa = next((name for flag, name in _ISA_NAMES.items() if flag in ext), 'generic')
    return f'{cpu_model()} [{isa}]'


def slug(name: str) -> str:
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
    """The user-cache table of device ``name`` for this torch and vitfree."""
    tv, vv = _versions()
    return cache_dir() / 'calibration' / f'{slug(name)}-torch{tv}-vitfree{vv}.json'


def shipped_tables() -> List[Calibration]:
    """Every measured table shipped in ``vitfree/ops/calibrations/`` (the defaults excepted)."""
    out = []
    for path in sorted(TABLE_DIR.glob('*.json')):
        if path.name.startswith('defaults-'):
            continue
        try:
            out.append(Calibration.load(path))
        except ValueError:
            continue
    return out


def defaults_for(device_type: str) -> Calibration:
    """The shipped default table for a device type (``cpu``; ``cuda`` for any GPU)."""
    name = 'cuda' if device_type == 'cuda' else 'cpu'
    return Calibration.load(TABLE_DIR / f'defaults-{name}.json')


# ---- lookup -------------------------------------------------------------------------------------------
_installed: Dict[str, Calibration] = {}
_found: Dict[str, Calibration] = {}
_version = [0]
_lock = threading.Lock()


def table_version() -> int:
    """Bumped whenever the installed tables change: choices made before are stale."""
    return _version[0]


def set_calibration(calibration: Optional[Calibration], device: Union[torch.device, str, None] = None) -> None:
    """Use ``calibration`` for ``device`` (default: the device it was measured on); ``None`` removes an
    installed one (the files are looked up again)."""
    name = device_name(device) if device is not None else (calibration.device if calibration else None)
    if name is None:
        raise ValueError('set_calibration(None) needs the device whose table to remove')
    with _lock:
        if calibration is None:
            _installed.pop(name, None)
        else:
            _installed[name] = calibration
        _found.clear()
        _version[0] += 1


def calibration_for(device: Union[torch.device, str, None]) -> Calibration:
    """The cost table that applies to ``device`` (see the module docstring); never None."""
    dev = torch.device(device) if device is not None else torch.device('cpu')
    name = device_name(dev)
    if name in _installed:
        return _installed[name]
    found = _found.get(name)
    if found is None:
        found = _find(name) or defaults_for(dev.type)
        _found[name] = found
    return found


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
