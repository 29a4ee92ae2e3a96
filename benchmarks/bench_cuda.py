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

Before timing, the dispatcher needs this GPU's calibration (``vitfree calibrate --device cuda``,
which ``run_cuda.sh calibrate`` runs); if none is measured on this GPU (only the shipped defaults
apply) a quick bfloat16 one is made first (``--recalibrate``: always) and recorded in the results.

Results (JSON + markdown, the GPU named) go to ``$OUT`` when that is set (the device tool),
else ``benchmarks/results/``, as ``cuda_<gpu>.json`` / ``.md``; they are rewritten after each
part, so a run cut short keeps what it measured.  Made to fit in about 8 minutes on an H100.

``--device cpu --smoke`` runs the same code paths on the CPU on tiny sizes (grids 8 and 16, a
2-block ViT-S at 64 and 128 px, a tiny calibration with ``--recalibrate``) in well under a
minute, written as ``smoke_cpu_<cpu>.json`` / ``.md``: a check of the script, not a
measurement (``tests/test_bench_scripts.py`` runs it).  There the CUDA-only methods are
reported as skipped with the reason (``xformers*`` refused by the dispatcher, ``flex`` not
compiled on the CPU, ``natten`` when it does not import), and ``dense`` and ``native`` are added.

  python benchmarks/bench_cuda.py [--quick] [--skip-op] [--skip-models] [--budget 460] [--out DIR]
                                  [--recalibrate] [--device cpu --smoke]
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
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
from vitfree.ops import BackendError, choose_backend, explain_choice, make_query, plan  # noqa: E402
from vitfree.ops import calibration as calib  # noqa: E402
from vitfree.ops.fused_tiles import choose_fused_tile, fused_tiles_attention, tile_batch, tile_bias  # noqa: E402
from vitfree.version import __version__  # noqa: E402
from vitfree.windows import LayerWindows, WindowSpec  # noqa: E402

# the module (``vitfree.ops.calibrate`` the attribute is the function of that name)
measure = importlib.import_module('vitfree.ops.calibrate')

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import _natten  # noqa: E402  (NATTEN if it imports, else None)

GRIDS = (32, 48, 64, 96, 128)
HEADS, DIM, RADIUS = 6, 64, 3
OP_METHODS = ('flash', 'xformers-dense', 'flex', 'tiled', 'xformers', 'sdpa-tiles', 'auto', 'natten')
CPU_EXTRA = ('dense', 'native')  # the CPU's own kernels, timed in a --device cpu run
NOT_ON_CPU = {'flex': 'not compiled on the CPU in this benchmark (FlexAttention is timed on CUDA)'}
IMG_SIZES = (224, 512, 1024)
BATCH = {224: 128, 512: 32, 1024: 8}
LINEAR = ('flex', 'xformers', 'sdpa-tiles', 'tiled')
T0 = time.perf_counter()
_WINDOWS: Dict[int, LayerWindows] = {}  # one instance per grid: its caches (plans, block masks) are shared


@dataclasses.dataclass
class Setup:
    """What a run measures on: the full CUDA run by default; ``--device cpu --smoke``: tiny sizes."""
    device: str = 'cuda'
    smoke: bool = False
    tokens: int = 32768         # op batch = tokens // N
    depth: int = 12             # blocks of the models
    batch: Dict[int, int] = dataclasses.field(default_factory=lambda: dict(BATCH))
    tile_grid: int = 64         # the sdpa-tiles tile sweep
    tile_batch: int = 8

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == 'cuda'

    def op_methods(self) -> tuple:
        return OP_METHODS + (() if self.cuda else CPU_EXTRA)


SMOKE_GRIDS, SMOKE_SIZES = (8, 16), (64, 128)
S = Setup()


def configure(device: str = 'cuda', smoke: bool = False) -> Setup:
    """Set the run's :class:`Setup` (``S``); ``smoke``: tiny sizes that run anywhere in seconds."""
    global S
    S = Setup(device, smoke)
    if smoke:
        S.tokens, S.depth, S.batch, S.tile_grid, S.tile_batch = 256, 2, {64: 2, 128: 2}, 16, 1
    return S


