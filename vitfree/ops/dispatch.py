"""One dispatcher for windowed attention.

Backends register here with a function ``fn(q, k, v, windows, num_prefix_tokens, scale,
dropout_p)``, a ``supports(q, windows) -> reason or None`` check and, to take part in the
automatic choice, a ``cost(q, windows, num_prefix_tokens) -> seconds`` estimate.  Which one
runs is, in order of precedence:

1. the innermost active ``with vitfree.use_backend(name):`` block;
2. the ``backend=`` of the calling module (:class:`vitfree.layers.WindowAttention`);
3. the ``VITFREE_BACKEND`` environment variable;
4. ``auto``: the supported backend with the lowest estimated cost (:func:`choose_backend`).

An explicitly named backend that cannot run the given inputs is an error that says why; the
automatic choice only considers backends whose ``supports`` accepts the inputs, so it never
picks one that cannot run.  :func:`explain_choice` shows every backend's estimate or the reason
it was left out.

The cost model (:class:`CostModel`) is deliberately small: a time per query-key pair (times the
head size) for each kind of kernel, a time per token row that the tiled kernel gathers, and a
fixed time per call.  The CPU numbers were fitted to timings on the development machine
(``benchmarks/bench_attention.py`` reports the backend ``auto`` picks next to the measured
times, so a wrong crossover shows).  Only the ratios matter: they decide where the crossovers lie.

On CUDA the estimates are *measured* when the device has a calibration
(:mod:`vitfree.ops.calibration`: ``python -m vitfree.ops.calibrate`` once per machine, or a table
shipped with vitfree): each backend's ``work(q, windows, P)`` (its own count of pairs and rows)
times a fitted time per unit, plus a fitted time per call, per precision and for inference or
training.  With a calibration only measured backends compete.  Without one the CUDA numbers of
:data:`COST_MODELS` are guesses, and :func:`explain_choice` says so.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch

from ..windows import LayerWindows
from . import calibration as _calibrate

__all__ = [
    'Backend', 'register_backend', 'available_backends', 'list_backends', 'use_backend',
    'current_backend', 'resolve_backend', 'choose_backend', 'window_attention', 'run_backend',
    'BackendError', 'CostModel', 'COST_MODELS', 'cost_model', 'estimate_costs', 'explain_choice',
    'layer_backend', 'prepare_backend', 'QuerySpec', 'qkv_entry', 'native_cost', 'xformers_dense_cost',
    'fused_tiles_cost', 'flex_cost', 'dense_work', 'tiled_work', 'fused_tiles_work', 'flex_work',
]

ENV_VAR = 'VITFREE_BACKEND'

SupportsFn = Callable[[torch.Tensor, LayerWindows], Optional[str]]
CostFn = Callable[[torch.Tensor, LayerWindows, int], float]
PrepareFn = Callable[[LayerWindows, int, torch.device, torch.dtype], None]
WorkFn = Callable[[Any, LayerWindows, int], float]


class BackendError(ValueError):
    """An attention backend name is unknown or cannot run the given inputs."""


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., torch.Tensor]
    supports: SupportsFn
    description: str = ''
    cost: Optional[CostFn] = None
    auto: bool = True  # may the automatic choice pick it?
    prepare: Optional[PrepareFn] = None  # builds what the kernel needs (plans, biases) ahead of a call
    fn_qkv: Optional[Callable[..., torch.Tensor]] = None  # (qkv (B,T,3,H,D), windows, P, scale) -> (B,T,H,D)
    work: Optional[WorkFn] = None  # the amount of work of a call, in the units a calibration fits


_BACKENDS: Dict[str, Backend] = {}
_REGISTRY_VERSION = [0]  # bumped by register_backend and new calibrations: cached choices are stale


def _bump_registry() -> None:
    _REGISTRY_VERSION[0] += 1


_calibrate._listeners.append(_bump_registry)
_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar('vitfree_backend', default=None)


def _always(q: torch.Tensor, windows: LayerWindows) -> Optional[str]:
    return None


def register_backend(name: str, fn: Callable[..., torch.Tensor],
                     supports: SupportsFn = _always,
                     description: str = '',
                     cost: Optional[CostFn] = None,
                     auto: bool = True,
                     prepare: Optional[PrepareFn] = None,
                     fn_qkv: Optional[Callable[..., torch.Tensor]] = None,
                     work: Optional[WorkFn] = None) -> None:
    """Add (or replace) a backend under ``name``.

    ``cost`` (or a ``cost`` attribute on ``fn``) estimates seconds for given inputs; a backend
    without one is costed like ``dense``.  ``auto=False`` keeps it out of the automatic choice
    (it still runs when named).  ``prepare(windows, num_prefix_tokens, device, dtype)`` builds
    the kernel's cached data ahead of the first call (so compiled graphs only look it up).
    ``fn_qkv(qkv, windows, num_prefix_tokens, scale)``, when given, runs the same attention
    straight from a ``(B, T, 3, heads, head_dim)`` qkv projection and returns ``(B, T, heads,
    head_dim)``: layers use it to skip the layout changes around the kernel.
    ``work(q, windows, num_prefix_tokens)`` counts a call's work for measured costs
    (:mod:`vitfree.ops.calibration`); a backend without one is never costed from a calibration."""
    if name in ('auto', 'eager'):
        raise BackendError(f"{name!r} is reserved ('auto': the dispatcher's choice; 'eager': the layers' own "
                           f"explicit-softmax path)")
    if cost is None:
        cost = getattr(fn, 'cost', None)
    _BACKENDS[name] = Backend(name, fn, supports, description, cost, auto, prepare, fn_qkv, work)
    _REGISTRY_VERSION[0] += 1


def list_backends() -> List[str]:
    """All backend names: ``auto``, ``eager`` (the layers' explicit-softmax path, whose
    probabilities pass the hook point) and every registered kernel, whether or not it can run here."""
    return ['auto', 'eager'] + sorted(_BACKENDS)


def available_backends(q: Optional[torch.Tensor] = None, windows: Optional[LayerWindows] = None) -> List[str]:
    """Registered backends that can run ``q``/``windows`` (all registered if not given)."""
    if q is None:
        return sorted(_BACKENDS)
    return sorted(n for n, b in _BACKENDS.items() if b.supports(q, windows) is None)


def _check_name(name: str, where: str) -> str:
    name = str(name).strip().lower()
    if name not in ('auto', 'eager') and name not in _BACKENDS:
        raise BackendError(f'unknown attention backend {name!r} ({where}); choose one of {list_backends()}')
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every windowed attention inside the block on backend ``name`` (``'auto'`` restores
    the automatic choice inside an outer override)."""
    token = _override.set(_check_name(name, 'vitfree.use_backend'))
    try:
        yield
    finally:
        _override.reset(token)


