"""Whole model on the CPU: timm's ViT-S against WinfT-S, and against the free-attention limits.

For ``vit_small_patch16_224`` at img_size 224, 512, 768 and 1024 px (random weights: the
windows, not the weights, decide the cost), with 1 and 2 threads, it times, interleaved in one
run (median of ``--reps`` rounds):

  * ``vit``: timm's ViT-S (its attention runs on PyTorch's fused SDPA kernel);
  * ``winft``: the WinfT of the same shape with a uniform 7x7 window (radius 3) in every
    block, ``auto`` backend;
  * ``limit``: the ViT with every attention module replaced by an identity: what any model of
    this shape costs if attention, including its qkv and output projections, were free
    (the issue's definition);
  * ``free_op``: the ViT whose attention modules keep their qkv and output projections but
    return v instead of attending: what WinfT costs if the attention op itself were free.

Inference: batch 8 at 224 px, batch 1 above.  Training step: forward, backward and an AdamW
step, same batches.  Results: ``benchmarks/results/cpu-<cpu slug>/models.{json,md}`` (one
folder per CPU model; rows of earlier runs on the same CPU that this run did not measure are
kept, so sizes can be run one at a time); ``--profile`` adds a per-operator profile of one WinfT
forward at 1024 px (where the remaining time goes).

  python benchmarks/bench_models.py [--reps 4] [--threads 1 2] [--sizes 224 512 768 1024] [--profile]

Stop other work first (a background job sharing the two cores skews every figure; pause it
with ``kill -STOP`` / ``kill -CONT``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Dict

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import timm  # noqa: E402

import vitfree  # noqa: E402
from vitfree.benchmark import (cpu_results_dir, interleaved, machine_info, machine_line, merge_rows,  # noqa: E402
                               set_threads, write_results)
from vitfree.windows import WindowSpec  # noqa: E402

BASE = 'vit_small_patch16_224'
VARIANTS = ('vit', 'winft', 'limit', 'free_op')
BATCH = {224: 8}


class NoAttention(nn.Module):
    """An attention module that is an identity (the ``limit`` model)."""

    def forward(self, x, attn_mask=None, is_causal=False):
        return x


class ProjectionsOnly(nn.Module):
    """Keeps an attention module's qkv and output projections, skips the attention op (``free_op``)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads, self.dim = attn.qkv, attn.proj, attn.num_heads, attn.head_dim

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        v = self.qkv(x).reshape(b, n, 3, self.heads, self.dim)[:, :, 2]
        return self.proj(v.reshape(b, n, self.heads * self.dim))


def build(img: int, variant: str) -> nn.Module:
    if variant == 'winft':
        g = img // 16
        return vitfree.create_winft(BASE, windows=WindowSpec.uniform(12, (g, g), 3), img_size=img)
    model = timm.create_model(BASE, img_size=img)
    for blk in model.blocks:
        if variant == 'limit':
            blk.attn = NoAttention()
        elif variant == 'free_op':
            blk.attn = ProjectionsOnly(blk.attn)
    return model


KINDS = ('infer', 'train')


def bench_size(img: int, reps: int, kinds=KINDS) -> Dict:
    """One row: the four models side by side for each of ``kinds`` (inference, training step)."""
    batch = BATCH.get(img, 1)
    models = {v: build(img, v) for v in VARIANTS}
    x = torch.randn(batch, 3, img, img)
    opts = {v: torch.optim.AdamW(m.parameters(), lr=1e-4) for v, m in models.items()}

    def infer(m):
        m.eval()
        with torch.no_grad():
            m(x)

    def train(v):
        m = models[v].train()
        loss = m(x).logsumexp(-1).mean()
        loss.backward()
        opts[v].step()
        opts[v].zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    row = {'img_size': img, 'batch': batch, 'threads': torch.get_num_threads()}
    for kind in kinds:
        step = infer if kind == 'infer' else train
        times = interleaved({v: (lambda v=v: step(models[v] if kind == 'infer' else v)) for v in VARIANTS}, reps=reps)
        row['backends'] = sorted(set(models['winft'].attn_backends()))
        row[f'{kind}_ms'] = ms = {v: 1e3 * times[v]['median'] for v in VARIANTS}
        row[f'{kind}_speedup'] = ms['vit'] / ms['winft']
        row[f'{kind}_limit_speedup'] = ms['vit'] / ms['limit']
        row[f'{kind}_share_of_limit'] = ms['limit'] / ms['winft']
        row[f'{kind}_share_of_free_op'] = ms['free_op'] / ms['winft']
    row['wall_s'] = time.perf_counter() - t0
    print(f'{img} px, {row["threads"]} thread(s): ' + '; '.join(
        f'{k} {row[f"{k}_speedup"]:.2f}x ViT ({100 * row[f"{k}_share_of_limit"]:.0f} % of limit, '
        f'{100 * row[f"{k}_share_of_free_op"]:.0f} % of free op)' for k in kinds) + f'; backends {row["backends"]}',
        flush=True)
    return row


