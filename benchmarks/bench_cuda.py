"""CUDA benchmark: window attention against flash attention and NATTEN, and WinfT-S against ViT-S.

Part (a), the attention op: one 7x7 window for every patch, ViT-S heads (6 x 64), bfloat16, no
prefix token, N = 1,024 ... 16,384 patches (grids 32 ... 128), batch 32768 // N, forward and
forward+backward, CUDA-event medians and peak memory of:

  flash          F.scaled_dot_product_attention without a mask (what timm's ViT runs; all pairs)
  xformers-dense vitfree's ``xformers-dense`` (xformers, the whole mask as a bias)
  flex           vitfree's ``flex`` (compiled FlexAttention, block-sparse mask, tile-major tokens)
  tiled          vitfree's ``tiled`` (batched matmuls over tiles)
  xformers       vitfree's ``xformers`` (xformers over batched tiles, per-tile biases)
  sdpa-tiles     vitfree's ``sdpa-tiles`` (the same tiles on torch SDPA)
  auto           what vitfree's dispatcher picks (named in the table)
  natten         NATTEN's fused ``na2d`` with kernel_size 7, when a NATTEN build imports

Part (b), whole models: timm's ``vit_small_patch16_224`` at img_size 224, 512 and 1024 against
the WinfT of the same shape with uniform 7x7 windows (backend ``auto``; at 1024 px also each
linear backend by name), bfloat16 autocast, inference (``no_grad``) images/s and one training
step (forward, backward, AdamW) images/s and peak memory (``torch.cuda.max_memory_allocated``).
Random weights: the windows, not the weights, decide the cost.

Before timing, the dispatcher needs this GPU's calibration (``python -m vitfree.ops.calibrate``);
if none is found a quick bfloat16 one is made first and recorded in the results.

Results (JSON + markdown, the GPU named) go to ``$OUT`` when that is set (the device tool),
else ``benchmarks/results/``, as ``cuda_<gpu>.json`` / ``.md``; they are rewritten after each
part, so a run cut short keeps what it measured.  Made to fit in about 8 minutes on an H100.

  python benchmarks/bench_cuda.py [--quick] [--skip-op] [--skip-models] [--budget 460] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import vitfree  # noqa: E402
from vitfree.ops import calibrate as measure, calibration as calib  # noqa: E402
from vitfree.ops import choose_backend, run_backend  # noqa: E402
from vitfree.ops.dispatch import _BACKENDS, explain_choice, prepare_backend  # noqa: E402
from vitfree.version import __version__  # noqa: E402
from vitfree.windows import LayerWindows, WindowSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import _natten  # noqa: E402  (NATTEN if it imports, else None)

GRIDS = (32, 48, 64, 96, 128)
HEADS, DIM, RADIUS = 6, 64, 3
OP_METHODS = ('flash', 'xformers-dense', 'flex', 'tiled', 'xformers', 'sdpa-tiles', 'auto', 'natten')
IMG_SIZES = (224, 512, 1024)
BATCH = {224: 128, 512: 32, 1024: 8}
LINEAR = ('flex', 'xformers', 'sdpa-tiles', 'tiled')
T0 = time.perf_counter()
_WINDOWS: Dict[int, LayerWindows] = {}  # one instance per grid: its caches (plans, block masks) are shared


def windows_for(g: int) -> LayerWindows:
    if g not in _WINDOWS:
        _WINDOWS[g] = LayerWindows(RADIUS, (g, g))
    return _WINDOWS[g]


def log(msg: str) -> None:
    print(f'[{time.perf_counter() - T0:6.0f} s] {msg}', flush=True)


def _timer(fn: Callable[[], Any], min_time: float = 0.05) -> float:
    return measure.cuda_timer(fn, warmup=2, min_time=min_time, max_reps=30)


def _peak(fn: Callable[[], Any]) -> float:
    """Peak bytes allocated during one more call, above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


