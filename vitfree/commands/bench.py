"""``vitfree bench``: a WinfT against timm's ViT of the same shape, side by side.

Prints inference images/s (and optionally one training step) per image size, the ratio
WinfT / ViT, the training-step peak memory of each, and which attention backend every block
ran.  The measuring helpers here (interleaved timing, peak memory of a fresh process, matmul
peak, FLOP counts) are also what the scripts in ``benchmarks/`` use.

Timing: the compared configurations run interleaved (A, B, A, B, ...) and the median is
reported, so a busy machine slows both alike.  With one thread (the default) the clock is the
process's CPU time, which does not count the time other jobs hold the core; with more threads
it is wall time.  Peak memory: each configuration runs once in a fresh Python process; the
figure is the growth of the resident set (Linux ``VmHWM`` after resetting it, or
``ru_maxrss``) during one step, i.e. what the step itself needed on top of the model and
inputs.  PyTorch's CPU allocator returns large blocks to the OS, so this tracks tensors.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any, Callable, Dict, List, Optional

__all__ = [
    'write_results',
    'set_threads', 'clock', 'interleaved', 'peak_memory', 'matmul_peak', 'count_flops', 'machine_info',
    'add_parser', 'run',
]


# ---- measuring helpers ------------------------------------------------------------------------
def set_threads(threads: Optional[int]) -> int:
    """Set torch's intra-op threads (None keeps the default); returns the number in force."""
    import torch
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def clock() -> Callable[[], float]:
    """CPU time of this process with one thread (robust to other jobs), else wall time."""
    import torch
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def interleaved(fns: Dict[str, Callable[[], Any]], reps: int = 3, warmup: int = 1,
                budget: Optional[float] = None) -> Dict[str, Dict[str, float]]:
    """Time each callable ``reps`` times in round-robin order after ``warmup`` calls each.

    Returns per name the median, min and all times in seconds.  ``budget`` (seconds) stops
    early, after at least one timed round, when the rounds so far took longer than it."""
    tick = clock()
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for _ in range(reps):
        for name, f in fns.items():
            t0 = tick()
            f()
            times[name].append(tick() - t0)
        if budget is not None and time.perf_counter() - start > budget:
            break
    return {k: {'median': statistics.median(v), 'min': min(v), 'times': v} for k, v in times.items()}


_PEAK_PRELUDE = textwrap.dedent('''
    import json, os, re, resource, sys
    import torch
    torch.set_num_threads({threads})

    def _rss_mb():
        try:
            s = open('/proc/self/status').read()
            return (int(re.search(r'VmRSS:\\s+(\\d+)', s).group(1)) / 1024,
                    int(re.search(r'VmHWM:\\s+(\\d+)', s).group(1)) / 1024)
        except OSError:
            m = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            return m, m

    def _reset_peak():
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            return True
        except OSError:
            return False
''')

_PEAK_MEASURE = textwrap.dedent('''
    _base = _rss_mb()[0]
    _reset = _reset_peak()
    step()
    _rss, _hwm = _rss_mb()
    print('VITFREE_PEAK ' + json.dumps({{'peak_mb': max(_hwm - _base, 0.0), 'baseline_mb': _base,
                                         'hwm_reset': _reset}}))
''')


def peak_memory(setup: str, threads: int = 1, timeout: float = 900) -> Dict[str, Any]:
    """Peak resident-memory growth (MiB) of ``step()`` in a fresh Python process.

    ``setup`` is Python source that builds everything (model, inputs) and defines ``step()``;
    only what ``step()`` allocates on top counts.  Returns ``{'peak_mb', 'baseline_mb', ...}``
    or ``{'error': ...}``."""
    code = _PEAK_PRELUDE.format(threads=int(threads)) + textwrap.dedent(setup) + _PEAK_MEASURE.format()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {'error': f'timed out after {timeout:.0f} s'}
    for line in res.stdout.splitlines():
        if line.startswith('VITFREE_PEAK '):
            return json.loads(line[len('VITFREE_PEAK '):])
    tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
    return {'error': ' | '.join(tail) or f'exit code {res.returncode}'}