def current_backend(module_backend: Optional[str] = None) -> str:
    """The backend name in force by the precedence rules above (may be ``'auto'``)."""
    ctx = _override.get()
    if ctx is not None:
        return ctx
    if module_backend is not None and module_backend != 'auto':
        return _check_name(module_backend, 'module backend=')
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, f'environment variable {ENV_VAR}')
    return 'auto'


# ---- cost model -----------------------------------------------------------------------------
_INF = float('inf')


@dataclass(frozen=True)
class CostModel:
    """Seconds per unit of work for one kind of device and precision.

    ``*_pair`` times are per query-key pair and per channel of the head (a pair with
    ``head_dim=64`` costs 64 times that); ``row`` is per token row the tiled kernel gathers or
    scatters, per channel; ``tile`` is per tile and (batch, head); ``*_call`` is the fixed cost
    of one call.  When gradients will be taken every estimate is multiplied by ``backward``
    (fused kernels) or ``tiled_backward`` (the tiled kernel, which recomputes its
    probabilities as flash attention does)."""
    fused_pair: float      # SDPA without a mask (flash-style kernels)
    masked_pair: float     # SDPA with a dense boolean mask
    masked_elem: float     # per mask element and call (mask conversion / reads, not per head)
    tiled_pair: float      # batched matmul + softmax of the tiled kernel
    row: float             # tiled kernel: gathered/scattered row
    tile: float            # tiled kernel: per tile
    xformers_pair: float   # xformers with a tensor bias
    fused_call: float
    masked_call: float
    tiled_call: float
    xformers_call: float
    backward: float = 4.2
    tiled_backward: float = 3.4
    native_pair: float = _INF   # the native CPU kernel, per window pair and channel
    native_query: float = _INF  # per query row and head (index and softmax work)
    native_call: float = _INF
    native_backward: float = 3.5
    tiles_pair: float = _INF   # a fused kernel over batched tiles (xformers, sdpa-tiles), per block pair
    tiles_call: float = _INF
    flex_pair: float = _INF    # FlexAttention, per pair of the blocks it visits
    flex_call: float = _INF


