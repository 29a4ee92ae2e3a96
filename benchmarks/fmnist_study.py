"""Do measured windows pay?  The Fashion-MNIST study (one command per stage, every stage resumable).

    python benchmarks/fmnist_study.py train            # the training queue (baseline first); resumable
    python benchmarks/fmnist_study.py train --device cuda
    python benchmarks/fmnist_study.py select           # ERFs of the seed-0 ViT, specs at the budgets
    python benchmarks/fmnist_study.py analyses         # head entropy, SIFT lift, patch removal (seed-0 ViT)
    python benchmarks/fmnist_study.py recheck          # the specs' ERFs again on the shipped ViT run
    python benchmarks/fmnist_study.py speed            # every arm's images/s, side by side (pause the queue)
    python benchmarks/fmnist_study.py report           # results JSON/markdown, plot, ERF pictures
    python benchmarks/fmnist_study.py snapshot         # finished state -> benchmarks/results/ (to continue)
    python benchmarks/fmnist_study.py ship             # the seed-0 ViT and the best WinfT into weights/

Protocol: README, section "Measured windows on Fashion-MNIST".  The training queue runs, in order
of priority (``queue``), every run whose inputs exist: seed 0's ViT and fine-tuning arms, then the
decisive from-scratch table at 25 % (measured and uniform windows and the ViT, three seeds), then
the fine-tuning arms of seeds 1 and 2, the from-scratch 50 % arms and the lighter-recipe arms.  Each run
keeps its checkpoints under ``--work`` and is skipped once its ``result.json`` exists, so the
queue can be stopped at any time (kill, crash, end of a session) and restarted later.

``SIGUSR1`` / ``SIGUSR2`` set a running queue to 1 / 2 CPU threads (from the next step on), so a
background run can give a core back while other work goes on.  Seen here: a worker started with
two threads and lowered to one this way keeps its second OpenMP thread spinning (about half a
core), which halved the speed of a second worker beside it; start workers that will share the
machine with ``--threads 1`` (two of them on a 2-core CPU) instead.
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
from vitfree.demo import ERF_MAPS_FILE  # noqa: E402  (make demo reads what ship writes)
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
# A last attempt at the baseline: the trained ViT on for 3 epochs at a lower rate with lighter
# augmentation (no random erasing, crops of 90-100 %), so it fits the training images more closely.
LIGHT_RECIPE: Dict[str, Any] = dict(FT_RECIPE, epochs=3, lr=1e-4, warmup_epochs=0, scale=(0.9, 1.0), reprob=0.0)
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
    """Every run of the study in priority order (issue 19), each with the inputs it needs:

    0. seed 0: the ViT and every fine-tuning arm (a few epochs from that ViT);
    1. from scratch, seed 0: the measured and the uniform 25 % WinfT;
    2. from scratch: the ViT at seeds 1 and 2;
    3. from scratch: the measured and the uniform 25 % WinfT at seeds 1 and 2
       (groups 1-3 are the decisive table: three seeds of each arm at 25 %);
    4. the fine-tuning arms at seeds 1 and 2 (from the ViT of their seed);
    5. from scratch at 50 %, seeds 0-2;
    6. the lighter-recipe arms at seeds 1 and 2.
    """
    glob = all_global(work)

    def vit(seed):
        return dict(name='vit', seed=seed, windows=glob, init=None, recipe=RECIPE)

    def scratch(kind, b, seed):
        return dict(name=f'winft_{kind}_b{b}', seed=seed, windows=spec_path(work, f'{kind}_b{b}'), init=None,
                    recipe=RECIPE)

    def finetuning(seed):
        init = run_dir(work, 'vit', seed) / 'model'
        runs = [dict(name='ft_vit', seed=seed, windows=glob, init=init, recipe=FT_RECIPE)]
        runs += [dict(name=f'ft_winft_{kind}_b{b}', seed=seed, windows=spec_path(work, f'{kind}_b{b}'), init=init,
                      recipe=FT_RECIPE) for kind in ('measured', 'uniform') for b in BUDGETS]
        return runs

    def light(seed):
        init = run_dir(work, 'vit', seed) / 'model'
        return [dict(name='ft_vit_light', seed=seed, windows=glob, init=init, recipe=LIGHT_RECIPE),
                dict(name='ft_light_winft_measured_b50', seed=seed, windows=spec_path(work, 'measured_b50'),
                     init=init, recipe=LIGHT_RECIPE)]

    later = SEEDS[1:]
    runs = [vit(0)] + finetuning(0) + light(0)                                        # group 0 (done)
    runs += [scratch(kind, 25, 0) for kind in ('measured', 'uniform')]                 # group 1
    runs += [vit(s) for s in later]                                                    # group 2
    runs += [scratch(kind, 25, s) for s in later for kind in ('measured', 'uniform')]  # group 3
    runs += [r for s in later for r in finetuning(s)]                                  # group 4
    runs += [scratch(kind, 50, s) for s in SEEDS for kind in ('measured', 'uniform')]  # group 5
    runs += [r for s in later for r in light(s)]                                       # group 6
    return runs


def load_run(work: Path, name: str, seed: int = 0):
    """The trained model of one run, through timm's ``local-dir:`` path, in eval mode."""
    return timm.create_model(f'local-dir:{run_dir(work, name, seed) / "model"}', pretrained=True).eval()


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
    """Run the queue.  Several workers may run at once (one per GPU, or two one-thread workers on a
    two-core CPU): each run is claimed with an exclusive lock on its folder, so no two workers
    train the same run, and a worker that finds every ready run taken by others waits for one."""
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
            log(f'training queue: {len(todo)} run(s) wait for inputs (the trained ViT of their seed, or the specs '
                f'of the "select" stage); stopping')
            return 0
        for run in runnable:
            lock = _claim(run_dir(work, run['name'], run['seed']))
            if lock is not None:
                try:
                    train_one(work, run, args.device)
                finally:
                    lock.close()
                break
        else:  # every ready run is being trained by another worker
            time.sleep(60)


