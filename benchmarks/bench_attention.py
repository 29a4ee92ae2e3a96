"""Attention op benchmark: one 7x7 window for every patch, five ways, side by side.

  sdpa       F.scaled_dot_product_attention without a mask (what timm's ViT runs; all pairs)
  sdpa_mask  SDPA with the dense boolean window mask (vitfree's ``dense`` backend)
  tiled      vitfree's ``tiled`` backend (pure PyTorch)
  native     vitfree's ``native`` backend (compiled C++/OpenMP, exact window work)
  natten     NATTEN's ``na2d`` with kernel_size 7 (optional: ``pip install 'vitfree[bench]'``;
             timed in its own rounds, since it is 10-100x slower and flushes the caches)
  auto       what vitfree's dispatcher picks (for checking its cost model)

at N = 196, 784, 2304, 4096 patches (grids 14, 28, 48, 64), ViT-S heads (6 x 64), batch 1, no
prefix token (NATTEN has none), forward and forward+backward: time (median of interleaved
rounds) and peak memory (growth of a fresh process's resident set during one call).
NATTEN shifts windows at the border where vitfree clips them; the work is the same size.

  python benchmarks/bench_attention.py [--quick] [--threads 1] [--out benchmarks/results]
  python benchmarks/bench_attention.py --calibrate     # refit the tiled kernel's tile costs
  python benchmarks/bench_attention.py --fit-native    # refit the dispatcher's native-kernel costs
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from vitfree.benchmark import interleaved, machine_info, peak_memory, set_threads, write_results  # noqa: E402
from vitfree.ops import choose_backend, native_window_attention, tiled_window_attention, window_attention  # noqa: E402
from vitfree.windows import LayerWindows  # noqa: E402

GRIDS = (14, 28, 48, 64)
HEADS, DIM, RADIUS = 6, 64, 3
METHODS = ('sdpa', 'sdpa_mask', 'tiled', 'native', 'natten', 'auto')


def _natten():
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            import natten  # noqa: F401
        return natten
    except Exception:
        return None


def make_call(method: str, g: int, backward: bool, dtype=torch.float32):
    """A zero-argument callable running ``method`` once on fresh-looking inputs of grid ``g``."""
    windows = LayerWindows(RADIUS, (g, g))
    n = g * g
    q, k, v = (torch.randn(1, HEADS, n, DIM, dtype=dtype, requires_grad=backward) for _ in range(3))
    mask = windows.mask(0)
    if method == 'natten':
        natten = _natten()
        qn, kn, vn = (x.detach().view(1, HEADS, g, g, DIM).permute(0, 2, 3, 1, 4).contiguous().requires_grad_(backward)
                      for x in (q, k, v))
        def fn():
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # NATTEN warns that CPU FlexAttention is unfused
                return natten.na2d(qn, kn, vn, kernel_size=2 * RADIUS + 1)
        leaves = (qn, kn, vn)
    else:
        fn = {
            'sdpa': lambda: F.scaled_dot_product_attention(q, k, v),
            'sdpa_mask': lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            'tiled': lambda: tiled_window_attention(q, k, v, windows, 0),
            'native': lambda: native_window_attention(q, k, v, windows, 0),
            'auto': lambda: window_attention(q, k, v, windows, 0),
        }[method]
        leaves = (q, k, v)

    def call():
        if backward:
            out = fn()
            out.sum().backward()
            for x in leaves:
                x.grad = None
        else:
            with torch.no_grad():
                fn()
    return call


def _memory_setup(method: str, g: int, backward: bool) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return textwrap.dedent(f'''
        sys.path.insert(0, {here!r})
        from bench_attention import make_call
        step = make_call({method!r}, {g}, {backward!r})
    ''')


def run(args) -> dict:
    threads = set_threads(args.threads)
    methods = [m for m in METHODS if m != 'natten' or _natten() is not None]
    grids = GRIDS[:2] if args.quick else GRIDS
    results = {'machine': machine_info(), 'config': {'heads': HEADS, 'head_dim': DIM, 'window': 2 * RADIUS + 1,
                                                     'batch': 1, 'prefix_tokens': 0, 'reps': args.reps},
               'rows': []}
    if 'natten' not in methods:
        results['note'] = 'natten not installed: pip install "vitfree[bench]"'
    for g in grids:
        w = LayerWindows(RADIUS, (g, g))
        for backward in (False, True):
            mode = 'fwd+bwd' if backward else 'fwd'
            q = torch.empty(1, HEADS, g * g, DIM, requires_grad=backward)
            with torch.set_grad_enabled(backward):
                picked = choose_backend(q, w, 0)
            # NATTEN's CPU path (FlexAttention, unfused) has no backward pass
            here = [m for m in methods if not (m == 'natten' and backward)]
            calls = {m: make_call(m, g, backward) for m in here}
            reps = args.reps if g < 48 or not backward else max(2, args.reps - 1)
            t0 = time.perf_counter()
            # NATTEN streams gigabytes through the caches; timed in its own rounds so it does
            # not slow whichever method would follow it in the round-robin
            slow = {m: calls.pop(m) for m in ('natten',) if m in calls}
            times = interleaved(calls, reps=reps, warmup=1)
            if slow:
                times.update(interleaved(slow, reps=max(2, reps - 2), warmup=1))
            row = {'N': g * g, 'grid': g, 'mode': mode, 'auto_picks': picked,
                   'time_s': {m: times[m]['median'] if m in here else None for m in methods},
                   'time_min_s': {m: times[m]['min'] if m in here else None for m in methods}}
            row['speedup_vs_sdpa'] = {m: row['time_s']['sdpa'] / row['time_s'][m] for m in here}
            if not args.no_memory:
                row['peak_mb'] = {m: peak_memory(_memory_setup(m, g, backward), threads).get('peak_mb')
                                  if m in here else None for m in methods}
            row['wall_s'] = time.perf_counter() - t0
            print(json.dumps({k: row[k] for k in ('N', 'mode', 'auto_picks', 'speedup_vs_sdpa')}), flush=True)
            results['rows'].append(row)
    results['machine']['load_avg_end'] = machine_info()['load_avg_1_5_15']
    return results


def to_markdown(res: dict) -> str:
    methods = list(res['rows'][0]['time_s'])
    m = res['machine']
    lines = [
        '# Attention op: one 7x7 window per patch',
        '',
        f'{m["cpu"]}, {m["cores"]} cores, torch {m["torch"]}, {m["threads"]} thread(s); load average at start '
        f'{m["load_avg_1_5_15"]}, at end {m.get("load_avg_end")} (the machine was shared with other jobs). '
        f'Batch 1, {res["config"]["heads"]} heads x {res["config"]["head_dim"]}, fp32. Time: median of '
        f'{res["config"]["reps"]} interleaved rounds ({"CPU time" if m["threads"] == 1 else "wall time"}). '
        'Peak: resident-memory growth of a fresh process during one call.',
        '',
        '| N | mode | ' + ' | '.join(f'{x} ms' for x in methods) + ' | native vs sdpa | native vs sdpa_mask | '
        + 'native vs tiled | ' + ('native vs natten | ' if 'natten' in methods else '') + 'auto picks | '
        + ' | '.join(f'{x} MiB' for x in methods) + ' |',
        '|' + '---|' * (2 + len(methods) + 4 + ('natten' in methods) + len(methods)),
    ]
    for r in res['rows']:
        t = r['time_s']
        cells = [str(r['N']), r['mode']] + [f'{1e3 * t[x]:.1f}' if t[x] else 'n/a' for x in methods]
        cells += [f'{t["sdpa"] / t["native"]:.1f}x', f'{t["sdpa_mask"] / t["native"]:.1f}x',
                  f'{t["tiled"] / t["native"]:.1f}x']
        if 'natten' in methods:
            cells.append(f'{t["natten"] / t["native"]:.0f}x' if t['natten'] else 'n/a')
        cells.append(r['auto_picks'])
        pk = r.get('peak_mb', {})
        cells += [f'{pk[x]:.0f}' if isinstance(pk.get(x), (int, float)) else '-' for x in methods]
        lines.append('| ' + ' | '.join(cells) + ' |')
    if 'natten' in methods:
        lines += ['', 'natten fwd+bwd: n/a, NATTEN 0.21 runs on CPU through unfused FlexAttention, which has no '
                  'backward pass on CPU.']
    return '\n'.join(lines) + '\n'


def calibrate(args) -> None:
    """Time forced tile shapes and fit (pairs, rows, tiles) -> seconds by least squares."""
    import numpy as np

    from vitfree.ops import plan_tiles
    set_threads(args.threads)
    feats, ys = [], []
    for g in (24, 48, 64):
        for r in (1, 3, 6):
            w = LayerWindows(r, (g, g))
            b = max(1, 4096 // (g * g) * 2)
            q, k, v = (torch.randn(b, HEADS, g * g + 1, DIM) for _ in range(3))
            for tile in ((2, 4), (4, 4), (4, 8), (6, 6), (8, 8), (8, 16), (12, 12), (16, 16), (1, 16)):
                p = plan_tiles(w, 1, tile)
                with torch.no_grad():
                    t = interleaved({'t': lambda: tiled_window_attention(q, k, v, w, 1, tile=tile)}, reps=3)['t']
                bh = b * HEADS
                feats.append([bh * p.num_tiles * p.tile_queries * p.tile_keys,
                              bh * p.num_tiles * 2 * (p.tile_queries + p.tile_keys), bh * p.num_tiles])
                ys.append(t['median'])
    x, y = np.array(feats, float), np.array(ys)
    coef, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
    print(f'seconds per pair {coef[0]:.3e} (per pair-channel {coef[0] / DIM:.3e}), per row {coef[1]:.3e}, '
          f'per tile {coef[2]:.3e}; _ROW_COST = {coef[1] / coef[0]:.1f}, _TILE_COST = {coef[2] / coef[0]:.0f}')


def fit_native(args) -> None:
    """Time the native kernel over grids, windows and batches; fit seconds = pairs-channels *
    NATIVE_PAIR + query-rows * NATIVE_QUERY + NATIVE_CALL (relative least squares), and print
    the measured dense/native ratio next to the model's, so the crossover can be checked."""
    import numpy as np

    from vitfree.ops.dispatch import _window_pairs
    set_threads(args.threads)
    feats, ys, rows = [], [], []
    for g in (8, 14, 24, 32, 48, 64):
        for r in (1, 3, 7):
            w = LayerWindows(r, (g, g))
            b = max(1, 2048 // (g * g))
            for p in (0, 1):
                t = p + g * g
                q, k, v = (torch.randn(b, HEADS, t, DIM) for _ in range(3))
                calls = {'native': lambda: native_window_attention(q, k, v, w, p),
                         'dense': lambda: window_attention(q, k, v, w, p, backend='dense')}
                with torch.no_grad():
                    times = interleaved(calls, reps=3)
                bh = b * HEADS
                feats.append([bh * _window_pairs(w, p) * DIM, bh * t, 1.0])
                ys.append(times['native']['median'])
                rows.append((g, r, b, p, times['dense']['median'] / times['native']['median']))
    x, y = np.array(feats), np.array(ys)
    coef, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
    print(f'NATIVE_PAIR, NATIVE_QUERY, NATIVE_CALL = {coef[0]:.2e}, {coef[1]:.2e}, {max(coef[2], 1e-6):.2e}')
    for (g, r, b, p, ratio), f, yy in zip(rows, feats, ys):
        print(f'grid {g:3d} radius {r} batch {b:3d} prefix {p}: measured dense/native {ratio:5.2f}, '
              f'fit error {100 * (float(np.dot(coef, f)) / yy - 1):+.0f} %')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--quick', action='store_true', help='only N = 196 and 784')
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory subprocesses')
    p.add_argument('--calibrate', action='store_true', help="refit the tiled kernel's tile-choice constants")
    p.add_argument('--fit-native', action='store_true', help="refit the dispatcher's native-kernel costs")
    p.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
    args = p.parse_args(argv)
    if args.calibrate:
        calibrate(args)
        return 0
    if args.fit_native:
        fit_native(args)
        return 0
    res = run(args)
    write_results(args.out, 'attention', res, to_markdown(res))
    return 0


if __name__ == '__main__':
    sys.exit(main())
