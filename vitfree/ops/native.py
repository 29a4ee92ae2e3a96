"""The ``native`` backend: a compiled C++/OpenMP kernel for windowed attention on the CPU.

The kernel is blocked: a tile of a few grid rows x 16 (AVX-512) or 8 (AVX2) columns of queries
fills the vector lanes and works over the union of its queries' windows, one key offset at a
time (register-blocked Q K^T and P V on keys packed transposed per grid row), with every pair
masked per query, so the result is exact per patch and the work is close to the window area
(:func:`native_pair_counts` gives the useful fraction: 97 % for 7x7 windows on a 64x64 grid,
77 % on 14x14, where 14 of 16 lanes are used).  q, k, v are read in place through their
strides: the layer hands over views of its qkv projection and gets the output back in the
layout its output projection reads.  Logits, softmax and accumulation are fp32 (bf16/fp16 inputs are widened
first).  The backward pass recomputes the probabilities from the saved log-sum-exp.

A position bias (:mod:`vitfree.ops.bias`) is added in the kernel to the logits of the pairs each tile
visits, never as a ``T x T`` tensor: the ``table`` part (per head, offsets clamped to the table: one
scalar per offset of a tile), the ``prefix`` terms, and the ``rows`` / ``cols`` terms of every query
(batched, or one for the whole batch), read from per-head copies laid out by offset so that a tile
row's queries read one vector.  The backward pass returns the gradient of every part it was given.
A dense ``full`` part is not taken (``takes_bias`` names the other four, so the dispatcher gives such
a call to a backend that adds it).  Without a bias the kernel gets a null pointer and runs as before.

The kernel (``csrc/window_attention.cpp``) is compiled the first time it is needed with the
system C++ compiler (``$CXX`` or ``g++``; ``-O3 -fopenmp`` and the instruction set's flags) into
vitfree's cache folder (``$VITFREE_CACHE_DIR``, else ``$XDG_CACHE_HOME/vitfree``, else
``~/.cache/vitfree``; subfolder ``kernels``), keyed by the source, compiler, flags and CPU, and
loaded with ctypes; OpenMP threads follow ``torch.set_num_threads``.  The instruction set is the
best the CPU has: ``avx512`` (``-march=x86-64-v4``, 16 lanes), ``avx2`` (``-march=x86-64-v3``, AVX2
and FMA, 8 lanes) or ``generic`` (the compiler's baseline); ``VITFREE_NATIVE_ISA=avx512|avx2|generic``
forces one (one the CPU cannot run is refused).  Without a
compiler (or with ``VITFREE_NATIVE=0``) the backend reports why it cannot run and the
dispatcher uses the pure-PyTorch ``tiled`` backend instead.  To torch.compile the kernel is
one opaque operator (``torch.ops.vitfree.window_attention``), so graphs do not break.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from ..windows import LayerWindows
from .backend import Backend, Plan, PreparedCache, Query, refuse_second_order
from .bias import PositionBias, bias_shape_error
from .calibration import cache_dir

__all__ = ['NativeBackend', 'native_window_attention', 'native_qkv_attention', 'native_library', 'native_isa',
           'native_pair_counts', 'window_bounds_tensor']

_logger = logging.getLogger(__name__)
SOURCE = Path(__file__).resolve().parent / 'csrc' / 'window_attention.cpp'
FLAGS = ['-O3', '-fopenmp', '-fno-math-errno', '-ffp-contract=fast', '-std=c++17', '-shared', '-fPIC']
# per instruction set: compiler flags, and the /proc/cpuinfo flags the CPU needs to run the result
ISA_FLAGS = {'avx512': ['-march=x86-64-v4', '-mprefer-vector-width=512'], 'avx2': ['-march=x86-64-v3'], 'generic': []}
_ISA_NEEDS = {'avx512': ('avx512f', 'avx512bw', 'avx512cd', 'avx512dq', 'avx512vl', 'avx2', 'fma', 'bmi2', 'f16c',
                         'movbe', 'abm'),
              'avx2': ('avx2', 'fma', 'bmi1', 'bmi2', 'f16c', 'movbe', 'abm'), 'generic': ()}

_lib: Optional[ctypes.CDLL] = None
_error: Optional[str] = None
_lock = threading.Lock()


def _cache_dir() -> Path:
    return cache_dir() / 'kernels'


def _cpu_id() -> str:
    """The CPU the library is built for: model name and feature flags."""
    try:
        lines = [ln for ln in Path('/proc/cpuinfo').read_text().splitlines() if ln.startswith(('model name', 'flags'))]
    except OSError:
        lines = [platform.processor()]
    return hashlib.sha256('\n'.join(sorted(set(lines))).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset:
    try:
        text = Path('/proc/cpuinfo').read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith('flags')), '')
    return frozenset(line.partition(':')[2].split())


def _missing(isa: str) -> list:
    """What this machine lacks to run ``isa`` (empty: it can run it)."""
    if isa != 'generic' and platform.machine().lower() not in ('x86_64', 'amd64'):
        return [f'an x86-64 CPU (this is {platform.machine()})']
    have = _cpu_flags()
    return [f for f in _ISA_NEEDS[isa] if f not in have]


_auto_isa: Optional[str] = None  # the best instruction set this CPU runs, once found


def _isa() -> str:
    """The instruction set to build for: ``$VITFREE_NATIVE_ISA``, else the best the CPU runs."""
    global _auto_isa
    forced = os.environ.get('VITFREE_NATIVE_ISA', '').strip().lower()
    if forced in ('', 'auto'):
        if _auto_isa is None:
            _auto_isa = next(i for i in ISA_FLAGS if not _missing(i))
        return _auto_isa
    if forced not in ISA_FLAGS:
        raise ValueError(f'VITFREE_NATIVE_ISA={forced!r}: expected one of auto, {", ".join(ISA_FLAGS)}')
    if _missing(forced):
        raise RuntimeError(f'VITFREE_NATIVE_ISA={forced}: this CPU cannot run it (lacks {", ".join(_missing(forced))})')
    return forced


_built = {}


def _build(isa: Optional[str] = None) -> ctypes.CDLL:
    """The kernel library for ``isa`` (default: :func:`_isa`), compiled once per source, compiler,
    flags and CPU into the cache folder and loaded once per process."""
    isa = isa or _isa()
    if isa in _built:
        return _built[isa]
    cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
    if not cxx:
        raise RuntimeError('no C++ compiler found (set CXX, or install g++)')
    version = subprocess.run([cxx, '--version'], capture_output=True, text=True, timeout=60).stdout.splitlines()[:1]
    flags = FLAGS + ISA_FLAGS[isa]
    key = hashlib.sha256(SOURCE.read_bytes() + repr((version, flags, _cpu_id(), platform.machine())).encode())
    target = _cache_dir() / f'window_attention-{isa}-{key.hexdigest()[:16]}.so'
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            res = subprocess.run([cxx, *flags, str(SOURCE), '-o', str(out)], capture_output=True, text=True,
                                 timeout=600)
            if res.returncode != 0:
                raise RuntimeError(f'{cxx} failed: {res.stderr.strip()[-600:]}')
            os.replace(out, target)
    lib = ctypes.CDLL(str(target))
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.vitfree_window_attention_forward.argtypes = (
        [ptr] * 3 + [i64] * 6 + [ptr] * 4 + [i64, f32, ptr, ptr, ctypes.c_int, ptr])
    lib.vitfree_window_attention_backward.argtypes = (
        [ptr] * 6 + [i64] * 6 + [ptr] * 4 + [i64, f32] + [ptr] * 6 + [ctypes.c_int, ptr])
    lib.vitfree_window_attention_pairs.argtypes = [i64] * 4 + [ptr, i64, ctypes.c_int, ptr]
    lib.vitfree_window_attention_isa.restype = ctypes.c_char_p
    lib.vitfree_window_attention_max_tile_rows.restype = ctypes.c_int
    _built[isa] = lib
    return lib


def native_library() -> Tuple[Optional[ctypes.CDLL], Optional[str]]:
    """``(library, None)``, or ``(None, why it is unavailable)``; builds it on first use."""
    global _lib, _error
    if _lib is None and _error is None:
        with _lock:
            if _lib is None and _error is None:
                if os.environ.get('VITFREE_NATIVE', '1') == '0':
                    _error = 'the native kernel is switched off (VITFREE_NATIVE=0)'
                else:
                    try:
                        _lib = _build()
                    except Exception as e:  # no compiler, failed build, unloadable library
                        _error = f'the native CPU kernel is unavailable: {type(e).__name__}: {e}'
                        _logger.warning(_error + '; using the pure-PyTorch tiled backend instead')
    return _lib, _error


_CACHE = PreparedCache('native')


def window_bounds_tensor(windows: LayerWindows, num_prefix_tokens: int) -> torch.Tensor:
    """``(heads or 1, P + N, 4)`` int32: first/last row and column of every token's window
    (prefix tokens: the whole grid); kept in this backend's cache."""
    def make() -> torch.Tensor:
        h, w = windows.grid
        e = windows.extents.astype(np.int64)
        e = e if e.ndim == 4 else e[None]
        ys, xs = np.arange(h).reshape(h, 1), np.arange(w).reshape(1, w)
        b = np.stack([np.maximum(ys - e[..., 0], 0), np.minimum(ys + e[..., 1], h - 1),
                      np.maximum(xs - e[..., 2], 0), np.minimum(xs + e[..., 3], w - 1)], axis=-1)
        b = b.reshape(e.shape[0], h * w, 4)
        prefix = np.broadcast_to(np.array([0, h - 1, 0, w - 1]), (e.shape[0], num_prefix_tokens, 4))
        return torch.from_numpy(np.ascontiguousarray(np.concatenate([prefix, b], axis=1), dtype=np.int32))
    return _CACHE.get(windows, ('bounds', num_prefix_tokens), make)