def _claim(folder: Path):
    """An open file holding an exclusive lock on ``folder`` (released when closed or when the
    process ends, also by kill -9), or None when another worker holds it."""
    import fcntl
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / '.worker.lock', 'w')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


# ---- ERFs and specs at cost budgets ------------------------------------------------------------
ESTIMATORS = ('attention', 'attribution', 'ablation')
TAUS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
GAMMAS = (0.3, 0.4, 0.5, 0.6, 0.8, 1.01)  # 1.01: no block becomes global
ERF_IMAGES = 1000                        # the first 1,000 validation images measure the ERFs
                                         # the other 4,000 score the windows imposed on the ViT


def val_split(model, start: int, stop: Optional[int] = None):
    """Validation images ``start:stop`` as a normalised tensor batch and labels."""
    from vitfree.data import build_dataset
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
    model = load_run(work, 'vit')
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


# ---- the seeds' other findings, on the strong ViT -----------------------------------------------
SHIPPABLE_VITS = ('vit', 'ft_vit', 'ft_vit_light')


def strongest_vit(work: Path) -> Dict[str, Any]:
    """The seed-0 ViT the study ships: ``vit_s0`` or the same run trained on (``ft_vit_s0``, the
    fine-tuning recipe; ``ft_vit_light_s0``, lighter augmentation), whichever has the highest
    validation top-1."""
    vits = [r for name in SHIPPABLE_VITS for r in _records(work, name) if r['seed'] == 0]
    if not vits:
        raise SystemExit('the seed-0 ViT has no result yet')
    return max(vits, key=lambda r: r['val_top1'])


def cmd_analyses(args) -> int:
    """Head entropy by depth, the attention lift of SIFT-dense patches and patch-removal curves of
    the seed-0 ViT whose ERFs gave the windows (``vit_s0``; ``--run`` picks another), on validation
    images (the same 1,000 that measured the ERFs)."""
    from vitfree import distance_profiles, patch_removal, semantic_interrelation
    work = Path(args.work)
    run = args.run or 'vit'
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_run(work, run)
    x, y = val_split(model, 0, args.images)
    out: Dict[str, Any] = {'images': len(y), 'data': f'Fashion-MNIST validation images 0-{len(y) - 1}',
                           'model': f'run {run}_s0'}
    log(f'analyses: on run {run}_s0')
    t0 = time.perf_counter()
    prof = distance_profiles(model, x, progress=False)
    ent = prof.mean_entropy  # (blocks, heads)
    by_block = ent.mean(1)
    out['entropy'] = {'per_block_head': ent.round(4).tolist(), 'per_block': by_block.round(4).tolist(),
                      'max_possible': float(np.log(14)),
                      'spearman_depth': _spearman(np.arange(len(by_block)), by_block),
                      'rises_with_depth': bool(by_block[-1] > by_block[0])}
    log(f'analyses: head entropy by block {np.round(by_block, 3).tolist()} ({time.perf_counter() - t0:.0f} s)')
    t0 = time.perf_counter()
    sem = semantic_interrelation(model, (x, y), progress=False)
    cls = sem.mean_cls_lift()  # (blocks, 4): groups none / low / mid / high
    out['sift'] = {'keypoints_per_image_mean': float(np.mean([len(s.keypoints) for s in sem.images])),
                   'images_without_keypoints': int(sum(not s.has_keypoints for s in sem.images)),
                   'query_lift_per_block': np.nanmean(sem.mean_query_lift(), 1).round(4).tolist(),
                   'cls_lift_per_block_group': None if cls is None else np.asarray(cls).round(4).tolist(),
                   'groups': ['no keypoint', 'low', 'mid', 'high']}
    log(f'analyses: SIFT query lift by block {out["sift"]["query_lift_per_block"]} ({time.perf_counter() - t0:.0f} s)')
    t0 = time.perf_counter()
    rem = patch_removal(model, (x, y), scores=['interaction', 'sift', 'random'], progress=False)
    out['removal'] = {'fractions': rem.fractions, 'accuracy': rem.accuracy,
                      'mean_accuracy': {k: float(np.mean(v)) for k, v in rem.accuracy.items()}}
    log(f'analyses: removal mean accuracy {out["removal"]["mean_accuracy"]} ({time.perf_counter() - t0:.0f} s)')
    (work / 'analyses.json').write_text(json.dumps(out, indent=1) + '\n')
    return 0


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def cmd_recheck(args) -> int:
    """Measure the ERFs of another seed-0 ViT run (default: the shipped ViT, by validation) with the
    estimator, tau and gamma of each chosen spec, on the same validation images, and compare them
    with the ERFs of ``vit_s0`` the specs were made from: mean ERF area per block, cost, and the
    share of patches whose window comes out identical."""
    from vitfree.analysis import erf_from_interaction, interaction
    work = Path(args.work)
    run = args.run or strongest_vit(work)['name']
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_run(work, run)
    x, y = val_split(model, 0, ERF_IMAGES)
    out: Dict[str, Any] = {'run': f'{run}_s0', 'against': 'vit_s0', 'images': ERF_IMAGES, 'budgets': {}}
    maps: Dict[str, Any] = {}
    for b in BUDGETS:
        prov = WindowSpec.load(spec_path(work, f'measured_b{b}')).provenance
        est, tau, gamma = prov['estimator'], float(prov['tau']), float(prov['gamma'])
        if est not in maps:
            t0 = time.perf_counter()
            res = interaction(model, (x, y), est, num_images=ERF_IMAGES, batch_size=100, progress=False)
            maps[est] = {k: res[k].float() for k in range(len(model.blocks))}
            log(f'recheck: {est} interaction maps of {run}_s0 in {time.perf_counter() - t0:.0f} s')
        old = torch.load(work / 'erf' / f'interaction_{est}.pt', weights_only=True)
        a = erf_from_interaction(old, grid=(14, 14), tau=tau, gamma=gamma)
        n = erf_from_interaction(maps[est], grid=(14, 14), tau=tau, gamma=gamma)
        same = np.mean([np.array_equal(p, q) for ea, en in zip(a.blocks, n.blocks)
                        for p, q in zip(ea.rects.reshape(-1, 4), en.rects.reshape(-1, 4))])
        out['budgets'][str(b)] = {'estimator': est, 'tau': tau, 'gamma': gamma,
                                  'vit_s0_mean_area': [round(e.mean_area, 1) for e in a.blocks],
                                  'mean_area': [round(e.mean_area, 1) for e in n.blocks],
                                  'vit_s0_cost': spec_cost(a.spec), 'cost': spec_cost(n.spec),
                                  'same_windows_share': float(same)}
        log(f'recheck {b} %: cost {spec_cost(n.spec):.3f} (vit_s0 {spec_cost(a.spec):.3f}), '
            f'{100 * same:.0f} % of the windows identical')
    (work / 'erf_recheck.json').write_text(json.dumps(out, indent=1) + '\n')
    return 0