class Skipped(Exception):
    """A method that cannot run here (refused by the dispatcher, a package missing, CUDA only)."""


def windows_for(g: int) -> LayerWindows:
    if g not in _WINDOWS:
        _WINDOWS[g] = LayerWindows(RADIUS, (g, g))
    return _WINDOWS[g]


def log(msg: str) -> None:
    print(f'[{time.perf_counter() - T0:6.0f} s] {msg}', flush=True)


def _timer(fn: Callable[[], Any], min_time: float = 0.05) -> float:
    if S.cuda:
        return measure.cuda_timer(fn, warmup=2, min_time=min_time, max_reps=30)
    return measure.wall_timer(fn, warmup=1, min_time=0.0 if S.smoke else min_time, max_reps=30)


def _sync() -> None:
    if S.cuda:
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if S.cuda:
        torch.cuda.empty_cache()


def _peak(fn: Callable[[], Any], above_base: bool = True) -> Optional[float]:
    """Peak bytes allocated during one more call, above what was allocated before it (``above_base``)
    or in all (``torch.cuda.max_memory_allocated``); None on the CPU (not measured there)."""
    if not S.cuda:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() if above_base else 0
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def _mb(nbytes: Optional[float]) -> Optional[float]:
    return None if nbytes is None else nbytes / 2 ** 20


def _why(e: BaseException) -> str:
    return f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:200]


# ---- (a) the op ---------------------------------------------------------------------------------
def _natten_call(q, k, v, b: int, g: int, backward: bool):
    natten = _natten()
    if natten is None:
        raise Skipped('NATTEN is not installed (or does not import)')
    qn, kn, vn = (x.detach().view(b, HEADS, g, g, DIM).permute(0, 2, 3, 1, 4).contiguous()
                  .requires_grad_(backward) for x in (q, k, v))
    na2d = getattr(natten, 'na2d', None)
    if na2d is not None:  # NATTEN >= 0.20: (B, H, W, heads, d)
        return (lambda: na2d(qn, kn, vn, kernel_size=2 * RADIUS + 1)), (qn, kn, vn)
    from natten.functional import na2d as old  # older: natten.functional.na2d on (B, heads, H, W, d)
    qo, ko, vo = (x.detach().permute(0, 3, 1, 2, 4).contiguous().requires_grad_(backward) for x in (qn, kn, vn))
    return (lambda: old(qo, ko, vo, kernel_size=2 * RADIUS + 1)), (qo, ko, vo)


def _vitfree_call(method: str, q, k, v, windows: LayerWindows, backward: bool):
    """``method`` (a backend name or ``auto``) through the dispatcher: one query, one plan, then the plan
    runs; a backend that cannot run the query raises :class:`BackendError` saying why."""
    if not S.cuda and method in NOT_ON_CPU:
        raise Skipped(NOT_ON_CPU[method])
    with torch.set_grad_enabled(backward):
        query = make_query(q, windows.grid, 0, HEADS, DIM, override=method)
        try:
            p = plan(windows, query)
        except BackendError as e:
            raise Skipped(str(e)) from None
    return lambda: p(q, k, v)


