"""Attention op benchmark: one 7x7 window for every patch and a class token, side by side.

  sdpa       F.scaled_dot_product_attention without a mask (what timm's ViT runs; all pairs)
  sdpa_mask  SDPA with the dense boolean window mask (vitfree's ``dense`` backend)
  tiled      vitfree's ``tiled`` backend (pure PyTorch)
  native     vitfree's ``native`` backend (the compiled blocked kernel, exact window work),
             called through ``vitfree.ops.native_window_attention``
  natten     NATTEN's ``na2d`` with kernel_size 7 (optional: ``pip install 'vitfree[bench]'``;
             only with ``--prefix 0``, NATTEN has no class token; timed in its own rounds, since
             it is 10-100x slower and flushes the caches)
  auto       what vitfree's dispatcher picks (for checking its cost model)

Cases: N = 196 (14x14, batch 8), 1,024 (32x32, batch 1), 4,096 (64x64, batch 1) patches, ViT-S
heads (6 x 64), fp32, forward and forward+backward: time (median of interleaved rounds), the
arithmetic rate (GFLOP/s: 4 x head_dim flops per query-key pair forward, 12 x head_dim forward
+ backward; SDPA over all pairs, the windowed ops over the exact window pairs, so a windowed op
at SDPA's rate is (all pairs / window pairs) x SDPA), the native kernel's useful fraction (exact
pairs / pairs its tiles compute) and, unless ``--no-memory``, peak memory (growth of a fresh
process's resident set during one call).  A second table times the native kernel on every
instruction set the CPU runs (``VITFREE_NATIVE_ISA``) and every tile height
(``VITFREE_NATIVE_TILE_ROWS``): useful pairs per second, which is how the default tile was chosen.

Results go to ``benchmarks/results/cpu-<cpu slug>/attention.{json,md}`` (one folder per CPU model,
named with its family and model numbers); rows an earlier run on the same CPU measured and this
one did not are kept.

  python benchmarks/bench_attention.py [--quick] [--threads 2] [--cases 196 1024 4096] [--out benchmarks/results]
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
from vitfree.benchmark import (cpu_results_dir, interleaved, machine_info, machine_line,  # noqa: E402
                               matmul_peak, merge_rows, peak_memory, set_threads, write_results)
from vitfree.ops import choose_backend, native_window_attention, tiled_window_attention, window_attention  # noqa: E402
from vitfree.ops import native  # noqa: E402
from vitfree.windows import LayerWindows  # noqa: E402

CASES = {196: (14, 8), 1024: (32, 1), 4096: (64, 1)}  # N -> (grid side, batch)
HEADS, DIM, RADIUS = 6, 64, 3
METHODS = ('sdpa', 'sdpa_mask', 'tiled', 'native', 'natten', 'auto')
FLOPS_PER_PAIR = {'fwd': 4 * DIM, 'fwd+bwd': 12 * DIM}
TARGETS = {(4096, 'fwd'): 30.0, (196, 'fwd'): 1.5}  # issue 22: native vs unmasked SDPA, 2 threads


def _natten():
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            import natten  # noqa: F401
        return natten
    except Exception:
        return None


def make_call(method: str, g: int, backward: bool, batch: int = 1, prefix: int = 0, dtype=torch.float32):
    """A zero-argument callable running ``method`` once on inputs of grid ``g``."""
    windows = LayerWindows(RADIUS, (g, g))
    n = prefix + g * g
    q, k, v = (torch.randn(batch, HEADS, n, DIM, dtype=dtype, requires_grad=backward) for _ in range(3))
    mask = windows.mask(prefix)
    if method == 'natten':
        natten = _natten()
        qn, kn, vn = (x.detach().view(batch, HEADS, g, g, DIM).permute(0, 2, 3, 1, 4).contiguous()
                      .requires_grad_(backward) for x in (q, k, v))

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
            'tiled': lambda: tiled_window_attention(q, k, v, windows, prefix),
            'native': lambda: native_window_attention(q, k, v, windows, prefix),
            'auto': lambda: window_attention(q, k, v, windows, prefix),
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


def _memory_setup(method: str, g: int, backward: bool, batch: int, prefix: int) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return textwrap.dedent(f'''
        sys.path.insert(0, {here!r})
        from bench_attention import make_call
        step = make_call({method!r}, {g}, {backward!r}, {batch}, {prefix})
    ''')


def _pairs(g: int, prefix: int, batch: int) -> dict:
    """All pairs (unmasked SDPA), exact window pairs and the native tiles' pairs, of the whole call."""
    w = LayerWindows(RADIUS, (g, g))
    exact, qk, pv = native.native_pair_counts(w, prefix, heads=HEADS)
    assert exact == round(HEADS * native.window_pairs(w, prefix))
    bh = batch * HEADS
    return {'all': bh * (prefix + g * g) ** 2, 'window': batch * exact, 'native_qk': batch * qk,
            'native_pv': batch * pv, 'useful_qk': exact / qk, 'useful_pv': exact / pv}