# ---- attention cost and speed of every arm ------------------------------------------------------
ARMS = {  # arm -> (run name, spec name or None for the ViT, from scratch?)
    'ViT': ('vit', None, True),
    'WinfT measured, 25 %': ('winft_measured_b25', 'measured_b25', True),
    'WinfT uniform, 25 %': ('winft_uniform_b25', 'uniform_b25', True),
    'WinfT measured, 50 %': ('winft_measured_b50', 'measured_b50', True),
    'WinfT uniform, 50 %': ('winft_uniform_b50', 'uniform_b50', True),
    'ViT trained on (fine-tune)': ('ft_vit', None, False),
    'WinfT measured 25 % from the ViT (fine-tune)': ('ft_winft_measured_b25', 'measured_b25', False),
    'WinfT uniform 25 % from the ViT (fine-tune)': ('ft_winft_uniform_b25', 'uniform_b25', False),
    'WinfT measured 50 % from the ViT (fine-tune)': ('ft_winft_measured_b50', 'measured_b50', False),
    'WinfT uniform 50 % from the ViT (fine-tune)': ('ft_winft_uniform_b50', 'uniform_b50', False),
    'ViT trained on, lighter augmentation': ('ft_vit_light', None, False),
    'WinfT measured 50 % from the ViT, lighter augmentation': ('ft_light_winft_measured_b50', 'measured_b50', False),
}


def attention_pairs(spec: WindowSpec, heads: int = 4, prefix: int = 1) -> int:
    """Query-key pairs one image's attention computes: every head of every block; a global block
    all T^2 pairs, a windowed one the prefix rows plus each patch's prefix keys and window."""
    n = spec.grid[0] * spec.grid[1]
    t = prefix + n
    total = 0
    for i in range(spec.depth):
        a = spec.areas(i)
        total += heads * (t * t if a is None else prefix * t + n * prefix + int(a.sum() / (a.shape[0] if a.ndim == 3 else 1)))
    return total


