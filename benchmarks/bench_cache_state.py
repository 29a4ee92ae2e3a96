"""Why the native kernel's time depends on what ran before it: the op at N = 1,024 (batch 1, one
7x7 window per patch and a class token, 6 heads x 64) called back to back, after unmasked SDPA on
the same shape, and after a 64 MB memory sweep (no threads, no attention: only the caches are
emptied), interleaved rounds at 1 and 2 threads.  Writes
``benchmarks/results/cpu-<slug>/cache_state.{json,md}``.  Pause other jobs first (2-thread figures
are wall time)."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_attention import make_call  # noqa: E402
from vitfree.benchmark import cpu_results_dir, interleaved, machine_info, set_threads, write_results  # noqa: E402


def measure(threads: int, reps: int = 15, grid: int = 32) -> dict:
    set_threads(threads)
    native, sdpa = make_call('native', grid, False, 1, 1), make_call('sdpa', grid, False, 1, 1)
    buf = torch.empty(64 * 2 ** 20 // 4)

    def sweep():
        buf.add_(1.0)
    alone = interleaved({'native': native}, reps=reps, warmup=2)['native']['median']
    after_sdpa = interleaved({'sdpa': sdpa, 'native': native}, reps=reps, warmup=2)['native']['median']
    after_sweep = interleaved({'sweep': sweep, 'native': native}, reps=reps, warmup=2)['native']['median']
    return {'threads': threads, 'N': grid * grid, 'alone_s': alone, 'after_sdpa_s': after_sdpa,
            'after_sweep_s': after_sweep}


def main() -> int:
    res = {'machine': machine_info(), 'rows': [measure(t) for t in (1, 2)]}
    lines = ['# The native kernel and the cache state (N = 1,024, batch 1, 7x7 windows, 6 heads x 64)', '',
             f'CPU: {res["machine"]["cpu"]}; medians of 15 interleaved rounds (CPU time at one thread, '
             'wall time at two).', '',
             '| threads | back to back ms | after SDPA ms | after a 64 MB memory sweep ms |', '|---|---|---|---|']
    for r in res['rows']:
        lines.append(f'| {r["threads"]} | {r["alone_s"] * 1e3:.2f} | {r["after_sdpa_s"] * 1e3:.2f} | '
                     f'{r["after_sweep_s"] * 1e3:.2f} |')
    write_results(cpu_results_dir(os.path.join(os.path.dirname(__file__), 'results')), 'cache_state', res,
                  '\n'.join(lines) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