def _rates(row: dict) -> dict:
    """GFLOP/s of each method: SDPA over all pairs, the windowed ops over the window pairs."""
    per = FLOPS_PER_PAIR[row['mode']]
    return {m: (per * row['pairs']['all' if m == 'sdpa' else 'window'] / t / 1e9 if t else None)
            for m, t in row['time_s'].items()}


def run_case(n: int, backward: bool, methods, args) -> dict:
    g, batch = CASES[n]
    w = LayerWindows(RADIUS, (g, g))
    mode = 'fwd+bwd' if backward else 'fwd'
    q = torch.empty(batch, HEADS, args.prefix + g * g, DIM, requires_grad=backward)
    with torch.set_grad_enabled(backward):
        picked = choose_backend(q, w, args.prefix)
    here = [m for m in methods if not (m == 'natten' and (backward or args.prefix))]  # NATTEN: no backward on CPU
    calls = {m: make_call(m, g, backward, batch, args.prefix) for m in here}
    reps = args.reps if n < 2048 or not backward else max(2, args.reps - 1)
    t0 = time.perf_counter()
    slow = {m: calls.pop(m) for m in ('natten',) if m in calls}
    times = interleaved(calls, reps=reps, warmup=1)
    if slow:
        times.update(interleaved(slow, reps=max(2, reps - 2), warmup=1))
    row = {'N': n, 'grid': g, 'batch': batch, 'threads': torch.get_num_threads(), 'prefix_tokens': args.prefix,
           'mode': mode, 'auto_picks': picked,
           'native_isa': native.native_isa(), 'pairs': _pairs(g, args.prefix, batch),
           'time_s': {m: times[m]['median'] if m in here else None for m in methods},
           'time_min_s': {m: times[m]['min'] if m in here else None for m in methods}}
    row['speedup_vs_sdpa'] = {m: row['time_s']['sdpa'] / row['time_s'][m] for m in here}
    row['gflops'] = _rates(row)
    if not args.no_memory:
        row['peak_mb'] = {m: peak_memory(_memory_setup(m, g, backward, batch, args.prefix),
                                         torch.get_num_threads()).get('peak_mb') if m in here else None
                          for m in methods}
    row['wall_s'] = time.perf_counter() - t0
    print(json.dumps({k: row[k] for k in ('N', 'mode', 'auto_picks', 'speedup_vs_sdpa')}), flush=True)
    return row


def tile_sweep(n: int, backward: bool, args) -> list:
    """The native kernel on every instruction set this CPU runs and every tile height, interleaved."""
    g, batch = CASES[n]
    w = LayerWindows(RADIUS, (g, g))
    call = make_call('native', g, backward, batch, args.prefix)
    configs = {}
    isas = [i for i in native.ISA_FLAGS if not native._missing(i)]
    for isa in isas[:-1] if len(isas) > 1 else isas:  # the generic build only where nothing else runs
        os.environ['VITFREE_NATIVE_ISA'] = isa
        rows = native._kernel().vitfree_window_attention_max_tile_rows()
        for r in range(1, rows + 1):
            configs[(isa, r)] = native.native_pair_counts(w, args.prefix, heads=HEADS, tile_rows=r)

    def with_env(isa, r):
        def f():
            os.environ['VITFREE_NATIVE_ISA'], os.environ['VITFREE_NATIVE_TILE_ROWS'] = isa, str(r)
            call()
        return f
    try:
        times = interleaved({f'{i}/{r}': with_env(i, r) for i, r in configs}, reps=args.reps, warmup=1)
    finally:
        for k in ('VITFREE_NATIVE_ISA', 'VITFREE_NATIVE_TILE_ROWS'):
            os.environ.pop(k, None)
    out = []
    for (isa, r), (exact, qk, pv) in configs.items():
        t = times[f'{isa}/{r}']['median']
        out.append({'N': n, 'batch': batch, 'threads': torch.get_num_threads(), 'mode': 'fwd+bwd' if backward else 'fwd',
                    'isa': isa, 'tile_rows': r,
                    'lanes': 16 if isa == 'avx512' else 8, 'time_s': t, 'useful_qk': exact / qk, 'useful_pv': exact / pv,
                    'useful_pairs_per_s': batch * exact / t,
                    'gflops': FLOPS_PER_PAIR['fwd+bwd' if backward else 'fwd'] * batch * exact / t / 1e9})
    return out