def window_pairs(windows: LayerWindows, num_prefix_tokens: int) -> float:
    """Query-key pairs of one (batch, head): patches see prefix + window, prefix tokens see all."""
    from ..windows import window_areas

    def make() -> float:
        n = windows.num_patches
        area = float(window_areas(windows.extents, windows.grid).sum()) / (windows.num_heads or 1)
        return area + n * num_prefix_tokens + num_prefix_tokens * (num_prefix_tokens + n)
    return _CACHE.get(windows, ('pairs', num_prefix_tokens), make)


def native_pair_counts(windows: LayerWindows, num_prefix_tokens: int = 0, heads: int = 1,
                       tile_rows: int = 0) -> Tuple[int, int, int]:
    """The kernel's work on one image of ``heads`` heads: ``(exact, qk, pv)``, the exact pairs
    (every query's prefix and window pairs) and the lane-pairs its Q K^T and P V micro-kernels
    compute over the tiles' unions of windows; ``exact / qk`` and ``exact / pv`` are the useful
    fractions.  ``tile_rows``: query rows per tile (0: the kernel's default; at most
    ``vitfree_window_attention_max_tile_rows()``, set for a run with ``VITFREE_NATIVE_TILE_ROWS``)."""
    lib = _kernel()
    bounds = window_bounds_tensor(windows, num_prefix_tokens)
    if bounds.shape[0] not in (1, heads):
        raise ValueError(f'the windows have {bounds.shape[0]} heads; heads={heads} does not match')
    res = (ctypes.c_int64 * 3)()
    _status(lib.vitfree_window_attention_pairs(heads, bounds.shape[1], num_prefix_tokens, windows.grid[1],
                                               bounds.data_ptr(), bounds.shape[0], int(tile_rows), res), bounds)
    return res[0], res[1], res[2]