def matmul_peak(dtype: str = 'float32', n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of an ``n x n`` matmul in ``dtype`` with the current thread setting."""
    import torch
    dt = getattr(torch, dtype)
    a = torch.randn(n, n).to(dt)
    b = torch.randn(n, n).to(dt)
    tick = clock()
    a @ b
    best = float('inf')
    for _ in range(reps):
        t0 = tick()
        a @ b
        best = min(best, tick() - t0)
    return 2 * n ** 3 / best / 1e9


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations PyTorch's FLOP counter sees while running ``fn`` (matmuls,
    convolutions and SDPA; a tiled attention counts the pairs it really computes)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def machine_info() -> Dict[str, Any]:
    """CPU model, core count, load average, torch version and threads, for results files."""
    import platform

    import torch
    cpu = platform.processor() or ''
    try:
        m = re.search(r'model name\s*:\s*(.+)', open('/proc/cpuinfo').read())
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {'cpu': cpu, 'cores': os.cpu_count(), 'load_avg_1_5_15': load, 'torch': torch.__version__,
            'threads': torch.get_num_threads(), 'python': platform.python_version(),
            'time_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}


# ---- the command ------------------------------------------------------------------------------
def write_results(out_dir: str, stem: str, results: Dict[str, Any], markdown: str) -> None:
    """``out_dir/stem.json`` (every number) and ``out_dir/stem.md`` (the table), then print the table."""
    import json
    import os
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f'{stem}.json'), 'w') as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, f'{stem}.md'), 'w') as f:
        f.write(markdown)
    print(markdown)


def add_parser(sub) -> None:
    p = sub.add_parser('bench', help="a WinfT against timm's ViT of the same shape: images/s, memory, backends",
                       description=__doc__.split('\n\n')[0])
    p.add_argument('model', nargs='?', default='vit_small_patch16_224',
                   help='timm ViT/DeiT architecture to compare against (default: vit_small_patch16_224)')
    p.add_argument('--windows', default=None,
                   help='window spec (shipped name or .yaml/.json file); default: --radius in every block')
    p.add_argument('--radius', type=int, default=3, help='uniform window radius when --windows is not given (3 = 7x7)')
    p.add_argument('--img-size', type=int, nargs='+', default=[224, 448], help='image sizes in pixels')
    p.add_argument('--batch', type=int, default=None, help='images per batch (default: fewer for larger images)')
    p.add_argument('--train', action='store_true', help='also time one training step and measure its peak memory')
    p.add_argument('--bf16', action='store_true', help='run under torch.autocast(bfloat16)')
    p.add_argument('--reps', type=int, default=3, help='timed rounds (interleaved), median reported')
    p.add_argument('--threads', type=int, default=1, help='torch threads (1: CPU-time clock; default 1)')
    p.add_argument('--json', default=None, help='also write the results to this JSON file')
    p.set_defaults(func=run, outputs=[('json', 'file', ('.json',))])


def default_batch(img_size: int) -> int:
    """Images per batch that keep one step around a second on a CPU core for ViT-S."""
    return max(1, min(16, (448 // img_size) ** 2 * 4)) if img_size <= 448 else 1


def _build(model: str, img: int, windows: Any, radius: int):
    import timm

    import vitfree
    from vitfree.windows import WindowSpec
    vit = timm.create_model(model, img_size=img, num_classes=1000)
    depth, grid = len(vit.blocks), tuple(vit.patch_embed.grid_size)
    spec = windows if windows is not None else WindowSpec.uniform(depth, grid, radius)
    winft = vitfree.create_winft(model, windows=spec, img_size=img, num_classes=1000)
    winft.load_state_dict(vit.state_dict())
    return vit, winft


def run(args) -> int:
    import torch

    from ._common import CommandError, check_model_name
    for name in ('img_size', 'batch', 'reps', 'threads', 'radius'):
        values = getattr(args, name)
        for v in (values if isinstance(values, list) else [values]):
            if v is not None and v < (0 if name == 'radius' else 1):
                raise CommandError(f'--{name.replace("_", "-")} must be >= {0 if name == "radius" else 1}, got {v}')
    check_model_name(args.model)
    set_threads(args.threads)
    rows = []
    amp = torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.bf16)
    for img in args.img_size:
        batch = args.batch or default_batch(img)
        vit, winft = _build(args.model, img, args.windows, args.radius)
        vit.eval(), winft.eval()
        x = torch.randn(batch, 3, img, img)

        def infer(m):
            with torch.no_grad(), amp:
                m(x)
        res = interleaved({'vit': lambda: infer(vit), 'winft': lambda: infer(winft)}, reps=args.reps)
        row = {'img_size': img, 'batch': batch, 'vit_img_s': batch / res['vit']['median'],
               'winft_img_s': batch / res['winft']['median'], 'backends': winft.attn_backends()}
        row['speedup'] = row['winft_img_s'] / row['vit_img_s']
        if args.train:
            def train(m):
                m.train()
                with amp:
                    loss = m(x).float().logsumexp(-1).mean()
                loss.backward()
                m.zero_grad(set_to_none=True)
            tr = interleaved({'vit': lambda: train(vit), 'winft': lambda: train(winft)}, reps=args.reps)
            row['train_speedup'] = tr['vit']['median'] / tr['winft']['median']
            for name, spec in (('vit', None), ('winft', args.windows)):
                setup = _train_setup(args.model, img, batch, name == 'winft', spec, args.radius, args.bf16)
                row[f'{name}_train_peak_mb'] = peak_memory(setup, args.threads).get('peak_mb')
            if row['vit_train_peak_mb'] and row['winft_train_peak_mb']:
                row['train_memory_ratio'] = row['winft_train_peak_mb'] / row['vit_train_peak_mb']
        rows.append(row)
        _print_row(args.model, row)
    if args.json:
        text = json.dumps({'machine': machine_info(), 'model': args.model, 'rows': rows}, indent=1)
        try:
            with open(args.json, 'w') as f:
                f.write(text)
        except OSError as e:
            raise OSError(e.errno, e.strerror, args.json) from None
    return 0


def _train_setup(model: str, img: int, batch: int, winft: bool, windows: Any, radius: int, bf16: bool) -> str:
    return textwrap.dedent(f'''
        import timm, vitfree
        from vitfree.windows import WindowSpec
        if {winft!r}:
            vit = timm.create_model({model!r}, img_size={img})
            spec = {windows!r} or WindowSpec.uniform(len(vit.blocks), tuple(vit.patch_embed.grid_size), {radius})
            m = vitfree.create_winft({model!r}, windows=spec, img_size={img})
            del vit
        else:
            m = timm.create_model({model!r}, img_size={img})
        m.train()
        x = torch.randn({batch}, 3, {img}, {img})

        def step():
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled={bf16!r}):
                loss = m(x).float().logsumexp(-1).mean()
            loss.backward()
    ''')


def _print_row(model: str, row: Dict[str, Any]) -> None:
    used = sorted(set(row['backends']))
    line = (f'{model} @ {row["img_size"]}px, batch {row["batch"]}: ViT {row["vit_img_s"]:.2f} img/s, '
            f'WinfT {row["winft_img_s"]:.2f} img/s ({row["speedup"]:.2f}x)')
    if 'train_speedup' in row:
        line += f'; train step {row["train_speedup"]:.2f}x'
        if row.get('train_memory_ratio'):
            line += (f', peak memory {row["winft_train_peak_mb"]:.0f} / {row["vit_train_peak_mb"]:.0f} MiB '
                     f'({row["train_memory_ratio"]:.2f}x)')
    print(line + f'; backends: {", ".join(used)}')