def cmd_speed(args) -> int:
    """Train and inference images/s of every arm's architecture, side by side in one run."""
    from vitfree.benchmark import interleaved, machine_info
    work = Path(args.work)
    if args.threads:
        torch.set_num_threads(args.threads)
    models, specs = {}, {}
    for arm, (_, spec_name, scratch) in ARMS.items():
        if not scratch:
            continue
        spec = WindowSpec.all_global(6, 14) if spec_name is None else WindowSpec.load(spec_path(work, spec_name))
        specs[arm] = spec
        models[arm] = vitfree.create_winft('vit_micro_patch2_28', windows=spec)
    xt, yt = torch.randn(RECIPE['batch_size'], 3, 28, 28), torch.randint(0, 10, (RECIPE['batch_size'],))
    xi = torch.randn(500, 3, 28, 28)
    opts = {a: torch.optim.AdamW(m.parameters(), lr=1e-4) for a, m in models.items()}

    def train(a):
        m = models[a].train()
        torch.nn.functional.cross_entropy(m(xt), yt).backward()
        opts[a].step()
        opts[a].zero_grad(set_to_none=True)

    def infer(a):
        with torch.no_grad():
            models[a].eval()(xi)
    tr = interleaved({a: (lambda a=a: train(a)) for a in models}, reps=args.reps, warmup=2)
    inf = interleaved({a: (lambda a=a: infer(a)) for a in models}, reps=args.reps, warmup=1)
    res = {'machine': machine_info(), 'reps': args.reps, 'arms': {}}
    for a in models:
        res['arms'][a] = {'train_img_s': len(yt) / tr[a]['median'], 'infer_img_s': len(xi) / inf[a]['median'],
                          'attention_pairs': attention_pairs(specs[a]), 'backends': models[a].attn_backends()}
        log(f'speed: {a}: train {res["arms"][a]["train_img_s"]:.0f} img/s, infer {res["arms"][a]["infer_img_s"]:.0f} '
            f'img/s, {res["arms"][a]["attention_pairs"]:,} attention pairs per image')
    (work / 'speed.json').write_text(json.dumps(res, indent=1) + '\n')
    return 0


# ---- results, plot, pictures ---------------------------------------------------------------------
RESULTS = ROOT / 'benchmarks' / 'results'


def _records(work: Path, name: str) -> List[Dict[str, Any]]:
    out = []
    for seed in SEEDS:
        f = run_dir(work, name, seed) / 'result.json'
        if f.is_file():
            out.append(json.loads(f.read_text()))
    return out


def cmd_report(args) -> int:
    """Every arm's results so far (JSON + markdown), the accuracy-against-cost plot and the ERF
    pictures of the chosen specs, under benchmarks/results/."""
    work = Path(args.work)
    sel_file = work / 'specs' / 'selection.json'
    sel = json.loads(sel_file.read_text()) if sel_file.is_file() else None
    speed = json.loads((work / 'speed.json').read_text()) if (work / 'speed.json').is_file() else None
    analyses = json.loads((work / 'analyses.json').read_text()) if (work / 'analyses.json').is_file() else None
    recheck = json.loads((work / 'erf_recheck.json').read_text()) if (work / 'erf_recheck.json').is_file() else None
    arms: Dict[str, Any] = {}
    # the speed run times each architecture once (under its from-scratch arm); fine-tuned arms share it
    timed = {s: a for a, (_, s, scratch) in ARMS.items() if scratch}
    for arm, (name, spec_name, scratch) in ARMS.items():
        recs = _records(work, name)
        spec = WindowSpec.all_global(6, 14) if spec_name is None else (
            WindowSpec.load(spec_path(work, spec_name)) if spec_path(work, spec_name).is_file() else None)
        acc = np.array([r['test_top1'] for r in recs])
        arms[arm] = {
            'run': name, 'windows': spec_name or 'global', 'from_scratch': scratch,
            'seeds': [r['seed'] for r in recs], 'test_top1': acc.round(2).tolist(),
            'test_top1_mean': float(acc.mean()) if len(acc) else None,
            'test_top1_std': float(acc.std(ddof=1)) if len(acc) > 1 else None,
            'val_top1': [round(r['val_top1'], 2) for r in recs],
            'attention_pairs': attention_pairs(spec) if spec is not None else None,
            'cost_share': spec_cost(spec) if spec is not None else None,
            'train_hours': [round(r['train_time_s'] / 3600, 2) for r in recs],
            'ran_on': sorted({'2-core CPU, 1-2 threads' if r['device'] == 'cpu' else r['device'] for r in recs}),
            'speed': (speed or {}).get('arms', {}).get(timed.get(spec_name, arm))}
    res = {'protocol': {'data': 'Fashion-MNIST: 55,000 train, fixed 5,000 validation (last 5,000 of the training '
                                'file), 10,000 test (used once per run)',
                        'recipe': {k: list(v) if isinstance(v, tuple) else v for k, v in RECIPE.items()},
                        'fine_tune_recipe': {k: list(v) if isinstance(v, tuple) else v for k, v in FT_RECIPE.items()},
                        'light_recipe': {k: list(v) if isinstance(v, tuple) else v for k, v in LIGHT_RECIPE.items()},
                        'model': 'vit_micro_patch2_28 (timm VisionTransformer: 28x28 px, patch 2 -> 14x14 grid, '
                                 'dim 64, depth 6, 4 heads, 0.31M parameters); WinfT = the same with windows',
                        'seeds': list(SEEDS), 'budgets_percent': list(BUDGETS)},
           'versions': f'vitfree {vitfree.__version__}, timm {timm.__version__}, torch {torch.__version__}',
           'arms': arms, 'paired': [paired(arms, a, b) for a, b in PAIRS], 'selection': sel,
           'speed_machine': (speed or {}).get('machine'), 'analyses': analyses, 'erf_recheck': recheck}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / 'fmnist_study.json').write_text(json.dumps(res, indent=1) + '\n')
    pictures = _erf_pictures(work, sel) if sel else {}
    _plot(arms, RESULTS / 'fmnist_study.png')
    (RESULTS / 'fmnist_study.md').write_text(_markdown(res, pictures))
    log(f'report: wrote {RESULTS / "fmnist_study.md"}')
    return 0