# ---- the operator (one opaque op for torch.compile) -------------------------------------------
def _strides(x: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * 3)(*x.stride()[:3])


def _unit_last(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype != torch.float32:
        raise ValueError(f'{name} must be float32 (the op widens bf16/fp16 first), got {x.dtype}')
    return x if x.stride(-1) == 1 else x.contiguous()  # the kernel reads rows of head_dim in place


def _kernel() -> ctypes.CDLL:
    """The library for the instruction set in force (``VITFREE_NATIVE_ISA`` may change it)."""
    lib, err = native_library()
    if lib is None:
        raise RuntimeError(err)
    return _build()


def native_isa() -> str:
    """The instruction set the native kernel runs with now: ``avx512``, ``avx2`` or ``generic``."""
    return _kernel().vitfree_window_attention_isa().decode()


def _status(code: int, bounds: torch.Tensor) -> None:
    if code == 1:
        raise ValueError(f'window bounds {tuple(bounds.shape)}: a window is empty or leaves the grid')
    if code == 2:
        raise MemoryError('the native window-attention kernel ran out of memory for its scratch buffers')


class _BiasArgs(ctypes.Structure):
    """The kernel's ``VitfreeBias``: the bias parts (fp32, contiguous; null where absent) and, for the
    backward pass, their per-image gradient buffers."""
    _fields_ = [('table', ctypes.c_void_p), ('ty', ctypes.c_int64), ('tx', ctypes.c_int64),
                ('prefix', ctypes.c_void_p), ('rows', ctypes.c_void_p), ('rows_b', ctypes.c_int64),
                ('cols', ctypes.c_void_p), ('cols_b', ctypes.c_int64), ('d_table', ctypes.c_void_p),
                ('d_prefix', ctypes.c_void_p), ('d_rows', ctypes.c_void_p), ('d_cols', ctypes.c_void_p)]


BiasParts = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


def _ptr(x: Optional[torch.Tensor]) -> Optional[int]:
    return None if x is None else x.data_ptr()


def _bias_args(parts: Optional[BiasParts], shape: Tuple[int, ...], prefix_tokens: int, grid_w: int,
               grads: Tuple = (None,) * 4) -> Optional[_BiasArgs]:
    """The kernel's bias argument (None without a bias) for ``(B, H, T, D)`` queries; checks the shapes
    and layout of what the kernel reads."""
    if parts is None:
        return None
    b, h, t, _ = shape
    table, prefix, rows, cols = parts
    for name, x in zip(('table', 'prefix', 'rows', 'cols'), parts):
        if x is not None and (x.dtype != torch.float32 or not x.is_contiguous()):
            raise ValueError(f'bias {name} must be a contiguous float32 tensor, got {x.dtype} {tuple(x.shape)}')
    why = bias_shape_error(PositionBias(table, prefix, rows, cols, None), b, h,
                           ((t - prefix_tokens) // grid_w, grid_w), prefix_tokens)
    if why is not None:
        raise ValueError(why)
    ty, tx = (table.shape[1], table.shape[2]) if table is not None else (1, 1)
    return _BiasArgs(_ptr(table), ty, tx, _ptr(prefix), _ptr(rows), 1 if rows is None else rows.shape[0], _ptr(cols),
                     1 if cols is None else cols.shape[0], *(_ptr(g) for g in grads))


def _forward_into(q, k, v, bounds, num_prefix_tokens: int, grid_w: int, scale: float,
                  bias: Optional[BiasParts] = None):
    """Output ``(B, T, H, D)`` and log-sum-exp ``(B, H, T)``; ``bias``: the parts (table, prefix, rows,
    cols) of a position bias, or None."""
    lib = _kernel()
    q, k, v = (_unit_last(x, n) for x, n in ((q, 'q'), (k, 'k'), (v, 'v')))
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f'the native kernel needs q, k and v of one shape (B, heads, tokens, head_dim); got q '
                         f'{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}')
    b, h, t, d = q.shape
    args = _bias_args(bias, q.shape, num_prefix_tokens, grid_w)
    out = torch.empty(b, t, h, d, dtype=torch.float32)
    lse = torch.empty(b, h, t, dtype=torch.float32)
    _status(lib.vitfree_window_attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), b, h, t, d, num_prefix_tokens, grid_w,
        _strides(q), _strides(k), _strides(v), bounds.data_ptr(), bounds.shape[0], scale,
        out.data_ptr(), lse.data_ptr(), torch.get_num_threads(), None if args is None else ctypes.byref(args)), bounds)
    return out, lse