# CPU: fitted on the development machine (2-core Xeon with AVX-512 and AMX, one thread, CPU
# time) from sweeps of grids 7..64, radius 1..7, 6..24 batch-heads, head_dim 64
# (benchmarks/bench_attention.py --calibrate refits the tile-choice constants).  CUDA: not measured (no GPU
# here); set so that the fused kernels win until the tiled kernel does several times fewer
# pairs, since small batched matmuls reach a much smaller share of a GPU's peak than fused
# attention kernels do, and so that xformers (cached bias, no per-call mask conversion) is
# preferred to SDPA with a boolean mask when it can run.  These CUDA numbers are GUESSES, used
# only for a device without a calibration (vitfree.ops.calibration), and labelled so; the fused
# tile kernels and FlexAttention have no CPU numbers, so ``auto`` never picks them on a CPU.
# The native kernel (fp32 inside; bf16/fp16 inputs are widened first): per pair-channel, per
# query row and head, per call; one thread, fitted on the development CPU
# (benchmarks/bench_attention.py --fit-native: within 20 % on grids 8..64, windows 3..15, 0-1 prefix).
NATIVE_PAIR, NATIVE_QUERY, NATIVE_CALL = 1.1e-10, 1.9e-7, 1.0e-5

COST_MODELS: Dict[str, CostModel] = {
    'cpu': CostModel(fused_pair=3.2e-11, masked_pair=4.2e-11, masked_elem=1.0e-9, tiled_pair=7.9e-11,
                     row=1.3e-9, tile=1.3e-6, xformers_pair=_INF, fused_call=2e-5, masked_call=4e-5,
                     tiled_call=1.5e-4, xformers_call=_INF, native_pair=NATIVE_PAIR, native_query=NATIVE_QUERY,
                     native_call=NATIVE_CALL),
    'cpu-lowp': CostModel(fused_pair=1.1e-11, masked_pair=1.8e-11, masked_elem=1.0e-9, tiled_pair=4.5e-11,
                          row=1.0e-9, tile=1.3e-6, xformers_pair=_INF, fused_call=2e-5, masked_call=4e-5,
                          tiled_call=1.5e-4, xformers_call=_INF, native_pair=NATIVE_PAIR, native_query=NATIVE_QUERY,
                          native_call=NATIVE_CALL + 1e-9),
    'cuda': CostModel(fused_pair=2.0e-14, masked_pair=4.0e-14, masked_elem=2.0e-12, tiled_pair=1.2e-13,
                      row=4.0e-13, tile=2.0e-8, xformers_pair=3.0e-14, fused_call=1e-5, masked_call=2e-5,
                      tiled_call=2.0e-4, xformers_call=2e-5, tiles_pair=4.0e-14, tiles_call=3e-5, flex_pair=2.5e-14,
                      flex_call=3e-5),
}