def run(args) -> dict:
    set_threads(args.threads)
    methods = [m for m in METHODS if m != 'natten' or (_natten() is not None and args.prefix == 0)]
    cases = [n for n in args.cases if n in CASES] if not args.quick else [196, 1024]
    results = {'machine': machine_info(), 'config': {'heads': HEADS, 'head_dim': DIM, 'window': 2 * RADIUS + 1,
                                                     'prefix_tokens': args.prefix, 'reps': args.reps},
               'rows': [], 'tiles': []}
    results['machine']['native_isa'] = native.native_isa()
    results['machine']['matmul_gflops_fp32'] = matmul_peak('float32')  # the arithmetic limit, in practice
    if 'natten' not in methods:
        results['note'] = ('natten not timed: ' + ('it has no class token (run with --prefix 0)' if args.prefix else
                                                   'not installed, pip install "vitfree[bench]"'))
    for n in cases:
        for backward in (False, True):
            results['rows'].append(run_case(n, backward, methods, args))
            if not args.no_tiles:
                results['tiles'] += tile_sweep(n, backward, args)
    results['machine']['load_avg_end'] = machine_info()['load_avg_1_5_15']
    return results


def _fmt_ms(t):
    return f'{1e3 * t:.1f}' if t and t >= 0.01 else (f'{1e3 * t:.2f}' if t else 'n/a')


