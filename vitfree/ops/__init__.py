"""Functional windowed attention: ``(q, k, v, windows) -> out``, one file per backend, one
dispatcher (:mod:`vitfree.ops.dispatch`).

Backends (each an object in its own module here; every module of this package that defines
``BACKENDS`` is registered at import, so adding one is adding one file): ``native`` (a compiled
C++ CPU kernel, each query visits only its window), ``tiled`` (tiles against their halo of keys,
any device), ``dense`` (SDPA with the whole mask, the reference), ``global`` (unmasked SDPA, for
windows that cover the grid), ``eager`` (explicit softmax whose probabilities pass a hook, never
chosen automatically), and on CUDA ``xformers`` / ``xformers-dense`` (when xformers is installed),
``sdpa-tiles`` and ``flex`` (FlexAttention).  The automatic choice rests on per-device cost tables
(:mod:`vitfree.ops.calibration`), measured with ``vitfree calibrate`` (:mod:`vitfree.ops.calibrate`).
"""
import importlib
import pkgutil

from .backend import Backend, Plan, PreparedCache, Query
from .calibration import Calibration, Fit, calibration_for, device_name, set_calibration
from .dispatch import (
    AUTO, BackendError, available_backends, check_inputs, choose_backend, clear_prepared, current_backend,
    estimate_costs,
    explain_choice, get_backend, list_backends, make_query, plan, register_backend, use_backend, window_attention,
)

_INFRASTRUCTURE = {'backend', 'calibration', 'calibrate', 'dispatch'}


def _register_all() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _INFRASTRUCTURE or info.name.startswith('_'):
            continue
        module = importlib.import_module(f'{__name__}.{info.name}')
        for backend in getattr(module, 'BACKENDS', ()):
            register_backend(backend)


_register_all()

from .dense import dense_window_attention  # noqa: E402
from .flex import flex_window_attention  # noqa: E402
from .full import covers_grid, full_attention  # noqa: E402
from .fused_tiles import sdpa_tiles_attention  # noqa: E402
from .native import native_qkv_attention, native_window_attention  # noqa: E402
from .tiled import TilePlan, choose_tile, plan_tiles, tiled_window_attention  # noqa: E402


def describe_backends() -> dict:
    """``{name: description}`` of every registered backend."""
    return {name: get_backend(name).description for name in list_backends() if name != AUTO}


def calibrate(*args, **kwargs):
    """Measure the backends on this device and install the table (:func:`vitfree.ops.calibrate.calibrate`)."""
    from .calibrate import calibrate as _calibrate
    return _calibrate(*args, **kwargs)


__all__ = [
    'window_attention', 'dense_window_attention', 'tiled_window_attention', 'native_window_attention',
    'native_qkv_attention', 'sdpa_tiles_attention', 'flex_window_attention', 'full_attention', 'covers_grid',
    'plan_tiles', 'choose_tile', 'TilePlan', 'use_backend', 'current_backend', 'choose_backend',
    'available_backends', 'list_backends', 'describe_backends', 'register_backend', 'get_backend', 'Backend',
    'BackendError', 'Plan', 'Query', 'PreparedCache', 'clear_prepared', 'make_query', 'plan', 'check_inputs', 'estimate_costs',
    'explain_choice', 'Calibration', 'Fit', 'calibration_for', 'set_calibration', 'device_name', 'calibrate',
]
