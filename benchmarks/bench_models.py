"""Whole-model benchmark: timm's ViT against the WinfT of the same shape, side by side.

For vit_tiny_patch16_224 and vit_small_patch16_224 at 224, 448, 768 and 1024 px (random
weights; the windows, not the weights, decide the cost) it measures

  * inference images/s (``torch.no_grad``),
  * one training step (forward, backward, SGD step) in seconds,
  * the training step's peak memory (growth of a fresh process's resident set),
  * the share of this machine's matmul peak the model reaches (executed FLOPs / time / peak),

for three models: timm's ViT, the WinfT with a uniform 7x7 window (radius 3) in every block,
and the WinfT with the shipped spec ``winft_prior_d12_g14`` (resized to the grid: extents
scale with it, and its last four blocks are global).  Then the same under bf16 autocast for
ViT-S at 224 and 1024 px.  Compared models run interleaved; medians are reported.

  python benchmarks/bench_models.py [--quick] [--threads 1] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import timm  # noqa: E402

import vitfree  # noqa: E402
from vitfree.commands.bench import write_results, interleaved, machine_info, matmul_peak, peak_memory, set_threads  # noqa: E402
from vitfree.ops.tiled import tiled_cost  # noqa: E402
from vitfree.windows import WindowSpec  # noqa: E402

MODELS = ('vit_tiny_patch16_224', 'vit_small_patch16_224')
SIZES = (224, 448, 768, 1024)
SHIPPED = 'winft_prior_d12_g14'
BATCH = {224: 8, 448: 2, 768: 1, 1024: 1}
VARIANTS = ('vit', 'winft_uniform7', 'winft_shipped')


def build(base: str, img: int, variant: str) -> torch.nn.Module:
    if variant == 'vit':
        return timm.create_model(base, img_size=img)
    grid = (img // 16, img // 16)
    windows = WindowSpec.uniform(12, grid, 3) if variant == 'winft_uniform7' else SHIPPED
    return vitfree.create_winft(base, windows=windows, img_size=img)


def executed_flops(model: torch.nn.Module, img: int, batch: int) -> float:
    """Forward FLOPs actually computed: the matmuls of every block plus the attention pairs of
    the backend each block ran (T^2 for SDPA, the tiles' pairs for ``tiled``)."""
    d = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    hd = d // heads
    t = model.patch_embed.num_patches + model.num_prefix_tokens
    grid = tuple(model.patch_embed.grid_size)
    flops = 2 * 3 * 16 * 16 * d * model.patch_embed.num_patches  # patch embedding
    backends = model.attn_backends() if hasattr(model, 'attn_backends') else ['global'] * len(model.blocks)
    for blk, backend in zip(model.blocks, backends):
        flops += 24 * d * d * t  # qkv, proj, 2-layer MLP with ratio 4
        windows = getattr(blk.attn, 'windows_for', None)
        if backend == 'tiled':
            pairs = tiled_cost(blk.attn.windows_for(grid[0] * grid[1]), model.num_prefix_tokens)[0]
        else:
            pairs = t * t
        flops += 4 * pairs * hd * heads
        del windows
    return float(flops * batch)


def _train_step(model, x, opt, amp):
    with amp():
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _memory_setup(base: str, img: int, variant: str, batch: int) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return textwrap.dedent(f'''
        sys.path.insert(0, {here!r})
        from bench_models import build
        m = build({base!r}, {img}, {variant!r}).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        x = torch.randn({batch}, 3, {img}, {img})

        def step():
            loss = m(x).logsumexp(-1).mean()
            loss.backward()
            opt.step()
    ''')


def bench_size(base: str, img: int, reps: int, threads: int, memory: bool, peak: dict,
               dtype: str = 'float32') -> dict:
    batch = BATCH[img]
    models = {v: build(base, img, v) for v in VARIANTS}
    x = torch.randn(batch, 3, img, img)
    bf16 = dtype == 'bfloat16'
    amp = lambda: torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    def infer(m):
        m.eval()
        with torch.no_grad(), amp():
            m(x)
    opts = {v: torch.optim.SGD(m.parameters(), lr=1e-3) for v, m in models.items()}

    def train(v):
        models[v].train()
        _train_step(models[v], x, opts[v], amp)

    row = {'model': base, 'img_size': img, 'batch': batch, 'dtype': dtype}
    t0 = time.perf_counter()
    inf = interleaved({v: (lambda m=m: infer(m)) for v, m in models.items()}, reps=reps)
    row['backends'] = {v: sorted(set(m.attn_backends())) for v, m in models.items() if v != 'vit'}
    row['infer_img_s'] = {v: batch / inf[v]['median'] for v in VARIANTS}
    flops = {v: executed_flops(models[v], img, batch) for v in VARIANTS}
    row['infer_gflop'] = {v: flops[v] / 1e9 for v in VARIANTS}
    row['infer_peak_fraction'] = {v: flops[v] / inf[v]['median'] / 1e9 / peak[dtype] for v in VARIANTS}
    tr = interleaved({v: (lambda v=v: train(v)) for v in VARIANTS}, reps=max(2, reps - 1))
    row['train_step_s'] = {v: tr[v]['median'] for v in VARIANTS}
    row['train_peak_fraction'] = {v: 3 * flops[v] / tr[v]['median'] / 1e9 / peak[dtype] for v in VARIANTS}
    if memory:
        row['train_peak_mb'] = {v: peak_memory(_memory_setup(base, img, v, batch), threads).get('peak_mb')
                                for v in VARIANTS}
    for v in VARIANTS[1:]:
        row[f'{v}_infer_speedup'] = row['infer_img_s'][v] / row['infer_img_s']['vit']
        row[f'{v}_train_speedup'] = row['train_step_s']['vit'] / row['train_step_s'][v]
        if memory and row['train_peak_mb'].get(v) and row['train_peak_mb'].get('vit'):
            row[f'{v}_train_memory_ratio'] = row['train_peak_mb'][v] / row['train_peak_mb']['vit']
    row['wall_s'] = time.perf_counter() - t0
    keys = ('model', 'img_size', 'dtype')
    print(json.dumps({k: v for k, v in row.items() if 'speedup' in k or 'ratio' in k or k in keys}), flush=True)
    return row


def run(args) -> dict:
    threads = set_threads(args.threads)
    peak = {'float32': matmul_peak('float32'), 'bfloat16': matmul_peak('bfloat16')}
    res = {'machine': machine_info(), 'matmul_peak_gflops': peak, 'shipped_spec': SHIPPED,
           'reps': args.reps, 'rows': [], 'bf16_rows': []}
    sizes = (224, 448) if args.quick else SIZES
    for base in MODELS:
        for img in sizes:
            res['rows'].append(bench_size(base, img, args.reps, threads, not args.no_memory, peak))
    for img in ((224,) if args.quick else (224, 1024)):
        res['bf16_rows'].append(bench_size('vit_small_patch16_224', img, args.reps, threads, False, peak, 'bfloat16'))
    res['machine']['load_avg_end'] = machine_info()['load_avg_1_5_15']
    return res


def to_markdown(res: dict) -> str:
    m = res['machine']
    pk = res['matmul_peak_gflops']
    out = [
        '# Whole model: timm ViT vs WinfT',
        '',
        f'{m["cpu"]}, {m["cores"]} cores, torch {m["torch"]}, {m["threads"]} thread(s) '
        f'({"CPU-time clock" if m["threads"] == 1 else "wall clock"}); '
        f'load average at start {m["load_avg_1_5_15"]}, '
        f'at end {m.get("load_avg_end")}: the machine was shared with other jobs, so models ran interleaved and '
        f'medians of {res["reps"]} rounds are shown. Matmul peak with these threads: {pk["float32"]:.0f} GFLOP/s fp32, '
        f'{pk["bfloat16"]:.0f} GFLOP/s bf16. uniform7 = 7x7 window in every block; shipped = `{res["shipped_spec"]}` '
        'resized to the grid (last 4 blocks global). Random weights. Train step = forward + backward + SGD step. '
        'Peak = resident-memory growth of a fresh process during one training step.',
        '',
        '| model | px | batch | ViT img/s | uniform7 img/s | shipped img/s | uniform7 vs ViT | shipped vs ViT | '
        'train: uniform7 vs ViT | train: shipped vs ViT | train peak MiB ViT / u7 / shipped | '
        'u7 / ViT memory | % fp32 peak ViT / u7 / shipped | backends u7; shipped |',
        '|' + '---|' * 14,
    ]
    for r in res['rows']:
        ii, mem, frac = r['infer_img_s'], r.get('train_peak_mb', {}), r['infer_peak_fraction']
        fmt_mem = ' / '.join(f'{mem[v]:.0f}' if isinstance(mem.get(v), (int, float)) else '-' for v in VARIANTS)
        ratio = r.get('winft_uniform7_train_memory_ratio')
        out.append(
            f'| {r["model"].replace("_patch16_224", "")} | {r["img_size"]} | {r["batch"]} | {ii["vit"]:.2f} | '
            f'{ii["winft_uniform7"]:.2f} | {ii["winft_shipped"]:.2f} | **{r["winft_uniform7_infer_speedup"]:.2f}x** | '
            f'{r["winft_shipped_infer_speedup"]:.2f}x | {r["winft_uniform7_train_speedup"]:.2f}x | '
            f'{r["winft_shipped_train_speedup"]:.2f}x | {fmt_mem} | {f"{ratio:.2f}x" if ratio else "-"} | '
            + ' / '.join(f'{100 * frac[v]:.0f}' for v in VARIANTS) + ' | '
            + f'{",".join(r["backends"]["winft_uniform7"])}; {",".join(r["backends"]["winft_shipped"])} |')
    if res['bf16_rows']:
        out += ['', '## bf16 autocast (CPU)', '',
                '| model | px | batch | ViT img/s | uniform7 img/s | shipped img/s | uniform7 vs ViT | '
                'shipped vs ViT | train: uniform7 vs ViT | % bf16 peak ViT / u7 / shipped |',
                '|' + '---|' * 10]
        for r in res['bf16_rows']:
            ii, frac = r['infer_img_s'], r['infer_peak_fraction']
            out.append(
                f'| {r["model"].replace("_patch16_224", "")} | {r["img_size"]} | {r["batch"]} | {ii["vit"]:.2f} | '
                f'{ii["winft_uniform7"]:.2f} | {ii["winft_shipped"]:.2f} | {r["winft_uniform7_infer_speedup"]:.2f}x | '
                f'{r["winft_shipped_infer_speedup"]:.2f}x | {r["winft_uniform7_train_speedup"]:.2f}x | '
                + ' / '.join(f'{100 * frac[v]:.0f}' for v in VARIANTS) + ' |')
    return '\n'.join(out) + '\n'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--quick', action='store_true', help='224 and 448 px only')
    p.add_argument('--reps', type=int, default=3)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--no-memory', action='store_true')
    p.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
    args = p.parse_args(argv)
    res = run(args)
    write_results(args.out, 'models', res, to_markdown(res))
    return 0


if __name__ == '__main__':
    sys.exit(main())