def cost_model(q: torch.Tensor) -> CostModel:
    """The :class:`CostModel` for ``q``'s device and dtype (autocast included)."""
    dev = q.device.type
    if dev == 'cuda':
        return COST_MODELS['cuda']
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    lowp = dtype in (torch.bfloat16, torch.float16)
    return COST_MODELS['cpu-lowp' if lowp else 'cpu']


def _work(q: torch.Tensor):
    """``(batch*heads, head_dim, training)`` of a call."""
    training = torch.is_grad_enabled() and q.requires_grad
    return q.shape[0] * q.shape[1], q.shape[-1], training


def _train_factor(m: CostModel, training: bool, tiled: bool = False) -> float:
    if not training:
        return 1.0
    return m.tiled_backward if tiled else m.backward


def fused_cost(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0) -> float:
    """Unmasked SDPA over all ``T^2`` pairs."""
    m, (bh, d, training) = cost_model(q), _work(q)
    t = q.shape[-2]
    return (bh * t * t * d * m.fused_pair + m.fused_call) * _train_factor(m, training)


def dense_cost(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0) -> float:
    """SDPA with a dense mask: all ``T^2`` pairs plus reading the mask."""
    m, (bh, d, training) = cost_model(q), _work(q)
    t = q.shape[-2]
    return (bh * t * t * d * m.masked_pair + t * t * m.masked_elem + m.masked_call) * _train_factor(m, training)


def tiled_cost_seconds(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0) -> float:
    """Tiled kernel: the pairs of all tiles, the rows they gather and a cost per tile."""
    from .tiled import tiled_cost
    m, (bh, d, training) = cost_model(q), _work(q)
    pairs, rows, tiles = tiled_cost(windows, num_prefix_tokens)
    sec = bh * (d * (pairs * m.tiled_pair + rows * m.row) + tiles * m.tile) + m.tiled_call
    return sec * _train_factor(m, training, tiled=True)


def xformers_dense_cost(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0) -> float:
    """xformers with the whole window mask as a bias: all ``T^2`` pairs."""
    m, (bh, d, training) = cost_model(q), _work(q)
    t = q.shape[-2]
    return (bh * t * t * d * m.xformers_pair + m.xformers_call) * _train_factor(m, training)


def native_cost(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0) -> float:
    """The native kernel: every query's prefix and window pairs, exactly."""
    m, (bh, d, training) = cost_model(q), _work(q)
    t = q.shape[-2]
    pairs = windows.cached(('native.pairs', num_prefix_tokens), lambda: _window_pairs(windows, num_prefix_tokens))
    sec = bh * (pairs * d * m.native_pair + t * m.native_query) + m.native_call
    return sec * (m.native_backward if training else 1.0)


def _window_pairs(windows: LayerWindows, num_prefix_tokens: int) -> float:
    """Query-key pairs of one (batch, head): patches see prefix + window, prefix tokens see all."""
    from ..windows import window_areas
    n = windows.num_patches
    area = float(window_areas(windows.extents, windows.grid).sum()) / (windows.num_heads or 1)
    return area + n * num_prefix_tokens + num_prefix_tokens * (num_prefix_tokens + n)


xformers_cost = xformers_dense_cost  # the name before the tiled xformers backend existed


def fused_tiles_cost(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0) -> float:
    """A fused kernel over batched tiles (``xformers``, ``sdpa-tiles``): whole kernel blocks of
    every tile plus the gathered rows (:func:`fused_tiles_work`); infinite where the model has no
    number for it (CPU)."""
    m, (_, _, training) = cost_model(q), _work(q)
    if not math.isfinite(m.tiles_pair):
        return _INF
    return (fused_tiles_work(q, windows, num_prefix_tokens) * m.tiles_pair + m.tiles_call) * _train_factor(m, training)