# ---- (a) the op ---------------------------------------------------------------------------------
def op_call(method: str, g: int, backward: bool) -> Callable[[], Any]:
    n = g * g
    b = max(1, 32768 // n)
    windows = windows_for(g)
    q, k, v = (torch.randn(b, HEADS, n, DIM, device='cuda', dtype=torch.bfloat16, requires_grad=backward)
               for _ in range(3))
    leaves = (q, k, v)
    if method == 'flash':
        fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    elif method == 'natten':
        natten = _natten()
        if natten is None:
            raise RuntimeError('NATTEN is not installed (or does not import)')
        qn, kn, vn = (x.detach().view(b, HEADS, g, g, DIM).permute(0, 2, 3, 1, 4).contiguous()
                      .requires_grad_(backward) for x in (q, k, v))
        leaves = (qn, kn, vn)
        na2d = getattr(natten, 'na2d', None)
        if na2d is not None:  # NATTEN >= 0.20: (B, H, W, heads, d)
            fn = lambda: na2d(qn, kn, vn, kernel_size=2 * RADIUS + 1)  # noqa: E731
        else:  # older: natten.functional.na2d on (B, heads, H, W, d)
            from natten.functional import na2d as old
            qo, ko, vo = (x.detach().permute(0, 3, 1, 2, 4).contiguous().requires_grad_(backward) for x in leaves)
            leaves = (qo, ko, vo)
            fn = lambda: old(qo, ko, vo, kernel_size=2 * RADIUS + 1)  # noqa: E731
    else:
        name = choose_backend(q, windows, 0) if method == 'auto' else method
        reason = _BACKENDS[name].supports(q, windows)
        if reason is not None:
            raise RuntimeError(reason)
        prepare_backend(name, windows, 0, q.device, q.dtype)
        fn = lambda: run_backend(name, q, k, v, windows, 0)  # noqa: E731

    def call():
        if backward:
            out = fn()
            out.backward(torch.ones_like(out))
            for x in leaves:
                x.grad = None
        else:
            with torch.no_grad():
                fn()
    return call


def bench_op(res: Dict[str, Any], grids, budget_end: float) -> None:
    rows = res.setdefault('op', [])
    for g in grids:
        for backward in (False, True):
            if time.perf_counter() > budget_end:
                log(f'budget spent: op at grid {g} skipped')
                return
            row: Dict[str, Any] = {'grid': g, 'N': g * g, 'batch': max(1, 32768 // (g * g)),
                                   'mode': 'fwd+bwd' if backward else 'fwd', 'ms': {}, 'peak_mb': {}, 'error': {}}
            probe = torch.empty(row['batch'], HEADS, g * g, DIM, device='cuda', dtype=torch.bfloat16,
                                requires_grad=backward)
            with torch.set_grad_enabled(backward):
                row['auto_picks'] = choose_backend(probe, windows_for(g), 0)
            for method in OP_METHODS:
                try:
                    call = op_call(method, g, backward)
                    row['ms'][method] = _timer(call) * 1e3
                    row['peak_mb'][method] = _peak(call) / 2 ** 20
                except Exception as e:  # OOM, missing package, kernel limits: recorded
                    row['error'][method] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:200]
                torch.cuda.empty_cache()
            flash = row['ms'].get('flash')
            log(f'op N={g * g:6d} {row["mode"]:<7} ' + '  '.join(
                f'{m} {row["ms"][m]:.3f}' + (f' ({flash / row["ms"][m]:.1f}x)' if flash else '')
                for m in OP_METHODS if m in row['ms']) + (f'  errors: {sorted(row["error"])}' if row['error'] else ''))
            rows.append(row)


def tile_sweep(res: Dict[str, Any]) -> None:
    """``sdpa-tiles`` at N=4096 with a few tile shapes (checks the fused tile chooser)."""
    from vitfree.ops.fused_tiles import choose_fused_tile, fused_tiles_attention
    g = 64
    windows = windows_for(g)
    q, k, v = (torch.randn(8, HEADS, g * g, DIM, device='cuda', dtype=torch.bfloat16) for _ in range(3))
    out = {'grid': g, 'chosen': list(choose_fused_tile(windows, 0)), 'ms': {}}
    for tile in ((4, 4), (8, 8), (4, 16), (8, 16), (16, 8), (16, 16), (16, 32)):
        try:
            with torch.no_grad():
                ms = _timer(lambda: fused_tiles_attention(q, k, v, windows, 0, tile=tile)) * 1e3
            out['ms'][f'{tile[0]}x{tile[1]}'] = ms
        except Exception as e:
            out['ms'][f'{tile[0]}x{tile[1]}'] = f'{type(e).__name__}'
    log(f'sdpa-tiles tile sweep at N=4096: chosen {out["chosen"]}, {out["ms"]}')
    res['tile_sweep'] = out


# ---- (b) models ---------------------------------------------------------------------------------
def build(img: int, backend: Optional[str]) -> torch.nn.Module:
    import timm
    if backend is None:
        return timm.create_model('vit_small_patch16_224', img_size=img).cuda()
    grid = img // 16
    return vitfree.create_winft('vit_small_patch16_224', windows=WindowSpec.uniform(12, grid, RADIUS), img_size=img,
                                attn_backend=None if backend == 'auto' else backend).cuda()


def bench_model(img: int, backend: Optional[str]) -> Dict[str, Any]:
    b = BATCH[img]
    torch.manual_seed(0)
    model = build(img, backend)
    x = torch.randn(b, 3, img, img, device='cuda')
    amp = lambda: torch.autocast('cuda', dtype=torch.bfloat16)  # noqa: E731
    out: Dict[str, Any] = {'img': img, 'batch': b, 'model': 'vit' if backend is None else f'winft:{backend}'}

    def infer():
        with torch.no_grad(), amp():
            model(x)
    model.eval()
    out['infer_img_s'] = b / _timer(infer, min_time=0.3)
    out['infer_peak_mb'] = _peak(infer) / 2 ** 20
    if backend is not None:
        out['backends'] = sorted(set(model.attn_backends()))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with amp():
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out['train_img_s'] = b / _timer(step, min_time=0.3)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    out['train_peak_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
    if backend is not None:
        out['train_backends'] = sorted(set(model.attn_backends()))
    return out


def bench_models(res: Dict[str, Any], sizes, budget_end: float) -> None:
    rows = res.setdefault('models', [])
    for img in sizes:
        for backend in [None, 'auto'] + (list(LINEAR) if img == max(sizes) else []):
            if time.perf_counter() > budget_end:
                log(f'budget spent: model {backend} at {img} px skipped')
                return
            try:
                r = bench_model(img, backend)
            except Exception as e:
                r = {'img': img, 'model': 'vit' if backend is None else f'winft:{backend}',
                     'error': f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:200]}
                torch.cuda.empty_cache()
            torch.cuda.empty_cache()
            rows.append(r)
            log(f'model {r["model"]:<16} {img:4d} px: ' + (r['error'] if 'error' in r else
                f'infer {r["infer_img_s"]:8.1f} img/s, train {r["train_img_s"]:7.1f} img/s, '
                f'train peak {r["train_peak_mb"]:8.0f} MB {r.get("backends", "")}'))


# ---- report -------------------------------------------------------------------------------------
def _ratio(a, b) -> str:
    return f'{a / b:.2f}x' if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else '—'


def to_markdown(res: Dict[str, Any]) -> str:
    m = res['machine']
    lines = [f'# CUDA benchmark on {m["gpu"]}', '',
             f'torch {m["torch"]}, CUDA {m["cuda"]}, xformers {m["xformers"]}, NATTEN {m["natten"]}, '
             f'{m["time_utc"]}; costs for `auto`: {res.get("calibration", "none")}.', '',
             'Times are CUDA-event medians in the same run; "x" is flash SDPA time / method time (higher is faster).', '']
    if res.get('op'):
        lines += ['## Attention op: 7x7 windows, 6 heads x 64, bfloat16, no prefix token', '',
                  '| N | batch | mode | ' + ' | '.join(OP_METHODS) + ' | auto picks |',
                  '|---|---|---|' + '---|' * len(OP_METHODS) + '---|']
        for r in res['op']:
            cells = []
            for meth in OP_METHODS:
                if meth in r['ms']:
                    cells.append(f'{r["ms"][meth]:.3f} ms ({_ratio(r["ms"].get("flash"), r["ms"][meth])})')
                else:
                    cells.append('n/a')
            lines.append(f'| {r["N"]} | {r["batch"]} | {r["mode"]} | ' + ' | '.join(cells) + f' | {r["auto_picks"]} |')
        errs = {(r['N'], r['mode'], k): v for r in res['op'] for k, v in r['error'].items()}
        if errs:
            lines += ['', 'Not measured: ' + '; '.join(f'{k[2]} at N={k[0]} {k[1]}: {v}' for k, v in
                                                       sorted(errs.items())[:12])]
        lines.append('')
    if res.get('tile_sweep'):
        ts = res['tile_sweep']
        lines += [f'`sdpa-tiles` tile sweep at N=4096 (forward, batch 8): chosen {ts["chosen"]}; ' +
                  ', '.join(f'{k}: {v:.3f} ms' if isinstance(v, float) else f'{k}: {v}' for k, v in ts['ms'].items()),
                  '']
    if res.get('models'):
        lines += ['## WinfT-S (uniform 7x7 windows) vs ViT-S, bfloat16 autocast', '',
                  '| img | batch | model | backends | infer img/s | vs ViT | train img/s | vs ViT | '
                  'train peak MB | vs ViT |', '|---|---|---|---|---|---|---|---|---|---|']
        vit = {r['img']: r for r in res['models'] if r['model'] == 'vit' and 'error' not in r}
        for r in res['models']:
            if 'error' in r:
                lines.append(f'| {r["img"]} | | {r["model"]} | | {r["error"]} | | | | | |')
                continue
            v = vit.get(r['img'], {})
            lines.append(f'| {r["img"]} | {r["batch"]} | {r["model"]} | {",".join(r.get("backends", []))} | '
                         f'{r["infer_img_s"]:.1f} | {_ratio(r["infer_img_s"], v.get("infer_img_s"))} | '
                         f'{r["train_img_s"]:.1f} | {_ratio(r["train_img_s"], v.get("train_img_s"))} | '
                         f'{r["train_peak_mb"]:.0f} | {_ratio(r["train_peak_mb"], v.get("train_peak_mb"))} |')
        lines.append('')
    lines += ['## Targets (issue 11, H100, bfloat16)', ''] + [f'- {t}' for t in targets(res)]
    return '\n'.join(lines) + '\n'


def targets(res: Dict[str, Any]) -> List[str]:
    out = []
    op = {(r['N'], r['mode']): r for r in res.get('op', [])}
    r = op.get((4096, 'fwd'))
    if r and 'flash' in r['ms']:
        best = min((r['ms'][m], m) for m in LINEAR + ('auto',) if m in r['ms'])
        out.append(f'op at N=4096 >= 5x flash SDPA: best {best[1]} {r["ms"]["flash"] / best[0]:.2f}x '
                   f'({"met" if r["ms"]["flash"] / best[0] >= 5 else "NOT met"})')
        if 'natten' in r['ms']:
            out.append(f'within 1.5x of NATTEN: {best[1]} takes {best[0] / r["ms"]["natten"]:.2f}x NATTEN\'s time '
                       f'({"met" if best[0] / r["ms"]["natten"] <= 1.5 else "NOT met"})')
        else:
            out.append('within 1.5x of NATTEN: not measured (NATTEN does not import here)')
    models = {(r['img'], r['model']): r for r in res.get('models', []) if 'error' not in r}
    vit, win = models.get((1024, 'vit')), models.get((1024, 'winft:auto'))
    if vit and win:
        inf, tr = win['infer_img_s'] / vit['infer_img_s'], win['train_img_s'] / vit['train_img_s']
        mem = win['train_peak_mb'] / vit['train_peak_mb']
        ok = inf >= 2 and tr >= 2 and mem <= 1
        out.append(f'WinfT-S at 1024 px >= 2x ViT-S images/s with peak memory no higher: inference {inf:.2f}x, '
                   f'training {tr:.2f}x, training peak memory {mem:.2f}x ({"met" if ok else "NOT met"})')
    return out or ['not measured']


def machine(res_calibration: str) -> Dict[str, Any]:
    xf = 'not installed'
    try:
        from vitfree.ops.xformers_attn import import_xformers
        mod, reason = import_xformers()
        if mod is not None:
            import xformers
            xf = xformers.__version__
        else:
            xf = reason.split(';')[0]
    except Exception as e:  # pragma: no cover - a broken install
        xf = f'error {e}'
    nat = _natten()
    return {'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__, 'cuda': torch.version.cuda,
            'xformers': xf, 'natten': getattr(nat, '__version__', 'installed') if nat else 'not installed',
            'vitfree': __version__,
            'time_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}


def write(res: Dict[str, Any], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    stem = 'cuda_' + re.sub(r'[^a-z0-9]+', '-', res['machine']['gpu'].lower()).strip('-')
    with open(os.path.join(out_dir, stem + '.json'), 'w') as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, stem + '.md'), 'w') as f:
        f.write(to_markdown(res))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='grids 32 and 64, images 224 and 1024')
    ap.add_argument('--skip-op', action='store_true')
    ap.add_argument('--skip-models', action='store_true')
    ap.add_argument('--budget', type=float, default=460.0, help='seconds; later parts are skipped past it')
    ap.add_argument('--out', default=None, help='default: $OUT if set, else benchmarks/results')
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print('bench_cuda.py needs a CUDA device', file=sys.stderr)
        return 2
    out_dir = args.out or os.environ.get('OUT') or os.path.join(os.path.dirname(__file__), 'results')
    end = T0 + args.budget
    torch.backends.cuda.matmul.allow_tf32 = True
    cal = calib.calibration_for('cuda')
    if cal is None:
        log('no calibration for this GPU: a quick bfloat16 one first (python -m vitfree.ops.calibrate makes '
            'the full one)')
        cal = measure.calibrate('cuda', shapes=measure.QUICK_SHAPES, fp32_shapes=None, save=False,
                              budget_s=120, progress=log)
        cal_note = f'quick calibration made in this run ({", ".join(cal.backends())})'
    else:
        cal_note = cal.describe()
    res: Dict[str, Any] = {'machine': machine(cal_note), 'calibration': cal_note, 'calibration_fits': {
        b: {k: vars(f) for k, f in per.items()} for b, per in cal.fits.items()}}
    log(f'{res["machine"]}')
    q = torch.empty(8, HEADS, 4096, DIM, device='cuda', dtype=torch.bfloat16)
    log('\n' + explain_choice(q, windows_for(64), 0))
    try:
        if not args.skip_op:
            bench_op(res, (32, 64) if args.quick else GRIDS, end - (0 if args.skip_models else 200))
            write(res, out_dir)
            tile_sweep(res)
            write(res, out_dir)
        if not args.skip_models:
            bench_models(res, (224, 1024) if args.quick else IMG_SIZES, end)
    except Exception:
        traceback.print_exc()
        res['error'] = traceback.format_exc()[-2000:]
    try:
        from torch._dynamo.utils import counters
        res['dynamo_stats'] = {k: dict(v) for k, v in counters.items() if k in ('stats', 'recompiles')}
    except Exception:
        pass
    write(res, out_dir)
    print(to_markdown(res))
    log(f'wrote {out_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