# the decisive comparisons of issue 19: (a, b) -> a minus b, paired by seed
PAIRS = (('WinfT measured, 25 %', 'WinfT uniform, 25 %'), ('WinfT measured, 25 %', 'ViT'),
         ('WinfT uniform, 25 %', 'ViT'), ('WinfT measured, 50 %', 'WinfT uniform, 50 %'),
         ('WinfT measured, 50 %', 'ViT'), ('WinfT uniform, 50 %', 'ViT'),
         ('WinfT measured 25 % from the ViT (fine-tune)', 'WinfT uniform 25 % from the ViT (fine-tune)'),
         ('WinfT measured 25 % from the ViT (fine-tune)', 'ViT trained on (fine-tune)'),
         ('WinfT measured 50 % from the ViT (fine-tune)', 'WinfT uniform 50 % from the ViT (fine-tune)'),
         ('WinfT measured 50 % from the ViT (fine-tune)', 'ViT trained on (fine-tune)'))


def paired(arms: Dict[str, Any], a: str, b: str) -> Dict[str, Any]:
    """Test top-1 of arm ``a`` minus arm ``b`` on the seeds both have: per seed, the mean and its 95 %
    interval (Student t, n - 1 degrees of freedom; none with fewer than two seeds)."""
    from scipy import stats
    da = dict(zip(arms[a]['seeds'], arms[a]['test_top1']))
    db = dict(zip(arms[b]['seeds'], arms[b]['test_top1']))
    seeds = sorted(set(da) & set(db))
    d = np.array([da[k] - db[k] for k in seeds])
    out: Dict[str, Any] = {'a': a, 'b': b, 'seeds': seeds, 'differences': d.round(2).tolist(),
                           'mean': float(d.mean()) if len(d) else None, 'ci95': None}
    if len(d) > 1:
        half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
        out['ci95'] = [float(d.mean()) - half, float(d.mean()) + half]
    return out


def _paired_lines(res: Dict[str, Any]) -> List[str]:
    lines = ['## Paired differences (test top-1, percentage points; the same seed in both arms)', '',
             '| comparison | seeds | per seed | mean | 95 % interval |', '|---|---|---|---|---|']
    for c in res['paired']:
        ci = c['ci95']
        lines.append(f'| {c["a"]} minus {c["b"]} | {len(c["seeds"])} | '
                     f'{", ".join(f"{v:+.2f}" for v in c["differences"]) or "-"} | {_fmt(c["mean"], "+.2f")} | '
                     f'{"-" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"} |')
    return lines + ['', 'An interval needs two seeds; with three it is wide (t = 4.30 at 2 degrees of freedom).', '']