def _backward_into(q, k, v, out, grad_out, lse, bounds, num_prefix_tokens, grid_w, scale, dq, dk, dv,
                   bias: Optional[BiasParts] = None, dbias: Tuple = (None,) * 4) -> None:
    """Writes every element of dq, dk, dv (float32, unit stride in head_dim) and of the per-image bias
    gradients ``dbias`` (buffers for the parts of ``bias`` there are, see :func:`_bias_grads`)."""
    lib = _kernel()
    q, k, v = (_unit_last(x, n) for x, n in ((q, 'q'), (k, 'k'), (v, 'v')))
    b, h, t, d = q.shape
    grad_out = grad_out.float().contiguous()
    args = _bias_args(bias, q.shape, num_prefix_tokens, grid_w, dbias)
    _status(lib.vitfree_window_attention_backward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), grad_out.data_ptr(), lse.data_ptr(),
        b, h, t, d, num_prefix_tokens, grid_w, _strides(q), _strides(k), _strides(v), bounds.data_ptr(),
        bounds.shape[0], scale, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), _strides(dq), _strides(dk),
        _strides(dv), torch.get_num_threads(), None if args is None else ctypes.byref(args)), bounds)


def _bias_grads(parts: BiasParts, b: int, grid: Tuple[int, int]) -> Tuple[Optional[torch.Tensor], ...]:
    """Per-image gradient buffers the kernel writes, for the parts there are: ``(B, H, ty * tx)``,
    ``(B, H, 3)``, ``(B, H, N, gh)``, ``(B, H, N, gw)``."""
    table, prefix, rows, cols = parts
    n = grid[0] * grid[1]
    return (None if table is None else torch.empty(b, table.shape[0], table.shape[1] * table.shape[2]),
            None if prefix is None else torch.empty(b, prefix.shape[0], 3),
            None if rows is None else torch.empty(b, rows.shape[1], n, grid[0]),
            None if cols is None else torch.empty(b, cols.shape[1], n, grid[1]))


