"""Measuring helpers shared by ``vitfree bench`` and the scripts in ``benchmarks/``.

Timing: compared configurations run interleaved (A, B, A, B, ...) and the median is reported,
so a busy machine slows both alike.  With one thread the clock is the process's CPU time,
which does not count the time other jobs hold the core; with more threads it is wall time.
Peak memory: each configuration runs once in a fresh Python process; the figure is the growth
of the resident set (Linux ``VmHWM`` after resetting it, or ``ru_maxrss``) during one step.
PyTorch's CPU allocator returns large blocks to the OS, so this tracks tensors.
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

__all__ = ['set_threads', 'clock', 'interleaved', 'peak_memory', 'matmul_peak', 'count_flops', 'cpu_info', 'cpu_results_dir',
           'machine_info', 'machine_line', 'merge_rows', 'write_results']


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


# vector extensions worth recording for fp32/bf16 kernels (as /proc/cpuinfo spells them)
CPU_EXTENSIONS = ('sse4_2', 'avx', 'avx2', 'fma', 'f16c', 'avx_vnni', 'avx512f', 'avx512bw', 'avx512dq', 'avx512vl',
                  'avx512_vnni', 'avx512_bf16', 'avx512_fp16', 'amx_tile', 'amx_bf16', 'amx_int8', 'asimd', 'sve')


def cpu_info(cpuinfo: Optional[str] = None) -> Dict[str, Any]:
    """The CPU's model name, vendor, family and model numbers, the vector extensions it has
    (:data:`CPU_EXTENSIONS`) and a slug naming it in results folders (``amd-epyc-family26-model2``:
    the family and model tell CPUs apart that share a model name, as virtual machines often do).
    ``cpuinfo``: the text of /proc/cpuinfo (read when None)."""
    import platform
    if cpuinfo is None:
        try:
            with open('/proc/cpuinfo') as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ''

    def field(name: str) -> str:
        m = re.search(rf'^{name}\s*:\s*(.*)$', cpuinfo, re.MULTILINE)
        return m.group(1).strip() if m else ''

    name = field('model name') or platform.processor() or platform.machine() or 'unknown'
    flags = set((field('flags') or field('Features')).split())
    family, model = field('cpu family'), field('model')
    slug = re.sub(r'\((r|tm|c)\)|\bcpu\b|@.*$', '', name.lower())
    slug = re.sub(r'[^a-z0-9]+', '-', slug).strip('-') or 'unknown'
    if family and model:
        slug += f'-family{family}-model{model}'
    return {'cpu': name, 'vendor': field('vendor_id'), 'family': family, 'model': model,
            'extensions': [x for x in CPU_EXTENSIONS if x in flags], 'slug': slug}


def cpu_results_dir(base: str) -> str:
    """``base/cpu-<slug>``: where this CPU's results go, so another CPU's are never overwritten."""
    return os.path.join(base, 'cpu-' + cpu_info()['slug'])


def machine_info() -> Dict[str, Any]:
    """CPU (model, family, vector extensions), core count, load average, torch version and
    threads, for results files."""
    import platform

    import torch
    cpu = cpu_info()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {'cpu': cpu['cpu'], 'cpu_family': cpu['family'], 'cpu_model': cpu['model'],
            'cpu_extensions': cpu['extensions'], 'cpu_slug': cpu['slug'], 'cores': os.cpu_count(),
            'load_avg_1_5_15': load, 'torch': torch.__version__, 'threads': torch.get_num_threads(),
            'python': platform.python_version(), 'time_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}


def machine_line(m: Dict[str, Any]) -> str:
    """The CPU of a :func:`machine_info` record as results files open with it: model in bold, family,
    model number, vector extensions, cores, torch, and the native kernel's instruction set if recorded."""
    isa = f', native kernel built for {m["native_isa"]}' if m.get('native_isa') else ''
    return (f'**CPU: {m["cpu"]}** (family {m.get("cpu_family")}, model {m.get("cpu_model")}; vector extensions: '
            f'{", ".join(m.get("cpu_extensions", []))}), {m["cores"]} cores, torch {m["torch"]}{isa}')


def merge_rows(path: str, results: Dict[str, Any], key: Callable[[Dict[str, Any]], Any],
               field: str = 'rows') -> Dict[str, Any]:
    """``results`` with the ``field`` rows of an earlier results file ``path`` (same CPU folder)
    that this run did not measure (rows are told apart by ``key(row)``): runs of a few sizes at a
    time add up to one table.  Every row carries the machine record it was measured with."""
    import json
    for r in results.get(field, []):
        r.setdefault('machine', results['machine'])
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return results
    new_keys = {key(r) for r in results.get(field, [])}
    kept = [dict(r, machine=r.get('machine', old.get('machine'))) for r in old.get(field, [])
            if key(r) not in new_keys]
    return dict(results, **{field: kept + results.get(field, [])})


def write_results(out_dir: str, stem: str, results: Dict[str, Any], markdown: str) -> None:
    """``out_dir/stem.json`` (every number) and ``out_dir/stem.md`` (the table), then print the
    table; each file is written whole or not at all."""
    import json
    os.makedirs(out_dir, exist_ok=True)
    for name, text in ((f'{stem}.json', json.dumps(results, indent=1)), (f'{stem}.md', markdown)):
        path = os.path.join(out_dir, name)
        with open(path + '.tmp', 'w') as f:
            f.write(text)
        os.replace(path + '.tmp', path)
    print(markdown)
