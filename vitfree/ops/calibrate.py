"""Measure the attention backends on this device and fit the dispatcher's cost table.

``vitfree calibrate [--device cuda] [--quick] [--commit]`` (or :func:`vitfree.ops.calibrate`): every backend that the automatic choice may pick on the device
is timed on a few representative shapes, in low precision and float32, for inference and for a
training step; ``call + per_unit * work`` is fitted per backend, precision and mode
(:func:`fit_linear`), and the table is saved to the user cache (``--commit`` also writes it into
``vitfree/ops/calibrations/``, the tables shipped with vitfree) and installed.  This is a tool:
the dispatcher only reads tables (:mod:`vitfree.ops.calibration`) and never calls it.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ..windows import LayerWindows
from . import dispatch
from .calibration import TABLE_DIR, Calibration, Fit, _versions, cache_path, device_name, fit_key, set_calibration, slug

__all__ = ['calibrate', 'fit_linear', 'cuda_timer', 'wall_timer', 'cpu_timer', 'default_backends', 'shapes_for', 'write_table',
           'DEFAULT_SHAPES', 'CPU_SHAPES', 'QUICK_SHAPES']

Shape = Tuple[Tuple[int, int], int, int]  # (grid, batch, window radius)
# ViT-S heads (6 x 64), one class token.  GPU: 224, 512, 1024 and 1536 px at 7x7 windows and 512 px
# at 15x15 windows; CPU: 224 px at 3x3 and 7x7 windows (batch 8), 512 and 1024 px at 7x7 windows.
DEFAULT_SHAPES: Tuple[Shape, ...] = (
    ((14, 14), 32, 3), ((32, 32), 8, 3), ((32, 32), 8, 7), ((64, 64), 2, 3), ((96, 96), 1, 3),
)
CPU_SHAPES: Tuple[Shape, ...] = (((14, 14), 8, 1), ((14, 14), 8, 3), ((32, 32), 2, 3), ((64, 64), 1, 3))
QUICK_SHAPES: Tuple[Shape, ...] = (((14, 14), 8, 3), ((32, 32), 2, 3), ((64, 64), 1, 3))


def fit_linear(works: Sequence[float], seconds: Sequence[float]) -> Fit:
    """Least-squares ``seconds ~ call + per_unit * work`` in relative error, both constants >= 0."""
    if len(works) != len(seconds) or not works:
        raise ValueError(f'need matching, non-empty samples, got {len(works)} works and {len(seconds)} times')
    w = [float(x) for x in works]
    t = [float(x) for x in seconds]
    if min(t) <= 0:
        raise ValueError(f'times must be positive, got {min(t)}')
    a_ = [1.0 / ti for ti in t]  # rows (1/t, w/t) . (call, per_unit) ~ 1
    b_ = [wi / ti for wi, ti in zip(w, t)]
    saa, sab, sbb = sum(x * x for x in a_), sum(x * y for x, y in zip(a_, b_)), sum(y * y for y in b_)
    sa, sb = sum(a_), sum(b_)
    det = saa * sbb - sab * sab
    call, per = (None, None)
    if len(w) >= 2 and det > 1e-12 * saa * sbb:
        call = (sbb * sa - sab * sb) / det
        per = (saa * sb - sab * sa) / det
    if call is None or call < 0 or per < 0:
        cands = [(0.0, sb / sbb if sbb > 0 else 0.0), (sa / saa, 0.0)]
        call, per = min(cands, key=lambda c: sum(((c[0] + c[1] * wi) / ti - 1) ** 2 for wi, ti in zip(w, t)))
    err = math.sqrt(sum(((call + per * wi) / ti - 1) ** 2 for wi, ti in zip(w, t)) / len(w))
    return Fit(float(call), float(per), len(w), float(err))


# ---- timing -------------------------------------------------------------------------------------------
Timer = Callable[[Callable[[], Any]], float]


def cuda_timer(fn: Callable[[], Any], warmup: int = 2, min_time: float = 0.03, max_reps: int = 50) -> float:
    """Median seconds of ``fn`` on the current CUDA stream (CUDA events), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: List[float] = []
    while len(times) < 3 or (sum(times) < min_time and len(times) < max_reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def wall_timer(fn: Callable[[], Any], warmup: int = 3, min_time: float = 0.1, max_reps: int = 20,
               clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of ``fn`` by ``clock`` (wall time by default), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    while len(times) < 3 or (sum(times) < min_time and len(times) < max_reps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def cpu_timer(fn: Callable[[], Any]) -> float:
    """Median CPU seconds of ``fn`` (this process, all threads): what the CPU tables are fitted to, so
    that a table can be measured on a machine other jobs share (wall time there measures them too).
    Measure with one thread (``--threads 1``), where no OpenMP worker spins while waiting."""
    return wall_timer(fn, clock=time.process_time)


# ---- measuring ----------------------------------------------------------------------------------------
def default_backends(device: torch.device) -> List[str]:
    """The backends the automatic choice may pick on ``device`` (``auto``, and the device type among
    their ``auto_devices``)."""
    return [n for n in dispatch.list_backends() if n != dispatch.AUTO
            and dispatch.get_backend(n).auto
            and device.type in getattr(dispatch.get_backend(n), 'auto_devices', ('cpu', 'cuda'))]


def _lowp_dtype(device: torch.device) -> torch.dtype:
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _sample(name: str, windows: LayerWindows, batch: int, dtype: torch.dtype, training: bool, dev: torch.device,
            timer: Timer, heads: int, head_dim: int, prefix: int, gen: torch.Generator) -> Dict[str, Any]:
    """Time one backend on one shape: the record of a sample (seconds, work), or why it was skipped."""
    t = prefix + windows.num_patches
    q, k, v = (torch.randn(batch, heads, t, head_dim, generator=gen).to(dev, dtype).requires_grad_(training)
               for _ in range(3))
    rec: Dict[str, Any] = {}
    try:
        with dispatch.use_backend(name), torch.set_grad_enabled(training):
            query = dispatch.make_query(q, windows.grid, prefix, heads, head_dim)
            planned = dispatch.plan(windows, query)
    except dispatch.BackendError as e:
        return {'skipped': str(e)}
    rec['work'] = float(planned.backend.work(query, windows))
    grad = torch.randn(batch, heads, t, head_dim, generator=gen).to(dev, dtype) if training else None

    def call():
        if grad is None:
            with torch.no_grad():
                return planned(q, k, v)
        torch.autograd.backward(planned(q, k, v), grad)
        q.grad = k.grad = v.grad = None
    call.backend, call.work = name, rec['work']  # what a timer may want to know (tests use a fake clock)
    try:
        rec['seconds'] = float(timer(call))
    except Exception as e:  # OOM, a kernel that does not build: recorded, not fatal
        rec['error'] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]
        if dev.type == 'cuda':
            torch.cuda.empty_cache()
    return rec


def _fits(cal: Calibration, names: Iterable[str]) -> None:
    for name in names:
        for key in sorted({s['key'] for s in cal.samples}):
            pts = [(s['work'], s['seconds']) for s in cal.samples
                   if s['backend'] == name and s['key'] == key and 'seconds' in s]
            if len(pts) >= 2:
                cal.fits.setdefault(name, {})[key] = fit_linear([w for w, _ in pts], [s for _, s in pts])


def calibrate(device: Union[torch.device, str, None] = None, backends: Optional[Iterable[str]] = None,
              shapes: Optional[Sequence[Shape]] = None, fp32_shapes: Optional[Sequence[Shape]] = (),
              modes: Sequence[bool] = (False, True), heads: int = 6, head_dim: int = 64, num_prefix_tokens: int = 1,
              timer: Optional[Timer] = None, save: Union[bool, str, os.PathLike] = True, install: bool = True,
              progress: Optional[Callable[[str], None]] = print) -> Calibration:
    """Time every backend on ``shapes`` (``(grid, batch, radius)``, in low precision; default per device
    type) and ``fp32_shapes`` (float32; ``()`` means the same shapes, None skips float32), in each mode
    (False: inference, True: forward and backward), fit, and return the table.  ``save``: True writes
    the user cache, a path writes there, False nothing; ``install`` makes the dispatcher use it."""
    dev = torch.device(device) if device is not None else (
        torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu'))
    if dev.type == 'cuda' and dev.index is None:
        dev = torch.device('cuda', torch.cuda.current_device())
    shapes = tuple(shapes or (DEFAULT_SHAPES if dev.type == 'cuda' else CPU_SHAPES))
    fp32 = shapes if fp32_shapes == () else fp32_shapes
    timer = timer or (cuda_timer if dev.type == 'cuda' else cpu_timer)
    names = list(backends) if backends is not None else default_backends(dev)
    for n in names:
        dispatch.get_backend(n)  # unknown names fail here, before any timing
    say = progress or (lambda s: None)
    tv, vv = _versions()
    cal = Calibration(device_name(dev), tv, vv, time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
                      note=f'CPU time, {torch.get_num_threads()} thread(s)' if dev.type == 'cpu' else '')
    runs = [('lowp', _lowp_dtype(dev), shapes)] + ([('fp32', torch.float32, fp32)] if fp32 else [])
    total = sum(len(s) for _, _, s in runs) * len(modes) * len(names)
    say(f'calibrating {names} on {cal.device}: {total} timings')
    gen, start = torch.Generator(device='cpu').manual_seed(0), time.perf_counter()
    for prec, dtype, shape_list in runs:
        for training in modes:
            for grid, batch, radius in shape_list:
                for name in names:
                    windows = LayerWindows(max(grid) if name == 'global' else radius, grid)
                    rec = _sample(name, windows, batch, dtype, training, dev, timer, heads, head_dim,
                                  num_prefix_tokens, gen)
                    rec.update(backend=name, key=fit_key(prec, training), dtype=str(dtype).split('.')[-1],
                               grid=list(grid), batch=batch, radius=radius if name != 'global' else 'cover',
                               heads=heads, head_dim=head_dim, prefix=num_prefix_tokens)
                    cal.samples.append(rec)
                    said = (f'{rec["seconds"] * 1e3:9.3f} ms' if 'seconds' in rec
                            else rec.get('error') or f'skipped: {rec["skipped"]}')
                    say(f'  {prec:<4} {"train" if training else "infer"} grid {grid[0]}x{grid[1]} batch {batch} '
                        f'r{radius} {name:<14} {said}  ({time.perf_counter() - start:.0f} s)')
    _fits(cal, names)
    for name, per in cal.fits.items():
        for key, f in per.items():
            say(f'  fit {name:<14} {key:<11} call {f.call * 1e6:8.1f} us  per unit {f.per_unit:.3e} s  '
                f'(rel. error {f.rel_err:.0%}, {f.samples} samples)')
    if save:
        cal.source = str(cal.save(cache_path(cal.device) if save is True else Path(save)))
        say(f'saved {cal.source}')
    if install:
        set_calibration(cal, dev)
    return cal


def shapes_for(quick: bool = False, fp32: bool = True) -> Tuple[Optional[Sequence[Shape]], Optional[Sequence[Shape]]]:
    """``(shapes, fp32_shapes)`` arguments of :func:`calibrate` for the command's ``--quick`` / ``--no-fp32``."""
    return (QUICK_SHAPES if quick else None), (None if (quick or not fp32) else ())


def write_table(cal: Calibration, folder: Union[str, os.PathLike, None] = None) -> Path:
    """Write ``cal`` as ``<folder>/<device>.json``; default folder: the tables shipped with vitfree."""
    return cal.save(Path(folder if folder is not None else TABLE_DIR) / f'{slug(cal.device)}.json')