def _plot(arms: Dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8.5, 5.2), dpi=110)
    missing = [arm for arm, a in arms.items() if not a['test_top1'] or a['attention_pairs'] is None]
    for arm, a in arms.items():
        if arm in missing:
            continue
        err = a['test_top1_std'] or 0.0
        marker = 'o' if a['from_scratch'] else 's'
        ax.errorbar(a['attention_pairs'] / 1e3, a['test_top1_mean'], yerr=err, fmt=marker, capsize=4, ms=8,
                    label=f'{arm} (n={len(a["test_top1"])})')
    ax.set_xlabel('attention query-key pairs per image (thousands; all heads and blocks)')
    ax.set_ylabel('test top-1 (%), mean ± std over seeds')
    ax.set_title('Fashion-MNIST: accuracy against attention cost (circles: from scratch; squares: fine-tuned)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
    if missing:  # every arm is named on the plot, the ones without a finished run too
        fig.text(0.01, 0.01, 'not run yet: ' + '; '.join(missing), fontsize=7, wrap=True, va='bottom')
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _erf_pictures(work: Path, sel: Dict[str, Any]) -> Dict[str, Dict[str, str]]:
    """Pictures of the chosen specs' ERFs (rectangles, excess tendency, interaction matrices)."""
    from vitfree.analysis import erf_from_interaction
    from vitfree.analysis.interaction import InteractionResult
    from vitfree.analysis.plots import erf_pictures
    out = RESULTS / 'fmnist_study_erf'
    out.mkdir(parents=True, exist_ok=True)
    model = load_run(work, 'vit')
    image = val_split(model, 0, 1)[0][0]
    made = {}
    for b, c in sel.get('budgets', {}).items():
        maps = torch.load(work / 'erf' / f'interaction_{c["estimator"]}.pt', weights_only=True)
        inter = InteractionResult(maps=maps, grid=(14, 14), estimator=c['estimator'], num_images=sel['erf_images'],
                                  num_prefix_tokens=1, data='Fashion-MNIST validation images', model='run vit_s0')
        erf = erf_from_interaction(inter, tau=c['tau'], gamma=c['gamma'])
        files = erf_pictures(erf, out, image=image, model=model, prefix=f'b{b}_{c["estimator"]}_')
        made[b] = {k: str(v.relative_to(RESULTS)) for k, v in files.items()}
        made[b]['summary'] = erf.format_summary('markdown')
    return made


def _fmt(v: Optional[float], spec: str = '.2f') -> str:
    return '-' if v is None else format(v, spec)


def _markdown(res: Dict[str, Any], pictures: Dict[str, Dict[str, str]]) -> str:
    p = res['protocol']
    lines = ['# Do measured windows pay? Fashion-MNIST study', '',
             f'Data: {p["data"]}. Model: {p["model"]}. Versions: {res["versions"]}.', '',
             f'Recipe (every from-scratch arm, seeds {p["seeds"]}): {p["recipe"]}.', '',
             f'Fine-tuning arms start from the trained ViT of the same seed: {p["fine_tune_recipe"]}.', '',
             'The ViT trained on with lighter augmentation (a last attempt at a stronger baseline, from the same '
             f'ViT), and the 50 % WinfT fine-tuned with the same recipe: {p.get("light_recipe")}.', '',
             '## Arms', '',
             '| arm | windows | seeds done | test top-1 mean ± std | per seed | attention pairs / image | cost (share of '
             'grid) | train img/s | infer img/s | train hours per run | ran on |', '|' + '---|' * 11]
    for arm, a in res['arms'].items():
        sp = a['speed'] or {}
        lines.append(f'| {arm} | {a["windows"]} | {len(a["seeds"])} of {len(p["seeds"])} | '
                     f'{_fmt(a["test_top1_mean"])} ± {_fmt(a["test_top1_std"])} | '
                     f'{", ".join(f"{v:.2f}" for v in a["test_top1"]) or "-"} | '
                     f'{a["attention_pairs"]:,} | {_fmt(a["cost_share"], ".3f")} | '
                     f'{_fmt(sp.get("train_img_s"), ".0f")} | {_fmt(sp.get("infer_img_s"), ".0f")} | '
                     f'{", ".join(str(h) for h in a["train_hours"]) or "-"} | {"; ".join(a["ran_on"]) or "-"} |'
                     if a['attention_pairs'] is not None else
                     f'| {arm} | {a["windows"]} (not selected yet) | 0 of {len(p["seeds"])} | - | - | - | - | - | - | - | - |')
    if res.get('speed_machine'):
        m = res['speed_machine']
        lines += ['', f'Images/s: every arm\'s architecture timed side by side in one run on {m["cpu"]}, '
                      f'{m["threads"]} threads (training batch {RECIPE["batch_size"]}, AdamW; inference batch 500); a fine-tuned '
                      'arm has the figures of the from-scratch arm with the same windows (the same architecture).']
    lines += ['', 'Train hours: wall time of the training loop per run. CPU runs used one or two threads, as many as '
                  'the other jobs on the machine left them (the queue is throttled by signal), so hours compare '
                  'runs only roughly; the images/s columns are the side-by-side speed measurement.',
              '', '![accuracy against cost](fmnist_study.png)', '']
    lines += _paired_lines(res)
    sel = res.get('selection')
    if sel:
        lines += ['## Windows chosen at each budget (validation only)', '',
                  f'ERFs of the seed-0 ViT on {sel["erf_images"]} validation images; candidates scored by top-1 on the '
                  f'other {sel["selection_images"]} validation images with the windows imposed on the trained ViT '
                  f'(ViT: {sel["vit_val_top1"]:.2f}%). Rule: {sel["rule"]}.', '',
                  '| budget | estimator | tau | gamma | cost | global blocks | imposed val top-1 | uniform: cost, '
                  'imposed val top-1 |', '|' + '---|' * 8]
        for b, c in sel['budgets'].items():
            lines.append(f'| {b} % | {c["estimator"]} | {c["tau"]} | {c["gamma"]} | {c["cost"]:.3f} | '
                         f'{c["global_blocks"]} | {c["val_top1_imposed"]:.2f} | {c["uniform_cost"]:.3f}, '
                         f'{c["uniform_val_top1_imposed"]:.2f} |')
        lines += ['', 'Best per estimator (same rule, one estimator at a time), with the mean ERF area of every '
                      'block in patches (of 196):', '',
                  '| estimator, budget | tau | gamma | cost | global blocks | mean ERF area, blocks 0-5 | '
                  'imposed val top-1 |', '|---|---|---|---|---|---|---|']
        for k, c in sel['per_estimator'].items():
            lines.append(f'| {k} | {c["tau"]} | {c["gamma"]} | {c["cost"]:.3f} | {c["global_blocks"]} | '
                         f'{", ".join(f"{a:.1f}" for a in c["mean_erf_area"])} | {c["val_top1_imposed"]:.2f} |')
        rc = res.get('erf_recheck')
        if rc:
            lines += ['', f'The same ERFs measured on {rc["run"]} (the same images, estimator, tau and gamma) '
                          f'against {rc["against"]}, which the specs were made from:', '',
                      '| budget | mean ERF area, blocks 0-5 | vit_s0 | cost | vit_s0 | identical windows (all blocks) |',
                      '|---|---|---|---|---|---|']
            for b, c in rc['budgets'].items():
                lines.append(f'| {b} % | {", ".join(f"{v:.1f}" for v in c["mean_area"])} | '
                             f'{", ".join(f"{v:.1f}" for v in c["vit_s0_mean_area"])} | {c["cost"]:.3f} | '
                             f'{c["vit_s0_cost"]:.3f} | {100 * c["same_windows_share"]:.0f} % |')
        for b, pics in pictures.items():
            lines += ['', f'### ERFs behind the {b} % spec', '', pics['summary'], '']
            lines += [f'![{k}]({v})' for k, v in pics.items() if k != 'summary']
    an = res.get('analyses')
    if an:
        e, s, r = an['entropy'], an['sift'], an['removal']
        lines += ['', f'## The seeds\' other findings on the strong ViT ({an.get("model", "run vit_s0")}, {an["images"]} '
                  f'validation images)', '',
                  f'- Head entropy by block (mean over heads; max ln 14 = {e["max_possible"]:.3f}): '
                  f'{", ".join(f"{v:.3f}" for v in e["per_block"])}; Spearman with depth {e["spearman_depth"]:+.2f}.',
                  f'- SIFT: {s["keypoints_per_image_mean"]:.1f} keypoints per 28x28 image on average, '
                  f'{s["images_without_keypoints"]} images without any. Query lift by block (1 = no preference for '
                  f'SIFT-dense keys): {", ".join(f"{v:.3f}" for v in s["query_lift_per_block"])}.',
                  '- Patch removal, accuracy (%) as the least important patches are hidden as keys:', '',
                  '| removed | ' + ' | '.join(r['accuracy']) + ' |', '|---|' + '---|' * len(r['accuracy'])]
        for k, f in enumerate(r['fractions']):
            lines.append(f'| {100 * f:.0f} % | ' + ' | '.join(f'{100 * v[k]:.1f}' for v in r['accuracy'].values()) + ' |')
    return '\n'.join(lines) + '\n'


# ---- the study's state, committed so that another workspace can continue it ------------------------
STATE = RESULTS / 'fmnist_study_state.tar.gz'


def cmd_snapshot(args) -> int:
    """Pack what the study has finished into ``benchmarks/results/fmnist_study_state.tar.gz``: the
    specs, the ERF interaction maps, the analyses, speed and recheck results, every finished run's
    record and metrics, the trained ViT of every seed (the ERF pictures, any re-selection and the
    fine-tuning arms read them) and, of each run in progress, its newest checkpoint (a few MB), so
    a fresh machine loses at most the steps since that checkpoint.  Continue elsewhere with
    ``tar -xzf benchmarks/results/fmnist_study_state.tar.gz -C bench-out/fmnist-v2``."""
    import tarfile
    work = Path(args.work)
    files = sorted(p for p in (work / 'specs').glob('*.yaml'))
    files += sorted((work / 'erf').glob('*.pt')) + [work / f for f in ('analyses.json', 'speed.json',
                                                                        'erf_recheck.json')]
    for run in sorted(p for p in (work / 'runs').glob('*') if p.is_dir()):
        files += [run / 'result.json', run / 'metrics.jsonl', run / 'finetune_config.json']
        ckpts = sorted((run / 'checkpoints').glob('ckpt-*'))
        if not (run / 'result.json').is_file() and ckpts:  # in progress: its newest checkpoint
            files += sorted(f for f in ckpts[-1].rglob('*') if f.is_file())
    for seed in SEEDS:
        files += sorted((run_dir(work, 'vit', seed) / 'model').glob('*'))
    with tarfile.open(STATE, 'w:gz') as tar:
        for f in files:
            if f.is_file():
                tar.add(f, arcname=str(f.relative_to(work)))
    log(f'snapshot: {len(files)} files -> {STATE} ({STATE.stat().st_size / 1e6:.1f} MB)')
    return 0


# ---- ship the trained pair -------------------------------------------------------------------------


def _recipe_of(rec: Dict[str, Any]) -> Dict[str, Any]:
    plain = lambda r: {k: list(v) if isinstance(v, tuple) else v for k, v in r.items()}  # noqa: E731
    if not rec['init']:
        return plain(RECIPE)
    return {'first': plain(RECIPE), 'then': rec['recipe'],
            'note': 'trained from scratch with the first recipe (run vit_s0), then on with the second'}


def cmd_ship(args) -> int:
    """Ship the strongest seed-0 ViT and the best seed-0 WinfT, both chosen by validation top-1.

    The ViT is the 30-epoch run ``vit_s0`` or the same run trained on (``ft_vit_s0``,
    ``ft_vit_light_s0``), whichever scores highest on validation; the WinfT is the best of the
    seed-0 WinfT runs with measured windows.  Writes weights/*.fmnist.safetensors, the WinfT's spec
    to configs/, the interaction maps the spec was measured from (weights/%s, read by
    ``make demo``), and records SHA-256, recipe, test top-1 and the top-1 on the 1,000 bundled
    test images in weights/manifest.json.
    """ % ERF_MAPS_FILE
    from safetensors.torch import load_file, save_file
    from vitfree.data import FASHION_MNIST_CLASSES
    from vitfree.weights import add_to_manifest
    work = Path(args.work)
    vit = strongest_vit(work)
    # the shipped WinfT carries measured windows (the uniform arms are the comparison, not the product)
    winfts = [r for name, spec, _ in ARMS.values() if spec and spec.startswith('measured')
              for r in _records(work, name) if r['seed'] == 0]
    best = max(winfts, key=lambda r: r['val_top1']) if winfts else None
    subset = np.load(ROOT / 'tests' / 'data' / 'fashion_mnist_test_first1000.npz')
    shipped = [('vit_micro_patch2_28', vit, None)]
    if best is not None:
        spec = WindowSpec.load(best['windows'])
        spec.provenance['shipped_from'] = f'benchmarks/fmnist_study.py run {best["name"]}_s0 (best validation top-1 of ' \
                                          f'the seed-0 WinfT runs with measured windows)'
        spec.save(ROOT / 'configs' / 'winft_micro_fmnist.yaml')
        shipped.append(('winft_micro_patch2_28', best, spec))
        est = spec.provenance['estimator']
        maps = torch.load(work / 'erf' / f'interaction_{est}.pt', weights_only=True)
        save_file({f'block_{b}': m.float().contiguous() for b, m in maps.items()},
                  str(ROOT / 'weights' / ERF_MAPS_FILE),
                  metadata={'estimator': est, 'tau': str(spec.provenance['tau']),
                            'gamma': str(spec.provenance['gamma']), 'grid': '14,14',
                            'data': str(spec.provenance.get('data')), 'model': 'vit_micro_patch2_28, run vit_s0'})
    for arch, rec, spec in shipped:
        sd = load_file(str(Path(rec['export']) / 'model.safetensors'))
        dst = ROOT / 'weights' / f'{arch}.fmnist.safetensors'
        save_file({k: v.contiguous() for k, v in sd.items()}, str(dst), metadata={'format': 'pt'})
        m = timm.create_model(arch, windows=spec) if spec is not None else timm.create_model(arch)
        m.load_state_dict(sd)
        acc = _subset_top1(m.eval(), subset)
        add_to_manifest(dst, name=f'{arch}.fmnist', test_top1_full=round(rec['test_top1'], 2),
                        test_top1_first1000=acc, val_top1=round(rec['val_top1'], 2), seed=rec['seed'],
                        recipe=_recipe_of(rec),
                        initialised_from=('the seed-0 ViT after the 30-epoch recipe (run vit_s0)' if rec['init']
                                          else 'random (trained from scratch)'),
                        windows='winft_micro_fmnist' if spec is not None else 'global',
                        source=f'benchmarks/fmnist_study.py run {rec["name"]}_s{rec["seed"]}',
                        label_names=list(FASHION_MNIST_CLASSES))
        log(f'ship: {dst.name} from {rec["name"]}_s0: test top-1 {rec["test_top1"]:.2f}% (full), {acc:.2f}% '
            f'(bundled 1,000), val top-1 {rec["val_top1"]:.2f}%')
    return 0


@torch.no_grad()
def _subset_top1(model, subset) -> float:
    cfg = timm.data.resolve_data_config({}, model=model)
    x = torch.from_numpy(subset['images']).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    x = (x - torch.tensor(cfg['mean']).view(1, 3, 1, 1)) / torch.tensor(cfg['std']).view(1, 3, 1, 1)
    pred = model(x).argmax(-1)
    return round(float((pred == torch.from_numpy(subset['labels']).long()).float().mean() * 100), 2)


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
    an = sub.add_parser('analyses', help='head entropy, SIFT lift and patch removal of the seed-0 ViT')
    an.add_argument('--threads', type=int, default=None)
    an.add_argument('--images', type=int, default=ERF_IMAGES)
    an.add_argument('--run', default=None,
                    help='which seed-0 ViT run (default: vit, the one the ERFs were measured on)')
    sp = sub.add_parser('speed', help="every arm's train and inference images/s, side by side")
    sp.add_argument('--threads', type=int, default=2)
    sp.add_argument('--reps', type=int, default=5)
    rc = sub.add_parser('recheck', help="the chosen specs' ERFs measured again on another seed-0 ViT run")
    rc.add_argument('--threads', type=int, default=None)
    rc.add_argument('--run', default=None, help='seed-0 ViT run (default: the one shipped, by validation)')
    sub.add_parser('report', help='results, plot and ERF pictures under benchmarks/results/')
    sub.add_parser('snapshot', help="pack the finished state into benchmarks/results/ (to continue elsewhere)")
    sub.add_parser('ship', help='copy the best seed-0 ViT and WinfT (by validation) into weights/ and configs/')
    args = p.parse_args(argv)
    stages = {'train': cmd_train, 'select': cmd_select, 'analyses': cmd_analyses, 'recheck': cmd_recheck,
              'speed': cmd_speed, 'report': cmd_report, 'snapshot': cmd_snapshot, 'ship': cmd_ship}
    return stages[args.stage](args)


if __name__ == '__main__':
    sys.exit(main())