def to_markdown(res: dict) -> str:
    m = res['machine']
    methods = [x for x in METHODS if any(r['time_s'].get(x) for r in res['rows'])]
    lines = [
        '# Attention op: one 7x7 window per patch and a class token',
        '',
        f'{machine_line(m)}. Latest run: {m["threads"]} thread(s), load average at '
        f'start {m["load_avg_1_5_15"]}, at end '
        f'{m.get("load_avg_end")}; rows from earlier runs keep their own machine record (threads, load, matmul peak) '
        f'in attention.json. {res["config"]["heads"]} heads x '
        f'{res["config"]["head_dim"]}, fp32. Time: median of {res["config"]["reps"]} interleaved rounds '
        "(the process's CPU time with one thread, wall time with more). "
        'GFLOP/s: 4 x head_dim flops per query-key pair forward, 12 x head_dim forward+backward; SDPA over all '
        'pairs, native over the exact window pairs; the best 2048 x 2048 fp32 matmul here, same threads: '
        f'{m.get("matmul_gflops_fp32", float("nan")):.0f} GFLOP/s. Useful fraction: exact pairs / pairs the native '
        'tiles compute (Q K^T / P V).',
        '',
        '| N | batch | threads | mode | ' + ' | '.join(f'{x} ms' for x in methods) + ' | SDPA GFLOP/s | native GFLOP/s | '
        'native rate / SDPA rate | native rate / matmul | native vs sdpa | native vs sdpa_mask | native vs tiled | '
        'useful fraction | auto picks |',
        '|' + '---|' * (4 + len(methods) + 9),
    ]
    for r in sorted(res['rows'], key=lambda r: (r['N'], -r.get('threads', 0), r['mode'])):
        t, gf = r['time_s'], r['gflops']
        cells = [f'{r["N"]:,}', str(r['batch']), str(r.get('threads', '')), r['mode']] + [_fmt_ms(t.get(x)) for x in methods]
        mm = r.get('machine', m).get('matmul_gflops_fp32')
        cells += [f'{gf["sdpa"]:.1f}', f'{gf["native"]:.1f}', f'{100 * gf["native"] / gf["sdpa"]:.0f} %',
                  f'{100 * gf["native"] / mm:.0f} %' if mm else '-',
                  f'**{t["sdpa"] / t["native"]:.1f}x**', f'{t["sdpa_mask"] / t["native"]:.1f}x',
                  f'{t["tiled"] / t["native"]:.1f}x',
                  f'{100 * r["pairs"]["useful_qk"]:.0f} / {100 * r["pairs"]["useful_pv"]:.0f} %', r['auto_picks']]
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += ['', 'Targets (issue 22; 2 threads, forward, native vs unmasked SDPA; one-thread rows for reference):', '']
    for (n, mode), goal in TARGETS.items():
        for row in (r for r in res['rows'] if r['N'] == n and r['mode'] == mode):
            got = row['time_s']['sdpa'] / row['time_s']['native']
            lines.append(f'- N = {n:,}, {row.get("threads")} thread(s): {got:.1f}x against a target of {goal:g}x '
                         f'(at 2 threads): **{"met" if got >= goal else "missed"}**')
    if any('peak_mb' in r for r in res['rows']):
        lines += ['', '| N | mode | ' + ' | '.join(f'{x} MiB' for x in methods) + ' |', '|' + '---|' * (2 + len(methods))]
        for r in res['rows']:
            pk = r.get('peak_mb', {})
            lines.append(f'| {r["N"]:,} | {r["mode"]} | ' + ' | '.join(
                f'{pk[x]:.0f}' if isinstance(pk.get(x), (int, float)) else '-' for x in methods) + ' |')
        lines += ['', 'Peak: resident-memory growth of a fresh process during one call.']
    if res.get('tiles'):
        lines += ['', '## Tile shape: the native kernel per instruction set and tile height', '',
                  'A tile is (tile rows) grid rows x (lanes) columns of queries. Useful pairs per second decide; the '
                  'default is the tallest tile (most register reuse) unless this table says otherwise.', '',
                  '| N | threads | mode | ISA | tile | ms | useful Mpairs/s | GFLOP/s | useful fraction (Q K^T / P V) |',
                  '|---|---|---|---|---|---|---|---|---|']
        for r in sorted(res['tiles'], key=lambda r: (r['N'], -r.get('threads', 0), r['mode'], r['isa'], r['tile_rows'])):
            lines.append(f'| {r["N"]:,} | {r.get("threads")} | {r["mode"]} | {r["isa"]} | {r["tile_rows"]} x {r["lanes"]} | '
                         f'{_fmt_ms(r["time_s"])} | {r["useful_pairs_per_s"] / 1e6:.0f} | {r["gflops"]:.1f} | '
                         f'{100 * r["useful_qk"]:.0f} / {100 * r["useful_pv"]:.0f} % |')
    if res.get('note'):
        lines += ['', res['note']]
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

    from vitfree.ops.native import window_pairs
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
                feats.append([bh * window_pairs(w, p) * DIM, bh * t, 1.0])
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
    p.add_argument('--quick', action='store_true', help='only N = 196 and 1,024')
    p.add_argument('--cases', type=int, nargs='+', default=list(CASES), help=f'N among {list(CASES)}')
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--prefix', type=int, default=1, help='class tokens (0 to time NATTEN too)')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory subprocesses')
    p.add_argument('--no-tiles', action='store_true', help='skip the tile-shape table')
    p.add_argument('--calibrate', action='store_true', help="refit the tiled kernel's tile-choice constants")
    p.add_argument('--fit-native', action='store_true', help="refit the dispatcher's native-kernel costs")
    p.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'),
                   help='results root; this CPU writes into its cpu-<slug> folder below it')
    args = p.parse_args(argv)
    bad = [n for n in args.cases if n not in CASES]
    if bad:
        p.error(f'--cases {bad}: expected some of {list(CASES)}')
    if args.calibrate:
        calibrate(args)
        return 0
    if args.fit_native:
        fit_native(args)
        return 0
    res = run(args)
    out = cpu_results_dir(args.out)
    path = os.path.join(out, 'attention.json')
    res = merge_rows(path, res, key=lambda r: (r['N'], r['batch'], r.get('threads'), r['mode']))
    res = merge_rows(path, res, key=lambda r: (r['N'], r['batch'], r.get('threads'), r['mode'], r['isa'], r['tile_rows']),
                     field='tiles')
    write_results(out, 'attention', res, to_markdown(res))
    return 0


if __name__ == '__main__':
    sys.exit(main())
