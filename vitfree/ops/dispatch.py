"""One dispatcher for windowed attention: a :class:`~vitfree.ops.backend.Query` in, a
:class:`~vitfree.ops.backend.Plan` out.

Which backend runs is, in order of precedence:

1. the innermost active ``with vitfree.use_backend(name):`` block;
2. the calling module's ``backend=`` (the query's ``override``);
3. the ``VITFREE_BACKEND`` environment variable;
4. ``auto``: the backend with the lowest predicted time, among those that can run the query.

A query that asks for the layer's own softmax path (timm's ``fused_attn = False``) always gets
``eager``.  A named backend that cannot run the query is an error that says why and which
backends can; ``auto`` only ever considers backends that can run it, so it never picks one that
cannot, and never one its cost table predicts slower than another that can.

Predicted times come from one cost table per device (:mod:`vitfree.ops.calibration`): each
backend counts a call's work (:meth:`~vitfree.ops.backend.Backend.work`) and the table gives
``call + per_unit * work`` per precision and mode.  Without a table measured on this device the
shipped defaults are used, and the dispatcher says so once with a warning naming
``vitfree calibrate``.  The dispatcher never measures anything itself.

The input contract (dtypes, shapes, devices, dropout) is checked here once, for every backend
(:func:`check_inputs`).  Plans are made once per (windows, query, resize mode) and kept; inside
``torch.compile`` the plan is made while the graph is traced and the graph only runs it.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
import os
import weakref
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch

from .._util import warn
from ..windows import LayerWindows
from . import calibration as _tables
from .backend import Backend, Plan, PreparedCache, Query
from .bias import PARTS, PositionBias, bias_parts, bias_shape_error

__all__ = [
    'BackendError', 'register_backend', 'get_backend', 'list_backends', 'available_backends', 'use_backend',
    'current_backend', 'make_query', 'plan', 'choose_backend', 'estimate_costs', 'explain_choice',
    'window_attention', 'check_inputs', 'clear_prepared', 'ENV_VAR', 'AUTO',
]

ENV_VAR = 'VITFREE_BACKEND'
AUTO = 'auto'


class BackendError(ValueError):
    """An attention backend name is unknown, or it cannot run the given inputs."""


_BACKENDS: Dict[str, Backend] = {}
_REGISTRY_VERSION = [0]
_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar('vitfree_backend', default=None)


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend object under its ``name``."""
    if not isinstance(backend, Backend) or not backend.name:
        raise BackendError(f'expected a named vitfree.ops.Backend object, got {backend!r}')
    if backend.name == AUTO:
        raise BackendError("'auto' is reserved: it names the dispatcher's own choice")
    _BACKENDS[backend.name] = backend
    _REGISTRY_VERSION[0] += 1


def get_backend(name: str) -> Backend:
    return _BACKENDS[_check_name(name, 'get_backend')]