def _fill_from(path: str, res: Dict) -> None:
    """Rows of this run that measured only some kinds take the other kinds from the earlier
    results file's row of the same threads and size (``--kinds train`` after ``--kinds infer``)."""
    import json
    try:
        with open(path) as f:
            old = {(r['threads'], r['img_size']): r for r in json.load(f).get('rows', [])}
    except (OSError, ValueError):
        return
    for r in res['rows']:
        prev = old.get((r['threads'], r['img_size']), {})
        for k, v in prev.items():
            if k.startswith(tuple(f'{kind}_' for kind in KINDS)) and k not in r:
                r[k] = v
        if any(k.startswith(KINDS) for k in prev) and 'machine' in prev:
            r.setdefault('machine_other_kind', prev['machine'])


def profile_forward(img: int = 1024, top: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile
    g = img // 16
    m = vitfree.create_winft(BASE, windows=WindowSpec.uniform(12, (g, g), 3), img_size=img).eval()
    x = torch.randn(1, 3, img, img)
    with torch.no_grad():
        m(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            m(x)
    return prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=top)


def _targets(res: Dict) -> list:
    """Issue 22's targets (2 threads): 224 px at least 1.03x ViT-S, 1024 px at least 90 % of the
    free-op limit's speed-up (free-op ms / WinfT ms), for inference and the training step."""
    out = ['## Targets (issue 22, 2 threads)', '']
    for r in res['rows']:
        if r['threads'] != 2 or r['img_size'] not in (224, 1024):
            continue
        for kind, name in ((k, n) for k, n in (('infer', 'inference'), ('train', 'training step')) if f'{k}_ms' in r):
            if r['img_size'] == 224:
                got, ok = f'{r[f"{kind}_speedup"]:.2f}x ViT-S (target 1.03x)', r[f'{kind}_speedup'] >= 1.03
            else:
                share = r[f'{kind}_share_of_free_op']
                got, ok = f'{100 * share:.0f} % of the free-op limit\'s speed-up (target 90 %)', share >= 0.90
            out.append(f'- {r["img_size"]} px, {name}: {got}: **{"met" if ok else "missed"}**')
    return out


def to_markdown(res: Dict) -> str:
    m = res['machine']
    out = ['# Whole model on the CPU: ViT-S, WinfT-S and the free-attention limits', '',
           f'{machine_line(m)}; load average at start {m["load_avg_1_5_15"]}. '
           f'All four models ran interleaved in one run; medians of {res["reps"]} rounds '
           "(the process's CPU time with one thread, wall clock with more). "
           'WinfT: uniform 7x7 window in every block, `auto` backend. limit: every attention module an identity '
           '(qkv and output projections gone too). free op: qkv and output projections kept, attention op skipped. '
           'Inference batch 8 at 224 px, 1 above; training step = forward + backward + AdamW.', '']
    for kind, title in (('infer', 'Inference'), ('train', 'Training step')):
        out += [f'## {title}', '',
                '| threads | px | ViT-S ms | WinfT-S ms | limit ms | free-op ms | WinfT speed-up | limit speed-up | '
                'share of limit | share of free-op limit | backends |', '|' + '---|' * 11]
        for r in (r for r in res['rows'] if f'{kind}_ms' in r):
            ms = r[f'{kind}_ms']
            out.append(f'| {r["threads"]} | {r["img_size"]} | {ms["vit"]:.0f} | {ms["winft"]:.0f} | {ms["limit"]:.0f} | '
                       f'{ms["free_op"]:.0f} | {r[f"{kind}_speedup"]:.2f}x | {r[f"{kind}_limit_speedup"]:.2f}x | '
                       f'{100 * r[f"{kind}_share_of_limit"]:.0f} % | {100 * r[f"{kind}_share_of_free_op"]:.0f} % | '
                       f'{", ".join(r["backends"])} |')
        out.append('')
    out += _targets(res)
    out.append('')
    if res.get('profile'):
        out += ['## Where a WinfT-S forward at 1024 px spends its time (2 threads, torch.profiler)', '', '```',
                res['profile'], '```', '']
    return '\n'.join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--reps', type=int, default=4)
    p.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    p.add_argument('--sizes', type=int, nargs='+', default=[224, 512, 768, 1024])
    p.add_argument('--profile', action='store_true', help='add an operator profile of WinfT-S at 1024 px')
    p.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'),
                   help='results root; this CPU writes into its cpu-<slug> folder below it')
    p.add_argument('--stem', default='models')
    p.add_argument('--kinds', nargs='+', choices=KINDS, default=list(KINDS),
                   help='inference and/or the training step (separate runs add up in one row)')
    args = p.parse_args(argv)
    warnings.simplefilter('ignore')
    res = {'machine': machine_info(), 'reps': args.reps, 'base': BASE, 'rows': []}
    from vitfree.ops.native import native_isa, native_library
    res['machine']['native_isa'] = native_isa() if native_library()[0] is not None else None
    for threads in args.threads:
        set_threads(threads)
        for img in args.sizes:
            res['rows'].append(bench_size(img, args.reps, args.kinds))
    if args.profile:
        set_threads(max(args.threads))
        res['profile'] = profile_forward()
    res['machine']['load_avg_end'] = machine_info()['load_avg_1_5_15']
    out = cpu_results_dir(args.out)
    _fill_from(os.path.join(out, f'{args.stem}.json'), res)
    res = merge_rows(os.path.join(out, f'{args.stem}.json'), res, key=lambda r: (r['threads'], r['img_size']))
    write_results(out, args.stem, res, to_markdown(res))
    return 0


if __name__ == '__main__':
    sys.exit(main())
