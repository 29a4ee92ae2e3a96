"""Does compiling the study's training step make a run faster?  (issue 19, before the first run)

One thread, the study's batch (128), the from-scratch WinfT arm with the measured 25 % spec and the
ViT (all-global spec).  Times, side by side in one run: the data pipeline alone (timm's training
transform on Fashion-MNIST, as the study's loader runs it), the eager step (forward, loss,
backward, AdamW) and the same step with ``torch.compile`` (inductor on CPU), each after warm-up.

    python benchmarks/bench_train_step.py [--work bench-out/fmnist-v2] [--steps 20]

Writes benchmarks/results/cpu-<cpu>/train_step.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402

import vitfree  # noqa: E402,F401
from vitfree.benchmark import cpu_results_dir, machine_info  # noqa: E402


def step_time(model, opt, crit, x, y, steps: int) -> float:
    def one():
        out = model(x)
        loss = crit(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()
    for _ in range(3):
        one()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - t) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--work', default=str(ROOT / 'bench-out' / 'fmnist-v2'))
    ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--threads', type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from timm.loss import LabelSmoothingCrossEntropy
    from vitfree.data import TransformDataset, build_dataset

    res = {'machine': machine_info(), 'batch': 128, 'steps': args.steps}
    # the data pipeline, as the study's loader runs it (workers=0)
    m = timm.create_model('winft_micro_patch2_28', num_classes=10)
    dc = timm.data.resolve_data_config({}, model=m)
    tf = timm.data.create_transform(**dc, is_training=True, scale=(0.75, 1.0), hflip=0.5, color_jitter=0.0,
                                    re_prob=0.25)
    ds = TransformDataset(build_dataset('fashion_mnist', 'train', verify=False), tf, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, num_workers=0)
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    for _ in range(args.steps):
        x, y = next(it)
    res['data_s_per_batch'] = (time.perf_counter() - t) / args.steps
    y = y.long()
    for arm, spec in (('vit', 'all_global'), ('winft_measured_b25', 'measured_b25')):
        r = {}
        for mode in ('eager', 'compiled'):
            torch.manual_seed(0)
            model = timm.create_model('winft_micro_patch2_28', num_classes=10,
                                      windows=str(Path(args.work) / 'specs' / f'{spec}.yaml')).train()
            opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
            crit = LabelSmoothingCrossEntropy(0.1)
            run = model
            if mode == 'compiled':
                run = torch.compile(model)
                t0 = time.perf_counter()
                run(x).sum().backward()
                r['compile_s'] = time.perf_counter() - t0
            r[f'{mode}_s_per_step'] = step_time(run, opt, crit, x, y, args.steps)
        r['compiled_speedup'] = r['eager_s_per_step'] / r['compiled_s_per_step']
        res[arm] = r
        print(arm, json.dumps(r), flush=True)
    print('data s/batch', res['data_s_per_batch'])
    out = Path(cpu_results_dir(str(ROOT / 'benchmarks' / 'results'))) / 'train_step.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + '\n')
    print('wrote', out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
