"""Do measured windows pay?  The Fashion-MNIST study (one command per stage, every stage resumable).

    python benchmarks/fmnist_study.py train            # the training queue (baseline first); resumable
    python benchmarks/fmnist_study.py train --device cuda
    python benchmarks/fmnist_study.py select           # ERFs of the seed-0 ViT, specs at the budgets

Protocol: README, section "Measured windows on Fashion-MNIST".  The training queue runs, in order
of priority, every run whose inputs exist: the seed-0 ViT baseline first, then (once the specs
have been selected) the seed-0 WinfT arms, the fine-tuning arms, then seeds 1 and 2.  Each run
keeps its checkpoints under ``--work`` and is skipped once its ``result.json`` exists, so the
queue can be stopped at any time (kill, crash, end of a session) and restarted later.

``SIGUSR1`` / ``SIGUSR2`` set a running queue to 1 / 2 CPU threads (from the next step on), so a
background run can give a core back while other work goes on.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402

import vitfree  # noqa: E402,F401  (registers the models)
from vitfree.windows import WindowSpec  # noqa: E402

MODEL = 'winft_micro_patch2_28'           # run with an all-global spec it is exactly vit_micro_patch2_28
DATA = 'fashion_mnist'                     # 55,000 train / 5,000 val (fixed) / 10,000 test
SEEDS = (0, 1, 2)
BUDGETS = (25, 50)                         # mean window area as % of the grid, global blocks count as 100 %

# The baseline's recipe: every from-scratch arm uses exactly this (timm's AdamW, cosine schedule with
# warm-up, label smoothing; random resized crops of 75-100 % of the image, horizontal flips and random
# erasing, no colour augmentation for grey images).
RECIPE: Dict[str, Any] = dict(
    epochs=30, batch_size=128, lr=2e-3, weight_decay=0.05, opt='adamw', sched='cosine', warmup_epochs=3,
    warmup_lr=1e-6, min_lr=1e-5, smoothing=0.1, scale=(0.75, 1.0), hflip=0.5, color_jitter=0.0, reprob=0.25,
    amp=None)
# Fine-tuning arms: start from the trained ViT of the same seed and train on for this many epochs.
FT_RECIPE: Dict[str, Any] = dict(RECIPE, epochs=5, lr=2e-4, warmup_epochs=1, min_lr=1e-6)
RUN_OPTIONS: Dict[str, Any] = dict(workers=0, verify_images=False, checkpoint_every=100, keep_last=2,
                                   resume=True, log_interval=50, progress=False)


def log(msg: str) -> None:
    print(f'[{time.strftime("%Y-%m-%d %H:%M:%S")}] {msg}', flush=True)


# ---- runs ----------------------------------------------------------------------------------------
def spec_path(work: Path, name: str) -> Path:
    return work / 'specs' / f'{name}.yaml'


def all_global(work: Path) -> Path:
    p = spec_path(work, 'all_global')
    if not p.is_file():
        WindowSpec.all_global(6, 14).save(p)
    return p


def run_dir(work: Path, name: str, seed: int) -> Path:
    return work / 'runs' / f'{name}_s{seed}'


def queue(work: Path) -> List[Dict[str, Any]]:
    """Every run of the study in priority order, each with the inputs it needs: per seed the
    ViT, then the fine-tuning arms (a few epochs from that ViT), then the from-scratch WinfTs."""
    runs = []
    for seed in SEEDS:
        runs.append(dict(name='vit', seed=seed, windows=all_global(work), init=None, recipe=RECIPE))
        init = run_dir(work, 'vit', seed) / 'model'
        runs.append(dict(name='ft_vit', seed=seed, windows=all_global(work), init=init, recipe=FT_RECIPE))
        for b in BUDGETS:
            runs.append(dict(name=f'ft_winft_measured_b{b}', seed=seed, windows=spec_path(work, f'measured_b{b}'),
                             init=init, recipe=FT_RECIPE))
        for b in BUDGETS:
            for kind in ('measured', 'uniform'):
                runs.append(dict(name=f'winft_{kind}_b{b}', seed=seed, windows=spec_path(work, f'{kind}_b{b}'),
                                 init=None, recipe=RECIPE))
    return runs


def ready(run: Dict[str, Any]) -> bool:
    init_ok = run['init'] is None or (Path(run['init']) / 'model.safetensors').is_file()
    return Path(run['windows']).is_file() and init_ok


def train_one(work: Path, run: Dict[str, Any], device: Optional[str]) -> Dict[str, Any]:
    """One training run (resumable); returns its record, cached in ``result.json``."""
    from vitfree.train.finetune import finetune
    out = run_dir(work, run['name'], run['seed'])
    res_file = out / 'result.json'
    if res_file.is_file():
        return json.loads(res_file.read_text())
    log(f'train {run["name"]} seed {run["seed"]} ({Path(run["windows"]).name}'
        + (f', from {run["init"]}' if run['init'] else '') + ')')
    model = f'local-dir:{run["init"]}' if run['init'] else MODEL
    t0 = time.perf_counter()
    res = finetune(model=model, pretrained=run['init'] is not None, data=DATA, output=str(out),
                   windows=str(run['windows']), seed=run['seed'], device=device, **run['recipe'], **RUN_OPTIONS)
    test = evaluate_test(res.model, device)
    rec = {'name': run['name'], 'seed': run['seed'], 'windows': str(run['windows']), 'init': run['init'] and
           str(run['init']), 'recipe': {k: list(v) if isinstance(v, tuple) else v for k, v in run['recipe'].items()},
           'test_top1': test['top1'], 'test_images': test['count'], 'val_top1': res.metrics[-1]['top1'],
           'wall_s_last_invocation': time.perf_counter() - t0,
           'train_time_s': float(sum(m['train_time_s'] for m in res.metrics)),
           'device': str(res.model.cls_token.device) if hasattr(res.model, 'cls_token') else device,
           'threads': torch.get_num_threads(), 'export': str(res.export), 'history': res.metrics}
    res_file.write_text(json.dumps(rec, indent=1) + '\n')
    log(f'  -> {run["name"]} seed {run["seed"]}: test top-1 {rec["test_top1"]:.2f}%, val top-1 {rec["val_top1"]:.2f}%')
    return rec


@torch.no_grad()
def evaluate_test(model, device: Optional[str] = None) -> Dict[str, float]:
    """Top-1 on the full 10,000-image test split (used once per run, never for a choice)."""
    from vitfree.data import TransformDataset, build_dataset
    from vitfree.train.finetune import evaluate
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = timm.data.create_transform(**cfg, is_training=False)
    ds = TransformDataset(build_dataset(DATA, 'test', verify=False), tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=500, num_workers=0)
    dev = torch.device(device) if device else next(model.parameters()).device
    return evaluate(model, loader, dev)


def cmd_train(args) -> int:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    signal.signal(signal.SIGUSR1, lambda *_: torch.set_num_threads(1))
    signal.signal(signal.SIGUSR2, lambda *_: torch.set_num_threads(2))
    only = set(args.only or [])
    while True:
        todo = [r for r in queue(work) if not (run_dir(work, r['name'], r['seed']) / 'result.json').is_file()
                and (not only or r['name'] in only)]
        if not todo:
            log('training queue: every run is done')
            return 0
        runnable = [r for r in todo if ready(r)]
        if not runnable:
            log(f'training queue: {len(todo)} run(s) wait for inputs (specs: run the "select" stage); stopping')
            return 0
        train_one(work, runnable[0], args.device)


# ---- ERFs and specs at cost budgets ------------------------------------------------------------
ESTIMATORS = ('attention', 'attribution', 'ablation')
TAUS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
GAMMAS = (0.3, 0.4, 0.5, 0.6, 0.8, 1.01)  # 1.01: no block becomes global
ERF_IMAGES = 1000                        # the first 1,000 validation images measure the ERFs
                                         # the other 4,000 score the windows imposed on the ViT


def val_split(model, start: int, stop: Optional[int] = None):
    """Validation images ``start:stop`` as a normalised tensor batch and labels."""
    from vitfree.train.data import build_dataset
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = timm.data.create_transform(**cfg, is_training=False)
    ds = build_dataset(DATA, 'val', verify=False)
    idx = range(start, len(ds) if stop is None else min(stop, len(ds)))
    xs, ys = zip(*[(tf(ds[i][0]), ds[i][1]) for i in idx])
    return torch.stack(xs), torch.tensor(ys)


def spec_cost(spec: WindowSpec) -> float:
    """Mean window area over blocks as a share of the grid, a global block counting the whole grid
    (METHODS 3.5)."""
    return float(np.mean([r['fraction'] for r in spec.summary()]))


@torch.no_grad()
def imposed_top1(model, spec: Optional[WindowSpec], x, y) -> float:
    """Top-1 of the trained ViT's weights with ``spec``'s windows imposed, no retraining."""
    m = vitfree.create_winft('vit_micro_patch2_28', windows=spec or WindowSpec.all_global(6, 14)).eval()
    m.load_state_dict(model.state_dict())
    pred = torch.cat([m(x[i:i + 500]).argmax(-1) for i in range(0, len(x), 500)])
    return float((pred == y).float().mean() * 100)


def uniform_like(spec: WindowSpec) -> WindowSpec:
    """A uniform square window with (nearly) the measured spec's mean window area in its windowed
    blocks; the global blocks stay global."""
    from vitfree.windows import window_areas
    local = [i for i in range(spec.depth) if not spec.is_global(i)]
    glob = [i for i in range(spec.depth) if spec.is_global(i)]
    if not local:
        return WindowSpec.all_global(spec.depth, spec.grid)
    target = float(np.mean([spec.areas(i).mean() for i in local]))
    radius = min(range(max(spec.grid)), key=lambda r: abs(
        window_areas(np.full(spec.grid + (4,), r, dtype=np.int32), spec.grid).mean() - target))
    u = WindowSpec.uniform(spec.depth, spec.grid, radius, global_blocks=glob)
    u.provenance.update(reason=f'uniform square window of radius {radius}, matching the mean window area '
                               f'{target:.1f} of the measured spec in its windowed blocks {local}')
    return u


def cmd_select(args) -> int:
    """Measure the seed-0 ViT's ERFs (three estimators, validation images only) and choose the
    specs at each cost budget (METHODS 3.5): among the candidates (estimator, tau, gamma) whose
    cost is at most the budget, the one with the largest tau; ties go to the best validation
    top-1 with the windows imposed on the trained ViT."""
    from vitfree.analysis import erf_from_interaction, interaction
    work = Path(args.work)
    export = run_dir(work, 'vit', 0) / 'model'
    if not (export / 'model.safetensors').is_file():
        log(f'select: the seed-0 ViT is not trained yet ({export} missing)')
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    model = timm.create_model(f'local-dir:{export}', pretrained=True).eval()
    x_erf, y_erf = val_split(model, 0, ERF_IMAGES)
    x_sel, y_sel = val_split(model, ERF_IMAGES)
    base = imposed_top1(model, None, x_sel, y_sel)
    log(f'select: ViT validation top-1 on the selection images {base:.2f}%')
    out = work / 'erf'
    out.mkdir(parents=True, exist_ok=True)
    cands: List[Dict[str, Any]] = []
    for est in ESTIMATORS:
        maps_file = out / f'interaction_{est}.pt'
        if maps_file.is_file():
            maps = torch.load(maps_file, weights_only=True)
            t_maps = None
        else:
            t0 = time.perf_counter()
            res = interaction(model, (x_erf, y_erf), est, num_images=ERF_IMAGES, batch_size=100, progress=False,
                              data=f'Fashion-MNIST validation images 0-{ERF_IMAGES - 1}')
            t_maps = time.perf_counter() - t0
            maps = {b: res[b].float() for b in range(len(model.blocks))}
            torch.save(maps, maps_file)
            log(f'select: {est} interaction maps of {ERF_IMAGES} images in {t_maps:.0f} s')
        for tau in TAUS:
            for gamma in GAMMAS:
                erf = erf_from_interaction(maps, grid=(14, 14), tau=tau, gamma=gamma, provenance=dict(
                    model='vit_micro_patch2_28', checkpoint=f'{export} (seed 0, trained by benchmarks/fmnist_study.py)',
                    data=f'Fashion-MNIST validation split, images 0-{ERF_IMAGES - 1}', num_images=ERF_IMAGES,
                    estimator=est))
                cost = spec_cost(erf.spec)
                cands.append({'estimator': est, 'tau': tau, 'gamma': gamma, 'cost': cost, 'spec': erf.spec,
                              'global_blocks': erf.global_blocks,
                              'mean_erf_area': [round(b.mean_area, 2) for b in erf.blocks]})
    feasible = [c for c in cands if c['cost'] <= max(BUDGETS) / 100 + 1e-9]
    for c in feasible:
        c['val_top1_imposed'] = imposed_top1(model, c['spec'], x_sel, y_sel)
    selection: Dict[str, Any] = {'vit_val_top1': base, 'erf_images': ERF_IMAGES, 'selection_images': len(y_sel),
                                 'rule': 'METHODS 3.5: cost <= budget, largest tau, ties by imposed validation top-1',
                                 'budgets': {}, 'per_estimator': {}}
    for b in BUDGETS:
        ok = [c for c in feasible if c['cost'] <= b / 100 + 1e-9]
        if not ok:
            log(f'select: no candidate within {b} % of the grid')
            continue
        best = max(ok, key=lambda c: (c['tau'], c['val_top1_imposed'], -c['cost']))
        best['spec'].provenance['selected_by'] = f'{selection["rule"]}, budget {b} %'
        best['spec'].save(spec_path(work, f'measured_b{b}'))
        uni = uniform_like(best['spec'])
        uni.save(spec_path(work, f'uniform_b{b}'))
        selection['budgets'][str(b)] = {k: v for k, v in best.items() if k != 'spec'}
        selection['budgets'][str(b)]['uniform_cost'] = spec_cost(uni)
        selection['budgets'][str(b)]['uniform_val_top1_imposed'] = imposed_top1(model, uni, x_sel, y_sel)
        for est in ESTIMATORS:
            mine = [c for c in ok if c['estimator'] == est]
            if mine:
                e = max(mine, key=lambda c: (c['tau'], c['val_top1_imposed'], -c['cost']))
                e['spec'].save(out / f'{est}_b{b}.yaml')
                selection['per_estimator'][f'{est}_b{b}'] = {k: v for k, v in e.items() if k != 'spec'}
        log(f'select: budget {b} %: {best["estimator"]} tau {best["tau"]} gamma {best["gamma"]}, cost '
            f'{100 * best["cost"]:.1f} %, imposed val top-1 {best["val_top1_imposed"]:.2f}% (ViT {base:.2f}%)')
    selection['candidates'] = [{k: v for k, v in c.items() if k != 'spec'} for c in cands]
    (work / 'specs' / 'selection.json').write_text(json.dumps(selection, indent=1) + '\n')
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--work', default=str(ROOT / 'bench-out' / 'fmnist-v2'), help='runs, specs, measurements')
    sub = p.add_subparsers(dest='stage', required=True)
    t = sub.add_parser('train', help='the training queue')
    t.add_argument('--device', default=None, help='cpu, cuda, cuda:1 ... (default: cuda when available)')
    t.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch default)')
    t.add_argument('--only', nargs='+', help='only these run names (e.g. vit)')
    sel = sub.add_parser('select', help="measure the seed-0 ViT's ERFs and choose the specs at each budget")
    sel.add_argument('--threads', type=int, default=None)
    args = p.parse_args(argv)
    return {'train': cmd_train, 'select': cmd_select}[args.stage](args)


if __name__ == '__main__':
    sys.exit(main())
