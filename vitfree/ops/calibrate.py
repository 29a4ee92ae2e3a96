"""Calibrate the dispatcher on this device: time every backend that can run here on a few
representative shapes and fit its cost constants (see :mod:`vitfree.ops.calibration` for the
tables and where they are looked up).  ``python -m vitfree.ops.calibrate [--quick] [--commit]``.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from . import dispatch
from .calibration import (
    AUTO_BUDGET_S, ENV_AUTO, TABLE_DIR, Calibration, Fit, _key, _slug, _versions, cache_path, device_name,
    set_calibration,
)

__all__ = ['calibrate', 'fit_linear', 'cuda_timer', 'wall_timer', 'default_backends', 'DEFAULT_SHAPES',
           'FP32_SHAPES', 'QUICK_SHAPES']

# (grid, batch, window radius): ViT-S heads (6 x 64), one class token; 224, 512, 1024 and
# 1536 px at 7x7 windows, and 512 px at 15x15 windows, so the fits see both kinds of growth
DEFAULT_SHAPES: Tuple[Tuple[Tuple[int, int], int, int], ...] = (
    ((14, 14), 32, 3), ((32, 32), 8, 3), ((32, 32), 8, 7), ((64, 64), 2, 3), ((96, 96), 1, 3),
)
FP32_SHAPES = DEFAULT_SHAPES[1:4]
QUICK_SHAPES = DEFAULT_SHAPES[:2] + DEFAULT_SHAPES[3:4]


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


# ---- timing -------------------------------------------------------------------------------------
Timer = Callable[[Callable[[], Any]], float]


def cuda_timer(fn: Callable[[], Any], warmup: int = 2, min_time: float = 0.03, max_reps: int = 50) -> float:
    """Median seconds of ``fn`` on the current CUDA stream (CUDA events), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: List[float] = []
    total = 0.0
    while len(times) < 3 or (total < min_time and len(times) < max_reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        total += times[-1]
    return statistics.median(times)


def wall_timer(fn: Callable[[], Any], warmup: int = 1, min_time: float = 0.02, max_reps: int = 20) -> float:
    """Median wall seconds of ``fn`` (CPU)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    while len(times) < 3 or (sum(times) < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- calibration --------------------------------------------------------------------------------
def _lowp_dtype(device: torch.device) -> torch.dtype:
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def default_backends(device: torch.device) -> List[str]:
    """Registered backends that take part in the automatic choice on ``device`` and have a
    ``work`` function (so a fit can be used)."""
    from ..windows import LayerWindows
    q = dispatch.QuerySpec(torch.Size((1, 6, 1 + 64, 64)), torch.float32, device)
    w = LayerWindows(1, (8, 8))
    names = []
    for name, b in sorted(dispatch._BACKENDS.items()):
        if not b.auto or b.work is None:
            continue
        guess = (b.cost or dispatch.dense_cost)(q, w, 1)
        if math.isfinite(guess):
            names.append(name)
    return names


def calibrate(
        device: Union[torch.device, str, None] = None,
        backends: Optional[Iterable[str]] = None,
        shapes: Sequence[Tuple[Tuple[int, int], int, int]] = DEFAULT_SHAPES,
        fp32_shapes: Optional[Sequence[Tuple[Tuple[int, int], int, int]]] = FP32_SHAPES,
        modes: Sequence[bool] = (False, True),
        heads: int = 6,
        head_dim: int = 64,
        num_prefix_tokens: int = 1,
        timer: Optional[Timer] = None,
        save: Union[bool, str, os.PathLike] = True,
        install: bool = True,
        budget_s: Optional[float] = None,
        progress: Optional[Callable[[str], None]] = print,
) -> Calibration:
    """Time every backend on ``shapes`` (``(grid, batch, radius)``; ``fp32_shapes`` for float32, None
    to skip float32) in each mode (False: inference, True: forward+backward), fit, and return
    the :class:`Calibration`.

    ``save``: True writes the user-cache file (:func:`cache_path`), a path writes there, False
    nothing.  ``install`` makes the dispatcher use it at once.  ``budget_s`` skips the remaining
    shapes (keeping the first two of each precision and mode, the minimum for a fit) once that
    many seconds have passed.  ``timer(fn) -> seconds`` defaults to CUDA events on CUDA, wall
    time elsewhere."""
    from ..windows import LayerWindows
    dev = torch.device(device) if device is not None else (
        torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu'))
    if dev.type == 'cuda' and dev.index is None:
        dev = torch.device('cuda', torch.cuda.current_device())
    timer = timer or (cuda_timer if dev.type == 'cuda' else wall_timer)
    names = list(backends) if backends is not None else default_backends(dev)
    for n in names:
        if n not in dispatch._BACKENDS:
            raise ValueError(f'unknown backend {n!r}; registered: {sorted(dispatch._BACKENDS)}')
    say = progress or (lambda s: None)
    tv, vv = _versions()
    cal = Calibration(device_name(dev), tv, vv, time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
    start = time.perf_counter()
    runs = [('lowp', _lowp_dtype(dev), shapes)] + ([('fp32', torch.float32, fp32_shapes)] if fp32_shapes else [])
    say(f'calibrating {names} on {cal.device}: {sum(len(s) for _, _, s in runs) * len(modes)} shapes x '
        f'{len(names)} backends')
    gen = torch.Generator(device='cpu').manual_seed(0)
    windows_of: Dict[Any, LayerWindows] = {}
    p = num_prefix_tokens
    for prec, dtype, shape_list in runs:
        for training in modes:
            for i, (grid, batch, radius) in enumerate(shape_list):
                if budget_s is not None and i >= 2 and time.perf_counter() - start > budget_s:
                    say(f'  budget of {budget_s:.0f} s spent: skipping {prec} {grid} and later shapes')
                    continue
                for name in names:
                    b = dispatch._BACKENDS[name]
                    r = max(grid) if name == 'global' else radius
                    if (grid, r) not in windows_of:  # one instance per shape: plans and compiled kernels are reused
                        windows_of[(grid, r)] = LayerWindows(r, grid)
                    windows = windows_of[(grid, r)]
                    t = p + windows.num_patches
                    q, k, v = (torch.randn(batch, heads, t, head_dim, generator=gen).to(dev, dtype)
                               .requires_grad_(training) for _ in range(3))
                    sample = {'backend': name, 'key': _key(prec, training), 'dtype': str(dtype).split('.')[-1],
                              'grid': list(grid), 'batch': batch, 'radius': radius if name != 'global' else 'cover',
                              'heads': heads, 'head_dim': head_dim, 'prefix': p}
                    with torch.set_grad_enabled(training):
                        reason = b.supports(q, windows)
                        if reason is not None:
                            sample['skipped'] = reason
                            cal.samples.append(sample)
                            continue
                        sample['work'] = float(b.work(q, windows, p))
                    dispatch.prepare_backend(name, windows, p, dev, dtype)
                    grad = torch.randn_like(q) if training else None

                    def call(name=name, q=q, k=k, v=v, windows=windows, grad=grad):
                        if grad is None:
                            with torch.no_grad():
                                return dispatch.run_backend(name, q, k, v, windows, p)
                        out = dispatch.run_backend(name, q, k, v, windows, p)
                        torch.autograd.backward(out, grad)
                        q.grad = k.grad = v.grad = None
                    try:
                        sample['seconds'] = float(timer(call))
                    except Exception as e:  # OOM, a kernel that does not build: recorded, not fatal
                        sample['error'] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]
                        if dev.type == 'cuda':
                            torch.cuda.empty_cache()
                    cal.samples.append(sample)
                    said = (f'{sample["seconds"] * 1e3:9.3f} ms' if 'seconds' in sample else sample['error'])
                    say(f'  {prec:<4} {"train" if training else "infer"} grid {grid[0]}x{grid[1]} batch {batch} '
                        f'r{radius} {name:<14} {said}  ({time.perf_counter() - start:.0f} s)')
                    del q, k, v, grad
    for name in names:
        for key in sorted({s['key'] for s in cal.samples}):
            pts = [(s['work'], s['seconds']) for s in cal.samples
                   if s['backend'] == name and s['key'] == key and 'seconds' in s]
            if len(pts) >= 2:
                cal.fits.setdefault(name, {})[key] = fit_linear([w for w, _ in pts], [s for _, s in pts])
    for name, per in cal.fits.items():
        for key, f in per.items():
            say(f'  fit {name:<14} {key:<11} call {f.call * 1e6:8.1f} us  per unit {f.per_unit:.3e} s  '
                f'(rel. error {f.rel_err:.0%}, {f.samples} samples)')
    if save:
        path = cache_path(cal.device) if save is True else Path(save)
        cal.source = str(cal.save(path))
        say(f'saved {cal.source}')
    if install:
        set_calibration(cal, dev)
    return cal


def auto_calibrate(device: torch.device, name: Optional[str] = None) -> Optional[Calibration]:
    """Measure a quick calibration for an uncalibrated ``device``, called by
    :func:`~vitfree.ops.calibration.calibration_for` on the first attention call there: low
    precision, inference and training, the quick shapes, within ``AUTO_BUDGET_S`` seconds; saved
    to the user cache.  Runs outside autocast and with gradients enabled, whatever the caller's
    context.  A failure is reported and leaves the device on the fixed guesses."""
    import logging
    import warnings

    name = name or device_name(device)
    path = cache_path(name)
    msg = (f'vitfree: no attention-backend calibration for {name}; measuring one now (once, up to about '
           f'{AUTO_BUDGET_S:.0f} s), cached in {path}. Run `python -m vitfree.ops.calibrate` ahead of time to '
           f'skip this, or set {ENV_AUTO}=0 to use fixed guesses instead.')
    log = logging.getLogger('vitfree')
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    try:
        with torch.autocast(device.type, enabled=False), torch.enable_grad():
            cal = calibrate(device, shapes=QUICK_SHAPES, fp32_shapes=None, budget_s=AUTO_BUDGET_S, save=True,
                            install=False, progress=log.info)
    except Exception as e:  # a GPU that cannot run the timing loop must not stop the user's forward pass
        log.warning(f'vitfree: calibrating {name} failed ({type(e).__name__}: {e}); using fixed guesses')
        return None
    return cal


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog='python -m vitfree.ops.calibrate',
                                 description='Measure the attention backends on this device and fit the '
                                             "dispatcher's cost model (cached per device, torch and vitfree).")
    ap.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    ap.add_argument('--backends', nargs='+', default=None, help='default: every backend auto may pick there')
    ap.add_argument('--quick', action='store_true', help='three shapes, no float32')
    ap.add_argument('--no-fp32', action='store_true', help='calibrate float16/bfloat16 only')
    ap.add_argument('--budget', type=float, default=None, help='seconds after which remaining shapes are skipped')
    ap.add_argument('--out', default=None, help='also write the table into this directory')
    ap.add_argument('--commit', action='store_true',
                    help=f'also write it into {TABLE_DIR} (the tables shipped with vitfree)')
    args = ap.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    fp32 = None if (args.quick or args.no_fp32) else FP32_SHAPES
    cal = calibrate(args.device, args.backends, shapes, fp32, budget_s=args.budget)
    for d in ([args.out] if args.out else []) + ([str(TABLE_DIR)] if args.commit else []):
        print('wrote', cal.save(Path(d) / f'{_slug(cal.device)}.json'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