def _reduce_bias_grads(parts: BiasParts, grads: Tuple) -> Tuple[torch.Tensor, ...]:
    """The per-image gradients summed to each part's own shape (empty where a part is absent)."""
    out = []
    for x, g in zip(parts, grads):
        if x is None:
            out.append(torch.empty(0))
        elif x.dim() == 4 and x.shape[0] == g.shape[0]:  # batched rows / cols: per image already
            out.append(g)
        else:
            out.append(g.sum(0).view(x.shape))
    return tuple(out)


@torch.library.custom_op('vitfree::window_attention', mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, num_prefix_tokens: int,
               grid_w: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, H, T, D)`` fp32 q, k, v (any strides, unit stride in D) -> output ``(B, T, H, D)``
    and log-sum-exp ``(B, H, T)``."""
    return _forward_into(q, k, v, bounds, num_prefix_tokens, grid_w, scale)


@_attention.register_fake
def _(q, k, v, bounds, num_prefix_tokens, grid_w, scale):
    b, h, t, d = q.shape
    return q.new_empty(b, t, h, d), q.new_empty(b, h, t)


@torch.library.custom_op('vitfree::window_attention_backward', mutates_args=())
def _attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        grad_out: torch.Tensor, lse: torch.Tensor, bounds: torch.Tensor, num_prefix_tokens: int,
                        grid_w: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (torch.empty(x.shape, dtype=torch.float32) for x in (q, k, v))  # the kernel writes every element
    _backward_into(q, k, v, out, grad_out, lse, bounds, num_prefix_tokens, grid_w, scale, dq, dk, dv)
    return dq, dk, dv


@_attention_backward.register_fake
def _(q, k, v, out, grad_out, lse, bounds, num_prefix_tokens, grid_w, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op('vitfree::window_attention_qkv', mutates_args=())
def _attention_qkv(qkv: torch.Tensor, bounds: torch.Tensor, num_prefix_tokens: int, grid_w: int,
                   scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same on a ``(B, T, 3, H, D)`` qkv projection read in place; its gradient comes back
    in that same layout, so nothing is copied on either side of the kernel."""
    q, k, v = (qkv.select(2, i).transpose(1, 2) for i in range(3))
    return _forward_into(q, k, v, bounds, num_prefix_tokens, grid_w, scale)