def op_call(method: str, g: int, backward: bool) -> Callable[[], Any]:
    n = g * g
    b = max(1, S.tokens // n)
    windows = windows_for(g)
    q, k, v = (torch.randn(b, HEADS, n, DIM, device=S.device, dtype=torch.bfloat16, requires_grad=backward)
               for _ in range(3))
    leaves = (q, k, v)
    if method == 'flash':
        fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    elif method == 'natten':
        fn, leaves = _natten_call(q, k, v, b, g, backward)
    else:
        fn = _vitfree_call(method, q, k, v, windows, backward)

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


def _op_row(g: int, backward: bool) -> Dict[str, Any]:
    row: Dict[str, Any] = {'grid': g, 'N': g * g, 'batch': max(1, S.tokens // (g * g)),
                           'mode': 'fwd+bwd' if backward else 'fwd', 'ms': {}, 'peak_mb': {}, 'error': {},
                           'skipped': {}}
    probe = torch.empty(row['batch'], HEADS, g * g, DIM, device=S.device, dtype=torch.bfloat16,
                        requires_grad=backward)
    with torch.set_grad_enabled(backward):
        row['auto_picks'] = choose_backend(probe, windows_for(g), 0)
    for method in S.op_methods():
        try:
            call = op_call(method, g, backward)
            row['ms'][method] = _timer(call) * 1e3
            row['peak_mb'][method] = _mb(_peak(call))
        except Skipped as e:  # cannot run here: recorded with the reason
            row['skipped'][method] = str(e)[:300]
        except Exception as e:  # OOM, kernel limits: recorded
            row['error'][method] = _why(e)
        _empty_cache()
    return row


def bench_op(res: Dict[str, Any], grids, budget_end: float) -> None:
    rows = res.setdefault('op', [])
    for g in grids:
        for backward in (False, True):
            if time.perf_counter() > budget_end:
                log(f'budget spent: op at grid {g} skipped')
                return
            row = _op_row(g, backward)
            flash = row['ms'].get('flash')
            log(f'op N={g * g:6d} {row["mode"]:<7} ' + '  '.join(
                f'{m} {row["ms"][m]:.3f}' + (f' ({flash / row["ms"][m]:.1f}x)' if flash else '')
                for m in S.op_methods() if m in row['ms'])
                + (f'  skipped: {sorted(row["skipped"])}' if row['skipped'] else '')
                + (f'  errors: {sorted(row["error"])}' if row['error'] else ''))
            rows.append(row)


def tile_sweep(res: Dict[str, Any]) -> None:
    """``sdpa-tiles`` at N=4096 with a few tile shapes (checks the fused tile chooser)."""
    g = S.tile_grid
    windows = windows_for(g)
    q, k, v = (torch.randn(S.tile_batch, HEADS, g * g, DIM, device=S.device, dtype=torch.bfloat16) for _ in range(3))
    out = {'grid': g, 'batch': S.tile_batch, 'chosen': list(choose_fused_tile(windows, 0)), 'ms': {}}
    for tile in ((4, 4), (8, 8), (4, 16), (8, 16), (16, 8), (16, 16), (16, 32)):
        try:
            batch = tile_batch(windows, 0, S.device, tile)
            bias = tile_bias(windows, 0, S.device, torch.bfloat16, batch.tile)
            with torch.no_grad():
                ms = _timer(lambda: fused_tiles_attention(q, k, v, batch, bias, 0, windows.per_head, DIM ** -0.5)) * 1e3
            out['ms'][f'{tile[0]}x{tile[1]}'] = ms
        except Exception as e:
            out['ms'][f'{tile[0]}x{tile[1]}'] = f'{type(e).__name__}'
    log(f'sdpa-tiles tile sweep at N={g * g}: chosen {out["chosen"]}, {out["ms"]}')
    res['tile_sweep'] = out


# ---- (b) models ---------------------------------------------------------------------------------
def build(img: int, backend: Optional[str]) -> torch.nn.Module:
    import timm
    kw = {} if S.depth == 12 else {'depth': S.depth}
    if backend is None:
        return timm.create_model('vit_small_patch16_224', img_size=img, **kw).to(S.device)
    if not S.cuda and backend in NOT_ON_CPU:
        raise Skipped(NOT_ON_CPU[backend])
    grid = img // 16
    return vitfree.create_winft('vit_small_patch16_224', windows=WindowSpec.uniform(S.depth, grid, RADIUS),
                                img_size=img, attn_backend=None if backend == 'auto' else backend, **kw).to(S.device)


def bench_model(img: int, backend: Optional[str]) -> Dict[str, Any]:
    b = S.batch[img]
    torch.manual_seed(0)
    model = build(img, backend)
    x = torch.randn(b, 3, img, img, device=S.device)
    amp = lambda: torch.autocast(torch.device(S.device).type, dtype=torch.bfloat16)  # noqa: E731
    out: Dict[str, Any] = {'img': img, 'batch': b, 'model': 'vit' if backend is None else f'winft:{backend}'}

    def infer():
        with torch.no_grad(), amp():
            model(x)
    model.eval()
    out['infer_img_s'] = b / _timer(infer, min_time=0.3)
    out['infer_peak_mb'] = _mb(_peak(infer))
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
    out['train_peak_mb'] = _mb(_peak(step, above_base=False))  # model, optimizer state and the step
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
            name = 'vit' if backend is None else f'winft:{backend}'
            try:
                r = bench_model(img, backend)
            except (Skipped, BackendError) as e:  # the backend cannot run this model here
                r = {'img': img, 'model': name, 'skipped': str(e).splitlines()[0][:300] if str(e) else ''}
            except Exception as e:
                r = {'img': img, 'model': name, 'error': _why(e)}
            _empty_cache()
            rows.append(r)
            log(f'model {r["model"]:<16} {img:4d} px: ' + (
                f'skipped: {r["skipped"]}' if 'skipped' in r else r['error'] if 'error' in r else
                f'infer {r["infer_img_s"]:8.1f} img/s, train {r["train_img_s"]:7.1f} img/s, '
                f'train peak {_num(r["train_peak_mb"], ".0f")} MB {r.get("backends", "")}'))


# ---- report -------------------------------------------------------------------------------------
def _ratio(a, b) -> str:
    return f'{a / b:.2f}x' if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else '—'


def _num(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else '—'


def _op_markdown(res: Dict[str, Any]) -> List[str]:
    methods = res.get('config', {}).get('op_methods', OP_METHODS)
    lines = ['## Attention op: 7x7 windows, 6 heads x 64, bfloat16, no prefix token', '',
             '| N | batch | mode | ' + ' | '.join(methods) + ' | auto picks |',
             '|---|---|---|' + '---|' * len(methods) + '---|']
    for r in res['op']:
        cells = []
        for meth in methods:
            if meth in r['ms']:
                cells.append(f'{r["ms"][meth]:.3f} ms ({_ratio(r["ms"].get("flash"), r["ms"][meth])})')
            else:
                cells.append('n/a')
        lines.append(f'| {r["N"]} | {r["batch"]} | {r["mode"]} | ' + ' | '.join(cells) + f' | {r["auto_picks"]} |')
    errs = {(r['N'], r['mode'], k): v for r in res['op'] for k, v in r['error'].items()}
    if errs:
        lines += ['', 'Failed: ' + '; '.join(f'{k[2]} at N={k[0]} {k[1]}: {v}' for k, v in sorted(errs.items())[:12])]
    skipped = {}  # method -> reason (the same at every size, as a rule)
    for r in res['op']:
        for k, v in r.get('skipped', {}).items():
            skipped.setdefault(k, v)
    if skipped:
        lines += ['', 'Not run here: ' + '; '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))]
    lines.append('')
    return lines


def _models_markdown(res: Dict[str, Any]) -> List[str]:
    lines = ['## WinfT-S (uniform 7x7 windows) vs ViT-S, bfloat16 autocast', '',
             '| img | batch | model | backends | infer img/s | vs ViT | train img/s | vs ViT | '
             'train peak MB | vs ViT |', '|---|---|---|---|---|---|---|---|---|---|']
    vit = {r['img']: r for r in res['models'] if r['model'] == 'vit' and 'infer_img_s' in r}
    for r in res['models']:
        if 'infer_img_s' not in r:
            why = f'skipped: {r["skipped"]}' if 'skipped' in r else r.get('error', '')
            lines.append(f'| {r["img"]} | | {r["model"]} | | {why} | | | | | |')
            continue
        v = vit.get(r['img'], {})
        lines.append(f'| {r["img"]} | {r["batch"]} | {r["model"]} | {",".join(r.get("backends", []))} | '
                     f'{r["infer_img_s"]:.1f} | {_ratio(r["infer_img_s"], v.get("infer_img_s"))} | '
                     f'{r["train_img_s"]:.1f} | {_ratio(r["train_img_s"], v.get("train_img_s"))} | '
                     f'{_num(r["train_peak_mb"], ".0f")} | {_ratio(r["train_peak_mb"], v.get("train_peak_mb"))} |')
    lines.append('')
    return lines


def to_markdown(res: Dict[str, Any]) -> str:
    m = res['machine']
    cfg = res.get('config', {})
    title = ('CUDA benchmark' if not cfg.get('smoke') else
             f'bench_cuda.py smoke run (tiny sizes, {cfg.get("device")}; a check of the script, not a measurement)')
    lines = [f'# {title} on {m["gpu"]}', '',
             f'torch {m["torch"]}, CUDA {m["cuda"]}, xformers {m["xformers"]}, NATTEN {m["natten"]}, '
             f'{m["time_utc"]}; costs for `auto`: {res.get("calibration", "none")}.', '',
             'Times are medians in the same run (CUDA events on a GPU); "x" is flash SDPA time / method time '
             '(higher is faster).', '']
    if res.get('op'):
        lines += _op_markdown(res)
    if res.get('tile_sweep'):
        ts = res['tile_sweep']
        lines += [f'`sdpa-tiles` tile sweep at N={ts["grid"] ** 2} (forward, batch {ts.get("batch", 8)}): chosen '
                  f'{ts["chosen"]}; ' + ', '.join(f'{k}: {v:.3f} ms' if isinstance(v, float) else f'{k}: {v}'
                                                  for k, v in ts['ms'].items()), '']
    if res.get('models'):
        lines += _models_markdown(res)
    lines += ['## Targets (issue 11, H100, bfloat16)', ''] + [f'- {t}' for t in targets(res)]
    return '\n'.join(lines) + '\n'


def targets(res: Dict[str, Any]) -> List[str]:
    out = []
    op = {(r['N'], r['mode']): r for r in res.get('op', [])}
    r = op.get((4096, 'fwd'))
    linear = [m for m in LINEAR + ('auto',) if r and m in r['ms']]
    if r and 'flash' in r['ms'] and linear:
        best = min((r['ms'][m], m) for m in linear)
        out.append(f'op at N=4096 >= 5x flash SDPA: best {best[1]} {r["ms"]["flash"] / best[0]:.2f}x '
                   f'({"met" if r["ms"]["flash"] / best[0] >= 5 else "NOT met"})')
        if 'natten' in r['ms']:
            out.append(f'within 1.5x of NATTEN: {best[1]} takes {best[0] / r["ms"]["natten"]:.2f}x NATTEN\'s time '
                       f'({"met" if best[0] / r["ms"]["natten"] <= 1.5 else "NOT met"})')
        else:
            out.append('within 1.5x of NATTEN: not measured (NATTEN does not import here)')
    models = {(r['img'], r['model']): r for r in res.get('models', []) if 'infer_img_s' in r}
    vit, win = models.get((1024, 'vit')), models.get((1024, 'winft:auto'))
    if vit and win and vit.get('train_peak_mb') and win.get('train_peak_mb') is not None:
        inf, tr = win['infer_img_s'] / vit['infer_img_s'], win['train_img_s'] / vit['train_img_s']
        mem = win['train_peak_mb'] / vit['train_peak_mb']
        ok = inf >= 2 and tr >= 2 and mem <= 1
        out.append(f'WinfT-S at 1024 px >= 2x ViT-S images/s with peak memory no higher: inference {inf:.2f}x, '
                   f'training {tr:.2f}x, training peak memory {mem:.2f}x ({"met" if ok else "NOT met"})')
    return out or ['not measured']


def machine() -> Dict[str, Any]:
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
    return {'gpu': calib.device_name(S.device), 'device': S.device, 'torch': torch.__version__,
            'cuda': torch.version.cuda, 'xformers': xf,
            'natten': getattr(nat, '__version__', 'installed') if nat else 'not installed',
            'vitfree': __version__, 'threads': torch.get_num_threads(),
            'time_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}


def results_stem(res: Dict[str, Any]) -> str:
    """``cuda_<gpu>``; a smoke run ``smoke_<device type>_<device>`` (never a real run's file)."""
    cfg = res.get('config', {})
    kind = torch.device(cfg.get('device', 'cuda')).type
    return (('smoke_' if cfg.get('smoke') else '') + kind + '_'
            + re.sub(r'[^a-z0-9]+', '-', res['machine']['gpu'].lower()).strip('-'))


def write(res: Dict[str, Any], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    stem = results_stem(res)
    with open(os.path.join(out_dir, stem + '.json'), 'w') as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, stem + '.md'), 'w') as f:
        f.write(to_markdown(res))


def ensure_calibration(force: bool = False) -> Any:
    """The dispatcher's table for the device; a quick bfloat16 one is made (and installed, not saved)
    when none was measured on it, or always with ``force``.  Returns ``(table, note)``."""
    cal = calib.calibration_for(S.device)
    if cal.measured and not force:
        return cal, cal.describe()
    log(f'{"recalibrating" if cal.measured else "no calibration measured on " + cal.device}: a quick bfloat16 one '
        f'first (`vitfree calibrate --device {torch.device(S.device).type}` makes the full one)')
    shapes = (((8, 8), 2, RADIUS), ((16, 16), 1, RADIUS)) if S.smoke else measure.shapes_for(quick=True)[0]
    cal = measure.calibrate(S.device, shapes=shapes, fp32_shapes=None, save=False, progress=log)
    return cal, f'quick calibration made in this run ({", ".join(cal.backends())})'


def _parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='grids 32 and 64, images 224 and 1024')
    ap.add_argument('--skip-op', action='store_true')
    ap.add_argument('--skip-models', action='store_true')
    ap.add_argument('--budget', type=float, default=460.0, help='seconds; later parts are skipped past it')
    ap.add_argument('--out', default=None, help='default: $OUT if set, else benchmarks/results')
    ap.add_argument('--recalibrate', action='store_true',
                    help='make the quick calibration even when a measured table is found')
    ap.add_argument('--device', default='cuda', help='cuda (default), cuda:1 ...; cpu only with --smoke')
    ap.add_argument('--smoke', action='store_true',
                    help='tiny sizes (grids 8, 16; a 2-block ViT-S at 64, 128 px): checks the script in seconds')
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if torch.device(args.device).type == 'cuda' and not torch.cuda.is_available():
        print('bench_cuda.py needs a CUDA device (or --device cpu --smoke to check the script)', file=sys.stderr)
        return 2
    if torch.device(args.device).type != 'cuda' and not args.smoke:
        print('bench_cuda.py measures on CUDA; --device cpu needs --smoke', file=sys.stderr)
        return 2
    configure(args.device, args.smoke)
    grids = SMOKE_GRIDS if args.smoke else (32, 64) if args.quick else GRIDS
    sizes = SMOKE_SIZES if args.smoke else (224, 1024) if args.quick else IMG_SIZES
    out_dir = args.out or os.environ.get('OUT') or os.path.join(os.path.dirname(__file__), 'results')
    end = T0 + args.budget
    torch.backends.cuda.matmul.allow_tf32 = True
    cal, cal_note = ensure_calibration(args.recalibrate)
    res: Dict[str, Any] = {
        'machine': machine(), 'calibration': cal_note,
        'config': {'device': args.device, 'smoke': args.smoke, 'grids': list(grids), 'img_sizes': list(sizes),
                   'op_methods': list(S.op_methods()), 'depth': S.depth, 'tokens': S.tokens},
        'calibration_fits': {b: {k: dataclasses.asdict(f) for k, f in per.items()} for b, per in cal.fits.items()}}
    log(f'{res["machine"]}')
    g = S.tile_grid
    q = torch.empty(S.tile_batch, HEADS, g * g, DIM, device=S.device, dtype=torch.bfloat16)
    log('\n' + explain_choice(q, windows_for(g), 0))
    try:
        if not args.skip_op:
            bench_op(res, grids, end - (0 if args.skip_models else 200))
            write(res, out_dir)
            tile_sweep(res)
            write(res, out_dir)
        if not args.skip_models:
            bench_models(res, sizes, end)
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