def flex_cost(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0) -> float:
    """FlexAttention: the pairs of the blocks its BlockMask visits plus the permuted rows
    (:func:`flex_work`); infinite where the model has no number for it (CPU)."""
    m, (_, _, training) = cost_model(q), _work(q)
    if not math.isfinite(m.flex_pair):
        return _INF
    return (flex_work(q, windows, num_prefix_tokens) * m.flex_pair + m.flex_call) * _train_factor(m, training)


# ---- work counts: what a calibration's fitted time per unit multiplies --------------------------
def dense_work(q: Any, windows: LayerWindows, num_prefix_tokens: int = 0) -> float:
    """All ``T^2`` pairs times the head size, per (batch, head)."""
    bh, d, _ = _work(q)
    t = q.shape[-2]
    return float(bh * d * t * t)


def tiled_work(q: Any, windows: LayerWindows, num_prefix_tokens: int = 0) -> float:
    """The tiled kernel's pairs, gathered rows (16 pairs each) and tiles (256 pairs each)."""
    from .tiled import tiled_cost
    bh, d, _ = _work(q)
    pairs, rows, tiles = tiled_cost(windows, num_prefix_tokens)
    return float(bh * (d * (pairs + 16 * rows) + 256 * tiles))


def fused_tiles_work(q: Any, windows: LayerWindows, num_prefix_tokens: int = 0) -> float:
    """Pairs of whole kernel blocks of every tile, and gathered rows at ``ROW_PAIRS`` pairs each."""
    from .fused_tiles import ROW_PAIRS, fused_tiles_counts
    bh, d, _ = _work(q)
    pairs, rows = fused_tiles_counts(windows, num_prefix_tokens)
    return float(bh * d * (pairs + ROW_PAIRS * rows))


def flex_work(q: Any, windows: LayerWindows, num_prefix_tokens: int = 0) -> float:
    """Pairs of the partial blocks, 0.8 of those of the full ones (no mask evaluated), and the
    permuted rows at ``ROW_PAIRS`` pairs each."""
    from .flex import flex_counts
    from .fused_tiles import ROW_PAIRS
    bh, d, _ = _work(q)
    partial, full, rows = flex_counts(windows, num_prefix_tokens)
    return float(bh * d * (partial + 0.8 * full + ROW_PAIRS * rows))


def _estimates(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0):
    """``{name: (seconds or None, label)}``: the label says where a number comes from
    (``estimate``: the CPU model; ``measured``: a calibration; ``guess``: an uncalibrated device) or,
    with None, why the backend is out of the automatic choice."""
    training = torch.is_grad_enabled() and q.requires_grad
    dtype = _effective_dtype(q)
    cal = _calibrate.calibration_for(q.device)
    cuda = q.device.type == 'cuda'
    out: Dict[str, Any] = {}
    for name, b in sorted(_BACKENDS.items()):
        reason = b.supports(q, windows)
        if reason is not None:
            out[name] = (None, f'cannot run: {reason}')
            continue
        if not b.auto:
            out[name] = (None, 'runs only when named (not part of the automatic choice)')
            continue
        guess = float((b.cost if b.cost is not None else dense_cost)(q, windows, num_prefix_tokens))
        if not math.isfinite(guess):
            out[name] = (None, f'not chosen automatically on {q.device.type} (no cost model there; runs when named)')
            continue
        fit = cal.fit(name, dtype, training) if cal is not None and b.work is not None else None
        if fit is not None:
            out[name] = (fit.predict(b.work(q, windows, num_prefix_tokens)), 'measured')
        else:
            out[name] = (guess, 'guess, not measured' if cuda else 'estimate')
    if cal is not None and any(label == 'measured' for _, label in out.values()):
        for name, (c, label) in out.items():
            if c is not None and label != 'measured':  # only measured backends compete with measured ones
                out[name] = (None, f'not in the calibration for {cal.device} at this precision and mode '
                                   f'(run python -m vitfree.ops.calibrate)')
    return out