@_attention_qkv.register_fake
def _(qkv, bounds, num_prefix_tokens, grid_w, scale):
    b, t, _, h, d = qkv.shape
    return qkv.new_empty(b, t, h, d), qkv.new_empty(b, h, t)


@torch.library.custom_op('vitfree::window_attention_qkv_backward', mutates_args=())
def _attention_qkv_backward(qkv: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor, lse: torch.Tensor,
                            bounds: torch.Tensor, num_prefix_tokens: int, grid_w: int, scale: float) -> torch.Tensor:
    dqkv = torch.empty(qkv.shape, dtype=torch.float32)  # the kernel writes every element
    q, k, v = (qkv.select(2, i).transpose(1, 2) for i in range(3))
    dq, dk, dv = (dqkv.select(2, i).transpose(1, 2) for i in range(3))
    _backward_into(q, k, v, out, grad_out, lse, bounds, num_prefix_tokens, grid_w, scale, dq, dk, dv)
    return dqkv


@_attention_qkv_backward.register_fake
def _(qkv, out, grad_out, lse, bounds, num_prefix_tokens, grid_w, scale):
    return torch.empty_like(qkv)


class _Attention(torch.autograd.Function):
    """Autograd of the kernel on ``(B, H, T, D)`` q, k, v (``torch.func`` transforms included: the custom
    ops stay opaque to ``torch.compile``, this function gives them their derivative)."""

    @staticmethod
    def forward(q, k, v, bounds, num_prefix_tokens, grid_w, scale):
        if not torch.compiler.is_compiling():  # eagerly the kernel directly: no custom-op dispatch on the hot path
            return _forward_into(q, k, v, bounds, num_prefix_tokens, grid_w, scale)
        with torch.no_grad():  # the op's derivative is this function's backward
            return _attention(q, k, v, bounds, num_prefix_tokens, grid_w, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, bounds, p, gw, scale = inputs
        ctx.save_for_backward(q, k, v, bounds, *output)
        ctx.meta = (p, gw, scale)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        refuse_second_order('native')
        q, k, v, bounds, out, lse = ctx.saved_tensors
        with torch.no_grad():
            dq, dk, dv = _attention_backward(q, k, v, out, grad_out.contiguous(), lse, bounds, *ctx.meta)
        return dq, dk, dv, None, None, None, None


class _AttentionQKV(torch.autograd.Function):
    """The same on a packed ``(B, T, 3, H, D)`` qkv projection; its gradient comes back in that layout."""

    @staticmethod
    def forward(qkv, bounds, num_prefix_tokens, grid_w, scale):
        if not torch.compiler.is_compiling():
            q, k, v = (qkv.select(2, i).transpose(1, 2) for i in range(3))
            return _forward_into(q, k, v, bounds, num_prefix_tokens, grid_w, scale)
        with torch.no_grad():
            return _attention_qkv(qkv, bounds, num_prefix_tokens, grid_w, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, bounds, p, gw, scale = inputs
        ctx.save_for_backward(qkv, bounds, *output)
        ctx.meta = (p, gw, scale)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        refuse_second_order('native')
        qkv, bounds, out, lse = ctx.saved_tensors
        with torch.no_grad():
            dqkv = _attention_qkv_backward(qkv, out, grad_out.contiguous(), lse, bounds, *ctx.meta)
        return dqkv, None, None, None, None


@torch.library.custom_op('vitfree::window_attention_bias', mutates_args=())
def _attention_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, num_prefix_tokens: int,
                    grid_w: int, scale: float, table: Optional[torch.Tensor], prefix: Optional[torch.Tensor],
                    rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_attention` with a position bias: its parts as fp32 contiguous tensors (None: absent)."""
    return _forward_into(q, k, v, bounds, num_prefix_tokens, grid_w, scale, (table, prefix, rows, cols))


@_attention_bias.register_fake
def _(q, k, v, bounds, num_prefix_tokens, grid_w, scale, table, prefix, rows, cols):
    b, h, t, d = q.shape
    return q.new_empty(b, t, h, d), q.new_empty(b, h, t)


@torch.library.custom_op('vitfree::window_attention_bias_backward', mutates_args=())
def _attention_bias_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             grad_out: torch.Tensor, lse: torch.Tensor, bounds: torch.Tensor, num_prefix_tokens: int,
                             grid_w: int, scale: float, table: Optional[torch.Tensor], prefix: Optional[torch.Tensor],
                             rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """dq, dk, dv and the gradients of table, prefix, rows, cols (each in its part's shape; empty where the
    part is absent)."""
    parts = (table, prefix, rows, cols)
    dq, dk, dv = (torch.empty(x.shape, dtype=torch.float32) for x in (q, k, v))
    grid = ((q.shape[2] - num_prefix_tokens) // grid_w, grid_w)
    dbias = _bias_grads(parts, q.shape[0], grid)
    _backward_into(q, k, v, out, grad_out, lse, bounds, num_prefix_tokens, grid_w, scale, dq, dk, dv, parts, dbias)
    return [dq, dk, dv, *_reduce_bias_grads(parts, dbias)]


@_attention_bias_backward.register_fake
def _(q, k, v, out, grad_out, lse, bounds, num_prefix_tokens, grid_w, scale, table, prefix, rows, cols):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            *(q.new_empty(0) if x is None else torch.empty_like(x) for x in (table, prefix, rows, cols))]


class _BiasAttention(torch.autograd.Function):
    """:class:`_Attention` with a position bias (table, prefix, rows, cols: fp32 contiguous or None); the
    parts get their gradients as the tiled backend's autograd gives them."""

    @staticmethod
    def forward(q, k, v, bounds, num_prefix_tokens, grid_w, scale, table, prefix, rows, cols):
        parts = (table, prefix, rows, cols)
        if not torch.compiler.is_compiling():
            return _forward_into(q, k, v, bounds, num_prefix_tokens, grid_w, scale, parts)
        with torch.no_grad():
            return _attention_bias(q, k, v, bounds, num_prefix_tokens, grid_w, scale, *parts)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, bounds, p, gw, scale, *parts = inputs
        ctx.save_for_backward(q, k, v, bounds, *output, *parts)
        ctx.meta = (p, gw, scale)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        refuse_second_order('native')
        q, k, v, bounds, out, lse, *parts = ctx.saved_tensors
        with torch.no_grad():
            grads = _attention_bias_backward(q, k, v, out, grad_out.contiguous(), lse, bounds, *ctx.meta, *parts)
        dparts = [None if x is None else g for x, g in zip(parts, grads[3:])]
        return (*grads[:3], None, None, None, None, *dparts)


# ---- the backend ------------------------------------------------------------------------------------
# a query row costs about this many pair-channels of the kernel's work (index and softmax work; CPU fit)
QUERY_WORK = 1727.0
# a position bias, in the same unit (timed on this project's CPU: 64x64 grid, 7x7 windows, 12 heads x 64): its
# term on every visited pair (table, prefix), and per query and entry of its key-row / key-column terms (rows,
# cols: read by the forward pass, a whole row of gradient written by the backward pass); the no-bias fit is
# reused, so a bias only makes a call a little dearer
BIAS_PAIR_WORK = 2.0
BIAS_ENTRY_WORK = 6.0


def _contiguous_rows(x: torch.Tensor) -> torch.Tensor:
    """fp32 with unit stride in the last dimension (the kernel's layout; other strides are read as they are)."""
    x = x if x.dtype == torch.float32 else x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


class NativeBackend(Backend):
    name = 'native'
    description = 'compiled C++/OpenMP CPU kernel: each query visits only its window; O(T * window)'
    takes_dropout = False
    exact_nonfinite = True  # a key outside a query's window is never read for it
    takes_bias = ('table', 'prefix', 'rows', 'cols')  # evaluated per visited pair; a dense `full` is not taken

    def supports(self, query: Query, windows: LayerWindows) -> Optional[str]:
        if query.device.type != 'cpu':
            return f'the native kernel runs on the CPU; the inputs are on {query.device.type}'
        if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f'the native kernel takes float32, bfloat16 or float16 inputs, got {query.dtype}'
        if query.value_dim != query.head_dim:
            return f'the native kernel needs v\'s head size ({query.value_dim}) equal to q\'s ({query.head_dim})'
        return native_library()[1]

    def prepare(self, windows: LayerWindows, query: Query) -> Any:
        return window_bounds_tensor(windows, query.prefix)

    def work(self, query: Query, windows: LayerWindows) -> float:
        pairs = window_pairs(windows, query.prefix)
        per_head = pairs * query.head_dim + QUERY_WORK * query.tokens
        if query.bias:
            entries = query.grid[0] * ('rows' in query.bias) + query.grid[1] * ('cols' in query.bias)
            per_head += BIAS_PAIR_WORK * pairs + BIAS_ENTRY_WORK * windows.num_patches * entries
        return float(query.batch_heads * per_head)

    def run(self, plan: Plan, q, k, v, scale, dropout_p=0.0, attn_mask=None, probs_hook=None,
            bias: Optional[PositionBias] = None) -> torch.Tensor:
        p, gw, dtype = plan.query.prefix, plan.windows.grid[1], q.dtype
        q, k, v = _contiguous_rows(q), _contiguous_rows(k), _contiguous_rows(v)
        if bias is None:
            out, _ = _Attention.apply(q, k, v, plan.data, p, gw, scale)
        else:
            if bias.full is not None:
                raise ValueError('the native kernel takes no dense `full` part of a position bias')
            parts = (None if x is None else x.float().contiguous() for x in (bias.table, bias.prefix, bias.rows,
                                                                          bias.cols))
            out, _ = _BiasAttention.apply(q, k, v, plan.data, p, gw, scale, *parts)
        return out.transpose(1, 2).to(dtype)

    def run_qkv(self, plan: Plan, qkv: torch.Tensor, scale: float) -> torch.Tensor:
        p, gw = plan.query.prefix, plan.windows.grid[1]
        out, _ = _AttentionQKV.apply(_contiguous_rows(qkv), plan.data, p, gw, scale)
        return out.to(qkv.dtype)


BACKENDS = (NativeBackend(),)


def native_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: LayerWindows,
                            num_prefix_tokens: int = 0, scale: Optional[float] = None,
                            dropout_p: float = 0.0) -> torch.Tensor:
    """Windowed attention on ``(B, heads, T, head_dim)`` tensors through the ``native`` backend."""
    from .dispatch import window_attention
    return window_attention(q, k, v, windows, num_prefix_tokens, scale, dropout_p, backend='native')


def native_qkv_attention(qkv: torch.Tensor, windows: LayerWindows, num_prefix_tokens: int,
                         scale: Optional[float] = None) -> torch.Tensor:
    """The native kernel straight from a ``(B, T, 3, heads, head_dim)`` qkv projection; returns
    ``(B, T, heads, head_dim)``, the layout an output projection reads."""
    from .dispatch import make_query, plan
    b, t, _, h, d = qkv.shape
    query = make_query(qkv, windows.grid, num_prefix_tokens, h, d, override='native')
    return plan(windows, query).from_qkv(qkv, d ** -0.5 if scale is None else scale)
