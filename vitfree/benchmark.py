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

__all__ = ['set_threads', 'clock', 'interleaved', 'peak_memory', 'count_flops', 'machine_info',
           'write_results']


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