def list_backends() -> List[str]:
    """``'auto'`` and every registered backend, whether or not it can run here."""
    return [AUTO] + sorted(_BACKENDS)


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise BackendError(f'attention backend must be a name ({where}), got {type(name).__name__} {name!r}')
    name = name.strip().lower()
    if name != AUTO and name not in _BACKENDS:
        raise BackendError(f'unknown attention backend {name!r} ({where}); choose one of {list_backends()}')
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every windowed attention inside the block on backend ``name`` (``'auto'`` restores the
    automatic choice inside an outer override)."""
    token = _override.set(_check_name(name, 'vitfree.use_backend'))
    try:
        yield
    finally:
        _override.reset(token)


def current_backend(module_backend: Optional[str] = None) -> str:
    """The backend name in force by the precedence rules (may be ``'auto'``)."""
    ctx = _override.get()
    if ctx is not None:
        return ctx
    if module_backend is not None and module_backend != AUTO:
        return _check_name(module_backend, 'module backend=')
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, f'environment variable {ENV_VAR}')
    return AUTO


# ---- queries ------------------------------------------------------------------------------------------
def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in for input ``x``: the autocast dtype where autocast is on."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def make_query(x: torch.Tensor, grid: Tuple[int, int], prefix: int, heads: int, head_dim: int,
               value_dim: Optional[int] = None, *, dropout: bool = False, caller_mask: bool = False,
               override: Optional[str] = None, explicit_softmax: bool = False, batch: Optional[int] = None,
               bias: Union[PositionBias, bool, None, Tuple[str, ...]] = None) -> Query:
    """The :class:`Query` of a call on tensor ``x`` (q, or the packed qkv projection): dtype with autocast
    resolved, device, whether gradients will be taken, and the batch (0 inside a compiled graph); ``bias``:
    the call's :class:`~vitfree.ops.bias.PositionBias` (or the names of its parts; ``True``: unknown parts,
    counted as all of them)."""
    if batch is None:
        batch = 0 if torch.compiler.is_compiling() else int(x.shape[0])
    return Query((int(grid[0]), int(grid[1])), int(prefix), batch, int(heads), int(head_dim),
                 int(head_dim if value_dim is None else value_dim), compute_dtype(x), x.device,
                 bool(torch.is_grad_enabled() and x.requires_grad), bool(dropout), bool(caller_mask),
                 override or AUTO, bool(explicit_softmax), bias_parts(bias))


def _refusal(b: Backend, query: Query, windows: LayerWindows) -> Optional[str]:
    """Why backend ``b`` cannot run the query, or None (the contract every backend shares, then its own)."""
    if query.caller_mask and not b.takes_caller_mask:
        return f'{b.name} takes no attention mask on top of the windows'
    if query.dropout and not b.takes_dropout:
        return f'{b.name} has no attention dropout'
    if query.bias:
        taken = PARTS if b.takes_bias is True else tuple(b.takes_bias or ())
        if not taken:
            return f'{b.name} cannot add a position bias to the logits'
        missing = [part for part in query.bias if part not in taken]
        if missing:
            return (f'{b.name} cannot add the {", ".join(missing)} part of a position bias (it takes '
                    f'{", ".join(taken)})')
    return b.supports(query, windows)


# ---- costs --------------------------------------------------------------------------------------------
_warned: set = set()


def _table(device: torch.device) -> _tables.Calibration:
    cal = _tables.calibration_for(device)
    name = _tables.device_name(device)
    if not cal.measured and name not in _warned:
        _warned.add(name)
        msg = (f'vitfree: no attention cost table measured on {name}; the dispatcher uses the shipped defaults '
               f'({cal.note or "not measured here"}). Run `{_tables.CALIBRATE_COMMAND}` once on this machine '
               f'(a few minutes) so that the automatic backend choice rests on its own timings.')
        warn(msg, RuntimeWarning)
    return cal


def _estimates(query: Query, windows: LayerWindows) -> Dict[str, Tuple[Optional[float], str]]:
    """``{name: (seconds or None, label)}``; the label says where a number comes from or, with None,
    why the backend is out of the automatic choice."""
    cal = _table(query.device)
    label = 'measured' if cal.measured else 'default, not measured here'
    out: Dict[str, Tuple[Optional[float], str]] = {}
    for name, b in sorted(_BACKENDS.items()):
        reason = _refusal(b, query, windows)
        if reason is not None:
            out[name] = (None, f'cannot run: {reason}')
        elif not b.auto or query.device.type not in getattr(b, 'auto_devices', ('cpu', 'cuda')):
            out[name] = (None, f'runs only when named (not chosen automatically on {query.device.type})')
        else:
            fit = cal.fit(name, query.precision, query.grad)
            if fit is None:
                out[name] = (None, f'no cost for it in the table of {cal.device} (run {_tables.CALIBRATE_COMMAND})')
            else:
                out[name] = (fit.predict(float(b.work(query, windows))), label)
    return out


def _choose(query: Query, windows: LayerWindows) -> Backend:
    est = _estimates(query, windows)
    costed = [(c, n) for n, (c, _) in est.items() if c is not None and math.isfinite(c)]
    if not costed:
        raise BackendError(f'no attention backend can run {_describe(query)} automatically: '
                           + '; '.join(f'{n}: {why}' for n, (_, why) in est.items()))
    return _BACKENDS[min(costed)[1]]  # ties go to the name that sorts first


def _describe(query: Query) -> str:
    return (f'{query.heads} heads x {query.head_dim} on a {query.grid[0]}x{query.grid[1]} grid with {query.prefix} '
            f'prefix tokens, {query.dtype}, {query.device}{", with gradients" if query.grad else ""}'
            f'{", with a position bias (" + ", ".join(query.bias) + ")" if query.bias else ""}')


# ---- plans --------------------------------------------------------------------------------------------
def _make_plan(windows: LayerWindows, query: Query, requested: str) -> Plan:
    if query.explicit_softmax:
        requested = 'eager'
    if requested == AUTO:
        backend = _choose(query, windows)
    else:
        backend = _BACKENDS[requested]
        reason = _refusal(backend, query, windows)
        if reason is not None:
            can = [n for n, b in sorted(_BACKENDS.items()) if _refusal(b, query, windows) is None]
            raise BackendError(f'attention backend {requested!r} cannot run {_describe(query)}: {reason}; '
                               f'backends that can: {can}')
    return Plan(backend, windows, query, backend.prepare(windows, query))


class _PlanStore:
    """Every plan made, as an attribute named by its id: inside ``torch.compile`` an attribute of an
    object is read as it is when the graph is traced (a dict would be read as it was when first seen
    in the frame, before the plans of later layers existed)."""


_PLANS = _PlanStore()
_MEMO: 'weakref.WeakKeyDictionary[LayerWindows, Dict[Tuple, str]]' = weakref.WeakKeyDictionary()
_ids = itertools.count(1)


def plan(windows: LayerWindows, query: Query, resize_mode: str = 'scale') -> Plan:
    """The plan for running ``query`` on ``windows`` (given at any grid: resized to the query's with
    ``resize_mode``).  Made once per (windows, query, mode, backend in force, tables) and kept while
    the windows live; raises :class:`BackendError` when the backend in force cannot run it."""
    return getattr(_PLANS, _plan_id(windows, resize_mode, *query))


def _forget(pid: str) -> None:
    _PLANS.__dict__.pop(pid, None)


@torch.compiler.assume_constant_result
def _plan_id(windows: LayerWindows, resize_mode: str, *fields: Any) -> str:
    """The name of the plan in :data:`_PLANS`, made first if needed.  Inside ``torch.compile`` this
    runs once, eagerly, while the graph is traced, and its result is a constant of the graph."""
    query = Query(*fields)
    requested = current_backend(query.override)
    key = (resize_mode, query, requested, _REGISTRY_VERSION[0], _tables.table_version())
    memo = _MEMO.get(windows)
    if memo is None:
        memo = _MEMO.setdefault(windows, {})
    pid = memo.get(key)
    if pid is None:
        made = _make_plan(windows.resize(query.grid, resize_mode), query, requested)
        pid = f'plan{next(_ids)}'
        setattr(_PLANS, pid, made)
        memo[key] = pid
        weakref.finalize(windows, _forget, pid)
    return pid


def clear_prepared() -> None:
    """Forget every plan and everything every backend prepared (frees their memory; they are made again
    on the next call)."""
    for cache in list(PreparedCache._all):
        cache.clear()
    _MEMO.clear()


# ---- the functional entry point and the input contract ---------------------------------------------------
def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: LayerWindows,
                 num_prefix_tokens: int = 0, dropout_p: float = 0.0, attn_mask: Optional[torch.Tensor] = None,
                 bias: Optional[PositionBias] = None) -> None:
    """The input contract of every backend, checked once: errors name the value and what is accepted."""
    if not isinstance(windows, LayerWindows):
        raise BackendError(f'windows must be vitfree.windows.LayerWindows, got {type(windows).__name__}')
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise BackendError(f'num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}')
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise BackendError(f'dropout_p must be a number in [0, 1), got {dropout_p!r}')
    for name, x in (('q', q), ('k', k), ('v', v)):
        if not torch.is_tensor(x) or x.dim() != 4:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise BackendError(f'{name} must be a 4-d tensor (B, heads, T, head_dim), got {got}')
        if not x.dtype.is_floating_point:
            raise BackendError(f'{name} must be floating point (float32, float16, bfloat16 or float64), got {x.dtype}')
    if not (q.device == k.device == v.device):
        raise BackendError(f'q, k, v must be on one device, got {q.device}, {k.device}, {v.device}')
    if not (q.dtype == k.dtype == v.dtype) and not torch.is_autocast_enabled(q.device.type):
        raise BackendError(f'q, k, v must share one dtype (or run under torch.autocast), got {q.dtype}, '
                           f'{k.dtype}, {v.dtype}')
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise BackendError(f'k must have the shape of q, and v the same (B, heads, T) with any head size; got q '
                           f'{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}')
    if q.shape[1] < 1 or q.shape[-1] < 1 or v.shape[-1] < 1:
        raise BackendError(f'q and v need at least one head and one channel, got q {tuple(q.shape)}, v {tuple(v.shape)}')
    t = num_prefix_tokens + windows.num_patches
    if q.shape[-2] != t:
        raise BackendError(f'sequence length {q.shape[-2]} does not match {num_prefix_tokens} prefix tokens + '
                           f'{windows.grid[0]}x{windows.grid[1]} patches = {t}')
    if windows.per_head and windows.num_heads != q.shape[1]:
        raise BackendError(f'windows are per head for {windows.num_heads} heads but q has {q.shape[1]} heads')
    if attn_mask is not None and (not torch.is_tensor(attn_mask) or attn_mask.shape[-2:] != (t, t)):
        got = tuple(attn_mask.shape) if torch.is_tensor(attn_mask) else type(attn_mask).__name__
        raise BackendError(f'attn_mask must be a tensor ending in ({t}, {t}) (bool: True = may attend, or additive '
                           f'float), got {got}')
    if bias is not None:
        _check_bias(bias, q.shape[0], q.shape[1], windows.grid, num_prefix_tokens)


def _check_bias(bias: PositionBias, batch: int, heads: int, grid: Tuple[int, int], num_prefix_tokens: int) -> None:
    """The shapes of a bias for ``(batch, heads)`` queries on ``grid`` (:func:`~vitfree.ops.bias.bias_shape_error`)."""
    if not isinstance(bias, PositionBias):
        raise BackendError(f'bias must be a vitfree.ops.bias.PositionBias (position_bias(...)), got '
                           f'{type(bias).__name__}')
    why = bias_shape_error(bias, batch, heads, grid, num_prefix_tokens)
    if why is not None:
        raise BackendError(why)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: LayerWindows,
                     num_prefix_tokens: int = 0, scale: Optional[float] = None, dropout_p: float = 0.0,
                     backend: Optional[str] = None, attn_mask: Optional[torch.Tensor] = None,
                     bias: Optional[PositionBias] = None) -> torch.Tensor:
    """Windowed self-attention on ``(B, heads, T, head_dim)`` tensors (v may have another head size),
    ``T = P + H*W``: ``num_prefix_tokens`` global tokens first, then the patches of ``windows.grid``
    row-major.  ``backend`` names one (:func:`list_backends`); by default the dispatcher chooses.
    ``attn_mask`` (bool, True = may attend, or additive float) applies on top of the windows;
    ``bias`` (a :class:`~vitfree.ops.bias.PositionBias`) adds a position term to the allowed logits."""
    check_inputs(q, k, v, windows, num_prefix_tokens, dropout_p, attn_mask, bias)
    query = make_query(q, windows.grid, num_prefix_tokens, q.shape[1], q.shape[-1], v.shape[-1],
                       dropout=dropout_p > 0, caller_mask=attn_mask is not None,
                       override=None if backend is None else _check_name(backend, 'backend='), bias=bias)
    return plan(windows, query)(q, k, v, scale, dropout_p, attn_mask, bias=bias)


def _tensor_query(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int) -> Query:
    return make_query(q, windows.grid, num_prefix_tokens, q.shape[1], q.shape[-1], batch=int(q.shape[0]))


def available_backends(q: Optional[torch.Tensor] = None, windows: Optional[LayerWindows] = None,
                       num_prefix_tokens: int = 0) -> List[str]:
    """Registered backends that can run ``q`` on ``windows`` (every registered one if not given)."""
    if q is None or windows is None:
        return sorted(_BACKENDS)
    query = _tensor_query(q, windows, num_prefix_tokens)
    return sorted(n for n, b in _BACKENDS.items() if _refusal(b, query, windows) is None)


def choose_backend(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0) -> str:
    """The name ``auto`` picks for a call on tensor ``q`` (its shape, dtype, device and grad flag)."""
    return _choose(_tensor_query(q, windows, num_prefix_tokens), windows).name


def estimate_costs(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0) -> Dict[str, Any]:
    """Every backend's predicted seconds for a call on ``q``, or why it is out of the automatic choice."""
    est = _estimates(_tensor_query(q, windows, num_prefix_tokens), windows)
    return {n: (c if c is not None else why) for n, (c, why) in est.items()}


def explain_choice(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0) -> str:
    """A few lines: what ``auto`` picks for a call on ``q``, what each backend is predicted to cost and
    where the numbers come from."""
    query = _tensor_query(q, windows, num_prefix_tokens)
    est = _estimates(query, windows)
    pick = _choose(query, windows).name
    lines = [f'q {tuple(q.shape)} {query.dtype} on {q.device}, {windows!r}, {num_prefix_tokens} prefix tokens '
             f'-> auto picks {pick!r}', f'costs: {_tables.calibration_for(q.device).describe()}']
    for name, (c, label) in est.items():
        mark = '*' if name == pick else ' '
        lines.append(f' {mark} {name:<14} ' + (f'{c * 1e3:10.3f} ms ({label})' if c is not None else label))
    return '\n'.join(lines)
