"""The new families on the CPU, side by side in one run: inference images/s and peak memory.

* ``dinov3``: DINOv3 ViT-S/16 (timm's ``vit_small_patch16_dinov3``: class + 4 register tokens, rotary
  embedding, any image size) at 224, 512 and 1024 px: timm's model against the WinfT with a 7x7 window
  (radius 3) around every patch in every block.
* ``sam``: SAM's ViT-B/16 image encoder (timm's ``samvit_base_patch16``) at 1024 px: timm's encoder
  (14x14 partition windows, global blocks 2, 5, 8, 11), the WinfT with SAM's own pattern
  (``configs/winft_prior_sam_d12_g64.yaml``), and the WinfT with per-patch windows of the same area
  (14x14 = 196 patches: 7 up, 6 down, 7 left, 6 right) in every block and no global block
  (``configs/winft_local_sam_d12_g64.yaml``).  The largest output difference of the SAM-pattern WinfT
  from timm's encoder is recorded too (SAM also attends to the zero padding of the cells cut by the
  64x64 grid edge; a WinfT never does).

Random weights (the windows, not the weights, decide the cost); batch 1; the compared models run
interleaved (median of ``--reps`` rounds after a warm-up; one thread: process CPU time, more: wall
time).  Peak memory: the growth of the resident set during one forward, each model in a fresh process
(:func:`vitfree.benchmark.peak_memory`).  Results: ``benchmarks/results/cpu-<cpu>/families.{json,md}``.

  python benchmarks/bench_families.py [--parts dinov3 sam] [--reps 2] [--threads 1] [--sizes 224 512 1024]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Dict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from vitfree.benchmark import (cpu_results_dir, interleaved, machine_info, machine_line, peak_memory,  # noqa: E402
                               set_threads, write_results)

DINO = 'vit_small_patch16_dinov3'
SAM = 'samvit_base_patch16'

# what a fresh process builds for each configuration: ``model`` and ``x``
BUILD = {
    'timm': 'timm.create_model({base!r}, img_size={img})',
    'winft_7x7': 'vitfree.create_winft({base!r}, windows=WindowSpec.uniform(12, {grid}, 3), img_size={img})',
    'winft_sam_pattern': "vitfree.create_winft({base!r}, windows='winft_prior_sam_d12_g64', img_size={img})",
    'winft_local_196': "vitfree.create_winft({base!r}, windows='winft_local_sam_d12_g64', img_size={img})",
}


def _setup(base: str, variant: str, img: int) -> str:
    model = BUILD[variant].format(base=base, img=img, grid=img // 16)
    return (f'import warnings; warnings.simplefilter("ignore")\nimport timm, torch, vitfree\n'
            f'from vitfree import WindowSpec\ntorch.manual_seed(0)\nmodel = {model}.eval()\n'
            f'x = torch.randn(1, 3, {img}, {img})\n'
            f'def step():\n    with torch.no_grad():\n        model(x)\n')


def _build(base: str, variant: str, img: int):
    scope: Dict = {}
    exec(_setup(base, variant, img), scope)  # noqa: S102 - our own source, the same as the memory runs
    return scope['model'], scope['x']


def bench(base: str, variants, img: int, reps: int, threads: int) -> Dict:
    """One row: the variants of one model at one size, timed interleaved, then their peak memory."""
    t0 = time.perf_counter()
    built = {v: _build(base, v, img) for v in variants}

    def infer(v):
        model, x = built[v]
        with torch.no_grad():
            return model(x)

    times = interleaved({v: (lambda v=v: infer(v)) for v in variants}, reps=reps)
    row = {'model': base, 'img_size': img, 'grid': img // 16, 'batch': 1, 'threads': threads,
           'infer_s': {v: times[v]['median'] for v in variants},
           'images_per_s': {v: 1.0 / times[v]['median'] for v in variants},
           'backends': {v: sorted(set(built[v][0].attn_backends())) for v in variants if v != 'timm'}}
    if 'winft_sam_pattern' in built:
        with torch.no_grad():
            ref, got = infer('timm'), infer('winft_sam_pattern')
        row['sam_pattern_max_abs_diff'] = float((got - ref).abs().max())
        row['sam_output_max_abs'] = float(ref.abs().max())
    built.clear()  # free the models before the memory runs
    row['peak_mb'] = {}
    for v in variants:
        peak = peak_memory(_setup(base, v, img), threads=threads)
        row['peak_mb'][v] = peak.get('peak_mb', peak.get('error'))
    row['wall_s'] = time.perf_counter() - t0
    print(f'{base} {img} px: ' + ', '.join(f'{v} {row["images_per_s"][v]:.3f} img/s {row["peak_mb"][v]} MiB'
                                          for v in variants), flush=True)
    return row


def _mb(v) -> str:
    return f'{v:.0f}' if isinstance(v, (int, float)) else str(v)


def to_markdown(res: Dict) -> str:
    m = res['machine']
    out = ['# New families on the CPU: DINOv3-S and SAM ViT-B against timm', '',
           f'{machine_line(m)}, {res["threads"]} thread(s); load average at start '
           f'{m["load_avg_1_5_15"]}, at the end {m.get("load_avg_end")}. Random weights, batch 1, inference; the '
           f'models of one row ran interleaved, medians of {res["reps"]} rounds after a warm-up '
           f'({"process CPU time" if res["threads"] == 1 else "wall time"}). Peak memory: growth of the resident '
           'set during one forward, each model in a fresh process.', '']
    dino = [r for r in res['rows'] if r['model'] == DINO]
    if dino:
        out += ['## DINOv3 ViT-S/16: timm against the WinfT with a 7x7 window in every block', '',
                '| px | patches | timm img/s | WinfT img/s | speed-up | timm peak MiB | WinfT peak MiB | '
                'WinfT backends |',
                '|---|---|---|---|---|---|---|---|']
        for r in dino:
            ips, pk = r['images_per_s'], r['peak_mb']
            out.append(f'| {r["img_size"]} | {r["grid"] ** 2} | {ips["timm"]:.2f} | {ips["winft_7x7"]:.2f} | '
                       f'{ips["winft_7x7"] / ips["timm"]:.2f}x | {_mb(pk["timm"])} | {_mb(pk["winft_7x7"])} | '
                       f'{", ".join(r["backends"]["winft_7x7"])} |')
        out.append('')
    for r in (r for r in res['rows'] if r['model'] == SAM):
        ips, pk = r['images_per_s'], r['peak_mb']
        out += [f'## SAM ViT-B/16 image encoder at {r["img_size"]} px ({r["grid"]}x{r["grid"]} patches)', '',
                '| model | windows | img/s | vs timm | peak MiB | backends |', '|---|---|---|---|---|---|',
                f'| timm `{SAM}` | 14x14 partitions, global blocks 2, 5, 8, 11 | {ips["timm"]:.3f} | 1.00x | '
                f'{_mb(pk["timm"])} | (timm) |']
        for v, label in (('winft_sam_pattern', "SAM's pattern (partition(14) + 4 global blocks)"),
                         ('winft_local_196', 'per-patch 14x14 windows in every block, no global block')):
            out.append(f'| WinfT | {label} | {ips[v]:.3f} | {ips[v] / ips["timm"]:.2f}x | {_mb(pk[v])} | '
                       f'{", ".join(r["backends"][v])} |')
        out += ['', f'Largest output difference of the SAM-pattern WinfT from timm\'s encoder: '
                    f'{r["sam_pattern_max_abs_diff"]:.3g} (outputs up to {r["sam_output_max_abs"]:.3g}; random '
                    'weights): SAM also attends to the zero padding of the cells cut by the grid edge.', '']
    return '\n'.join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--parts', nargs='+', default=['dinov3', 'sam'], choices=['dinov3', 'sam'])
    p.add_argument('--reps', type=int, default=2)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--sizes', type=int, nargs='+', default=[224, 512, 1024], help='DINOv3 image sizes')
    p.add_argument('--out', default=None, help='results folder (default: benchmarks/results/cpu-<cpu slug>, the folder bench_attention.py and bench_models.py use)')
    args = p.parse_args(argv)
    warnings.simplefilter('ignore')
    threads = set_threads(args.threads)
    res = {'machine': machine_info(), 'reps': args.reps, 'threads': threads, 'rows': []}
    if 'dinov3' in args.parts:
        for img in args.sizes:
            res['rows'].append(bench(DINO, ['timm', 'winft_7x7'], img, args.reps, threads))
    if 'sam' in args.parts:
        res['rows'].append(bench(SAM, ['timm', 'winft_sam_pattern', 'winft_local_196'], 1024, args.reps, threads))
    res['machine']['load_avg_end'] = machine_info()['load_avg_1_5_15']
    out = args.out or cpu_results_dir(os.path.join(os.path.dirname(__file__), 'results'))
    write_results(out, 'families', res, to_markdown(res))
    return 0


if __name__ == '__main__':
    sys.exit(main())
