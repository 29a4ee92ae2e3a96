"""Measured windows on real data: the Fashion-MNIST study (one command, resumable).

    python benchmarks/fmnist_study.py                 # the full protocol, results in benchmarks/results/
    python benchmarks/fmnist_study.py --quick         # a smoke run in a couple of minutes

Protocol (see the README section "Measured windows on Fashion-MNIST"):

a. train the ViT baseline (``vit_micro_patch2_28`` shape; run as a WinfT whose blocks are all global,
   which is exactly the ViT: tested in tests/test_models.py) on a class-balanced training subset;
b. measure its ERFs with ``vitfree.measure_erf`` for a small grid of (estimator, tau, gamma) on the
   validation split only, and pick a spec by a rule fixed in advance (below);
c. train a WinfT with the measured spec from scratch with the same budget, augmentation and seed, and a
   WinfT with a uniform square window of the same mean area in the same windowed blocks;
d. downstream, fine-grained: pretrain a ViT on the six classes other than T-shirt/top, Pullover, Coat
   and Shirt, measure its spec, then fine-tune ViT and WinfT from those upstream weights on the four
   confusable classes;
e. every arm for each seed; report mean +- std test top-1, time per epoch and throughput.

Spec selection rule (validation split only): impose each candidate spec on the trained seed-0 ViT
without retraining and measure validation top-1; among candidates whose drop is at most
``--max-val-drop`` points, take the one with the smallest mean window area.

Everything is resumable: each training run keeps checkpoints (vitfree.train) and is skipped once its
result file exists; data folders and measured specs are reused when present.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402

import vitfree  # noqa: E402
from vitfree.windows import WindowSpec, window_areas  # noqa: E402

CLASS_DIRS = ['0_tshirt_top', '1_trouser', '2_pullover', '3_dress', '4_coat', '5_sandal', '6_shirt', '7_sneaker',
              '8_bag', '9_ankle_boot']
DOWN = [0, 2, 4, 6]                     # T-shirt/top, Pullover, Coat, Shirt (confusable)
UP = [c for c in range(10) if c not in DOWN]
MODEL = 'winft_micro_patch2_28'


def log(msg: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


# ---- data ---------------------------------------------------------------------------------------
def write_folder(root: Path, splits: Dict[str, Any], classes: Sequence[int]) -> Path:
    """Materialise image folders root/{train,val,test}/<class>/<i>.png (skipped if complete)."""
    from PIL import Image
    done = root / '.complete'
    if done.is_file():
        return root
    if root.exists():
        shutil.rmtree(root)
    for split, (images, labels) in splits.items():
        for c in classes:
            d = root / split / CLASS_DIRS[c]
            d.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(labels == c):
                Image.fromarray(images[i]).save(d / f'{i:05d}.png')
    done.write_text('ok\n')
    return root


def balanced_subset(labels: np.ndarray, per_class: int, classes: Sequence[int]) -> np.ndarray:
    """The first ``per_class`` indices of each class (deterministic)."""
    idx = [np.flatnonzero(labels == c)[:per_class] for c in classes]
    return np.sort(np.concatenate(idx))


def load_arrays():
    from vitfree.data import load_fashion_mnist
    out = {}
    for split in ('train', 'val', 'test'):
        ds = load_fashion_mnist(split)
        out[split] = (np.asarray(ds.images), np.asarray(ds.targets))
    return out


def make_data(work: Path, args) -> Dict[str, Path]:
    arr = load_arrays()
    tr, va, te = arr['train'], arr['val'], arr['test']

    def pick(pair, per_class, classes):
        i = balanced_subset(pair[1], per_class, classes)
        return pair[0][i], pair[1][i]

    folders = {}
    all10 = list(range(10))
    folders['all10'] = write_folder(work / 'data' / 'all10', {
        'train': pick(tr, args.train_per_class, all10), 'val': pick(va, args.val_per_class, all10),
        'test': pick(te, args.test_per_class, all10)}, all10)
    folders['up6'] = write_folder(work / 'data' / 'up6', {
        'train': pick(tr, args.train_per_class, UP), 'val': pick(va, args.val_per_class, UP),
        'test': pick(te, args.test_per_class, UP)}, UP)
    folders['down4'] = write_folder(work / 'data' / 'down4', {
        'train': pick(tr, args.down_per_class, DOWN), 'val': pick(va, args.val_per_class, DOWN),
        'test': pick(te, args.test_per_class, DOWN)}, DOWN)
    return folders


# ---- training ---------------------------------------------------------------------------------
def train_cfg(args) -> Dict[str, Any]:
    """One budget and augmentation for every arm."""
    return dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=0.05, warmup_epochs=1,
                smoothing=0.1, scale=(0.6, 1.0), hflip=0.5, color_jitter=0.0, workers=0, verify_images=False,
                checkpoint_every=50, keep_last=2, resume=True, log_interval=20, progress=False,
                threads=args.threads, amp=None)


def run_training(name: str, work: Path, data: Path, windows: Path, seed: int, args, model: str = MODEL,
                 pretrained: bool = False, epochs: Optional[int] = None) -> Dict[str, Any]:
    """One training run (resumable); returns its result record (cached in result.json)."""
    from vitfree.train.finetune import finetune
    out = work / 'runs' / f'{name}_s{seed}'
    res_file = out / 'result.json'
    if res_file.is_file():
        return json.loads(res_file.read_text())
    log(f'train {name} seed {seed} on {data.name} ({windows.name})')
    cfg = train_cfg(args)
    if epochs is not None:
        cfg['epochs'] = epochs
    t0 = time.perf_counter()
    res = finetune(model=model, data=str(data), output=str(out), windows=str(windows), seed=seed,
                   pretrained=pretrained, **cfg)
    wall = time.perf_counter() - t0
    test = evaluate_folder(res.model, data / 'test', res.classes)
    per_epoch = [m['train_time_s'] for m in res.metrics]
    rec = {'name': name, 'seed': seed, 'data': data.name, 'windows': windows.name, 'test_top1': test['top1'],
           'test_images': test['count'], 'val_top1': res.metrics[-1]['top1'],
           'epoch_time_s': float(np.median(per_epoch)) if per_epoch else None,
           'train_img_per_s': float(np.median([m['img_per_s'] for m in res.metrics if m.get('img_per_s')])),
           'wall_s': wall, 'export': str(res.export), 'history': res.metrics}
    res_file.write_text(json.dumps(rec, indent=1) + '\n')
    log(f'  -> test top-1 {rec["test_top1"]:.2f}% ({rec["epoch_time_s"]:.1f}s/epoch, '
        f'{rec["train_img_per_s"]:.0f} img/s)')
    return rec


@torch.no_grad()
def evaluate_folder(model, folder: Path, classes: Sequence[str], batch_size: int = 256) -> Dict[str, float]:
    from vitfree.data import build_dataset, TransformDataset
    from vitfree.train.finetune import evaluate
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = timm.data.create_transform(**cfg, is_training=False)
    ds = TransformDataset(build_dataset(folder.parent, folder.name, classes=list(classes), verify=False), tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=0)
    return evaluate(model, loader, torch.device('cpu'))


def val_tensors(folder: Path, model, classes: Sequence[str], limit: Optional[int] = None):
    from vitfree.data import build_dataset
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = timm.data.create_transform(**cfg, is_training=False)
    ds = build_dataset(folder.parent, folder.name, classes=list(classes), verify=False)
    n = len(ds) if limit is None else min(limit, len(ds))
    xs, ys = zip(*[(tf(ds[i][0]), ds[i][1]) for i in range(n)])
    return torch.stack(xs), torch.tensor(ys)


# ---- specs --------------------------------------------------------------------------------------
def all_global_spec(work: Path) -> Path:
    p = work / 'specs' / 'all_global.yaml'
    if not p.is_file():
        WindowSpec.all_global(6, 14).save(p)
    return p


def mean_window_area(spec: WindowSpec) -> float:
    n = spec.grid[0] * spec.grid[1]
    return float(np.mean([n if a is None else a.mean() for a in (spec.areas(i) for i in range(spec.depth))]))


def uniform_like(spec: WindowSpec) -> WindowSpec:
    """A uniform square window in the measured spec's windowed blocks with (nearly) the same mean
    area; the global blocks stay global."""
    local = [i for i in range(spec.depth) if not spec.is_global(i)]
    glob = [i for i in range(spec.depth) if spec.is_global(i)]
    if not local:
        return WindowSpec.all_global(spec.depth, spec.grid)
    target = float(np.mean([spec.areas(i).mean() for i in local]))
    best = min(range(max(spec.grid)), key=lambda r: abs(
        window_areas(np.full(spec.grid + (4,), r, dtype=np.int32), spec.grid).mean() - target))
    u = WindowSpec.uniform(spec.depth, spec.grid, best, global_blocks=glob)
    u.provenance.update(reason=f'uniform square radius {best} matching the mean window area {target:.1f} of '
                               f'the measured spec in blocks {local}')
    return u


def measure_and_select(work: Path, tag: str, vit_export: Path, data: Path, classes, args) -> Dict[str, Any]:
    """Step b: candidate specs from the trained ViT, selected on the validation split."""
    sel_file = work / 'specs' / f'{tag}_selection.json'
    if sel_file.is_file():
        return json.loads(sel_file.read_text())
    model = timm.create_model(f'local-dir:{vit_export}', pretrained=True).eval()
    x, y = val_tensors(data / 'val', model, classes, limit=args.erf_images)
    xv, yv = val_tensors(data / 'val', model, classes)
    state = model.state_dict()

    def val_top1(spec: Optional[WindowSpec]) -> float:
        m = timm.create_model(f'local-dir:{vit_export}', pretrained=False, windows=spec).eval()
        m.load_state_dict(state)
        with torch.no_grad():
            pred = torch.cat([m(xv[i:i + 500]).argmax(-1) for i in range(0, len(xv), 500)])
        return float((pred == yv).float().mean() * 100)

    base = val_top1(None)
    cands = []
    for est in args.estimators:
        for tau in args.taus:
            for gamma in args.gammas:
                t0 = time.perf_counter()
                spec = vitfree.measure_erf(model, (x, y), estimator=est, tau=tau, gamma=gamma, progress=False,
                                           data=f'Fashion-MNIST {data.name} validation split, {len(x)} images',
                                           checkpoint=f'{vit_export} (trained here, seed 0)', batch_size=50)
                acc = val_top1(spec)
                name = f'{tag}_{est}_tau{tau}_gamma{gamma}'
                path = spec.save(work / 'specs' / f'{name}.yaml')
                cands.append({'name': name, 'path': str(path), 'estimator': est, 'tau': tau, 'gamma': gamma,
                              'mean_area': mean_window_area(spec), 'global_blocks':
                                  [i for i in range(spec.depth) if spec.is_global(i)],
                              'val_top1_imposed': acc, 'val_drop': base - acc,
                              'measure_s': time.perf_counter() - t0})
                log(f'  {name}: mean area {cands[-1]["mean_area"]:.1f}, imposed val top-1 {acc:.2f} '
                    f'(ViT {base:.2f})')
    ok = [c for c in cands if c['val_drop'] <= args.max_val_drop] or sorted(cands, key=lambda c: c['val_drop'])[:1]
    chosen = min(ok, key=lambda c: (c['mean_area'], c['val_drop']))
    sel = {'vit_val_top1': base, 'candidates': cands, 'chosen': chosen['name'], 'chosen_path': chosen['path'],
           'rule': f'smallest mean area with imposed val drop <= {args.max_val_drop} points'}
    sel_file.write_text(json.dumps(sel, indent=1) + '\n')
    return sel


# ---- report -------------------------------------------------------------------------------------
def summarise(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    acc = np.array([r['test_top1'] for r in records])
    return {'n': len(records), 'test_top1_mean': float(acc.mean()), 'test_top1_std': float(acc.std(ddof=1))
            if len(acc) > 1 else 0.0, 'seeds': [r['seed'] for r in records], 'test_top1': acc.tolist(),
            'epoch_time_s': float(np.mean([r['epoch_time_s'] for r in records])),
            'train_img_per_s': float(np.mean([r['train_img_per_s'] for r in records]))}


def write_results(out_dir: Path, results: Dict[str, Any], tag: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f'{tag}.json').write_text(json.dumps(results, indent=1) + '\n')
    lines = [f'# Fashion-MNIST study ({tag})', '',
             f'Command: `{results["command"]}`  ', f'Versions: {results["versions"]}  ',
             f'Budget: {results["budget"]}', '',
             '| arm | windows | test top-1 (mean ± std) | seeds | s/epoch | train img/s |', '|---|---|---|---|---|---|']
    for arm, s in results['arms'].items():
        lines.append(f'| {arm} | {s["windows"]} | {s["test_top1_mean"]:.2f} ± {s["test_top1_std"]:.2f} | '
                     f'{s["n"]} | {s["epoch_time_s"]:.1f} | {s["train_img_per_s"]:.0f} |')
    lines += ['', 'Per-seed test top-1: ' + '; '.join(
        f'{a}: {", ".join(f"{v:.2f}" for v in s["test_top1"])}' for a, s in results['arms'].items())]
    for key in ('selection_all10', 'selection_up6'):
        sel = results.get(key)
        if sel:
            lines += ['', f'Spec selection ({key}, rule: {sel["rule"]}; ViT val top-1 {sel["vit_val_top1"]:.2f}):', '',
                      '| candidate | mean area | global blocks | imposed val top-1 |', '|---|---|---|---|']
            for c in sel['candidates']:
                mark = ' **(chosen)**' if c['name'] == sel['chosen'] else ''
                lines.append(f'| {c["name"]}{mark} | {c["mean_area"]:.1f} | {c["global_blocks"]} | '
                             f'{c["val_top1_imposed"]:.2f} |')
    (out_dir / f'{tag}.md').write_text('\n'.join(lines) + '\n')


def ship(work: Path, sel: Dict[str, Any], vit_rec: Dict[str, Any], winft_rec: Dict[str, Any]) -> None:
    """Copy the measured spec to configs/ and the seed-0 weights to weights/, recording sha256, size
    and the accuracy on the bundled first-1000 test images in weights/manifest.json."""
    from safetensors.torch import load_file, save_file
    from vitfree.hub import add_to_manifest
    spec = WindowSpec.load(sel['chosen_path'])
    spec.provenance['selected_by'] = sel['rule']
    spec.save(ROOT / 'configs' / 'winft_micro_fmnist.yaml')
    subset = np.load(ROOT / 'tests' / 'data' / 'fashion_mnist_test_first1000.npz')
    for arch, rec in (('vit_micro_patch2_28', vit_rec), ('winft_micro_patch2_28', winft_rec)):
        sd = load_file(str(Path(rec['export']) / 'model.safetensors'))
        dst = ROOT / 'weights' / f'{arch}.fmnist.safetensors'
        save_file({k: v.contiguous() for k, v in sd.items()}, str(dst), metadata={'format': 'pt'})
        m = timm.create_model(arch, windows=spec) if arch.startswith('winft') else timm.create_model(arch)
        m.load_state_dict(sd)
        acc = subset_accuracy(m.eval(), subset)
        add_to_manifest(dst, name=f'{arch}.fmnist', test_top1_first1000=acc, test_top1_full=rec['test_top1'],
                        seed=rec['seed'], source=f'benchmarks/fmnist_study.py run {rec["name"]}_s{rec["seed"]}',
                        windows='winft_micro_fmnist' if arch.startswith('winft') else 'global')
        log(f'shipped {dst.name}: first-1000 test top-1 {acc:.2f}%')


@torch.no_grad()
def subset_accuracy(model, subset) -> float:
    cfg = timm.data.resolve_data_config({}, model=model)
    x = torch.from_numpy(subset['images']).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    mean = torch.tensor(cfg['mean']).view(1, 3, 1, 1)
    std = torch.tensor(cfg['std']).view(1, 3, 1, 1)
    pred = model((x - mean) / std).argmax(-1)
    return float((pred == torch.from_numpy(subset['labels']).long()).float().mean() * 100)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--work', default=str(ROOT / 'bench-out' / 'fmnist'), help='runs, data folders, specs')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--train-per-class', type=int, default=800)
    p.add_argument('--down-per-class', type=int, default=800)
    p.add_argument('--val-per-class', type=int, default=200)
    p.add_argument('--test-per-class', type=int, default=1000, help='1000 = the full test split')
    p.add_argument('--epochs', type=int, default=5)
    p.add_argument('--down-epochs', type=int, default=4)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--lr', type=float, default=1.5e-3)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--erf-images', type=int, default=200)
    p.add_argument('--estimators', nargs='+', default=['attention', 'attribution'])
    p.add_argument('--taus', type=float, nargs='+', default=[0.7, 0.8, 0.9])
    p.add_argument('--gammas', type=float, nargs='+', default=[0.6, 0.8])
    p.add_argument('--max-val-drop', type=float, default=1.0)
    p.add_argument('--part', choices=['all', 'all10', 'down'], default='all',
                   help='run only the 10-class arms (a-c) or only the downstream arms (d), e.g. in two processes '
                        'at once; a final run with --part all (everything cached) writes the results')
    p.add_argument('--quick', action='store_true', help='tiny smoke run (results tagged "quick", nothing shipped)')
    p.add_argument('--ship', action='store_true', help='copy the measured spec and seed-0 weights into the package')
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.train_per_class, args.down_per_class, args.val_per_class = [0, 1], 30, 30, 10
        args.epochs, args.down_epochs, args.erf_images, args.taus = 1, 1, 20, [0.9]
        args.test_per_class, args.gammas = 20, [0.6]
        args.estimators = ['attention']
        args.work = str(Path(args.work).with_name('fmnist-quick'))
    tag = 'fmnist_quick' if args.quick else 'fmnist_study'
    work = Path(args.work) / (f'tr{args.train_per_class}_dn{args.down_per_class}_va{args.val_per_class}'
                              f'_te{args.test_per_class}_ep{args.epochs}-{args.down_epochs}_lr{args.lr}')
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = make_data(work, args)
    glob = all_global_spec(work)
    classes10 = CLASS_DIRS
    classes6 = [CLASS_DIRS[c] for c in UP]

    # Seeds in the outer loop, so that an interrupted study already has every arm for the first seeds;
    # results are rewritten after each seed.
    vit, win, uni, up, down_vit, down_win = [], [], [], [], [], []
    sel = sel6 = None
    uni_path = work / 'specs' / 'all10_uniform_like.yaml'
    for seed in args.seeds:
        if args.part in ('all', 'all10'):
            # a. ViT baseline
            vit.append(run_training('vit', work, data['all10'], glob, seed, args))
            # b. measure on the first seed's ViT, select on validation
            if sel is None:
                sel = measure_and_select(work, 'all10', Path(vit[0]['export']), data['all10'], classes10, args)
                if not uni_path.is_file():
                    uniform_like(WindowSpec.load(sel['chosen_path'])).save(uni_path)
            # c. WinfT measured and uniform, same budget
            win.append(run_training('winft_measured', work, data['all10'], Path(sel['chosen_path']), seed, args))
            uni.append(run_training('winft_uniform', work, data['all10'], uni_path, seed, args))
        if args.part in ('all', 'down'):
            # d. downstream: upstream ViT on six classes, spec measured on it, fine-tune on the four
            # confusable ones
            up.append(run_training('up6_vit', work, data['up6'], glob, seed, args))
            if sel6 is None:
                sel6 = measure_and_select(work, 'up6', Path(up[0]['export']), data['up6'], classes6, args)
            src = f'local-dir:{up[-1]["export"]}'
            down_vit.append(run_training('down4_vit', work, data['down4'], glob, seed, args, model=src,
                                         pretrained=True, epochs=args.down_epochs))
            down_win.append(run_training('down4_winft', work, data['down4'], Path(sel6['chosen_path']), seed, args,
                                         model=src, pretrained=True, epochs=args.down_epochs))
        if args.part == 'all':
            report(args, argv, sel, sel6, uni_path, vit, win, uni, up, down_vit, down_win, t_start, tag)
    if args.part != 'all':
        return 0
    if args.ship and not args.quick:
        ship(work, sel, vit[0], win[0])
    return 0


def report(args, argv, sel, sel6, uni_path, vit, win, uni, up, down_vit, down_win, t_start, tag) -> None:
    measured6 = Path(sel6['chosen_path'])
    arms = {
        'ViT (all global)': (vit, 'global'),
        'WinfT measured': (win, Path(sel['chosen_path']).stem),
        'WinfT uniform, same mean area': (uni, uni_path.stem),
        'upstream ViT, 6 classes': (up, 'global'),
        'downstream ViT, 4 classes': (down_vit, 'global'),
        'downstream WinfT, 4 classes': (down_win, measured6.stem),
    }
    results = {
        'command': ' '.join(['python', 'benchmarks/fmnist_study.py'] + (argv if argv is not None else sys.argv[1:])),
        'versions': f'vitfree {vitfree.__version__}, timm {timm.__version__}, torch {torch.__version__}, '
                    f'python {platform.python_version()}, {platform.machine()}, {torch.get_num_threads()} threads',
        'budget': (f'{args.train_per_class}/class train (10 classes), {args.val_per_class}/class val, full test split; '
                   f'{args.epochs} epochs (downstream {args.down_epochs} epochs, {args.down_per_class}/class); '
                   f'batch {args.batch_size}, AdamW lr {args.lr}, cosine, 1 warm-up epoch, label smoothing 0.1, '
                   f'RandomResizedCrop scale (0.6, 1), hflip; fp32 on CPU'),
        'arms': {k: dict(summarise(v), windows=w) for k, (v, w) in arms.items()},
        'selection_all10': sel, 'selection_up6': sel6,
        'wall_s_this_invocation': time.perf_counter() - t_start,
    }
    write_results(ROOT / 'benchmarks' / 'results', results, tag)
    log(f'wrote benchmarks/results/{tag}.json and .md ({len(vit)} seed(s) so far)')


if __name__ == '__main__':
    sys.exit(main())