def estimate_costs(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0) -> Dict[str, Union[float, str]]:
    """Every registered backend's estimated seconds for these inputs, or why it is out of the
    automatic choice (cannot run, ``auto=False``, no cost for this device)."""
    return {name: (c if c is not None else label)
            for name, (c, label) in _estimates(q, windows, num_prefix_tokens).items()}


def explain_choice(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0) -> str:
    """A few lines saying what ``auto`` picks for these inputs, what every backend costs and
    where each number comes from (fitted CPU model, a measurement on this device, or a guess)."""
    est = _estimates(q, windows, num_prefix_tokens)
    pick = choose_backend(q, windows, num_prefix_tokens)
    lines = [f'q {tuple(q.shape)} {q.dtype} on {q.device}, {windows!r}, {num_prefix_tokens} prefix tokens '
             f'-> auto picks {pick!r}']
    cal = _calibrate.calibration_for(q.device)
    if cal is not None:
        lines.append(f'costs {cal.describe()}')
    elif q.device.type == 'cuda':
        lines.append(f'no calibration for {_calibrate.device_name(q.device)}: CUDA costs are GUESSES, not '
                     f'measurements; run python -m vitfree.ops.calibrate once on this machine')
    for name, (c, label) in est.items():
        mark = '*' if name == pick else ' '
        lines.append(f' {mark} {name:<14} ' + (f'{c * 1e3:10.3f} ms ({label})' if c is not None else label))
    return '\n'.join(lines)


@dataclass(frozen=True)
class QuerySpec:
    """What the dispatcher reads of a query tensor (shape, dtype, device, grad flag), without the
    tensor: lets the choice be made for a kind of input before one exists."""
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool = False

    def dim(self) -> int:
        return len(self.shape)


def _effective_dtype(q: torch.Tensor) -> torch.dtype:
    dev = q.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype


def choose_backend(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0) -> str:
    """The automatic choice: the supported backend with the lowest estimated cost (ties go to
    the name that sorts first, so the choice is deterministic).

    The choice is made once per (batch, heads, head size, device, dtype, training) and kept in
    the windows' cache; later calls with the same kind of input only look it up."""
    training = torch.is_grad_enabled() and q.requires_grad
    key = ('choice', num_prefix_tokens, tuple(q.shape[:2]), q.shape[-1], str(q.device), _effective_dtype(q),
           training, _REGISTRY_VERSION[0])
    return windows.cached(key, lambda: _choose(q, windows, num_prefix_tokens))


def _choose(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int) -> str:
    best, best_cost = None, None
    for name, (cost, _) in _estimates(q, windows, num_prefix_tokens).items():
        if cost is None:
            continue
        if best_cost is None or cost < best_cost:
            best, best_cost = name, cost
    if best is None:
        raise BackendError(f'no attention backend supports q of shape {tuple(q.shape)}, dtype {q.dtype}, '
                           f'device {q.device}; registered: {sorted(_BACKENDS)}')
    return best


def resolve_backend(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0,
                    backend: Optional[str] = None) -> str:
    """Name of the backend that will run these inputs, after precedence and checks.  May be
    ``'eager'`` (only layers can run it: it is their explicit-softmax path)."""
    name = current_backend(backend)
    if name == 'auto':
        return choose_backend(q, windows, num_prefix_tokens)
    if name == 'eager':
        return name
    reason = _BACKENDS[name].supports(q, windows)
    if reason is not None:
        raise BackendError(f'attention backend {name!r} cannot run here: {reason}; '
                           f'backends that can: {available_backends(q, windows)}')
    return name


def prepare_backend(name: str, windows: LayerWindows, num_prefix_tokens: int, device: torch.device,
                    dtype: torch.dtype) -> None:
    """Build what backend ``name`` needs for these windows ahead of its first call."""
    b = _BACKENDS.get(name)
    if b is not None and b.prepare is not None:
        b.prepare(windows, num_prefix_tokens, device, dtype)


