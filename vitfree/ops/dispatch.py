"""One dispatcher for windowed attention.

Backends register here with a function ``fn(q, k, v, windows, num_prefix_tokens, scale,
dropout_p)`` and a ``supports(q, windows) -> reason or None`` check.  Which one runs is, in
order of precedence:

1. the innermost active ``with vitfree.use_backend(name):`` block;
2. the ``backend=`` of the calling module (:class:`vitfree.layers.WindowAttention`);
3. the ``VITFREE_BACKEND`` environment variable;
4. ``auto``: the cheapest supported backend by :func:`choose_backend`'s cost model.

An explicitly named backend that cannot run the given inputs is an error that says why; the
automatic choice never picks one that cannot run.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import torch

from ..windows import LayerWindows

__all__ = [
    'Backend', 'register_backend', 'available_backends', 'list_backends', 'use_backend',
    'current_backend', 'resolve_backend', 'choose_backend', 'window_attention', 'run_backend',
    'BackendError',
]

ENV_VAR = 'VITFREE_BACKEND'


class BackendError(ValueError):
    """An attention backend name is unknown or cannot run the given inputs."""


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., torch.Tensor]
    supports: Callable[[torch.Tensor, LayerWindows], Optional[str]]
    description: str = ''


_BACKENDS: Dict[str, Backend] = {}
_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar('vitfree_backend', default=None)


def _always(q: torch.Tensor, windows: LayerWindows) -> Optional[str]:
    return None


def register_backend(name: str, fn: Callable[..., torch.Tensor],
                     supports: Callable[[torch.Tensor, LayerWindows], Optional[str]] = _always,
                     description: str = '') -> None:
    """Add (or replace) a backend under ``name``."""
    if name == 'auto':
        raise BackendError("'auto' is reserved for the dispatcher's own choice")
    _BACKENDS[name] = Backend(name, fn, supports, description)


def list_backends() -> List[str]:
    """All registered backend names (plus ``auto``), whether or not they can run here."""
    return ['auto'] + sorted(_BACKENDS)


def available_backends(q: Optional[torch.Tensor] = None, windows: Optional[LayerWindows] = None) -> List[str]:
    """Registered backends that can run ``q``/``windows`` (all registered if not given)."""
    if q is None:
        return sorted(_BACKENDS)
    return sorted(n for n, b in _BACKENDS.items() if b.supports(q, windows) is None)


def _check_name(name: str, where: str) -> str:
    name = str(name).strip().lower()
    if name != 'auto' and name not in _BACKENDS:
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


def choose_backend(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0) -> str:
    """The automatic choice: the cheapest backend that supports the inputs.

    Cost model (per head, counted in query-key pairs): ``dense`` pays ``T^2``; backends that
    register a ``cost`` attribute on their function are compared by it.
    """
    best, best_cost = None, None
    for name, b in _BACKENDS.items():
        if name == 'eager' or b.supports(q, windows) is not None:
            continue
        cost_fn = getattr(b.fn, 'cost', None)
        cost = cost_fn(q, windows, num_prefix_tokens) if cost_fn is not None else float((q.shape[-2]) ** 2)
        if best_cost is None or cost < best_cost:
            best, best_cost = name, cost
    if best is None:
        raise BackendError(f'no attention backend supports q of shape {tuple(q.shape)}, dtype {q.dtype}, '
                           f'device {q.device}')
    return best


def resolve_backend(q: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int = 0,
                    backend: Optional[str] = None) -> str:
    """Name of the backend that will run these inputs, after precedence and checks."""
    name = current_backend(backend)
    if name == 'auto':
        return choose_backend(q, windows, num_prefix_tokens)
    reason = _BACKENDS[name].supports(q, windows)
    if reason is not None:
        raise BackendError(f'attention backend {name!r} cannot run here: {reason}; '
                           f'backends that can: {available_backends(q, windows)}')
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
    patches of ``windows.grid`` in row-major order.
    """
    name = resolve_backend(q, windows, num_prefix_tokens, backend)
    return run_backend(name, q, k, v, windows, num_prefix_tokens, scale, dropout_p)


def run_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: LayerWindows,
                num_prefix_tokens: int = 0, scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Run backend ``name`` (already resolved) after checking the input shapes."""
    _check_inputs(q, k, v, windows, num_prefix_tokens)
    return _BACKENDS[name].fn(q, k, v, windows, num_prefix_tokens, scale, dropout_p)


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