@torch.compiler.assume_constant_result
def layer_backend(key: str, grid_h: int, grid_w: int, mode: str, num_prefix_tokens: int, batch: int, heads: int,
                  head_dim: int, dtype: torch.dtype, device_type: str, device_index: int, requires_grad: bool,
                  module_backend: str, force: str = '') -> str:
    """Resolve an attention layer's backend and build everything it will read, from constants.

    ``key`` names the layer's :class:`LayerWindows` (at its native grid; :attr:`LayerWindows.key`), ``grid_h x grid_w`` is
    the grid of the input (the windows are resized to it with ``mode``), ``batch`` 0 means
    unknown; ``force`` names the path the layer must take whatever the choice (``'eager'`` or
    ``'dense'``).  Inside ``torch.compile`` this runs once, eagerly, while the graph is traced,
    and its result is a constant of the graph: the traced code only reads caches that already
    hold what it needs, so nothing is built, hashed or converted from NumPy inside a compiled
    graph and nothing breaks it (``fullgraph=True`` works).  Elsewhere it is an ordinary call,
    answered from the windows' cache after the first one."""
    windows = LayerWindows.by_key(key).resize((grid_h, grid_w), mode)
    device = torch.device(device_type, device_index) if device_index >= 0 else torch.device(device_type)
    q = QuerySpec(torch.Size((batch if batch > 0 else 8, heads, num_prefix_tokens + windows.num_patches, head_dim)),
                  dtype, device, requires_grad)
    name = force or resolve_backend(q, windows, num_prefix_tokens, module_backend or None)
    prepare_backend('dense' if name == 'eager' else name, windows, num_prefix_tokens, device, dtype)
    if name != 'eager' and torch.is_autocast_enabled(device_type):
        prepare_backend(name, windows, num_prefix_tokens, device, torch.get_autocast_dtype(device_type))
    return name


def window_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        windows: LayerWindows,
        num_prefix_tokens: int = 0,
        scale: Optional[float] = None,
        dropout_p: float = 0.0,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """Windowed self-attention on ``(B, heads, T, head_dim)`` tensors, ``T = P + H*W``.

    Queries and keys are the same tokens: ``num_prefix_tokens`` global tokens first, then the
    patches of ``windows.grid`` in row-major order.  ``backend`` names a backend (see
    :func:`list_backends`); by default the dispatcher chooses.
    """
    name = resolve_backend(q, windows, num_prefix_tokens, backend)
    return run_backend(name, q, k, v, windows, num_prefix_tokens, scale, dropout_p)


def run_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: LayerWindows,
                num_prefix_tokens: int = 0, scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Run backend ``name`` (already resolved) after checking the input shapes."""
    if name == 'eager':
        raise BackendError("'eager' is the attention layers' own explicit-softmax path (the one whose "
                           "probabilities hooks can read), not a functional kernel; use 'dense' for the "
                           "reference result, or run a WindowAttention layer under use_backend('eager')")
    _check_inputs(q, k, v, windows, num_prefix_tokens)
    return _BACKENDS[name].fn(q, k, v, windows, num_prefix_tokens, scale, dropout_p)


def qkv_entry(name: str) -> Optional[Callable[..., torch.Tensor]]:
    """The fused-qkv entry of backend ``name``, if it has one (see :func:`register_backend`)."""
    b = _BACKENDS.get(name)
    return None if b is None else b.fn_qkv


def _check_inputs(q, k, v, windows, num_prefix_tokens) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise BackendError(f'q, k, v must be (B, heads, T, head_dim) with equal shapes, got '
                           f'{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    t = num_prefix_tokens + windows.num_patches
    if q.shape[-2] != t:
        raise BackendError(f'sequence length {q.shape[-2]} does not match {num_prefix_tokens} prefix tokens + '
                           f'{windows.grid[0]}x{windows.grid[1]} patches = {t}')
    if windows.per_head and windows.num_heads != q.shape[1]:
        raise BackendError(f'windows are per head for {windows.num_heads} heads but q has {q.shape[1]} heads')
